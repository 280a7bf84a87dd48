//! Reading safetensors checkpoints: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped, with f32 / bf16 / f16 tensors converted to
//! f16 one binding-chunk at a time (never a full f32 copy in RAM).
//!
//! A checkpoint written by `paligemma quantize` ([`save_quantized`], format in [`packed`])
//! holds the weight matrices already packed in the GPU layout of int8 or int4; they are
//! copied to the GPU as they are.
//!
//! Tensor names are normalised to the published (transformers 4.x / Hub) layout, so
//! `vision_tower.*` and `model.vision_tower.*` saved by transformers 5 resolve to
//! `vision_tower.vision_model.*`, and `model.language_model.*` to `language_model.model.*`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::builder::{CancelToken, LoadProgress};
use crate::gpu::{DType, Gpu, Tensor};
use crate::{Error, Result};

mod packed;

pub use packed::{save_quantized, SavedCheckpoint, FORMAT_KEY, LAYOUT_KEY, LAYOUT_VERSION};

/// How weight matrices are stored on the GPU, chosen at load time (`--weights`). Quantised
/// formats are computed from the checkpoint's values in f32 (after any LoRA merge) and never
/// expanded in memory; the kernels dequantise as they read (layouts in
/// [`crate::gpu::quantize`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// 16-bit floats (2 bytes a weight).
    #[default]
    F16,
    /// 8-bit integers, one f32 scale per output channel (≈1 byte a weight).
    Int8,
    /// 4-bit integers, one f16 scale per 32 values along a row (0.5625 bytes a weight).
    Int4,
}

impl WeightFormat {
    /// Every format, in order of size.
    pub const ALL: [WeightFormat; 3] = [WeightFormat::F16, WeightFormat::Int8, WeightFormat::Int4];

    /// The name used on the command line: `f16`, `int8` or `int4`.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F16 => "f16",
            WeightFormat::Int8 => "int8",
            WeightFormat::Int4 => "int4",
        }
    }

    /// Bytes a weight takes on the GPU, scales included (int8's per-row f32 scale, under 0.4 %
    /// for rows of 1152 and more, is left out).
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            WeightFormat::F16 => 2.0,
            WeightFormat::Int8 => 1.0,
            WeightFormat::Int4 => 0.5 + 2.0 / 32.0,
        }
    }

    /// The tensor storage type of matrices in this format.
    pub fn dtype(self) -> DType {
        match self {
            WeightFormat::F16 => DType::F16,
            WeightFormat::Int8 => DType::Q8,
            WeightFormat::Int4 => DType::Q4,
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = Error;

    /// Parse `f16`, `int8` or `int4` (any case).
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
                Error::Request(format!(
                    "unknown weight format {s:?}; the formats are {}",
                    names.join(", ")
                ))
            })
    }
}

struct Entry {
    file: usize,
    original: String,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An open checkpoint directory, or a synthetic one that makes up random weights of any
/// requested shape (benchmarks and full-size shape tests without a file).
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, Entry>,
    synthetic: Option<u64>,
    progress: Mutex<Option<Reporter>>,
    cancel: Option<CancelToken>,
    lora: HashMap<String, LoraDelta>,
    format: WeightFormat,
    /// The format `paligemma quantize` packed the matrices in, if it wrote this checkpoint.
    stored: Option<WeightFormat>,
}

/// The progress of one load: the file bytes of the tensors it will read, counted off as they
/// are converted and uploaded.
struct Reporter {
    callback: Box<dyn FnMut(&LoadProgress) + Send>,
    /// Tensors (canonical names) not yet fully counted, with their bytes left.
    pending: HashMap<String, u64>,
    done: u64,
    total: u64,
}

impl Reporter {
    /// Count up to `bytes` more of tensor `name` as done and report it.
    fn advance(&mut self, name: &str, bytes: u64) {
        let Some(left) = self.pending.get_mut(name) else {
            return;
        };
        let step = bytes.min(*left);
        *left -= step;
        if *left == 0 {
            self.pending.remove(name);
        }
        if step > 0 {
            self.done += step;
            (self.callback)(&LoadProgress {
                bytes_done: self.done,
                bytes_total: self.total,
                tensor: name.to_string(),
            });
        }
    }
}

/// A LoRA update `W += scale · B · A` for one weight, kept in f32 on the host.
struct LoraDelta {
    /// `[rank, in]`.
    a: Vec<f32>,
    /// `[out, rank]`.
    b: Vec<f32>,
    rank: usize,
    scale: f32,
}

/// Deterministic values in [-scale, scale) for synthetic weights, from a name and a seed.
struct SyntheticValues(u64);

impl SyntheticValues {
    fn new(name: &str, seed: u64, row: usize) -> Self {
        let mut h = seed ^ 0xCBF2_9CE4_8422_2325;
        for b in name.bytes().chain(row.to_le_bytes()) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01B3);
        }
        SyntheticValues(h | 1)
    }

    fn next(&mut self, scale: f32) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
    }
}

/// Map a tensor name as saved by any transformers version to the published layout.
pub fn canonical_name(name: &str) -> String {
    let name = match name.strip_prefix("model.") {
        Some(rest)
            if ["vision_tower.", "multi_modal_projector.", "language_model."]
                .iter()
                .any(|p| rest.starts_with(p)) =>
        {
            rest
        }
        _ => name,
    };
    if let Some(rest) = name.strip_prefix("vision_tower.") {
        if !rest.starts_with("vision_model.") {
            return format!("vision_tower.vision_model.{rest}");
        }
    }
    if let Some(rest) = name.strip_prefix("language_model.") {
        if !rest.starts_with("model.") && !rest.starts_with("lm_head.") {
            return format!("language_model.model.{rest}");
        }
    }
    name.to_string()
}

/// Tensors that stay f16 in every weight format: small (0.7 M and 0.3 M values at 224 px)
/// and feeding every image token, so their precision matters more than their size.
const KEPT_F16: [&str; 2] = [
    "embeddings.patch_embedding.weight",
    "embeddings.position_embedding.weight",
];

/// Whether the weight `name` of `shape` is stored in the load's weight format (quantised with
/// int8 / int4): every matrix but the patch and position embeddings. Vectors (norms, biases)
/// are always f32 on the GPU.
pub fn quantizable(name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2 && !KEPT_F16.iter().any(|k| name.ends_with(k))
}

/// Converted checkpoint bytes are dropped from the process's memory in pieces of this size.
const RELEASE_BYTES: usize = 16 << 20;

fn map_file(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the checkpoint is opened read-only; as with every mmap-based loader, a file
    // truncated by another process while mapped is outside what we can guard against.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// The weights one matrix is made of, their rows one after the other (see
/// [`Checkpoint::matrix_cat`]).
struct Parts<'a> {
    names: Vec<&'a str>,
    shapes: Vec<&'a [usize]>,
    /// The first row of each part in the matrix, and the total at the end.
    starts: Vec<usize>,
    rows: usize,
    cols: usize,
}

impl<'a> Parts<'a> {
    /// `parts` is not empty, every shape has at least two dimensions and the same columns.
    fn new(parts: &[(&'a str, &'a [usize])]) -> Self {
        let mut starts = vec![0];
        for (_, shape) in parts {
            starts.push(starts[starts.len() - 1] + shape[0]);
        }
        Parts {
            names: parts.iter().map(|p| p.0).collect(),
            shapes: parts.iter().map(|p| p.1).collect(),
            rows: starts[parts.len()],
            starts,
            cols: parts[0].1[1..].iter().product(),
        }
    }

    /// The part holding matrix row `r`, and the row within it.
    fn locate(&self, r: usize) -> (usize, usize) {
        let p = self.starts.partition_point(|&s| s <= r) - 1;
        (p, r - self.starts[p])
    }
}

impl Checkpoint {
    /// Open `dir/model.safetensors`, or the shards named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Model(format!(
                "{} is not a directory (expected a checkpoint folder with config.json and *.safetensors)",
                dir.display()
            )));
        }
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let shard_names: Vec<String> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Model(format!("{}: {e}", index.display())))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Model(format!("{}: no weight_map", index.display())))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names
        } else if single.is_file() {
            vec!["model.safetensors".into()]
        } else {
            return Err(Error::Model(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )));
        };
        let mut files = Vec::new();
        let mut tensors: HashMap<String, Entry> = HashMap::new();
        // The stored format of the first shard; every other shard must agree.
        let mut stored: Option<Option<WeightFormat>> = None;
        for shard in shard_names {
            let path = dir.join(&shard);
            let mmap = map_file(&path)?;
            let (header, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                Error::Model(format!(
                    "{}: not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
            let format = packed::stored_format(&path, meta.metadata().as_ref())?;
            match stored {
                Some(first) if first != format => {
                    return Err(Error::Model(format!(
                        "{}: stored as {}, but the checkpoint's first shard as {}",
                        path.display(),
                        format.map_or("f16/f32", WeightFormat::name),
                        first.map_or("f16/f32", WeightFormat::name)
                    )))
                }
                _ => stored = Some(format),
            }
            let base = 8 + header;
            for (name, info) in meta.tensors() {
                let canonical = canonical_name(&name);
                let entry = Entry {
                    file: files.len(),
                    original: name.clone(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                };
                if let Some(prev) = tensors.insert(canonical.clone(), entry) {
                    return Err(Error::Model(format!(
                        "{}: tensors `{}` and `{name}` both map to `{canonical}`",
                        dir.display(),
                        prev.original
                    )));
                }
            }
            files.push((path, mmap));
        }
        let stored = stored.flatten();
        Ok(Checkpoint {
            files,
            tensors,
            synthetic: None,
            progress: Mutex::new(None),
            cancel: None,
            lora: HashMap::new(),
            format: stored.unwrap_or_default(),
            stored,
        })
    }

    /// A checkpoint that has every tensor, of whatever shape is asked, filled with seeded
    /// random values: matrices uniform in ±1/√cols, vectors in ±0.1.
    pub fn synthetic(seed: u64) -> Self {
        Checkpoint {
            files: Vec::new(),
            tensors: HashMap::new(),
            synthetic: Some(seed),
            progress: Mutex::new(None),
            cancel: None,
            lora: HashMap::new(),
            format: WeightFormat::F16,
            stored: None,
        }
    }

    /// Merge the LoRA adapter in `dir` (as written by PEFT: `adapter_config.json` and
    /// `adapter_model.safetensors`) into the weights as they load: `W += (alpha / r) · B · A`
    /// (`alpha / √r` with `use_rslora`), computed in f32 before rounding to f16.
    pub fn add_adapter(&mut self, dir: &Path) -> Result<()> {
        if let Some(stored) = self.stored {
            return Err(Error::Model(format!(
                "the LoRA adapter {} cannot be merged into weights already quantised to {stored}; \
                 merge it when quantising (`paligemma quantize --adapter`)",
                dir.display()
            )));
        }
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: {e}", cfg_path.display())))?;
        let bad = |msg: String| Error::Model(format!("{}: {msg}", cfg_path.display()));
        let peft_type = cfg
            .get("peft_type")
            .and_then(|v| v.as_str())
            .unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(bad(format!(
                "peft_type {peft_type:?} is not supported (only LORA)"
            )));
        }
        let r = cfg
            .get("r")
            .and_then(|v| v.as_u64())
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
        let alpha = cfg
            .get("lora_alpha")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| bad("`lora_alpha` is missing".into()))? as f32;
        let rslora = cfg
            .get("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        for key in ["rank_pattern", "alpha_pattern"] {
            if cfg
                .get(key)
                .and_then(|v| v.as_object())
                .is_some_and(|m| !m.is_empty())
            {
                return Err(bad(format!("per-module `{key}` is not supported")));
            }
        }
        for key in ["fan_in_fan_out", "use_dora"] {
            if cfg.get(key).and_then(|v| v.as_bool()) == Some(true) {
                return Err(bad(format!("`{key}` adapters are not supported")));
            }
        }
        let scale = if rslora {
            alpha / (r as f32).sqrt()
        } else {
            alpha / r as f32
        };

        let weights_path = dir.join("adapter_model.safetensors");
        let mmap = map_file(&weights_path)?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| {
            Error::Model(format!(
                "{}: not a valid safetensors file: {e}",
                weights_path.display()
            ))
        })?;
        let read = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let view = st
                .tensor(name)
                .map_err(|e| Error::tensor(name, e.to_string()))?;
            if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(Error::tensor(
                    name,
                    format!("dtype {:?} is not supported", view.dtype()),
                ));
            }
            let mut out = vec![0.0f32; view.shape().iter().product()];
            Self::convert(view.dtype(), view.data(), &mut out, |x| x, f16::to_f32);
            Ok((view.shape().to_vec(), out))
        };
        let mut count = 0;
        for name in st.names() {
            let Some(module) = name.strip_suffix(".lora_A.weight") else {
                if !name.ends_with(".lora_B.weight") {
                    return Err(Error::tensor(
                        name,
                        "is neither a lora_A nor a lora_B weight (adapters with bias or                          modules_to_save are not supported)",
                    ));
                }
                continue;
            };
            let module = module.strip_prefix("base_model.model.").unwrap_or(module);
            let target = canonical_name(&format!("{module}.weight"));
            let (a_shape, a) = read(name)?;
            let b_name = name.replace(".lora_A.weight", ".lora_B.weight");
            let (b_shape, b) = read(&b_name)?;
            let base = self.tensors.get(&target).ok_or_else(|| {
                Error::tensor(
                    name,
                    format!("targets `{target}`, which the model does not have"),
                )
            })?;
            let (out, inp) = (base.shape[0], base.shape[1..].iter().product::<usize>());
            if a_shape != [r, inp] || b_shape != [out, r] {
                return Err(Error::tensor(
                    name,
                    format!(
                        "lora_A {a_shape:?} / lora_B {b_shape:?} do not fit rank {r} and `{target}` {:?}",
                        base.shape
                    ),
                ));
            }
            self.lora.insert(
                target,
                LoraDelta {
                    a,
                    b,
                    rank: r,
                    scale,
                },
            );
            count += 1;
        }
        if count == 0 {
            return Err(Error::Model(format!(
                "{}: no LoRA weights found",
                weights_path.display()
            )));
        }
        log::info!(
            "adapter {}: {count} LoRA updates, scale {scale}",
            dir.display()
        );
        Ok(())
    }

    /// Report the loading of the tensors for which `in_scope(canonical name)` holds to
    /// `callback`: bytes of the checkpoint files converted and uploaded so far, out of those
    /// tensors' total, every [`RELEASE_BYTES`] and at the end of each tensor. Synthetic
    /// checkpoints report nothing.
    pub(crate) fn report_progress(
        &mut self,
        in_scope: impl Fn(&str) -> bool,
        callback: Box<dyn FnMut(&LoadProgress) + Send>,
    ) {
        let pending: HashMap<String, u64> = self
            .tensors
            .iter()
            .filter(|(name, _)| in_scope(name))
            .map(|(name, e)| (name.clone(), (e.end - e.start) as u64))
            .collect();
        let total = pending.values().sum();
        *self.progress.get_mut().expect("progress lock") = Some(Reporter {
            callback,
            pending,
            done: 0,
            total,
        });
    }

    /// Make every tensor read fail with [`Error::Cancelled`] once `token` is cancelled
    /// (checked before each tensor and every [`RELEASE_BYTES`] within one).
    pub(crate) fn set_cancel(&mut self, token: CancelToken) {
        self.cancel = Some(token);
    }

    /// End the progress report: tensors in scope that the model did not read count as done,
    /// so the last report is exactly the total (its tensor name empty if it counted such
    /// tensors).
    pub(crate) fn finish_progress(&self) {
        let mut progress = self.progress.lock().expect("progress lock");
        if let Some(r) = progress.as_mut() {
            let left: u64 = r.pending.drain().map(|(_, b)| b).sum();
            if left > 0 {
                r.done += left;
                (r.callback)(&LoadProgress {
                    bytes_done: r.done,
                    bytes_total: r.total,
                    tensor: String::new(),
                });
            }
        }
    }

    fn advance(&self, name: &str, bytes: u64) {
        if let Some(r) = self.progress.lock().expect("progress lock").as_mut() {
            r.advance(name, bytes);
        }
    }

    fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(token) if token.is_cancelled() => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }

    /// Whether a tensor exists (by canonical name).
    pub fn contains(&self, name: &str) -> bool {
        self.synthetic.is_some() || self.tensors.contains_key(name)
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let e = self.tensors.get(name).ok_or_else(|| {
            Error::tensor(
                name,
                format!(
                    "missing from the checkpoint in {}",
                    self.files[0].0.parent().unwrap_or(Path::new(".")).display()
                ),
            )
        })?;
        if e.shape != shape {
            return Err(Error::tensor(
                &e.original,
                format!("has shape {:?}, the config implies {shape:?}", e.shape),
            ));
        }
        if !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(Error::tensor(
                &e.original,
                format!(
                    "has dtype {:?}; only F32, BF16 and F16 are supported",
                    e.dtype
                ),
            ));
        }
        Ok(e)
    }

    fn bytes(&self, e: &Entry) -> &[u8] {
        &self.files[e.file].1[e.start..e.end]
    }

    /// Convert `src` (little-endian values of `dtype`) into `dst`.
    fn convert<T>(
        dtype: Dtype,
        src: &[u8],
        dst: &mut [T],
        from_f32: impl Fn(f32) -> T,
        from_f16: impl Fn(f16) -> T,
    ) {
        match dtype {
            Dtype::F32 => {
                for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                }
            }
            Dtype::BF16 => {
                for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = from_f32(bf16::from_le_bytes([c[0], c[1]]).to_f32());
                }
            }
            _ => {
                for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = from_f16(f16::from_le_bytes([c[0], c[1]]));
                }
            }
        }
    }

    /// Store the matrices loaded from now on by [`Checkpoint::matrix`] in `format` (by
    /// default f16, or the format a checkpoint written by [`save_quantized`] stores; such a
    /// checkpoint loads in that format only).
    pub fn set_weight_format(&mut self, format: WeightFormat) {
        self.format = format;
    }

    /// The format [`Checkpoint::matrix`] stores matrices in.
    pub fn weight_format(&self) -> WeightFormat {
        self.format
    }

    /// The format the matrices are stored in if [`save_quantized`] (`paligemma quantize`)
    /// wrote this checkpoint; `None` for a checkpoint of f32 / bf16 / f16 values.
    pub fn stored_format(&self) -> Option<WeightFormat> {
        self.stored
    }

    /// Load a weight as a matrix `[shape[0], product of the rest]` (a conv kernel
    /// `[out, c, kh, kw]` becomes `[out, c·kh·kw]`), checking it has exactly `shape`: in the
    /// checkpoint's weight format (see [`Checkpoint::set_weight_format`]), except the
    /// tensors [`quantizable`] keeps in f16.
    pub fn matrix(&self, gpu: &Gpu, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.matrix_cat(gpu, name, &[(name, shape)])
    }

    /// Load several weights of the same width as one matrix named `label`, the rows of
    /// `parts[0]` first, then those of `parts[1]`, and so on (a decoder layer's q, k and v
    /// projections become one launch). Each part is loaded and checked as
    /// [`Checkpoint::matrix`] loads it (its LoRA update included); all must share one
    /// storage format.
    pub fn matrix_cat(&self, gpu: &Gpu, label: &str, parts: &[(&str, &[usize])]) -> Result<Tensor> {
        self.check_cancel()?;
        let Some(&(first, first_shape)) = parts.first() else {
            return Err(Error::tensor(label, "is made of no weights"));
        };
        let keep = !quantizable(first, first_shape);
        let cols = |shape: &[usize]| shape[1..].iter().product::<usize>();
        for &(name, shape) in parts {
            if shape.len() < 2 || cols(shape) != cols(first_shape) {
                return Err(Error::tensor(
                    name,
                    format!("of shape {shape:?} cannot join {first} {first_shape:?} in {label}"),
                ));
            }
            if quantizable(name, shape) == keep {
                return Err(Error::tensor(
                    name,
                    format!("is stored in another format than {first}, so it cannot join {label}"),
                ));
            }
        }
        let parts = Parts::new(parts);
        if keep {
            return self.matrix_as(gpu, label, &parts, WeightFormat::F16);
        }
        match self.stored {
            Some(stored) if stored == self.format => self.packed_matrix(gpu, label, &parts, stored),
            Some(stored) => Err(Error::tensor(
                first,
                format!(
                    "is stored as {stored} (written by paligemma quantize) and loads only as \
                     {stored}, not as {}",
                    self.format
                ),
            )),
            None => self.matrix_as(gpu, label, &parts, self.format),
        }
    }

    fn matrix_as(
        &self,
        gpu: &Gpu,
        label: &str,
        parts: &Parts,
        format: WeightFormat,
    ) -> Result<Tensor> {
        let (rows, cols) = (parts.rows, parts.cols);
        let dims = [rows, cols];
        if let Some(seed) = self.synthetic {
            let scale = (cols as f32).powf(-0.5);
            let row = |r: usize, dst: &mut [f32]| {
                let (p, lr) = parts.locate(r);
                self.before_row(parts.names[p], None, lr, cols * 4)?;
                let mut v = SyntheticValues::new(parts.names[p], seed, lr);
                dst.iter_mut().for_each(|d| *d = v.next(scale));
                Ok(())
            };
            return match format {
                WeightFormat::F16 => Tensor::weight_f16(gpu, label, &dims, |r, dst| {
                    let (p, lr) = parts.locate(r);
                    self.before_row(parts.names[p], None, lr, cols * 2)?;
                    let mut v = SyntheticValues::new(parts.names[p], seed, lr);
                    dst.iter_mut()
                        .for_each(|d| *d = f16::from_f32(v.next(scale)));
                    Ok(())
                }),
                _ => Tensor::weight_quantized(gpu, label, &dims, format.dtype(), row),
            };
        }
        let entries = parts
            .names
            .iter()
            .zip(&parts.shapes)
            .map(|(name, shape)| self.entry(name, shape))
            .collect::<Result<Vec<_>>>()?;
        let loras: Vec<_> = parts.names.iter().map(|n| self.lora.get(*n)).collect();
        let elem = |e: &Entry| if e.dtype == Dtype::F32 { 4 } else { 2 };
        let t = match format {
            WeightFormat::F16 => {
                let mut row = vec![0.0f32; cols];
                Tensor::weight_f16(gpu, label, &dims, |r, dst| {
                    let (p, lr) = parts.locate(r);
                    let (e, lora) = (entries[p], loras[p]);
                    let elem = elem(e);
                    self.before_row(parts.names[p], Some(e), lr, cols * elem)?;
                    match lora {
                        None => {
                            let src = &self.bytes(e)[lr * cols * elem..(lr + 1) * cols * elem];
                            Self::convert(e.dtype, src, dst, f16::from_f32, |h| h);
                        }
                        Some(_) => {
                            self.row_f32(e, lora, lr, &mut row);
                            for (o, w) in dst.iter_mut().zip(&row) {
                                *o = f16::from_f32(*w);
                            }
                        }
                    }
                    Ok(())
                })?
            }
            _ => Tensor::weight_quantized(gpu, label, &dims, format.dtype(), |r, dst| {
                let (p, lr) = parts.locate(r);
                let e = entries[p];
                self.before_row(parts.names[p], Some(e), lr, cols * elem(e))?;
                self.row_f32(e, loras[p], lr, dst);
                Ok(())
            })?,
        };
        for (name, e) in parts.names.iter().zip(&entries) {
            self.advance(name, (e.end - e.start) as u64);
            self.release(e, e.start, e.end);
        }
        Ok(t)
    }

    /// Row `r` of the matrix in entry `e` (`dst.len()` columns) in f32, with the LoRA update
    /// `lora` added.
    fn row_f32(&self, e: &Entry, lora: Option<&LoraDelta>, r: usize, dst: &mut [f32]) {
        let cols = dst.len();
        let elem = if e.dtype == Dtype::F32 { 4 } else { 2 };
        let src = &self.bytes(e)[r * cols * elem..(r + 1) * cols * elem];
        Self::convert(e.dtype, src, dst, |x| x, f16::to_f32);
        if let Some(d) = lora {
            for k in 0..d.rank {
                let coef = d.scale * d.b[r * d.rank + k];
                for (w, a) in dst.iter_mut().zip(&d.a[k * cols..(k + 1) * cols]) {
                    *w += coef * a;
                }
            }
        }
    }

    /// Called before row `r` (of `row_bytes` bytes in the file) of matrix `name` is read:
    /// every [`RELEASE_BYTES`], drop the rows already converted of the checkpoint entry `e`
    /// (see [`Checkpoint::release`]), report them and check for cancellation.
    fn before_row(&self, name: &str, e: Option<&Entry>, r: usize, row_bytes: usize) -> Result<()> {
        let every = (RELEASE_BYTES / row_bytes).max(1);
        if r > 0 && r.is_multiple_of(every) {
            if let Some(e) = e {
                self.release(
                    e,
                    e.start + (r - every) * row_bytes,
                    e.start + r * row_bytes,
                );
            }
            self.advance(name, (every * row_bytes) as u64);
            self.check_cancel()?;
        }
        Ok(())
    }

    /// Drop the file pages of bytes `start..end` of a checkpoint file that are now on the GPU
    /// from this process's memory (they stay in the OS page cache and fault back in if read
    /// again), so that host memory holds the GPU copy of the model, not also the mapped
    /// checkpoint.
    fn release(&self, e: &Entry, start: usize, end: usize) {
        #[cfg(unix)]
        {
            let map = &self.files[e.file].1;
            // SAFETY: the mapping is private and read-only, so MADV_DONTNEED only discards
            // clean pages; later reads see the file's contents again. Failure is harmless.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
        #[cfg(not(unix))]
        let _ = (e, start, end);
    }

    /// Read a tensor into host f32 values, checking it has exactly `shape`.
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; shape.iter().product()];
        if let Some(seed) = self.synthetic {
            let mut v = SyntheticValues::new(name, seed, 0);
            out.iter_mut().for_each(|d| *d = v.next(0.1));
            return Ok(out);
        }
        let e = self.entry(name, shape)?;
        Self::convert(e.dtype, self.bytes(e), &mut out, |x| x, f16::to_f32);
        Ok(out)
    }

    /// Load a 1-D tensor (norm weight, bias) as an f32 vector of length `len`.
    pub fn vector(&self, gpu: &Gpu, name: &str, len: usize) -> Result<Tensor> {
        self.check_cancel()?;
        let data = self.read_f32(name, &[len])?;
        let t = Tensor::from_f32(gpu, name, &[len], &data)?;
        if let Some(e) = self.tensors.get(name) {
            self.advance(name, (e.end - e.start) as u64);
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_name;

    #[test]
    fn names_from_every_transformers_generation_agree() {
        let published = "vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight";
        assert_eq!(canonical_name(published), published);
        assert_eq!(
            canonical_name("vision_tower.encoder.layers.3.mlp.fc1.weight"),
            published
        );
        assert_eq!(
            canonical_name("model.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight"),
            published
        );
        let lm = "language_model.model.layers.0.self_attn.q_proj.weight";
        assert_eq!(canonical_name(lm), lm);
        assert_eq!(
            canonical_name("model.language_model.layers.0.self_attn.q_proj.weight"),
            lm
        );
        assert_eq!(
            canonical_name("model.multi_modal_projector.linear.bias"),
            "multi_modal_projector.linear.bias"
        );
        assert_eq!(canonical_name("lm_head.weight"), "lm_head.weight");
    }
}
