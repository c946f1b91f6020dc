//! `runs/<name>/report.md` and its PNG plots (`runs/<name>/report/`): loss curves, importance
//! heatmaps for base and tuned models, spot overlap across checkpoints, dose–response curves
//! and the results tables. Reads whatever stages of the run exist.

mod evolution;

use crate::plot;

use crate::eval::ConditionResults;
use crate::importance::summary::Summaries;
use crate::recipe::Loaded;
use crate::train::TuneSummary;
use anyhow::Result;
use plot::Series;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Option<T> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// The report's figures: each drawn into `dir` and listed, with its caption, in `report.md`.
struct Figures<'a> {
    dir: &'a Path,
    /// (file, caption)
    list: Vec<(String, String)>,
}

impl Figures<'_> {
    fn lines(&mut self, file: &str, title: &str, x: &str, y: &str, series: &[Series], caption: String) -> Result<()> {
        plot::lines(&self.dir.join(file), title, x, y, series)?;
        self.list.push((file.into(), caption));
        Ok(())
    }

    fn heatmap(&mut self, file: &str, title: &str, grid: &[Vec<f64>], cols: &[String], caption: String) -> Result<()> {
        plot::heatmap(&self.dir.join(file), title, grid, cols, None)?;
        self.list.push((file.into(), caption));
        Ok(())
    }
}

/// Sum of summaries (layer × module and layer × head mass) over languages.
type Grid = Vec<Vec<f64>>;

fn summed(dirs: &[PathBuf]) -> Option<(Grid, Grid)> {
    let mut lm: Option<Vec<Vec<f64>>> = None;
    let mut lh: Option<Vec<Vec<f64>>> = None;
    for d in dirs {
        let s: Summaries = crate::importance::snapshot::read_summaries(d).ok()?;
        let g = crate::track::layer_module_grid(&s);
        let share = |g: Vec<Vec<f64>>| -> Vec<Vec<f64>> {
            let t = s.total_mass.max(1e-30);
            g.into_iter().map(|r| r.into_iter().map(|x| x / t).collect()).collect()
        };
        let (g, h) = (share(g), share(s.head_mass.clone()));
        let add = |acc: &mut Option<Vec<Vec<f64>>>, g: Vec<Vec<f64>>| match acc {
            None => *acc = Some(g),
            Some(a) => {
                for (ra, rg) in a.iter_mut().zip(g) {
                    for (x, y) in ra.iter_mut().zip(rg) {
                        *x += y;
                    }
                }
            }
        };
        add(&mut lm, g);
        add(&mut lh, h);
    }
    Some((lm?, lh?))
}

/// Signed drop % (positive = worse), as in the eval table.
fn drop_pct(base: f64, x: f64, lower_is_better: bool) -> f64 {
    if base == 0.0 || !base.is_finite() || !x.is_finite() {
        return f64::NAN;
    }
    100.0
        * if lower_is_better {
            (x - base) / base
        } else {
            (base - x) / base
        }
}

/// "spot 0.5%" → ("spot", 0.5).
fn parse_condition(c: &str) -> Option<(String, f64)> {
    let (set, k) = c.rsplit_once(' ')?;
    Some((set.to_string(), k.strip_suffix('%')?.parse().ok()?))
}

/// Dose–response series per (task, metric): drop % vs k for each set measured at two or more
/// k, with each point's paired 95 % interval as a bar.
pub(crate) fn dose_response(conds: &[ConditionResults]) -> BTreeMap<(String, String), Vec<Series>> {
    type Points = BTreeMap<String, Vec<(f64, f64, (f64, f64))>>;
    let mut out: BTreeMap<(String, String), Points> = BTreeMap::new();
    let Some(base) = conds.iter().find(|c| c.condition == "base") else {
        return BTreeMap::new();
    };
    for c in conds {
        let Some((set, k)) = parse_condition(&c.condition) else {
            continue;
        };
        for (b, x) in base.results.iter().zip(&c.results) {
            if b.skipped.is_some() || x.skipped.is_some() {
                continue;
            }
            let (d, ci) = match crate::eval::paired::paired_drop(b, x, 1234) {
                Some(p) => (p.drop_pct, p.ci95),
                None => {
                    let d = drop_pct(b.value, x.value, b.lower_is_better);
                    (d, (d, d))
                }
            };
            out.entry((b.task.clone(), b.metric.clone()))
                .or_default()
                .entry(set.clone())
                .or_default()
                .push((k, d, ci));
        }
    }
    // A drop % needs a non-zero base value: tasks without one get no curve.
    out.into_iter()
        .filter(|(_, sets)| sets.values().flatten().any(|p| p.1.is_finite()))
        .map(|(key, sets)| {
            let series = sets
                .into_iter()
                // Curves only (two k or more); a set difference's random set is in the tables.
                .filter(|(name, points)| points.len() >= 2 && !name.ends_with("-random"))
                .map(|(name, mut points)| {
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    Series {
                        dashed: name != "spot",
                        bars: points.iter().map(|p| (p.0, p.2 .0, p.2 .1)).collect(),
                        points: points.iter().map(|p| (p.0, p.1)).collect(),
                        name,
                    }
                })
                .collect();
            (key, series)
        })
        .filter(|(_, series): &(_, Vec<Series>)| !series.is_empty())
        .collect()
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Write `<out>/report/*.png` and `<out>/report.md`; returns the report's path.
pub fn write(loaded: &Loaded) -> Result<PathBuf> {
    let r = &loaded.recipe;
    let out = loaded.out_dir();
    let mut tunes: Vec<(String, TuneSummary)> = r
        .languages
        .iter()
        .filter_map(|l| {
            Some((
                l.clone(),
                read_json(&crate::layout::tune_dir(loaded, l).join("tune.json"))?,
            ))
        })
        .collect();
    evolution::refresh(loaded, &mut tunes)?;
    let evals: Vec<(String, Vec<ConditionResults>)> = std::iter::once("base".to_string())
        .chain(r.languages.iter().map(|l| format!("tuned-{l}")))
        .filter_map(|n| {
            Some((
                n.clone(),
                read_json(&crate::layout::eval_dir(loaded, &n).join("results.json"))?,
            ))
        })
        .collect();
    let base = evals.iter().find(|(n, _)| n == "base").map(|(_, c)| c.as_slice());
    let base_dirs: Vec<PathBuf> = r.languages.iter().map(|l| out.join("base").join(l)).collect();
    let final_dirs: Vec<PathBuf> = r
        .languages
        .iter()
        .map(|l| crate::layout::final_snapshot(loaded, l))
        .collect();
    let mut images: Vec<(String, String)> = vec![]; // (file, caption)
    crate::util::write_dir_atomic(&out.join("report"), true, |dir| {
        let mut fig = Figures { dir, list: vec![] };
        if !tunes.is_empty() {
            tuning_figures(&mut fig, loaded, &tunes)?;
        }
        convergence_figure(&mut fig, &base_dirs)?;
        mass_heatmaps(&mut fig, &base_dirs, &final_dirs)?;
        if let Some(base) = base {
            dose_figures(&mut fig, base)?;
        }
        images = fig.list;
        Ok(())
    })?;

    let mut md = String::new();
    let _ = writeln!(md, "# codespot report: {}\n", r.name);
    let _ = writeln!(
        md,
        "Model `{}`, languages {}, recipe `{}` (resolved copy: `recipe.resolved.toml`).\n",
        r.model,
        r.languages.join(", "),
        loaded.path.display()
    );
    md.push_str(&tuning_table(&tunes));
    md.push_str(&evolution::section(&tunes));
    md.push_str(&comparison_section(&out.join("compare")));
    md.push_str(&evolution::tuning_effect(&evals));
    for (n, conds) in &evals {
        let _ = writeln!(md, "## Results: {n}\n\n{}", crate::eval::table(conds));
    }
    if let Some(base) = base {
        md.push_str(&matched_section(loaded, base));
    }
    if let Ok(man) = crate::spot::file::read_manifest(&out.join("spots").join("base")) {
        md.push_str(&overlap_section(&man));
        if let Some(base) = base {
            md.push_str(&matrix_section(loaded, &man, base));
        }
    }
    if !images.is_empty() {
        let _ = writeln!(md, "## Plots\n");
        for (f, cap) in &images {
            let _ = writeln!(md, "### {cap}\n\n![{cap}](report/{f})\n");
        }
    }
    let p = out.join("report.md");
    crate::util::write_atomic(&p, md.as_bytes())?;
    Ok(p)
}

/// Loss, held-out loss and spot-overlap curves of the tuning runs, and the evolution figures.
fn tuning_figures(fig: &mut Figures, loaded: &Loaded, tunes: &[(String, TuneSummary)]) -> Result<()> {
    let r = &loaded.recipe;
    let train: Vec<Series> = tunes
        .iter()
        .map(|(l, t)| Series {
            name: format!("{l} (train)"),
            points: t.history.iter().map(|h| (h.step as f64, h.loss)).collect(),
            dashed: false,
            bars: vec![],
        })
        .collect();
    fig.lines(
        "loss.png",
        "Training loss",
        "step",
        "loss (nats/token)",
        &train,
        "Training loss per language (each its own run)".into(),
    )?;
    let mut held = vec![];
    for (l, t) in tunes {
        for lang in &r.languages {
            held.push(Series {
                name: format!("tuned on {l}: {lang}"),
                points: t
                    .heldout
                    .iter()
                    .filter_map(|h| Some((h.step as f64, *h.loss.get(lang)?)))
                    .collect(),
                dashed: lang != l,
                bars: vec![],
            });
        }
    }
    fig.lines(
        "heldout.png",
        "Held-out loss",
        "step",
        "loss (nats/token)",
        &held,
        "Held-out loss of every language while tuning on one (dashed: the other languages)".into(),
    )?;
    let overlap: Vec<Series> = tunes
        .iter()
        .flat_map(|(l, t)| {
            [
                Series {
                    name: format!("{l}: Jaccard with base"),
                    points: t.metrics.iter().map(|m| (m.step as f64, m.jaccard_base)).collect(),
                    dashed: false,
                    bars: vec![],
                },
                Series {
                    name: format!("{l}: Spearman with base"),
                    points: t.metrics.iter().map(|m| (m.step as f64, m.spearman_base)).collect(),
                    dashed: true,
                    bars: vec![],
                },
                Series {
                    name: format!("{l}: noise floor (split-half Jaccard)"),
                    points: t
                        .metrics
                        .iter()
                        .filter_map(|m| Some((m.step as f64, m.floor?)))
                        .collect(),
                    dashed: true,
                    bars: vec![],
                },
            ]
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    fig.lines(
        "overlap.png",
        &format!("Top-{}% set vs the base model across checkpoints", r.importance.track_k),
        "step",
        "overlap",
        &overlap,
        "Spot overlap with the base model across checkpoints, beside each snapshot's split-half agreement (two disjoint halves of its calibration tokens) for scale; the movement plot holds the test".into(),
    )?;
    evolution::figures(fig, tunes)?;
    Ok(())
}

/// Calibration convergence and split-half agreement of the base snapshots, by k.
fn convergence_figure(fig: &mut Figures, base_dirs: &[PathBuf]) -> Result<()> {
    let agreements: Vec<(String, crate::importance::agreement::Agreement)> = base_dirs
        .iter()
        .filter_map(|d| {
            let m = crate::importance::snapshot::read_manifest(d).ok()?;
            Some((m.language, m.agreement?))
        })
        .collect();
    if agreements.is_empty() {
        return Ok(());
    }
    let conv: Vec<Series> = agreements
        .iter()
        .flat_map(|(l, a)| {
            [
                Series {
                    name: format!("{l}: top-k at {} vs all tokens", a.half_tokens),
                    points: a.ks.iter().copied().zip(a.convergence.iter().copied()).collect(),
                    dashed: false,
                    bars: vec![],
                },
                Series {
                    name: format!("{l}: two halves (noise floor)"),
                    points: a.ks.iter().copied().zip(a.split_half.iter().copied()).collect(),
                    dashed: true,
                    bars: vec![],
                },
                Series {
                    name: format!("{l}: two quarters ({} tokens each)", a.quarter_tokens),
                    points: a.ks.iter().copied().zip(a.split_quarter.iter().copied()).collect(),
                    dashed: true,
                    bars: vec![],
                },
            ]
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    fig.lines(
        "convergence.png",
        "Calibration convergence of the base snapshots",
        "k (%)",
        "Jaccard",
        &conv,
        "Calibration convergence: the top-k set from the first half of the calibration tokens against the one from all of them (inflated: the half is inside the whole), and the fair measure, disjoint samples against each other: two halves (N/2 each, the noise floor) and two quarters (N/4 each); the rise from quarters to halves shows how much agreement doubling the sample buys".into(),
    )?;
    Ok(())
}

/// Importance mass heatmaps (layer × module, layer × head) of the base and tuned snapshots.
fn mass_heatmaps(fig: &mut Figures, base_dirs: &[PathBuf], final_dirs: &[PathBuf]) -> Result<()> {
    let cols: Vec<String> = crate::track::MODULE_ORDER.iter().map(|s| s.to_string()).collect();
    for (tag, dirs) in [("base", base_dirs), ("tuned", final_dirs)] {
        let Some((lm, lh)) = summed(dirs) else { continue };
        fig.heatmap(
            &format!("mass_{tag}_layer_module.png"),
            &format!("Importance mass, {tag}: layer × module"),
            &lm,
            &cols,
            format!("Importance mass share ({tag} model(s), summed over languages): layer × module"),
        )?;
        let heads: Vec<String> = (0..lh.first().map_or(0, |r| r.len()))
            .map(|h| format!("H{h}"))
            .collect();
        fig.heatmap(
            &format!("mass_{tag}_layer_head.png"),
            &format!("Importance mass, {tag}: layer × head"),
            &lh,
            &heads,
            format!("Importance mass share ({tag}): layer × query head"),
        )?;
    }
    Ok(())
}

/// Dose–response of every task and metric of the base model's evaluation.
fn dose_figures(fig: &mut Figures, base: &[ConditionResults]) -> Result<()> {
    for ((task, metric), series) in dose_response(base) {
        // k spanning more than a decade is drawn on a log axis.
        let ks: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
        let wide = ks.iter().cloned().fold(0.0, f64::max) > 10.0 * ks.iter().cloned().fold(f64::MAX, f64::min);
        let series: Vec<Series> = if wide {
            series.into_iter().map(Series::log_x).collect()
        } else {
            series
        };
        fig.lines(
            &format!("dose_{}_{}.png", slug(&task), slug(&metric)),
            &format!("{task} {metric}: drop vs spot size"),
            if wide {
                "log10 k (k: % of layer parameters zeroed)"
            } else {
                "k (% of layer parameters zeroed)"
            },
            "drop % (positive = worse)",
            &series,
            format!("Dose–response, {task} {metric}: spot (solid) vs controls (dashed), with paired 95 % intervals"),
        )?;
    }
    Ok(())
}

/// The tuning runs' table (empty without runs).
fn tuning_table(tunes: &[(String, TuneSummary)]) -> String {
    let mut md = String::new();
    if tunes.is_empty() {
        return md;
    }
    let _ = writeln!(md, "## Tuning\n\n| language | steps | tokens | tokens/s | wall s | first loss | last loss | held-out (own) base → final |\n|---|---:|---:|---:|---:|---:|---:|---:|");
    for (l, t) in tunes {
        let own = |i: usize| {
            t.heldout
                .get(i)
                .and_then(|h| h.loss.get(l))
                .copied()
                .unwrap_or(f64::NAN)
        };
        let _ = writeln!(
            md,
            "| {l} | {} | {} | {:.1} | {:.0} | {:.4} | {:.4} | {:.4} → {:.4} |",
            t.steps,
            t.tokens,
            t.tokens_per_s,
            t.elapsed_s,
            t.first_loss,
            t.last_loss,
            own(0),
            own(t.heldout.len().saturating_sub(1))
        );
    }
    md.push('\n');
    md
}

/// The spot before and after tuning, from `compare/*/compare.json` (empty without any).
fn comparison_section(compare_dir: &Path) -> String {
    let mut md = String::new();
    let mut comps: Vec<(String, crate::track::compare::Comparison)> = std::fs::read_dir(compare_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                read_json(&e.path().join("compare.json"))?,
            ))
        })
        .collect();
    comps.sort_by(|a, b| a.0.cmp(&b.0));
    if !comps.is_empty() {
        let _ = writeln!(md, "## Spot before and after tuning\n\n| comparison | Jaccard by k | movement (cross-sample null) | Spearman | heads entered | heads left |\n|---|---|---|---:|---|---|");
        for (n, c) in &comps {
            let j: Vec<String> = c
                .jaccard
                .iter()
                .enumerate()
                .map(|(i, (k, j))| {
                    let floor = match c.floor.get(i).and_then(|f| f.floor) {
                        Some(f) => format!(" (floor {f:.3})"),
                        None => String::new(),
                    };
                    format!("{}%: {j:.3}{floor}", crate::spot::file::fmt_k(*k))
                })
                .collect();
            let hs = |v: &[(usize, usize)]| {
                v.iter()
                    .map(|(l, h)| format!("L{l}.H{h}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let mv = c.movement.as_ref().map_or("–".to_string(), |m| {
                format!(
                    "{} at {}%: within − cross {:.3} [{:.3}, {:.3}]",
                    m.verdict,
                    crate::spot::file::fmt_k(m.k_percent),
                    m.diff.value,
                    m.diff.lo,
                    m.diff.hi
                )
            });
            let _ = writeln!(
                md,
                "| {n} | {} | {mv} | {} | {} | {} |",
                j.join(", "),
                c.spearman.map_or("–".into(), |s| format!("{s:.3}")),
                hs(&c.heads_entered),
                hs(&c.heads_left)
            );
        }
        md.push_str("\nThe floor is the lower of the two sides' split-half agreement (the Jaccard of top-k sets from two disjoint halves of one snapshot's calibration), shown for scale only: a language's base and tuned snapshots read the *same* tokens, so their Jaccard is not lowered by sampling and comparing it with a floor from other tokens tests nothing. The movement column is the test: with `importance.folds`, both snapshots are scored on the same 2K document folds, and the base's own cross-sample agreement J(base_A, base_B) is set against the cross-model, cross-sample ½[J(base_A, tuned_B) + J(base_B, tuned_A)]; \"moved\" when the document-bootstrap interval of their difference excludes 0.\n");
        md.push('\n');
    }
    md
}

/// Specificity at matched damage: each task's drop where the reference task (prose) has
/// dropped `eval.matched_pct` %, per set, with the spot's excess over each set.
fn matched_section(loaded: &Loaded, base: &[ConditionResults]) -> String {
    let e = &loaded.recipe.eval;
    let Some(first) = base.first() else {
        return String::new();
    };
    let mut seen = std::collections::BTreeSet::new();
    let tables: Vec<_> = first
        .results
        .iter()
        .filter(|r| r.skipped.is_none() && r.task != e.matched_reference && seen.insert(r.task.clone()))
        .filter_map(|r| {
            crate::eval::matched::matched_table(base, &e.matched_reference, &r.task, e.matched_pct, 1000, e.seed)
        })
        .collect();
    if tables.is_empty() {
        return String::new();
    }
    format!(
        "## Specificity at matched damage\n\nEach set's dose–response curve read at the k where {} has risen {:.0} %: the damage to each task there, and how much more the spot does at its own matched k than each set at its own (spot − set; * = the 95 % interval excludes 0). Items are resampled together across sets.\n{}\n",
        e.matched_reference,
        e.matched_pct,
        crate::eval::matched::markdown(&tables)
    )
}

/// The baselines' overlap (Jaccard) with the spot, per k.
fn overlap_section(man: &crate::spot::file::SpotManifest) -> String {
    if man.overlap.is_empty() {
        return String::new();
    }
    let mut md = String::from("## Baselines' overlap with the spot\n\n| k, set | Jaccard with the spot | split-half floor |\n|---|---:|---:|\n");
    for (key, j) in &man.overlap {
        let k: Option<f64> = key.strip_prefix('k').and_then(|r| r.split(':').next()?.parse().ok());
        let floor = k
            .and_then(|k| {
                man.floor
                    .as_ref()?
                    .floor(k)
                    .or_else(|| man.stability.get(&crate::spot::file::fmt_k(k)).copied())
            })
            .map_or("–".to_string(), |f| format!("{f:.3}"));
        let _ = writeln!(md, "| {key} | {j:.3} | {floor} |");
    }
    md.push_str("\nThe floor is the agreement of two disjoint calibration samples of the spot's own criterion: a baseline whose overlap with the spot reaches it selects what a second Taylor sample would.\n\n");
    md
}

/// The language matrix (Jaccard of each language's own top-k, floors on the diagonal) and the
/// transfer matrix (each own spot ablated, every task's drop against the intact model).
fn matrix_section(loaded: &Loaded, man: &crate::spot::file::SpotManifest, base: &[ConditionResults]) -> String {
    let mut md = String::new();
    for (k, m) in &man.language_matrix {
        let _ = writeln!(
            md,
            "## Language matrix at k = {k} %\n\nJaccard of each language's own top-{k} % set (per tensor, layers); the diagonal is that language's split-half agreement (two disjoint calibration halves), the floor its row is read against.\n"
        );
        let _ = writeln!(
            md,
            "| | {} |\n|---|{}",
            m.languages.join(" | "),
            "---:|".repeat(m.languages.len())
        );
        for (l, row) in m.languages.iter().zip(&m.jaccard) {
            let cells: Vec<String> = row.iter().map(|j| format!("{j:.3}")).collect();
            let _ = writeln!(md, "| {l} | {} |", cells.join(" | "));
        }
        md.push('\n');
    }
    let Some(mk) = loaded.recipe.eval.detail_k else {
        return md;
    };
    let kk = crate::spot::file::fmt_k(mk);
    let Some(intact) = base.iter().find(|c| c.condition == "base") else {
        return md;
    };
    let rows: Vec<&ConditionResults> = base
        .iter()
        .filter(|c| {
            let set = c.condition.rsplit_once(' ').map_or("", |x| x.0);
            set.starts_with("own=") || set.starts_with("spot") || set.starts_with("random")
        })
        .filter(|c| c.condition.ends_with(&format!(" {kk}%")))
        .collect();
    if rows.is_empty() {
        return md;
    }
    let tasks: Vec<&crate::eval::TaskResult> = {
        let mut seen = std::collections::BTreeSet::new();
        intact
            .results
            .iter()
            .filter(|r| r.skipped.is_none() && seen.insert(r.task.clone()))
            .collect()
    };
    let _ = writeln!(
        md,
        "### Transfer matrix and arms at k = {kk} %\n\nEach row ablates one set (each language's own spot, the spot, its arms and their random sets); each cell is that task's drop % against the intact model with its paired 95 % interval.\n\n| set | {} |\n|---|{}",
        tasks.iter().map(|t| t.task.as_str()).collect::<Vec<_>>().join(" | "),
        "---:|".repeat(tasks.len())
    );
    for c in rows {
        let cells: Vec<String> = tasks
            .iter()
            .map(|t| {
                c.results
                    .iter()
                    .find(|r| r.task == t.task && r.metric == t.metric)
                    .and_then(|r| crate::eval::paired::paired_drop(t, r, 1234))
                    .map_or("–".into(), |p| {
                        format!("{:+.1} [{:+.1}, {:+.1}]", p.drop_pct, p.ci95.0, p.ci95.1)
                    })
            })
            .collect();
        let _ = writeln!(md, "| {} | {} |", c.condition, cells.join(" | "));
    }
    md.push('\n');
    md
}
