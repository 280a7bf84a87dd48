//! Patch extraction (`shaders/patch.wgsl`) for SigLIP's patch embedding, a `P×P` convolution
//! with stride `P`: [`im2col`] lays every patch out as one row in the order of the flattened
//! conv weight `[hidden, C, P, P] → [hidden, C·P·P]`, after which
//! [`linear`](super::linear::linear) with that weight and the conv bias gives the patch
//! embeddings `[(H/P)·(W/P), hidden]`.

use super::{check, u32_arg};
use crate::gpu::{DType, KernelKey, Recorder, Tensor};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    k: u32,
    size: u32,
    npx: u32,
    height: u32,
    width: u32,
    pad: [u32; 2],
}

/// Record `out[py·(W/P) + px, c·P·P + ky·P + kx] = pixels[c, py·P + ky, px·P + kx]`.
///
/// `pixels` is an f32 `[C, H, W]` image (C = 3 for RGB) with `H` and `W` multiples of
/// `patch`; `out` is f32 `[rows, C·P·P]` with at least `(H/P)·(W/P)` rows, of which the first
/// `(H/P)·(W/P)` are written, patches in row-major order.
pub fn im2col(rec: &mut Recorder, pixels: &Tensor, out: &Tensor, patch: usize) -> Result<()> {
    const K: &str = "im2col";
    check(
        pixels.dtype() == DType::F32 && out.dtype() == DType::F32,
        K,
        || format!("{} and {} must be f32", pixels.name(), out.name()),
    )?;
    let &[channels, height, width] = pixels.shape() else {
        return Err(crate::Error::kernel(
            K,
            format!(
                "{} has shape {:?}, expected [C, H, W]",
                pixels.name(),
                pixels.shape()
            ),
        ));
    };
    check(
        patch > 0 && height % patch == 0 && width % patch == 0,
        K,
        || format!("image {height}x{width} is not a whole number of {patch}x{patch} patches"),
    )?;
    let (npy, npx) = (height / patch, width / patch);
    let k = channels * patch * patch;
    check(out.cols() == k, K, || {
        format!(
            "{} has {} columns, {channels}x{patch}x{patch} patches need {k}",
            out.name(),
            out.cols()
        )
    })?;
    check(out.rows() >= npy * npx, K, || {
        format!(
            "{} has {} rows, the image has {} patches",
            out.name(),
            out.rows(),
            npy * npx
        )
    })?;
    let n = npy * npx;
    let params = Params {
        n: u32_arg(K, "patches", n)?,
        k: u32_arg(K, "k", k)?,
        size: u32_arg(K, "patch", patch)?,
        npx: u32_arg(K, "patches per row", npx)?,
        height: u32_arg(K, "height", height)?,
        width: u32_arg(K, "width", width)?,
        pad: [0; 2],
    };
    let workgroups = rec.grid(params.n);
    let key = KernelKey::new("patch", "im2col");
    rec.dispatch(&key, &params, &[pixels.buffer(), out.buffer()], workgroups)?;
    Ok(())
}

/// CPU reference of [`im2col`]: `pixels` is `[channels, height, width]` row-major; returns
/// `[(height/patch)·(width/patch), channels·patch·patch]`.
pub fn im2col_ref(
    pixels: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    patch: usize,
) -> Vec<f32> {
    let (npy, npx) = (height / patch, width / patch);
    let mut out = Vec::with_capacity(npy * npx * channels * patch * patch);
    for py in 0..npy {
        for px in 0..npx {
            for c in 0..channels {
                for ky in 0..patch {
                    let y = py * patch + ky;
                    let start = (c * height + y) * width + px * patch;
                    out.extend_from_slice(&pixels[start..start + patch]);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::linear::{linear, LinearOpts};
    use crate::ops::testutil::{assert_close, gpu_with_limit, rand_vec, round_f16};

    /// Direct convolution with stride `patch`, no padding: `[npy·npx, hidden]`.
    fn conv_ref(
        pixels: &[f32],
        (c_in, h, w): (usize, usize, usize),
        weight: &[f32],
        bias: &[f32],
        hidden: usize,
        patch: usize,
    ) -> Vec<f32> {
        let (npy, npx) = (h / patch, w / patch);
        let mut out = vec![0.0; npy * npx * hidden];
        for py in 0..npy {
            for px in 0..npx {
                for o in 0..hidden {
                    let mut acc = bias[o] as f64;
                    for c in 0..c_in {
                        for ky in 0..patch {
                            for kx in 0..patch {
                                let wv = weight[((o * c_in + c) * patch + ky) * patch + kx];
                                let pv = pixels[(c * h + py * patch + ky) * w + px * patch + kx];
                                acc += wv as f64 * pv as f64;
                            }
                        }
                    }
                    out[(py * npx + px) * hidden + o] = acc as f32;
                }
            }
        }
        out
    }

    #[test]
    fn im2col_matches_reference() {
        let gpu = gpu_with_limit(None);
        for (c, h, w, p) in [(3, 28, 42, 14), (3, 10, 15, 5), (1, 4, 4, 1), (2, 9, 3, 3)] {
            let pix = rand_vec(c * h * w, 1.0, 71);
            let n = (h / p) * (w / p);
            let pt = Tensor::from_f32(&gpu, "pixels", &[c, h, w], &pix).unwrap();
            let ot = Tensor::zeros(&gpu, "patches", &[n, c * p * p]).unwrap();
            let mut rec = Recorder::new(&gpu);
            im2col(&mut rec, &pt, &ot, p).unwrap();
            rec.run().unwrap();
            let want = im2col_ref(&pix, c, h, w, p);
            let what = format!("im2col {c}x{h}x{w} patch {p}");
            assert_close(&ot.read(&gpu).unwrap(), &want, 0.0, &what);
        }
    }

    #[test]
    fn im2col_then_linear_is_the_patch_convolution() {
        let gpu = gpu_with_limit(None);
        let (c, h, w, p, hidden) = (3, 28, 42, 14, 40);
        let k = c * p * p;
        let n = (h / p) * (w / p);
        let pix = rand_vec(c * h * w, 1.0, 81);
        // Conv weight [hidden, 3, 14, 14], rounded to f16 as uploaded; viewed as [hidden, 588].
        let weight = round_f16(&rand_vec(hidden * k, 0.1, 82));
        let bias = rand_vec(hidden, 0.5, 83);
        let pt = Tensor::from_f32(&gpu, "pixels", &[c, h, w], &pix).unwrap();
        let cols = Tensor::zeros(&gpu, "patches", &[n, k]).unwrap();
        let wt =
            Tensor::weight_from_f32(&gpu, "patch_embedding.weight", &[hidden, k], &weight).unwrap();
        let bt = Tensor::from_f32(&gpu, "patch_embedding.bias", &[hidden], &bias).unwrap();
        let ot = Tensor::zeros(&gpu, "embeddings", &[n, hidden]).unwrap();
        let mut rec = Recorder::new(&gpu);
        im2col(&mut rec, &pt, &cols, p).unwrap();
        linear(&mut rec, &cols, &wt, Some(&bt), &ot, LinearOpts::default()).unwrap();
        rec.run().unwrap();
        let want = conv_ref(&pix, (c, h, w), &weight, &bias, hidden, p);
        assert_close(&ot.read(&gpu).unwrap(), &want, 1e-5, "patch convolution");
    }

    #[test]
    fn rejects_bad_arguments() {
        let gpu = gpu_with_limit(None);
        let img = Tensor::zeros(&gpu, "img", &[3, 28, 42]).unwrap();
        let flat = Tensor::zeros(&gpu, "flat", &[28, 42]).unwrap();
        let out = Tensor::zeros(&gpu, "out", &[6, 588]).unwrap();
        let short = Tensor::zeros(&gpu, "short", &[5, 588]).unwrap();
        let mut rec = Recorder::new(&gpu);
        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert!(err(im2col(&mut rec, &flat, &out, 14)).contains("[C, H, W]"));
        assert!(err(im2col(&mut rec, &img, &out, 0)).contains("whole number"));
        assert!(err(im2col(&mut rec, &img, &out, 8)).contains("whole number"));
        assert!(err(im2col(&mut rec, &img, &out, 7)).contains("columns"));
        assert!(err(im2col(&mut rec, &img, &short, 14)).contains("6 patches"));
        assert!(rec.is_empty());
    }
}
