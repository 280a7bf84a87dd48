//! The engine's side of the app: one worker thread owns the loaded model, the mask decoder
//! and the current image's features, and runs the [`Scheduler`] step by step, so the UI
//! thread never waits for the GPU. The UI sends [`Command`]s and drains [`Update`]s each
//! frame; the worker asks egui for a repaint after every update it sends.
//!
//! The model runs on the window's own wgpu device (the [`Gpu`] made from eframe's
//! `RenderState`), so rendering and inference share one queue.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use image::{DynamicImage, GrayImage};
use paligemma::generate::{
    GenerateOptions, Generation, ImageFeatures, ImageInput, Prompt, Request, Scheduler,
    SchedulerEvent, SchedulerOptions,
};
use paligemma::gpu::Gpu;
use paligemma::model::{
    CancelToken, CheckpointKind, LoadProgress, ModelBuilder, PaliGemma, WeightFormat,
};
use paligemma::tasks::{parse_answer, MaskDecoder};

/// What to load.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    /// The checkpoint directory (already resolved from an `org/name`).
    pub dir: PathBuf,
    /// What the user typed or picked, for messages.
    pub name: String,
    /// How the weights are stored on the GPU; `None` loads them as the checkpoint stores
    /// them (f16, or the format `paligemma quantize` saved).
    pub format: Option<WeightFormat>,
    /// A PEFT LoRA adapter directory merged at load.
    pub adapter: Option<PathBuf>,
    /// Cancels the load.
    pub cancel: CancelToken,
}

/// One question about an image.
#[derive(Debug, Clone)]
pub struct Question {
    /// Identifies the image: features computed for the same id are reused.
    pub image_id: u64,
    /// The image.
    pub image: Arc<DynamicImage>,
    /// The PaliGemma prompt.
    pub prompt: String,
    /// Decoding options.
    pub options: GenerateOptions,
}

/// What the UI asks the worker to do.
#[derive(Debug)]
pub enum Command {
    /// Load a model (replacing the current one).
    Load(LoadRequest),
    /// Load the VQ-VAE mask decoder (`vae-oid.npz`).
    LoadMaskDecoder(PathBuf),
    /// Answer a question.
    Ask(Question),
    /// Stop the running answer after the current token.
    Stop,
    /// Decode the `<seg>` tokens of `answer` into full-image masks, one per parsed object.
    Masks {
        /// The answer text.
        answer: String,
        /// The image's width in pixels.
        width: u32,
        /// The image's height in pixels.
        height: u32,
    },
}

/// What a loaded model is.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// What the user opened (a directory or an `org/name`).
    pub name: String,
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// What the config and the name say the checkpoint is (PaliGemma 1 or 2, pt/mix/ft).
    pub kind: CheckpointKind,
    /// The kind and the sizes of both towers.
    pub summary: String,
    /// Input image side in pixels.
    pub image_size: usize,
    /// The weight format on the GPU.
    pub format: WeightFormat,
    /// The LoRA adapter merged at load.
    pub adapter: Option<PathBuf>,
    /// Seconds the load took.
    pub load_s: f64,
}

/// What the worker reports.
#[derive(Debug)]
pub enum Update {
    /// The load has got this far.
    Progress(LoadProgress),
    /// The model is loaded.
    Loaded(ModelInfo),
    /// The load failed or was cancelled.
    LoadFailed(String),
    /// The mask decoder is loaded.
    MaskDecoderLoaded(PathBuf),
    /// The mask decoder could not be loaded.
    MaskDecoderFailed(String),
    /// The image's features are ready.
    Vision {
        /// Seconds the vision tower ran, or `None` when the features of an earlier question
        /// about the same image were reused.
        seconds: Option<f64>,
        /// How many times the model's vision tower has run in all.
        runs: u64,
    },
    /// A new piece of the answer.
    Text(String),
    /// The answer is complete (or was stopped).
    Finished(Box<Generation>),
    /// The question failed.
    Failed(String),
    /// The masks of an answer, indexed like its parsed objects (`None` for objects without
    /// mask tokens), or why they could not be decoded.
    Masks(Result<Vec<Option<GrayImage>>, String>),
}

/// The UI's handle on the worker.
pub struct Engine {
    tx: Sender<Command>,
    rx: Receiver<Update>,
    gpu: Arc<Gpu>,
}

impl Engine {
    /// Start the worker on `gpu`; `repaint` is called after every update it sends (the UI
    /// passes `egui::Context::request_repaint`).
    pub fn spawn(gpu: Arc<Gpu>, repaint: impl Fn() + Send + Sync + 'static) -> Self {
        let (tx, commands) = channel();
        let (updates, rx) = channel();
        let worker = Worker {
            gpu: Arc::clone(&gpu),
            commands,
            deferred: VecDeque::new(),
            out: Arc::new(move |u| {
                // The UI has gone when this fails: the worker then stops at its next receive.
                let _ = updates.send(u);
                repaint();
            }),
            model: None,
            masks: None,
            features: None,
        };
        std::thread::Builder::new()
            .name("paligemma-worker".into())
            .spawn(move || worker.run())
            .expect("the OS can start a thread");
        Engine { tx, rx, gpu }
    }

    /// The GPU the model runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Send a command; it is carried out in order after the ones before it.
    pub fn send(&self, command: Command) {
        // The worker only stops when this handle is dropped, so the send cannot fail.
        let _ = self.tx.send(command);
    }

    /// The next update, if one is waiting.
    pub fn try_recv(&self) -> Option<Update> {
        self.rx.try_recv().ok()
    }
}

struct Worker {
    gpu: Arc<Gpu>,
    commands: Receiver<Command>,
    deferred: VecDeque<Command>,
    out: Arc<dyn Fn(Update) + Send + Sync>,
    model: Option<Arc<PaliGemma>>,
    masks: Option<MaskDecoder>,
    features: Option<(u64, ImageFeatures)>,
}

impl Worker {
    fn run(mut self) {
        loop {
            let command = match self.deferred.pop_front() {
                Some(c) => c,
                None => match self.commands.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                },
            };
            match command {
                Command::Load(request) => self.load(request),
                Command::LoadMaskDecoder(path) => {
                    let update = match MaskDecoder::load(Arc::clone(&self.gpu), &path) {
                        Ok(decoder) => {
                            self.masks = Some(decoder);
                            Update::MaskDecoderLoaded(path)
                        }
                        Err(e) => Update::MaskDecoderFailed(e.to_string()),
                    };
                    (self.out)(update);
                }
                Command::Ask(question) => match self.ask(question) {
                    Ok(generation) => (self.out)(Update::Finished(Box::new(generation))),
                    Err(e) => (self.out)(Update::Failed(e)),
                },
                // Nothing is running; a late stop has nothing to stop.
                Command::Stop => {}
                Command::Masks {
                    answer,
                    width,
                    height,
                } => {
                    let masks = self.decode_masks(&answer, width, height);
                    (self.out)(Update::Masks(masks));
                }
            }
        }
    }

    fn load(&mut self, request: LoadRequest) {
        // Free the old model's GPU memory before the new one takes its own.
        self.model = None;
        self.features = None;
        let out = Arc::clone(&self.out);
        let mut last = Instant::now();
        let mut builder = ModelBuilder::new(&request.dir)
            .gpu(Arc::clone(&self.gpu))
            .cancel_token(request.cancel.clone())
            .on_progress(move |p| {
                // A checkpoint has hundreds of tensors: report at most ~30 times a second,
                // and the last report always.
                if last.elapsed().as_millis() >= 33 || p.bytes_done == p.bytes_total {
                    last = Instant::now();
                    out(Update::Progress(p.clone()));
                }
            });
        if let Some(format) = request.format {
            builder = builder.weights(format);
        }
        if let Some(adapter) = &request.adapter {
            builder = builder.adapter(adapter);
        }
        let started = Instant::now();
        let result = builder.build();
        let out = &self.out;
        match result {
            Ok(model) => {
                let config = &model.config;
                let kind = CheckpointKind::detect(config, &request.dir);
                let summary = format!(
                    "{kind} · vision {}×{} · text {}×{} · {} image tokens",
                    config.vision.num_hidden_layers,
                    config.vision.hidden_size,
                    config.text.num_hidden_layers,
                    config.text.hidden_size,
                    config.num_image_tokens()
                );
                let info = ModelInfo {
                    name: request.name,
                    dir: request.dir,
                    kind,
                    summary,
                    image_size: config.vision.image_size,
                    format: model.weight_format(),
                    adapter: request.adapter,
                    load_s: started.elapsed().as_secs_f64(),
                };
                self.model = Some(Arc::new(model));
                out(Update::Loaded(info));
            }
            Err(paligemma::Error::Cancelled) => out(Update::LoadFailed("loading cancelled".into())),
            Err(e) => out(Update::LoadFailed(format!("{}: {e}", request.name))),
        }
    }

    fn ask(&mut self, question: Question) -> Result<Generation, String> {
        let model = Arc::clone(self.model.as_ref().ok_or("no model is loaded")?);
        let features = match &self.features {
            Some((id, f)) if *id == question.image_id => {
                (self.out)(Update::Vision {
                    seconds: None,
                    runs: model.vision_runs(),
                });
                f.clone()
            }
            _ => {
                let start = Instant::now();
                let pixels = model.images.preprocess(&question.image);
                let f = model.image_features(&pixels).map_err(|e| e.to_string())?;
                self.features = Some((question.image_id, f.clone()));
                (self.out)(Update::Vision {
                    seconds: Some(start.elapsed().as_secs_f64()),
                    runs: model.vision_runs(),
                });
                f
            }
        };
        let mut scheduler = Scheduler::new(
            &model,
            SchedulerOptions {
                max_sequences: 1,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let id = scheduler
            .submit(Request {
                image: ImageInput::Features(features),
                prompt: Prompt::Text(question.prompt),
                options: question.options,
            })
            .map_err(|e| e.to_string())?;
        loop {
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Stop) => {
                        scheduler.cancel(id);
                    }
                    Ok(other) => self.deferred.push_back(other),
                    Err(TryRecvError::Empty) => break,
                    // The UI has gone: stop generating.
                    Err(TryRecvError::Disconnected) => {
                        scheduler.cancel(id);
                        break;
                    }
                }
            }
            for event in scheduler.step().map_err(|e| e.to_string())? {
                match event {
                    SchedulerEvent::Text { text, .. } => (self.out)(Update::Text(text)),
                    SchedulerEvent::Finished { result, .. } => {
                        return result.map_err(|e| e.to_string());
                    }
                }
            }
        }
    }

    fn decode_masks(
        &self,
        answer: &str,
        width: u32,
        height: u32,
    ) -> Result<Vec<Option<GrayImage>>, String> {
        let objects = parse_answer(answer, width, height);
        if !objects.iter().any(|o| o.valid && o.seg_codes.is_some()) {
            return Ok(vec![None; objects.len()]);
        }
        let decoder = self.masks.as_ref().ok_or(
            "the answer has mask tokens: open the mask decoder (vae-oid.npz) to draw them",
        )?;
        paligemma::tasks::decode_masks(decoder, &objects, width, height).map_err(|e| e.to_string())
    }
}
