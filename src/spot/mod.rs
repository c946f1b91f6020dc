//! Spot selection: aggregate per-language importance, take the top k% (per tensor, as the
//! authors do, or global), and build matched controls (random, bottom, magnitude,
//! per-language). Masks are stored bit-packed in safetensors.

pub mod file;

use crate::importance::Scores;

use crate::source::{HostTensor, Weights};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use crate::topk::{counts, jaccard, select_by, Eligible, Mask, Scope};

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
    /// code and not for prose. Smaller than the spot by their overlap. Comes with
    /// `code-specific-random`, a random set of its own size per tensor.
    CodeSpecific,
    /// The noise-matched set difference: the top-k of the code snapshots' first calibration
    /// half minus the top-k of their disjoint second half (needs snapshots scored with halves).
    /// What set difference alone produces between two samples of the same code. Comes with
    /// `code-minus-code-random`, of its own size per tensor.
    CodeMinusCode,
    /// The spot restricted to attention, MLP and norm weights (`spot-attn`, `spot-mlp`,
    /// `spot-norms`), each with the random set restricted the same way (`random-attn`, …).
    Arms,
    /// Each language's own top-k (`own=<L>`, held-out languages included): the rows and
    /// columns of the language matrix.
    OwnLanguage,
    /// Structured ablation: whole query heads (`heads`: q rows and o columns) and whole MLP
    /// neurons (`neurons`: gate and up rows, down column), ranked by group Taylor importance
    /// (snapshots scored with `--groups`), as many as hold the spot's count of q and o
    /// (respectively gate, up and down) parameters; each with random heads or neurons of the same
    /// number (`heads-random`, `neurons-random`).
    Structured,
}

/// Which module kinds a set keeps.
pub(crate) type KindFilter = fn(crate::model::arch::ModuleKind) -> bool;

/// The parts of a block that [`Control::Arms`] restricts the spot to.
pub(crate) const ARMS: [(&str, KindFilter); 3] = [
    ("attn", |k| k.is_attention()),
    ("mlp", |k| k.is_mlp()),
    ("norms", |k| k.is_norm()),
];

impl Control {
    /// The sets this control adds beside the spot, given the snapshots' languages.
    pub(crate) fn set_names(self, languages: &[String]) -> Vec<String> {
        match self {
            Control::Random => vec!["random".into()],
            Control::Bottom => vec!["bottom".into()],
            Control::Magnitude => vec!["magnitude".into()],
            Control::PerLanguage => languages.iter().map(|l| format!("lang={l}")).collect(),
            Control::Text => vec!["text".into()],
            Control::CodeSpecific => vec!["code-specific".into(), "code-specific-random".into()],
            Control::CodeMinusCode => vec!["code-minus-code".into(), "code-minus-code-random".into()],
            Control::Arms => ["spot", "random"]
                .iter()
                .flat_map(|s| ARMS.iter().map(move |(a, _)| format!("{s}-{a}")))
                .collect(),
            Control::OwnLanguage => languages.iter().map(|l| format!("own={l}")).collect(),
            Control::Structured => ["heads", "heads-random", "neurons", "neurons-random"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// A random set with `masks`' count per tensor (a set difference's own size), seeded apart
/// from the plain random control.
fn random_like(shapes: &Weights, masks: &BTreeMap<String, Mask>, seed: u64, tag: &str) -> BTreeMap<String, Mask> {
    let c: BTreeMap<String, usize> = masks.iter().map(|(n, m)| (n.clone(), m.count())).collect();
    let s = crate::util::sha256_bytes(format!("{seed}:{tag}").as_bytes());
    select_random(shapes, &c, u64::from_str_radix(&s[..16], 16).unwrap_or(seed))
}

/// A head or a neuron: (layer, index).
type Unit = (usize, usize);

/// Masks zeroing whole query heads (q rows, o columns) or whole neurons (gate and up rows, down
/// column), over every q/o (or gate/up/down) tensor of `shapes`.
pub(crate) fn unit_masks(
    shapes: &BTreeMap<String, Vec<usize>>,
    units: &[Unit],
    heads: bool,
    head_dim: usize,
) -> BTreeMap<String, Mask> {
    use crate::model::{arch::ModuleKind as K, names};
    let mut out = BTreeMap::new();
    for (n, shape) in shapes {
        let Some(p) = names::parse(n) else { continue };
        let (Some(l), [r, c]) = (p.layer, shape.as_slice()) else {
            continue;
        };
        let by_row = match p.kind {
            K::Q if heads => true,
            K::O if heads => false,
            K::Gate | K::Up if !heads => true,
            K::Down if !heads => false,
            _ => continue,
        };
        let width = if heads { head_dim } else { 1 };
        let mut idx = vec![];
        for &(_, u) in units.iter().filter(|x| x.0 == l) {
            for j in u * width..(u + 1) * width {
                if by_row {
                    idx.extend(j * c..(j + 1) * c);
                } else {
                    idx.extend((0..*r).map(|row| row * c + j));
                }
            }
        }
        idx.sort_unstable();
        out.insert(n.clone(), Mask::from_indices(r * c, &idx));
    }
    out
}

/// The `n` highest-scoring units of `scores[layer][unit]` (ties by position).
pub fn top_units(scores: &[Vec<f64>], n: usize) -> Vec<Unit> {
    let mut all: Vec<(Unit, f64)> = scores
        .iter()
        .enumerate()
        .flat_map(|(l, v)| v.iter().enumerate().map(move |(u, &s)| ((l, u), s)))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.into_iter().take(n).map(|x| x.0).collect()
}

/// `n` units drawn at random (seeded) from `layers × per_layer`.
fn random_units(layers: usize, per_layer: usize, n: usize, seed: u64, tag: &str) -> Vec<Unit> {
    use rand::SeedableRng;
    let h = crate::util::sha256_bytes(format!("{seed}:{tag}").as_bytes());
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from_str_radix(&h[..16], 16).unwrap_or(seed));
    let mut idx = rand::seq::index::sample(&mut rng, layers * per_layer, n.min(layers * per_layer)).into_vec();
    idx.sort_unstable();
    idx.into_iter().map(|i| (i / per_layer, i % per_layer)).collect()
}

/// The structured sets at one k: heads and neurons by group Taylor importance, and random ones
/// of the same number, sized to the spot's count in q+o (heads) and gate+up+down (neurons).
fn structured_sets(
    groups: &crate::importance::GroupScores,
    spot_counts: &BTreeMap<String, usize>,
    shapes: &BTreeMap<String, Vec<usize>>,
    cfg: &crate::model::LlamaConfig,
    seed: u64,
) -> Vec<(&'static str, BTreeMap<String, Mask>)> {
    use crate::model::{arch::ModuleKind as K, names};
    let count = |kinds: &[K]| -> usize {
        spot_counts
            .iter()
            .filter(|(n, _)| names::parse(n).is_some_and(|p| p.layer.is_some() && kinds.contains(&p.kind)))
            .map(|(_, c)| c)
            .sum()
    };
    let d = cfg.hidden_size;
    let n_heads = (count(&[K::Q, K::O]) as f64 / (2 * cfg.head_dim * d) as f64).round() as usize;
    let n_neurons = (count(&[K::Gate, K::Up, K::Down]) as f64 / (3 * d) as f64).round() as usize;
    let hd = cfg.head_dim;
    let layers = cfg.num_hidden_layers;
    vec![
        (
            "heads",
            unit_masks(shapes, &top_units(&groups.heads, n_heads), true, hd),
        ),
        (
            "heads-random",
            unit_masks(
                shapes,
                &random_units(layers, cfg.num_attention_heads, n_heads, seed, "heads"),
                true,
                hd,
            ),
        ),
        (
            "neurons",
            unit_masks(shapes, &top_units(&groups.neurons, n_neurons), false, hd),
        ),
        (
            "neurons-random",
            unit_masks(
                shapes,
                &random_units(layers, cfg.intermediate_size, n_neurons, seed, "neurons"),
                false,
                hd,
            ),
        ),
    ]
}

/// `a` minus `b`, tensor by tensor.
fn minus(a: &BTreeMap<String, Mask>, b: &BTreeMap<String, Mask>) -> BTreeMap<String, Mask> {
    a.iter()
        .map(|(n, m)| (n.clone(), b.get(n).map_or_else(|| m.clone(), |o| m.minus(o))))
        .collect()
}

/// The tensors of `masks` whose module kind passes `keep`.
fn restricted(masks: &BTreeMap<String, Mask>, keep: KindFilter) -> BTreeMap<String, Mask> {
    masks
        .iter()
        .filter(|(n, _)| crate::model::names::parse(n).is_some_and(|p| keep(p.kind)))
        .map(|(n, m)| (n.clone(), m.clone()))
        .collect()
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
    /// Languages whose snapshots are left out of the spot's aggregate (the research holds
    /// Python out, so HumanEval tests a language the spot never saw); they still get their
    /// `own=` set and their row of the language matrix.
    pub held_out: Vec<String>,
    /// Baseline criteria: for each, snapshots of the same languages scored with that method;
    /// their aggregate's top-k (same count per tensor as the spot) becomes the set named after
    /// the method (`wanda`, `molchanov`, …).
    pub criteria: Vec<(crate::importance::Method, Vec<std::path::PathBuf>)>,
}

type Sets = BTreeMap<String, BTreeMap<String, Mask>>;

fn spot_masks(agg: &Scores, k: f64, scope: Scope) -> (BTreeMap<String, usize>, BTreeMap<String, Mask>) {
    let c = counts(agg, k / 100.0, scope);
    let m = select_by(agg, &c, true);
    (c, m)
}

/// A language matrix at one k: each language's own top-k against every other's (Jaccard), the
/// diagonal holding that language's split-half agreement (two disjoint halves of its calibration
/// tokens: the noise floor its row is read against).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LanguageMatrix {
    pub languages: Vec<String>,
    pub jaccard: Vec<Vec<f64>>,
}

/// Top-k masks of each snapshot's halves (A, B), when every snapshot has `half-a/` and `half-b/`.
type Halves = Vec<(Scores, Scores)>;

fn read_halves(dirs: &[&std::path::PathBuf]) -> Option<Halves> {
    use crate::importance::snapshot;
    dirs.iter()
        .map(|d| {
            Some((
                snapshot::read(&d.join("half-a")).ok()?.scores,
                snapshot::read(&d.join("half-b")).ok()?.scores,
            ))
        })
        .collect()
}

/// The language matrix at `k` from each language's scores (and halves, or its recorded
/// agreement, for the diagonal; NaN where neither is there).
pub fn language_matrix(langs: &[String], own: &[BTreeMap<String, Mask>], floors: &[Option<f64>]) -> LanguageMatrix {
    let n = langs.len();
    let jaccard = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    if i == j {
                        floors[i].unwrap_or(f64::NAN)
                    } else {
                        jaccard(&own[i], &own[j])
                    }
                })
                .collect()
        })
        .collect();
    LanguageMatrix {
        languages: langs.to_vec(),
        jaccard,
    }
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
    let all_langs: Vec<String> = snaps.iter().map(|s| s.manifest.language.clone()).collect();
    for h in &req.held_out {
        if !all_langs.contains(h) {
            bail!("held-out language '{h}' has no snapshot among {all_langs:?}");
        }
    }
    // The aggregate's inputs: every snapshot but the held-out languages'.
    let used: Vec<usize> = (0..snaps.len())
        .filter(|&i| !req.held_out.contains(&all_langs[i]))
        .collect();
    if used.is_empty() {
        bail!("every snapshot's language is held out: nothing to aggregate");
    }
    let refs: Vec<&Scores> = used.iter().map(|&i| &snaps[i].scores).collect();
    let agg = aggregate(&refs, req.aggregation, req.scope, req.eligible)?;
    let shapes: BTreeMap<String, Vec<usize>> = agg.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
    let extra = Extra::load(req, &snaps, &used, &agg, &config)?;
    let mut sets: Sets = BTreeMap::new();
    let mut shares = BTreeMap::new();
    let mut overlap = BTreeMap::new();
    let mut matrices = BTreeMap::new();
    let mut set_names = vec!["spot".to_string()];
    for c in &req.controls {
        set_names.extend(c.set_names(&all_langs));
    }
    set_names.extend(req.criteria.iter().map(|(m, _)| m.name().to_string()));
    for &k in &req.ks {
        let (c, spot) = spot_masks(&agg, k, req.scope);
        shares.insert(file::key(k, "spot"), file::shares(&spot, &shapes, &config));
        let put = |name: &str, m: BTreeMap<String, Mask>, sets: &mut Sets| {
            sets.insert(file::key(k, name), m);
        };
        let at = AtK {
            req,
            k,
            agg: &agg,
            counts: &c,
            spot: &spot,
            extra: &extra,
            snaps: &snaps,
            used: &used,
            all_langs: &all_langs,
            shapes: &shapes,
            config: &config,
        };
        for &ctl in &req.controls {
            let (added, matrix) = control_sets(ctl, &at);
            for (name, m) in added {
                put(&name, m, &mut sets);
            }
            if let Some(mx) = matrix {
                matrices.insert(file::fmt_k(k), mx);
            }
        }
        for (m, scores) in &extra.criteria {
            put(m.name(), select_by(scores, &c, true), &mut sets);
        }
        // Each baseline's overlap with the spot at this k.
        for name in [
            "magnitude",
            "text",
            "wanda",
            "molchanov",
            "taylor",
            "taylor-sum",
            "taylor2",
        ] {
            if let Some(m) = sets.get(&file::key(k, name)) {
                overlap.insert(file::key(k, name), jaccard(&spot, m));
            }
        }
        sets.insert(file::key(k, "spot"), spot);
    }
    // Stability: spots from the two calibration halves, where every input has them.
    let mut stability = BTreeMap::new();
    if let Some((aa, bb)) = &extra.halves_agg {
        for &k in &req.ks {
            stability.insert(
                file::fmt_k(k),
                jaccard(&spot_masks(aa, k, req.scope).1, &spot_masks(bb, k, req.scope).1),
            );
        }
    }
    let languages: Vec<String> = used.iter().map(|&i| all_langs[i].clone()).collect();
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
        held_out: req.held_out.clone(),
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
        overlap,
        language_matrix: matrices,
        floor: crate::importance::agreement::Agreement::lowest(
            &used
                .iter()
                .map(|&i| snaps[i].manifest.agreement.as_ref())
                .collect::<Vec<_>>(),
        ),
        config,
        code_version: crate::importance::snapshot::code_version(),
    };
    Ok((sets, manifest))
}

/// What the controls' sets at one `k` are made from.
struct AtK<'a> {
    req: &'a SelectRequest,
    k: f64,
    agg: &'a Scores,
    /// The spot's count per tensor.
    counts: &'a BTreeMap<String, usize>,
    spot: &'a BTreeMap<String, Mask>,
    extra: &'a Extra,
    snaps: &'a [crate::importance::snapshot::Snapshot],
    /// The snapshots aggregated (all but the held-out languages').
    used: &'a [usize],
    all_langs: &'a [String],
    shapes: &'a BTreeMap<String, Vec<usize>>,
    config: &'a crate::model::LlamaConfig,
}

/// Sets by name.
type Named = Vec<(String, BTreeMap<String, Mask>)>;

/// The sets control `ctl` adds at `at.k`, by name, with the language matrix for
/// [`Control::OwnLanguage`].
fn control_sets(ctl: Control, at: &AtK) -> (Named, Option<LanguageMatrix>) {
    fn put(out: &mut Named, name: &str, m: BTreeMap<String, Mask>) {
        out.push((name.to_string(), m));
    }
    /// A set difference `name` and `name-random`, a random set of its own size per tensor.
    fn difference(out: &mut Named, at: &AtK, name: &str, diff: BTreeMap<String, Mask>) {
        put(
            out,
            &format!("{name}-random"),
            random_like(at.agg, &diff, at.req.seed, name),
        );
        put(out, name, diff);
    }
    let mut out = vec![];
    let mut matrix = None;
    match ctl {
        Control::Random => put(&mut out, "random", select_random(at.agg, at.counts, at.req.seed)),
        Control::Bottom => put(&mut out, "bottom", select_by(at.agg, at.counts, false)),
        Control::Magnitude => put(
            &mut out,
            "magnitude",
            select_by(at.extra.magnitude.as_ref().expect("loaded"), at.counts, true),
        ),
        Control::PerLanguage => {
            let own: Vec<BTreeMap<String, Mask>> = at
                .used
                .iter()
                .map(|&i| at.extra.own(&at.snaps[i].scores, at.k))
                .collect();
            for (a, &i) in at.used.iter().enumerate() {
                let mut m = own[a].clone();
                for (b, other) in own.iter().enumerate() {
                    if a != b {
                        m = minus(&m, other);
                    }
                }
                put(&mut out, &format!("lang={}", at.all_langs[i]), m);
            }
        }
        Control::Text => put(
            &mut out,
            "text",
            select_by(at.extra.text.as_ref().expect("loaded"), at.counts, true),
        ),
        Control::CodeSpecific => {
            let t = select_by(at.extra.text.as_ref().expect("loaded"), at.counts, true);
            difference(&mut out, at, "code-specific", minus(at.spot, &t));
        }
        Control::CodeMinusCode => {
            let (a, b) = at.extra.halves_agg.as_ref().expect("loaded");
            let diff = minus(
                &spot_masks(a, at.k, at.req.scope).1,
                &spot_masks(b, at.k, at.req.scope).1,
            );
            difference(&mut out, at, "code-minus-code", diff);
        }
        Control::Arms => {
            let random = select_random(at.agg, at.counts, at.req.seed);
            for (arm, keep) in ARMS {
                put(&mut out, &format!("spot-{arm}"), restricted(at.spot, keep));
                put(&mut out, &format!("random-{arm}"), restricted(&random, keep));
            }
        }
        Control::Structured => {
            let g = at.extra.groups.as_ref().expect("loaded");
            for (name, m) in structured_sets(g, at.counts, at.shapes, at.config, at.req.seed) {
                put(&mut out, name, m);
            }
        }
        Control::OwnLanguage => {
            let own: Vec<BTreeMap<String, Mask>> = at.snaps.iter().map(|s| at.extra.own(&s.scores, at.k)).collect();
            let floors: Vec<Option<f64>> = (0..at.snaps.len())
                .map(|i| match &at.extra.halves {
                    Some(h) => Some(jaccard(&at.extra.own(&h[i].0, at.k), &at.extra.own(&h[i].1, at.k))),
                    None => at.snaps[i].manifest.agreement.as_ref().and_then(|a| a.floor(at.k)),
                })
                .collect();
            matrix = Some(language_matrix(at.all_langs, &own, &floors));
            for (l, m) in at.all_langs.iter().zip(own) {
                put(&mut out, &format!("own={l}"), m);
            }
        }
    }
    (out, matrix)
}

/// What a selection reads beside the spot's own snapshots, loaded once.
struct Extra {
    magnitude: Option<Scores>,
    text: Option<Scores>,
    /// Per snapshot (all languages), its two calibration halves' scores.
    halves: Option<Halves>,
    /// The aggregate of the used snapshots' first and second halves.
    halves_agg: Option<(Scores, Scores)>,
    criteria: Vec<(crate::importance::Method, Scores)>,
    /// The used snapshots' group Taylor scores, summed (the `structured` control).
    groups: Option<crate::importance::GroupScores>,
    scope: Scope,
    eligible: Eligible,
}

impl Extra {
    fn load(
        req: &SelectRequest,
        snaps: &[crate::importance::snapshot::Snapshot],
        used: &[usize],
        agg: &Scores,
        config: &crate::model::LlamaConfig,
    ) -> Result<Self> {
        use crate::importance::snapshot;
        let wants = |c: Control| req.controls.contains(&c);
        let magnitude = if wants(Control::Magnitude) {
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
        let text = if wants(Control::Text) || wants(Control::CodeSpecific) {
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
        let dirs: Vec<&std::path::PathBuf> = req.snapshots.iter().collect();
        let halves = read_halves(&dirs);
        if wants(Control::CodeMinusCode) && halves.is_none() {
            bail!(
                "the code-minus-code set needs snapshots scored with two calibration halves (half-a/, half-b/: score --halves)"
            );
        }
        let halves_agg = match &halves {
            Some(h) => {
                let a: Vec<&Scores> = used.iter().map(|&i| &h[i].0).collect();
                let b: Vec<&Scores> = used.iter().map(|&i| &h[i].1).collect();
                Some((
                    aggregate(&a, req.aggregation, req.scope, req.eligible)?,
                    aggregate(&b, req.aggregation, req.scope, req.eligible)?,
                ))
            }
            None => None,
        };
        let mut criteria = vec![];
        for (method, dirs) in &req.criteria {
            let mut by_lang = BTreeMap::new();
            for d in dirs {
                let s = snapshot::read(d).with_context(|| format!("{} snapshot {}", method.name(), d.display()))?;
                if s.manifest.method != *method {
                    bail!(
                        "{}: scored with {}, not {}",
                        d.display(),
                        s.manifest.method.name(),
                        method.name()
                    );
                }
                by_lang.insert(s.manifest.language.clone(), s.scores);
            }
            // The same languages as the spot's aggregate, so the criterion is the only difference.
            let mut picked = vec![];
            for &i in used {
                let l = &snaps[i].manifest.language;
                picked.push(
                    by_lang
                        .get(l)
                        .with_context(|| format!("criterion {}: no snapshot of language '{l}'", method.name()))?,
                );
            }
            criteria.push((*method, aggregate(&picked, req.aggregation, req.scope, req.eligible)?));
        }
        let groups = if wants(Control::Structured) {
            let mut sum: Option<crate::importance::GroupScores> = None;
            for &i in used {
                let g = snaps[i].summaries.groups.as_ref().with_context(|| {
                    format!(
                        "the structured control needs group scores: {} was scored without --groups",
                        req.snapshots[i].display()
                    )
                })?;
                match &mut sum {
                    None => sum = Some(g.clone()),
                    Some(s) => s.add(g),
                }
            }
            sum
        } else {
            None
        };
        Ok(Self {
            magnitude,
            text,
            halves,
            halves_agg,
            criteria,
            groups,
            scope: req.scope,
            eligible: req.eligible,
        })
    }

    /// One snapshot's own top-k. Per tensor, straight from its scores: the sum over one
    /// snapshot is the scores themselves, so no model-sized copy is made for each k.
    fn own(&self, scores: &Scores, k: f64) -> BTreeMap<String, Mask> {
        if self.scope == Scope::PerTensor {
            let c: BTreeMap<String, usize> = scores
                .tensors
                .iter()
                .filter(|(n, _)| self.eligible.admits(n))
                .map(|(n, t)| (n.clone(), (k / 100.0 * t.numel() as f64).round() as usize))
                .collect();
            return select_by(scores, &c, true);
        }
        let one = aggregate(&[scores], Aggregation::Sum, self.scope, self.eligible).expect("same shapes");
        spot_masks(&one, k, self.scope).1
    }
}
