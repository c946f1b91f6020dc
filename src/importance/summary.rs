//! Summaries of a score map: per tensor, per layer × module kind, per attention head
//! (GQA-aware), per MLP neuron, and top-1% membership per layer × module.

use super::Scores;
use crate::model::arch::{self, Groups, ModuleKind};
use crate::model::names;
use crate::model::LlamaConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorSummary {
    pub name: String,
    pub layer: Option<usize>,
    pub kind: ModuleKind,
    pub numel: usize,
    pub sum: f64,
    pub mean: f64,
    pub max: f64,
    pub q50: f64,
    pub q90: f64,
    pub q99: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadSummary {
    pub layer: usize,
    pub kind: ModuleKind,
    /// Head index within this tensor (a KV head for k and v).
    pub head: usize,
    /// Query heads this head serves (GQA).
    pub query_heads: Vec<usize>,
    pub mass: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summaries {
    pub total_mass: f64,
    pub num_layers: usize,
    pub num_heads: usize,
    pub tensors: Vec<TensorSummary>,
    /// layer → module kind (short name) → importance mass.
    pub layer_module_mass: BTreeMap<usize, BTreeMap<String, f64>>,
    /// Share of total mass per module kind (layers only).
    pub module_share: BTreeMap<String, f64>,
    /// Share of total mass per layer.
    pub layer_share: Vec<f64>,
    pub heads: Vec<HeadSummary>,
    /// `[layer][query head]`: q_h + o_h + (k + v of its KV head) / group size.
    pub head_mass: Vec<Vec<f64>>,
    /// `[layer][neuron]`: gate row + up row + down column.
    pub neuron_mass: Vec<Vec<f64>>,
    /// Global top-1% threshold over all scored elements and the members per layer × module.
    pub top1_threshold: f64,
    pub top1_counts: BTreeMap<usize, BTreeMap<String, usize>>,
    pub top1_global_counts: BTreeMap<String, usize>,
    /// Group Taylor importance of whole heads and neurons (`score --groups`), when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<super::GroupScores>,
}

fn quantiles(v: &[f32]) -> (f64, f64, f64) {
    let q = |p: f64| {
        // The element at 0-based rank round((n − 1)·p) from the lowest.
        let k = ((v.len() - 1) as f64 * p).round() as usize;
        crate::topk::kth_value(|| std::iter::once(v), k + 1, false) as f64
    };
    (q(0.5), q(0.9), q(0.99))
}

/// The value at rank `k` from the top (0 = largest) over all tensors.
pub(crate) fn global_threshold(scores: &Scores, frac: f64) -> f64 {
    let n: usize = scores.tensors.values().map(|t| t.numel()).sum();
    if n == 0 {
        return 0.0;
    }
    let k = ((n as f64 * frac).round() as usize).clamp(1, n);
    crate::topk::kth_value(|| scores.tensors.values().map(|t| t.data.as_slice()), k, true) as f64
}

pub(crate) fn summarize(scores: &Scores, cfg: &LlamaConfig) -> Summaries {
    let nl = cfg.num_hidden_layers;
    let total: f64 = scores
        .tensors
        .values()
        .map(|t| t.data.iter().map(|&x| x as f64).sum::<f64>())
        .sum();
    let mut tensors = Vec::new();
    let mut lm: BTreeMap<usize, BTreeMap<String, f64>> = BTreeMap::new();
    let mut module_share: BTreeMap<String, f64> = BTreeMap::new();
    let mut layer_share = vec![0.0; nl];
    let mut heads = Vec::new();
    let mut head_mass = vec![vec![0.0; cfg.num_attention_heads]; nl];
    let mut neuron_mass = vec![vec![0.0; cfg.intermediate_size]; nl];
    let thr = global_threshold(scores, 0.01);
    let mut top1_counts: BTreeMap<usize, BTreeMap<String, usize>> = BTreeMap::new();
    let mut top1_global: BTreeMap<String, usize> = BTreeMap::new();
    let norm = if total > 0.0 { total } else { 1.0 };
    for (name, t) in &scores.tensors {
        let Some(pn) = names::parse(name) else {
            continue;
        };
        let sum: f64 = t.data.iter().map(|&x| x as f64).sum();
        let max = t.data.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let (q50, q90, q99) = quantiles(&t.data);
        tensors.push(TensorSummary {
            name: name.clone(),
            layer: pn.layer,
            kind: pn.kind,
            numel: t.numel(),
            sum,
            mean: sum / t.numel().max(1) as f64,
            max,
            q50,
            q90,
            q99,
        });
        let above = t.data.iter().filter(|&&x| x as f64 >= thr && x > 0.0).count();
        let Some(l) = pn.layer else {
            *top1_global.entry(pn.kind.short().into()).or_default() += above;
            continue;
        };
        if l >= nl {
            continue;
        }
        *lm.entry(l).or_default().entry(pn.kind.short().into()).or_default() += sum;
        *module_share.entry(pn.kind.short().into()).or_default() += sum / norm;
        layer_share[l] += sum / norm;
        *top1_counts
            .entry(l)
            .or_default()
            .entry(pn.kind.short().into())
            .or_default() += above;
        let cols = *t.shape.last().unwrap_or(&1);
        if let Some(hs) = names::head_slicing(pn.kind, cfg) {
            let mut m = vec![0.0f64; hs.heads];
            for (i, &x) in t.data.iter().enumerate() {
                m[hs.head_of(i, &t.shape)] += x as f64;
            }
            let per = (t.numel() / hs.heads.max(1)).max(1) as f64;
            for (h, &mass) in m.iter().enumerate() {
                let qh: Vec<usize> = hs.query_heads(h).collect();
                for &q in &qh {
                    head_mass[l][q] += mass / hs.group as f64;
                }
                heads.push(HeadSummary {
                    layer: l,
                    kind: pn.kind,
                    head: h,
                    query_heads: qh,
                    mass,
                    mean: mass / per,
                });
            }
        }
        match arch::slot_of(name).map(|(_, s)| s.groups) {
            Some(Groups::NeuronRows) => {
                for (i, row) in t.data.chunks(cols).enumerate() {
                    neuron_mass[l][i] += row.iter().map(|&x| x as f64).sum::<f64>();
                }
            }
            Some(Groups::NeuronCols) => {
                for row in t.data.chunks(cols) {
                    for (i, &x) in row.iter().enumerate() {
                        neuron_mass[l][i] += x as f64;
                    }
                }
            }
            _ => {}
        }
    }
    Summaries {
        total_mass: total,
        num_layers: nl,
        num_heads: cfg.num_attention_heads,
        tensors,
        layer_module_mass: lm,
        module_share,
        layer_share,
        heads,
        head_mass,
        neuron_mass,
        top1_threshold: thr,
        top1_counts,
        top1_global_counts: top1_global,
        groups: None,
    }
}

/// The layer × module table of importance mass (percent of the total), as text.
pub(crate) fn layer_module_table(s: &Summaries) -> String {
    let kinds: Vec<&str> = ModuleKind::LAYER_KINDS.iter().map(|k| k.short()).collect();
    let mut out = format!("{:>5}", "layer");
    for k in &kinds {
        out += &format!(" {k:>9}");
    }
    out += &format!(" {:>9}\n", "total");
    let norm = if s.total_mass > 0.0 { s.total_mass } else { 1.0 };
    for (l, row) in &s.layer_module_mass {
        out += &format!("{l:>5}");
        for k in &kinds {
            out += &format!(" {:>8.3}%", 100.0 * row.get(*k).copied().unwrap_or(0.0) / norm);
        }
        out += &format!(" {:>8.3}%\n", 100.0 * s.layer_share[*l]);
    }
    out += &format!("{:>5}", "all");
    for k in &kinds {
        out += &format!(" {:>8.3}%", 100.0 * s.module_share.get(*k).copied().unwrap_or(0.0));
    }
    out
}

/// The `n` most important tensors (by mean), heads and neurons, as text.
pub(crate) fn top_text(s: &Summaries, n: usize) -> String {
    let mut out = String::new();
    let mut t: Vec<&TensorSummary> = s.tensors.iter().collect();
    t.sort_by(|a, b| b.mean.total_cmp(&a.mean));
    out += &format!("top {n} tensors by mean importance:\n");
    for x in t.iter().take(n) {
        out += &format!(
            "  {:<48} mean {:.3e}  sum {:.3e}  max {:.3e}\n",
            x.name, x.mean, x.sum, x.max
        );
    }
    let mut h: Vec<(usize, usize, f64)> = s
        .head_mass
        .iter()
        .enumerate()
        .flat_map(|(l, r)| r.iter().enumerate().map(move |(q, &m)| (l, q, m)))
        .collect();
    h.sort_by(|a, b| b.2.total_cmp(&a.2));
    out += &format!("top {n} attention heads (q + o + shared k, v):\n");
    for (l, q, m) in h.iter().take(n) {
        out += &format!(
            "  layer {l:>2} head {q:>2}  {:.3}%\n",
            100.0 * m / s.total_mass.max(f64::MIN_POSITIVE)
        );
    }
    let mut nr: Vec<(usize, usize, f64)> = s
        .neuron_mass
        .iter()
        .enumerate()
        .flat_map(|(l, r)| r.iter().enumerate().map(move |(i, &m)| (l, i, m)))
        .collect();
    nr.sort_by(|a, b| b.2.total_cmp(&a.2));
    out += &format!("top {n} MLP neurons (gate + up rows, down column):\n");
    for (l, i, m) in nr.iter().take(n) {
        out += &format!(
            "  layer {l:>2} neuron {i:>5}  {:.4}%\n",
            100.0 * m / s.total_mass.max(f64::MIN_POSITIVE)
        );
    }
    out
}
