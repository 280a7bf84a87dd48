//! The continuous-batching scheduler. Requests are submitted at any time; each
//! [`Scheduler::step`] admits queued requests into free sequence slots (running their vision
//! tower and prefill in bounded submissions), then runs one decode step for every live
//! sequence together, and returns what happened as [`SchedulerEvent`]s. A finished or
//! cancelled sequence frees its slot (and its KV cache) for the next request at once.

use std::collections::VecDeque;
use std::time::Instant;

use super::sampling::{apply_repetition_penalty, logprobs, Sampler};
use super::stop::StopText;
use super::{FinishReason, GenerateOptions, Generation, Step, Timings};
use crate::gpu::{Gpu, Plan, Recorder, Tensor};
use crate::model::gemma::{Batch, Sequence};
use crate::model::siglip::VisionActivations;
use crate::model::PaliGemma;
use crate::ops::elementwise::copy_rows;
use crate::ops::sample::{argmax_logprob, argmax_logprob_feed, decode_pick};
use crate::processor::image::PixelValues;
use crate::processor::prompt::TextStream;
use crate::{Error, Result};

/// Identifies a submitted request in the scheduler's events.
pub type RequestId = u64;

/// An image encoded once by the vision tower and projector, kept on the GPU, to answer any
/// number of prompts about it without running the tower again (see
/// [`PaliGemma::image_features`]). Only the features can be reused, not the KV cache: under
/// PaliGemma's prefix-LM mask the image tokens attend to the prompt, so their keys and values
/// depend on it. Cloning is cheap (the GPU buffer is shared). Use them only with the model
/// (and so the device) that computed them.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    pub(crate) tensor: Tensor,
}

impl ImageFeatures {
    /// The features `[num_image_tokens, hidden]`.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// Read them back, row-major f32 (before any scaling by the language model).
    pub fn read(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.tensor.read(gpu)
    }
}

/// The image (or images) of a request.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// Preprocessed pixels: the vision tower runs when the request is admitted.
    Pixels(PixelValues),
    /// Features computed before (shared between requests).
    Features(ImageFeatures),
    /// Several images in one prompt, as HF's `PaliGemmaProcessor` takes them (the NLVR2
    /// fine-tunes compare two): each is encoded on its own and gets its own block of image
    /// tokens, in this order, before `<bos>`. Each may be pixels or features; a nested
    /// `Many` is flattened.
    Many(Vec<ImageInput>),
}

impl ImageInput {
    /// How many images this is (nested [`ImageInput::Many`] counted through); a prompt for it
    /// starts with this many blocks of image tokens.
    pub fn count(&self) -> usize {
        match self {
            ImageInput::Many(images) => images.iter().map(ImageInput::count).sum(),
            _ => 1,
        }
    }

    /// The single images, in order.
    fn flatten(self, out: &mut Vec<ImageInput>) {
        match self {
            ImageInput::Many(images) => images.into_iter().for_each(|i| i.flatten(out)),
            one => out.push(one),
        }
    }
}

/// The prompt of a request.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A task prefix such as `caption en` or `detect cat`, tokenized as HF's processor does.
    Text(String),
    /// Token ids with the image placeholders, `<bos>` and the text (see
    /// [`PaliGemma::placeholder_prompt`], or one block of image placeholders per image:
    /// [`PaliGemma::placeholder_prompt_images`]).
    Ids(Vec<u32>),
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The image.
    pub image: ImageInput,
    /// The prompt.
    pub prompt: Prompt,
    /// Decoding options.
    pub options: GenerateOptions,
}

/// What a [`Scheduler::step`] reports.
#[derive(Debug)]
pub enum SchedulerEvent {
    /// A new piece of request `id`'s answer.
    Text {
        /// The request.
        id: RequestId,
        /// The new text.
        text: String,
    },
    /// Request `id` finished (see [`Generation::finish_reason`]) or failed; its last event.
    Finished {
        /// The request.
        id: RequestId,
        /// Its result.
        result: Result<Generation>,
    },
}

/// Settings of a [`Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerOptions {
    /// The most sequences decoding together; more requests wait in the queue. Each live
    /// sequence holds its own KV cache. Default 16.
    pub max_sequences: usize,
    /// The most vision-encoder or decoder layers recorded into one queue submission while a
    /// request's image and prompt are processed; each submission is waited for before the
    /// next, so other work on the queue (an app's rendering) runs in between and no single
    /// submission runs long enough to trip a GPU watchdog. A decode step (all layers, one
    /// token per sequence) is always one submission. Default 1.
    pub layers_per_submission: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            max_sequences: 16,
            layers_per_submission: 1,
        }
    }
}

struct Queued {
    id: RequestId,
    ids: Vec<u32>,
    image: ImageInput,
    options: GenerateOptions,
}

struct Live {
    id: RequestId,
    options: GenerateOptions,
    seq: Sequence,
    sampler: Sampler,
    stream: TextStream,
    stop: StopText,
    out: Generation,
    prompt_ids: Vec<u32>,
    /// The first token, when it was chosen on the host at admission.
    first: Option<Step>,
    decode_start: Instant,
    finished: Option<FinishReason>,
}

impl Live {
    /// Whether its next token is chosen on the GPU (greedy, nothing else needs the logits).
    fn greedy(&self) -> bool {
        !self.options.needs_logits()
    }
}

/// A greedy decode step submitted and not read back yet: its picks are on their way into
/// `readback[ring]`, and its argmax kernels have already written them into the batch's input
/// ids, so that the next step can be queued behind it.
struct InFlight {
    /// The request of each row, in order.
    rows: Vec<RequestId>,
    /// The readback buffer its picks are copied into.
    ring: usize,
    /// Its queue submission.
    index: wgpu::SubmissionIndex,
}

/// The steppable continuous-batching scheduler over one loaded model. Use it from one thread
/// (it borrows the model; share the model with `Arc` and run the scheduler where it steps):
///
/// ```no_run
/// # use paligemma::generate::*;
/// # fn demo(model: &paligemma::model::PaliGemma, pixels: paligemma::processor::image::PixelValues) -> paligemma::Result<()> {
/// let mut scheduler = Scheduler::new(model, SchedulerOptions::default())?;
/// let id = scheduler.submit(Request {
///     image: ImageInput::Pixels(pixels),
///     prompt: Prompt::Text("caption en".into()),
///     options: GenerateOptions::default(),
/// })?;
/// while !scheduler.is_idle() {
///     for event in scheduler.step()? {
///         match event {
///             SchedulerEvent::Text { text, .. } => print!("{text}"),
///             SchedulerEvent::Finished { result, .. } => println!("\n{:?}", result?.finish_reason),
///         }
///     }
/// }
/// # Ok(()) }
/// ```
pub struct Scheduler<'m> {
    model: &'m PaliGemma,
    opts: SchedulerOptions,
    next_id: RequestId,
    queue: VecDeque<Queued>,
    live: Vec<Live>,
    pending: Vec<SchedulerEvent>,
    batch: Option<Batch>,
    picks: Tensor,
    /// Two readback buffers: one for the step in flight, one for the step queued behind it.
    readback: [wgpu::Buffer; 2],
    in_flight: Option<InFlight>,
    plan: Option<Plan>,
    vision: Option<VisionActivations>,
}

impl<'m> Scheduler<'m> {
    /// A scheduler for `model`.
    pub fn new(model: &'m PaliGemma, opts: SchedulerOptions) -> Result<Self> {
        if opts.max_sequences == 0 || opts.layers_per_submission == 0 {
            return Err(Error::Request(format!(
                "a scheduler needs at least one sequence and one layer per submission ({opts:?})"
            )));
        }
        let gpu = model.gpu();
        let words = 4 * opts.max_sequences;
        let picks = Tensor::from_u32(gpu, "picks", &[words], &vec![0; words])?;
        let readback = [0, 1].map(|_| {
            gpu.create_buffer(&wgpu::BufferDescriptor {
                label: Some("picks readback"),
                size: 4 * words as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        Ok(Scheduler {
            model,
            opts,
            next_id: 0,
            queue: VecDeque::new(),
            live: Vec::new(),
            pending: Vec::new(),
            batch: None,
            picks,
            readback,
            in_flight: None,
            plan: None,
            vision: None,
        })
    }

    /// The settings.
    pub fn options(&self) -> SchedulerOptions {
        self.opts
    }

    /// Queue a request; it is checked now (options, prompt, image size) and an invalid one is
    /// refused with the reason. It joins the running batch at the next step with a free slot.
    pub fn submit(&mut self, request: Request) -> Result<RequestId> {
        let (ids, image, options) = prepare(self.model, request)?;
        if options.num_beams > 1 {
            return Err(Error::Request(format!(
                "beam search ({} beams) runs one request on its own, not in a scheduler: \
                 use PaliGemma::run_one (or generate)",
                options.num_beams
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.queue.push_back(Queued {
            id,
            ids,
            image,
            options,
        });
        Ok(id)
    }

    /// Cancel a queued or running request: its slot is freed at once and the next
    /// [`Scheduler::step`] reports it finished with [`FinishReason::Cancelled`] and what it
    /// had generated (a decode step in flight for it is read back first, which waits for
    /// that step). Returns whether the request was still queued or running.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(at) = self.queue.iter().position(|q| q.id == id) {
            let q = self.queue.remove(at).expect("position is in range");
            let out = Generation {
                prompt_tokens: q.ids.len(),
                finish_reason: FinishReason::Cancelled,
                ..Default::default()
            };
            self.pending.push(SchedulerEvent::Finished {
                id,
                result: Ok(out),
            });
            return true;
        }
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.rows.contains(&id))
        {
            // Keep what the step in flight computed for it (and for the others).
            let mut events = Vec::new();
            if let Err(e) = self.resolve_in_flight(&mut events) {
                self.fail_live(&e, &mut events);
            }
            self.pending.extend(events);
        }
        if let Some(at) = self.live.iter().position(|l| l.id == id) {
            let mut live = self.live.remove(at);
            if live.finished.is_none() {
                live.finished = Some(FinishReason::Cancelled);
            }
            let event = self.finish(live);
            self.pending.push(event);
            return true;
        }
        false
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Sequences decoding now.
    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// Whether there is nothing to do: no request queued or running and no event to report.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.live.is_empty() && self.pending.is_empty()
    }

    /// Admit queued requests into free slots (vision tower and prefill, in bounded
    /// submissions), then decode one token for every live sequence in one submission.
    /// Returns the text pieces and finished requests of this step. A request that fails
    /// (for example its GPU memory cannot be allocated) finishes with its error; a failed
    /// decode step finishes every live request with that error. The call itself fails only
    /// when the first tokens of newly admitted requests cannot be read back.
    ///
    /// Greedy steps are pipelined: while the same sequences keep decoding, each call queues
    /// the next step (its input tokens picked on the GPU by the step before) and only then
    /// reads back the previous step's picks, so the device is never left idle waiting for the
    /// host. The events of a step therefore arrive one call after it was queued, and a
    /// sequence that ends at an end-of-sequence token or a stop string has had one more step
    /// computed, which is discarded.
    pub fn step(&mut self) -> Result<Vec<SchedulerEvent>> {
        let mut events = std::mem::take(&mut self.pending);
        if !self.queue.is_empty() && self.live.len() < self.opts.max_sequences {
            // Admission changes the batch: the step in flight is read back first.
            if let Err(e) = self.resolve_in_flight(&mut events) {
                self.fail_live(&e, &mut events);
            }
        }
        let mut first = Vec::new();
        while self.live.len() < self.opts.max_sequences {
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            let id = q.id;
            match self.admit(q) {
                Ok(live) => {
                    first.push(self.live.len());
                    self.live.push(live);
                }
                Err(e) => events.push(SchedulerEvent::Finished { id, result: Err(e) }),
            }
        }
        if !first.is_empty() {
            // Requests that chose their first token on the host need no readback.
            let picks = match first.iter().any(|&slot| self.live[slot].first.is_none()) {
                true => self.read_picks(self.live.len())?,
                false => Vec::new(),
            };
            for &slot in &first {
                let step = match self.live[slot].first.take() {
                    Some(step) => step,
                    None => pick_step(slot, &picks),
                };
                self.push_token(slot, step, &mut events)?;
            }
        }
        if let Err(e) = self.decode(&mut events) {
            self.fail_live(&e, &mut events);
        }
        let mut i = 0;
        while i < self.live.len() {
            if self.live[i].finished.is_some() {
                let live = self.live.remove(i);
                events.push(self.finish(live));
            } else {
                i += 1;
            }
        }
        if self.live.is_empty() {
            self.in_flight = None;
        }
        Ok(events)
    }

    /// Finish every live request with the error of a failed decode step.
    fn fail_live(&mut self, e: &Error, events: &mut Vec<SchedulerEvent>) {
        for live in self.live.drain(..) {
            events.push(SchedulerEvent::Finished {
                id: live.id,
                result: Err(Error::Gpu(format!("decode step failed: {e}"))),
            });
        }
        self.plan = None;
        self.in_flight = None;
    }

    /// The live sequences that take part in the next step, as indices into `live`, and their
    /// request ids.
    fn stepping(&self) -> (Vec<usize>, Vec<RequestId>) {
        (0..self.live.len())
            .filter(|&i| self.live[i].finished.is_none())
            .map(|i| (i, self.live[i].id))
            .unzip()
    }

    /// One decode step for the live sequences: queued behind the step in flight when that
    /// step holds the same greedy sequences and none of them reaches its token limit there,
    /// otherwise after reading the step in flight back, with the input tokens written from
    /// the host.
    fn decode(&mut self, events: &mut Vec<SchedulerEvent>) -> Result<()> {
        let (stepping, ids) = self.stepping();
        let feed = self.in_flight.as_ref().is_some_and(|f| {
            f.rows == ids
                && stepping.iter().all(|&i| {
                    let l = &self.live[i];
                    l.greedy() && l.out.token_ids.len() + 2 <= l.options.max_new_tokens
                })
        });
        if feed {
            let previous = self.in_flight.take().expect("checked above");
            let ring = 1 - previous.ring;
            let index = self.submit_step(&stepping, ring, true)?;
            self.in_flight = Some(InFlight {
                rows: ids,
                ring,
                index,
            });
            return self.resolve(previous, true, events);
        }
        self.resolve_in_flight(events)?;
        let (stepping, ids) = self.stepping();
        if stepping.is_empty() {
            return Ok(());
        }
        let ring = 0;
        let index = self.submit_step(&stepping, ring, false)?;
        if stepping.iter().all(|&i| self.live[i].greedy()) {
            self.in_flight = Some(InFlight {
                rows: ids,
                ring,
                index,
            });
            return Ok(());
        }
        let gpu = &**self.model.gpu();
        let bytes = 16 * stepping.len() as u64;
        let picks: Vec<u32> = bytemuck::pod_collect_to_vec(&gpu.map_read_after(
            &self.readback[ring],
            bytes,
            Some((index, false)),
        )?);
        let batch = self.batch.as_ref().expect("submit_step allocates it");
        let mut steps = Vec::with_capacity(stepping.len());
        for (row, &i) in stepping.iter().enumerate() {
            let live = &mut self.live[i];
            steps.push(match live.greedy() {
                false => {
                    let mut logits = batch.logits().read_rows(gpu, row, 1)?;
                    let history = [live.prompt_ids.as_slice(), &live.out.token_ids];
                    host_choice(&live.options, &history, &mut live.sampler, &mut logits)
                }
                true => pick_step(row, &picks),
            });
        }
        for (step, &i) in steps.into_iter().zip(&stepping) {
            self.push_token(i, step, events)?;
        }
        Ok(())
    }

    /// Record and submit one decode step for the live sequences `stepping` (rows of the batch
    /// in that order), with their picks copied into `readback[ring]`. `fed`: the input tokens
    /// are the previous step's picks, already in the batch's ids; otherwise each sequence
    /// feeds the token it generated last, written from the host.
    fn submit_step(
        &mut self,
        stepping: &[usize],
        ring: usize,
        fed: bool,
    ) -> Result<wgpu::SubmissionIndex> {
        let model = self.model;
        let gpu = &**model.gpu();
        let text = model.decoder();
        if self.batch.is_none() {
            self.batch = Some(text.batch(gpu, self.opts.max_sequences)?);
        }
        let batch = self.batch.as_ref().expect("allocated above");
        let ids: Vec<u32> = stepping
            .iter()
            .map(|&i| {
                *self.live[i]
                    .out
                    .token_ids
                    .last()
                    .expect("admission made one")
            })
            .collect();
        let greedy: Vec<bool> = stepping.iter().map(|&i| self.live[i].greedy()).collect();
        let mut rec = Recorder::new(gpu);
        let mut seqs: Vec<&mut Sequence> = self
            .live
            .iter_mut()
            .filter(|l| l.finished.is_none())
            .map(|l| &mut l.seq)
            .collect();
        match fed {
            true => text.record_step_fed(&mut rec, batch, &mut seqs)?,
            false => text.record_step(&mut rec, batch, &mut seqs, &ids)?,
        }
        for (row, &greedy) in greedy.iter().enumerate() {
            if greedy {
                let (logits, ids) = (batch.logits(), batch.ids());
                argmax_logprob_feed(&mut rec, logits, row, &self.picks, row, ids, row)?;
            }
        }
        rec.finish_into(&mut self.plan)?;
        let plan = self.plan.as_ref().expect("finish_into sets the plan");
        let bytes = 16 * stepping.len() as u64;
        let readback = &self.readback[ring];
        Ok(plan.submit_with(gpu, |encoder| {
            encoder.copy_buffer_to_buffer(self.picks.buffer(), 0, readback, 0, bytes)
        }))
    }

    /// Read back the step in flight, if any, and give its tokens to the sequences still
    /// live.
    fn resolve_in_flight(&mut self, events: &mut Vec<SchedulerEvent>) -> Result<()> {
        match self.in_flight.take() {
            Some(f) => self.resolve(f, false, events),
            None => Ok(()),
        }
    }

    /// Read back the picks of step `f` (`later_queued`: another step is queued behind it) and
    /// push each row's token to its sequence, skipping requests that finished or were
    /// cancelled meanwhile.
    fn resolve(
        &mut self,
        f: InFlight,
        later_queued: bool,
        events: &mut Vec<SchedulerEvent>,
    ) -> Result<()> {
        let gpu = &**self.model.gpu();
        let bytes = 16 * f.rows.len() as u64;
        let raw =
            gpu.map_read_after(&self.readback[f.ring], bytes, Some((f.index, later_queued)))?;
        let picks: Vec<u32> = bytemuck::pod_collect_to_vec(&raw);
        for (row, id) in f.rows.iter().enumerate() {
            let Some(i) = self.live.iter().position(|l| l.id == *id) else {
                continue;
            };
            if self.live[i].finished.is_none() {
                self.push_token(i, pick_step(row, &picks), events)?;
            }
        }
        Ok(())
    }

    /// Run the vision tower (unless the request brings features) and the prefill of a
    /// request, leaving the greedy pick of its first token in the slot it will occupy.
    fn admit(&mut self, q: Queued) -> Result<Live> {
        let model = self.model;
        let gpu = &**model.gpu();
        let text = model.decoder();
        let bound = self.opts.layers_per_submission;
        let t0 = Instant::now();
        let features = image_tensor(model, q.image, &mut self.vision, bound)?;
        let vision_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut seq = text.sequence(gpu, q.ids.len(), q.options.max_new_tokens)?;
        let mut prefill = text.prefill(gpu, &seq, &q.ids)?;
        let slot = self.live.len();
        loop {
            let mut rec = Recorder::new(gpu);
            let done =
                text.record_prefill(&mut rec, &mut seq, &mut prefill, Some(&features), bound)?;
            if done && !q.options.needs_logits() {
                argmax_logprob(&mut rec, prefill.logits(), 0, &self.picks, slot)?;
            }
            rec.run()?;
            if done {
                break;
            }
        }
        let mut out = Generation {
            prompt_tokens: q.ids.len(),
            timings: Timings {
                vision_s,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut sampler = Sampler::new(q.options.sampling.clone());
        let first = match q.options.needs_logits() {
            true => {
                let mut logits = prefill.logits().read(gpu)?;
                Some(host_choice(
                    &q.options,
                    &[&q.ids],
                    &mut sampler,
                    &mut logits,
                ))
            }
            false => None,
        };
        out.timings.prefill_s = t1.elapsed().as_secs_f64();
        Ok(Live {
            id: q.id,
            stop: StopText::new(&q.options.stop),
            options: q.options,
            seq,
            sampler,
            stream: TextStream::default(),
            out,
            prompt_ids: q.ids,
            first,
            decode_start: Instant::now(),
            finished: None,
        })
    }

    /// Copy the first `slots` picks to the host (after a prefill).
    fn read_picks(&self, slots: usize) -> Result<Vec<u32>> {
        let gpu = &**self.model.gpu();
        let bytes =
            gpu.read_through(self.picks.buffer(), 0, 16 * slots as u64, &self.readback[0])?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Record `step` as live sequence `i`'s next token: stream its text, check the stop
    /// conditions.
    fn push_token(
        &mut self,
        i: usize,
        mut step: Step,
        events: &mut Vec<SchedulerEvent>,
    ) -> Result<()> {
        let model = self.model;
        let prompts = model.prompts().ok();
        let eos = &model.config.eos_token_ids;
        let live = &mut self.live[i];
        let id = step.id;
        if let Some(p) = prompts {
            step.text = p
                .id_to_token(id)
                .unwrap_or_default()
                .replace('\u{2581}', " ");
        }
        live.out.steps.push(step);
        live.out.token_ids.push(id);
        if live.out.token_ids.len() == 1 {
            live.decode_start = Instant::now();
        }
        if live.options.stop_at_eos && eos.contains(&id) {
            live.finished = Some(FinishReason::Eos);
        } else if let Some(p) = prompts {
            if let Some(delta) = live.stream.push(p, id)? {
                let (emit, hit) = live.stop.push(&delta);
                if !emit.is_empty() {
                    events.push(SchedulerEvent::Text {
                        id: live.id,
                        text: emit,
                    });
                }
                if hit {
                    live.finished = Some(FinishReason::Stop);
                }
            }
        }
        if live.finished.is_none() && live.out.token_ids.len() >= live.options.max_new_tokens {
            live.finished = Some(FinishReason::Length);
        }
        if live.finished.is_some() && !live.stop.stopped() {
            let rest = live.stop.flush();
            if !rest.is_empty() {
                events.push(SchedulerEvent::Text {
                    id: live.id,
                    text: rest,
                });
            }
        }
        Ok(())
    }

    /// The result of a sequence that left the batch (its KV cache is freed with it).
    fn finish(&self, live: Live) -> SchedulerEvent {
        let Live {
            id,
            mut out,
            stop,
            finished,
            decode_start,
            ..
        } = live;
        out.finish_reason = finished.unwrap_or(FinishReason::Cancelled);
        out.completion_tokens = out.token_ids.len();
        let decoded = out.token_ids.len().saturating_sub(1);
        let secs = decode_start.elapsed().as_secs_f64();
        out.timings.decode_tok_s = if decoded > 0 && secs > 0.0 {
            decoded as f64 / secs
        } else {
            0.0
        };
        let result = match self.model.prompts() {
            Ok(_) if stop.stopped() => {
                out.text = stop.text().to_string();
                Ok(out)
            }
            Ok(p) => p
                .decode(&out.token_ids)
                .map(|text| Generation { text, ..out }),
            Err(_) => Ok(out),
        };
        SchedulerEvent::Finished { id, result }
    }
}

/// Check a request (options, prompt, image size) and tokenize its prompt.
pub(super) fn prepare(
    model: &PaliGemma,
    request: Request,
) -> Result<(Vec<u32>, ImageInput, GenerateOptions)> {
    let Request {
        image,
        prompt,
        options,
    } = request;
    options.validate()?;
    if !options.stop.is_empty() && model.prompts().is_err() {
        return Err(Error::Request(
            "stop strings need a model with a tokenizer".into(),
        ));
    }
    let images = image.count();
    if images == 0 {
        return Err(Error::Request(
            "the request has no image (an empty ImageInput::Many): PaliGemma answers about \
             at least one"
                .into(),
        ));
    }
    let ids = match prompt {
        Prompt::Text(text) => model.prompts()?.encode_images(&text, images)?,
        Prompt::Ids(ids) => ids,
    };
    let config = &model.config;
    let limit = config.text.max_position_embeddings;
    if ids.len() + options.max_new_tokens > limit {
        return Err(Error::Request(format!(
            "the prompt has {} tokens; with {} new tokens that exceeds the model's {limit} positions",
            ids.len(),
            options.max_new_tokens
        )));
    }
    let n_img = config.num_image_tokens();
    let leading = ids
        .iter()
        .take_while(|&&i| i == config.image_token_index)
        .count();
    if leading != images * n_img || ids.len() == leading {
        let blocks = match images {
            1 => format!("{n_img} image tokens"),
            k => format!("{k} blocks of {n_img} image tokens (one per image)"),
        };
        return Err(Error::Request(format!(
            "the prompt must start with {blocks} followed by text; it starts with {leading}"
        )));
    }
    model.decoder().check_ids(&ids)?;
    let mut seen = 0;
    check_image(model, &image, images, &mut seen)?;
    let mut singles = Vec::with_capacity(images);
    image.flatten(&mut singles);
    let image = match singles.len() {
        1 => singles.remove(0),
        _ => ImageInput::Many(singles),
    };
    Ok((ids, image, options))
}

/// Check the pixels' resolution or the features' shape of each of the `total` images in
/// `image`; `seen` counts the images checked before, to name the bad one.
fn check_image(
    model: &PaliGemma,
    image: &ImageInput,
    total: usize,
    seen: &mut usize,
) -> Result<()> {
    let which = |seen: usize| match total {
        1 => String::new(),
        _ => format!("image {} of {total}: ", seen + 1),
    };
    match image {
        ImageInput::Many(images) => {
            for one in images {
                check_image(model, one, total, seen)?;
            }
            return Ok(());
        }
        ImageInput::Pixels(px) => model.vision_tower().check_pixels(px).map_err(|e| match e {
            Error::Request(m) => Error::Request(format!("{}{m}", which(*seen))),
            other => other,
        })?,
        ImageInput::Features(f) => {
            let want = [
                model.config.num_image_tokens(),
                model.config.text.hidden_size,
            ];
            if f.tensor.shape() != want {
                return Err(Error::Request(format!(
                    "{}image features of shape {:?}, the model needs {want:?}",
                    which(*seen),
                    f.tensor.shape()
                )));
            }
        }
    }
    *seen += 1;
    Ok(())
}

/// The image features of a prepared request (see [`prepare`]), `[count · num_image_tokens,
/// hidden]`: features it brings as they are, pixels through the vision tower (on `acts`,
/// allocated on first use, at most `layers` encoder layers per submission), and several
/// images each on its own, their features then copied one after another into one tensor.
pub(super) fn image_tensor(
    model: &PaliGemma,
    image: ImageInput,
    acts: &mut Option<VisionActivations>,
    layers: usize,
) -> Result<Tensor> {
    let gpu = &**model.gpu();
    let vision = model.vision_tower();
    match image {
        ImageInput::Features(f) => Ok(f.tensor),
        ImageInput::Pixels(px) => {
            if acts.is_none() {
                *acts = Some(vision.activations(gpu)?);
            }
            let a = acts.as_ref().expect("allocated above");
            let features = vision.features(gpu)?;
            vision.encode_into(gpu, a, &px, &features, layers)?;
            Ok(features)
        }
        ImageInput::Many(images) => {
            let parts = images
                .into_iter()
                .map(|one| image_tensor(model, one, acts, layers))
                .collect::<Result<Vec<_>>>()?;
            let (rows, cols) = (parts[0].rows(), parts[0].cols());
            let all = Tensor::zeros(gpu, "image_features", &[parts.len() * rows, cols])?;
            let mut rec = Recorder::new(gpu);
            for (i, part) in parts.iter().enumerate() {
                copy_rows(&mut rec, part, 0, &all, i * rows, rows)?;
            }
            rec.run()?;
            Ok(all)
        }
    }
}

impl From<ImageFeatures> for ImageInput {
    fn from(f: ImageFeatures) -> Self {
        ImageInput::Features(f)
    }
}

impl From<PixelValues> for ImageInput {
    fn from(px: PixelValues) -> Self {
        ImageInput::Pixels(px)
    }
}

/// A step from the GPU's greedy pick in slot `slot` of `picks`.
fn pick_step(slot: usize, picks: &[u32]) -> Step {
    let (id, logprob) = decode_pick(&picks[4 * slot..4 * slot + 4]);
    Step {
        id,
        text: String::new(),
        logprob,
        top: Vec::new(),
    }
}

/// Choose on the host: log-probabilities of the raw logits, then HF's repetition penalty over
/// `history` (the prompt and the generated tokens), then the sampler.
fn host_choice(
    options: &GenerateOptions,
    history: &[&[u32]],
    sampler: &mut Sampler,
    logits: &mut [f32],
) -> Step {
    // The penalty changes the logits the sampler sees, not the reported log-probabilities.
    let raw = (options.repetition_penalty != 1.0).then(|| logits.to_vec());
    apply_repetition_penalty(logits, history, options.repetition_penalty);
    let id = sampler.sample(logits);
    let (logprob, top) = logprobs(raw.as_deref().unwrap_or(logits), id, options.top_logprobs);
    Step {
        id,
        text: String::new(),
        logprob,
        top,
    }
}
