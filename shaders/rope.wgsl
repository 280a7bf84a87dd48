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
// `rope_qk` rotates the queries and the keys of the same positions in one dispatch (a decoder
// layer's q activations and its KV cache rows): row r in 0 .. n is at position pos0 + r; its
// key row is k_row0 + r of `k` (k_heads heads); rows r >= q_from also have a query row
// q_row0 + (r - q_from) of `q` (q_heads heads); rows below q_from (a prefill's last layer,
// which needs queries for its last row only) rotate the key alone.

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

struct QkParams {
    n: u32,
    q_from: u32,
    q_row0: u32,
    k_row0: u32,
    pos0: u32,
    q_heads: u32,
    k_heads: u32,
    head_dim: u32,
    half: u32,
    q_stride: u32,
    k_stride: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> pq: QkParams;
@group(0) @binding(2) var<storage, read_write> q: array<f32>;
@group(0) @binding(3) var<storage, read_write> k: array<f32>;

// Rotate `heads` heads of the row starting at `rb` of `v` (q or k) by the angles at `tb`.
fn rotate_heads(tb: u32, rb: u32, heads: u32, t: u32, is_q: bool) {
    for (var i = t; i < pq.half; i += 64u) {
        let c = table[tb + i];
        let s = table[tb + pq.half + i];
        for (var h = 0u; h < heads; h++) {
            let b = rb + h * pq.head_dim + i;
            if (is_q) {
                let x1 = q[b];
                let x2 = q[b + pq.half];
                q[b] = x1 * c - x2 * s;
                q[b + pq.half] = x2 * c + x1 * s;
            } else {
                let x1 = k[b];
                let x2 = k[b + pq.half];
                k[b] = x1 * c - x2 * s;
                k[b + pq.half] = x2 * c + x1 * s;
            }
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn rope_qk(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= pq.n) {
        return;
    }
    let tb = (pq.pos0 + r) * pq.head_dim;
    rotate_heads(tb, (pq.k_row0 + r) * pq.k_stride, pq.k_heads, t, false);
    if (r >= pq.q_from) {
        rotate_heads(tb, (pq.q_row0 + r - pq.q_from) * pq.q_stride, pq.q_heads, t, true);
    }
}
