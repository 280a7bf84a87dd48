//! `paligemma`: run PaliGemma on any GPU through wgpu.

mod bench;
mod generate;
#[cfg(feature = "serve")]
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use paligemma::generate::{
    EarlyStopping, GenerateOptions, ImageInput, Prompt, Request, SamplingParams, SchedulerOptions,
};

use generate::{answer, BatchJob, PartialFailure, Shard};
use paligemma::gpu::{Gpu, GpuOptions};
use paligemma::model::{
    resolve_model_dir_at, save_quantized, Checkpoint, CheckpointKind, ImageEncoder, LoadProgress,
    ModelBuilder, PaliGemma, WeightFormat,
};
use paligemma::tasks::{process_answer, OutputOptions};

#[derive(Parser)]
#[command(
    name = "paligemma",
    version,
    about = "PaliGemma vision-language inference on any GPU (wgpu)"
)]
struct Cli {
    /// Log more (adapter features, limits, timings); repeat for debug output.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Split weights into GPU bindings of at most this many bytes (testing aid).
    #[arg(long, global = true, value_name = "BYTES")]
    max_binding: Option<u64>,
    /// Merge a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
    /// into the weights at load.
    #[arg(long, global = true, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Store the weight matrices as f16, or quantised to int8 (per output channel) or int4
    /// (blocks of 32): about 2, 1 and 0.56 bytes a weight. Default: as the checkpoint stores
    /// them (f16, or the format `paligemma quantize` wrote, the only one it loads in).
    #[arg(long, global = true, value_name = "f16|int8|int4")]
    weights: Option<WeightFormat>,
    /// With an org/name model: the Hugging Face cache snapshot to use, a branch or tag
    /// (`refs/REV`) or a commit hash (default: `main`, else the newest snapshot).
    #[arg(long, global = true, value_name = "REV")]
    revision: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the vision tower and projector on an image and save the image embeddings.
    EncodeImage {
        /// Checkpoint directory, or org/name in the local Hugging Face cache.
        #[arg(long)]
        model: String,
        /// Input image (any format the `image` crate reads).
        #[arg(long)]
        image: PathBuf,
        /// Output .npy file: little-endian f32 [num_image_tokens, text_hidden_size].
        #[arg(long)]
        out: PathBuf,
    },
    /// Answer a prompt about an image (caption en, answer en ..., detect cat, ocr, ...).
    Generate {
        /// Checkpoint directory, or org/name in the local Hugging Face cache.
        #[arg(long)]
        model: String,
        /// Input image; `-` reads it from standard input. Repeat it for a prompt about
        /// several images (as HF's PaliGemmaProcessor takes them; the NLVR2 fine-tunes compare
        /// two): each is encoded on its own and gets its own block of image tokens, in order.
        #[arg(long, required_unless_present = "batch")]
        image: Vec<PathBuf>,
        /// The prompt, e.g. "caption en". Repeat it to ask several questions about the same
        /// image: the vision tower runs once and the answers come in order, one per line.
        #[arg(long, required_unless_present = "batch")]
        prompt: Vec<String>,
        /// Run many requests with continuous batching: a JSON-lines file of {"image": PATH,
        /// "prompt": TEXT} ("image" may be a list of paths for a prompt about several
        /// images; paths relative to the current directory), read as it is
        /// processed; prints one answer (or, with --json, one JSON object) per line, in
        /// input order. A bad line gives {"error": ...} with --json (a message on stderr and
        /// an empty line otherwise) and the exit code 1 once the whole file is done.
        #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["image", "prompt"])]
        batch: Option<PathBuf>,
        /// With --batch, take only the lines whose index (from 0) modulo N is I, to split a
        /// job over several processes or machines.
        #[arg(long, value_name = "I/N", requires = "batch")]
        shard: Option<Shard>,
        /// The most sequences decoding together (each holds its own KV cache).
        #[arg(long, default_value_t = 16, value_name = "N")]
        max_batch: usize,
        /// Stop after this many new tokens.
        #[arg(long, short = 'n', visible_alias = "max-tokens", default_value_t = 64)]
        max_new_tokens: usize,
        /// End the answer before this string (repeatable).
        #[arg(long, value_name = "STRING")]
        stop: Vec<String>,
        /// Penalise tokens already in the sequence (HF's repetition_penalty; 1 is off).
        #[arg(long, default_value_t = 1.0, value_name = "F")]
        repetition_penalty: f32,
        /// Sampling temperature; 0 is greedy decoding.
        #[arg(long, visible_alias = "temp", default_value_t = 0.0)]
        temperature: f32,
        /// Sample among the k most likely tokens only (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sample among the most likely tokens whose probabilities sum to p.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Seed for sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one JSON object (text, ids, per-step log-probabilities, timings).
        #[arg(long)]
        json: bool,
        /// With --json, record the K best log-probabilities of every step.
        #[arg(long, default_value_t = 0, value_name = "K")]
        top_logprobs: usize,
        /// Beam search with N beams (HF's num_beams; 1 is greedy or sampled decoding). The
        /// answer is printed when the search ends; --json adds its "beam_score".
        #[arg(long, default_value_t = 1, value_name = "N")]
        num_beams: usize,
        /// Beam search: score finished answers by log-probability / length^F (HF's
        /// length_penalty; above 0 favours longer answers).
        #[arg(
            long,
            default_value_t = 1.0,
            value_name = "F",
            allow_negative_numbers = true
        )]
        length_penalty: f32,
        /// Beam search: stop as soon as N answers have finished (HF's early_stopping=True).
        #[arg(long)]
        early_stopping: bool,
        #[command(flatten)]
        tasks: TaskArgs,
    },
    /// Quantise a checkpoint's weight matrices once (--weights int8|int4, after any
    /// --adapter) and save them packed as the GPU holds them, with the config and tokenizer
    /// files, so that loading it copies them instead of quantising again.
    Quantize {
        /// Checkpoint directory, or org/name in the local Hugging Face cache.
        #[arg(long)]
        model: String,
        /// The directory to write (new or empty).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Parse a detect/segment answer (<locNNNN>/<segNNN> tokens) into boxes and masks.
    Parse {
        /// The answer text, e.g. "<loc0267><loc0099><loc0601><loc0252> cat".
        #[arg(long)]
        text: String,
        /// The image the answer is about (boxes are in its pixels).
        #[arg(long)]
        image: PathBuf,
        /// Print {"objects": [...]} as JSON instead of one line per object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        tasks: TaskArgs,
    },
    /// Serve the model over HTTP: OpenAI `POST /v1/chat/completions`, ollama
    /// `POST /api/generate`, `GET /v1/models`, `/api/tags`, `/health` and `/metrics`; all
    /// requests decode together through one continuous-batching scheduler.
    #[cfg(feature = "serve")]
    Serve {
        /// Checkpoint directory, or org/name in the local Hugging Face cache.
        #[arg(long)]
        model: String,
        /// Address to listen on (127.0.0.1: this machine only).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port to listen on (0: any free port; the chosen one is printed).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        /// Requests that may wait for a slot beyond --max-batch; more get 503.
        #[arg(long, default_value_t = 64)]
        max_queue: usize,
        /// Require `Authorization: Bearer KEY` on every endpoint but /health (default: the
        /// PALIGEMMA_API_KEY environment variable, if set).
        #[arg(long, env = "PALIGEMMA_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Largest request body accepted, in bytes (larger: 413).
        #[arg(long, default_value_t = 32 << 20, value_name = "BYTES")]
        max_body: usize,
        /// Seconds a non-streamed request may take before it is cancelled (504).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// big_vision's mask decoder weights (vae-oid.npz, from the big_vision PaliGemma
        /// assets): segment answers then carry their masks as PNGs.
        #[arg(long, value_name = "FILE")]
        vae: Option<PathBuf>,
    },
    /// Measure cold start, time to first token, prefill and decode throughput against device
    /// probes, on a checkpoint or a synthetic model of PaliGemma-3B-224 shapes.
    Bench {
        /// Checkpoint directory or org/name; default: synthetic random weights (stored as
        /// --weights says).
        #[arg(long)]
        model: Option<String>,
        /// Layers in each tower of the synthetic model.
        #[arg(long, default_value_t = 2)]
        layers: usize,
        /// Decoder layers of the synthetic model, if not --layers (full PaliGemma-3B:
        /// --layers 27 --text-layers 18).
        #[arg(long)]
        text_layers: Option<usize>,
        /// Image size of the synthetic model: 224, 448 or 896 (256, 1024 or 4096 image
        /// tokens).
        #[arg(long, default_value_t = 224, value_name = "PX")]
        image_size: usize,
        /// Prompt text tokens after the image tokens and <bos> (9: 266 tokens at 224 px).
        #[arg(long, default_value_t = 9)]
        text_tokens: usize,
        /// Decode steps to time.
        #[arg(long, default_value_t = 16)]
        decode_steps: usize,
        /// Warm requests to run; each figure is the best of them.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Weight formats to measure one after the other, e.g. f16,int8,int4 (default: the
        /// global --weights).
        #[arg(long, value_delimiter = ',', value_name = "LIST")]
        formats: Vec<WeightFormat>,
        /// Batch sizes to measure decode throughput at, e.g. 1,4,8 (identical requests run
        /// together).
        #[arg(long, value_delimiter = ',', value_name = "LIST", default_value = "1")]
        batch: Vec<usize>,
        /// Skip the model; run the device probes only.
        #[arg(long, conflicts_with = "no_probes")]
        probes_only: bool,
        /// Time every kernel dispatch of one more batch (of the largest --batch size), one
        /// submission each, and print the kernels by total time.
        #[arg(long)]
        profile: bool,
        /// Skip the device probes.
        #[arg(long)]
        no_probes: bool,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Bytes the read-bandwidth probe streams, e.g. 1GiB (more than a GPU's L2 cache),
        /// split over as many storage bindings as the device needs.
        #[arg(long, default_value = "256MiB", value_parser = bench::parse_bytes, value_name = "SIZE")]
        read_bytes: u64,
    },
}

/// Outputs for detect/segment answers.
#[derive(clap::Args)]
struct TaskArgs {
    /// Mask decoder weights (big_vision's vae-oid.npz), to decode <segNNN> tokens.
    #[arg(long, value_name = "FILE.npz")]
    vae: Option<PathBuf>,
    /// Write the image with the boxes, labels and masks drawn (PNG).
    #[arg(long, value_name = "OUT.png")]
    annotate: Option<PathBuf>,
    /// Write one 8-bit mask PNG (0/255) per decoded mask into this directory (needs --vae).
    #[arg(long, value_name = "DIR", requires = "vae")]
    mask_dir: Option<PathBuf>,
}

impl TaskArgs {
    fn options(&self) -> Option<OutputOptions> {
        let opts = OutputOptions {
            vae: self.vae.clone(),
            annotate: self.annotate.clone(),
            mask_dir: self.mask_dir.clone(),
        };
        (opts.vae.is_some() || opts.annotate.is_some() || opts.mask_dir.is_some()).then_some(opts)
    }
}

fn open_gpu(max_binding: Option<u64>) -> Result<std::sync::Arc<Gpu>> {
    let gpu = Gpu::new(GpuOptions {
        weight_binding_limit: max_binding,
    })?;
    eprintln!("adapter: {}", gpu.describe());
    Ok(gpu)
}

/// The global flags that shape a load.
struct LoadFlags {
    adapter: Option<PathBuf>,
    /// `None`: as the checkpoint stores them.
    weights: Option<WeightFormat>,
}

/// A progress bar on stderr for `bytes` of work, labelled `what`.
fn bytes_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{bytes}}/{{total_bytes}} ({{eta}})"
        ))
        .expect("valid template"),
    );
    bar
}

/// Load `dir` on `gpu` with `build` (the whole model or the image encoder), drawing the
/// weights progress bar on stderr from the builder's reports and clearing it at the end.
fn load_with_bar<T>(
    gpu: std::sync::Arc<Gpu>,
    dir: &std::path::Path,
    flags: &LoadFlags,
    build: fn(ModelBuilder) -> paligemma::Result<T>,
) -> Result<T> {
    let bar = bytes_bar("loading weights");
    let draw = bar.clone();
    let mut builder = ModelBuilder::new(dir)
        .gpu(gpu)
        .on_progress(move |p: &LoadProgress| {
            draw.set_length(p.bytes_total);
            draw.set_position(p.bytes_done);
        });
    if let Some(format) = flags.weights {
        builder = builder.weights(format);
    }
    if let Some(adapter) = &flags.adapter {
        builder = builder.adapter(adapter);
    }
    let result = build(builder);
    bar.finish_and_clear();
    Ok(result?)
}

/// The kind of checkpoint `model` (loaded from `dir`) is, logged with `-v`.
fn checkpoint_kind(model: &PaliGemma, dir: &std::path::Path) -> CheckpointKind {
    let name = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let kind = CheckpointKind::detect(&model.config, &name);
    log::info!("checkpoint: {kind}");
    kind
}

/// Load the whole model in `dir` on `gpu`.
fn load_model(
    gpu: std::sync::Arc<Gpu>,
    dir: &std::path::Path,
    flags: &LoadFlags,
) -> Result<PaliGemma> {
    load_with_bar(gpu, dir, flags, ModelBuilder::build)
}

/// Load the vision tower and projector of the model in `dir` on `gpu`.
fn load_encoder(
    gpu: std::sync::Arc<Gpu>,
    dir: &std::path::Path,
    flags: &LoadFlags,
) -> Result<ImageEncoder> {
    load_with_bar(gpu, dir, flags, ModelBuilder::build_encoder)
}

fn run(cli: Cli) -> Result<()> {
    let load = LoadFlags {
        adapter: cli.adapter.clone(),
        weights: cli.weights,
    };
    match cli.command {
        Command::EncodeImage { model, image, out } => {
            let dir = resolve_model_dir_at(&model, cli.revision.as_deref())?;
            let gpu = open_gpu(cli.max_binding)?;
            let encoder = load_encoder(gpu, &dir, &load)?;
            let pixels = encoder.images.load(&image)?;
            let features = encoder.encode(&pixels)?;
            let shape = [
                encoder.config.num_image_tokens(),
                encoder.config.projection_dim,
            ];
            paligemma::npy::write_f32(&out, &shape, &features)?;
            eprintln!("wrote {} {:?}", out.display(), shape);
        }
        Command::Generate {
            model,
            image,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            json,
            top_logprobs,
            tasks,
            batch,
            shard,
            max_batch,
            stop,
            repetition_penalty,
            num_beams,
            length_penalty,
            early_stopping,
        } => {
            if num_beams == 0 {
                anyhow::bail!("--num-beams must be at least 1 (1 turns beam search off)");
            }
            if num_beams > 1 && batch.is_some() {
                anyhow::bail!("--num-beams works on single requests, not with --batch");
            }
            let options = GenerateOptions {
                max_new_tokens,
                sampling: SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                },
                top_logprobs,
                stop_at_eos: true,
                stop,
                repetition_penalty,
                num_beams,
                length_penalty,
                early_stopping: match early_stopping {
                    true => EarlyStopping::Done,
                    false => EarlyStopping::Heuristic,
                },
            };
            options.validate()?;
            let scheduler = SchedulerOptions {
                max_sequences: max_batch,
                ..Default::default()
            };
            if max_batch == 0 {
                anyhow::bail!("--max-batch must be at least 1");
            }
            let dir = resolve_model_dir_at(&model, cli.revision.as_deref())?;
            let gpu = open_gpu(cli.max_binding)?;
            if let Some(file) = batch {
                if tasks.options().is_some() {
                    anyhow::bail!("--vae, --annotate and --mask-dir work on single requests, not with --batch");
                }
                let input = std::fs::File::open(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let model = load_model(gpu, &dir, &load)?;
                checkpoint_kind(&model, &dir);
                let job = BatchJob {
                    file: &file,
                    shard,
                    json,
                    options,
                };
                let failed = job.run(&model, scheduler, std::io::BufReader::new(input))?;
                if failed > 0 {
                    eprintln!("{failed} request(s) of {} failed", file.display());
                    return Err(PartialFailure.into());
                }
                return Ok(());
            }
            if image.is_empty() {
                anyhow::bail!("--image and --prompt are required without --batch");
            }
            if prompt.len() > 1 && tasks.options().is_some() {
                anyhow::bail!("--vae, --annotate and --mask-dir work with a single --prompt");
            }
            let stdin = |p: &PathBuf| p.as_os_str() == "-";
            if image.iter().filter(|p| stdin(p)).count() > 1 {
                anyhow::bail!("`--image -` can be given once: standard input holds one image");
            }
            if image.len() > 1 && tasks.options().is_some() {
                anyhow::bail!(
                    "--vae, --annotate and --mask-dir draw on one image; they cannot be used \
                     with {} --image",
                    image.len()
                );
            }
            if image.iter().any(stdin) && tasks.options().is_some() {
                anyhow::bail!(
                    "--vae, --annotate and --mask-dir need the image as a file, not `--image -`"
                );
            }
            let model = load_model(gpu, &dir, &load)?;
            let kind = checkpoint_kind(&model, &dir);
            let mut pixels = Vec::with_capacity(image.len());
            let mut image_warnings = Vec::new();
            for path in &image {
                let (px, size) = if stdin(path) {
                    let mut data = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut data)
                        .context("reading the image from standard input")?;
                    let size = image::ImageReader::new(std::io::Cursor::new(&data))
                        .with_guessed_format()
                        .ok()
                        .and_then(|r| r.into_dimensions().ok());
                    let px = model
                        .images
                        .load_bytes(&data, std::path::Path::new("standard input"))?;
                    (px, size)
                } else {
                    (model.images.load(path)?, image::image_dimensions(path).ok())
                };
                if let Some(w) = size.and_then(|(w, h)| kind.image_warning(w, h)) {
                    image_warnings.push(match image.len() {
                        1 => w,
                        _ => format!("{}: {w}", path.display()),
                    });
                }
                pixels.push(px);
            }
            // Several prompts share the images' features: the vision tower runs once each.
            let images: Vec<ImageInput> = match prompt.len() {
                1 => pixels.into_iter().map(ImageInput::Pixels).collect(),
                _ => pixels
                    .iter()
                    .map(|px| model.image_features(px).map(ImageInput::Features))
                    .collect::<paligemma::Result<_>>()?,
            };
            let input = match images.len() {
                1 => images[0].clone(),
                _ => ImageInput::Many(images),
            };
            for prompt in prompt {
                let mut warnings = image_warnings.clone();
                warnings.extend(kind.prompt_warnings(&prompt, tasks.vae.is_some()));
                for w in &warnings {
                    eprintln!("warning: {w}");
                }
                let request = Request {
                    image: input.clone(),
                    prompt: Prompt::Text(prompt),
                    options: options.clone(),
                };
                let about = generate::About {
                    kind: &kind,
                    warnings: &warnings,
                };
                // Detection outputs (refused above with several images) draw on the first.
                answer(&model, request, &image[0], &tasks, json, &about)?;
            }
        }
        Command::Quantize { model, out } => {
            let Some(format) = cli.weights else {
                anyhow::bail!("quantize needs --weights int8 or --weights int4");
            };
            let dir = resolve_model_dir_at(&model, cli.revision.as_deref())?;
            let bar = bytes_bar(&format!("quantising to {format}"));
            let draw = bar.clone();
            let saved = save_quantized(
                &dir,
                &out,
                format,
                cli.adapter.as_deref(),
                move |p: &LoadProgress| {
                    draw.set_length(p.bytes_total);
                    draw.set_position(p.bytes_done);
                },
            );
            bar.finish_and_clear();
            let saved = saved?;
            eprintln!(
                "wrote {}: {} bytes ({} matrices packed as {format}, {} tensors copied; the \
                 source's tensors: {} bytes), and copied {}",
                saved.path.display(),
                saved.bytes,
                saved.quantized,
                saved.copied,
                saved.source_bytes,
                saved.files.join(", ")
            );
        }
        Command::Parse {
            text,
            image,
            json,
            tasks,
        } => {
            let opts = tasks.options().unwrap_or_default();
            let report = process_answer(&text, &image, &opts, || {
                let gpu = Gpu::new(GpuOptions {
                    weight_binding_limit: cli.max_binding,
                })?;
                eprintln!("adapter: {}", gpu.describe());
                Ok(gpu)
            })?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.summary());
            }
        }
        #[cfg(feature = "serve")]
        Command::Serve {
            model,
            host,
            port,
            max_batch,
            max_queue,
            api_key,
            max_body,
            timeout,
            vae,
        } => {
            if max_batch == 0 {
                anyhow::bail!("--max-batch must be at least 1");
            }
            serve::serve(serve::ServeOptions {
                model: resolve_model_dir_at(&model, cli.revision.as_deref())?,
                host,
                port,
                load,
                max_binding: cli.max_binding,
                max_batch,
                max_queue,
                api_key: api_key.filter(|k| !k.is_empty()),
                max_body_bytes: max_body,
                timeout: std::time::Duration::from_secs(timeout),
                vae,
            })?;
        }
        Command::Bench {
            model,
            layers,
            text_layers,
            text_tokens,
            image_size,
            decode_steps,
            runs,
            formats,
            batch,
            probes_only,
            no_probes,
            profile,
            json,
            read_bytes,
        } => {
            let model = model
                .map(|m| resolve_model_dir_at(&m, cli.revision.as_deref()))
                .transpose()?;
            // A quantised checkpoint loads in its own format only.
            let default_format = match (cli.weights, &model) {
                (Some(format), _) => format,
                (None, Some(dir)) => Checkpoint::open(dir)?.stored_format().unwrap_or_default(),
                (None, None) => WeightFormat::F16,
            };
            let options = bench::BenchOptions {
                model,
                layers,
                text_layers,
                text_tokens,
                image_size,
                decode_steps,
                runs,
                run_model: !probes_only,
                probes: !no_probes,
                formats: if formats.is_empty() {
                    vec![default_format]
                } else {
                    formats
                },
                batch_sizes: batch,
                profile,
                read_bytes,
                ..Default::default()
            };
            let gpu = open_gpu(cli.max_binding)?;
            let report = bench::run(&gpu, &options)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).context("serialising the report")?
                );
            } else {
                print!("{}", report.table());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<PartialFailure>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
