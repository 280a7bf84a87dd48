//! Adapter selection and device creation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::pipeline::PipelineCache;
use super::recorder::{SubmissionCounters, SubmissionStats};
use crate::{Error, Result};

/// Options for opening the GPU.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Split weights into bindings of at most this many bytes, even when the device allows
    /// more. Used by tests to exercise the split path on small models; `None` uses the device
    /// limit. The environment variable `PALIGEMMA_MAX_BINDING` (bytes) sets the same.
    pub weight_binding_limit: Option<u64>,
}

/// An open GPU device with its queue, limits and pipeline cache.
pub struct Gpu {
    /// The wgpu device.
    pub device: wgpu::Device,
    /// The device's queue.
    pub queue: wgpu::Queue,
    /// What the adapter says about itself.
    pub info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    adapter_features: wgpu::Features,
    weight_chunk_bytes: u64,
    unified_memory: bool,
    pub(crate) pipelines: PipelineCache,
    bytes_created: AtomicU64,
    pub(crate) submissions: SubmissionCounters,
}

const NO_ADAPTER_HELP: &str = "no GPU adapter found. paligemma needs Vulkan, Metal or DX12. \
On a headless Linux machine without a GPU, install Mesa's software Vulkan driver (lavapipe): \
`apt-get install mesa-vulkan-drivers` (Mesa >= 25 recommended, e.g. from bookworm-backports). \
Check with `vulkaninfo --summary`. WGPU_BACKEND (vulkan|metal|dx12|gl) and WGPU_ADAPTER_NAME \
(a substring of the adapter name) select among several adapters.";

fn adapter_rank(kind: wgpu::DeviceType) -> u32 {
    match kind {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

impl Gpu {
    /// Open the best adapter (honouring `WGPU_BACKEND` and `WGPU_ADAPTER_NAME`) and create a
    /// device with all of the adapter's limits.
    pub fn new(options: GpuOptions) -> Result<Arc<Self>> {
        pollster::block_on(Self::new_async(options))
    }

    /// Async variant of [`Gpu::new`].
    pub async fn new_async(options: GpuOptions) -> Result<Arc<Self>> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if wgpu::Backends::from_env().is_none() {
            desc.backends = wgpu::Backends::PRIMARY;
        }
        let instance = wgpu::Instance::new(desc);
        let mut adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        if adapters.is_empty() {
            return Err(Error::Gpu(NO_ADAPTER_HELP.into()));
        }
        if let Ok(wanted) = std::env::var("WGPU_ADAPTER_NAME") {
            let wanted = wanted.to_lowercase();
            let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&wanted));
            if adapters.is_empty() {
                return Err(Error::Gpu(format!(
                    "WGPU_ADAPTER_NAME={wanted:?} matches none of the adapters: {}",
                    names.join(", ")
                )));
            }
        }
        adapters.sort_by_key(|a| adapter_rank(a.get_info().device_type));
        let adapter = adapters.swap_remove(0);
        let info = adapter.get_info();
        let limits = adapter.limits();
        let adapter_features = adapter.features();
        // On a CPU adapter, device memory is host memory: weight buffers that are mappable as
        // well as storage take the checkpoint's bytes directly, without a staging copy (peak
        // RSS of the full-size model 6606 -> 5740 MiB on lavapipe). On a discrete GPU they
        // would live in slow host-visible memory; integrated GPUs may gain too, but that is
        // unmeasured, so they keep the usual staging upload.
        let unified_memory = info.device_type == wgpu::DeviceType::Cpu
            && adapter_features.contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
        let required_features = if unified_memory {
            wgpu::Features::MAPPABLE_PRIMARY_BUFFERS
        } else {
            wgpu::Features::empty()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("paligemma"),
                required_features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Gpu(format!("cannot open {}: {e}", info.name)))?;
        let device_max = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let env_limit = match std::env::var("PALIGEMMA_MAX_BINDING") {
            Ok(v) => Some(v.parse::<u64>().map_err(|_| {
                Error::Gpu(format!("PALIGEMMA_MAX_BINDING={v:?} is not a byte count"))
            })?),
            Err(_) => None,
        };
        let forced = options.weight_binding_limit.or(env_limit);
        let weight_chunk_bytes = forced.map_or(device_max, |f| f.min(device_max));
        if weight_chunk_bytes < 1024 {
            return Err(Error::Gpu(format!(
                "weight binding limit {weight_chunk_bytes} bytes is too small (minimum 1024)"
            )));
        }
        log::info!(
            "adapter: {} ({:?}, {:?}, driver {} {})",
            info.name,
            info.device_type,
            info.backend,
            info.driver,
            info.driver_info
        );
        log::info!("adapter features: {adapter_features:?}");
        log::info!(
            "limits: max storage binding {} MiB, max buffer {} MiB, workgroup storage {} B, \
             invocations {}, subgroup size {}..{}; weight chunks <= {} KiB",
            limits.max_storage_buffer_binding_size >> 20,
            limits.max_buffer_size >> 20,
            limits.max_compute_workgroup_storage_size,
            limits.max_compute_invocations_per_workgroup,
            info.subgroup_min_size,
            info.subgroup_max_size,
            weight_chunk_bytes >> 10
        );
        Ok(Arc::new(Gpu {
            device,
            queue,
            info,
            limits,
            adapter_features,
            weight_chunk_bytes,
            unified_memory,
            pipelines: PipelineCache::default(),
            bytes_created: AtomicU64::new(0),
            submissions: SubmissionCounters::default(),
        }))
    }

    /// One line naming the adapter, its type and backend, for logs and the CLI.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, {})",
            self.info.name, self.info.device_type, self.info.backend, self.info.driver_info
        )
    }

    /// The device limits in force.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Features the adapter offers (not all are enabled on the device).
    pub fn adapter_features(&self) -> wgpu::Features {
        self.adapter_features
    }

    /// The largest single storage binding for activations, in bytes.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// The largest chunk a weight is split into, in bytes.
    pub fn weight_chunk_bytes(&self) -> u64 {
        self.weight_chunk_bytes
    }

    /// Whether f16 weights are stored lane-interleaved ([`super::tensor::lane_unit`]), the
    /// layout the CPU adapters' kernels stream fastest: on CPU adapters only.
    pub fn interleave_weights(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Whether weights are written straight into mappable storage buffers (CPU adapters, whose
    /// device memory is host memory) instead of through staging copies.
    pub fn unified_memory(&self) -> bool {
        self.unified_memory
    }

    /// Create a buffer, adding its size to [`Gpu::bytes_created`]. Every buffer of the crate
    /// goes through here.
    pub fn create_buffer(&self, desc: &wgpu::BufferDescriptor) -> wgpu::Buffer {
        self.bytes_created.fetch_add(desc.size, Ordering::Relaxed);
        self.device.create_buffer(desc)
    }

    /// Total size in bytes of all buffers created so far through [`Gpu::create_buffer`]
    /// (freed buffers are not subtracted): the difference across a load or a request is the
    /// GPU memory it allocated.
    pub fn bytes_created(&self) -> u64 {
        self.bytes_created.load(Ordering::Relaxed)
    }

    /// Finish the copies of buffers written since the last submission (`mapped_at_creation`
    /// and `write_buffer` uploads): wgpu keeps each one's staging memory until a submission
    /// completes, so loaders call this after every chunk to hold one chunk of staging memory
    /// at a time instead of a second copy of the whole model.
    pub fn flush_uploads(&self) -> Result<()> {
        self.submissions.count_submission(0);
        self.queue.submit(None);
        self.wait()
    }

    /// Block until all submitted work is done.
    pub fn wait(&self) -> Result<()> {
        self.submissions.count_wait();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Gpu(format!("waiting for the device: {e}")))
    }

    /// Submissions, dispatches and blocking waits so far (see [`SubmissionStats`]).
    pub fn submission_stats(&self) -> SubmissionStats {
        self.submissions.snapshot()
    }

    /// Start counting [`Gpu::submission_stats`] from zero.
    pub fn reset_submission_stats(&self) {
        self.submissions.reset()
    }

    /// Copy `len` bytes of `buffer` starting at `offset` back to the host.
    pub fn read_bytes(&self, buffer: &wgpu::Buffer, offset: u64, len: u64) -> Result<Vec<u8>> {
        let staging = self.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: len,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, len);
        self.submissions.count_submission(0);
        self.queue.submit([encoder.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| Error::Gpu("readback callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("mapping a readback buffer: {e}")))?;
        let data = slice
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("reading a readback buffer: {e}")))?
            .to_vec();
        staging.unmap();
        Ok(data)
    }
}
