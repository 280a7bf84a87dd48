//! Generation: the [`Scheduler`] (requests in, steps, events out, with continuous batching),
//! the options and results of a request, sampling and stopping, and the blocking, streaming
//! and async conveniences on [`crate::model::PaliGemma`] built on it.

mod api;
mod beam;
mod sampling;
mod scheduler;
mod stop;

use serde::Serialize;

pub use api::{Event, GenerationStream};
pub use sampling::{apply_repetition_penalty, argmax, logprobs, Sampler};
pub use scheduler::{
    ImageFeatures, ImageInput, Prompt, Request, RequestId, Scheduler, SchedulerEvent,
    SchedulerOptions,
};
pub use stop::StopText;

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
    /// Stop strings: the answer ends just before the first occurrence of any of them (the
    /// tokens that completed it are still in [`Generation::token_ids`]).
    pub stop: Vec<String>,
    /// HF's repetition penalty: the logits of every token already in the sequence (prompt
    /// included) are divided by it when positive and multiplied by it when negative, before
    /// sampling. 1 (the default) is off; values above 1 discourage repetition.
    pub repetition_penalty: f32,
    /// Beam search: how many beams (1, the default, is off). More than one keeps that many
    /// candidate answers and returns the best by [`Generation::beam_score`], as HF's
    /// `generate(num_beams=N, do_sample=False)`; it needs a temperature of 0.
    pub num_beams: usize,
    /// Beam search: a finished answer's score is its summed log-probability divided by
    /// (generated tokens)^`length_penalty` (HF's `length_penalty`, default 1); larger values
    /// favour longer answers.
    pub length_penalty: f32,
    /// Beam search: when to stop (HF's `early_stopping`).
    pub early_stopping: EarlyStopping,
}

/// When beam search stops before `max_new_tokens` (HF's `early_stopping`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EarlyStopping {
    /// HF's `False` (the default): stop once the best running beam, scored at its current
    /// length, cannot beat the worst of `num_beams` finished answers.
    #[default]
    Heuristic,
    /// HF's `True`: stop as soon as `num_beams` answers have finished.
    Done,
    /// HF's `"never"`: as [`EarlyStopping::Heuristic`], but with a positive length penalty the
    /// running beams are scored at `max_new_tokens`, the best length they could reach.
    Never,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            sampling: SamplingParams::default(),
            top_logprobs: 0,
            stop_at_eos: true,
            stop: Vec::new(),
            repetition_penalty: 1.0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
        }
    }
}

impl GenerateOptions {
    /// Check the values are meaningful.
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_new_tokens == 0 {
            return Err(Error::Request("max_new_tokens must be at least 1".into()));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(Error::Request(format!(
                "repetition penalty {} must be a finite number > 0",
                self.repetition_penalty
            )));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::Request("a stop string is empty".into()));
        }
        if self.num_beams == 0 {
            return Err(Error::Request(
                "the number of beams must be at least 1 (1 is plain decoding)".into(),
            ));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::Request(format!(
                "length penalty {} must be a finite number",
                self.length_penalty
            )));
        }
        if self.num_beams > 1 {
            let n = self.num_beams;
            if self.sampling.temperature > 0.0 {
                return Err(Error::Request(format!(
                    "beam search ({n} beams) picks the most likely tokens and does not sample: \
                     it needs temperature 0, not {}",
                    self.sampling.temperature
                )));
            }
            if self.repetition_penalty != 1.0 {
                return Err(Error::Request(format!(
                    "beam search ({n} beams) does not support a repetition penalty ({})",
                    self.repetition_penalty
                )));
            }
            if !self.stop.is_empty() {
                return Err(Error::Request(format!(
                    "beam search ({n} beams) does not support stop strings"
                )));
            }
        }
        Ok(())
    }

    /// Whether choosing a token needs the logits on the host (sampling, top log-probabilities
    /// or a repetition penalty); greedy requests pick on the GPU and read back 16 bytes.
    pub(crate) fn needs_logits(&self) -> bool {
        self.sampling.temperature != 0.0 || self.top_logprobs > 0 || self.repetition_penalty != 1.0
    }
}

/// Why a request stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// It generated an end-of-sequence token.
    #[default]
    Eos,
    /// Its text reached one of the stop strings.
    Stop,
    /// It generated `max_new_tokens` tokens.
    Length,
    /// It was cancelled.
    Cancelled,
}

impl FinishReason {
    /// The lowercase name (`eos`, `stop`, `length`, `cancelled`).
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// The chosen token id.
    pub id: u32,
    /// The token's vocabulary string with SentencePiece's `▁` shown as a space (empty for a
    /// model without a tokenizer).
    pub text: String,
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
    /// Number of generated tokens (`token_ids.len()`).
    pub completion_tokens: usize,
    /// Why the generation stopped.
    pub finish_reason: FinishReason,
    /// Per-step details.
    pub steps: Vec<Step>,
    /// Beam search: the answer's score, its summed log-probability divided by (generated
    /// tokens)^length_penalty (HF's `sequences_scores`); absent without beam search.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beam_score: Option<f32>,
    /// Timings.
    pub timings: Timings,
}
