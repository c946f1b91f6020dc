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
    pub(crate) fn from_indices(len: usize, idx: &[usize]) -> Self {
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
    pub(crate) fn admits(self, name: &str) -> bool {
        match self {
            Eligible::All => true,
            Eligible::Layers => names::parse(name).is_some_and(|p| p.layer.is_some()),
        }
    }
}

/// Elements to select per tensor for fraction `frac` (= k% / 100): per tensor round(frac·n);
/// global: the counts that the global top round(frac·N) falls into (ties at the threshold go to
/// the tensors first in name order, then to the lowest indices).
pub fn counts(scores: &Weights, frac: f64, scope: Scope) -> BTreeMap<String, usize> {
    match scope {
        Scope::PerTensor => scores
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), (frac * t.numel() as f64).round() as usize))
            .collect(),
        Scope::Global => {
            let total: usize = scores.tensors.values().map(|t| t.numel()).sum();
            let k = ((frac * total as f64).round() as usize).min(total);
            let mut c: BTreeMap<String, usize> = scores.tensors.keys().map(|n| (n.clone(), 0)).collect();
            if k == 0 {
                return c;
            }
            let slices = || scores.tensors.values().map(|t| t.data.as_slice());
            let Rank { key, better } = rank(slices, k, true);
            let mut ties = k - better;
            for (n, t) in &scores.tensors {
                let (above, equal) = t
                    .data
                    .iter()
                    .fold((0, 0), |(a, e), &x| match order_key(x, true).cmp(&key) {
                        std::cmp::Ordering::Less => (a + 1, e),
                        std::cmp::Ordering::Equal => (a, e + 1),
                        std::cmp::Ordering::Greater => (a, e),
                    });
                let take = equal.min(ties);
                ties -= take;
                *c.get_mut(n).expect("a key of scores") = above + take;
            }
            c
        }
    }
}

/// An order-preserving key: `order_key(a, false) < order_key(b, false)` exactly when
/// `a.total_cmp(&b)` is `Less`; with `highest`, the order is reversed (the largest value gets
/// the smallest key). Equal keys are equal bits.
fn order_key(x: f32, highest: bool) -> u32 {
    let b = x.to_bits();
    let k = if b >> 31 == 1 { !b } else { b | 1 << 31 };
    if highest {
        !k
    } else {
        k
    }
}

/// Where rank `k` (1-based) of a set of values falls: the key of the value at that rank and how
/// many values come strictly before it.
struct Rank {
    key: u32,
    better: usize,
}

/// Radix selection over the values of `slices` (called once per pass, two passes), in
/// `total_cmp` order from the highest down (`highest`) or the lowest up; `1 ≤ k ≤` the number
/// of values. Exact, like sorting, with two 64 K-bucket histograms instead of a copy of the
/// values (a model-sized copy would double a scoring process's memory).
fn rank<'a, I: Iterator<Item = &'a [f32]>>(slices: impl Fn() -> I, k: usize, highest: bool) -> Rank {
    let pick = |hist: &[usize], k: usize| -> (usize, usize) {
        // The bucket holding the k-th value, and how many values lie in the buckets before it.
        let mut before = 0;
        for (b, &n) in hist.iter().enumerate() {
            if before + n >= k {
                return (b, before);
            }
            before += n;
        }
        panic!("rank {k} of {before} values");
    };
    let mut hist = vec![0usize; 1 << 16];
    for s in slices() {
        for &x in s {
            hist[(order_key(x, highest) >> 16) as usize] += 1;
        }
    }
    let (hi, before_hi) = pick(&hist, k);
    hist.iter_mut().for_each(|n| *n = 0);
    for s in slices() {
        for &x in s {
            let key = order_key(x, highest);
            if (key >> 16) as usize == hi {
                hist[(key & 0xffff) as usize] += 1;
            }
        }
    }
    let (lo, before_lo) = pick(&hist, k - before_hi);
    Rank {
        key: (hi as u32) << 16 | lo as u32,
        better: before_hi + before_lo,
    }
}

/// The value of rank `k` (1-based) among the values of `slices`, counting from the highest
/// (`highest`) or the lowest, in `total_cmp` order; `1 ≤ k ≤` the number of values.
pub(crate) fn kth_value<'a, I: Iterator<Item = &'a [f32]>>(slices: impl Fn() -> I, k: usize, highest: bool) -> f32 {
    let key = rank(slices, k, highest).key;
    let key = if highest { !key } else { key };
    f32::from_bits(if key >> 31 == 1 { key & !(1 << 31) } else { !key })
}

/// The `count` highest (or lowest) elements of `v` (ties broken by index), ascending.
pub(crate) fn top_indices(v: &[f32], count: usize, highest: bool) -> Vec<usize> {
    let count = count.min(v.len());
    if count == 0 {
        return vec![];
    }
    let Rank { key, better } = rank(|| std::iter::once(v), count, highest);
    let mut ties = count - better;
    let mut idx = Vec::with_capacity(count);
    for (i, &x) in v.iter().enumerate() {
        match order_key(x, highest).cmp(&key) {
            std::cmp::Ordering::Less => idx.push(i),
            std::cmp::Ordering::Equal if ties > 0 => {
                ties -= 1;
                idx.push(i);
            }
            _ => {}
        }
    }
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
    let frac = k_percent / 100.0;
    scores
        .tensors
        .iter()
        .filter(|(n, _)| Eligible::Layers.admits(n))
        .map(|(n, t)| {
            // `counts`' per-tensor rule.
            let c = (frac * t.numel() as f64).round() as usize;
            (n.clone(), Mask::from_indices(t.numel(), &top_indices(&t.data, c, true)))
        })
        .collect()
}

/// Jaccard overlap per layer (masks grouped by the layer in their tensor names).
pub(crate) fn jaccard_per_layer(a: &BTreeMap<String, Mask>, b: &BTreeMap<String, Mask>, layers: usize) -> Vec<f64> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::HostTensor;
    use rand::{Rng, SeedableRng};

    /// Values with many ties, both zeros, negatives, infinities and NaNs.
    fn awkward(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| match r.random_range(0..10) {
                0 => 0.0,
                1 => -0.0,
                2 => f32::NAN,
                3 => f32::INFINITY * if r.random() { 1.0 } else { -1.0 },
                4 => r.random_range(0..4) as f32,
                _ => r.random_range(-1e-3f32..1e3) * r.random_range(1e-30f32..1.0),
            })
            .collect()
    }

    /// The sort-based rule these replace: order by value (total_cmp), then index.
    fn by_sorting(v: &[f32], count: usize, highest: bool) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| {
            let o = if highest {
                v[b].total_cmp(&v[a])
            } else {
                v[a].total_cmp(&v[b])
            };
            o.then(a.cmp(&b))
        });
        let mut top = idx[..count.min(v.len())].to_vec();
        top.sort_unstable();
        top
    }

    #[test]
    fn radix_selection_picks_what_sorting_picks() {
        for seed in 0..6 {
            let v = awkward(3000 + seed as usize * 17, seed);
            let mut sorted = v.clone();
            sorted.sort_by(f32::total_cmp);
            for count in [0, 1, 2, 29, 300, 1500, v.len() - 1, v.len()] {
                for highest in [true, false] {
                    assert_eq!(top_indices(&v, count, highest), by_sorting(&v, count, highest));
                }
                if count > 0 {
                    let low = kth_value(|| std::iter::once(v.as_slice()), count, false);
                    let high = kth_value(|| std::iter::once(v.as_slice()), count, true);
                    assert_eq!(low.to_bits(), sorted[count - 1].to_bits());
                    assert_eq!(high.to_bits(), sorted[v.len() - count].to_bits());
                }
            }
        }
    }

    #[test]
    fn global_counts_follow_the_flattened_order() {
        let mut w = Weights::default();
        for (i, n) in [700, 1, 2300, 64].into_iter().enumerate() {
            w.insert(format!("t{i}"), HostTensor::new(vec![n], awkward(n, 40 + i as u64)));
        }
        let all: Vec<f32> = w.tensors.values().flat_map(|t| t.data.iter().copied()).collect();
        for frac in [0.0, 0.001, 0.01, 0.3, 0.97, 1.0] {
            let k = (frac * all.len() as f64).round() as usize;
            let mut expect: BTreeMap<String, usize> = w.tensors.keys().map(|n| (n.clone(), 0)).collect();
            let names: Vec<&String> = w.tensors.keys().collect();
            let offsets: Vec<usize> = w
                .tensors
                .values()
                .scan(0, |o, t| {
                    let at = *o;
                    *o += t.numel();
                    Some(at)
                })
                .collect();
            for j in by_sorting(&all, k, true) {
                let t = offsets.iter().rposition(|&o| o <= j).unwrap();
                *expect.get_mut(names[t]).unwrap() += 1;
            }
            assert_eq!(counts(&w, frac, Scope::Global), expect, "frac {frac}");
        }
    }
}
