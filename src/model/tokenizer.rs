//! Tokenizers: HF `tokenizer.json`, or a byte-level BPE rebuilt from GGUF metadata, plus the
//! model's chat template (rendered with minijinja).

use crate::source::gguf::Gguf;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::Path;
use std::str::FromStr;

/// A tokenizer together with the model's chat template and special tokens.
pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// `tokenizer_config.json` fields to carry into an export.
    pub add_bos: bool,
}

/// One chat message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(s: &str) -> Self {
        Self {
            role: "user".into(),
            content: s.into(),
        }
    }

    pub fn assistant(s: &str) -> Self {
        Self {
            role: "assistant".into(),
            content: s.into(),
        }
    }
}

/// GPT-2 / Llama-3 style pre-tokenizer regexes.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tok {
    /// Load an HF `tokenizer.json` (with `tokenizer_config.json` beside it, if present).
    pub(crate) fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        // tokenizers 0.22 panics on some malformed sections (`expect("Helper")` in its decoder
        // deserializer): that becomes an error naming the file.
        let what = format!("{}: not a valid tokenizer.json", path.display());
        let inner = crate::util::catch_decoder_panic(&what, || {
            tokenizers::Tokenizer::from_str(&text).map_err(|e| anyhow::anyhow!("{what}: {e}"))
        })?;
        let mut tok = Self {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            add_bos: false,
        };
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
            let tok_str = |k: &str| match v.get(k) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                None => None,
            };
            tok.bos_token = tok_str("bos_token");
            tok.eos_token = tok_str("eos_token");
            tok.add_bos = v.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false);
            tok.chat_template = match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or_else(|| a.first())
                    .and_then(|t| t["template"].as_str())
                    .map(String::from),
                _ => None,
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if tok.chat_template.is_none() && jinja.is_file() {
            let t = std::fs::read_to_string(&jinja).with_context(|| format!("reading {}", jinja.display()))?;
            tok.chat_template = Some(t);
        }
        Ok(tok)
    }

    /// Rebuild the tokenizer from GGUF metadata (`tokenizer.ggml.*`): byte-level BPE from the
    /// tokens and merges, with tokens of type 3 (control) and 4 (user-defined) added as special.
    pub(crate) fn from_gguf(g: &Gguf) -> Result<Self> {
        let p = g.path.display();
        let model = g.require("tokenizer.ggml.model")?.as_str().unwrap_or("");
        if model != "gpt2" {
            bail!("{p}: tokenizer.ggml.model is '{model}': only byte-level BPE ('gpt2') GGUF tokenizers are supported; use the HF directory instead");
        }
        let strs = |key: &str| -> Result<Vec<String>> {
            g.require(key)?
                .as_array()
                .with_context(|| format!("{p}: metadata '{key}' is not an array"))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .with_context(|| format!("{p}: metadata '{key}' holds a non-string"))
                })
                .collect()
        };
        let tokens = strs("tokenizer.ggml.tokens")?;
        let merges = strs("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail!(
                "{p}: tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            );
        }
        let vocab: serde_json::Map<String, serde_json::Value> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == 3 || ty == 4)
            .map(|(i, (t, &ty))| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": ty == 3})
            })
            .collect();
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let pre_tokenizer = match pre {
            "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
                byte_level(false)]}),
            "default" | "gpt2" | "gpt-2" => byte_level(true),
            other => {
                bail!("{p}: tokenizer.ggml.pre = '{other}' is not supported (smollm, starcoder, llama-bpe, gpt2 are)")
            }
        };
        let tok_of = |key: &str| {
            g.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|i| tokens.get(i as usize))
                .cloned()
        };
        let bos_token = tok_of("tokenizer.ggml.bos_token_id");
        let eos_token = tok_of("tokenizer.ggml.eos_token_id");
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let post_processor = match (&bos_token, add_bos) {
            (Some(b), true) => json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b.as_str(): {"id": b, "ids": [tokens.iter().position(|t| t == b).unwrap_or(0)], "tokens": [b]}}}),
            _ => serde_json::Value::Null,
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let inner = tokenizers::Tokenizer::from_str(&spec.to_string())
            .map_err(|e| anyhow::anyhow!("{p}: building the BPE tokenizer from tokenizer.ggml.*: {e}"))?;
        let chat_template = g
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(String::from);
        Ok(Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
            add_bos,
        })
    }

    /// Encode text; special tokens written in the text map to their single ids.
    /// `add_special` adds what the tokenizer's post-processor adds (e.g. BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids to text, keeping special tokens visible.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    /// Decode, dropping special tokens.
    pub(crate) fn decode_clean(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end generation: the EOS token and common end-of-turn tokens present in the vocab.
    pub fn stop_ids(&self, config_eos: &[u32]) -> Vec<u32> {
        let mut v: Vec<u32> = config_eos.to_vec();
        for t in self.eos_token.iter().map(String::as_str).chain([
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            "<|endoftext|>",
        ]) {
            if let Some(i) = self.token_id(t) {
                v.push(i);
            }
        }
        v.sort();
        v.dedup();
        v
    }

    /// Render the chat template. Without a template, a plain `role: content` layout is used.
    pub fn apply_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let Some(tpl) = &self.chat_template else {
            let mut s: String = messages
                .iter()
                .map(|m| format!("{}: {}\n", m.role, m.content))
                .collect();
            if add_generation_prompt {
                s.push_str("assistant: ");
            }
            return Ok(s);
        };
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", tpl)
            .context("the model's chat template does not parse")?;
        let t = env.get_template("chat")?;
        let out = t
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .context("rendering the chat template")?;
        Ok(out)
    }

    /// The `tokenizer.json` text (for export).
    pub(crate) fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("serialising tokenizer: {e}"))
    }

    /// A `tokenizer_config.json` for export.
    pub(crate) fn config_json(&self) -> serde_json::Value {
        let mut v = json!({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
                           "clean_up_tokenization_spaces": false, "model_max_length": 131072});
        if let Some(b) = &self.bos_token {
            v["bos_token"] = json!(b);
        }
        if let Some(e) = &self.eos_token {
            v["eos_token"] = json!(e);
        }
        if let Some(t) = &self.chat_template {
            v["chat_template"] = json!(t);
        }
        v
    }
}
