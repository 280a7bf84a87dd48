// 2-D convolutions on channels-last (NHWC) f32 activations, and the row gather that feeds them
// (the VQ-VAE mask decoder of src/tasks/vae.rs).
//
// `conv2d`, one output element per thread; x is [B, in_h, in_w, in_c], out [B, out_h, out_w,
// out_c], bias [out_c], w [out_c, K, K, in_c] (the PyTorch weight rearranged on the host: a
// Conv2d's [out, in, kh, kw] or a ConvTranspose2d's [in, out, kh, kw]), all f32.
//   TRANSPOSED = false: Conv2d, stride 1, zero padding PAD:
//     v = bias[co] + sum_{ky,kx,ci} x[b, oy + ky - PAD, ox + kx - PAD, ci] * w[co, ky, kx, ci]
//   TRANSPOSED = true: ConvTranspose2d, stride STRIDE, padding PAD: input pixel iy feeds
//   output rows oy = iy * STRIDE - PAD + ky, so
//     v = bias[co] + sum over (ky, kx) with iy = (oy + PAD - ky) / STRIDE and
//         ix = (ox + PAD - kx) / STRIDE exact and in range of sum_ci x[b, iy, ix, ci] * w[co, ky, kx, ci]
//   Out-of-range taps are zeros. Then v = max(v, 0) if RELU; out = v, or out += v if ACCUM
//   (a residual block's last conv adding onto the block input held in out).
//   Arithmetic is f32 with fma, taps in (ky, kx, ci) order.
//
// `gather`: out[r, c] = table[ids[r], c] for r < rows, c < dim (codebook lookup); ids >= the
// table's row count give zeros (the host rejects them first).
//
// 64 threads per workgroup; workgroup linear index wid.x + wid.y * nwg.x (Recorder::grid).

struct Params {
    total: u32,
    in_h: u32,
    in_w: u32,
    in_c: u32,
    out_h: u32,
    out_w: u32,
    out_c: u32,
    _pad: u32,
}

override K: i32 = 1;
override STRIDE: i32 = 1;
override PAD: i32 = 0;
override TRANSPOSED: bool = false;
override RELU: bool = false;
override ACCUM: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// Input coordinate feeding output coordinate `o` through kernel tap `k`, or -1 for none.
fn source(o: u32, k: i32, size: u32) -> i32 {
    var i: i32;
    if (TRANSPOSED) {
        let n = i32(o) + PAD - k;
        if (n < 0 || n % STRIDE != 0) {
            return -1;
        }
        i = n / STRIDE;
    } else {
        i = i32(o) + k - PAD;
    }
    if (i < 0 || i >= i32(size)) {
        return -1;
    }
    return i;
}

@compute @workgroup_size(64, 1, 1)
fn conv2d(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 64u + t;
    if (i >= p.total) {
        return;
    }
    let co = i % p.out_c;
    let pix = i / p.out_c;
    let ox = pix % p.out_w;
    let oy = (pix / p.out_w) % p.out_h;
    let b = pix / (p.out_w * p.out_h);
    var acc = bias[co];
    for (var ky = 0; ky < K; ky++) {
        let iy = source(oy, ky, p.in_h);
        if (iy < 0) {
            continue;
        }
        for (var kx = 0; kx < K; kx++) {
            let ix = source(ox, kx, p.in_w);
            if (ix < 0) {
                continue;
            }
            let xb = ((b * p.in_h + u32(iy)) * p.in_w + u32(ix)) * p.in_c;
            let wb = ((co * u32(K) + u32(ky)) * u32(K) + u32(kx)) * p.in_c;
            for (var ci = 0u; ci < p.in_c; ci++) {
                acc = fma(x[xb + ci], w[wb + ci], acc);
            }
        }
    }
    if (RELU) {
        acc = max(acc, 0.0);
    }
    if (ACCUM) {
        acc += out[i];
    }
    out[i] = acc;
}

struct GatherParams {
    rows: u32,
    dim: u32,
    table_rows: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> gp: GatherParams;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> rows_out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn gather(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 64u + t;
    if (i >= gp.rows * gp.dim) {
        return;
    }
    let id = ids[i / gp.dim];
    var v = 0.0;
    if (id < gp.table_rows) {
        v = table[id * gp.dim + i % gp.dim];
    }
    rows_out[i] = v;
}
