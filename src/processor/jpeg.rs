//! JPEG decoding through libjpeg-turbo's decoder (as vendored by `mozjpeg-sys`), so that decoded
//! pixels are bit-identical to Pillow's.
//!
//! Pillow decodes JPEGs with libjpeg-turbo, using its defaults: the accurate integer IDCT
//! (`JDCT_ISLOW`) and "fancy" (triangle-filter) chroma upsampling, then its YCbCr -> RGB tables.
//! Pure-Rust decoders round differently: zune-jpeg (the `image` crate's) differs from Pillow by
//! up to 4 levels on 4:2:0 photos, jpeg-decoder by up to 3. mozjpeg's decoder is libjpeg-turbo's,
//! compiled from C with the `cc` crate (no SIMD, so no assembler is needed); with the same
//! defaults it reproduces Pillow 13 (libjpeg-turbo 3.2) exactly on baseline and progressive,
//! 4:2:0 / 4:2:2 / 4:4:4, grayscale and CMYK files.
//!
//! libjpeg reports fatal errors through `error_exit`, which by default calls `exit()`. Here it
//! unwinds instead (`resume_unwind`, which skips the panic hook, through C code built with
//! `-fexceptions` by `mozjpeg-sys`'s `unwinding` feature) to a `catch_unwind` in [`decode`],
//! which turns it into an error. This needs `panic = "unwind"` (Rust's default).

use std::mem;
use std::os::raw::{c_int, c_long, c_ulong};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use image::DynamicImage;
use mozjpeg_sys::{
    jpeg_common_struct, jpeg_create_decompress, jpeg_decompress_struct, jpeg_destroy_decompress,
    jpeg_error_mgr, jpeg_mem_src, jpeg_read_header, jpeg_read_scanlines, jpeg_start_decompress,
    jpeg_std_error, JWRN_JPEG_EOF, J_COLOR_SPACE,
};

/// Why a JPEG could not be decoded.
#[derive(Debug)]
pub(crate) enum JpegError {
    /// The header declares a zero width or height.
    ZeroSized(u32, u32),
    /// The header's size is refused by the caller's check; the image was not decoded.
    Refused(crate::Error),
    /// The `width` x `height` pixels alone would take `bytes`, more than the allowed maximum.
    TooManyBytes(u32, u32, u64),
    /// libjpeg's error message (corrupt or truncated data, unsupported features, ...).
    Decode(String),
}

/// The payload unwound from libjpeg's error handler.
struct LibjpegError(String);

/// libjpeg's message for the error or warning last signalled on `cinfo`.
fn message(cinfo: &mut jpeg_common_struct) -> String {
    let buf = [0u8; 80]; // JMSG_LENGTH_MAX
                         // SAFETY: `err` was set to a live `jpeg_error_mgr` filled in by `jpeg_std_error`, whose
                         // `format_message` writes a NUL-terminated string of at most 80 bytes into `buf`.
    unsafe {
        if let Some(format) = (*cinfo.err).format_message {
            format(cinfo, &buf);
        }
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Fatal errors: unwind to the `catch_unwind` in [`decode`] instead of `exit()`ing.
unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let msg = message(cinfo);
    resume_unwind(Box::new(LibjpegError(msg)));
}

/// Warnings (`msg_level == -1`) and trace messages. Like Pillow, decoding goes on after a warning
/// about recoverable corruption, except when the data ends early: libjpeg would pad the image
/// with gray, Pillow reports the file as truncated, and so do we.
unsafe extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, msg_level: c_int) {
    // SAFETY: `err` points to the live error manager (see `message`).
    let code = unsafe { (*cinfo.err).msg_code };
    if msg_level < 0 && code == JWRN_JPEG_EOF as c_int {
        let msg = message(cinfo);
        resume_unwind(Box::new(LibjpegError(format!("truncated file: {msg}"))));
    }
}

/// Decode the JPEG file contents `data` to 8-bit RGB (or 8-bit gray for grayscale JPEGs), as
/// Pillow's `Image.open(path).convert("RGB")` does. `check(width, height)` is called with the
/// header's dimensions before anything is decoded or allocated for the pixels; an error from it
/// is returned as [`JpegError::Refused`]. At most `max_bytes` are allocated, counting the pixels.
pub(crate) fn decode(
    data: &[u8],
    max_bytes: u64,
    check: impl FnOnce(u32, u32) -> crate::Result<()>,
) -> Result<DynamicImage, JpegError> {
    if c_ulong::try_from(data.len()).is_err() {
        return Err(JpegError::Decode("file too large for libjpeg".into()));
    }
    // SAFETY: all-zero is the documented initial state of both structs (libjpeg fills them in);
    // `err` and `cinfo` outlive every libjpeg call below, `cinfo` is created before use and
    // destroyed exactly once, after `catch_unwind` has caught any unwinding out of libjpeg.
    unsafe {
        let mut err: jpeg_error_mgr = mem::zeroed();
        jpeg_std_error(&mut err);
        err.error_exit = Some(error_exit);
        err.emit_message = Some(emit_message);
        let mut cinfo: jpeg_decompress_struct = mem::zeroed();
        cinfo.common.err = &mut err;
        let result = catch_unwind(AssertUnwindSafe(|| {
            jpeg_create_decompress(&mut cinfo);
            jpeg_mem_src(&mut cinfo, data.as_ptr(), data.len() as c_ulong);
            jpeg_read_header(&mut cinfo, 1);
            let (w, h) = (cinfo.image_width, cinfo.image_height);
            if w == 0 || h == 0 {
                return Err(JpegError::ZeroSized(w, h));
            }
            check(w, h).map_err(JpegError::Refused)?;
            // Pillow's modes: "L" for grayscale, "CMYK" for CMYK and YCCK, "RGB" otherwise.
            let channels = match cinfo.jpeg_color_space {
                J_COLOR_SPACE::JCS_GRAYSCALE => 1,
                J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK => 4,
                _ => 3,
            };
            cinfo.out_color_space = match channels {
                1 => J_COLOR_SPACE::JCS_GRAYSCALE,
                4 => J_COLOR_SPACE::JCS_CMYK,
                _ => J_COLOR_SPACE::JCS_RGB,
            };
            let (w, h) = (w as usize, h as usize);
            let row_bytes = w * channels;
            let out_bytes = (row_bytes * h) as u64;
            if out_bytes > max_bytes {
                return Err(JpegError::TooManyBytes(w as u32, h as u32, out_bytes));
            }
            // Cap libjpeg's large buffers (e.g. a progressive file's coefficients) to the rest.
            let budget = (max_bytes - out_bytes).clamp(1, c_long::MAX as u64);
            (*cinfo.common.mem).max_memory_to_use = budget as c_long;
            jpeg_start_decompress(&mut cinfo);
            if (cinfo.output_width as usize, cinfo.output_height as usize) != (w, h)
                || cinfo.output_components as usize != channels
            {
                return Err(JpegError::Decode("unexpected output geometry".into()));
            }
            let mut pixels = vec![0u8; row_bytes * h];
            while (cinfo.output_scanline as usize) < h {
                let row = cinfo.output_scanline as usize;
                let mut ptr = pixels[row * row_bytes..(row + 1) * row_bytes].as_mut_ptr();
                if jpeg_read_scanlines(&mut cinfo, &mut ptr, 1) != 1 {
                    return Err(JpegError::Decode("decoder returned no scanline".into()));
                }
            }
            // `jpeg_finish_decompress` is skipped on purpose: it only reads on to the EOI marker,
            // and a file whose pixels are all there but whose EOI is missing still decodes.
            Ok((w as u32, h as u32, channels, pixels))
        }));
        jpeg_destroy_decompress(&mut cinfo);
        let (w, h, channels, pixels) = match result {
            Ok(decoded) => decoded?,
            Err(payload) => {
                return Err(JpegError::Decode(
                    match payload.downcast::<LibjpegError>() {
                        Ok(e) => e.0,
                        Err(_) => "libjpeg failed".into(),
                    },
                ))
            }
        };
        let built = match channels {
            1 => image::GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8),
            3 => image::RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8),
            _ => image::RgbImage::from_raw(w, h, adobe_cmyk_to_rgb(&pixels))
                .map(DynamicImage::ImageRgb8),
        };
        built.ok_or_else(|| JpegError::Decode("pixel buffer size mismatch".into()))
    }
}

/// Pillow's conversion of a CMYK JPEG to RGB: the samples are read as Adobe-inverted CMYK
/// (rawmode `CMYK;I`, i.e. `c = 255 - sample`) and then `Image.convert("RGB")` computes
/// `255 - k - (c * (255 - k)) / 255` per channel in its `MULDIV255` integer arithmetic.
fn adobe_cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let nk = px[3] as u32; // the stored sample is 255 - k
        for &s in &px[..3] {
            out.push(nk.saturating_sub(muldiv255(255 - s as u32, nk)) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_conversion_matches_pillow() {
        // Pillow 13: Image.frombytes("CMYK", (1, 1), bytes(255 - s for s in raw[:3]) + ...)
        // with rawmode "CMYK;I", then .convert("RGB"); nk - muldiv255(c, nk) never underflows.
        assert_eq!(adobe_cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(adobe_cmyk_to_rgb(&[0, 0, 0, 255]), [0, 0, 0]);
        assert_eq!(adobe_cmyk_to_rgb(&[10, 200, 128, 0]), [0, 0, 0]);
        assert_eq!(adobe_cmyk_to_rgb(&[128, 64, 255, 200]), [100, 50, 200]);
    }

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        for data in [
            &b""[..],
            b"\xff\xd8",
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
            b"not a jpeg at all",
        ] {
            match decode(data, 1 << 20, |_, _| Ok(())) {
                Err(JpegError::Decode(msg)) => assert!(!msg.is_empty()),
                other => panic!("{data:?}: {other:?}"),
            }
        }
    }
}
