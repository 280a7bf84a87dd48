// Lane-interleaved weight layout, shared by the kernels that read f16 weight chunks
// (prepended to matmul.wgsl and embed.wgsl by src/gpu/shaders.rs; `lane_unit` in
// src/gpu/tensor.rs writes it, and a unit test keeps the constants equal).
//
// A chunk holds `rows` rows of `units` units each (a unit is whatever the kernel loads at
// once: a vec4<u32> of 8 halves). Row-major: unit j of row r is at r * units + j.
// Lane-interleaved: rows in groups of LANE_GROUP_ROWS, a group stored as `units` slices that
// each hold one unit of every row of the group, in row order; a short last group's slices are
// its row count rounded up to LANE_BLOCK_ROWS. Unit j of row r is then at
// lane_row_base(r) + j * lane_unit_step(r).

const LANE_GROUP_ROWS: u32 = 512u;
const LANE_BLOCK_ROWS: u32 = 64u;

// Index of unit 0 of row `row`.
fn lane_row_base(row: u32, units: u32, interleaved: bool) -> u32 {
    if (!interleaved) {
        return row * units;
    }
    let start = row / LANE_GROUP_ROWS * LANE_GROUP_ROWS;
    return start * units + (row - start);
}

// Distance between consecutive units of row `row` (the same for every row of a group).
fn lane_unit_step(row: u32, rows: u32, interleaved: bool) -> u32 {
    if (!interleaved) {
        return 1u;
    }
    let start = row / LANE_GROUP_ROWS * LANE_GROUP_ROWS;
    return min(LANE_GROUP_ROWS, (rows - start + LANE_BLOCK_ROWS - 1u) / LANE_BLOCK_ROWS * LANE_BLOCK_ROWS);
}

