//! Row-wise normalisation (`shaders/norm.wgsl`) over the last dimension, one workgroup per
//! row on GPUs and one SIMD lane per row on CPU adapters (when the width is a multiple of 4),
//! f32 throughout:
//!
//! - [`layer_norm`]: `(x − mean) / √(var + eps) · w + b` with the biased variance, as torch
//!   `LayerNorm` (SigLIP);
//! - [`rms_norm`]: `x / √(mean(x²) + eps) · (1 + w)`, as Gemma's `RMSNorm`.

use super::{check, u32_arg, Kernels};
use crate::gpu::{DType, KernelKey, Recorder, Tensor};
use crate::Result;

/// Which rows a norm reads and writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct NormOpts {
    /// First row of `x` to read.
    pub x_row: usize,
    /// First row of `out` to write.
    pub out_row: usize,
    /// Number of rows; `None` means all rows of `x` from `x_row`.
    pub rows: Option<usize>,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    cols: u32,
    rows: u32,
    x_row: u32,
    out_row: u32,
    eps: f32,
    pad: [u32; 3],
}

/// The entry point of `kernel` (`layer_norm` or `rms_norm`) in a family, and its workgroup
/// counts for `rows`: one workgroup per row (threads), or one lane per row (64 a workgroup).
fn entry(
    kernels: Kernels,
    rec: &Recorder,
    kernel: &'static str,
    rows: u32,
) -> (&'static str, [u32; 3]) {
    match (kernels, kernel) {
        (Kernels::Threads, _) => (kernel, rec.grid(rows)),
        (Kernels::Lanes, "layer_norm") => ("layer_norm_lanes", rec.grid(rows.div_ceil(64))),
        (Kernels::Lanes, _) => ("rms_norm_lanes", rec.grid(rows.div_ceil(64))),
    }
}

/// Check the common arguments and build the parameters and workgroup counts.
#[allow(clippy::too_many_arguments)]
fn prepare(
    rec: &Recorder,
    kernel: &'static str,
    x: &Tensor,
    weight: &Tensor,
    out: &Tensor,
    eps: f32,
    opts: NormOpts,
    kernels: Option<Kernels>,
) -> Result<(Params, KernelKey, [u32; 3])> {
    let cols = x.cols();
    let rows = opts.rows.unwrap_or(x.rows().saturating_sub(opts.x_row));
    check(
        x.dtype() == DType::F32 && out.dtype() == DType::F32,
        kernel,
        || format!("{} and {} must be f32", x.name(), out.name()),
    )?;
    check(out.cols() == cols, kernel, || {
        format!(
            "{} has {} columns, {} has {cols}",
            out.name(),
            out.cols(),
            x.name()
        )
    })?;
    check(
        weight.dtype() == DType::F32 && weight.numel() == cols,
        kernel,
        || format!("weight {} must be f32 [{cols}]", weight.name()),
    )?;
    check(x.buffer() != out.buffer(), kernel, || {
        format!("{} cannot be normalised in place", x.name())
    })?;
    check(rows > 0 && opts.x_row + rows <= x.rows(), kernel, || {
        format!(
            "rows {}..{} outside {}",
            opts.x_row,
            opts.x_row + rows,
            x.name()
        )
    })?;
    check(opts.out_row + rows <= out.rows(), kernel, || {
        format!(
            "rows {}..{} outside {}",
            opts.out_row,
            opts.out_row + rows,
            out.name()
        )
    })?;
    check(eps.is_finite() && eps >= 0.0, kernel, || {
        format!("eps = {eps}")
    })?;
    let params = Params {
        cols: u32_arg(kernel, "cols", cols)?,
        rows: u32_arg(kernel, "rows", rows)?,
        x_row: u32_arg(kernel, "x row", opts.x_row)?,
        out_row: u32_arg(kernel, "out row", opts.out_row)?,
        eps,
        pad: [0; 3],
    };
    let kernels = kernels.unwrap_or_else(|| Kernels::choose(rec.gpu(), cols));
    kernels.check(kernel, "cols", cols)?;
    let (entry, workgroups) = entry(kernels, rec, kernel, params.rows);
    Ok((params, KernelKey::new("norm", entry), workgroups))
}

/// Record `out[out_row + r] = (x[x_row + r] − mean) / √(var + eps) · weight + bias` for `r` in
/// `0..rows`, with the mean and biased variance over the row, as torch `LayerNorm`.
/// `x` and `out` are distinct f32 `[.., cols]` tensors (wgpu cannot bind one buffer as both
/// input and output); `weight` and `bias` are f32 `[cols]`.
pub fn layer_norm(
    rec: &mut Recorder,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    out: &Tensor,
    eps: f32,
    opts: NormOpts,
) -> Result<()> {
    layer_norm_with(rec, x, weight, bias, out, eps, opts, None)
}

/// [`layer_norm`] with the kernel family given (tests run both on one adapter).
#[allow(clippy::too_many_arguments)]
fn layer_norm_with(
    rec: &mut Recorder,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    out: &Tensor,
    eps: f32,
    opts: NormOpts,
    kernels: Option<Kernels>,
) -> Result<()> {
    const K: &str = "layer_norm";
    let (params, key, workgroups) = prepare(rec, K, x, weight, out, eps, opts, kernels)?;
    check(
        bias.dtype() == DType::F32 && bias.numel() == x.cols(),
        K,
        || format!("bias {} must be f32 [{}]", bias.name(), x.cols()),
    )?;
    let buffers = [x.buffer(), weight.buffer(), out.buffer(), bias.buffer()];
    rec.dispatch(&key, &params, &buffers, workgroups)?;
    Ok(())
}

/// Record `out[out_row + r] = x[x_row + r] / √(mean(x²) + eps) · (1 + weight)` for `r` in
/// `0..rows`, as Gemma's `RMSNorm` (which stores `weight` as an offset from 1).
/// `x` and `out` are distinct f32 `[.., cols]` tensors; `weight` is f32 `[cols]`.
pub fn rms_norm(
    rec: &mut Recorder,
    x: &Tensor,
    weight: &Tensor,
    out: &Tensor,
    eps: f32,
    opts: NormOpts,
) -> Result<()> {
    rms_norm_with(rec, x, weight, out, eps, opts, None)
}

/// [`rms_norm`] with the kernel family given (tests run both on one adapter).
fn rms_norm_with(
    rec: &mut Recorder,
    x: &Tensor,
    weight: &Tensor,
    out: &Tensor,
    eps: f32,
    opts: NormOpts,
    kernels: Option<Kernels>,
) -> Result<()> {
    let (params, key, workgroups) = prepare(rec, "rms_norm", x, weight, out, eps, opts, kernels)?;
    let buffers = [x.buffer(), weight.buffer(), out.buffer()];
    rec.dispatch(&key, &params, &buffers, workgroups)?;
    Ok(())
}

/// CPU reference of [`layer_norm`] on `rows` rows of `cols` values (statistics in f64).
pub fn layer_norm_ref(x: &[f32], weight: &[f32], bias: &[f32], cols: usize, eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let n = cols as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (j, &v) in row.iter().enumerate() {
            out.push(((v as f64 - mean) * inv * weight[j] as f64 + bias[j] as f64) as f32);
        }
    }
    out
}

/// CPU reference of [`rms_norm`] on `rows` rows of `cols` values (statistics in f64).
pub fn rms_norm_ref(x: &[f32], weight: &[f32], cols: usize, eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for (j, &v) in row.iter().enumerate() {
            out.push((v as f64 * inv * (1.0 + weight[j] as f64)) as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, gpu_with_limit, rand_vec};

    fn layer_norm_case(rows: usize, cols: usize, offset: f32, tol: f32) {
        for family in Kernels::all_for(cols) {
            layer_norm_family(rows, cols, offset, tol, family);
        }
    }

    fn layer_norm_family(rows: usize, cols: usize, offset: f32, tol: f32, family: Kernels) {
        let gpu = gpu_with_limit(None);
        let x: Vec<f32> = rand_vec(rows * cols, 2.0, 11)
            .iter()
            .map(|v| v + offset)
            .collect();
        let w = rand_vec(cols, 1.0, 12);
        let b = rand_vec(cols, 0.5, 13);
        let xt = Tensor::from_f32(&gpu, "x", &[rows, cols], &x).unwrap();
        let wt = Tensor::from_f32(&gpu, "w", &[cols], &w).unwrap();
        let bt = Tensor::from_f32(&gpu, "b", &[cols], &b).unwrap();
        let ot = Tensor::zeros(&gpu, "out", &[rows, cols]).unwrap();
        let mut rec = Recorder::new(&gpu);
        let d = NormOpts::default();
        layer_norm_with(&mut rec, &xt, &wt, &bt, &ot, 1e-6, d, Some(family)).unwrap();
        rec.run().unwrap();
        let want = layer_norm_ref(&x, &w, &b, cols, 1e-6);
        let what = format!("layer_norm {family:?} rows={rows} cols={cols} offset={offset}");
        assert_close(&ot.read(&gpu).unwrap(), &want, tol, &what);
    }

    #[test]
    fn layer_norm_matches_reference_on_ragged_sizes() {
        layer_norm_case(1, 37, 0.0, 1e-5);
        layer_norm_case(5, 72, 0.0, 1e-5);
        layer_norm_case(300, 1152, 0.0, 1e-5);
        layer_norm_case(3, 2050, 0.5, 1e-5);
        // More than one lane workgroup.
        layer_norm_case(130, 96, 0.0, 1e-5);
    }

    #[test]
    fn layer_norm_is_stable_under_a_large_offset() {
        // E[x²] − E[x]² in f32 would lose every significant digit of the variance here.
        layer_norm_case(5, 1152, 1000.0, 1e-5);
        layer_norm_case(4, 37, -3000.0, 1e-5);
    }

    #[test]
    fn rms_norm_matches_reference_with_row_offsets() {
        let gpu = gpu_with_limit(None);
        for ((xrows, cols, x_row, out_row, rows), family) in [
            (7, 37, 2, 0, 5),
            (1, 2050, 0, 3, 1),
            (310, 1152, 10, 4, 300),
            (6, 72, 1, 1, 5),
            (140, 128, 3, 2, 131),
        ]
        .into_iter()
        .flat_map(|c| Kernels::all_for(c.1).into_iter().map(move |f| (c, f)))
        {
            let x = rand_vec(xrows * cols, 3.0, 21);
            let w = rand_vec(cols, 0.5, 22);
            let orows = out_row + rows + 1;
            let init = rand_vec(orows * cols, 1.0, 23);
            let xt = Tensor::from_f32(&gpu, "x", &[xrows, cols], &x).unwrap();
            let wt = Tensor::from_f32(&gpu, "w", &[cols], &w).unwrap();
            let ot = Tensor::from_f32(&gpu, "out", &[orows, cols], &init).unwrap();
            let mut rec = Recorder::new(&gpu);
            let opts = NormOpts {
                x_row,
                out_row,
                rows: Some(rows),
            };
            rms_norm_with(&mut rec, &xt, &wt, &ot, 1e-6, opts, Some(family)).unwrap();
            rec.run().unwrap();
            let mut want = init.clone();
            let sel = &x[x_row * cols..(x_row + rows) * cols];
            want[out_row * cols..(out_row + rows) * cols]
                .copy_from_slice(&rms_norm_ref(sel, &w, cols, 1e-6));
            let what = format!("rms_norm {family:?} cols={cols} x_row={x_row} out_row={out_row}");
            assert_close(&ot.read(&gpu).unwrap(), &want, 1e-5, &what);
        }
    }

    #[test]
    fn rms_norm_default_rows_run_to_the_end_of_x() {
        let gpu = gpu_with_limit(None);
        let (cols, xrows) = (72, 9);
        let x = rand_vec(xrows * cols, 1.0, 31);
        let w = rand_vec(cols, 0.5, 32);
        let xt = Tensor::from_f32(&gpu, "x", &[xrows, cols], &x).unwrap();
        let wt = Tensor::from_f32(&gpu, "w", &[cols], &w).unwrap();
        let ot = Tensor::zeros(&gpu, "out", &[xrows - 4, cols]).unwrap();
        let mut rec = Recorder::new(&gpu);
        let opts = NormOpts {
            x_row: 4,
            ..Default::default()
        };
        rms_norm(&mut rec, &xt, &wt, &ot, 1e-6, opts).unwrap();
        rec.run().unwrap();
        let want = rms_norm_ref(&x[4 * cols..], &w, cols, 1e-6);
        assert_close(
            &ot.read(&gpu).unwrap(),
            &want,
            1e-5,
            "rms_norm default rows",
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        let gpu = gpu_with_limit(None);
        let x = Tensor::zeros(&gpu, "x", &[4, 8]).unwrap();
        let w = Tensor::zeros(&gpu, "w", &[8]).unwrap();
        let w7 = Tensor::zeros(&gpu, "w7", &[7]).unwrap();
        let o = Tensor::zeros(&gpu, "o", &[4, 8]).unwrap();
        let o6 = Tensor::zeros(&gpu, "o6", &[4, 6]).unwrap();
        let wh = Tensor::weight_from_f32(&gpu, "wh", &[8], &[0.0; 8]).unwrap();
        let mut rec = Recorder::new(&gpu);
        let d = NormOpts::default();
        let rows = |x_row, out_row, rows| NormOpts {
            x_row,
            out_row,
            rows,
        };
        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert!(err(rms_norm(&mut rec, &x, &w7, &o, 1e-6, d)).contains("f32 [8]"));
        assert!(err(rms_norm(&mut rec, &x, &wh, &o, 1e-6, d)).contains("f32 [8]"));
        assert!(err(rms_norm(&mut rec, &x, &w, &o6, 1e-6, d)).contains("columns"));
        assert!(err(rms_norm(&mut rec, &x, &w, &x, 1e-6, d)).contains("in place"));
        assert!(
            err(rms_norm(&mut rec, &x, &w, &o, 1e-6, rows(2, 0, Some(3)))).contains("outside x")
        );
        assert!(
            err(rms_norm(&mut rec, &x, &w, &o, 1e-6, rows(0, 2, Some(3)))).contains("outside o")
        );
        assert!(err(rms_norm(&mut rec, &x, &w, &o, 1e-6, rows(4, 0, None))).contains("outside"));
        assert!(err(layer_norm(&mut rec, &x, &w, &w7, &o, 1e-6, d)).contains("bias"));
        assert!(err(layer_norm(&mut rec, &x, &w, &w, &o, -1.0, d)).contains("eps"));
        assert!(rec.is_empty());
    }
}
