//! The report's evolution part: every tuning measure against the step (held-out pair loss,
//! movement against the cross-sample null, module and layer shares) and its table.

use super::{Figures, Series};
use crate::train::TuneSummary;
use anyhow::Result;
use std::fmt::Write;

fn series(name: String, points: Vec<(f64, f64)>, dashed: bool, bars: Vec<(f64, f64, f64)>) -> Series {
    Series {
        name,
        points,
        dashed,
        bars,
    }
}

/// Each language's last snapshot's movement measured again from the folds files (with this
/// codespot's statistics, and the per-layer and per-module breakdown the "where" table reads);
/// the others as recorded in their `track.json` (a movement takes about a minute on the
/// default model, so all of them would make the report slow).
pub(super) fn refresh(loaded: &crate::recipe::Loaded, tunes: &mut [(String, TuneSummary)]) -> Result<()> {
    use crate::importance::null;
    for (l, t) in tunes.iter_mut() {
        let snaps = crate::layout::snapshots_dir(&crate::layout::tune_dir(loaded, l));
        let base = snaps.join(crate::layout::step_name(0)).join(null::FILE);
        if !base.is_file() {
            continue;
        }
        let base = null::Folds::read(&base)?;
        if let Some(m) = t.metrics.iter_mut().filter(|m| m.step > 0).last() {
            let f = snaps.join(crate::layout::step_name(m.step)).join(null::FILE);
            if f.is_file() {
                m.movement = Some(null::movement(
                    &base,
                    &null::Folds::read(&f)?,
                    null::REPLICATES,
                    m.step as u64,
                )?);
            }
        }
    }
    Ok(())
}

/// Plots of the measures against the step, for runs that recorded them.
pub(super) fn figures(fig: &mut Figures, tunes: &[(String, TuneSummary)]) -> Result<()> {
    let pair: Vec<Series> = tunes
        .iter()
        .filter_map(|(l, t)| {
            let p: Vec<(usize, crate::train::pairs::PairLoss)> = t
                .heldout
                .iter()
                .filter_map(|h| Some((h.step, *h.pair_loss.get(l)?)))
                .collect();
            (!p.is_empty()).then(|| {
                series(
                    l.to_string(),
                    p.iter().map(|(s, x)| (*s as f64, x.mean)).collect(),
                    false,
                    p.iter().map(|(s, x)| (*s as f64, x.lo, x.hi)).collect(),
                )
            })
        })
        .collect();
    if !pair.is_empty() {
        fig.lines(
            "heldout_pairs.png",
            "Held-out pair loss (response tokens)",
            "step",
            "loss (nats/token)",
            &pair,
            "Loss on the response tokens of each language's held-out instruction pairs while tuning on it, with bootstrap 95 % intervals over pairs".into(),
        )?;
    }
    let mut moves = vec![];
    for (l, t) in tunes {
        let m: Vec<(f64, crate::importance::null::Movement)> = t
            .metrics
            .iter()
            .filter_map(|m| Some((m.step as f64, m.movement.clone()?)))
            .collect();
        if m.is_empty() {
            continue;
        }
        let pick = |f: fn(&crate::importance::null::Movement) -> crate::importance::null::Interval| {
            let pts = m.iter().map(|(s, x)| (*s, f(x).value)).collect();
            let bars = m.iter().map(|(s, x)| (*s, f(x).lo, f(x).hi)).collect();
            (pts, bars)
        };
        let (p, b) = pick(|x| x.within);
        moves.push(series(format!("{l}: base A vs base B (null)"), p, true, b));
        let (p, b) = pick(|x| x.cross);
        moves.push(series(format!("{l}: base vs tuned, across samples"), p, false, b));
    }
    if !moves.is_empty() {
        fig.lines(
            "movement.png",
            "Spot movement against the cross-sample null",
            "step",
            "Jaccard of top-k sets",
            &moves,
            "Movement: the base model's agreement with itself across two document halves (dashed, the null) against base vs tuned across the same halves (solid), with document-bootstrap 95 % intervals; solid below dashed beyond the intervals = the spot moved".into(),
        )?;
    }
    for (l, t) in tunes {
        let kinds: Vec<String> = t
            .metrics
            .first()
            .map(|m| m.module_share.keys().cloned().collect())
            .unwrap_or_default();
        let shares: Vec<Series> = kinds
            .iter()
            .map(|k| {
                let pts = t
                    .metrics
                    .iter()
                    .filter_map(|m| Some((m.step as f64, *m.module_share.get(k)?)))
                    .collect();
                series(k.clone(), pts, false, vec![])
            })
            .collect();
        if t.metrics.len() > 1 && !shares.is_empty() {
            fig.lines(
                &format!("module_share_{l}.png"),
                &format!("Importance share by module, tuned on {l}"),
                "step",
                "share of importance mass",
                &shares,
                format!("Each module kind's share of the importance mass at every snapshot while tuning on {l}"),
            )?;
        }
    }
    Ok(())
}

/// The evolution table: per language and checkpoint, the held-out pair loss and the movement.
pub(super) fn section(tunes: &[(String, TuneSummary)]) -> String {
    let mut md = String::new();
    let any = tunes.iter().any(|(_, t)| {
        t.metrics.iter().any(|m| m.movement.is_some()) || t.heldout.iter().any(|h| !h.pair_loss.is_empty())
    });
    if !any {
        return md;
    }
    let _ = writeln!(
        md,
        "## Evolution\n\n| language | step | held-out pair loss [95 %] | Jaccard with base | base A vs B (null) | base vs tuned across samples | null − cross [95 %] | verdict |\n|---|---:|---|---:|---|---|---|---|"
    );
    let iv = |x: crate::importance::null::Interval| format!("{:.3} [{:.3}, {:.3}]", x.value, x.lo, x.hi);
    for (l, t) in tunes {
        for m in &t.metrics {
            let pl = t
                .heldout
                .iter()
                .find(|h| h.step == m.step)
                .and_then(|h| h.pair_loss.get(l))
                .map_or("–".into(), |p| match p.change {
                    Some((d, lo, hi)) => format!(
                        "{:.4} [{:.4}, {:.4}]; vs base {d:+.4} [{lo:+.4}, {hi:+.4}]",
                        p.mean, p.lo, p.hi
                    ),
                    None => format!("{:.4} [{:.4}, {:.4}]", p.mean, p.lo, p.hi),
                });
            let (w, c, d, v) = match &m.movement {
                Some(mv) => (iv(mv.within), iv(mv.cross), iv(mv.diff), mv.verdict.clone()),
                None => (
                    "–".into(),
                    "–".into(),
                    "–".into(),
                    if m.step == 0 { "base" } else { "–" }.into(),
                ),
            };
            let _ = writeln!(
                md,
                "| {l} | {} | {pl} | {:.3} | {w} | {c} | {d} | {v} |",
                m.step, m.jaccard_base
            );
        }
    }
    md.push_str(&seed_noise(tunes));
    // Where, at each language's last checkpoint.
    let last: Vec<(&String, &crate::importance::null::Movement, usize)> = tunes
        .iter()
        .filter_map(|(l, t)| {
            t.metrics
                .iter()
                .rev()
                .find_map(|m| Some((l, m.movement.as_ref()?, m.step)))
        })
        .filter(|(_, m, _)| !m.by_module.is_empty())
        .collect();
    if !last.is_empty() {
        let kinds: Vec<&String> = last[0].1.by_module.keys().collect();
        let _ = writeln!(
            md,
            "\nWhere, at the last checkpoint: null − cross on each module kind's tensors and each layer's (* = the interval excludes 0).\n\n| language (step) | {} | layers moved (null − cross) |\n|---|{}---|",
            kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" | "),
            "---:|".repeat(kinds.len())
        );
        let star = |x: &crate::importance::null::Interval| if x.lo > 0.0 || x.hi < 0.0 { "*" } else { "" };
        for (l, m, step) in last {
            let cells: Vec<String> = kinds
                .iter()
                .map(|k| {
                    m.by_module.get(*k).map_or("–".into(), |x| {
                        format!("{:.3} [{:.3}, {:.3}]{}", x.value, x.lo, x.hi, star(x))
                    })
                })
                .collect();
            let moved: Vec<String> = m
                .by_layer
                .iter()
                .enumerate()
                .filter(|(_, x)| x.lo > 0.0)
                .map(|(i, x)| format!("L{i} {:.3}", x.value))
                .collect();
            let _ = writeln!(
                md,
                "| {l} ({step}) | {} | {} of {}: {} |",
                cells.join(" | "),
                moved.len(),
                m.by_layer.len(),
                moved.join(", ")
            );
        }
    }
    md.push_str("\nBoth snapshots of a row read the same calibration documents, dealt into the same 2K folds (halves A and B). The null is the base model's own agreement across the two halves; \"moved\" when the bootstrap interval of null − cross excludes 0 (the tuned spot agrees with the base less than a second sample of the base does).\n\n");
    md
}

/// The tuning-noise table (`train.seeds`): each language's tuned spot against a replicate's
/// (another data order) at each common checkpoint, through the same cross-sample null.
fn seed_noise(tunes: &[(String, TuneSummary)]) -> String {
    let mut md = String::new();
    let iv = |x: crate::importance::null::Interval| format!("{:.3} [{:.3}, {:.3}]", x.value, x.lo, x.hi);
    for (l, t) in tunes {
        let Some(dir) = t.final_checkpoint.parent().and_then(|p| p.parent()) else {
            continue;
        };
        let Ok(Some(sm)) = crate::train::seeds::read(dir) else {
            continue;
        };
        if md.is_empty() {
            md.push_str("\nTuning noise (`train.seeds`): the tuned spot against a replicate tuned with another seed (data order), at the same step. \"moved\" here means two seeds' spots differ beyond document sampling.\n\n| language | replicate seed | step | tuned A vs B (null) | across seeds | null − cross [95 %] | verdict |\n|---|---:|---:|---|---|---|---|\n");
        }
        for m in sm {
            let mv = &m.movement;
            let _ = writeln!(
                md,
                "| {l} | {} | {} | {} | {} | {} | {} |",
                m.seed,
                m.step,
                iv(mv.within),
                iv(mv.cross),
                iv(mv.diff),
                mv.verdict
            );
        }
    }
    md
}

/// What tuning did: each tuned model's intact scores against the base model's on the same items
/// (paired), and the drop from zeroing the tuned spot on the tuned model beside the drop from
/// zeroing the base spot on the base model, at each k both evaluated.
pub(super) fn tuning_effect(evals: &[(String, Vec<crate::eval::ConditionResults>)]) -> String {
    use crate::eval::paired::paired_drop;
    let mut md = String::new();
    let Some((_, base)) = evals.iter().find(|(n, _)| n == "base") else {
        return md;
    };
    let tuned: Vec<_> = evals.iter().filter(|(n, _)| n.starts_with("tuned-")).collect();
    if tuned.is_empty() {
        return md;
    }
    let cond = |c: &'_ [crate::eval::ConditionResults], name: &str| c.iter().find(|x| x.condition == name).cloned();
    let task = |c: &crate::eval::ConditionResults, t: &str| c.results.iter().find(|r| r.task == t).cloned();
    let Some(b0) = cond(base, "base") else { return md };
    let fmt = |d: Option<crate::eval::paired::PairedDrop>| {
        d.map_or("–".into(), |d| {
            format!(
                "{:+.1} % [{:+.1}, {:+.1}]{}",
                d.drop_pct,
                d.ci95.0,
                d.ci95.1,
                if d.significant { " *" } else { "" }
            )
        })
    };
    let _ = writeln!(
        md,
        "## What tuning did\n\nEach tuned model against the base model on the same items (paired 95 % intervals; positive = worse, * = the interval excludes 0), then the drop from zeroing each model's own spot.\n\n| model | task | intact vs base model | k | base spot on base | tuned spot on tuned |\n|---|---|---|---:|---|---|"
    );
    for (name, conds) in tuned {
        let Some(t0) = cond(conds, "base") else { continue };
        for r in &b0.results {
            let tt = task(&t0, &r.task);
            let change = fmt(tt.as_ref().and_then(|x| paired_drop(r, x, 11)));
            let ks: Vec<String> = conds
                .iter()
                .filter_map(|c| c.condition.strip_prefix("spot ").map(str::to_string))
                .collect();
            if ks.is_empty() {
                let _ = writeln!(md, "| {name} | {} | {change} | – | – | – |", r.task);
            }
            for k in ks {
                let spot = format!("spot {k}");
                let on_base = cond(base, &spot)
                    .and_then(|c| task(&c, &r.task))
                    .and_then(|x| paired_drop(r, &x, 12));
                let on_tuned = tt
                    .as_ref()
                    .zip(cond(conds, &spot).and_then(|c| task(&c, &r.task)))
                    .and_then(|(a, x)| paired_drop(a, &x, 13));
                let _ = writeln!(
                    md,
                    "| {name} | {} | {change} | {k} | {} | {} |",
                    r.task,
                    fmt(on_base),
                    fmt(on_tuned)
                );
            }
        }
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::importance::null::{Interval, Movement};
    use crate::train::seeds::SeedMovement;

    #[test]
    fn the_seed_noise_table_lists_each_replicate_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let tune = dir.path().join("tune/python");
        std::fs::create_dir_all(&tune).unwrap();
        let iv = |v: f64| Interval {
            value: v,
            lo: v - 0.01,
            hi: v + 0.01,
        };
        let mv = Movement {
            k_percent: 1.0,
            within: iv(0.30),
            within_tuned: iv(0.29),
            cross: iv(0.28),
            diff: iv(0.02),
            verdict: "moved".into(),
            replicates: 200,
            folds_per_half: 2,
            by_layer: vec![],
            by_module: Default::default(),
        };
        let sm = vec![SeedMovement {
            seed: 7,
            step: 8,
            movement: mv,
        }];
        std::fs::write(
            tune.join(crate::train::seeds::FILE),
            serde_json::to_string(&sm).unwrap(),
        )
        .unwrap();
        let summary: TuneSummary = serde_json::from_value(serde_json::json!({
            "language": "python", "steps": 8, "tokens": 0, "tune_hash": "",
            "final_checkpoint": tune.join("checkpoints/step-000008"), "snapshots": [],
            "first_loss": 0.0, "last_loss": 0.0, "elapsed_s": 0.0, "tokens_per_s": 0.0,
            "history": [], "heldout": [], "metrics": []
        }))
        .unwrap();
        let md = seed_noise(&[("python".into(), summary)]);
        assert!(md.contains("Tuning noise"), "{md}");
        assert!(
            md.contains(
                "| python | 7 | 8 | 0.300 [0.290, 0.310] | 0.280 [0.270, 0.290] | 0.020 [0.010, 0.030] | moved |"
            ),
            "{md}"
        );
        assert_eq!(seed_noise(&[]), "");
    }
}
