//! Load a checkpoint (config + weights + tokenizer) from any model source.

use super::config::LlamaConfig;
use super::tokenizer::Tok;
use crate::source::{self, gguf::Gguf, hfdir, Resolved, Source, Weights};
use anyhow::{Context, Result};

/// Everything read from a model source, on the host.
pub struct Checkpoint {
    pub config: LlamaConfig,
    pub weights: Weights,
    pub tokenizer: Tok,
    /// The source string the user gave.
    pub source: String,
    /// The local file or directory it resolved to.
    pub location: std::path::PathBuf,
}

/// Resolve and read a model source.
pub fn load(source: &str) -> Result<Checkpoint> {
    let parsed = Source::parse(source)?;
    match parsed.resolve()? {
        Resolved::Gguf(path) => {
            let g = Gguf::open(&path)?;
            let config = LlamaConfig::from_gguf(&g)?;
            let weights = source::weights::from_gguf(&g, config.num_attention_heads, config.num_key_value_heads)?;
            let tokenizer = Tok::from_gguf(&g)?;
            check_complete(&config, &weights).with_context(|| format!("{}", path.display()))?;
            Ok(Checkpoint {
                config,
                weights,
                tokenizer,
                source: source.to_string(),
                location: path,
            })
        }
        Resolved::HfDir(dir) => {
            let config = LlamaConfig::from_hf_json(&dir.join("config.json"))?;
            let files = hfdir::safetensors_files(&dir)?;
            let weights = source::weights::from_safetensors(&files)?;
            let mut tokenizer = Tok::from_hf_dir(&dir)?;
            if tokenizer.bos_token.is_none() {
                tokenizer.bos_token = config.bos_token_id.and_then(|i| tokenizer.inner.id_to_token(i));
            }
            check_complete(&config, &weights).with_context(|| format!("{}", dir.display()))?;
            Ok(Checkpoint {
                config,
                weights,
                tokenizer,
                source: source.to_string(),
                location: dir,
            })
        }
    }
}

/// Every tensor the config needs is present with the right shape, and no other tensor is: a
/// weight the config does not describe (a bias under a Llama config, say) would otherwise be
/// dropped without a word. RoPE's cached `inv_freq` buffers (derived from the config) and a
/// tied model's saved copy of its embedding as `lm_head.weight` are allowed.
fn check_complete(cfg: &LlamaConfig, w: &Weights) -> Result<()> {
    let shapes = cfg.tensor_shapes();
    for (name, shape) in &shapes {
        let t = w.get(name).with_context(|| format!("missing tensor '{name}'"))?;
        anyhow::ensure!(
            t.shape == *shape,
            "tensor '{name}' has shape {:?}, expected {shape:?}",
            t.shape
        );
    }
    let known: std::collections::HashSet<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
    for (name, t) in &w.tensors {
        let tied_copy = name == "lm_head.weight"
            && cfg.tie_word_embeddings
            && w.get("model.embed_tokens.weight").is_some_and(|e| e.data == t.data);
        if known.contains(name.as_str()) || name.ends_with("rotary_emb.inv_freq") || tied_copy {
            continue;
        }
        anyhow::bail!(
            "tensor '{name}' is not part of the {:?} architecture the config describes (codespot would ignore it; supported model types: {})",
            cfg.arch,
            super::config::Arch::MODEL_TYPES
        );
    }
    Ok(())
}

/// A content hash of a model location: the file's SHA-256, or for a directory the SHA-256 of
/// its config.json and weight files' hashes.
pub fn source_hash(location: &std::path::Path) -> Result<String> {
    use crate::util::{sha256_bytes, sha256_file};
    if location.is_file() {
        return sha256_file(location);
    }
    let mut parts = vec![sha256_file(&location.join("config.json"))?];
    for f in hfdir::safetensors_files(location)? {
        parts.push(sha256_file(&f)?);
    }
    Ok(sha256_bytes(parts.join("\n").as_bytes()))
}
