//! `paligemma bench`: end-to-end timings of one request (cold start, time to first token,
//! vision encoder, prefill and decode throughput) on a checkpoint or on a synthetic model of
//! PaliGemma-3B-224 shapes, with achieved FLOP/s and bytes/s counted analytically from the
//! shapes, and two device probes (`shaders/probe.wgsl`: FMA throughput and storage-buffer
//! read bandwidth) that every figure is compared against. Several weight formats and batch
//! sizes can be measured in one run ([`BenchOptions::formats`], [`BenchOptions::batch_sizes`]).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use paligemma::generate::{
    GenerateOptions, Generation, ImageInput, Prompt, Request, SchedulerOptions, Timings,
};
use paligemma::gpu::{Gpu, KernelKey, KernelTime, Recorder, SubmissionStats, Tensor};
use paligemma::model::{ModelBuilder, PaliGemma, PaliGemmaConfig, TextConfig, WeightFormat};
use paligemma::processor::image::PixelValues;
use paligemma::{Error, Result};

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A checkpoint directory; `None` builds a synthetic model (see [`synthetic_config`]).
    pub model: Option<PathBuf>,
    /// Layers of the synthetic model's vision tower, and of its decoder unless `text_layers`.
    pub layers: usize,
    /// Layers of the synthetic model's decoder (`None`: `layers`; PaliGemma-3B has 27 vision
    /// and 18 text layers).
    pub text_layers: Option<usize>,
    /// Text tokens after the image tokens and `<bos>` (9 gives 266 prompt tokens at 224 px).
    pub text_tokens: usize,
    /// Decode steps timed after the first token.
    pub decode_steps: usize,
    /// Warm requests to run; each figure is the best of them.
    pub runs: usize,
    /// Seed of the synthetic weights and pixels.
    pub seed: u64,
    /// Run the model (false: probes only).
    pub run_model: bool,
    /// Run the device probes.
    pub probes: bool,
    /// How the weight matrices are stored: one model report per format, in this order.
    pub formats: Vec<WeightFormat>,
    /// Requests decoded together for the batch figures ([`ModelReport::batches`]); 1 is the
    /// single-request run every report has.
    pub batch_sizes: Vec<usize>,
    /// Image size of the synthetic model (224, 448 or 896).
    pub image_size: usize,
    /// Time every kernel dispatch of one more request ([`ModelReport::profile`]).
    pub profile: bool,
    /// Bytes the read probe streams, over as many storage bindings as the device needs (a
    /// real GPU's figure needs more than its L2 cache: 1 GiB and up).
    pub read_bytes: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            model: None,
            layers: 2,
            text_layers: None,
            text_tokens: 9,
            decode_steps: 16,
            runs: 1,
            seed: 0,
            run_model: true,
            probes: true,
            formats: vec![WeightFormat::F16],
            batch_sizes: vec![1],
            image_size: 224,
            profile: false,
            read_bytes: READ_DEFAULT_BYTES,
        }
    }
}

/// Arithmetic and memory traffic of a piece of work, counted from the shapes: a multiply-add
/// is 2 FLOP; bytes are the weight matrices read once (at `bytes_per_weight` each: 2 for f16,
/// see [`WeightFormat::bytes_per_weight`]), plus the KV cache for decode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Work {
    /// Floating-point operations.
    pub flop: f64,
    /// Bytes read from weights (and KV cache).
    pub bytes: f64,
}

impl std::ops::Add for Work {
    type Output = Work;
    fn add(self, o: Work) -> Work {
        Work {
            flop: self.flop + o.flop,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// Parameters of one decoder layer's matrices.
fn decoder_layer_params(c: &TextConfig) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let qd = (c.num_attention_heads * c.head_dim) as f64;
    let kvd = (c.num_key_value_heads * c.head_dim) as f64;
    2.0 * h * qd + 2.0 * h * kvd + 3.0 * h * i
}

/// Work of the vision tower and projector for one image.
pub fn vision_work(c: &PaliGemmaConfig, bytes_per_weight: f64) -> Work {
    let v = &c.vision;
    let n = c.num_image_tokens() as f64;
    let (d, i) = (v.hidden_size as f64, v.intermediate_size as f64);
    let patch = (v.num_channels * v.patch_size * v.patch_size) as f64 * d;
    let layer = 4.0 * d * d + 2.0 * d * i;
    let proj = d * c.projection_dim as f64;
    let layers = v.num_hidden_layers as f64;
    let params = patch + layers * layer + proj;
    Work {
        flop: 2.0 * n * params + layers * 4.0 * n * n * d,
        bytes: bytes_per_weight * params + 2.0 * n * d,
    }
}

/// Work of the prefill of `tokens` prompt positions (all in the bidirectional prefix), with
/// the LM head for the last position. The last layer computes keys and values for every
/// position but queries, attention, output projection and MLP for the last one only.
pub fn prefill_work(c: &TextConfig, tokens: usize, bytes_per_weight: f64) -> Work {
    let t = tokens as f64;
    let layers = c.num_hidden_layers as f64;
    let layer = decoder_layer_params(c);
    let h = c.hidden_size as f64;
    let kv = 2.0 * h * (c.num_key_value_heads * c.head_dim) as f64;
    let qd = (c.num_attention_heads * c.head_dim) as f64;
    let attn = 4.0 * t * t * qd;
    let last = 2.0 * t * kv + 2.0 * (layer - kv) + 4.0 * t * qd;
    let head = (c.vocab_size * c.hidden_size) as f64;
    Work {
        flop: (layers - 1.0) * (2.0 * t * layer + attn) + last + 2.0 * head,
        bytes: bytes_per_weight * (layers * layer + head) + 2.0 * t * h,
    }
}

/// Work of one decode step whose query sees `kv_len` keys (itself included).
pub fn decode_work(c: &TextConfig, kv_len: usize, bytes_per_weight: f64) -> Work {
    let l = kv_len as f64;
    let layers = c.num_hidden_layers as f64;
    let layer = decoder_layer_params(c);
    let head = (c.vocab_size * c.hidden_size) as f64;
    let kvd = (c.num_key_value_heads * c.head_dim) as f64;
    Work {
        flop: layers * (2.0 * layer + 4.0 * l * (c.num_attention_heads * c.head_dim) as f64)
            + 2.0 * head,
        bytes: bytes_per_weight * (layers * layer + head)
            + 2.0 * c.hidden_size as f64
            + layers * 2.0 * l * kvd * 4.0,
    }
}

/// PaliGemma-3B-224 shapes (SigLIP So400m: 1152 wide, MLP 4304, 16 heads, 14 px patches at
/// 224 px; Gemma 2B: 2048 wide, MLP 16384, 8 query heads, 1 KV head of 256, vocabulary
/// 257216) with `vision_layers` and `text_layers` layers.
pub fn synthetic_config(
    vision_layers: usize,
    text_layers: usize,
    image_size: usize,
) -> Result<PaliGemmaConfig> {
    PaliGemmaConfig::from_json(&format!(
        r#"{{"model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2048,
            "text_config": {{"model_type": "gemma", "hidden_size": 2048,
                "intermediate_size": 16384, "num_attention_heads": 8, "num_key_value_heads": 1,
                "num_hidden_layers": {text_layers}, "vocab_size": 257216}},
            "vision_config": {{"hidden_size": 1152, "intermediate_size": 4304,
                "num_attention_heads": 16, "num_hidden_layers": {vision_layers}, "patch_size": 14,
                "image_size": {image_size}}}}}"#
    ))
}

/// Results of the device probes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Probes {
    /// f32 FMA throughput, GFLOP/s (an FMA is 2 FLOP).
    pub fma_gflops: f64,
    /// Storage-buffer read bandwidth with vec4 loads, GB/s (10⁹ bytes): the better of the
    /// two access patterns below.
    pub read_gbs: f64,
    /// Neighbouring threads read neighbouring vec4s (`read_probe`), GB/s.
    pub read_interleaved_gbs: f64,
    /// Each thread streams its own contiguous run (`read_rows_probe`), GB/s.
    pub read_rows_gbs: f64,
    /// Bytes the read probe streams a pass (all its buffers).
    pub read_buffer_bytes: u64,
    /// Storage buffers those bytes are split over (each within the device's binding limit).
    pub read_buffers: usize,
}

/// End-to-end figures of one benchmark run. Times are seconds, rates per second, sizes bytes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelReport {
    /// What ran: the checkpoint directory or the synthetic shapes.
    pub model: String,
    /// How the weight matrices were stored.
    pub weights: WeightFormat,
    /// Vision encoder layers.
    pub vision_layers: usize,
    /// Decoder layers.
    pub text_layers: usize,
    /// Vocabulary (rows of the LM head).
    pub vocab: usize,
    /// Building or loading the weights.
    pub load_s: f64,
    /// Compute pipelines created during the first request.
    pub pipelines: usize,
    /// Wall time spent creating them (shader modules included).
    pub pipeline_create_s: f64,
    /// Time to first token of the first request (every kernel's first run, so driver shader
    /// compilation included): vision + prefill.
    pub cold_ttft_s: f64,
    /// Cold start: first request's time to first token minus the warm one's.
    pub cold_start_s: f64,
    /// Time to first token of a warm request: vision + prefill.
    pub ttft_s: f64,
    /// Vision tower and projector (warm).
    pub vision_s: f64,
    /// Prompt length, image tokens included.
    pub prefill_tokens: usize,
    /// Prefill up to the first token's logits (warm).
    pub prefill_s: f64,
    /// Prefill throughput.
    pub prefill_tok_s: f64,
    /// Decode steps timed.
    pub decode_steps: usize,
    /// Decode throughput (host sampling and logits readback included).
    pub decode_tok_s: f64,
    /// Warm requests run; the figures above are the best of them.
    pub runs: usize,
    /// Analytic work of the vision tower.
    pub vision_work: Work,
    /// Analytic work of the prefill.
    pub prefill_work: Work,
    /// Analytic work of an average decode step.
    pub decode_work: Work,
    /// Achieved vision GFLOP/s.
    pub vision_gflops: f64,
    /// Achieved prefill GFLOP/s.
    pub prefill_gflops: f64,
    /// Achieved prefill GB/s (weights read once).
    pub prefill_gbs: f64,
    /// Achieved decode GFLOP/s.
    pub decode_gflops: f64,
    /// Achieved decode GB/s (weights and KV cache read once per step).
    pub decode_gbs: f64,
    /// Peak resident host memory (`VmHWM`), when the OS reports it. On CPU adapters such as
    /// lavapipe the GPU buffers live in host memory and are included.
    pub peak_rss_bytes: Option<u64>,
    /// GPU buffers created for the weights.
    pub gpu_weight_bytes: u64,
    /// GPU buffers created by the first request (activations, KV cache, parameters,
    /// readback); freed after it.
    pub gpu_request_bytes: u64,
    /// Throughput with several requests at once, one entry per batch size (batch 1 repeats
    /// the figures above).
    pub batches: Vec<BatchFigures>,
    /// Queue submissions, dispatches and blocking waits of one decode step (counted, not
    /// timed), and the longest any submission of a warm request took from submission to
    /// completion (one encoder or decoder layer of the vision tower or prefill, or one decode
    /// step).
    pub submissions: StepCounts,
    /// With [`BenchOptions::profile`]: the dispatches of one batch of the largest batch size
    /// timed one by one, summed by kernel and grid, longest total first.
    pub profile: Vec<KernelRow>,
    /// Requests in the profiled batch.
    pub profile_batch: usize,
}

/// The dispatches of one kernel with one grid in a profiled request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelRow {
    /// `shader::entry`.
    pub kernel: String,
    /// Workgroup counts.
    pub workgroups: [u32; 3],
    /// Dispatches.
    pub calls: usize,
    /// Seconds in all: between GPU timestamps where the device has them (`device_timed`),
    /// else each from submission to idle on the host (one submission's overhead included).
    pub seconds: f64,
    /// Whether the times come from GPU timestamps.
    pub device_timed: bool,
}

/// Sum timed dispatches by kernel and grid, longest total first.
fn kernel_rows(times: &[KernelTime]) -> Vec<KernelRow> {
    let mut rows: Vec<KernelRow> = Vec::new();
    for t in times {
        let kernel = format!("{}::{}", t.shader, t.entry);
        match rows
            .iter_mut()
            .find(|r| r.kernel == kernel && r.workgroups == t.workgroups)
        {
            Some(r) => {
                r.calls += 1;
                r.seconds += t.seconds;
            }
            None => rows.push(KernelRow {
                kernel,
                workgroups: t.workgroups,
                calls: 1,
                seconds: t.seconds,
                device_timed: t.device_timed,
            }),
        }
    }
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    rows
}

/// What one decode step sends to the GPU, and the longest single submission of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StepCounts {
    /// Kernel dispatches per decode step.
    pub dispatches_per_step: f64,
    /// Queue submissions per decode step.
    pub submissions_per_step: f64,
    /// Blocking waits per decode step that left the device with nothing queued.
    pub waits_per_step: f64,
    /// Blocking waits per decode step for the previous step's picks while this step was
    /// already queued (pipelined greedy decoding: the device keeps working).
    pub overlapped_waits_per_step: f64,
    /// Host time per decode step outside those waits (recording, encoding, submitting,
    /// reading the picks, the scheduler's own work), milliseconds.
    pub host_ms_per_step: f64,
    /// Host time per decode step blocked waiting for the device, milliseconds.
    pub wait_ms_per_step: f64,
    /// The longest submission of the request, seconds.
    pub longest_submission_s: f64,
}

/// Throughput of `batch` identical requests decoded together (one scheduler of `batch` slots).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct BatchFigures {
    /// Requests in the batch.
    pub batch: usize,
    /// Prompt tokens of all requests per second of the batched prefill (vision excluded).
    pub prefill_tok_s: f64,
    /// Tokens generated per second, all requests together.
    pub decode_tok_s: f64,
    /// Tokens per second each request sees.
    pub decode_tok_s_per_request: f64,
}

/// A whole benchmark: adapter, model figures and probes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    /// The adapter, as [`Gpu::describe`] says.
    pub adapter: String,
    /// The adapter's type as wgpu reports it (`DiscreteGpu`, `IntegratedGpu`, `Cpu`, ...).
    pub device_type: String,
    /// One report per weight format (none with probes only).
    pub models: Vec<ModelReport>,
    /// The device probes, unless skipped.
    pub probes: Option<Probes>,
}

/// Run the benchmark described by `opts` on `gpu`.
pub fn run(gpu: &Arc<Gpu>, opts: &BenchOptions) -> Result<BenchReport> {
    let mut models = Vec::new();
    if opts.run_model {
        if opts.decode_steps == 0 || opts.text_tokens == 0 || opts.runs == 0 {
            return Err(Error::Request(
                "bench needs at least one text token, one decode step and one run".into(),
            ));
        }
        if ![224, 448, 896].contains(&opts.image_size) {
            return Err(Error::Request(format!(
                "image size {} is not one of PaliGemma's 224, 448 and 896",
                opts.image_size
            )));
        }
        if opts.batch_sizes.contains(&0) {
            return Err(Error::Request("batch sizes must be at least 1".into()));
        }
        if opts.formats.is_empty() {
            return Err(Error::Request(
                "bench needs at least one weight format".into(),
            ));
        }
        for &format in &opts.formats {
            models.push(run_model(gpu, opts, format)?);
        }
    }
    let probes = if opts.probes {
        Some(run_probes(gpu, opts.read_bytes)?)
    } else {
        None
    };
    Ok(BenchReport {
        adapter: gpu.describe(),
        device_type: format!("{:?}", gpu.info.device_type),
        models,
        probes,
    })
}

/// Seeded pixel values in [-1, 1] for a `size`×`size` image.
fn random_pixels(size: usize, seed: u64) -> PixelValues {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data = (0..3 * size * size)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    PixelValues {
        height: size,
        width: size,
        data,
    }
}

/// `batch` copies of one greedy request run together, `new` tokens each.
fn generate(
    model: &PaliGemma,
    pixels: &PixelValues,
    ids: &[u32],
    new: usize,
    batch: usize,
) -> Result<Generation> {
    let options = GenerateOptions {
        max_new_tokens: new,
        stop_at_eos: false,
        ..Default::default()
    };
    let request = Request {
        image: ImageInput::Pixels(pixels.clone()),
        prompt: Prompt::Ids(ids.to_vec()),
        options,
    };
    let opts = SchedulerOptions {
        max_sequences: batch,
        ..Default::default()
    };
    let mut out = model.run_all(opts, vec![request; batch], &mut |_, _| true)?;
    out.swap_remove(0)
}

/// Best timings of `runs` warm runs of `batch` requests (after one untimed run when `warm_up`:
/// the batched kernels' first run compiles them).
fn best_timings(
    model: &PaliGemma,
    pixels: &PixelValues,
    ids: &[u32],
    opts: &BenchOptions,
    batch: usize,
    warm_up: bool,
) -> Result<Timings> {
    if warm_up {
        generate(model, pixels, ids, 2, batch)?;
    }
    let mut t = generate(model, pixels, ids, opts.decode_steps + 1, batch)?.timings;
    for _ in 1..opts.runs {
        let next = generate(model, pixels, ids, opts.decode_steps + 1, batch)?.timings;
        t.vision_s = t.vision_s.min(next.vision_s);
        t.prefill_s = t.prefill_s.min(next.prefill_s);
        t.decode_tok_s = t.decode_tok_s.max(next.decode_tok_s);
    }
    Ok(t)
}

/// Start measuring [`peak_rss_bytes`] afresh (Linux: writing 5 to `/proc/self/clear_refs`
/// resets `VmHWM`); elsewhere nothing happens.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size of this process (`VmHWM` in `/proc/self/status`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn run_model(gpu: &Arc<Gpu>, opts: &BenchOptions, format: WeightFormat) -> Result<ModelReport> {
    reset_peak_rss();
    let created = gpu.bytes_created();
    let start = Instant::now();
    let (model, label) = match &opts.model {
        Some(dir) => (
            ModelBuilder::new(dir)
                .gpu(gpu.clone())
                .weights(format)
                .build()?,
            dir.display().to_string(),
        ),
        None => {
            let text_layers = opts.text_layers.unwrap_or(opts.layers);
            let config = synthetic_config(opts.layers, text_layers, opts.image_size)?;
            let label = format!(
                "synthetic PaliGemma-3B-{} shapes, random weights",
                opts.image_size
            );
            let model = ModelBuilder::synthetic(config, opts.seed)
                .gpu(gpu.clone())
                .weights(format)
                .build()?;
            (model, label)
        }
    };
    let load_s = start.elapsed().as_secs_f64();
    let gpu_weight_bytes = gpu.bytes_created() - created;
    let config = model.config.clone();
    let pixels = random_pixels(config.vision.image_size, opts.seed);
    // Ordinary word-piece ids, well inside every PaliGemma vocabulary.
    let text: Vec<u32> = (0..opts.text_tokens as u32)
        .map(|i| 1000 + 37 * i)
        .collect();
    let ids = model.placeholder_prompt(&text);

    // First request: every kernel runs for the first time. Two tokens, so the decode kernels
    // are compiled too and the timed decode below is warm.
    let (pipelines0, create0) = gpu.pipeline_stats();
    let created = gpu.bytes_created();
    let cold = generate(&model, &pixels, &ids, 2, 1)?;
    let gpu_request_bytes = gpu.bytes_created() - created;
    let (pipelines1, create1) = gpu.pipeline_stats();
    let cold_ttft_s = cold.timings.vision_s + cold.timings.prefill_s;

    // Warm requests: the best of `runs` for each figure (other work on the machine only ever
    // slows a run down).
    let t = best_timings(&model, &pixels, &ids, opts, 1, false)?;
    let ttft_s = t.vision_s + t.prefill_s;
    let peak_rss = peak_rss_bytes();
    let mut batches = Vec::new();
    for &b in &opts.batch_sizes {
        let bt = if b == 1 {
            t.clone()
        } else {
            best_timings(&model, &pixels, &ids, opts, b, true)?
        };
        batches.push(BatchFigures {
            batch: b,
            prefill_tok_s: (b * ids.len()) as f64 / bt.prefill_s,
            decode_tok_s: b as f64 * bt.decode_tok_s,
            decode_tok_s_per_request: bt.decode_tok_s,
        });
    }

    let submissions = step_counts(gpu, &model, &pixels, &ids, opts.decode_steps)?;
    let profile_batch = opts.batch_sizes.iter().copied().max().unwrap_or(1);
    let profile = if opts.profile {
        gpu.start_profile();
        let run = generate(&model, &pixels, &ids, opts.decode_steps + 1, profile_batch);
        let times = gpu.take_profile();
        run?;
        kernel_rows(&times)
    } else {
        Vec::new()
    };
    let bpw = format.bytes_per_weight();
    let vision = vision_work(&config, bpw);
    let prefill = prefill_work(&config.text, ids.len(), bpw);
    let steps = opts.decode_steps;
    let decode_total = (1..=steps).fold(Work::default(), |acc, j| {
        acc + decode_work(&config.text, ids.len() + j, bpw)
    });
    let decode = Work {
        flop: decode_total.flop / steps as f64,
        bytes: decode_total.bytes / steps as f64,
    };
    Ok(ModelReport {
        model: label,
        weights: format,
        vision_layers: config.vision.num_hidden_layers,
        text_layers: config.text.num_hidden_layers,
        vocab: config.text.vocab_size,
        load_s,
        pipelines: pipelines1 - pipelines0,
        pipeline_create_s: (create1 - create0).as_secs_f64(),
        cold_ttft_s,
        cold_start_s: (cold_ttft_s - ttft_s).max(0.0),
        ttft_s,
        vision_s: t.vision_s,
        prefill_tokens: ids.len(),
        prefill_s: t.prefill_s,
        prefill_tok_s: ids.len() as f64 / t.prefill_s,
        decode_steps: steps,
        decode_tok_s: t.decode_tok_s,
        runs: opts.runs,
        vision_work: vision,
        prefill_work: prefill,
        decode_work: decode,
        vision_gflops: vision.flop / t.vision_s / 1e9,
        prefill_gflops: prefill.flop / t.prefill_s / 1e9,
        prefill_gbs: prefill.bytes / t.prefill_s / 1e9,
        decode_gflops: decode.flop * t.decode_tok_s / 1e9,
        decode_gbs: decode.bytes * t.decode_tok_s / 1e9,
        peak_rss_bytes: peak_rss,
        gpu_weight_bytes,
        gpu_request_bytes,
        batches,
        submissions,
        profile,
        profile_batch,
    })
}

/// Count what a decode step submits: a request of one token and one of `steps + 1` tokens,
/// the difference per step; and the longest submission of the longer one.
fn step_counts(
    gpu: &Gpu,
    model: &PaliGemma,
    pixels: &PixelValues,
    ids: &[u32],
    steps: usize,
) -> Result<StepCounts> {
    let timed = |new_tokens| -> Result<(SubmissionStats, f64)> {
        gpu.reset_submission_stats();
        let start = Instant::now();
        generate(model, pixels, ids, new_tokens, 1)?;
        Ok((gpu.submission_stats(), start.elapsed().as_secs_f64()))
    };
    let (one, one_s) = timed(1)?;
    let (all, all_s) = timed(steps + 1)?;
    let per = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / steps as f64;
    let wait_s = (all.wait_s - one.wait_s).max(0.0);
    let host_s = (all_s - one_s - wait_s).max(0.0);
    Ok(StepCounts {
        dispatches_per_step: per(all.dispatches, one.dispatches),
        submissions_per_step: per(all.submissions, one.submissions),
        waits_per_step: per(all.waits, one.waits),
        overlapped_waits_per_step: per(all.overlapped_waits, one.overlapped_waits),
        host_ms_per_step: 1e3 * host_s / steps as f64,
        wait_ms_per_step: 1e3 * wait_s / steps as f64,
        longest_submission_s: all.longest_run_s,
    })
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ProbeParams {
    iters: u32,
    per_group: u32,
    groups: u32,
    a: f32,
}

/// Threads per probe workgroup (the shader's `WG`).
const PROBE_WG: u32 = 64;
/// vec4 elements each read-probe workgroup streams (256 KiB).
const READ_PER_GROUP: u32 = 16384;
/// Bytes the read probe streams unless told otherwise.
pub const READ_DEFAULT_BYTES: u64 = 256 << 20;
/// A probe is scaled up until one run takes at least this long.
const PROBE_MIN_S: f64 = 0.2;

/// Best wall time of `reps` runs of `plan` after one warm-up run.
fn time_plan(gpu: &Gpu, plan: &paligemma::gpu::Plan, reps: usize) -> Result<f64> {
    plan.run(gpu)?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        plan.run(gpu)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Measure f32 FMA throughput and storage-buffer read bandwidth (streaming `read_bytes`).
pub fn run_probes(gpu: &Gpu, read_bytes: u64) -> Result<Probes> {
    probes_in_bindings(gpu, read_bytes, gpu.max_binding_bytes())
}

/// [`run_probes`] with the read probe's buffers at most `binding` bytes each.
fn probes_in_bindings(gpu: &Gpu, read_bytes: u64, binding: u64) -> Result<Probes> {
    let max_groups = gpu
        .limits()
        .max_compute_workgroups_per_dimension
        .min(1 << 15);

    // FMA: grow the grid, then the chain length, until a run is long enough to time.
    let key = KernelKey::new("probe", "fma_probe");
    let (mut groups, mut iters) = (64u32, 1024u32);
    let fma_gflops = loop {
        let out = Tensor::zeros(gpu, "probe.fma", &[(groups * PROBE_WG) as usize])?;
        let mut rec = Recorder::new(gpu);
        let params = ProbeParams {
            iters,
            per_group: 0,
            groups,
            a: 0.999,
        };
        rec.dispatch(&key, &params, &[out.buffer()], [groups, 1, 1])?;
        let plan = rec.finish()?;
        let t = time_plan(gpu, &plan, 3)?;
        let flop = groups as f64 * PROBE_WG as f64 * iters as f64 * 32.0;
        if t >= PROBE_MIN_S || iters >= 1 << 24 {
            break flop / t / 1e9;
        }
        let grow = (PROBE_MIN_S * 1.5 / t).clamp(2.0, 64.0) as u32;
        if groups < max_groups {
            groups = (groups * grow).min(max_groups);
        } else {
            iters *= grow;
        }
    };

    // Read bandwidth: `read_bytes` of real (non-zero) data in buffers of at most one binding
    // each, all streamed `reps` times a run.
    let vec_bytes = 16 * READ_PER_GROUP as u64;
    let chunk = binding.min(read_bytes) / vec_bytes * vec_bytes;
    if chunk == 0 {
        return Err(Error::Request(format!(
            "the read probe needs at least {vec_bytes} bytes (asked for {read_bytes}, in \
             bindings of {binding})"
        )));
    }
    let piece: Vec<f32> = (0..(4 << 20) / 4)
        .map(|i| (i % 251) as f32 * 1e-3)
        .collect();
    let piece_bytes: &[u8] = bytemuck::cast_slice(&piece);
    let mut sources = Vec::new();
    let mut left = read_bytes / vec_bytes * vec_bytes;
    while left > 0 {
        let bytes = chunk.min(left);
        left -= bytes;
        let src = Tensor::zeros(gpu, "probe.src", &[(bytes / 4) as usize])?;
        let mut at = 0;
        while at < bytes {
            let n = (piece_bytes.len() as u64).min(bytes - at) as usize;
            gpu.queue.write_buffer(src.buffer(), at, &piece_bytes[..n]);
            at += n as u64;
        }
        let groups = (bytes / vec_bytes) as u32;
        let params = ProbeParams {
            iters: 0,
            per_group: READ_PER_GROUP,
            groups,
            a: 0.0,
        };
        sources.push((src, params));
    }
    let bytes: u64 = sources
        .iter()
        .map(|(_, p)| u64::from(p.groups) * vec_bytes)
        .sum();
    let most_groups = (chunk / vec_bytes) as usize;
    let out = Tensor::zeros(gpu, "probe.sums", &[most_groups])?;
    let read = |entry: &'static str| -> Result<f64> {
        let key = KernelKey::new("probe", entry);
        let mut reps = 1;
        loop {
            let mut rec = Recorder::new(gpu);
            for _ in 0..reps {
                for (src, params) in &sources {
                    let grid = rec.grid(params.groups);
                    rec.dispatch(&key, params, &[out.buffer(), src.buffer()], grid)?;
                }
            }
            let plan = rec.finish()?;
            let t = time_plan(gpu, &plan, 3)?;
            if t >= PROBE_MIN_S || reps >= 256 {
                return Ok((bytes * reps as u64) as f64 / t / 1e9);
            }
            reps *= (PROBE_MIN_S * 1.5 / t).clamp(2.0, 16.0) as usize;
        }
    };
    let read_interleaved_gbs = read("read_probe")?;
    let read_rows_gbs = read("read_rows_probe")?;
    Ok(Probes {
        fma_gflops,
        read_gbs: read_interleaved_gbs.max(read_rows_gbs),
        read_interleaved_gbs,
        read_rows_gbs,
        read_buffer_bytes: bytes,
        read_buffers: sources.len(),
    })
}

/// The profile of one model report: kernels by total time, with their share.
fn profile_table(m: &ModelReport) -> String {
    let total: f64 = m.profile.iter().map(|r| r.seconds).sum();
    let calls: usize = m.profile.iter().map(|r| r.calls).sum();
    let how = match m.profile.iter().all(|r| r.device_timed) {
        true => "GPU timestamps between dispatches",
        false => "each dispatch submitted and waited for alone, host clock",
    };
    let mut s = format!(
        "profile of {} request(s) together ({} weights, {} decode steps): {calls} dispatches, \
         {:.1} ms ({how})\n\
         {:<28}{:>18}{:>7}{:>11}{:>10}{:>7}\n",
        m.profile_batch,
        m.weights,
        m.decode_steps,
        total * 1e3,
        "kernel",
        "workgroups",
        "calls",
        "total ms",
        "mean ms",
        "share"
    );
    for r in &m.profile {
        let [x, y, z] = r.workgroups;
        let _ = writeln!(
            s,
            "{:<28}{:>18}{:>7}{:>11.2}{:>10.3}{:>6.1}%",
            r.kernel,
            format!("{x}x{y}x{z}"),
            r.calls,
            r.seconds * 1e3,
            r.seconds * 1e3 / r.calls as f64,
            100.0 * r.seconds / total
        );
    }
    s
}

fn pct(value: f64, of: Option<f64>) -> String {
    match of {
        Some(p) if p > 0.0 => format!("{:5.1}%", 100.0 * value / p),
        _ => "     -".into(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

impl BenchReport {
    /// The report as a human-readable table; rates carry their share of the probes' figures.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "adapter: {}", self.adapter);
        let fma = self.probes.map(|p| p.fma_gflops);
        let bw = self.probes.map(|p| p.read_gbs);
        for m in &self.models {
            let _ = writeln!(
                s,
                "model: {} ({} vision + {} text layers, vocabulary {}), {} weights",
                m.model, m.vision_layers, m.text_layers, m.vocab, m.weights
            );
            let _ = writeln!(
                s,
                "{:<34}{:>14}  {:>11} {:>6}  {:>9} {:>6}",
                "", "", "GFLOP/s", "%FMA", "GB/s", "%read"
            );
            let row = |s: &mut String, name: &str, value: String, work: Option<(f64, f64)>| {
                let _ = match work {
                    Some((gf, gb)) => writeln!(
                        s,
                        "{name:<34}{value:>14}  {gf:>11.1} {} {gb:>9.2} {}",
                        pct(gf, fma),
                        pct(gb, bw)
                    ),
                    None => writeln!(s, "{name:<34}{value:>14}"),
                };
            };
            row(&mut s, "load weights", format!("{:.2} s", m.load_s), None);
            row(
                &mut s,
                &format!("pipelines created ({})", m.pipelines),
                format!("{:.3} s", m.pipeline_create_s),
                None,
            );
            row(
                &mut s,
                "cold time to first token",
                format!("{:.2} s", m.cold_ttft_s),
                None,
            );
            row(
                &mut s,
                "  cold start (first runs)",
                format!("{:.2} s", m.cold_start_s),
                None,
            );
            row(
                &mut s,
                "time to first token",
                format!("{:.2} s", m.ttft_s),
                None,
            );
            let vision_gbs = m.vision_work.bytes / m.vision_s / 1e9;
            row(
                &mut s,
                "vision encoder",
                format!("{:.2} s", m.vision_s),
                Some((m.vision_gflops, vision_gbs)),
            );
            row(
                &mut s,
                &format!("prefill ({} tokens)", m.prefill_tokens),
                format!("{:.2} tok/s", m.prefill_tok_s),
                Some((m.prefill_gflops, m.prefill_gbs)),
            );
            row(
                &mut s,
                &format!("decode ({} steps)", m.decode_steps),
                format!("{:.2} tok/s", m.decode_tok_s),
                Some((m.decode_gflops, m.decode_gbs)),
            );
            let c = &m.submissions;
            row(
                &mut s,
                "per decode step: dispatches",
                format!("{:.0}", c.dispatches_per_step),
                None,
            );
            row(
                &mut s,
                "  submissions / waits (+overlap)",
                format!(
                    "{:.1} / {:.1} (+{:.1})",
                    c.submissions_per_step, c.waits_per_step, c.overlapped_waits_per_step
                ),
                None,
            );
            row(
                &mut s,
                "  host ms outside / inside waits",
                format!("{:.2} / {:.2}", c.host_ms_per_step, c.wait_ms_per_step),
                None,
            );
            row(
                &mut s,
                "longest submission",
                format!("{:.1} ms", c.longest_submission_s * 1e3),
                None,
            );
            let rss = m.peak_rss_bytes.map_or("-".into(), mib);
            row(&mut s, "peak host RSS", rss, None);
            row(
                &mut s,
                "GPU buffers: weights",
                mib(m.gpu_weight_bytes),
                None,
            );
            row(
                &mut s,
                "GPU buffers: per request",
                mib(m.gpu_request_bytes),
                None,
            );
        }
        for m in self.models.iter().filter(|m| !m.profile.is_empty()) {
            s.push_str(&profile_table(m));
        }
        if self.models.len() > 1 || self.models.iter().any(|m| m.batches.len() > 1) {
            s.push_str(&self.summary_table());
        }
        if let Some(p) = &self.probes {
            let _ = writeln!(
                s,
                "probes: FMA {:.1} GFLOP/s, storage-buffer read {:.2} GB/s (interleaved {:.2}, \
                 per-thread runs {:.2}; {} buffer)",
                p.fma_gflops,
                p.read_gbs,
                p.read_interleaved_gbs,
                p.read_rows_gbs,
                mib(p.read_buffer_bytes)
            );
        }
        s
    }
}

impl BenchReport {
    /// One line per weight format: memory, prefill and decode throughput at each batch size
    /// (tokens/s of all requests together).
    fn summary_table(&self) -> String {
        let mut s = String::new();
        let sizes: Vec<usize> = self
            .models
            .first()
            .map(|m| m.batches.iter().map(|b| b.batch).collect())
            .unwrap_or_default();
        let _ = write!(
            s,
            "{:<8}{:>13}{:>15}{:>15}",
            "weights", "GPU weights", "peak host RSS", "prefill tok/s"
        );
        for b in &sizes {
            let _ = write!(s, "{:>16}", format!("decode b={b}"));
        }
        s.push('\n');
        for m in &self.models {
            let rss = m.peak_rss_bytes.map_or("-".into(), mib);
            let _ = write!(
                s,
                "{:<8}{:>13}{:>15}{:>15.2}",
                m.weights.name(),
                mib(m.gpu_weight_bytes),
                rss,
                m.prefill_tok_s
            );
            for b in &m.batches {
                let _ = write!(s, "{:>16}", format!("{:.2} tok/s", b.decode_tok_s));
            }
            s.push('\n');
        }
        s
    }
}

/// A byte count: a number with an optional `KiB`, `MiB` or `GiB` suffix.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let shift = match unit {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => return Err(format!("{s:?}: the unit must be B, KiB, MiB or GiB")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a byte count above 0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_config_has_paligemma_3b_shapes() {
        let c = synthetic_config(2, 2, 224).unwrap();
        assert_eq!(c.num_image_tokens(), 256);
        assert_eq!(
            (c.vision.hidden_size, c.vision.intermediate_size),
            (1152, 4304)
        );
        assert_eq!(c.vision.num_attention_heads, 16);
        assert_eq!(
            (c.text.hidden_size, c.text.intermediate_size),
            (2048, 16384)
        );
        assert_eq!(
            (c.text.num_attention_heads, c.text.num_key_value_heads),
            (8, 1)
        );
        assert_eq!((c.text.head_dim, c.text.vocab_size), (256, 257216));
        assert_eq!(
            (c.vision.num_hidden_layers, c.text.num_hidden_layers),
            (2, 2)
        );
    }

    #[test]
    fn work_counts_match_hand_counts() {
        let c = synthetic_config(1, 1, 224).unwrap();
        // One Gemma-2B layer: q 2048², k and v 256·2048, o 2048², gate/up/down 3·2048·16384.
        let layer = 2.0 * 2048.0 * 2048.0 + 2.0 * 256.0 * 2048.0 + 3.0 * 2048.0 * 16384.0;
        let head = 257216.0 * 2048.0;
        let d = decode_work(&c.text, 10, 2.0);
        assert_eq!(d.flop, 2.0 * layer + 4.0 * 10.0 * 2048.0 + 2.0 * head);
        assert_eq!(
            d.bytes,
            2.0 * (layer + head + 2048.0) + 2.0 * 10.0 * 256.0 * 4.0
        );
        // int8: one byte a weight; activations and KV cache as before.
        let d8 = decode_work(&c.text, 10, 1.0);
        assert_eq!(d8.bytes, d.bytes - (layer + head));
        // One layer, the last: keys and values of all 266 positions, the rest for one.
        let kv = 2.0 * 256.0 * 2048.0;
        let p = prefill_work(&c.text, 266, 2.0);
        assert_eq!(
            p.flop,
            2.0 * 266.0 * kv + 2.0 * (layer - kv) + 4.0 * 266.0 * 2048.0 + 2.0 * head
        );
        let v = vision_work(&c, 2.0);
        let vl = 4.0 * 1152.0 * 1152.0 + 2.0 * 1152.0 * 4304.0;
        let params = 588.0 * 1152.0 + vl + 1152.0 * 2048.0;
        assert_eq!(v.flop, 2.0 * 256.0 * params + 4.0 * 256.0 * 256.0 * 1152.0);
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
        }
    }

    #[test]
    fn summary_has_a_line_per_format_and_a_column_per_batch() {
        let model = |weights, mib: u64, decode: [f64; 2]| ModelReport {
            weights,
            gpu_weight_bytes: mib << 20,
            prefill_tok_s: 50.0,
            batches: [1, 4]
                .iter()
                .zip(decode)
                .map(|(&batch, decode_tok_s)| BatchFigures {
                    batch,
                    decode_tok_s,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let report = BenchReport {
            adapter: "test".into(),
            device_type: "Cpu".into(),
            models: vec![
                model(WeightFormat::F16, 1489, [6.88, 15.16]),
                model(WeightFormat::Int4, 420, [8.11, 14.84]),
            ],
            probes: None,
        };
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("weights")).unwrap();
        assert!(lines[header].contains("decode b=1") && lines[header].contains("decode b=4"));
        let f16: Vec<&str> = lines[header + 1].split_whitespace().collect();
        assert_eq!(f16[..3], ["f16", "1489", "MiB"]);
        assert!(lines[header + 1].ends_with("6.88 tok/s     15.16 tok/s"));
        assert!(lines[header + 2].starts_with("int4") && lines[header + 2].contains("420 MiB"));
        // One format at batch 1 only: no summary.
        let single = BenchReport {
            models: vec![model(WeightFormat::F16, 1, [1.0, 2.0])],
            ..report
        };
        let mut one = single.clone();
        one.models[0].batches.truncate(1);
        assert!(!one.table().contains("decode b="));
        assert!(single.table().contains("decode b=4"));
    }

    #[test]
    fn probes_measure_something() {
        let gpu = Gpu::new(paligemma::gpu::GpuOptions::default()).unwrap();
        let p = run_probes(&gpu, 8 << 20).unwrap();
        assert!(p.fma_gflops > 0.0 && p.fma_gflops.is_finite(), "{p:?}");
        assert!(p.read_gbs > 0.0 && p.read_gbs.is_finite(), "{p:?}");
        assert_eq!((p.read_buffer_bytes, p.read_buffers), (8 << 20, 1));
    }

    #[test]
    fn byte_counts_take_binary_units() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert!(parse_bytes("1GB").unwrap_err().contains("unit"));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("99999999999GiB").is_err());
    }

    #[test]
    fn the_read_probe_spans_several_bindings() {
        // 1 MiB bindings: a 3.5 MiB probe is four buffers (1 + 1 + 1 + 0.5 MiB, whole
        // 256 KiB workgroup runs), all read.
        let gpu = Gpu::new(paligemma::gpu::GpuOptions::default()).unwrap();
        let p = probes_in_bindings(&gpu, 7 << 19, 1 << 20).unwrap();
        assert_eq!((p.read_buffer_bytes, p.read_buffers), (7 << 19, 4), "{p:?}");
        assert!(p.read_gbs > 0.0 && p.read_gbs.is_finite(), "{p:?}");
    }
}
