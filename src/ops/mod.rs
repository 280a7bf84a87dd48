//! One typed launcher per WGSL kernel family, each beside a plain-Rust reference of the same
//! math that the tests compare against.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod embed;
pub mod linear;
pub mod norm;
pub mod patch;
pub mod quant;
pub mod rope;
pub mod sample;
pub mod softcap;

#[cfg(test)]
pub(crate) mod testutil;

use crate::{Error, Result};

/// Activation applied in a kernel epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Act {
    /// Identity.
    #[default]
    None,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, as `gelu_pytorch_tanh`.
    GeluTanh,
}

impl Act {
    pub(crate) fn code(self) -> u32 {
        match self {
            Act::None => 0,
            Act::GeluTanh => 1,
        }
    }

    /// Apply on the CPU (reference).
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Act::None => v,
            Act::GeluTanh => {
                let u = 0.797_884_6_f32 * (v + 0.044715 * v * v * v);
                0.5 * v * (1.0 + u.clamp(-15.0, 15.0).tanh())
            }
        }
    }
}

/// How a kernel's result is combined with what the output already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Combine {
    /// `out = v`.
    #[default]
    Store,
    /// `out += v` (residual connection).
    Add,
    /// `out *= v` (gating).
    Mul,
}

impl Combine {
    pub(crate) fn code(self) -> u32 {
        match self {
            Combine::Store => 0,
            Combine::Add => 1,
            Combine::Mul => 2,
        }
    }

    /// Apply on the CPU (reference).
    pub fn apply(self, old: f32, v: f32) -> f32 {
        match self {
            Combine::Store => v,
            Combine::Add => old + v,
            Combine::Mul => old * v,
        }
    }
}

/// Convert a size to the `u32` a kernel parameter holds, or fail naming the kernel.
/// Which family of kernels a launch uses: one per adapter class, both kept in the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernels {
    /// For GPUs: the threads of a workgroup cooperate (share a tile, split k, reduce a row).
    Threads,
    /// For CPU adapters, whose workgroups are SIMD loops on one core: each lane owns whole
    /// weight rows or activation rows and walks them in vec4s, with lane-uniform loads and no
    /// barriers (`*_lanes` entry points). Needs a width that is a multiple of 4.
    Lanes,
}

impl Kernels {
    /// The family for this adapter and width: lanes on CPU adapters when `width % 4 == 0`.
    pub(crate) fn choose(gpu: &crate::gpu::Gpu, width: usize) -> Self {
        if gpu.info.device_type == wgpu::DeviceType::Cpu && width.is_multiple_of(4) {
            Kernels::Lanes
        } else {
            Kernels::Threads
        }
    }

    /// Check that this family can run `kernel` at `width` (`what` names the width).
    pub(crate) fn check(self, kernel: &str, what: &str, width: usize) -> Result<()> {
        check(
            self == Kernels::Threads || width.is_multiple_of(4),
            kernel,
            || format!("the lane kernels need {what} % 4 == 0, got {what} = {width}"),
        )
    }

    /// The families that can run a width-`width` launch (tests run each).
    #[cfg(test)]
    pub(crate) fn all_for(width: usize) -> Vec<Self> {
        let mut f = vec![Kernels::Threads];
        if width.is_multiple_of(4) {
            f.push(Kernels::Lanes);
        }
        f
    }
}

pub(crate) fn u32_arg(kernel: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::kernel(kernel, format!("{what} = {v} does not fit in u32")))
}

/// Fail with a kernel error unless `ok`.
pub(crate) fn check(ok: bool, kernel: &str, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::kernel(kernel, msg()))
    }
}
