// Element-wise combination of two f32 ranges of equal length n:
//   dst[dst_off + i] = combine(dst[dst_off + i], src[src_off + i]),  i in 0 .. n
// MODE (override constant) 0 stores (copy), 1 adds (residual: acc += x), 2 multiplies.
// src and dst are different buffers. One element per thread, 256 threads per workgroup; the
// workgroup linear index is wid.x + wid.y * nwg.x (Recorder::grid).

struct Params {
    n: u32,
    src_off: u32,
    dst_off: u32,
    _pad: u32,
}

override MODE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn combine(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + t;
    if (i >= p.n) {
        return;
    }
    var v = src[p.src_off + i];
    let d = p.dst_off + i;
    if (MODE == 1u) {
        v += dst[d];
    } else if (MODE == 2u) {
        v *= dst[d];
    }
    dst[d] = v;
}
