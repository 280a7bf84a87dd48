//! The crate's error type: every failure names what went wrong and where.

use std::path::PathBuf;

/// Errors produced by the engine. Each variant carries enough context (a path, a tensor name,
/// a shape) for the message alone to tell the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable GPU adapter, or the device could not be created.
    #[error("GPU: {0}")]
    Gpu(String),
    /// A file could not be read or written.
    #[error("{path}: {err}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error (part of the message, so not repeated as a source).
        err: std::io::Error,
    },
    /// A model directory or one of its files is missing or malformed.
    #[error("model: {0}")]
    Model(String),
    /// A tensor is missing, has the wrong shape or an unsupported dtype.
    #[error("tensor `{name}`: {msg}")]
    Tensor {
        /// The tensor's name in the checkpoint.
        name: String,
        /// What is wrong with it.
        msg: String,
    },
    /// An input image could not be decoded or is unreasonable.
    #[error("image {path}: {msg}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A prompt or generation request is invalid.
    #[error("request: {0}")]
    Request(String),
    /// A shader or kernel launch was given inconsistent arguments (a bug or a bad model shape).
    #[error("kernel `{kernel}`: {msg}")]
    Kernel {
        /// The kernel's name.
        kernel: String,
        /// What is wrong.
        msg: String,
    },
    /// A load was cancelled through its [`crate::model::CancelToken`]; everything it had
    /// allocated has been freed.
    #[error("cancelled")]
    Cancelled,
}

impl Error {
    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }

    /// A tensor error.
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }

    /// A kernel argument error.
    pub fn kernel(kernel: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Kernel {
            kernel: kernel.into(),
            msg: msg.into(),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
