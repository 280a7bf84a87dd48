//! Linear layers (`shaders/matmul.wgsl`): `out = combine(out, act(x · Wᵀ + b))` with f16
//! weights split over any number of chunks, f32 activations and accumulation.

use super::{check, u32_arg, Act, Combine, Kernels};
use crate::gpu::{DType, KernelKey, Recorder, Tensor};
use crate::Result;

/// Options of a [`linear`] launch beyond its tensors.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinearOpts {
    /// Activation applied after the bias.
    pub act: Act,
    /// How the result is combined with the output's current contents.
    pub combine: Combine,
    /// First row of `x` to read.
    pub x_row: usize,
    /// First row of `out` to write.
    pub out_row: usize,
    /// Number of rows to compute; `None` means all rows of `x` from `x_row`.
    pub rows: Option<usize>,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    w_stride4: u32,
    x_stride: u32,
    out_stride: u32,
    out_col: u32,
    out_row: u32,
    bias_off: u32,
    x_row: u32,
    epilogue: u32,
    interleaved: u32,
}

/// Rows at or below which the matrix-vector kernel is used instead of the tiled one.
const MATVEC_MAX_ROWS: usize = 4;

/// Whether a lane-kernel chunk of `rows` weight rows (output columns) goes to the 8-lane
/// `matmul_lanes8` (32 columns a workgroup) rather than `matmul_lanes` (256): when the wide
/// kernel would leave more than an eighth as many columns idle as it computes (96, 128, 384
/// columns; not 1152, 2048, 4304 or 16384, where the wide workgroups' longer contiguous
/// weight runs suit the prefetchers).
pub(crate) fn narrow(rows: usize) -> bool {
    rows.div_ceil(256) * 256 - rows > rows / 8
}

/// Record `out[r] = combine(out[r], act(x[r] · Wᵀ + bias))` for the selected rows.
/// `w` is an f16 `[n, k]` matrix (any number of chunks; Q8/Q4 weights go to
/// [`super::quant::linear_quantized`]), `bias` an f32 `[n]` vector,
/// `x` f32 `[.., k]`, `out` f32 `[.., n]`.
pub fn linear(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    opts: LinearOpts,
) -> Result<()> {
    if w.dtype().is_quantized() {
        return super::quant::linear_quantized(rec, x, w, bias, out, opts);
    }
    let kernels = Kernels::choose(rec.gpu(), w.cols());
    linear_with(rec, x, w, bias, out, opts, kernels)
}

/// [`linear`] with the kernel family chosen by the caller (tests run both on one adapter).
pub(crate) fn linear_with(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    opts: LinearOpts,
    kernels: Kernels,
) -> Result<()> {
    const K: &str = "linear";
    check(w.dtype() == DType::F16, K, || {
        format!("{} must be f16", w.name())
    })?;
    let (n, k, m) = check_args(K, x, w, bias, out, &opts, kernels)?;
    let epilogue = bias.is_some() as u32 | opts.act.code() << 1 | opts.combine.code() << 2;
    for chunk in w.chunks() {
        let entry = match (kernels, m) {
            (Kernels::Lanes, 1) => "matvec_lanes",
            (Kernels::Lanes, _) if narrow(chunk.rows) => "matmul_lanes8",
            (Kernels::Lanes, _) => "matmul_lanes",
            (Kernels::Threads, m) if m <= MATVEC_MAX_ROWS => "matvec",
            (Kernels::Threads, _) => "matmul",
        };
        let key = KernelKey::new("matmul", entry);
        let params = Params {
            m: u32_arg(K, "rows", m)?,
            n: u32_arg(K, "n", chunk.rows)?,
            k: u32_arg(K, "k", k)?,
            w_stride4: u32_arg(K, "stride", w.row_stride() / 8)?,
            x_stride: u32_arg(K, "x stride", x.cols())?,
            out_stride: u32_arg(K, "out stride", n)?,
            out_col: u32_arg(K, "out col", chunk.row_start)?,
            out_row: u32_arg(K, "out row", opts.out_row)?,
            bias_off: u32_arg(K, "bias offset", chunk.row_start)?,
            x_row: u32_arg(K, "x row", opts.x_row)?,
            epilogue,
            interleaved: w.interleaved() as u32,
        };
        let bias_buf = bias.map_or(x.buffer(), |b| b.buffer());
        let buffers = [x.buffer(), &chunk.buffer, bias_buf, out.buffer()];
        let workgroups = match entry {
            "matvec" => rec.grid(chunk.rows.div_ceil(4) as u32),
            "matvec_lanes" => rec.grid(chunk.rows.div_ceil(512) as u32),
            "matmul_lanes" => [chunk.rows.div_ceil(256) as u32, m.div_ceil(4) as u32, 1],
            "matmul_lanes8" => [chunk.rows.div_ceil(32) as u32, m.div_ceil(4) as u32, 1],
            _ => [chunk.rows.div_ceil(32) as u32, m.div_ceil(32) as u32, 1],
        };
        rec.dispatch(&key, &params, &buffers, workgroups)?;
    }
    Ok(())
}

/// The checks shared by the f16 and quantised linear launchers: shapes of `x`, `out` and
/// `bias` against the weight `[n, k]`, the row ranges, and `k % 4 == 0` for the lane kernels.
/// Returns `(n, k, m)` with `m` the number of rows to compute.
pub(crate) fn check_args(
    kernel: &str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    opts: &LinearOpts,
    kernels: Kernels,
) -> Result<(usize, usize, usize)> {
    let (n, k) = (w.rows(), w.cols());
    let m = opts.rows.unwrap_or(x.rows().saturating_sub(opts.x_row));
    check(
        x.dtype() == DType::F32 && out.dtype() == DType::F32,
        kernel,
        || "x and out must be f32".into(),
    )?;
    check(x.cols() == k, kernel, || {
        format!(
            "{} has {} columns, weight {} expects {k}",
            x.name(),
            x.cols(),
            w.name()
        )
    })?;
    check(out.cols() == n, kernel, || {
        format!(
            "{} has {} columns, weight {} gives {n}",
            out.name(),
            out.cols(),
            w.name()
        )
    })?;
    check(m > 0 && opts.x_row + m <= x.rows(), kernel, || {
        format!(
            "rows {}..{} outside {}",
            opts.x_row,
            opts.x_row + m,
            x.name()
        )
    })?;
    check(opts.out_row + m <= out.rows(), kernel, || {
        format!(
            "rows {}..{} outside {}",
            opts.out_row,
            opts.out_row + m,
            out.name()
        )
    })?;
    if let Some(b) = bias {
        check(b.numel() == n && b.dtype() == DType::F32, kernel, || {
            format!("bias {} must be f32 [{n}]", b.name())
        })?;
    }
    kernels.check(kernel, "k", k)?;
    Ok((n, k, m))
}

/// CPU reference of [`linear`] on row-major slices: `x` is `[m, k]`, `w` is `[n, k]`
/// (already rounded to f16 by the caller if comparing with the GPU), `out` is `[m, n]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_ref(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
    act: Act,
    combine: Combine,
    out: &mut [f32],
) {
    for r in 0..m {
        for c in 0..n {
            let dot: f32 = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
            let v = act.apply(dot + bias.map_or(0.0, |b| b[c]));
            out[r * n + c] = combine.apply(out[r * n + c], v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, gpu_with_limit, rand_vec, round_f16};

    /// Rows `x_row..x_row + m` of an `[x_rows, k]` input into rows `out_row..` of an
    /// `[out_rows, n]` output, with every kernel family that supports `k`.
    #[allow(clippy::too_many_arguments)]
    fn run_rows(
        limit: Option<u64>,
        (x_rows, x_row): (usize, usize),
        (out_rows, out_row): (usize, usize),
        m: usize,
        n: usize,
        k: usize,
        bias: bool,
        act: Act,
        combine: Combine,
    ) {
        let gpu = gpu_with_limit(limit);
        let x = rand_vec(x_rows * k, 1.0, 1);
        let w = round_f16(&rand_vec(n * k, 0.5, 2));
        let b = rand_vec(n, 0.3, 3);
        let init = rand_vec(out_rows * n, 1.0, 4);
        let xt = Tensor::from_f32(&gpu, "x", &[x_rows, k], &x).unwrap();
        let bt = Tensor::from_f32(&gpu, "b", &[n], &b).unwrap();
        let mut want = init.clone();
        linear_ref(
            &x[x_row * k..(x_row + m) * k],
            &w,
            bias.then_some(&b[..]),
            m,
            n,
            k,
            act,
            combine,
            &mut want[out_row * n..(out_row + m) * n],
        );
        for (kernels, interleave) in Kernels::all_for(k)
            .into_iter()
            .flat_map(|f| [(f, false), (f, true)])
        {
            let wt = Tensor::weight_from_f32_with(&gpu, "w", &[n, k], interleave, &w).unwrap();
            let row_bytes = k.div_ceil(8) as u64 * 16;
            let blocks_fit = limit.is_none_or(|l| l / row_bytes >= 64);
            assert_eq!(wt.interleaved(), interleave && blocks_fit);
            if let Some(l) = limit {
                assert!(wt.chunks().len() > 1 || (n * k.div_ceil(8) * 16) as u64 <= l);
            }
            let ot = Tensor::from_f32(&gpu, "out", &[out_rows, n], &init).unwrap();
            let mut rec = Recorder::new(&gpu);
            let opts = LinearOpts {
                act,
                combine,
                x_row,
                out_row,
                rows: Some(m),
            };
            let b = bias.then_some(&bt);
            linear_with(&mut rec, &xt, &wt, b, &ot, opts, kernels).unwrap();
            rec.run().unwrap();
            let got = ot.read(&gpu).unwrap();
            let what = format!(
                "linear {kernels:?} interleaved={} m={m} n={n} k={k} {act:?} {combine:?}",
                wt.interleaved()
            );
            assert_close(&got, &want, 1e-4, &what);
        }
    }

    fn run_case(
        limit: Option<u64>,
        m: usize,
        n: usize,
        k: usize,
        bias: bool,
        act: Act,
        combine: Combine,
    ) {
        run_rows(limit, (m, 0), (m, 0), m, n, k, bias, act, combine);
    }

    #[test]
    fn tiled_matches_reference_on_ragged_sizes() {
        run_case(None, 37, 45, 67, true, Act::None, Combine::Store);
        run_case(None, 64, 96, 128, false, Act::GeluTanh, Combine::Store);
        run_case(None, 33, 17, 250, true, Act::GeluTanh, Combine::Add);
        run_case(None, 40, 31, 9, true, Act::None, Combine::Mul);
        // k % 8 == 4 (the lane kernels' half step) and more than 256 columns.
        run_case(None, 9, 300, 100, true, Act::GeluTanh, Combine::Add);
        run_case(None, 6, 520, 12, false, Act::None, Combine::Store);
        // Narrow chunks (the 8-lane kernel): 96 and 384 columns, and a ragged 45.
        assert!(narrow(96) && narrow(384) && narrow(45) && !narrow(1152) && !narrow(2048));
        run_case(None, 13, 96, 64, true, Act::GeluTanh, Combine::Add);
        run_case(None, 9, 384, 36, false, Act::None, Combine::Mul);
    }

    #[test]
    fn matvec_matches_reference() {
        run_case(None, 1, 45, 67, true, Act::None, Combine::Store);
        run_case(None, 3, 130, 200, true, Act::GeluTanh, Combine::Add);
        run_case(None, 1, 7, 1000, false, Act::None, Combine::Mul);
        // More than 512 columns (two lane workgroups), k % 8 == 4.
        run_case(None, 1, 1100, 36, true, Act::GeluTanh, Combine::Store);
        run_case(None, 2, 600, 100, false, Act::None, Combine::Add);
        // Every row of x in one workgroup, fewer weight rows than a workgroup computes.
        run_case(None, 4, 7, 36, true, Act::GeluTanh, Combine::Mul);
    }

    #[test]
    fn row_offsets_match_reference() {
        run_rows(
            None,
            (7, 2),
            (6, 3),
            3,
            70,
            64,
            true,
            Act::None,
            Combine::Add,
        );
        run_rows(
            None,
            (7, 5),
            (4, 1),
            1,
            530,
            64,
            false,
            Act::GeluTanh,
            Combine::Store,
        );
        run_rows(
            None,
            (20, 3),
            (12, 2),
            10,
            33,
            72,
            true,
            Act::None,
            Combine::Mul,
        );
    }

    #[test]
    fn split_weights_match_reference() {
        // 2 KiB bindings: a [300, 100] f16 matrix (208 bytes a row) spans 31 chunks.
        run_case(Some(2048), 1, 300, 100, true, Act::None, Combine::Store);
        run_case(Some(2048), 50, 300, 100, true, Act::GeluTanh, Combine::Add);
        // Interleaved chunks: of whole groups (32 KiB: 1024 rows of 32 bytes fit, chunks of
        // 512 rows) and of whole blocks (8 KiB: 256 rows), each ending in a short group.
        run_case(Some(32768), 1, 1300, 16, true, Act::None, Combine::Store);
        run_case(Some(32768), 5, 1300, 16, false, Act::None, Combine::Add);
        run_case(Some(8192), 1, 600, 12, true, Act::GeluTanh, Combine::Store);
        run_case(Some(8192), 6, 600, 12, true, Act::None, Combine::Store);
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let gpu = gpu_with_limit(None);
        let x = Tensor::zeros(&gpu, "x", &[2, 8]).unwrap();
        let w = Tensor::weight_from_f32(&gpu, "w", &[4, 6], &[0.0; 24]).unwrap();
        let o = Tensor::zeros(&gpu, "o", &[2, 4]).unwrap();
        let mut rec = Recorder::new(&gpu);
        let err = linear(&mut rec, &x, &w, None, &o, LinearOpts::default()).unwrap_err();
        assert!(err.to_string().contains("expects 6"), "{err}");
    }
}
