//! Quantised checkpoints: written once by [`save_quantized`] (`paligemma quantize`), loaded by
//! copying their packed matrices to the GPU as they are.
//!
//! The directory is an ordinary checkpoint (`config.json`, the tokenizer and preprocessor files
//! are copied from the source) with one `model.safetensors` whose `__metadata__` has
//! [`FORMAT_KEY`] = `int8` or `int4` and [`LAYOUT_KEY`] = [`LAYOUT_VERSION`]. Every weight matrix
//! the load would quantise ([`quantizable`]), `W` of `rows × cols` (`cols` from the config:
//! the product of all but the first dimension), is stored as two tensors in the layout of
//! [`crate::gpu::quantize`]:
//!
//! - `W`: `U8 [rows, row bytes]`, each row's packed values exactly as a GPU chunk holds them:
//!   int8 one two's-complement byte a value, the row padded with zeros to a multiple of 16
//!   values; int4 two values a byte (value `i` in the low nibble if `i` is even), the row
//!   padded with zeros to whole blocks of 32 values (16 bytes each);
//! - `W_scale`: int8 `F32 [rows]` (one scale a row); int4 `F16 [rows, blocks]` (one scale
//!   per block of 32 values).
//!
//! Value `i` of a row is `q_i · scale`. Every other tensor (norms, biases, the patch and
//! position embeddings) is copied with its dtype and bytes unchanged. Names are the published
//! layout's ([`super::canonical_name`]).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use half::f16;
use safetensors::Dtype;

use super::{quantizable, Checkpoint, Entry, Parts, WeightFormat};
use crate::gpu::quantize::{quantize_checked, RowLayout};
use crate::gpu::{DType, Gpu, Tensor};
use crate::model::{LoadProgress, PaliGemmaConfig};
use crate::{Error, Result};

/// The `__metadata__` key naming the format the matrices are packed in (`int8` or `int4`).
pub const FORMAT_KEY: &str = "paligemma.weights";

/// The `__metadata__` key of the layout's version ([`LAYOUT_VERSION`]).
pub const LAYOUT_KEY: &str = "paligemma.layout_version";

/// The version of the packed layout this build writes and reads.
pub const LAYOUT_VERSION: u32 = 1;

/// The suffix of a packed matrix's scales tensor.
const SCALE_SUFFIX: &str = "_scale";

/// The format a safetensors file's `__metadata__` says its matrices are packed in (`None`
/// for an ordinary checkpoint); an error naming `path` for an unknown format or layout.
pub(super) fn stored_format(
    path: &Path,
    meta: Option<&HashMap<String, String>>,
) -> Result<Option<WeightFormat>> {
    let get = |key: &str| meta.and_then(|m| m.get(key));
    let bad = |msg: String| Error::Model(format!("{}: {msg}", path.display()));
    let Some(weights) = get(FORMAT_KEY) else {
        if get(LAYOUT_KEY).is_some() {
            return Err(bad(format!("has {LAYOUT_KEY} but no {FORMAT_KEY}")));
        }
        return Ok(None);
    };
    let format = match weights.parse::<WeightFormat>() {
        Ok(f) if f != WeightFormat::F16 => f,
        _ => {
            return Err(bad(format!(
                "{FORMAT_KEY} is {weights:?}, not a packed format this build reads (int8, int4)"
            )))
        }
    };
    let version = get(LAYOUT_KEY).ok_or_else(|| {
        bad(format!(
            "{FORMAT_KEY} is {weights} but {LAYOUT_KEY} is missing"
        ))
    })?;
    if version.trim() != LAYOUT_VERSION.to_string() {
        return Err(bad(format!(
            "{LAYOUT_KEY} is {version:?}; this build reads layout version {LAYOUT_VERSION} \
             (quantise the original checkpoint again with this build's `paligemma quantize`)"
        )));
    }
    Ok(Some(format))
}

/// The packed layout of `format`, or an error for f16.
fn packed_dtype(format: WeightFormat) -> Result<DType> {
    match format {
        WeightFormat::Int8 | WeightFormat::Int4 => Ok(format.dtype()),
        WeightFormat::F16 => Err(Error::Request(
            "quantised checkpoints hold int8 or int4 weights, not f16".into(),
        )),
    }
}

/// The dtype and shape of the scales tensor of a packed `rows`-row matrix.
fn scale_tensor(dtype: DType, rows: usize, layout: &RowLayout) -> (Dtype, Vec<usize>) {
    match dtype {
        DType::Q8 => (Dtype::F32, vec![rows]),
        _ => (Dtype::F16, vec![rows, layout.scale_bytes / 2]),
    }
}

impl Checkpoint {
    /// The entry `name` of a packed checkpoint, checked to be `dtype` of `shape`.
    fn packed_entry(
        &self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        format: WeightFormat,
    ) -> Result<&Entry> {
        let e = self.tensors.get(name).ok_or_else(|| {
            Error::tensor(
                name,
                format!(
                    "missing from the {format} checkpoint {}",
                    self.files[0].0.display()
                ),
            )
        })?;
        if e.dtype != dtype || e.shape != shape {
            return Err(Error::tensor(
                &e.original,
                format!(
                    "in {} is {:?} {:?}; a {format} checkpoint of this config stores it as \
                     {dtype:?} {shape:?}",
                    self.files[e.file].0.display(),
                    e.dtype,
                    e.shape
                ),
            ));
        }
        Ok(e)
    }

    /// Load matrix `name` of `shape` from its packed values and scales (see the module
    /// documentation), copied into the GPU chunks as they are.
    pub(super) fn packed_matrix(
        &self,
        gpu: &Gpu,
        label: &str,
        parts: &Parts,
        format: WeightFormat,
    ) -> Result<Tensor> {
        let dtype = packed_dtype(format)?;
        let cols = parts.cols;
        let layout = RowLayout::new(dtype, cols)
            .ok_or_else(|| Error::tensor(label, format!("{dtype:?} is not a quantised type")))?;
        // Each part's packed values and scales, checked.
        let mut sources = Vec::with_capacity(parts.names.len());
        for (name, shape) in parts.names.iter().zip(&parts.shapes) {
            let rows = shape[0];
            let values = self.packed_entry(name, Dtype::U8, &[rows, layout.data_bytes], format)?;
            let scale_name = format!("{name}{SCALE_SUFFIX}");
            let (scale_dtype, scale_shape) = scale_tensor(dtype, rows, &layout);
            let scales = self.packed_entry(&scale_name, scale_dtype, &scale_shape, format)?;
            let scale_bytes = self.bytes(scales);
            let finite = match dtype {
                DType::Q8 => scale_bytes
                    .chunks_exact(4)
                    .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
                _ => scale_bytes
                    .chunks_exact(2)
                    .position(|c| !f16::from_le_bytes([c[0], c[1]]).is_finite()),
            };
            if let Some(i) = finite {
                return Err(Error::tensor(
                    &scales.original,
                    format!(
                        "in {}: scale {i} is not finite (the file is corrupt)",
                        self.files[scales.file].0.display()
                    ),
                ));
            }
            sources.push((values, scales, scale_name));
        }
        let (db, sb) = (layout.data_bytes, layout.scale_bytes);
        let t = Tensor::weight_packed(gpu, label, &[parts.rows, cols], dtype, |r0, d, s| {
            self.check_cancel()?;
            let n = d.len() / db;
            // Copy the chunk's rows r0..r0 + n part by part.
            let mut r = r0;
            while r < r0 + n {
                let (p, lr) = parts.locate(r);
                let (values, scales, _) = &sources[p];
                let take = (parts.starts[p + 1] - r).min(r0 + n - r);
                let (data, scale_bytes) = (self.bytes(values), self.bytes(scales));
                let (o, e) = (r - r0, r - r0 + take);
                d[o * db..e * db].copy_from_slice(&data[lr * db..(lr + take) * db]);
                s[o * sb..e * sb].copy_from_slice(&scale_bytes[lr * sb..(lr + take) * sb]);
                let start = values.start + lr * db;
                self.release(values, start, start + take * db);
                self.advance(parts.names[p], (take * db) as u64);
                r += take;
            }
            Ok(())
        })?;
        for (_, scales, scale_name) in &sources {
            self.release(scales, scales.start, scales.end);
            self.advance(scale_name, (scales.end - scales.start) as u64);
        }
        Ok(t)
    }
}

/// What [`save_quantized`] wrote.
#[derive(Debug, Clone)]
pub struct SavedCheckpoint {
    /// The quantised `model.safetensors`.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Bytes of the source checkpoint's tensors.
    pub source_bytes: u64,
    /// Matrices stored packed.
    pub quantized: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// The other files copied from the source directory (config, tokenizer, ...), by name.
    pub files: Vec<String>,
}

/// One tensor of the file being written.
enum Part {
    /// A source tensor's bytes, unchanged.
    Copy,
    /// A source matrix's packed values (its scales follow as the next part).
    Values { rows: usize, cols: usize },
    /// The scales of the matrix packed by the part before.
    Scales,
}

struct Planned {
    /// The name in the new file.
    name: String,
    /// The source tensor (canonical name).
    source: String,
    part: Part,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: usize,
}

/// Write the checkpoint in `src` to the new directory `out` with its weight matrices quantised
/// to `format` (int8 or int4) and packed as the GPU holds them (see the module
/// documentation), after merging the PEFT LoRA adapter `adapter` if given. The other files of
/// `src` (config, tokenizer, preprocessor config, ...) are copied. Loading `out` with
/// [`crate::model::ModelBuilder`] gives the GPU buffers, and so the tokens, of loading `src`
/// with [`crate::model::ModelBuilder::weights`]`(format)`, without quantising again.
///
/// `on_progress` is called as tensors are written: bytes of the source tensors done, out of
/// their total. `out` must not exist or be empty; the file is written under a temporary
/// name and renamed when complete, so a failed run leaves no `model.safetensors` behind.
pub fn save_quantized(
    src: &Path,
    out: &Path,
    format: WeightFormat,
    adapter: Option<&Path>,
    on_progress: impl FnMut(&LoadProgress) + Send + 'static,
) -> Result<SavedCheckpoint> {
    let dtype = packed_dtype(format)?;
    PaliGemmaConfig::from_file(&src.join("config.json"))?;
    let mut ck = Checkpoint::open(src)?;
    if let Some(stored) = ck.stored {
        return Err(Error::Model(format!(
            "{} is already quantised to {stored}",
            src.display()
        )));
    }
    if let Some(adapter) = adapter {
        ck.add_adapter(adapter)?;
    }
    let plan = plan(&ck, dtype)?;
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
        if entries.next().is_some() {
            return Err(Error::Model(format!(
                "{} is not empty; quantize writes a new checkpoint directory",
                out.display()
            )));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let path = entry.map_err(|e| Error::io(src, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !path.is_file()
            || name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
        {
            continue;
        }
        std::fs::copy(&path, out.join(name)).map_err(|e| Error::io(&path, e))?;
        files.push(name.to_string());
    }
    files.sort();

    ck.report_progress(|_| true, Box::new(on_progress));
    let path = out.join("model.safetensors");
    let partial = out.join("model.safetensors.partial");
    let written = write_file(&ck, &plan, format, dtype, &partial)
        .and_then(|bytes| {
            std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
            Ok(bytes)
        })
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&partial);
        })?;
    ck.finish_progress();
    let quantized = plan
        .iter()
        .filter(|p| matches!(p.part, Part::Values { .. }))
        .count();
    Ok(SavedCheckpoint {
        path,
        bytes: written,
        source_bytes: ck.tensors.values().map(|e| (e.end - e.start) as u64).sum(),
        quantized,
        copied: plan.len() - 2 * quantized,
        files,
    })
}

/// The tensors of the quantised file, in file order: each source tensor by name, a
/// quantisable float matrix as its packed values and scales.
fn plan(ck: &Checkpoint, dtype: DType) -> Result<Vec<Planned>> {
    let mut names: Vec<&String> = ck.tensors.keys().collect();
    names.sort();
    let mut plan = Vec::new();
    for name in names {
        let e = &ck.tensors[name];
        let float = matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16);
        if !(float && quantizable(name, &e.shape)) {
            if ck.lora.contains_key(name) {
                return Err(Error::tensor(
                    name,
                    "is updated by the LoRA adapter but stays unquantised; quantize merges \
                     adapters into quantised matrices only",
                ));
            }
            plan.push(Planned {
                name: name.clone(),
                source: name.clone(),
                part: Part::Copy,
                dtype: e.dtype,
                shape: e.shape.clone(),
                bytes: e.end - e.start,
            });
            continue;
        }
        let rows = e.shape[0];
        let cols: usize = e.shape[1..].iter().product();
        let layout = RowLayout::new(dtype, cols)
            .ok_or_else(|| Error::tensor(name, format!("{dtype:?} is not a quantised type")))?;
        plan.push(Planned {
            name: name.clone(),
            source: name.clone(),
            part: Part::Values { rows, cols },
            dtype: Dtype::U8,
            shape: vec![rows, layout.data_bytes],
            bytes: rows * layout.data_bytes,
        });
        let (scale_dtype, shape) = scale_tensor(dtype, rows, &layout);
        plan.push(Planned {
            name: format!("{name}{SCALE_SUFFIX}"),
            source: name.clone(),
            part: Part::Scales,
            dtype: scale_dtype,
            shape,
            bytes: rows * layout.scale_bytes,
        });
    }
    let mut seen = HashSet::new();
    if let Some(p) = plan.iter().find(|p| !seen.insert(p.name.as_str())) {
        return Err(Error::tensor(
            &p.name,
            "is both a tensor of the checkpoint and the scales of a quantised one",
        ));
    }
    Ok(plan)
}

/// Write the safetensors file of `plan` to `path`; its size in bytes.
fn write_file(
    ck: &Checkpoint,
    plan: &[Planned],
    format: WeightFormat,
    dtype: DType,
    path: &Path,
) -> Result<u64> {
    let io = |e| Error::io(path, e);
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({
            FORMAT_KEY: format.name(),
            LAYOUT_KEY: LAYOUT_VERSION.to_string(),
        }),
    );
    let mut offset = 0;
    for p in plan {
        header.insert(
            p.name.clone(),
            serde_json::json!({
                "dtype": p.dtype,
                "shape": p.shape,
                "data_offsets": [offset, offset + p.bytes],
            }),
        );
        offset += p.bytes;
    }
    let mut text = serde_json::to_vec(&header)
        .map_err(|e| Error::Model(format!("{}: header: {e}", path.display())))?;
    // Pad the header with spaces so that the data starts 8-byte aligned.
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&text).map_err(io)?;
    // The scales of the matrix whose values were written last.
    let mut scales = Vec::new();
    for p in plan {
        let e = &ck.tensors[&p.source];
        match p.part {
            Part::Copy => {
                w.write_all(ck.bytes(e)).map_err(io)?;
                ck.release(e, e.start, e.end);
                ck.advance(&p.source, (e.end - e.start) as u64);
            }
            Part::Values { rows, cols } => {
                let layout = RowLayout::new(dtype, cols).ok_or_else(|| {
                    Error::tensor(&p.name, format!("{dtype:?} is not a quantised type"))
                })?;
                let elem = if e.dtype == Dtype::F32 { 4 } else { 2 };
                let lora = ck.lora.get(&p.source);
                let mut row = vec![0.0f32; cols];
                let mut data = vec![0u8; layout.data_bytes];
                scales.clear();
                scales.resize(rows * layout.scale_bytes, 0);
                for (r, s) in scales.chunks_exact_mut(layout.scale_bytes).enumerate() {
                    ck.before_row(&p.source, Some(e), r, cols * elem)?;
                    ck.row_f32(e, lora, r, &mut row);
                    data.fill(0);
                    quantize_checked(&p.source, r, dtype, &row, &mut data, s)?;
                    w.write_all(&data).map_err(io)?;
                }
                ck.release(e, e.start, e.end);
                ck.advance(&p.source, (e.end - e.start) as u64);
            }
            Part::Scales => w.write_all(&scales).map_err(io)?,
        }
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(8 + text.len() as u64 + offset as u64)
}
