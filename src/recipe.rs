//! Recipes: one TOML file describes a whole study (model, languages, corpora, tuning,
//! importance, spot selection, evaluation). Unknown keys and wrong types are errors that name
//! the key and the line; `--set a.b=v` overrides any key; semantic checks run before any work.

use crate::backend::DeviceKind;
use crate::importance::Method;
use crate::spot::{Aggregation, Control, Eligible, Scope};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Run name; outputs go to `out` (default `runs/<name>`).
    pub name: String,
    /// Model source (see `codespot info`): `default`, an HF dir, `hf:OWNER/NAME`, a .gguf, …
    pub model: String,
    /// Languages to score and tune on (each has a manifest in `corpora/`).
    pub languages: Vec<String>,
    #[serde(default)]
    pub out: Option<PathBuf>,
    #[serde(default = "d_device")]
    pub device: DeviceKind,
    /// Data-parallel devices (GPUs 0..n through burn-collective; on the CPU, n peers share it):
    /// tuning splits each batch over them, snapshots split their batches.
    #[serde(default = "d_devices")]
    pub devices: usize,
    /// Weights held and computed in `f32`, `bf16` or `f16` (Taylor sums, losses and AdamW
    /// moments stay f32).
    #[serde(default)]
    pub dtype: crate::model::Dtype,
    /// `bf16`: matrix products in bf16 with f32 sums around f32 weights (PyTorch's CPU
    /// autocast; AMX or AVX512-BF16, f32 on a CPU with neither), for scoring, tuning and
    /// evaluation on the CPU. `off` (default): f32.
    #[serde(default)]
    pub autocast: crate::model::Autocast,
    #[serde(default)]
    pub corpus: CorpusSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub importance: ImportanceSection,
    #[serde(default)]
    pub spot: SpotSection,
    #[serde(default)]
    pub eval: EvalSection,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CorpusSection {
    /// Build a missing corpus (`codespot corpus build`) with this size cap.
    pub max_mb: f64,
    /// Let corpus building install Debian packages named by manifests.
    pub install: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps (0: no tuning; the run selects and evaluates on the base model only).
    pub steps: usize,
    /// Sequences per micro-step.
    pub batch: usize,
    /// Micro-steps per optimizer step (gradients averaged).
    pub grad_accum: usize,
    /// Sequences per backward pass inside a micro-step (memory knob; same gradient).
    pub micro_batch: usize,
    /// Top blocks whose activations a backward pass keeps instead of recomputing (memory knob).
    pub keep_blocks: usize,
    pub seq_len: usize,
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// `cosine` (to `min_lr_ratio · lr`) or `constant`.
    pub schedule: Schedule,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm (0 = off).
    pub grad_clip: f64,
    pub seed: u64,
    /// Checkpoint (and snapshot) every N steps; the last step always checkpoints.
    pub checkpoint_every: usize,
    /// Checkpoints kept on disk (model + optimizer); snapshots are always kept.
    pub keep_checkpoints: usize,
    /// Held-out tokens per language for the loss at each checkpoint.
    pub heldout_tokens: usize,
    /// Log train scalars every N steps.
    pub log_every: usize,
    /// What the model is tuned on: `pairs` (the research's instruction format: each corpus's
    /// documented functions as (instruction, response) pairs in the model's chat template) or
    /// `raw` (source files packed into blocks, every token in the loss).
    #[serde(skip_serializing_if = "TrainFormat::is_raw")]
    pub format: TrainFormat,
    /// Pairs: put the prompt's tokens in the loss too (default off: the response only, as
    /// torchtune's `train_on_input = False`).
    #[serde(skip_serializing_if = "is_false")]
    pub train_on_input: bool,
    /// Pairs: held-out pairs per language for the held-out pair loss at each checkpoint.
    #[serde(skip_serializing_if = "is_default_heldout_pairs")]
    pub heldout_pairs: usize,
    /// Extra checkpoint (and snapshot) steps besides every `checkpoint_every` (for example
    /// log-spaced, to follow the early steps densely).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checkpoint_at: Vec<usize>,
    /// Tuning-seed replicates: each language is tuned again with each of these seeds (the
    /// training data order), in `tune/<lang>/seed-<s>/`, and at every checkpoint the two
    /// tuned models' spots are compared against the cross-sample null (the tuning-noise level;
    /// needs `importance.folds`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
    /// Hold AdamW's moments in host memory and stream each tensor's to the device around its
    /// update, so the device holds one tensor's optimizer state at a time (the same bits).
    #[serde(skip_serializing_if = "is_false")]
    pub offload_optimizer: bool,
    /// ZeRO stage: 0 (every device holds the whole optimizer state) or 1 (AdamW's state is
    /// sharded over the `devices` data-parallel peers, each updating its shard; the same bits).
    #[serde(skip_serializing_if = "is_zero")]
    pub zero: usize,
}

const DEFAULT_HELDOUT_PAIRS: usize = 64;

fn is_default_heldout_pairs(n: &usize) -> bool {
    *n == DEFAULT_HELDOUT_PAIRS
}

/// What tuning reads (`train.format`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TrainFormat {
    #[default]
    Pairs,
    Raw,
}

impl TrainFormat {
    fn is_raw(&self) -> bool {
        *self == TrainFormat::Raw
    }
}

impl TrainSection {
    /// Whether `step` ends with a checkpoint and a snapshot.
    pub(crate) fn checkpoints_at(&self, step: usize) -> bool {
        step.is_multiple_of(self.checkpoint_every) || step == self.steps || self.checkpoint_at.contains(&step)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Cosine,
    Constant,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ImportanceSection {
    pub method: Method,
    /// Calibration tokens per snapshot.
    pub tokens: usize,
    pub seq_len: usize,
    pub batch: usize,
    pub micro_batch: usize,
    /// Top blocks whose activations a backward pass keeps instead of recomputing (memory knob).
    pub keep_blocks: usize,
    pub seed: u64,
    /// Store scores as f16.
    pub half: bool,
    /// Top-k % whose overlap TensorBoard tracks across checkpoints (per tensor, layers only).
    pub track_k: f64,
    /// Record each snapshot's split-half agreement (noise floor) and convergence: one more copy
    /// of the sums while scoring.
    #[serde(skip_serializing_if = "is_true")]
    pub agreement: bool,
    /// Also write each snapshot's two calibration halves (`half-a/`, `half-b/`): needed by the
    /// `code-minus-code` control, and the language matrix's floors at any k.
    #[serde(skip_serializing_if = "is_false")]
    pub halves: bool,
    /// Also sum group Taylor importance of whole heads and MLP neurons: needed by the
    /// `structured` control.
    #[serde(skip_serializing_if = "is_false")]
    pub groups: bool,
    /// Deal the calibration documents into 2 × `folds` seeded document folds: halves A and B
    /// of random documents, and each checkpoint's spot movement measured against the
    /// cross-sample null with document-bootstrap intervals (`importance::null`). 0 = off.
    #[serde(skip_serializing_if = "is_zero")]
    pub folds: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SpotSection {
    pub aggregation: Aggregation,
    pub scope: Scope,
    pub params: Eligible,
    /// Spot sizes in percent of the eligible parameters.
    pub k: Vec<f64>,
    pub controls: Vec<Control>,
    pub seed: u64,
    /// A corpus of English prose (e.g. "text"): the run scores the base model on it too, for
    /// the `text` and `code-specific` controls. It is not one of the spot's languages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Languages scored (and tuned) but left out of the spot's aggregate, as the research holds
    /// Python out; they keep their `own=` sets and language-matrix rows.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held_out: Vec<String>,
    /// Baseline criteria (`wanda`, `molchanov`, …): the run also scores the base model with
    /// each, and the spot file gets a set per criterion with the spot's count per tensor.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub criteria: Vec<Method>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Task list as for `codespot eval --tasks`.
    pub tasks: Vec<String>,
    /// Items per task (0 = all).
    pub limit: usize,
    pub allow_code_execution: bool,
    pub max_tokens: usize,
    pub max_bpb_tokens: usize,
    pub seed: u64,
    /// Spot sizes evaluated on the base model (empty = every `spot.k`): the dose–response.
    pub k: Vec<f64>,
    /// Spot sizes evaluated on each tuned model (with the tuned spot; empty = intact only).
    pub tuned_k: Vec<f64>,
    /// The one spot size at which the sets that break the spot down are evaluated: each
    /// language's own spot (`own-language`: the transfer matrix) and the arms (`arms`). Other k
    /// evaluate the spot and the remaining controls only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail_k: Option<f64>,
    /// Specificity at matched damage: read every set's curve where this task (prose bits per
    /// byte) has risen by `matched_pct` %.
    pub matched_reference: String,
    pub matched_pct: f64,
}

fn d_devices() -> usize {
    1
}

fn d_device() -> DeviceKind {
    DeviceKind::Cpu
}

impl Default for CorpusSection {
    fn default() -> Self {
        Self {
            max_mb: 8.0,
            install: false,
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 100,
            batch: 4,
            grad_accum: 1,
            micro_batch: 4,
            keep_blocks: crate::model::backprop::DEFAULT_KEEP_BLOCKS,
            seq_len: 256,
            lr: 2e-5,
            warmup: 10,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 1,
            checkpoint_every: 50,
            keep_checkpoints: 1,
            heldout_tokens: 2048,
            log_every: 1,
            format: TrainFormat::Pairs,
            train_on_input: false,
            heldout_pairs: DEFAULT_HELDOUT_PAIRS,
            checkpoint_at: vec![],
            seeds: vec![],
            offload_optimizer: false,
            zero: 0,
        }
    }
}

impl Default for ImportanceSection {
    fn default() -> Self {
        Self {
            method: Method::Taylor,
            tokens: 16384,
            seq_len: 256,
            batch: 4,
            micro_batch: 4,
            keep_blocks: crate::model::backprop::DEFAULT_KEEP_BLOCKS,
            seed: 0,
            half: false,
            track_k: 1.0,
            agreement: true,
            halves: false,
            groups: false,
            folds: 0,
        }
    }
}

impl Default for SpotSection {
    fn default() -> Self {
        Self {
            aggregation: Aggregation::Sum,
            scope: Scope::PerTensor,
            params: Eligible::Layers,
            k: vec![0.5, 1.0, 3.0],
            controls: vec![Control::Random],
            seed: 0,
            text: None,
            held_out: vec![],
            criteria: vec![],
        }
    }
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            tasks: vec![
                "humaneval-bpb".into(),
                "code-bpb".into(),
                "hellaswag".into(),
                "arc-easy".into(),
            ],
            limit: 100,
            allow_code_execution: false,
            max_tokens: 384,
            max_bpb_tokens: 1024,
            seed: 0,
            k: vec![],
            tuned_k: vec![1.0],
            detail_k: None,
            matched_reference: "text-bpb".into(),
            matched_pct: 10.0,
        }
    }
}

/// A recipe read from a file, with where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub recipe: Recipe,
    pub path: PathBuf,
    /// The file's text (for line numbers in semantic errors).
    text: String,
    pub overrides: Vec<String>,
}

impl Loaded {
    /// Output directory of the run.
    pub fn out_dir(&self) -> PathBuf {
        self.recipe
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.recipe.name))
    }

    /// The resolved recipe as TOML.
    pub(crate) fn resolved_toml(&self) -> String {
        toml::to_string_pretty(&self.recipe).expect("a recipe serializes")
    }

    /// Where a key is set: "line N of FILE", or the `--set` that set it.
    fn where_is(&self, key: &str) -> String {
        if let Some(o) = self
            .overrides
            .iter()
            .rev()
            .find(|o| o.split('=').next().map(str::trim) == Some(key))
        {
            return format!("--set {o}");
        }
        match line_of(&self.text, key) {
            Some(l) => format!("{} line {l}", self.path.display()),
            None => format!("{} (default)", self.path.display()),
        }
    }

    fn err(&self, key: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("{}: {key}: {msg}", self.where_is(key))
    }

    /// Semantic checks that need no model load: numbers in range, languages known, model
    /// source parseable (and present when local). The first failing check's error names its
    /// key and where it is set.
    pub fn validate(&self, corpora: &crate::data::Corpora) -> Result<()> {
        self.check_sources(corpora)?;
        self.check_spot()?;
        self.check_sizes()?;
        self.check_train()?;
        self.check_eval()
    }

    /// The name, the languages and prose corpus (known to `corpora`), the model source.
    fn check_sources(&self, corpora: &crate::data::Corpora) -> Result<()> {
        let r = &self.recipe;
        if r.name.trim().is_empty() || r.name.contains('/') {
            return Err(self.err("name", "must be a non-empty name without '/'"));
        }
        if r.languages.is_empty() {
            return Err(self.err("languages", "list at least one language"));
        }
        let known = corpora.languages();
        let wants_text = r
            .spot
            .controls
            .iter()
            .any(|c| matches!(c, Control::Text | Control::CodeSpecific));
        match &r.spot.text {
            None if wants_text => {
                return Err(self.err(
                    "spot.controls",
                    "the text and code-specific controls need spot.text (a prose corpus, e.g. \"text\")",
                ))
            }
            Some(t) if !known.contains(t) => {
                return Err(self.err(
                    "spot.text",
                    format!("unknown corpus '{t}' (manifests in {})", corpora.dir.display()),
                ))
            }
            Some(t) if r.languages.contains(t) => {
                return Err(self.err("spot.text", format!("'{t}' is one of the spot's languages")))
            }
            _ => {}
        }
        for l in &r.languages {
            if !known.contains(l) {
                return Err(self.err(
                    "languages",
                    format!(
                        "unknown language '{l}' (manifests in {}: {})",
                        corpora.dir.display(),
                        known.join(", ")
                    ),
                ));
            }
        }
        if r.model.trim().is_empty() {
            return Err(self.err("model", "missing model source"));
        }
        let src = crate::source::Source::parse(&r.model).map_err(|e| self.err("model", e))?;
        match &src {
            crate::source::Source::HfDir(p) | crate::source::Source::Gguf(p) if !p.exists() => {
                return Err(self.err("model", format!("{} does not exist", p.display())));
            }
            _ => {}
        }
        Ok(())
    }

    /// Held-out languages, baseline criteria and the controls' needs.
    fn check_spot(&self) -> Result<()> {
        let r = &self.recipe;
        let i = &r.importance;
        for h in &r.spot.held_out {
            if !r.languages.contains(h) {
                return Err(self.err(
                    "spot.held_out",
                    format!("'{h}' is not one of languages {:?}", r.languages),
                ));
            }
        }
        if r.spot.held_out.len() >= r.languages.len() {
            return Err(self.err("spot.held_out", "holds out every language: nothing left to aggregate"));
        }
        if r.spot.criteria.contains(&r.importance.method) {
            return Err(self.err(
                "spot.criteria",
                format!(
                    "'{}' is the spot's own method (importance.method)",
                    r.importance.method.name()
                ),
            ));
        }
        if r.spot.controls.contains(&Control::CodeMinusCode) && !i.halves {
            return Err(self.err(
                "spot.controls",
                "the code-minus-code control needs importance.halves = true (two disjoint calibration samples)",
            ));
        }
        if r.spot.controls.contains(&Control::Structured) && !i.groups {
            return Err(self.err(
                "spot.controls",
                "the structured control needs importance.groups = true (group Taylor scores of heads and neurons)",
            ));
        }
        if let Some(k) = r.eval.detail_k {
            if !r
                .spot
                .controls
                .iter()
                .any(|c| matches!(c, Control::OwnLanguage | Control::Arms))
            {
                return Err(self.err(
                    "eval.detail_k",
                    "needs the own-language or arms control in spot.controls",
                ));
            }
            if !r.spot.k.iter().any(|s| (s - k).abs() < 1e-9) {
                return Err(self.err("eval.detail_k", format!("{k} is not among spot.k {:?}", r.spot.k)));
            }
        }
        if !(r.eval.matched_pct.is_finite() && r.eval.matched_pct > 0.0) {
            return Err(self.err("eval.matched_pct", "must be > 0"));
        }
        Ok(())
    }

    /// Counts, batch sizes and sequence lengths, against the devices too.
    fn check_sizes(&self) -> Result<()> {
        let r = &self.recipe;
        let t = &r.train;
        let i = &r.importance;
        let pos = |key: &str, v: usize| -> Result<()> {
            if v == 0 {
                return Err(self.err(key, "must be at least 1"));
            }
            Ok(())
        };
        if t.steps > 0 {
            pos("train.checkpoint_every", t.checkpoint_every)?;
        }
        pos("train.batch", t.batch)?;
        pos("train.grad_accum", t.grad_accum)?;
        pos("train.micro_batch", t.micro_batch)?;
        pos("train.keep_checkpoints", t.keep_checkpoints)?;
        pos("train.log_every", t.log_every)?;
        pos("importance.tokens", i.tokens)?;
        pos("importance.batch", i.batch)?;
        pos("importance.micro_batch", i.micro_batch)?;
        pos("devices", r.devices)?;
        if t.batch < r.devices {
            return Err(self.err(
                "train.batch",
                format!("{} rows cannot be split over devices = {}", t.batch, r.devices),
            ));
        }
        let snapshot_batches = i.tokens.div_ceil(i.seq_len.max(1)).div_ceil(i.batch.max(1));
        if snapshot_batches < r.devices {
            return Err(self.err(
                "devices",
                format!(
                    "{} devices, but a snapshot has only {snapshot_batches} batches (importance.tokens / seq_len / batch)",
                    r.devices
                ),
            ));
        }
        if t.seq_len < 2 {
            return Err(self.err("train.seq_len", "must be at least 2"));
        }
        if i.seq_len < 2 {
            return Err(self.err("importance.seq_len", "must be at least 2"));
        }
        if i.tokens < i.seq_len {
            return Err(self.err(
                "importance.tokens",
                format!("must be at least importance.seq_len ({})", i.seq_len),
            ));
        }
        Ok(())
    }

    /// The optimizer, schedule, checkpoints, replicates and sharding.
    fn check_train(&self) -> Result<()> {
        let r = &self.recipe;
        let t = &r.train;
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(self.err("train.lr", format!("must be > 0 (got {})", t.lr)));
        }
        if t.steps > 0 && t.checkpoint_every > t.steps {
            return Err(self.err(
                "train.checkpoint_every",
                format!(
                    "{} is larger than the run (train.steps = {})",
                    t.checkpoint_every, t.steps
                ),
            ));
        }
        if let Some(&s) = t
            .checkpoint_at
            .iter()
            .find(|&&s| t.steps > 0 && (s == 0 || s > t.steps))
        {
            return Err(self.err(
                "train.checkpoint_at",
                format!("step {s} is outside the run (1 ..= train.steps = {})", t.steps),
            ));
        }
        if let Some(s) = t
            .seeds
            .iter()
            .enumerate()
            .find_map(|(i, s)| (*s == t.seed || t.seeds[..i].contains(s)).then_some(*s))
        {
            return Err(self.err(
                "train.seeds",
                format!("seed {s} repeats train.seed or another replicate's seed"),
            ));
        }
        if t.zero > 1 {
            return Err(self.err(
                "train.zero",
                format!(
                    "stage {} is not built: 0 (off) or 1 (optimizer state sharded over the devices)",
                    t.zero
                ),
            ));
        }
        if t.zero == 1 && self.recipe.devices < 2 {
            return Err(self.err("train.zero", "sharding the optimizer state needs devices ≥ 2"));
        }
        if !t.seeds.is_empty() && self.recipe.importance.folds == 0 {
            return Err(self.err(
                "train.seeds",
                "replicates are compared through the cross-sample null: set importance.folds",
            ));
        }
        if t.format == TrainFormat::Pairs && t.heldout_pairs == 0 {
            return Err(self.err("train.heldout_pairs", "must be positive"));
        }
        if t.steps > 0 && t.warmup > t.steps {
            return Err(self.err(
                "train.warmup",
                format!("{} is longer than the run ({} steps)", t.warmup, t.steps),
            ));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(self.err("train.min_lr_ratio", "must be in [0, 1]"));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(self.err("train.weight_decay", "must be ≥ 0"));
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
            return Err(self.err("train.beta1", "beta1 and beta2 must be in [0, 1)"));
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return Err(self.err("train.eps", "must be > 0"));
        }
        if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
            return Err(self.err("train.grad_clip", "must be ≥ 0 (0 = off)"));
        }
        Ok(())
    }

    /// The spot's k, the evaluation's tasks and k, and the remaining ranges.
    fn check_eval(&self) -> Result<()> {
        let r = &self.recipe;
        let t = &r.train;
        let i = &r.importance;
        if !(i.track_k.is_finite() && i.track_k > 0.0 && i.track_k <= 100.0) {
            return Err(self.err("importance.track_k", "must be in (0, 100]"));
        }
        if !(r.corpus.max_mb.is_finite() && r.corpus.max_mb > 0.0) {
            return Err(self.err("corpus.max_mb", "must be > 0"));
        }
        if r.spot.k.is_empty() || r.spot.k.iter().any(|k| !(*k > 0.0 && *k <= 100.0)) {
            return Err(self.err("spot.k", "list percentages in (0, 100]"));
        }
        self.tasks().map_err(|e| self.err("eval.tasks", e))?;
        // A base-only run (train.steps = 0) has no tuned models, so tuned_k is not read.
        let tuned: &[f64] = if t.steps > 0 { &r.eval.tuned_k } else { &[] };
        for (key, ks) in [("eval.k", &r.eval.k[..]), ("eval.tuned_k", tuned)] {
            if let Some(k) = ks.iter().find(|k| !r.spot.k.iter().any(|s| (*s - **k).abs() < 1e-9)) {
                return Err(self.err(key, format!("{k} is not among spot.k {:?}", r.spot.k)));
            }
        }
        Ok(())
    }

    /// Evaluation tasks, with `code-bpb` and `humaneval-x-bpb` (no language) expanded to one
    /// task per recipe language.
    pub fn tasks(&self) -> Result<Vec<crate::eval::Task>> {
        let mut out = vec![];
        for t in &self.recipe.eval.tasks {
            match t.trim() {
                "code-bpb" => {
                    for l in &self.recipe.languages {
                        out.push(crate::eval::Task::CodeBpb(l.clone()));
                    }
                }
                "humaneval-x-bpb" => {
                    // HumanEval-X names JavaScript `js` and has no C.
                    for l in &self.recipe.languages {
                        let hx = match l.as_str() {
                            "javascript" => "js",
                            "cpp" | "go" | "java" | "python" | "rust" => l.as_str(),
                            _ => continue,
                        };
                        out.push(crate::eval::Task::HumanEvalXBpb(hx.into()));
                    }
                }
                other => out.push(crate::eval::Task::parse(other)?),
            }
        }
        Ok(out)
    }
}

/// Read a recipe, apply `--set KEY=VALUE` overrides, and deserialize strictly.
pub fn load(path: &Path, overrides: &[String]) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading recipe {}", path.display()))?;
    // Strict parse of the file alone first: serde errors then carry the file's line and column.
    let _: Recipe =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim()))?;
    let mut value: toml::Table = toml::from_str(&text).expect("parsed above");
    for o in overrides {
        apply_override(&mut value, o).with_context(|| format!("--set {o}"))?;
    }
    let recipe: Recipe = Recipe::deserialize(toml::Value::Table(value)).map_err(|e| {
        anyhow::anyhow!(
            "{} with --set {}: {}",
            path.display(),
            overrides.join(" --set "),
            e.to_string().trim()
        )
    })?;
    Ok(Loaded {
        recipe,
        path: path.to_path_buf(),
        text,
        overrides: overrides.to_vec(),
    })
}

/// Set `a.b.c = value` in a table; the value is parsed as TOML (`2e-5`, `true`, `["x"]`), or
/// taken as a string when it does not parse (`model=hf:owner/name`).
fn apply_override(t: &mut toml::Table, o: &str) -> Result<()> {
    let (key, raw) = o.split_once('=').context("expected KEY=VALUE")?;
    let key = key.trim();
    let raw = raw.trim();
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut tt) => tt.remove("v").expect("v"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("bad key '{key}'");
    }
    let mut cur = t;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        cur = entry
            .as_table_mut()
            .with_context(|| format!("'{p}' in '{key}' is not a table"))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// The 1-based line where dotted `key` is assigned (top-level keys before any table header,
/// `[section]` then `key =`, or a `section.key =` dotted assignment).
pub(crate) fn line_of(text: &str, key: &str) -> Option<usize> {
    let (section, leaf) = match key.rsplit_once('.') {
        Some((s, l)) => (s, l),
        None => ("", key),
    };
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') && !l.starts_with("[[") {
            current = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            continue;
        }
        let Some((k, _)) = l.split_once('=') else { continue };
        let k = k.trim().trim_matches('"');
        let full = if current.is_empty() {
            k.to_string()
        } else {
            format!("{current}.{k}")
        };
        if full == key || (current == section && k == leaf) {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_of_finds_sections_and_dotted_keys() {
        let t = "name = \"x\"\n\n[train]\nsteps = 3\nlr = 1\n[importance]\ntokens = 5\n";
        assert_eq!(line_of(t, "name"), Some(1));
        assert_eq!(line_of(t, "train.lr"), Some(5));
        assert_eq!(line_of(t, "importance.tokens"), Some(7));
        assert_eq!(line_of(t, "train.tokens"), None);
        assert_eq!(line_of("train.lr = 3\n", "train.lr"), Some(1));
    }

    #[test]
    fn overrides_parse_values_and_create_tables() {
        let mut t: toml::Table = toml::from_str("[train]\nlr = 1.0\n").unwrap();
        apply_override(&mut t, "train.lr=2e-5").unwrap();
        apply_override(&mut t, "model=hf:a/b").unwrap();
        apply_override(&mut t, "languages=[\"rust\"]").unwrap();
        apply_override(&mut t, "spot.k=[1, 2]").unwrap();
        assert_eq!(t["train"]["lr"].as_float(), Some(2e-5));
        assert_eq!(t["model"].as_str(), Some("hf:a/b"));
        assert_eq!(t["languages"].as_array().unwrap().len(), 1);
        assert_eq!(t["spot"]["k"].as_array().unwrap().len(), 2);
        assert!(apply_override(&mut t, "train.lr.x=1").is_err());
        assert!(apply_override(&mut t, "novalue").is_err());
    }
}
