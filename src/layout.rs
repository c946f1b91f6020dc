//! The run directory's layout, owned here so that the trainer, the study and the report all
//! read it from one place (and none of them reaches into another for a path):
//!
//! ```text
//! <out>/recipe.resolved.toml   .codespot.lock
//! <out>/base/<lang>/            base-model snapshot       (+ <lang>.stage: its stage hash)
//! <out>/spots/{base,tuned}/     spot masks and controls   (+ .stage)
//! <out>/tune/<lang>/            checkpoints/step-NNNNNN/, snapshots/step-NNNNNN/, tb/, tune.json
//! <out>/compare/…  <out>/eval/…  <out>/report.md  <out>/report/*.png
//! ```

use crate::importance::run::ScoreRequest;
use crate::recipe::Loaded;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// The stage marker beside an output (`base/python` → `base/python.stage`).
fn marker(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".stage");
    PathBuf::from(s)
}

/// Whether `out` holds the result of a stage with this hash.
pub(crate) fn stage_done(out: &Path, hash: &str) -> bool {
    out.exists() && std::fs::read_to_string(marker(out)).is_ok_and(|h| h.trim() == hash)
}

/// Record that `out` holds the result of the stage with this hash.
pub(crate) fn mark(out: &Path, hash: &str) -> Result<()> {
    crate::util::write_atomic(&marker(out), hash.as_bytes())
}

/// A stage hash: SHA-256 of the JSON of what the stage reads.
pub(crate) fn hash_of(v: serde_json::Value) -> String {
    crate::util::sha256_bytes(v.to_string().as_bytes())
}

/// One stage's (language, output dir, stage hash).
pub type Stage = (String, PathBuf, String);

/// Stage hashes and the dirs of a run.
pub struct Plan {
    pub out: PathBuf,
    pub base_snap: Vec<(String, PathBuf, String)>,
    /// The base model's snapshot on the prose corpus (`spot.text`), when the recipe has one.
    pub text_snap: Option<(String, PathBuf, String)>,
    /// Per baseline criterion (`spot.criteria`), the base model's snapshot of each language
    /// scored with it (`base-<method>/<lang>`).
    pub criteria_snap: Vec<(crate::importance::Method, Vec<Stage>)>,
    pub base_spot: (PathBuf, String),
    pub tuned_spot: (PathBuf, String),
}

impl Plan {
    pub fn new(loaded: &Loaded) -> Self {
        let r = &loaded.recipe;
        let out = loaded.out_dir();
        let snap = |l: &String| {
            let mut v = serde_json::json!({"stage": "base-snapshot", "model": r.model, "lang": l,
                "corpus": r.corpus, "importance": r.importance});
            if r.dtype != crate::model::Dtype::F32 {
                // Only when not the default, so runs made before `dtype` existed still match.
                v["dtype"] = r.dtype.name().into();
            }
            if r.autocast.effective() != "off" {
                v["autocast"] = r.autocast.effective().into();
            }
            (l.clone(), out.join("base").join(l), hash_of(v))
        };
        let base_snap: Vec<(String, PathBuf, String)> = r.languages.iter().map(snap).collect();
        let text_snap = r.spot.text.as_ref().map(snap);
        let criteria_snap: Vec<_> = r
            .spot
            .criteria
            .iter()
            .map(|&m| {
                let dirs: Vec<Stage> = r
                    .languages
                    .iter()
                    .map(|l| {
                        let (l, _, h) = snap(l);
                        let dir = out.join(format!("base-{}", m.name())).join(&l);
                        (
                            l,
                            dir,
                            hash_of(serde_json::json!({"stage": "criterion-snapshot", "method": m, "of": h})),
                        )
                    })
                    .collect();
                (m, dirs)
            })
            .collect();
        let mut inputs: Vec<&String> = base_snap.iter().map(|x| &x.2).collect();
        inputs.extend(text_snap.iter().map(|x| &x.2));
        inputs.extend(criteria_snap.iter().flat_map(|(_, v)| v.iter().map(|x| &x.2)));
        let base_spot_hash = hash_of(serde_json::json!({"stage": "spot", "spot": r.spot, "inputs": inputs}));
        let mut tuned = serde_json::json!({"stage": "spot", "spot": r.spot, "tune": tune_hash(loaded)});
        if let Some(t) = &text_snap {
            tuned["text"] = t.2.clone().into();
        }
        let tuned_spot_hash = hash_of(tuned);
        Self {
            base_spot: (out.join("spots").join("base"), base_spot_hash),
            tuned_spot: (out.join("spots").join("tuned"), tuned_spot_hash),
            out,
            base_snap,
            text_snap,
            criteria_snap,
        }
    }
}

/// A checkpoint's or snapshot's directory name.
pub(crate) fn step_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// One language's tuning run.
pub(crate) fn tune_dir(loaded: &Loaded, lang: &str) -> PathBuf {
    loaded.out_dir().join("tune").join(lang)
}

/// A tuning run's checkpoints (`<tune dir>/checkpoints`, one `step_name` directory each).
pub(crate) fn checkpoints_dir(tune_dir: &Path) -> PathBuf {
    tune_dir.join("checkpoints")
}

/// A tuning run's importance snapshots (`<tune dir>/snapshots`, one `step_name` directory each).
pub(crate) fn snapshots_dir(tune_dir: &Path) -> PathBuf {
    tune_dir.join("snapshots")
}

/// Hash of what shapes a tune run; a checkpoint from another hash is not resumed.
pub fn tune_hash(loaded: &Loaded) -> String {
    let r = &loaded.recipe;
    let mut v = serde_json::json!({
        "model": r.model, "languages": r.languages, "corpus": r.corpus,
        "train": r.train, "importance": r.importance,
    });
    if r.dtype != crate::model::Dtype::F32 {
        // Only when not the default, so checkpoints made before `dtype` existed still resume.
        v["dtype"] = r.dtype.name().into();
    }
    if r.autocast.effective() != "off" {
        // What runs, not what was asked: AMX and AVX512-BF16 round differently.
        v["autocast"] = r.autocast.effective().into();
    }
    // Neither changes the run's bits: replicates are runs of their own beside it (each with its
    // own seed, so its own hash), and offloaded moments are the resident ones, bit for bit.
    if let Some(t) = v["train"].as_object_mut() {
        t.remove("seeds");
        t.remove("offload_optimizer");
        t.remove("zero");
    }
    crate::util::sha256_bytes(v.to_string().as_bytes())
}

/// The importance request of the recipe for one language.
pub(crate) fn snapshot_request(loaded: &Loaded, lang: &str) -> ScoreRequest {
    let i = &loaded.recipe.importance;
    let mut req = ScoreRequest::new(lang);
    req.tokens = i.tokens;
    req.seq_len = i.seq_len;
    req.batch = i.batch;
    req.micro_batch = i.micro_batch;
    req.keep_blocks = i.keep_blocks;
    req.autocast = loaded.recipe.autocast;
    req.method = i.method;
    req.seed = i.seed;
    req.half = i.half;
    req.devices = loaded.recipe.devices;
    req.folds = i.folds;
    req.folds_k = i.track_k;
    req.agreement = i.agreement;
    req.halves = i.halves;
    req.groups = i.groups;
    req.progress = true;
    req
}

/// The request of a baseline criterion's snapshot: the language's base request scored with
/// `method`, without halves or agreement (a criterion's set needs neither).
pub(crate) fn criterion_request(loaded: &Loaded, lang: &str, method: crate::importance::Method) -> ScoreRequest {
    let mut req = snapshot_request(loaded, lang);
    req.method = method;
    req.halves = false;
    req.agreement = false;
    req.groups = false;
    req.folds = 0;
    req
}

/// A run's evaluation directory (`base`, `tuned-<lang>`).
pub(crate) fn eval_dir(loaded: &Loaded, name: &str) -> PathBuf {
    loaded.out_dir().join("eval").join(name)
}

/// The snapshot at the last step of a language's tuning.
pub(crate) fn final_snapshot(loaded: &Loaded, lang: &str) -> PathBuf {
    snapshots_dir(&tune_dir(loaded, lang)).join(step_name(loaded.recipe.train.steps))
}
