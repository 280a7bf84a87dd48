// Linear layer: out[m, n] = epilogue(sum_k x[m, k] * w[n, k] + bias[n])
//
// x    f32 activations, row-major with row stride `x_stride` floats, starting at row x_row.
// w    one chunk of an f16 weight matrix [rows, k] (PyTorch Linear layout [out, in]), rows
//      padded to a multiple of 8 halves and read as vec4<u32> (8 halves per load).
// out  f32, row-major with stride `out_stride`; this chunk writes columns
//      out_col .. out_col + n of rows out_row .. out_row + m.
// Epilogue (override constants): v = acc + bias (HAS_BIAS); v = gelu_tanh(v) (ACT = 1);
// MODE 0 stores v, MODE 1 adds v to out (residual), MODE 2 multiplies out by v (GeGLU gate).
// Arithmetic and accumulation are f32.
//
// `matmul`: 32x32 output tile per 8x8 workgroup, 4x4 outputs per thread, k in steps of 32.
// `matvec`: for a few rows of x (decode); 64 threads split k, 4 output columns per workgroup,
// row m of x is workgroup z.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    w_stride4: u32,
    x_stride: u32,
    out_stride: u32,
    out_col: u32,
    out_row: u32,
    bias_off: u32,
    x_row: u32,
    _pad1: u32,
    _pad2: u32,
}

override HAS_BIAS: bool = false;
override ACT: u32 = 0u;
override MODE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

fn gelu_tanh(v: f32) -> f32 {
    let u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
    return 0.5 * v * (1.0 + tanh(clamp(u, -15.0, 15.0)));
}

fn store(row: u32, col: u32, acc: f32) {
    var v = acc;
    if (HAS_BIAS) {
        v += bias[p.bias_off + col];
    }
    if (ACT == 1u) {
        v = gelu_tanh(v);
    }
    let i = (row + p.out_row) * p.out_stride + p.out_col + col;
    if (MODE == 1u) {
        v += out[i];
    } else if (MODE == 2u) {
        v *= out[i];
    }
    out[i] = v;
}

fn unpack8(q: vec4<u32>) -> array<f32, 8> {
    let a = unpack2x16float(q.x);
    let b = unpack2x16float(q.y);
    let c = unpack2x16float(q.z);
    let d = unpack2x16float(q.w);
    return array<f32, 8>(a.x, a.y, b.x, b.y, c.x, c.y, d.x, d.y);
}

const BM: u32 = 32u;
const BN: u32 = 32u;
const BK: u32 = 32u;

// Tiles stored k-major so a thread's 4 consecutive rows/columns are adjacent.
var<workgroup> xs: array<f32, 1024>; // [BK][BM]
var<workgroup> ws: array<f32, 1024>; // [BK][BN]

@compute @workgroup_size(8, 8, 1)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.y * 8u + lid.x;
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    var acc: array<array<f32, 4>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // x tile: 32 rows x 32 k, 16 values per thread.
        for (var i = 0u; i < 16u; i++) {
            let idx = t + 64u * i;
            let r = idx / BK;
            let c = idx % BK;
            var v = 0.0;
            if (m0 + r < p.m && k0 + c < p.k) {
                v = x[(m0 + r + p.x_row) * p.x_stride + k0 + c];
            }
            xs[c * BM + r] = v;
        }
        // w tile: 32 rows x 4 vec4 (32 halves), 2 loads per thread.
        for (var i = 0u; i < 2u; i++) {
            let idx = t + 64u * i;
            let r = idx / 4u;
            let c4 = idx % 4u;
            let kv = k0 / 8u + c4;
            var q = vec4<u32>(0u);
            if (n0 + r < p.n && kv < p.w_stride4) {
                q = w[(n0 + r) * p.w_stride4 + kv];
            }
            let h = unpack8(q);
            for (var j = 0u; j < 8u; j++) {
                ws[(c4 * 8u + j) * BN + r] = h[j];
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = xs[kk * BM + lid.y * 4u + i];
                b[i] = ws[kk * BN + lid.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let row = m0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let col = n0 + lid.x * 4u + j;
            if (row < p.m && col < p.n) {
                store(row, col, acc[i][j]);
            }
        }
    }
}

const RV: u32 = 4u;
const WG: u32 = 64u;
var<workgroup> red: array<f32, 256>; // [RV][WG]

@compute @workgroup_size(64, 1, 1)
fn matvec(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let n0 = (wid.x + wid.y * nwg.x) * RV;
    let row = wid.z;
    let xb = (row + p.x_row) * p.x_stride;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    let nvec = (p.k + 7u) / 8u;
    for (var j = t; j < nvec; j += WG) {
        var xv: array<f32, 8>;
        if (j * 8u + 8u <= p.k) {
            for (var e = 0u; e < 8u; e++) {
                xv[e] = x[xb + j * 8u + e];
            }
        } else {
            for (var e = 0u; e < 8u; e++) {
                xv[e] = 0.0;
                if (j * 8u + e < p.k) {
                    xv[e] = x[xb + j * 8u + e];
                }
            }
        }
        for (var r = 0u; r < RV; r++) {
            if (n0 + r < p.n) {
                let h = unpack8(w[(n0 + r) * p.w_stride4 + j]);
                var s = 0.0;
                for (var e = 0u; e < 8u; e++) {
                    s = fma(xv[e], h[e], s);
                }
                acc[r] += s;
            }
        }
    }
    for (var r = 0u; r < RV; r++) {
        red[r * WG + t] = acc[r];
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            for (var r = 0u; r < RV; r++) {
                red[r * WG + t] += red[r * WG + t + s];
            }
        }
        workgroupBarrier();
    }
    if (t < RV && n0 + t < p.n && row < p.m) {
        store(row, n0 + t, red[t * WG]);
    }
}
