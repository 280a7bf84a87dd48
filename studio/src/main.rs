//! `studio`: the PaliGemma Studio window.
//!
//! ```sh
//! cargo run --release -p studio                       # the shipped tiny-shapes model and a scene
//! cargo run --release -p studio -- --model google/paligemma-3b-mix-224 --image photo.jpg
//! cargo run --release -p studio -- --prompt "detect square" --screenshot shot.png
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use eframe::egui;
use paligemma::model::WeightFormat;
use studio::{default_image, default_model, Outcome, StartOptions, StudioApp};

#[derive(Parser)]
#[command(
    name = "studio",
    version,
    about = "PaliGemma Studio: try PaliGemma on your images and your GPU"
)]
struct Args {
    /// Checkpoint directory, or org/name in the local Hugging Face cache (default: the
    /// repository's assets/tiny-shapes).
    #[arg(long)]
    model: Option<String>,
    /// Image to open (default: assets/scenes/scene_000.png).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Prompt to run as soon as the model and image are ready ("detect square",
    /// "caption en", "answer en how many shapes?", ...).
    #[arg(long)]
    prompt: Option<String>,
    /// How the weights are stored on the GPU: f16, int8 or int4 (default: as the checkpoint
    /// stores them).
    #[arg(long)]
    weights: Option<WeightFormat>,
    /// PEFT LoRA adapter directory merged into the weights at load.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// big_vision's VQ-VAE mask decoder (vae-oid.npz), to draw segment masks.
    #[arg(long, value_name = "NPZ")]
    vae: Option<PathBuf>,
    /// Most tokens an answer may have.
    #[arg(short = 'n', long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Save a screenshot of the window as PNG and exit: after the answer to --prompt when
    /// one is given, else once the model and image are shown. Exit code 1 if anything fails.
    #[arg(long, value_name = "PNG")]
    screenshot: Option<PathBuf>,
    /// Start without the demo model and image.
    #[arg(long, conflicts_with_all = ["model", "image"])]
    empty: bool,
    /// Window size in points, WIDTHxHEIGHT.
    #[arg(long, default_value = "1100x720", value_parser = parse_size)]
    size: egui::Vec2,
}

fn parse_size(s: &str) -> Result<egui::Vec2, String> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| format!("{s:?} is not WIDTHxHEIGHT"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<f32>()
            .ok()
            .filter(|v| *v >= 200.0 && *v <= 10_000.0)
            .ok_or_else(|| format!("{v:?} is not a size between 200 and 10000"))
    };
    Ok(egui::vec2(n(w)?, n(h)?))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let demo = !args.empty && args.model.is_none() && args.image.is_none();
    let (model, image) = if args.empty {
        (None, None)
    } else {
        (
            args.model
                .or_else(|| default_model().map(|p| p.display().to_string())),
            args.image.or_else(default_image),
        )
    };
    // The first launch on the demo model suggests a prompt that works on its scene.
    let run = args.prompt.is_some();
    let prompt = args
        .prompt
        .or_else(|| demo.then(|| "detect circle".to_string()));
    if args.screenshot.is_some() && (model.is_none() || image.is_none()) {
        eprintln!("studio: --screenshot needs a model and an image (--model, --image)");
        return ExitCode::from(2);
    }
    let start = StartOptions {
        model,
        image,
        prompt,
        run,
        weights: args.weights,
        adapter: args.adapter,
        vae: args.vae,
        max_new_tokens: args.max_new_tokens,
        screenshot: args.screenshot.clone(),
    };
    let outcome: Outcome = Arc::new(Mutex::new(None));
    let app_outcome = Arc::clone(&outcome);
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("PaliGemma Studio")
            .with_inner_size(args.size)
            .with_drag_and_drop(true),
        renderer: eframe::Renderer::Wgpu,
        wgpu_options: studio::wgpu_configuration(),
        ..Default::default()
    };
    let run = eframe::run_native(
        "PaliGemma Studio",
        options,
        Box::new(move |cc| Ok(Box::new(StudioApp::new(cc, start, app_outcome)))),
    );
    if let Err(e) = run {
        eprintln!("studio: cannot open the window: {e}");
        return ExitCode::FAILURE;
    }
    if args.screenshot.is_none() {
        return ExitCode::SUCCESS;
    }
    let outcome = outcome.lock().expect("not poisoned").take();
    match outcome {
        Some(Ok(path)) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Some(Err(e)) => {
            eprintln!("studio: {e}");
            ExitCode::FAILURE
        }
        None => {
            eprintln!("studio: the window closed before the screenshot was taken");
            ExitCode::FAILURE
        }
    }
}
