//! Quantised weights (`--weights int8|int4`) on the HF fixtures (tests/fixtures/models/*):
//! how often the quantised model picks the same greedy token as the f16 engine.
//!
//! Per fixture and (image, prompt) pair, the f16 engine generates 20 greedy tokens (which
//! tests/parity.rs checks against HF's `ref/<img>_gen_ids.npy`; asserted here too). Each
//! quantised model is then run teacher-forced on that sequence: at every step it sees the f16
//! engine's previous tokens, and its top-1 token is compared with the f16 one. That gives
//! - the top-1 agreement over all steps, and
//! - the number of leading steps before the first disagreement, which is how long the
//!   quantised model's own greedy output stays identical to f16's (checked against its free
//!   run through `generate_ids`).
//!
//! The fixtures are random-weight models at toy widths with deliberately large init gains
//! (see the floors below); the figures are printed (`--nocapture`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{fixtures, gpu};
use paligemma::generate::{argmax, logprobs, GenerateOptions};
use paligemma::gpu::quantize::fake_quantize;
use paligemma::gpu::{DType, Gpu, Recorder};
use paligemma::model::gemma::Gemma;
use paligemma::model::siglip::VisionTower;
use paligemma::model::{Checkpoint, ModelBuilder, PaliGemma, PaliGemmaConfig, WeightFormat};
use paligemma::npy;
use paligemma::processor::image::PixelValues;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

const FIXTURES: &[&str] = &[
    "tiny-mqa-f32",
    "tiny-gqa-bf16",
    "tiny-mha-f32-v5",
    "tiny-pg2-f32",
    "tiny-448-f32",
];

/// (reference name, image file, prompt), as in tests/parity.rs.
const PAIRS: &[(&str, &str, &str)] = &[
    ("astronaut", "astronaut.png", "caption en"),
    ("chelsea", "chelsea.jpg", "answer en what is in the image?"),
];

const STEPS: usize = 20;

fn read_ids(path: PathBuf) -> Vec<u32> {
    common::read_ids(&path)
}

/// The pixels tests/parity.rs uses: the engine's own preprocessing for the PNG, HF's pixel
/// values for the JPEG (JPEG decoders differ by a few levels).
fn pixels(pg: &PaliGemma, model: &str, img: &str, file: &str) -> PixelValues {
    if file.ends_with(".png") {
        return pg
            .images
            .load(&fixtures().join("images").join(file))
            .unwrap();
    }
    let a = npy::read_f32(&fixtures().join(format!("models/{model}/ref/{img}_pixel_values.npy")))
        .unwrap();
    PixelValues {
        height: a.shape[1],
        width: a.shape[2],
        data: a.data,
    }
}

/// The vision tower and decoder of `dir` with weights in `format`, for teacher forcing.
struct Forced {
    gpu: Arc<Gpu>,
    vision: VisionTower,
    text: Gemma,
}

impl Forced {
    fn load(gpu: Arc<Gpu>, dir: &Path, format: WeightFormat) -> Self {
        let config = PaliGemmaConfig::from_file(&dir.join("config.json")).unwrap();
        let mut ck = Checkpoint::open(dir).unwrap();
        ck.set_weight_format(format);
        let vision = VisionTower::load(&ck, &gpu, &config).unwrap();
        let text = Gemma::load(&ck, &gpu, &config.text).unwrap();
        Forced { gpu, vision, text }
    }

    /// Logits after the prompt `ids` and after each of `forced[..n - 1]`: `n` rows.
    fn logits(&self, pixels: &PixelValues, ids: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
        let gpu = &*self.gpu;
        let va = self.vision.activations(gpu).unwrap();
        self.vision.upload(gpu, &va, pixels).unwrap();
        let mut rec = Recorder::new(gpu);
        self.vision.record(&mut rec, &va, usize::MAX, true).unwrap();
        rec.run().unwrap();
        let mut seq = self.text.sequence(gpu, ids.len(), forced.len()).unwrap();
        let mut prefill = self.text.prefill(gpu, &seq, ids).unwrap();
        let mut rec = Recorder::new(gpu);
        let features = Some(&va.features);
        let layers = self.text.num_layers();
        let done = self
            .text
            .record_prefill(&mut rec, &mut seq, &mut prefill, features, layers)
            .unwrap();
        assert!(done);
        rec.run().unwrap();
        let mut out = vec![prefill.logits().read(gpu).unwrap()];
        let batch = self.text.batch(gpu, 1).unwrap();
        for &id in &forced[..forced.len() - 1] {
            let mut rec = Recorder::new(gpu);
            self.text
                .record_step(&mut rec, &batch, &mut [&mut seq], &[id])
                .unwrap();
            rec.run().unwrap();
            out.push(batch.logits().read_rows(gpu, 0, 1).unwrap());
        }
        out
    }
}

/// Agreement of one format with f16 on one fixture and pair.
struct Agreement {
    /// Steps whose teacher-forced top-1 equals f16's token.
    agree: usize,
    /// Leading steps before the first disagreement (= identical free-run greedy prefix).
    prefix: usize,
    /// Largest |log p(f16 token)| difference against the f16 engine over the steps.
    logprob_diff: f32,
}

/// Greedy agreement of `format` on the checkpoint in `quant_dir` with the f16 engine on
/// `base_dir` (the same checkpoint, or a host-quantised copy of it), for every pair. With
/// `check`, the f16 engine's ids must be HF's, and the quantised model's own greedy run
/// through `generate_ids` must follow f16 exactly as long as teacher forcing says.
fn compare(
    gpu: &Arc<Gpu>,
    model: &str,
    base_dir: &Path,
    quant_dir: &Path,
    format: WeightFormat,
    check: bool,
) -> Vec<(String, Agreement)> {
    let f16 = common::load(gpu, base_dir);
    let quant = ModelBuilder::new(quant_dir)
        .gpu(gpu.clone())
        .weights(format)
        .build()
        .unwrap();
    let forced = Forced::load(gpu.clone(), quant_dir, format);
    let mut rows = Vec::new();
    for (img, file, prompt) in PAIRS {
        let ids = f16.prompts().unwrap().encode(prompt).unwrap();
        let px = pixels(&f16, model, img, file);
        let opts = GenerateOptions {
            max_new_tokens: STEPS,
            stop_at_eos: false,
            top_logprobs: 5,
            ..Default::default()
        };
        let base = f16.generate_ids(&px, &ids, &opts, &mut |_| true).unwrap();
        let logits = forced.logits(&px, &ids, &base.token_ids);
        let top1: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        let agree = top1
            .iter()
            .zip(&base.token_ids)
            .filter(|(a, b)| a == b)
            .count();
        let prefix = top1
            .iter()
            .zip(&base.token_ids)
            .take_while(|(a, b)| a == b)
            .count();
        let logprob_diff = logits
            .iter()
            .zip(&base.steps)
            .map(|(l, step)| (logprobs(l, step.id, 0).0 - step.logprob).abs())
            .fold(0.0f32, f32::max);
        if check {
            let want = read_ids(base_dir.join(format!("ref/{img}_gen_ids.npy")));
            assert_eq!(base.token_ids, want, "{model} {img}: f16 engine vs HF");
            // The quantised model's own greedy run follows f16 for exactly `prefix` steps
            // and then takes the teacher-forced top-1.
            let free = quant.generate_ids(&px, &ids, &opts, &mut |_| true).unwrap();
            assert_eq!(
                free.token_ids[..prefix],
                base.token_ids[..prefix],
                "{model} {img} {format}"
            );
            if prefix < STEPS {
                assert_eq!(
                    free.token_ids[prefix], top1[prefix],
                    "{model} {img} {format}"
                );
            }
        }
        eprintln!(
            "{format} {model:>16} {img:<9}: top-1 agrees on {agree:2}/{STEPS} steps, \
             identical greedy prefix {prefix:2}, max |Δ logprob| {logprob_diff:.3}"
        );
        rows.push((
            format!("{model} {img}"),
            Agreement {
                agree,
                prefix,
                logprob_diff,
            },
        ));
    }
    rows
}

/// Run every fixture and pair in `format` against f16; print and return the figures.
fn measure(format: WeightFormat) -> Vec<(String, Agreement)> {
    let gpu = gpu(None);
    let mut rows = Vec::new();
    for model in FIXTURES {
        let dir = fixtures().join("models").join(model);
        rows.extend(compare(&gpu, model, &dir, &dir, format, true));
    }
    let agree: usize = rows.iter().map(|(_, a)| a.agree).sum();
    let total = rows.len() * STEPS;
    let long = rows.iter().filter(|(_, a)| a.prefix >= 16).count();
    let worst = rows.iter().map(|(_, a)| a.logprob_diff).fold(0.0, f32::max);
    eprintln!(
        "{format}: top-1 agreement {agree}/{total} = {:.1} %; greedy output identical for \
         >= 16 steps on {long}/{} fixture pairs; max |Δ logprob| {worst:.2}",
        100.0 * agree as f64 / total as f64,
        rows.len()
    );
    rows
}

/// A copy of fixture `model` whose quantised matrices hold their values after quantising to
/// `dtype` and back on the host (f32), so that the f16 engine on it computes what the
/// quantised kernels should.
fn host_quantised_copy(model: &str, dtype: DType) -> PathBuf {
    let src = fixtures().join("models").join(model);
    let dir = std::env::temp_dir().join(format!(
        "paligemma-quant-{model}-{dtype:?}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("ref")).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let mut data = view.data().to_vec();
        // What Checkpoint::matrix loads (2-D weights) except the position embeddings, which
        // stay f16; the patch embedding is 4-D.
        if shape.len() == 2 && name.ends_with(".weight") && !name.contains("position_embedding") {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let values: Vec<f32> = bytemuck::pod_collect_to_vec(&data);
            let q = fake_quantize(dtype, shape[1], &values);
            data = bytemuck::cast_slice(&q).to_vec();
        }
        kept.push((name, view.dtype(), shape, data));
    }
    let views: Vec<(String, TensorView)> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

/// The quantised kernels and loading compute what the f16 engine computes on a checkpoint
/// quantised on the host (f32 fixtures; the f16 engine rounds the dequantised values to f16,
/// a far smaller change than the quantisation itself).
#[test]
fn quantised_engine_matches_host_quantised_checkpoint() {
    let gpu = gpu(None);
    for (format, dtype) in [
        (WeightFormat::Int8, DType::Q8),
        (WeightFormat::Int4, DType::Q4),
    ] {
        let mut rows = Vec::new();
        for model in ["tiny-mqa-f32", "tiny-pg2-f32"] {
            let base = host_quantised_copy(model, dtype);
            let orig = fixtures().join("models").join(model);
            rows.extend(compare(&gpu, model, &base, &orig, format, false));
            std::fs::remove_dir_all(&base).unwrap();
        }
        let rate = agreement(&rows);
        let worst = rows.iter().map(|(_, a)| a.logprob_diff).fold(0.0, f32::max);
        eprintln!(
            "{format} vs host-quantised f16: agreement {rate:.3}, max |Δ logprob| {worst:.3}"
        );
        assert!(rate >= 0.95, "{format}: agreement {rate}");
    }
}

fn agreement(rows: &[(String, Agreement)]) -> f64 {
    let agree: usize = rows.iter().map(|(_, a)| a.agree).sum();
    agree as f64 / (rows.len() * STEPS) as f64
}

// The targets are ≥ 95 % (int8) and ≥ 85 % (int4) top-1 agreement, and int8 greedy
// output identical for ≥ 16 steps on most fixtures. The fixtures are built to be hard on any
// weight error (scripts/make_fixtures.py: o_proj / down_proj at 32× the usual init, q / k at
// 2×, N(0, 1) tied embeddings, so logits have a spread of ~8 nats): int8's 0.4 % weight error
// already moves log-probabilities by up to ~1 nat there, and int4 with 32-value blocks (~7 %)
// by ~30. Measured with the error-minimising scales of src/gpu/quantize.rs: int8 95.0 %
// (5/10 pairs identical for ≥ 16 steps), int4 49 % (plain absmax scales gave 93.5 % and
// 38 %). scripts/quant_sensitivity.py measures the amplification directly: 1 % Gaussian noise
// on every weight matrix moves these fixtures' logits by 11-16 % of their spread (up to 9
// nats), the trained tiny-shapes model's by 0.8-1.9 % (at most 0.4 nats). These asserts are
// regression floors under those figures; that the quantised kernels
// compute exactly the quantised model is asserted by
// `quantised_engine_matches_host_quantised_checkpoint` (100 % agreement), and the agreement
// on trained weights by `quantised_tiny_shapes_follows_f16`.
const INT8_FLOOR: f64 = 0.93;
const INT8_LONG_PAIRS_FLOOR: usize = 4;
const INT4_FLOOR: f64 = 0.45;
/// Floors for the trained tiny model (`quantised_tiny_shapes_follows_f16`), under the
/// measured top-1 agreement of 99.3 % (int8) and 92.1 % (int4), the targets met on
/// trained weights, and the measured share of answers whose greedy output is identical to
/// f16's, 118/121 (int8) and 100/121 (int4). Its answers are 2-12 tokens, so "identical for
/// ≥ 16 steps" becomes "identical for the whole answer" there.
const SHAPES_INT8_FLOOR: f64 = 0.98;
const SHAPES_INT4_FLOOR: f64 = 0.90;
const SHAPES_INT8_SAME_FLOOR: f64 = 0.95;
const SHAPES_INT4_SAME_FLOOR: f64 = 0.80;

#[test]
fn int8_follows_f16() {
    let rows = measure(WeightFormat::Int8);
    let rate = agreement(&rows);
    assert!(rate >= INT8_FLOOR, "int8 top-1 agreement {rate:.3}");
    let long = rows.iter().filter(|(_, a)| a.prefix >= 16).count();
    assert!(
        long >= INT8_LONG_PAIRS_FLOOR,
        "int8 greedy output identical for >= 16 steps on only {long}/{} fixture pairs",
        rows.len()
    );
}

#[test]
fn int4_follows_f16() {
    let rows = measure(WeightFormat::Int4);
    let rate = agreement(&rows);
    assert!(rate >= INT4_FLOOR, "int4 top-1 agreement {rate:.3}");
}

/// Weights split over 64 KiB bindings give the same tokens as one binding per matrix, and
/// the quantised matrices take about half / a quarter of the f16 bytes.
#[test]
fn quantised_models_run_split_and_are_smaller() {
    let dir = fixtures().join("models/tiny-mqa-f32");
    let (img, file, prompt) = PAIRS[0];
    let opts = GenerateOptions {
        max_new_tokens: 8,
        stop_at_eos: false,
        ..Default::default()
    };
    let mut bytes = Vec::new();
    for format in WeightFormat::ALL {
        let mut ids = Vec::new();
        for limit in [None, Some(64 * 1024)] {
            let g = gpu(limit);
            let before = g.bytes_created();
            let pg = ModelBuilder::new(&dir)
                .gpu(g.clone())
                .weights(format)
                .build()
                .unwrap();
            if limit.is_none() {
                bytes.push(g.bytes_created() - before);
            }
            let px = pixels(&pg, "tiny-mqa-f32", img, file);
            let prompt_ids = pg.prompts().unwrap().encode(prompt).unwrap();
            let out = pg
                .generate_ids(&px, &prompt_ids, &opts, &mut |_| true)
                .unwrap();
            ids.push(out.token_ids);
        }
        assert_eq!(ids[0], ids[1], "{format}: split vs unsplit");
    }
    eprintln!("weight bytes f16 / int8 / int4: {bytes:?}");
    // Norms, biases, the patch and position embeddings stay f16/f32; everything else shrinks.
    assert!(bytes[1] < bytes[0] * 6 / 10, "{bytes:?}");
    assert!(bytes[2] < bytes[1] * 7 / 10, "{bytes:?}");
}

#[test]
fn weight_format_names_parse() {
    for f in WeightFormat::ALL {
        assert_eq!(f.name().parse::<WeightFormat>().unwrap(), f);
        assert_eq!(f.to_string(), f.name());
    }
    assert_eq!("INT8".parse::<WeightFormat>().unwrap(), WeightFormat::Int8);
    let err = "int3".parse::<WeightFormat>().unwrap_err().to_string();
    assert!(
        err.contains("\"int3\"") && err.contains("f16, int8, int4"),
        "{err}"
    );
}

/// `--weights` with an unknown format fails before doing anything, naming the valid ones;
/// a known one runs.
#[test]
fn cli_weights_flag() {
    let model = fixtures().join("models/tiny-mqa-f32");
    let image = fixtures().join("images/astronaut.png");
    let run = |weights: &str| {
        Command::new(env!("CARGO_BIN_EXE_paligemma"))
            .args(["--weights", weights, "generate", "--model"])
            .arg(&model)
            .arg("--image")
            .arg(&image)
            .args(["--prompt", "caption en", "--max-new-tokens", "3", "--json"])
            .output()
            .expect("the binary runs")
    };
    let bad = run("int3");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("int3") && err.contains("f16, int8, int4"),
        "{err}"
    );
    let good = run("int4");
    let err = String::from_utf8_lossy(&good.stderr);
    assert!(good.status.success(), "{err}");
    let json: serde_json::Value = serde_json::from_slice(&good.stdout).unwrap();
    assert_eq!(json["token_ids"].as_array().unwrap().len(), 3, "{json}");
}

/// A LoRA adapter is merged in f32 before quantising: the quantised weight is the merged
/// f16 one up to half a quantisation step.
#[test]
fn lora_is_merged_before_quantising() {
    let gpu = gpu(None);
    let dir = fixtures().join("models/tiny-mqa-f32");
    let adapter = fixtures().join("adapters/tiny-mqa-lora");
    let name = "language_model.model.layers.0.self_attn.q_proj.weight";
    let shape = [128, 64];
    let load = |format: WeightFormat, lora: bool| {
        let mut ck = Checkpoint::open(&dir).unwrap();
        if lora {
            ck.add_adapter(&adapter).unwrap();
        }
        ck.set_weight_format(format);
        let t = ck.matrix(&gpu, name, &shape).unwrap();
        assert_eq!(t.dtype(), format.dtype());
        t.read(&gpu).unwrap()
    };
    let merged = load(WeightFormat::F16, true);
    let base = load(WeightFormat::F16, false);
    for format in [WeightFormat::Int8, WeightFormat::Int4] {
        let q = load(format, true);
        // Every value is within 13 % of its row's largest magnitude of the merged weight (the
        // coarsest scale candidate's half step, or a clipped extreme: src/gpu/quantize.rs),
        // and the quantised matrix is far closer to the merged weights than to the base.
        let (mut to_merged, mut to_base, mut moved) = (0.0f64, 0.0f64, 0);
        for (r, (qr, mr)) in q.chunks(64).zip(merged.chunks(64)).enumerate() {
            let max = mr.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let step = max
                / if format == WeightFormat::Int8 {
                    127.0
                } else {
                    7.0
                };
            for (i, (a, b)) in qr.iter().zip(mr).enumerate() {
                assert!((a - b).abs() <= 0.13 * max, "{format} row {r}");
                let base = base[r * 64 + i];
                to_merged += ((a - b) as f64).powi(2);
                to_base += ((a - base) as f64).powi(2);
                moved += ((b - base).abs() > step) as usize;
            }
        }
        assert!(
            to_merged < 0.25 * to_base,
            "{format}: squared distance to merged {to_merged}, to base {to_base}"
        );
        assert!(
            moved > 100,
            "{format}: the adapter moves {moved} weights by a step"
        );
    }
}

/// Top-1 agreement of `format` with the f16 engine on the trained tiny model
/// (`assets/tiny-shapes`: weights shaped by training, unlike the deliberately sensitive random
/// fixtures above), teacher-forced on the f16 engine's greedy answers to every held-out
/// prompt of `tests/fixtures/shapes`. Returns the agreeing steps, the steps, the answers whose
/// every step agrees (so that the quantised model's own greedy answer is identical) and the
/// answers.
fn shapes_agreement(gpu: &Arc<Gpu>, format: WeightFormat) -> [usize; 4] {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("assets/tiny-shapes");
    let data = root.join("tests/fixtures/shapes");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("shapes.json")).unwrap()).unwrap();
    let f16 = common::load(gpu, &dir);
    let forced = Forced::load(gpu.clone(), &dir, format);
    let opts = GenerateOptions {
        max_new_tokens: meta["max_new_tokens"].as_u64().unwrap() as usize,
        ..Default::default()
    };
    let [mut agree, mut total, mut same, mut answers] = [0; 4];
    for scene in meta["scenes"].as_array().unwrap() {
        let px = f16
            .images
            .load(&data.join(scene["file"].as_str().unwrap()))
            .unwrap();
        for hf in scene["hf"].as_array().unwrap() {
            let ids = f16
                .prompts()
                .unwrap()
                .encode(hf["prompt"].as_str().unwrap())
                .unwrap();
            let base = f16.generate_ids(&px, &ids, &opts, &mut |_| true).unwrap();
            let logits = forced.logits(&px, &ids, &base.token_ids);
            let hits = logits
                .iter()
                .zip(&base.token_ids)
                .filter(|(l, &id)| argmax(l) == id)
                .count();
            agree += hits;
            total += base.token_ids.len();
            same += (hits == base.token_ids.len()) as usize;
            answers += 1;
        }
    }
    [agree, total, same, answers]
}

/// On trained weights the quantised models follow f16 closely (floors under the measured
/// figures, printed with `--nocapture`).
#[test]
fn quantised_tiny_shapes_follows_f16() {
    let gpu = gpu(None);
    for (format, floor, same_floor) in [
        (
            WeightFormat::Int8,
            SHAPES_INT8_FLOOR,
            SHAPES_INT8_SAME_FLOOR,
        ),
        (
            WeightFormat::Int4,
            SHAPES_INT4_FLOOR,
            SHAPES_INT4_SAME_FLOOR,
        ),
    ] {
        let [agree, total, same, answers] = shapes_agreement(&gpu, format);
        let rate = agree as f64 / total as f64;
        eprintln!(
            "{format} tiny-shapes: top-1 agreement {agree}/{total} = {:.1} %, greedy answer \
             identical to f16 on {same}/{answers}",
            100.0 * rate
        );
        assert!(rate >= floor, "{format}: tiny-shapes agreement {rate:.3}");
        let same_rate = same as f64 / answers as f64;
        assert!(
            same_rate >= same_floor,
            "{format}: tiny-shapes identical answers {same}/{answers}"
        );
    }
}

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("paligemma-saved-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    /// A copy of every file of `src` (no subdirectories).
    fn copy_of(tag: &str, src: &Path) -> Self {
        let t = Self::new(tag);
        std::fs::create_dir_all(&t.0).unwrap();
        for entry in std::fs::read_dir(src).unwrap() {
            let p = entry.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, t.0.join(p.file_name().unwrap())).unwrap();
            }
        }
        t
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The name and shape of every tensor of at least two dimensions in `dir/model.safetensors`.
fn matrices(dir: &Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut out: Vec<(String, Vec<usize>)> = meta
        .tensors()
        .into_iter()
        .filter(|(_, info)| info.shape.len() >= 2)
        .map(|(name, info)| (name, info.shape.clone()))
        .collect();
    out.sort();
    out
}

/// The bytes of every chunk of `t`, in order.
fn chunk_bytes(gpu: &Gpu, t: &paligemma::gpu::Tensor) -> Vec<Vec<u8>> {
    t.chunks()
        .iter()
        .map(|c| gpu.read_bytes(&c.buffer, 0, c.buffer.size()).unwrap())
        .collect()
}

/// Every matrix of `names` loaded from `quantised` (a checkpoint `save_quantized` wrote) has
/// the GPU chunks, byte for byte, of `original` quantised at load to `format` (with the LoRA
/// adapter `adapter` merged), unsplit and split over 64 KiB bindings.
fn assert_same_buffers(
    original: &Path,
    adapter: Option<&Path>,
    quantised: &Path,
    format: WeightFormat,
    names: &[(String, Vec<usize>)],
) {
    for limit in [None, Some(64 << 10)] {
        let gpu = gpu(limit);
        let mut at_load = Checkpoint::open(original).unwrap();
        if let Some(adapter) = adapter {
            at_load.add_adapter(adapter).unwrap();
        }
        at_load.set_weight_format(format);
        let saved = Checkpoint::open(quantised).unwrap();
        assert_eq!(saved.stored_format(), Some(format));
        assert_eq!(saved.weight_format(), format);
        for (name, shape) in names {
            let a = at_load.matrix(&gpu, name, shape).unwrap();
            let b = saved.matrix(&gpu, name, shape).unwrap();
            assert_eq!(a.dtype(), b.dtype(), "{name}");
            assert_eq!(a.row_stride(), b.row_stride(), "{name}");
            assert_eq!(a.chunks().len(), b.chunks().len(), "{name} {limit:?}");
            assert_eq!(
                chunk_bytes(&gpu, &a),
                chunk_bytes(&gpu, &b),
                "{format} {name}, binding limit {limit:?}"
            );
        }
    }
}

/// `save_quantized` (`paligemma quantize`) writes tiny-shapes' matrices packed: loading the
/// file gives the GPU buffers, byte for byte, and the greedy tokens of quantising at load,
/// with progress reported to the end, in far fewer bytes than the source.
#[test]
fn saved_quantised_checkpoint_loads_as_quantising_at_load() {
    let src = common::shapes_model();
    let names = matrices(&src);
    for format in [WeightFormat::Int8, WeightFormat::Int4] {
        let out = TempDir::new(format.name());
        let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = reports.clone();
        let saved = paligemma::model::save_quantized(&src, &out.0, format, None, move |p| {
            sink.lock().unwrap().push((p.bytes_done, p.bytes_total));
        })
        .unwrap();
        // 2-D and 4-D tensors but the patch and position embeddings are packed.
        assert_eq!(saved.quantized, names.len() - 2, "{format}");
        assert_eq!(saved.path, out.0.join("model.safetensors"));
        assert_eq!(
            saved.bytes,
            std::fs::metadata(&saved.path).unwrap().len(),
            "{format}"
        );
        let ratio = saved.bytes as f64 / saved.source_bytes as f64;
        eprintln!(
            "{format}: {} bytes from {} ({ratio:.3}), {} packed, {} copied",
            saved.bytes, saved.source_bytes, saved.quantized, saved.copied
        );
        let most = if format == WeightFormat::Int8 {
            0.6
        } else {
            0.4
        };
        assert!(ratio < most, "{format}: {ratio}");
        for file in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
            assert!(saved.files.iter().any(|f| f == file), "{file} not copied");
            assert_eq!(
                std::fs::read(out.0.join(file)).unwrap(),
                std::fs::read(src.join(file)).unwrap()
            );
        }
        assert!(!out.0.join("model.safetensors.partial").exists());
        let reports = reports.lock().unwrap();
        let last = *reports.last().unwrap();
        assert_eq!(last, (saved.source_bytes, saved.source_bytes), "{format}");
        assert!(reports.windows(2).all(|w| w[0].0 <= w[1].0));

        assert_same_buffers(&src, None, &out.0, format, &names);

        let gpu = gpu(None);
        let before = gpu.bytes_created();
        let at_load = ModelBuilder::new(&src)
            .gpu(gpu.clone())
            .weights(format)
            .build()
            .unwrap();
        let at_load_bytes = gpu.bytes_created() - before;
        let loads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = loads.clone();
        let before = gpu.bytes_created();
        let from_file = ModelBuilder::new(&out.0)
            .gpu(gpu.clone())
            .on_progress(move |p| sink.lock().unwrap().push((p.bytes_done, p.bytes_total)))
            .build()
            .unwrap();
        assert_eq!(gpu.bytes_created() - before, at_load_bytes, "{format}");
        let (done, total) = *loads.lock().unwrap().last().unwrap();
        assert_eq!(
            (done, total),
            (total, saved.bytes - 8 - header_len(&saved.path))
        );
        let opts = GenerateOptions {
            max_new_tokens: 12,
            ..Default::default()
        };
        for scene in [0, 3, 5] {
            let px = at_load.images.load(&common::scene(scene)).unwrap();
            for prompt in ["caption en", "answer en how many shapes?", "detect circle"] {
                let ids = at_load.prompts().unwrap().encode(prompt).unwrap();
                let a = at_load
                    .generate_ids(&px, &ids, &opts, &mut |_| true)
                    .unwrap();
                let b = from_file
                    .generate_ids(&px, &ids, &opts, &mut |_| true)
                    .unwrap();
                assert!(!a.token_ids.is_empty());
                assert_eq!(
                    a.token_ids, b.token_ids,
                    "{format} scene {scene} {prompt:?}"
                );
            }
        }
    }
}

/// The length of the JSON header of a safetensors file.
fn header_len(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

/// Rows whose width is not a multiple of 16 (int8) or 32 (int4) are padded in the file as on
/// the GPU, and a LoRA adapter given to `save_quantized` is merged before quantising, as at
/// load.
#[test]
fn saved_checkpoint_pads_ragged_rows_and_merges_lora() {
    let fixture = fixtures().join("models/tiny-mqa-f32");
    let adapter = fixtures().join("adapters/tiny-mqa-lora");
    let src = TempDir::copy_of("ragged-src", &fixture);
    let bytes = std::fs::read(fixture.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ragged: Vec<f32> = (0..5 * 37).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut views: Vec<(String, TensorView)> = st.tensors();
    views.push((
        "extra.weight".into(),
        TensorView::new(Dtype::F32, vec![5, 37], bytemuck::cast_slice(&ragged)).unwrap(),
    ));
    safetensors::serialize_to_file(views, None, &src.0.join("model.safetensors")).unwrap();
    let names = vec![
        ("extra.weight".to_string(), vec![5, 37]),
        (
            "language_model.model.layers.0.self_attn.q_proj.weight".to_string(),
            vec![128, 64],
        ),
        (
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight".to_string(),
            vec![96, 48],
        ),
    ];
    for format in [WeightFormat::Int8, WeightFormat::Int4] {
        let out = TempDir::new(&format!("ragged-{format}"));
        paligemma::model::save_quantized(&src.0, &out.0, format, Some(&adapter), |_| {}).unwrap();
        assert_same_buffers(&src.0, Some(&adapter), &out.0, format, &names);
    }
}

/// Rewrite `dir/model.safetensors` with its tensors unchanged and `metadata` as its
/// `__metadata__`.
fn set_metadata(dir: &Path, metadata: &[(&str, &str)]) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let meta = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize_to_file(st.tensors(), Some(meta), &path).unwrap();
}

/// Truncated, corrupt and unknown quantised files, format mismatches, adapters on quantised
/// weights and bad destinations give errors naming the file or tensor, never a panic.
#[test]
fn bad_quantised_checkpoints_are_explained() {
    let src = common::shapes_model();
    let good = TempDir::new("good");
    paligemma::model::save_quantized(&src, &good.0, WeightFormat::Int8, None, |_| {}).unwrap();
    let gpu = gpu(None);
    let load = |dir: &Path| {
        ModelBuilder::new(dir)
            .gpu(gpu.clone())
            .build()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let file = |dir: &TempDir| dir.0.join("model.safetensors").display().to_string();
    let has = |err: &str, needles: &[&str]| {
        for n in needles {
            assert!(err.contains(n), "{err:?} lacks {n:?}");
        }
    };

    let truncated = TempDir::copy_of("truncated", &good.0);
    let path = truncated.0.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 1000).unwrap();
    drop(f);
    has(
        &load(&truncated.0),
        &[&file(&truncated), "not a valid safetensors file"],
    );

    let corrupt = TempDir::copy_of("corrupt", &good.0);
    let path = corrupt.0.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = b'#';
    std::fs::write(&path, &bytes).unwrap();
    has(
        &load(&corrupt.0),
        &[&file(&corrupt), "not a valid safetensors file"],
    );

    // A scale of NaN (int8 scales are f32).
    let nan = TempDir::copy_of("nan", &good.0);
    let path = nan.0.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let (header, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let name = "language_model.model.layers.1.mlp.up_proj.weight_scale";
    let at = 8 + header + meta.info(name).unwrap().data_offsets.0 + 4 * 7;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    has(&load(&nan.0), &[name, &file(&nan), "scale 7 is not finite"]);

    let unknown = TempDir::copy_of("unknown", &good.0);
    set_metadata(
        &unknown.0,
        &[
            ("paligemma.weights", "int3"),
            ("paligemma.layout_version", "1"),
        ],
    );
    has(
        &load(&unknown.0),
        &[
            &file(&unknown),
            "paligemma.weights is \"int3\"",
            "int8, int4",
        ],
    );
    let version = TempDir::copy_of("version", &good.0);
    set_metadata(
        &version.0,
        &[
            ("paligemma.weights", "int8"),
            ("paligemma.layout_version", "2"),
        ],
    );
    has(
        &load(&version.0),
        &[&file(&version), "\"2\"", "layout version 1"],
    );
    let unversioned = TempDir::copy_of("unversioned", &good.0);
    set_metadata(&unversioned.0, &[("paligemma.weights", "int8")]);
    has(
        &load(&unversioned.0),
        &[&file(&unversioned), "paligemma.layout_version is missing"],
    );
    // Packed tensors without the metadata are not weights of any float dtype.
    let plain = TempDir::copy_of("plain", &good.0);
    set_metadata(&plain.0, &[]);
    has(&load(&plain.0), &["has dtype U8", "only F32, BF16 and F16"]);

    let err = ModelBuilder::new(&good.0)
        .gpu(gpu.clone())
        .weights(WeightFormat::Int4)
        .build()
        .err()
        .unwrap()
        .to_string();
    has(
        &err,
        &[
            &good.0.display().to_string(),
            "quantised to int8",
            "not as int4",
        ],
    );
    assert!(ModelBuilder::new(&good.0)
        .gpu(gpu.clone())
        .weights(WeightFormat::Int8)
        .build()
        .is_ok());
    let err = ModelBuilder::new(&good.0)
        .gpu(gpu.clone())
        .adapter(fixtures().join("adapters/tiny-mqa-lora"))
        .build()
        .err()
        .unwrap()
        .to_string();
    has(&err, &["already quantised to int8", "quantize --adapter"]);

    let save = |src: &Path, out: &Path, format| {
        paligemma::model::save_quantized(src, out, format, None, |_| {})
            .unwrap_err()
            .to_string()
    };
    let fresh = TempDir::new("fresh");
    has(
        &save(&src, &fresh.0, WeightFormat::F16),
        &["int8 or int4 weights, not f16"],
    );
    has(
        &save(&src, &good.0, WeightFormat::Int4),
        &[&good.0.display().to_string(), "is not empty"],
    );
    has(
        &save(&good.0, &fresh.0, WeightFormat::Int4),
        &["already quantised to int8"],
    );
    assert!(!fresh.0.exists());
}

/// `paligemma quantize` then `generate` on its output answers as `--weights int4` on the
/// original; a mismatched `--weights` and a missing one are explained.
#[test]
fn cli_quantize_then_generate() {
    let src = common::shapes_model();
    let out = TempDir::new("cli");
    let bin = || Command::new(env!("CARGO_BIN_EXE_paligemma"));
    let quantize = |weights: &[&str]| {
        bin()
            .args(weights)
            .args(["quantize", "--model"])
            .arg(&src)
            .arg("--out")
            .arg(&out.0)
            .output()
            .unwrap()
    };
    let missing = quantize(&[]);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && !err.contains("panicked"),
        "{err}"
    );
    assert!(
        err.contains("quantize needs --weights int8 or --weights int4"),
        "{err}"
    );
    let done = quantize(&["--weights", "int4"]);
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{err}");
    assert!(err.contains("matrices packed as int4"), "{err}");
    let generate = |model: &Path, weights: &[&str]| {
        bin()
            .args(weights)
            .args(["generate", "--model"])
            .arg(model)
            .arg("--image")
            .arg(common::scene(3))
            .args(["--prompt", "caption en", "--json"])
            .output()
            .unwrap()
    };
    let ids = |o: &std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        json["token_ids"].clone()
    };
    let at_load = ids(&generate(&src, &["--weights", "int4"]));
    assert_eq!(ids(&generate(&out.0, &[])), at_load);
    assert_eq!(ids(&generate(&out.0, &["--weights", "int4"])), at_load);
    let wrong = generate(&out.0, &["--weights", "f16"]);
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && !err.contains("panicked"),
        "{err}"
    );
    assert!(err.contains("loads only as int4, not as f16"), "{err}");
}
