// Device probes for `paligemma bench`: what the adapter can do at best, to judge the model's
// kernels against.
//
// `fma_probe`: every thread runs `iters` rounds of 16 independent f32 FMA chains (four vec4
// accumulators), so the figure is arithmetic throughput, not latency: 32 FLOP per thread and
// round. The chains' sum is stored so nothing is optimised away.
//
// `read_probe`: streams `src` (vec4<f32>) once. Workgroup w reads the `per_group` vec4s from
// w * per_group on, thread t the elements t, t + 64, t + 128, … of that block (neighbouring
// threads read neighbouring 16-byte words: what GPUs coalesce), adds them up, and the
// workgroup's sum goes to out[w] after a tree reduction.
// `read_rows_probe`: the same block, but thread t streams its own contiguous run of
// per_group / 64 vec4s (what CPU adapters, which run the threads as SIMD lanes of one core,
// stream fastest: the layout of the `*_lanes` matrix kernels).

struct Params {
    iters: u32,
    per_group: u32,
    groups: u32,
    a: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<vec4<f32>>;

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64, 1, 1)
fn fma_probe(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let g = (wid.x + wid.y * nwg.x) * WG + t;
    let s = f32(g % 1024u) * 1.0e-3;
    var a0 = vec4<f32>(s, s + 0.1, s + 0.2, s + 0.3);
    var a1 = a0 + vec4<f32>(0.01);
    var a2 = a0 + vec4<f32>(0.02);
    var a3 = a0 + vec4<f32>(0.03);
    let m = vec4<f32>(p.a);
    let c = vec4<f32>(1.0 - p.a);
    for (var i = 0u; i < p.iters; i++) {
        a0 = fma(a0, m, c);
        a1 = fma(a1, m, c);
        a2 = fma(a2, m, c);
        a3 = fma(a3, m, c);
    }
    out[g] = dot(a0 + a1 + a2 + a3, vec4<f32>(1.0));
}

@compute @workgroup_size(64, 1, 1)
fn read_probe(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let w = wid.x + wid.y * nwg.x;
    var acc = vec4<f32>(0.0);
    if (w < p.groups) {
        let base = w * p.per_group;
        for (var i = t; i < p.per_group; i += WG) {
            acc += src[base + i];
        }
    }
    reduce(w, t, acc);
}

@compute @workgroup_size(64, 1, 1)
fn read_rows_probe(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let w = wid.x + wid.y * nwg.x;
    var acc = vec4<f32>(0.0);
    if (w < p.groups) {
        let run = p.per_group / WG;
        let base = w * p.per_group + t * run;
        for (var i = 0u; i < run; i++) {
            acc += src[base + i];
        }
    }
    reduce(w, t, acc);
}

// Tree-reduce the threads' sums; thread 0 stores the workgroup's.
fn reduce(w: u32, t: u32, acc: vec4<f32>) {
    red[t] = dot(acc, vec4<f32>(1.0));
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            red[t] += red[t + s];
        }
        workgroupBarrier();
    }
    if (t == 0u && w < p.groups) {
        out[w] = red[0];
    }
}
