//! Compute pipelines, created once per (shader, entry point, override constants).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{shaders, Gpu};
use crate::{Error, Result};

/// Identifies one specialisation of a kernel: the shader file, its entry point and the values
/// of its `override` constants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelKey {
    /// Shader file stem under `shaders/`.
    pub shader: &'static str,
    /// Entry point in that shader.
    pub entry: &'static str,
    /// Override constants, as (name, value) pairs. Values are stored as f64 bit patterns.
    constants: Vec<(&'static str, u64)>,
}

impl KernelKey {
    /// A kernel with no override constants.
    pub fn new(shader: &'static str, entry: &'static str) -> Self {
        KernelKey {
            shader,
            entry,
            constants: Vec::new(),
        }
    }

    /// Set an `override` constant (booleans as 0/1).
    pub fn with(mut self, name: &'static str, value: impl Into<f64>) -> Self {
        self.constants.retain(|(n, _)| *n != name);
        self.constants.push((name, value.into().to_bits()));
        self.constants.sort_by_key(|(n, _)| *n);
        self
    }
}

/// The runtime checks the crate's shader modules are created with: none of wgpu's own bounds
/// clamping or loop bounding, which on an RDNA3 compiler triple `matvec`'s instructions
/// (1568 with, 471 without, issue 15) and on lavapipe cost every kernel a counter per loop and
/// a clamp per access. Integer division keeps its guard against zero (one select, and the
/// divisors are uniforms).
const TRUSTED_CHECKS: wgpu::ShaderRuntimeChecks = wgpu::ShaderRuntimeChecks {
    bounds_checks: false,
    force_loop_bounding: false,
    ray_query_initialization_tracking: false,
    task_shader_dispatch_tracking: false,
    mesh_shader_primitive_indices_clamp: false,
    int_div_checks: true,
};

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<KernelKey, Arc<wgpu::ComputePipeline>>>,
    create_nanos: AtomicU64,
}

impl Gpu {
    /// The pipeline for `key`, compiled on first use.
    pub fn pipeline(&self, key: &KernelKey) -> Result<Arc<wgpu::ComputePipeline>> {
        let cache = &self.pipelines;
        if let Some(p) = cache.pipelines.lock().expect("pipeline cache").get(key) {
            return Ok(p.clone());
        }
        let start = Instant::now();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = {
            let mut modules = cache.modules.lock().expect("shader cache");
            match modules.get(key.shader) {
                Some(m) => m.clone(),
                None => {
                    let src = shaders::source(key.shader)
                        .ok_or_else(|| Error::kernel(key.shader, "no such shader"))?;
                    let desc = wgpu::ShaderModuleDescriptor {
                        label: Some(key.shader),
                        source: wgpu::ShaderSource::Wgsl(src.into()),
                    };
                    // SAFETY: the shaders are the crate's own, not user input. Every loop
                    // has a bound computed from its uniforms (no infinite loops), every
                    // storage index is clamped or guarded in the shader itself, and the
                    // launchers check the shapes those guards rely on (tested against the
                    // CPU references). Storage accesses stay within their bindings through
                    // the driver's own robust buffer access where it has one.
                    let m = unsafe {
                        self.device
                            .create_shader_module_trusted(desc, TRUSTED_CHECKS)
                    };
                    modules.insert(key.shader, m.clone());
                    m
                }
            }
        };
        let constants: Vec<(&str, f64)> = key
            .constants
            .iter()
            .map(|(n, v)| (*n, f64::from_bits(*v)))
            .collect();
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key.entry),
                layout: None,
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::kernel(
                format!("{}::{}", key.shader, key.entry),
                format!("pipeline creation failed: {err}"),
            ));
        }
        let pipeline = Arc::new(pipeline);
        cache
            .create_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        cache
            .pipelines
            .lock()
            .expect("pipeline cache")
            .insert(key.clone(), pipeline.clone());
        Ok(pipeline)
    }

    /// Number of pipelines created so far and the wall time spent creating them (shader
    /// modules included). Drivers may defer part of the compilation to a kernel's first run.
    pub fn pipeline_stats(&self) -> (usize, Duration) {
        let count = self
            .pipelines
            .pipelines
            .lock()
            .expect("pipeline cache")
            .len();
        let nanos = self.pipelines.create_nanos.load(Ordering::Relaxed);
        (count, Duration::from_nanos(nanos))
    }
}
