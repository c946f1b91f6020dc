//! Memory plan of a recipe (`codespot plan`): bytes per device for scoring and for tuning, from
//! the model's config, the recipe's dtype, devices, batch and seq-len, and whether that fits a
//! device of a given size. Data parallelism replicates the model on every device (no sharded
//! optimizer state), so per-device memory does not fall with more devices; only tuning's rows
//! per device do.
//!
//! Activations are estimated per block from the tensors the block's autodiff graph keeps
//! (10·hidden + 2·kv + 5·intermediate values a token, plus the attention scores and their
//! softmax), which reproduces the ~75 MB a block measured at batch 4 × 256 on the default
//! model; the rest are exact sizes of what codespot holds.

use crate::importance::Method;
use crate::model::{Dtype, LlamaConfig};
use crate::recipe::Recipe;
use anyhow::{Context, Result};
use serde::Serialize;

const GIB: f64 = (1u64 << 30) as f64;

/// One item of a stage's memory.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub what: String,
    pub bytes: u64,
}

/// Peak bytes per device of one stage.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub name: String,
    pub items: Vec<Item>,
    pub total: u64,
}

impl Stage {
    fn new(name: &str, items: Vec<(String, u64)>) -> Self {
        let items: Vec<Item> = items
            .into_iter()
            .filter(|x| x.1 > 0)
            .map(|(what, bytes)| Item { what, bytes })
            .collect();
        let total = items.iter().map(|i| i.bytes).sum();
        Self {
            name: name.into(),
            items,
            total,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub params: u64,
    pub dtype: Dtype,
    pub devices: usize,
    pub stages: Vec<Stage>,
    /// Host RAM to load the model (f32 host copy) and to write a tuning checkpoint.
    pub host_load: u64,
    pub host_checkpoint: u64,
    /// Host RAM holding AdamW's moments (`train.offload_optimizer`), else 0.
    pub host_optimizer: u64,
    /// ZeRO stage (`train.zero`).
    pub zero: usize,
}

/// Bytes a block's autodiff graph keeps for `rows` sequences of `t` tokens.
pub(crate) fn block_activation_bytes(cfg: &LlamaConfig, rows: usize, t: usize, dtype: Dtype) -> u64 {
    let (d, kv, ff) = (
        cfg.hidden_size as u64,
        (cfg.num_key_value_heads * cfg.head_dim) as u64,
        cfg.intermediate_size as u64,
    );
    let tokens = (rows * t) as u64;
    let per_token = (10 * d + 2 * kv + 5 * ff) * dtype.bytes() as u64;
    // Scores in the weights' dtype, widened to f32, the f32 softmax (and its cast back).
    let score_bytes = match dtype {
        Dtype::F32 => 8,
        _ => 12,
    };
    let attn = rows as u64 * cfg.num_attention_heads as u64 * (t * t) as u64 * score_bytes;
    tokens * per_token + attn
}

/// The largest single parameter tensor, in elements.
fn largest_tensor(cfg: &LlamaConfig) -> u64 {
    cfg.tensor_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .max()
        .unwrap_or(0)
}

/// Activations of one backward pass (`model::backprop`): saved block inputs, the kept blocks'
/// graphs, one re-run block, and the chunked head; on the f32 CPU path (`model::fused`) every
/// block's kept activations.
fn activations(cfg: &LlamaConfig, rows: usize, t: usize, keep: usize, dtype: Dtype, fused: bool) -> Vec<(String, u64)> {
    let layers = cfg.num_hidden_layers;
    if fused {
        // `model::fused`: every block keeps x, q, k, v, the attention output, x2, gate, up (and
        // per-row statistics); one block's backward temporaries; the head's logit chunk.
        let tokens = (rows * t) as u64;
        let (d, qw, kw, ff) = (
            cfg.hidden_size as u64,
            (cfg.num_attention_heads * cfg.head_dim) as u64,
            (cfg.num_key_value_heads * cfg.head_dim) as u64,
            cfg.intermediate_size as u64,
        );
        let lse = (rows * cfg.num_attention_heads * t) as u64;
        let block = 4 * (tokens * (2 * d + 2 * qw + 2 * kw + 2 * ff + 2) + lse);
        let temps = 4 * tokens * (2 * ff + 3 * d + 2 * qw + 2 * kw) + 2 * 4 * 4 * (t * t) as u64;
        return vec![
            (
                format!(
                    "every block's kept activations ({layers} × {:.0} MiB)",
                    block as f64 / 1048576.0
                ),
                layers as u64 * block,
            ),
            ("one block's backward temporaries".into(), temps),
            ("head chunk (logits, ∂h)".into(), 4 * (1u64 << 24) + 2 * tokens * d * 4),
        ];
    }
    let keep = keep.min(layers);
    let d = cfg.hidden_size as u64;
    let tokens = (rows * t) as u64;
    let a = block_activation_bytes(cfg, rows, t, dtype);
    let head = 4 * (1u64 << 24) * 4 + tokens * d * 4;
    vec![
        (
            format!("saved block inputs ({} × {rows}×{t}×{d})", layers - keep),
            (layers - keep) as u64 * tokens * d * dtype.bytes() as u64,
        ),
        (
            format!("kept blocks' graphs ({keep} × {:.0} MiB)", a as f64 / 1048576.0),
            keep as u64 * a,
        ),
        ("one re-run block's graph".into(), if keep < layers { a } else { 0 }),
        ("head chunks (logits, softmax, ∂h)".into(), head),
    ]
}

/// The plan of a recipe for a model config.
pub fn plan(cfg: &LlamaConfig, r: &Recipe) -> Plan {
    let n = cfg.num_params() as u64;
    let wb = r.dtype.bytes() as u64;
    let vocab_d = (cfg.vocab_size * cfg.hidden_size) as u64;
    let big = largest_tensor(cfg);
    let i = &r.importance;
    let sums = match i.method {
        Method::Taylor2 => 2,
        _ => 1,
    } * n
        * 4;
    // Embedding scatter-add and the head's ∂W (f32), a block gradient with its |θ ⊙ g| temporaries.
    let inflight = 2 * vocab_d * 4 + 3 * big * 4;
    let weights = (format!("weights ({} × {n})", r.dtype.name()), n * wb);
    let offload = r.train.offload_optimizer;
    // ZeRO stage 1: each device holds its shard of the optimizer state.
    let shards = if r.train.zero > 0 { r.devices.max(1) as u64 } else { 1 };
    let moments = if offload {
        // Streamed per tensor around its update: the largest tensor's two moments at a time.
        (
            "AdamW moments in flight (offloaded: the largest tensor's 2 × f32)".to_string(),
            2 * big * 4,
        )
    } else {
        match shards {
            1 => ("AdamW moments (2 × f32)".to_string(), 2 * n * 4),
            s => (
                format!("AdamW moments (2 × f32), this device's 1/{s} shard"),
                2 * n * 4 / s,
            ),
        }
    };
    // Scoring: the weights, the sums, a gradient at a time and one backward's activations.
    // One device sums the two halves of the batches apart (the split-half noise floor); data-
    // parallel runs record no floor.
    let halves = if r.devices == 1 && i.agreement { sums } else { 0 };
    let fused = r.dtype == Dtype::F32 && r.device == crate::backend::DeviceKind::Cpu;
    let scoring = [
        (format!("Taylor sums (f32, {})", i.method.name()), sums),
        ("second half's sums (noise floor, f32)".into(), halves),
        ("gradients in flight (f32)".into(), inflight),
    ]
    .into_iter()
    .filter(|x| x.1 > 0)
    .chain(activations(
        cfg,
        i.micro_batch.min(i.batch),
        i.seq_len,
        i.keep_blocks,
        r.dtype,
        fused,
    ));
    let score: Vec<_> = std::iter::once(weights.clone()).chain(scoring.clone()).collect();

    let t = &r.train;
    let rows = t.batch.div_ceil(r.devices).min(t.micro_batch);
    // bf16/f16 weights are tuned through f32 master copies held beside the moments.
    let master = (
        "f32 master weights (low-precision tuning)".to_string(),
        if r.dtype == Dtype::F32 { 0 } else { n * 4 / shards },
    );
    let mut step = vec![
        weights.clone(),
        master.clone(),
        moments.clone(),
        ("gradient sum of a step (f32)".into(), n * 4),
        // The tensor-op AdamW allocates a few copies of the largest tensor; the fused one none.
        (
            "update temporaries (f32)".into(),
            if fused { inflight } else { 4 * big * 4 + inflight },
        ),
    ];
    step.extend(activations(cfg, rows, t.seq_len, t.keep_blocks, r.dtype, fused));
    // At a checkpoint the step's gradients are gone and a snapshot is scored beside the optimizer.
    let ckpt: Vec<_> = [weights, master, moments].into_iter().chain(scoring).collect();
    Plan {
        params: n,
        dtype: r.dtype,
        devices: r.devices,
        stages: vec![
            Stage::new("score (importance snapshot)", score),
            Stage::new("tune: a training step", step),
            Stage::new("tune: snapshot at a checkpoint", ckpt),
        ],
        host_load: n * 4,
        host_checkpoint: n * 4 * 3,
        host_optimizer: if offload { 2 * n * 4 } else { 0 },
        zero: r.train.zero,
    }
}

/// A device size to check against: a name and GiB.
#[derive(Debug, Clone)]
pub struct DeviceMemory {
    pub name: String,
    pub gib: f64,
}

impl std::str::FromStr for DeviceMemory {
    type Err = String;
    /// `NAME=GIB` or `GIB`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, v) = s.split_once('=').unwrap_or((s, s));
        let gib: f64 = v
            .trim()
            .trim_end_matches("GiB")
            .parse()
            .map_err(|_| format!("'{s}': expected NAME=GIB or GIB (e.g. H100=80)"))?;
        if !(gib.is_finite() && gib > 0.0) {
            return Err(format!("'{s}': memory must be positive"));
        }
        let name = if name == v {
            format!("{gib} GiB")
        } else {
            name.to_string()
        };
        Ok(Self { name, gib })
    }
}

/// The devices `plan` checks against by default.
pub(crate) fn default_memories() -> Vec<DeviceMemory> {
    [("this CPU (RAM)", 24.0), ("H100", 80.0), ("H200", 141.0)]
        .into_iter()
        .map(|(n, g)| DeviceMemory { name: n.into(), gib: g })
        .collect()
}

/// The model config for a plan: `config` (an HF config.json) if given, else the source's own,
/// read without downloading weights (an `hf:` source must be in the HF cache).
pub(crate) fn model_config(source: &str, config: Option<&std::path::Path>) -> Result<LlamaConfig> {
    use crate::source::Source;
    if let Some(p) = config {
        return LlamaConfig::from_hf_json(p);
    }
    match Source::parse(source)? {
        Source::HfDir(d) => LlamaConfig::from_hf_json(&d.join("config.json")),
        Source::Hub { repo, revision } => {
            let rev = revision.unwrap_or_else(|| "main".into());
            let cached = hf_hub::Cache::from_env()
                .repo(hf_hub::Repo::with_revision(repo.clone(), hf_hub::RepoType::Model, rev))
                .get("config.json")
                .with_context(|| {
                    format!("hf:{repo}: config.json is not in the HF cache; pass --config FILE (e.g. recipes/configs/)")
                })?;
            LlamaConfig::from_hf_json(&cached)
        }
        s @ (Source::Gguf(_) | Source::Pypi { .. }) => match s.resolve()? {
            crate::source::Resolved::Gguf(p) => LlamaConfig::from_gguf(&crate::source::gguf::Gguf::open(&p)?),
            crate::source::Resolved::HfDir(d) => LlamaConfig::from_hf_json(&d.join("config.json")),
        },
    }
}

fn gib(b: u64) -> String {
    format!("{:.2}", b as f64 / GIB)
}

/// The plan as text: a table per stage and the fit against each device size.
pub fn text(p: &Plan, memories: &[DeviceMemory]) -> String {
    let mut s = format!(
        "{:.2} B parameters, weights in {}, {} data-parallel device(s), each holding {}.\n",
        p.params as f64 / 1e9,
        p.dtype.name(),
        p.devices,
        if p.zero > 0 && p.devices > 1 {
            "the weights and its shard of the optimizer state (ZeRO stage 1)"
        } else {
            "a full replica"
        }
    );
    for st in &p.stages {
        s += &format!("\n{} — per device\n", st.name);
        s += "| item | GiB |\n|---|---:|\n";
        for it in &st.items {
            s += &format!("| {} | {} |\n", it.what, gib(it.bytes));
        }
        s += &format!("| **total** | **{}** |\n", gib(st.total));
    }
    let peak_tune = p.stages[1].total.max(p.stages[2].total);
    s += &format!(
        "\nHost RAM: {} GiB to load the model (f32 host copy, freed tensor by tensor), {} GiB to write a tuning checkpoint (f32 weights + both moments).\n\n",
        gib(p.host_load),
        gib(p.host_checkpoint)
    );
    if p.host_optimizer > 0 {
        s += &format!(
            "Host RAM while tuning: {} GiB of AdamW moments (train.offload_optimizer), each tensor's streamed to the device around its update.\n\n",
            gib(p.host_optimizer)
        );
    }
    s += "| device | GiB | score | tune |\n|---|---:|---|---|\n";
    for m in memories {
        let fits = |b: u64| {
            let need = b as f64 / GIB;
            if need <= 0.9 * m.gib {
                "fits".to_string()
            } else if need <= m.gib {
                "tight (> 90 %)".to_string()
            } else {
                format!("no ({:.0} % of it)", 100.0 * need / m.gib)
            }
        };
        s += &format!(
            "| {} | {} | {} | {} |\n",
            m.name,
            m.gib,
            fits(p.stages[0].total),
            fits(peak_tune)
        );
    }
    s
}
