// Logit soft-capping (Gemma 2), in place on a range of f32 values:
//   x[off + i] = cap * tanh(x[off + i] / cap),  i in 0 .. n
// One element per thread, 256 threads per workgroup, linear workgroup index
// wid.x + wid.y * nwg.x (Recorder::grid). tanh's argument is clamped to ±15, where it is ±1
// in f32, so no implementation overflows.

struct Params {
    n: u32,
    off: u32,
    cap: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn softcap(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + t;
    if (i >= p.n) {
        return;
    }
    let j = p.off + i;
    x[j] = p.cap * tanh(clamp(x[j] / p.cap, -15.0, 15.0));
}
