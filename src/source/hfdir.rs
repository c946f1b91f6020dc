//! HF model directories (config.json + *.safetensors + tokenizer.json) and the HF hub.

use crate::util;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The safetensors files of an HF directory: the index's shards, or every `*.safetensors`.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: missing field 'weight_map'", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        if files.is_empty() {
            bail!("{}: field 'weight_map' names no shard", index.display());
        }
        // Shards are files of this directory: no paths out of it.
        if let Some(bad) = files.iter().find(|f| {
            let p = Path::new(f);
            p.components().count() != 1 || !matches!(p.components().next(), Some(std::path::Component::Normal(_)))
        }) {
            bail!(
                "{}: field 'weight_map' names '{bad}', which is not a file in the model directory",
                index.display()
            );
        }
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            bail!("{}: shard {} is missing", index.display(), missing.display());
        }
        return Ok(paths);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no *.safetensors files in the model directory", dir.display());
    }
    Ok(files)
}

/// Fetch (or find in the HF cache, offline) the files of a hub model; returns a directory
/// that holds them (the HF cache snapshot directory).
pub(crate) fn fetch_hub(repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    use hf_hub::{Cache, Repo, RepoType};
    let rev = revision.unwrap_or("main").to_string();
    let hf_repo = Repo::with_revision(repo.to_string(), RepoType::Model, rev.clone());
    let wanted_optional = ["tokenizer_config.json", "generation_config.json", "chat_template.jinja"];
    type Getter<'a> = Box<dyn Fn(&str) -> Result<Option<PathBuf>> + 'a>;
    let get: Getter = if util::offline() {
        let cache = Cache::from_env().repo(hf_repo.clone());
        Box::new(move |f: &str| Ok(cache.get(f)))
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .build()
            .with_context(|| format!("hf:{repo}: building the HF hub client"))?
            .repo(hf_repo.clone());
        Box::new(move |f: &str| match api.get(f) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if e.to_string().contains("404") => Ok(None),
            Err(e) => Err(anyhow::anyhow!("hf:{repo}@{rev}: fetching {f}: {e}")),
        })
    };
    let need = |f: &str| -> Result<PathBuf> {
        get(f)?.with_context(|| {
            if util::offline() {
                format!("hf:{repo}: '{f}' is not in the HF cache and HF_HUB_OFFLINE is set")
            } else {
                format!("hf:{repo}: the repository has no '{f}'")
            }
        })
    };
    let config = need("config.json")?;
    need("tokenizer.json")?;
    for f in wanted_optional {
        let _ = get(f)?;
    }
    if let Some(index) = get("model.safetensors.index.json")? {
        let text = std::fs::read_to_string(&index)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index.display()))?;
        let mut shards: Vec<String> = v["weight_map"]
            .as_object()
            .with_context(|| format!("{}: missing field 'weight_map'", index.display()))?
            .values()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        for s in shards {
            need(&s)?;
        }
    } else {
        need("model.safetensors")?;
    }
    Ok(config.parent().expect("snapshot dir").to_path_buf())
}
