//! The GPU runtime: device and adapter choice ([`Gpu`]), tensors whose storage may be split
//! across several bindings ([`Tensor`]), the shader registry and pipeline cache, and the
//! [`Recorder`] that records a sequence of kernel dispatches into one command encoder.

mod context;
mod pipeline;
pub mod quantize;
mod recorder;
pub mod shaders;
mod tensor;

pub use context::{limit_needs, Gpu, GpuOptions, LimitNeed, OPTIONAL_FEATURES};
pub use pipeline::KernelKey;
pub use recorder::{KernelTime, Plan, Recorder, SubmissionStats};
pub use tensor::{DType, Tensor, WEIGHT_ROW_ALIGN};
