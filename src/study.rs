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
pub use crate::layout::{final_snapshot, snapshot_request, stage_done, Plan};
use crate::layout::{hash_of, mark};
use crate::recipe::Loaded;
use crate::train::{self, TuneOptions};
use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};

fn say(msg: impl std::fmt::Display) {
    eprintln!("[run] {msg}");
}

fn select_spot(loaded: &Loaded, snapshots: Vec<PathBuf>, text: Option<PathBuf>, out: &Path) -> Result<()> {
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
    let (mut ran, mut skipped) = (vec![], vec![]);
    let mut stage = |name: String, done: bool| {
        if done {
            say(format!("{name}: done, skipped"));
            skipped.push(name);
            false
        } else {
            say(format!("{name}: running"));
            ran.push(name);
            true
        }
    };

    // 1. Base snapshots (the corpora are built first when missing).
    let mut ck: Option<crate::model::Checkpoint> = None;
    for (lang, dir, h) in plan.base_snap.iter().chain(&plan.text_snap) {
        if !stage(format!("base snapshot {lang}"), stage_done(dir, h)) {
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
        let req = snapshot_request(loaded, lang);
        importance::score_snapshot(&m, c, corpora, &req, dir, true)?;
        mark(dir, h)?;
    }
    drop(ck);

    // 2. Base spot.
    let (bs, bh) = &plan.base_spot;
    if stage("base spot".into(), stage_done(bs, bh)) {
        let text = plan.text_snap.as_ref().map(|x| x.1.clone());
        select_spot(loaded, plan.base_snap.iter().map(|x| x.1.clone()).collect(), text, bs)?;
        mark(bs, bh)?;
    }

    // 3. Tuning, one language at a time.
    let th = train::tune_hash(loaded);
    for lang in &r.languages {
        let dir = train::tune_dir(loaded, lang);
        let done = std::fs::read_to_string(dir.join("tune.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<train::TuneSummary>(&t).ok())
            .is_some_and(|s| s.tune_hash == th);
        if !stage(format!("tune {lang}"), done) {
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

    // 4. Tuned spot: each language's final snapshot (its own tuned model).
    let (ts, tsh) = &plan.tuned_spot;
    let finals: Vec<PathBuf> = r.languages.iter().map(|l| final_snapshot(loaded, l)).collect();
    if stage("tuned spot".into(), stage_done(ts, tsh)) {
        // The text sets of the tuned spot use the base model's prose snapshot.
        let text = plan.text_snap.as_ref().map(|x| x.1.clone());
        select_spot(loaded, finals.clone(), text, ts)?;
        mark(ts, tsh)?;
    }

    // 5. Comparisons.
    let ks = r.spot.k.clone();
    let mut pairs = vec![(
        "base-vs-tuned-spot".to_string(),
        bs.clone(),
        ts.clone(),
        hash_of(serde_json::json!([bh, tsh])),
    )];
    for ((lang, base, bh), fin) in plan.base_snap.iter().zip(&finals) {
        pairs.push((
            format!("{lang}-base-vs-final"),
            base.clone(),
            fin.clone(),
            hash_of(serde_json::json!([bh, th])),
        ));
    }
    for (name, a, b, h) in &pairs {
        let out = plan.out.join("compare").join(name);
        if stage(format!("compare {name}"), stage_done(&out, h)) {
            let c = crate::track::compare::compare(a, b, &ks)?;
            write_comparison(&out, &c)?;
            mark(&out, h)?;
        }
    }

    // 6. Evaluation: the base model with the base spot, each tuned model with the tuned spot.
    let e = &r.eval;
    let opts = eval_options(loaded, corpora);
    let controls: Vec<String> = r
        .spot
        .controls
        .iter()
        .filter(|c| !matches!(c, crate::spot::Control::PerLanguage))
        .map(|c| {
            serde_json::to_value(c)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        })
        .collect();
    let eval_k = if e.k.is_empty() { r.spot.k.clone() } else { e.k.clone() };
    let mut evals = vec![(
        "base".to_string(),
        r.model.clone(),
        bs.clone(),
        eval_k.clone(),
        bh.clone(),
    )];
    for lang in &r.languages {
        let ckpt = train::tune_dir(loaded, lang)
            .join("checkpoints")
            .join(train::step_name(r.train.steps));
        evals.push((
            format!("tuned-{lang}"),
            ckpt.display().to_string(),
            ts.clone(),
            e.tuned_k.clone(),
            hash_of(serde_json::json!([tsh, th, lang])),
        ));
    }
    for (name, source, spot, ks, dep) in &evals {
        let out = plan.out.join("eval").join(name);
        let h = hash_of(serde_json::json!({"stage": "eval", "eval": e, "controls": controls, "ks": ks, "dep": dep}));
        if !stage(format!("eval {name}"), stage_done(&out, &h)) {
            continue;
        }
        let conds = crate::eval::conditions(Some(spot), ks, &controls)?;
        let label = if name == "base" {
            "base".to_string()
        } else {
            name.replace("tuned-", "tuned on ")
        };
        let all = crate::eval::evaluate::<B>(source, &label, &tasks, Some(spot), &conds, &opts, device)?;
        crate::eval::write_results(&out, &all)?;
        mark(&out, &h)?;
    }

    // 7. Report (always rewritten: it is cheap and reads everything above).
    say("report: writing");
    let report = crate::report::write(loaded)?;
    Ok(RunSummary {
        out: plan.out,
        report,
        stages_run: ran,
        stages_skipped: skipped,
    })
}

pub fn eval_options(loaded: &Loaded, corpora: &crate::data::Corpora) -> crate::eval::EvalOptions {
    let e = &loaded.recipe.eval;
    crate::eval::EvalOptions {
        limit: (e.limit > 0).then_some(e.limit),
        seed: e.seed,
        allow_code_execution: e.allow_code_execution,
        max_tokens: e.max_tokens,
        max_bpb_tokens: e.max_bpb_tokens,
        corpora: corpora.clone(),
        ..Default::default()
    }
}

/// `compare.json`, `compare.txt` and `layer_module.png` in a directory, atomically.
pub fn write_comparison(out: &Path, c: &crate::track::compare::Comparison) -> Result<()> {
    crate::util::write_dir_atomic(out, true, |tmp| {
        std::fs::write(tmp.join("compare.json"), serde_json::to_string_pretty(c)?)?;
        std::fs::write(tmp.join("compare.txt"), crate::track::compare::text(c))?;
        crate::report::plot::heatmap(
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
