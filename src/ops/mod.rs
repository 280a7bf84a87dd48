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
