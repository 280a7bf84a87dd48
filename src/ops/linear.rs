//! Linear layers (`shaders/matmul.wgsl`): `out = combine(out, act(x · Wᵀ + b))` with f16
//! weights split over any number of chunks, f32 activations and accumulation.

use super::norm::{rms_norm, NormOpts};
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
    norm: u32,
    eps: f32,
    pad: [u32; 2],
}

/// Gemma's RMSNorm `x / √(mean(x²) + eps) · (1 + weight)`, applied to a launch's input rows
/// inside the matrix-vector kernels (see [`linear_normed`] and [`glu`]).
#[derive(Debug, Clone, Copy)]
pub struct RmsNorm<'a> {
    /// The norm weight, f32 `[k]` (stored as an offset from 1).
    pub weight: &'a Tensor,
    /// Added to the mean square.
    pub eps: f32,
}

/// What a matrix-vector launch fuses beyond the plain linear layer: the RMSNorm of its input
/// and, for a GLU, the second (up) weight whose product gates the first's activation.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Fused<'a> {
    pub norm: Option<RmsNorm<'a>>,
    pub up: Option<&'a Tensor>,
}

impl Fused<'_> {
    /// The norm flag and epsilon of the kernel parameters.
    pub(crate) fn norm_params(&self) -> (u32, f32) {
        self.norm.map_or((0, 0.0), |n| (1, n.eps))
    }

    /// Bindings 5 and 6 of the matrix-vector kernels: the norm weight and the up chunk `i`
    /// (stand-ins the kernel does not read when absent).
    pub(crate) fn buffers<'b>(
        &'b self,
        x: &'b Tensor,
        w: &'b wgpu::Buffer,
        i: usize,
    ) -> [&'b wgpu::Buffer; 2] {
        [
            self.norm.map_or(x.buffer(), |n| n.weight.buffer()),
            self.up.map_or(w, |u| &u.chunks()[i].buffer),
        ]
    }
}

/// Rows at or below which the matrix-vector kernel is used instead of the tiled one.
pub(crate) const MATVEC_MAX_ROWS: usize = 4;

/// Whether a launch of `m` rows runs a matrix-vector kernel of family `kernels` (which can fuse
/// the input's RMSNorm and a GLU): up to [`MATVEC_MAX_ROWS`] rows on GPUs, one on CPU
/// adapters.
pub(crate) fn is_matvec(kernels: Kernels, m: usize) -> bool {
    match kernels {
        Kernels::Lanes => m == 1,
        Kernels::Threads => m <= MATVEC_MAX_ROWS,
    }
}

/// Whether `gate` and `up` can be read by one GLU launch: same shape, format, layout and
/// chunking.
fn glu_compatible(gate: &Tensor, up: &Tensor) -> bool {
    gate.shape() == up.shape()
        && gate.dtype() == up.dtype()
        && gate.interleaved() == up.interleaved()
        && gate.row_stride() == up.row_stride()
        && gate.chunks().len() == up.chunks().len()
        && gate
            .chunks()
            .iter()
            .zip(up.chunks())
            .all(|(a, b)| a.rows == b.rows && a.row_start == b.row_start)
}

/// `out[r] = combine(out[r], act(RMSNorm(x[r]) · Wᵀ))` for the selected rows: one launch of
/// the matrix-vector kernels with the norm fused where they run (decode steps), otherwise
/// [`rms_norm`] of those rows into rows `0..m` of `scratch` (f32, at least `m` rows of `x`'s
/// width; `m` the rows computed) then [`linear`] from there. Returns whether the norm was
/// fused.
pub fn linear_normed(
    rec: &mut Recorder,
    x: &Tensor,
    norm: RmsNorm,
    scratch: &Tensor,
    w: &Tensor,
    out: &Tensor,
    opts: LinearOpts,
) -> Result<bool> {
    let kernels = Kernels::choose(rec.gpu(), w.cols());
    let m = opts.rows.unwrap_or(x.rows().saturating_sub(opts.x_row));
    if is_matvec(kernels, m) {
        let fused = Fused {
            norm: Some(norm),
            up: None,
        };
        launch(rec, x, w, None, out, opts, kernels, fused)?;
        return Ok(true);
    }
    norm_rows(rec, x, norm, scratch, opts.x_row, m)?;
    let normed = LinearOpts { x_row: 0, ..opts };
    linear(rec, scratch, w, None, out, normed)?;
    Ok(false)
}

/// The gated MLP input `out[r] = combine(out[r], gelu_tanh(h · Gateᵀ) ⊙ (h · Upᵀ))` with
/// `h = RMSNorm(x[r])` (or `x[r]` without a norm): one matrix-vector launch reading both
/// weights where those kernels run and `gate` and `up` are laid out alike, otherwise the norm
/// into `scratch` (as [`linear_normed`]), the gate product with its GELU stored into `out`
/// and the up product multiplied into it (so `combine` must be [`Combine::Store`] there;
/// the norm writes rows `0..m` of `scratch`).
/// Returns whether it took one launch.
#[allow(clippy::too_many_arguments)]
pub fn glu(
    rec: &mut Recorder,
    x: &Tensor,
    norm: Option<RmsNorm>,
    scratch: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    out: &Tensor,
    opts: LinearOpts,
) -> Result<bool> {
    const K: &str = "glu";
    check(glu_compatible(gate, up), K, || {
        format!(
            "{} and {} differ in shape or format",
            gate.name(),
            up.name()
        )
    })?;
    check(opts.act == Act::None, K, || {
        "the GELU is the GLU's own; no activation may be given".into()
    })?;
    let kernels = Kernels::choose(rec.gpu(), gate.cols());
    let m = opts.rows.unwrap_or(x.rows().saturating_sub(opts.x_row));
    if is_matvec(kernels, m) {
        let fused = Fused { norm, up: Some(up) };
        launch(rec, x, gate, None, out, opts, kernels, fused)?;
        return Ok(true);
    }
    check(opts.combine == Combine::Store, K, || {
        "outside the matrix-vector kernels the GLU can only store its result".into()
    })?;
    let (h, x_row) = match norm {
        Some(n) => {
            norm_rows(rec, x, n, scratch, opts.x_row, m)?;
            (scratch, 0)
        }
        None => (x, opts.x_row),
    };
    let gelu = LinearOpts {
        act: Act::GeluTanh,
        x_row,
        ..opts
    };
    linear(rec, h, gate, None, out, gelu)?;
    let times = LinearOpts {
        act: Act::None,
        combine: Combine::Mul,
        ..gelu
    };
    linear(rec, h, up, None, out, times)?;
    Ok(false)
}

/// RMSNorm of rows `row..row + rows` of `x` into rows `0..rows` of `out`.
fn norm_rows(
    rec: &mut Recorder,
    x: &Tensor,
    norm: RmsNorm,
    out: &Tensor,
    row: usize,
    rows: usize,
) -> Result<()> {
    let opts = NormOpts {
        x_row: row,
        out_row: 0,
        rows: Some(rows),
    };
    rms_norm(rec, x, norm.weight, out, norm.eps, opts)
}

/// Launch the f16 or quantised kernels.
#[allow(clippy::too_many_arguments)]
fn launch(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    opts: LinearOpts,
    kernels: Kernels,
    fused: Fused,
) -> Result<()> {
    if w.dtype().is_quantized() {
        super::quant::linear_quantized_fused(rec, x, w, bias, out, opts, kernels, fused)
    } else {
        linear_fused(rec, x, w, bias, out, opts, kernels, fused)
    }
}

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
    let kernels = Kernels::choose(rec.gpu(), w.cols());
    launch(rec, x, w, bias, out, opts, kernels, Fused::default())
}

/// [`linear`] with the kernel family chosen by the caller (tests run both on one adapter).
#[cfg(test)]
pub(crate) fn linear_with(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    opts: LinearOpts,
    kernels: Kernels,
) -> Result<()> {
    linear_fused(rec, x, w, bias, out, opts, kernels, Fused::default())
}

/// [`linear_with`] with a fused norm or GLU (matrix-vector launches only).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_fused(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    opts: LinearOpts,
    kernels: Kernels,
    fused: Fused,
) -> Result<()> {
    const K: &str = "linear";
    check(w.dtype() == DType::F16, K, || {
        format!("{} must be f16", w.name())
    })?;
    let (n, k, m) = check_args(K, x, w, bias, out, &opts, kernels)?;
    check_fused(K, w, bias, &opts, kernels, m, &fused)?;
    let epilogue = bias.is_some() as u32 | opts.act.code() << 1 | opts.combine.code() << 2;
    let (norm, eps) = fused.norm_params();
    let glu = fused.up.is_some();
    for (i, chunk) in w.chunks().iter().enumerate() {
        let entry = match (kernels, m) {
            (Kernels::Lanes, 1) if glu => "matvec_glu_lanes",
            (Kernels::Lanes, 1) => "matvec_lanes",
            (Kernels::Lanes, _) if narrow(chunk.rows) => "matmul_lanes8",
            (Kernels::Lanes, _) => "matmul_lanes",
            (Kernels::Threads, m) if m <= MATVEC_MAX_ROWS && glu => "matvec_glu",
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
            norm,
            eps,
            pad: [0; 2],
        };
        let bias_buf = bias.map_or(x.buffer(), |b| b.buffer());
        let [norm_buf, up_buf] = fused.buffers(x, &chunk.buffer, i);
        let all = [
            x.buffer(),
            &chunk.buffer,
            bias_buf,
            out.buffer(),
            norm_buf,
            up_buf,
        ];
        let buffers = match is_matvec(kernels, m) {
            true => &all[..],
            false => &all[..4],
        };
        let workgroups = match entry {
            "matvec" => rec.grid(chunk.rows.div_ceil(4) as u32),
            "matvec_glu" => rec.grid(chunk.rows.div_ceil(2) as u32),
            "matvec_lanes" => rec.grid(chunk.rows.div_ceil(512) as u32),
            "matvec_glu_lanes" => rec.grid(chunk.rows.div_ceil(256) as u32),
            "matmul_lanes" => [chunk.rows.div_ceil(256) as u32, m.div_ceil(4) as u32, 1],
            "matmul_lanes8" => [chunk.rows.div_ceil(32) as u32, m.div_ceil(4) as u32, 1],
            _ => [chunk.rows.div_ceil(32) as u32, m.div_ceil(32) as u32, 1],
        };
        rec.dispatch(&key, &params, buffers, workgroups)?;
    }
    Ok(())
}

/// The checks of a fused launch shared by the f16 and quantised launchers: only the
/// matrix-vector kernels fuse, a GLU has no bias or activation of its own, and the norm
/// weight is f32 `[k]`.
pub(crate) fn check_fused(
    kernel: &str,
    w: &Tensor,
    bias: Option<&Tensor>,
    opts: &LinearOpts,
    kernels: Kernels,
    m: usize,
    fused: &Fused,
) -> Result<()> {
    if fused.norm.is_none() && fused.up.is_none() {
        return Ok(());
    }
    check(is_matvec(kernels, m), kernel, || {
        format!("a fused norm or GLU needs a matrix-vector launch, not {m} rows on {kernels:?}")
    })?;
    if let Some(n) = fused.norm {
        check(
            n.weight.numel() == w.cols() && n.weight.dtype() == DType::F32,
            kernel,
            || format!("norm weight {} must be f32 [{}]", n.weight.name(), w.cols()),
        )?;
    }
    if let Some(up) = fused.up {
        check(glu_compatible(w, up), kernel, || {
            format!("{} and {} differ in shape or format", w.name(), up.name())
        })?;
        check(bias.is_none() && opts.act == Act::None, kernel, || {
            "a GLU launch takes no bias or activation".into()
        })?;
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

    /// Weights `[n, k]` in `dtype` (f16 in the given layout, or quantised) and the values the
    /// kernels see.
    fn weight(
        gpu: &crate::gpu::Gpu,
        dtype: DType,
        interleave: bool,
        n: usize,
        k: usize,
        w: &[f32],
    ) -> (Tensor, Vec<f32>) {
        match dtype {
            DType::F16 => (
                Tensor::weight_from_f32_with(gpu, "w", &[n, k], interleave, w).unwrap(),
                round_f16(w),
            ),
            q => {
                let t = Tensor::weight_quantized(gpu, "w", &[n, k], q, |r, dst| {
                    dst.copy_from_slice(&w[r * k..(r + 1) * k]);
                    Ok(())
                })
                .unwrap();
                (t, crate::gpu::quantize::fake_quantize(q, k, w))
            }
        }
    }

    /// Rows `x_row..x_row + m` of an `[x_rows, k]` input through the matrix-vector kernels with
    /// the input's RMSNorm (`norm`) and a GLU (`glu`: gelu(h · gate) * (h · up)) fused, into the
    /// last `m` rows of an `[out_rows, n]` output, in f16 (both layouts), Q8 and Q4 and with
    /// every family that runs `m` rows, against the reference norm and products.
    #[allow(clippy::too_many_arguments)]
    fn fused_case(
        limit: Option<u64>,
        (x_rows, x_row): (usize, usize),
        out_rows: usize,
        m: usize,
        n: usize,
        k: usize,
        (norm, glu): (bool, bool),
        combine: Combine,
    ) {
        let gpu = gpu_with_limit(limit);
        let eps = 1e-6;
        let x = rand_vec(x_rows * k, 3.0, 21);
        let nw = rand_vec(k, 0.5, 22);
        let (g, u) = (rand_vec(n * k, 0.5, 23), rand_vec(n * k, 0.5, 24));
        let init = rand_vec(out_rows * n, 1.0, 25);
        let rows = &x[x_row * k..(x_row + m) * k];
        let h = match norm {
            true => super::super::norm::rms_norm_ref(rows, &nw, k, eps),
            false => rows.to_vec(),
        };
        let xt = Tensor::from_f32(&gpu, "x", &[x_rows, k], &x).unwrap();
        let nt = Tensor::from_f32(&gpu, "norm", &[k], &nw).unwrap();
        let out_row = out_rows - m;
        let opts = LinearOpts {
            combine,
            x_row,
            out_row,
            rows: Some(m),
            ..Default::default()
        };
        for (dtype, interleave) in [
            (DType::F16, false),
            (DType::F16, true),
            (DType::Q8, false),
            (DType::Q4, false),
        ] {
            let (gt, gq) = weight(&gpu, dtype, interleave, n, k, &g);
            let (ut, uq) = weight(&gpu, dtype, interleave, n, k, &u);
            if limit.is_some() {
                assert!(gt.chunks().len() > 1, "{dtype:?}: one chunk");
            }
            let mut want = init.clone();
            for r in 0..m {
                let hr = &h[r * k..(r + 1) * k];
                let dot = |w: &[f32], c: usize| -> f32 {
                    hr.iter()
                        .zip(&w[c * k..(c + 1) * k])
                        .map(|(a, b)| a * b)
                        .sum()
                };
                for c in 0..n {
                    let v = match glu {
                        true => Act::GeluTanh.apply(dot(&gq, c)) * dot(&uq, c),
                        false => dot(&gq, c),
                    };
                    let o = &mut want[(out_row + r) * n + c];
                    *o = combine.apply(*o, v);
                }
            }
            let families = Kernels::all_for(k).into_iter().filter(|&f| is_matvec(f, m));
            for family in families {
                let ot = Tensor::from_f32(&gpu, "out", &[out_rows, n], &init).unwrap();
                let mut rec = Recorder::new(&gpu);
                let fused = Fused {
                    norm: norm.then_some(RmsNorm { weight: &nt, eps }),
                    up: glu.then_some(&ut),
                };
                launch(&mut rec, &xt, &gt, None, &ot, opts, family, fused).unwrap();
                rec.run().unwrap();
                let got = ot.read(&gpu).unwrap();
                let what = format!(
                    "fused norm={norm} glu={glu} {dtype:?} interleaved={} {family:?} m={m} n={n} k={k} {combine:?}",
                    gt.interleaved()
                );
                assert_close(&got, &want, 2e-4, &what);
            }
        }
    }

    #[test]
    fn fused_norm_and_glu_match_reference() {
        let both = (true, true);
        // Odd widths (k % 8 != 0, k % 4 != 0: threads only), fewer columns than a workgroup
        // computes, more than 512 (two lane workgroups; 256 a GLU workgroup).
        fused_case(None, (1, 0), 1, 1, 45, 67, both, Combine::Store);
        fused_case(None, (1, 0), 1, 1, 7, 36, both, Combine::Add);
        fused_case(None, (3, 1), 2, 1, 600, 100, both, Combine::Store);
        fused_case(None, (1, 0), 1, 1, 1100, 36, (true, false), Combine::Add);
        fused_case(None, (1, 0), 3, 1, 300, 44, (false, true), Combine::Store);
        // A batch step: up to four rows in the threads kernels, each with its own norm.
        fused_case(None, (6, 2), 5, 4, 130, 200, both, Combine::Store);
        fused_case(None, (3, 0), 3, 3, 70, 64, (true, false), Combine::Add);
        // Weights split over chunks (the GLU reads gate and up chunk by chunk).
        fused_case(Some(2048), (1, 0), 1, 1, 300, 100, both, Combine::Store);
        fused_case(
            Some(2048),
            (2, 0),
            2,
            2,
            300,
            100,
            (true, false),
            Combine::Store,
        );
    }

    /// [`linear_normed`] and [`glu`] outside the matrix-vector kernels (a prompt's rows) take
    /// the norm, then one or two launches, with the same result as the fused launch.
    #[test]
    fn unfused_norm_and_glu_match_fused_rows() {
        let gpu = gpu_with_limit(None);
        let (rows, n, k, eps) = (9, 70, 64, 1e-6);
        let x = rand_vec(rows * k, 3.0, 31);
        let nw = rand_vec(k, 0.5, 32);
        let xt = Tensor::from_f32(&gpu, "x", &[rows, k], &x).unwrap();
        let nt = Tensor::from_f32(&gpu, "norm", &[k], &nw).unwrap();
        let scratch = Tensor::zeros(&gpu, "h", &[rows, k]).unwrap();
        let gt = Tensor::weight_from_f32(&gpu, "gate", &[n, k], &rand_vec(n * k, 0.5, 33)).unwrap();
        let ut = Tensor::weight_from_f32(&gpu, "up", &[n, k], &rand_vec(n * k, 0.5, 34)).unwrap();
        let norm = RmsNorm { weight: &nt, eps };
        let run = |glu_launch: bool, x_row: usize, m: usize| -> (bool, Vec<f32>) {
            let out = Tensor::zeros(&gpu, "out", &[m, n]).unwrap();
            let opts = LinearOpts {
                x_row,
                rows: Some(m),
                ..Default::default()
            };
            let mut rec = Recorder::new(&gpu);
            let fused = match glu_launch {
                true => glu(&mut rec, &xt, Some(norm), &scratch, &gt, &ut, &out, opts),
                false => linear_normed(&mut rec, &xt, norm, &scratch, &gt, &out, opts),
            }
            .unwrap();
            rec.run().unwrap();
            (fused, out.read(&gpu).unwrap())
        };
        for glu_launch in [false, true] {
            let (fused_all, all) = run(glu_launch, 0, rows);
            assert!(!fused_all, "9 rows take the tiled kernels");
            for r in [0, 4, 8] {
                let (fused_one, one) = run(glu_launch, r, 1);
                assert!(fused_one, "one row takes the matrix-vector kernel");
                let what = format!("glu={glu_launch} row {r}");
                assert_close(&one, &all[r * n..(r + 1) * n], 2e-4, &what);
            }
        }
        let mut rec = Recorder::new(&gpu);
        let out = Tensor::zeros(&gpu, "out", &[rows, n]).unwrap();
        let wide =
            Tensor::weight_from_f32(&gpu, "up", &[n + 1, k], &vec![0.0; (n + 1) * k]).unwrap();
        let err = glu(
            &mut rec,
            &xt,
            Some(norm),
            &scratch,
            &gt,
            &wide,
            &out,
            LinearOpts::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("differ in shape"), "{err}");
        let add = LinearOpts {
            combine: Combine::Add,
            ..Default::default()
        };
        let err = glu(&mut rec, &xt, Some(norm), &scratch, &gt, &ut, &out, add).unwrap_err();
        assert!(err.to_string().contains("can only store"), "{err}");
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
