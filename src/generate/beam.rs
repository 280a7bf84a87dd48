//! Beam search, as HF transformers 5's `GenerationMixin._beam_search` with `do_sample=False`
//! for one request.
//!
//! Every step, each running beam's logits become log-probabilities (log-softmax) added to the
//! beam's running sum; of all (beam, token) continuations the `K = max(2, 1 + eos ids) ·
//! beams` best are kept, best first. A continuation *finishes* when its token is an
//! end-of-sequence id or it reaches `max_new_tokens`; those among the first `beams` of the K
//! enter the finished set scored `sum / generated_tokens^length_penalty`, which keeps the
//! best `beams`. The best `beams` unfinished continuations run on. The search ends when every
//! kept continuation finished, when (with [`EarlyStopping::Done`]) `beams` answers have
//! finished, or when the best running beam — scored at its current length, or at
//! `max_new_tokens` under [`EarlyStopping::Never`] with a positive length penalty — cannot beat
//! the worst finished answer once `beams` have finished. The answer is the best finished one.
//!
//! On the GPU the prompt is prefilled once; the beams then decode together as one batch, and
//! before each step every beam's KV cache is copied from the beam it continues (into a second
//! set of sequences, which then swaps with the first), in the step's own submission.

use std::time::Instant;

use super::sampling::logprobs;
use super::scheduler::{image_tensor, prepare, Request};
use super::{EarlyStopping, FinishReason, GenerateOptions, Generation, Step, Timings};
use crate::gpu::Recorder;
use crate::model::gemma::Sequence;
use crate::model::PaliGemma;
use crate::{Error, Result};

/// HF's stand-in for minus infinity in beam scores.
const NEG: f64 = -1.0e9;

/// One beam: the generated tokens and their summed log-probability.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Hypothesis {
    /// The generated tokens (log-probabilities and top alternatives; `text` empty).
    pub steps: Vec<Step>,
    /// Sum of the tokens' log-probabilities.
    pub sum: f64,
}

/// The host side of beam search: which beams continue with which tokens, and the finished
/// answers.
pub(crate) struct BeamScorer {
    beams: usize,
    keep: usize,
    length_penalty: f64,
    early: EarlyStopping,
    max_new: usize,
    eos: Vec<u32>,
    top_logprobs: usize,
    running: Vec<Hypothesis>,
    /// The running beams' scores: their sums, minus 1e9 for one that finished (HF keeps such
    /// a beam only when too few others are left).
    scores: Vec<f64>,
    /// Best first, at most `beams`, with their length-penalised scores.
    finished: Vec<(f64, Hypothesis)>,
    improvable: bool,
    done: bool,
}

impl BeamScorer {
    /// A search of `options.num_beams` beams stopping at `eos` (empty: only at
    /// `max_new_tokens`). It starts with one empty beam (the prompt).
    pub fn new(options: &GenerateOptions, eos: &[u32]) -> Self {
        let beams = options.num_beams.max(1);
        BeamScorer {
            beams,
            keep: 2.max(1 + eos.len()) * beams,
            length_penalty: options.length_penalty as f64,
            early: options.early_stopping,
            max_new: options.max_new_tokens,
            eos: eos.to_vec(),
            top_logprobs: options.top_logprobs,
            running: vec![Hypothesis {
                steps: Vec::new(),
                sum: 0.0,
            }],
            scores: vec![0.0],
            finished: Vec::new(),
            improvable: true,
            done: false,
        }
    }

    /// The running beams, whose last tokens the next decode step feeds.
    pub fn running(&self) -> &[Hypothesis] {
        &self.running
    }

    /// Whether the search has ended.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The finished answers, best first, with their scores.
    pub fn finished(&self) -> &[(f64, Hypothesis)] {
        &self.finished
    }

    /// One step: `rows[b]` are the logits after running beam `b`. Returns, for each new
    /// running beam, the index of the beam it continues (whose KV cache it needs).
    pub fn step(&mut self, rows: &[&[f32]]) -> Result<Vec<usize>> {
        if self.done || rows.len() != self.running.len() || rows.is_empty() {
            return Err(Error::Request(format!(
                "beam step with {} logit rows for {} running beams{}",
                rows.len(),
                self.running.len(),
                if self.done {
                    " after the search ended"
                } else {
                    ""
                }
            )));
        }
        let generated = self.running[0].steps.len() + 1;
        // (score, beam, token, log-probability), best first; ties by beam, then token, as
        // the flat index of HF's top-k.
        let mut cands: Vec<(f64, usize, u32, f64)> = Vec::new();
        for (b, row) in rows.iter().enumerate() {
            let lse = log_sum_exp(row);
            for tok in top_indices(row, self.keep) {
                let lp = row[tok] as f64 - lse;
                cands.push((self.scores[b] + lp, b, tok as u32, lp));
            }
        }
        cands.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
        cands.truncate(self.keep);
        let hits: Vec<bool> = cands
            .iter()
            .map(|c| generated >= self.max_new || self.eos.contains(&c.2))
            .collect();
        let extend = |c: &(f64, usize, u32, f64)| {
            let mut h = self.running[c.1].clone();
            let top = match self.top_logprobs {
                0 => Vec::new(),
                k => logprobs(rows[c.1], c.2, k).1,
            };
            h.steps.push(Step {
                id: c.2,
                text: String::new(),
                logprob: c.3 as f32,
                top,
            });
            h.sum += c.3;
            h
        };
        // Finished continuations among the first `beams` enter the finished set.
        let full = self.finished.len() == self.beams;
        if self.improvable && !(full && self.early == EarlyStopping::Done) {
            let norm = (generated as f64).powf(self.length_penalty);
            let mut merged = std::mem::take(&mut self.finished);
            for (c, _) in cands.iter().zip(&hits).take(self.beams).filter(|x| *x.1) {
                merged.push((c.0 / norm, extend(c)));
            }
            merged.sort_by(|x, y| y.0.total_cmp(&x.0));
            merged.truncate(self.beams);
            self.finished = merged;
        }
        // The best unfinished continuations run on (finished ones only to fill up).
        let order: Vec<usize> = (0..cands.len())
            .filter(|&c| !hits[c])
            .chain((0..cands.len()).filter(|&c| hits[c]))
            .take(self.beams)
            .collect();
        let running: Vec<Hypothesis> = order.iter().map(|&c| extend(&cands[c])).collect();
        self.scores = order
            .iter()
            .map(|&c| cands[c].0 + if hits[c] { NEG } else { 0.0 })
            .collect();
        let sources = order.iter().map(|&c| cands[c].1).collect();
        self.running = running;
        // Can a running beam still beat the worst finished answer?
        let length = match self.early {
            EarlyStopping::Never if self.length_penalty > 0.0 => self.max_new,
            _ => generated,
        };
        let best = self.scores[0] / (length as f64).powf(self.length_penalty);
        let worst = match self.finished.len() == self.beams {
            true => self.finished.last().map_or(NEG, |f| f.0),
            false => NEG,
        };
        self.improvable &= best > worst;
        let all_finished = self.finished.len() == self.beams && self.early == EarlyStopping::Done;
        self.done = !self.improvable || all_finished || hits.iter().all(|&h| h);
        Ok(sources)
    }
}

/// `ln Σ exp(row)` in f64.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// Indices of the `k` largest values of `row`, largest first (lower index first on ties).
fn top_indices(row: &[f32], k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..row.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

/// Run a beam-search request to the end: the vision tower (unless it brings features), one
/// prefill, then one batched decode step of all beams per token. `on_text` gets the whole
/// answer once the search ends (beams change until then).
pub(crate) fn run(
    model: &PaliGemma,
    request: Request,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let (ids, image, options) = prepare(model, request)?;
    let gpu = &**model.gpu();
    let text = model.decoder();
    let t0 = Instant::now();
    let features = image_tensor(model, image, &mut None, 1)?;
    let vision_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (n, max_new) = (options.num_beams, options.max_new_tokens);
    let mut first = text.sequence(gpu, ids.len(), max_new)?;
    let mut prefill = text.prefill(gpu, &first, &ids)?;
    loop {
        let mut rec = Recorder::new(gpu);
        let done = text.record_prefill(&mut rec, &mut first, &mut prefill, Some(&features), 1)?;
        rec.run()?;
        if done {
            break;
        }
    }
    let logits = prefill.logits().read(gpu)?;
    drop(prefill);
    let prefill_s = t1.elapsed().as_secs_f64();
    let eos: &[u32] = match options.stop_at_eos {
        true => &model.config.eos_token_ids,
        false => &[],
    };
    let mut scorer = BeamScorer::new(&options, eos);
    let mut sources = scorer.step(&[&logits])?;
    let mut beams: Vec<Sequence> = vec![first];
    let mut spare: Vec<Sequence> = Vec::with_capacity(n);
    let batch = text.batch(gpu, n)?;
    let t2 = Instant::now();
    let mut decoded = 0usize;
    while !scorer.is_done() {
        while spare.len() < sources.len() {
            spare.push(text.sequence(gpu, ids.len(), max_new)?);
        }
        let mut rec = Recorder::new(gpu);
        for (dst, &src) in spare.iter_mut().zip(&sources) {
            text.record_copy(&mut rec, &beams[src], dst)?;
        }
        std::mem::swap(&mut beams, &mut spare);
        let tokens: Vec<u32> = scorer
            .running()
            .iter()
            .map(|h| h.steps.last().map_or(0, |s| s.id))
            .collect();
        let rows = tokens.len();
        let mut seqs: Vec<&mut Sequence> = beams.iter_mut().take(rows).collect();
        text.record_step(&mut rec, &batch, &mut seqs, &tokens)?;
        rec.run()?;
        decoded += 1;
        let logits = batch.logits().read_rows(gpu, 0, rows)?;
        let vocab = logits.len() / rows;
        let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
        sources = scorer.step(&rows)?;
    }
    let secs = t2.elapsed().as_secs_f64();
    let Some((score, best)) = scorer.finished().first().cloned() else {
        return Err(Error::Request(
            "beam search ended without a finished answer".into(),
        ));
    };
    let prompts = model.prompts().ok();
    let mut steps = best.steps;
    if let Some(p) = prompts {
        for s in &mut steps {
            s.text = p
                .id_to_token(s.id)
                .unwrap_or_default()
                .replace('\u{2581}', " ");
        }
    }
    let token_ids: Vec<u32> = steps.iter().map(|s| s.id).collect();
    let finish_reason = match token_ids.last() {
        Some(id) if eos.contains(id) => FinishReason::Eos,
        _ => FinishReason::Length,
    };
    let text = match prompts {
        Some(p) => p.decode(&token_ids)?,
        None => String::new(),
    };
    if !text.is_empty() {
        on_text(&text);
    }
    Ok(Generation {
        text,
        prompt_tokens: ids.len(),
        completion_tokens: token_ids.len(),
        token_ids,
        finish_reason,
        steps,
        beam_score: Some(score as f32),
        timings: Timings {
            vision_s,
            prefill_s,
            decode_tok_s: match secs > 0.0 {
                true => decoded as f64 / secs,
                false => 0.0,
            },
            ..Default::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits whose log-softmax is (close to) `ln p` for the given probabilities.
    fn row(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn opts(beams: usize, max_new: usize, lp: f32, early: EarlyStopping) -> GenerateOptions {
        GenerateOptions {
            num_beams: beams,
            max_new_tokens: max_new,
            length_penalty: lp,
            early_stopping: early,
            ..Default::default()
        }
    }

    fn ids(h: &Hypothesis) -> Vec<u32> {
        h.steps.iter().map(|s| s.id).collect()
    }

    #[test]
    fn first_step_branches_from_the_prompt_only() {
        // Token 0 is EOS. Two beams keep 4 candidates: 1 (0.5), 2 (0.3), 3 (0.15), 0 (0.05).
        let mut s = BeamScorer::new(&opts(2, 5, 1.0, EarlyStopping::Heuristic), &[0]);
        let src = s.step(&[&row(&[0.05, 0.5, 0.3, 0.15])]).unwrap();
        assert_eq!(src, vec![0, 0]);
        let r: Vec<Vec<u32>> = s.running().iter().map(ids).collect();
        assert_eq!(r, vec![vec![1], vec![2]]);
        assert!((s.running()[1].sum - 0.3f64.ln()).abs() < 1e-6);
        assert!(s.finished().is_empty());
        assert!(!s.is_done());
    }

    #[test]
    fn finished_scores_are_length_penalised_and_the_best_wins() {
        // EOS = 0. Step 1: beams [1] (ln .6) and [2] (ln .4).
        let o = opts(2, 10, 2.0, EarlyStopping::Heuristic);
        let mut s = BeamScorer::new(&o, &[0]);
        s.step(&[&row(&[1e-6, 0.6, 0.4, 1e-6])]).unwrap();
        // Step 2: beam [1] ends with EOS at p .5 (the best continuation), beam [2] goes on.
        let a = row(&[0.5, 0.2, 0.2, 0.1]);
        let b = row(&[1e-6, 0.1, 0.1, 0.8]);
        let src = s.step(&[&a, &b]).unwrap();
        let f = s.finished();
        assert_eq!(f.len(), 1);
        assert_eq!(ids(&f[0].1), vec![1, 0]);
        let want = (0.6f64.ln() + 0.5f64.ln()) / 2f64.powf(2.0);
        assert!((f[0].0 - want).abs() < 1e-6, "{} vs {want}", f[0].0);
        // The running beams are the best two unfinished continuations: [2,3] and [1,1] / [1,2].
        assert_eq!(ids(&s.running()[0]), vec![2, 3]);
        assert_eq!(src[0], 1);
        assert!(!s.is_done());
    }

    #[test]
    fn max_length_finishes_the_top_beams() {
        let o = opts(2, 1, 1.0, EarlyStopping::Heuristic);
        let mut s = BeamScorer::new(&o, &[0]);
        s.step(&[&row(&[0.1, 0.2, 0.7])]).unwrap();
        assert!(s.is_done());
        let f: Vec<Vec<u32>> = s.finished().iter().map(|f| ids(&f.1)).collect();
        assert_eq!(f, vec![vec![2], vec![1]]);
        assert!((s.finished()[0].0 - 0.7f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn early_stopping_done_ends_once_every_slot_is_filled() {
        // Two beams, EOS 0; both step-1 beams end at step 2 with EOS among the top two.
        let run = |early| {
            let mut s = BeamScorer::new(&opts(2, 10, 1.0, early), &[0]);
            s.step(&[&row(&[1e-6, 0.5, 0.5 - 2e-6, 1e-6])]).unwrap();
            let a = row(&[0.9, 0.05, 0.05 - 1e-6, 1e-6]);
            s.step(&[&a, &a]).unwrap();
            s
        };
        let done = run(EarlyStopping::Done);
        assert_eq!(done.finished().len(), 2);
        assert!(done.is_done());
        // Heuristic: the best running beam (ln .5 + ln .05, over 2 tokens) is far below the
        // worst finished answer: also done.
        assert!(run(EarlyStopping::Heuristic).is_done());
        // Never with a positive length penalty scores running beams at max_new_tokens (10):
        // (ln .5 + ln .05) / 10 = -0.37 beats the worst finished, (ln .5 + ln .9) / 2 = -0.40.
        assert!(!run(EarlyStopping::Never).is_done());
    }

    #[test]
    fn a_better_finished_answer_replaces_a_worse_one() {
        // One slot, length penalty 2, never stopping early: EOS (0) finishes first at ln .6.
        let mut s = BeamScorer::new(&opts(1, 10, 2.0, EarlyStopping::Never), &[0]);
        s.step(&[&row(&[0.6, 0.3, 0.1])]).unwrap();
        assert_eq!(ids(&s.finished()[0].1), vec![0]);
        // The running beam [1] (ln .3), scored at 10 tokens, could still beat it.
        assert!(!s.is_done());
        s.step(&[&row(&[0.99, 0.005, 0.005])]).unwrap();
        let f = &s.finished()[0];
        assert_eq!(ids(&f.1), vec![1, 0]);
        assert!((f.0 - (0.3f64.ln() + 0.99f64.ln()) / 4.0).abs() < 1e-6);
        // Under the heuristic the same first answer ends the search at once.
        let mut h = BeamScorer::new(&opts(1, 10, 2.0, EarlyStopping::Heuristic), &[0]);
        h.step(&[&row(&[0.6, 0.3, 0.1])]).unwrap();
        assert!(h.is_done());
    }

    #[test]
    fn a_wrong_number_of_rows_is_an_error() {
        let mut s = BeamScorer::new(&opts(2, 4, 1.0, EarlyStopping::Heuristic), &[0]);
        let r = row(&[0.5, 0.5]);
        let e = s.step(&[&r, &r]).unwrap_err().to_string();
        assert!(e.contains("2 logit rows for 1 running beams"), "{e}");
    }
}
