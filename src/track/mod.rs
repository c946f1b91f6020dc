//! Following the spot over time: the measures that compare importance snapshots (top-k
//! overlap overall and per layer, Spearman rank correlation, mass shares), log10 importance
//! histograms, heatmap images, and their TensorBoard logging.

pub mod compare;
pub mod tensorboard;

use crate::importance::snapshot::Snapshot;
use crate::importance::summary::Summaries;
use crate::importance::Scores;
use crate::model::names;
pub(crate) use crate::topk::jaccard_per_layer;
pub use crate::topk::top_masks;

use anyhow::Result;
use std::collections::BTreeMap;
pub(crate) use tensorboard::{Histogram, Tb};

/// Module kinds in display order (columns of the layer × module heatmap): the block's slots in
/// `model::arch::BLOCK` order.
pub const MODULE_ORDER: [&str; crate::model::arch::BLOCK.len()] = {
    let kinds = crate::model::arch::ModuleKind::LAYER_KINDS;
    let mut s = [""; crate::model::arch::BLOCK.len()];
    let mut i = 0;
    while i < kinds.len() {
        s[i] = kinds[i].short();
        i += 1;
    }
    s
};

/// Average ranks (ties share the mean of their positions), 0-based.
fn ranks(v: &[f32]) -> Vec<f64> {
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    idx.sort_unstable_by(|&a, &b| v[a as usize].total_cmp(&v[b as usize]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i + 1;
        while j < idx.len() && v[idx[j] as usize] == v[idx[i] as usize] {
            j += 1;
        }
        let avg = (i + j - 1) as f64 / 2.0;
        for &k in &idx[i..j] {
            r[k as usize] = avg;
        }
        i = j;
    }
    r
}

/// Spearman rank correlation of two score maps over the tensors both hold (same shapes),
/// on every element when there are at most `max_elems`, else on an evenly strided sample of
/// about `max_elems` elements (the same positions in both maps).
pub fn spearman(a: &Scores, b: &Scores, max_elems: usize) -> f64 {
    let total: usize = a
        .tensors
        .iter()
        .filter(|(n, t)| b.tensors.get(*n).is_some_and(|u| u.shape == t.shape))
        .map(|(_, t)| t.numel())
        .sum();
    let stride = total.div_ceil(max_elems.max(1)).max(1);
    let (mut xa, mut xb) = (Vec::new(), Vec::new());
    let mut pos = 0usize;
    for (n, t) in &a.tensors {
        let Some(u) = b.tensors.get(n) else { continue };
        if u.shape != t.shape {
            continue;
        }
        // Global positions pos, pos+1, …: keep those divisible by `stride`.
        let first = (stride - pos % stride) % stride;
        let mut i = first;
        while i < t.data.len() {
            xa.push(t.data[i]);
            xb.push(u.data[i]);
            i += stride;
        }
        pos += t.data.len();
    }
    pearson(&ranks(&xa), &ranks(&xb))
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}

/// log10 of a score, with zero (and anything below 1e-30) clamped to -30.
fn log10(x: f32) -> f64 {
    (x as f64).max(1e-30).log10()
}

/// log10-importance histograms per layer (`L07`) and per module kind (`q`, `gate`, …), on a
/// shared range so they compare.
pub(crate) fn log10_histograms(
    scores: &Scores,
    buckets: usize,
) -> (BTreeMap<String, Histogram>, BTreeMap<String, Histogram>) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for t in scores.tensors.values() {
        for &x in &t.data {
            if x > 0.0 {
                let l = log10(x);
                lo = lo.min(l);
                hi = hi.max(l);
            }
        }
    }
    if !lo.is_finite() {
        (lo, hi) = (-30.0, 0.0);
    }
    let (lo, hi) = (lo.floor(), hi.ceil().max(lo.floor() + 1.0));
    let mut by_layer: BTreeMap<String, Vec<&[f32]>> = BTreeMap::new();
    let mut by_kind: BTreeMap<String, Vec<&[f32]>> = BTreeMap::new();
    for (n, t) in &scores.tensors {
        let Some(p) = names::parse(n) else { continue };
        if let Some(l) = p.layer {
            by_layer.entry(format!("L{l:02}")).or_default().push(&t.data);
            by_kind.entry(p.kind.short().to_string()).or_default().push(&t.data);
        }
    }
    let hist = |parts: Vec<&[f32]>| {
        Histogram::new(
            parts.into_iter().flat_map(|d| d.iter().map(|&x| log10(x).max(lo))),
            lo,
            hi,
            buckets,
        )
    };
    (
        by_layer.into_iter().map(|(k, v)| (k, hist(v))).collect(),
        by_kind.into_iter().map(|(k, v)| (k, hist(v))).collect(),
    )
}

/// Layer × module-kind importance mass (rows = layers, columns = [`MODULE_ORDER`]).
pub(crate) fn layer_module_grid(s: &Summaries) -> Vec<Vec<f64>> {
    (0..s.num_layers)
        .map(|l| {
            MODULE_ORDER
                .iter()
                .map(|k| {
                    s.layer_module_mass
                        .get(&l)
                        .and_then(|m| m.get(*k))
                        .copied()
                        .unwrap_or(0.0)
                })
                .collect()
        })
        .collect()
}

pub(crate) use crate::plot::colour;

/// A square `size × size` RGB heatmap of `grid` (rows top to bottom, colour = value / max),
/// cells scaled to fill the square.
pub(crate) fn heatmap_rgb(grid: &[Vec<f64>], size: usize) -> Vec<u8> {
    let rows = grid.len().max(1);
    let cols = grid.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let max = grid.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
    let mut img = vec![0u8; size * size * 3];
    for y in 0..size {
        let r = y * rows / size;
        for x in 0..size {
            let c = x * cols / size;
            let v = grid.get(r).and_then(|row| row.get(c)).copied().unwrap_or(0.0);
            let rgb = colour(if max > 0.0 { v / max } else { 0.0 });
            img[(y * size + x) * 3..][..3].copy_from_slice(&rgb);
        }
    }
    img
}

/// Side of the heatmap images written to TensorBoard.
pub(crate) const IMAGE_SIZE: usize = 270;
/// Side of the labelled layer × head image (axes, colour bar on a scale fixed for the run).
pub(crate) const HEAD_IMAGE_SIZE: usize = 660;

/// What one snapshot contributes to TensorBoard, compared with the base and the previous one.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SnapshotMetrics {
    pub step: usize,
    pub jaccard_base: f64,
    pub jaccard_prev: Option<f64>,
    pub jaccard_base_layer: Vec<f64>,
    pub jaccard_prev_layer: Option<Vec<f64>>,
    pub spearman_base: f64,
    pub module_share: BTreeMap<String, f64>,
    pub layer_share: Vec<f64>,
    /// This snapshot's split-half agreement at the tracked k (the noise floor of the Jaccards
    /// above), overall and per layer, and its convergence (N/2 vs N tokens).
    #[serde(default)]
    pub floor: Option<f64>,
    #[serde(default)]
    pub floor_layer: Option<Vec<f64>>,
    #[serde(default)]
    pub convergence: Option<f64>,
    /// Each query head's share of the tracked top-k set, `[layer][head]` (k/v rows count for
    /// each query head they serve), and the fixed top of its colour scale: 1.5 × the base
    /// snapshot's largest share, the same at every step of a run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub head_share: Vec<Vec<f64>>,
    #[serde(default)]
    pub head_scale: f64,
    /// Movement against the base beyond the cross-sample null (`importance.folds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub movement: Option<crate::importance::null::Movement>,
}

/// Elements Spearman correlation is computed on (an evenly strided sample above this).
pub(crate) const SPEARMAN_MAX_ELEMS: usize = 16 << 20;

/// Compare `cur` with the base snapshot and the previous one; `k` is the top-k % tracked.
pub(crate) fn compare_snapshots(
    step: usize,
    cur: &Snapshot,
    base: &Snapshot,
    prev: Option<&Snapshot>,
    k: f64,
) -> SnapshotMetrics {
    let layers = cur.summaries.num_layers;
    let agreement = cur.manifest.agreement.as_ref();
    let mc = top_masks(&cur.scores, k);
    let mb = top_masks(&base.scores, k);
    let (jp, jpl) = match prev {
        Some(p) => {
            let mp = top_masks(&p.scores, k);
            (
                Some(crate::topk::jaccard(&mc, &mp)),
                Some(jaccard_per_layer(&mc, &mp, layers)),
            )
        }
        None => (None, None),
    };
    SnapshotMetrics {
        step,
        jaccard_base: crate::topk::jaccard(&mc, &mb),
        jaccard_prev: jp,
        jaccard_base_layer: jaccard_per_layer(&mc, &mb, layers),
        jaccard_prev_layer: jpl,
        spearman_base: spearman(&cur.scores, &base.scores, SPEARMAN_MAX_ELEMS),
        module_share: cur.summaries.module_share.clone(),
        layer_share: cur.summaries.layer_share.clone(),
        floor: agreement.and_then(|a| a.floor(k)),
        floor_layer: agreement.and_then(|a| (0..layers).map(|l| a.floor_layer(k, l)).collect()),
        convergence: agreement.and_then(|a| a.ks.iter().position(|x| (x - k).abs() < 1e-9).map(|i| a.convergence[i])),
        head_share: head_shares(&mc, &cur.manifest.config),
        head_scale: 1.5
            * head_shares(&mb, &base.manifest.config)
                .iter()
                .flatten()
                .fold(0.0, |a: f64, &b| a.max(b)),
        movement: None,
    }
}

/// Each query head's share of a set ([`crate::spot::file::shares`]).
fn head_shares(masks: &BTreeMap<String, crate::topk::Mask>, cfg: &crate::model::LlamaConfig) -> Vec<Vec<f64>> {
    let shapes: BTreeMap<String, Vec<usize>> = cfg.tensor_shapes().into_iter().collect();
    crate::spot::file::shares(masks, &shapes, cfg).head
}

/// Write a snapshot's measures, histograms and heatmaps to TensorBoard at `step`.
pub(crate) fn log_snapshot(tb: &mut Tb, m: &SnapshotMetrics, cur: &Snapshot) -> Result<()> {
    let step = m.step;
    for (kind, v) in &m.module_share {
        tb.scalar(&format!("importance/module_share/{kind}"), *v, step)?;
    }
    for (l, v) in m.layer_share.iter().enumerate() {
        tb.scalar(&format!("importance/layer_share/L{l:02}"), *v, step)?;
    }
    tb.scalar("importance/spearman_base", m.spearman_base, step)?;
    tb.scalar("spot/jaccard_base", m.jaccard_base, step)?;
    for (l, v) in m.jaccard_base_layer.iter().enumerate() {
        tb.scalar(&format!("spot/jaccard_base_layer/L{l:02}"), *v, step)?;
    }
    if let Some(j) = m.jaccard_prev {
        tb.scalar("spot/jaccard_prev", j, step)?;
    }
    if let Some(f) = m.floor {
        tb.scalar("spot/jaccard_floor", f, step)?;
    }
    for (l, x) in m.floor_layer.iter().flatten().enumerate() {
        tb.scalar(&format!("spot/jaccard_floor_layer/L{l:02}"), *x, step)?;
    }
    if let Some(c) = m.convergence {
        tb.scalar("importance/convergence_half_vs_all", c, step)?;
    }
    if let Some(mv) = &m.movement {
        // The cross-sample null: within-base vs cross-model agreement on the same documents.
        for (tag, iv) in [
            ("within_base", mv.within),
            ("within_tuned", mv.within_tuned),
            ("cross", mv.cross),
            ("diff", mv.diff),
        ] {
            tb.scalar(&format!("spot/null/{tag}"), iv.value, step)?;
            tb.scalar(&format!("spot/null/{tag}_lo"), iv.lo, step)?;
            tb.scalar(&format!("spot/null/{tag}_hi"), iv.hi, step)?;
        }
        tb.scalar("spot/null/moved", f64::from(u8::from(mv.verdict == "moved")), step)?;
    }
    if let Some(v) = &m.jaccard_prev_layer {
        for (l, x) in v.iter().enumerate() {
            tb.scalar(&format!("spot/jaccard_prev_layer/L{l:02}"), *x, step)?;
        }
    }
    let (by_layer, by_kind) = log10_histograms(&cur.scores, 60);
    for (l, h) in &by_layer {
        tb.histogram(&format!("importance_log10/layer/{l}"), h, step)?;
    }
    for (k, h) in &by_kind {
        tb.histogram(&format!("importance_log10/module/{k}"), h, step)?;
    }
    let lm = layer_module_grid(&cur.summaries);
    tb.image(
        "heatmap/layer_x_module",
        &heatmap_rgb(&lm, IMAGE_SIZE),
        IMAGE_SIZE,
        step,
    )?;
    tb.image(
        "heatmap/layer_x_head",
        &heatmap_rgb(&cur.summaries.head_mass, IMAGE_SIZE),
        IMAGE_SIZE,
        step,
    )?;
    if !m.head_share.is_empty() {
        for (l, row) in m.head_share.iter().enumerate() {
            for (h, v) in row.iter().enumerate() {
                tb.scalar(&format!("spot/head_share/L{l:02}.H{h}"), *v, step)?;
            }
        }
        let cols: Vec<String> = (0..m.head_share[0].len()).map(|h| format!("H{h}")).collect();
        let img = crate::plot::heatmap_rgb(
            &format!("Spot share per head (top-k set), step {step}"),
            &m.head_share,
            &cols,
            Some((0.0, m.head_scale.max(1e-12))),
            HEAD_IMAGE_SIZE,
        )?;
        tb.image("spot/layer_x_head", &img, HEAD_IMAGE_SIZE, step)?;
    }
    tb.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::HostTensor;

    fn scores(vals: &[f32]) -> Scores {
        let mut s = Scores::default();
        s.insert(
            String::from("model.layers.0.mlp.up_proj.weight"),
            HostTensor::new(vec![1, vals.len()], vals.to_vec()),
        );
        s
    }

    #[test]
    fn spearman_is_rank_based_and_handles_ties() {
        let a = scores(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let b = scores(&[10.0, 200.0, 3000.0, 40000.0, 5e5]);
        let c = scores(&[5.0, 4.0, 3.0, 2.0, 1.0]);
        assert!((spearman(&a, &b, 100) - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &c, 100) + 1.0).abs() < 1e-12);
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![2.5, 0.0, 2.5, 1.0]);
        // Strided sample: every 2nd element of a perfectly monotone pair is still 1.
        let big: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert!((spearman(&scores(&big), &scores(&big), 100) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn heatmap_is_square_and_scaled() {
        let img = heatmap_rgb(&[vec![0.0, 1.0], vec![0.5, 0.25]], 4);
        assert_eq!(img.len(), 4 * 4 * 3);
        assert_eq!(&img[0..3], &colour(0.0));
        assert_eq!(&img[(3) * 3..][..3], &colour(1.0));
        assert_eq!(&img[(3 * 4) * 3..][..3], &colour(0.5));
    }
}
