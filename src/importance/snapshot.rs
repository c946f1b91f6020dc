//! Importance snapshots on disk: `scores.safetensors` (canonical names, f32 or f16),
//! `manifest.json` and `summaries.json`, written atomically (complete or absent).

use super::summary::Summaries;
use super::{Method, Scores};
use crate::model::LlamaConfig;
use crate::source::HostTensor;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotManifest {
    pub format: u32,
    pub model: String,
    pub model_sha256: String,
    pub language: String,
    pub split: String,
    pub method: Method,
    pub tokens: usize,
    pub seq_len: usize,
    pub batch: usize,
    pub seed: u64,
    pub half: bool,
    /// Training step the scores were taken at (None for a base model).
    pub step: Option<usize>,
    pub corpus_manifest_sha256: String,
    pub code_version: String,
    pub config: LlamaConfig,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
}

pub fn code_version() -> String {
    format!("codespot {}", env!("CARGO_PKG_VERSION"))
}

type Parts<'a> = (&'a Scores, &'a SnapshotManifest, &'a Summaries);

fn write_parts(dir: &Path, (scores, manifest, summaries): Parts) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::source::weights::save_safetensors_as(scores, &dir.join("scores.safetensors"), None, manifest.half)?;
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(manifest)?)?;
    std::fs::write(dir.join("summaries.json"), serde_json::to_string(summaries)?)?;
    Ok(())
}

/// Write a snapshot directory atomically. Refuses an existing `out` unless `force`.
pub fn write(
    out: &Path,
    scores: &Scores,
    manifest: &SnapshotManifest,
    summaries: &Summaries,
    force: bool,
) -> Result<()> {
    write_dir(out, (scores, manifest, summaries), None, force)
}

/// A snapshot with the snapshots of its two calibration halves in `half-a/` and `half-b/`.
pub fn write_with_halves(out: &Path, full: Parts, a: Parts, b: Parts, force: bool) -> Result<()> {
    write_dir(out, full, Some((a, b)), force)
}

fn write_dir(out: &Path, full: Parts, halves: Option<(Parts, Parts)>, force: bool) -> Result<()> {
    crate::util::write_dir_atomic(out, force, |tmp| {
        write_parts(tmp, full)?;
        if let Some((a, b)) = halves {
            write_parts(&tmp.join("half-a"), a)?;
            write_parts(&tmp.join("half-b"), b)?;
        }
        Ok(())
    })
}

/// A snapshot read back.
pub struct Snapshot {
    pub manifest: SnapshotManifest,
    pub scores: Scores,
    pub summaries: Summaries,
}

pub fn read_manifest(dir: &Path) -> Result<SnapshotManifest> {
    let p = dir.join("manifest.json");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("{}: not a snapshot (no manifest.json)", dir.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid snapshot manifest", p.display()))
}

pub fn read_summaries(dir: &Path) -> Result<Summaries> {
    let p = dir.join("summaries.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: missing summaries.json", dir.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid summaries", p.display()))
}

pub fn read(dir: &Path) -> Result<Snapshot> {
    let manifest = read_manifest(dir)?;
    let summaries = read_summaries(dir)?;
    let mut scores = crate::source::weights::from_safetensors(&[dir.join("scores.safetensors")])?;
    // Keep shapes as stored; nothing else to convert (f16 was widened on load).
    scores.tensors.retain(|_, t: &mut HostTensor| !t.data.is_empty());
    Ok(Snapshot {
        manifest,
        scores,
        summaries,
    })
}
