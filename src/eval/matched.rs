//! Specificity at matched damage: a spot may hurt code more than a random set only because it
//! hurts everything more. So each condition's dose–response curve (one set at several k) is
//! read at the k where a reference task (prose bits per byte) has dropped by a set amount, and
//! the code damage there is compared across sets: at equal prose damage, how much more does
//! the spot hurt code than a random, magnitude or prose set does?
//!
//! Curves are interpolated linearly in log k between measured points (and linearly from the
//! intact model at k = 0 below the smallest k). Intervals come from a bootstrap over items,
//! resampled once per replicate and task and shared by every condition (paired), so the
//! difference between two sets at matched damage has its own interval.

use super::{ConditionResults, TaskResult};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One curve point: k (percent), the reference task's drop % and the target task's drop %.
pub(crate) type Point = (f64, f64, f64);

/// Where the reference drop first reaches `target` along `points` (sorted by k, each k > 0):
/// `(k*, target drop at k*)`, or None when the curve never reaches it. Below the first point the
/// curve starts from the intact model (k = 0, both drops 0).
pub(crate) fn at_matched(points: &[Point], target: f64) -> Option<(f64, f64)> {
    let mut prev: Option<Point> = None;
    for &p in points {
        if !(p.1.is_finite() && p.2.is_finite()) {
            return None;
        }
        if p.1 >= target {
            return Some(match prev {
                // From the intact model: linear in k.
                None => {
                    let t = if p.1 > 0.0 { target / p.1 } else { 1.0 };
                    (t * p.0, t * p.2)
                }
                Some(q) => {
                    let t = if p.1 > q.1 { (target - q.1) / (p.1 - q.1) } else { 1.0 };
                    let lk = q.0.ln() + t * (p.0.ln() - q.0.ln());
                    (lk.exp(), q.2 + t * (p.2 - q.2))
                }
            });
        }
        prev = Some(p);
    }
    None
}

/// One set's reading at matched reference damage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Matched {
    pub set: String,
    /// k* and its interval (over the replicates that reach the target).
    pub k: Option<f64>,
    pub k_ci95: Option<(f64, f64)>,
    /// The target task's drop % at k*, and its interval.
    pub drop_pct: Option<f64>,
    pub ci95: Option<(f64, f64)>,
    /// The spot's drop at its k* minus this set's at its own k* (positive: the spot hurts the
    /// target task more at equal reference damage), with its paired interval.
    pub spot_minus: Option<f64>,
    pub spot_minus_ci95: Option<(f64, f64)>,
    /// Share of bootstrap replicates in which the curve reached the target.
    pub reached: f64,
    /// The target was passed already at the smallest measured k, so k* and the reading come
    /// from the straight line between the intact model and that point: an assumption, not a
    /// measurement (a set whose first few weights break the model jumps, it does not ramp).
    #[serde(default)]
    pub below_first_k: bool,
}

/// The matched-damage table of one target task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct MatchedTable {
    pub reference: String,
    pub task: String,
    pub target_pct: f64,
    pub rows: Vec<Matched>,
}

/// Items of one task per condition, aligned on the base condition's item ids.
struct Aligned {
    base: Vec<(f64, f64)>,
    lower: bool,
    /// Per condition index: the same items in the base's order, or None when it lacks any.
    conds: Vec<Option<Vec<(f64, f64)>>>,
}

fn task_of<'a>(c: &'a ConditionResults, task: &str) -> Option<&'a TaskResult> {
    c.results.iter().find(|r| r.task == task && r.skipped.is_none())
}

fn align(conds: &[ConditionResults], task: &str) -> Option<Aligned> {
    let base = task_of(conds.first()?, task)?;
    let ids: Vec<&str> = base.items.iter().map(|i| i.id.as_str()).collect();
    if ids.is_empty() {
        return None;
    }
    let conds = conds
        .iter()
        .map(|c| {
            let r = task_of(c, task)?;
            let by: BTreeMap<&str, (f64, f64)> = r.items.iter().map(|i| (i.id.as_str(), (i.value, i.weight))).collect();
            ids.iter().map(|id| by.get(id).copied()).collect()
        })
        .collect();
    Some(Aligned {
        base: base.items.iter().map(|i| (i.value, i.weight)).collect(),
        lower: base.lower_is_better,
        conds,
    })
}

/// Drop % of `x` against `b` from (value, weight) items, positive = worse.
fn drop_of(b: &[(f64, f64)], x: &[(f64, f64)], lower: bool, idx: &[usize]) -> f64 {
    let r = |v: &[(f64, f64)]| {
        let (s, w) = idx.iter().fold((0.0, 0.0), |(s, w), &i| (s + v[i].0, w + v[i].1));
        s / w.max(1e-12)
    };
    let (vb, vx) = (r(b), r(x));
    100.0 * if lower { (vx - vb) / vb } else { (vb - vx) / vb }
}

fn interval(mut v: Vec<f64>) -> Option<(f64, f64)> {
    if v.len() < 20 {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    Some((at(0.025), at(0.975)))
}

/// The matched-damage table: for each set (conditions named "SET K%"), the `task` drop % where
/// `reference` has dropped `target_pct` %, with bootstrap intervals (`reps` replicates, seeded),
/// and the spot's reading minus each set's.
pub(crate) fn matched_table(
    conds: &[ConditionResults],
    reference: &str,
    task: &str,
    target_pct: f64,
    reps: usize,
    seed: u64,
) -> Option<MatchedTable> {
    let (ra, ta) = (align(conds, reference)?, align(conds, task)?);
    // Curves: set → [(k, condition index)] sorted by k.
    let mut curves: BTreeMap<String, Vec<(f64, usize)>> = BTreeMap::new();
    for (i, c) in conds.iter().enumerate().skip(1) {
        let Some((set, k)) = c.condition.rsplit_once(' ') else {
            continue;
        };
        let Some(k) = k.strip_suffix('%').and_then(|k| k.parse::<f64>().ok()) else {
            continue;
        };
        if ra.conds[i].is_some() && ta.conds[i].is_some() {
            curves.entry(set.to_string()).or_default().push((k, i));
        }
    }
    let curves: BTreeMap<String, Vec<(f64, usize)>> = curves
        .into_iter()
        .filter(|(_, v)| v.len() >= 2)
        .map(|(s, mut v)| {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            (s, v)
        })
        .collect();
    if curves.is_empty() {
        return None;
    }
    fn full(a: &Aligned, i: usize) -> &[(f64, f64)] {
        a.conds[i].as_deref().expect("checked")
    }
    let read = |ridx: &[usize], tidx: &[usize]| -> BTreeMap<&str, Option<(f64, f64)>> {
        curves
            .iter()
            .map(|(s, pts)| {
                let points: Vec<Point> = pts
                    .iter()
                    .map(|&(k, i)| {
                        (
                            k,
                            drop_of(&ra.base, full(&ra, i), ra.lower, ridx),
                            drop_of(&ta.base, full(&ta, i), ta.lower, tidx),
                        )
                    })
                    .collect();
                (s.as_str(), at_matched(&points, target_pct))
            })
            .collect()
    };
    let all = |n: usize| (0..n).collect::<Vec<_>>();
    let point = read(&all(ra.base.len()), &all(ta.base.len()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x03a7_c4ed);
    let mut boot: Vec<BTreeMap<&str, Option<(f64, f64)>>> = Vec::with_capacity(reps);
    for _ in 0..reps {
        let ridx: Vec<usize> = (0..ra.base.len()).map(|_| rng.random_range(0..ra.base.len())).collect();
        let tidx: Vec<usize> = (0..ta.base.len()).map(|_| rng.random_range(0..ta.base.len())).collect();
        boot.push(read(&ridx, &tidx));
    }
    let spot = "spot";
    let rows = curves
        .keys()
        .map(|s| {
            let s = s.as_str();
            let got: Vec<(f64, f64)> = boot.iter().filter_map(|b| b[s]).collect();
            let diffs: Vec<f64> = boot
                .iter()
                .filter_map(|b| Some(b.get(spot).copied()??.1 - b[s]?.1))
                .collect();
            let spot_point = point.get(spot).copied().flatten();
            let first_k = curves[s].first().map(|p| p.0);
            Matched {
                below_first_k: point[s].zip(first_k).is_some_and(|(p, k)| p.0 < k),
                set: s.to_string(),
                k: point[s].map(|p| p.0),
                k_ci95: interval(got.iter().map(|p| p.0).collect()),
                drop_pct: point[s].map(|p| p.1),
                ci95: interval(got.iter().map(|p| p.1).collect()),
                spot_minus: spot_point.zip(point[s]).map(|(a, b)| a.1 - b.1),
                spot_minus_ci95: if s == spot { None } else { interval(diffs) },
                reached: got.len() as f64 / reps.max(1) as f64,
            }
        })
        .collect();
    Some(MatchedTable {
        reference: reference.into(),
        task: task.into(),
        target_pct,
        rows,
    })
}

/// A markdown rendering of matched-damage tables.
pub(crate) fn markdown(tables: &[MatchedTable]) -> String {
    let mut out = String::new();
    for t in tables {
        out += &format!(
            "\n{} drop % where {} has dropped {:.0} % (interpolated in log k; 95 % item bootstrap, paired across sets):\n\n| set | k* (%) | {} drop % | spot − set |\n|---|---:|---:|---:|\n",
            t.task, t.reference, t.target_pct, t.task
        );
        for r in &t.rows {
            let ci = |c: Option<(f64, f64)>, p: usize| c.map_or(String::new(), |(a, b)| format!(" [{a:.p$}, {b:.p$}]"));
            let reached = if r.reached < 0.975 {
                format!(" (reached in {:.0} % of replicates)", 100.0 * r.reached)
            } else {
                String::new()
            };
            let k = match r.k {
                Some(k) if r.below_first_k => format!("< smallest k ({k:.2e}, from the intact model)"),
                Some(k) => format!("{k:.4}{}", ci(r.k_ci95, 4)),
                None => "not reached".into(),
            };
            let d = match r.drop_pct {
                Some(d) => format!("{d:+.1}{}{reached}", ci(r.ci95, 1)),
                None => "–".into(),
            };
            let m = match (r.set.as_str(), r.spot_minus) {
                ("spot", _) | (_, None) => "–".into(),
                (_, Some(m)) => {
                    let sig = r.spot_minus_ci95.is_some_and(|(a, b)| a > 0.0 || b < 0.0);
                    format!("{m:+.1}{}{}", ci(r.spot_minus_ci95, 1), if sig { "*" } else { "" })
                }
            };
            out += &format!("| {} | {k} | {d} | {m} |\n", r.set);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_on_constructed_curves() {
        // Reference drop doubles per decade of k; target drop is 3× the reference.
        let pts: Vec<Point> = [(0.01, 2.0, 6.0), (0.1, 4.0, 12.0), (1.0, 8.0, 24.0), (10.0, 16.0, 48.0)].to_vec();
        // 10 % lies between k = 1 (8) and 10 (16), a quarter of the way: log k = 0.25·ln 10.
        let (k, d) = at_matched(&pts, 10.0).unwrap();
        assert!((k - 10f64.powf(0.25)).abs() < 1e-12, "{k}");
        assert!((d - 30.0).abs() < 1e-12, "{d}");
        // Exactly at a point.
        let (k, d) = at_matched(&pts, 4.0).unwrap();
        assert!((k - 0.1).abs() < 1e-12 && (d - 12.0).abs() < 1e-12);
        // Below the first point: linear from the intact model.
        let (k, d) = at_matched(&pts, 1.0).unwrap();
        assert!((k - 0.005).abs() < 1e-12 && (d - 3.0).abs() < 1e-12);
        // Never reached.
        assert_eq!(at_matched(&pts, 20.0), None);
        // Non-monotone: the first crossing counts.
        let wiggly: Vec<Point> = vec![(0.1, 5.0, 1.0), (1.0, 12.0, 2.0), (10.0, 9.0, 3.0)];
        let (k, d) = at_matched(&wiggly, 10.0).unwrap();
        let t = 5.0 / 7.0;
        assert!((k - 10f64.powf(-1.0 + t)).abs() < 1e-12 && (d - (1.0 + t)).abs() < 1e-12);
    }

    fn cond(name: &str, tasks: &[(&str, bool, Vec<f64>)]) -> ConditionResults {
        ConditionResults {
            condition: name.into(),
            model: "m".into(),
            model_sha256: String::new(),
            spot: None,
            spot_set: name.split(' ').next().map(String::from),
            zeroed: 0,
            results: tasks
                .iter()
                .map(|(t, lower, v)| TaskResult {
                    task: t.to_string(),
                    metric: "bits/byte".into(),
                    value: v.iter().sum::<f64>() / v.len() as f64,
                    ci95: (0.0, 0.0),
                    n: v.len(),
                    lower_is_better: *lower,
                    settings: serde_json::Value::Null,
                    skipped: None,
                    items: v
                        .iter()
                        .enumerate()
                        .map(|(i, &x)| super::super::Item::new(i, x, 1.0, serde_json::Value::Null))
                        .collect(),
                })
                .collect(),
            seconds: 0.0,
        }
    }

    #[test]
    fn the_spot_hurts_code_more_at_matched_prose_damage() {
        // Prose items all rise by the same factor in both sets; code rises 4× the prose rise
        // under the spot, 1× under random. At 10 % prose damage: spot +40 %, random +10 %.
        let base_p = vec![1.0, 2.0, 1.5, 1.2, 0.8, 1.1, 1.3, 0.9];
        let base_c = vec![0.5, 0.7, 0.6, 0.4, 0.8, 0.55, 0.65, 0.45];
        let scale = |v: &[f64], f: f64| v.iter().map(|x| x * (1.0 + f / 100.0)).collect::<Vec<_>>();
        let mut conds = vec![cond(
            "base",
            &[("text-bpb", true, base_p.clone()), ("code", true, base_c.clone())],
        )];
        for (k, prose) in [(0.1, 5.0), (1.0, 20.0)] {
            for (set, mult) in [("spot", 4.0), ("random", 1.0)] {
                conds.push(cond(
                    &format!("{set} {k}%"),
                    &[
                        ("text-bpb", true, scale(&base_p, prose)),
                        ("code", true, scale(&base_c, prose * mult)),
                    ],
                ));
            }
        }
        let t = matched_table(&conds, "text-bpb", "code", 10.0, 200, 7).unwrap();
        let row = |s: &str| t.rows.iter().find(|r| r.set == s).unwrap().clone();
        let (spot, random) = (row("spot"), row("random"));
        // 10 % lies a third of the way from 5 to 20: k* = 10^(-1 + 1/3).
        let want_k = 10f64.powf(-1.0 + 1.0 / 3.0);
        assert!((spot.k.unwrap() - want_k).abs() < 1e-9);
        assert!((spot.drop_pct.unwrap() - 40.0).abs() < 1e-9, "{:?}", spot.drop_pct);
        assert!((random.drop_pct.unwrap() - 10.0).abs() < 1e-9);
        assert!((random.spot_minus.unwrap() - 30.0).abs() < 1e-9);
        // Every item moves by the same factor, so every replicate gives the same reading.
        let (lo, hi) = random.spot_minus_ci95.unwrap();
        assert!((lo - 30.0).abs() < 1e-9 && (hi - 30.0).abs() < 1e-9, "{lo} {hi}");
        assert_eq!(spot.reached, 1.0);
        assert!(!spot.below_first_k);
        // A target below the first point's damage is read off the line from the intact model,
        // and said so.
        let t2 = matched_table(&conds, "text-bpb", "code", 2.0, 50, 7).unwrap();
        let spot = t2.rows.iter().find(|r| r.set == "spot").unwrap();
        assert!(
            spot.below_first_k && (spot.k.unwrap() - 0.04).abs() < 1e-9 && (spot.drop_pct.unwrap() - 8.0).abs() < 1e-9
        );
        assert!(markdown(&[t2]).contains("< smallest k"));
        assert!(markdown(&[t]).contains("| random |"));
    }
}
