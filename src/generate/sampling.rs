//! Choosing tokens from logits: greedy, temperature / top-k / top-p sampling, HF's repetition
//! penalty, and log-probabilities.

use super::SamplingParams;

/// SplitMix64: a tiny, fixed random generator so a seed means the same thing forever.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Chooses tokens from logits.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler with the given parameters.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng(params.seed);
        Sampler { params, rng }
    }

    /// Pick the next token from f32 logits (temperature, then top-k, then top-p, as HF).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.params.top_k > 0 {
            order.truncate(self.params.top_k);
        }
        let max = logits[order[0]] / t;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] / t - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cum += p / total;
                    cum >= self.params.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.next_f64() * total;
        for (p, &i) in probs.iter().zip(&order) {
            u -= p;
            if u <= 0.0 {
                return i as u32;
            }
        }
        *order.last().expect("at least one candidate") as u32
    }
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of `logits` at `id`, and the `k` best (id, log-probability) pairs.
pub fn logprobs(logits: &[f32], id: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64
        + logits
            .iter()
            .map(|v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, v) in logits.iter().enumerate() {
            if top.len() < k || *v > logits[top[k - 1].0 as usize] {
                let at = top.partition_point(|&(j, _)| logits[j as usize] >= *v);
                top.insert(at, (i as u32, 0.0));
                top.truncate(k);
            }
        }
        for t in &mut top {
            t.1 = lp(t.0 as usize);
        }
    }
    (lp(id as usize), top)
}

/// HF's `RepetitionPenaltyLogitsProcessor`: every token id in `history` (the prompt, image
/// placeholders included, and the tokens generated so far, as one or more slices) has its
/// logit divided by `penalty` if positive, multiplied by it if negative, once however often
/// it occurs. `penalty` 1 changes nothing.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[&[u32]], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &id in history.iter().flat_map(|h| h.iter()) {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let v = logits[i];
            logits[i] = if v < 0.0 { v * penalty } else { v / penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::SamplingParams;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn logprobs_match_a_direct_computation() {
        let logits = [1.0f32, 2.0, 0.5, 4.0, -3.0];
        let (lp, top) = logprobs(&logits, 1, 3);
        let z: f64 = logits.iter().map(|v| (*v as f64).exp()).sum();
        assert!((lp as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![3, 1, 0]);
        assert!((top[0].1 as f64 - (4.0 - z.ln())).abs() < 1e-6);
    }

    #[test]
    fn sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 5,
            top_p: 1.0,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        // The five largest logits are the 1.8s at indices 6, 13, 20, 27, 34 (sorted stably).
        assert!(a.iter().all(|&i| i % 7 == 6), "{a:?}");
        let mut c = Sampler::new(SamplingParams { seed: 43, ..params });
        let c: Vec<u32> = (0..20).map(|_| c.sample(&logits)).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn top_p_keeps_the_head() {
        let logits = [10.0f32, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 1,
        });
        assert!((0..50).all(|_| s.sample(&logits) == 0));
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let mut logits = vec![2.0f32, -1.0, 0.5, 3.0];
        // Token 0 twice: penalised once, as HF gathers and scatters unique ids.
        apply_repetition_penalty(&mut logits, &[&[0, 1], &[0]], 2.0);
        assert_eq!(logits, vec![1.0, -2.0, 0.5, 3.0]);
        let mut same = vec![2.0f32, -1.0];
        apply_repetition_penalty(&mut same, &[&[0, 1]], 1.0);
        assert_eq!(same, vec![2.0, -1.0]);
    }

    #[test]
    fn bad_params_are_rejected() {
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate().is_err());
        let p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(p.validate().is_err());
    }
}
