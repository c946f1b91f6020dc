//! `codespot compare A B`: two snapshots or two spots (base vs tuned, python vs rust, step 100
//! vs step 500). Jaccard of the top-k sets at several k, Spearman correlation of the scores
//! (snapshots only), overlap per layer, per module kind and per layer × module, and the
//! attention heads that entered or left the spot.

use crate::importance::snapshot;
use crate::model::{names, LlamaConfig};
use crate::spot::{self, Mask};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One side of a comparison.
pub(crate) enum Side {
    Snapshot(Box<snapshot::Snapshot>),
    Spot {
        dir: PathBuf,
        manifest: Box<spot::file::SpotManifest>,
    },
}

impl Side {
    /// A snapshot directory (`scores.safetensors`) or a spot directory (`spot.safetensors`).
    pub fn open(dir: &Path) -> Result<Self> {
        if dir.join("scores.safetensors").is_file() {
            Ok(Side::Snapshot(Box::new(snapshot::read(dir)?)))
        } else if dir.join("spot.safetensors").is_file() {
            Ok(Side::Spot {
                dir: dir.to_path_buf(),
                manifest: Box::new(spot::file::read_manifest(dir)?),
            })
        } else {
            bail!(
                "{}: neither a snapshot (scores.safetensors) nor a spot (spot.safetensors)",
                dir.display()
            )
        }
    }

    fn config(&self) -> &LlamaConfig {
        match self {
            Side::Snapshot(s) => &s.manifest.config,
            Side::Spot { manifest, .. } => &manifest.config,
        }
    }

    /// The recorded split-half agreement: a snapshot's own, or for a spot the lowest of the
    /// snapshots it was selected from.
    fn agreement(&self) -> Option<&crate::importance::agreement::Agreement> {
        match self {
            Side::Snapshot(s) => s.manifest.agreement.as_ref(),
            Side::Spot { manifest, .. } => manifest.floor.as_ref(),
        }
    }

    /// The k values this side can give a set for (any k for a snapshot).
    fn has_k(&self, k: f64) -> bool {
        match self {
            Side::Snapshot(_) => true,
            Side::Spot { manifest, .. } => manifest.ks.iter().any(|x| (x - k).abs() < 1e-9),
        }
    }

    /// The top-k % set: per-tensor top-k over layer parameters for a snapshot, the stored
    /// spot set for a spot.
    pub fn masks(&self, k: f64) -> Result<BTreeMap<String, Mask>> {
        match self {
            Side::Snapshot(s) => Ok(super::top_masks(&s.scores, k)),
            Side::Spot { dir, .. } => spot::file::read_set(dir, k, "spot"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub kind: String,
    /// (k %, Jaccard of the two top-k sets).
    pub jaccard: Vec<(f64, f64)>,
    /// Spearman correlation of the scores (both sides snapshots).
    pub spearman: Option<f64>,
    /// The k of the detailed breakdown below.
    pub k_detail: f64,
    pub per_layer: Vec<f64>,
    pub per_module: BTreeMap<String, f64>,
    /// `[layer][module kind in MODULE_ORDER]`.
    pub layer_module: Vec<Vec<f64>>,
    /// Spot heads (layer, query head): the top tenth of heads by their share of the set.
    pub heads_a: Vec<(usize, usize)>,
    pub heads_b: Vec<(usize, usize)>,
    pub heads_entered: Vec<(usize, usize)>,
    pub heads_left: Vec<(usize, usize)>,
    /// The noise floor beside each Jaccard: per k, the split-half agreement of A's and of B's
    /// calibration (snapshots that recorded it), and the floor used, the lower of the two.
    #[serde(default)]
    pub floor: Vec<Floor>,
    /// Per layer at `k_detail`: the lower of the two snapshots' split-half agreement.
    #[serde(default)]
    pub floor_layer: Vec<Option<f64>>,
    /// B's movement against A beyond the cross-sample null, when both snapshots were scored
    /// with `--folds` on the same documents ([`crate::importance::null`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub movement: Option<crate::importance::null::Movement>,
}

/// One k's Jaccard beside the noise floor of the two sides.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Floor {
    pub k: f64,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// min(a, b): two samples of the same model agree this much; a Jaccard at or above it is
    /// within sampling noise.
    pub floor: Option<f64>,
    pub within: Option<bool>,
}

fn pick(m: &BTreeMap<String, Mask>, f: impl Fn(&names::ParamName) -> bool) -> BTreeMap<String, Mask> {
    m.iter()
        .filter(|(n, _)| names::parse(n).is_some_and(|p| f(&p)))
        .map(|(n, x)| (n.clone(), x.clone()))
        .collect()
}

/// The top tenth of (layer, head) pairs by share of the set (at least one).
fn spot_heads(masks: &BTreeMap<String, Mask>, cfg: &LlamaConfig) -> Vec<(usize, usize)> {
    let shapes: BTreeMap<String, Vec<usize>> = cfg.tensor_shapes().into_iter().collect();
    let s = spot::file::shares(masks, &shapes, cfg);
    let mut all: Vec<((usize, usize), f64)> = s
        .head
        .iter()
        .enumerate()
        .flat_map(|(l, r)| r.iter().enumerate().map(move |(h, v)| ((l, h), *v)))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let n = (all.len() / 10).max(1);
    let mut top: Vec<(usize, usize)> = all.into_iter().take(n).map(|x| x.0).collect();
    top.sort_unstable();
    top
}

/// Compare two sides at `ks` (those both sides have); the breakdown is at `k_detail` (1 % when
/// both have it, else the first common k).
pub fn compare(a_dir: &Path, b_dir: &Path, ks: &[f64]) -> Result<Comparison> {
    let a = Side::open(a_dir)?;
    let b = Side::open(b_dir)?;
    let (ca, cb) = (a.config(), b.config());
    if ca.tensor_shapes() != cb.tensor_shapes() {
        bail!(
            "{} and {}: different architectures (tensor shapes differ)",
            a_dir.display(),
            b_dir.display()
        );
    }
    let common: Vec<f64> = ks.iter().copied().filter(|k| a.has_k(*k) && b.has_k(*k)).collect();
    if common.is_empty() {
        bail!(
            "{} and {}: no common k among {:?} (a spot holds only the k it was selected with)",
            a_dir.display(),
            b_dir.display(),
            ks
        );
    }
    let mut jaccard = vec![];
    for &k in &common {
        jaccard.push((k, spot::jaccard(&a.masks(k)?, &b.masks(k)?)));
    }
    let k_detail = if common.iter().any(|k| (k - 1.0).abs() < 1e-9) {
        1.0
    } else {
        common[0]
    };
    let (ma, mb) = (a.masks(k_detail)?, b.masks(k_detail)?);
    let layers = ca.num_hidden_layers;
    let per_layer = super::jaccard_per_layer(&ma, &mb, layers);
    let per_module = super::MODULE_ORDER
        .iter()
        .map(|k| {
            let f = |p: &names::ParamName| p.layer.is_some() && p.kind.short() == *k;
            (k.to_string(), spot::jaccard(&pick(&ma, f), &pick(&mb, f)))
        })
        .collect();
    let layer_module = (0..layers)
        .map(|l| {
            super::MODULE_ORDER
                .iter()
                .map(|k| {
                    let f = |p: &names::ParamName| p.layer == Some(l) && p.kind.short() == *k;
                    spot::jaccard(&pick(&ma, f), &pick(&mb, f))
                })
                .collect()
        })
        .collect();
    let spearman = match (&a, &b) {
        (Side::Snapshot(x), Side::Snapshot(y)) => {
            Some(super::spearman(&x.scores, &y.scores, super::SPEARMAN_MAX_ELEMS))
        }
        _ => None,
    };
    let heads_a = spot_heads(&ma, ca);
    let heads_b = spot_heads(&mb, cb);
    let min = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => Some(x.min(y)),
        _ => None,
    };
    let (ga, gb) = (a.agreement(), b.agreement());
    let floor = jaccard
        .iter()
        .map(|&(k, j)| {
            let (fa, fb) = (ga.and_then(|g| g.floor(k)), gb.and_then(|g| g.floor(k)));
            let f = min(fa, fb);
            Floor {
                k,
                a: fa,
                b: fb,
                floor: f,
                within: f.map(|f| j >= f),
            }
        })
        .collect();
    let floor_layer = (0..layers)
        .map(|l| {
            min(
                ga.and_then(|g| g.floor_layer(k_detail, l)),
                gb.and_then(|g| g.floor_layer(k_detail, l)),
            )
        })
        .collect();
    let heads_entered = heads_b.iter().filter(|h| !heads_a.contains(h)).copied().collect();
    let heads_left = heads_a.iter().filter(|h| !heads_b.contains(h)).copied().collect();
    Ok(Comparison {
        a: a_dir.display().to_string(),
        b: b_dir.display().to_string(),
        kind: match (&a, &b) {
            (Side::Snapshot(_), Side::Snapshot(_)) => "snapshots".into(),
            (Side::Spot { .. }, Side::Spot { .. }) => "spots".into(),
            _ => "snapshot and spot".into(),
        },
        jaccard,
        spearman,
        k_detail,
        per_layer,
        per_module,
        layer_module,
        heads_a,
        heads_b,
        heads_entered,
        heads_left,
        floor,
        floor_layer,
        movement: movement(a_dir, b_dir)?,
    })
}

/// [`crate::importance::null::movement`] of `b` against `a` when both hold fold sums.
fn movement(a: &Path, b: &Path) -> Result<Option<crate::importance::null::Movement>> {
    use crate::importance::null;
    let (fa, fb) = (a.join(null::FILE), b.join(null::FILE));
    if !(fa.is_file() && fb.is_file()) {
        return Ok(None);
    }
    Ok(Some(null::movement(
        &null::Folds::read(&fa)?,
        &null::Folds::read(&fb)?,
        null::REPLICATES,
        0,
    )?))
}

fn heads_text(v: &[(usize, usize)]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.iter()
        .map(|(l, h)| format!("L{l}.H{h}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The comparison as a text report.
pub fn text(c: &Comparison) -> String {
    let mut s = format!(
        "A: {}\nB: {}\n({})\n\n| k % | Jaccard | noise floor (A / B) | |\n|---:|---:|---:|---|\n",
        c.a, c.b, c.kind
    );
    let f3 = |x: Option<f64>| x.map_or("–".to_string(), |x| format!("{x:.4}"));
    for (i, (k, j)) in c.jaccard.iter().enumerate() {
        let fl = c.floor.get(i);
        // A floor from other tokens is no test for two snapshots of the same tokens: only a
        // difference the other way (below the floor) says something.
        let verdict = match fl.and_then(|f| f.within) {
            Some(true) => "at or above the floor (no test: see the cross-sample null)",
            Some(false) => "below the floor",
            None => "no floor recorded",
        };
        s += &format!(
            "| {} | {j:.4} | {} / {} | {verdict} |\n",
            spot::file::fmt_k(*k),
            f3(fl.and_then(|f| f.a)),
            f3(fl.and_then(|f| f.b))
        );
    }
    if c.floor.iter().any(|f| f.floor.is_some()) {
        s += "\nNoise floor: the Jaccard of the top-k sets from two disjoint halves of a snapshot's own calibration tokens (its split-half agreement; for a spot, the lowest among the snapshots it was selected from); two samples of one model agree that much, so a Jaccard at or above the lower floor is no evidence of movement.\n";
    }
    match &c.movement {
        Some(m) => {
            let iv = |x: crate::importance::null::Interval| format!("{:.4} [{:.4}, {:.4}]", x.value, x.lo, x.hi);
            s += &format!(
                "\nCross-sample null at k = {}% ({} document folds per half, {} bootstrap replicates):\n  within A: J(A_a, A_b) = {}\n  within B: J(B_a, B_b) = {}\n  cross:    ½[J(A_a, B_b) + J(A_b, B_a)] = {}\n  within A − cross = {}  →  {}\n",
                spot::file::fmt_k(m.k_percent),
                m.folds_per_half,
                m.replicates,
                iv(m.within),
                iv(m.within_tuned),
                iv(m.cross),
                iv(m.diff),
                m.verdict
            );
        }
        None => {
            s += "\nNo cross-sample null: score both snapshots with --folds N (importance.folds) to test movement.\n";
        }
    }
    if let Some(r) = c.spearman {
        s += &format!("\nSpearman rank correlation of the scores: {r:.4}\n");
    }
    s += &format!("\nOverlap at k = {}% per module kind:\n", spot::file::fmt_k(c.k_detail));
    for (k, j) in &c.per_module {
        s += &format!("  {k:<9} {j:.3}\n");
    }
    s += "Per layer (Jaccard, floor):\n";
    for (l, j) in c.per_layer.iter().enumerate() {
        match c.floor_layer.get(l).copied().flatten() {
            Some(f) => {
                s += &format!(
                    "  L{l:02} {j:.3}  floor {f:.3}{}\n",
                    if *j >= f { "  (within)" } else { "" }
                )
            }
            None => s += &format!("  L{l:02} {j:.3}\n"),
        }
    }
    s += &format!(
        "Spot heads (top tenth by share): A {} · B {}\n  entered: {}\n  left:    {}\n",
        c.heads_a.len(),
        c.heads_b.len(),
        heads_text(&c.heads_entered),
        heads_text(&c.heads_left)
    );
    s
}
