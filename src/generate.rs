//! The host-side scheduler: sampling, stopping and the per-token results.

use serde::Serialize;

use crate::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = no limit).
    pub top_p: f32,
    /// Seed of the sampler's random numbers; equal seeds give equal outputs.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Check the values are meaningful.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Request(format!(
                "temperature {} must be a finite number >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Request(format!(
                "top-p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Options of one generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Sampling; greedy by default.
    pub sampling: SamplingParams,
    /// Record the top-k log-probabilities of every step (0 = none).
    pub top_logprobs: usize,
    /// Stop at an end-of-sequence token (default true).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            sampling: SamplingParams::default(),
            top_logprobs: 0,
            stop_at_eos: true,
        }
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// The chosen token id.
    pub id: u32,
    /// Its log-probability under the model (log-softmax of the f32 logits, no temperature).
    pub logprob: f32,
    /// The best `top_logprobs` (id, log-probability) pairs, best first.
    pub top: Vec<(u32, f32)>,
}

/// Wall-clock timings of a request, in seconds (decode in tokens per second).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Loading the model (0 when it was already loaded).
    pub load_s: f64,
    /// The vision tower and projector.
    pub vision_s: f64,
    /// The prompt prefill up to the first token's logits.
    pub prefill_s: f64,
    /// Decode throughput after the first token.
    pub decode_tok_s: f64,
}

/// The result of a request.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Generation {
    /// The answer, special tokens removed (`<loc>`/`<seg>` kept).
    pub text: String,
    /// The generated ids (an end-of-sequence token included when it was generated).
    pub token_ids: Vec<u32>,
    /// Length of the prompt in tokens, image tokens included.
    pub prompt_tokens: usize,
    /// Per-step details.
    pub steps: Vec<Step>,
    /// Timings.
    pub timings: Timings,
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
