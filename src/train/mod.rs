//! Per-language fine-tuning (full, AdamW) with an importance snapshot at the base model and at
//! every checkpoint, held-out loss on every recipe language, and TensorBoard logging.
//!
//! A run lives in `<out>/tune/<lang>/`:
//! - `checkpoints/step-NNNNNN/`: an HF model directory (loadable as a model source) plus
//!   `optimizer/adamw.safetensors` and `train_state.json` (step, data position, histories);
//! - `snapshots/step-NNNNNN/`: importance snapshots (step 0 = the base model);
//! - `tb/`: TensorBoard events; `tune.json`: the finished run's summary.
//!
//! Randomness: the only random draw is the order of training blocks, a permutation per epoch
//! seeded by (`train.seed`, epoch); the data position (blocks consumed) fixes it, so a resumed
//! run sees exactly the batches an uninterrupted one would.

pub mod adamw;
pub mod learner;
pub mod metrics;
pub mod pairs;
pub mod reference;
pub mod seeds;

use crate::importance::{self, snapshot};
use crate::layout::{step_name, tune_dir, tune_hash};
use crate::model::{self, Checkpoint, Llama};
use crate::recipe::{Loaded, Schedule, TrainSection};
use crate::track::{self, Tb};
use adamw::{AdamW, AdamWConfig, Sharded};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeldoutLog {
    pub step: usize,
    /// Language → mean next-token loss (nats) on its held-out split.
    pub loss: BTreeMap<String, f64>,
    /// Language → mean loss (nats) on the response tokens of its held-out pairs, with a
    /// bootstrap interval over pairs (`train.format = "pairs"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pair_loss: BTreeMap<String, pairs::PairLoss>,
    /// Language → each held-out pair's (Σ nll, counted tokens): what the paired change of a
    /// later checkpoint against this one is resampled from (kept at step 0).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pair_items: BTreeMap<String, Vec<(f64, f64)>>,
}

/// Where the run is: saved in every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub format: u32,
    pub language: String,
    pub step: usize,
    pub tokens_seen: usize,
    /// Training blocks consumed (the data position).
    pub blocks_consumed: usize,
    /// Distinct training blocks (an epoch).
    pub blocks_per_epoch: usize,
    pub seed: u64,
    /// Hash of the recipe parts that shape training (model, languages, corpus, train, importance).
    pub tune_hash: String,
    pub base_model_sha256: String,
    pub history: Vec<StepLog>,
    pub heldout: Vec<HeldoutLog>,
    pub elapsed_s: f64,
}

/// The finished run (`tune.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TuneSummary {
    pub language: String,
    pub steps: usize,
    pub tokens: usize,
    pub tune_hash: String,
    pub final_checkpoint: PathBuf,
    pub snapshots: Vec<PathBuf>,
    pub first_loss: f64,
    pub last_loss: f64,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
    pub history: Vec<StepLog>,
    pub heldout: Vec<HeldoutLog>,
    pub metrics: Vec<track::SnapshotMetrics>,
}

#[derive(Debug, Clone)]
pub struct TuneOptions {
    pub lang: String,
    pub resume: bool,
    /// Delete an existing run of this language first.
    pub force: bool,
    pub progress: bool,
    /// Take the run directory's lock (shared: tunes of other languages may run beside) and
    /// this language's (exclusive). `codespot run` holds the run's lock itself and passes false.
    pub lock: bool,
}

/// Whether the run in `dir` has a checkpoint made with tune hash `hash` (so `--resume` can
/// continue it).
pub(crate) fn resumable(dir: &Path, hash: &str) -> bool {
    let ck = crate::layout::checkpoints_dir(dir);
    steps_in(&ck)
        .into_iter()
        .rev()
        .any(|s| read_state(&ck.join(step_name(s))).is_ok_and(|st| st.tune_hash == hash))
}

/// A checkpoint's `train_state.json`, checked: its histories must not run past its step.
pub fn read_state(checkpoint: &Path) -> Result<TrainState> {
    let p = checkpoint.join("train_state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let st: TrainState = serde_json::from_str(&text).with_context(|| format!("{}: invalid", p.display()))?;
    if st.history.iter().any(|h| h.step > st.step) || st.heldout.iter().any(|h| h.step > st.step) {
        bail!(
            "{}: field 'history' or 'heldout' has steps after 'step' ({})",
            p.display(),
            st.step
        );
    }
    if st.blocks_per_epoch == 0 && st.step > 0 {
        bail!("{}: field 'blocks_per_epoch' is 0 at step {}", p.display(), st.step);
    }
    Ok(st)
}

/// Steps present under `dir` as `step-NNNNNN` entries, ascending.
pub fn steps_in(dir: &Path) -> Vec<usize> {
    let mut v: Vec<usize> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// The learning rate at `step` (1-based): linear warm-up, then cosine to `min_lr_ratio · lr`
/// (or constant).
pub(crate) fn lr_at(t: &TrainSection, step: usize) -> f64 {
    if t.warmup > 0 && step <= t.warmup {
        return t.lr * step as f64 / t.warmup as f64;
    }
    match t.schedule {
        Schedule::Constant => t.lr,
        Schedule::Cosine => {
            let span = (t.steps - t.warmup).max(1) as f64;
            let p = ((step - t.warmup) as f64 / span).clamp(0.0, 1.0);
            let min = t.lr * t.min_lr_ratio;
            min + (t.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
    }
}

/// What tuning reads: raw-code blocks, or rendered instruction pairs.
enum TrainData {
    Blocks(Vec<Vec<u32>>, BlockOrder),
    Pairs {
        examples: Vec<Vec<u32>>,
        order: pairs::PairOrder,
        pad: u32,
    },
}

impl TrainData {
    /// Units of an epoch (blocks or pairs).
    fn len(&self) -> usize {
        match self {
            TrainData::Blocks(b, _) => b.len(),
            TrainData::Pairs { examples, .. } => examples.len(),
        }
    }

    /// The `batch` rows at data position `*pos` (advanced), and the positions they predict
    /// that are not padding.
    fn rows(&mut self, pos: &mut usize, batch: usize) -> (Vec<Vec<u32>>, usize) {
        let mut take = |next: &mut dyn FnMut(usize) -> Vec<u32>| -> Vec<Vec<u32>> {
            (0..batch)
                .map(|_| {
                    *pos += 1;
                    next(*pos - 1)
                })
                .collect()
        };
        let rows = match self {
            TrainData::Blocks(blocks, order) => take(&mut |p| blocks[order.block(p)].clone()),
            TrainData::Pairs { examples, order, .. } => take(&mut |p| examples[order.example(p)].clone()),
        };
        let n = rows.iter().map(|r| r.len() - 1).sum();
        match self {
            TrainData::Pairs { pad, .. } => (pairs::pad(rows, *pad), n),
            TrainData::Blocks(..) => (rows, n),
        }
    }
}

/// The tuning data of `lang` as `train.format` says; `eos` pads pairs and separates blocks.
fn train_data(
    loaded: &Loaded,
    corpora: &crate::data::Corpora,
    ck: &Checkpoint,
    lang: &str,
    eos: Option<u32>,
) -> Result<TrainData> {
    let t = &loaded.recipe.train;
    match t.format {
        crate::recipe::TrainFormat::Raw => {
            // As many blocks as the steps need, fewer when the split is smaller (epochs).
            let needed = t.steps * t.grad_accum * t.batch;
            let (docs, what) = crate::data::split_docs(corpora, lang, crate::data::Split::Train, t.seed)?;
            let (blocks, _) =
                crate::data::token_blocks_at_most(docs.into_iter().map(Ok), &ck.tokenizer, eos, t.seq_len + 1, needed)?;
            if blocks.len() < t.batch {
                bail!(
                    "{what} holds {} blocks of {} tokens; train.batch needs {}",
                    blocks.len(),
                    t.seq_len + 1,
                    t.batch
                );
            }
            let order = BlockOrder {
                n: blocks.len(),
                seed: t.seed,
                epoch: None,
            };
            Ok(TrainData::Blocks(blocks, order))
        }
        crate::recipe::TrainFormat::Pairs => {
            let ps = crate::data::read_pairs(corpora, lang, crate::data::Split::Train).with_context(|| {
                format!(
                    "{}: train.format = \"pairs\" needs corpus '{lang}''s instruction pairs (or set train.format = \"raw\")",
                    loaded.path.display()
                )
            })?;
            let (examples, long) = pairs::examples(&ck.tokenizer, &ps, t.seq_len + 1, t.train_on_input)?;
            if examples.len() < t.batch {
                bail!(
                    "corpus '{lang}': {} instruction pairs fit in train.seq_len + 1 = {} tokens ({long} longer); train.batch needs {}",
                    examples.len(),
                    t.seq_len + 1,
                    t.batch
                );
            }
            let pad = eos.context("pairs need a pad token: the model has no end-of-sequence token")?;
            let order = pairs::PairOrder::new(examples.iter().map(Vec::len).collect(), t.batch, t.seed);
            Ok(TrainData::Pairs { examples, order, pad })
        }
    }
}

/// Held-out pairs of every recipe language that has them (the response tokens only in the
/// loss, whatever `train.train_on_input` says), at most `train.heldout_pairs` each, a seeded
/// sample; empty unless `train.format = "pairs"`.
fn heldout_pairs(
    loaded: &Loaded,
    corpora: &crate::data::Corpora,
    ck: &Checkpoint,
) -> Result<BTreeMap<String, Vec<Vec<u32>>>> {
    let t = &loaded.recipe.train;
    let mut out = BTreeMap::new();
    if t.format != crate::recipe::TrainFormat::Pairs {
        return Ok(out);
    }
    for lang in &loaded.recipe.languages {
        // A language without held-out pairs (no scanner, or a corpus built without them) has
        // none to report; a pairs file that is there but unreadable is an error.
        let file = corpora
            .build_dir(lang)
            .join(crate::data::pairs_file(crate::data::Split::Heldout));
        if !file.is_file() {
            continue;
        }
        let ps = crate::data::read_pairs(corpora, lang, crate::data::Split::Heldout)?;
        let (ex, _) = pairs::examples(&ck.tokenizer, &ps, t.seq_len + 1, false)?;
        let keep = crate::eval::sample_indices(ex.len(), Some(t.heldout_pairs), 0);
        if !keep.is_empty() {
            out.insert(lang.clone(), keep.into_iter().map(|i| ex[i].clone()).collect());
        }
    }
    Ok(out)
}

/// Deterministic order of training blocks: a permutation per epoch, seeded by (seed, epoch).
struct BlockOrder {
    n: usize,
    seed: u64,
    epoch: Option<(usize, Vec<u32>)>,
}

impl BlockOrder {
    fn block(&mut self, global: usize) -> usize {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let (e, i) = (global / self.n, global % self.n);
        if self.epoch.as_ref().map(|x| x.0) != Some(e) {
            let mut p: Vec<u32> = (0..self.n as u32).collect();
            let s = self.seed ^ (e as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            p.shuffle(&mut rand::rngs::StdRng::seed_from_u64(s));
            self.epoch = Some((e, p));
        }
        self.epoch.as_ref().unwrap().1[i] as usize
    }
}

/// Make sure every language's corpus is built (building missing ones as the recipe says).
pub(crate) fn ensure_corpora(loaded: &Loaded, corpora: &crate::data::Corpora, ck: &Checkpoint) -> Result<()> {
    // The spot's languages, the prose corpus of the text controls, and the one `text-bpb` reads.
    let r = &loaded.recipe;
    // Then the corpora that the recipe's `text-bpb[:CORPUS]` and `code-bpb[:LANG]` read, each once.
    let mut needed: Vec<String> = r.languages.iter().chain(&r.spot.text).cloned().collect();
    for t in loaded.tasks()? {
        if let crate::eval::Task::TextBpb(c) | crate::eval::Task::CodeBpb(c) = t {
            if !needed.contains(&c) {
                needed.push(c);
            }
        }
    }
    let pairs = r.train.steps > 0 && r.train.format == crate::recipe::TrainFormat::Pairs;
    for lang in &needed {
        // A corpus built before held-out pairs existed is built again (the same files).
        let stale = pairs
            && r.languages.contains(lang)
            && corpora.stats(lang).is_some_and(|s| s.heldout_pairs.is_none())
            && corpora
                .manifest(lang)
                .is_ok_and(|m| crate::pairs::supported(m.pairs.as_deref().unwrap_or(lang)));
        if stale {
            eprintln!("corpus '{lang}' has no held-out instruction pairs: building it again");
        }
        if stale || corpora.stats(lang).is_none() {
            eprintln!(
                "corpus '{lang}' is not built: building it (corpus.max_mb = {})",
                loaded.recipe.corpus.max_mb
            );
            crate::data::build(
                corpora,
                lang,
                loaded.recipe.corpus.max_mb,
                &ck.tokenizer,
                &loaded.recipe.model,
                loaded.recipe.corpus.install,
            )?;
        }
    }
    Ok(())
}

/// Mean next-token loss over `blocks` (forward only), in batches of `batch`.
pub(crate) fn mean_loss<B: Backend>(m: &Llama<B>, blocks: &[Vec<u32>], batch: usize) -> f64 {
    use burn::tensor::ElementConversion;
    let device = m.embed.val().device();
    let mut sum = 0.0;
    let mut n = 0usize;
    for chunk in blocks.chunks(batch.max(1)) {
        let l = m
            .loss(model::tokens_tensor::<B>(chunk, &device))
            .into_scalar()
            .elem::<f64>();
        sum += l * chunk.len() as f64;
        n += chunk.len();
    }
    sum / n.max(1) as f64
}

/// Held-out blocks of every language (at most `heldout_tokens` each).
fn heldout_blocks(
    loaded: &Loaded,
    corpora: &crate::data::Corpora,
    ck: &Checkpoint,
    eos: Option<u32>,
) -> Result<BTreeMap<String, Vec<Vec<u32>>>> {
    let t = &loaded.recipe.train;
    let mut out = BTreeMap::new();
    for lang in &loaded.recipe.languages {
        let (docs, what) = crate::data::split_docs(corpora, lang, crate::data::Split::Heldout, 0)?;
        let n = t.heldout_tokens.div_ceil(t.seq_len).max(1);
        let (b, _) = crate::data::token_blocks_at_most(docs.into_iter().map(Ok), &ck.tokenizer, eos, t.seq_len + 1, n)?;
        if b.is_empty() {
            bail!("{what} is too small for one block of {} tokens", t.seq_len + 1);
        }
        out.insert(lang.clone(), b);
    }
    Ok(out)
}

/// Test hook: abort the process (as a kill would) right after the checkpoint at this step.
const ABORT_ENV: &str = "CODESPOT_ABORT_AFTER_CHECKPOINT";

/// Run (or resume) the tuning of one language. Returns the summary written to `tune.json`.
pub fn tune<B: Backend>(
    loaded: &Loaded,
    corpora: &crate::data::Corpora,
    opts: &TuneOptions,
    device: &B::Device,
) -> Result<TuneSummary> {
    let r = &loaded.recipe;
    let t = &r.train;
    let lang = opts.lang.as_str();
    if t.steps == 0 {
        bail!("{}: train.steps = 0: this recipe tunes nothing", loaded.path.display());
    }
    if !r.languages.iter().any(|l| l == lang) {
        bail!(
            "--lang {lang}: not in the recipe's languages ({}) of {}",
            r.languages.join(", "),
            loaded.path.display()
        );
    }
    loaded.validate(corpora)?;
    let dir = tune_dir(loaded, lang);
    let _locks = if opts.lock {
        let out = loaded.out_dir();
        Some((
            crate::util::DirLock::shared(&crate::util::run_lock_path(&out), &out)?,
            crate::util::DirLock::exclusive(&crate::util::output_lock_path(&dir), &dir)?,
        ))
    } else {
        None
    };
    let summary = tune_run::<B>(loaded, corpora, opts, device, &dir)?;
    if !t.seeds.is_empty() {
        seeds::replicates::<B>(loaded, corpora, opts, device, &dir)?;
    }
    Ok(summary)
}

/// One tuning run of `opts.lang` in `dir` (the caller holds the locks).
fn tune_run<B: Backend>(
    loaded: &Loaded,
    corpora: &crate::data::Corpora,
    opts: &TuneOptions,
    device: &B::Device,
    dir: &Path,
) -> Result<TuneSummary> {
    let r = &loaded.recipe;
    let t = &r.train;
    let lang = opts.lang.as_str();
    let dir = dir.to_path_buf();
    let ckpt_dir = crate::layout::checkpoints_dir(&dir);
    let snap_dir = crate::layout::snapshots_dir(&dir);
    let hash = tune_hash(loaded);
    if dir.exists() && !opts.resume {
        if !opts.force {
            bail!(
                "{}: a tune run exists; use --resume to continue it or --force to start over",
                dir.display()
            );
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    // Only a checkpoint with a readable state counts (an interrupted write leaves a temp dir).
    let latest = steps_in(&ckpt_dir)
        .into_iter()
        .rev()
        .find(|s| ckpt_dir.join(step_name(*s)).join("train_state.json").is_file());

    let mut ck = model::load(&r.model)?;
    ensure_corpora(loaded, corpora, &ck)?;
    let base_sha = model::load::source_hash(&ck.location)?;
    let eos = ck.tokenizer.stop_ids(&ck.config.eos_token_ids).first().copied();

    let data = train_data(loaded, corpora, &ck, lang, eos)?;
    let heldout = heldout_blocks(loaded, corpora, &ck, eos)?;
    let held_pairs = heldout_pairs(loaded, corpora, &ck)?;

    // The model takes the base weights over (a resumed run reads its own instead).
    // ZeRO stage 1: the optimizer state sharded over the data-parallel peers' devices.
    let shard_devices = if t.zero > 0 {
        crate::collective::peer_devices::<B>(r.devices)
    } else {
        vec![]
    };
    let base_weights = std::mem::take(&mut ck.weights);
    let start = Start {
        loaded,
        config: &ck.config,
        lang,
        hash: &hash,
        base_sha: &base_sha,
        blocks: data.len(),
        progress: opts.progress,
    };
    let (model, opt, mut state) = match latest {
        Some(step) => {
            drop(base_weights);
            start.resume::<B>(&ckpt_dir.join(step_name(step)), &shard_devices, device)?
        }
        None => start.fresh::<B>(base_weights, &shard_devices, device)?,
    };
    if state.blocks_per_epoch != data.len() {
        bail!(
            "corpus '{lang}': {} training blocks or pairs now, {} when the run started (the corpus changed); use --force to start over",
            data.len(),
            state.blocks_per_epoch
        );
    }
    std::fs::create_dir_all(&snap_dir).with_context(|| format!("creating {}", snap_dir.display()))?;
    let mut tb = reopen_tb(&dir, &state, t)?;

    let ctx = SnapCtx {
        loaded,
        ck: &ck,
        corpora,
        lang,
        snap_dir: &snap_dir,
        base_sha: &base_sha,
        progress: opts.progress,
    };
    let pad = eos.unwrap_or(0);
    let sets = heldout_sets(heldout, held_pairs, t.batch, pad);
    if state.step == 0 {
        use burn::module::AutodiffModule;
        let h = learner::heldout_log(0, learner::evaluate(&model.valid(), &sets), None);
        log_heldout(&mut tb, &h)?;
        state.heldout.push(h);
    }
    // The snapshot of the current step (base or the resumed checkpoint) if it is missing; a
    // checkpoint written at an interruption has none.
    if state.step == 0 || t.checkpoints_at(state.step) {
        ctx.ensure_snapshot(&model, state.step, &mut tb)?;
    }

    // Data-parallel peers (burn-collective); the first is the model's own device.
    let devices = crate::collective::peer_devices::<crate::backend::Ad<B>>(r.devices);
    let elapsed_before = state.elapsed_s;
    let session = learner::Session {
        loaded: loaded.clone(),
        corpora: corpora.clone(),
        ck,
        lang: lang.into(),
        dir: dir.clone(),
        base_sha: base_sha.clone(),
        lines: true,
        progress: opts.progress,
        tb,
        state,
        elapsed_before,
        started: std::time::Instant::now(),
        error: None,
        interrupted: false,
    };
    let (session, tuned) = learner::run(session, model, opt, data, sets, devices)?;
    drop(tuned);
    let learner::Session {
        mut state,
        tb,
        error,
        interrupted,
        started,
        elapsed_before,
        ..
    } = session;
    if let Some(e) = error {
        // The run's error is what to report, not a failure to close the events file after it.
        let _ = tb.close();
        return Err(e);
    }
    if interrupted {
        tb.close()?;
        bail!(
            "tune {lang}: interrupted at step {} (checkpoint written); `--resume` continues",
            state.step
        );
    }
    state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();

    let summary = summarize(lang, t, &state, hash, &ckpt_dir, &snap_dir);
    crate::util::write_atomic(
        &dir.join("tune.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    tb.close()?;
    Ok(summary)
}

/// What a tuning run starts from: the newest checkpoint of its recipe, or the base weights.
struct Start<'a> {
    loaded: &'a Loaded,
    config: &'a model::LlamaConfig,
    lang: &'a str,
    hash: &'a str,
    base_sha: &'a str,
    /// Training blocks (or pairs) per epoch.
    blocks: usize,
    progress: bool,
}

type Started<B> = (Llama<crate::backend::Ad<B>>, Sharded<B>, TrainState);

impl Start<'_> {
    /// The model, optimizer and state of checkpoint `d`, refused when another recipe made it
    /// or its optimizer disagrees with its state.
    fn resume<B: Backend>(&self, d: &Path, shard_devices: &[B::Device], device: &B::Device) -> Result<Started<B>> {
        let (r, t, lang, hash) = (&self.loaded.recipe, &self.loaded.recipe.train, self.lang, self.hash);
        let acfg = AdamWConfig::from(t);
        let st = read_state(d)?;
        if st.tune_hash != hash {
            bail!(
                "{}: the checkpoint was made with a different recipe (model, languages, corpus, train or importance changed); use --force to start over",
                d.display()
            );
        }
        let w = crate::source::weights::from_safetensors(&[d.join("model.safetensors")])?;
        let mut m = Llama::<crate::backend::Ad<B>>::from_weights_owned(self.config, w, device, r.dtype)
            .with_context(|| format!("{}: model.safetensors", d.display()))?;
        m.keep_blocks = t.keep_blocks;
        m.set_autocast(r.autocast)?;
        // Only the header is read now: the moments stay in the file until the first step,
        // so the snapshot below runs without them.
        let mut o = Sharded::resume(acfg, &m, &d.join("optimizer"), shard_devices)?;
        o.set_offload(t.offload_optimizer);
        if o.t() != st.step {
            bail!(
                "{}: the optimizer has made {} updates, train_state.json says step {}",
                d.display(),
                o.t(),
                st.step
            );
        }
        if self.progress {
            eprintln!("resuming {lang} from {} (step {})", d.display(), st.step);
        }
        Ok((m, o, st))
    }

    /// The base model, a fresh optimizer and the state of step 0.
    fn fresh<B: Backend>(
        &self,
        base: crate::source::Weights,
        shard_devices: &[B::Device],
        device: &B::Device,
    ) -> Result<Started<B>> {
        let (r, t) = (&self.loaded.recipe, &self.loaded.recipe.train);
        let acfg = AdamWConfig::from(t);
        let mut m = Llama::<crate::backend::Ad<B>>::from_weights_owned(self.config, base, device, r.dtype)?;
        m.keep_blocks = t.keep_blocks;
        m.set_autocast(r.autocast)?;
        let mut o = Sharded::new(acfg, &m, shard_devices);
        o.set_offload(t.offload_optimizer);
        let st = TrainState {
            format: 1,
            language: self.lang.into(),
            step: 0,
            tokens_seen: 0,
            blocks_consumed: 0,
            blocks_per_epoch: self.blocks,
            seed: t.seed,
            tune_hash: self.hash.into(),
            base_model_sha256: self.base_sha.into(),
            history: vec![],
            heldout: vec![],
            elapsed_s: 0.0,
        };
        Ok((m, o, st))
    }
}

/// The run's TensorBoard log, reopened at `state.step`. TensorBoard forgets whatever an earlier
/// process logged at this step or later (a process killed after its last checkpoint); what
/// belongs to this step is logged again here and by `ensure_snapshot`.
fn reopen_tb(dir: &Path, state: &TrainState, t: &TrainSection) -> Result<Tb> {
    let mut tb = Tb::open(&dir.join("tb"))?;
    tb.restart(state.step)?;
    if state.step > 0 {
        if let Some(log) = state.history.iter().find(|h| h.step == state.step) {
            if state.step.is_multiple_of(t.log_every) || state.step == t.steps {
                log_train(&mut tb, log)?;
            }
        }
        if let Some(h) = state.heldout.iter().find(|h| h.step == state.step) {
            log_heldout(&mut tb, h)?;
        }
    }
    Ok(tb)
}

/// The run's summary (`tune.json`) from its final state and the snapshots on disk.
fn summarize(
    lang: &str,
    t: &TrainSection,
    state: &TrainState,
    hash: String,
    ckpt_dir: &Path,
    snap_dir: &Path,
) -> TuneSummary {
    let steps_done = steps_in(snap_dir);
    let metrics = steps_done
        .iter()
        .filter_map(|s| read_metrics(&snap_dir.join(step_name(*s))))
        .collect();
    let final_ck = ckpt_dir.join(step_name(t.steps));
    TuneSummary {
        language: lang.into(),
        steps: t.steps,
        tokens: state.tokens_seen,
        tune_hash: hash,
        final_checkpoint: final_ck,
        snapshots: steps_done.iter().map(|s| snap_dir.join(step_name(*s))).collect(),
        first_loss: state.history.first().map_or(f64::NAN, |h| h.loss),
        last_loss: state.history.last().map_or(f64::NAN, |h| h.loss),
        elapsed_s: state.elapsed_s,
        tokens_per_s: state.history.iter().map(|h| h.tokens_per_s).sum::<f64>() / state.history.len().max(1) as f64,
        history: state.history.clone(),
        heldout: state.heldout.clone(),
        metrics,
    }
}

/// The held-out sets the validation epochs evaluate: each language's raw code, then its pairs.
fn heldout_sets(
    heldout: BTreeMap<String, Vec<Vec<u32>>>,
    held_pairs: BTreeMap<String, Vec<Vec<u32>>>,
    batch: usize,
    pad: u32,
) -> Vec<learner::HeldoutBatch> {
    let set = |lang: String, rows, pairs| learner::HeldoutBatch {
        lang,
        pairs,
        rows: std::sync::Arc::new(rows),
        batch,
        pad,
    };
    let mut v: Vec<_> = heldout.into_iter().map(|(l, r)| set(l, r, false)).collect();
    v.extend(held_pairs.into_iter().map(|(l, r)| set(l, r, true)));
    v
}

fn log_train(tb: &mut Tb, log: &StepLog) -> Result<()> {
    tb.scalar("train/loss", log.loss, log.step)?;
    tb.scalar("train/lr", log.lr, log.step)?;
    tb.scalar("train/grad_norm", log.grad_norm, log.step)?;
    tb.scalar("train/tokens_per_s", log.tokens_per_s, log.step)
}

fn log_heldout(tb: &mut Tb, h: &HeldoutLog) -> Result<()> {
    for (l, v) in &h.loss {
        tb.scalar(&format!("heldout_loss/{l}"), *v, h.step)?;
    }
    for (l, p) in &h.pair_loss {
        tb.scalar(&format!("heldout_pair_loss/{l}"), p.mean, h.step)?;
    }
    Ok(())
}

fn write_checkpoint<AB: AutodiffBackend>(
    out: &Path,
    ck: &Checkpoint,
    model: &Llama<AB>,
    opt: &Sharded<AB::InnerBackend>,
    state: &TrainState,
) -> Result<()> {
    crate::util::write_dir_atomic(out, true, |tmp| {
        // Every tensor is copied off the model or the optimizer only when its file reaches it.
        let mut weights = model.lazy_weights();
        model::export::write_hf_files_with(&ck.config, &ck.tokenizer, tmp, |name| weights.remove(name))?;
        let od = tmp.join("optimizer");
        std::fs::create_dir_all(&od)?;
        opt.save(&od)?;
        std::fs::write(tmp.join("train_state.json"), serde_json::to_string_pretty(state)?)?;
        Ok(())
    })
}

/// Keep the newest `keep` checkpoints.
fn prune_checkpoints(dir: &Path, keep: usize) -> Result<()> {
    let steps = steps_in(dir);
    if steps.len() > keep {
        for s in &steps[..steps.len() - keep] {
            let p = dir.join(step_name(*s));
            std::fs::remove_dir_all(&p).with_context(|| format!("removing old checkpoint {}", p.display()))?;
        }
    }
    Ok(())
}

/// Copy (hard-link when possible) the files of `from` into a new directory `to`, atomically.
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    crate::util::write_dir_atomic(to, true, |tmp| {
        for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
            let e = e?;
            if e.file_type()?.is_file() {
                let dst = tmp.join(e.file_name());
                if std::fs::hard_link(e.path(), &dst).is_err() {
                    std::fs::copy(e.path(), &dst).with_context(|| format!("copying {}", e.path().display()))?;
                }
            }
        }
        Ok(())
    })
}

fn read_metrics(snap: &Path) -> Option<track::SnapshotMetrics> {
    serde_json::from_str(&std::fs::read_to_string(snap.join("track.json")).ok()?).ok()
}

/// What snapshots at checkpoints need.
struct SnapCtx<'a> {
    loaded: &'a Loaded,
    ck: &'a Checkpoint,
    corpora: &'a crate::data::Corpora,
    lang: &'a str,
    snap_dir: &'a Path,
    base_sha: &'a str,
    progress: bool,
}

impl SnapCtx<'_> {
    /// Take the importance snapshot at `step` unless it exists, compare it with the base and
    /// the previous snapshot (`track.json` beside it), and log both to TensorBoard.
    fn ensure_snapshot<AB: AutodiffBackend>(&self, model: &Llama<AB>, step: usize, tb: &mut Tb) -> Result<()> {
        let i = &self.loaded.recipe.importance;
        let out = self.snap_dir.join(step_name(step));
        let track_path = out.join("track.json");
        if track_path.is_file() {
            // Done before a restart: log it again (the restart told TensorBoard to drop this
            // step's events, which may or may not have been written).
            let text =
                std::fs::read_to_string(&track_path).with_context(|| format!("reading {}", track_path.display()))?;
            let m: track::SnapshotMetrics =
                serde_json::from_str(&text).with_context(|| format!("{}: invalid", track_path.display()))?;
            return track::log_snapshot(tb, &m, &snapshot::read(&out)?);
        }
        if step == 0 && !out.join("manifest.json").is_file() {
            // `codespot run` scored the base model on this language already: reuse it.
            let plan = crate::layout::Plan::new(self.loaded);
            if let Some((_, dir, h)) = plan.base_snap.iter().find(|x| x.0 == self.lang) {
                if crate::layout::stage_done(dir, h) {
                    copy_files(dir, &out)?;
                }
            }
        }
        if !out.join("manifest.json").is_file() {
            let mut req = crate::layout::snapshot_request(self.loaded, self.lang);
            req.step = Some(step);
            req.progress = self.progress;
            if step > 0 {
                req.model_label = Some((
                    format!("{} tuned on {} to step {step}", self.loaded.recipe.model, self.lang),
                    crate::util::sha256_bytes(
                        format!("{}:{}:{step}", self.base_sha, tune_hash(self.loaded)).as_bytes(),
                    ),
                ));
            }
            importance::run::score_snapshot(model, self.ck, self.corpora, &req, &out, true)?;
        }
        let cur = snapshot::read(&out)?;
        let base_dir = self.snap_dir.join(step_name(0));
        let prev_step = steps_in(self.snap_dir).into_iter().filter(|s| *s < step).max();
        let base = if step == 0 {
            None
        } else {
            Some(snapshot::read(&base_dir)?)
        };
        let prev = match prev_step {
            Some(p) if p != 0 => Some(snapshot::read(&self.snap_dir.join(step_name(p)))?),
            _ => None,
        };
        let base_ref = base.as_ref().unwrap_or(&cur);
        let prev_ref = if prev_step == Some(0) {
            base.as_ref()
        } else {
            prev.as_ref()
        };
        let mut m = track::compare_snapshots(step, &cur, base_ref, prev_ref, i.track_k);
        let (bf, cf) = (base_dir.join(importance::null::FILE), out.join(importance::null::FILE));
        if step > 0 && bf.is_file() && cf.is_file() {
            use importance::null;
            m.movement = Some(null::movement(
                &null::Folds::read(&bf)?,
                &null::Folds::read(&cf)?,
                null::REPLICATES,
                step as u64,
            )?);
        }
        track::log_snapshot(tb, &m, &cur)?;
        crate::util::write_atomic(&out.join("track.json"), serde_json::to_string_pretty(&m)?.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_warms_up_then_decays_to_the_floor() {
        let t = TrainSection {
            steps: 10,
            warmup: 2,
            lr: 1.0,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert_eq!(lr_at(&t, 1), 0.5);
        assert_eq!(lr_at(&t, 2), 1.0);
        assert!((lr_at(&t, 6) - 0.55).abs() < 1e-12);
        assert!((lr_at(&t, 10) - 0.1).abs() < 1e-12);
        let c = TrainSection {
            schedule: Schedule::Constant,
            ..t
        };
        assert_eq!(lr_at(&c, 7), 1.0);
    }

    #[test]
    fn block_order_is_a_permutation_per_epoch_and_repeatable() {
        let mut a = BlockOrder {
            n: 5,
            seed: 3,
            epoch: None,
        };
        let e0: Vec<usize> = (0..5).map(|i| a.block(i)).collect();
        let e1: Vec<usize> = (5..10).map(|i| a.block(i)).collect();
        let mut s = e0.clone();
        s.sort();
        assert_eq!(s, vec![0, 1, 2, 3, 4]);
        assert_ne!(e0, e1, "epochs are reshuffled");
        let mut b = BlockOrder {
            n: 5,
            seed: 3,
            epoch: None,
        };
        assert_eq!(b.block(7), e1[2], "a fresh order at position 7 agrees (resume)");
    }
}
