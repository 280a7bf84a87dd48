//! Image preprocessing for PaliGemma, matching Hugging Face's `SiglipImageProcessor` (PIL backend).
//!
//! The reference pipeline is
//!
//! 1. `PIL.Image.open(path)`, then transformers' `convert_to_rgb`: an image with an alpha channel
//!    (or PNG/GIF transparency) is alpha-composited onto an opaque white background with
//!    `PIL.Image.alpha_composite`, as transformers 5 does (a plain `Image.convert("RGB")` would
//!    instead discard alpha); anything else goes through `Image.convert("RGB")`, so grayscale
//!    expands to R = G = B and palette images expand their palette;
//! 2. `image.resize((width, height), resample=PIL.Image.BICUBIC)` on the 8-bit image;
//! 3. `x * rescale_factor` (1/255), computed in f64 and stored as f32;
//! 4. `(x - mean) / std` in f32 (mean = std = 0.5 for PaliGemma);
//! 5. laid out channel-first, `[3, height, width]`.
//!
//! # The resampler (a port of Pillow's `src/libImaging/Resample.c`, 8-bit path)
//!
//! Pillow resizes separably: a horizontal pass over the rows the vertical pass needs, then a
//! vertical pass; a pass is skipped when that dimension is unchanged. The intermediate image is
//! 8-bit, i.e. rounded and clipped to `0..=255` between the passes. For one axis resized from
//! `in_size` to `out_size`:
//!
//! ```text
//! scale       = in_size / out_size
//! filterscale = max(scale, 1)                  (downscaling stretches the kernel: antialiasing)
//! support     = 2 * filterscale                (bicubic support is 2)
//! center(o)   = (o + 0.5) * scale              (output pixel o's centre in input coordinates)
//! xmin(o)     = max(0,       trunc(center - support + 0.5))
//! xmax(o)     = min(in_size, trunc(center + support + 0.5))
//! w(o, i)     = K((i - center + 0.5) / filterscale)  for i in xmin..xmax
//! w(o, i)    /= sum_i w(o, i)                  (weights normalised per output pixel)
//!
//! K(x) = (a + 2)|x|^3 - (a + 3)|x|^2 + 1          |x| < 1
//!      = a|x|^3 - 5a|x|^2 + 8a|x| - 4a             1 <= |x| < 2      (a = -0.5)
//!      = 0                                          otherwise
//! ```
//!
//! The weights are then turned into fixed point with `PRECISION_BITS = 32 - 8 - 2 = 22` fractional
//! bits, rounding half away from zero: `k = trunc(w * 2^22 ± 0.5)`. Each output sample is
//!
//! ```text
//! out = clamp((2^21 + sum_i in[i] * k[i]) >> 22, 0, 255)     (arithmetic shift = floor)
//! ```
//!
//! i.e. the weighted sum rounded half up and clipped. This reproduces Pillow bit for bit (the
//! unit tests check literal values computed with Pillow 13). Pillow accumulates in `i32`; we
//! accumulate in `i64`, which gives the same numbers (Pillow's sums never overflow `i32`) and
//! cannot overflow.
//!
//! `fast_image_resize`'s CatmullRom convolution was evaluated first and rejected: it stores the
//! weights as `i16` with fewer fractional bits and runs the passes in a different order, and
//! differed from Pillow by up to 5 levels on natural photos and up to 27 levels on noise.

use std::borrow::Cow;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};
use serde_json::Value;

use super::jpeg::JpegError;
use crate::{Error, Result};

/// Largest accepted image side, in pixels (checked from the file header, before decoding).
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Largest accepted image area, in pixels (checked from the file header, before decoding).
pub const MAX_IMAGE_PIXELS: u64 = 1 << 28;
/// Largest buffer a decoder may allocate for one image, in bytes.
pub const MAX_DECODE_BYTES: u64 = 2 << 30;

/// Fractional bits of Pillow's fixed-point resampling weights.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Resampling filter used to resize images.
///
/// Only bicubic is supported: it is what every published SigLIP / PaliGemma checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// PIL's `Image.BICUBIC` (value 3 in `preprocessor_config.json`): cubic convolution with
    /// a = -0.5, stretched by the scale factor when downscaling.
    Bicubic,
}

impl Resample {
    /// The filter for a PIL resampling code as written in `preprocessor_config.json`, or `None`
    /// for filters this crate does not implement.
    pub fn from_pil(code: i64) -> Option<Self> {
        match code {
            3 => Some(Resample::Bicubic),
            _ => None,
        }
    }

    /// The PIL resampling code of this filter.
    pub fn pil_code(self) -> i64 {
        match self {
            Resample::Bicubic => 3,
        }
    }
}

/// PIL's name for a resampling code, for error messages.
fn pil_resample_name(code: i64) -> &'static str {
    match code {
        0 => "nearest",
        1 => "lanczos",
        2 => "bilinear",
        3 => "bicubic",
        4 => "box",
        5 => "hamming",
        _ => "unknown",
    }
}

/// Image preprocessing settings, as in a Hugging Face `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorConfig {
    /// Output height in pixels (`size.height`).
    pub height: u32,
    /// Output width in pixels (`size.width`).
    pub width: u32,
    /// Whether to resize to `height` x `width` (`do_resize`). When false the image keeps its
    /// own size.
    pub do_resize: bool,
    /// Resampling filter (`resample`).
    pub resample: Resample,
    /// Whether to multiply the 8-bit values by `rescale_factor` (`do_rescale`).
    pub do_rescale: bool,
    /// Factor applied to the 8-bit values, normally 1/255 (`rescale_factor`).
    pub rescale_factor: f64,
    /// Whether to apply `(x - image_mean) / image_std` per channel (`do_normalize`).
    pub do_normalize: bool,
    /// Per-channel (R, G, B) mean subtracted when normalising (`image_mean`).
    pub image_mean: [f32; 3],
    /// Per-channel (R, G, B) standard deviation divided by when normalising (`image_std`).
    pub image_std: [f32; 3],
    /// Whether to convert inputs to RGB (`do_convert_rgb`). The vision tower takes exactly three
    /// channels, so every image is converted to 8-bit RGB whatever this says; the flag is kept
    /// only so that a config file reads back faithfully.
    pub do_convert_rgb: bool,
}

impl Default for PreprocessorConfig {
    /// SigLIP's defaults: 224 x 224, bicubic, rescale by 1/255, normalise with mean = std = 0.5.
    fn default() -> Self {
        Self::paligemma(224)
    }
}

impl PreprocessorConfig {
    /// The published PaliGemma preprocessing for `image_size` x `image_size` inputs (224, 448 or
    /// 896 in the released checkpoints): bicubic resize, rescale by 1/255, normalise with
    /// mean = std = 0.5 (so pixels land in [-1, 1]), convert to RGB.
    pub fn paligemma(image_size: u32) -> Self {
        Self {
            height: image_size,
            width: image_size,
            do_resize: true,
            resample: Resample::Bicubic,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            do_convert_rgb: true,
        }
    }

    /// Read a Hugging Face `preprocessor_config.json`.
    ///
    /// Understood keys (as HF writes them): `"size": {"height", "width"}`, `"resample"`,
    /// `"do_resize"`, `"do_rescale"`, `"rescale_factor"`, `"do_normalize"`, `"image_mean"`,
    /// `"image_std"` (each a number or a list of three) and `"do_convert_rgb"`. Missing or `null`
    /// keys take SigLIP's defaults; other keys are ignored. A resample value other than 3
    /// (bicubic), a malformed value or a size outside `1..=MAX_IMAGE_SIDE` is an
    /// [`Error::Model`] naming the file and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|msg| Error::Model(format!("{}: {msg}", path.display())))
    }

    /// Parse the JSON text of a `preprocessor_config.json`; the error is a bare message.
    fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let obj = value
            .as_object()
            .ok_or_else(|| "expected a JSON object at the top level".to_string())?;
        let present = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let mut cfg = Self::default();

        let get_bool = |key: &str, default: bool| -> std::result::Result<bool, String> {
            match present(key) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| format!("`{key}` must be true or false, got {v}")),
            }
        };
        cfg.do_resize = get_bool("do_resize", cfg.do_resize)?;
        cfg.do_rescale = get_bool("do_rescale", cfg.do_rescale)?;
        cfg.do_normalize = get_bool("do_normalize", cfg.do_normalize)?;
        cfg.do_convert_rgb = get_bool("do_convert_rgb", cfg.do_convert_rgb)?;

        if let Some(size) = present("size") {
            let dim = |key: &str| -> std::result::Result<u32, String> {
                let v = size.get(key).filter(|v| !v.is_null()).ok_or_else(|| {
                    format!("`size` must be {{\"height\": H, \"width\": W}}, got {size}")
                })?;
                match v.as_u64() {
                    Some(n) if n >= 1 && n <= MAX_IMAGE_SIDE as u64 => Ok(n as u32),
                    _ => Err(format!(
                        "`size.{key}` must be an integer in 1..={MAX_IMAGE_SIDE}, got {v}"
                    )),
                }
            };
            cfg.height = dim("height")?;
            cfg.width = dim("width")?;
        }

        if let Some(v) = present("resample") {
            let code = v
                .as_i64()
                .ok_or_else(|| format!("`resample` must be an integer PIL filter code, got {v}"))?;
            cfg.resample = Resample::from_pil(code).ok_or_else(|| {
                format!(
                    "unsupported `resample` value {code} ({}); only 3 (bicubic) is supported",
                    pil_resample_name(code)
                )
            })?;
        }

        if let Some(v) = present("rescale_factor") {
            cfg.rescale_factor = v
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("`rescale_factor` must be a number, got {v}"))?;
        }

        let get_triple = |key: &str, default: [f32; 3]| -> std::result::Result<[f32; 3], String> {
            let Some(v) = present(key) else {
                return Ok(default);
            };
            let bad = || format!("`{key}` must be a number or a list of 3 numbers, got {v}");
            let nums: Vec<f64> = match v {
                Value::Number(n) => vec![n.as_f64().ok_or_else(bad)?; 3],
                Value::Array(items) if items.len() == 3 => items
                    .iter()
                    .map(|x| x.as_f64().ok_or_else(bad))
                    .collect::<std::result::Result<_, _>>()?,
                _ => return Err(bad()),
            };
            if nums.iter().any(|x| !x.is_finite()) {
                return Err(bad());
            }
            Ok([nums[0] as f32, nums[1] as f32, nums[2] as f32])
        };
        cfg.image_mean = get_triple("image_mean", cfg.image_mean)?;
        cfg.image_std = get_triple("image_std", cfg.image_std)?;
        if cfg.do_normalize && cfg.image_std.contains(&0.0) {
            return Err(format!(
                "`image_std` must not contain 0, got {:?}",
                cfg.image_std
            ));
        }
        Ok(cfg)
    }
}

/// A preprocessed image: float32 values laid out `[3, height, width]` (channel-first, RGB).
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// `3 * height * width` values, channel-major: `data[(c * height + y) * width + x]`.
    pub data: Vec<f32>,
}

impl PixelValues {
    /// The tensor shape, `[3, height, width]`.
    pub fn shape(&self) -> [usize; 3] {
        [3, self.height, self.width]
    }
}

/// Turns images into the vision tower's `pixel_values`.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    config: PreprocessorConfig,
}

impl ImageProcessor {
    /// A processor applying `config`.
    pub fn new(config: PreprocessorConfig) -> Self {
        Self { config }
    }

    /// The settings this processor applies.
    pub fn config(&self) -> &PreprocessorConfig {
        &self.config
    }

    /// Decode the image file at `path` (JPEG through libjpeg-turbo's decoder, exactly as Pillow;
    /// PNG, GIF, BMP, WebP and TIFF through the `image` crate) and preprocess it. See
    /// [`decode_image`] for the checks made on the file.
    pub fn load(&self, path: &Path) -> Result<PixelValues> {
        Ok(self.preprocess(&decode_image(path)?))
    }

    /// [`load`](Self::load) for an image file's bytes in memory ([`decode_image_bytes`]);
    /// `name` stands for the image in error messages.
    pub fn load_bytes(&self, data: &[u8], name: &Path) -> Result<PixelValues> {
        Ok(self.preprocess(&decode_image_bytes(data, name)?))
    }

    /// Preprocess a decoded image: convert to 8-bit RGB, resize (Pillow-exact bicubic), rescale,
    /// normalise, and lay out channel-first.
    ///
    /// RGB conversion follows transformers' `convert_to_rgb` on a PIL image: an image with an
    /// alpha channel is composited onto opaque white exactly as `PIL.Image.alpha_composite` does
    /// (fully transparent pixels become white); gray is replicated to R = G = B. Images with
    /// 16-bit or float samples are first reduced to 8 bits with `image`'s `to_rgb8` / `to_rgba8`
    /// (16-bit values are scaled with rounding, float values in [0, 1] are scaled by 255); PIL
    /// behaves differently there (it keeps the high byte of 16-bit RGB and clips, rather than
    /// scales, 16-bit grayscale), but such inputs have no single canonical 8-bit rendering
    /// anyway. A zero-sized image (which [`load`](Self::load) rejects) gives an all-black result.
    pub fn preprocess(&self, image: &DynamicImage) -> PixelValues {
        let rgb: Cow<'_, image::RgbImage> = match image {
            DynamicImage::ImageRgb8(buf) => Cow::Borrowed(buf),
            DynamicImage::ImageRgba8(buf) => Cow::Owned(composite_on_white(buf)),
            other if other.color().has_alpha() => Cow::Owned(composite_on_white(&other.to_rgba8())),
            other => Cow::Owned(other.to_rgb8()),
        };
        let (in_w, in_h) = (rgb.width() as usize, rgb.height() as usize);
        let (out_w, out_h) = if self.config.do_resize {
            (self.config.width as usize, self.config.height as usize)
        } else {
            (in_w, in_h)
        };
        let resized: Cow<'_, [u8]> = if (out_w, out_h) == (in_w, in_h) {
            Cow::Borrowed(rgb.as_raw().as_slice())
        } else {
            match self.config.resample {
                Resample::Bicubic => {
                    Cow::Owned(resize_bicubic::<3>(rgb.as_raw(), in_w, in_h, out_w, out_h))
                }
            }
        };
        let lut = self.value_table();
        let plane = out_w * out_h;
        let mut data = vec![0f32; 3 * plane];
        for (i, px) in resized.chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * plane + i] = lut[c][px[c] as usize];
            }
        }
        PixelValues {
            height: out_h,
            width: out_w,
            data,
        }
    }

    /// For each channel, the output value of each 8-bit input level, computed in the same
    /// precision as HF (rescale in f64 then round to f32; normalise in f32).
    fn value_table(&self) -> [[f32; 256]; 3] {
        let cfg = &self.config;
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (level, out) in table.iter_mut().enumerate() {
                let mut v = if cfg.do_rescale {
                    (level as f64 * cfg.rescale_factor) as f32
                } else {
                    level as f32
                };
                if cfg.do_normalize {
                    v = (v - cfg.image_mean[c]) / cfg.image_std[c];
                }
                *out = v;
            }
        }
        lut
    }
}

/// Decode an image file, refusing unreasonable ones before allocating for them.
///
/// Every failure is an error naming `path`: a missing or unreadable file ([`Error::Io`]); a file
/// that is not an image, is truncated or corrupt, declares more than [`MAX_IMAGE_SIDE`] pixels on
/// a side or [`MAX_IMAGE_PIXELS`] in all (checked from the header), would need more than
/// [`MAX_DECODE_BYTES`] to decode, or has zero width or height ([`Error::Image`]). The format is
/// recognised from the file's contents, falling back to its extension. EXIF orientation is not
/// applied, like `PIL.Image.open`.
///
/// JPEGs are decoded with libjpeg-turbo's decoder (vendored by `mozjpeg-sys`) with Pillow's
/// settings, so the pixels are exactly Pillow's: RGB, or 8-bit gray for grayscale files; CMYK
/// files are converted to RGB as Pillow converts them. A truncated JPEG is an error, as in
/// Pillow. Other formats go through the `image` crate.
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    decode_from(
        path,
        |limits| open_reader(path, limits),
        || decode_jpeg_file(path),
    )
}

/// [`decode_image`] for an image file's bytes already in memory (an upload, a clipboard, a
/// `data:` URL), with the same decoders and checks. `name` stands for the image in error
/// messages; the format is recognised from the contents only.
pub fn decode_image_bytes(data: &[u8], name: &Path) -> Result<DynamicImage> {
    let open = |limits: Limits| {
        let mut reader = ImageReader::new(std::io::Cursor::new(data))
            .with_guessed_format()
            .map_err(|e| Error::io(name, e))?;
        if reader.format().is_none() {
            return Err(not_an_image(name));
        }
        reader.limits(limits);
        Ok(reader)
    };
    decode_from(name, open, || decode_jpeg_data(data, name))
}

/// The shared body of [`decode_image`] and [`decode_image_bytes`]: `open` gives a reader with
/// the given limits (called again, with relaxed ones, to describe a refused header), `jpeg`
/// decodes the source when it is a JPEG.
fn decode_from<R: std::io::BufRead + std::io::Seek>(
    path: &Path,
    open: impl Fn(Limits) -> Result<ImageReader<R>>,
    jpeg: impl FnOnce() -> Result<DynamicImage>,
) -> Result<DynamicImage> {
    let image_err = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let reader = open(limits)?;
    if reader.format() == Some(image::ImageFormat::Jpeg) {
        return jpeg();
    }
    let what = reader
        .format()
        .map_or("image".to_string(), |f| format!("{f:?}"));
    let too_large = |w: u32, h: u32| too_large_error(path, w, h);
    let describe = |e: image::ImageError| -> Error {
        match e {
            image::ImageError::Limits(_) => {
                // The header was refused. Read just its dimensions again, without the size
                // caps but with a small allocation budget, to say what it declared.
                let mut relaxed = Limits::default();
                relaxed.max_alloc = Some(64 << 20);
                match open(relaxed).ok().and_then(|r| r.into_dimensions().ok()) {
                    Some((w, h)) => too_large(w, h),
                    None => image_err(format!(
                        "too large: the {what} exceeds the decoding limits ({MAX_IMAGE_SIDE} px \
                         per side, {MAX_IMAGE_PIXELS} pixels, {MAX_DECODE_BYTES} bytes): {e}"
                    )),
                }
            }
            other => image_err(format!("cannot decode as {what}: {other}")),
        }
    };
    let decoder = reader.into_decoder().map_err(describe)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(image_err(format!("zero-sized image ({w}x{h})")));
    }
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || w as u64 * h as u64 > MAX_IMAGE_PIXELS {
        return Err(too_large(w, h));
    }
    if decoder.total_bytes() > MAX_DECODE_BYTES {
        return Err(image_err(format!(
            "too large: {w}x{h} needs {} bytes to decode, more than {MAX_DECODE_BYTES}",
            decoder.total_bytes()
        )));
    }
    DynamicImage::from_decoder(decoder).map_err(describe)
}

/// The error for an image whose header declares `w` x `h`, over the size limits.
fn too_large_error(path: &Path, w: u32, h: u32) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        msg: format!(
            "too large: {w}x{h} exceeds the limits ({MAX_IMAGE_SIDE} px per side, \
             {MAX_IMAGE_PIXELS} pixels)"
        ),
    }
}

/// Decode a JPEG file with libjpeg-turbo's decoder (see [`super::jpeg`]), which gives exactly
/// Pillow's pixels; the `image` crate's decoder differs by a few levels. The size limits are
/// checked from the header before decoding.
fn decode_jpeg_file(path: &Path) -> Result<DynamicImage> {
    let image_err = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > MAX_DECODE_BYTES {
        return Err(image_err(format!(
            "too large: a {len}-byte JPEG file, more than {MAX_DECODE_BYTES} bytes"
        )));
    }
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_jpeg_data(&data, path)
}

/// Decode the bytes of a JPEG file (`path` names it in errors) as [`decode_jpeg_file`] does.
fn decode_jpeg_data(data: &[u8], path: &Path) -> Result<DynamicImage> {
    let image_err = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let len = data.len() as u64;
    if len > MAX_DECODE_BYTES {
        return Err(image_err(format!(
            "too large: a {len}-byte JPEG file, more than {MAX_DECODE_BYTES} bytes"
        )));
    }
    let check = |w: u32, h: u32| {
        if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || w as u64 * h as u64 > MAX_IMAGE_PIXELS {
            Err(too_large_error(path, w, h))
        } else {
            Ok(())
        }
    };
    super::jpeg::decode(data, MAX_DECODE_BYTES, check).map_err(|e| match e {
        JpegError::ZeroSized(w, h) => image_err(format!("zero-sized image ({w}x{h})")),
        JpegError::Refused(e) => e,
        JpegError::TooManyBytes(w, h, bytes) => image_err(format!(
            "too large: {w}x{h} needs {bytes} bytes to decode, more than {MAX_DECODE_BYTES}"
        )),
        JpegError::Decode(msg) => image_err(format!("cannot decode as Jpeg: {msg}")),
    })
}

fn not_an_image(path: &Path) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        msg: "not a recognised image format (PNG, JPEG, GIF, BMP, WebP or TIFF)".into(),
    }
}

/// Open `path` for decoding with `limits`, the format recognised from the contents or else the
/// extension.
fn open_reader(path: &Path, limits: Limits) -> Result<ImageReader<BufReader<File>>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = ImageReader::new(BufReader::new(file))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        match image::ImageFormat::from_path(path) {
            Ok(format) => reader.set_format(format),
            Err(_) => return Err(not_an_image(path)),
        }
    }
    reader.limits(limits);
    Ok(reader)
}

/// `PIL.Image.alpha_composite(white, image).convert("RGB")`, in Pillow's integer arithmetic
/// (`src/libImaging/AlphaComposite.c`, 7 fractional bits, `SHIFTFORDIV255` rounding), specialised
/// to an opaque white background.
fn composite_on_white(rgba: &image::RgbaImage) -> image::RgbImage {
    const PRECISION_BITS: u32 = 7;
    const DST: u32 = 255; // background value of every channel, and its alpha
    let shift_div_255 = |a: u32| ((a >> 8) + a) >> 8;
    let mut out = image::RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let sa = p[3] as u32;
        if sa == 0 {
            o.0 = [DST as u8; 3];
            continue;
        }
        let blend = DST * (255 - sa);
        let outa255 = sa * 255 + blend;
        let coef1 = sa * 255 * 255 * (1 << PRECISION_BITS) / outa255;
        let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
        for c in 0..3 {
            let tmp = p[c] as u32 * coef1 + DST * coef2;
            o[c] = (shift_div_255(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8;
        }
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Pillow-exact bicubic resampling (see the module docs for the math).

/// Pillow's bicubic kernel, a = -0.5.
fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Bicubic support radius (before stretching).
const BICUBIC_SUPPORT: f64 = 2.0;

/// Floating-point resampling weights for one axis, as Pillow's `precompute_coeffs`.
struct Coefficients {
    /// Maximum taps per output pixel; `weights` holds `ksize` slots per output pixel.
    ksize: usize,
    /// For each output pixel, the first input index and the number of taps.
    bounds: Vec<(usize, usize)>,
    /// `out_size * ksize` weights; slots past an output pixel's tap count are zero.
    weights: Vec<f64>,
}

fn precompute_coeffs(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0f64; out_size * ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // `as i64` truncates toward zero, like C's `(int)` cast.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let count = (xmax - xmin).max(0) as usize;
        let xmin = xmin as usize;
        let k = &mut weights[xx * ksize..xx * ksize + count];
        let mut ww = 0.0;
        for (x, w) in k.iter_mut().enumerate() {
            *w = bicubic_kernel(((x + xmin) as f64 - center + 0.5) * ss);
            ww += *w;
        }
        if ww != 0.0 {
            for w in k.iter_mut() {
                *w /= ww;
            }
        }
        bounds.push((xmin, count));
    }
    Coefficients {
        ksize,
        bounds,
        weights,
    }
}

/// Pillow's `normalize_coeffs_8bpc`: weights to fixed point, rounding half away from zero.
fn fixed_point_weights(weights: &[f64]) -> Vec<i32> {
    let one = (1u32 << PRECISION_BITS) as f64;
    weights
        .iter()
        .map(|&w| {
            if w < 0.0 {
                (-0.5 + w * one) as i32
            } else {
                (0.5 + w * one) as i32
            }
        })
        .collect()
}

/// Pillow's `clip8`: drop the fractional bits (floor) and clamp to a byte.
#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding bias added to every accumulator (one half in fixed point).
const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Resize an interleaved 8-bit image of `C` channels from `in_w` x `in_h` to `out_w` x `out_h`
/// exactly as Pillow's `Image.resize(..., resample=BICUBIC)` does.
fn resize_bicubic<const C: usize>(
    src: &[u8],
    in_w: usize,
    in_h: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    debug_assert_eq!(src.len(), in_w * in_h * C);
    if out_w == 0 || out_h == 0 {
        return Vec::new();
    }
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;
    let vert = precompute_coeffs(in_h, out_h);
    let vert_k = fixed_point_weights(&vert.weights);
    // Rows of the source that the vertical pass reads.
    let first_row = vert.bounds[0].0;
    let last_row = vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1;

    let (mid, mid_w, row_offset): (Cow<'_, [u8]>, usize, usize) = if need_horizontal {
        let horiz = precompute_coeffs(in_w, out_w);
        let horiz_k = fixed_point_weights(&horiz.weights);
        let rows = last_row.saturating_sub(first_row);
        let mut out = vec![0u8; rows * out_w * C];
        for (r, out_row) in out.chunks_exact_mut(out_w * C).enumerate() {
            let in_row = &src[(first_row + r) * in_w * C..(first_row + r + 1) * in_w * C];
            for (xx, out_px) in out_row.chunks_exact_mut(C).enumerate() {
                let (xmin, count) = horiz.bounds[xx];
                let k = &horiz_k[xx * horiz.ksize..xx * horiz.ksize + count];
                let taps = &in_row[xmin * C..(xmin + count) * C];
                let mut acc = [HALF; C];
                for (&kv, px) in k.iter().zip(taps.chunks_exact(C)) {
                    for c in 0..C {
                        acc[c] += px[c] as i64 * kv as i64;
                    }
                }
                for c in 0..C {
                    out_px[c] = clip8(acc[c]);
                }
            }
        }
        (Cow::Owned(out), out_w, first_row)
    } else {
        (Cow::Borrowed(src), in_w, 0)
    };

    if !need_vertical {
        return mid.into_owned();
    }
    let stride = mid_w * C;
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i64; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, count) = vert.bounds[yy];
        let k = &vert_k[yy * vert.ksize..yy * vert.ksize + count];
        acc.fill(HALF);
        for (i, &kv) in k.iter().enumerate() {
            let y = ymin + i - row_offset;
            let in_row = &mid[y * stride..(y + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(in_row) {
                *a += v as i64 * kv as i64;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The synthetic gradient used with Pillow to produce the expected values below:
    /// 7 x 5 RGB, pixel (x, y) = ((x*37 + y*11) % 256, (x*x*9 + y*50) % 256, 255 - x*25 - y*15).
    fn gradient() -> (Vec<u8>, usize, usize) {
        let (w, h) = (7usize, 5usize);
        let mut v = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                v.push(((x * 37 + y * 11) % 256) as u8);
                v.push(((x * x * 9 + y * 50) % 256) as u8);
                v.push((255 - x * 25 - y * 15) as u8);
            }
        }
        (v, w, h)
    }

    #[test]
    fn kernel_weights_sum_to_one() {
        for &(inp, out) in &[
            (7, 11),
            (11, 7),
            (512, 224),
            (224, 896),
            (5, 1),
            (1, 5),
            (300, 224),
        ] {
            let co = precompute_coeffs(inp, out);
            for (o, &(xmin, count)) in co.bounds.iter().enumerate() {
                assert!(count >= 1 && xmin + count <= inp, "{inp}->{out} pixel {o}");
                let s: f64 = co.weights[o * co.ksize..(o + 1) * co.ksize].iter().sum();
                assert!((s - 1.0).abs() < 1e-12, "{inp}->{out} pixel {o}: sum {s}");
                let fixed: i64 = fixed_point_weights(&co.weights[o * co.ksize..(o + 1) * co.ksize])
                    .iter()
                    .map(|&k| k as i64)
                    .sum();
                assert!((fixed - (1 << PRECISION_BITS)).abs() <= co.ksize as i64);
            }
        }
        assert_eq!(bicubic_kernel(0.0), 1.0);
        assert_eq!(bicubic_kernel(1.0), 0.0);
        assert_eq!(bicubic_kernel(2.0), 0.0);
        assert_eq!(bicubic_kernel(-1.5), -0.0625);
    }

    #[test]
    fn constant_image_stays_constant() {
        for &(w, h, ow, oh) in &[(13, 9, 224, 224), (640, 480, 224, 224), (3, 200, 50, 7)] {
            let src: Vec<u8> = std::iter::repeat_n([17u8, 128, 250], w * h)
                .flatten()
                .collect();
            let out = resize_bicubic::<3>(&src, w, h, ow, oh);
            assert_eq!(out.len(), ow * oh * 3);
            for px in out.chunks_exact(3) {
                assert_eq!(px, [17, 128, 250], "{w}x{h} -> {ow}x{oh}");
            }
        }
    }

    // Expected values from Pillow 13.0.0:
    //   Image.fromarray(gradient).resize((11, 9), Image.BICUBIC) and .resize((3, 2), ...)
    #[test]
    fn upscale_matches_pillow() {
        let (src, w, h) = gradient();
        let out = resize_bicubic::<3>(&src, w, h, 11, 9);
        assert_eq!(out, UPSCALED_11X9);
    }

    #[test]
    fn downscale_matches_pillow() {
        let (src, w, h) = gradient();
        let out = resize_bicubic::<3>(&src, w, h, 3, 2);
        assert_eq!(out, DOWNSCALED_3X2);
    }

    #[test]
    fn single_axis_matches_pillow() {
        // Only the width changes (vertical pass skipped), then only the height.
        let (src, w, h) = gradient();
        assert_eq!(resize_bicubic::<3>(&src, w, h, 4, 5), WIDTH_ONLY_4X5);
        assert_eq!(resize_bicubic::<3>(&src, w, h, 7, 8), HEIGHT_ONLY_7X8);
    }

    #[test]
    fn same_size_is_identity_and_zero_is_empty() {
        let (src, w, h) = gradient();
        assert_eq!(resize_bicubic::<3>(&src, w, h, w, h), src);
        assert!(resize_bicubic::<3>(&src, w, h, 0, 3).is_empty());
        // A zero-sized source must not panic: Pillow-style empty taps give black.
        let out = resize_bicubic::<3>(&[], 0, 0, 2, 2);
        assert_eq!(out, vec![0u8; 12]);
        let out = resize_bicubic::<3>(&[], 0, 4, 2, 2);
        assert_eq!(out, vec![0u8; 12]);
    }

    #[test]
    fn preprocess_normalises_channel_first() {
        let img = image::RgbImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                image::Rgb([0, 255, 51])
            } else {
                image::Rgb([255, 0, 102])
            }
        });
        let mut cfg = PreprocessorConfig::paligemma(224);
        cfg.do_resize = false;
        let pv = ImageProcessor::new(cfg).preprocess(&DynamicImage::ImageRgb8(img));
        assert_eq!((pv.height, pv.width), (1, 2));
        assert_eq!(pv.shape(), [3, 1, 2]);
        let want = [-1.0, 1.0, 1.0, -1.0, -0.6, -0.2];
        for (g, w) in pv.data.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{:?}", pv.data);
        }
    }

    #[test]
    fn alpha_composites_on_white_like_pillow() {
        // (value, alpha) -> Pillow 13: Image.alpha_composite(white, im).convert("RGB")
        let cases = [
            ((0, 1), 254),
            ((200, 128), 227),
            ((17, 254), 18),
            ((255, 3), 255),
            ((100, 255), 100),
            ((3, 77), 179),
            ((42, 0), 255),
        ];
        for ((v, a), want) in cases {
            let img = image::RgbaImage::from_pixel(1, 1, image::Rgba([v, v, v, a]));
            assert_eq!(
                composite_on_white(&img).get_pixel(0, 0).0,
                [want; 3],
                "{v} {a}"
            );
        }
        // Opaque pixels are unchanged, for every value.
        let img = image::RgbaImage::from_fn(256, 1, |x, _| image::Rgba([x as u8, 0, 255, 255]));
        for (x, p) in composite_on_white(&img).pixels().enumerate() {
            assert_eq!(p.0, [x as u8, 0, 255]);
        }
    }

    #[test]
    fn transparent_is_white_and_gray_replicates() {
        let p = ImageProcessor::new(PreprocessorConfig::paligemma(2));
        let rgba = image::RgbaImage::from_pixel(3, 3, image::Rgba([10, 20, 30, 0]));
        let rgb = image::RgbImage::from_pixel(3, 3, image::Rgb([255, 255, 255]));
        assert_eq!(
            p.preprocess(&DynamicImage::ImageRgba8(rgba)),
            p.preprocess(&DynamicImage::ImageRgb8(rgb))
        );
        let la = image::GrayAlphaImage::from_pixel(3, 3, image::LumaA([77, 255]));
        let rgb = image::RgbImage::from_pixel(3, 3, image::Rgb([77, 77, 77]));
        assert_eq!(
            p.preprocess(&DynamicImage::ImageLumaA8(la)),
            p.preprocess(&DynamicImage::ImageRgb8(rgb.clone()))
        );
        let gray = image::GrayImage::from_pixel(3, 3, image::Luma([77]));
        let rgb = image::RgbImage::from_pixel(3, 3, image::Rgb([77, 77, 77]));
        assert_eq!(
            p.preprocess(&DynamicImage::ImageLuma8(gray)),
            p.preprocess(&DynamicImage::ImageRgb8(rgb))
        );
    }

    #[test]
    fn config_from_json() {
        let text = r#"{
            "do_convert_rgb": null, "do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
            "image_seq_length": 1024, "image_std": [0.5, 0.5, 0.5],
            "processor_class": "PaliGemmaProcessor", "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"height": 448, "width": 448}
        }"#;
        let cfg = PreprocessorConfig::from_json_str(text).unwrap();
        assert_eq!(cfg, PreprocessorConfig::paligemma(448));

        let cfg = PreprocessorConfig::from_json_str(r#"{"image_mean": 0.25}"#).unwrap();
        assert_eq!(cfg.image_mean, [0.25; 3]);
        assert_eq!((cfg.height, cfg.width), (224, 224));

        let err = PreprocessorConfig::from_json_str(r#"{"resample": 2}"#).unwrap_err();
        assert!(
            err.contains("resample") && err.contains('2') && err.contains("bilinear"),
            "{err}"
        );
        for bad in [
            r#"{"size": {"shortest_edge": 224}}"#,
            r#"{"size": {"height": 0, "width": 224}}"#,
            r#"{"image_std": [0.5, 0.5]}"#,
            r#"{"image_std": 0}"#,
            r#"{"do_rescale": "yes"}"#,
            r#"[1, 2]"#,
            r#"{"#,
        ] {
            assert!(PreprocessorConfig::from_json_str(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_from_file_names_the_file() {
        let dir = std::env::temp_dir().join(format!("pg-preproc-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("preprocessor_config.json");
        std::fs::write(&path, r#"{"resample": 1}"#).unwrap();
        let err = PreprocessorConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("preprocessor_config.json") && err.contains("lanczos"),
            "{err}"
        );
        std::fs::write(&path, r#"{"size": {"height": 896, "width": 896}}"#).unwrap();
        assert_eq!(
            PreprocessorConfig::from_file(&path).unwrap(),
            PreprocessorConfig::paligemma(896)
        );
        std::fs::remove_dir_all(&dir).ok();
        let err = PreprocessorConfig::from_file(&dir.join("missing.json")).unwrap_err();
        assert!(err.to_string().contains("missing.json"), "{err}");
    }

    #[rustfmt::skip]
    const UPSCALED_11X9: [u8; 297] = [
        0, 0, 255, 12, 0, 247, 39, 7, 229, 63, 23, 213, 86, 46, 197, 110, 77, 181, 134, 113, 165, 157, 172, 149,
        181, 243, 133, 208, 143, 115, 224, 51, 104, 2, 12, 252, 16, 14, 242, 43, 23, 224, 67, 39, 208, 90, 62, 192,
        114, 93, 176, 138, 136, 160, 161, 165, 144, 185, 170, 128, 212, 116, 110, 228, 74, 99, 7, 43, 244, 23, 46, 233,
        50, 55, 215, 74, 71, 199, 97, 94, 183, 121, 125, 167, 145, 180, 151, 168, 155, 135, 192, 39, 119, 219, 71, 101,
        235, 118, 90, 13, 71, 235, 29, 74, 224, 56, 83, 206, 80, 99, 190, 103, 122, 174, 127, 153, 158, 151, 222, 142,
        174, 186, 126, 198, 32, 110, 225, 81, 92, 241, 148, 81, 19, 99, 227, 35, 102, 216, 62, 111, 198, 86, 127, 182,
        109, 150, 166, 133, 181, 150, 157, 238, 134, 180, 206, 118, 204, 76, 102, 231, 118, 84, 247, 175, 73, 25, 127, 219,
        41, 130, 208, 68, 139, 190, 92, 154, 174, 115, 191, 158, 139, 226, 142, 163, 164, 126, 186, 109, 110, 209, 94, 94,
        247, 163, 76, 255, 222, 65, 31, 155, 210, 47, 158, 199, 74, 167, 181, 98, 184, 165, 121, 210, 149, 145, 217, 133,
        169, 88, 117, 193, 39, 101, 217, 116, 85, 232, 176, 67, 236, 210, 56, 38, 187, 201, 54, 190, 190, 81, 200, 172,
        105, 228, 156, 128, 180, 140, 152, 84, 124, 176, 60, 108, 204, 89, 92, 230, 155, 76, 142, 111, 58, 71, 65, 47,
        42, 203, 196, 58, 206, 185, 85, 216, 167, 109, 251, 151, 132, 161, 135, 156, 8, 119, 180, 48, 103, 210, 121, 87,
        237, 176, 71, 92, 73, 53, 0, 0, 42,
    ];
    #[rustfmt::skip]
    const DOWNSCALED_3X2: [u8; 18] = [
        36, 49, 224, 120, 131, 167, 207, 127, 110, 62, 170, 190, 148, 149, 133, 196, 120, 76,
    ];
    #[rustfmt::skip]
    const WIDTH_ONLY_4X5: [u8; 60] = [
        15, 2, 245, 77, 40, 203, 145, 149, 157, 207, 142, 115, 26, 52, 230, 88, 96, 188, 156, 146, 142, 218, 74, 100,
        37, 102, 215, 99, 146, 173, 167, 196, 127, 229, 124, 85, 48, 152, 200, 110, 200, 158, 178, 104, 112, 240, 167, 70,
        59, 212, 185, 121, 169, 143, 199, 82, 97, 110, 86, 55,
    ];
    #[rustfmt::skip]
    const HEIGHT_ONLY_7X8: [u8; 168] = [
        0, 0, 255, 36, 5, 231, 73, 32, 206, 110, 77, 181, 147, 140, 156, 184, 240, 131, 221, 64, 106, 4, 17, 250,
        41, 26, 225, 78, 53, 200, 115, 98, 175, 152, 161, 150, 189, 141, 125, 226, 85, 100, 12, 53, 239, 49, 62, 214,
        86, 89, 189, 123, 134, 164, 160, 198, 139, 197, 15, 114, 234, 121, 89, 19, 84, 230, 56, 93, 205, 93, 120, 180,
        130, 165, 155, 167, 247, 130, 204, 45, 105, 241, 152, 80, 25, 116, 220, 62, 125, 195, 99, 152, 170, 136, 205, 145,
        173, 190, 120, 210, 85, 95, 255, 192, 70, 32, 147, 211, 69, 156, 186, 106, 183, 161, 143, 235, 136, 180, 44, 111,
        217, 116, 86, 255, 222, 61, 40, 183, 200, 77, 192, 175, 114, 219, 150, 151, 109, 125, 188, 58, 100, 225, 152, 75,
        107, 96, 50, 45, 204, 194, 82, 213, 169, 119, 240, 144, 156, 10, 119, 193, 92, 94, 230, 173, 69, 0, 0, 44,
    ];

    #[test]
    fn bytes_decode_as_the_file_does() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let Ok(from_file) = decode_image(&path) else {
                continue;
            };
            let data = std::fs::read(&path).unwrap();
            let from_bytes = decode_image_bytes(&data, &path).unwrap();
            assert_eq!(
                from_bytes.as_bytes(),
                from_file.as_bytes(),
                "{}",
                path.display()
            );
            seen += 1;
        }
        assert!(seen >= 2, "only {seen} fixture images decoded");
        let err = decode_image_bytes(b"not an image", Path::new("upload")).unwrap_err();
        assert!(err.to_string().contains("upload"), "{err}");
        assert!(
            err.to_string().contains("not a recognised image format"),
            "{err}"
        );
    }
}
