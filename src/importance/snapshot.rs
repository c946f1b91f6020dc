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
    /// Set when this snapshot scored one shard of the calibration batches (`score --shard I/N`);
    /// its `accumulators.safetensors` holds the sums that `snapshot merge` adds up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardInfo>,
    /// Set on a merged snapshot: the shards it was added up from, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<MergedShard>,
    /// Data-parallel peers (devices) the scoring ran on; 1 when absent.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub devices: usize,
    /// Dtype the model's weights were held and computed in (`f32` when absent); scores are
    /// always accumulated in f32.
    #[serde(default = "f32_name", skip_serializing_if = "is_f32")]
    pub dtype: String,
    /// Matrix products in bf16 around the f32 weights, as they ran: `bf16-amx` or
    /// `bf16-avx512bf16` (`off` when absent, or when the CPU had neither unit).
    #[serde(default = "off_name", skip_serializing_if = "is_off")]
    pub autocast: String,
    /// Split-half agreement (the noise floor) and convergence of the top-k sets; absent for
    /// shards, merged and data-parallel snapshots, and passes of one batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<super::agreement::Agreement>,
}

fn one() -> usize {
    1
}
fn is_one(n: &usize) -> bool {
    *n == 1
}
fn f32_name() -> String {
    "f32".into()
}
fn is_f32(s: &str) -> bool {
    s == "f32"
}
fn off_name() -> String {
    "off".into()
}
fn is_off(s: &str) -> bool {
    s == "off"
}

/// Which slice of the calibration batches a shard scored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    /// 1-based.
    pub index: usize,
    pub count: usize,
    /// Batch range `[first_batch, first_batch + batches)` of the whole run's batches.
    pub first_batch: usize,
    pub batches: usize,
    /// Predicted tokens of the whole (unsharded) run.
    pub total_tokens: usize,
}

/// One shard of a merged snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MergedShard {
    pub dir: String,
    pub index: usize,
    pub tokens: usize,
    pub elapsed_s: f64,
    /// SHA-256 of the shard's accumulators.safetensors.
    pub accumulators_sha256: String,
}

/// The file of a shard snapshot that holds its raw sums ([`super::RawSums`]).
pub const ACCUMULATORS: &str = "accumulators.safetensors";

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

/// A shard's snapshot: the scores of its batches plus its raw sums for `snapshot merge`.
pub(crate) fn write_shard(out: &Path, full: Parts, sums: &super::RawSums, force: bool) -> Result<()> {
    crate::util::write_dir_atomic(out, force, |tmp| {
        write_parts(tmp, full)?;
        let meta = [
            ("method".to_string(), sums.method.name().to_string()),
            ("batches".to_string(), sums.batches.to_string()),
        ];
        crate::source::weights::save_safetensors(&sums.to_weights(), &tmp.join(ACCUMULATORS), Some(meta.into()))
    })
}

/// A shard's raw sums read back, checked against its manifest.
pub(crate) fn read_sums(dir: &Path, manifest: &SnapshotManifest) -> Result<super::RawSums> {
    let path = dir.join(ACCUMULATORS);
    let shard = manifest.shard.as_ref().with_context(|| {
        format!(
            "{}: manifest.json has no 'shard' field: not a shard (score --shard I/N writes one)",
            dir.display()
        )
    })?;
    anyhow::ensure!(
        path.is_file(),
        "{}: shard {}/{} has no {ACCUMULATORS}",
        dir.display(),
        shard.index,
        shard.count
    );
    let w = crate::source::weights::from_safetensors(std::slice::from_ref(&path))?;
    super::RawSums::from_weights(manifest.method, shard.batches, w, &path.display().to_string())
}

/// A snapshot with the snapshots of its two calibration halves in `half-a/` and `half-b/`.
pub(crate) fn write_with_halves(out: &Path, full: Parts, a: Parts, b: Parts, force: bool) -> Result<()> {
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

pub(crate) fn read_summaries(dir: &Path) -> Result<Summaries> {
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
