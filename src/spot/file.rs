//! Spot files: `spot.safetensors` (bit-packed U8 masks named `k{K}:{set}/{param}`) and
//! `manifest.json` (inputs, aggregation, scope, k list, controls, shares, stability).

use super::Mask;
use crate::model::LlamaConfig;
use crate::model::{arch::ModuleKind, names};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpotInput {
    pub dir: String,
    pub language: String,
    pub method: String,
    pub tokens: usize,
    pub model: String,
    pub step: Option<usize>,
}

/// Where a set's elements lie: share per layer × module kind, and per (layer, query head).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SpotShares {
    pub total: usize,
    pub layer_module: BTreeMap<usize, BTreeMap<String, f64>>,
    pub module: BTreeMap<String, f64>,
    pub head: Vec<Vec<f64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpotManifest {
    pub format: u32,
    pub inputs: Vec<SpotInput>,
    /// The languages aggregated into the spot.
    pub languages: Vec<String>,
    /// Languages scored but left out of the aggregate (they have `own=` sets and matrix rows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_out: Vec<String>,
    pub python_included: bool,
    pub aggregation: super::Aggregation,
    pub scope: super::Scope,
    pub eligible: super::Eligible,
    pub ks: Vec<f64>,
    /// Set names per k: "spot", "random", "bottom", "magnitude", "lang=<L>".
    pub sets: Vec<String>,
    pub seed: u64,
    /// `k{K}:{set}` → number of selected elements.
    pub counts: BTreeMap<String, usize>,
    /// `k{K}:spot` → where the spot lies.
    pub shares: BTreeMap<String, SpotShares>,
    /// k → Jaccard overlap of spots selected from the two calibration halves, when the inputs
    /// carry half snapshots.
    pub stability: BTreeMap<String, f64>,
    /// `k{K}:{set}` → Jaccard of a baseline set (magnitude, text, other criteria) with the spot.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overlap: BTreeMap<String, f64>,
    /// k → the language matrix (with the `own-language` control).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub language_matrix: BTreeMap<String, super::LanguageMatrix>,
    /// The noise floor the spot is compared against: the element-wise lowest split-half
    /// agreement of the snapshots it was selected from (absent when one of them recorded none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<crate::importance::agreement::Agreement>,
    pub config: LlamaConfig,
    pub code_version: String,
}

pub fn key(k: f64, set: &str) -> String {
    format!("k{}:{set}", fmt_k(k))
}

pub(crate) fn fmt_k(k: f64) -> String {
    let s = format!("{k}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Share of a mask set per layer × module and per query head (GQA: k/v heads count for each
/// query head they serve, divided by the group size).
pub fn shares(masks: &BTreeMap<String, Mask>, shapes: &BTreeMap<String, Vec<usize>>, cfg: &LlamaConfig) -> SpotShares {
    let total: usize = masks.values().map(|m| m.count()).sum();
    let norm = total.max(1) as f64;
    let mut s = SpotShares {
        total,
        head: vec![vec![0.0; cfg.num_attention_heads]; cfg.num_hidden_layers],
        ..Default::default()
    };
    for (n, m) in masks {
        let Some(p) = names::parse(n) else { continue };
        let c = m.count() as f64 / norm;
        *s.module.entry(p.kind.short().into()).or_default() += c;
        let Some(l) = p.layer else { continue };
        *s.layer_module
            .entry(l)
            .or_default()
            .entry(p.kind.short().into())
            .or_default() += c;
        if let (Some(hs), Some(shape)) = (names::head_slicing(p.kind, cfg), shapes.get(n)) {
            for i in m.indices() {
                let h = hs.head_of(i, shape);
                for q in hs.query_heads(h) {
                    s.head[l][q] += 1.0 / norm / hs.group as f64;
                }
            }
        }
    }
    let _ = ModuleKind::Q;
    s
}

/// Write a spot directory atomically.
pub fn write(
    out: &Path,
    sets: &BTreeMap<String, BTreeMap<String, Mask>>,
    manifest: &SpotManifest,
    force: bool,
) -> Result<()> {
    use safetensors::tensor::TensorView;
    let mut views = Vec::new();
    // Mask lengths go into one metadata entry, a JSON object in name order: the safetensors
    // header's metadata is a hash map, so one entry per mask would be written in a different
    // order each time and identical spots would differ byte for byte.
    let mut lengths = BTreeMap::new();
    for (set, masks) in sets {
        for (n, m) in masks {
            let name = format!("{set}/{n}");
            lengths.insert(name.clone(), m.len);
            views.push((name, m.bits.as_slice()));
        }
    }
    let meta = std::collections::HashMap::from([(LENGTHS_KEY.to_string(), serde_json::to_string(&lengths)?)]);
    let tv = views
        .iter()
        .map(|(n, b)| TensorView::new(safetensors::Dtype::U8, vec![b.len()], b).map(|v| (n.as_str(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::util::write_dir_atomic(out, force, |tmp| {
        safetensors::serialize_to_file(tv, Some(meta), &tmp.join("spot.safetensors"))
            .map_err(|e| anyhow::anyhow!("writing spot.safetensors: {e}"))?;
        std::fs::write(tmp.join("manifest.json"), serde_json::to_string_pretty(manifest)?)?;
        Ok(())
    })
}

/// The safetensors metadata entry that holds every mask's length (elements), by tensor name.
const LENGTHS_KEY: &str = "mask_lengths";

/// Mask lengths from a spot file's metadata: the `mask_lengths` entry, or, in files written
/// before it existed, one entry per mask.
fn mask_lengths(meta: std::collections::HashMap<String, String>) -> Result<BTreeMap<String, usize>> {
    if let Some(json) = meta.get(LENGTHS_KEY) {
        return serde_json::from_str(json).context("not a JSON object of lengths");
    }
    Ok(meta
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect())
}

pub fn read_manifest(dir: &Path) -> Result<SpotManifest> {
    let p = dir.join("manifest.json");
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("{}: not a spot directory (no manifest.json)", dir.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid spot manifest", p.display()))
}

/// Read the masks of one set (`k`, `set` such as "spot" or "random").
pub fn read_set(dir: &Path, k: f64, set: &str) -> Result<BTreeMap<String, Mask>> {
    let man = read_manifest(dir)?;
    let want = key(k, set);
    if !man.counts.contains_key(&want) {
        bail!(
            "{}: no set '{want}' (k in {:?}, sets {:?})",
            dir.display(),
            man.ks,
            man.sets
        );
    }
    let p = dir.join("spot.safetensors");
    let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: invalid header: {e}", p.display()))?;
    let lens = mask_lengths(meta.metadata().clone().unwrap_or_default())
        .with_context(|| format!("{}: metadata '{LENGTHS_KEY}'", p.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: invalid header: {e}", p.display()))?;
    let prefix = format!("{want}/");
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let Some(param) = name.strip_prefix(&prefix) else {
            continue;
        };
        let len: usize = *lens
            .get(&name)
            .with_context(|| format!("{}: no length for '{name}'", p.display()))?;
        if view.data().len() != len.div_ceil(8) {
            bail!(
                "{}: mask '{name}' has {} bytes for {len} elements",
                p.display(),
                view.data().len()
            );
        }
        out.insert(
            param.to_string(),
            Mask {
                len,
                bits: view.data().to_vec(),
            },
        );
    }
    Ok(out)
}
