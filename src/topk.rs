//! Top-k sets of per-parameter values (importance scores, magnitudes) and their overlap: how
//! many elements each tensor contributes (per tensor or global), which ones, bit-packed masks,
//! and Jaccard overlap overall and per layer. Below `importance`, `spot` and `track`, which all
//! select and compare such sets with these same rules.

use crate::model::names;
use crate::source::Weights;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A set of element indices of one tensor, packed LSB-first into bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mask {
    pub len: usize,
    pub bits: Vec<u8>,
}

impl Mask {
    pub fn empty(len: usize) -> Self {
        Self {
            len,
            bits: vec![0; len.div_ceil(8)],
        }
    }
    pub fn from_indices(len: usize, idx: &[usize]) -> Self {
        let mut m = Self::empty(len);
        for &i in idx {
            m.set(i);
        }
        m
    }
    pub fn set(&mut self, i: usize) {
        self.bits[i / 8] |= 1 << (i % 8);
    }
    pub fn get(&self, i: usize) -> bool {
        self.bits[i / 8] >> (i % 8) & 1 == 1
    }
    pub fn count(&self) -> usize {
        self.bits.iter().map(|b| b.count_ones() as usize).sum()
    }
    pub fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }
    /// (|A ∩ B|, |A ∪ B|)
    pub fn inter_union(&self, o: &Mask) -> (usize, usize) {
        self.bits.iter().zip(&o.bits).fold((0, 0), |(i, u), (a, b)| {
            (i + (a & b).count_ones() as usize, u + (a | b).count_ones() as usize)
        })
    }
    /// Elements in `self` but not in `o`.
    pub fn minus(&self, o: &Mask) -> Mask {
        Mask {
            len: self.len,
            bits: self.bits.iter().zip(&o.bits).map(|(a, b)| a & !b).collect(),
        }
    }
    pub fn union(&self, o: &Mask) -> Mask {
        Mask {
            len: self.len,
            bits: self.bits.iter().zip(&o.bits).map(|(a, b)| a | b).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Top k% within each weight tensor (the authors').
    PerTensor,
    /// Top k% over all eligible parameters together.
    Global,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Eligible {
    /// `model.layers.*` only (attention, MLP, norms), as the authors: embeddings and head out.
    Layers,
    /// Every parameter.
    All,
}

impl Eligible {
    pub fn admits(self, name: &str) -> bool {
        match self {
            Eligible::All => true,
            Eligible::Layers => names::parse(name).is_some_and(|p| p.layer.is_some()),
        }
    }
}

/// Elements to select per tensor for fraction `frac` (= k% / 100): per tensor round(frac·n);
/// global: the counts that the global top round(frac·N) falls into.
pub fn counts(scores: &Weights, frac: f64, scope: Scope) -> BTreeMap<String, usize> {
    match scope {
        Scope::PerTensor => scores
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), (frac * t.numel() as f64).round() as usize))
            .collect(),
        Scope::Global => {
            let all: Vec<(usize, usize, f32)> = scores
                .tensors
                .values()
                .enumerate()
                .flat_map(|(ti, t)| t.data.iter().enumerate().map(move |(i, &x)| (ti, i, x)))
                .collect();
            let k = ((frac * all.len() as f64).round() as usize).min(all.len());
            let mut idx: Vec<usize> = (0..all.len()).collect();
            if k > 0 && k < idx.len() {
                idx.select_nth_unstable_by(k - 1, |&a, &b| all[b].2.total_cmp(&all[a].2).then(a.cmp(&b)));
            }
            let names: Vec<&String> = scores.tensors.keys().collect();
            let mut c: BTreeMap<String, usize> = names.iter().map(|n| ((*n).clone(), 0)).collect();
            for &j in &idx[..k] {
                *c.get_mut(names[all[j].0]).unwrap() += 1;
            }
            c
        }
    }
}

/// The `count` highest (or lowest) elements of `v` (ties broken by index).
pub fn top_indices(v: &[f32], count: usize, highest: bool) -> Vec<usize> {
    let count = count.min(v.len());
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let cmp = |a: &usize, b: &usize| {
        let o = if highest {
            v[*b].total_cmp(&v[*a])
        } else {
            v[*a].total_cmp(&v[*b])
        };
        o.then(a.cmp(b))
    };
    if count > 0 && count < idx.len() {
        idx.select_nth_unstable_by(count - 1, cmp);
    }
    idx.truncate(count);
    idx.sort_unstable();
    idx
}

/// Masks selecting `counts[name]` elements of each tensor by a rule.
pub fn select_by(values: &Weights, counts: &BTreeMap<String, usize>, highest: bool) -> BTreeMap<String, Mask> {
    counts
        .iter()
        .filter_map(|(n, &c)| {
            values.tensors.get(n).map(|t| {
                (
                    n.clone(),
                    Mask::from_indices(t.numel(), &top_indices(&t.data, c, highest)),
                )
            })
        })
        .collect()
}

/// Jaccard overlap of two mask sets (over all their tensors).
pub fn jaccard(a: &BTreeMap<String, Mask>, b: &BTreeMap<String, Mask>) -> f64 {
    let (mut inter, mut uni) = (0usize, 0usize);
    for (n, ma) in a {
        match b.get(n) {
            Some(mb) => {
                let (i, u) = ma.inter_union(mb);
                inter += i;
                uni += u;
            }
            None => uni += ma.count(),
        }
    }
    for (n, mb) in b {
        if !a.contains_key(n) {
            uni += mb.count();
        }
    }
    if uni == 0 {
        1.0
    } else {
        inter as f64 / uni as f64
    }
}

/// Per-tensor top-`k_percent` masks over the layer parameters (the authors' selection rule).
pub fn top_masks(scores: &Weights, k_percent: f64) -> BTreeMap<String, Mask> {
    let mut layers = Weights::default();
    for (n, t) in &scores.tensors {
        if Eligible::Layers.admits(n) {
            layers.insert(n.clone(), t.clone());
        }
    }
    let c = counts(&layers, k_percent / 100.0, Scope::PerTensor);
    select_by(&layers, &c, true)
}

/// Jaccard overlap per layer (masks grouped by the layer in their tensor names).
pub fn jaccard_per_layer(a: &BTreeMap<String, Mask>, b: &BTreeMap<String, Mask>, layers: usize) -> Vec<f64> {
    (0..layers)
        .map(|l| {
            let pick = |m: &BTreeMap<String, Mask>| -> BTreeMap<String, Mask> {
                m.iter()
                    .filter(|(n, _)| names::parse(n).and_then(|p| p.layer) == Some(l))
                    .map(|(n, x)| (n.clone(), x.clone()))
                    .collect()
            };
            jaccard(&pick(a), &pick(b))
        })
        .collect()
}
