//! Load a checkpoint (config + weights + tokenizer) from any model source.

use super::arch::{self, Arch, ModuleKind};
use super::config::LlamaConfig;
use super::names;
use super::tokenizer::Tok;
use crate::source::gguf::{GgmlType, Gguf};
use crate::source::weights::unpermute_rows;
use crate::source::{self, hfdir, HostTensor, Resolved, Source, Weights};
use anyhow::{bail, Context, Result};

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
            let weights = gguf_weights(&g, &config)?;
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
        let tied_copy = name == arch::LM_HEAD.hf
            && cfg.tie_word_embeddings
            && w.get(arch::EMBED.hf).is_some_and(|e| e.data == t.data);
        if known.contains(name.as_str()) || name.ends_with("rotary_emb.inv_freq") || tied_copy {
            continue;
        }
        anyhow::bail!(
            "tensor '{name}' is not part of the {:?} architecture the config describes (codespot would ignore it; supported model types: {})",
            cfg.arch,
            Arch::model_types()
        );
    }
    Ok(())
}

/// Read every tensor of a GGUF into canonical HF names (Q/K rows un-permuted).
fn gguf_weights(g: &Gguf, cfg: &LlamaConfig) -> Result<Weights> {
    let mut w = Weights::default();
    for t in &g.tensors {
        let Some(name) = arch::gguf_to_hf(&t.name) else {
            continue;
        };
        let kind = names::parse(&name).map(|p| p.kind);
        let shape = t.shape();
        let mut data = g.read_f32(t);
        // llama.cpp permutes the rows of the q and k weights for its interleaved RoPE (and of
        // their biases: a GGUF read here is a Llama, so `check_complete` refuses any bias
        // tensor before it could be used unpermuted).
        if matches!(kind, Some(ModuleKind::Q | ModuleKind::K)) && name.ends_with(".weight") {
            let heads = if kind == Some(ModuleKind::Q) {
                cfg.num_attention_heads
            } else {
                cfg.num_key_value_heads
            };
            if shape.len() != 2 || shape[0] % heads != 0 || (shape[0] / heads) % 2 != 0 {
                bail!(
                    "{}: tensor '{}' has shape {shape:?}, not [heads*head_dim, d]",
                    g.path.display(),
                    t.name
                );
            }
            data = unpermute_rows(&data, shape[0], shape[1], heads);
        }
        if t.ty == GgmlType::F32 && data.iter().any(|x| !x.is_finite()) {
            bail!("{}: tensor '{}' holds NaN or infinite values", g.path.display(), t.name);
        }
        w.insert(name, HostTensor::new(shape, data));
    }
    Ok(w)
}

/// A content hash of a model location: the file's SHA-256, or for a directory the SHA-256 of
/// its config.json and weight files' hashes.
pub(crate) fn source_hash(location: &std::path::Path) -> Result<String> {
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
