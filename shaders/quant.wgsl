// Quantised weights, dequantised inside the kernels (never expanded in memory): linear layers
// and the embedding gather. Activations, arithmetic and accumulation are f32.
//
// Weight chunk (binding 2, read as vec4<u32>; packing in src/gpu/quantize.rs): rows of `rows`
// output channels, each w_stride4 vec4<u32> ("units") of packed values, then the scales from
// u32 word scale_off = rows * w_stride4 * 4.
//   Q8 (override Q4 = false): 16 values a unit, one byte each, value i of a row in bits
//       8(i % 4) of word i / 4; w[r, i] = q · s[r], s[r] the f32 at word scale_off + r.
//   Q4 (Q4 = true): 32 values a unit = one block, one nibble each, value i in bits 4(i % 8) of
//       word i / 8; w[r, i] = q · s[r, i / 32], s an f16, half number r · w_stride4 + i / 32
//       of the scale words (low half first).
//   q is two's complement: shifting the field to the top of an i32 and arithmetic-shifting it
//   back down sign-extends it. Padding values are 0.
//
// Linear: out[m, n] = epilogue(sum_k x[m, k] · w[n, k] + bias[n]), parameters and epilogue as
// in shaders/matmul.wgsl: v = acc + bias (HAS_BIAS); v = gelu_tanh(v) (ACT = 1); MODE 0 stores
// v, 1 adds it to out, 2 multiplies out by it. This chunk writes columns out_col .. out_col + n
// of rows out_row .. out_row + m, reading x rows x_row .. x_row + m (row stride x_stride).
// Q8 row scales multiply the finished dot products; Q4 block scales each block's partial sum.
//   `qmatmul`: 32x32 output tile per 8x8 workgroup, 4x4 outputs per thread, k in steps of 32
//       (2 Q8 units / 1 Q4 block), weights dequantised into workgroup memory.
//   `qmatvec`: a few rows (decode, up to 4): 64 threads split k by units, 4 output columns
//       per workgroup for every row of x, so each weight is read once per launch.
//   `qmatvec_lanes` (one row: 8 columns per lane, 512 per workgroup, a unit per step) and
//       `qmatmul_lanes` (4 rows x 4 columns per lane, 4 x 256 per workgroup, 8 values of k per
//       step: larger loop bodies ran ~2x slower on lavapipe) for CPU adapters, laid out like
//       matmul.wgsl's `*_lanes`: each lane owns whole weight rows and walks k, x is read as
//       vec4<f32> at lane-uniform addresses (k % 4 == 0, x_stride == k).
// Embedding (`qembed`): out[out_row + i, :] = combine(out[out_row + i, :], table[ids[i], :] ·
// scale) for i < n, as shaders/embed.wgsl: this chunk holds table rows row_start .. row_start +
// rows; ids >= vocab give zeros in the dispatch with last = 1. One 64-thread workgroup per id
// (linear index wid.x + wid.y * nwg.x), one packed word per thread and step.

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
    scale_off: u32,
    norm: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

struct EmbedParams {
    n: u32,
    dim: u32,
    w_stride4: u32,
    row_start: u32,
    rows: u32,
    vocab: u32,
    out_row: u32,
    last: u32,
    scale: f32,
    scale_off: u32,
    _pad0: u32,
    _pad1: u32,
}

override Q4: bool = false;
override HAS_BIAS: bool = false;
override ACT: u32 = 0u;
override MODE: u32 = 0u;

// Linear layers.
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
// The same binding seen as vec4s by the `*_lanes` kernels.
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// The matrix-vector kernels only: the RMSNorm weight applied to x on the way in (norm = 1),
// and the up chunk of the GLU kernels (same format, shape and scale offset as binding 2's).
@group(0) @binding(5) var<storage, read> nw: array<f32>;
@group(0) @binding(5) var<storage, read> nw4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> w2: array<vec4<u32>>;
// Embedding gather (binding 2 is the table chunk `w`).
@group(0) @binding(0) var<uniform> pe: EmbedParams;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> eout: array<f32>;

const WG: u32 = 64u;

fn gelu_tanh(v: f32) -> f32 {
    let u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
    return 0.5 * v * (1.0 + tanh(clamp(u, -15.0, 15.0)));
}

fn combine(old: f32, v: f32) -> f32 {
    if (MODE == 1u) {
        return old + v;
    } else if (MODE == 2u) {
        return old * v;
    }
    return v;
}

// Word i of the weight chunk.
fn word(i: u32) -> u32 {
    return w[i >> 2u][i & 3u];
}

// Q8: the 4 values of a word.
fn q8(u: u32) -> vec4<f32> {
    return vec4<f32>((vec4<i32>(bitcast<i32>(u)) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

// Q4: the first and the last 4 values of a word.
fn q4lo(u: u32) -> vec4<f32> {
    return vec4<f32>((vec4<i32>(bitcast<i32>(u)) << vec4<u32>(28u, 24u, 20u, 16u)) >> vec4<u32>(28u));
}

fn q4hi(u: u32) -> vec4<f32> {
    return vec4<f32>((vec4<i32>(bitcast<i32>(u)) << vec4<u32>(12u, 8u, 4u, 0u)) >> vec4<u32>(28u));
}

// Q8 scale of row r.
fn row_scale(off: u32, r: u32) -> f32 {
    return bitcast<f32>(word(off + r));
}

// Q4 scale of block b of row r (`blocks` a row).
fn block_scale(off: u32, blocks: u32, r: u32, b: u32) -> f32 {
    return half_at(word(off + ((r * blocks + b) >> 1u)), r * blocks + b);
}

// The f16 of scale number i held in word u (low half first).
fn half_at(u: u32, i: u32) -> f32 {
    let h = unpack2x16float(u);
    return select(h.x, h.y, (i & 1u) == 1u);
}

// The scales of the up chunk (binding 6) when `up`, else of the weight chunk: only the GLU
// kernels may call these (any other kernel would have to bind the up chunk).
fn row_scale_in(up: bool, off: u32, r: u32) -> f32 {
    if (up) {
        let i = off + r;
        return bitcast<f32>(w2[i >> 2u][i & 3u]);
    }
    return row_scale(off, r);
}

fn block_scale_in(up: bool, off: u32, blocks: u32, r: u32, b: u32) -> f32 {
    if (up) {
        let i = r * blocks + b;
        let wi = off + (i >> 1u);
        return half_at(w2[wi >> 2u][wi & 3u], i);
    }
    return block_scale(off, blocks, r, b);
}

// The values of one unit along k, 4 at a time (Q8 uses v0 .. v3).
struct Vals {
    v0: vec4<f32>,
    v1: vec4<f32>,
    v2: vec4<f32>,
    v3: vec4<f32>,
    v4: vec4<f32>,
    v5: vec4<f32>,
    v6: vec4<f32>,
    v7: vec4<f32>,
}

// Values per unit and vec4s per unit.
fn unit_values() -> u32 {
    return select(16u, 32u, Q4);
}

// The integers of a unit of weights (unscaled).
fn deq(q: vec4<u32>) -> Vals {
    var v: Vals;
    if (Q4) {
        v.v0 = q4lo(q.x);
        v.v1 = q4hi(q.x);
        v.v2 = q4lo(q.y);
        v.v3 = q4hi(q.y);
        v.v4 = q4lo(q.z);
        v.v5 = q4hi(q.z);
        v.v6 = q4lo(q.w);
        v.v7 = q4hi(q.w);
    } else {
        v.v0 = q8(q.x);
        v.v1 = q8(q.y);
        v.v2 = q8(q.z);
        v.v3 = q8(q.w);
    }
    return v;
}

// acc + a · b.
fn fdot(a: vec4<f32>, b: vec4<f32>, acc: f32) -> f32 {
    return acc + dot(a, b);
}

fn vdot(a: Vals, b: Vals) -> f32 {
    var s = fdot(a.v3, b.v3, fdot(a.v2, b.v2, fdot(a.v1, b.v1, fdot(a.v0, b.v0, 0.0))));
    if (Q4) {
        s = fdot(a.v7, b.v7, fdot(a.v6, b.v6, fdot(a.v5, b.v5, fdot(a.v4, b.v4, s))));
    }
    return s;
}

// vdot(deq(q), b) in the same order, dequantising on the way (the packed unit is all that is
// kept in registers; `qmatvec` holds four of them).
fn qdot(q: vec4<u32>, b: Vals) -> f32 {
    if (Q4) {
        let s = fdot(q4hi(q.y), b.v3, fdot(q4lo(q.y), b.v2, fdot(q4hi(q.x), b.v1, fdot(q4lo(q.x), b.v0, 0.0))));
        return fdot(q4hi(q.w), b.v7, fdot(q4lo(q.w), b.v6, fdot(q4hi(q.z), b.v5, fdot(q4lo(q.z), b.v4, s))));
    }
    return fdot(q8(q.w), b.v3, fdot(q8(q.z), b.v2, fdot(q8(q.y), b.v1, fdot(q8(q.x), b.v0, 0.0))));
}

// Epilogue for column `col` of this chunk; `acc` is the dot product before the Q8 row scale.
fn store(row: u32, col: u32, acc: f32) {
    var v = acc;
    if (!Q4) {
        v *= row_scale(p.scale_off, col);
    }
    if (HAS_BIAS) {
        v += bias[p.bias_off + col];
    }
    if (ACT == 1u) {
        v = gelu_tanh(v);
    }
    put(row, col, v);
}

// Combine the finished value of column `col` of row `row` with out (MODE).
fn put(row: u32, col: u32, v: f32) {
    let i = (row + p.out_row) * p.out_stride + p.out_col + col;
    out[i] = combine(out[i], v);
}

// ---- threads kernels ----

// x[k0 .. k0 + 4] of the row starting at xb, zeros from k on.
fn xv4(xb: u32, k0: u32) -> vec4<f32> {
    if (k0 + 4u <= p.k) {
        return vec4<f32>(x[xb + k0], x[xb + k0 + 1u], x[xb + k0 + 2u], x[xb + k0 + 3u]);
    }
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if (k0 + e < p.k) {
            v[e] = x[xb + k0 + e];
        }
    }
    return v;
}

// xv4 normalised as norm.wgsl's rms_norm when norm = 1 (`inv` the row's 1 / RMS).
fn xn4(xb: u32, k0: u32, inv: f32) -> vec4<f32> {
    let v = xv4(xb, k0);
    if (p.norm != 1u) {
        return v;
    }
    let last = p.k - 1u;
    let g = vec4<f32>(nw[min(k0, last)], nw[min(k0 + 1u, last)], nw[min(k0 + 2u, last)], nw[min(k0 + 3u, last)]);
    return v * inv * (1.0 + g);
}

// The x values of the unit starting at k0 (normalised when norm = 1).
fn x_unit(xb: u32, k0: u32, inv: f32) -> Vals {
    var v: Vals;
    v.v0 = xn4(xb, k0, inv);
    v.v1 = xn4(xb, k0 + 4u, inv);
    v.v2 = xn4(xb, k0 + 8u, inv);
    v.v3 = xn4(xb, k0 + 12u, inv);
    if (Q4) {
        v.v4 = xn4(xb, k0 + 16u, inv);
        v.v5 = xn4(xb, k0 + 20u, inv);
        v.v6 = xn4(xb, k0 + 24u, inv);
        v.v7 = xn4(xb, k0 + 28u, inv);
    }
    return v;
}

const RV: u32 = 4u;
// Rows of x one `qmatvec` workgroup serves (the launcher's MATVEC_MAX_ROWS).
const MV: u32 = 4u;
var<workgroup> red: array<f32, 1024>; // [MV][RV][WG]

// Q4: the scales of unit (block) j of rows c0..c3 (c2, c3 of the up chunk when `glu`); Q8:
// ones (its row scale is applied in `store`).
fn unit_scales(c0: u32, c1: u32, c2: u32, c3: u32, j: u32, glu: bool) -> vec4<f32> {
    if (!Q4) {
        return vec4<f32>(1.0);
    }
    let o = p.scale_off;
    let b = p.w_stride4;
    return vec4<f32>(
        block_scale(o, b, c0, j),
        block_scale(o, b, c1, j),
        block_scale_in(glu, o, b, c2, j),
        block_scale_in(glu, o, b, c3, j),
    );
}

// 1 / RMS of each of the m <= MV rows of x (norm = 1; ones otherwise), as matmul.wgsl's
// `inv_rms`. Called in uniform control flow.
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

// RV output columns for all m <= MV rows of x, each weight unit loaded once for every row,
// as matmul.wgsl's `matvec`; with `glu`, 2 columns of gelu_tanh(x · gate) * (x · up) (rows
// n0, n0 + 1 of binding 2 and of binding 6).
fn qmatvec_body(wid: vec3<u32>, nwg: vec3<u32>, t: u32, glu: bool) {
    let cols = select(RV, 2u, glu);
    let n0 = (wid.x + wid.y * nwg.x) * cols;
    let last = p.n - 1u;
    let c0 = min(n0, last);
    let c1 = min(n0 + 1u, last);
    let c2 = select(min(n0 + 2u, last), c0, glu);
    let c3 = select(min(n0 + 3u, last), c1, glu);
    let uv = unit_values();
    let units = (p.k + uv - 1u) / uv;
    let inv = inv_rms(t);
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < MV; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    for (var j = t; j < units; j += WG) {
        let q0 = w[c0 * p.w_stride4 + j];
        let q1 = w[c1 * p.w_stride4 + j];
        var q2: vec4<u32>;
        var q3: vec4<u32>;
        if (glu) {
            q2 = w2[c2 * p.w_stride4 + j];
            q3 = w2[c3 * p.w_stride4 + j];
        } else {
            q2 = w[c2 * p.w_stride4 + j];
            q3 = w[c3 * p.w_stride4 + j];
        }
        let sc = unit_scales(c0, c1, c2, c3, j, glu);
        for (var i = 0u; i < MV; i++) {
            if (i < p.m) {
                let xu = x_unit((i + p.x_row) * p.x_stride, j * uv, inv[i]);
                let d = vec4<f32>(qdot(q0, xu), qdot(q1, xu), qdot(q2, xu), qdot(q3, xu));
                acc[i] = fma(d, sc, acc[i]);
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
            var g = red[t * WG];
            var u = red[(t + 2u) * WG];
            if (!Q4) {
                g *= row_scale(p.scale_off, n0 + r);
                u *= row_scale_in(true, p.scale_off, n0 + r);
            }
            put(i, n0 + r, gelu_tanh(g) * u);
        } else {
            store(i, n0 + r, red[t * WG]);
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn qmatvec(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    qmatvec_body(wid, nwg, t, false);
}

@compute @workgroup_size(64, 1, 1)
fn qmatvec_glu(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    qmatvec_body(wid, nwg, t, true);
}

const BM: u32 = 32u;
const BN: u32 = 32u;
const BK: u32 = 32u;

// Tiles stored k-major so a thread's 4 consecutive rows/columns are adjacent.
var<workgroup> xs: array<f32, 1024>; // [BK][BM]
var<workgroup> ws: array<f32, 1024>; // [BK][BN]

@compute @workgroup_size(8, 8, 1)
fn qmatmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.y * 8u + lid.x;
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    // Weight tile loads: thread t dequantises values 16h .. 16h + 16 of the step for row r.
    let r = t / 2u;
    let h = t % 2u;
    var acc: array<array<f32, 4>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // x tile: 32 rows x 32 k, 16 values per thread.
        for (var i = 0u; i < 16u; i++) {
            let idx = t + 64u * i;
            let xr = idx / BK;
            let xc = idx % BK;
            var v = 0.0;
            if (m0 + xr < p.m && k0 + xc < p.k) {
                v = x[(m0 + xr + p.x_row) * p.x_stride + k0 + xc];
            }
            xs[xc * BM + xr] = v;
        }
        var a = vec4<f32>(0.0);
        var b = vec4<f32>(0.0);
        var c = vec4<f32>(0.0);
        var d = vec4<f32>(0.0);
        if (n0 + r < p.n) {
            if (Q4) {
                // k0 < k, so block k0 / 32 is inside the row.
                let blk = k0 / 32u;
                let q = w[(n0 + r) * p.w_stride4 + blk];
                let s = block_scale(p.scale_off, p.w_stride4, n0 + r, blk);
                let u0 = select(q.x, q.z, h == 1u);
                let u1 = select(q.y, q.w, h == 1u);
                a = q4lo(u0) * s;
                b = q4hi(u0) * s;
                c = q4lo(u1) * s;
                d = q4hi(u1) * s;
            } else {
                let kv = k0 / 16u + h;
                if (kv < p.w_stride4) {
                    let q = w[(n0 + r) * p.w_stride4 + kv];
                    a = q8(q.x);
                    b = q8(q.y);
                    c = q8(q.z);
                    d = q8(q.w);
                }
            }
        }
        let base = h * 16u;
        for (var e = 0u; e < 4u; e++) {
            ws[(base + e) * BN + r] = a[e];
            ws[(base + 4u + e) * BN + r] = b[e];
            ws[(base + 8u + e) * BN + r] = c[e];
            ws[(base + 12u + e) * BN + r] = d[e];
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var xa: array<f32, 4>;
            var wb: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                xa[i] = xs[kk * BM + lid.y * 4u + i];
                wb[i] = ws[kk * BN + lid.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] = fma(xa[i], wb[j], acc[i][j]);
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

// ---- lane kernels (CPU adapters) ----
// Weights are unpacked one packed word (4 Q8 / 8 Q4 values) at a time, so few values are live
// at once (each `.x` .. `.w` of a lane's vec4<u32> is its own gather on such drivers anyway).
// x indices are clamped to the row's last vec4, so the last unit needs no separate code: past
// k the weights are zero padding.

// The values of one packed word, 4 at a time: Q8 uses `a`, Q4 `a` then `b`.
struct Xw {
    a: vec4<f32>,
    b: vec4<f32>,
}

// The x values of word e after vec4 index xu of a row ending at vec4 xend.
fn xw(xu: u32, e: u32, xend: u32) -> Xw {
    if (Q4) {
        return Xw(x4[min(xu + 2u * e, xend)], x4[min(xu + 2u * e + 1u, xend)]);
    }
    return Xw(x4[min(xu + e, xend)], vec4<f32>(0.0));
}

// acc + the dot product of one packed word (unscaled) with its x values.
fn wdot(u: u32, v: Xw, acc: f32) -> f32 {
    if (Q4) {
        return fdot(q4hi(u), v.b, fdot(q4lo(u), v.a, acc));
    }
    return fdot(q8(u), v.a, acc);
}

// Accumulators of 8 columns: nb + 64c in `a` (c < 4) and `b` (c >= 4).
struct Acc8 {
    a: vec4<f32>,
    b: vec4<f32>,
}

// One word of 8 columns (columns 0..3's words in `p`, 4..7's in `q`) against x values `v`.
fn mv_word(acc: Acc8, p: vec4<u32>, q: vec4<u32>, v: Xw) -> Acc8 {
    return Acc8(
        vec4<f32>(wdot(p.x, v, acc.a.x), wdot(p.y, v, acc.a.y), wdot(p.z, v, acc.a.z), wdot(p.w, v, acc.a.w)),
        vec4<f32>(wdot(q.x, v, acc.b.x), wdot(q.y, v, acc.b.y), wdot(q.z, v, acc.b.z), wdot(q.w, v, acc.b.w)),
    );
}

// Q4 scales of block j of 4 columns.
fn scales4(c: vec4<u32>, j: u32) -> vec4<f32> {
    let s = p.scale_off;
    let b = p.w_stride4;
    return vec4<f32>(
        block_scale(s, b, c.x, j),
        block_scale(s, b, c.y, j),
        block_scale(s, b, c.z, j),
        block_scale(s, b, c.w, j),
    );
}

// Store columns col, col + 64, col + 128, col + 192 of one row, those inside the chunk.
fn store4(row: u32, col: u32, v: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        if (col + 64u * c < p.n) {
            store(row, col + 64u * c, v[c]);
        }
    }
}

// Q4 scales of block j of 4 columns of the up chunk (GLU).
fn scales4_up(c: vec4<u32>, j: u32) -> vec4<f32> {
    let s = p.scale_off;
    let b = p.w_stride4;
    return vec4<f32>(
        block_scale_in(true, s, b, c.x, j),
        block_scale_in(true, s, b, c.y, j),
        block_scale_in(true, s, b, c.z, j),
        block_scale_in(true, s, b, c.w, j),
    );
}

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// 1 / RMS of the x row at vec4 xo (norm = 1; 1 otherwise), as matmul.wgsl's `lanes_inv_rms`.
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

// `xw` of the x row starting at vec4 xo, normalised as rms_norm_lanes does when norm = 1.
fn xwn(xo: u32, xu: u32, e: u32, xend: u32, inv: f32) -> Xw {
    var v = xw(xu, e, xend);
    if (p.norm != 1u) {
        return v;
    }
    if (Q4) {
        v.a = v.a * inv * (1.0 + nw4[min(xu + 2u * e, xend) - xo]);
        v.b = v.b * inv * (1.0 + nw4[min(xu + 2u * e + 1u, xend) - xo]);
    } else {
        v.a = v.a * inv * (1.0 + nw4[min(xu + e, xend) - xo]);
    }
    return v;
}

// One row of x: 8 columns per lane, 512 per workgroup; with `glu` (folded by the compiler), 4
// columns per lane, 256 per workgroup, `a` of the gate chunk and `b` of the same rows of the
// up chunk, stored as gelu_tanh(a) * b.
fn qmatvec_lanes_body(wid: vec3<u32>, nwg: vec3<u32>, t: u32, glu: bool) {
    let nb = (wid.x + wid.y * nwg.x) * select(512u, 256u, glu) + t;
    // Out-of-range columns read a valid one and are not stored.
    let ca = min(vec4<u32>(nb) + vec4<u32>(0u, 64u, 128u, 192u), vec4<u32>(p.n - 1u));
    let cb = select(min(vec4<u32>(nb) + vec4<u32>(256u, 320u, 384u, 448u), vec4<u32>(p.n - 1u)), ca, glu);
    let wa = ca * p.w_stride4;
    let wb = cb * p.w_stride4;
    let uv4 = unit_values() / 4u;
    let xo = p.x_row * p.x_stride / 4u;
    let xend = xo + p.k / 4u - 1u;
    let inv = lanes_inv_rms(xo);
    var acc = Acc8(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var j = 0u; j < p.w_stride4; j++) {
        let xu = xo + j * uv4;
        let qa = array<vec4<u32>, 4>(w[wa.x + j], w[wa.y + j], w[wa.z + j], w[wa.w + j]);
        var qb: array<vec4<u32>, 4>;
        if (glu) {
            qb = array<vec4<u32>, 4>(w2[wb.x + j], w2[wb.y + j], w2[wb.z + j], w2[wb.w + j]);
        } else {
            qb = array<vec4<u32>, 4>(w[wb.x + j], w[wb.y + j], w[wb.z + j], w[wb.w + j]);
        }
        var u = Acc8(vec4<f32>(0.0), vec4<f32>(0.0));
        u = mv_word(u, vec4<u32>(qa[0].x, qa[1].x, qa[2].x, qa[3].x),
            vec4<u32>(qb[0].x, qb[1].x, qb[2].x, qb[3].x), xwn(xo, xu, 0u, xend, inv));
        u = mv_word(u, vec4<u32>(qa[0].y, qa[1].y, qa[2].y, qa[3].y),
            vec4<u32>(qb[0].y, qb[1].y, qb[2].y, qb[3].y), xwn(xo, xu, 1u, xend, inv));
        u = mv_word(u, vec4<u32>(qa[0].z, qa[1].z, qa[2].z, qa[3].z),
            vec4<u32>(qb[0].z, qb[1].z, qb[2].z, qb[3].z), xwn(xo, xu, 2u, xend, inv));
        u = mv_word(u, vec4<u32>(qa[0].w, qa[1].w, qa[2].w, qa[3].w),
            vec4<u32>(qb[0].w, qb[1].w, qb[2].w, qb[3].w), xwn(xo, xu, 3u, xend, inv));
        if (Q4) {
            acc.a = fma(u.a, scales4(ca, j), acc.a);
            if (glu) {
                acc.b = fma(u.b, scales4_up(cb, j), acc.b);
            } else {
                acc.b = fma(u.b, scales4(cb, j), acc.b);
            }
        } else {
            acc.a += u.a;
            acc.b += u.b;
        }
    }
    if (glu) {
        for (var c = 0u; c < 4u; c++) {
            let col = nb + 64u * c;
            if (col < p.n) {
                var g = acc.a[c];
                var v = acc.b[c];
                if (!Q4) {
                    g *= row_scale(p.scale_off, col);
                    v *= row_scale_in(true, p.scale_off, col);
                }
                put(0u, col, gelu_tanh(g) * v);
            }
        }
    } else {
        store4(0u, nb, acc.a);
        store4(0u, nb + 256u, acc.b);
    }
}

@compute @workgroup_size(64, 1, 1)
fn qmatvec_lanes(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    qmatvec_lanes_body(wid, nwg, t, false);
}

@compute @workgroup_size(64, 1, 1)
fn qmatvec_glu_lanes(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    qmatvec_lanes_body(wid, nwg, t, true);
}

// Row accumulators of the 4 x 4 block of a lane: component c is column nb + 64c.
struct Acc4 {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
}

// Dequantised word of one column (scaled by s for Q4): Q8 uses `a`.
fn wvals(u: u32, s: f32) -> Xw {
    if (Q4) {
        return Xw(q4lo(u) * s, q4hi(u) * s);
    }
    return Xw(q8(u), vec4<f32>(0.0));
}

// acc + x[i] · t[i] over i: one row's 4 values of k against 4 columns (t[i] holds value i of
// each column), fma on vec4s over the columns.
fn row_fma(acc: vec4<f32>, x: vec4<f32>, t: mat4x4<f32>) -> vec4<f32> {
    let a = fma(vec4<f32>(x.x), t[0], acc);
    let b = fma(vec4<f32>(x.y), t[1], a);
    let c = fma(vec4<f32>(x.z), t[2], b);
    return fma(vec4<f32>(x.w), t[3], c);
}

// One word of 4 columns (`q`, scales `s`) for 4 rows with x row starts `xr` (vec4 units).
fn mm_word(acc: Acc4, q: vec4<u32>, s: vec4<f32>, xr: vec4<u32>, e: u32, xe: vec4<u32>) -> Acc4 {
    let w0 = wvals(q.x, s.x);
    let w1 = wvals(q.y, s.y);
    let w2 = wvals(q.z, s.z);
    let w3 = wvals(q.w, s.w);
    let v0 = xw(xr.x, e, xe.x);
    let v1 = xw(xr.y, e, xe.y);
    let v2 = xw(xr.z, e, xe.z);
    let v3 = xw(xr.w, e, xe.w);
    let ta = transpose(mat4x4<f32>(w0.a, w1.a, w2.a, w3.a));
    var r = Acc4(
        row_fma(acc.r0, v0.a, ta),
        row_fma(acc.r1, v1.a, ta),
        row_fma(acc.r2, v2.a, ta),
        row_fma(acc.r3, v3.a, ta),
    );
    if (Q4) {
        let tb = transpose(mat4x4<f32>(w0.b, w1.b, w2.b, w3.b));
        r = Acc4(
            row_fma(r.r0, v0.b, tb),
            row_fma(r.r1, v1.b, tb),
            row_fma(r.r2, v2.b, tb),
            row_fma(r.r3, v3.b, tb),
        );
    }
    return r;
}

@compute @workgroup_size(64, 1, 1)
fn qmatmul_lanes(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let nb = wid.x * 256u + t;
    let m0 = wid.y * 4u;
    // Out-of-range columns and rows read a valid one and are not stored.
    let c = min(vec4<u32>(nb) + vec4<u32>(0u, 64u, 128u, 192u), vec4<u32>(p.n - 1u));
    // Rows' first words.
    let wr = c * (4u * p.w_stride4);
    let rows = min(vec4<u32>(m0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.m - 1u));
    let xo = (rows + vec4<u32>(p.x_row)) * (p.x_stride / 4u);
    let xe = xo + vec4<u32>(p.k / 4u - 1u);
    var acc: Acc4;
    var s = vec4<f32>(1.0);
    // 8 values of k per step (2 Q8 words / 1 Q4 word): small loop bodies run faster there.
    let steps = select(2u, 4u, Q4) * p.w_stride4;
    for (var h = 0u; h < steps; h++) {
        let xr = xo + vec4<u32>(2u * h);
        if (Q4) {
            if ((h & 3u) == 0u) {
                s = scales4(c, h >> 2u);
            }
            let q = vec4<u32>(word(wr.x + h), word(wr.y + h), word(wr.z + h), word(wr.w + h));
            acc = mm_word(acc, q, s, xr, 0u, xe);
        } else {
            // Words 0-1 or 2-3 of each column's unit.
            let j = (wr >> vec4<u32>(2u)) + vec4<u32>(h >> 1u);
            let hi = (h & 1u) == 1u;
            let q0 = select(w[j.x].xy, w[j.x].zw, hi);
            let q1 = select(w[j.y].xy, w[j.y].zw, hi);
            let q2 = select(w[j.z].xy, w[j.z].zw, hi);
            let q3 = select(w[j.w].xy, w[j.w].zw, hi);
            acc = mm_word(acc, vec4<u32>(q0.x, q1.x, q2.x, q3.x), s, xr, 0u, xe);
            acc = mm_word(acc, vec4<u32>(q0.y, q1.y, q2.y, q3.y), s, xr, 1u, xe);
        }
    }
    let out_rows = array<vec4<f32>, 4>(acc.r0, acc.r1, acc.r2, acc.r3);
    for (var r = 0u; r < 4u; r++) {
        if (m0 + r < p.m) {
            store4(m0 + r, nb, out_rows[r]);
        }
    }
}

// ---- embedding gather ----

fn eput(i: u32, v: f32) {
    eout[i] = combine(eout[i], v);
}

@compute @workgroup_size(64, 1, 1)
fn qembed(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let i = wid.x + wid.y * nwg.x;
    if (i >= pe.n) {
        return;
    }
    let id = ids[i];
    let inside = id >= pe.row_start && id - pe.row_start < pe.rows;
    if (!inside && !(pe.last == 1u && id >= pe.vocab)) {
        return;
    }
    let r = id - pe.row_start;
    let ob = (pe.out_row + i) * pe.dim;
    let per = select(4u, 8u, Q4);
    let words = (pe.dim + per - 1u) / per;
    for (var j = t; j < words; j += WG) {
        var lo = vec4<f32>(0.0);
        var hi = vec4<f32>(0.0);
        if (inside) {
            let u = word(r * pe.w_stride4 * 4u + j);
            if (Q4) {
                let s = block_scale(pe.scale_off, pe.w_stride4, r, j / 4u);
                lo = (q4lo(u) * s) * pe.scale;
                hi = (q4hi(u) * s) * pe.scale;
            } else {
                lo = (q8(u) * row_scale(pe.scale_off, r)) * pe.scale;
            }
        }
        let c = j * per;
        for (var e = 0u; e < 4u; e++) {
            if (c + e < pe.dim) {
                eput(ob + c + e, lo[e]);
            }
        }
        if (Q4) {
            for (var e = 0u; e < 4u; e++) {
                if (c + 4u + e < pe.dim) {
                    eput(ob + c + 4u + e, hi[e]);
                }
            }
        }
    }
}
