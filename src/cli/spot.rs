//! `spot select`, `ablate`, `compare`.

use crate::backend::DeviceKind;
use crate::model::{self, generate::GenOptions, Llama};
use anyhow::Result;
use burn::tensor::backend::Backend;
use clap::Subcommand;
use std::path::PathBuf;

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
        /// A snapshot of the same model on English prose (`score --lang text`), for the `text`
        /// and `code-specific` controls.
        #[arg(long)]
        text: Option<PathBuf>,
        /// Languages scored but left out of the aggregate (e.g. python, as the research does):
        /// they still get `own=` sets and language-matrix rows.
        #[arg(long, value_delimiter = ',')]
        held_out: Vec<String>,
        /// A baseline criterion's snapshot, as METHOD=DIR (e.g. wanda=snaps/wanda-rust),
        /// repeated for each language: its top-k becomes the set named after the method.
        #[arg(long = "criterion")]
        criteria: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

/// `--criterion METHOD=DIR` arguments grouped by method, in first-seen order.
fn parse_criteria(args: &[String]) -> Result<Vec<(crate::importance::Method, Vec<PathBuf>)>> {
    use clap::ValueEnum;
    let mut out: Vec<(crate::importance::Method, Vec<PathBuf>)> = vec![];
    for a in args {
        let (m, d) = a
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--criterion {a}: expected METHOD=DIR"))?;
        let m = crate::importance::Method::from_str(m, true)
            .map_err(|_| anyhow::anyhow!("--criterion {a}: unknown method '{m}'"))?;
        match out.iter_mut().find(|(x, _)| *x == m) {
            Some((_, v)) => v.push(d.into()),
            None => out.push((m, vec![d.into()])),
        }
    }
    Ok(out)
}

#[derive(clap::Args)]
pub struct AblateArgs {
    #[arg(long, default_value = "default")]
    model: String,
    #[arg(long)]
    spot: PathBuf,
    /// k in percent (one of the spot's k list).
    #[arg(long, default_value_t = 1.0)]
    k: f64,
    /// A control set instead of the spot: random, bottom, magnitude, lang=<L>, own=<L>, text,
    /// code-specific, code-minus-code, spot-attn, wanda, … (the spot manifest's `sets`).
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
}

#[derive(clap::Args)]
pub struct CompareArgs {
    a: PathBuf,
    b: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,3,5")]
    k: Vec<f64>,
    /// Also write compare.json, compare.txt and layer_module.png here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn spot(cmd: SpotCmd) -> Result<()> {
    let SpotCmd::Select {
        snapshots,
        aggregation,
        scope,
        params,
        k,
        controls,
        seed,
        model,
        text,
        held_out,
        criteria,
        out,
        force,
    } = cmd;
    super::refuse_existing(&out, force)?;
    let req = crate::spot::SelectRequest {
        snapshots,
        aggregation,
        scope,
        eligible: params,
        ks: k,
        controls,
        seed,
        model,
        text,
        held_out,
        criteria: parse_criteria(&criteria)?,
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
    for (key, j) in &man.overlap {
        println!("  overlap with the spot, {key}: Jaccard {j:.3}");
    }
    for (k, m) in &man.language_matrix {
        println!("  language matrix at k={k}% (diagonal: split-half floor)");
        for (l, row) in m.languages.iter().zip(&m.jaccard) {
            let cells: Vec<String> = row.iter().map(|j| format!("{j:.3}")).collect();
            println!("    {l:<12} {}", cells.join(" "));
        }
    }
    Ok(())
}

pub fn ablate(a: AblateArgs) -> Result<()> {
    on_device!(a.device, ablate_on(&a))
}

fn ablate_on<B: Backend>(a: &AblateArgs, device: &B::Device) -> Result<()> {
    if let Some(e) = &a.export {
        super::refuse_existing(e, a.force)?;
    }
    let set = a.control.as_deref().unwrap_or("spot");
    let masks = crate::spot::file::read_set(&a.spot, a.k, set)?;
    let mut ck = model::load(&a.model)?;
    let saved = crate::ablate::zero(&mut ck.weights, &masks)?;
    println!("zeroed {} parameters ({set}, k = {}%)", saved.count(), a.k);
    if let Some(e) = &a.export {
        model::export::export_hf_dir(&ck.config, &ck.weights, &ck.tokenizer, e, a.force)?;
        println!("wrote {}", e.display());
    }
    if let Some(p) = &a.prompt {
        let m = Llama::<B>::from_weights(&ck.config, &ck.weights, device)?;
        let ids = super::model::prompt_ids(&ck, p, true)?;
        let opts = GenOptions {
            max_tokens: a.max_tokens,
            ..Default::default()
        };
        super::model::stream(&m, &ck, &ids, &opts)?;
    }
    Ok(())
}

pub fn compare(a: CompareArgs) -> Result<()> {
    let c = crate::track::compare::compare(&a.a, &a.b, &a.k)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", crate::track::compare::text(&c));
    }
    if let Some(o) = &a.out {
        crate::study::write_comparison(o, &c)?;
        eprintln!("wrote {}", o.display());
    }
    Ok(())
}
