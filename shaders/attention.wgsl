// Scaled dot-product attention with a prefix-LM mask, one pass over the keys with an online
// (flash-attention style) softmax: memory does not grow with the sequence length squared.
//
// For query row r (absolute position pos = q_pos0 + r) and query head h, with kv head
// kh = h / group (group = heads / kv_heads: MHA group 1, GQA, MQA kv_heads 1):
//   s_j    = scale * q[r, h] · k[j, kh]            for j < n(pos)
//   out[r, h] = Σ_j softmax(s)_j · v[j, kh]
// where key j is visible iff j < kv_len && (j < prefix_len || j <= pos), i.e. exactly the keys
// 0 .. n(pos) with n(pos) = min(kv_len, max(prefix_len, pos + 1)). Rows of k and v from n(pos)
// on are never read (a preallocated KV cache may hold anything there).
// Gemma 2: with window > 0, a query past the prefix (pos >= prefix_len) sees only keys
// j >= lo(pos) = pos + 1 - window; with softcap > 0, s_j = softcap * tanh(s_j / softcap).
//
// q, out  f32 [rows, heads * head_dim], row stride q_stride; head h at columns h * head_dim ..;
//         query row r is buffer row q_row0 + r (a batch keeps several sequences' rows).
// k, v    f32 [max_rows, kv_heads * head_dim], row stride kv_stride.
//
// Two entry points compute the same thing; the launcher picks `attention_lanes` on CPU adapters
// (lavapipe), where it is about 6x faster, and `attention` elsewhere.
//
// Query vectors (row, head) that share kv head kh are numbered row-major over
// (row, head - kh * group) and cut into chunks (NQ = 4 for `attention`, LQ = 128 for
// `attention_lanes`), so K and V rows loaded once serve a whole chunk (all heads of a row under
// MQA/GQA, consecutive rows under MHA). Workgroup w (linear index wid.x + wid.y * nwg.x) is
// chunk w % chunks of kv head w / chunks; `count` workgroups in all.
//
// `attention` (GPUs): one workgroup of 64 threads per chunk of NQ query vectors.
//
// Keys are walked in blocks of 64, up to the largest n(pos) of the chunk (a uniform bound):
//   1. thread t computes the scores of key j0 + t for the NQ queries (q pre-scaled in
//      workgroup memory; keys a query may not see get -3e38);
//   2. every thread takes the block maximum per query (same order, same result), the new
//      running max m' = max(m, block max), and p_t = exp(s_t - m') for its key;
//   3. thread t owns output dims t, t + 64, t + 128, t + 192 (< head_dim): it rescales its
//      accumulators and running sums by exp(m - m') and adds Σ_j p_j · v[j, d].
// Finally out = acc / l. All arithmetic is f32; two barriers per key block.
//
// A decode step (fused = 1, below) reads its query, key and value unrotated from the fused
// projection, so the rotary embedding and the cache write need no launch of their own.

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
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> k: array<f32>;
@group(0) @binding(3) var<storage, read_write> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// Fused decode only: the rotary table (f32 [max_pos, head_dim], cos then sin in each row).
@group(0) @binding(5) var<storage, read> table: array<f32>;

const WG: u32 = 64u;
const NQ: u32 = 4u;
const MAXD: u32 = 256u;
const DSLOTS: u32 = 4u; // MAXD / WG output dims per thread
const NEG: f32 = -3.0e38;

var<workgroup> qs: array<f32, 1024>; // [NQ][MAXD] pre-scaled queries
var<workgroup> ss: array<f32, 256>; // [NQ][WG] scores of the block
var<workgroup> ps: array<f32, 256>; // [NQ][WG] probabilities of the block

// Number of keys visible to query row `row`: keys first_key(row) .. keys_for(row).
fn keys_for(row: u32) -> u32 {
    return min(p.kv_len, max(p.prefix_len, p.q_pos0 + row + 1u));
}

fn first_key(row: u32) -> u32 {
    let pos = p.q_pos0 + row;
    if (p.window > 0u && pos >= p.prefix_len && pos + 1u > p.window) {
        return pos + 1u - p.window;
    }
    return 0u;
}

fn visible(j: u32, lo: u32, n: u32) -> bool {
    return (j >= lo) && (j < n);
}

fn cap(s: f32) -> f32 {
    if (p.softcap > 0.0) {
        return p.softcap * tanh(clamp(s / p.softcap, -15.0, 15.0));
    }
    return s;
}

fn cap4(s: vec4<f32>) -> vec4<f32> {
    if (p.softcap > 0.0) {
        return p.softcap * tanh(clamp(s / p.softcap, vec4(-15.0), vec4(15.0)));
    }
    return s;
}

// ---- fused decode (fused = 1) ----
// Binding 1 holds a decoder layer's fused projection row qkv_row (q_stride = its width: the
// query heads, then the key heads, then the value heads), not rotated yet. The query is at
// position q_pos0 = the new key's row; kv_len counts the cached keys only (the new key is
// row kv_len, visible to the query: decode positions are past the prompt). The kernels
// rotate the query as they load it, walk the cached keys, then add the new key's term from
// the projection, and the first workgroup of each kv head writes the rotated key and the
// value into cache row kv_len. Nothing reads that row in the same dispatch.

// Element d of head vector `base` (an offset into binding 1) rotated to position q_pos0.
fn rotated(base: u32, d: u32) -> f32 {
    let half = p.head_dim / 2u;
    let i = select(d, d - half, d >= half);
    let tb = p.q_pos0 * p.head_dim;
    let c = table[tb + i];
    let sn = table[tb + half + i];
    let x1 = q[base + i];
    let x2 = q[base + i + half];
    if (d < half) {
        return x1 * c - x2 * sn;
    }
    return x2 * c + x1 * sn;
}

// Offsets into binding 1 of the new key and value of kv head kh.
fn new_key(kh: u32) -> u32 {
    return p.qkv_row * p.q_stride + p.heads * p.head_dim + kh * p.head_dim;
}

fn new_value(kh: u32) -> u32 {
    return new_key(kh) + p.kv_heads * p.head_dim;
}

// Write the rotated new key and the value of kv head kh into cache row kv_len (dims t, t +
// step, ...).
fn write_new_row(kh: u32, t: u32, step: u32) {
    let dst = p.kv_len * p.kv_stride + kh * p.head_dim;
    let kb = new_key(kh);
    let vb = new_value(kh);
    for (var d = t; d < p.head_dim; d += step) {
        k[dst + d] = rotated(kb, d);
        v[dst + d] = q[vb + d];
    }
}

@compute @workgroup_size(64, 1, 1)
fn attention(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let w = wid.x + wid.y * nwg.x;
    if (w >= p.count) {
        return;
    }
    let kh = w / p.chunks;
    let first = (w % p.chunks) * NQ;
    let items = p.q_rows * p.group;
    let last = min(first + NQ, items) - 1u;
    // Rows grow with the item index, so the last item sees the most keys.
    let n_max = keys_for(last / p.group);
    // Rows grow with the item index, so the first item's window starts first.
    let lo_min = first_key(first / p.group);
    let hd = p.head_dim;
    let kbase = kh * hd;

    let fused = p.fused == 1u;
    var n_i: array<u32, NQ>;
    var lo_i: array<u32, NQ>;
    var base: array<u32, NQ>; // query vector in binding 1
    var obase: array<u32, NQ>; // output vector
    for (var i = 0u; i < NQ; i++) {
        let f = first + i;
        n_i[i] = 0u;
        lo_i[i] = 0u;
        base[i] = 0u;
        obase[i] = 0u;
        if (f < items) {
            let row = f / p.group;
            let head = kh * p.group + f % p.group;
            n_i[i] = keys_for(row); // fused: the cached keys' bound (the new key is extra)
            lo_i[i] = first_key(row);
            base[i] = select((p.q_row0 + row) * p.q_stride, p.qkv_row * p.q_stride, fused) + head * hd;
            obase[i] = (p.q_row0 + row) * p.out_stride + head * hd;
        }
    }
    for (var i = 0u; i < NQ; i++) {
        for (var d = t; d < hd; d += WG) {
            var x = 0.0;
            if (n_i[i] > 0u) {
                if (fused) {
                    x = rotated(base[i], d) * p.scale;
                } else {
                    x = q[base[i] + d] * p.scale;
                }
            }
            qs[i * MAXD + d] = x;
        }
    }

    var m: array<f32, NQ>;
    var l: array<f32, NQ>;
    var acc: array<array<f32, DSLOTS>, NQ>;
    for (var i = 0u; i < NQ; i++) {
        m[i] = NEG;
        l[i] = 0.0;
        for (var e = 0u; e < DSLOTS; e++) {
            acc[i][e] = 0.0;
        }
    }
    workgroupBarrier();

    for (var j0 = lo_min; j0 < n_max; j0 += WG) {
        // 1. Scores of key j for every query of the chunk.
        let j = j0 + t;
        var s: array<f32, NQ>;
        for (var i = 0u; i < NQ; i++) {
            s[i] = 0.0;
        }
        if (j < n_max) {
            let kr = j * p.kv_stride + kbase;
            for (var d = 0u; d < hd; d++) {
                let kd = k[kr + d];
                for (var i = 0u; i < NQ; i++) {
                    s[i] = fma(qs[i * MAXD + d], kd, s[i]);
                }
            }
        }
        for (var i = 0u; i < NQ; i++) {
            ss[i * WG + t] = select(NEG, cap(s[i]), visible(j, lo_i[i], n_i[i]));
        }
        workgroupBarrier();

        // 2. Running max and this thread's key probability.
        let nb = min(WG, n_max - j0);
        var alpha: array<f32, NQ>;
        for (var i = 0u; i < NQ; i++) {
            var mb = NEG;
            for (var jj = 0u; jj < nb; jj++) {
                mb = max(mb, ss[i * WG + jj]);
            }
            let mn = max(m[i], mb);
            alpha[i] = exp(m[i] - mn);
            m[i] = mn;
            var pr = 0.0;
            if (visible(j, lo_i[i], n_i[i])) {
                pr = exp(ss[i * WG + t] - mn);
            }
            ps[i * WG + t] = pr;
        }
        workgroupBarrier();

        // 3. Rescale and accumulate p · V over the block.
        for (var i = 0u; i < NQ; i++) {
            l[i] *= alpha[i];
            for (var e = 0u; e < DSLOTS; e++) {
                acc[i][e] *= alpha[i];
            }
        }
        for (var jj = 0u; jj < nb; jj++) {
            let vr = (j0 + jj) * p.kv_stride + kbase;
            var pj: array<f32, NQ>;
            for (var i = 0u; i < NQ; i++) {
                pj[i] = ps[i * WG + jj];
                l[i] += pj[i];
            }
            for (var e = 0u; e < DSLOTS; e++) {
                let d = t + e * WG;
                if (d < hd) {
                    let vd = v[vr + d];
                    for (var i = 0u; i < NQ; i++) {
                        acc[i][e] = fma(pj[i], vd, acc[i][e]);
                    }
                }
            }
        }
    }

    if (fused) {
        // The new key: its scores reduced over the threads' dims, one more online step.
        let kb = new_key(kh);
        let vb = new_value(kh);
        var kd: array<f32, DSLOTS>;
        var part: array<f32, NQ>;
        for (var i = 0u; i < NQ; i++) {
            part[i] = 0.0;
        }
        for (var e = 0u; e < DSLOTS; e++) {
            let d = t + e * WG;
            kd[e] = 0.0;
            if (d < hd) {
                kd[e] = rotated(kb, d);
                for (var i = 0u; i < NQ; i++) {
                    part[i] = fma(qs[i * MAXD + d], kd[e], part[i]);
                }
            }
        }
        workgroupBarrier();
        for (var i = 0u; i < NQ; i++) {
            ss[i * WG + t] = part[i];
        }
        workgroupBarrier();
        for (var st = WG / 2u; st > 0u; st >>= 1u) {
            if (t < st) {
                for (var i = 0u; i < NQ; i++) {
                    ss[i * WG + t] += ss[i * WG + t + st];
                }
            }
            workgroupBarrier();
        }
        for (var i = 0u; i < NQ; i++) {
            let sc = cap(ss[i * WG]);
            let mn = max(m[i], sc);
            let alpha = exp(m[i] - mn);
            let pr = exp(sc - mn);
            m[i] = mn;
            l[i] = l[i] * alpha + pr;
            for (var e = 0u; e < DSLOTS; e++) {
                let d = t + e * WG;
                if (d < hd) {
                    acc[i][e] = fma(pr, q[vb + d], acc[i][e] * alpha);
                }
            }
        }
        if (w % p.chunks == 0u) {
            write_new_row(kh, t, WG);
        }
    }

    for (var i = 0u; i < NQ; i++) {
        if (n_i[i] > 0u) {
            let inv = 1.0 / l[i];
            for (var e = 0u; e < DSLOTS; e++) {
                let d = t + e * WG;
                if (d < hd) {
                    out[obase[i] + d] = acc[i][e] * inv;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `attention_lanes` (CPU drivers such as lavapipe): each thread owns four query vectors, the
// 32 threads of a workgroup a chunk of LQ = 128 (thread t: first + t + 32 i, i < 4). Every
// K/V load has the same address in all lanes (a scalar load on a SIMD CPU) and feeds all four
// queries; no workgroup memory, no barrier. Each thread keeps its scaled queries and
// accumulators in private arrays. Keys go in blocks of KB (one rescale per block), 4 at a time.

const LQ: u32 = 128u; // query vectors per workgroup, four per thread
const LT: u32 = 32u; // threads per workgroup
const KB: u32 = 32u; // keys per softmax block

fn visible4(j: u32, lo: vec4<u32>, n: vec4<u32>) -> vec4<bool> {
    return (vec4<u32>(j) >= lo) & (vec4<u32>(j) < n);
}

@compute @workgroup_size(32, 1, 1)
fn attention_lanes(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let w = wid.x + wid.y * nwg.x;
    if (w >= p.count) {
        return;
    }
    let kh = w / p.chunks;
    let first = (w % p.chunks) * LQ;
    let items = p.q_rows * p.group;
    let last = min(first + LQ, items) - 1u;
    let n_max = keys_for(last / p.group);
    let hd = p.head_dim;
    let kbase = kh * hd;
    // Missing query vectors are replaced by the chunk's last (computed, not stored).
    if (first + t >= items) {
        return; // no barriers below: lanes may leave
    }
    let fused = p.fused == 1u;
    var n: vec4<u32>;
    var lo: vec4<u32>;
    var base: vec4<u32>; // query vectors in binding 1
    var obase: vec4<u32>; // output vectors
    for (var i = 0u; i < 4u; i++) {
        let f = min(first + t + i * LT, items - 1u);
        let row = f / p.group;
        let head = (kh * p.group + f % p.group) * hd;
        n[i] = keys_for(row); // fused: the cached keys' bound (the new key is extra)
        lo[i] = first_key(row);
        base[i] = select((p.q_row0 + row) * p.q_stride, p.qkv_row * p.q_stride, fused) + head;
        obase[i] = (p.q_row0 + row) * p.out_stride + head;
    }
    var qv: array<vec4<f32>, MAXD>;
    var acc: array<vec4<f32>, MAXD>;
    for (var d = 0u; d < hd; d++) {
        if (fused) {
            qv[d] = vec4<f32>(rotated(base.x, d), rotated(base.y, d), rotated(base.z, d), rotated(base.w, d)) * p.scale;
        } else {
            qv[d] = vec4<f32>(q[base.x + d], q[base.y + d], q[base.z + d], q[base.w + d]) * p.scale;
        }
        acc[d] = vec4<f32>(0.0);
    }
    var m = vec4<f32>(NEG);
    var l = vec4<f32>(0.0);
    let lo_min = first_key(first / p.group);
    for (var j0 = lo_min; j0 < n_max; j0 += KB) {
        // Keys j0 .. j0 + nb4 in groups of 4; those past n_max read row n_max - 1 (valid data)
        // and are masked like the keys past n.
        let nb4 = min(KB, (n_max - j0 + 3u) & ~3u);
        // s[b] holds key j0 + b's scores for the four queries.
        var s: array<vec4<f32>, KB>;
        var mb = vec4<f32>(NEG);
        for (var b = 0u; b < nb4; b += 4u) {
            let r0 = min(j0 + b, n_max - 1u) * p.kv_stride + kbase;
            let r1 = min(j0 + b + 1u, n_max - 1u) * p.kv_stride + kbase;
            let r2 = min(j0 + b + 2u, n_max - 1u) * p.kv_stride + kbase;
            let r3 = min(j0 + b + 3u, n_max - 1u) * p.kv_stride + kbase;
            var s0 = vec4<f32>(0.0);
            var s1 = vec4<f32>(0.0);
            var s2 = vec4<f32>(0.0);
            var s3 = vec4<f32>(0.0);
            for (var d = 0u; d < hd; d++) {
                let qd = qv[d];
                s0 = fma(qd, vec4<f32>(k[r0 + d]), s0);
                s1 = fma(qd, vec4<f32>(k[r1 + d]), s1);
                s2 = fma(qd, vec4<f32>(k[r2 + d]), s2);
                s3 = fma(qd, vec4<f32>(k[r3 + d]), s3);
            }
            let j = j0 + b;
            s0 = select(vec4(NEG), cap4(s0), visible4(j, lo, n));
            s1 = select(vec4(NEG), cap4(s1), visible4(j + 1u, lo, n));
            s2 = select(vec4(NEG), cap4(s2), visible4(j + 2u, lo, n));
            s3 = select(vec4(NEG), cap4(s3), visible4(j + 3u, lo, n));
            s[b] = s0;
            s[b + 1u] = s1;
            s[b + 2u] = s2;
            s[b + 3u] = s3;
            mb = max(mb, max(max(s0, s1), max(s2, s3)));
        }
        let mn = max(m, mb);
        let alpha = exp(m - mn);
        m = mn;
        l *= alpha;
        for (var b = 0u; b < nb4; b++) {
            let pb = select(vec4<f32>(0.0), exp(s[b] - mn), visible4(j0 + b, lo, n));
            s[b] = pb;
            l += pb;
        }
        for (var b = 0u; b < nb4; b += 4u) {
            let r0 = min(j0 + b, n_max - 1u) * p.kv_stride + kbase;
            let r1 = min(j0 + b + 1u, n_max - 1u) * p.kv_stride + kbase;
            let r2 = min(j0 + b + 2u, n_max - 1u) * p.kv_stride + kbase;
            let r3 = min(j0 + b + 3u, n_max - 1u) * p.kv_stride + kbase;
            let p0 = s[b];
            let p1 = s[b + 1u];
            let p2 = s[b + 2u];
            let p3 = s[b + 3u];
            let a = select(vec4<f32>(1.0), alpha, b == 0u);
            for (var d = 0u; d < hd; d++) {
                let add = fma(p3, vec4<f32>(v[r3 + d]), fma(p2, vec4<f32>(v[r2 + d]),
                    fma(p1, vec4<f32>(v[r1 + d]), p0 * v[r0 + d])));
                acc[d] = fma(acc[d], a, add);
            }
        }
    }
    if (fused) {
        // The new key (lane-uniform loads), one more online-softmax step.
        let kb = new_key(kh);
        let vb = new_value(kh);
        var sn = vec4<f32>(0.0);
        for (var d = 0u; d < hd; d++) {
            sn = fma(qv[d], vec4<f32>(rotated(kb, d)), sn);
        }
        sn = cap4(sn);
        let mn = max(m, sn);
        let alpha = exp(m - mn);
        let pr = exp(sn - mn);
        l = l * alpha + pr;
        for (var d = 0u; d < hd; d++) {
            acc[d] = fma(pr, vec4<f32>(q[vb + d]), acc[d] * alpha);
        }
        if (t == 0u && w % p.chunks == 0u) {
            write_new_row(kh, 0u, 1u);
        }
    }
    let inv = 1.0 / l;
    for (var i = 0u; i < 4u; i++) {
        if (first + t + i * LT < items) {
            for (var d = 0u; d < hd; d++) {
                out[obase[i] + d] = acc[d][i] * inv[i];
            }
        }
    }
}
