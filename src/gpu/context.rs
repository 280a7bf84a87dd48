//! Adapter selection and device creation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::pipeline::PipelineCache;
use super::recorder::{KernelTime, SubmissionCounters, SubmissionStats};
use super::shaders;
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
    pub(crate) profile: std::sync::Mutex<Option<Vec<KernelTime>>>,
}

const NO_ADAPTER_HELP: &str = "no GPU adapter found. paligemma needs Vulkan, Metal or DX12. \
On a headless Linux machine without a GPU, install Mesa's software Vulkan driver (lavapipe): \
`apt-get install mesa-vulkan-drivers` (Mesa >= 25 recommended, e.g. from bookworm-backports). \
Check with `vulkaninfo --summary`. WGPU_BACKEND (vulkan|metal|dx12|gl) and WGPU_ADAPTER_NAME \
(a substring of the adapter name) select among several adapters.";

/// The smallest weight chunk (and so storage binding and buffer) the loaders accept, in bytes.
const MIN_WEIGHT_CHUNK: u64 = 1024;

/// One device limit the engine depends on: the `wgpu::Limits` field, the smallest value that
/// works and what needs it (a kernel as `shader::entry_point`, or the weight loader).
#[derive(Debug, Clone)]
pub struct LimitNeed {
    /// The `wgpu::Limits` field, e.g. `max_compute_workgroup_storage_size`.
    pub limit: &'static str,
    /// The smallest value that works.
    pub needed: u64,
    /// What needs that much: the kernel with the largest demand, or `weight chunks`.
    pub by: String,
    get: fn(&wgpu::Limits) -> u64,
}

impl LimitNeed {
    /// The value of this limit in `limits`.
    pub fn value(&self, limits: &wgpu::Limits) -> u64 {
        (self.get)(limits)
    }
}

/// Per-entry-point resource use of one kernel, read from its shader with naga.
struct KernelUse {
    name: String,
    workgroup_size: [u32; 3],
    workgroup_bytes: u64,
    storage_buffers: u32,
    uniform_buffers: u32,
    bind_groups: u32,
    bindings_per_group: u32,
}

fn kernel_uses() -> Vec<KernelUse> {
    let mut uses = Vec::new();
    for (shader, src) in shaders::ALL {
        // The shaders are validated by the test suite; a failure here is a build defect.
        let (module, info) = shaders::validate(shader, src).unwrap_or_else(|e| panic!("{e}"));
        for (i, ep) in module.entry_points.iter().enumerate() {
            let used = info.get_entry_point(i);
            let mut k = KernelUse {
                name: format!("{shader}::{}", ep.name),
                workgroup_size: ep.workgroup_size,
                workgroup_bytes: 0,
                storage_buffers: 0,
                uniform_buffers: 0,
                bind_groups: 0,
                bindings_per_group: 0,
            };
            for (handle, var) in module.global_variables.iter() {
                if used[handle].is_empty() {
                    continue;
                }
                match var.space {
                    naga::AddressSpace::Storage { .. } => k.storage_buffers += 1,
                    naga::AddressSpace::Uniform => k.uniform_buffers += 1,
                    // WebGPU counts each workgroup variable rounded up to 16 bytes.
                    naga::AddressSpace::WorkGroup => {
                        let size = module.types[var.ty].inner.size(module.to_ctx());
                        k.workgroup_bytes += u64::from(size.div_ceil(16) * 16);
                    }
                    _ => {}
                }
                if let Some(b) = &var.binding {
                    k.bind_groups = k.bind_groups.max(b.group + 1);
                    k.bindings_per_group = k.bindings_per_group.max(b.binding + 1);
                }
            }
            uses.push(k);
        }
    }
    uses
}

/// The device limits the engine needs, derived from every kernel in [`shaders::ALL`] (the
/// largest workgroup, workgroup memory, storage and uniform buffers and bindings of any
/// entry point) plus the loaders' smallest weight chunk. Computed once.
pub fn limit_needs() -> &'static [LimitNeed] {
    static NEEDS: OnceLock<Vec<LimitNeed>> = OnceLock::new();
    NEEDS.get_or_init(|| {
        let uses = kernel_uses();
        let most = |limit: &'static str, of: fn(&KernelUse) -> u64, get| {
            let k = uses
                .iter()
                .max_by_key(|k| of(k))
                .expect("the shaders have entry points");
            LimitNeed {
                limit,
                needed: of(k),
                by: k.name.clone(),
                get,
            }
        };
        let chunk = |limit: &'static str, get| LimitNeed {
            limit,
            needed: MIN_WEIGHT_CHUNK,
            by: "weight chunks".into(),
            get,
        };
        vec![
            most(
                "max_compute_invocations_per_workgroup",
                |k| k.workgroup_size.iter().map(|&d| u64::from(d)).product(),
                |l| l.max_compute_invocations_per_workgroup.into(),
            ),
            most(
                "max_compute_workgroup_size_x",
                |k| k.workgroup_size[0].into(),
                |l| l.max_compute_workgroup_size_x.into(),
            ),
            most(
                "max_compute_workgroup_size_y",
                |k| k.workgroup_size[1].into(),
                |l| l.max_compute_workgroup_size_y.into(),
            ),
            most(
                "max_compute_workgroup_size_z",
                |k| k.workgroup_size[2].into(),
                |l| l.max_compute_workgroup_size_z.into(),
            ),
            most(
                "max_compute_workgroup_storage_size",
                |k| k.workgroup_bytes,
                |l| l.max_compute_workgroup_storage_size.into(),
            ),
            most(
                "max_storage_buffers_per_shader_stage",
                |k| k.storage_buffers.into(),
                |l| l.max_storage_buffers_per_shader_stage.into(),
            ),
            most(
                "max_uniform_buffers_per_shader_stage",
                |k| k.uniform_buffers.into(),
                |l| l.max_uniform_buffers_per_shader_stage.into(),
            ),
            most(
                "max_bind_groups",
                |k| k.bind_groups.into(),
                |l| l.max_bind_groups.into(),
            ),
            most(
                "max_bindings_per_bind_group",
                |k| k.bindings_per_group.into(),
                |l| l.max_bindings_per_bind_group.into(),
            ),
            chunk("max_storage_buffer_binding_size", |l| {
                l.max_storage_buffer_binding_size
            }),
            chunk("max_buffer_size", |l| l.max_buffer_size),
        ]
    })
}

/// Check a device's limits and its adapter's downlevel capabilities against what the engine
/// needs; the error names every shortfall.
fn check_device(limits: &wgpu::Limits, downlevel: wgpu::DownlevelFlags) -> Result<()> {
    let mut short: Vec<String> = limit_needs()
        .iter()
        .filter(|n| n.value(limits) < n.needed)
        .map(|n| {
            format!(
                "`{}` is {} on this device, {} needs {}",
                n.limit,
                n.value(limits),
                n.by,
                n.needed
            )
        })
        .collect();
    for (flag, name, why) in [
        (
            wgpu::DownlevelFlags::COMPUTE_SHADERS,
            "COMPUTE_SHADERS",
            "every kernel",
        ),
        (
            wgpu::DownlevelFlags::SHADER_F16_IN_F32,
            "SHADER_F16_IN_F32",
            "the f16 weight kernels (unpack2x16float)",
        ),
    ] {
        if !downlevel.contains(flag) {
            short.push(format!(
                "the adapter lacks downlevel capability `{name}`, which {why} needs"
            ));
        }
    }
    if short.is_empty() {
        return Ok(());
    }
    Err(Error::Gpu(format!(
        "the device cannot run paligemma: {}. Create it with at least these limits (e.g. \
         `adapter.limits()` or `wgpu::Limits::default()`) on a Vulkan, Metal or DX12 adapter",
        short.join("; ")
    )))
}

/// Features [`Gpu::new`] enables when the adapter offers them; none is required. Subgroup
/// operations and f16 arithmetic are for kernels that can use them, timestamps (inside compute
/// passes) time each dispatch on the device ([`Gpu::start_profile`]).
pub const OPTIONAL_FEATURES: wgpu::Features = wgpu::Features::SUBGROUP
    .union(wgpu::Features::SHADER_F16)
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);

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
    /// device with all of the adapter's limits and those of [`OPTIONAL_FEATURES`] it offers.
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
        // On a CPU adapter, device memory is host memory: weight buffers that are mappable as
        // well as storage take the checkpoint's bytes directly, without a staging copy (peak
        // RSS of the full-size model 6606 -> 5740 MiB on lavapipe). On a discrete GPU they
        // would live in slow host-visible memory; integrated GPUs may gain too, but that is
        // unmeasured, so they keep the usual staging upload.
        let mut required_features = adapter.features() & OPTIONAL_FEATURES;
        if info.device_type == wgpu::DeviceType::Cpu {
            required_features |= adapter.features() & wgpu::Features::MAPPABLE_PRIMARY_BUFFERS;
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("paligemma"),
                required_features,
                required_limits: adapter.limits(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Gpu(format!("cannot open {}: {e}", info.name)))?;
        Self::from_device(&adapter, device, queue, options)
    }

    /// Run on a device the application already has (eframe's `RenderState`, bevy's
    /// `RenderDevice`): `device` and `queue` must come from `adapter`. The limits and features
    /// in force are the device's, not the adapter's; a device whose limits are too small for
    /// the kernels ([`limit_needs`]), or whose adapter cannot run compute shaders, gives an
    /// [`Error::Gpu`] naming each `wgpu::Limits` field or capability, the device's value and
    /// the value needed. No feature is required; with `MAPPABLE_PRIMARY_BUFFERS` enabled on a
    /// CPU adapter, weights are written without staging copies ([`Gpu::unified_memory`]).
    pub fn from_device(
        adapter: &wgpu::Adapter,
        device: wgpu::Device,
        queue: wgpu::Queue,
        options: GpuOptions,
    ) -> Result<Arc<Self>> {
        let info = adapter.get_info();
        let limits = device.limits();
        check_device(&limits, adapter.get_downlevel_capabilities().flags)?;
        let unified_memory = info.device_type == wgpu::DeviceType::Cpu
            && device
                .features()
                .contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
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
        if weight_chunk_bytes < MIN_WEIGHT_CHUNK {
            return Err(Error::Gpu(format!(
                "weight binding limit {weight_chunk_bytes} bytes is too small (minimum \
                 {MIN_WEIGHT_CHUNK})"
            )));
        }
        let adapter_features = adapter.features();
        log::info!(
            "adapter: {} ({:?}, {:?}, driver {} {})",
            info.name,
            info.device_type,
            info.backend,
            info.driver,
            info.driver_info
        );
        log::info!("adapter features: {adapter_features:?}");
        log::info!("device features: {:?}", device.features());
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
            profile: std::sync::Mutex::new(None),
        }))
    }

    /// One line naming the adapter, its type and backend, for logs and the CLI.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, {})",
            self.info.name, self.info.device_type, self.info.backend, self.info.driver_info
        )
    }

    /// The device limits in force (the device's own, which may be below the adapter's).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Features the adapter offers (not all are enabled on the device).
    pub fn adapter_features(&self) -> wgpu::Features {
        self.adapter_features
    }

    /// Whether dispatches can be timed on the device, with timestamps written inside compute
    /// passes (see [`Gpu::start_profile`]).
    pub fn gpu_timestamps(&self) -> bool {
        self.device.features().contains(
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
        )
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
        self.submit(0, None);
        self.wait()
    }

    /// Block until all submitted work is done.
    pub fn wait(&self) -> Result<()> {
        self.wait_until(None, false)
    }

    /// Block until submission `index` is done (later submissions may still run), counted as
    /// an overlapped wait when `later_queued`; `None` waits for all submitted work.
    fn wait_until(&self, index: Option<wgpu::SubmissionIndex>, later_queued: bool) -> Result<()> {
        let start = std::time::Instant::now();
        let done = self
            .device
            .poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: None,
            })
            .map(|_| ())
            .map_err(|e| Error::Gpu(format!("waiting for the device: {e}")));
        self.submissions.count_wait(start.elapsed(), later_queued);
        done
    }

    /// Submit `buffers` (carrying `dispatches` kernel dispatches in all) to the queue, counted
    /// in [`Gpu::submission_stats`]. Every submission of the crate goes through here.
    pub(crate) fn submit(
        &self,
        dispatches: usize,
        buffers: impl IntoIterator<Item = wgpu::CommandBuffer>,
    ) -> wgpu::SubmissionIndex {
        self.submissions.count_submission(dispatches);
        self.queue.submit(buffers)
    }

    /// Submissions, dispatches and blocking waits so far (see [`SubmissionStats`]).
    pub fn submission_stats(&self) -> SubmissionStats {
        self.submissions.snapshot()
    }

    /// Start profiling until [`Gpu::take_profile`]: on a device with `TIMESTAMP_QUERY` and
    /// `TIMESTAMP_QUERY_INSIDE_PASSES`, every plan writes a GPU timestamp between its
    /// dispatches and is waited for; otherwise every plan runs one dispatch per submission and
    /// waits for each, timing it on the host (counted as that many submissions and waits).
    /// The results are the same, only slower.
    pub fn start_profile(&self) {
        *self.profile.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// Stop profiling and return one [`KernelTime`] per dispatch run since
    /// [`Gpu::start_profile`], in order (empty if profiling was not started).
    pub fn take_profile(&self) -> Vec<KernelTime> {
        self.profile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default()
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
        self.read_through(buffer, offset, len, &staging)
    }

    /// Copy `len` bytes of `buffer` from `offset` into the mappable `staging` buffer (usage
    /// `MAP_READ | COPY_DST`, at least `len` bytes) in one submission, and read them back.
    pub(crate) fn read_through(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        len: u64,
        staging: &wgpu::Buffer,
    ) -> Result<Vec<u8>> {
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        encoder.copy_buffer_to_buffer(buffer, offset, staging, 0, len);
        self.submit(0, [encoder.finish()]);
        self.map_read(staging, len)
    }

    /// Wait for the submitted work, then map the first `len` bytes of the mappable `staging`
    /// buffer and copy them out (the buffer is unmapped again).
    pub(crate) fn map_read(&self, staging: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
        self.map_read_after(staging, len, None)
    }

    /// [`Gpu::map_read`] that waits only for submission `after.0` (`after.1`: whether later
    /// submissions are already queued, so that the device keeps working meanwhile), or for
    /// all submitted work when `after` is `None`.
    pub(crate) fn map_read_after(
        &self,
        staging: &wgpu::Buffer,
        len: u64,
        after: Option<(wgpu::SubmissionIndex, bool)>,
    ) -> Result<Vec<u8>> {
        let slice = staging.slice(..len);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        let mapped = match after {
            Some((index, later_queued)) => {
                self.wait_until(Some(index), later_queued)?;
                // The mapping resolves once every submission using the buffer is done; should
                // a later one still hold it, wait for everything.
                match rx.try_recv() {
                    Ok(r) => Ok(r),
                    Err(_) => self.wait().map(|()| rx.recv())?,
                }
            }
            None => self.wait().map(|()| rx.recv())?,
        };
        mapped
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

#[cfg(test)]
mod tests {
    use super::{check_device, limit_needs};

    fn needed(limit: &str) -> (u64, String) {
        let n = limit_needs()
            .iter()
            .find(|n| n.limit == limit)
            .unwrap_or_else(|| panic!("no need for {limit}"));
        (n.needed, n.by.clone())
    }

    /// The needs read from the shaders are the kernels' declared sizes: 256-invocation
    /// workgroups (e.g. `@workgroup_size(256, 1, 1)` in rope.wgsl, 8×8 in the tiled matmuls),
    /// 8 KiB of workgroup memory (the tiled matmuls' two 1024-float tiles), at most six
    /// storage buffers (`matvec`: x, weights, bias, out, the fused norm's weight and the GLU's
    /// second weight) and one uniform (bindings 0..=6 of one group).
    #[test]
    fn limit_needs_come_from_the_shaders() {
        assert_eq!(needed("max_compute_invocations_per_workgroup").0, 256);
        assert_eq!(needed("max_compute_workgroup_size_x").0, 256);
        assert_eq!(needed("max_compute_workgroup_size_y").0, 8);
        assert_eq!(needed("max_compute_workgroup_size_z").0, 1);
        let (bytes, by) = needed("max_compute_workgroup_storage_size");
        assert_eq!(bytes, 2 * 1024 * 4);
        assert!(by.contains("matmul"), "{by}");
        let (buffers, by) = needed("max_storage_buffers_per_shader_stage");
        assert_eq!(buffers, 6);
        assert!(by.contains("matvec"), "{by}");
        assert_eq!(needed("max_uniform_buffers_per_shader_stage").0, 1);
        assert_eq!(needed("max_bind_groups").0, 1);
        assert_eq!(needed("max_bindings_per_bind_group").0, 7);
        assert_eq!(
            needed("max_storage_buffer_binding_size"),
            (1024, "weight chunks".into())
        );
    }

    /// A device made with the WebGPU default limits runs every kernel; one with smaller limits
    /// is refused with each short limit named with the device's and the needed value.
    #[test]
    fn webgpu_default_limits_suffice_and_shortfalls_are_named() {
        let all = wgpu::DownlevelFlags::all();
        check_device(&wgpu::Limits::default(), all).unwrap();
        let small = wgpu::Limits {
            max_compute_workgroup_storage_size: 4096,
            max_storage_buffers_per_shader_stage: 2,
            ..wgpu::Limits::default()
        };
        let err = check_device(&small, all).unwrap_err().to_string();
        assert!(
            err.contains("`max_compute_workgroup_storage_size` is 4096 on this device"),
            "{err}"
        );
        assert!(err.contains("needs 8192"), "{err}");
        assert!(
            err.contains("`max_storage_buffers_per_shader_stage` is 2 on this device"),
            "{err}"
        );
        assert!(err.contains("matvec_glu_lanes needs 6"), "{err}");
        assert!(!err.contains("max_bind_groups"), "{err}");
        let err = check_device(&wgpu::Limits::default(), wgpu::DownlevelFlags::empty())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`COMPUTE_SHADERS`"), "{err}");
    }
}
