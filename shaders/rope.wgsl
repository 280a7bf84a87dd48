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
