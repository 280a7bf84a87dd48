//! Greedy selection on the GPU (`shaders/sample.wgsl`): the argmax of a row of logits and
//! its log-probability, so that a greedy decode step reads back 16 bytes per sequence.

use super::{check, u32_arg};
use crate::gpu::{DType, Gpu, KernelKey, Recorder, Tensor};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    row: u32,
    slot: u32,
    next_row: u32,
}

/// Record the greedy pick over row `row` of `logits` (f32 `[rows, vocab]`) into slot `slot`
/// of `out` (a U32 tensor of 4 values per slot); decode it with [`decode_pick`] (or read it
/// with [`read_pick`]).
pub fn argmax_logprob(
    rec: &mut Recorder,
    logits: &Tensor,
    row: usize,
    out: &Tensor,
    slot: usize,
) -> Result<()> {
    record_pick(rec, logits, row, out, slot, None)
}

/// [`argmax_logprob`] that also writes the chosen id into element `next_row` of `next_ids`
/// (a U32 tensor): the input token of the next decode step, which can then be queued before
/// this pick is read back.
pub fn argmax_logprob_feed(
    rec: &mut Recorder,
    logits: &Tensor,
    row: usize,
    out: &Tensor,
    slot: usize,
    next_ids: &Tensor,
    next_row: usize,
) -> Result<()> {
    record_pick(rec, logits, row, out, slot, Some((next_ids, next_row)))
}

fn record_pick(
    rec: &mut Recorder,
    logits: &Tensor,
    row: usize,
    out: &Tensor,
    slot: usize,
    feed: Option<(&Tensor, usize)>,
) -> Result<()> {
    const K: &str = "argmax_logprob";
    check(
        logits.dtype() == DType::F32 && row < logits.rows(),
        K,
        || format!("row {row} of {} is not an f32 row", logits.name()),
    )?;
    check(
        out.dtype() == DType::U32 && out.numel() >= 4 * (slot + 1),
        K,
        || format!("{} must be u32 with room for slot {slot}", out.name()),
    )?;
    if let Some((ids, next_row)) = feed {
        check(
            ids.dtype() == DType::U32 && next_row < ids.numel() && ids.buffer() != out.buffer(),
            K,
            || {
                format!(
                    "{} must be a separate u32 tensor with element {next_row}",
                    ids.name()
                )
            },
        )?;
    }
    let params = Params {
        n: u32_arg(K, "vocab", logits.cols())?,
        row: u32_arg(K, "row", row)?,
        slot: u32_arg(K, "slot", slot)?,
        next_row: u32_arg(K, "next row", feed.map_or(0, |f| f.1))?,
    };
    match feed {
        None => {
            let key = KernelKey::new("sample", "argmax_lse");
            rec.dispatch(&key, &params, &[logits.buffer(), out.buffer()], [1, 1, 1])?;
        }
        Some((ids, _)) => {
            let key = KernelKey::new("sample", "argmax_lse_feed");
            let buffers = [logits.buffer(), out.buffer(), ids.buffer()];
            rec.dispatch(&key, &params, &buffers, [1, 1, 1])?;
        }
    }
    Ok(())
}

/// The chosen id and its log-probability from one slot's four words written by
/// [`argmax_logprob`].
pub fn decode_pick(words: &[u32]) -> (u32, f32) {
    let (best, max, sum) = (
        f32::from_bits(words[1]),
        f32::from_bits(words[2]),
        f32::from_bits(words[3]),
    );
    (words[0], best - max - sum.ln())
}

/// Read slot `slot` of the output of [`argmax_logprob`]: the chosen id and its
/// log-probability.
pub fn read_pick(gpu: &Gpu, out: &Tensor, slot: usize) -> Result<(u32, f32)> {
    let raw = gpu.read_bytes(out.buffer(), 16 * slot as u64, 16)?;
    Ok(decode_pick(bytemuck::cast_slice(&raw)))
}

/// CPU reference: the first index of the maximum and its log-softmax value.
pub fn argmax_logprob_ref(logits: &[f32]) -> (u32, f32) {
    let id = crate::generate::argmax(logits);
    let (lp, _) = crate::generate::logprobs(logits, id, 0);
    (id, lp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu_with_limit, rand_vec};

    fn case(logits: &[f32], rows: usize, row: usize) {
        let gpu = gpu_with_limit(None);
        let n = logits.len() / rows;
        let t = Tensor::from_f32(&gpu, "logits", &[rows, n], logits).unwrap();
        let out = Tensor::from_u32(&gpu, "pick", &[12], &[0; 12]).unwrap();
        let mut rec = Recorder::new(&gpu);
        argmax_logprob(&mut rec, &t, row, &out, 2).unwrap();
        rec.run().unwrap();
        let (id, lp) = read_pick(&gpu, &out, 2).unwrap();
        let (want_id, want_lp) = argmax_logprob_ref(&logits[row * n..(row + 1) * n]);
        assert_eq!(id, want_id);
        assert!(
            (lp - want_lp).abs() < 1e-4 * (1.0 + want_lp.abs()),
            "{lp} vs {want_lp}"
        );
        assert_eq!(
            read_pick(&gpu, &out, 0).unwrap().0,
            0,
            "other slots untouched"
        );
    }

    #[test]
    fn matches_reference_on_a_vocabulary_sized_row() {
        case(&rand_vec(257_216, 30.0, 5), 1, 0);
        case(&rand_vec(3 * 1000, 5.0, 6), 3, 2);
        case(&rand_vec(7, 1.0, 7), 1, 0);
    }

    #[test]
    fn feed_writes_the_next_input_token() {
        let gpu = gpu_with_limit(None);
        let logits = rand_vec(2 * 5000, 8.0, 9);
        let t = Tensor::from_f32(&gpu, "logits", &[2, 5000], &logits).unwrap();
        let out = Tensor::from_u32(&gpu, "pick", &[8], &[0; 8]).unwrap();
        let ids = Tensor::from_u32(&gpu, "ids", &[3], &[7, 7, 7]).unwrap();
        let mut rec = Recorder::new(&gpu);
        argmax_logprob_feed(&mut rec, &t, 1, &out, 1, &ids, 2).unwrap();
        rec.run().unwrap();
        let (want, _) = argmax_logprob_ref(&logits[5000..]);
        assert_eq!(read_pick(&gpu, &out, 1).unwrap().0, want);
        let fed: Vec<u32> =
            bytemuck::pod_collect_to_vec(&gpu.read_bytes(ids.buffer(), 0, 12).unwrap());
        assert_eq!(fed, [7, 7, want]);
        let mut rec = Recorder::new(&gpu);
        let err = argmax_logprob_feed(&mut rec, &t, 0, &out, 0, &ids, 3).unwrap_err();
        assert!(err.to_string().contains("element 3"), "{err}");
        assert!(argmax_logprob_feed(&mut rec, &t, 0, &out, 0, &out, 0).is_err());
    }

    #[test]
    fn ties_pick_the_first_index() {
        let mut logits = vec![0.0f32; 1000];
        logits[700] = 5.0;
        logits[300] = 5.0;
        logits[900] = 5.0;
        case(&logits, 1, 0);
    }

    #[test]
    fn rejects_bad_arguments() {
        let gpu = gpu_with_limit(None);
        let t = Tensor::zeros(&gpu, "logits", &[1, 10]).unwrap();
        let out = Tensor::zeros(&gpu, "pick", &[4]).unwrap();
        let mut rec = Recorder::new(&gpu);
        assert!(
            argmax_logprob(&mut rec, &t, 0, &out, 0).is_err(),
            "f32 output is rejected"
        );
        let out = Tensor::from_u32(&gpu, "pick", &[4], &[0; 4]).unwrap();
        assert!(
            argmax_logprob(&mut rec, &t, 1, &out, 0).is_err(),
            "row out of range"
        );
        assert!(
            argmax_logprob(&mut rec, &t, 0, &out, 1).is_err(),
            "slot out of range"
        );
    }
}
