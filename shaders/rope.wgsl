// Rotary position embedding, half rotation (HF `rotate_half`), in place. For each row r in
// row0 .. row0 + rows at position pos = pos0 + (r - row0), each head h and i < d/2 (d the head
// dimension), with x1 = x[r, h*d + i] and x2 = x[r, h*d + i + d/2]:
//   x[r, h*d + i]       = x1 * cos - x2 * sin
//   x[r, h*d + i + d/2] = x2 * cos + x1 * sin
// where cos/sin are of the angle pos * inv_freq[i], read from a host-computed table
// f32 [max_pos, d] whose row pos holds cos for i < d/2 and sin at d/2 + i.
// One workgroup per row (n rows; linear index wid.x + wid.y * nwg.x, Recorder::grid), thread t
// taking i = t, t + 64, ... for every head: no per-thread integer division, which SIMD CPUs
// (lavapipe) scalarise.
//
// `rope_qkv` takes a decoder layer's fused q|k|v projection rows `qkv` (stride qkv_stride:
// q_heads query heads, then kv_heads key heads, then kv_heads value heads) and in one dispatch
// writes the rotated keys and the values into the KV cache rows `kc` / `vc` and the rotated
// queries into `q`: row r in 0 .. n is qkv row qkv_row0 + r at position pos0 + r, cache row
// cache_row0 + r; rows r >= q_from also write query row q_row0 + (r - q_from) (rows below
// q_from, a prefill's last layer, which needs its last query only, write keys and values).

struct Params {
    n: u32,
    row0: u32,
    pos0: u32,
    heads: u32,
    head_dim: u32,
    half: u32,
    x_stride: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn rope(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.n) {
        return;
    }
    let tb = (p.pos0 + r) * p.head_dim;
    let rb = (p.row0 + r) * p.x_stride;
    for (var i = t; i < p.half; i += 64u) {
        let c = table[tb + i];
        let s = table[tb + p.half + i];
        for (var h = 0u; h < p.heads; h++) {
            let xb = rb + h * p.head_dim + i;
            let x1 = x[xb];
            let x2 = x[xb + p.half];
            x[xb] = x1 * c - x2 * s;
            x[xb + p.half] = x2 * c + x1 * s;
        }
    }
}


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
    _pad: u32,
}

@group(0) @binding(0) var<uniform> pq: QkvParams;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read_write> q: array<f32>;
@group(0) @binding(4) var<storage, read_write> kc: array<f32>;
@group(0) @binding(5) var<storage, read_write> vc: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn rope_qkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= pq.n) {
        return;
    }
    let d = pq.head_dim;
    let qd = pq.q_heads * d;
    let kvd = pq.kv_heads * d;
    let src = (pq.qkv_row0 + r) * pq.qkv_stride;
    let dst = (pq.cache_row0 + r) * kvd;
    let tb = (pq.pos0 + r) * d;
    let with_q = r >= pq.q_from;
    let qb = (pq.q_row0 + r - min(r, pq.q_from)) * qd;
    for (var i = t; i < pq.half; i += 64u) {
        let c = table[tb + i];
        let s = table[tb + pq.half + i];
        for (var h = 0u; h < pq.kv_heads; h++) {
            let a = src + qd + h * d + i;
            let x1 = qkv[a];
            let x2 = qkv[a + pq.half];
            kc[dst + h * d + i] = x1 * c - x2 * s;
            kc[dst + h * d + i + pq.half] = x2 * c + x1 * s;
        }
        if (with_q) {
            for (var h = 0u; h < pq.q_heads; h++) {
                let a = src + h * d + i;
                let x1 = qkv[a];
                let x2 = qkv[a + pq.half];
                q[qb + h * d + i] = x1 * c - x2 * s;
                q[qb + h * d + i + pq.half] = x2 * c + x1 * s;
            }
        }
    }
    for (var j = t; j < kvd; j += 64u) {
        vc[dst + j] = qkv[src + qd + kvd + j];
    }
}
