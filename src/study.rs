//! `codespot run RECIPE`: the whole study from one recipe.
//!
//! Stages, each written atomically under the run dir and skipped when its outputs exist and
//! were made from the same inputs (a stage hash over the recipe parts it reads and the hashes
//! of the stages it reads from, kept in `<output>.stage`):
//!
//! 1. `base/<lang>`: importance snapshot of the base model on each language's calibration split;
//! 2. `spots/base`: the base spot (aggregated over languages) with its controls;
//! 3. `tune/<lang>`: per-language tuning with snapshots at every checkpoint (resumed after a
//!    crash from its newest checkpoint);
//! 4. `spots/tuned`: the spot of the tuned models (each language's final snapshot);
//! 5. `compare/…`: base vs tuned spot, and each language's base vs final snapshot;
//! 6. `eval/base`, `eval/tuned-<lang>`: ablation + evaluation with spot and controls;
//! 7. `report.md` with PNG plots in `report/`.

use crate::importance;
use crate::layout::{final_snapshot, snapshot_request, stage_done, Plan};
use crate::layout::{hash_of, mark};
use crate::recipe::Loaded;
use crate::train::{self, TuneOptions};
use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};

fn say(msg: impl std::fmt::Display) {
    eprintln!("[run] {msg}");
}

fn select_spot(
    loaded: &Loaded,
    snapshots: Vec<PathBuf>,
    text: Option<PathBuf>,
    criteria: Vec<(importance::Method, Vec<PathBuf>)>,
    out: &Path,
) -> Result<()> {
    let s = &loaded.recipe.spot;
    let req = crate::spot::SelectRequest {
        snapshots,
        aggregation: s.aggregation,
        scope: s.scope,
        eligible: s.params,
        ks: s.k.clone(),
        controls: s.controls.clone(),
        seed: s.seed,
        model: Some(loaded.recipe.model.clone()),
        text,
        held_out: s.held_out.clone(),
        criteria,
    };
    let (sets, man) = crate::spot::select(&req)?;
    crate::spot::file::write(out, &sets, &man, true)
}

/// What `run` produced.
pub struct RunSummary {
    pub out: PathBuf,
    pub report: PathBuf,
    pub stages_run: Vec<String>,
    pub stages_skipped: Vec<String>,
}

/// Run every stage of the study (skipping those already done).
pub fn run<B: Backend>(loaded: &Loaded, corpora: &crate::data::Corpora, device: &B::Device) -> Result<RunSummary> {
    let r = &loaded.recipe;
    loaded.validate(corpora)?;
    let tasks = loaded.tasks()?;
    let plan = Plan::new(loaded);
    let _lock = crate::util::DirLock::exclusive(&crate::util::run_lock_path(&plan.out), &plan.out)?;
    std::fs::create_dir_all(&plan.out).with_context(|| format!("creating {}", plan.out.display()))?;
    crate::util::write_atomic(
        &plan.out.join("recipe.resolved.toml"),
        loaded.resolved_toml().as_bytes(),
    )?;
    let mut stages = Stages::default();

    // 1. Base snapshots (the corpora are built first when missing), then the base model scored
    // with each baseline criterion.
    base_snapshots::<B>(loaded, corpora, &plan, &mut stages, device)?;
    let criteria_dirs = |plan: &Plan| -> Vec<(importance::Method, Vec<PathBuf>)> {
        plan.criteria_snap
            .iter()
            .map(|(m, v)| (*m, v.iter().map(|x| x.1.clone()).collect()))
            .collect()
    };

    // 2. Base spot.
    let (bs, bh) = &plan.base_spot;
    if stages.start("base spot".into(), stage_done(bs, bh)) {
        let text = plan.text_snap.as_ref().map(|x| x.1.clone());
        let snaps = plan.base_snap.iter().map(|x| x.1.clone()).collect();
        select_spot(loaded, snaps, text, criteria_dirs(&plan), bs)?;
        mark(bs, bh)?;
    }
    if r.train.steps == 0 {
        say("train.steps = 0: no tuning; the base model only");
    }

    // 3. Tuning, one language at a time.
    let tuning = r.train.steps > 0;
    if tuning {
        tune_languages::<B>(loaded, corpora, &mut stages, device)?;
    }

    // 4. Tuned spot: each language's final snapshot (its own tuned model).
    let (ts, tsh) = &plan.tuned_spot;
    let finals: Vec<PathBuf> = r.languages.iter().map(|l| final_snapshot(loaded, l)).collect();
    if tuning && stages.start("tuned spot".into(), stage_done(ts, tsh)) {
        // The text sets of the tuned spot use the base model's prose snapshot; baseline
        // criteria are the base model's (the tuned models are scored with the spot's method).
        let text = plan.text_snap.as_ref().map(|x| x.1.clone());
        select_spot(loaded, finals.clone(), text, vec![], ts)?;
        mark(ts, tsh)?;
    }

    // 5. Comparisons.
    if tuning {
        comparisons(loaded, &plan, &finals, &mut stages)?;
    }

    // 6. Evaluation: the base model with the base spot, each tuned model with the tuned spot.
    evaluations::<B>(loaded, corpora, &plan, &tasks, &mut stages, device)?;

    // 7. Report (always rewritten: it is cheap and reads everything above).
    say("report: writing");
    let report = crate::report::write(loaded)?;
    Ok(RunSummary {
        out: plan.out,
        report,
        stages_run: stages.ran,
        stages_skipped: stages.skipped,
    })
}

/// The stages run and skipped so far.
#[derive(Default)]
struct Stages {
    ran: Vec<String>,
    skipped: Vec<String>,
}

impl Stages {
    /// Whether stage `name` runs (it is not `done`), said either way.
    fn start(&mut self, name: String, done: bool) -> bool {
        if done {
            say(format!("{name}: done, skipped"));
            self.skipped.push(name);
            false
        } else {
            say(format!("{name}: running"));
            self.ran.push(name);
            true
        }
    }
}

/// Stage 1: the base model's snapshot of each language (and of the prose corpus), then with
/// each baseline criterion. The model is loaded (and missing corpora built) only when one runs.
fn base_snapshots<B: Backend>(
    loaded: &Loaded,
    corpora: &crate::data::Corpora,
    plan: &Plan,
    stages: &mut Stages,
    device: &B::Device,
) -> Result<()> {
    let r = &loaded.recipe;
    let mut snapshots: Vec<(String, &Path, &String, importance::run::ScoreRequest)> = plan
        .base_snap
        .iter()
        .chain(&plan.text_snap)
        .map(|(lang, dir, h)| {
            (
                format!("base snapshot {lang}"),
                dir.as_path(),
                h,
                snapshot_request(loaded, lang),
            )
        })
        .collect();
    for (method, snaps) in &plan.criteria_snap {
        for (lang, dir, h) in snaps {
            let req = crate::layout::criterion_request(loaded, lang, *method);
            snapshots.push((format!("base snapshot {lang} ({})", method.name()), dir, h, req));
        }
    }
    let mut ck: Option<crate::model::Checkpoint> = None;
    for (label, dir, h, req) in snapshots {
        if !stages.start(label, stage_done(dir, h)) {
            continue;
        }
        if ck.is_none() {
            let c = crate::model::load(&r.model)?;
            train::ensure_corpora(loaded, corpora, &c)?;
            ck = Some(c);
        }
        let c = ck.as_mut().expect("loaded");
        let m = crate::model::Llama::<crate::backend::Ad<B>>::from_weights_as(
            &c.config,
            &c.weights,
            device,
            loaded.recipe.dtype,
        )?;
        importance::run::score_snapshot(&m, c, corpora, &req, dir, true)?;
        mark(dir, h)?;
    }
    drop(ck);
    Ok(())
}

/// Stage 3: each language's tuning, resumed from its newest checkpoint of this recipe.
fn tune_languages<B: Backend>(
    loaded: &Loaded,
    corpora: &crate::data::Corpora,
    stages: &mut Stages,
    device: &B::Device,
) -> Result<()> {
    let r = &loaded.recipe;
    let th = crate::layout::tune_hash(loaded);
    for lang in &r.languages {
        let dir = crate::layout::tune_dir(loaded, lang);
        let done = std::fs::read_to_string(dir.join("tune.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<train::TuneSummary>(&t).ok())
            .is_some_and(|s| s.tune_hash == th)
            // With replicates, the stage ends with their comparison.
            && train::seeds::complete(&dir, &r.train.seeds);
        if !stages.start(format!("tune {lang}"), done) {
            continue;
        }
        // Resume a run of this recipe; start over when there is none (or another recipe's).
        let resume = train::resumable(&dir, &th);
        if !resume && dir.exists() {
            say(format!(
                "tune {lang}: no checkpoint of this recipe in {}, starting over",
                dir.display()
            ));
        }
        let opts = TuneOptions {
            lang: lang.clone(),
            resume,
            force: !resume,
            progress: true,
            lock: false,
        };
        train::tune::<B>(loaded, corpora, &opts, device)?;
    }
    Ok(())
}

/// Stage 5: the base spot against the tuned spot, and each language's base snapshot against its
/// final one.
fn comparisons(loaded: &Loaded, plan: &Plan, finals: &[PathBuf], stages: &mut Stages) -> Result<()> {
    let r = &loaded.recipe;
    let th = crate::layout::tune_hash(loaded);
    let ((bs, bh), (ts, tsh)) = (&plan.base_spot, &plan.tuned_spot);
    let ks = r.spot.k.clone();
    let mut pairs = vec![(
        "base-vs-tuned-spot".to_string(),
        bs.clone(),
        ts.clone(),
        hash_of(serde_json::json!([bh, tsh])),
    )];
    for ((lang, base, bh), fin) in plan.base_snap.iter().zip(finals) {
        pairs.push((
            format!("{lang}-base-vs-final"),
            base.clone(),
            fin.clone(),
            hash_of(serde_json::json!([bh, th])),
        ));
    }
    for (name, a, b, h) in &pairs {
        let out = plan.out.join("compare").join(name);
        if stages.start(format!("compare {name}"), stage_done(&out, h)) {
            let c = crate::track::compare::compare(a, b, &ks)?;
            write_comparison(&out, &c)?;
            mark(&out, h)?;
        }
    }
    Ok(())
}

/// Stage 6: the base model with the base spot and its sets, each tuned model with the tuned
/// spot.
fn evaluations<B: Backend>(
    loaded: &Loaded,
    corpora: &crate::data::Corpora,
    plan: &Plan,
    tasks: &[crate::eval::Task],
    stages: &mut Stages,
    device: &B::Device,
) -> Result<()> {
    let r = &loaded.recipe;
    let th = crate::layout::tune_hash(loaded);
    let tuning = r.train.steps > 0;
    let ((bs, bh), (ts, tsh)) = (&plan.base_spot, &plan.tuned_spot);
    let e = &r.eval;
    let opts = eval_options(loaded, corpora);
    let controls = eval_sets(loaded);
    // The tuned spot has no baseline criteria's sets (those score the base model).
    let without_criteria: Vec<String> = controls
        .iter()
        .filter(|c| !r.spot.criteria.iter().any(|m| m.name() == c.as_str()))
        .cloned()
        .collect();
    let eval_k = if e.k.is_empty() { r.spot.k.clone() } else { e.k.clone() };
    let mut evals = vec![(
        "base".to_string(),
        r.model.clone(),
        bs.clone(),
        eval_k.clone(),
        bh.clone(),
    )];
    for lang in r.languages.iter().filter(|_| tuning) {
        let ckpt = crate::layout::checkpoints_dir(&crate::layout::tune_dir(loaded, lang))
            .join(crate::layout::step_name(r.train.steps));
        evals.push((
            format!("tuned-{lang}"),
            ckpt.display().to_string(),
            ts.clone(),
            e.tuned_k.clone(),
            hash_of(serde_json::json!([tsh, th, lang])),
        ));
    }
    for (name, source, spot, ks, dep) in &evals {
        let out = crate::layout::eval_dir(loaded, name);
        let sets = if name == "base" { &controls } else { &without_criteria };
        // The sets that break the spot down, at one k on the base model.
        let detail: Vec<String> = match e.detail_k {
            Some(_) if name == "base" => detail_sets(loaded),
            _ => vec![],
        };
        let h = hash_of(
            serde_json::json!({"stage": "eval", "eval": e, "controls": sets, "detail": detail, "ks": ks, "dep": dep}),
        );
        if !stages.start(format!("eval {name}"), stage_done(&out, &h)) {
            continue;
        }
        let mut conds = crate::eval::conditions(Some(spot), ks, sets)?;
        if let (Some(dk), false) = (e.detail_k, detail.is_empty()) {
            // Skip the intact model and the spot, already in the list.
            conds.extend(crate::eval::conditions(Some(spot), &[dk], &detail)?.into_iter().skip(2));
        }
        // A set with nothing in it (structured units at a small k) would only repeat the
        // intact model.
        conds.retain(|(c, set)| {
            let empty = set.as_ref().is_some_and(|(_, m)| m.values().all(|x| x.count() == 0));
            if empty {
                say(format!("eval {name}: {c} is empty, skipped"));
            }
            !empty
        });
        let label = if name == "base" {
            "base".to_string()
        } else {
            name.replace("tuned-", "tuned on ")
        };
        let all = crate::eval::evaluate::<B>(source, &label, tasks, Some(spot), &conds, &opts, device)?;
        crate::eval::write_results(&out, &all)?;
        mark(&out, &h)?;
    }
    Ok(())
}

/// The spot file's sets that each `k` of the evaluation ablates beside the spot: every
/// control's sets but the per-language ones and those evaluated at `eval.detail_k` only
/// ([`detail_sets`]), then the baseline criteria's.
fn eval_sets(loaded: &Loaded) -> Vec<String> {
    use crate::spot::Control;
    let s = &loaded.recipe.spot;
    s.controls
        .iter()
        .filter(|c| !matches!(c, Control::PerLanguage | Control::OwnLanguage | Control::Arms))
        .flat_map(|c| c.set_names(&[]))
        .chain(s.criteria.iter().map(|m| m.name().to_string()))
        .collect()
}

/// The sets evaluated at `eval.detail_k` only: each language's own spot, and the arms.
fn detail_sets(loaded: &Loaded) -> Vec<String> {
    use crate::spot::Control;
    let r = &loaded.recipe;
    r.spot
        .controls
        .iter()
        .filter(|c| matches!(c, Control::OwnLanguage | Control::Arms))
        .flat_map(|c| c.set_names(&r.languages))
        .collect()
}

pub(crate) fn eval_options(loaded: &Loaded, corpora: &crate::data::Corpora) -> crate::eval::EvalOptions {
    let e = &loaded.recipe.eval;
    crate::eval::EvalOptions {
        limit: (e.limit > 0).then_some(e.limit),
        seed: e.seed,
        allow_code_execution: e.allow_code_execution,
        max_tokens: e.max_tokens,
        max_bpb_tokens: e.max_bpb_tokens,
        corpora: corpora.clone(),
        autocast: loaded.recipe.autocast,
        ..Default::default()
    }
}

/// `compare.json`, `compare.txt` and `layer_module.png` in a directory, atomically.
pub(crate) fn write_comparison(out: &Path, c: &crate::track::compare::Comparison) -> Result<()> {
    crate::util::write_dir_atomic(out, true, |tmp| {
        std::fs::write(tmp.join("compare.json"), serde_json::to_string_pretty(c)?)?;
        std::fs::write(tmp.join("compare.txt"), crate::track::compare::text(c))?;
        crate::plot::heatmap(
            &tmp.join("layer_module.png"),
            &format!(
                "Jaccard at k = {}% per layer × module",
                crate::spot::file::fmt_k(c.k_detail)
            ),
            &c.layer_module,
            &crate::track::MODULE_ORDER
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
            Some((0.0, 1.0)),
        )?;
        Ok(())
    })
}
