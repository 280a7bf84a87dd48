//! Drawing objects onto the image: translucent masks, labels (DejaVu Sans, rendered with
//! `ab_glyph`) and box outlines, in that order so the outlines stay visible.
//!
//! Object `i` of the list is drawn in [`object_color`]`(i)`. Its outline covers the pixel
//! rectangle of [`BBox::pixel_rect`](super::BBox::pixel_rect): the first and last
//! [`line_width`] columns and rows of it, fully opaque. Its label sits on a filled
//! rectangle of the same colour just above the box (inside it when the box touches the top
//! of the image). Invalid objects are not drawn.

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use image::{DynamicImage, GrayImage, Rgba, RgbaImage};

use super::parse::Object;

/// DejaVu Sans 2.37 (Bitstream Vera licence, see `assets/fonts/LICENSE-DejaVu.txt`).
static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The ten colours of matplotlib's `tab10`, cycled over objects.
const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// Opacity of mask overlays.
const MASK_ALPHA: f32 = 0.45;

/// The colour (RGB) object `index` is drawn in.
pub fn object_color(index: usize) -> [u8; 3] {
    PALETTE[index % PALETTE.len()]
}

/// Width in pixels of box outlines on a `width × height` image.
pub fn line_width(width: u32, height: u32) -> u32 {
    (width.min(height) / 160).max(2)
}

fn font() -> Option<&'static FontRef<'static>> {
    static FONT: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).ok())
        .as_ref()
}

fn blend(px: &mut Rgba<u8>, color: [u8; 3], alpha: f32) {
    for (c, v) in px.0.iter_mut().zip(color) {
        *c = (*c as f32 * (1.0 - alpha) + v as f32 * alpha).round() as u8;
    }
}

/// Fill the rectangle `[x0, x1) × [y0, y1)` (clipped) with an opaque colour.
fn fill(img: &mut RgbaImage, [x0, y0, x1, y1]: [i64; 4], color: [u8; 3]) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    for y in y0.max(0)..y1.min(h) {
        for x in x0.max(0)..x1.min(w) {
            img.put_pixel(
                x as u32,
                y as u32,
                Rgba([color[0], color[1], color[2], 255]),
            );
        }
    }
}

/// Draw `text` with its top-left corner at `(x, y)`, `px` pixels high, in `color`; returns
/// the text's width and height. With `dry_run` nothing is drawn (measuring).
fn text(
    img: &mut RgbaImage,
    s: &str,
    (x, y): (i64, i64),
    px: f32,
    color: [u8; 3],
    dry_run: bool,
) -> (i64, i64) {
    let Some(font) = font() else {
        return (0, 0);
    };
    let scale = PxScale::from(px);
    let scaled = font.as_scaled(scale);
    let mut caret = 0.0f32;
    let mut prev = None;
    let (w, h) = (img.width() as i64, img.height() as i64);
    for ch in s.chars().filter(|c| !c.is_control()) {
        let id = scaled.glyph_id(ch);
        if let Some(p) = prev {
            caret += scaled.kern(p, id);
        }
        prev = Some(id);
        let glyph = id.with_scale_and_position(scale, point(caret, scaled.ascent()));
        caret += scaled.h_advance(id);
        if dry_run {
            continue;
        }
        if let Some(outline) = font.outline_glyph(glyph) {
            let bounds = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                let px_x = x + bounds.min.x as i64 + gx as i64;
                let px_y = y + bounds.min.y as i64 + gy as i64;
                if (0..w).contains(&px_x) && (0..h).contains(&px_y) {
                    blend(
                        img.get_pixel_mut(px_x as u32, px_y as u32),
                        color,
                        coverage.min(1.0),
                    );
                }
            });
        }
    }
    (
        caret.ceil() as i64,
        (scaled.ascent() - scaled.descent()).ceil() as i64,
    )
}

/// Draw `objects` onto `image`: each valid object's mask (`masks[i]`, a full-image mask with
/// non-zero for the object, when present) as a translucent overlay, its label and its box.
/// `masks` may be shorter than `objects`.
pub fn annotate(
    image: &DynamicImage,
    objects: &[Object],
    masks: &[Option<GrayImage>],
) -> RgbaImage {
    let mut out = image.to_rgba8();
    let (w, h) = out.dimensions();
    let valid = || objects.iter().enumerate().filter(|(_, o)| o.valid);
    for (i, _) in valid() {
        let Some(Some(mask)) = masks.get(i) else {
            continue;
        };
        if mask.dimensions() != (w, h) {
            log::warn!(
                "mask {i} is {:?}, the image {w}x{h}: not drawn",
                mask.dimensions()
            );
            continue;
        }
        let color = object_color(i);
        for (px, m) in out.pixels_mut().zip(mask.pixels()) {
            if m.0[0] > 0 {
                blend(px, color, MASK_ALPHA);
            }
        }
    }
    let font_px = (w.min(h) as f32 / 22.0).clamp(12.0, 40.0);
    let pad = 2;
    for (i, obj) in valid() {
        let label = obj.label.trim();
        if label.is_empty() {
            continue;
        }
        let [x0, y0, _, _] = obj.bbox.pixel_rect(w, h).map(i64::from);
        let color = object_color(i);
        let (tw, th) = text(&mut out, label, (0, 0), font_px, color, true);
        let (bw, bh) = (tw + 2 * pad, th + 2 * pad);
        let top = if y0 >= bh { y0 - bh } else { y0 };
        fill(&mut out, [x0, top, x0 + bw, top + bh], color);
        let luma = 0.299 * color[0] as f32 + 0.587 * color[1] as f32 + 0.114 * color[2] as f32;
        let ink = if luma > 150.0 {
            [0, 0, 0]
        } else {
            [255, 255, 255]
        };
        text(&mut out, label, (x0 + pad, top + pad), font_px, ink, false);
    }
    let t = i64::from(line_width(w, h));
    for (i, obj) in valid() {
        let [x0, y0, x1, y1] = obj.bbox.pixel_rect(w, h).map(i64::from);
        if x1 <= x0 || y1 <= y0 {
            continue;
        }
        let color = object_color(i);
        fill(&mut out, [x0, y0, x1, (y0 + t).min(y1)], color);
        fill(&mut out, [x0, (y1 - t).max(y0), x1, y1], color);
        fill(&mut out, [x0, y0, (x0 + t).min(x1), y1], color);
        fill(&mut out, [(x1 - t).max(x0), y0, x1, y1], color);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::parse::parse_answer;

    #[test]
    fn font_loads_and_text_has_ink() {
        assert!(font().is_some());
        let mut img = RgbaImage::from_pixel(120, 40, Rgba([0, 0, 0, 255]));
        let (tw, th) = text(&mut img, "cat dog", (2, 2), 20.0, [255, 255, 255], false);
        assert!(tw > 40 && th >= 20, "{tw}x{th}");
        let lit = img.pixels().filter(|p| p.0[0] > 128).count();
        assert!(lit > 50, "only {lit} bright pixels");
    }

    #[test]
    fn boxes_labels_and_masks_land_where_expected() {
        let base =
            DynamicImage::ImageRgba8(RgbaImage::from_pixel(200, 100, Rgba([10, 20, 30, 255])));
        let objs = parse_answer(
            "<loc0512><loc0256><loc0921><loc0768> cat ; <loc0000><loc0000><loc0100><loc0100>",
            200,
            100,
        );
        let mut mask = GrayImage::new(200, 100);
        mask.put_pixel(100, 70, image::Luma([255]));
        let out = annotate(&base, &objs, &[Some(mask)]);
        // Box 0: x 50..150, y 50..89 (truncated), outline 2 px.
        let c0 = object_color(0);
        let rgba = |c: [u8; 3]| Rgba([c[0], c[1], c[2], 255]);
        for (x, y) in [
            (50, 70),
            (51, 70),
            (149, 70),
            (148, 70),
            (100, 50),
            (100, 88),
        ] {
            assert_eq!(*out.get_pixel(x, y), rgba(c0), "({x}, {y})");
        }
        assert_eq!(*out.get_pixel(52, 70), Rgba([10, 20, 30, 255]));
        assert_eq!(*out.get_pixel(150, 70), Rgba([10, 20, 30, 255]));
        // The mask pixel is tinted, not replaced.
        let m = out.get_pixel(100, 70);
        assert_ne!(*m, Rgba([10, 20, 30, 255]));
        assert_ne!(*m, rgba(c0));
        // The label sits above the box, in the object's colour.
        assert_eq!(*out.get_pixel(50, 49), rgba(c0));
        // Object 1 touches the top-left corner: its outline starts at (0, 0).
        assert_eq!(*out.get_pixel(0, 5), rgba(object_color(1)));
    }
}
