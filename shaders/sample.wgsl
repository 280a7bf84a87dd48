// Greedy pick and log-sum-exp over one row of f32 logits, so a decode step reads back 16 bytes
// instead of the whole vocabulary:
//   id   = argmax_i logits[i]           (the first index on ties, as torch.argmax)
//   m    = max_i logits[i]
//   s    = sum_i exp(logits[i] - m)      =>  logprob(id) = logits[id] - m - ln(s)
// One workgroup of 256 threads: each keeps a strided running (best, index) and an online
// (max, sum) pair, then a tree reduction merges them. out[4 slot..4 slot + 4] = [id, best, m, s]
// as u32 bits (a decode step writes each sequence's pick into its own slot).
// `argmax_lse_feed` also writes the id into next_ids[next_row]: the next decode step's input
// token, so that step can be queued before this one's pick is read back.

struct Params {
    n: u32,
    row: u32,
    slot: u32,
    next_row: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
@group(0) @binding(3) var<storage, read_write> next_ids: array<u32>;

const WG: u32 = 256u;
const LOWEST: f32 = -3.4e38;

var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;
var<workgroup> run_m: array<f32, 256>;
var<workgroup> run_s: array<f32, 256>;

// Reduce the row into element 0 of the workgroup arrays.
fn reduce_row(t: u32) {
    var bv = LOWEST;
    var bi = 0xffffffffu;
    var m = LOWEST;
    var s = 0.0;
    let base = p.row * p.n;
    for (var i = t; i < p.n; i += WG) {
        let v = logits[base + i];
        if (v > bv) {
            bv = v;
            bi = i;
        }
        if (v > m) {
            s = s * exp(m - v) + 1.0;
            m = v;
        } else {
            s += exp(v - m);
        }
    }
    best_v[t] = bv;
    best_i[t] = bi;
    run_m[t] = m;
    run_s[t] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (t < stride) {
            let ov = best_v[t + stride];
            let oi = best_i[t + stride];
            if (ov > best_v[t] || (ov == best_v[t] && oi < best_i[t])) {
                best_v[t] = ov;
                best_i[t] = oi;
            }
            let m1 = run_m[t];
            let m2 = run_m[t + stride];
            let mm = max(m1, m2);
            run_s[t] = run_s[t] * exp(m1 - mm) + run_s[t + stride] * exp(m2 - mm);
            run_m[t] = mm;
        }
        workgroupBarrier();
    }
}

fn store_pick() {
    let o = 4u * p.slot;
    out[o] = best_i[0];
    out[o + 1u] = bitcast<u32>(best_v[0]);
    out[o + 2u] = bitcast<u32>(run_m[0]);
    out[o + 3u] = bitcast<u32>(run_s[0]);
}

@compute @workgroup_size(256, 1, 1)
fn argmax_lse(@builtin(local_invocation_index) t: u32) {
    reduce_row(t);
    if (t == 0u) {
        store_pick();
    }
}

@compute @workgroup_size(256, 1, 1)
fn argmax_lse_feed(@builtin(local_invocation_index) t: u32) {
    reduce_row(t);
    if (t == 0u) {
        store_pick();
        next_ids[p.next_row] = best_i[0];
    }
}
