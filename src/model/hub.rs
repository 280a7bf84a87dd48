//! Finding a model on disk: a directory, or a repository id in the local Hugging Face cache.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Find a model: a directory path, or `org/name` in the local Hugging Face cache
/// (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let how = "download it first, e.g. accept the Gemma licence on the model's Hugging Face page, \
               then `huggingface-cli download google/paligemma-3b-mix-224` (or `git clone` the \
               repository) and use the downloaded directory as the model path";
    let parts: Vec<&str> = spec.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) || path.exists() {
        return Err(Error::Model(format!(
            "{spec} is not a model directory; {how}"
        )));
    }
    let hub = match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HF_HOME") {
            Some(home) => PathBuf::from(home).join("hub"),
            None => std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".cache/huggingface/hub"),
        },
    };
    let repo = hub.join(format!("models--{}--{}", parts[0], parts[1]));
    let snapshots = repo.join("snapshots");
    if let Ok(main) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(main.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let newest = std::fs::read_dir(&snapshots).ok().and_then(|entries| {
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
            .map(|e| e.path())
    });
    newest.ok_or_else(|| {
        Error::Model(format!(
            "model {spec} is not in the local Hugging Face cache ({}); {how}",
            repo.display()
        ))
    })
}
