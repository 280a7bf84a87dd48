//! Embedding lookup (`shaders/embed.wgsl`): gather rows of an f16 table (split into any number
//! of chunks) into f32 activations, scaled, stored or added:
//! `out[out_row + i] = combine(out[out_row + i], table[ids[i]] · scale)`.

use super::{check, u32_arg, Combine};
use crate::gpu::{DType, KernelKey, Recorder, Tensor};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    dim: u32,
    stride2: u32,
    row_start: u32,
    rows: u32,
    vocab: u32,
    out_row: u32,
    last: u32,
    scale: f32,
    interleaved: u32,
    pad: [u32; 2],
}

/// Record `out[out_row + i, :] = combine(out[out_row + i, :], table[ids[i], :] · scale)` for
/// every `i` in `0..ids.numel()`.
///
/// `table` is an f16 `[vocab, dim]` weight in any number of chunks (one dispatch each, each
/// handling the ids inside its rows; Q8/Q4 tables go to [`super::quant::embed_quantized`]),
/// `ids` a u32 tensor, `out` f32 `[.., dim]`.
/// `combine` is usually [`Combine::Store`] (token embeddings, `scale = √hidden` for Gemma) or
/// [`Combine::Add`] (SigLIP's learned position embeddings, with ids `0..n` and `scale = 1`).
///
/// The ids live on the GPU, so this cannot check them: an id `>= vocab` reads nothing and
/// contributes zeros (its output row is zeroed by `Store`, left as is by `Add`). Callers must
/// validate ids on the host before uploading them.
pub fn embed(
    rec: &mut Recorder,
    table: &Tensor,
    ids: &Tensor,
    out: &Tensor,
    out_row: usize,
    scale: f32,
    combine: Combine,
) -> Result<()> {
    if table.dtype().is_quantized() {
        return super::quant::embed_quantized(rec, table, ids, out, out_row, scale, combine);
    }
    const K: &str = "embed";
    check(table.dtype() == DType::F16, K, || {
        format!("table {} must be f16", table.name())
    })?;
    let (vocab, dim, n) = check_args(K, table, ids, out, out_row, scale)?;
    let key = KernelKey::new("embed", "embed").with("MODE", combine.code());
    let workgroups = rec.grid(u32_arg(K, "ids", n)?);
    let last = table.chunks().len() - 1;
    for (c, chunk) in table.chunks().iter().enumerate() {
        let params = Params {
            n: n as u32,
            dim: u32_arg(K, "dim", dim)?,
            stride2: u32_arg(K, "row stride", table.row_stride() / 2)?,
            row_start: u32_arg(K, "row start", chunk.row_start)?,
            rows: u32_arg(K, "chunk rows", chunk.rows)?,
            vocab: u32_arg(K, "vocab", vocab)?,
            out_row: u32_arg(K, "out row", out_row)?,
            last: (c == last) as u32,
            scale,
            interleaved: table.interleaved() as u32,
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

/// The checks shared by the f16 and quantised gathers: u32 ids, an f32 output with the
/// table's width and room for the rows, a finite scale. Returns `(vocab, dim, ids)`.
pub(crate) fn check_args(
    kernel: &str,
    table: &Tensor,
    ids: &Tensor,
    out: &Tensor,
    out_row: usize,
    scale: f32,
) -> Result<(usize, usize, usize)> {
    let (vocab, dim) = (table.rows(), table.cols());
    let n = ids.numel();
    check(ids.dtype() == DType::U32, kernel, || {
        format!("ids {} must be u32", ids.name())
    })?;
    check(out.dtype() == DType::F32, kernel, || {
        format!("{} must be f32", out.name())
    })?;
    check(out.cols() == dim, kernel, || {
        format!(
            "{} has {} columns, table {} has {dim}",
            out.name(),
            out.cols(),
            table.name()
        )
    })?;
    check(out_row + n <= out.rows(), kernel, || {
        format!("rows {out_row}..{} outside {}", out_row + n, out.name())
    })?;
    check(scale.is_finite(), kernel, || format!("scale = {scale}"))?;
    Ok((vocab, dim, n))
}

/// CPU reference of [`embed`]: `table` is `[vocab, dim]` row-major (already rounded to f16 if
/// comparing with the GPU), `out` holds `dim`-wide rows. Ids `>= vocab` contribute zeros.
pub fn embed_ref(
    table: &[f32],
    dim: usize,
    ids: &[u32],
    out: &mut [f32],
    out_row: usize,
    scale: f32,
    combine: Combine,
) {
    let vocab = table.len() / dim;
    for (i, &id) in ids.iter().enumerate() {
        let row = &mut out[(out_row + i) * dim..(out_row + i + 1) * dim];
        for (j, o) in row.iter_mut().enumerate() {
            let v = if (id as usize) < vocab {
                table[id as usize * dim + j] * scale
            } else {
                0.0
            };
            *o = combine.apply(*o, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, gpu_with_limit, rand_vec, round_f16};

    fn run_case(limit: Option<u64>, vocab: usize, dim: usize, ids: &[u32], combine: Combine) {
        let gpu = gpu_with_limit(limit);
        let table = round_f16(&rand_vec(vocab * dim, 1.0, 61));
        let out_row = 2;
        let orows = out_row + ids.len() + 1;
        let init = rand_vec(orows * dim, 1.0, 62);
        let it = Tensor::from_u32(&gpu, "ids", &[ids.len()], ids).unwrap();
        let scale = 1.7;
        let mut want = init.clone();
        embed_ref(&table, dim, ids, &mut want, out_row, scale, combine);
        for interleave in [false, true] {
            let tt = Tensor::weight_from_f32_with(&gpu, "table", &[vocab, dim], interleave, &table)
                .unwrap();
            if limit.is_some() {
                assert!(tt.chunks().len() >= 3, "{} chunks", tt.chunks().len());
            }
            assert_eq!(tt.read(&gpu).unwrap(), table, "table read back");
            let ot = Tensor::from_f32(&gpu, "out", &[orows, dim], &init).unwrap();
            let mut rec = Recorder::new(&gpu);
            embed(&mut rec, &tt, &it, &ot, out_row, scale, combine).unwrap();
            rec.run().unwrap();
            let what = format!(
                "embed vocab={vocab} dim={dim} {combine:?} interleaved={}",
                tt.interleaved()
            );
            assert_close(&ot.read(&gpu).unwrap(), &want, 1e-6, &what);
        }
    }

    #[test]
    fn single_chunk_matches_reference() {
        let ids: Vec<u32> = (0..300).map(|i| (i * 7 % 50) as u32).collect();
        run_case(None, 50, 72, &ids, Combine::Store);
        run_case(None, 50, 37, &ids[..5], Combine::Add);
        run_case(None, 11, 2050, &[10, 0, 3], Combine::Store);
    }

    #[test]
    fn split_table_matches_reference() {
        // 2 KiB bindings: 37 columns pad to 40 halves (80 bytes), 25 rows a chunk, 4 chunks;
        // 1152 columns (2304 bytes) do not fit, so use 72 (144 bytes, 14 rows, 8 chunks).
        let ids: Vec<u32> = vec![0, 99, 24, 25, 26, 50, 74, 75, 49, 1, 98, 99, 60];
        run_case(Some(2048), 100, 37, &ids, Combine::Store);
        run_case(Some(2048), 100, 37, &ids, Combine::Add);
        let ids: Vec<u32> = (0..105).rev().map(|i| i as u32).collect();
        run_case(Some(2048), 105, 72, &ids, Combine::Store);
        run_case(Some(2048), 105, 72, &ids, Combine::Add);
        // Chunks of whole interleaved groups (8 KiB: 512 rows of 16 bytes) and of whole
        // blocks (4 KiB: 256 rows), each table ending in a short group.
        let ids: Vec<u32> = (0..1300).rev().step_by(7).map(|i| i as u32).collect();
        run_case(Some(8192), 1300, 8, &ids, Combine::Store);
        let ids: Vec<u32> = (0..600).step_by(5).map(|i| i as u32).collect();
        run_case(Some(4096), 600, 8, &ids, Combine::Add);
    }

    #[test]
    fn position_embeddings_add_rows_in_order() {
        let ids: Vec<u32> = (0..37).collect();
        run_case(Some(2048), 37, 72, &ids, Combine::Add);
    }

    #[test]
    fn out_of_range_ids_give_zeros_without_reading_out_of_bounds() {
        let ids = [3, 100, 7, u32::MAX, 99];
        run_case(Some(2048), 100, 37, &ids, Combine::Store);
        run_case(Some(2048), 100, 37, &ids, Combine::Add);
        run_case(None, 100, 37, &ids, Combine::Store);
    }

    #[test]
    fn rejects_bad_arguments() {
        let gpu = gpu_with_limit(None);
        let table = Tensor::weight_from_f32(&gpu, "table", &[10, 8], &[0.0; 80]).unwrap();
        let table32 = Tensor::zeros(&gpu, "t32", &[10, 8]).unwrap();
        let ids = Tensor::from_u32(&gpu, "ids", &[3], &[0, 1, 2]).unwrap();
        let fids = Tensor::zeros(&gpu, "fids", &[3]).unwrap();
        let out = Tensor::zeros(&gpu, "out", &[4, 8]).unwrap();
        let out7 = Tensor::zeros(&gpu, "out7", &[4, 7]).unwrap();
        let mut rec = Recorder::new(&gpu);
        let s = Combine::Store;
        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert!(err(embed(&mut rec, &table32, &ids, &out, 0, 1.0, s)).contains("f16"));
        assert!(err(embed(&mut rec, &table, &fids, &out, 0, 1.0, s)).contains("u32"));
        assert!(err(embed(&mut rec, &table, &ids, &out7, 0, 1.0, s)).contains("columns"));
        assert!(err(embed(&mut rec, &table, &ids, &out, 2, 1.0, s)).contains("outside"));
        assert!(err(embed(&mut rec, &table, &ids, &out, 0, f32::NAN, s)).contains("scale"));
        assert!(rec.is_empty());
        embed(&mut rec, &table, &ids, &out, 1, 1.0, s).unwrap();
        assert_eq!(rec.len(), 1);
    }
}
