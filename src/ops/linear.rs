//! Linear layers (`shaders/matmul.wgsl`): `out = combine(out, act(x · Wᵀ + b))` with f16
//! weights split over any number of chunks, f32 activations and accumulation.

use super::{check, u32_arg, Act, Combine};
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
    pad: [u32; 2],
}

/// Rows at or below which the matrix-vector kernel is used instead of the tiled one.
const MATVEC_MAX_ROWS: usize = 4;

/// Record `out[r] = combine(out[r], act(x[r] · Wᵀ + bias))` for the selected rows.
/// `w` is an f16 `[n, k]` matrix (any number of chunks), `bias` an f32 `[n]` vector,
/// `x` f32 `[.., k]`, `out` f32 `[.., n]`.
pub fn linear(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    opts: LinearOpts,
) -> Result<()> {
    const K: &str = "linear";
    let (n, k) = (w.rows(), w.cols());
    let m = opts.rows.unwrap_or(x.rows().saturating_sub(opts.x_row));
    check(w.dtype() == DType::F16, K, || {
        format!("{} must be f16", w.name())
    })?;
    check(
        x.dtype() == DType::F32 && out.dtype() == DType::F32,
        K,
        || "x and out must be f32".into(),
    )?;
    check(x.cols() == k, K, || {
        format!(
            "{} has {} columns, weight {} expects {k}",
            x.name(),
            x.cols(),
            w.name()
        )
    })?;
    check(out.cols() == n, K, || {
        format!(
            "{} has {} columns, weight {} gives {n}",
            out.name(),
            out.cols(),
            w.name()
        )
    })?;
    check(m > 0 && opts.x_row + m <= x.rows(), K, || {
        format!(
            "rows {}..{} outside {}",
            opts.x_row,
            opts.x_row + m,
            x.name()
        )
    })?;
    check(opts.out_row + m <= out.rows(), K, || {
        format!(
            "rows {}..{} outside {}",
            opts.out_row,
            opts.out_row + m,
            out.name()
        )
    })?;
    if let Some(b) = bias {
        check(b.numel() == n && b.dtype() == DType::F32, K, || {
            format!("bias {} must be f32 [{n}]", b.name())
        })?;
    }
    let matvec = m <= MATVEC_MAX_ROWS;
    let key = KernelKey::new("matmul", if matvec { "matvec" } else { "matmul" })
        .with("HAS_BIAS", bias.is_some() as u32)
        .with("ACT", opts.act.code())
        .with("MODE", opts.combine.code());
    for chunk in w.chunks() {
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
            pad: [0; 2],
        };
        let bias_buf = bias.map_or(x.buffer(), |b| b.buffer());
        let buffers = [x.buffer(), &chunk.buffer, bias_buf, out.buffer()];
        let workgroups = if matvec {
            let [gx, gy, _] = rec.grid(chunk.rows.div_ceil(4) as u32);
            [gx, gy, m as u32]
        } else {
            [chunk.rows.div_ceil(32) as u32, m.div_ceil(32) as u32, 1]
        };
        rec.dispatch(&key, &params, &buffers, workgroups)?;
    }
    Ok(())
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

    fn run_case(
        limit: Option<u64>,
        m: usize,
        n: usize,
        k: usize,
        bias: bool,
        act: Act,
        combine: Combine,
    ) {
        let gpu = gpu_with_limit(limit);
        let x = rand_vec(m * k, 1.0, 1);
        let w = round_f16(&rand_vec(n * k, 0.5, 2));
        let b = rand_vec(n, 0.3, 3);
        let init = rand_vec(m * n, 1.0, 4);
        let xt = Tensor::from_f32(&gpu, "x", &[m, k], &x).unwrap();
        let wt = Tensor::weight_from_f32(&gpu, "w", &[n, k], &w).unwrap();
        let bt = Tensor::from_f32(&gpu, "b", &[n], &b).unwrap();
        let ot = Tensor::from_f32(&gpu, "out", &[m, n], &init).unwrap();
        if let Some(l) = limit {
            assert!(wt.chunks().len() > 1 || (n * k.div_ceil(8) * 16) as u64 <= l);
        }
        let mut rec = Recorder::new(&gpu);
        let opts = LinearOpts {
            act,
            combine,
            ..Default::default()
        };
        linear(&mut rec, &xt, &wt, bias.then_some(&bt), &ot, opts).unwrap();
        rec.run().unwrap();
        let got = ot.read(&gpu).unwrap();
        let mut want = init.clone();
        linear_ref(
            &x,
            &w,
            bias.then_some(&b[..]),
            m,
            n,
            k,
            act,
            combine,
            &mut want,
        );
        assert_close(
            &got,
            &want,
            1e-4,
            &format!("linear m={m} n={n} k={k} {act:?} {combine:?}"),
        );
    }

    #[test]
    fn tiled_matches_reference_on_ragged_sizes() {
        run_case(None, 37, 45, 67, true, Act::None, Combine::Store);
        run_case(None, 64, 96, 128, false, Act::GeluTanh, Combine::Store);
        run_case(None, 33, 17, 250, true, Act::GeluTanh, Combine::Add);
        run_case(None, 40, 31, 9, true, Act::None, Combine::Mul);
    }

    #[test]
    fn matvec_matches_reference() {
        run_case(None, 1, 45, 67, true, Act::None, Combine::Store);
        run_case(None, 3, 130, 200, true, Act::GeluTanh, Combine::Add);
        run_case(None, 1, 7, 1000, false, Act::None, Combine::Mul);
    }

    #[test]
    fn split_weights_match_reference() {
        // 2 KiB bindings: a [300, 100] f16 matrix (208 bytes a row) spans 31 chunks.
        run_case(Some(2048), 1, 300, 100, true, Act::None, Combine::Store);
        run_case(Some(2048), 50, 300, 100, true, Act::GeluTanh, Combine::Add);
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
