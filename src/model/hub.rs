//! Finding a model on disk: a directory, or a repository id in the local Hugging Face cache.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Find a model: a directory path, or `org/name` in the local Hugging Face cache
/// (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`): the snapshot `refs/main` names, else the
/// newest one.
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    resolve_model_dir_at(spec, None)
}

/// [`resolve_model_dir`] at a given `revision` of a cached `org/name` model: a branch or tag
/// (a file under the repository's `refs/`) or a snapshot's commit hash. A revision with a
/// directory path is an error.
pub fn resolve_model_dir_at(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        if let Some(rev) = revision {
            return Err(Error::Model(format!(
                "{spec} is a directory; a revision ({rev}) selects a snapshot of an org/name \
                 model in the Hugging Face cache"
            )));
        }
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
    let repo = hub_cache_dir().join(format!("models--{}--{}", parts[0], parts[1]));
    let snapshots = repo.join("snapshots");
    if let Some(rev) = revision {
        return snapshot_at(spec, &repo, rev);
    }
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

/// The local Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HF_HOME") {
            Some(home) => PathBuf::from(home).join("hub"),
            None => std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".cache/huggingface/hub"),
        },
    }
}

/// The `org/name` of every model in [`hub_cache_dir`] that has at least one snapshot,
/// sorted (for model pickers; each resolves with [`resolve_model_dir`]).
pub fn cached_models() -> Vec<String> {
    models_in(&hub_cache_dir())
}

fn models_in(hub: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(hub) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let folder = e.file_name().into_string().ok()?;
            let (org, name) = folder.strip_prefix("models--")?.split_once("--")?;
            let has_snapshot = std::fs::read_dir(e.path().join("snapshots"))
                .ok()?
                .any(|s| s.is_ok_and(|s| s.path().is_dir()));
            has_snapshot.then(|| format!("{org}/{name}"))
        })
        .collect();
    names.sort();
    names
}

/// The snapshot of `repo` (the cache folder of model `spec`) at `rev`: `refs/rev` if it
/// exists, else the snapshot named `rev`. The error lists what the cache holds.
fn snapshot_at(spec: &str, repo: &Path, rev: &str) -> Result<PathBuf> {
    let snapshots = repo.join("snapshots");
    let bad = rev.is_empty() || rev.contains("..") || rev.starts_with('/');
    if !bad {
        if let Ok(hash) = std::fs::read_to_string(repo.join("refs").join(rev)) {
            let dir = snapshots.join(hash.trim());
            if dir.is_dir() {
                return Ok(dir);
            }
        }
        let dir = snapshots.join(rev);
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let list = |dir: PathBuf| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|e| {
                e.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    Err(Error::Model(format!(
        "model {spec} has no revision {rev:?} in the local Hugging Face cache ({}); refs: [{}], \
         snapshots: [{}]",
        repo.display(),
        list(repo.join("refs")).join(", "),
        list(snapshots).join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_models_lists_repositories_with_a_snapshot() {
        let hub = std::env::temp_dir().join(format!("pg-hub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&hub);
        for dir in [
            "models--google--paligemma-3b-mix-224/snapshots/abc",
            "models--acme--tiny/snapshots/0123",
            "models--empty--repo/snapshots",
            "datasets--some--data/snapshots/1",
        ] {
            std::fs::create_dir_all(hub.join(dir)).unwrap();
        }
        assert_eq!(
            models_in(&hub),
            ["acme/tiny", "google/paligemma-3b-mix-224"]
        );
        assert!(models_in(&hub.join("missing")).is_empty());
        std::fs::remove_dir_all(&hub).unwrap();
    }
}
