//! The blocking, streaming, async and batch conveniences of [`PaliGemma`], each a thin loop
//! over a [`Scheduler`].

use std::collections::HashMap;
use std::sync::Arc;

use super::scheduler::{ImageFeatures, ImageInput, Prompt, Request, Scheduler, SchedulerEvent};
use super::{GenerateOptions, Generation, SchedulerOptions};
use crate::model::PaliGemma;
use crate::processor::image::PixelValues;
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

impl PaliGemma {
    /// Run the vision tower and projector once and keep the result on the GPU, to answer
    /// several prompts about the same image ([`ImageInput::Features`]) without running the
    /// tower again. One encoder layer per submission.
    pub fn image_features(&self, pixels: &PixelValues) -> Result<ImageFeatures> {
        let gpu = &**self.gpu();
        let vision = self.vision_tower();
        let acts = vision.activations(gpu)?;
        let tensor = vision.features(gpu)?;
        vision.encode_into(gpu, &acts, pixels, &tensor, 1)?;
        Ok(ImageFeatures { tensor })
    }

    /// How many times the vision tower has run on this model (each request with pixels runs
    /// it once; requests with [`ImageFeatures`] do not).
    pub fn vision_runs(&self) -> u64 {
        self.vision_tower().runs()
    }

    /// Answer `prompt` about the image, calling `on_text` with each new piece of text as it
    /// is generated; `on_text` returning `false` cancels the generation there (the result
    /// then has [`super::FinishReason::Cancelled`]).
    pub fn generate(
        &self,
        pixels: &PixelValues,
        prompt: &str,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let request = Request {
            image: ImageInput::Pixels(pixels.clone()),
            prompt: Prompt::Text(prompt.to_string()),
            options: options.clone(),
        };
        self.run_one(request, on_text)
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
        let request = Request {
            image: ImageInput::Pixels(pixels.clone()),
            prompt: Prompt::Ids(ids.to_vec()),
            options: options.clone(),
        };
        self.run_one(request, on_text)
    }

    /// Run one request to the end on its own scheduler, or, with more than one beam
    /// ([`GenerateOptions::num_beams`]), by beam search (its beams decode as one batch; the
    /// answer comes to `on_text` in one piece when the search ends).
    pub fn run_one(
        &self,
        request: Request,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        if request.options.num_beams > 1 {
            return super::beam::run(self, request, on_text);
        }
        let opts = SchedulerOptions {
            max_sequences: 1,
            ..Default::default()
        };
        let mut results = self.run_all(opts, vec![request], &mut |_, t| on_text(t))?;
        results.remove(0)
    }

    /// Run `requests` on one scheduler of `opts` (continuous batching: each enters the batch
    /// as soon as a slot is free); `on_text(i, piece)` streams request `i`'s answer and
    /// returning `false` cancels it. Returns each request's result in order.
    pub fn run_all(
        &self,
        opts: SchedulerOptions,
        requests: Vec<Request>,
        on_text: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<Vec<Result<Generation>>> {
        let mut scheduler = Scheduler::new(self, opts)?;
        let mut index = HashMap::new();
        let mut results: Vec<Option<Result<Generation>>> = Vec::new();
        for (i, request) in requests.into_iter().enumerate() {
            results.push(None);
            match scheduler.submit(request) {
                Ok(id) => {
                    index.insert(id, i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        while !scheduler.is_idle() {
            for event in scheduler.step()? {
                match event {
                    SchedulerEvent::Text { id, text } => {
                        if !on_text(index[&id], &text) {
                            scheduler.cancel(id);
                        }
                    }
                    SchedulerEvent::Finished { id, result } => {
                        results[index[&id]] = Some(result);
                    }
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every submitted request finishes"))
            .collect())
    }

    /// Run a request on a worker thread and stream its text: the returned
    /// [`GenerationStream`] is both a blocking [`Iterator`] and an async
    /// [`futures::Stream`] of [`Event`]s, ending with [`Event::Done`]. Dropping it cancels the
    /// request after the current token. Many requests may share one loaded model; each
    /// stream runs its own scheduler.
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

    /// Answer several (image, prompt) requests with continuous batching (the default
    /// [`SchedulerOptions`]): their decode steps share every weight read. `on_text(i, piece)`
    /// streams request `i`'s answer; returning `false` cancels that request. The outputs are
    /// the ones each request gives on its own; the first failing request's error is
    /// returned.
    pub fn generate_batch(
        &self,
        requests: &[(PixelValues, String)],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<Vec<Generation>> {
        let requests = requests
            .iter()
            .map(|(px, prompt)| Request {
                image: ImageInput::Pixels(px.clone()),
                prompt: Prompt::Text(prompt.clone()),
                options: options.clone(),
            })
            .collect();
        self.batch(requests, on_text)
    }

    /// As [`PaliGemma::generate_batch`] with tokenized prompts.
    pub fn generate_batch_ids(
        &self,
        requests: &[(&PixelValues, &[u32])],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<Vec<Generation>> {
        let requests = requests
            .iter()
            .map(|(px, ids)| Request {
                image: ImageInput::Pixels((*px).clone()),
                prompt: Prompt::Ids(ids.to_vec()),
                options: options.clone(),
            })
            .collect();
        self.batch(requests, on_text)
    }

    fn batch(
        &self,
        requests: Vec<Request>,
        on_text: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<Vec<Generation>> {
        if requests.is_empty() {
            return Err(Error::Request("no requests".into()));
        }
        let opts = SchedulerOptions::default();
        self.run_all(opts, requests, on_text)?.into_iter().collect()
    }
}
