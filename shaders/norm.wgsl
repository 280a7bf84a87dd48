// Row-wise normalisation over the last dimension, one 128-thread workgroup per row.
//
// layer_norm (torch LayerNorm, biased variance):
//   out[r, j] = (x[r, j] - mean_r) / sqrt(var_r + eps) * w[j] + b[j]
//   mean_r = sum_j x[r, j] / cols,  var_r = sum_j (x[r, j] - mean_r)^2 / cols
// Computed in two passes on values shifted by the row's first element s = x[r, 0]:
//   m' = mean(x - s), var = mean(((x - s) - m')^2), out = ((x - s) - m') * inv * w + b,
// so a large common offset (x ~ 1000 + noise) costs no precision: x - s is exact for nearby
// values and the centred values never pass through a rounding at the offset's magnitude.
//
// rms_norm (Gemma RMSNorm):
//   out[r, j] = x[r, j] * 1/sqrt(sum_j x[r, j]^2 / cols + eps) * (1 + w[j])
//
// x    f32 [.., cols], rows x_row .. x_row + rows are read.
// w, b f32 [cols].
// out  f32 [.., cols], rows out_row .. out_row + rows are written; a different buffer from x.
// Workgroup linear index wid.x + wid.y * nwg.x is the row (Recorder::grid).
// Sums are f32: per-thread strided partial sums, then a tree reduction in workgroup memory.
//
// `layer_norm_lanes` / `rms_norm_lanes` (CPU adapters such as lavapipe, where a workgroup is a
// SIMD loop on one core and every barrier a switch between its invocations): lane t of
// workgroup g owns row 64 * g + t and walks it alone in vec4s (cols % 4 == 0), with no
// barriers; the weights are read at lane-uniform addresses. Sums are four running f32 lanes
// of a vec4, added at the end.

struct Params {
    cols: u32,
    rows: u32,
    x_row: u32,
    out_row: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// Used by layer_norm only.
@group(0) @binding(4) var<storage, read> b: array<f32>;
// The same bindings as vec4s, for the `*_lanes` kernels (cols % 4 == 0).
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> b4: array<vec4<f32>>;

const WG: u32 = 128u;
var<workgroup> red: array<f32, 128>;

// Sum of `v` over the workgroup, returned to every thread. Must be called in uniform control
// flow. The leading barrier protects `red` from readers of a previous reduction.
fn reduce_sum(t: u32, v: f32) -> f32 {
    workgroupBarrier();
    red[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            red[t] += red[t + s];
        }
        workgroupBarrier();
    }
    return red[0];
}

@compute @workgroup_size(128, 1, 1)
fn layer_norm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let xb = (p.x_row + row) * p.cols;
    let ob = (p.out_row + row) * p.cols;
    let n = f32(p.cols);
    let shift = x[xb];
    var s = 0.0;
    for (var j = t; j < p.cols; j += WG) {
        s += x[xb + j] - shift;
    }
    let mean = reduce_sum(t, s) / n;
    var q = 0.0;
    for (var j = t; j < p.cols; j += WG) {
        let d = (x[xb + j] - shift) - mean;
        q += d * d;
    }
    let variance = reduce_sum(t, q) / n;
    let inv = 1.0 / sqrt(variance + p.eps);
    for (var j = t; j < p.cols; j += WG) {
        let d = (x[xb + j] - shift) - mean;
        out[ob + j] = d * inv * w[j] + b[j];
    }
}

@compute @workgroup_size(128, 1, 1)
fn rms_norm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let xb = (p.x_row + row) * p.cols;
    let ob = (p.out_row + row) * p.cols;
    var s = 0.0;
    for (var j = t; j < p.cols; j += WG) {
        let v = x[xb + j];
        s += v * v;
    }
    let inv = 1.0 / sqrt(reduce_sum(t, s) / f32(p.cols) + p.eps);
    for (var j = t; j < p.cols; j += WG) {
        out[ob + j] = x[xb + j] * inv * (1.0 + w[j]);
    }
}

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// The row lane t of this workgroup owns (p.rows or more for the spare lanes of the last).
fn lane_row(wid: vec3<u32>, nwg: vec3<u32>, t: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 64u + t;
}

@compute @workgroup_size(64, 1, 1)
fn layer_norm_lanes(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = lane_row(wid, nwg, t);
    if (row >= p.rows) {
        return; // no barriers: lanes may leave
    }
    let c4 = p.cols / 4u;
    let xb = (p.x_row + row) * c4;
    let ob = (p.out_row + row) * c4;
    let n = f32(p.cols);
    let shift = vec4<f32>(x4[xb].x);
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < c4; j++) {
        s += x4[xb + j] - shift;
    }
    let mean = vec4<f32>(hsum(s) / n);
    var q = vec4<f32>(0.0);
    for (var j = 0u; j < c4; j++) {
        let d = (x4[xb + j] - shift) - mean;
        q += d * d;
    }
    let inv = 1.0 / sqrt(hsum(q) / n + p.eps);
    for (var j = 0u; j < c4; j++) {
        let d = (x4[xb + j] - shift) - mean;
        out4[ob + j] = d * inv * w4[j] + b4[j];
    }
}

@compute @workgroup_size(64, 1, 1)
fn rms_norm_lanes(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = lane_row(wid, nwg, t);
    if (row >= p.rows) {
        return;
    }
    let c4 = p.cols / 4u;
    let xb = (p.x_row + row) * c4;
    let ob = (p.out_row + row) * c4;
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < c4; j++) {
        let v = x4[xb + j];
        s += v * v;
    }
    let inv = 1.0 / sqrt(hsum(s) / f32(p.cols) + p.eps);
    for (var j = 0u; j < c4; j++) {
        out4[ob + j] = x4[xb + j] * inv * (1.0 + w4[j]);
    }
}
