//! Tuning-seed replicates (`train.seeds`): the tuning-noise level of the spot's movement.
//!
//! Each replicate is the same run with another `train.seed` (another order of the training
//! data), in `tune/<lang>/seed-<s>/`, starting from the main run's base snapshot (the same model
//! and calibration documents). At every checkpoint both runs reached, the two tuned models'
//! spots are compared through the cross-sample null (`importance::null::movement` with the
//! main run's tuned model in the base's place): "moved" there means two seeds' tuned spots
//! differ beyond document sampling, so part of a base → tuned movement is tuning noise. The
//! result is `tune/<lang>/seeds.json`.

use super::{copy_files, read_state, step_name, steps_in, TuneOptions};
use crate::importance::null;
use crate::recipe::Loaded;
use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file in a language's tune directory.
pub(crate) const FILE: &str = "seeds.json";

/// One replicate's spot against the main run's at one checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedMovement {
    pub seed: u64,
    pub step: usize,
    /// `within` is the main run's tuned model's own cross-sample agreement, `within_tuned` the
    /// replicate's, `cross` between the two.
    pub movement: null::Movement,
}

/// A replicate's run directory.
pub(crate) fn replicate_dir(tune_dir: &Path, seed: u64) -> PathBuf {
    tune_dir.join(format!("seed-{seed}"))
}

/// Read `seeds.json` of a language's tune directory, if there is one.
pub fn read(tune_dir: &Path) -> Result<Option<Vec<SeedMovement>>> {
    let p = tune_dir.join(FILE);
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("{}: invalid", p.display()))?,
    ))
}

/// Whether `seeds.json` in a language's tune directory compares every one of `seeds` (true when
/// there are none).
pub(crate) fn complete(tune_dir: &Path, seeds: &[u64]) -> bool {
    seeds.is_empty()
        || read(tune_dir)
            .ok()
            .flatten()
            .is_some_and(|sm| seeds.iter().all(|s| sm.iter().any(|m| m.seed == *s)))
}

/// Run (or resume) every replicate of the run in `dir`, then compare each with the main run at
/// their common checkpoints and write `seeds.json`.
pub(super) fn replicates<B: Backend>(
    loaded: &Loaded,
    corpora: &crate::data::Corpora,
    opts: &TuneOptions,
    device: &B::Device,
    dir: &Path,
) -> Result<Vec<SeedMovement>> {
    let t = &loaded.recipe.train;
    let base = crate::layout::snapshots_dir(dir).join(step_name(0));
    for &seed in &t.seeds {
        let mut l = loaded.clone();
        l.recipe.train.seed = seed;
        l.recipe.train.seeds = vec![];
        let rdir = replicate_dir(dir, seed);
        let rbase = crate::layout::snapshots_dir(&rdir).join(step_name(0));
        if !rbase.join("track.json").is_file() {
            std::fs::create_dir_all(rbase.parent().expect("a snapshots directory"))
                .with_context(|| format!("creating {}", rdir.display()))?;
            if rbase.exists() {
                std::fs::remove_dir_all(&rbase).with_context(|| format!("removing {}", rbase.display()))?;
            }
            copy_files(&base, &rbase)?;
        }
        if opts.progress {
            eprintln!(
                "tune {}: replicate with train.seed = {seed} in {}",
                opts.lang,
                rdir.display()
            );
        }
        let o = TuneOptions {
            // The main run decided whether this is a resume; a replicate continues what is there.
            resume: true,
            force: false,
            lock: false,
            ..opts.clone()
        };
        super::tune_run::<B>(&l, corpora, &o, device, &rdir)?;
    }
    let mut out = vec![];
    let done = read(dir)?.unwrap_or_default();
    for &seed in &t.seeds {
        let rdir = replicate_dir(dir, seed);
        let (main_snaps, rep_snaps) = (crate::layout::snapshots_dir(dir), crate::layout::snapshots_dir(&rdir));
        let rep_steps = steps_in(&rep_snaps);
        for step in steps_in(&main_snaps)
            .into_iter()
            .filter(|s| *s > 0 && rep_steps.contains(s))
        {
            if let Some(m) = done.iter().find(|m| m.seed == seed && m.step == step) {
                out.push(m.clone());
                continue;
            }
            let (a, b) = (
                main_snaps.join(step_name(step)).join(null::FILE),
                rep_snaps.join(step_name(step)).join(null::FILE),
            );
            if !(a.is_file() && b.is_file()) {
                continue;
            }
            let movement = null::movement(
                &null::Folds::read(&a)?,
                &null::Folds::read(&b)?,
                null::REPLICATES,
                step as u64,
            )?;
            if opts.progress {
                eprintln!(
                    "tune {}: step {step}, seed {} vs seed {seed}: within {:.3}, cross {:.3}, diff {:.3} [{:.3}, {:.3}]: {}",
                    opts.lang,
                    t.seed,
                    movement.within.value,
                    movement.cross.value,
                    movement.diff.value,
                    movement.diff.lo,
                    movement.diff.hi,
                    movement.verdict
                );
            }
            out.push(SeedMovement { seed, step, movement });
        }
        // The replicate finished: its last checkpoint is the run's last step.
        let last = crate::layout::checkpoints_dir(&rdir).join(step_name(t.steps));
        read_state(&last).with_context(|| format!("replicate seed {seed}: no final checkpoint"))?;
    }
    crate::util::write_atomic(&dir.join(FILE), serde_json::to_string_pretty(&out)?.as_bytes())?;
    Ok(out)
}
