// Embedding gather from one chunk of an f16 table:
//   out[out_row + i, :] = combine(out[out_row + i, :], table[ids[i], :] * scale),  i in 0 .. n
//
// table  one chunk of an f16 [vocab, dim] matrix holding rows row_start .. row_start + rows,
//        each padded to `stride2` u32 words (2 halves per word, unpack2x16float), row-major
//        or lane-interleaved (`interleaved` = 1: 4-word units, include/lanes.wgsl).
// ids    u32 [n]. Only ids inside this chunk's row range are handled by this dispatch; ids
//        >= vocab are handled by the dispatch with `last` = 1, which uses zeros instead of a
//        table row (so nothing is read out of bounds; the host is expected to reject them).
// out    f32 [.., dim].
// MODE (override constant): 0 stores, 1 adds (learned position embeddings), 2 multiplies.
// One 64-thread workgroup per id, workgroup linear index wid.x + wid.y * nwg.x.

struct Params {
    n: u32,
    dim: u32,
    stride2: u32,
    row_start: u32,
    rows: u32,
    vocab: u32,
    out_row: u32,
    last: u32,
    scale: f32,
    interleaved: u32,
    _pad1: u32,
    _pad2: u32,
}

override MODE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;

fn put(i: u32, v: f32) {
    var r = v;
    if (MODE == 1u) {
        r += out[i];
    } else if (MODE == 2u) {
        r *= out[i];
    }
    out[i] = r;
}

@compute @workgroup_size(64, 1, 1)
fn embed(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let i = wid.x + wid.y * nwg.x;
    if (i >= p.n) {
        return;
    }
    let id = ids[i];
    let inside = id >= p.row_start && id - p.row_start < p.rows;
    if (!inside && !(p.last == 1u && id >= p.vocab)) {
        return;
    }
    let r = id - p.row_start;
    // Word j of the row is word j % 4 of its unit j / 4, at tb + (j / 4) * ts * 4 + j % 4:
    // units follow each other row-major (ts = 1), or lie ts units apart interleaved.
    let tb = lane_row_base(r, p.stride2 / 4u, p.interleaved == 1u) * 4u;
    let ts = lane_unit_step(r, p.rows, p.interleaved == 1u);
    let ob = (p.out_row + i) * p.dim;
    let words = (p.dim + 1u) / 2u;
    for (var j = t; j < words; j += WG) {
        var v = vec2<f32>(0.0);
        if (inside) {
            v = unpack2x16float(table[tb + (j / 4u) * ts * 4u + j % 4u]) * p.scale;
        }
        put(ob + 2u * j, v.x);
        if (2u * j + 1u < p.dim) {
            put(ob + 2u * j + 1u, v.y);
        }
    }
}
