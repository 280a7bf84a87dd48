//! Recording kernel dispatches. A [`Recorder`] collects dispatches (kernel, uniform parameters,
//! storage buffers, workgroup counts); [`Recorder::finish`] packs all parameters into one
//! uniform buffer, creates the bind groups once and returns a [`Plan`] that encodes every
//! dispatch into a single compute pass of one command encoder. A plan can be run again with
//! new parameters (the decode loop does this, see [`Recorder::finish_into`]) without
//! creating any GPU object.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Gpu, KernelKey};
use crate::{Error, Result};

struct PendingOp {
    key: KernelKey,
    pipeline: Arc<wgpu::ComputePipeline>,
    buffers: Vec<wgpu::Buffer>,
    param_offset: usize,
    param_size: usize,
    workgroups: [u32; 3],
}

/// Collects kernel dispatches in order. Binding 0 of every kernel is its uniform parameter
/// struct; bindings 1.. are the storage buffers in the order given.
pub struct Recorder<'g> {
    gpu: &'g Gpu,
    ops: Vec<PendingOp>,
    params: Vec<u8>,
    align: usize,
}

impl<'g> Recorder<'g> {
    /// Start an empty recording.
    pub fn new(gpu: &'g Gpu) -> Self {
        Recorder {
            gpu,
            ops: Vec::new(),
            params: Vec::new(),
            align: gpu.limits().min_uniform_buffer_offset_alignment as usize,
        }
    }

    /// The device this recorder records for.
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// Number of dispatches recorded so far.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Record one dispatch of `key` with `params` (a `#[repr(C)]` Pod struct matching the
    /// shader's uniform) and `buffers` bound at bindings 1, 2, …. Returns the op's index.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        key: &KernelKey,
        params: &P,
        buffers: &[&wgpu::Buffer],
        workgroups: [u32; 3],
    ) -> Result<usize> {
        let max = self.gpu.limits().max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) || workgroups.contains(&0) {
            return Err(Error::kernel(
                format!("{}::{}", key.shader, key.entry),
                format!("workgroup counts {workgroups:?} outside 1..={max}"),
            ));
        }
        let pipeline = self.gpu.pipeline(key)?;
        let param_offset = self.params.len().div_ceil(self.align) * self.align;
        let bytes = bytemuck::bytes_of(params);
        self.params.resize(param_offset, 0);
        self.params.extend_from_slice(bytes);
        self.ops.push(PendingOp {
            key: key.clone(),
            pipeline,
            buffers: buffers.iter().map(|b| (*b).clone()).collect(),
            param_offset,
            param_size: bytes.len(),
            workgroups,
        });
        Ok(self.ops.len() - 1)
    }

    /// Split `count` workgroups over x and y so neither exceeds the device limit. Kernels
    /// recover the linear index as `wid.x + wid.y * nwg.x` and skip indices `>= count`.
    pub fn grid(&self, count: u32) -> [u32; 3] {
        let max = self.gpu.limits().max_compute_workgroups_per_dimension;
        if count <= max {
            [count.max(1), 1, 1]
        } else {
            let y = count.div_ceil(max);
            [count.div_ceil(y), y, 1]
        }
    }

    /// Create the parameter buffer and bind groups: the recording becomes a reusable plan.
    pub fn finish(self) -> Result<Plan> {
        let gpu = self.gpu;
        let size = self.params.len().max(16).div_ceil(16) * 16;
        let params = gpu.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: size as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut host = self.params;
        host.resize(size, 0);
        gpu.queue.write_buffer(&params, 0, &host);
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut ops = Vec::with_capacity(self.ops.len());
        for op in self.ops {
            let layout = op.pipeline.get_bind_group_layout(0);
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &params,
                    offset: op.param_offset as u64,
                    size: wgpu::BufferSize::new(op.param_size as u64),
                }),
            }];
            for (i, b) in op.buffers.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: b.as_entire_binding(),
                });
            }
            let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(op.key.entry),
                layout: &layout,
                entries: &entries,
            });
            ops.push(PlannedOp {
                key: op.key,
                pipeline: op.pipeline,
                buffers: op.buffers,
                bind_group,
                param_offset: op.param_offset,
                param_size: op.param_size,
                workgroups: op.workgroups,
            });
        }
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("creating bind groups: {err}")));
        }
        Ok(Plan { params, host, ops })
    }

    /// Finish, submit and wait for completion.
    pub fn run(self) -> Result<()> {
        let gpu = self.gpu;
        self.finish()?.run(gpu)
    }

    /// Turn this recording into `plan`, reusing its parameter buffer and bind groups when the
    /// recording has the same shape (same kernels on the same buffers with the same parameter
    /// layout — e.g. the next decode step); otherwise `plan` is rebuilt. Returns whether the
    /// plan was reused.
    pub fn finish_into(self, plan: &mut Option<Plan>) -> Result<bool> {
        if let Some(p) = plan {
            let same = p.ops.len() == self.ops.len()
                && p.host.len() >= self.params.len()
                && p.ops.iter().zip(&self.ops).all(|(a, b)| {
                    a.key == b.key
                        && a.buffers == b.buffers
                        && a.param_offset == b.param_offset
                        && a.param_size == b.param_size
                });
            if same {
                p.host[..self.params.len()].copy_from_slice(&self.params);
                for (a, b) in p.ops.iter_mut().zip(&self.ops) {
                    a.workgroups = b.workgroups;
                }
                return Ok(true);
            }
        }
        *plan = Some(self.finish()?);
        Ok(false)
    }
}

struct PlannedOp {
    key: KernelKey,
    pipeline: Arc<wgpu::ComputePipeline>,
    buffers: Vec<wgpu::Buffer>,
    bind_group: wgpu::BindGroup,
    param_offset: usize,
    param_size: usize,
    workgroups: [u32; 3],
}

/// A command encoder holding `ops` in one compute pass named `label`.
fn encode(
    gpu: &Gpu,
    label: &str,
    ops: &[PlannedOp],
    timestamps: Option<&wgpu::QuerySet>,
) -> wgpu::CommandEncoder {
    let mut encoder = gpu
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: None,
        });
        for (i, op) in ops.iter().enumerate() {
            if let Some(set) = timestamps {
                pass.write_timestamp(set, i as u32);
            }
            pass.set_pipeline(&op.pipeline);
            pass.set_bind_group(0, &op.bind_group, &[]);
            let [x, y, z] = op.workgroups;
            pass.dispatch_workgroups(x, y, z);
        }
        if let Some(set) = timestamps {
            pass.write_timestamp(set, ops.len() as u32);
        }
    }
    encoder
}

/// A recorded sequence of dispatches with its bind groups, ready to run any number of times.
pub struct Plan {
    params: wgpu::Buffer,
    host: Vec<u8>,
    ops: Vec<PlannedOp>,
}

impl Plan {
    /// Number of dispatches.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the plan has no dispatches.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Upload the parameters and encode every dispatch into one compute pass; submit without
    /// waiting.
    pub fn submit(&self, gpu: &Gpu) -> wgpu::SubmissionIndex {
        self.submit_with(gpu, |_| {})
    }

    /// As [`Plan::submit`], with more commands (`extra`, e.g. a copy of the results into a
    /// readback buffer) encoded after the compute pass, in the same submission.
    pub fn submit_with(
        &self,
        gpu: &Gpu,
        extra: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> wgpu::SubmissionIndex {
        gpu.queue.write_buffer(&self.params, 0, &self.host);
        if gpu.profile.lock().is_ok_and(|p| p.is_some()) {
            return self.submit_profiled(gpu, extra);
        }
        let mut encoder = encode(gpu, "plan", &self.ops, None);
        extra(&mut encoder);
        gpu.submit(self.ops.len(), [encoder.finish()])
    }

    /// [`Plan::submit_with`] while [`Gpu::start_profile`] is on, on a device with timestamps
    /// inside passes: one submission with a timestamp before every dispatch and after the
    /// last, resolved, read back (a wait) and turned into one [`KernelTime`] per dispatch.
    /// Dispatches that the device overlaps share their time unevenly; the sum is the plan's.
    fn submit_timestamped(
        &self,
        gpu: &Gpu,
        extra: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> wgpu::SubmissionIndex {
        let count = self.ops.len() as u32 + 1;
        let bytes = 8 * u64::from(count);
        let set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let buffer = |usage| {
            gpu.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile timestamps"),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        let resolved = buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
        let readback = buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
        let mut encoder = encode(gpu, "plan", &self.ops, Some(&set));
        encoder.resolve_query_set(&set, 0..count, &resolved, 0);
        encoder.copy_buffer_to_buffer(&resolved, 0, &readback, 0, bytes);
        extra(&mut encoder);
        let index = gpu.submit(self.ops.len(), [encoder.finish()]);
        // A failed wait shows up in the caller's own wait after the plan.
        let Ok(raw) = gpu.map_read(&readback, bytes) else {
            return index;
        };
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&raw);
        let period_ns = f64::from(gpu.queue.get_timestamp_period());
        if let Ok(mut p) = gpu.profile.lock() {
            let times = p.get_or_insert_with(Vec::new);
            for (op, t) in self.ops.iter().zip(ticks.windows(2)) {
                times.push(KernelTime {
                    shader: op.key.shader,
                    entry: op.key.entry,
                    workgroups: op.workgroups,
                    seconds: t[1].saturating_sub(t[0]) as f64 * period_ns * 1e-9,
                    device_timed: true,
                });
            }
        }
        index
    }

    /// [`Plan::submit_with`] while [`Gpu::start_profile`] is on, without GPU timestamps:
    /// each dispatch in its own submission, waited for and timed on the host.
    fn submit_profiled(
        &self,
        gpu: &Gpu,
        extra: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> wgpu::SubmissionIndex {
        if gpu.gpu_timestamps() && self.ops.len() < wgpu::QUERY_SET_MAX_QUERIES as usize {
            return self.submit_timestamped(gpu, extra);
        }
        for op in &self.ops {
            let encoder = encode(gpu, op.key.entry, std::slice::from_ref(op), None);
            let start = std::time::Instant::now();
            gpu.submit(1, [encoder.finish()]);
            // A failed wait shows up in the caller's own wait after the plan.
            let _ = gpu.wait();
            let time = KernelTime {
                shader: op.key.shader,
                entry: op.key.entry,
                workgroups: op.workgroups,
                seconds: start.elapsed().as_secs_f64(),
                device_timed: false,
            };
            if let Ok(mut p) = gpu.profile.lock() {
                p.get_or_insert_with(Vec::new).push(time);
            }
        }
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("plan"),
            });
        extra(&mut encoder);
        gpu.submit(0, [encoder.finish()])
    }

    /// Submit and wait for completion (the time this takes is the longest-submission figure
    /// of [`SubmissionStats`]).
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        let start = std::time::Instant::now();
        self.submit(gpu);
        gpu.wait()?;
        gpu.submissions.count_run(start.elapsed());
        Ok(())
    }
}

/// One dispatch timed by [`Gpu::start_profile`]: between the GPU timestamps written before
/// and after it, or, on a device without timestamps inside compute passes, from its
/// submission until the device was idle again on the host clock (so including one
/// submission's overhead).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KernelTime {
    /// Shader file stem under `shaders/`.
    pub shader: &'static str,
    /// Entry point.
    pub entry: &'static str,
    /// Workgroup counts of the dispatch.
    pub workgroups: [u32; 3],
    /// Seconds it took.
    pub seconds: f64,
    /// Whether `seconds` comes from GPU timestamps (else from the host clock).
    pub device_timed: bool,
}

/// How much work went to the GPU: counted by [`Gpu`] for every submission and blocking wait
/// of the crate. Read with [`Gpu::submission_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SubmissionStats {
    /// Queue submissions (plans, readback copies and upload flushes).
    pub submissions: u64,
    /// Kernel dispatches in all of them.
    pub dispatches: u64,
    /// The most dispatches one submission carried.
    pub max_dispatches: u64,
    /// Blocking waits for the device that left it with nothing queued.
    pub waits: u64,
    /// Blocking waits for a submission while a later one was already queued (a pipelined
    /// decode step waiting for the previous step's picks): the device kept working.
    pub overlapped_waits: u64,
    /// Seconds the host spent blocked in those waits.
    pub wait_s: f64,
    /// The longest a plan took from submission to completion ([`Plan::run`]), seconds.
    pub longest_run_s: f64,
}

/// The atomic counters behind [`SubmissionStats`].
#[derive(Debug, Default)]
pub(crate) struct SubmissionCounters {
    submissions: AtomicU64,
    dispatches: AtomicU64,
    max_dispatches: AtomicU64,
    waits: AtomicU64,
    overlapped_waits: AtomicU64,
    wait_ns: AtomicU64,
    longest_run_ns: AtomicU64,
}

impl SubmissionCounters {
    pub(crate) fn count_submission(&self, dispatches: usize) {
        self.submissions.fetch_add(1, Ordering::Relaxed);
        self.dispatches
            .fetch_add(dispatches as u64, Ordering::Relaxed);
        self.max_dispatches
            .fetch_max(dispatches as u64, Ordering::Relaxed);
    }

    pub(crate) fn count_run(&self, took: std::time::Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.longest_run_ns.fetch_max(ns, Ordering::Relaxed);
    }

    pub(crate) fn count_wait(&self, took: std::time::Duration, overlapped: bool) {
        match overlapped {
            true => &self.overlapped_waits,
            false => &self.waits,
        }
        .fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.wait_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> SubmissionStats {
        SubmissionStats {
            submissions: self.submissions.load(Ordering::Relaxed),
            dispatches: self.dispatches.load(Ordering::Relaxed),
            max_dispatches: self.max_dispatches.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            overlapped_waits: self.overlapped_waits.load(Ordering::Relaxed),
            wait_s: self.wait_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            longest_run_s: self.longest_run_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }

    pub(crate) fn reset(&self) {
        for c in [
            &self.submissions,
            &self.dispatches,
            &self.max_dispatches,
            &self.waits,
            &self.overlapped_waits,
            &self.wait_ns,
            &self.longest_run_ns,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::gpu::{Recorder, Tensor, OPTIONAL_FEATURES};
    use crate::ops::elementwise::add_rows;
    use crate::ops::testutil::gpu_with_limit;

    /// A profiled plan gives the results of an unprofiled one and one time per dispatch, in
    /// order; on a device with timestamps inside passes (lavapipe has them) from the GPU, in
    /// one submission.
    #[test]
    fn profiling_times_every_dispatch() {
        let gpu = gpu_with_limit(None);
        let wanted = gpu.adapter_features() & OPTIONAL_FEATURES;
        assert!(
            gpu.device.features().contains(wanted),
            "optional features enabled"
        );
        let acc = Tensor::from_f32(&gpu, "acc", &[2, 3], &[1.0; 6]).unwrap();
        let x = Tensor::from_f32(&gpu, "x", &[2, 3], &[0.5, 1.0, 1.5, 2.0, 2.5, 3.0]).unwrap();
        let mut rec = Recorder::new(&gpu);
        for _ in 0..3 {
            add_rows(&mut rec, &acc, &x, 0, 2).unwrap();
        }
        let plan = rec.finish().unwrap();
        gpu.start_profile();
        gpu.reset_submission_stats();
        plan.run(&gpu).unwrap();
        let stats = gpu.submission_stats();
        let times = gpu.take_profile();
        assert_eq!(acc.read(&gpu).unwrap(), [2.5, 4.0, 5.5, 7.0, 8.5, 10.0]);
        assert_eq!(times.len(), 3, "{times:?}");
        for t in &times {
            assert_eq!((t.shader, t.entry), ("elementwise", "combine"));
            assert_eq!(t.device_timed, gpu.gpu_timestamps());
            assert!(t.seconds > 0.0 && t.seconds < 10.0, "{t:?}");
        }
        let submissions = if gpu.gpu_timestamps() { 1 } else { 4 };
        assert_eq!(stats.submissions, submissions, "{stats:?}");
        assert!(gpu.take_profile().is_empty(), "profiling stopped");
        plan.run(&gpu).unwrap();
        assert!(gpu.take_profile().is_empty());
    }
}
