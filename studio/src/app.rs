//! The Studio window: model and image pickers, the task picker, the streaming answer with
//! its boxes and masks drawn over the image, exports and timings. All GPU work happens on the
//! [`Engine`]'s worker; this module only draws and reacts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use eframe::egui::{
    self, Color32, ColorImage, FontId, Pos2, Rect, RichText, Sense, Stroke, StrokeKind,
    TextureHandle, TextureOptions, Vec2,
};
use image::{DynamicImage, GenericImageView, GrayImage, RgbaImage};
use paligemma::generate::{GenerateOptions, Generation};
use paligemma::gpu::{Gpu, GpuOptions};
use paligemma::model::{resolve_model_dir, CancelToken, LoadProgress, WeightFormat};
use paligemma::processor::image::decode_image;
use paligemma::tasks::{annotate, draw::object_color, parse_answer, Object, ObjectReport, Report};

use crate::engine::{Command, Engine, LoadRequest, ModelInfo, Question, Update};
use crate::task::{TaskKind, TaskState, LANGUAGES};

/// How the app starts (the command-line flags).
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// A checkpoint directory or `org/name` to load at once.
    pub model: Option<String>,
    /// An image to open at once.
    pub image: Option<PathBuf>,
    /// A prompt to put in the task picker.
    pub prompt: Option<String>,
    /// Run `prompt` as soon as the model and the image are ready.
    pub run: bool,
    /// Weight format of the first load (`None`: as the checkpoint stores them).
    pub weights: Option<WeightFormat>,
    /// LoRA adapter of the first load.
    pub adapter: Option<PathBuf>,
    /// The mask decoder (`vae-oid.npz`) to load at once.
    pub vae: Option<PathBuf>,
    /// Most tokens an answer may have (0: the default, 64).
    pub max_new_tokens: usize,
    /// Save a screenshot of the window here and close: after the answer to `prompt` (and
    /// its masks) when there is one, else once the model and image are shown.
    pub screenshot: Option<PathBuf>,
}

/// How a `--screenshot` run ended: `Ok` with the saved file, or what went wrong. Shared with
/// `main`, which turns it into the exit code.
pub type Outcome = Arc<Mutex<Option<Result<PathBuf, String>>>>;

struct Loading {
    name: String,
    progress: Option<LoadProgress>,
    cancel: CancelToken,
    started: Instant,
}

struct Picture {
    id: u64,
    name: String,
    image: Arc<DynamicImage>,
    texture: TextureHandle,
}

struct Answer {
    prompt: String,
    image_id: u64,
    text: String,
    running: bool,
    /// `Some(None)` when the image's features were reused.
    vision_s: Option<Option<f64>>,
    generation: Option<Generation>,
    objects: Vec<Object>,
    masks: Vec<Option<GrayImage>>,
    mask_textures: Vec<Option<TextureHandle>>,
    masks_pending: bool,
    mask_note: Option<String>,
}

/// A screenshot being taken for `--screenshot`.
enum Shot {
    /// Waiting until what it should show is on screen.
    Waiting,
    /// Asked for; the callback puts the image here.
    Requested(Arc<Mutex<Option<Arc<ColorImage>>>>),
    /// Saved (or failed); the window is closing.
    Done,
}

/// The Studio application (an [`eframe::App`]).
pub struct StudioApp {
    engine: Option<Engine>,
    adapter: String,
    model_field: String,
    format: Option<WeightFormat>,
    adapter_field: String,
    vae: Option<PathBuf>,
    vae_loading: bool,
    loading: Option<Loading>,
    model: Option<ModelInfo>,
    picture: Option<Picture>,
    next_image_id: u64,
    task: TaskState,
    max_new_tokens: usize,
    answer: Option<Answer>,
    show_raw: bool,
    errors: Vec<String>,
    notice: Option<String>,
    run_when_ready: bool,
    screenshot: Option<(PathBuf, Shot)>,
    outcome: Outcome,
    timings_rect: Option<Rect>,
    vision_runs: Option<u64>,
    device_errors: Arc<Mutex<Vec<String>>>,
}

impl StudioApp {
    /// The app on eframe's wgpu device (`cc.wgpu_render_state`), started as `start` says.
    /// Without a wgpu renderer (eframe's glow backend) the window opens and says why nothing
    /// can run.
    pub fn new(cc: &eframe::CreationContext<'_>, start: StartOptions, outcome: Outcome) -> Self {
        let ctx = cc.egui_ctx.clone();
        let mut errors = Vec::new();
        let device_errors = Arc::new(Mutex::new(Vec::new()));
        if let Some(rs) = &cc.wgpu_render_state {
            watch_device_errors(&rs.device, Arc::clone(&device_errors));
        }
        let (engine, adapter) = match &cc.wgpu_render_state {
            Some(rs) => match Gpu::from_device(
                &rs.adapter,
                rs.device.clone(),
                rs.queue.clone(),
                GpuOptions::default(),
            ) {
                Ok(gpu) => {
                    let name = gpu.describe();
                    let repaint = ctx.clone();
                    (
                        Some(Engine::spawn(gpu, move || repaint.request_repaint())),
                        name,
                    )
                }
                Err(e) => {
                    errors.push(format!("the window's GPU cannot run the model: {e}"));
                    (None, rs.adapter.get_info().name)
                }
            },
            None => {
                errors.push("eframe is not using its wgpu renderer; the model needs it".into());
                (None, "none".into())
            }
        };
        let mut app = StudioApp {
            engine,
            adapter,
            model_field: start.model.clone().unwrap_or_default(),
            format: start.weights,
            adapter_field: start
                .adapter
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            vae: None,
            vae_loading: false,
            loading: None,
            model: None,
            picture: None,
            next_image_id: 0,
            task: start
                .prompt
                .as_deref()
                .map(TaskState::from_prompt)
                .unwrap_or_default(),
            max_new_tokens: if start.max_new_tokens == 0 {
                GenerateOptions::default().max_new_tokens
            } else {
                start.max_new_tokens
            },
            answer: None,
            show_raw: false,
            errors,
            notice: None,
            run_when_ready: start.run && start.prompt.is_some(),
            screenshot: start.screenshot.clone().map(|p| (p, Shot::Waiting)),
            outcome,
            timings_rect: None,
            vision_runs: None,
            device_errors,
        };
        if let Some(vae) = &start.vae {
            app.load_mask_decoder(vae.clone());
        }
        if start.model.is_some() {
            app.load_model();
        }
        if let Some(path) = &start.image {
            app.open_image_path(&ctx, path);
        }
        app
    }

    // ----- what tests and automation read -----

    /// The loaded model, if any.
    pub fn model_info(&self) -> Option<&ModelInfo> {
        self.model.as_ref()
    }

    /// Whether a model is loading.
    pub fn is_loading(&self) -> bool {
        self.loading.is_some()
    }

    /// Whether an answer is being generated or its masks decoded.
    pub fn is_busy(&self) -> bool {
        self.answer
            .as_ref()
            .is_some_and(|a| a.running || a.masks_pending)
    }

    /// The current answer's text (with its `<loc>`/`<seg>` tokens).
    pub fn answer_text(&self) -> Option<&str> {
        self.answer.as_ref().map(|a| a.text.as_str())
    }

    /// The objects parsed from the current answer.
    pub fn objects(&self) -> &[Object] {
        self.answer.as_ref().map_or(&[], |a| &a.objects)
    }

    /// How many of the current answer's objects have a decoded mask.
    pub fn mask_count(&self) -> usize {
        self.answer
            .as_ref()
            .map_or(0, |a| a.masks.iter().flatten().count())
    }

    /// The finished generation of the current answer.
    pub fn generation(&self) -> Option<&Generation> {
        self.answer.as_ref().and_then(|a| a.generation.as_ref())
    }

    /// The errors shown in the window.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// The screen area of the timings (they change from run to run; snapshot tests mask it).
    pub fn timings_rect(&self) -> Option<Rect> {
        self.timings_rect
    }

    /// How many times the loaded model's vision tower has run, as of the last question
    /// (`None` before the first).
    pub fn vision_runs(&self) -> Option<u64> {
        self.vision_runs
    }

    /// The prompt the task picker writes now.
    pub fn prompt(&self) -> Result<String, String> {
        self.task.prompt()
    }

    // ----- actions -----

    /// Put a directory or `org/name` in the model field (what typing it does).
    pub fn set_model_field(&mut self, model: &str) {
        self.model_field = model.to_string();
    }

    /// Load the model named in the model field (stopping a running answer first).
    pub fn load_model(&mut self) {
        if self.loading.is_some() {
            self.errors
                .push("a model is loading: cancel it before loading another".into());
            return;
        }
        if self.is_busy() {
            self.stop();
        }
        let Some(engine) = &self.engine else {
            self.errors
                .push("no GPU: the model cannot be loaded".into());
            return;
        };
        let name = self.model_field.trim().to_string();
        if name.is_empty() {
            self.errors
                .push("type a model directory or an org/name, or pick a folder".into());
            return;
        }
        let dir = match resolve_model_dir(&name) {
            Ok(dir) => dir,
            Err(e) => {
                self.errors.push(e.to_string());
                return;
            }
        };
        let adapter = self.adapter_field.trim();
        let adapter = (!adapter.is_empty()).then(|| PathBuf::from(adapter));
        let cancel = CancelToken::new();
        self.model = None;
        self.answer = None;
        self.loading = Some(Loading {
            name: name.clone(),
            progress: None,
            cancel: cancel.clone(),
            started: Instant::now(),
        });
        engine.send(Command::Load(LoadRequest {
            dir,
            name,
            format: self.format,
            adapter,
            cancel,
        }));
    }

    /// Cancel the running load.
    pub fn cancel_load(&mut self) {
        if let Some(l) = &self.loading {
            l.cancel.cancel();
        }
    }

    /// Load the VQ-VAE mask decoder.
    pub fn load_mask_decoder(&mut self, path: PathBuf) {
        if let Some(engine) = &self.engine {
            self.vae_loading = true;
            engine.send(Command::LoadMaskDecoder(path));
        }
    }

    /// Open an image file (any format the engine reads).
    pub fn open_image_path(&mut self, ctx: &egui::Context, path: &Path) {
        match decode_image(path) {
            Ok(image) => self.set_image(ctx, display_name(path), image),
            Err(e) => self.errors.push(e.to_string()),
        }
    }

    /// Show `image` and ask about it from now on.
    pub fn set_image(&mut self, ctx: &egui::Context, name: String, image: DynamicImage) {
        let texture = ctx.load_texture(
            format!("image {}", self.next_image_id),
            color_image(&image),
            TextureOptions::LINEAR,
        );
        self.picture = Some(Picture {
            id: self.next_image_id,
            name,
            image: Arc::new(image),
            texture,
        });
        self.next_image_id += 1;
        self.answer = None;
    }

    /// Ask the task picker's prompt about the current image.
    pub fn run(&mut self) {
        let (Some(engine), Some(picture)) = (&self.engine, &self.picture) else {
            self.errors.push("open an image first".into());
            return;
        };
        if self.model.is_none() {
            self.errors.push("load a model first".into());
            return;
        }
        let prompt = match self.task.prompt() {
            Ok(p) => p,
            Err(e) => {
                self.errors.push(e);
                return;
            }
        };
        let masks = self.vae.is_some() || self.vae_loading;
        let warnings = self
            .model
            .as_ref()
            .map(|m| m.kind.prompt_warnings(&prompt, masks))
            .unwrap_or_default();
        self.notice = (!warnings.is_empty()).then(|| warnings.join("; "));
        engine.send(Command::Ask(Question {
            image_id: picture.id,
            image: Arc::clone(&picture.image),
            prompt: prompt.clone(),
            options: GenerateOptions {
                max_new_tokens: self.max_new_tokens,
                ..Default::default()
            },
        }));
        self.answer = Some(Answer {
            prompt,
            image_id: picture.id,
            text: String::new(),
            running: true,
            vision_s: None,
            generation: None,
            objects: Vec::new(),
            masks: Vec::new(),
            mask_textures: Vec::new(),
            masks_pending: false,
            mask_note: None,
        });
    }

    /// Stop the running answer.
    pub fn stop(&mut self) {
        if let Some(engine) = &self.engine {
            engine.send(Command::Stop);
        }
    }

    /// The parsed objects of the current answer as JSON (the CLI's `--json` shape).
    pub fn objects_json(&self) -> String {
        let report = Report {
            objects: self.objects().iter().map(ObjectReport::from).collect(),
        };
        serde_json::to_string_pretty(&report).expect("a report serialises")
    }

    /// The current image with the answer's boxes, labels and masks drawn (the CLI's
    /// `--annotate` picture).
    pub fn annotated_image(&self) -> Option<RgbaImage> {
        let picture = self.picture.as_ref()?;
        let answer = self.answer.as_ref();
        let objects = answer.map_or(&[][..], |a| &a.objects);
        let masks = answer.map_or(&[][..], |a| &a.masks);
        Some(annotate(&picture.image, objects, masks))
    }

    /// Save [`StudioApp::annotated_image`] as PNG.
    pub fn save_annotated(&mut self, path: &Path) {
        let Some(image) = self.annotated_image() else {
            self.errors.push("open an image first".into());
            return;
        };
        match image.save_with_format(path, image::ImageFormat::Png) {
            Ok(()) => self.notice = Some(format!("saved {}", path.display())),
            Err(e) => self.errors.push(format!("{}: {e}", path.display())),
        }
    }

    /// Save [`StudioApp::objects_json`].
    pub fn export_json(&mut self, path: &Path) {
        match std::fs::write(path, self.objects_json()) {
            Ok(()) => self.notice = Some(format!("saved {}", path.display())),
            Err(e) => self.errors.push(format!("{}: {e}", path.display())),
        }
    }

    // ----- updates from the worker -----

    fn poll(&mut self, ctx: &egui::Context) {
        let device_errors = std::mem::take(&mut *self.device_errors.lock().expect("not poisoned"));
        self.errors.extend(device_errors);
        let Some(engine) = &self.engine else { return };
        let mut updates = Vec::new();
        while let Some(u) = engine.try_recv() {
            updates.push(u);
        }
        for update in updates {
            self.apply(ctx, update);
        }
    }

    fn apply(&mut self, ctx: &egui::Context, update: Update) {
        match update {
            Update::Progress(p) => {
                if let Some(l) = &mut self.loading {
                    l.progress = Some(p);
                }
            }
            Update::Loaded(info) => {
                self.loading = None;
                self.vision_runs = None;
                self.model = Some(info);
            }
            Update::LoadFailed(e) => {
                self.loading = None;
                self.errors.push(e);
            }
            Update::MaskDecoderLoaded(path) => {
                self.vae_loading = false;
                self.vae = Some(path);
                self.notice = None;
                // An answer that came before the decoder can now have its masks.
                self.decode_answer_masks();
            }
            Update::MaskDecoderFailed(e) => {
                self.vae_loading = false;
                self.errors.push(e);
            }
            Update::Vision { seconds, runs } => {
                self.vision_runs = Some(runs);
                if let Some(a) = &mut self.answer {
                    a.vision_s = Some(seconds);
                }
            }
            Update::Text(piece) => {
                if let (Some(a), Some(p)) = (&mut self.answer, &self.picture) {
                    a.text.push_str(&piece);
                    let (w, h) = p.image.dimensions();
                    a.objects = parse_answer(&a.text, w, h);
                }
            }
            Update::Finished(generation) => {
                if let (Some(a), Some(p)) = (&mut self.answer, &self.picture) {
                    a.running = false;
                    a.text = generation.text.clone();
                    let (w, h) = p.image.dimensions();
                    a.objects = parse_answer(&a.text, w, h);
                    a.generation = Some(*generation);
                }
                self.decode_answer_masks();
            }
            Update::Failed(e) => {
                if let Some(a) = &mut self.answer {
                    a.running = false;
                }
                self.errors.push(e);
            }
            Update::Masks(result) => {
                let Some(a) = &mut self.answer else { return };
                a.masks_pending = false;
                match result {
                    Ok(masks) => {
                        a.mask_textures = masks
                            .iter()
                            .enumerate()
                            .map(|(i, m)| {
                                m.as_ref().map(|m| {
                                    ctx.load_texture(
                                        format!("mask {i}"),
                                        mask_image(m, object_color(i)),
                                        TextureOptions::LINEAR,
                                    )
                                })
                            })
                            .collect();
                        a.masks = masks;
                        a.mask_note = None;
                    }
                    Err(e) => a.mask_note = Some(e),
                }
            }
        }
    }

    /// Decode the current answer's masks when it has mask tokens, or say what is missing.
    fn decode_answer_masks(&mut self) {
        let (Some(engine), Some(a), Some(p)) = (&self.engine, &mut self.answer, &self.picture)
        else {
            return;
        };
        if a.running || a.image_id != p.id {
            return;
        }
        a.masks.clear();
        a.mask_textures.clear();
        if !a.objects.iter().any(|o| o.valid && o.seg_codes.is_some()) {
            a.mask_note = None;
            return;
        }
        if self.vae.is_none() && !self.vae_loading {
            a.mask_note = Some(
                "this answer has mask tokens: open the mask decoder (vae-oid.npz) to draw \
                 them"
                    .into(),
            );
            return;
        }
        let (width, height) = p.image.dimensions();
        a.masks_pending = true;
        engine.send(Command::Masks {
            answer: a.text.clone(),
            width,
            height,
        });
    }

    /// Show `text` as the answer to `prompt` about the current image, as if it had just been
    /// generated: its boxes are drawn and, with the mask decoder, its masks decoded. The raw
    /// answer editor goes through here, and it shows answers computed elsewhere (the CLI's,
    /// a server's) over the image.
    pub fn show_answer(&mut self, prompt: &str, text: &str) {
        let Some(p) = &self.picture else {
            self.errors.push("open an image first".into());
            return;
        };
        if self.is_busy() {
            self.errors
                .push("wait for the running answer to finish, or stop it".into());
            return;
        }
        let (w, h) = p.image.dimensions();
        self.answer = Some(Answer {
            prompt: prompt.to_string(),
            image_id: p.id,
            text: text.to_string(),
            running: false,
            vision_s: None,
            generation: None,
            objects: parse_answer(text, w, h),
            masks: Vec::new(),
            mask_textures: Vec::new(),
            masks_pending: false,
            mask_note: None,
        });
        self.decode_answer_masks();
    }

    // ----- --prompt and --screenshot -----

    fn automate(&mut self, ctx: &egui::Context) {
        // In `--screenshot` mode any error ends the run: the window closes and `main` exits 1.
        if let Some((_, shot)) = &mut self.screenshot {
            if !self.errors.is_empty() && !matches!(shot, Shot::Done) {
                *shot = Shot::Done;
                *self.outcome.lock().expect("not poisoned") = Some(Err(self.errors.join("; ")));
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                return;
            }
        }
        if self.run_when_ready
            && self.model.is_some()
            && self.picture.is_some()
            && !self.vae_loading
            && self.errors.is_empty()
        {
            self.run_when_ready = false;
            self.run();
        }
        let ready = self.model.is_some()
            && self.picture.is_some()
            && !self.run_when_ready
            && !self.vae_loading
            && !self.is_busy();
        let Some((path, shot)) = &mut self.screenshot else {
            return;
        };
        match shot {
            Shot::Waiting if ready => {
                let slot = Arc::new(Mutex::new(None));
                let fill = Arc::clone(&slot);
                let repaint = ctx.clone();
                ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(
                    egui::ScreenshotCallback::new(move |image| {
                        *fill.lock().expect("not poisoned") = Some(image);
                        repaint.request_repaint();
                    }),
                ));
                *shot = Shot::Requested(slot);
            }
            Shot::Requested(slot) => {
                let taken = slot.lock().expect("not poisoned").take();
                if let Some(image) = taken {
                    let result = save_color_image(&image, path)
                        .map(|()| path.clone())
                        .map_err(|e| format!("{}: {e}", path.display()));
                    *self.outcome.lock().expect("not poisoned") = Some(result);
                    *shot = Shot::Done;
                    ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                }
            }
            _ => {}
        }
        if matches!(
            self.screenshot,
            Some((_, Shot::Waiting | Shot::Requested(_)))
        ) {
            ctx.request_repaint_after(std::time::Duration::from_millis(50));
        }
    }

    // ----- input -----

    fn take_dropped_and_pasted(&mut self, ctx: &egui::Context) {
        let (dropped, paste) = ctx.input(|i| {
            let paste = i.events.iter().any(|e| {
                matches!(
                    e,
                    egui::Event::Key {
                        key: egui::Key::V,
                        pressed: true,
                        modifiers,
                        ..
                    } if modifiers.command
                )
            });
            (i.raw.dropped_files.clone(), paste)
        });
        for file in dropped {
            self.open_image_path(ctx, file.path());
        }
        if paste && !ctx.egui_wants_keyboard_input() {
            self.paste_image(ctx);
        }
    }

    /// Open the image on the clipboard.
    pub fn paste_image(&mut self, ctx: &egui::Context) {
        let image = arboard::Clipboard::new().and_then(|mut c| c.get_image());
        match image {
            Ok(img) => {
                let (w, h) = (img.width as u32, img.height as u32);
                match RgbaImage::from_raw(w, h, img.bytes.into_owned()) {
                    Some(rgba) => {
                        self.set_image(ctx, "pasted image".into(), DynamicImage::ImageRgba8(rgba))
                    }
                    None => self.errors.push("the clipboard image is malformed".into()),
                }
            }
            Err(e) => self.errors.push(format!("no image on the clipboard ({e})")),
        }
    }

    // ----- drawing -----

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            let label = ui.strong("Model");
            let field = egui::TextEdit::singleline(&mut self.model_field)
                .hint_text("directory or org/name")
                .desired_width(260.0);
            let response = ui.add(field).labelled_by(label.id);
            if response.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                self.load_model();
            }
            if ui.button("Folder…").clicked() {
                if let Some(dir) = rfd::FileDialog::new().pick_folder() {
                    self.model_field = dir.display().to_string();
                    self.load_model();
                }
            }
            let cached = crate::cached_models();
            if !cached.is_empty() {
                egui::ComboBox::from_id_salt("hf cache")
                    .selected_text("HF cache")
                    .show_ui(ui, |ui| {
                        for name in cached {
                            if ui.selectable_label(false, &name).clicked() {
                                self.model_field = name;
                                self.load_model();
                            }
                        }
                    });
            }
            let label = ui.label("Weights");
            egui::ComboBox::from_id_salt("weights")
                .selected_text(self.format.map_or("as stored", WeightFormat::name))
                .width(80.0)
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.format, None, "as stored");
                    for f in WeightFormat::ALL {
                        ui.selectable_value(&mut self.format, Some(f), f.name());
                    }
                })
                .response
                .labelled_by(label.id)
                .on_hover_text(
                    "how the weights are stored on the GPU: as the checkpoint stores them \
                     (f16, or what `paligemma quantize` saved), or quantised at load",
                );
            let label = ui.label("LoRA");
            ui.add(
                egui::TextEdit::singleline(&mut self.adapter_field)
                    .hint_text("none")
                    .desired_width(120.0),
            )
            .labelled_by(label.id);
            if ui
                .button("…")
                .on_hover_text("pick a LoRA adapter folder")
                .clicked()
            {
                if let Some(dir) = rfd::FileDialog::new().pick_folder() {
                    self.adapter_field = dir.display().to_string();
                }
            }
            let busy = self.loading.is_some() || self.is_busy();
            if ui.add_enabled(!busy, egui::Button::new("Load")).clicked() {
                self.load_model();
            }
            ui.separator();
            let vae = match (&self.vae, self.vae_loading) {
                (_, true) => "Mask decoder: loading…".to_string(),
                (Some(p), _) => format!("Mask decoder: {}", display_name(p)),
                (None, _) => "Mask decoder…".to_string(),
            };
            if ui
                .button(vae)
                .on_hover_text(
                    "segment answers carry 16 mask codes that big_vision's VQ-VAE \
                     decoder turns into masks: pick its weights, vae-oid.npz (published \
                     by Google at gs://big_vision/paligemma/vae-oid.npz and in the \
                     google/paligemma-hf Hugging Face space)",
                )
                .clicked()
            {
                if let Some(path) = rfd::FileDialog::new()
                    .add_filter("mask decoder", &["npz"])
                    .pick_file()
                {
                    self.load_mask_decoder(path);
                }
            }
        });
        if let Some(l) = &self.loading {
            let mut cancel = false;
            ui.horizontal(|ui| {
                let (fraction, text) = match &l.progress {
                    Some(p) if p.bytes_total > 0 => {
                        let f = p.bytes_done as f32 / p.bytes_total as f32;
                        (
                            f,
                            format!(
                                "loading {} · {:.0} % · {} / {} MiB · {}",
                                l.name,
                                100.0 * f,
                                p.bytes_done >> 20,
                                p.bytes_total >> 20,
                                p.tensor
                            ),
                        )
                    }
                    _ => (0.0, format!("loading {}…", l.name)),
                };
                ui.add(
                    egui::ProgressBar::new(fraction)
                        .text(text)
                        .desired_width(ui.available_width() - 80.0),
                );
                cancel = ui.button("Cancel").clicked();
            });
            if cancel {
                self.cancel_load();
            }
        }
    }

    fn error_bar(&mut self, ui: &mut egui::Ui) {
        if self.errors.is_empty() && self.notice.is_none() {
            return;
        }
        let mut dismiss = None;
        for (i, e) in self.errors.iter().enumerate() {
            ui.horizontal(|ui| {
                ui.colored_label(Color32::from_rgb(220, 50, 47), e.as_str());
                if ui.small_button("Dismiss").clicked() {
                    dismiss = Some(i);
                }
            });
        }
        if let Some(i) = dismiss {
            self.errors.remove(i);
        }
        if let Some(n) = &self.notice {
            let mut clear = false;
            ui.horizontal(|ui| {
                ui.label(RichText::new(n).italics());
                clear = ui.small_button("Dismiss").clicked();
            });
            if clear {
                self.notice = None;
            }
        }
    }

    fn controls(&mut self, ui: &mut egui::Ui) {
        ui.heading("Task");
        ui.horizontal_wrapped(|ui| {
            for kind in TaskKind::ALL {
                ui.selectable_value(&mut self.task.kind, kind, kind.label());
            }
        });
        ui.label(RichText::new(self.task.kind.help()).small());
        ui.add_space(4.0);
        let mut submit = false;
        let mut field = |ui: &mut egui::Ui, name: &str, text: &mut String, hint: &str| {
            let label = ui.label(name);
            let r = ui
                .add(
                    egui::TextEdit::singleline(text)
                        .hint_text(hint)
                        .desired_width(f32::INFINITY),
                )
                .labelled_by(label.id);
            if r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                submit = true;
            }
        };
        let task = &mut self.task;
        match task.kind {
            TaskKind::Caption => language_picker(ui, &mut task.language),
            TaskKind::Ask => {
                language_picker(ui, &mut task.language);
                field(ui, "Question", &mut task.question, "e.g. how many shapes?");
            }
            TaskKind::Detect => field(ui, "Objects", &mut task.objects, "e.g. circle ; square"),
            TaskKind::Segment => field(ui, "Object", &mut task.segment, "e.g. red circle"),
            TaskKind::Ocr => {}
            TaskKind::Free => field(ui, "Prompt", &mut task.free, "any prompt"),
        }
        ui.horizontal(|ui| {
            let label = ui.label("Max tokens");
            ui.add(egui::DragValue::new(&mut self.max_new_tokens).range(1..=1024))
                .labelled_by(label.id);
        });
        let prompt = self.task.prompt();
        ui.label(
            RichText::new(match &prompt {
                Ok(p) => format!("prompt: {p}"),
                Err(e) => e.clone(),
            })
            .monospace()
            .small(),
        );
        let ready = self.model.is_some() && self.picture.is_some() && prompt.is_ok();
        ui.horizontal(|ui| {
            if self.is_busy() {
                if ui.button("Stop").clicked() {
                    self.stop();
                }
                ui.spinner();
            } else if ui
                .add_enabled(
                    ready && self.loading.is_none(),
                    egui::Button::new(RichText::new("Run").strong()),
                )
                .clicked()
                || (submit && ready)
            {
                self.run();
            }
        });
        ui.separator();
        self.answer_view(ui);
        ui.separator();
        self.timings(ui);
    }

    fn answer_view(&mut self, ui: &mut egui::Ui) {
        ui.heading("Answer");
        let Some(a) = &self.answer else {
            ui.label(RichText::new("Run a task to see its answer here.").weak());
            return;
        };
        ui.label(RichText::new(&a.prompt).monospace().weak());
        let mut edited = None;
        let mut edit_done = false;
        egui::ScrollArea::vertical()
            .max_height(160.0)
            .id_salt("answer")
            .show(ui, |ui| {
                if self.show_raw {
                    // The raw answer is editable once generated: the boxes follow the edits
                    // and the masks are decoded again when the editor loses focus.
                    let mut raw = a.text.clone();
                    let r = ui.add_enabled(
                        !a.running,
                        egui::TextEdit::multiline(&mut raw)
                            .font(egui::TextStyle::Monospace)
                            .desired_width(f32::INFINITY)
                            .desired_rows(3),
                    );
                    if r.changed() {
                        edited = Some(raw);
                    }
                    edit_done = r.lost_focus();
                } else {
                    let shown = if a.objects.is_empty() {
                        a.text.clone()
                    } else {
                        a.objects
                            .iter()
                            .map(|o| {
                                if o.label.is_empty() {
                                    "(no label)"
                                } else {
                                    &o.label
                                }
                            })
                            .collect::<Vec<_>>()
                            .join(" ; ")
                    };
                    ui.add(egui::Label::new(RichText::new(shown).size(16.0)).wrap());
                }
            });
        if let Some(note) = &a.mask_note {
            ui.colored_label(Color32::from_rgb(181, 137, 0), note);
        }
        if let Some(g) = &a.generation {
            ui.label(
                RichText::new(format!(
                    "{} tokens · {}",
                    g.completion_tokens,
                    g.finish_reason.name()
                ))
                .small(),
            );
        }
        if !a.objects.is_empty() {
            for (i, o) in a.objects.iter().enumerate() {
                let [r, g, b] = object_color(i);
                let b_ = &o.bbox;
                let text = if o.valid {
                    format!(
                        "{}  x {:.0}–{:.0}  y {:.0}–{:.0}{}",
                        if o.label.is_empty() {
                            "(no label)"
                        } else {
                            &o.label
                        },
                        b_.x_min,
                        b_.x_max,
                        b_.y_min,
                        b_.y_max,
                        if a.masks.get(i).is_some_and(Option::is_some) {
                            "  mask"
                        } else {
                            ""
                        }
                    )
                } else {
                    format!("invalid: {}", o.reason.as_deref().unwrap_or("?"))
                };
                ui.colored_label(Color32::from_rgb(r, g, b), text);
            }
        }
        let mut save_png = false;
        let mut save_json = false;
        ui.horizontal_wrapped(|ui| {
            ui.checkbox(&mut self.show_raw, "Raw tokens");
            if ui
                .button("Copy")
                .on_hover_text("copy the raw answer")
                .clicked()
            {
                ui.ctx().copy_text(a.text.clone());
            }
            save_json = ui
                .add_enabled(!a.objects.is_empty(), egui::Button::new("Export JSON…"))
                .clicked();
            save_png = ui.button("Save PNG…").clicked();
        });
        if let (Some(text), Some(a), Some(p)) = (edited, &mut self.answer, &self.picture) {
            let (w, h) = p.image.dimensions();
            a.objects = parse_answer(&text, w, h);
            a.text = text;
            a.masks.clear();
            a.mask_textures.clear();
        }
        if edit_done {
            self.decode_answer_masks();
        }
        if save_json {
            if let Some(path) = rfd::FileDialog::new()
                .set_file_name("objects.json")
                .add_filter("JSON", &["json"])
                .save_file()
            {
                self.export_json(&path);
            }
        }
        if save_png {
            if let Some(path) = rfd::FileDialog::new()
                .set_file_name("annotated.png")
                .add_filter("PNG", &["png"])
                .save_file()
            {
                self.save_annotated(&path);
            }
        }
    }

    fn timings(&mut self, ui: &mut egui::Ui) {
        let response = ui.vertical(|ui| {
            ui.heading("Timings");
            // The adapter and model lines wrap, so a long name cannot widen the panel.
            ui.add(
                egui::Label::new(RichText::new(format!("adapter: {}", self.adapter)).small())
                    .wrap(),
            );
            if let Some(m) = &self.model {
                ui.add(
                    egui::Label::new(RichText::new(format!("model: {}", m.summary)).small()).wrap(),
                );
            }
            egui::Grid::new("timings").num_columns(2).show(ui, |ui| {
                if let Some(m) = &self.model {
                    ui.label("load");
                    ui.label(format!("{:.2} s ({})", m.load_s, m.format));
                    ui.end_row();
                }
                if let Some(l) = &self.loading {
                    ui.label("load");
                    ui.label(format!("{:.1} s…", l.started.elapsed().as_secs_f64()));
                    ui.end_row();
                }
                if let Some(a) = &self.answer {
                    ui.label("vision");
                    ui.label(match a.vision_s {
                        Some(Some(s)) => format!("{:.0} ms", 1e3 * s),
                        Some(None) => "reused".to_string(),
                        None => "…".to_string(),
                    });
                    ui.end_row();
                    if let Some(g) = &a.generation {
                        ui.label("prefill");
                        ui.label(format!("{:.0} ms", 1e3 * g.timings.prefill_s));
                        ui.end_row();
                        ui.label("decode");
                        ui.label(format!("{:.1} tokens/s", g.timings.decode_tok_s));
                        ui.end_row();
                    }
                }
            });
        });
        self.timings_rect = Some(response.response.rect);
    }

    fn picture_view(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        ui.horizontal(|ui| {
            if ui.button("Open image…").clicked() {
                if let Some(path) = rfd::FileDialog::new()
                    .add_filter(
                        "images",
                        &["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"],
                    )
                    .pick_file()
                {
                    self.open_image_path(&ctx, &path);
                }
            }
            if ui.button("Paste").on_hover_text("Ctrl+V").clicked() {
                self.paste_image(&ctx);
            }
            if let Some(p) = &self.picture {
                let (w, h) = p.image.dimensions();
                ui.label(format!("{} · {w}×{h}", p.name));
                if let Some(warning) = self.model.as_ref().and_then(|m| m.kind.image_warning(w, h))
                {
                    ui.colored_label(Color32::from_rgb(181, 137, 0), "squashed")
                        .on_hover_text(warning);
                }
            }
        });
        let avail = ui.available_rect_before_wrap();
        let (rect, _) = ui.allocate_exact_size(avail.size(), Sense::hover());
        let painter = ui.painter_at(rect);
        let hovering = ctx.input(|i| !i.raw.hovered_files.is_empty());
        let Some(p) = &self.picture else {
            painter.rect_stroke(
                rect.shrink(8.0),
                8.0,
                Stroke::new(1.5, ui.visuals().weak_text_color()),
                StrokeKind::Inside,
            );
            painter.text(
                rect.center(),
                egui::Align2::CENTER_CENTER,
                "Drop an image here, paste one (Ctrl+V) or open a file",
                FontId::proportional(18.0),
                ui.visuals().weak_text_color(),
            );
            return;
        };
        let (w, h) = p.image.dimensions();
        let scale = (rect.width() / w as f32).min(rect.height() / h as f32);
        let size = Vec2::new(w as f32, h as f32) * scale;
        let shown = Rect::from_center_size(rect.center(), size);
        let uv = Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0));
        painter.image(p.texture.id(), shown, uv, Color32::WHITE);
        if hovering {
            painter.rect_filled(shown, 0.0, Color32::from_black_alpha(80));
        }
        let Some(a) = &self.answer else { return };
        if a.image_id != p.id {
            return;
        }
        for t in a.mask_textures.iter().flatten() {
            painter.image(t.id(), shown, uv, Color32::WHITE);
        }
        let to_screen = |x: f32, y: f32| shown.min + Vec2::new(x, y) * scale;
        for (i, o) in a.objects.iter().enumerate().filter(|(_, o)| o.valid) {
            let [r, g, b] = object_color(i);
            let color = Color32::from_rgb(r, g, b);
            let b_ = &o.bbox;
            let boxed =
                Rect::from_min_max(to_screen(b_.x_min, b_.y_min), to_screen(b_.x_max, b_.y_max));
            painter.rect_stroke(boxed, 0.0, Stroke::new(2.5, color), StrokeKind::Outside);
            if !o.label.is_empty() {
                let galley = painter.layout_no_wrap(
                    o.label.clone(),
                    FontId::proportional(14.0),
                    Color32::WHITE,
                );
                let top = (boxed.min.y - galley.size().y - 2.0).max(shown.min.y);
                let bg = Rect::from_min_size(
                    Pos2::new(boxed.min.x - 2.5, top),
                    galley.size() + Vec2::new(6.0, 2.0),
                );
                painter.rect_filled(bg, 2.0, color);
                painter.galley(bg.min + Vec2::new(3.0, 1.0), galley, Color32::WHITE);
            }
        }
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        self.poll(&ctx);
        self.take_dropped_and_pasted(&ctx);
        self.automate(&ctx);
        if self.loading.is_some() {
            // The elapsed-time label moves even between progress reports.
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
        egui::Panel::top("top").show(ui, |ui| {
            ui.add_space(4.0);
            self.top_bar(ui);
            self.error_bar(ui);
            ui.add_space(2.0);
        });
        egui::Panel::left("controls")
            .resizable(true)
            .default_size(340.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.controls(ui));
            });
        egui::CentralPanel::default().show(ui, |ui| self.picture_view(ui));
    }
}

/// Route the shared device's uncaptured errors to the window instead of wgpu's default,
/// which panics. One is expected and harmless: the window's surface is reconfigured (on a
/// resize) by waiting for the queue to drain, and wgpu refuses if the engine's worker submits
/// meanwhile; egui-wgpu configures it again on a later frame, so that one is only logged.
fn watch_device_errors(device: &wgpu::Device, sink: Arc<Mutex<Vec<String>>>) {
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        let text = e.to_string();
        if text.contains("Surface::configure") {
            log::warn!("{text} (retried on a later frame)");
        } else {
            log::error!("{text}");
            sink.lock()
                .expect("not poisoned")
                .push(format!("GPU: {text}"));
        }
    }));
}

/// The last part of a path, for labels.
fn display_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn language_picker(ui: &mut egui::Ui, language: &mut String) {
    ui.horizontal(|ui| {
        let label = ui.label("Language");
        egui::ComboBox::from_id_salt("language")
            .selected_text(language.as_str())
            .width(60.0)
            .show_ui(ui, |ui| {
                for l in LANGUAGES {
                    ui.selectable_value(language, l.to_string(), l);
                }
            })
            .response
            .labelled_by(label.id);
    });
}

/// The texture of an image, downscaled to at most 4096 pixels a side (the largest texture
/// every wgpu device takes is 8192; the model gets the full image).
fn color_image(image: &DynamicImage) -> ColorImage {
    let (w, h) = image.dimensions();
    let rgba = if w.max(h) > 4096 {
        image
            .resize(4096, 4096, image::imageops::FilterType::Triangle)
            .to_rgba8()
    } else {
        image.to_rgba8()
    };
    let size = [rgba.width() as usize, rgba.height() as usize];
    ColorImage::from_rgba_unmultiplied(size, rgba.as_raw())
}

/// A full-image mask as a texture: the object's colour at 45 % opacity where the mask is
/// set, transparent elsewhere (the CLI's annotation draws the same).
fn mask_image(mask: &GrayImage, [r, g, b]: [u8; 3]) -> ColorImage {
    let size = [mask.width() as usize, mask.height() as usize];
    let pixels = mask
        .pixels()
        .map(|p| {
            let a = (f32::from(p.0[0]) / 255.0 * 0.45 * 255.0).round() as u8;
            Color32::from_rgba_unmultiplied(r, g, b, a)
        })
        .collect();
    ColorImage::new(size, pixels)
}

fn save_color_image(image: &ColorImage, path: &Path) -> image::ImageResult<()> {
    let [w, h] = image.size;
    let bytes: Vec<u8> = image
        .pixels
        .iter()
        .flat_map(|c| c.to_srgba_unmultiplied())
        .collect();
    let rgba = RgbaImage::from_raw(w as u32, h as u32, bytes).expect("size matches the pixels");
    rgba.save_with_format(path, image::ImageFormat::Png)
}
