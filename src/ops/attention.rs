//! Scaled dot-product attention (`shaders/attention.wgsl`) with grouped/multi-query heads and a
//! prefix-LM mask, computed in one pass over the keys with an online softmax, so memory does
//! not grow with the square of the sequence length.
//!
//! For query row `r` (absolute position `pos = q_pos0 + r`) and head `h`, with kv head
//! `h / (heads / kv_heads)`: `out[r, h] = Σ_j softmax_j(scale · q[r, h] · k[j]) · v[j]` over
//! the keys `j < kv_len && (j < prefix_len || j <= pos)`. That one mask covers SigLIP
//! (`prefix_len = kv_len = T`, bidirectional), Gemma prefill (`q_pos0 = 0`, `prefix_len` the
//! prompt length: bidirectional over the prompt, causal after it) and decode (`q_rows = 1`,
//! `q_pos0` the position, `kv_len = q_pos0 + 1`). Gemma 2 adds a sliding window for queries
//! past the prefix and a tanh soft-cap on the scores.

use super::rope::RopeTable;
use super::{check, u32_arg};
use crate::gpu::{DType, Gpu, KernelKey, Recorder, Tensor};
use crate::Result;

/// Largest supported head dimension (the shader's query buffers).
pub const MAX_HEAD_DIM: usize = 256;

/// The shader's two entry points (same math, same parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// `attention`: 64 threads cooperate on 4 query vectors (GPUs).
    Workgroup,
    /// `attention_lanes`: four query vectors per thread, 32 threads a workgroup, K/V loads
    /// uniform across the workgroup (CPU drivers: about 6x faster on lavapipe). Any head_dim:
    /// unlike [`super::Kernels::Lanes`] it has no width condition.
    Lanes,
}

impl Kernel {
    fn for_gpu(gpu: &Gpu) -> Self {
        if gpu.info.device_type == wgpu::DeviceType::Cpu {
            Kernel::Lanes
        } else {
            Kernel::Workgroup
        }
    }

    fn entry(self) -> &'static str {
        match self {
            Kernel::Workgroup => "attention",
            Kernel::Lanes => "attention_lanes",
        }
    }

    /// Query vectors per workgroup (the shader's `NQ` and `LQ`).
    fn queries_per_workgroup(self) -> usize {
        match self {
            Kernel::Workgroup => 4,
            Kernel::Lanes => 128,
        }
    }
}

/// Shape and mask of an [`attention`] launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnOpts {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; `heads % kv_heads == 0` (query head `h` uses kv head
    /// `h / (heads / kv_heads)`; multi-query attention has `kv_heads = 1`).
    pub kv_heads: usize,
    /// Dimension of one head, `1..=256`.
    pub head_dim: usize,
    /// Score scale, usually `head_dim^-0.5`.
    pub scale: f32,
    /// Number of query rows computed (rows `q_row0..q_row0 + q_rows` of `q` and `out`).
    pub q_rows: usize,
    /// First row of `q` and `out` (a decode batch holds one row per sequence).
    pub q_row0: usize,
    /// Absolute position of query row 0; `q_pos0 + q_rows <= kv_len` (every query sees itself).
    pub q_pos0: usize,
    /// Keys/values `0..kv_len` are valid; later rows of `k` and `v` are never read.
    pub kv_len: usize,
    /// Prefix-LM mask: a query at position `p` may attend key `j` iff
    /// `j < kv_len && (j < prefix_len || j <= p)`; `prefix_len <= kv_len`.
    pub prefix_len: usize,
    /// Sliding window (0: none): a query past the prefix (`p >= prefix_len`) sees only keys
    /// `j > p - window`, as Gemma 2's local layers; prefix queries keep the whole prefix.
    pub window: usize,
    /// Logit soft-cap (0: none): scores become `softcap · tanh(score / softcap)` before the
    /// softmax (Gemma 2: 50).
    pub softcap: f32,
}

impl AttnOpts {
    /// Number of keys visible to query row `row` (keys `first_key(row)..n`).
    fn keys_for(&self, row: usize) -> usize {
        self.kv_len.min(self.prefix_len.max(self.q_pos0 + row + 1))
    }

    /// First key visible to query row `row` (non-zero only inside a sliding window).
    fn first_key(&self, row: usize) -> usize {
        let pos = self.q_pos0 + row;
        if self.window > 0 && pos >= self.prefix_len {
            (pos + 1).saturating_sub(self.window)
        } else {
            0
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    group: u32,
    q_rows: u32,
    q_pos0: u32,
    kv_len: u32,
    prefix_len: u32,
    q_stride: u32,
    kv_stride: u32,
    chunks: u32,
    count: u32,
    scale: f32,
    window: u32,
    softcap: f32,
    q_row0: u32,
    fused: u32,
    out_stride: u32,
    qkv_row: u32,
    pad: u32,
}

/// Where an attention launch reads its queries.
#[derive(Debug, Clone, Copy)]
enum Queries<'a> {
    /// Rotated queries, f32 `[rows, heads·head_dim]`.
    Plain(&'a Tensor),
    /// A decode step's fused projection row (queries, keys, values, not rotated yet): the
    /// kernel rotates the query and the new key with `table` and writes the new key and
    /// value into the cache.
    Fused {
        qkv: &'a Tensor,
        row: usize,
        table: &'a RopeTable,
    },
}

/// Record `out[r] = attention(q[r], k[..kv_len], v[..kv_len])` for rows `0..q_rows`.
/// `q` and `out` are f32 `[rows, heads * head_dim]`, `k` and `v` f32
/// `[max_rows, kv_heads * head_dim]` (head `h` at columns `h * head_dim..`); `out` must be a
/// different buffer from the inputs.
pub fn attention(
    rec: &mut Recorder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    opts: &AttnOpts,
) -> Result<()> {
    let kernel = Kernel::for_gpu(rec.gpu());
    attention_with(rec, Queries::Plain(q), k, v, out, opts, kernel)
}

/// A decode step's attention with RoPE and the cache update fused in (one launch instead of
/// `rope_qkv` then [`attention`]): the query row is row `qkv_row` of a decoder layer's fused
/// projection `qkv` (f32 `[.., (heads + 2·kv_heads)·head_dim]`: queries, keys, values, not
/// rotated), at position `opts.q_pos0 = opts.kv_len - 1`, past the prompt. The kernel rotates
/// the query and the new key with `table`, attends over the cached keys `0..kv_len - 1` and
/// the new one, writes the result into row `opts.q_row0` of `out`, and writes the rotated key
/// and the value into row `kv_len - 1` of `k` and `v`. `opts.q_rows` must be 1.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    rec: &mut Recorder,
    qkv: &Tensor,
    qkv_row: usize,
    table: &RopeTable,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    opts: &AttnOpts,
) -> Result<()> {
    let kernel = Kernel::for_gpu(rec.gpu());
    let q = Queries::Fused {
        qkv,
        row: qkv_row,
        table,
    };
    attention_with(rec, q, k, v, out, opts, kernel)
}

fn attention_with(
    rec: &mut Recorder,
    queries: Queries,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    opts: &AttnOpts,
    kernel: Kernel,
) -> Result<()> {
    const K: &str = "attention";
    let o = opts;
    let (q, q_width, table) = match queries {
        Queries::Plain(q) => (q, o.heads * o.head_dim, q),
        Queries::Fused { qkv, row, table } => {
            let width = (o.heads + 2 * o.kv_heads) * o.head_dim;
            check(o.q_rows == 1 && o.kv_len >= 2, K, || {
                format!(
                    "a fused decode step needs one query row and a cached key, got {} rows and kv_len {}",
                    o.q_rows, o.kv_len
                )
            })?;
            check(
                o.q_pos0 + 1 == o.kv_len && o.prefix_len <= o.q_pos0,
                K,
                || {
                    format!(
                        "a fused decode step's query is the new key past the prompt: position {}, kv_len {}, prompt {}",
                        o.q_pos0, o.kv_len, o.prefix_len
                    )
                },
            )?;
            check(
                table.head_dim() == o.head_dim && o.q_pos0 < table.max_pos(),
                K,
                || {
                    format!(
                        "rope table of head_dim {} for {} positions, needs head_dim {} and position {}",
                        table.head_dim(),
                        table.max_pos(),
                        o.head_dim,
                        o.q_pos0
                    )
                },
            )?;
            check(row < qkv.rows(), K, || {
                format!("projection row {row} outside {}", qkv.name())
            })?;
            (qkv, width, table.tensor())
        }
    };
    let fused = matches!(queries, Queries::Fused { .. });
    check(o.heads > 0 && o.kv_heads > 0, K, || {
        format!(
            "heads = {} and kv_heads = {} must be positive",
            o.heads, o.kv_heads
        )
    })?;
    check(o.heads.is_multiple_of(o.kv_heads), K, || {
        format!(
            "heads = {} is not a multiple of kv_heads = {}",
            o.heads, o.kv_heads
        )
    })?;
    check((1..=MAX_HEAD_DIM).contains(&o.head_dim), K, || {
        format!("head_dim = {} outside 1..={MAX_HEAD_DIM}", o.head_dim)
    })?;
    check(o.scale.is_finite(), K, || {
        format!("scale = {} is not finite", o.scale)
    })?;
    check(o.softcap.is_finite() && o.softcap >= 0.0, K, || {
        format!("softcap = {} must be finite and >= 0", o.softcap)
    })?;
    for t in [q, k, v, out] {
        check(t.dtype() == DType::F32 && t.chunks().len() == 1, K, || {
            format!("{} must be a single-buffer f32 tensor", t.name())
        })?;
    }
    let out_width = o.heads * o.head_dim;
    let kv_width = o.kv_heads * o.head_dim;
    for (t, want) in [(q, q_width), (out, out_width), (k, kv_width), (v, kv_width)] {
        check(t.cols() == want, K, || {
            format!(
                "{} has {} columns, expected {want} ({} heads x head_dim {})",
                t.name(),
                t.cols(),
                if want == kv_width {
                    o.kv_heads
                } else {
                    o.heads
                },
                o.head_dim
            )
        })?;
    }
    check(o.q_rows > 0, K, || "q_rows = 0".into())?;
    let query_rows: &[&Tensor] = if fused { &[out] } else { &[q, out] };
    for &t in query_rows {
        check(o.q_row0 + o.q_rows <= t.rows(), K, || {
            format!(
                "query rows {}..{} but {} has {} rows",
                o.q_row0,
                o.q_row0 + o.q_rows,
                t.name(),
                t.rows()
            )
        })?;
    }
    check(o.kv_len > 0, K, || "kv_len = 0".into())?;
    for t in [k, v] {
        check(o.kv_len <= t.rows(), K, || {
            format!(
                "kv_len = {} but {} has {} rows",
                o.kv_len,
                t.name(),
                t.rows()
            )
        })?;
    }
    check(o.q_pos0 + o.q_rows <= o.kv_len, K, || {
        format!(
            "query positions {}..{} reach past kv_len = {}",
            o.q_pos0,
            o.q_pos0 + o.q_rows,
            o.kv_len
        )
    })?;
    check(o.prefix_len <= o.kv_len, K, || {
        format!(
            "prefix_len = {} exceeds kv_len = {}",
            o.prefix_len, o.kv_len
        )
    })?;
    for t in [q, k, v] {
        check(t.buffer() != out.buffer(), K, || {
            format!("out {} aliases input {}", out.name(), t.name())
        })?;
    }
    if fused {
        check(
            k.buffer() != q.buffer() && v.buffer() != q.buffer(),
            K,
            || format!("the cache aliases the projection {}", q.name()),
        )?;
    }
    // Fused, the kernel walks the cached keys and adds the new one itself.
    let kv_len = o.kv_len - fused as usize;
    for t in [q, k, v, out] {
        u32_arg(K, t.name(), t.numel())?;
    }

    let group = o.heads / o.kv_heads;
    let chunks = (o.q_rows * group).div_ceil(kernel.queries_per_workgroup());
    let count = u32_arg(K, "workgroups", chunks * o.kv_heads)?;
    let params = Params {
        heads: u32_arg(K, "heads", o.heads)?,
        kv_heads: u32_arg(K, "kv_heads", o.kv_heads)?,
        head_dim: u32_arg(K, "head_dim", o.head_dim)?,
        group: u32_arg(K, "group", group)?,
        q_rows: u32_arg(K, "q_rows", o.q_rows)?,
        q_pos0: u32_arg(K, "q_pos0", o.q_pos0)?,
        kv_len: u32_arg(K, "kv_len", kv_len)?,
        prefix_len: u32_arg(K, "prefix_len", o.prefix_len)?,
        q_stride: u32_arg(K, "q stride", q_width)?,
        kv_stride: u32_arg(K, "kv stride", kv_width)?,
        chunks: u32_arg(K, "chunks", chunks)?,
        count,
        scale: o.scale,
        window: u32_arg(K, "window", o.window)?,
        softcap: o.softcap,
        q_row0: u32_arg(K, "q_row0", o.q_row0)?,
        fused: fused as u32,
        out_stride: u32_arg(K, "out stride", out_width)?,
        qkv_row: match queries {
            Queries::Fused { row, .. } => u32_arg(K, "projection row", row)?,
            Queries::Plain(_) => 0,
        },
        pad: 0,
    };
    let key = KernelKey::new("attention", kernel.entry());
    let grid = rec.grid(count);
    let buffers = [
        q.buffer(),
        k.buffer(),
        v.buffer(),
        out.buffer(),
        table.buffer(),
    ];
    rec.dispatch(&key, &params, &buffers, grid)?;
    Ok(())
}

/// CPU reference of [`attention`] on row-major slices with the layouts of [`attention`]
/// (`k` and `v` need only `kv_len` rows). Writes rows `0..q_rows` of `out`.
pub fn attention_ref(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], opts: &AttnOpts) {
    let o = opts;
    let (hd, group) = (o.head_dim, o.heads / o.kv_heads);
    let (qs, kvs) = (o.heads * hd, o.kv_heads * hd);
    let mut scores = Vec::new();
    for r in 0..o.q_rows {
        let (lo, n) = (o.first_key(r), o.keys_for(r));
        for h in 0..o.heads {
            let qo = (o.q_row0 + r) * qs + h * hd;
            let ko = (h / group) * hd;
            let qv = &q[qo..qo + hd];
            scores.clear();
            scores.extend((lo..n).map(|j| {
                let kr = &k[j * kvs + ko..j * kvs + ko + hd];
                let s = o.scale * qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>();
                if o.softcap > 0.0 {
                    o.softcap * (s / o.softcap).tanh()
                } else {
                    s
                }
            }));
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in &mut scores {
                *s = (*s - max).exp();
                sum += *s;
            }
            let dst = &mut out[qo..qo + hd];
            dst.fill(0.0);
            for (j, pj) in (lo..n).zip(&scores) {
                let vr = &v[j * kvs + ko..j * kvs + ko + hd];
                for (d, x) in dst.iter_mut().zip(vr) {
                    *d += pj * x;
                }
            }
            for d in dst {
                *d /= sum;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, gpu_with_limit, rand_vec};

    struct Case {
        opts: AttnOpts,
        /// Rows of the k/v buffers (>= kv_len); rows past kv_len are filled with `garbage`.
        kv_rows: usize,
        garbage: f32,
        /// Magnitude of q and k entries.
        qk_scale: f32,
    }

    fn full(t: usize, heads: usize, kv_heads: usize, head_dim: usize) -> Case {
        Case {
            opts: AttnOpts {
                heads,
                kv_heads,
                head_dim,
                scale: (head_dim as f32).powf(-0.5),
                q_rows: t,
                q_pos0: 0,
                kv_len: t,
                prefix_len: t,
                window: 0,
                softcap: 0.0,
                q_row0: 0,
            },
            kv_rows: t,
            garbage: 0.0,
            qk_scale: 1.0,
        }
    }

    /// Run `case` with both kernels and the reference; check and return the GPU outputs.
    fn run_case(case: &Case, what: &str) -> Vec<Vec<f32>> {
        let gpu = gpu_with_limit(None);
        let o = &case.opts;
        let (qw, kvw) = (o.heads * o.head_dim, o.kv_heads * o.head_dim);
        // Rows before q_row0 belong to other sequences of a batch: zero queries, NaN outputs
        // that must stay untouched.
        let rows = o.q_row0 + o.q_rows;
        let mut q = vec![0.0; o.q_row0 * qw];
        q.extend(rand_vec(o.q_rows * qw, case.qk_scale, 11));
        let mut k = rand_vec(case.kv_rows * kvw, case.qk_scale, 12);
        let mut v = rand_vec(case.kv_rows * kvw, 1.0, 13);
        k[o.kv_len * kvw..].fill(case.garbage);
        v[o.kv_len * kvw..].fill(case.garbage);
        let mut want = vec![f32::NAN; rows * qw];
        attention_ref(&q, &k[..o.kv_len * kvw], &v[..o.kv_len * kvw], &mut want, o);
        let mine = o.q_row0 * qw..;
        assert!(
            want[mine.clone()].iter().all(|x| x.is_finite()),
            "{what}: reference not finite"
        );
        let qt = Tensor::from_f32(&gpu, "q", &[rows, qw], &q).unwrap();
        let kt = Tensor::from_f32(&gpu, "k", &[case.kv_rows, kvw], &k).unwrap();
        let vt = Tensor::from_f32(&gpu, "v", &[case.kv_rows, kvw], &v).unwrap();
        [Kernel::Workgroup, Kernel::Lanes]
            .into_iter()
            .map(|kernel| {
                let nan = vec![f32::NAN; rows * qw];
                let ot = Tensor::from_f32(&gpu, "out", &[rows, qw], &nan).unwrap();
                let mut rec = Recorder::new(&gpu);
                attention_with(&mut rec, Queries::Plain(&qt), &kt, &vt, &ot, o, kernel).unwrap();
                rec.run().unwrap();
                let got = ot.read(&gpu).unwrap();
                assert!(
                    got[..o.q_row0 * qw].iter().all(|x| x.is_nan()),
                    "{what}: rows before q_row0 written"
                );
                assert_close(
                    &got[mine.clone()],
                    &want[mine.clone()],
                    1e-4,
                    &format!("{what} ({kernel:?})"),
                );
                got
            })
            .collect()
    }

    /// The mask exactly as specified, with f64 softmax: checks [`attention_ref`] itself.
    fn naive(q: &[f32], k: &[f32], v: &[f32], o: &AttnOpts) -> Vec<f32> {
        let (hd, group) = (o.head_dim, o.heads / o.kv_heads);
        let (qs, kvs) = (o.heads * hd, o.kv_heads * hd);
        let mut out = vec![0.0; o.q_rows * qs];
        for r in 0..o.q_rows {
            let pos = o.q_pos0 + r;
            for h in 0..o.heads {
                let (qo, ko) = (r * qs + h * hd, (h / group) * hd);
                let s: Vec<f64> = (0..k.len() / kvs)
                    .map(|j| {
                        let in_window = o.window == 0 || pos < o.prefix_len || j + o.window > pos;
                        if j < o.kv_len && (j < o.prefix_len || j <= pos) && in_window {
                            let dot: f64 = (0..hd)
                                .map(|d| q[qo + d] as f64 * k[j * kvs + ko + d] as f64)
                                .sum();
                            let s = dot * o.scale as f64;
                            if o.softcap > 0.0 {
                                o.softcap as f64 * (s / o.softcap as f64).tanh()
                            } else {
                                s
                            }
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let acc: f64 = (0..e.len())
                        .filter(|&j| e[j] > 0.0)
                        .map(|j| e[j] * v[j * kvs + ko + d] as f64)
                        .sum();
                    out[qo + d] = (acc / sum) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn reference_applies_the_specified_mask() {
        for (q_rows, q_pos0, kv_len, prefix_len) in [
            (20, 0, 20, 20),
            (20, 0, 20, 7),
            (1, 15, 16, 9),
            (3, 10, 13, 12),
            (4, 0, 20, 0),
        ] {
            let o = AttnOpts {
                heads: 4,
                kv_heads: 2,
                head_dim: 8,
                scale: 0.5,
                q_rows,
                q_pos0,
                kv_len,
                prefix_len,
                window: 0,
                softcap: 0.0,
                q_row0: 0,
            };
            let q = rand_vec(q_rows * 32, 2.0, 1);
            let k = rand_vec(24 * 16, 2.0, 2);
            let v = rand_vec(24 * 16, 1.0, 3);
            let mut got = vec![0.0; q_rows * 32];
            attention_ref(&q, &k, &v, &mut got, &o);
            assert_close(&got, &naive(&q, &k, &v, &o), 1e-5, &format!("{o:?}"));
        }
    }

    #[test]
    fn reference_applies_window_and_softcap() {
        for (q_rows, q_pos0, kv_len, prefix_len, window) in [
            (20, 0, 20, 7, 4),
            (1, 15, 16, 9, 3),
            (3, 10, 13, 12, 2),
            (5, 0, 20, 0, 1),
        ] {
            let o = AttnOpts {
                heads: 2,
                kv_heads: 1,
                head_dim: 8,
                scale: 0.7,
                q_rows,
                q_pos0,
                kv_len,
                prefix_len,
                window,
                softcap: 3.0,
                q_row0: 0,
            };
            let q = rand_vec(q_rows * 16, 3.0, 4);
            let k = rand_vec(24 * 8, 3.0, 5);
            let v = rand_vec(24 * 8, 1.0, 6);
            let mut got = vec![0.0; q_rows * 16];
            attention_ref(&q, &k, &v, &mut got, &o);
            assert_close(&got, &naive(&q, &k, &v, &o), 1e-5, &format!("{o:?}"));
        }
    }

    #[test]
    fn sliding_window_and_softcap_match_reference() {
        // Gemma 2 local layers: prefix bidirectional, then causal within a window of 8.
        let mut case = full(60, 4, 2, 16);
        case.opts.prefix_len = 20;
        case.opts.window = 8;
        case.opts.softcap = 5.0;
        case.qk_scale = 3.0;
        run_case(&case, "prefill T=60 prefix=20 window=8 softcap=5");
        // MHA rows past 128 queries per chunk: windows start in different key blocks.
        let mut case = full(300, 1, 1, 8);
        case.opts.prefix_len = 10;
        case.opts.window = 40;
        run_case(&case, "prefill T=300 window=40");
        // Decode at position 99 with a window of 16 over a 128-row cache.
        let case = Case {
            opts: AttnOpts {
                heads: 8,
                kv_heads: 4,
                head_dim: 16,
                scale: 0.25,
                q_rows: 1,
                q_pos0: 99,
                kv_len: 100,
                prefix_len: 40,
                window: 16,
                softcap: 50.0,
                q_row0: 0,
            },
            kv_rows: 128,
            garbage: f32::NAN,
            qk_scale: 1.0,
        };
        run_case(&case, "decode pos=99 window=16");
    }

    #[test]
    fn query_row_offset_selects_a_batch_row() {
        // Decode of the second sequence of a batch: its query is row 1 of a 3-row buffer.
        let mut case = full(1, 4, 1, 16);
        case.opts.q_pos0 = 20;
        case.opts.kv_len = 21;
        case.opts.prefix_len = 15;
        case.kv_rows = 32;
        case.garbage = f32::NAN;
        let plain = run_case(&case, "row 0");
        case.opts.q_row0 = 2;
        let shifted = run_case(&case, "row 2 of 3");
        for (a, b) in plain.iter().zip(&shifted) {
            assert_eq!(a[..], b[2 * 64..]);
        }
    }

    #[test]
    fn bidirectional_matches_reference() {
        run_case(&full(37, 4, 4, 12), "T=37 h=4 d=12");
        run_case(&full(200, 16, 16, 72), "T=200 h=16 d=72 (SigLIP-like)");
        run_case(&full(130, 8, 1, 256), "T=130 h=8 kv=1 d=256 (MQA)");
        run_case(&full(5, 3, 3, 7), "T=5 h=3 d=7");
    }

    #[test]
    fn grouped_query_matches_reference() {
        run_case(&full(45, 4, 2, 24), "GQA T=45 h=4 kv=2 d=24");
        run_case(&full(3, 6, 2, 32), "GQA T=3 h=6 kv=2 d=32 (partial chunk)");
    }

    #[test]
    fn prefix_lm_prefill_matches_reference() {
        let mut case = full(50, 4, 1, 16);
        case.opts.prefix_len = 30;
        run_case(&case, "prefill T=50 prefix=30");
        let mut case = full(130, 2, 2, 20);
        case.opts.prefix_len = 70;
        run_case(&case, "prefill T=130 prefix=70");
    }

    #[test]
    fn decode_ignores_rows_past_kv_len() {
        for garbage in [1e30, f32::NAN, f32::INFINITY] {
            let case = Case {
                opts: AttnOpts {
                    heads: 8,
                    kv_heads: 1,
                    head_dim: 32,
                    scale: 32f32.powf(-0.5),
                    q_rows: 1,
                    q_pos0: 40,
                    kv_len: 41,
                    prefix_len: 30,
                    window: 0,
                    softcap: 0.0,
                    q_row0: 0,
                },
                kv_rows: 64,
                garbage,
                qk_scale: 1.0,
            };
            run_case(&case, &format!("decode garbage {garbage}"));
        }
        // Decode at a position inside the prefix's second key block, MHA.
        let mut case = full(1, 4, 4, 12);
        case.opts.q_pos0 = 99;
        case.opts.kv_len = 100;
        case.opts.prefix_len = 20;
        case.kv_rows = 128;
        case.garbage = 1e30;
        run_case(&case, "decode pos 99");
    }

    #[test]
    fn large_scores_stay_finite() {
        // Entries up to 6 over 12 dims, scale 1: scores spread ~±40 and reach past ±100, where
        // exp overflows f32 without the max subtraction.
        let mut case = full(37, 2, 2, 12);
        case.opts.scale = 1.0;
        case.qk_scale = 6.0;
        let q = rand_vec(37 * 24, 6.0, 11);
        let k = rand_vec(37 * 24, 6.0, 12);
        let top = (0..37 * 2)
            .flat_map(|a| (0..37).map(move |r| (a, r * 2 + a % 2)))
            .map(|(a, b)| {
                (0..12)
                    .map(|d| q[a * 12 + d] * k[b * 12 + d])
                    .sum::<f32>()
                    .abs()
            })
            .fold(0.0f32, f32::max);
        assert!(top > 100.0, "largest score {top}");
        for got in run_case(&case, "large scores") {
            assert!(got.iter().all(|x| x.is_finite()));
        }
        let mut case = full(100, 2, 1, 64);
        case.opts.scale = 0.125;
        case.qk_scale = 6.0;
        case.opts.prefix_len = 10;
        run_case(&case, "large scores causal");
    }

    /// Rotate the head vectors of one row (`heads` heads of `hd`) to `pos` on the host.
    fn rotate(x: &[f32], hd: usize, pos: usize, table: &[f32]) -> Vec<f32> {
        let half = hd / 2;
        let (c, s) = table[pos * hd..(pos + 1) * hd].split_at(half);
        let mut out = x.to_vec();
        for (head, o) in x.chunks(hd).zip(out.chunks_mut(hd)) {
            for i in 0..half {
                let (x1, x2) = (head[i], head[i + half]);
                o[i] = x1 * c[i] - x2 * s[i];
                o[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
        out
    }

    /// [`attention_decode`] with both kernels: projection row `row` of `rows` (query, key and
    /// value heads, not rotated) at position `pos` over `pos` cached keys, against the host's
    /// rotation, then [`attention_ref`] over the cache plus the new key; the new key and
    /// value must land in cache row `pos`, the rows after it untouched.
    fn decode_case(mut o: AttnOpts, rows: usize, row: usize, what: &str) {
        let gpu = gpu_with_limit(None);
        let hd = o.head_dim;
        let (qw, kvw) = (o.heads * hd, o.kv_heads * hd);
        let width = qw + 2 * kvw;
        let pos = o.q_pos0;
        let cap = pos + 3;
        o.q_rows = 1;
        o.q_row0 = row;
        o.kv_len = pos + 1;
        let qkv = rand_vec(rows * width, 1.0, 41);
        let mut k = rand_vec(cap * kvw, 1.0, 42);
        let mut v = rand_vec(cap * kvw, 1.0, 43);
        k[pos * kvw..].fill(f32::NAN);
        v[pos * kvw..].fill(f32::NAN);
        let table = RopeTable::new(&gpu, cap, hd, 10_000.0).unwrap();
        let host_table = super::super::rope::rope_table_ref(cap, hd, 10_000.0);
        let r = &qkv[row * width..(row + 1) * width];
        let q_rot = rotate(&r[..qw], hd, pos, &host_table);
        let k_new = rotate(&r[qw..qw + kvw], hd, pos, &host_table);
        let mut k_all = k[..pos * kvw].to_vec();
        k_all.extend(&k_new);
        let mut v_all = v[..pos * kvw].to_vec();
        v_all.extend(&r[qw + kvw..]);
        let mut q = vec![0.0; rows * qw];
        q[row * qw..(row + 1) * qw].copy_from_slice(&q_rot);
        let mut want = vec![f32::NAN; rows * qw];
        attention_ref(&q, &k_all, &v_all, &mut want, &o);
        let mine = row * qw..(row + 1) * qw;
        let qkvt = Tensor::from_f32(&gpu, "qkv", &[rows, width], &qkv).unwrap();
        for kernel in [Kernel::Workgroup, Kernel::Lanes] {
            let kt = Tensor::from_f32(&gpu, "k", &[cap, kvw], &k).unwrap();
            let vt = Tensor::from_f32(&gpu, "v", &[cap, kvw], &v).unwrap();
            let ot =
                Tensor::from_f32(&gpu, "out", &[rows, qw], &vec![f32::NAN; rows * qw]).unwrap();
            let mut rec = Recorder::new(&gpu);
            let fused = Queries::Fused {
                qkv: &qkvt,
                row,
                table: &table,
            };
            attention_with(&mut rec, fused, &kt, &vt, &ot, &o, kernel).unwrap();
            rec.run().unwrap();
            let got = ot.read(&gpu).unwrap();
            let what = format!("{what} ({kernel:?})");
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(i, x)| mine.contains(&i) || x.is_nan()),
                "{what}: other rows written"
            );
            assert_close(&got[mine.clone()], &want[mine.clone()], 1e-4, &what);
            let (kc, vc) = (kt.read(&gpu).unwrap(), vt.read(&gpu).unwrap());
            assert_close(
                &kc[..(pos + 1) * kvw],
                &k_all,
                1e-6,
                &format!("{what}: keys"),
            );
            assert_close(
                &vc[..(pos + 1) * kvw],
                &v_all,
                0.0,
                &format!("{what}: values"),
            );
            assert!(
                kc[(pos + 1) * kvw..].iter().all(|x| x.is_nan()),
                "{what}: later rows"
            );
        }
    }

    #[test]
    fn fused_decode_matches_rope_then_attention() {
        let base = |heads, kv_heads, head_dim| AttnOpts {
            heads,
            kv_heads,
            head_dim,
            scale: (head_dim as f32).powf(-0.5),
            q_rows: 1,
            q_row0: 0,
            q_pos0: 0,
            kv_len: 0,
            prefix_len: 0,
            window: 0,
            softcap: 0.0,
        };
        // Gemma-2B's MQA (8 heads of 256 over 1 KV head), 70 keys past a 60-token prompt.
        let mqa = AttnOpts {
            q_pos0: 70,
            prefix_len: 60,
            ..base(8, 1, 256)
        };
        decode_case(mqa, 1, 0, "mqa 8x256");
        // A batch row of a GQA model with a short head, and one cached key only.
        let gqa = AttnOpts {
            q_pos0: 9,
            prefix_len: 5,
            ..base(4, 2, 16)
        };
        decode_case(gqa, 3, 2, "gqa row 2");
        decode_case(
            AttnOpts {
                q_pos0: 1,
                prefix_len: 1,
                ..gqa
            },
            1,
            0,
            "one cached key",
        );
        // Gemma 2: sliding window and soft-cap; the window of 1 leaves the new key alone.
        let local = AttnOpts {
            q_pos0: 40,
            prefix_len: 20,
            window: 8,
            softcap: 50.0,
            ..base(8, 4, 32)
        };
        decode_case(local, 2, 1, "window 8, softcap");
        decode_case(AttnOpts { window: 1, ..local }, 1, 0, "window 1");
    }

    #[test]
    fn fused_decode_rejects_prompt_queries() {
        let gpu = gpu_with_limit(None);
        let qkv = Tensor::zeros(&gpu, "qkv", &[1, 48]).unwrap();
        let k = Tensor::zeros(&gpu, "k", &[8, 16]).unwrap();
        let v = Tensor::zeros(&gpu, "v", &[8, 16]).unwrap();
        let out = Tensor::zeros(&gpu, "out", &[1, 16]).unwrap();
        let table = RopeTable::new(&gpu, 8, 16, 10_000.0).unwrap();
        let o = AttnOpts {
            heads: 1,
            kv_heads: 1,
            head_dim: 16,
            scale: 0.25,
            q_rows: 1,
            q_row0: 0,
            q_pos0: 3,
            kv_len: 4,
            prefix_len: 4,
            window: 0,
            softcap: 0.0,
        };
        let mut rec = Recorder::new(&gpu);
        let err = attention_decode(&mut rec, &qkv, 0, &table, &k, &v, &out, &o).unwrap_err();
        assert!(err.to_string().contains("past the prompt"), "{err}");
        let o = AttnOpts {
            prefix_len: 2,
            kv_len: 9,
            q_pos0: 8,
            ..o
        };
        let err = attention_decode(&mut rec, &qkv, 0, &table, &k, &v, &out, &o).unwrap_err();
        assert!(err.to_string().contains("rope table"), "{err}");
    }

    #[test]
    fn rejects_bad_arguments() {
        let gpu = gpu_with_limit(None);
        let t = |name: &str, rows: usize, cols: usize| {
            Tensor::zeros(&gpu, name, &[rows, cols]).unwrap()
        };
        let base = full(8, 4, 2, 16).opts;
        let (q, kv, o) = (t("q", 8, 64), t("k", 8, 32), t("o", 8, 64));
        let err = |opts: AttnOpts, k: &Tensor, out: &Tensor| {
            let mut rec = Recorder::new(&gpu);
            attention(&mut rec, &q, k, &kv, out, &opts)
                .unwrap_err()
                .to_string()
        };
        let e = err(
            AttnOpts {
                heads: 4,
                kv_heads: 3,
                ..base
            },
            &kv,
            &o,
        );
        assert!(e.contains("not a multiple of kv_heads"), "{e}");
        let e = err(
            AttnOpts {
                head_dim: 300,
                heads: 1,
                kv_heads: 1,
                ..base
            },
            &kv,
            &o,
        );
        assert!(e.contains("head_dim = 300"), "{e}");
        let e = err(base, &t("k", 8, 24), &o);
        assert!(e.contains("k has 24 columns, expected 32"), "{e}");
        let e = err(base, &kv, &t("o", 8, 60));
        assert!(e.contains("expected 64"), "{e}");
        let e = err(
            AttnOpts {
                kv_len: 9,
                prefix_len: 9,
                window: 0,
                softcap: 0.0,
                q_row0: 0,
                ..base
            },
            &kv,
            &o,
        );
        assert!(e.contains("kv_len = 9"), "{e}");
        let e = err(AttnOpts { q_pos0: 3, ..base }, &kv, &o);
        assert!(e.contains("reach past kv_len"), "{e}");
        let e = err(
            AttnOpts {
                prefix_len: 9,
                window: 0,
                softcap: 0.0,
                q_row0: 0,
                ..base
            },
            &kv,
            &o,
        );
        assert!(e.contains("prefix_len"), "{e}");
        let e = err(base, &kv, &q);
        assert!(e.contains("aliases"), "{e}");
    }
}
