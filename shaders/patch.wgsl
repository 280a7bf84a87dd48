// im2col for a non-overlapping P x P patch convolution (SigLIP's patch embedding, stride P):
//   out[py * npx + px, c * P * P + ky * P + kx] = pixels[c, py * P + ky, px * P + kx]
// pixels f32 [C, H, W]; out f32 [(H / P) * (W / P), C * P * P], the column order of a conv
// weight [hidden, C, P, P] flattened to [hidden, C * P * P], so a linear layer with that
// weight then gives the convolution. One thread per output element, 256 per workgroup,
// workgroup linear index wid.x + wid.y * nwg.x (Recorder::grid).

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

@compute @workgroup_size(256, 1, 1)
fn im2col(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + t;
    if (i >= p.n) {
        return;
    }
    let row = i / p.k;
    let col = i % p.k;
    let pp = p.size * p.size;
    let c = col / pp;
    let ky = (col % pp) / p.size;
    let kx = col % p.size;
    let y = (row / p.npx) * p.size + ky;
    let x = (row % p.npx) * p.size + kx;
    out[i] = pixels[(c * p.height + y) * p.width + x];
}
