//! `score`, `snapshot show`, `snapshot merge` (and the multi-node arguments of `score`).

use crate::backend::DeviceKind;
use crate::model::{self, Llama};
use anyhow::Result;
use burn::tensor::backend::Backend;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ScoreArgs {
    #[arg(long, default_value = "default")]
    model: String,
    #[arg(long)]
    lang: String,
    /// Calibration tokens (predicted positions).
    #[arg(long, default_value_t = 16384)]
    tokens: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Sequences per backward pass; the batch's gradient is the sum over its micro-batches.
    #[arg(long, default_value_t = 4)]
    micro_batch: usize,
    /// Top blocks whose activations the backward pass keeps instead of recomputing them
    /// (~80 MB each at 4 × 256 on the default model; more is faster).
    #[arg(long, default_value_t = crate::model::backprop::DEFAULT_KEEP_BLOCKS)]
    keep_blocks: usize,
    /// Matrix products in bf16 with f32 sums around the f32 weights (PyTorch's CPU autocast),
    /// on AMX tiles or AVX512-BF16; f32 on a CPU with neither.
    #[arg(long, value_enum, default_value = "off")]
    autocast: crate::model::Autocast,
    #[arg(long, value_enum, default_value = "taylor")]
    method: crate::importance::Method,
    /// 0 = corpus order; otherwise documents are shuffled with this seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Store scores as f16 (summaries are computed from the f32 scores).
    #[arg(long)]
    half: bool,
    #[arg(long, value_enum, default_value = "calib")]
    split: crate::data::Split,
    /// Also write snapshots of each half of the calibration batches (spot stability).
    #[arg(long)]
    halves: bool,
    /// Also sum group Taylor importance of whole heads and MLP neurons (into summaries.json):
    /// what the `structured` control ranks heads and neurons by.
    #[arg(long)]
    groups: bool,
    /// Deal the calibration documents into 2 × N seeded document folds and keep each fold's
    /// sums at the halves' candidates (folds.safetensors): the cross-sample null that `compare`
    /// measures spot movement against. 0 = off.
    #[arg(long, default_value_t = 0)]
    folds: usize,
    /// The top-k % the folds' candidates serve.
    #[arg(long, default_value_t = 1.0)]
    folds_k: f64,
    /// Skip the split-half agreement (noise floor) and convergence in the manifest, which
    /// keep one more copy of the sums in memory.
    #[arg(long)]
    no_agreement: bool,
    /// Score only the I-th of N contiguous slices of the batches (`snapshot merge` adds the
    /// N shard snapshots up): one job of a Slurm array or Kubernetes indexed job each.
    #[arg(long, value_name = "I/N")]
    shard: Option<crate::importance::run::Shard>,
    /// Data-parallel peers on this node through burn-collective (GPUs 0..N with --device
    /// cuda; on the CPU the N peers share it): sums are all-reduced, scores equal one device's.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    #[command(flatten)]
    nodes: NodeArgs,
    /// Hold and compute the weights in this dtype (scores are summed in f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: crate::model::Dtype,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    force: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
}

/// A multi-node collective: every node runs the same command with its own --node-rank.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct NodeArgs {
    /// Nodes in the run (each runs this command with --devices peers).
    #[arg(long, default_value_t = 1)]
    pub nodes: u32,
    /// This node's rank in 0..nodes; node 0 writes the snapshot.
    #[arg(long, default_value_t = 0)]
    pub node_rank: u32,
    /// The global orchestrator, started on one node by `codespot orchestrator --port P`.
    #[arg(long, value_name = "ws://HOST:PORT")]
    pub orchestrator: Option<String>,
    /// This node's address as the others reach it: the port must be --data-port's (the
    /// others download tensors from it).
    #[arg(long, value_name = "ws://HOST:PORT")]
    pub node_address: Option<String>,
    /// Port of this node's tensor data service.
    #[arg(long)]
    pub data_port: Option<u16>,
}

impl From<NodeArgs> for crate::collective::Nodes {
    fn from(a: NodeArgs) -> Self {
        Self {
            count: a.nodes,
            rank: a.node_rank,
            orchestrator: a.orchestrator,
            address: a.node_address,
            data_port: a.data_port,
        }
    }
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// The layer × module table of importance mass; --top N adds the top tensors, heads, neurons.
    Show {
        dir: PathBuf,
        #[arg(long)]
        top: Option<usize>,
    },
    /// Add up the shard snapshots of one run (`score --shard I/N`, every I) into one snapshot.
    Merge {
        #[arg(required = true)]
        shards: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let req = crate::importance::run::ScoreRequest {
        halves: a.halves,
        groups: a.groups,
        shard: a.shard,
        devices: a.devices,
        nodes: a.nodes.into(),
        lang: a.lang,
        split: a.split,
        tokens: a.tokens,
        seq_len: a.seq_len,
        batch: a.batch,
        micro_batch: a.micro_batch,
        keep_blocks: a.keep_blocks,
        autocast: a.autocast,
        method: a.method,
        seed: a.seed,
        half: a.half,
        step: None,
        progress: true,
        model_label: None,
        agreement: !a.no_agreement,
        folds: a.folds,
        folds_k: a.folds_k,
    };
    on_device!(a.device, score_on(&a.model, &req, a.dtype, &a.out, a.force))
}

fn score_on<B: Backend>(
    source: &str,
    req: &crate::importance::run::ScoreRequest,
    dtype: crate::model::Dtype,
    out: &std::path::Path,
    force: bool,
    device: &B::Device,
) -> Result<()> {
    req.validate()?;
    let corpora = crate::data::Corpora::from_env();
    corpora.split_path(&req.lang, req.split)?;
    super::refuse_existing(out, force)?;
    let _lock = crate::util::DirLock::exclusive(&crate::util::output_lock_path(out), out)?;
    let mut ck = model::load(source)?;
    let w = std::mem::take(&mut ck.weights);
    let m = Llama::<crate::backend::Ad<B>>::from_weights_owned(&ck.config, w, device, dtype)?;
    let man = crate::importance::run::score_snapshot(&m, &ck, &corpora, req, out, force)?;
    if req.nodes.rank > 0 {
        println!(
            "node {}: its share of the {}-token run scored, sums all-reduced into node 0's snapshot",
            req.nodes.rank, man.tokens
        );
        return Ok(());
    }
    println!(
        "wrote {} ({} tokens, {:.1} tokens/s, {:.0} s)",
        out.display(),
        man.tokens,
        man.tokens_per_s,
        man.elapsed_s
    );
    Ok(())
}

pub fn snapshot(cmd: SnapshotCmd) -> Result<()> {
    match cmd {
        SnapshotCmd::Merge { shards, out, force } => {
            let m = crate::importance::run::merge_shards(&shards, &out, force)?;
            println!(
                "wrote {} ({} shards, {} tokens, {} method)",
                out.display(),
                m.merged_from.len(),
                m.tokens,
                m.method.name()
            );
        }
        SnapshotCmd::Show { dir, top } => {
            let m = crate::importance::snapshot::read_manifest(&dir)?;
            let s = crate::importance::snapshot::read_summaries(&dir)?;
            println!(
                "{}: {} on {} ({}), {} tokens, method {}{}",
                dir.display(),
                m.model,
                m.language,
                m.split,
                m.tokens,
                m.method.name(),
                m.step.map(|x| format!(", step {x}")).unwrap_or_default()
            );
            println!("importance mass (% of total) per layer × module:");
            println!("{}", crate::importance::summary::layer_module_table(&s));
            if let Some(n) = top {
                println!("{}", crate::importance::summary::top_text(&s, n));
            }
        }
    }
    Ok(())
}
