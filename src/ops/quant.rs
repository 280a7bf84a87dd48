//! Quantised weights (`shaders/quant.wgsl`): linear layers and the embedding gather for
//! [`DType::Q8`] / [`DType::Q4`] weights (layout in [`crate::gpu::quantize`]), dequantised
//! inside the kernels. [`crate::ops::linear::linear`] and [`crate::ops::embed::embed`] hand
//! quantised weights to [`linear_quantized`] and [`embed_quantized`], so the model code is the
//! same for every weight format; the semantics are theirs:
//!
//! - linear: `out[r] = combine(out[r], act(x[r] · Wᵀ + bias))`, `W = q · s` in f32;
//! - embed: `out[out_row + i] = combine(out[out_row + i], table[ids[i]] · scale)`.

use super::linear::{check_args, check_fused, is_matvec, Fused, LinearOpts, MATVEC_MAX_ROWS};
use super::Kernels;
use super::{check, u32_arg, Act, Combine};
use crate::gpu::quantize::fake_quantize;
use crate::gpu::{DType, KernelKey, Recorder, Tensor};
use crate::Result;

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
    scale_off: u32,
    norm: u32,
    eps: f32,
    pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    n: u32,
    dim: u32,
    w_stride4: u32,
    row_start: u32,
    rows: u32,
    vocab: u32,
    out_row: u32,
    last: u32,
    scale: f32,
    scale_off: u32,
    pad: [u32; 2],
}

fn quant_key(shader_entry: &'static str, dtype: DType) -> KernelKey {
    KernelKey::new("quant", shader_entry).with("Q4", (dtype == DType::Q4) as u32)
}

/// [`crate::ops::linear::linear`] for a quantised `[n, k]` weight `w` (any number of chunks):
/// `out[r] = combine(out[r], act(x[r] · Wᵀ + bias))` for the selected rows, `bias` f32 `[n]`,
/// `x` f32 `[.., k]`, `out` f32 `[.., n]`.
pub fn linear_quantized(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    opts: LinearOpts,
) -> Result<()> {
    let family = Kernels::choose(rec.gpu(), w.cols());
    linear_quantized_with(rec, x, w, bias, out, opts, family)
}

/// [`linear_quantized`] with the kernel family chosen by the caller (tests run both).
pub(crate) fn linear_quantized_with(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    opts: LinearOpts,
    family: Kernels,
) -> Result<()> {
    linear_quantized_fused(rec, x, w, bias, out, opts, family, Fused::default())
}

/// [`linear_quantized_with`] with a fused norm or GLU (matrix-vector launches only; see
/// [`crate::ops::linear::glu`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_quantized_fused(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    opts: LinearOpts,
    family: Kernels,
    fused: Fused,
) -> Result<()> {
    const K: &str = "linear (quantised)";
    check(w.dtype().is_quantized(), K, || {
        format!("{} must be Q8 or Q4, is {:?}", w.name(), w.dtype())
    })?;
    let (n, k, m) = check_args(K, x, w, bias, out, &opts, family)?;
    check_fused(K, w, bias, &opts, family, m, &fused)?;
    let glu = fused.up.is_some();
    let (norm, eps) = fused.norm_params();
    let entry = match (family, m) {
        (Kernels::Lanes, 1) if glu => "qmatvec_glu_lanes",
        (Kernels::Lanes, 1) => "qmatvec_lanes",
        (Kernels::Lanes, _) => "qmatmul_lanes",
        (Kernels::Threads, m) if m <= MATVEC_MAX_ROWS && glu => "qmatvec_glu",
        (Kernels::Threads, m) if m <= MATVEC_MAX_ROWS => "qmatvec",
        (Kernels::Threads, _) => "qmatmul",
    };
    let key = quant_key(entry, w.dtype())
        .with("HAS_BIAS", bias.is_some() as u32)
        .with("ACT", opts.act.code())
        .with("MODE", opts.combine.code());
    let row_bytes = w.row_bytes();
    for (i, chunk) in w.chunks().iter().enumerate() {
        let params = Params {
            m: u32_arg(K, "rows", m)?,
            n: u32_arg(K, "n", chunk.rows)?,
            k: u32_arg(K, "k", k)?,
            w_stride4: u32_arg(K, "stride", row_bytes / 16)?,
            x_stride: u32_arg(K, "x stride", x.cols())?,
            out_stride: u32_arg(K, "out stride", n)?,
            out_col: u32_arg(K, "out col", chunk.row_start)?,
            out_row: u32_arg(K, "out row", opts.out_row)?,
            bias_off: u32_arg(K, "bias offset", chunk.row_start)?,
            x_row: u32_arg(K, "x row", opts.x_row)?,
            scale_off: u32_arg(K, "scale offset", chunk.rows * row_bytes / 4)?,
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
        let buffers = match is_matvec(family, m) {
            true => &all[..],
            false => &all[..4],
        };
        let workgroups = match entry {
            "qmatvec" => rec.grid(chunk.rows.div_ceil(4) as u32),
            "qmatvec_glu" => rec.grid(chunk.rows.div_ceil(2) as u32),
            "qmatvec_lanes" => rec.grid(chunk.rows.div_ceil(512) as u32),
            "qmatvec_glu_lanes" => rec.grid(chunk.rows.div_ceil(256) as u32),
            "qmatmul_lanes" => [chunk.rows.div_ceil(256) as u32, m.div_ceil(4) as u32, 1],
            _ => [chunk.rows.div_ceil(32) as u32, m.div_ceil(32) as u32, 1],
        };
        rec.dispatch(&key, &params, buffers, workgroups)?;
    }
    Ok(())
}

/// [`crate::ops::embed::embed`] for a quantised `[vocab, dim]` table (any number of chunks):
/// `out[out_row + i, :] = combine(out[out_row + i, :], table[ids[i], :] · scale)`. Ids
/// `>= vocab` contribute zeros, as there; callers validate ids on the host.
pub fn embed_quantized(
    rec: &mut Recorder,
    table: &Tensor,
    ids: &Tensor,
    out: &Tensor,
    out_row: usize,
    scale: f32,
    combine: Combine,
) -> Result<()> {
    const K: &str = "embed (quantised)";
    check(table.dtype().is_quantized(), K, || {
        format!("table {} must be Q8 or Q4", table.name())
    })?;
    let (vocab, dim, n) = super::embed::check_args(K, table, ids, out, out_row, scale)?;
    let key = quant_key("qembed", table.dtype()).with("MODE", combine.code());
    let workgroups = rec.grid(u32_arg(K, "ids", n)?);
    let last = table.chunks().len() - 1;
    let row_bytes = table.row_bytes();
    for (c, chunk) in table.chunks().iter().enumerate() {
        let params = EmbedParams {
            n: n as u32,
            dim: u32_arg(K, "dim", dim)?,
            w_stride4: u32_arg(K, "row stride", row_bytes / 16)?,
            row_start: u32_arg(K, "row start", chunk.row_start)?,
            rows: u32_arg(K, "chunk rows", chunk.rows)?,
            vocab: u32_arg(K, "vocab", vocab)?,
            out_row: u32_arg(K, "out row", out_row)?,
            last: (c == last) as u32,
            scale,
            scale_off: u32_arg(K, "scale offset", chunk.rows * row_bytes / 4)?,
            pad: [0; 2],
        };
        rec.dispatch(
            &key,
            &params,
            &[ids.buffer(), &chunk.buffer, out.buffer()],
            workgroups,
        )?;
    }
    Ok(())
}

/// CPU reference of [`linear_quantized`]: `w` is the f32 `[n, k]` matrix before quantisation
/// (row-major), quantised to `dtype` and back exactly as the upload does; otherwise as
/// [`crate::ops::linear::linear_ref`] (`x` `[m, k]`, `out` `[m, n]`).
#[allow(clippy::too_many_arguments)]
pub fn linear_quantized_ref(
    x: &[f32],
    w: &[f32],
    dtype: DType,
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
    act: Act,
    combine: Combine,
    out: &mut [f32],
) {
    let wq = fake_quantize(dtype, k, w);
    super::linear::linear_ref(x, &wq, bias, m, n, k, act, combine, out);
}

/// CPU reference of [`embed_quantized`]: `table` is the f32 `[vocab, dim]` table before
/// quantisation to `dtype`; otherwise as [`crate::ops::embed::embed_ref`].
#[allow(clippy::too_many_arguments)]
pub fn embed_quantized_ref(
    table: &[f32],
    dtype: DType,
    dim: usize,
    ids: &[u32],
    out: &mut [f32],
    out_row: usize,
    scale: f32,
    combine: Combine,
) {
    let tq = fake_quantize(dtype, dim, table);
    super::embed::embed_ref(&tq, dim, ids, out, out_row, scale, combine);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::embed::embed;
    use crate::ops::linear::linear;
    use crate::ops::testutil::{assert_close, gpu_with_limit, rand_vec};

    const FORMATS: [DType; 2] = [DType::Q8, DType::Q4];

    fn upload(gpu: &Gpu, dtype: DType, n: usize, k: usize, w: &[f32]) -> Tensor {
        Tensor::weight_quantized(gpu, "w", &[n, k], dtype, |r, dst| {
            dst.copy_from_slice(&w[r * k..(r + 1) * k]);
            Ok(())
        })
        .unwrap()
    }

    /// Rows `x_row..x_row + m` of an `[x_rows, k]` input into rows `out_row..` of an
    /// `[out_rows, n]` output, for both formats and every kernel family that supports `k`;
    /// also through [`linear`]'s dispatch on the weight's dtype.
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
        let w = rand_vec(n * k, 0.5, 2);
        let b = rand_vec(n, 0.3, 3);
        let init = rand_vec(out_rows * n, 1.0, 4);
        let xt = Tensor::from_f32(&gpu, "x", &[x_rows, k], &x).unwrap();
        let bt = Tensor::from_f32(&gpu, "b", &[n], &b).unwrap();
        let opts = LinearOpts {
            act,
            combine,
            x_row,
            out_row,
            rows: Some(m),
        };
        for dtype in FORMATS {
            let wt = upload(&gpu, dtype, n, k, &w);
            assert_eq!(wt.dtype(), dtype);
            if limit.is_some() {
                assert!(wt.chunks().len() > 1, "{} chunks", wt.chunks().len());
            }
            let mut want = init.clone();
            linear_quantized_ref(
                &x[x_row * k..(x_row + m) * k],
                &w,
                dtype,
                bias.then_some(&b[..]),
                m,
                n,
                k,
                act,
                combine,
                &mut want[out_row * n..(out_row + m) * n],
            );
            let mut runs: Vec<Option<Kernels>> =
                Kernels::all_for(k).into_iter().map(Some).collect();
            runs.push(None);
            for family in runs {
                let ot = Tensor::from_f32(&gpu, "out", &[out_rows, n], &init).unwrap();
                let mut rec = Recorder::new(&gpu);
                let b = bias.then_some(&bt);
                match family {
                    Some(f) => linear_quantized_with(&mut rec, &xt, &wt, b, &ot, opts, f),
                    None => linear(&mut rec, &xt, &wt, b, &ot, opts),
                }
                .unwrap();
                rec.run().unwrap();
                let got = ot.read(&gpu).unwrap();
                let what = format!("{dtype:?} {family:?} m={m} n={n} k={k} {act:?} {combine:?}");
                assert_close(&got, &want, 1e-4, &what);
            }
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
    fn matvec_matches_reference() {
        run_case(None, 1, 45, 67, true, Act::None, Combine::Store);
        run_case(None, 3, 130, 200, true, Act::GeluTanh, Combine::Add);
        run_case(None, 1, 7, 1000, false, Act::None, Combine::Mul);
        // More than 512 columns (two lane workgroups); k % 16 == 4, k % 32 == 4.
        run_case(None, 1, 1100, 36, true, Act::GeluTanh, Combine::Store);
        run_case(None, 4, 600, 100, false, Act::None, Combine::Add);
        // Every row of x in one workgroup, fewer weight rows than a workgroup computes.
        run_case(None, 4, 7, 36, true, Act::GeluTanh, Combine::Mul);
    }

    #[test]
    fn tiled_matches_reference_on_ragged_sizes() {
        run_case(None, 40, 45, 67, true, Act::None, Combine::Store);
        run_case(None, 64, 96, 128, false, Act::GeluTanh, Combine::Store);
        run_case(None, 33, 17, 250, true, Act::GeluTanh, Combine::Add);
        run_case(None, 40, 31, 9, true, Act::None, Combine::Mul);
        run_case(None, 9, 300, 100, true, Act::GeluTanh, Combine::Add);
        run_case(None, 6, 520, 12, false, Act::None, Combine::Store);
    }

    #[test]
    fn row_offsets_match_reference() {
        let (b, none, gelu) = (true, Act::None, Act::GeluTanh);
        run_rows(None, (7, 2), (6, 3), 3, 70, 64, b, none, Combine::Add);
        run_rows(
            None,
            (7, 5),
            (4, 1),
            1,
            530,
            64,
            false,
            gelu,
            Combine::Store,
        );
        run_rows(None, (50, 3), (45, 2), 40, 33, 72, b, none, Combine::Mul);
    }

    #[test]
    fn split_weights_match_reference() {
        // 2 KiB bindings: a [300, 100] matrix takes 116 bytes a row in Q8 (112 + 4) and 72 in
        // Q4 (64 + 8): 18 and 11 chunks.
        let (b, none, gelu) = (true, Act::None, Act::GeluTanh);
        run_case(Some(2048), 1, 300, 100, b, none, Combine::Store);
        run_case(Some(2048), 3, 300, 100, false, gelu, Combine::Mul);
        run_case(Some(2048), 40, 300, 100, b, gelu, Combine::Add);
    }

    #[test]
    fn weights_read_back_dequantised() {
        // 2 KiB bindings: 84 bytes a row in Q8 (6 chunks), 54 in Q4 (3 blocks, 4 chunks), so
        // row 13's Q4 scales start mid-word.
        let gpu = gpu_with_limit(Some(2048));
        let (n, k) = (130, 70);
        let w = rand_vec(n * k, 2.0, 9);
        for dtype in FORMATS {
            let wt = upload(&gpu, dtype, n, k, &w);
            assert!(wt.chunks().len() >= 4);
            let want = fake_quantize(dtype, k, &w);
            assert_eq!(wt.read(&gpu).unwrap(), want, "{dtype:?}");
            let rows = wt.read_rows(&gpu, 13, 100).unwrap();
            assert_eq!(rows, want[13 * k..113 * k], "{dtype:?} rows");
        }
    }

    fn embed_case(limit: Option<u64>, vocab: usize, dim: usize, ids: &[u32], combine: Combine) {
        let gpu = gpu_with_limit(limit);
        let table = rand_vec(vocab * dim, 1.0, 61);
        let out_row = 2;
        let orows = out_row + ids.len() + 1;
        let init = rand_vec(orows * dim, 1.0, 62);
        let it = Tensor::from_u32(&gpu, "ids", &[ids.len()], ids).unwrap();
        let scale = 1.7;
        for dtype in FORMATS {
            let tt = upload(&gpu, dtype, vocab, dim, &table);
            if limit.is_some() {
                assert!(tt.chunks().len() >= 3, "{} chunks", tt.chunks().len());
            }
            let mut want = init.clone();
            embed_quantized_ref(&table, dtype, dim, ids, &mut want, out_row, scale, combine);
            for direct in [true, false] {
                let ot = Tensor::from_f32(&gpu, "out", &[orows, dim], &init).unwrap();
                let mut rec = Recorder::new(&gpu);
                if direct {
                    embed_quantized(&mut rec, &tt, &it, &ot, out_row, scale, combine).unwrap();
                } else {
                    embed(&mut rec, &tt, &it, &ot, out_row, scale, combine).unwrap();
                }
                rec.run().unwrap();
                let what = format!("embed {dtype:?} vocab={vocab} dim={dim} {combine:?}");
                assert_close(&ot.read(&gpu).unwrap(), &want, 1e-6, &what);
            }
        }
    }

    #[test]
    fn embed_matches_reference() {
        let ids: Vec<u32> = (0..300).map(|i| (i * 7 % 50) as u32).collect();
        embed_case(None, 50, 72, &ids, Combine::Store);
        embed_case(None, 50, 37, &ids[..5], Combine::Add);
        embed_case(None, 11, 2050, &[10, 0, 3], Combine::Mul);
    }

    #[test]
    fn split_embed_matches_reference() {
        // 2 KiB bindings: 37 columns take 52 bytes a row in Q8 (39 rows a chunk) and 36 in Q4
        // (56 rows); 300 rows span 8 and 6 chunks.
        let ids: Vec<u32> = vec![0, 299, 38, 39, 40, 55, 56, 111, 112, 77, 78, 1, 298, 204];
        embed_case(Some(2048), 300, 37, &ids, Combine::Store);
        embed_case(Some(2048), 300, 37, &ids, Combine::Add);
        // Out-of-range ids give zeros.
        embed_case(Some(2048), 300, 37, &[3, 300, 7, u32::MAX], Combine::Store);
        embed_case(None, 300, 37, &[3, 300, 7, u32::MAX], Combine::Add);
    }

    #[test]
    fn rejects_bad_arguments() {
        let gpu = gpu_with_limit(None);
        let w = upload(&gpu, DType::Q8, 4, 6, &[0.5; 24]);
        let w16 = Tensor::weight_from_f32(&gpu, "w16", &[4, 6], &[0.0; 24]).unwrap();
        let x = Tensor::zeros(&gpu, "x", &[2, 8]).unwrap();
        let x6 = Tensor::zeros(&gpu, "x6", &[2, 6]).unwrap();
        let o = Tensor::zeros(&gpu, "o", &[2, 4]).unwrap();
        let ids = Tensor::from_u32(&gpu, "ids", &[2], &[0, 1]).unwrap();
        let o6 = Tensor::zeros(&gpu, "o6", &[2, 6]).unwrap();
        let mut rec = Recorder::new(&gpu);
        let opts = LinearOpts::default();
        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert!(err(linear_quantized(&mut rec, &x, &w, None, &o, opts)).contains("expects 6"));
        assert!(err(linear_quantized(&mut rec, &x6, &w16, None, &o, opts)).contains("Q8 or Q4"));
        let lanes = linear_quantized_with(&mut rec, &x6, &w, None, &o, opts, Kernels::Lanes);
        assert!(err(lanes).contains("k % 4"));
        let s = Combine::Store;
        assert!(err(embed_quantized(&mut rec, &w, &ids, &o, 0, 1.0, s)).contains("columns"));
        assert!(err(embed_quantized(&mut rec, &w16, &ids, &o6, 0, 1.0, s)).contains("Q8 or Q4"));
        assert!(rec.is_empty());
        let bad = Tensor::weight_quantized(&gpu, "bad", &[4, 6], DType::F16, |_, _| Ok(()));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("not a quantised type"));
        let nan = Tensor::weight_quantized(&gpu, "nan", &[2, 3], DType::Q4, |r, d| {
            d.fill(if r == 1 { f32::NAN } else { 0.0 });
            Ok(())
        });
        assert!(nan.unwrap_err().to_string().contains("row 1"));
    }
}
