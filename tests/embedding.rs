//! Embedding the engine in an application: a device the test creates with plain wgpu calls
//! (as an eframe/egui or bevy app does) handed to `Gpu::from_device`, loads on a worker
//! thread polled without blocking, progress reports and cancellation.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::shapes_model;
use paligemma::generate::GenerateOptions;
use paligemma::gpu::{Gpu, GpuOptions};
use paligemma::model::{CancelToken, LoadProgress, ModelBuilder};
use paligemma::Error;

const PROMPT: &str = "detect square";

fn scene() -> std::path::PathBuf {
    common::root().join("assets/scenes/scene_000.png")
}

/// An application's instance, adapter and device with the WebGPU default limits, and the
/// engine's [`Gpu`] on that device.
fn app_gpu() -> (wgpu::Instance, wgpu::Adapter, Arc<Gpu>) {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))
    .unwrap_or_else(|e| panic!("no adapter: {e}"));
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("app"),
        required_limits: wgpu::Limits::default(),
        ..Default::default()
    }))
    .unwrap();
    let gpu = Gpu::from_device(&adapter, device, queue, GpuOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    (instance, adapter, gpu)
}

/// Buffers the application's wgpu instance holds alive.
fn live_buffers(instance: &wgpu::Instance) -> usize {
    instance
        .generate_report()
        .expect("a native wgpu instance")
        .hub_report()
        .buffers
        .num_kept_from_user
}

/// Total bytes of the tensors in a single-file checkpoint (everything after the header).
fn checkpoint_tensor_bytes(dir: &std::path::Path) -> u64 {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes.len() as u64 - 8 - header
}

/// A load that records its progress reports.
fn recording(builder: ModelBuilder) -> (ModelBuilder, Arc<Mutex<Vec<LoadProgress>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let builder = builder.on_progress(move |p| sink.lock().unwrap().push(p.clone()));
    (builder, events)
}

/// Progress only grows, keeps one total and ends exactly at it; every report names a tensor.
fn assert_progress(events: &[LoadProgress], total: u64) -> BTreeSet<String> {
    assert!(!events.is_empty(), "no progress reported");
    for pair in events.windows(2) {
        assert!(
            pair[1].bytes_done > pair[0].bytes_done,
            "progress went from {pair:?}"
        );
    }
    assert!(events.iter().all(|p| p.bytes_total == total));
    assert_eq!(events.last().unwrap().bytes_done, total);
    assert!(events.iter().all(|p| !p.tensor.is_empty()));
    events.iter().map(|p| p.tensor.clone()).collect()
}

/// The greedy answer on the application's device (WebGPU default limits, weights loaded on a
/// worker thread polled without blocking) has the token ids of the CLI's answer.
#[test]
fn shared_device_answers_like_the_cli() {
    let (_instance, adapter, gpu) = app_gpu();
    let webgpu = wgpu::Limits::default();
    // The device's limits are in force, not the adapter's.
    assert_eq!(
        gpu.limits().max_storage_buffer_binding_size,
        webgpu.max_storage_buffer_binding_size
    );
    assert_eq!(
        gpu.weight_chunk_bytes(),
        webgpu
            .max_storage_buffer_binding_size
            .min(webgpu.max_buffer_size)
    );
    assert!(
        adapter.limits().max_storage_buffer_binding_size >= webgpu.max_storage_buffer_binding_size
    );
    // MAPPABLE_PRIMARY_BUFFERS was not enabled on the device, whatever the adapter offers.
    assert!(!gpu.unified_memory());

    let mut loading = ModelBuilder::new(shapes_model()).gpu(gpu.clone()).spawn();
    let start = Instant::now();
    let mut polls = 0;
    let model = loop {
        if let Some(result) = loading.try_take() {
            break result.unwrap_or_else(|e| panic!("{e}"));
        }
        polls += 1;
        assert!(start.elapsed() < Duration::from_secs(120), "load hangs");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(loading.try_take().is_none(), "the result is taken once");
    let done = loading.progress().expect("progress was reported");
    assert_eq!(done.bytes_done, done.bytes_total);
    eprintln!(
        "loaded in {:.2} s over {polls} polls",
        start.elapsed().as_secs_f64()
    );
    assert!(Arc::ptr_eq(model.gpu(), &gpu));

    let pixels = model.images.load(&scene()).unwrap();
    let mut streamed = String::new();
    let answer = model
        .generate(&pixels, PROMPT, &GenerateOptions::default(), &mut |piece| {
            streamed.push_str(piece);
            true
        })
        .unwrap();
    assert_eq!(streamed, answer.text);
    assert!(answer.text.contains("<loc"), "{}", answer.text);
    assert!(answer.text.contains("square"), "{}", answer.text);

    let o = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args(["generate", "--model"])
        .arg(shapes_model())
        .arg("--image")
        .arg(scene())
        .args(["--prompt", PROMPT, "--json"])
        .output()
        .expect("the binary runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let cli_ids: Vec<u32> = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(answer.token_ids, cli_ids);
    assert_eq!(v["text"], answer.text.as_str());
    eprintln!("answer: {} {:?}", answer.text, answer.token_ids);
}

/// Progress covers every tensor of the checkpoint, monotonically, up to the file's tensor
/// bytes; the image encoder's covers the vision tower and projector only.
#[test]
fn progress_is_monotonic_and_ends_at_the_total() {
    let (_instance, _adapter, gpu) = app_gpu();
    let dir = shapes_model();
    let (builder, events) = recording(ModelBuilder::new(&dir).gpu(gpu.clone()));
    builder.build().unwrap();
    let events = events.lock().unwrap().clone();
    let total = checkpoint_tensor_bytes(&dir);
    assert_eq!(total, 2_590_272);
    let names = assert_progress(&events, total);
    assert_eq!(names.len(), 100, "every tensor of the checkpoint reports");
    for name in [
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "multi_modal_projector.linear.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
    ] {
        assert!(names.contains(name), "no report for {name}");
    }

    let (builder, events) = recording(ModelBuilder::new(&dir).gpu(gpu));
    builder.build_encoder().unwrap();
    let events = events.lock().unwrap().clone();
    let vision_total = events[0].bytes_total;
    assert!(vision_total > 0 && vision_total < total);
    let names = assert_progress(&events, vision_total);
    assert!(names
        .iter()
        .all(|n| n.starts_with("vision_tower.") || n.starts_with("multi_modal_projector.")));
}

/// A load cancelled after ten tensors returns `Error::Cancelled`, reports nothing more,
/// leaves no buffer alive, and the same GPU loads the model right after.
#[test]
fn cancelled_load_frees_its_buffers_and_the_gpu_loads_again() {
    let (instance, _adapter, gpu) = app_gpu();
    let before = live_buffers(&instance);
    let created = gpu.bytes_created();
    let token = CancelToken::new();
    let cancel = token.clone();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let during = Arc::new(Mutex::new(0));
    let (count, app) = (Arc::clone(&during), instance.clone());
    let result = ModelBuilder::new(shapes_model())
        .gpu(gpu.clone())
        .cancel_token(token)
        .on_progress(move |p| {
            let mut events = sink.lock().unwrap();
            events.push(p.clone());
            if events.len() == 10 {
                *count.lock().unwrap() = live_buffers(&app);
                cancel.cancel();
            }
        })
        .build();
    assert!(
        matches!(result, Err(Error::Cancelled)),
        "{:?}",
        result.err()
    );
    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), 10, "progress continued after the cancel");
    assert!(events[9].bytes_done < events[9].bytes_total);
    assert!(
        gpu.bytes_created() > created,
        "the load had allocated weights"
    );
    let during = *during.lock().unwrap();
    assert!(
        during >= before + 10,
        "{during} buffers during the load, {before} before"
    );
    gpu.wait().unwrap();
    assert_eq!(live_buffers(&instance), before, "buffers left alive");
    eprintln!("live buffers: {before} before, {during} at the cancel, {before} after");

    // Cancelling a spawned load through its handle.
    let handle = ModelBuilder::new(shapes_model()).gpu(gpu.clone()).spawn();
    handle.cancel();
    assert!(matches!(handle.join(), Err(Error::Cancelled)));

    let (builder, events) = recording(ModelBuilder::new(shapes_model()).gpu(gpu));
    let model = builder.build().unwrap();
    let events = events.lock().unwrap();
    assert_eq!(events.last().unwrap().bytes_done, 2_590_272);
    assert_eq!(model.config.num_image_tokens(), (224 / 14) * (224 / 14));
}

/// `max_binding` configures a GPU the builder opens; with the application's GPU it is refused
/// rather than ignored, and a LoRA adapter needs a checkpoint.
#[test]
fn conflicting_builder_options_are_refused() {
    let (_instance, _adapter, gpu) = app_gpu();
    let err = ModelBuilder::new(shapes_model())
        .gpu(gpu)
        .max_binding(64 * 1024)
        .build()
        .err()
        .unwrap();
    assert!(matches!(err, Error::Gpu(_)), "{err}");
    assert!(err.to_string().contains("weight_binding_limit"), "{err}");
    let config =
        paligemma::model::PaliGemmaConfig::from_file(&shapes_model().join("config.json")).unwrap();
    let err = ModelBuilder::synthetic(config, 1)
        .adapter("lora")
        .build()
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("needs a checkpoint directory"),
        "{err}"
    );
}
