//! The VQ-VAE mask decoder of PaliGemma's segmentation (big_vision's `vae-oid.npz`), run on
//! the GPU with the kernels of [`crate::ops::conv`].
//!
//! The weights are a `.npz` (a zip of `.npy` arrays) in PyTorch layout; the decoder is
//!
//! ```text
//! _vq_vae._embedding     [N, D] codebook (N = 128, D = 512 in vae-oid.npz); the 16 codes of
//!                        an object pick rows forming a 4×4×D grid, row by row
//! decoder.0              Conv2d 1×1 D→C + ReLU                        (C = 128)
//! decoder.2.net.{0,2,4}  residual block: x + conv1×1(ReLU(conv3×3(ReLU(conv3×3(x)))))
//! decoder.3.net.{0,2,4}  a second residual block
//! decoder.4/6/8/10       ConvTranspose2d k4 s2 p1 + ReLU each (weights [in, out, 4, 4]):
//!                        C→128→64→32→16 channels, 4→8→16→32→64 pixels
//! decoder.12             Conv2d 1×1 16→1: 64×64 mask logits, about [-1, 1]
//! ```
//!
//! (big_vision's `evaluators/proj/paligemma/transfers/segmentation.py`; its Flax
//! `ConvTranspose(padding=2, transpose_kernel=True)` on the kernel transposed (2, 3, 1, 0) is
//! this ConvTranspose2d.) Channel counts are read from the file and checked to chain; every
//! array may be f32, f64 or f16 and is kept in f32 on the GPU (the whole decoder is ~5 MB),
//! so the output matches an f32 reference to rounding. Other arrays in the file (the
//! encoder) are ignored.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::mask::MASK_SIDE;
use super::parse::SEG_TOKENS;
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::npy::{self, NpyArray};
use crate::ops::conv::{conv2d, gather, taps_last, ConvSpec};
use crate::{Error, Result};

/// Largest `.npy` entry read from the archive, in bytes (the real decoder's largest is
/// 0.6 MB); a guard against decompression bombs.
const MAX_ENTRY_BYTES: u64 = 256 << 20;
/// Most masks decoded in one GPU submission.
const MAX_BATCH: usize = 64;
/// Side of the code grid.
const GRID: usize = 4;

/// One convolution of the decoder, uploaded.
struct Conv {
    w: Tensor,
    b: Tensor,
    cout: usize,
    spec: ConvSpec,
}

/// The mask decoder, loaded on a GPU. Load once, decode any number of masks.
pub struct MaskDecoder {
    gpu: Arc<Gpu>,
    path: PathBuf,
    codebook: Tensor,
    stem: Conv,
    blocks: Vec<[Conv; 3]>,
    ups: Vec<Conv>,
    head: Conv,
}

/// Reads arrays out of an `.npz` archive, naming the file and key in every error.
struct Npz {
    path: PathBuf,
    zip: zip::ZipArchive<BufReader<File>>,
}

impl Npz {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
            Error::Model(format!(
                "{}: not a readable .npz (zip) archive: {e}",
                path.display()
            ))
        })?;
        Ok(Npz {
            path: path.to_path_buf(),
            zip,
        })
    }

    fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::tensor(key, format!("{}: {msg}", self.path.display()))
    }

    /// The array `key` (entry `key.npy`) as f32, checked against `want` (`None` = any size).
    fn array(&mut self, key: &str, want: &[Option<usize>]) -> Result<NpyArray<f32>> {
        let name = format!("{key}.npy");
        let mut bytes = Vec::new();
        let read = match self.zip.by_name(&name) {
            Ok(entry) => entry
                .take(MAX_ENTRY_BYTES + 1)
                .read_to_end(&mut bytes)
                .map(|_| ())
                .map_err(|e| format!("reading {name}: {e}")),
            Err(zip::result::ZipError::FileNotFound) => {
                Err("missing (is this big_vision's vae-oid.npz?)".to_string())
            }
            Err(e) => Err(format!("reading {name}: {e}")),
        };
        read.map_err(|msg| self.err(key, msg))?;
        if bytes.len() as u64 > MAX_ENTRY_BYTES {
            return Err(self.err(key, format!("{name} exceeds {MAX_ENTRY_BYTES} bytes")));
        }
        let array = npy::parse_f32(Path::new(&name), &bytes).map_err(|e| self.err(key, e))?;
        let fits = array.shape.len() == want.len()
            && array
                .shape
                .iter()
                .zip(want)
                .all(|(d, w)| *d > 0 && w.is_none_or(|w| w == *d));
        if !fits {
            let want: Vec<String> = want
                .iter()
                .map(|w| w.map_or("_".to_string(), |v| v.to_string()))
                .collect();
            return Err(self.err(
                key,
                format!("shape {:?}, expected [{}]", array.shape, want.join(", ")),
            ));
        }
        Ok(array)
    }

    /// A convolution `prefix.weight` / `prefix.bias` taking `cin` channels; `cout` is checked
    /// when given. `transposed` weights are `[in, out, K, K]`, others `[out, in, K, K]`.
    fn conv(
        &mut self,
        gpu: &Gpu,
        prefix: &str,
        cin: usize,
        cout: Option<usize>,
        spec: ConvSpec,
    ) -> Result<Conv> {
        let k = Some(spec.kernel);
        let transposed = spec.transposed_stride.is_some();
        let wkey = format!("{prefix}.weight");
        let w = if transposed {
            self.array(&wkey, &[Some(cin), cout, k, k])?
        } else {
            self.array(&wkey, &[cout, Some(cin), k, k])?
        };
        let cout = if transposed { w.shape[1] } else { w.shape[0] };
        let b = self.array(&format!("{prefix}.bias"), &[Some(cout)])?;
        let dims = [w.shape[0], w.shape[1], w.shape[2], w.shape[3]];
        let taps = taps_last(&w.data, dims, transposed);
        Ok(Conv {
            w: Tensor::from_f32(gpu, &wkey, &[cout, spec.kernel, spec.kernel, cin], &taps)?,
            b: Tensor::from_f32(gpu, &format!("{prefix}.bias"), &[cout], &b.data)?,
            cout,
            spec,
        })
    }
}

impl MaskDecoder {
    /// Load the decoder from big_vision's `vae-oid.npz` (or any `.npz` with its keys) onto
    /// `gpu`. Errors name the file and the missing or misshapen key.
    pub fn load(gpu: Arc<Gpu>, npz_path: &Path) -> Result<Self> {
        let mut npz = Npz::open(npz_path)?;
        let cb = npz.array("_vq_vae._embedding", &[None, None])?;
        let (codes, dim) = (cb.shape[0], cb.shape[1]);
        let codebook = Tensor::from_f32(&gpu, "_vq_vae._embedding", &[codes, dim], &cb.data)?;
        let stem = npz.conv(&gpu, "decoder.0", dim, None, ConvSpec::same(1).relu())?;
        let c = stem.cout;
        let mut blocks = Vec::new();
        for block in ["decoder.2.net", "decoder.3.net"] {
            blocks.push([
                npz.conv(
                    &gpu,
                    &format!("{block}.0"),
                    c,
                    Some(c),
                    ConvSpec::same(3).relu(),
                )?,
                npz.conv(
                    &gpu,
                    &format!("{block}.2"),
                    c,
                    Some(c),
                    ConvSpec::same(3).relu(),
                )?,
                npz.conv(
                    &gpu,
                    &format!("{block}.4"),
                    c,
                    Some(c),
                    ConvSpec::same(1).accumulate(),
                )?,
            ]);
        }
        let mut ups = Vec::new();
        let mut cin = c;
        for layer in ["decoder.4", "decoder.6", "decoder.8", "decoder.10"] {
            let up = npz.conv(&gpu, layer, cin, None, ConvSpec::transposed(4, 2, 1).relu())?;
            cin = up.cout;
            ups.push(up);
        }
        let head = npz.conv(&gpu, "decoder.12", cin, Some(1), ConvSpec::same(1))?;
        Ok(MaskDecoder {
            gpu,
            path: npz_path.to_path_buf(),
            codebook,
            stem,
            blocks,
            ups,
            head,
        })
    }

    /// The file the decoder was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of codebook entries (valid codes are `0..num_codes()`).
    pub fn num_codes(&self) -> usize {
        self.codebook.rows()
    }

    /// Width of a codebook entry (D).
    pub fn embedding_dim(&self) -> usize {
        self.codebook.cols()
    }

    /// Decode masks: for each object's 16 codes, 64×64 logits (row-major, about [-1, 1];
    /// the object is where they are > 0). All masks run as batches on the GPU.
    pub fn decode(&self, codes: &[[u32; SEG_TOKENS]]) -> Result<Vec<[f32; MASK_SIDE * MASK_SIDE]>> {
        let n = self.num_codes();
        for (i, seq) in codes.iter().enumerate() {
            if let Some((j, c)) = seq.iter().enumerate().find(|(_, c)| **c as usize >= n) {
                return Err(Error::Request(format!(
                    "mask {i}: code {c} at position {j} is outside the codebook of {n} entries \
                     of {}",
                    self.path.display()
                )));
            }
        }
        // The largest activation of one mask, to keep every batch within a binding.
        let mut side = GRID;
        let mut largest = side * side * self.embedding_dim().max(self.stem.cout);
        for up in &self.ups {
            side *= 2;
            largest = largest.max(side * side * up.cout);
        }
        let per_mask = (largest * 4) as u64;
        let fit = (self.gpu.max_binding_bytes() / per_mask).max(1) as usize;
        let mut out = Vec::with_capacity(codes.len());
        for batch in codes.chunks(fit.min(MAX_BATCH)) {
            self.decode_batch(batch, &mut out)?;
        }
        Ok(out)
    }

    fn decode_batch(
        &self,
        codes: &[[u32; SEG_TOKENS]],
        out: &mut Vec<[f32; MASK_SIDE * MASK_SIDE]>,
    ) -> Result<()> {
        let gpu = &*self.gpu;
        let b = codes.len();
        let flat: Vec<u32> = codes.iter().flatten().copied().collect();
        let ids = Tensor::from_u32(gpu, "mask codes", &[b * SEG_TOKENS], &flat)?;
        let grid = Tensor::zeros(gpu, "vae grid", &[b, GRID, GRID, self.embedding_dim()])?;
        let c = self.stem.cout;
        let h = Tensor::zeros(gpu, "vae hidden", &[b, GRID, GRID, c])?;
        let t1 = Tensor::zeros(gpu, "vae block t1", &[b, GRID, GRID, c])?;
        let t2 = Tensor::zeros(gpu, "vae block t2", &[b, GRID, GRID, c])?;
        let mut rec = Recorder::new(gpu);
        gather(&mut rec, &ids, &self.codebook, &grid)?;
        let run = |rec: &mut Recorder, x: &Tensor, conv: &Conv, y: &Tensor| {
            conv2d(rec, x, &conv.w, &conv.b, y, conv.spec)
        };
        run(&mut rec, &grid, &self.stem, &h)?;
        for [a, bb, cc] in &self.blocks {
            run(&mut rec, &h, a, &t1)?;
            run(&mut rec, &t1, bb, &t2)?;
            run(&mut rec, &t2, cc, &h)?;
        }
        let mut x = h;
        let mut side = GRID;
        for up in &self.ups {
            side *= 2;
            let y = Tensor::zeros(gpu, "vae upsampled", &[b, side, side, up.cout])?;
            run(&mut rec, &x, up, &y)?;
            x = y;
        }
        let logits = Tensor::zeros(gpu, "mask logits", &[b, side, side, 1])?;
        run(&mut rec, &x, &self.head, &logits)?;
        rec.run()?;
        let data = logits.read(gpu)?;
        for chunk in data.chunks_exact(side * side) {
            let mask: [f32; MASK_SIDE * MASK_SIDE] = chunk.try_into().map_err(|_| {
                Error::Model(format!(
                    "{}: the decoder gives {side}x{side} masks, expected {MASK_SIDE}x{MASK_SIDE}",
                    self.path.display()
                ))
            })?;
            out.push(mask);
        }
        Ok(())
    }
}
