//! The cross-sample null for spot movement (`importance.folds`).
//!
//! A snapshot's calibration documents are dealt into 2K seeded folds by content hash: half A is
//! folds 0..K and half B folds K..2K, so the halves are random *documents*, not contiguous runs of
//! files. Each fold is scored apart; its sums are kept (bf16, layer tensors) until the halves are
//! known, then stored for each half's candidates only: per tensor the top `MULTIPLE × keep`
//! elements of that half's score, `keep` being the tracked top-k count (`folds.safetensors`).
//!
//! Movement of a tuned checkpoint against the base, on the same documents:
//! - within = J(base_A, base_B), the agreement of one model with itself across samples;
//! - cross = ½ [J(base_A, tuned_B) + J(base_B, tuned_A)], across models *and* samples;
//! - diff = within − cross: 0 in expectation when tuning changed nothing (and exactly 0 for an
//!   identical model), positive when the spot moved beyond sampling noise.
//!
//! Every Jaccard and the difference get a 95 % document bootstrap interval: each replicate draws
//! K folds with replacement in each half (the same draw for both models, which read the same
//! documents) and re-selects every top-k set from the re-weighted fold sums; the replicates'
//! spread is centred on the estimate ([`Interval`]). Replicate sets are
//! taken among the candidates, which hold a set's elements unless a replicate promotes one from
//! below the top `MULTIPLE × keep`. The verdict is "moved" when the difference's interval
//! excludes 0, else "not distinguishable".

use super::{Method, RawSums};
use crate::source::{HostTensor, Weights};
use crate::topk::{top_indices, Eligible};
use anyhow::{Context, Result};
use half::bf16;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Candidates per tensor, in multiples of the tracked top-k count.
pub(crate) const MULTIPLE: usize = 3;
/// Bootstrap replicates.
pub(crate) const REPLICATES: usize = 200;
/// The file in a snapshot directory.
pub(crate) const FILE: &str = "folds.safetensors";

/// Which of 2K folds a document falls in (by its content hash and the seed).
pub(crate) fn fold_of(sha256: &str, seed: u64, folds: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (sha256, seed, "fold").hash(&mut h);
    (h.finish() % folds as u64) as usize
}

/// One fold's sums of the layer tensors, in bf16 (kept until the halves' candidates are known).
pub struct FoldSums {
    pub batches: usize,
    tensors: BTreeMap<String, Vec<bf16>>,
}

impl FoldSums {
    pub fn of(raw: &RawSums) -> Result<Self> {
        anyhow::ensure!(
            raw.sq.is_none(),
            "importance.folds: method {} keeps a second sum, which folds do not store",
            raw.method.name()
        );
        let tensors = raw
            .sum
            .tensors
            .iter()
            .filter(|(n, _)| Eligible::Layers.admits(n))
            .map(|(n, t)| (n.clone(), t.data.iter().map(|&x| bf16::from_f32(x)).collect()))
            .collect();
        Ok(Self {
            batches: raw.batches,
            tensors,
        })
    }
}

impl FoldSums {
    /// The layer tensors' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self, name: &str) -> usize {
        self.tensors.get(name).map_or(0, Vec::len)
    }

    /// Add this fold's sums of `name` to `acc`.
    pub(crate) fn add_to(&self, name: &str, acc: &mut [f32]) {
        if let Some(t) = self.tensors.get(name) {
            acc.iter_mut().zip(t).for_each(|(a, v)| *a += v.to_f32());
        }
    }
}

/// One half's candidates: per tensor its length, top-k count, candidate indices, and the folds'
/// sums there (`[fold][candidate]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Half {
    pub batches: Vec<usize>,
    pub tensors: BTreeMap<String, Candidates>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    pub len: usize,
    pub keep: usize,
    pub idx: Vec<u32>,
    pub vals: Vec<Vec<f32>>,
}

/// A snapshot's fold sums at its candidates, for both halves.
#[derive(Debug, Clone, PartialEq)]
pub struct Folds {
    pub method: Method,
    pub k_percent: f64,
    pub halves: [Half; 2],
}

impl Folds {
    /// From the folds' sums (A's K, then B's K) and each half's scores.
    pub fn build(method: Method, k_percent: f64, folds: &[FoldSums], scores: [&Weights; 2]) -> Self {
        let k = folds.len() / 2;
        let half = |h: usize| {
            let mine = &folds[h * k..(h + 1) * k];
            let tensors = mine[0]
                .tensors
                .keys()
                .map(|name| {
                    let s = &scores[h].tensors[name].data;
                    let keep = (k_percent / 100.0 * s.len() as f64).round() as usize;
                    let idx: Vec<u32> = top_indices(s, (MULTIPLE * keep).min(s.len()), true)
                        .into_iter()
                        .map(|i| i as u32)
                        .collect();
                    let vals = mine
                        .iter()
                        .map(|f| idx.iter().map(|&i| f.tensors[name][i as usize].to_f32()).collect())
                        .collect();
                    (
                        name.clone(),
                        Candidates {
                            len: s.len(),
                            keep,
                            idx,
                            vals,
                        },
                    )
                })
                .collect();
            Half {
                batches: mine.iter().map(|f| f.batches).collect(),
                tensors,
            }
        };
        Folds {
            method,
            k_percent,
            halves: [half(0), half(1)],
        }
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut w = Weights::default();
        let mut lens = BTreeMap::new();
        for (h, half) in self.halves.iter().enumerate() {
            for (name, c) in &half.tensors {
                anyhow::ensure!(c.len < 1 << 24, "{name}: too long for fold indices");
                let tag = format!("{name}#{}", ["a", "b"][h]);
                w.tensors.insert(
                    format!("{tag}.idx"),
                    HostTensor::new(vec![c.idx.len()], c.idx.iter().map(|&i| i as f32).collect()),
                );
                w.tensors.insert(
                    format!("{tag}.val"),
                    HostTensor::new(vec![c.vals.len(), c.idx.len()], c.vals.concat()),
                );
                lens.insert(name.clone(), (c.len, c.keep));
            }
        }
        let meta = [
            ("method".to_string(), self.method.name().to_string()),
            ("k_percent".to_string(), self.k_percent.to_string()),
            ("lens".to_string(), serde_json::to_string(&lens)?),
            (
                "batches".to_string(),
                serde_json::to_string(&[&self.halves[0].batches, &self.halves[1].batches])?,
            ),
        ];
        crate::source::weights::save_safetensors(&w, path, Some(meta.into()))
    }

    pub fn read(path: &Path) -> Result<Self> {
        let what = || format!("{}: not a folds file", path.display());
        let meta = crate::source::weights::safetensors_header(path)?.metadata;
        let field = |k: &str| {
            meta.get(k)
                .with_context(|| format!("{}: no '{k}' in its metadata", path.display()))
        };
        let method: Method =
            serde_json::from_value(serde_json::Value::String(field("method")?.clone())).with_context(what)?;
        let k_percent: f64 = field("k_percent")?.parse().with_context(what)?;
        let lens: BTreeMap<String, (usize, usize)> = serde_json::from_str(field("lens")?).with_context(what)?;
        let batches: [Vec<usize>; 2] = serde_json::from_str(field("batches")?).with_context(what)?;
        let mut w = crate::source::weights::from_safetensors(&[path.to_path_buf()])?;
        let mut half = |h: usize| -> Result<Half> {
            let mut tensors = BTreeMap::new();
            for (name, &(len, keep)) in &lens {
                let tag = format!("{name}#{}", ["a", "b"][h]);
                let idx = w
                    .tensors
                    .remove(&format!("{tag}.idx"))
                    .with_context(|| format!("{}: no {tag}.idx", path.display()))?;
                let val = w
                    .tensors
                    .remove(&format!("{tag}.val"))
                    .with_context(|| format!("{}: no {tag}.val", path.display()))?;
                let n = idx.data.len();
                anyhow::ensure!(
                    val.data.len() == n * batches[h].len(),
                    "{}: {tag}.val holds {} values, not {} folds × {n}",
                    path.display(),
                    val.data.len(),
                    batches[h].len()
                );
                tensors.insert(
                    name.clone(),
                    Candidates {
                        len,
                        keep,
                        idx: idx.data.iter().map(|&i| i as u32).collect(),
                        vals: val
                            .data
                            .chunks(n.max(1))
                            .map(<[f32]>::to_vec)
                            .take(batches[h].len())
                            .collect(),
                    },
                );
            }
            Ok(Half {
                batches: batches[h].clone(),
                tensors,
            })
        };
        let halves = [half(0)?, half(1)?];
        Ok(Folds {
            method,
            k_percent,
            halves,
        })
    }
}

/// The top-k sets of a half under fold weights `w` (sorted element indices per tensor).
fn select(method: Method, half: &Half, w: &[u32]) -> BTreeMap<String, Vec<u32>> {
    use rayon::prelude::*;
    let n: f32 = half.batches.iter().zip(w).map(|(b, w)| (*b as u32 * w) as f32).sum();
    half.tensors
        .par_iter()
        .map(|(name, c)| {
            let s: Vec<f32> = (0..c.idx.len())
                .map(|j| {
                    let raw: f32 = c.vals.iter().zip(w).map(|(v, &w)| v[j] * w as f32).sum();
                    method.score(raw, None, n)
                })
                .collect();
            let mut set: Vec<u32> = top_indices(&s, c.keep, true).into_iter().map(|j| c.idx[j]).collect();
            set.sort_unstable();
            (name.clone(), set)
        })
        .collect()
}

/// Pooled Jaccard of two families of sorted index sets.
fn jaccard(a: &BTreeMap<String, Vec<u32>>, b: &BTreeMap<String, Vec<u32>>) -> f64 {
    jaccard_of(a, b, |_| true)
}

/// [`jaccard`] over the tensors `keep` admits.
fn jaccard_of(a: &BTreeMap<String, Vec<u32>>, b: &BTreeMap<String, Vec<u32>>, keep: impl Fn(&str) -> bool) -> f64 {
    let (mut inter, mut uni) = (0usize, 0usize);
    for (name, x) in a.iter().filter(|(n, _)| keep(n)) {
        let y = b.get(name).map_or(&[][..], Vec::as_slice);
        let common = super::agreement::common(x, y);
        inter += common;
        uni += x.len() + y.len() - common;
    }
    if uni == 0 {
        1.0
    } else {
        inter as f64 / uni as f64
    }
}

/// A point estimate with its 95 % bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    /// The replicates' 2.5–97.5 % spread, centred on the estimate by their median: a replicate
    /// that draws some folds twice holds fewer distinct documents, and a Jaccard falls with the
    /// sample, so raw percentiles of a Jaccard sit below the estimate (on the default model
    /// 0.17–0.25 around 0.28). Differences of two Jaccards carry the same bias on both sides.
    fn of(value: f64, mut reps: Vec<f64>) -> Self {
        reps.sort_by(f64::total_cmp);
        let at = |q: f64| reps[((q * (reps.len() - 1) as f64).round() as usize).min(reps.len() - 1)];
        let mid = at(0.5);
        Self {
            value,
            lo: value - (mid - at(0.025)),
            hi: value + (at(0.975) - mid),
        }
    }
}

/// A checkpoint's spot movement against the base, with the sampling null beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Movement {
    pub k_percent: f64,
    /// J(base_A, base_B).
    pub within: Interval,
    /// J(tuned_A, tuned_B).
    pub within_tuned: Interval,
    /// ½ [J(base_A, tuned_B) + J(base_B, tuned_A)].
    pub cross: Interval,
    /// within − cross.
    pub diff: Interval,
    /// "moved" or "not distinguishable".
    pub verdict: String,
    pub replicates: usize,
    pub folds_per_half: usize,
    /// `diff` restricted to each layer's tensors, and to each module kind's: where it moved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_layer: Vec<Interval>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_module: BTreeMap<String, Interval>,
}

/// within − cross on the tensors `keep` admits.
fn diff_where(sets: [&BTreeMap<String, Vec<u32>>; 4], keep: impl Fn(&str) -> bool) -> f64 {
    let [ba, bb, ta, tb] = sets;
    let j = |a, b| jaccard_of(a, b, &keep);
    j(ba, bb) - 0.5 * (j(ba, tb) + j(bb, ta))
}

/// [`Movement`] of `tuned` against `base` (both scored on the same folds of documents).
pub fn movement(base: &Folds, tuned: &Folds, replicates: usize, seed: u64) -> Result<Movement> {
    anyhow::ensure!(
        base.method == tuned.method && base.k_percent == tuned.k_percent,
        "the base and tuned folds differ in method or k"
    );
    let k = base.halves[0].batches.len();
    anyhow::ensure!(
        k >= 2
            && [&base.halves, &tuned.halves]
                .iter()
                .all(|h| h.iter().all(|x| x.batches.len() == k)),
        "the base and tuned folds differ in their number of folds (or have fewer than 2 per half)"
    );
    // Where: each layer's and each module kind's tensors.
    let parsed: BTreeMap<String, (usize, String)> = base.halves[0]
        .tensors
        .keys()
        .filter_map(|n| {
            let p = crate::model::names::parse(n)?;
            Some((n.clone(), (p.layer?, p.kind.short().to_string())))
        })
        .collect();
    let layers = parsed.values().map(|x| x.0 + 1).max().unwrap_or(0);
    let kinds: Vec<String> = parsed
        .values()
        .map(|x| x.1.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let stats = |wa: &[u32], wb: &[u32]| -> Vec<f64> {
        let sel = |f: &Folds, h: usize, w: &[u32]| select(f.method, &f.halves[h], w);
        let (ba, bb) = (sel(base, 0, wa), sel(base, 1, wb));
        let (ta, tb) = (sel(tuned, 0, wa), sel(tuned, 1, wb));
        let within = jaccard(&ba, &bb);
        let cross = 0.5 * (jaccard(&ba, &tb) + jaccard(&bb, &ta));
        let mut v = vec![within, jaccard(&ta, &tb), cross, within - cross];
        let sets = [&ba, &bb, &ta, &tb];
        v.extend((0..layers).map(|l| diff_where(sets, |n| parsed.get(n).is_some_and(|x| x.0 == l))));
        v.extend(
            kinds
                .iter()
                .map(|k| diff_where(sets, |n| parsed.get(n).is_some_and(|x| &x.1 == k))),
        );
        v
    };
    let ones = vec![1u32; k];
    let point = stats(&ones, &ones);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6e75_6c6c);
    let mut draw = || {
        let mut w = vec![0u32; k];
        for _ in 0..k {
            w[rng.random_range(0..k)] += 1;
        }
        w
    };
    let reps: Vec<Vec<f64>> = (0..replicates)
        .map(|_| {
            let (wa, wb) = (draw(), draw());
            stats(&wa, &wb)
        })
        .collect();
    let iv = |i: usize| Interval::of(point[i], reps.iter().map(|r| r[i]).collect());
    let diff = iv(3);
    Ok(Movement {
        k_percent: base.k_percent,
        within: iv(0),
        within_tuned: iv(1),
        cross: iv(2),
        verdict: if diff.lo > 0.0 || diff.hi < 0.0 {
            "moved"
        } else {
            "not distinguishable"
        }
        .into(),
        diff,
        replicates,
        folds_per_half: k,
        by_layer: (0..layers).map(|l| iv(4 + l)).collect(),
        by_module: kinds
            .iter()
            .enumerate()
            .map(|(i, kd)| (kd.clone(), iv(4 + layers + i)))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fold sums of a model whose per-element importance is `truth` plus fold noise.
    fn folds(truth: &[f32], k: usize, noise: f32, seed: u64) -> Folds {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let name = "model.layers.0.mlp.up_proj.weight".to_string();
        let sums: Vec<FoldSums> = (0..2 * k)
            .map(|_| FoldSums {
                batches: 3,
                tensors: [(
                    name.clone(),
                    truth
                        .iter()
                        .map(|&t| bf16::from_f32(t + noise * rng.random::<f32>()))
                        .collect(),
                )]
                .into(),
            })
            .collect();
        let half_scores = |h: usize| {
            let mut s = vec![0f32; truth.len()];
            for f in &sums[h * k..(h + 1) * k] {
                for (x, v) in s.iter_mut().zip(&f.tensors[&name]) {
                    *x += v.to_f32();
                }
            }
            let mut w = Weights::default();
            w.tensors.insert(name.clone(), HostTensor::new(vec![truth.len()], s));
            w
        };
        let (a, b) = (half_scores(0), half_scores(1));
        Folds::build(Method::Taylor, 2.0, &sums, [&a, &b])
    }

    fn truth(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>()).collect()
    }

    #[test]
    fn identical_models_are_not_distinguishable_and_a_planted_move_is_found() {
        let t = truth(20_000, 1);
        let base = folds(&t, 6, 0.5, 7);
        let same = movement(&base, &base.clone(), 100, 3).unwrap();
        assert_eq!(same.diff.value, 0.0);
        assert_eq!(same.verdict, "not distinguishable", "{same:?}");
        assert!(
            same.within.value > 0.05 && same.within.value < 0.95,
            "noisy halves: {same:?}"
        );
        assert!(same.within.lo < same.within.value && same.within.value < same.within.hi);
        // Every interval holds its estimate (re-centred on it, see `Interval::of`).
        for iv in [same.within, same.within_tuned, same.cross, same.diff] {
            assert!(iv.lo <= iv.value && iv.value <= iv.hi, "{iv:?}");
        }

        // The same model scored on other documents (fresh fold noise): still no movement.
        let resampled = folds(&t, 6, 0.5, 8);
        let m = movement(&base, &resampled, 100, 3).unwrap();
        assert_eq!(m.verdict, "not distinguishable", "{m:?}");

        // A planted move: the top 2 % of another importance pattern mixed in.
        let other = truth(20_000, 2);
        let moved: Vec<f32> = t.iter().zip(&other).map(|(a, b)| 0.4 * a + 0.6 * b).collect();
        let m = movement(&base, &folds(&moved, 6, 0.5, 9), 100, 3).unwrap();
        assert_eq!(m.verdict, "moved", "{m:?}");
        assert!(m.diff.lo > 0.0 && m.cross.value < m.within.value);
        // One layer and one module kind here: their movement is the whole's.
        assert_eq!(m.by_layer.len(), 1);
        assert_eq!(m.by_layer[0], m.diff);
        assert_eq!(m.by_module["up"], m.diff);
        assert_eq!(same.by_layer[0].value, 0.0);
    }

    #[test]
    fn folds_round_trip_through_their_file() {
        let f = folds(&truth(5000, 3), 3, 0.2, 1);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE);
        f.write(&p).unwrap();
        assert_eq!(Folds::read(&p).unwrap(), f);
    }

    #[test]
    fn documents_fall_in_folds_by_seed() {
        let shas: Vec<String> = (0..600).map(|i| format!("{i:064x}")).collect();
        let mut n = [0usize; 6];
        for s in &shas {
            n[fold_of(s, 1, 6)] += 1;
        }
        assert!(n.iter().all(|&c| c > 60), "{n:?}");
        let moved = shas.iter().filter(|s| fold_of(s, 1, 6) != fold_of(s, 2, 6)).count();
        assert!(moved > 400, "another seed deals other folds: {moved}");
    }
}
