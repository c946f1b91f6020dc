//! The `codespot` command line (the binary in `main.rs` only calls [`run`]).
//!
//! One file per command group, as cargo does: each defines its arguments (clap), builds the
//! library's request, calls the library, and prints. No pipeline logic lives here.
//!
//! | file | commands |
//! |---|---|
//! | `model.rs` | `info`, `generate`, `next-token`, `export`, `fetch` |
//! | `corpus.rs` | `corpus build`, `corpus list` |
//! | `score.rs` | `score`, `snapshot show`, `snapshot merge`, `orchestrator` |
//! | `spot.rs` | `spot select`, `ablate`, `compare` |
//! | `eval.rs` | `eval` |
//! | `study.rs` | `recipe check`, `plan`, `tune`, `run` |
//! | `bench.rs` | `bench score`, `bench tune`, `bench forward` |

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Run a function generic over the backend on the chosen device kind.
macro_rules! on_device {
    ($dev:expr, $f:ident ( $($arg:expr),* )) => {{
        $dev.check()?;
        match $dev {
            $crate::backend::DeviceKind::Cpu => $f::<$crate::backend::Cpu>($($arg,)* &Default::default()),
            #[cfg(feature = "cuda")]
            $crate::backend::DeviceKind::Cuda => $f::<$crate::backend::Cuda>($($arg,)* &Default::default()),
            #[cfg(not(feature = "cuda"))]
            $crate::backend::DeviceKind::Cuda => unreachable!("checked above"),
        }
    }};
}

mod bench;
mod corpus;
mod eval;
mod model;
mod score;
mod spot;
mod study;

#[derive(Parser)]
#[command(name = "codespot", version, about = "Find and follow the Coding Spot of an LLM")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Architecture, parameter count and a per-module table.
    Info(model::InfoArgs),
    /// Generate text (streams to stdout).
    Generate(model::GenerateArgs),
    /// The top-K next tokens with ids, text and logits.
    NextToken(model::NextTokenArgs),
    /// Write the model as an HF directory (config.json, model.safetensors, tokenizer.json).
    Export(model::ExportArgs),
    /// Download (or find in the cache) a model source and print where it lies.
    Fetch(model::FetchArgs),
    /// Per-language code corpora.
    Corpus {
        #[command(subcommand)]
        what: corpus::CorpusCmd,
    },
    /// Taylor importance of every parameter on a language's code → a snapshot directory.
    Score(score::ScoreArgs),
    /// Inspect importance snapshots.
    Snapshot {
        #[command(subcommand)]
        what: score::SnapshotCmd,
    },
    /// The global orchestrator of a multi-node collective (`score --nodes N --orchestrator
    /// ws://THIS_HOST:PORT` on every node); runs until killed.
    Orchestrator {
        #[arg(long, default_value_t = 3000)]
        port: u16,
    },
    /// Select the Coding Spot and its controls from snapshots.
    Spot {
        #[command(subcommand)]
        what: spot::SpotCmd,
    },
    /// Zero a spot (or a control) in memory; export the damaged model or generate with it.
    Ablate(spot::AblateArgs),
    /// Compare two snapshots or two spots: Jaccard at several k, Spearman of the scores,
    /// overlap per layer and module, heads that entered or left the spot.
    Compare(spot::CompareArgs),
    /// Evaluate a model, and with --spot the spot and its controls switched off, side by side.
    Eval(eval::EvalArgs),
    /// Recipes: `recipe check FILE` validates and prints the resolved recipe.
    Recipe {
        #[command(subcommand)]
        what: study::RecipeCmd,
    },
    /// Memory per device for scoring and tuning a recipe (weights, sums, optimizer, activations)
    /// and whether it fits each device size.
    Plan(study::PlanArgs),
    /// Fine-tune the recipe's model on one language (or each in turn), with an importance
    /// snapshot at the base and every checkpoint and TensorBoard events under the run dir.
    Tune(study::TuneArgs),
    /// The whole study from one recipe: base snapshots → base spot → tuning with snapshots →
    /// tuned spot → compare → ablation + evaluation → runs/<name>/report.md. Finished stages
    /// are skipped, so rerunning after a crash picks up where it stopped.
    Run(study::RunArgs),
    /// Benchmarks of the hot paths (tokens/s and peak RSS).
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Info(a) => model::info(a),
        Cmd::Generate(a) => model::generate(a),
        Cmd::NextToken(a) => model::next_token(a),
        Cmd::Export(a) => model::export(a),
        Cmd::Fetch(a) => model::fetch(a),
        Cmd::Corpus { what } => corpus::run(what),
        Cmd::Score(a) => score::score(a),
        Cmd::Snapshot { what } => score::snapshot(what),
        Cmd::Orchestrator { port } => crate::collective::orchestrator(port),
        Cmd::Spot { what } => spot::spot(what),
        Cmd::Ablate(a) => spot::ablate(a),
        Cmd::Compare(a) => spot::compare(a),
        Cmd::Eval(a) => eval::eval(a),
        Cmd::Recipe { what } => study::recipe(what),
        Cmd::Plan(a) => study::plan(a),
        Cmd::Tune(a) => study::tune(a),
        Cmd::Run(a) => study::run(a),
        Cmd::Bench { what } => bench::run(what),
    }
}

/// `out` must not exist unless `--force`.
fn refuse_existing(out: &std::path::Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        anyhow::bail!("{}: already exists (use --force to replace it)", out.display());
    }
    Ok(())
}
