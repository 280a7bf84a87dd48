// im2col for a non-overlapping P x P patch convolution (SigLIP's patch embedding, stride P):
//   out[py * npx + px, c * P * P + ky * P + kx] = pixels[c, py * P + ky, px * P + kx]
// pixels f32 [C, H, W]; out f32 [(H / P) * (W / P), C * P * P], the column order of a conv
// weight [hidden, C, P, P] flattened to [hidden, C * P * P], so a linear layer with that
// weight then gives the convolution. One workgroup per patch (n patches), linear index
// wid.x + wid.y * nwg.x (Recorder::grid).

struct Params {
    n: u32,
    k: u32,
    size: u32,
    npx: u32,
    height: u32,
    width: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> pixels: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn im2col(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    // One workgroup per patch (a uniform index: its divisions are scalar), one thread per
    // (channel, patch row), copying P contiguous pixels: per-lane integer divisions are
    // scalarised on SIMD CPUs (lavapipe), so each thread does two, not two per element.
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.n) {
        return;
    }
    let y0 = (row / p.npx) * p.size;
    let x0 = (row % p.npx) * p.size;
    for (var u = t; u < p.k / p.size; u += 64u) {
        let c = u / p.size;
        let ky = u % p.size;
        let src = (c * p.height + y0 + ky) * p.width + x0;
        let dst = row * p.k + u * p.size;
        for (var kx = 0u; kx < p.size; kx++) {
            out[dst + kx] = pixels[src + kx];
        }
    }
}
