//! Paired comparisons of two conditions on the same items: every condition of an evaluation
//! scores the same items, so the difference between two conditions is resampled item by item
//! (a paired bootstrap), which is far tighter than comparing two independent intervals.

use super::{ratio, TaskResult};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The relative drop of `b` against `a` (positive = `b` is worse), with its paired 95 %
/// bootstrap interval over the items both scored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PairedDrop {
    /// The difference in the metric's own units, signed so that positive = `b` is worse:
    /// a − b for accuracy-like metrics, b − a for bits per byte.
    pub diff: f64,
    pub diff_ci95: (f64, f64),
    /// The same in percent of `a`'s value.
    pub drop_pct: f64,
    pub ci95: (f64, f64),
    /// Items in common.
    pub n: usize,
    /// The interval excludes 0.
    pub significant: bool,
    /// Two-sided p-value of "no difference": the difference over its bootstrap standard error,
    /// against a normal distribution (what multiplicity corrections such as [`holm`] take; the
    /// percentile interval alone cannot reach the small levels they need).
    #[serde(default = "one")]
    pub p_value: f64,
}

fn one() -> f64 {
    1.0
}

/// Holm–Bonferroni at family-wise level `alpha`: which of the m tests (given by their p-values)
/// are rejected. Sorted ascending, p(i) is rejected while p(i) ≤ alpha / (m − i + 1) (i from 1);
/// the first that fails stops it. NaN p-values are never rejected.
pub(crate) fn holm(p: &[f64], alpha: f64) -> Vec<bool> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut out = vec![false; m];
    for (i, &j) in order.iter().enumerate() {
        if p[j].is_nan() || p[j] > alpha / (m - i) as f64 {
            break;
        }
        out[j] = true;
    }
    out
}

/// The complementary error function (Numerical Recipes' `erfcc`, fractional error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Two-sided normal p-value of a difference `d` with standard error `se`.
pub(crate) fn normal_p(d: f64, se: f64) -> f64 {
    if se > 0.0 {
        erfc((d / se).abs() / std::f64::consts::SQRT_2)
    } else if d == 0.0 {
        1.0
    } else {
        0.0
    }
}

/// The drop of `b` against `a` from their (value, weight) items: (difference, percent of a).
fn drop(a: &[(f64, f64)], b: &[(f64, f64)], lower_is_better: bool) -> (f64, f64) {
    let (va, vb) = (ratio(a), ratio(b));
    let d = if lower_is_better { vb - va } else { va - vb };
    (d, 100.0 * d / va)
}

fn interval(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[25], v[974])
}

/// The paired bootstrap of the drop of `b` against `a` (1000 resamples of the common items,
/// seeded). None when the two share no items (or either has none recorded).
pub fn paired_drop(a: &TaskResult, b: &TaskResult, seed: u64) -> Option<PairedDrop> {
    let by_id: std::collections::HashMap<&str, (f64, f64)> =
        b.items.iter().map(|i| (i.id.as_str(), (i.value, i.weight))).collect();
    let (mut xa, mut xb) = (vec![], vec![]);
    for i in &a.items {
        if let Some(&vb) = by_id.get(i.id.as_str()) {
            xa.push((i.value, i.weight));
            xb.push(vb);
        }
    }
    if xa.is_empty() {
        return None;
    }
    let lower = a.lower_is_better;
    let (diff, point) = drop(&xa, &xb, lower);
    if !point.is_finite() {
        return None; // `a` scores 0: no relative drop
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_9a1d);
    let n = xa.len();
    let (mut ra, mut rb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (diffs, pcts): (Vec<f64>, Vec<f64>) = (0..1000)
        .map(|_| {
            ra.clear();
            rb.clear();
            for _ in 0..n {
                let j = rng.random_range(0..n);
                ra.push(xa[j]);
                rb.push(xb[j]);
            }
            drop(&ra, &rb, lower)
        })
        .unzip();
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let se = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (diffs.len() - 1) as f64).sqrt();
    let diff_ci95 = interval(diffs);
    Some(PairedDrop {
        diff,
        diff_ci95,
        drop_pct: point,
        ci95: interval(pcts),
        n,
        significant: diff_ci95.0 > 0.0 || diff_ci95.1 < 0.0,
        p_value: normal_p(diff, se),
    })
}

/// Markdown tables of paired comparisons: each condition's drop against the first (base), and
/// at each k the spot against each control (how much worse the spot is than the control, in %
/// of the control's value). `*` marks an interval that excludes 0, `†` a difference that
/// survives Holm–Bonferroni at 5 % across all of that table's tests.
pub(crate) fn tables(conds: &[super::ConditionResults], seed: u64) -> String {
    let Some(base) = conds.first() else {
        return String::new();
    };
    let rows = |pairs: &[(&super::ConditionResults, &super::ConditionResults)], title: &str| {
        // Every cell's comparison first, so Holm sees the whole table's family of tests.
        let mut cells: Vec<Vec<Option<PairedDrop>>> = vec![];
        let mut tasks = vec![];
        for (i, r) in base.results.iter().enumerate() {
            if r.skipped.is_some() {
                continue;
            }
            tasks.push(format!("| {} | {} |", r.task, r.metric));
            cells.push(
                pairs
                    .iter()
                    .map(|(a, b)| match (a.results.get(i), b.results.get(i)) {
                        (Some(x), Some(y)) if x.task == y.task && x.metric == y.metric => paired_drop(x, y, seed),
                        _ => None,
                    })
                    .collect(),
            );
        }
        let ps: Vec<f64> = cells.iter().flatten().flatten().map(|p| p.p_value).collect();
        let survive = holm(&ps, 0.05);
        let mut out = format!(
            "{title} {} tests; † = survives Holm–Bonferroni at 5 % across them ({} do).\n\n| task | metric |",
            ps.len(),
            survive.iter().filter(|&&x| x).count()
        );
        for (a, b) in pairs {
            out += &format!(" {} vs {} |", b.condition, a.condition);
        }
        out += "\n|---|---|";
        out += &"---:|".repeat(pairs.len());
        out += "\n";
        let mut at = 0;
        for (task, row) in tasks.iter().zip(&cells) {
            out += task;
            for c in row {
                match c {
                    Some(p) => {
                        out += &format!(
                            " {:+.1} [{:+.1}, {:+.1}]{}{} |",
                            p.drop_pct,
                            p.ci95.0,
                            p.ci95.1,
                            if p.significant { "*" } else { "" },
                            if survive[at] { "†" } else { "" }
                        );
                        at += 1;
                    }
                    None => out += " – |",
                }
            }
            out += "\n";
        }
        out
    };
    let vs_base: Vec<_> = conds.iter().skip(1).map(|c| (base, c)).collect();
    if vs_base.is_empty() {
        return String::new();
    }
    let mut out = rows(
        &vs_base,
        "Drop % against base, paired over the same items (95 % paired bootstrap; positive = worse; * = the interval excludes 0):",
    );
    // Spot against each control of the same k ("spot 1%" vs "random 1%").
    let mut vs_control = vec![];
    for s in conds.iter().filter(|c| c.spot_set.as_deref() == Some("spot")) {
        let k = s.condition.rsplit(' ').next().unwrap_or("");
        for c in conds.iter().filter(|c| {
            c.spot_set.is_some() && c.spot_set.as_deref() != Some("spot") && c.condition.rsplit(' ').next() == Some(k)
        }) {
            vs_control.push((c, s));
        }
    }
    if !vs_control.is_empty() {
        out += "\n";
        out += &rows(
            &vs_control,
            "The spot against each control at the same k: how much worse the spot is, in % of the control's value (paired; * = the interval excludes 0):",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holm_on_a_known_example() {
        // Holm (1979)-style example: m = 5, α = 0.05; thresholds 0.01, 0.0125, 0.0167, 0.025, 0.05.
        // 0.001 ≤ 0.01 and 0.011 ≤ 0.0125 are rejected; 0.02 > 0.0167 stops it, so 0.03 (≤ 0.05
        // on its own) is not.
        let p = [0.03, 0.001, 0.5, 0.011, 0.02];
        assert_eq!(holm(&p, 0.05), vec![false, true, false, true, false]);
        // Bonferroni alone would reject only 0.001 (< 0.01); unadjusted, four of five.
        assert_eq!(holm(&[0.04, 0.04], 0.05), vec![false, false]);
        assert_eq!(holm(&[0.02, 0.04], 0.05), vec![true, true]);
        assert_eq!(holm(&[f64::NAN, 0.001], 0.05), vec![false, true]);
        assert!(holm(&[], 0.05).is_empty());
    }

    #[test]
    fn normal_p_values() {
        assert!((normal_p(1.959964, 1.0) - 0.05).abs() < 1e-6);
        assert!((normal_p(-2.575829, 1.0) - 0.01).abs() < 1e-6);
        assert!((normal_p(0.0, 1.0) - 1.0).abs() < 1e-6);
        assert_eq!(normal_p(0.3, 0.0), 0.0);
    }
}
