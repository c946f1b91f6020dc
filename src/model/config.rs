//! Llama architecture configuration, read from HF `config.json` or GGUF metadata.

use super::arch::{self, Arch, Dim, Slot};
use crate::source::gguf::Gguf;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RopeLayout {
    /// HF `rotate_half`: dimension i pairs with i + head_dim/2.
    #[default]
    Half,
    /// llama.cpp / original Meta: dimension 2i pairs with 2i+1.
    Interleaved,
}

/// Which RoPE frequency scaling a config asks for (`rope_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RopeKind {
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    #[default]
    Llama3,
    /// Position interpolation: every frequency divided by `factor`.
    Linear,
}

/// RoPE frequency scaling, from `rope_scaling` (transformers 4) or `rope_parameters`
/// (transformers 5). The three band fields are used by `llama3` only (0 for `linear`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(default)]
    pub kind: RopeKind,
    pub factor: f64,
    #[serde(default)]
    pub low_freq_factor: f64,
    #[serde(default)]
    pub high_freq_factor: f64,
    #[serde(default)]
    pub original_max_position_embeddings: usize,
}

/// The RoPE types codespot computes (`rope_type` values), for error messages.
const ROPE_TYPES: &str = "default, llama3, linear";

/// RoPE scaling from one `rope_scaling` / `rope_parameters` object (`key` names it in errors).
fn rope_scaling_of(rs: &serde_json::Value, key: &str) -> Result<Option<RopeScaling>> {
    let ty = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        rs.get(k).and_then(|x| x.as_f64()).with_context(|| {
            format!("config field '{key}.{k}' is missing or not a number (needed by rope_type '{ty}')")
        })
    };
    if let Some(p) = rs.get("partial_rotary_factor").and_then(|x| x.as_f64()) {
        if p != 1.0 {
            bail!("config field '{key}.partial_rotary_factor' = {p}: partial rotary embeddings are not implemented");
        }
    }
    Ok(match ty {
        "default" => None,
        "llama3" => Some(RopeScaling {
            kind: RopeKind::Llama3,
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        "linear" => Some(RopeScaling {
            kind: RopeKind::Linear,
            factor: num("factor")?,
            low_freq_factor: 0.0,
            high_freq_factor: 0.0,
            original_max_position_embeddings: 0,
        }),
        other => bail!("config field '{key}.rope_type' = '{other}' is not supported (supported: {ROPE_TYPES})"),
    })
}

/// `rope_theta` and the scaling, from transformers 5's `rope_parameters` or the older top-level
/// `rope_theta` + `rope_scaling`. Where both forms are present they must agree: a key that
/// changes the arithmetic is read or refused, never skipped.
fn rope_of(v: &serde_json::Value) -> Result<(f64, Option<RopeScaling>)> {
    let present = |k: &str| v.get(k).filter(|x| !x.is_null());
    let old_theta = match present("rope_theta") {
        None => None,
        Some(x) => Some(x.as_f64().context("config field 'rope_theta' is not a number")?),
    };
    let old_scaling = match present("rope_scaling") {
        None => None,
        Some(rs) => rope_scaling_of(rs, "rope_scaling")?,
    };
    let Some(rp) = present("rope_parameters") else {
        return Ok((old_theta.unwrap_or(10000.0), old_scaling));
    };
    if !rp.is_object() {
        bail!("config field 'rope_parameters' is not an object");
    }
    // Per-layer-type parameters (`{"full_attention": {...}, "sliding_attention": {...}}`).
    if rp.get("rope_type").is_none() && rp.as_object().is_some_and(|o| o.values().any(|x| x.is_object())) {
        bail!(
            "config field 'rope_parameters' holds per-layer-type RoPE settings, which only non-Llama architectures use"
        );
    }
    let theta = match rp.get("rope_theta").filter(|x| !x.is_null()) {
        Some(x) => x
            .as_f64()
            .context("config field 'rope_parameters.rope_theta' is not a number")?,
        None => old_theta.context("config field 'rope_parameters.rope_theta' is missing")?,
    };
    if let Some(t) = old_theta {
        if t != theta {
            bail!("config fields 'rope_theta' ({t}) and 'rope_parameters.rope_theta' ({theta}) disagree");
        }
    }
    let scaling = rope_scaling_of(rp, "rope_parameters")?;
    if present("rope_scaling").is_some() && old_scaling != scaling {
        bail!("config fields 'rope_scaling' and 'rope_parameters' describe different RoPE scalings");
    }
    Ok((theta, scaling))
}

/// Config keys that change the arithmetic in ways codespot does not implement: an error names
/// the key rather than computing another model than the one the checkpoint describes.
fn refuse_unsupported(v: &serde_json::Value, arch: Arch) -> Result<()> {
    // Qwen2's q/k/v biases are its architecture's, not a key's.
    for k in ["attention_bias", "mlp_bias"] {
        if v.get(k).and_then(|x| x.as_bool()) == Some(true) {
            bail!("config field '{k}' is true: these projection biases are not implemented (Qwen2's q/k/v biases are)");
        }
    }
    for k in ["hidden_act", "hidden_activation"] {
        if let Some(a) = v.get(k).and_then(|x| x.as_str()) {
            let act = arch.spec().activation;
            if !act.accepts(k, a) {
                bail!(
                    "config field '{k}' is '{a}': only {} is implemented for {arch:?}",
                    act.describe()
                );
            }
        }
    }
    if v.get("use_bidirectional_attention").and_then(|x| x.as_bool()) == Some(true) {
        bail!("config field 'use_bidirectional_attention' is true: only causal attention is implemented");
    }
    if let Some(p) = v.get("partial_rotary_factor").and_then(|x| x.as_f64()) {
        if p != 1.0 {
            bail!("config field 'partial_rotary_factor' = {p}: partial rotary embeddings are not implemented");
        }
    }
    if let Some(types) = v.get("layer_types").and_then(|x| x.as_array()) {
        if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
            bail!("config field 'layer_types' has a {t} layer: only full attention is implemented");
        }
    }
    if let Some(w) = v.get("sliding_window").and_then(|x| x.as_u64()) {
        let max = v
            .get("max_position_embeddings")
            .and_then(|x| x.as_u64())
            .unwrap_or(4096);
        // Qwen2 configs carry a window that `use_sliding_window` (default false) leaves off.
        let used = v
            .get("use_sliding_window")
            .and_then(|x| x.as_bool())
            .unwrap_or(arch.spec().sliding_window_by_default);
        if used && w < max {
            bail!(
                "config field 'sliding_window' = {w} (below max_position_embeddings {max}): sliding-window attention is not implemented"
            );
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rope_layout: RopeLayout,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The family, as `config.json`'s `model_type` says (Llama unless stated).
    #[serde(default, skip_serializing_if = "Arch::is_llama")]
    pub arch: Arch,
    /// The q, k and v projections have biases (Qwen2).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qkv_bias: bool,
}

impl LlamaConfig {
    /// A small random-init config for tests and examples.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            rope_layout: RopeLayout::Half,
            tie_word_embeddings: true,
            max_position_embeddings: 512,
            bos_token_id: None,
            eos_token_ids: vec![],
            arch: Arch::Llama,
            qkv_bias: false,
        }
    }

    /// [`LlamaConfig::tiny`] with Gemma's block.
    pub fn tiny_gemma(vocab_size: usize) -> Self {
        Self {
            arch: Arch::Gemma,
            ..Self::tiny(vocab_size)
        }
    }

    /// The factor the embedding rows are multiplied by on the way in: √hidden for Gemma (in
    /// the weights' dtype, as transformers), else 1.
    pub(crate) fn embed_scale(&self) -> Option<f64> {
        // transformers keeps it in a float32 buffer.
        self.arch
            .spec()
            .embed_scale
            .then(|| (self.hidden_size as f64).sqrt() as f32 as f64)
    }

    /// [`LlamaConfig::tiny`] with Qwen2's block (q, k and v biases).
    pub fn tiny_qwen2(vocab_size: usize) -> Self {
        Self {
            arch: Arch::Qwen2,
            qkv_bias: Arch::Qwen2.spec().qkv_bias,
            ..Self::tiny(vocab_size)
        }
    }

    pub fn validate(&self) -> Result<()> {
        let nz = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        // Upper bounds far beyond any Llama (405B has 126 layers, 16384 hidden, 53248
        // intermediate, 128 heads, a 128256 vocabulary), so a corrupt header cannot make the
        // tensor list or a shape product allocate without bound before the weights are checked.
        let max = [1usize << 24, 1 << 18, 1 << 20, 1 << 12, 1 << 12, 1 << 12, 1 << 12];
        for ((k, v), m) in nz.into_iter().zip(max) {
            if v == 0 {
                bail!("field '{k}' must be positive");
            }
            if v > m {
                bail!("field '{k}' = {v} is implausibly large (at most {m})");
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim ({}) must be even for RoPE", self.head_dim);
        }
        Ok(())
    }

    /// Parameter count implied by the config.
    pub fn num_params(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The length of dimension `d` in this config.
    pub(crate) fn dim(&self, d: Dim) -> usize {
        match d {
            Dim::Vocab => self.vocab_size,
            Dim::Hidden => self.hidden_size,
            Dim::Inner => self.intermediate_size,
            Dim::QueryWidth => self.num_attention_heads * self.head_dim,
            Dim::KvWidth => self.num_key_value_heads * self.head_dim,
        }
    }

    /// The shape of slot `s` in this config.
    pub(crate) fn shape_of(&self, s: &Slot) -> Vec<usize> {
        s.shape.iter().map(|&d| self.dim(d)).collect()
    }

    /// Every canonical tensor with its expected shape, in `Llama::params` order: the embedding,
    /// each layer's [`arch::BLOCK`], the final norm, the untied head, then each layer's
    /// [`arch::BIASES`] where the family has them.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let layers = 0..self.num_hidden_layers;
        let mut v = vec![(arch::EMBED.hf.to_string(), self.shape_of(&arch::EMBED))];
        for l in layers.clone() {
            v.extend(arch::BLOCK.iter().map(|s| (arch::layer_name(l, s), self.shape_of(s))));
        }
        v.push((arch::FINAL_NORM.hf.into(), self.shape_of(&arch::FINAL_NORM)));
        if !self.tie_word_embeddings {
            v.push((arch::LM_HEAD.hf.into(), self.shape_of(&arch::LM_HEAD)));
        }
        if self.qkv_bias {
            for l in layers {
                v.extend(arch::BIASES.iter().map(|s| (arch::layer_name(l, s), self.shape_of(s))));
            }
        }
        v
    }

    /// Index in `Llama::params` of layer `l`'s block slot `j` (in [`arch::BLOCK`] order).
    pub(crate) fn block_index(&self, l: usize, j: usize) -> usize {
        1 + arch::BLOCK.len() * l + j
    }

    /// Index in `Llama::params` of the final norm.
    pub(crate) fn final_norm_index(&self) -> usize {
        // After the embedding and every layer's block slots.
        1 + arch::BLOCK.len() * self.num_hidden_layers
    }

    /// Index in `Llama::params` of layer `l`'s bias `j` (in [`arch::BIASES`] order).
    pub(crate) fn bias_index(&self, l: usize, j: usize) -> usize {
        let before = self.final_norm_index() + 1 + usize::from(!self.tie_word_embeddings);
        before + arch::BIASES.len() * l + j
    }

    /// Read an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_hf_str(&text).with_context(|| format!("{}", path.display()))
    }

    pub(crate) fn from_hf_str(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).context("invalid JSON")?;
        let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let Some(arch) = Arch::from_model_type(mt) else {
            bail!(
                "field 'model_type' is '{mt}': the supported architectures are {}",
                Arch::model_types()
            );
        };
        let req = |k: &str| -> Result<usize> {
            v.get(k)
                .with_context(|| format!("missing config field '{k}'"))?
                .as_u64()
                .map(|x| x as usize)
                .with_context(|| format!("config field '{k}' is not a non-negative integer"))
        };
        let opt_f = |k: &str, d: f64| -> Result<f64> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(d),
                Some(x) => x
                    .as_f64()
                    .with_context(|| format!("config field '{k}' is not a number")),
            }
        };
        let heads = req("num_attention_heads")?;
        let hidden = req("hidden_size")?;
        let kv = match v.get("num_key_value_heads") {
            None | Some(serde_json::Value::Null) => heads,
            Some(_) => req("num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            None | Some(serde_json::Value::Null) => hidden / heads.max(1),
            Some(_) => req("head_dim")?,
        };
        refuse_unsupported(&v, arch)?;
        let (rope_theta, rope_scaling) = rope_of(&v)?;
        let ids = |k: &str| -> Vec<u32> {
            match v.get(k) {
                Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
                _ => vec![],
            }
        };
        let cfg = Self {
            vocab_size: req("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: opt_f("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            rope_layout: RopeLayout::Half,
            // transformers' own default: Gemma ties, the others do not.
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|t| t.as_bool())
                .unwrap_or(arch.spec().tied_by_default),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(|x| x.as_u64())
                .unwrap_or(4096) as usize,
            bos_token_id: ids("bos_token_id").first().copied(),
            eos_token_ids: ids("eos_token_id"),
            arch,
            qkv_bias: arch.spec().qkv_bias,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The HF `config.json` for this architecture (what `export` writes).
    pub(crate) fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.arch.spec().hf_class],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.arch.spec().activation.hf_name(),
            "torch_dtype": "float32",
        });
        match self.arch {
            Arch::Llama => {
                v["attention_bias"] = false.into();
                v["mlp_bias"] = false.into();
            }
            Arch::Qwen2 => {
                v["use_sliding_window"] = false.into();
                v["max_window_layers"] = self.num_hidden_layers.into();
            }
            Arch::Gemma => v["attention_bias"] = false.into(),
        }
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [e] => v["eos_token_id"] = (*e).into(),
            es => v["eos_token_id"] = es.into(),
        }
        match &self.rope_scaling {
            None => {}
            Some(rs) if rs.kind == RopeKind::Linear => {
                v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": rs.factor});
            }
            Some(rs) => {
                v["rope_scaling"] = serde_json::json!({
                    "rope_type": "llama3",
                    "factor": rs.factor,
                    "low_freq_factor": rs.low_freq_factor,
                    "high_freq_factor": rs.high_freq_factor,
                    "original_max_position_embeddings": rs.original_max_position_embeddings,
                });
            }
        }
        v
    }

    /// Read the architecture from GGUF metadata (`{arch}.*` keys).
    pub(crate) fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g
            .require("general.architecture")?
            .as_str()
            .with_context(|| format!("{}: metadata 'general.architecture' is not a string", g.path.display()))?
            .to_string();
        if arch != "llama" {
            bail!(
                "{}: general.architecture is '{arch}': only 'llama' is supported",
                g.path.display()
            );
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = g.require_u64(&k("embedding_length"))? as usize;
        let heads = g.require_u64(&k("attention.head_count"))? as usize;
        let kv = match g.get(&k("attention.head_count_kv")) {
            Some(_) => g.require_u64(&k("attention.head_count_kv"))? as usize,
            None => heads,
        };
        let head_dim = match g.get(&k("attention.key_length")) {
            Some(_) => g.require_u64(&k("attention.key_length"))? as usize,
            None => hidden / heads.max(1),
        };
        let vocab = match g.get(&k("vocab_size")) {
            Some(_) => g.require_u64(&k("vocab_size"))? as usize,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(|a| a.len())
                .with_context(|| format!("{}: missing metadata field '{}'", g.path.display(), k("vocab_size")))?,
        };
        let tok_id = |key: &str| g.get(key).and_then(|v| v.as_u64()).map(|x| x as u32);
        let cfg = Self {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: g.require_u64(&k("feed_forward_length"))? as usize,
            num_hidden_layers: g.require_u64(&k("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: g.require_f64(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta: g.get(&k("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10000.0),
            rope_scaling: None,
            rope_layout: RopeLayout::Half,
            tie_word_embeddings: g.tensor(arch::LM_HEAD.gguf).is_none(),
            max_position_embeddings: g.get(&k("context_length")).and_then(|v| v.as_u64()).unwrap_or(4096) as usize,
            bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: tok_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            arch: Arch::Llama,
            qkv_bias: false,
        };
        cfg.validate().with_context(|| format!("{}", g.path.display()))?;
        Ok(cfg)
    }

    /// RoPE inverse frequencies (with llama3 scaling when configured).
    /// RoPE's frequency of each of a head's `head_dim` dimensions, in the configured layout
    /// (pairs `(i, i + hd/2)` for the half layout, `(2j, 2j + 1)` for the interleaved one).
    pub(crate) fn rope_dim_freqs(&self) -> Vec<f64> {
        let (hd, inv) = (self.head_dim, self.rope_inv_freq());
        (0..hd)
            .map(|i| match self.rope_layout {
                RopeLayout::Half => inv[i % (hd / 2)],
                RopeLayout::Interleaved => inv[i / 2],
            })
            .collect()
    }

    pub(crate) fn rope_inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd);
                match &self.rope_scaling {
                    None => f,
                    Some(s) if s.kind == RopeKind::Linear => f / s.factor,
                    Some(s) => {
                        let old = s.original_max_position_embeddings as f64;
                        let low_wl = old / s.low_freq_factor;
                        let high_wl = old / s.high_freq_factor;
                        let wl = 2.0 * std::f64::consts::PI / f;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / s.factor
                        } else {
                            let smooth = (old / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2"#;

    fn cfg(extra: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_hf_str(&format!("{{{BASE}{extra}}}"))
    }

    #[test]
    fn qwen2_reads_with_qkv_biases_and_other_architectures_are_refused() {
        let q = LlamaConfig::from_hf_str(&format!(
            "{{{}, \"use_sliding_window\": false, \"sliding_window\": 4096, \"max_window_layers\": 28, \"max_position_embeddings\": 32768}}",
            BASE.replace("\"llama\"", "\"qwen2\"")
        ))
        .unwrap();
        assert_eq!((q.arch, q.qkv_bias), (Arch::Qwen2, true));
        // Three biases a layer: q (4 heads × 8) and k, v (2 × 8).
        assert_eq!(
            q.num_params()
                - LlamaConfig {
                    arch: Arch::Llama,
                    qkv_bias: false,
                    ..q.clone()
                }
                .num_params(),
            2 * (32 + 16 + 16)
        );
        assert_eq!(q.to_hf_json()["model_type"], "qwen2");
        assert!(q
            .tensor_shapes()
            .iter()
            .any(|(n, s)| n == "model.layers.1.self_attn.v_proj.bias" && *s == vec![16]));
        // Gemma: GeGLU (its legacy "gelu" means the tanh form), (1 + w) norms, scaled embeddings.
        let g = LlamaConfig::from_hf_str(&format!(
            "{{{}, \"hidden_act\": \"gelu\", \"head_dim\": 8}}",
            BASE.replace("\"llama\"", "\"gemma\"")
        ))
        .unwrap();
        assert!(g.arch == Arch::Gemma && g.arch.norm_plus_one() && g.arch.gelu_gate());
        assert_eq!(g.embed_scale(), Some((32f64).sqrt() as f32 as f64));
        assert_eq!(g.to_hf_json()["hidden_act"], "gelu_pytorch_tanh");
        let e = cfg(r#", "hidden_act": "gelu""#).unwrap_err().to_string();
        assert!(e.contains("hidden_act") && e.contains("silu"), "{e}");
        // Gemma ties by default; an exact-GELU `hidden_activation` is refused by name.
        assert!(g.tie_word_embeddings);
        let e = LlamaConfig::from_hf_str(&format!(
            "{{{}, \"hidden_activation\": \"gelu\"}}",
            BASE.replace("\"llama\"", "\"gemma\"")
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("hidden_activation") && e.contains("gelu_pytorch_tanh"),
            "{e}"
        );
        // Mistral's block is Llama's.
        let m = LlamaConfig::from_hf_str(&format!("{{{}}}", BASE.replace("\"llama\"", "\"mistral\""))).unwrap();
        assert_eq!((m.arch, m.qkv_bias), (Arch::Llama, false));
        for mt in ["gemma2", "phi3"] {
            let e = LlamaConfig::from_hf_str(&format!("{{{}}}", BASE.replace("\"llama\"", &format!("\"{mt}\""))))
                .unwrap_err()
                .to_string();
            assert!(e.contains(mt) && e.contains("llama, mistral, qwen2, gemma"), "{e}");
        }
        // A sliding layer is refused by name.
        let e = cfg(r#", "layer_types": ["full_attention", "sliding_attention"]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer_types") && e.contains("sliding_attention"), "{e}");
    }

    #[test]
    fn transformers5_rope_parameters_read_as_the_older_keys() {
        let old = cfg(
            r#", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        let new = cfg(
            r#", "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(new.rope_theta, 500000.0);
        assert_eq!(new.rope_scaling.as_ref().map(|s| s.kind), Some(RopeKind::Llama3));
        // The scaling changes the frequencies (it is not read and dropped).
        let plain = cfg(r#", "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}"#).unwrap();
        assert_eq!(plain.rope_scaling, None);
        assert_ne!(plain.rope_inv_freq(), new.rope_inv_freq());
        // Both forms present and agreeing is fine; disagreeing is refused.
        cfg(r#", "rope_theta": 7.0, "rope_parameters": {"rope_theta": 7.0, "rope_type": "default"}"#).unwrap();
        let e = cfg(r#", "rope_theta": 7.0, "rope_parameters": {"rope_theta": 8.0, "rope_type": "default"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_parameters.rope_theta"), "{e}");
    }

    #[test]
    fn linear_rope_divides_every_frequency() {
        let plain = cfg(r#", "rope_theta": 10000.0"#).unwrap();
        let lin = cfg(r#", "rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}"#).unwrap();
        for (a, b) in plain.rope_inv_freq().iter().zip(lin.rope_inv_freq()) {
            assert_eq!(a / 4.0, b);
        }
        // Export writes it back in a form that reads the same.
        let back = LlamaConfig::from_hf_str(&lin.to_hf_json().to_string()).unwrap();
        assert_eq!(back, lin);
    }

    #[test]
    fn keys_that_change_the_arithmetic_are_refused_by_name() {
        for (extra, key) in [
            (
                r#", "rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}"#,
                "rope_parameters.rope_type",
            ),
            (
                r#", "rope_scaling": {"type": "dynamic", "factor": 2.0}"#,
                "rope_scaling.rope_type",
            ),
            (r#", "attention_bias": true"#, "attention_bias"),
            (r#", "mlp_bias": true"#, "mlp_bias"),
            (r#", "hidden_act": "gelu""#, "hidden_act"),
            (r#", "partial_rotary_factor": 0.5"#, "partial_rotary_factor"),
            (
                r#", "sliding_window": 16, "max_position_embeddings": 4096"#,
                "sliding_window",
            ),
            (
                r#", "rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0}"#,
                "rope_parameters.low_freq_factor",
            ),
        ] {
            let e = format!("{:#}", cfg(extra).unwrap_err());
            assert!(e.contains(key), "{extra}: {e}");
        }
        // Their harmless values pass.
        cfg(r#", "attention_bias": false, "mlp_bias": false, "hidden_act": "silu", "sliding_window": null"#).unwrap();
    }
}
