//! Pasting a decoded 64×64 mask into its box, as big_vision's segmentation evaluator does:
//!
//! 1. the box in whole pixels: `int(y_min * H)`, `int(x_min * W)`, … ([`BBox::pixel_rect`]);
//! 2. the 64×64 float logits resized to the box with
//!    `PIL.Image.fromarray(logits).resize((w, h), BILINEAR)` (mode `F`);
//! 3. pixels `> 0` are the object, inside the box; everything outside is background.
//!
//! # The resampler (a port of Pillow's `src/libImaging/Resample.c`, 32-bit float path)
//!
//! Separable, horizontal pass first, each pass skipped when its size is unchanged; the
//! intermediate image is f32. For one axis from `in_size` to `out_size`:
//!
//! ```text
//! scale       = in_size / out_size
//! filterscale = max(scale, 1)                  (shrinking stretches the kernel: antialiasing)
//! support     = 1 * filterscale                (bilinear support is 1)
//! center(o)   = (o + 0.5) * scale
//! xmin(o)     = max(0,       trunc(center - support + 0.5))
//! xmax(o)     = min(in_size, trunc(center + support + 0.5))
//! w(o, i)     = max(0, 1 - |(i - center + 0.5) / filterscale|)   for i in xmin..xmax
//! w(o, i)    /= sum_i w(o, i)
//! out(o)      = (f32) sum_i in(i) * w(o, i)    (weights and sum in f64)
//! ```

use image::{GrayImage, Luma};

use super::parse::BBox;

/// Side of a decoded mask.
pub const MASK_SIDE: usize = 64;

/// Per output pixel: first input index and normalised weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale;
    (0..out_size)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|i| {
                    let x = ((i as f64 - center + 0.5) / filterscale).abs();
                    (1.0 - x).max(0.0)
                })
                .collect();
            let sum: f64 = w.iter().sum();
            if sum != 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            (xmin, w)
        })
        .collect()
}

/// Resize a row-major `in_w × in_h` f32 image to `out_w × out_h` with Pillow's bilinear filter.
fn resize_bilinear(src: &[f32], in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> Vec<f32> {
    let mut cur = src.to_vec();
    let mut w = in_w;
    if out_w != in_w {
        let coeffs = coefficients(in_w, out_w);
        let mut next = vec![0.0f32; out_w * in_h];
        for y in 0..in_h {
            let row = &cur[y * w..(y + 1) * w];
            for (x, (start, k)) in coeffs.iter().enumerate() {
                let s: f64 = k
                    .iter()
                    .enumerate()
                    .map(|(j, kv)| row[start + j] as f64 * kv)
                    .sum();
                next[y * out_w + x] = s as f32;
            }
        }
        cur = next;
        w = out_w;
    }
    if out_h != in_h {
        let coeffs = coefficients(in_h, out_h);
        let mut next = vec![0.0f32; w * out_h];
        for (y, (start, k)) in coeffs.iter().enumerate() {
            for x in 0..w {
                let s: f64 = k
                    .iter()
                    .enumerate()
                    .map(|(j, kv)| cur[(start + j) * w + x] as f64 * kv)
                    .sum();
                next[y * w + x] = s as f32;
            }
        }
        cur = next;
    }
    cur
}

/// Paste a decoded mask (64×64 logits, row-major) into its box on a `width × height` image:
/// the logits are resized to the box ([`BBox::pixel_rect`]) bilinearly and thresholded at 0.
/// Returns a full-image mask with 255 for the object and 0 elsewhere (all 0 when the box is
/// empty in whole pixels).
pub fn paste_mask(
    mask: &[f32; MASK_SIDE * MASK_SIDE],
    bbox: &BBox,
    width: u32,
    height: u32,
) -> GrayImage {
    let mut out = GrayImage::new(width, height);
    let [x0, y0, x1, y1] = bbox.pixel_rect(width, height);
    if x1 <= x0 || y1 <= y0 {
        return out;
    }
    let (bw, bh) = ((x1 - x0) as usize, (y1 - y0) as usize);
    let resized = resize_bilinear(mask, MASK_SIDE, MASK_SIDE, bw, bh);
    for (i, v) in resized.iter().enumerate() {
        if *v > 0.0 {
            out.put_pixel(x0 + (i % bw) as u32, y0 + (i / bw) as u32, Luma([255]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_copies() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(resize_bilinear(&src, 4, 3, 4, 3), src);
    }

    /// Values computed with Pillow 13: `Image.fromarray(np.arange(4, dtype=np.float32)[None])
    /// .resize((8, 1), BILINEAR)` and `.resize((3, 1), BILINEAR)`.
    #[test]
    fn matches_pillow_up_and_down() {
        let src = [0.0f32, 1.0, 2.0, 3.0];
        let up = resize_bilinear(&src, 4, 1, 8, 1);
        let want_up = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0];
        assert_eq!(up, want_up);
        let down = resize_bilinear(&src, 4, 1, 3, 1);
        let want_down = [0.3f32, 1.5, 2.7];
        for (g, w) in down.iter().zip(want_down) {
            assert!((g - w).abs() < 1e-6, "{down:?}");
        }
    }

    #[test]
    fn pastes_inside_the_box_only() {
        let mask = [1.0f32; MASK_SIDE * MASK_SIDE];
        let bbox = BBox {
            x_min: 10.7,
            y_min: 5.2,
            x_max: 20.0,
            y_max: 9.9,
        };
        let m = paste_mask(&mask, &bbox, 30, 12);
        for (x, y, p) in m.enumerate_pixels() {
            let inside = (10..20).contains(&x) && (5..9).contains(&y);
            assert_eq!(p.0[0] == 255, inside, "({x}, {y})");
        }
        let empty = BBox {
            x_min: 3.0,
            y_min: 3.0,
            x_max: 3.9,
            y_max: 8.0,
        };
        assert!(paste_mask(&mask, &empty, 30, 12)
            .pixels()
            .all(|p| p.0[0] == 0));
    }
}
