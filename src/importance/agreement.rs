//! How much a snapshot's top-k sets depend on which calibration tokens it saw: the noise floor
//! against which a movement of the spot (tuning, another language) is read.
//!
//! A scoring pass sums the first and the second half of its batches apart, then adds them
//! (exactly what a merge of two shards does). Then:
//! - **split-half agreement**: the per-tensor top-k % sets (layer parameters, the authors' rule)
//!   of the first half's scores and the second half's are compared by Jaccard, overall and per
//!   layer. Two disjoint samples of N/2 tokens that agree
//!   this much are the floor: two snapshots of the same model cannot be expected to agree more;
//!   with N tokens each they agree a little more, so this floor is conservative.
//! - **convergence**: the top-k sets of the running scores at N/2 tokens against those at N.
//!   Near 1 means more calibration tokens would hardly change the spot (inflated: the N/2 are
//!   inside the N).
//! - **split-quarter agreement**: the same Jaccard for two disjoint samples of N/4 (the first
//!   quarter of each half); beside the split-half agreement it shows, without the overlap's
//!   inflation, how much agreement grows as the sample doubles.

use super::{Method, RawSums};
use serde::{Deserialize, Serialize};

/// The k (%) at which agreement is recorded.
pub(crate) const KS: [f64; 4] = [0.5, 1.0, 3.0, 5.0];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Agreement {
    pub ks: Vec<f64>,
    /// Per k: Jaccard of the two halves' top-k sets (the noise floor).
    pub split_half: Vec<f64>,
    /// Per k, per layer.
    pub split_half_layer: Vec<Vec<f64>>,
    /// Tokens of the first half (the running scores compared with the final ones).
    pub half_tokens: usize,
    /// Per k: Jaccard of the top-k sets at `half_tokens` and at all tokens (nested samples:
    /// inflated by their overlap; `split_quarter` beside `split_half` is the fair convergence).
    pub convergence: Vec<f64>,
    /// Per k: Jaccard of two disjoint samples of `quarter_tokens` each (the first quarter of
    /// each half): with `split_half` (two disjoint samples of N/2), how agreement grows with the
    /// sample. Empty in snapshots made before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split_quarter: Vec<f64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub quarter_tokens: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Per k in [`KS`], the top-k elements (sorted indices) of each layer tensor of one sample.
pub(crate) type TopSets = Vec<std::collections::BTreeMap<String, Vec<usize>>>;

/// The pooled Jaccard per k of two samples' [`TopSets`] (rounded as [`measure`]'s).
pub(crate) fn jaccard_sets(a: &TopSets, b: &TopSets) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let (mut i, mut u) = (0usize, 0usize);
            for (name, sa) in x {
                let sb = y.get(name).map_or(&[][..], Vec::as_slice);
                let c = common(sa, sb);
                i += c;
                u += sa.len() + sb.len() - c;
            }
            if u == 0 {
                1.0
            } else {
                (i as f64 / u as f64 * 1e6).round() / 1e6
            }
        })
        .collect()
}

/// [`TopSets`] of a tensor set's scores (`name → scores`), layer tensors only.
pub(crate) fn top_sets<'a>(scores: impl Iterator<Item = (&'a str, Vec<f32>)>) -> TopSets {
    let mut out: TopSets = vec![Default::default(); KS.len()];
    for (name, s) in scores {
        if crate::model::names::parse(name).and_then(|p| p.layer).is_none() {
            continue;
        }
        for (ki, k) in KS.iter().enumerate() {
            let count = (k / 100.0 * s.len() as f64).round() as usize;
            out[ki].insert(name.to_string(), crate::topk::top_indices(&s, count, true));
        }
    }
    out
}

impl Agreement {
    /// The split-half agreement at `k` (None when `k` is not recorded).
    pub fn floor(&self, k: f64) -> Option<f64> {
        self.ks
            .iter()
            .position(|x| (x - k).abs() < 1e-9)
            .map(|i| self.split_half[i])
    }
    /// The split-half agreement of one layer at `k`.
    pub fn floor_layer(&self, k: f64, layer: usize) -> Option<f64> {
        let i = self.ks.iter().position(|x| (x - k).abs() < 1e-9)?;
        self.split_half_layer[i].get(layer).copied()
    }

    /// The element-wise lowest of several snapshots' agreements (the floor a spot selected from
    /// them carries): None unless every one recorded agreement at the same k and layer count.
    pub fn lowest(all: &[Option<&Agreement>]) -> Option<Agreement> {
        let first = (*all.first()?)?;
        let mut out = first.clone();
        for a in &all[1..] {
            let a = (*a)?;
            if a.ks != out.ks
                || a.split_half_layer
                    .iter()
                    .map(Vec::len)
                    .ne(out.split_half_layer.iter().map(Vec::len))
            {
                return None;
            }
            let low = |x: &mut f64, y: f64| *x = x.min(y);
            out.split_half
                .iter_mut()
                .zip(&a.split_half)
                .for_each(|(x, &y)| low(x, y));
            out.convergence
                .iter_mut()
                .zip(&a.convergence)
                .for_each(|(x, &y)| low(x, y));
            for (xs, ys) in out.split_half_layer.iter_mut().zip(&a.split_half_layer) {
                xs.iter_mut().zip(ys).for_each(|(x, &y)| low(x, y));
            }
            out.half_tokens = out.half_tokens.min(a.half_tokens);
            if a.split_quarter.len() == out.split_quarter.len() {
                out.split_quarter
                    .iter_mut()
                    .zip(&a.split_quarter)
                    .for_each(|(x, &y)| low(x, y));
                out.quarter_tokens = out.quarter_tokens.min(a.quarter_tokens);
            } else {
                out.split_quarter.clear();
                out.quarter_tokens = 0;
            }
        }
        Some(out)
    }
}

/// Scores of one tensor from raw sums (θ folded in, see [`super::RawSums`]) over `n` batches.
fn scores(method: Method, sum: &[f32], sq: Option<&[f32]>, n: usize) -> Vec<f32> {
    let n = n.max(1) as f32;
    match sq {
        Some(q) => sum.iter().zip(q).map(|(x, q)| method.score(*x, Some(*q), n)).collect(),
        None => sum.iter().map(|x| method.score(*x, None, n)).collect(),
    }
}

/// |A ∩ B| of two sorted index lists.
pub(crate) fn common<T: Ord>(a: &[T], b: &[T]) -> usize {
    let (mut i, mut j, mut c) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                c += 1;
                i += 1;
                j += 1;
            }
        }
    }
    c
}

/// Scores of one tensor of raw sums (public for the quarter samples).
pub(crate) fn tensor_scores(method: Method, sum: &[f32], sq: Option<&[f32]>, batches: usize) -> Vec<f32> {
    scores(method, sum, sq, batches)
}

/// The agreement of a pass from the raw sums of its two halves and of the whole; `quarters`:
/// the top sets of the first quarter of each half, and its tokens.
pub fn measure(
    a: &RawSums,
    b: &RawSums,
    total: &RawSums,
    layers: usize,
    half_tokens: usize,
    quarters: Option<(&TopSets, &TopSets, usize)>,
) -> Agreement {
    let nk = KS.len();
    // (intersection, union) per k, overall and per layer; and for convergence.
    let mut half = vec![(0usize, 0usize); nk];
    let mut half_layer = vec![vec![(0usize, 0usize); layers]; nk];
    let mut conv = vec![(0usize, 0usize); nk];
    let score = |r: &RawSums, name: &str| -> Option<Vec<f32>> {
        let sum = r.sum.tensors.get(name)?;
        let sq =
            r.sq.as_ref()
                .and_then(|q| q.tensors.get(name))
                .map(|t| t.data.as_slice());
        Some(scores(r.method, &sum.data, sq, r.batches))
    };
    for name in total.sum.tensors.keys() {
        let Some(layer) = crate::model::names::parse(name).and_then(|p| p.layer) else {
            continue; // layer parameters only, as the spot
        };
        let (Some(a), Some(b), Some(full)) = (score(a, name), score(b, name), score(total, name)) else {
            continue;
        };
        for (ki, k) in KS.iter().enumerate() {
            let count = (k / 100.0 * full.len() as f64).round() as usize;
            if count == 0 {
                continue;
            }
            let ta = crate::topk::top_indices(&a, count, true);
            let tb = crate::topk::top_indices(&b, count, true);
            let tf = crate::topk::top_indices(&full, count, true);
            let c = common(&ta, &tb);
            let iu = (c, 2 * count - c);
            half[ki].0 += iu.0;
            half[ki].1 += iu.1;
            if let Some(l) = half_layer[ki].get_mut(layer) {
                l.0 += iu.0;
                l.1 += iu.1;
            }
            let c = common(&ta, &tf);
            conv[ki].0 += c;
            conv[ki].1 += 2 * count - c;
        }
    }
    // Rounded to 6 decimals, which JSON reads back exactly.
    let j = |(i, u): (usize, usize)| {
        if u == 0 {
            1.0
        } else {
            (i as f64 / u as f64 * 1e6).round() / 1e6
        }
    };
    Agreement {
        ks: KS.to_vec(),
        split_half: half.into_iter().map(j).collect(),
        split_half_layer: half_layer.into_iter().map(|v| v.into_iter().map(j).collect()).collect(),
        half_tokens,
        convergence: conv.into_iter().map(j).collect(),
        split_quarter: quarters.map_or(vec![], |(qa, qb, _)| jaccard_sets(qa, qb)),
        quarter_tokens: quarters.map_or(0, |q| q.2),
    }
}
