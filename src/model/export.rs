//! Write a model as an HF directory that `transformers` loads.

use super::config::LlamaConfig;
use super::tokenizer::Tok;
use crate::source::weights::{write_safetensors, Lazy};
use crate::source::Weights;
use anyhow::{Context, Result};
use std::path::Path;

/// Write config.json, model.safetensors (f32), tokenizer.json, tokenizer_config.json and
/// generation_config.json into `out`. Built in a temp dir and renamed: all or nothing.
pub fn export_hf_dir(cfg: &LlamaConfig, w: &Weights, tok: &Tok, out: &Path, force: bool) -> Result<()> {
    crate::util::write_dir_atomic(out, force, |tmp| write_hf_files(cfg, w, tok, tmp))
}

/// The files of an HF model directory, written into an existing (temporary) directory.
pub(crate) fn write_hf_files(cfg: &LlamaConfig, w: &Weights, tok: &Tok, tmp: &Path) -> Result<()> {
    write_hf_files_with(cfg, tok, tmp, |name| w.get(name).map(Lazy::host))
}

/// [`write_hf_files`] with the weights given by name (`None` = missing): only the tensors the
/// architecture uses are asked for (a tied model has no lm_head), each read when written.
pub(crate) fn write_hf_files_with<'a>(
    cfg: &LlamaConfig,
    tok: &Tok,
    tmp: &Path,
    mut tensor: impl FnMut(&str) -> Option<Lazy<'a>>,
) -> Result<()> {
    let write = |name: &str, text: String| -> Result<()> {
        std::fs::write(tmp.join(name), text).with_context(|| format!("writing {name} in {}", tmp.display()))
    };
    write("config.json", serde_json::to_string_pretty(&cfg.to_hf_json())?)?;
    write("tokenizer.json", tok.to_json()?)?;
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tok.config_json())?,
    )?;
    let mut gen = serde_json::json!({"do_sample": false});
    if let Some(b) = cfg.bos_token_id {
        gen["bos_token_id"] = b.into();
    }
    if !cfg.eos_token_ids.is_empty() {
        gen["eos_token_id"] = cfg.eos_token_ids.clone().into();
    }
    write("generation_config.json", serde_json::to_string_pretty(&gen)?)?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let tensors = cfg
        .tensor_shapes()
        .into_iter()
        .map(|(name, _)| {
            let t = tensor(&name).with_context(|| format!("export: missing tensor '{name}'"))?;
            Ok((name, t))
        })
        .collect::<Result<Vec<_>>>()?;
    write_safetensors(tensors, &tmp.join("model.safetensors"), Some(meta), false)
}
