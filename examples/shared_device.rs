//! Embed the engine in an application that owns its wgpu device (an eframe/egui or bevy app):
//! hand the device to `Gpu::from_device`, load the model on a worker thread while the main
//! thread keeps drawing frames, then answer a prompt.
//!
//! ```sh
//! cargo run --release --example shared_device
//! cargo run --release --example shared_device -- --model DIR --image photo.jpg --prompt "caption en"
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use paligemma::generate::GenerateOptions;
use paligemma::gpu::{Gpu, GpuOptions};
use paligemma::model::{resolve_model_dir, ModelBuilder};

#[derive(Parser)]
struct Args {
    /// Checkpoint directory, or org/name in the local Hugging Face cache.
    #[arg(long, default_value = "assets/tiny-shapes")]
    model: String,
    /// Input image.
    #[arg(long, default_value = "assets/scenes/scene_000.png")]
    image: PathBuf,
    /// The prompt.
    #[arg(long, default_value = "detect square")]
    prompt: String,
}

fn main() -> Result<()> {
    let args = Args::parse();

    // What the application did at start-up (eframe's `RenderState` and bevy's `RenderDevice`
    // hold the result): an adapter and a device with the WebGPU default limits.
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))?;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("app"),
        required_limits: wgpu::Limits::default(),
        ..Default::default()
    }))?;

    // The engine shares that device (wgpu devices and queues are cheap handles).
    let gpu = Gpu::from_device(
        &adapter,
        device.clone(),
        queue.clone(),
        GpuOptions::default(),
    )?;
    eprintln!("adapter: {}", gpu.describe());
    let mut loading = ModelBuilder::new(resolve_model_dir(&args.model)?)
        .gpu(gpu)
        .spawn();

    // The render loop never waits for the load: each frame polls it.
    let start = Instant::now();
    let mut frames = 0u64;
    let model = loop {
        if let Some(result) = loading.try_take() {
            break result?;
        }
        frames += 1;
        if let Some(p) = loading.progress() {
            eprint!(
                "\rframe {frames}: loading {:3}% {:<64}",
                100 * p.bytes_done / p.bytes_total.max(1),
                p.tensor
            );
        }
        std::thread::sleep(Duration::from_millis(16));
    };
    eprintln!(
        "\nloaded in {:.2} s while drawing {frames} frames",
        start.elapsed().as_secs_f64()
    );

    let pixels = model.images.load(&args.image)?;
    let mut stdout = std::io::stdout();
    let answer = model.generate(
        &pixels,
        &args.prompt,
        &GenerateOptions::default(),
        &mut |piece| {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
            true
        },
    )?;
    println!();
    eprintln!(
        "{} tokens, {:.1} tokens/s",
        answer.token_ids.len(),
        answer.timings.decode_tok_s
    );
    Ok(())
}
