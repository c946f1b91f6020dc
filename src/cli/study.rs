//! `recipe check`, `plan`, `tune`, `run`: everything driven by a recipe.

use anyhow::Result;
use burn::tensor::backend::Backend;
use clap::Subcommand;
use std::path::PathBuf;

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

#[derive(clap::Args)]
pub struct PlanArgs {
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
}

#[derive(clap::Args)]
pub struct TuneArgs {
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
}

#[derive(clap::Args)]
pub struct RunArgs {
    recipe: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

pub fn recipe(cmd: RecipeCmd) -> Result<()> {
    let RecipeCmd::Check { file, set } = cmd;
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

pub fn plan(a: PlanArgs) -> Result<()> {
    let loaded = crate::recipe::load(&a.recipe, &a.set)?;
    loaded.validate(&crate::data::Corpora::from_env())?;
    let cfg = crate::plan::model_config(&loaded.recipe.model, a.config.as_deref())?;
    let p = crate::plan::plan(&cfg, &loaded.recipe);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let memory = if a.memory.is_empty() {
        crate::plan::default_memories()
    } else {
        a.memory
    };
    println!("# {} ({})", a.recipe.display(), loaded.recipe.model);
    print!("{}", crate::plan::text(&p, &memory));
    Ok(())
}

pub fn tune(a: TuneArgs) -> Result<()> {
    // `tune` validates the recipe before any work.
    let loaded = crate::recipe::load(&a.recipe, &a.set)?;
    let langs = match a.lang {
        Some(l) => vec![l],
        None => loaded.recipe.languages.clone(),
    };
    let device = loaded.recipe.device;
    for lang in langs {
        let opts = crate::train::TuneOptions {
            lang,
            resume: a.resume,
            force: a.force,
            progress: true,
            lock: true,
        };
        on_device!(device, tune_on(&loaded, &opts))?;
    }
    Ok(())
}

fn tune_on<B: Backend>(
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
        crate::layout::tune_dir(loaded, &s.language).display()
    );
    Ok(())
}

pub fn run(a: RunArgs) -> Result<()> {
    let loaded = crate::recipe::load(&a.recipe, &a.set)?;
    let corpora = crate::data::Corpora::from_env(); // `run` validates the recipe first
    let t0 = std::time::Instant::now();
    let device = loaded.recipe.device;
    let s = on_device!(device, run_on(&loaded, &corpora))?;
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

fn run_on<B: Backend>(
    loaded: &crate::recipe::Loaded,
    corpora: &crate::data::Corpora,
    device: &B::Device,
) -> Result<crate::study::RunSummary> {
    crate::study::run::<B>(loaded, corpora, device)
}
