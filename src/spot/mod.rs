//! Spot selection: aggregate per-language importance, take the top k% (per tensor, as the
//! authors do, or global), and build matched controls (random, bottom, magnitude,
//! per-language). Masks are stored bit-packed in safetensors.

pub mod file;

use crate::importance::Scores;

use crate::source::{HostTensor, Weights};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use crate::topk::{counts, jaccard, select_by, top_indices, Eligible, Mask, Scope};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Σ over languages of the scores (the authors').
    Sum,
    /// Mean over languages of scores divided by each language's total mass.
    Mean,
    /// Minimum over languages of the normalised scores (consistently important).
    Min,
    /// Mean over languages of the within-scope rank (0 = most important).
    Rank,
}

/// Aggregate per-language scores into one score map (higher = more important).
pub fn aggregate(per_lang: &[&Scores], how: Aggregation, scope: Scope, eligible: Eligible) -> Result<Scores> {
    let Some(first) = per_lang.first() else {
        bail!("no snapshots to aggregate")
    };
    for (i, s) in per_lang.iter().enumerate().skip(1) {
        for (n, t) in &first.tensors {
            let o = s
                .tensors
                .get(n)
                .with_context(|| format!("snapshot #{i} has no tensor '{n}'"))?;
            if o.shape != t.shape {
                bail!(
                    "snapshot #{i}: tensor '{n}' has shape {:?}, snapshot #0 {:?}",
                    o.shape,
                    t.shape
                );
            }
        }
    }
    let names: Vec<&String> = first.tensors.keys().filter(|n| eligible.admits(n)).collect();
    let totals: Vec<f64> = per_lang
        .iter()
        .map(|s| {
            names
                .iter()
                .map(|n| s.tensors[*n].data.iter().map(|&x| x as f64).sum::<f64>())
                .sum::<f64>()
                .max(f64::MIN_POSITIVE)
        })
        .collect();
    let mut out = Scores::default();
    // Global ranks need all eligible elements of a language at once.
    let global_ranks: Option<Vec<BTreeMap<&String, Vec<f32>>>> = (how == Aggregation::Rank && scope == Scope::Global)
        .then(|| {
            per_lang
                .iter()
                .map(|s| {
                    let all: Vec<(usize, usize, f32)> = names
                        .iter()
                        .enumerate()
                        .flat_map(|(ti, n)| s.tensors[*n].data.iter().enumerate().map(move |(i, &x)| (ti, i, x)))
                        .collect();
                    let mut order: Vec<usize> = (0..all.len()).collect();
                    order.sort_by(|&a, &b| all[b].2.total_cmp(&all[a].2).then(a.cmp(&b)));
                    let mut m: BTreeMap<&String, Vec<f32>> =
                        names.iter().map(|n| (*n, vec![0.0; s.tensors[*n].numel()])).collect();
                    for (r, &k) in order.iter().enumerate() {
                        let (ti, i, _) = all[k];
                        m.get_mut(names[ti]).unwrap()[i] = r as f32;
                    }
                    m
                })
                .collect()
        });
    for n in &names {
        let len = first.tensors[*n].numel();
        let data: Vec<f32> = match how {
            Aggregation::Sum => (0..len)
                .map(|i| per_lang.iter().map(|s| s.tensors[*n].data[i] as f64).sum::<f64>() as f32)
                .collect(),
            Aggregation::Mean => (0..len)
                .map(|i| {
                    (per_lang
                        .iter()
                        .zip(&totals)
                        .map(|(s, t)| s.tensors[*n].data[i] as f64 / t)
                        .sum::<f64>()
                        / per_lang.len() as f64) as f32
                })
                .collect(),
            Aggregation::Min => (0..len)
                .map(|i| {
                    per_lang
                        .iter()
                        .zip(&totals)
                        .map(|(s, t)| s.tensors[*n].data[i] as f64 / t)
                        .fold(f64::INFINITY, f64::min) as f32
                })
                .collect(),
            Aggregation::Rank => {
                let ranks: Vec<Vec<f32>> = match &global_ranks {
                    Some(g) => g.iter().map(|m| m[*n].clone()).collect(),
                    None => per_lang.iter().map(|s| ranks_desc(&s.tensors[*n].data)).collect(),
                };
                // Negated mean rank, so that higher is still more important.
                (0..len)
                    .map(|i| -(ranks.iter().map(|r| r[i] as f64).sum::<f64>() / ranks.len() as f64) as f32)
                    .collect()
            }
        };
        out.insert((*n).clone(), HostTensor::new(first.tensors[*n].shape.clone(), data));
    }
    Ok(out)
}

/// Rank of each element, 0 = largest (ties by index).
fn ranks_desc(v: &[f32]) -> Vec<f32> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    let mut r = vec![0.0; v.len()];
    for (rank, &i) in order.iter().enumerate() {
        r[i] = rank as f32;
    }
    r
}

/// Random masks with the same count per tensor (seeded per tensor name, so one tensor's mask
/// does not depend on the others).
pub fn select_random(shapes: &Weights, counts: &BTreeMap<String, usize>, seed: u64) -> BTreeMap<String, Mask> {
    use rand::seq::index::sample;
    use rand::SeedableRng;
    counts
        .iter()
        .filter_map(|(n, &c)| {
            let t = shapes.tensors.get(n)?;
            let h = crate::util::sha256_bytes(format!("{seed}:{n}").as_bytes());
            let s = u64::from_str_radix(&h[..16], 16).unwrap_or(seed);
            let mut rng = rand::rngs::StdRng::seed_from_u64(s);
            let mut idx = sample(&mut rng, t.numel(), c.min(t.numel())).into_vec();
            idx.sort_unstable();
            Some((n.clone(), Mask::from_indices(t.numel(), &idx)))
        })
        .collect()
}

/// Control sets built beside the spot, with the same count per tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Control {
    /// Seeded random elements.
    Random,
    /// The least important elements.
    Bottom,
    /// The largest |θ| (needs the model).
    Magnitude,
    /// Each language's own top-k minus the other languages' (one set per language).
    PerLanguage,
    /// The top-k of the English prose snapshot (`--text`), same counts: what matters for text.
    Text,
    /// The spot minus the text snapshot's top-k (the set-difference method): what matters for
    /// code and not for prose. Smaller than the spot by their overlap.
    CodeSpecific,
}

/// Inputs of a selection.
#[derive(Debug, Clone)]
pub struct SelectRequest {
    pub snapshots: Vec<std::path::PathBuf>,
    pub aggregation: Aggregation,
    pub scope: Scope,
    pub eligible: Eligible,
    /// k in percent.
    pub ks: Vec<f64>,
    pub controls: Vec<Control>,
    pub seed: u64,
    /// Model for the magnitude control (default: the first snapshot's model).
    pub model: Option<String>,
    /// A snapshot of the same model on English prose, for the `text` and `code-specific` sets.
    pub text: Option<std::path::PathBuf>,
}

type Sets = BTreeMap<String, BTreeMap<String, Mask>>;

fn spot_masks(agg: &Scores, k: f64, scope: Scope) -> (BTreeMap<String, usize>, BTreeMap<String, Mask>) {
    let c = counts(agg, k / 100.0, scope);
    let m = select_by(agg, &c, true);
    (c, m)
}

/// Select the spot and its controls from snapshot directories.
pub fn select(req: &SelectRequest) -> Result<(Sets, file::SpotManifest)> {
    use crate::importance::snapshot;
    if req.snapshots.is_empty() {
        bail!("give at least one snapshot directory");
    }
    for &k in &req.ks {
        if !(k > 0.0 && k <= 100.0) {
            bail!("k = {k}: must be in (0, 100] percent");
        }
    }
    let mut snaps = Vec::new();
    for d in &req.snapshots {
        snaps.push(snapshot::read(d).with_context(|| format!("snapshot {}", d.display()))?);
    }
    let config = snaps[0].manifest.config.clone();
    let refs: Vec<&Scores> = snaps.iter().map(|s| &s.scores).collect();
    let agg = aggregate(&refs, req.aggregation, req.scope, req.eligible)?;
    let shapes: BTreeMap<String, Vec<usize>> = agg.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
    let mut sets: Sets = BTreeMap::new();
    let mut shares = BTreeMap::new();
    let mut set_names = vec!["spot".to_string()];
    let magnitude = if req.controls.contains(&Control::Magnitude) {
        let src = req.model.clone().unwrap_or_else(|| snaps[0].manifest.model.clone());
        let w = crate::model::load(&src)?.weights;
        let mut abs = Weights::default();
        for n in agg.tensors.keys() {
            let t = w
                .tensors
                .get(n)
                .with_context(|| format!("model {src} has no tensor '{n}'"))?;
            abs.insert(
                n.clone(),
                HostTensor::new(t.shape.clone(), t.data.iter().map(|x| x.abs()).collect()),
            );
        }
        Some(abs)
    } else {
        None
    };
    let text = if req
        .controls
        .iter()
        .any(|c| matches!(c, Control::Text | Control::CodeSpecific))
    {
        let dir = req
            .text
            .as_ref()
            .context("the text and code-specific sets need a snapshot on English prose (--text DIR)")?;
        let t = snapshot::read(dir).with_context(|| format!("text snapshot {}", dir.display()))?;
        if t.manifest.config.tensor_shapes() != config.tensor_shapes() {
            bail!(
                "text snapshot {}: another architecture than the code snapshots",
                dir.display()
            );
        }
        Some(aggregate(&[&t.scores], Aggregation::Sum, req.scope, req.eligible)?)
    } else {
        None
    };
    for c in &req.controls {
        match c {
            Control::Random => set_names.push("random".into()),
            Control::Bottom => set_names.push("bottom".into()),
            Control::Magnitude => set_names.push("magnitude".into()),
            Control::PerLanguage => set_names.extend(snaps.iter().map(|s| format!("lang={}", s.manifest.language))),
            Control::Text => set_names.push("text".into()),
            Control::CodeSpecific => set_names.push("code-specific".into()),
        }
    }
    for &k in &req.ks {
        let (c, spot) = spot_masks(&agg, k, req.scope);
        shares.insert(file::key(k, "spot"), file::shares(&spot, &shapes, &config));
        sets.insert(file::key(k, "spot"), spot);
        for ctl in &req.controls {
            match ctl {
                Control::Random => {
                    sets.insert(file::key(k, "random"), select_random(&agg, &c, req.seed));
                }
                Control::Bottom => {
                    sets.insert(file::key(k, "bottom"), select_by(&agg, &c, false));
                }
                Control::Magnitude => {
                    sets.insert(
                        file::key(k, "magnitude"),
                        select_by(magnitude.as_ref().expect("loaded"), &c, true),
                    );
                }
                Control::PerLanguage => {
                    let own: Vec<BTreeMap<String, Mask>> = refs
                        .iter()
                        .map(|s| {
                            let one = aggregate(&[*s], Aggregation::Sum, req.scope, req.eligible).expect("same shapes");
                            spot_masks(&one, k, req.scope).1
                        })
                        .collect();
                    for (i, s) in snaps.iter().enumerate() {
                        let mut m = own[i].clone();
                        for (j, other) in own.iter().enumerate() {
                            if i != j {
                                for (n, mm) in m.iter_mut() {
                                    if let Some(o) = other.get(n) {
                                        *mm = mm.minus(o);
                                    }
                                }
                            }
                        }
                        sets.insert(file::key(k, &format!("lang={}", s.manifest.language)), m);
                    }
                }
                Control::Text => {
                    let t = select_by(text.as_ref().expect("loaded"), &c, true);
                    sets.insert(file::key(k, "text"), t);
                }
                Control::CodeSpecific => {
                    let t = select_by(text.as_ref().expect("loaded"), &c, true);
                    let spot = &sets[&file::key(k, "spot")];
                    let diff = spot
                        .iter()
                        .map(|(n, m)| (n.clone(), t.get(n).map_or_else(|| m.clone(), |o| m.minus(o))))
                        .collect();
                    sets.insert(file::key(k, "code-specific"), diff);
                }
            }
        }
    }
    // Stability: spots from the two calibration halves, where every input has them.
    let mut stability = BTreeMap::new();
    let halves: Option<Vec<(snapshot::Snapshot, snapshot::Snapshot)>> = req
        .snapshots
        .iter()
        .map(|d| {
            Some((
                snapshot::read(&d.join("half-a")).ok()?,
                snapshot::read(&d.join("half-b")).ok()?,
            ))
        })
        .collect();
    if let Some(h) = halves {
        let a: Vec<&Scores> = h.iter().map(|(a, _)| &a.scores).collect();
        let b: Vec<&Scores> = h.iter().map(|(_, b)| &b.scores).collect();
        let (aa, bb) = (
            aggregate(&a, req.aggregation, req.scope, req.eligible)?,
            aggregate(&b, req.aggregation, req.scope, req.eligible)?,
        );
        for &k in &req.ks {
            stability.insert(
                file::fmt_k(k),
                jaccard(&spot_masks(&aa, k, req.scope).1, &spot_masks(&bb, k, req.scope).1),
            );
        }
    }
    let languages: Vec<String> = snaps.iter().map(|s| s.manifest.language.clone()).collect();
    let manifest = file::SpotManifest {
        format: 1,
        inputs: snaps
            .iter()
            .zip(&req.snapshots)
            .map(|(s, d)| file::SpotInput {
                dir: d.display().to_string(),
                language: s.manifest.language.clone(),
                method: s.manifest.method.name().into(),
                tokens: s.manifest.tokens,
                model: s.manifest.model.clone(),
                step: s.manifest.step,
            })
            .collect(),
        python_included: languages.iter().any(|l| l == "python"),
        languages,
        aggregation: req.aggregation,
        scope: req.scope,
        eligible: req.eligible,
        ks: req.ks.clone(),
        sets: set_names,
        seed: req.seed,
        counts: sets
            .iter()
            .map(|(k, m)| (k.clone(), m.values().map(|x| x.count()).sum()))
            .collect(),
        shares,
        stability,
        floor: crate::importance::agreement::Agreement::lowest(
            &snaps.iter().map(|s| s.manifest.agreement.as_ref()).collect::<Vec<_>>(),
        ),
        config,
        code_version: crate::importance::snapshot::code_version(),
    };
    Ok((sets, manifest))
}
