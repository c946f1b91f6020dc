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
    let diff_ci95 = interval(diffs);
    Some(PairedDrop {
        diff,
        diff_ci95,
        drop_pct: point,
        ci95: interval(pcts),
        n,
        significant: diff_ci95.0 > 0.0 || diff_ci95.1 < 0.0,
    })
}

/// Markdown tables of paired comparisons: each condition's drop against the first (base), and
/// at each k the spot against each control (how much worse the spot is than the control, in %
/// of the control's value). `*` marks an interval that excludes 0.
pub fn tables(conds: &[super::ConditionResults], seed: u64) -> String {
    let Some(base) = conds.first() else {
        return String::new();
    };
    let cell = |a: &TaskResult, b: &TaskResult| match paired_drop(a, b, seed) {
        Some(p) => format!(
            " {:+.1} [{:+.1}, {:+.1}]{} |",
            p.drop_pct,
            p.ci95.0,
            p.ci95.1,
            if p.significant { "*" } else { "" }
        ),
        None => " – |".into(),
    };
    let rows = |pairs: &[(&super::ConditionResults, &super::ConditionResults)], title: &str| {
        let mut out = format!("{title}\n\n| task | metric |");
        for (a, b) in pairs {
            out += &format!(" {} vs {} |", b.condition, a.condition);
        }
        out += "\n|---|---|";
        out += &"---:|".repeat(pairs.len());
        out += "\n";
        for (i, r) in base.results.iter().enumerate() {
            if r.skipped.is_some() {
                continue;
            }
            out += &format!("| {} | {} |", r.task, r.metric);
            for (a, b) in pairs {
                match (a.results.get(i), b.results.get(i)) {
                    (Some(x), Some(y)) if x.task == y.task && x.metric == y.metric => out += &cell(x, y),
                    _ => out += " – |",
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
