//! Tensors on the GPU. Activations are f32 in one buffer; weights are f16 matrices whose rows
//! are padded to [`WEIGHT_ROW_ALIGN`] values and split into chunks of whole rows, each chunk its
//! own buffer no larger than [`Gpu::weight_chunk_bytes`], so that a tensor of any size can be
//! bound (the 1 GB Gemma embedding table on a 128 MiB binding limit, or a small model under a
//! forced 64 KiB limit in tests). Weights may instead be quantised at load ([`DType::Q8`],
//! [`DType::Q4`]; layout in [`super::quantize`]), chunked the same way, each chunk holding its
//! rows' packed values and their scales.

use half::f16;

use super::quantize::{dequantize_row, quantize_checked, RowLayout};
use super::Gpu;
use crate::{Error, Result};

/// f16 weight rows are padded to a multiple of this many values (16 bytes), so kernels can
/// read them with `vec4<u32>` loads.
pub const WEIGHT_ROW_ALIGN: usize = 8;

/// Rows per group of the lane-interleaved f16 layout (see [`lane_unit`]).
pub const LANE_GROUP_ROWS: usize = 512;

/// Row granularity of the lane-interleaved layout: a chunk's last group is padded to a
/// multiple of this many rows.
pub const LANE_BLOCK_ROWS: usize = 64;

/// Index, in 16-byte units (8 halves), of unit `j` of row `row` of a lane-interleaved f16
/// chunk of `rows` rows and `units` units per row.
///
/// Rows are taken in groups of [`LANE_GROUP_ROWS`]; group `g` is stored as `units` slices of
/// `width` units, slice `j` holding unit `j` of each of the group's rows in row order, where
/// `width` is [`LANE_GROUP_ROWS`] except for a short last group, whose width is its row count
/// rounded up to [`LANE_BLOCK_ROWS`]. On CPU adapters a workgroup runs its lanes as SIMD
/// lanes of one core, lane `t` owning rows `t, t + 64, …` of a group: in this layout the rows
/// a SIMD step reads are neighbours, so each core streams through one contiguous run instead
/// of one run per row (which defeats the hardware prefetchers: ~25 % slower matrix-vector
/// products on lavapipe). The kernels read it through `shaders/include/lanes.wgsl`.
pub fn lane_unit(rows: usize, units: usize, row: usize, j: usize) -> usize {
    let g = row / LANE_GROUP_ROWS;
    let start = g * LANE_GROUP_ROWS;
    let width = LANE_GROUP_ROWS.min((rows - start).div_ceil(LANE_BLOCK_ROWS) * LANE_BLOCK_ROWS);
    start * units + j * width + (row - start)
}

/// Element type of a tensor's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// 32-bit float: activations, norms, biases, logits.
    F32,
    /// 16-bit float packed two per `u32`: weight matrices.
    F16,
    /// 32-bit unsigned integer: token ids, positions.
    U32,
    /// Quantised weight matrix: 8-bit integers with one f32 scale per row.
    Q8,
    /// Quantised weight matrix: 4-bit integers with one f16 scale per block of 32 values.
    Q4,
}

impl DType {
    /// Bits per element (scales of quantised types not included).
    pub fn bits(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 32,
            DType::F16 => 16,
            DType::Q8 => 8,
            DType::Q4 => 4,
        }
    }

    /// Bytes per element, rounded up (a Q4 value takes half a byte).
    pub fn size(self) -> usize {
        self.bits().div_ceil(8)
    }

    /// Whether this is a quantised weight type (values dequantised inside the kernels).
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8 | DType::Q4)
    }
}

/// A contiguous range of rows stored in one buffer.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The buffer holding rows `row_start..row_start + rows`.
    pub buffer: wgpu::Buffer,
    /// First row held.
    pub row_start: usize,
    /// Number of rows held.
    pub rows: usize,
}

/// A tensor on the GPU. Its rows are all dimensions but the last; its storage may be split
/// into several [`Chunk`]s of whole rows.
#[derive(Debug, Clone)]
pub struct Tensor {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    row_stride: usize,
    interleaved: bool,
    chunks: Vec<Chunk>,
}

const ACTIVATION_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// A weight chunk holding `bytes`, written through a buffer mapped at creation; the upload
/// is flushed at once so that only one chunk's staging memory exists at a time (see
/// [`Gpu::flush_uploads`]).
fn upload_chunk(gpu: &Gpu, name: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
    let buffer = gpu.create_buffer(&wgpu::BufferDescriptor {
        label: Some(name),
        size: bytes.len() as u64,
        usage: if gpu.unified_memory() {
            ACTIVATION_USAGE | wgpu::BufferUsages::MAP_WRITE
        } else {
            ACTIVATION_USAGE
        },
        mapped_at_creation: true,
    });
    buffer
        .slice(..)
        .get_mapped_range_mut()
        .map_err(|e| Error::Gpu(format!("mapping weight {name}: {e}")))?
        .copy_from_slice(bytes);
    buffer.unmap();
    gpu.flush_uploads()?;
    Ok(buffer)
}

/// The row layout of a quantised `dtype`, or an error naming `name` for any other type.
fn quantized_layout(name: &str, dtype: DType, cols: usize) -> Result<RowLayout> {
    RowLayout::new(dtype, cols)
        .ok_or_else(|| Error::tensor(name, format!("{dtype:?} is not a quantised type")))
}

fn rows_cols(name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    if shape.is_empty() || shape.contains(&0) {
        return Err(Error::tensor(name, format!("shape {shape:?} is empty")));
    }
    let cols = *shape.last().expect("non-empty");
    Ok((shape.iter().product::<usize>() / cols, cols))
}

impl Tensor {
    /// A zero-filled f32 activation tensor.
    pub fn zeros(gpu: &Gpu, name: &str, shape: &[usize]) -> Result<Self> {
        let (rows, cols) = rows_cols(name, shape)?;
        let bytes = (rows * cols * 4) as u64;
        if bytes > gpu.max_binding_bytes() {
            return Err(Error::tensor(
                name,
                format!(
                    "activation of {bytes} bytes exceeds the device's binding limit of {} bytes",
                    gpu.max_binding_bytes()
                ),
            ));
        }
        let buffer = gpu.create_buffer(&wgpu::BufferDescriptor {
            label: Some(name),
            size: bytes,
            usage: ACTIVATION_USAGE,
            mapped_at_creation: false,
        });
        Ok(Tensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype: DType::F32,
            row_stride: cols,
            interleaved: false,
            chunks: vec![Chunk {
                buffer,
                row_start: 0,
                rows,
            }],
        })
    }

    /// An f32 tensor holding `data` (activations, norm weights, biases).
    pub fn from_f32(gpu: &Gpu, name: &str, shape: &[usize], data: &[f32]) -> Result<Self> {
        let t = Self::zeros(gpu, name, shape)?;
        if data.len() != t.numel() {
            return Err(Error::tensor(
                name,
                format!(
                    "shape {shape:?} needs {} values, got {}",
                    t.numel(),
                    data.len()
                ),
            ));
        }
        gpu.queue
            .write_buffer(&t.chunks[0].buffer, 0, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// A u32 tensor holding `data` (token ids, positions).
    pub fn from_u32(gpu: &Gpu, name: &str, shape: &[usize], data: &[u32]) -> Result<Self> {
        let mut t = Self::zeros(gpu, name, shape)?;
        if data.len() != t.numel() {
            return Err(Error::tensor(
                name,
                format!(
                    "shape {shape:?} needs {} values, got {}",
                    t.numel(),
                    data.len()
                ),
            ));
        }
        t.dtype = DType::U32;
        gpu.queue
            .write_buffer(&t.chunks[0].buffer, 0, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// An f16 weight matrix of `shape` (rows = all but the last dimension), filled row by row
    /// by `fill(row, dst)` where `dst` has `cols` values. Rows are padded with zeros to
    /// [`WEIGHT_ROW_ALIGN`] and split into chunks of at most [`Gpu::weight_chunk_bytes`],
    /// stored lane-interleaved ([`lane_unit`]) where [`Gpu::interleave_weights`] says so.
    pub fn weight_f16(
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        fill: impl FnMut(usize, &mut [f16]) -> Result<()>,
    ) -> Result<Self> {
        Self::weight_f16_with(gpu, name, shape, gpu.interleave_weights(), fill)
    }

    /// [`Tensor::weight_f16`] with the layout chosen by the caller: lane-interleaved if
    /// `interleave` and one binding holds at least [`LANE_BLOCK_ROWS`] rows, else row-major.
    pub(crate) fn weight_f16_with(
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        interleave: bool,
        mut fill: impl FnMut(usize, &mut [f16]) -> Result<()>,
    ) -> Result<Self> {
        let (rows, cols) = rows_cols(name, shape)?;
        let stride = cols.div_ceil(WEIGHT_ROW_ALIGN) * WEIGHT_ROW_ALIGN;
        let units = stride / WEIGHT_ROW_ALIGN;
        let row_bytes = (stride * 2) as u64;
        let fit = (gpu.weight_chunk_bytes() / row_bytes) as usize;
        // Interleaved chunks hold whole groups (or, under a small binding limit, whole
        // blocks), so that their padded last group still fits the limit.
        let interleaved = interleave && fit >= LANE_BLOCK_ROWS;
        let rows_per_chunk = match fit {
            _ if !interleaved => fit,
            f if f >= LANE_GROUP_ROWS => f / LANE_GROUP_ROWS * LANE_GROUP_ROWS,
            f => f / LANE_BLOCK_ROWS * LANE_BLOCK_ROWS,
        };
        if rows_per_chunk == 0 {
            return Err(Error::tensor(
                name,
                format!(
                    "one row of {row_bytes} bytes exceeds the binding limit of {} bytes",
                    gpu.weight_chunk_bytes()
                ),
            ));
        }
        let mut chunks = Vec::with_capacity(rows.div_ceil(rows_per_chunk));
        // One chunk at a time is converted on the host, so peak host memory is one chunk.
        let mut host: Vec<f16> = Vec::new();
        let mut row = vec![f16::ZERO; if interleaved { stride } else { 0 }];
        let mut row_start = 0;
        while row_start < rows {
            let n = rows_per_chunk.min(rows - row_start);
            host.clear();
            if interleaved {
                host.resize(
                    n.div_ceil(LANE_BLOCK_ROWS) * LANE_BLOCK_ROWS * stride,
                    f16::ZERO,
                );
                for r in 0..n {
                    fill(row_start + r, &mut row[..cols])?;
                    for (j, unit) in row.chunks_exact(WEIGHT_ROW_ALIGN).enumerate() {
                        let at = lane_unit(n, units, r, j) * WEIGHT_ROW_ALIGN;
                        host[at..at + WEIGHT_ROW_ALIGN].copy_from_slice(unit);
                    }
                }
            } else {
                host.resize(n * stride, f16::ZERO);
                for r in 0..n {
                    fill(row_start + r, &mut host[r * stride..r * stride + cols])?;
                }
            }
            let buffer = upload_chunk(gpu, name, bytemuck::cast_slice(&host))?;
            chunks.push(Chunk {
                buffer,
                row_start,
                rows: n,
            });
            row_start += n;
        }
        Ok(Tensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype: DType::F16,
            row_stride: stride,
            interleaved,
            chunks,
        })
    }

    /// An f16 weight matrix from f32 values in row-major order (tests and synthetic models).
    pub fn weight_from_f32(gpu: &Gpu, name: &str, shape: &[usize], data: &[f32]) -> Result<Self> {
        Self::weight_from_f32_with(gpu, name, shape, gpu.interleave_weights(), data)
    }

    /// [`Tensor::weight_from_f32`] with the layout chosen by the caller (see
    /// [`Tensor::weight_f16_with`]).
    pub(crate) fn weight_from_f32_with(
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        interleave: bool,
        data: &[f32],
    ) -> Result<Self> {
        let (rows, cols) = rows_cols(name, shape)?;
        if data.len() != rows * cols {
            return Err(Error::tensor(
                name,
                format!(
                    "shape {shape:?} needs {} values, got {}",
                    rows * cols,
                    data.len()
                ),
            ));
        }
        Self::weight_f16_with(gpu, name, shape, interleave, |r, dst| {
            for (d, s) in dst.iter_mut().zip(&data[r * cols..(r + 1) * cols]) {
                *d = f16::from_f32(*s);
            }
            Ok(())
        })
    }

    /// A quantised weight matrix of `shape` ([`DType::Q8`] or [`DType::Q4`]), filled row by
    /// row by `fill(row, dst)` with the `cols` f32 values to quantise. Rows are padded to whole
    /// 16-byte units and split into chunks of at most [`Gpu::weight_chunk_bytes`], each holding
    /// its rows' packed values followed by their scales (see [`super::quantize`]). Only one
    /// chunk is ever held on the host.
    pub fn weight_quantized(
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        dtype: DType,
        mut fill: impl FnMut(usize, &mut [f32]) -> Result<()>,
    ) -> Result<Self> {
        let (_, cols) = rows_cols(name, shape)?;
        let layout = quantized_layout(name, dtype, cols)?;
        let mut src = vec![0.0f32; cols];
        Self::weight_packed(gpu, name, shape, dtype, |row_start, data, scales| {
            let rows = data.chunks_exact_mut(layout.data_bytes);
            for (r, (d, s)) in rows
                .zip(scales.chunks_exact_mut(layout.scale_bytes))
                .enumerate()
            {
                fill(row_start + r, &mut src)?;
                quantize_checked(name, row_start + r, dtype, &src, d, s)?;
            }
            Ok(())
        })
    }

    /// A quantised weight matrix of `shape` from rows already packed in `dtype`'s layout
    /// ([`super::quantize`]): `fill(row_start, data, scales)` writes the packed values of the
    /// chunk's rows from `row_start` on into `data` (`RowLayout::data_bytes` a row, zero on
    /// entry) and their scales into `scales` (`RowLayout::scale_bytes` a row). Chunks are
    /// split as in [`Tensor::weight_quantized`], one at a time on the host.
    pub fn weight_packed(
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        dtype: DType,
        mut fill: impl FnMut(usize, &mut [u8], &mut [u8]) -> Result<()>,
    ) -> Result<Self> {
        let (rows, cols) = rows_cols(name, shape)?;
        let layout = quantized_layout(name, dtype, cols)?;
        let row_bytes = layout.data_bytes + layout.scale_bytes;
        let rows_per_chunk = (gpu.weight_chunk_bytes() as usize / 16 * 16) / row_bytes;
        if rows_per_chunk == 0 {
            return Err(Error::tensor(
                name,
                format!(
                    "one {dtype:?} row of {row_bytes} bytes exceeds the binding limit of {} bytes",
                    gpu.weight_chunk_bytes()
                ),
            ));
        }
        let mut chunks = Vec::with_capacity(rows.div_ceil(rows_per_chunk));
        let mut host: Vec<u8> = Vec::new();
        let mut row_start = 0;
        while row_start < rows {
            let n = rows_per_chunk.min(rows - row_start);
            host.clear();
            host.resize(layout.chunk_bytes(n), 0);
            let (data, scales) = host.split_at_mut(n * layout.data_bytes);
            fill(row_start, data, &mut scales[..n * layout.scale_bytes])?;
            let buffer = upload_chunk(gpu, name, &host)?;
            chunks.push(Chunk {
                buffer,
                row_start,
                rows: n,
            });
            row_start += n;
        }
        Ok(Tensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            row_stride: layout.values,
            interleaved: false,
            chunks,
        })
    }

    /// The tensor's name (its checkpoint name for weights).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The storage type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The last dimension.
    pub fn cols(&self) -> usize {
        *self
            .shape
            .last()
            .expect("tensors have at least one dimension")
    }

    /// The product of all dimensions but the last.
    pub fn rows(&self) -> usize {
        self.numel() / self.cols()
    }

    /// Elements between the starts of consecutive rows in storage.
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    /// Whether this f16 weight is stored lane-interleaved ([`lane_unit`]) rather than
    /// row-major.
    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    /// Bytes between the starts of consecutive rows in storage (for quantised weights, of
    /// their packed values; the scales follow all of a chunk's rows).
    pub fn row_bytes(&self) -> usize {
        self.row_stride * self.dtype.bits() / 8
    }

    /// The chunks of rows, in order.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// The single buffer of an unsplit tensor.
    pub fn buffer(&self) -> &wgpu::Buffer {
        debug_assert_eq!(self.chunks.len(), 1, "{} is split", self.name);
        &self.chunks[0].buffer
    }

    /// The chunks holding rows `start..start + count`, each with the chunk-local range of
    /// those rows it holds.
    fn chunk_spans(
        &self,
        start: usize,
        count: usize,
    ) -> impl Iterator<Item = (&Chunk, std::ops::Range<usize>)> {
        self.chunks.iter().filter_map(move |chunk| {
            let lo = start.max(chunk.row_start);
            let hi = (start + count).min(chunk.row_start + chunk.rows);
            (lo < hi).then(|| (chunk, lo - chunk.row_start..hi - chunk.row_start))
        })
    }

    /// Read the tensor back as f32 values in row-major order (padding removed).
    pub fn read(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.read_rows(gpu, 0, self.rows())
    }

    /// Read rows `start..start + count` back as f32 values (padding removed), touching only
    /// the chunks that hold them.
    pub fn read_rows(&self, gpu: &Gpu, start: usize, count: usize) -> Result<Vec<f32>> {
        if start + count > self.rows() {
            return Err(Error::tensor(
                &self.name,
                format!(
                    "rows {start}..{} outside {} rows",
                    start + count,
                    self.rows()
                ),
            ));
        }
        let cols = self.cols();
        if let Some(layout) = RowLayout::new(self.dtype, cols) {
            return self.read_quantized_rows(gpu, start, count, layout);
        }
        if self.interleaved {
            return self.read_interleaved_rows(gpu, start, count);
        }
        let row_bytes = self.row_bytes() as u64;
        let mut out = Vec::with_capacity(count * cols);
        for (chunk, rows) in self.chunk_spans(start, count) {
            let offset = rows.start as u64 * row_bytes;
            let raw = gpu.read_bytes(&chunk.buffer, offset, rows.len() as u64 * row_bytes)?;
            for r in 0..rows.len() {
                let row = r * self.row_stride;
                match self.dtype {
                    DType::F32 => {
                        let v: &[f32] = bytemuck::cast_slice(&raw);
                        out.extend_from_slice(&v[row..row + cols]);
                    }
                    DType::F16 => {
                        let v: &[f16] = bytemuck::cast_slice(&raw);
                        out.extend(v[row..row + cols].iter().map(|x| x.to_f32()));
                    }
                    DType::U32 => {
                        let v: &[u32] = bytemuck::cast_slice(&raw);
                        out.extend(v[row..row + cols].iter().map(|x| *x as f32));
                    }
                    DType::Q8 | DType::Q4 => unreachable!("read_quantized_rows"),
                }
            }
        }
        Ok(out)
    }

    /// [`Tensor::read_rows`] of a lane-interleaved f16 weight: the chunks holding the rows,
    /// read whole and gathered.
    fn read_interleaved_rows(&self, gpu: &Gpu, start: usize, count: usize) -> Result<Vec<f32>> {
        let cols = self.cols();
        let units = self.row_stride / WEIGHT_ROW_ALIGN;
        let mut out = Vec::with_capacity(count * cols);
        for (chunk, rows) in self.chunk_spans(start, count) {
            let raw = gpu.read_bytes(&chunk.buffer, 0, chunk.buffer.size())?;
            let v: &[f16] = bytemuck::cast_slice(&raw);
            for r in rows {
                let row = (0..units).flat_map(|j| {
                    let at = lane_unit(chunk.rows, units, r, j) * WEIGHT_ROW_ALIGN;
                    v[at..at + WEIGHT_ROW_ALIGN].iter().map(|x| x.to_f32())
                });
                out.extend(row.take(cols));
            }
        }
        Ok(out)
    }

    /// [`Tensor::read_rows`] of a quantised weight: each chunk's packed rows and their scales,
    /// dequantised.
    fn read_quantized_rows(
        &self,
        gpu: &Gpu,
        start: usize,
        count: usize,
        layout: RowLayout,
    ) -> Result<Vec<f32>> {
        let cols = self.cols();
        let mut out = vec![0.0f32; count * cols];
        for (chunk, rows) in self.chunk_spans(start, count) {
            let (a, b) = (rows.start, rows.end);
            let lo = chunk.row_start + a;
            let data = gpu.read_bytes(
                &chunk.buffer,
                (a * layout.data_bytes) as u64,
                ((b - a) * layout.data_bytes) as u64,
            )?;
            // Copies are 4-byte aligned; Q4 rows' scales may start mid-word.
            let scales_at = chunk.rows * layout.data_bytes;
            let s0 = (scales_at + a * layout.scale_bytes) / 4 * 4;
            let s1 = (scales_at + b * layout.scale_bytes).div_ceil(4) * 4;
            let scales = gpu.read_bytes(&chunk.buffer, s0 as u64, (s1 - s0) as u64)?;
            let skip = scales_at + a * layout.scale_bytes - s0;
            for r in 0..b - a {
                let sb = skip + r * layout.scale_bytes;
                dequantize_row(
                    self.dtype,
                    &data[r * layout.data_bytes..(r + 1) * layout.data_bytes],
                    &scales[sb..sb + layout.scale_bytes],
                    &mut out[(lo - start + r) * cols..(lo - start + r + 1) * cols],
                );
            }
        }
        Ok(out)
    }
}
