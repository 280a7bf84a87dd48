//! Rotary position embedding (`shaders/rope.wgsl`), half rotation as HF `rotate_half`, applied
//! in place to `[rows, heads·head_dim]` query or key activations. For position `p`, head
//! dimension `d` and `i < d/2`: `x[i], x[i + d/2] ← x[i]·cos − x[i + d/2]·sin,
//! x[i + d/2]·cos + x[i]·sin` with angle `p · inv_freq[i]`, `inv_freq[i] = 1 / θ^(2i/d)`.
//!
//! The cos/sin values come from a [`RopeTable`] computed once on the host exactly as HF
//! transformers computes them in f32 (`inv_freq` and the angle rounded to f32, then cos/sin of
//! that f32 angle, correctly rounded).

use super::{check, u32_arg};
use crate::gpu::{DType, Gpu, KernelKey, Recorder, Tensor};
use crate::Result;

/// Precomputed rotary cos/sin values on the GPU: an f32 `[max_pos, head_dim]` tensor whose
/// row `p` holds `cos(p·inv_freq[i])` at `i < head_dim/2` and `sin(p·inv_freq[i])` at
/// `head_dim/2 + i`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    tensor: Tensor,
    max_pos: usize,
    head_dim: usize,
    theta: f32,
}

/// `inv_freq[i] = 1 / θ^(2i/d)` in f32, as HF `_compute_default_rope_parameters`.
fn inv_freq(i: usize, head_dim: usize, theta: f32) -> f32 {
    1.0 / theta.powf((2 * i) as f32 / head_dim as f32)
}

/// `(cos, sin)` of the f32 angle `pos · inv_freq[i]`, computed in f64 and rounded.
fn cos_sin(pos: usize, inv_freq: f32) -> (f32, f32) {
    let angle = (pos as f32 * inv_freq) as f64;
    (angle.cos() as f32, angle.sin() as f32)
}

/// The host values of a [`RopeTable`]: `[max_pos, head_dim]` row-major, cos then sin.
pub fn rope_table_ref(max_pos: usize, head_dim: usize, theta: f32) -> Vec<f32> {
    let half = head_dim / 2;
    let freqs: Vec<f32> = (0..half).map(|i| inv_freq(i, head_dim, theta)).collect();
    let mut data = vec![0.0; max_pos * head_dim];
    for (pos, row) in data.chunks_mut(head_dim).enumerate() {
        for (i, &f) in freqs.iter().enumerate() {
            (row[i], row[half + i]) = cos_sin(pos, f);
        }
    }
    data
}

impl RopeTable {
    /// Compute the table for positions `0..max_pos` and an even `head_dim` with base `theta`
    /// (10000 for Gemma) and upload it.
    pub fn new(gpu: &Gpu, max_pos: usize, head_dim: usize, theta: f32) -> Result<Self> {
        const K: &str = "rope";
        check(head_dim > 0 && head_dim.is_multiple_of(2), K, || {
            format!("head dimension {head_dim} must be even and positive")
        })?;
        check(max_pos > 0, K, || {
            "the table needs at least one position".into()
        })?;
        check(theta.is_finite() && theta > 0.0, K, || {
            format!("theta = {theta}")
        })?;
        let data = rope_table_ref(max_pos, head_dim, theta);
        let tensor = Tensor::from_f32(gpu, "rope_table", &[max_pos, head_dim], &data)?;
        Ok(RopeTable {
            tensor,
            max_pos,
            head_dim,
            theta,
        })
    }

    /// Number of positions covered (`0..max_pos`).
    pub fn max_pos(&self) -> usize {
        self.max_pos
    }

    /// The head dimension the table was computed for.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The frequency base θ.
    pub fn theta(&self) -> f32 {
        self.theta
    }

    /// The table tensor, f32 `[max_pos, head_dim]` (cos then sin in each row).
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    row0: u32,
    pos0: u32,
    heads: u32,
    head_dim: u32,
    half: u32,
    x_stride: u32,
    pad: u32,
}

/// Record the rotary embedding of rows `row0..row0 + rows` of `x` (f32
/// `[.., heads·head_dim]`, rotated in place), row `row0 + j` at position `pos0 + j`.
/// `table.head_dim()` is the head dimension; `pos0 + rows` must not exceed
/// `table.max_pos()`.
pub fn rope(
    rec: &mut Recorder,
    x: &Tensor,
    heads: usize,
    row0: usize,
    rows: usize,
    pos0: usize,
    table: &RopeTable,
) -> Result<()> {
    const K: &str = "rope";
    let d = table.head_dim();
    check(x.dtype() == DType::F32, K, || {
        format!("{} must be f32", x.name())
    })?;
    check(heads > 0 && x.cols() == heads * d, K, || {
        format!(
            "{} has {} columns, {heads} heads of {d} need {}",
            x.name(),
            x.cols(),
            heads * d
        )
    })?;
    check(rows > 0 && row0 + rows <= x.rows(), K, || {
        format!("rows {row0}..{} outside {}", row0 + rows, x.name())
    })?;
    check(pos0 + rows <= table.max_pos(), K, || {
        format!(
            "positions {pos0}..{} exceed the rope table's {} positions",
            pos0 + rows,
            table.max_pos()
        )
    })?;
    let params = Params {
        n: u32_arg(K, "rows", rows)?,
        row0: u32_arg(K, "row0", row0)?,
        pos0: u32_arg(K, "pos0", pos0)?,
        heads: u32_arg(K, "heads", heads)?,
        head_dim: u32_arg(K, "head_dim", d)?,
        half: u32_arg(K, "head_dim", d / 2)?,
        x_stride: u32_arg(K, "cols", x.cols())?,
        pad: 0,
    };
    let workgroups = rec.grid(params.n);
    let key = KernelKey::new("rope", "rope");
    rec.dispatch(
        &key,
        &params,
        &[table.tensor().buffer(), x.buffer()],
        workgroups,
    )?;
    Ok(())
}

/// Where [`rope_qkv`] reads and writes: `rows` positions from `pos0`, read from rows
/// `qkv_row0..` of the fused projection, written into the cache rows from `cache_row0` and, for
/// the rows from `q_from` on, into the query rows from `q_row0`.
#[derive(Debug, Clone, Copy)]
pub struct QkvRows {
    /// Positions to write.
    pub rows: usize,
    /// Position of the first row.
    pub pos0: usize,
    /// Row of the first position in the fused projection.
    pub qkv_row0: usize,
    /// Cache row of the first position.
    pub cache_row0: usize,
    /// The first of the `rows` whose query is needed (0: all of them).
    pub q_from: usize,
    /// Query row of position `pos0 + q_from`.
    pub q_row0: usize,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QkvParams {
    n: u32,
    q_from: u32,
    qkv_row0: u32,
    q_row0: u32,
    cache_row0: u32,
    pos0: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    half: u32,
    qkv_stride: u32,
    pad: u32,
}

/// Record, in one dispatch, what follows a decoder layer's fused q|k|v projection: `qkv` is
/// f32 `[.., (q_heads + 2·kv_heads)·head_dim]` (queries, keys, values); the keys rotated as
/// [`rope`] does go to `k_cache`, the values as they are to `v_cache` (both f32
/// `[.., kv_heads·head_dim]`), and the rotated queries to `q` (f32 `[.., q_heads·head_dim]`),
/// at the rows `at` gives.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv(
    rec: &mut Recorder,
    qkv: &Tensor,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    q_heads: usize,
    at: QkvRows,
    table: &RopeTable,
) -> Result<()> {
    const K: &str = "rope_qkv";
    let d = table.head_dim();
    let kvd = k_cache.cols();
    let kv_heads = kvd / d.max(1);
    let q_rows = at.rows.saturating_sub(at.q_from);
    check(
        q_heads > 0 && kv_heads > 0 && kvd == kv_heads * d && v_cache.cols() == kvd,
        K,
        || {
            format!(
                "caches of {kvd} and {} columns for heads of {d}",
                v_cache.cols()
            )
        },
    )?;
    check(qkv.cols() == q_heads * d + 2 * kvd, K, || {
        format!(
            "{} has {} columns, {q_heads} query and {kv_heads}+{kv_heads} key/value heads of \
             {d} need {}",
            qkv.name(),
            qkv.cols(),
            q_heads * d + 2 * kvd
        )
    })?;
    check(q.cols() == q_heads * d, K, || {
        format!("{} has {} columns, not {}", q.name(), q.cols(), q_heads * d)
    })?;
    let ranges = [
        (qkv, at.qkv_row0, at.rows),
        (q, at.q_row0, q_rows),
        (k_cache, at.cache_row0, at.rows),
        (v_cache, at.cache_row0, at.rows),
    ];
    for (i, (x, row0, rows)) in ranges.into_iter().enumerate() {
        check(x.dtype() == DType::F32, K, || {
            format!("{} must be f32", x.name())
        })?;
        // Only the queries may be empty (a block of a prefill's last layer before its last row).
        check((rows > 0 || i == 1) && row0 + rows <= x.rows(), K, || {
            format!("rows {row0}..{} outside {}", row0 + rows, x.name())
        })?;
    }
    check(at.pos0 + at.rows <= table.max_pos(), K, || {
        format!(
            "positions {}..{} exceed the rope table's {} positions",
            at.pos0,
            at.pos0 + at.rows,
            table.max_pos()
        )
    })?;
    let params = QkvParams {
        n: u32_arg(K, "rows", at.rows)?,
        q_from: u32_arg(K, "q_from", at.q_from)?,
        qkv_row0: u32_arg(K, "qkv_row0", at.qkv_row0)?,
        q_row0: u32_arg(K, "q_row0", at.q_row0)?,
        cache_row0: u32_arg(K, "cache_row0", at.cache_row0)?,
        pos0: u32_arg(K, "pos0", at.pos0)?,
        q_heads: u32_arg(K, "q heads", q_heads)?,
        kv_heads: u32_arg(K, "kv heads", kv_heads)?,
        head_dim: u32_arg(K, "head_dim", d)?,
        half: u32_arg(K, "head_dim", d / 2)?,
        qkv_stride: u32_arg(K, "qkv cols", qkv.cols())?,
        pad: 0,
    };
    let workgroups = rec.grid(params.n);
    let key = KernelKey::new("rope", "rope_qkv");
    let buffers = [
        table.tensor().buffer(),
        qkv.buffer(),
        q.buffer(),
        k_cache.buffer(),
        v_cache.buffer(),
    ];
    rec.dispatch(&key, &params, &buffers, workgroups)?;
    Ok(())
}

/// CPU reference of [`rope`] on a row-major slice of `cols`-wide rows: rotates the first
/// `heads·head_dim` columns of rows `row0..row0 + rows`, row `row0 + j` at position `pos0 + j`,
/// with the same f32 table values as [`RopeTable`].
#[allow(clippy::too_many_arguments)]
pub fn rope_ref(
    x: &mut [f32],
    cols: usize,
    heads: usize,
    head_dim: usize,
    row0: usize,
    rows: usize,
    pos0: usize,
    theta: f32,
) {
    let half = head_dim / 2;
    assert!(
        heads * head_dim <= cols,
        "{heads} heads of {head_dim} exceed {cols} columns"
    );
    let freqs: Vec<f32> = (0..half).map(|i| inv_freq(i, head_dim, theta)).collect();
    for j in 0..rows {
        let row = &mut x[(row0 + j) * cols..(row0 + j + 1) * cols];
        for head in row[..heads * head_dim].chunks_mut(head_dim) {
            for (i, &f) in freqs.iter().enumerate() {
                let (c, s) = cos_sin(pos0 + j, f);
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * c - x2 * s;
                head[i + half] = x2 * c + x1 * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, gpu_with_limit, rand_vec};

    /// (position, i, cos, sin) from HF `GemmaRotaryEmbedding` in torch f32 (theta 10000):
    /// `inv_freq = 1 / (theta ** (arange(0, d, 2).float() / d))`, `freqs = inv_freq ⊗ pos`,
    /// `emb.cos()`, `emb.sin()`. Torch's vectorised f32 `pow`, `cos` and `sin` are within an ulp
    /// or so of correctly rounded, so the tables agree to ~2.4e-7, not bit for bit (over all
    /// 8192 × 128 angles at d = 256, 94.5% of the values are identical).
    const TORCH_D256: &[(usize, usize, f32, f32)] = &[
        (0, 0, 1.0, 0.0),
        (0, 127, 1.0, 0.0),
        (1, 0, 0.54030234, 0.84147096),
        (1, 1, 0.59737533, 0.8019618),
        (1, 5, 0.766238, 0.6425569),
        (1, 64, 0.99995, 0.009999833),
        (1, 127, 1.0, 0.00010746078),
        (7, 0, 0.75390226, 0.6569866),
        (7, 5, 0.1715717, -0.9851716),
        (7, 127, 0.9999997, 0.0007522254),
        (1000, 1, 0.78962666, 0.6135876),
        (1000, 64, -0.8390715, -0.5440211),
        (1000, 127, 0.99423164, 0.10725408),
        (8191, 0, -0.6463905, -0.7630068),
        (8191, 1, 0.6883009, 0.7254253),
        (8191, 5, -0.19637291, -0.9805293),
        (8191, 64, 0.9739876, 0.22660154),
        (8191, 127, 0.63698834, 0.7708734),
    ];

    const TORCH_D64: &[(usize, usize, f32, f32)] = &[
        (3, 0, -0.9899925, 0.14112),
        (3, 13, 0.9974705, 0.07108121),
        (3, 31, 0.99999994, 0.00040005645),
        (517, 0, -0.20651172, 0.97844416),
        (517, 13, 0.9534348, -0.30159912),
        (517, 31, 0.99762434, 0.068888456),
    ];

    #[test]
    fn table_matches_torch() {
        for (d, max_pos, cases) in [(256, 8192, TORCH_D256), (64, 518, TORCH_D64)] {
            let table = rope_table_ref(max_pos, d, 10000.0);
            for &(pos, i, c, s) in cases {
                let (gc, gs) = (table[pos * d + i], table[pos * d + d / 2 + i]);
                let what = format!("d={d} pos={pos} i={i}: got ({gc}, {gs}), torch ({c}, {s})");
                assert!((gc - c).abs() <= 2e-7 && (gs - s).abs() <= 2e-7, "{what}");
            }
        }
        let gpu = gpu_with_limit(None);
        let t = RopeTable::new(&gpu, 518, 64, 10000.0).unwrap();
        assert_eq!((t.max_pos(), t.head_dim(), t.theta()), (518, 64, 10000.0));
        assert_eq!(
            t.tensor().read(&gpu).unwrap(),
            rope_table_ref(518, 64, 10000.0)
        );
    }

    fn run_case(xrows: usize, heads: usize, d: usize, row0: usize, rows: usize, pos0: usize) {
        let gpu = gpu_with_limit(None);
        let theta = 10000.0;
        let table = RopeTable::new(&gpu, pos0 + rows + 3, d, theta).unwrap();
        let cols = heads * d;
        let x = rand_vec(xrows * cols, 2.0, 91);
        let xt = Tensor::from_f32(&gpu, "q", &[xrows, cols], &x).unwrap();
        let mut rec = Recorder::new(&gpu);
        rope(&mut rec, &xt, heads, row0, rows, pos0, &table).unwrap();
        rec.run().unwrap();
        let mut want = x.clone();
        rope_ref(&mut want, cols, heads, d, row0, rows, pos0, theta);
        let what = format!("rope rows {row0}+{rows} of {xrows}, {heads}x{d}, pos0 {pos0}");
        assert_close(&xt.read(&gpu).unwrap(), &want, 1e-6, &what);
    }

    #[test]
    fn prefill_matches_reference() {
        run_case(5, 8, 256, 0, 5, 0);
        run_case(300, 3, 72, 0, 300, 0);
        run_case(37, 1, 18, 0, 37, 11);
    }

    #[test]
    fn kv_cache_rows_match_reference() {
        // Decode: one new row written at row == position in a cache-like buffer.
        run_case(64, 1, 256, 40, 1, 40);
        // Chunk of rows in the middle of a larger buffer, at a different position.
        run_case(50, 4, 64, 17, 9, 300);
        run_case(600, 2, 128, 256, 300, 1000);
    }

    /// The fused projection's queries and keys rotated and its values copied, in one
    /// dispatch, equal [`rope_ref`] and plain copies: a decode row written into a cache, a
    /// prefill, and a prefill's last layer (queries for the last rows only).
    #[test]
    fn fused_qkv_rows_match_reference() {
        let gpu = gpu_with_limit(None);
        let theta = 10000.0;
        // (qkv rows, q heads, kv heads, d, cache rows, q rows, at)
        let at = |rows, pos0, qkv_row0, cache_row0, q_from, q_row0| QkvRows {
            rows,
            pos0,
            qkv_row0,
            cache_row0,
            q_from,
            q_row0,
        };
        let cases = [
            (4, 8, 1, 256, 64, 4, at(1, 40, 2, 40, 0, 2)),
            (9, 4, 2, 64, 30, 9, at(9, 0, 0, 0, 0, 0)),
            (9, 3, 1, 72, 20, 9, at(9, 5, 0, 5, 6, 6)),
        ];
        for (rows, qh, kh, d, cache_rows, q_rows, at) in cases {
            let (qd, kvd) = (qh * d, kh * d);
            let w = qd + 2 * kvd;
            let table = RopeTable::new(&gpu, at.pos0 + at.rows + 2, d, theta).unwrap();
            let x = rand_vec(rows * w, 2.0, 5);
            let qkv = Tensor::from_f32(&gpu, "qkv", &[rows, w], &x).unwrap();
            let q = Tensor::zeros(&gpu, "q", &[q_rows, qd]).unwrap();
            let kc = Tensor::zeros(&gpu, "k", &[cache_rows, kvd]).unwrap();
            let vc = Tensor::zeros(&gpu, "v", &[cache_rows, kvd]).unwrap();
            let mut rec = Recorder::new(&gpu);
            rope_qkv(&mut rec, &qkv, &q, &kc, &vc, qh, at, &table).unwrap();
            assert_eq!(rec.len(), 1);
            rec.run().unwrap();
            let (mut wq, mut wk, mut wv) = (
                vec![0.0; q_rows * qd],
                vec![0.0; cache_rows * kvd],
                vec![0.0; cache_rows * kvd],
            );
            for r in 0..at.rows {
                let src = &x[(at.qkv_row0 + r) * w..(at.qkv_row0 + r + 1) * w];
                let c = at.cache_row0 + r;
                wk[c * kvd..(c + 1) * kvd].copy_from_slice(&src[qd..qd + kvd]);
                wv[c * kvd..(c + 1) * kvd].copy_from_slice(&src[qd + kvd..]);
                if r >= at.q_from {
                    let o = at.q_row0 + r - at.q_from;
                    wq[o * qd..(o + 1) * qd].copy_from_slice(&src[..qd]);
                }
            }
            let q_n = at.rows - at.q_from;
            rope_ref(
                &mut wq,
                qd,
                qh,
                d,
                at.q_row0,
                q_n,
                at.pos0 + at.q_from,
                theta,
            );
            rope_ref(&mut wk, kvd, kh, d, at.cache_row0, at.rows, at.pos0, theta);
            let what = format!("rope_qkv {at:?}");
            assert_close(&q.read(&gpu).unwrap(), &wq, 1e-6, &what);
            assert_close(&kc.read(&gpu).unwrap(), &wk, 1e-6, &what);
            assert_eq!(vc.read(&gpu).unwrap(), wv, "{what}");
        }
        let qkv = Tensor::zeros(&gpu, "qkv", &[4, 128]).unwrap();
        let q = Tensor::zeros(&gpu, "q", &[2, 64]).unwrap();
        let kc = Tensor::zeros(&gpu, "k", &[4, 32]).unwrap();
        let table = RopeTable::new(&gpu, 8, 32, theta).unwrap();
        let mut rec = Recorder::new(&gpu);
        let mut fail = |heads, at| {
            let r = rope_qkv(&mut rec, &qkv, &q, &kc, &kc, heads, at, &table);
            r.unwrap_err().to_string()
        };
        let e = fail(2, at(4, 0, 0, 0, 1, 0));
        assert!(e.contains("rows 0..3 outside q"), "{e}");
        let e = fail(2, at(4, 6, 0, 0, 3, 0));
        assert!(e.contains("exceed"), "{e}");
        let e = fail(1, at(1, 0, 0, 0, 0, 0));
        assert!(e.contains("columns"), "{e}");
        assert!(rec.is_empty());
    }

    #[test]
    fn rejects_bad_arguments() {
        let gpu = gpu_with_limit(None);
        assert!(RopeTable::new(&gpu, 10, 7, 10000.0).is_err());
        assert!(RopeTable::new(&gpu, 0, 8, 10000.0).is_err());
        assert!(RopeTable::new(&gpu, 10, 8, 0.0).is_err());
        let table = RopeTable::new(&gpu, 10, 8, 10000.0).unwrap();
        let x = Tensor::zeros(&gpu, "x", &[6, 16]).unwrap();
        let ids = Tensor::from_u32(&gpu, "ids", &[6, 16], &[0; 96]).unwrap();
        let mut rec = Recorder::new(&gpu);
        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert!(err(rope(&mut rec, &x, 3, 0, 1, 0, &table)).contains("columns"));
        assert!(err(rope(&mut rec, &x, 2, 3, 4, 0, &table)).contains("outside x"));
        assert!(err(rope(&mut rec, &x, 2, 0, 0, 0, &table)).contains("outside x"));
        assert!(err(rope(&mut rec, &x, 2, 0, 6, 5, &table)).contains("exceed"));
        assert!(err(rope(&mut rec, &ids, 2, 0, 1, 0, &table)).contains("f32"));
        assert!(rec.is_empty());
        rope(&mut rec, &x, 2, 0, 6, 4, &table).unwrap();
        assert_eq!(rec.len(), 1);
    }
}
