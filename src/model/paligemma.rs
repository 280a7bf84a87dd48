//! PaliGemma: SigLIP + projector + Gemma, with its processors, loaded from a checkpoint
//! directory. Load once, then run any number of (image, prompt) requests.

use std::sync::Arc;
use std::time::Instant;

use super::config::PaliGemmaConfig;
use super::gemma::Gemma;
use super::siglip::VisionTower;
use super::weights::Checkpoint;
use crate::generate::{logprobs, GenerateOptions, Generation, Sampler, Step, Timings};
use crate::gpu::{Gpu, Plan, Recorder, Tensor};
use crate::ops::sample::{argmax_logprob, read_pick};
use crate::processor::image::{ImageProcessor, PixelValues};
use crate::processor::prompt::{PromptProcessor, TextStream};
use crate::{Error, Result};

/// What a [`GenerationStream`] yields.
#[derive(Debug)]
pub enum Event {
    /// A new piece of the answer.
    Text(String),
    /// The request finished (or failed); always the last event.
    Done(Box<Result<Generation>>),
}

/// The events of a streamed request; see [`PaliGemma::generate_stream`].
pub struct GenerationStream {
    rx: futures::channel::mpsc::UnboundedReceiver<Event>,
}

impl futures::Stream for GenerationStream {
    type Item = Event;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        std::pin::Pin::new(&mut self.rx).poll_next(cx)
    }
}

impl Iterator for GenerationStream {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        futures::executor::block_on(futures::StreamExt::next(&mut self.rx))
    }
}

/// A loaded PaliGemma model ([`super::ModelBuilder`] loads one).
pub struct PaliGemma {
    gpu: Arc<Gpu>,
    /// The parsed `config.json`.
    pub config: PaliGemmaConfig,
    vision: VisionTower,
    text: Gemma,
    /// Image preprocessing from `preprocessor_config.json`.
    pub images: ImageProcessor,
    prompts: Option<PromptProcessor>,
    load_s: f64,
}

/// Just the image half of PaliGemma (SigLIP + projector) with its preprocessing, for
/// computing image embeddings without loading the language model.
pub struct ImageEncoder {
    gpu: Arc<Gpu>,
    /// The parsed `config.json`.
    pub config: PaliGemmaConfig,
    vision: VisionTower,
    /// Image preprocessing from `preprocessor_config.json`.
    pub images: ImageProcessor,
}

impl ImageEncoder {
    /// Load the vision tower and projector from `ck` (see [`super::ModelBuilder`]).
    pub(super) fn from_checkpoint(
        gpu: Arc<Gpu>,
        config: PaliGemmaConfig,
        ck: &Checkpoint,
        images: ImageProcessor,
    ) -> Result<Self> {
        let vision = VisionTower::load(ck, &gpu, &config)?;
        Ok(ImageEncoder {
            gpu,
            config,
            vision,
            images,
        })
    }

    /// Projector output `[num_image_tokens, hidden]` row-major for preprocessed pixels.
    pub fn encode(&self, pixels: &PixelValues) -> Result<Vec<f32>> {
        self.vision.encode(&self.gpu, pixels)
    }
}

impl PaliGemma {
    /// Load both towers from `ck` (see [`super::ModelBuilder`]); `start` is when the load
    /// began, for [`PaliGemma::load_seconds`]. Without `prompts` (synthetic weights), use
    /// [`PaliGemma::generate_ids`].
    pub(super) fn from_checkpoint(
        gpu: Arc<Gpu>,
        config: PaliGemmaConfig,
        ck: &Checkpoint,
        images: ImageProcessor,
        prompts: Option<PromptProcessor>,
        start: Instant,
    ) -> Result<Self> {
        let vision = VisionTower::load(ck, &gpu, &config)?;
        let text = Gemma::load(ck, &gpu, &config.text)?;
        Ok(PaliGemma {
            gpu,
            config,
            vision,
            text,
            images,
            prompts,
            load_s: start.elapsed().as_secs_f64(),
        })
    }

    /// The tokenizer and prompt layout.
    pub fn prompts(&self) -> Result<&PromptProcessor> {
        self.prompts
            .as_ref()
            .ok_or_else(|| Error::Model("this model has no tokenizer (synthetic weights)".into()))
    }

    /// Prompt ids for a model without a tokenizer: image placeholders, `<bos>`, then `text`.
    pub fn placeholder_prompt(&self, text: &[u32]) -> Vec<u32> {
        let mut ids = vec![self.config.image_token_index; self.config.num_image_tokens()];
        ids.push(self.config.bos_token_id);
        ids.extend_from_slice(text);
        ids
    }

    /// The GPU the model runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Seconds the load took.
    pub fn load_seconds(&self) -> f64 {
        self.load_s
    }

    /// Run the vision tower and projector: `[num_image_tokens, hidden]` row-major, before
    /// any scaling by the language model.
    pub fn encode_image(&self, pixels: &PixelValues) -> Result<Vec<f32>> {
        self.vision.encode(&self.gpu, pixels)
    }

    /// Answer `prompt` about the image, calling `on_text` with each new piece of text as it
    /// is generated; `on_text` returning `false` stops the generation there.
    pub fn generate(
        &self,
        pixels: &PixelValues,
        prompt: &str,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let ids = self.prompts()?.encode(prompt)?;
        self.generate_ids(pixels, &ids, options, on_text)
    }

    /// Run a request on a worker thread and stream its text: the returned
    /// [`GenerationStream`] is both a blocking [`Iterator`] and an async
    /// [`futures::Stream`] of [`Event`]s, ending with [`Event::Done`]. Dropping it cancels the
    /// request after the current token. Many requests may share one loaded model; they run
    /// one after another on the GPU.
    pub fn generate_stream(
        self: &Arc<Self>,
        pixels: PixelValues,
        prompt: String,
        options: GenerateOptions,
    ) -> GenerationStream {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let model = Arc::clone(self);
        std::thread::spawn(move || {
            let mut on_text = |t: &str| tx.unbounded_send(Event::Text(t.to_string())).is_ok();
            let result = model.generate(&pixels, &prompt, &options, &mut on_text);
            let _ = tx.unbounded_send(Event::Done(Box::new(result)));
        });
        GenerationStream { rx }
    }

    /// Run a request on a worker thread without blocking the caller: resolves to the whole
    /// [`Generation`].
    pub async fn generate_async(
        self: &Arc<Self>,
        pixels: PixelValues,
        prompt: String,
        options: GenerateOptions,
    ) -> Result<Generation> {
        let mut stream = self.generate_stream(pixels, prompt, options);
        while let Some(event) = futures::StreamExt::next(&mut stream).await {
            if let Event::Done(result) = event {
                return *result;
            }
        }
        Err(Error::Gpu(
            "the generation worker stopped without a result".into(),
        ))
    }

    /// As [`PaliGemma::generate`] with the prompt already tokenized (image placeholders
    /// included).
    pub fn generate_ids(
        &self,
        pixels: &PixelValues,
        ids: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let mut results =
            self.generate_batch_ids(&[(pixels, ids)], options, &mut |_, t| on_text(t))?;
        Ok(results.remove(0))
    }

    /// Answer several (image, prompt) requests together: their prefills run in one
    /// submission and their decode steps share every weight read. `on_text(i, piece)`
    /// streams request `i`'s answer; returning `false` stops that request. The outputs are
    /// the ones each request gives on its own.
    pub fn generate_batch(
        &self,
        requests: &[(PixelValues, String)],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<Vec<Generation>> {
        let prompts = self.prompts()?;
        let ids = requests
            .iter()
            .map(|(_, p)| prompts.encode(p))
            .collect::<Result<Vec<_>>>()?;
        let reqs: Vec<(&PixelValues, &[u32])> = requests
            .iter()
            .zip(&ids)
            .map(|((px, _), i)| (px, i.as_slice()))
            .collect();
        self.generate_batch_ids(&reqs, options, on_text)
    }

    /// As [`PaliGemma::generate_batch`] with tokenized prompts.
    pub fn generate_batch_ids(
        &self,
        requests: &[(&PixelValues, &[u32])],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<Vec<Generation>> {
        options.sampling.validate()?;
        if requests.is_empty() {
            return Err(Error::Request("no requests".into()));
        }
        if options.max_new_tokens == 0 {
            return Err(Error::Request("max new tokens must be at least 1".into()));
        }
        let limit = self.config.text.max_position_embeddings;
        let n_img = self.config.num_image_tokens();
        for (_, ids) in requests {
            if ids.len() + options.max_new_tokens > limit {
                return Err(Error::Request(format!(
                    "the prompt has {} tokens; with --max-new-tokens {} that exceeds the model's {limit} positions",
                    ids.len(),
                    options.max_new_tokens
                )));
            }
            if ids.len() <= n_img
                || ids[..n_img]
                    .iter()
                    .any(|&i| i != self.config.image_token_index)
            {
                return Err(Error::Request(format!(
                    "the prompt must start with {n_img} image tokens followed by text"
                )));
            }
        }
        let gpu = &*self.gpu;
        let n = requests.len();

        let t0 = Instant::now();
        let mut rec = Recorder::new(gpu);
        let mut vision = Vec::with_capacity(n);
        for (pixels, _) in requests {
            let va = self.vision.activations(gpu)?;
            self.vision.upload(gpu, &va, pixels)?;
            self.vision.record(&mut rec, &va, usize::MAX, true)?;
            vision.push(va);
        }
        rec.run()?;
        let vision_s = t0.elapsed().as_secs_f64();

        // Greedy requests without top-k pick the token on the GPU and read back 16 bytes;
        // the others read their logits row.
        let on_gpu = options.sampling.temperature == 0.0 && options.top_logprobs == 0;
        let t1 = Instant::now();
        let mut seqs = Vec::with_capacity(n);
        let mut picks = Vec::with_capacity(n);
        let mut rec = Recorder::new(gpu);
        for ((_, ids), va) in requests.iter().zip(&vision) {
            let mut seq = self.text.sequence(gpu, ids.len(), options.max_new_tokens)?;
            self.text
                .record_prefill(&mut rec, &mut seq, ids, Some(&va.features))?;
            let pick = Tensor::from_u32(gpu, "pick", &[4], &[0; 4])?;
            if on_gpu {
                argmax_logprob(&mut rec, &seq.logits, 0, &pick)?;
            }
            seqs.push(seq);
            picks.push(pick);
        }
        rec.run()?;
        let prefill_s = t1.elapsed().as_secs_f64();
        drop(vision);

        let eos = &self.config.eos_token_ids;
        let mut samplers: Vec<Sampler> = (0..n)
            .map(|_| Sampler::new(options.sampling.clone()))
            .collect();
        let mut streams: Vec<TextStream> = (0..n).map(|_| TextStream::default()).collect();
        let mut outs: Vec<Generation> = requests
            .iter()
            .map(|(_, ids)| Generation {
                prompt_tokens: ids.len(),
                ..Default::default()
            })
            .collect();
        let mut done = vec![false; n];
        let mut finished_at = vec![None; n];
        let batch = if options.max_new_tokens > 1 {
            Some(self.text.batch(gpu, n)?)
        } else {
            None
        };
        let mut plan: Option<Plan> = None;
        let t2 = Instant::now();
        let mut stepped = false;
        loop {
            for b in 0..n {
                if done[b] {
                    continue;
                }
                let step = if on_gpu {
                    let (id, logprob) = read_pick(gpu, &picks[b])?;
                    Step {
                        id,
                        logprob,
                        top: Vec::new(),
                    }
                } else {
                    let logits = match (&batch, stepped) {
                        (Some(batch), true) => batch.logits.read_rows(gpu, b, 1)?,
                        _ => seqs[b].logits.read(gpu)?,
                    };
                    let id = samplers[b].sample(&logits);
                    let (logprob, top) = logprobs(&logits, id, options.top_logprobs);
                    Step { id, logprob, top }
                };
                let id = step.id;
                let out = &mut outs[b];
                out.steps.push(step);
                out.token_ids.push(id);
                let stop = options.stop_at_eos && eos.contains(&id);
                let mut cancelled = false;
                if let (false, Some(prompts)) = (stop, &self.prompts) {
                    if let Some(delta) = streams[b].push(prompts, id)? {
                        cancelled = !on_text(b, &delta);
                    }
                }
                if stop || cancelled || out.token_ids.len() >= options.max_new_tokens {
                    done[b] = true;
                    finished_at[b] = Some(t2.elapsed().as_secs_f64());
                }
            }
            let Some(batch) = batch.as_ref().filter(|_| done.iter().any(|d| !d)) else {
                break;
            };
            // Every sequence steps (a finished one on its last token, its output unused), so
            // each step records the same dispatches on the same buffers and, after the first,
            // reuses the plan's bind groups with new parameters.
            let ids: Vec<u32> = outs
                .iter()
                .map(|o| *o.token_ids.last().expect("one token per sequence"))
                .collect();
            let mut rec = Recorder::new(gpu);
            self.text.record_step(&mut rec, batch, &mut seqs, &ids)?;
            if on_gpu {
                for (b, pick) in picks.iter().enumerate() {
                    argmax_logprob(&mut rec, &batch.logits, b, pick)?;
                }
            }
            rec.finish_into(&mut plan)?;
            if let Some(p) = &plan {
                p.run(gpu)?;
            }
            stepped = true;
        }
        for (b, out) in outs.iter_mut().enumerate() {
            let decoded = out.token_ids.len().saturating_sub(1);
            let secs = finished_at[b].unwrap_or_else(|| t2.elapsed().as_secs_f64());
            out.timings = Timings {
                load_s: 0.0,
                vision_s,
                prefill_s,
                decode_tok_s: if decoded > 0 && secs > 0.0 {
                    decoded as f64 / secs
                } else {
                    0.0
                },
            };
            if let Some(prompts) = &self.prompts {
                out.text = prompts.decode(&out.token_ids)?;
            }
        }
        Ok(outs)
    }
}
