//! Shared test helpers: tiny random models and a tiny byte-level GGUF.
#![allow(dead_code)]

use codespot::model::LlamaConfig;
use codespot::source::gguf::{self, Value};
use std::path::{Path, PathBuf};

/// GPT-2's byte → unicode map (so every byte is one printable vocab symbol).
pub fn byte_symbols() -> Vec<String> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![String::new(); 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap().to_string();
    }
    out
}

/// Vocabulary of a tiny byte-level model: 2 specials + 256 bytes + a few merges.
pub fn tiny_vocab() -> (Vec<String>, Vec<u64>, Vec<String>) {
    let mut tokens = vec!["<|im_start|>".to_string(), "<|im_end|>".to_string()];
    let mut types = vec![3u64, 3];
    let syms = byte_symbols();
    tokens.extend(syms.iter().cloned());
    types.extend(std::iter::repeat_n(1, 256));
    let sp = &syms[b' ' as usize];
    let merges = vec![
        format!("{sp} {sp}"),
        "d e".into(),
        "de f".into(),
        "r e".into(),
        "re t".into(),
    ];
    tokens.extend([
        format!("{sp}{sp}"),
        "de".into(),
        "def".into(),
        "re".into(),
        "ret".into(),
    ]);
    types.extend([1, 1, 1, 1, 1]);
    (tokens, types, merges)
}

/// Write a tiny random Llama as a GGUF (F32 tensors, llama.cpp's permuted Q/K rows) and
/// return its path and config.
pub fn tiny_gguf(dir: &Path, seed: u64, tied: bool) -> (PathBuf, LlamaConfig) {
    let (tokens, types, merges) = tiny_vocab();
    let mut cfg = LlamaConfig::tiny(tokens.len());
    cfg.tie_word_embeddings = tied;
    cfg.bos_token_id = Some(0);
    cfg.eos_token_ids = vec![1];
    let w = codespot::model::llama::random_weights(&cfg, seed);
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::Str("llama".into())),
        ("llama.block_count", Value::U64(cfg.num_hidden_layers as u64)),
        ("llama.embedding_length", Value::U64(cfg.hidden_size as u64)),
        ("llama.feed_forward_length", Value::U64(cfg.intermediate_size as u64)),
        ("llama.attention.head_count", Value::U64(cfg.num_attention_heads as u64)),
        ("llama.attention.head_count_kv", Value::U64(cfg.num_key_value_heads as u64)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F64(cfg.rms_norm_eps)),
        ("llama.rope.freq_base", Value::F64(cfg.rope_theta)),
        ("llama.context_length", Value::U64(512)),
        ("tokenizer.ggml.model", Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Value::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.iter().map(|t| Value::Str(t.clone())).collect())),
        ("tokenizer.ggml.token_type", Value::Array(types.iter().map(|t| Value::I64(*t as i64)).collect())),
        ("tokenizer.ggml.merges", Value::Array(merges.iter().map(|m| Value::Str(m.clone())).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U64(0)),
        ("tokenizer.ggml.eos_token_id", Value::U64(1)),
        ("tokenizer.chat_template", Value::Str(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into())),
    ];
    let to_gguf = |name: &str| -> String {
        let hf = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = hf.iter().find(|(h, _)| *h == name) {
            return g.to_string();
        }
        let rest = name.strip_prefix("model.layers.").unwrap();
        let (l, leaf) = rest.split_once('.').unwrap();
        let g = match leaf {
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            _ => panic!("{leaf}"),
        };
        format!("blk.{l}.{g}")
    };
    let mut owned: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, t) in &w.tensors {
        let mut data = t.data.clone();
        if name.ends_with("q_proj.weight") {
            data = codespot::source::weights::permute_rows(&data, t.shape[0], t.shape[1], cfg.num_attention_heads);
        } else if name.ends_with("k_proj.weight") {
            data = codespot::source::weights::permute_rows(&data, t.shape[0], t.shape[1], cfg.num_key_value_heads);
        }
        owned.push((to_gguf(name), t.shape.clone(), data));
    }
    let tensors: Vec<(&str, Vec<usize>, &[f32])> = owned
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.clone(), d.as_slice()))
        .collect();
    let path = dir.join("tiny.gguf");
    gguf::write_f32(&path, &meta, &tensors).unwrap();
    (path, cfg)
}

/// The real default model's GGUF (fetched into the cache by `.ci/run` or on first use).
pub fn default_gguf() -> PathBuf {
    match codespot::source::Source::parse("default").unwrap().resolve().unwrap() {
        codespot::source::Resolved::Gguf(p) => p,
        other => panic!("default resolved to {other:?}"),
    }
}

/// A corpora directory with one language made of small generated "python" files.
pub fn tiny_corpora(dir: &std::path::Path, files: usize) -> codespot::data::Corpora {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("pkg")).unwrap();
    for i in 0..files {
        let body: String = (0..12)
            .map(|j| format!("def f_{i}_{j}(x):\n    return x * {j} + {i}  # ret def\n\n"))
            .collect();
        std::fs::write(src.join("pkg").join(format!("m{i}.py")), body).unwrap();
    }
    std::fs::write(src.join("pkg").join("tiny.py"), "x = 1\n").unwrap(); // too small: skipped
    std::fs::write(
        src.join("pkg").join("dup.py"),
        std::fs::read(src.join("pkg").join("m0.py")).unwrap(),
    )
    .unwrap(); // duplicate
    std::fs::write(
        src.join("pkg").join("gen.py"),
        format!("# Generated by protoc. DO NOT EDIT.\n{}", "y = 2\n".repeat(60)),
    )
    .unwrap();
    std::fs::write(src.join("pkg").join("notes.txt"), "not code ".repeat(50)).unwrap(); // not included
    let cdir = dir.join("corpora");
    std::fs::create_dir_all(&cdir).unwrap();
    std::fs::write(
        cdir.join("toy.toml"),
        format!("language = \"toy\"\n[[sources]]\nkind = \"dir\"\nroots = [\"/no/such/root\", \"{}\"]\ninclude = [\"**/*.py\"]\n", src.display()),
    )
    .unwrap();
    codespot::data::Corpora { dir: cdir }
}

/// Tiny corpora with two languages: `toy` (python-like) and `toyrs` (rust-like), built.
pub fn two_language_corpora(dir: &Path, gguf: &Path) -> codespot::data::Corpora {
    let corpora = tiny_corpora(dir, 60);
    let src = dir.join("rs");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..60 {
        let body: String = (0..10)
            .map(|j| format!("fn g_{i}_{j}(x: i64) -> i64 {{\n    x * {j} - {i}\n}}\n\n"))
            .collect();
        std::fs::write(src.join(format!("m{i}.rs")), body).unwrap();
    }
    std::fs::write(
        corpora.dir.join("toyrs.toml"),
        format!(
            "language = \"toyrs\"\n[[sources]]\nkind = \"dir\"\nroots = [\"{}\"]\ninclude = [\"**/*.rs\"]\n",
            src.display()
        ),
    )
    .unwrap();
    let tok = codespot::model::load(gguf.to_str().unwrap()).unwrap().tokenizer;
    for l in ["toy", "toyrs"] {
        codespot::data::build(&corpora, l, 64.0, &tok, "tiny", false).unwrap();
    }
    corpora
}

/// A recipe for the tiny model and `two_language_corpora`: the same first twelve lines
/// (tests name lines 2, 3, 7, 10, 11, 12), then `train_rest` inside `[train]`, then `tail`.
pub fn tiny_recipe(name: &str, gguf: &Path, out: &Path, train_rest: &str, tail: &str) -> String {
    format!(
        "name = \"{name}\"\nmodel = \"{}\"\nlanguages = [\"toy\", \"toyrs\"]\nout = \"{}\"\n\n[train]\nsteps = 4\nbatch = 2\nseq_len = 16\nlr = 3e-3\nwarmup = 1\ncheckpoint_every = 2\nformat = \"raw\"\n{train_rest}\n[importance]\ntokens = 64\nseq_len = 16\nbatch = 2\n{tail}",
        gguf.display(),
        out.display()
    )
}

pub fn tensorboard_python() -> PathBuf {
    std::env::var_os("CODESPOT_TB_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tb-venv/bin/python"))
}

/// Every tag of a TensorBoard dir, read by TensorBoard's EventAccumulator.
pub fn read_tensorboard(dir: &Path) -> serde_json::Value {
    let py = tensorboard_python();
    assert!(
        py.exists(),
        "{} is missing: scripts/setup.sh makes the venv with TensorBoard",
        py.display()
    );
    let out = std::process::Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/read_tensorboard.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Tiny configs that exercise the fused CPU path's cases: tied heads and half RoPE, untied heads
/// and interleaved RoPE, query groups of 3 with a 16-wide head.
#[allow(dead_code)]
/// Tiny Qwen2 (q, k, v biases, untied head) and Gemma (`1 + w` norms, GELU, scaled
/// embeddings) configs, which the hand-written block also runs.
pub fn other_archs() -> [LlamaConfig; 2] {
    let mut qwen2 = LlamaConfig::tiny_qwen2(64);
    qwen2.tie_word_embeddings = false;
    [qwen2, LlamaConfig::tiny_gemma(64)]
}

pub fn fused_variants() -> [LlamaConfig; 3] {
    let mut untied = LlamaConfig::tiny(64);
    untied.tie_word_embeddings = false;
    untied.rope_layout = codespot::model::RopeLayout::Interleaved;
    let mut wide = LlamaConfig::tiny(64);
    (
        wide.hidden_size,
        wide.num_attention_heads,
        wide.num_key_value_heads,
        wide.head_dim,
    ) = (48, 6, 2, 16);
    wide.intermediate_size = 80;
    [LlamaConfig::tiny(64), untied, wide]
}
