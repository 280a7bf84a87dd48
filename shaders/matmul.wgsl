// Linear layer: out[m, n] = epilogue(sum_k x[m, k] * w[n, k] + bias[n])
//
// x    f32 activations, row-major with row stride `x_stride` floats, starting at row x_row.
// w    one chunk of an f16 weight matrix [rows, k] (PyTorch Linear layout [out, in]), rows
//      padded to a multiple of 8 halves and read as vec4<u32> units (8 halves per load),
//      row-major or lane-interleaved (`interleaved` = 1; see `wrow`).
// out  f32, row-major with stride `out_stride`; this chunk writes columns
//      out_col .. out_col + n of rows out_row .. out_row + m.
// Epilogue (bits of `epilogue`, a runtime value so that one pipeline per entry point serves
// every layer: each pipeline costs seconds of LLVM compilation on lavapipe):
// bit 0: v = acc + bias; bit 1: v = gelu_tanh(v); bits 2-3 (mode): 0 stores v, 1 adds v to out
// (residual), 2 multiplies out by v (GeGLU gate).
// Arithmetic and accumulation are f32.
//
// `matmul`: 32x32 output tile per 8x8 workgroup, 4x4 outputs per thread, k in steps of 32.
// `matvec`: for a few rows of x (decode, up to 4); 64 threads split k, 4 output columns per
// workgroup for every row of x, so each weight is read once per launch.
// The matrix-vector kernels (`matvec`, `matvec_lanes` and their `_glu` forms) also fuse what
// surrounds a decoder's projections: with norm = 1 each workgroup computes the RMS of its x
// rows itself and reads x as norm.wgsl's rms_norm would write it (x · inv · (1 + nw[k]),
// binding 5), so no normed copy of x is written; the `_glu` entries read two weight chunks
// laid out alike (binding 2: gate, binding 6: up) and store gelu_tanh(x · gate) · (x · up),
// the gated MLP input, in one launch instead of two.
//
// CPU adapters (lavapipe) run a workgroup on one CPU thread, its invocations as SIMD lanes,
// and pay per load instruction: a load whose address differs between lanes is a loop over the
// lanes, one whose address is the same in every lane (derived from workgroup ids, uniforms and
// uniform loop counters only) a single scalar load. Workgroup memory and barriers do not help
// there. The `*_lanes` kernels are laid out for that: every lane owns whole weight rows (output
// columns) and walks k itself, reading 8 halves of each row per vec4<u32> load, while x is
// read as vec4<f32> at addresses uniform across the lanes (they need k % 4 == 0, so that x
// rows are vec4-aligned: x_stride == k). Accumulators are vec4s of 4 columns, unrolled by hand
// (arrays indexed in loops end up in memory there). On CPU adapters the weights are stored
// lane-interleaved (`wrow`), so that the rows the lanes of one SIMD step read are neighbours
// in memory: one stream per core for the prefetchers instead of one per row.
// `matmul_lanes`: 4 rows x 4 columns per lane (columns nb, nb + 64, nb + 128, nb + 192),
// 4 rows x 256 columns per workgroup; `matmul_lanes8` the same with 8 lanes (one SIMD step),
// 4 rows x 32 columns per workgroup, for chunks whose width would leave many of the wide
// kernel's columns idle (96, 128 or 384 columns). `matvec_lanes`: one row, 8 columns per lane, 512
// columns per workgroup (linear index wid.x + wid.y * nwg.x).

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
    epilogue: u32,
    interleaved: u32,
    norm: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
// The same binding seen as vec4s by the `*_lanes` kernels (x_stride % 4 == 0).
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// The matrix-vector kernels only: the RMSNorm weight applied to x on the way in (norm = 1),
// and the second weight chunk of the GLU kernels (rows laid out as binding 2's).
@group(0) @binding(5) var<storage, read> nw: array<f32>;
@group(0) @binding(5) var<storage, read> nw4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> w2: array<vec4<u32>>;

// Unit j of weight row `row` of this chunk is w[wrow(row) + j * wstep(row)], row-major or
// lane-interleaved (include/lanes.wgsl).
fn wrow(row: u32) -> u32 {
    return lane_row_base(row, p.w_stride4, p.interleaved == 1u);
}

fn wstep(row: u32) -> u32 {
    return lane_unit_step(row, p.n, p.interleaved == 1u);
}

fn gelu_tanh(v: f32) -> f32 {
    let u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
    return 0.5 * v * (1.0 + tanh(clamp(u, -15.0, 15.0)));
}

fn store(row: u32, col: u32, acc: f32) {
    var v = acc;
    if ((p.epilogue & 1u) != 0u) {
        v += bias[p.bias_off + col];
    }
    if ((p.epilogue & 2u) != 0u) {
        v = gelu_tanh(v);
    }
    put(row, col, v);
}

// Combine the finished value of column `col` of row `row` with out (mode in bits 2-3).
fn put(row: u32, col: u32, value: f32) {
    var v = value;
    let mode = (p.epilogue >> 2u) & 3u;
    let i = (row + p.out_row) * p.out_stride + p.out_col + col;
    if (mode == 1u) {
        v += out[i];
    } else if (mode == 2u) {
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
    let unit_step = wstep(n0); // the tile's rows lie in one group
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
                q = w[wrow(n0 + r) + kv * unit_step];
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
// Rows of x one `matvec` workgroup serves (the launcher's MATVEC_MAX_ROWS).
const MV: u32 = 4u;
var<workgroup> red: array<f32, 1024>; // [MV][RV][WG]

// The 8 values of x row `row` (of this launch) at k = 8 j .. 8 j + 8, zeros from k on; with
// norm = 1 normalised on the way as norm.wgsl's rms_norm, `inv` the row's 1 / RMS.
fn x8(row: u32, j: u32, inv: f32) -> array<f32, 8> {
    let xb = (row + p.x_row) * p.x_stride + j * 8u;
    var xv: array<f32, 8>;
    if (j * 8u + 8u <= p.k) {
        for (var e = 0u; e < 8u; e++) {
            xv[e] = x[xb + e];
        }
    } else {
        for (var e = 0u; e < 8u; e++) {
            xv[e] = 0.0;
            if (j * 8u + e < p.k) {
                xv[e] = x[xb + e];
            }
        }
    }
    if (p.norm == 1u) {
        for (var e = 0u; e < 8u; e++) {
            xv[e] = xv[e] * inv * (1.0 + nw[min(j * 8u + e, p.k - 1u)]);
        }
    }
    return xv;
}

fn dot8(a: array<f32, 8>, b: array<f32, 8>) -> f32 {
    var s = 0.0;
    for (var e = 0u; e < 8u; e++) {
        s = fma(a[e], b[e], s);
    }
    return s;
}

// 1 / RMS of each of the m <= MV rows of x (norm = 1; ones otherwise): strided partial sums
// of squares, then a tree reduction in `red`. Called in uniform control flow.
fn inv_rms(t: u32) -> array<f32, MV> {
    var inv: array<f32, MV>;
    for (var i = 0u; i < MV; i++) {
        inv[i] = 1.0;
    }
    if (p.norm != 1u) {
        return inv;
    }
    for (var i = 0u; i < MV; i++) {
        var s = 0.0;
        if (i < p.m) {
            let xb = (i + p.x_row) * p.x_stride;
            for (var k = t; k < p.k; k += WG) {
                let v = x[xb + k];
                s += v * v;
            }
        }
        red[i * WG + t] = s;
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            for (var i = 0u; i < MV; i++) {
                red[i * WG + t] += red[i * WG + t + s];
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < MV; i++) {
        inv[i] = 1.0 / sqrt(red[i * WG] / f32(p.k) + p.eps);
    }
    workgroupBarrier(); // `red` is reused below
    return inv;
}

// RV output columns for all m <= MV rows of x: each weight unit is loaded once for every row
// (a batched decode step reads the weights once), the RV row loads of a step are issued
// before their FMAs, and the last workgroup's missing rows are clamped to the last row
// instead of branched around (their results are not stored). With `glu` (the compiler folds
// it), the workgroup computes 2 columns of gelu_tanh(x · gate) * (x · up): rows n0, n0 + 1 of
// both chunks (binding 2: gate, binding 6: up, laid out alike).
fn matvec_body(wid: vec3<u32>, nwg: vec3<u32>, t: u32, glu: bool) {
    let cols = select(RV, 2u, glu);
    let n0 = (wid.x + wid.y * nwg.x) * cols;
    let last = p.n - 1u;
    var b0 = wrow(min(n0, last));
    var b1 = wrow(min(n0 + 1u, last));
    var b2 = wrow(min(n0 + 2u, last));
    var b3 = wrow(min(n0 + 3u, last));
    if (glu) {
        b2 = b0;
        b3 = b1;
    }
    let unit_step = wstep(n0); // the rows lie in one group
    let inv = inv_rms(t);
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < MV; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    let nvec = (p.k + 7u) / 8u;
    for (var j = t; j < nvec; j += WG) {
        let o = j * unit_step;
        let q0 = w[b0 + o];
        let q1 = w[b1 + o];
        var q2: vec4<u32>;
        var q3: vec4<u32>;
        if (glu) {
            q2 = w2[b2 + o];
            q3 = w2[b3 + o];
        } else {
            q2 = w[b2 + o];
            q3 = w[b3 + o];
        }
        let h0 = unpack8(q0);
        let h1 = unpack8(q1);
        let h2 = unpack8(q2);
        let h3 = unpack8(q3);
        for (var i = 0u; i < MV; i++) {
            if (i < p.m) {
                let xv = x8(i, j, inv[i]);
                acc[i] += vec4<f32>(dot8(xv, h0), dot8(xv, h1), dot8(xv, h2), dot8(xv, h3));
            }
        }
    }
    for (var i = 0u; i < MV; i++) {
        for (var r = 0u; r < RV; r++) {
            red[(i * RV + r) * WG + t] = acc[i][r];
        }
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            for (var c = 0u; c < MV * RV; c++) {
                red[c * WG + t] += red[c * WG + t + s];
            }
        }
        workgroupBarrier();
    }
    let i = t / RV;
    let r = t % RV;
    if (t < MV * RV && i < p.m && r < cols && n0 + r < p.n) {
        if (glu) {
            put(i, n0 + r, gelu_tanh(red[t * WG]) * red[(t + 2u) * WG]);
        } else {
            store(i, n0 + r, red[t * WG]);
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn matvec(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    matvec_body(wid, nwg, t, false);
}

@compute @workgroup_size(64, 1, 1)
fn matvec_glu(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    matvec_body(wid, nwg, t, true);
}

// Weights of 4 columns for one pair of k: `lo` for the even k, `hi` for the odd one. Each
// argument holds the two halves of one column.
struct Pair {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn pair(a: u32, b: u32, c: u32, d: u32) -> Pair {
    let ua = unpack2x16float(a);
    let ub = unpack2x16float(b);
    let uc = unpack2x16float(c);
    let ud = unpack2x16float(d);
    return Pair(vec4<f32>(ua.x, ub.x, uc.x, ud.x), vec4<f32>(ua.y, ub.y, uc.y, ud.y));
}

// acc + x_lo * w.lo + x_hi * w.hi: two k steps for 4 columns.
fn step2(acc: vec4<f32>, x_lo: f32, x_hi: f32, w: Pair) -> vec4<f32> {
    return fma(vec4<f32>(x_hi), w.hi, fma(vec4<f32>(x_lo), w.lo, acc));
}

// Store 4 columns col, col + stride, col + 2 stride, col + 3 stride of one row, those inside
// the chunk.
fn store4(row: u32, col: u32, stride: u32, v: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        if (col + stride * c < p.n) {
            store(row, col + stride * c, v[c]);
        }
    }
}

// `matmul_lanes` with `lanes` lanes a workgroup (a constant at each call, folded by the
// compiler): lane t computes columns nb, nb + lanes, nb + 2 lanes, nb + 3 lanes of 4 rows.
fn matmul_lanes_body(wid: vec3<u32>, t: u32, lanes: u32) {
    let span = 4u * lanes;
    let nb = wid.x * span + t;
    let m0 = wid.y * 4u;
    // Out-of-range columns and rows read a valid one and are not stored.
    // The four rows lie in one group (a workgroup covers part of one).
    let w0 = wrow(min(nb, p.n - 1u));
    let w1 = wrow(min(nb + lanes, p.n - 1u));
    let w2 = wrow(min(nb + 2u * lanes, p.n - 1u));
    let w3 = wrow(min(nb + 3u * lanes, p.n - 1u));
    let ws = wstep(wid.x * span);
    let x0 = (min(m0, p.m - 1u) + p.x_row) * p.x_stride / 4u;
    let x1 = (min(m0 + 1u, p.m - 1u) + p.x_row) * p.x_stride / 4u;
    let x2 = (min(m0 + 2u, p.m - 1u) + p.x_row) * p.x_stride / 4u;
    let x3 = (min(m0 + 3u, p.m - 1u) + p.x_row) * p.x_stride / 4u;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    // Steps of 8 values of k in two halves of 4 (one x vec4 each); when k % 8 == 4 the
    // second half of the last step is skipped.
    let steps = (p.k + 7u) / 8u;
    var o = 0u;
    for (var j = 0u; j < steps; j++) {
        let q0 = w[w0 + o];
        let q1 = w[w1 + o];
        let q2 = w[w2 + o];
        let q3 = w[w3 + o];
        o += ws;
        var lo = pair(q0.x, q1.x, q2.x, q3.x);
        var hi = pair(q0.y, q1.y, q2.y, q3.y);
        var v0 = x4[x0 + 2u * j];
        var v1 = x4[x1 + 2u * j];
        var v2 = x4[x2 + 2u * j];
        var v3 = x4[x3 + 2u * j];
        a0 = step2(step2(a0, v0.x, v0.y, lo), v0.z, v0.w, hi);
        a1 = step2(step2(a1, v1.x, v1.y, lo), v1.z, v1.w, hi);
        a2 = step2(step2(a2, v2.x, v2.y, lo), v2.z, v2.w, hi);
        a3 = step2(step2(a3, v3.x, v3.y, lo), v3.z, v3.w, hi);
        if (j * 8u + 8u <= p.k) {
            lo = pair(q0.z, q1.z, q2.z, q3.z);
            hi = pair(q0.w, q1.w, q2.w, q3.w);
            v0 = x4[x0 + 2u * j + 1u];
            v1 = x4[x1 + 2u * j + 1u];
            v2 = x4[x2 + 2u * j + 1u];
            v3 = x4[x3 + 2u * j + 1u];
            a0 = step2(step2(a0, v0.x, v0.y, lo), v0.z, v0.w, hi);
            a1 = step2(step2(a1, v1.x, v1.y, lo), v1.z, v1.w, hi);
            a2 = step2(step2(a2, v2.x, v2.y, lo), v2.z, v2.w, hi);
            a3 = step2(step2(a3, v3.x, v3.y, lo), v3.z, v3.w, hi);
        }
    }
    let rows = array<vec4<f32>, 4>(a0, a1, a2, a3);
    for (var r = 0u; r < 4u; r++) {
        if (m0 + r < p.m) {
            store4(m0 + r, nb, lanes, rows[r]);
        }
    }
}


@compute @workgroup_size(64, 1, 1)
fn matmul_lanes(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    matmul_lanes_body(wid, t, 64u);
}

@compute @workgroup_size(8, 1, 1)
fn matmul_lanes8(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    matmul_lanes_body(wid, t, 8u);
}

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// 1 / RMS of the x row at vec4 xo (norm = 1; 1 otherwise), summed as norm.wgsl's
// rms_norm_lanes, at lane-uniform addresses.
fn lanes_inv_rms(xo: u32) -> f32 {
    if (p.norm != 1u) {
        return 1.0;
    }
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < p.k / 4u; j++) {
        let v = x4[xo + j];
        s += v * v;
    }
    return 1.0 / sqrt(hsum(s) / f32(p.k) + p.eps);
}

// vec4 i of the x row at vec4 xo, normalised as rms_norm_lanes does when norm = 1.
fn xn4(xo: u32, i: u32, inv: f32) -> vec4<f32> {
    let v = x4[xo + i];
    if (p.norm != 1u) {
        return v;
    }
    return v * inv * (1.0 + nw4[i]);
}

// One row of x: 8 columns per lane, 512 per workgroup (columns nb + 64 c: c < 4 in `a`, the
// rest in `b`). With `glu` (folded by the compiler): 4 columns per lane, 256 per workgroup,
// `a` from the gate chunk (binding 2) and `b` from the same rows of the up chunk (binding 6),
// stored as gelu_tanh(a) * b.
fn matvec_lanes_body(wid: vec3<u32>, nwg: vec3<u32>, t: u32, glu: bool) {
    let g = (wid.x + wid.y * nwg.x) * select(LANE_GROUP_ROWS, LANE_GROUP_ROWS / 2u, glu);
    let nb = g + t;
    // The rows are one group's; interleaved, the group is one contiguous run.
    let w0 = wrow(min(nb, p.n - 1u));
    let w1 = wrow(min(nb + 64u, p.n - 1u));
    let w2r = wrow(min(nb + 128u, p.n - 1u));
    let w3 = wrow(min(nb + 192u, p.n - 1u));
    var w4 = wrow(min(nb + 256u, p.n - 1u));
    var w5 = wrow(min(nb + 320u, p.n - 1u));
    var w6 = wrow(min(nb + 384u, p.n - 1u));
    var w7 = wrow(min(nb + 448u, p.n - 1u));
    if (glu) {
        w4 = w0;
        w5 = w1;
        w6 = w2r;
        w7 = w3;
    }
    let ws = wstep(g);
    let xo = p.x_row * p.x_stride / 4u;
    let inv = lanes_inv_rms(xo);
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    let steps = (p.k + 7u) / 8u;
    var o = 0u;
    for (var j = 0u; j < steps; j++) {
        let q0 = w[w0 + o];
        let q1 = w[w1 + o];
        let q2 = w[w2r + o];
        let q3 = w[w3 + o];
        var q4: vec4<u32>;
        var q5: vec4<u32>;
        var q6: vec4<u32>;
        var q7: vec4<u32>;
        if (glu) {
            q4 = w2[w4 + o];
            q5 = w2[w5 + o];
            q6 = w2[w6 + o];
            q7 = w2[w7 + o];
        } else {
            q4 = w[w4 + o];
            q5 = w[w5 + o];
            q6 = w[w6 + o];
            q7 = w[w7 + o];
        }
        o += ws;
        let v = xn4(xo, 2u * j, inv);
        a = step2(a, v.x, v.y, pair(q0.x, q1.x, q2.x, q3.x));
        a = step2(a, v.z, v.w, pair(q0.y, q1.y, q2.y, q3.y));
        b = step2(b, v.x, v.y, pair(q4.x, q5.x, q6.x, q7.x));
        b = step2(b, v.z, v.w, pair(q4.y, q5.y, q6.y, q7.y));
        if (j * 8u + 8u <= p.k) {
            let u = xn4(xo, 2u * j + 1u, inv);
            a = step2(a, u.x, u.y, pair(q0.z, q1.z, q2.z, q3.z));
            a = step2(a, u.z, u.w, pair(q0.w, q1.w, q2.w, q3.w));
            b = step2(b, u.x, u.y, pair(q4.z, q5.z, q6.z, q7.z));
            b = step2(b, u.z, u.w, pair(q4.w, q5.w, q6.w, q7.w));
        }
    }
    if (glu) {
        for (var c = 0u; c < 4u; c++) {
            if (nb + 64u * c < p.n) {
                put(0u, nb + 64u * c, gelu_tanh(a[c]) * b[c]);
            }
        }
    } else {
        store4(0u, nb, 64u, a);
        store4(0u, nb + 256u, 64u, b);
    }
}

@compute @workgroup_size(64, 1, 1)
fn matvec_lanes(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    matvec_lanes_body(wid, nwg, t, false);
}

@compute @workgroup_size(64, 1, 1)
fn matvec_glu_lanes(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    matvec_lanes_body(wid, nwg, t, true);
}
