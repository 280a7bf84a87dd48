//! Detection boxes and segmentation masks from PaliGemma's `<locNNNN>` / `<segNNN>` answers.
//!
//! [`parse_answer`] turns the text of `detect cat ; dog` or `segment cat` answers into
//! [`Object`]s with pixel boxes; [`MaskDecoder`] decodes their mask tokens with big_vision's
//! VQ-VAE (`vae-oid.npz`) on the GPU; [`paste_mask`] places a decoded mask in its box on the
//! full image; [`annotate`] draws everything. [`process_answer`] does all of it for the CLI
//! and writes the requested files, returning the JSON [`Report`].
//!
//! ```no_run
//! # fn main() -> paligemma::Result<()> {
//! use paligemma::gpu::{Gpu, GpuOptions};
//! use paligemma::tasks::{paste_mask, parse_answer, MaskDecoder};
//!
//! let objects = parse_answer("<loc0100><loc0080><loc0700><loc0500><seg001>…<seg016> cat", 451, 300);
//! let decoder = MaskDecoder::load(Gpu::new(GpuOptions::default())?, "vae-oid.npz".as_ref())?;
//! let codes: Vec<[u32; 16]> = objects.iter().filter_map(|o| o.seg_codes).collect();
//! let masks = decoder.decode(&codes)?;
//! let full = paste_mask(&masks[0], &objects[0].bbox, 451, 300);
//! # Ok(()) }
//! ```

pub mod draw;
pub mod mask;
pub mod parse;
pub mod vae;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{GenericImageView, GrayImage, ImageFormat};
use serde::Serialize;

pub use draw::annotate;
pub use mask::paste_mask;
pub use parse::{parse_answer, BBox, Object};
pub use vae::MaskDecoder;

use crate::gpu::Gpu;
use crate::processor::image::decode_image;
use crate::{Error, Result};

/// What [`process_answer`] produces besides the parsed objects.
#[derive(Debug, Clone, Default)]
pub struct OutputOptions {
    /// big_vision's mask decoder weights (`vae-oid.npz`); needed to decode `<seg>` tokens.
    pub vae: Option<PathBuf>,
    /// Write the image with boxes, labels and masks drawn here (PNG).
    pub annotate: Option<PathBuf>,
    /// Write one 8-bit PNG per decoded mask (255 = object, 0 = background) in this
    /// directory, created if needed: `NN_label.png` with NN the object's index.
    pub mask_dir: Option<PathBuf>,
}

/// One object of a [`Report`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectReport {
    /// The label.
    pub label: String,
    /// The box in pixels.
    #[serde(rename = "box")]
    pub bbox: BBox,
    /// Whether the object was well formed.
    pub valid: bool,
    /// Why it is not (absent when valid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The mask PNG written for it, if any.
    pub mask_png: Option<PathBuf>,
}

/// The JSON shape of a parsed answer:
/// `{"objects": [{"label", "box": {"x_min", "y_min", "x_max", "y_max"}, "valid", "mask_png"}]}`
/// (plus `"reason"` for invalid objects).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// The objects in answer order.
    pub objects: Vec<ObjectReport>,
}

impl From<&Object> for ObjectReport {
    fn from(o: &Object) -> Self {
        ObjectReport {
            label: o.label.clone(),
            bbox: o.bbox,
            valid: o.valid,
            reason: o.reason.clone(),
            mask_png: None,
        }
    }
}

impl Report {
    /// One line per object, for terminals.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (i, o) in self.objects.iter().enumerate() {
            let b = &o.bbox;
            let label = if o.label.is_empty() {
                "(no label)"
            } else {
                &o.label
            };
            if o.valid {
                s += &format!(
                    "{i}: {label}  x {:.1}..{:.1}  y {:.1}..{:.1}",
                    b.x_min, b.x_max, b.y_min, b.y_max
                );
            } else {
                s += &format!(
                    "{i}: {label}  invalid: {}",
                    o.reason.as_deref().unwrap_or("?")
                );
            }
            if let Some(p) = &o.mask_png {
                s += &format!("  mask {}", p.display());
            }
            s.push('\n');
        }
        s
    }
}

/// File name of object `index`'s mask: `NN_label.png`, the label reduced to `[a-z0-9_-]`.
fn mask_file_name(index: usize, label: &str) -> String {
    let slug: String = label
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let slug = slug.trim_matches('_');
    if slug.is_empty() {
        format!("{index:02}.png")
    } else {
        format!("{index:02}_{slug}.png")
    }
}

/// The full-image masks (`width × height`) of `objects`, indexed like them: the `<seg>`
/// codes of every valid object that has them decoded by `decoder` in one batch and pasted
/// into its box; `None` for the others.
pub fn decode_masks(
    decoder: &MaskDecoder,
    objects: &[Object],
    width: u32,
    height: u32,
) -> Result<Vec<Option<GrayImage>>> {
    let with_codes: Vec<usize> = (0..objects.len())
        .filter(|&i| objects[i].valid && objects[i].seg_codes.is_some())
        .collect();
    let mut masks = vec![None; objects.len()];
    if with_codes.is_empty() {
        return Ok(masks);
    }
    let codes: Vec<[u32; parse::SEG_TOKENS]> = with_codes
        .iter()
        .filter_map(|&i| objects[i].seg_codes)
        .collect();
    let decoded = decoder.decode(&codes)?;
    for (&i, m) in with_codes.iter().zip(&decoded) {
        masks[i] = Some(paste_mask(m, &objects[i].bbox, width, height));
    }
    Ok(masks)
}

/// Parse `answer` for the image at `image_path`, decode the masks of valid objects that have
/// `<seg>` tokens (with `options.vae`, on the GPU that `gpu` opens only when needed), and
/// write the annotated image and mask PNGs the options ask for.
///
/// Asking for `mask_dir` when the answer has mask tokens but no `vae` is given is an error;
/// `annotate` without `vae` draws boxes and labels only.
pub fn process_answer(
    answer: &str,
    image_path: &Path,
    options: &OutputOptions,
    gpu: impl FnOnce() -> Result<Arc<Gpu>>,
) -> Result<Report> {
    let image = decode_image(image_path)?;
    let (width, height) = image.dimensions();
    let objects = parse_answer(answer, width, height);
    let with_codes = objects
        .iter()
        .filter(|o| o.valid && o.seg_codes.is_some())
        .count();
    let mut masks: Vec<Option<GrayImage>> = vec![None; objects.len()];
    if with_codes > 0 {
        match &options.vae {
            Some(vae) => {
                let decoder = MaskDecoder::load(gpu()?, vae)?;
                masks = decode_masks(&decoder, &objects, width, height)?;
            }
            None if options.mask_dir.is_some() => {
                return Err(Error::Request(format!(
                    "{with_codes} object(s) have <seg> mask tokens; writing their masks needs \
                     the mask decoder (big_vision's vae-oid.npz)"
                )))
            }
            None if options.annotate.is_some() => log::warn!(
                "{with_codes} object(s) have <seg> mask tokens but no mask decoder was given: masks not drawn"
            ),
            None => {}
        }
    }
    let mut report = Report {
        objects: objects.iter().map(ObjectReport::from).collect(),
    };
    if let Some(dir) = &options.mask_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for (i, mask) in masks.iter().enumerate() {
            if let Some(mask) = mask {
                let path = dir.join(mask_file_name(i, &objects[i].label));
                write_png(&path, |p| mask.save_with_format(p, ImageFormat::Png))?;
                report.objects[i].mask_png = Some(path);
            }
        }
    }
    if let Some(path) = &options.annotate {
        let drawn = annotate(&image, &objects, &masks);
        write_png(path, |p| drawn.save_with_format(p, ImageFormat::Png))?;
    }
    Ok(report)
}

fn write_png(path: &Path, save: impl FnOnce(&Path) -> image::ImageResult<()>) -> Result<()> {
    save(path).map_err(|e| match e {
        image::ImageError::IoError(io) => Error::io(path, io),
        other => Error::Image {
            path: path.to_path_buf(),
            msg: format!("writing PNG: {other}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_file_names_are_safe() {
        assert_eq!(mask_file_name(3, "Big dog"), "03_big_dog.png");
        assert_eq!(mask_file_name(12, "../../etc/passwd"), "12_etc_passwd.png");
        assert_eq!(mask_file_name(0, ""), "00.png");
        assert_eq!(mask_file_name(1, "café"), "01_caf.png");
    }

    #[test]
    fn report_json_shape() {
        let objects = parse_answer(
            "<loc0000><loc0000><loc0512><loc0512> cat ; <loc0001> x",
            100,
            50,
        );
        let report = Report {
            objects: objects.iter().map(ObjectReport::from).collect(),
        };
        let v: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(
            v["objects"][0],
            serde_json::json!({"label": "cat", "box": {"x_min": 0.0, "y_min": 0.0, "x_max": 50.0, "y_max": 25.0}, "valid": true, "mask_png": null})
        );
        assert_eq!(v["objects"][1]["valid"], false);
        assert!(v["objects"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("found 1"));
    }
}
