//! `eval`: tasks on a model, and with `--spot` on the spot and its controls switched off.

use crate::backend::DeviceKind;
use anyhow::Result;
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(long, default_value = "default")]
    model: String,
    /// Comma-separated: humaneval, humaneval-x:LANG, humaneval-x-bpb:LANG, humaneval-bpb,
    /// mbpp, mt-mbpp:LANG, code-bpb:LANG, text-bpb, hellaswag, mmlu, winogrande, arc-easy,
    /// arc-challenge, piqa.
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    #[arg(long)]
    spot: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1")]
    k: Vec<f64>,
    /// Control sets evaluated beside the spot (comma-separated; "none" for none).
    #[arg(long, value_delimiter = ',', default_value = "random")]
    controls: Vec<String>,
    /// A seeded sample of N items per task.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    fewshot: usize,
    /// Run generated code (HumanEval) in the sandbox.
    #[arg(long)]
    allow_code_execution: bool,
    /// Samples per HumanEval problem (pass@1 by the unbiased estimator).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 384)]
    max_tokens: usize,
    /// Prompts decoded together by the generation tasks (HumanEval, HumanEval-X); 1 decodes
    /// one at a time.
    #[arg(long, default_value_t = 16)]
    gen_batch: usize,
    /// Tokens per document for the bits-per-byte tasks (longer documents are cut).
    #[arg(long, default_value_t = 1024)]
    max_bpb_tokens: usize,
    /// Matrix products of the scoring passes (bits per byte, multiple choice) in bf16 with f32
    /// sums around the f32 weights (PyTorch's CPU autocast); generation stays f32.
    #[arg(long, value_enum, default_value = "off")]
    autocast: crate::model::Autocast,
    /// Write results.json and table.md here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    force: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let tasks: Vec<crate::eval::Task> = a
        .tasks
        .iter()
        .map(|t| crate::eval::Task::parse(t))
        .collect::<Result<_>>()?;
    anyhow::ensure!(!tasks.is_empty(), "--tasks: give at least one task");
    if let Some(o) = &a.out {
        super::refuse_existing(o, a.force)?;
    }
    let opts = crate::eval::EvalOptions {
        limit: a.limit,
        seed: a.seed,
        fewshot: a.fewshot,
        allow_code_execution: a.allow_code_execution,
        samples: a.samples,
        temperature: a.temperature,
        max_tokens: a.max_tokens,
        max_bpb_tokens: a.max_bpb_tokens,
        gen_batch: a.gen_batch.max(1),
        autocast: a.autocast,
        ..Default::default()
    };
    let controls: Vec<String> = a.controls.into_iter().filter(|c| c != "none").collect();
    let spot = a.spot.as_deref();
    on_device!(
        a.device,
        eval_on(&a.model, &tasks, spot, &a.k, &controls, &opts, a.out.as_deref())
    )
}

#[allow(clippy::too_many_arguments)]
fn eval_on<B: Backend>(
    source: &str,
    tasks: &[crate::eval::Task],
    spot: Option<&Path>,
    ks: &[f64],
    controls: &[String],
    opts: &crate::eval::EvalOptions,
    out: Option<&Path>,
    device: &B::Device,
) -> Result<()> {
    let conds = crate::eval::conditions(spot, ks, controls)?;
    let all = crate::eval::evaluate::<B>(source, source, tasks, spot, &conds, opts, device)?;
    println!("{}", crate::eval::table(&all));
    if let Some(o) = out {
        crate::eval::write_results(o, &all)?;
        println!("wrote {}", o.display());
    }
    Ok(())
}
