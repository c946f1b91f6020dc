//! `bench score`, `bench tune`, `bench forward`: the library's benchmarks (`crate::bench`),
//! printed as a line or as JSON.

use crate::backend::DeviceKind;
use anyhow::Result;
use clap::Subcommand;

/// The training-shaped benchmarks' arguments (`bench score`, `bench tune`): synthetic batches.
#[derive(clap::Args, Debug, Clone)]
pub struct StepShape {
    #[arg(long, default_value = "default")]
    model: String,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 4)]
    micro_batch: usize,
    /// Top blocks whose activations the backward pass keeps instead of recomputing them.
    #[arg(long, default_value_t = crate::model::backprop::DEFAULT_KEEP_BLOCKS)]
    keep_blocks: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Timed batches (after one warm-up batch).
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// Weights' dtype (scores, gradients and AdamW moments stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: crate::model::Dtype,
    /// Matrix products in bf16 around f32 weights (PyTorch's CPU autocast; AMX or AVX512-BF16).
    #[arg(long, value_enum, default_value = "off")]
    autocast: crate::model::Autocast,
    #[arg(long)]
    json: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
}

impl StepShape {
    fn shape(&self) -> crate::bench::StepShape {
        crate::bench::StepShape {
            model: self.model.clone(),
            batch: self.batch,
            micro_batch: self.micro_batch,
            keep_blocks: self.keep_blocks,
            seq_len: self.seq_len,
            steps: self.steps,
            dtype: self.dtype,
            autocast: self.autocast,
        }
    }
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Tokens/s of forward + backward importance scoring and peak RSS.
    Score {
        #[command(flatten)]
        shape: StepShape,
    },
    /// Tokens/s of a tuning step (forward + backward + AdamW, the tune loop's code) and peak RSS.
    Tune {
        #[command(flatten)]
        shape: StepShape,
    },
    /// New tokens/s of greedy decoding (synthetic prompts, `--batch` decoded together).
    Generate {
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long, default_value_t = 16)]
        prompts: usize,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
    /// Tokens/s of a forward pass (median of several runs) and peak RSS.
    Forward {
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Matrix products in bf16 around f32 weights (PyTorch's CPU autocast).
        #[arg(long, value_enum, default_value = "off")]
        autocast: crate::model::Autocast,
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    use crate::bench::{forward, generate, score, tune};
    match cmd {
        BenchCmd::Score { shape: a } => {
            let s = a.shape();
            let r = on_device!(a.device, score(&s))?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            let (lo, hi) = (
                r.batch_tokens_per_s[0],
                r.batch_tokens_per_s[r.batch_tokens_per_s.len() - 1],
            );
            println!(
                "score: {:.1} tokens/s (batch {} × {}, micro-batch {}, {}, {} steps, {:.1} s); median batch {:.1} tokens/s (range {lo:.1}–{hi:.1}); ≈{:.0} GFLOP/s at 6·N flops/token = {:.0}% of sgemm ({:.0} GFLOP/s; half of it allows {:.1} tokens/s); peak RSS {:.0} MiB",
                r.tokens_per_s,
                r.batch,
                r.seq_len,
                r.micro_batch,
                r.path,
                r.steps,
                r.seconds,
                r.median_batch_tokens_per_s,
                r.gflop_per_s,
                100.0 * r.gflop_per_s / r.sgemm_gflop_per_s,
                r.sgemm_gflop_per_s,
                r.half_sgemm_tokens_per_s,
                mib(r.peak_rss_bytes)
            );
        }
        BenchCmd::Tune { shape: a } => {
            let s = a.shape();
            let r = on_device!(a.device, tune(&s))?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            let (lo, hi) = (
                r.step_tokens_per_s[0],
                r.step_tokens_per_s[r.step_tokens_per_s.len() - 1],
            );
            println!(
                "tune step: median {:.1} tokens/s (range {lo:.1}–{hi:.1}; batch {} × {}, micro-batch {}, {}, {} steps, {}); peak RSS {:.0} MiB",
                r.median_tokens_per_s,
                r.batch,
                r.seq_len,
                r.micro_batch,
                r.path,
                r.steps,
                r.dtype,
                mib(r.peak_rss_bytes)
            );
        }
        BenchCmd::Generate {
            model,
            prompts,
            prompt_len,
            new_tokens,
            batch,
            json,
            device,
        } => {
            let r = on_device!(device, generate(&model, prompts, prompt_len, new_tokens, batch))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            println!(
                "generate: {:.1} new tokens/s ({} tokens in {:.1} s; {} prompts of {} tokens, {} at a time); peak RSS {:.0} MiB",
                r.tokens_per_s,
                r.new_tokens,
                r.seconds,
                r.prompts,
                r.prompt_len,
                r.batch,
                mib(r.peak_rss_bytes)
            );
        }
        BenchCmd::Forward {
            model,
            batch,
            seq_len,
            runs,
            autocast,
            json,
            device,
        } => {
            let r = on_device!(device, forward(&model, batch, seq_len, runs, autocast))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            println!(
                "forward: {:.0} tokens/s (median {:.3} s of {} runs, batch {} × {}, {}); peak RSS {:.0} MiB",
                r.tokens_per_s,
                r.median_s,
                r.runs,
                r.batch,
                r.seq_len,
                r.path,
                mib(r.peak_rss_bytes)
            );
        }
    }
    Ok(())
}
