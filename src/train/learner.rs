//! burn-train drives tuning: `tune` hands the model, codespot's AdamW (behind burn's
//! `Optimizer`), its learning-rate schedule (behind burn's `LrScheduler`) and two data loaders to
//! burn-train's `SupervisedTraining`, which runs this module's learning strategy with its metrics,
//! renderer (the terminal dashboard on a TTY) and interrupter.
//!
//! An epoch is the steps between two checkpoints; its validation epoch is the held-out
//! evaluation (raw code and pairs of every language). At each epoch's end the strategy writes
//! codespot's own checkpoint (an HF directory, the optimizer state and the data position), the
//! importance snapshot and TensorBoard events, as the loop before burn-train did.
//!
//! Invariants:
//! - The same arithmetic as before for the same seed: the train step is the fused gradient
//!   (`engine::batch_loss_grads_parallel`), the update is codespot's one-pass AdamW, applied
//!   in place. The strategy owns the model between steps, so no other handle to a parameter
//!   exists when AdamW writes it (burn's `Learner::optimizer_step` keeps the old model alive and
//!   would double parameter memory).
//! - The data position lives in codespot's cursor (`Cursor::pos`), saved in every checkpoint; a
//!   resumed run sees exactly the batches an uninterrupted one would.

use super::metrics::{HeldoutOut, LineRenderer, Scalar, Stepped};
use super::{AdamW, HeldoutLog, Sharded, SnapCtx, StepLog, TrainData, TrainState};
use crate::backend::Ad;
use crate::model::{Checkpoint, Llama};
use crate::recipe::{Loaded, TrainSection};
use crate::track::Tb;
use anyhow::{bail, Result};
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::module::AutodiffModule;
use burn::optim::lr_scheduler::LrScheduler;
use burn::optim::{GradientsParams, MultiGradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use burn_train::metric::{CpuMemory, CpuUse, LearningRateMetric};
use burn_train::{
    EventProcessorTraining, InferenceStep, Learner, LearnerEvent, LearningComponentsMarker, LearningResult,
    SupervisedLearningStrategy, SupervisedTraining, SupervisedTrainingEventProcessor, TrainLoader, TrainOutput,
    TrainStep, TrainingComponents, TrainingItem, TrainingStrategy, ValidLoader,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The components burn-train is given.
pub(crate) type Components<B> = LearningComponentsMarker<Ad<B>, Schedule, Llama<Ad<B>>, TuneOptimizer<B>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The steps

/// One optimizer step's input: `train.grad_accum` micro-steps of `train.batch` rows each.
pub struct StepBatch<B: Backend> {
    pub batches: Vec<Vec<Vec<u32>>>,
    /// Predicted positions that are not padding (for tokens/s).
    pub tokens: usize,
    pub micro: usize,
    /// Data-parallel peers (burn-collective); the first is the model's own device.
    pub devices: Vec<B::Device>,
}

/// The loss and gradient sum of one optimizer step's micro-steps. Each weighs by its share of
/// the step's counted targets (exactly 1 for raw blocks, so the sums are as they always were).
pub(crate) fn accumulate<AB: AutodiffBackend>(
    model: &Llama<AB>,
    batches: &[Vec<Vec<u32>>],
    micro: usize,
    devices: &[AB::Device],
) -> Result<(f64, crate::engine::FlatGrads<AB>)> {
    let accum = batches.len();
    let counted: Vec<usize> = batches.iter().map(|b| crate::model::loss_targets(b)).collect();
    let total: usize = counted.iter().sum();
    let mut loss = 0.0;
    let mut sum: Vec<Option<Tensor<AB::InnerBackend, 1>>> = vec![];
    for (rows, c) in batches.iter().zip(&counted) {
        let w = (c * accum) as f64 / total as f64;
        let (l, g) = crate::engine::batch_loss_grads_parallel(model, rows, micro, devices)?;
        loss += l * w / accum as f64;
        let g = if w == 1.0 {
            g
        } else {
            g.into_iter().map(|x| x.map(|x| x.mul_scalar(w))).collect()
        };
        sum = if sum.is_empty() {
            g
        } else {
            sum.into_iter()
                .zip(g)
                .map(|(a, b)| match (a, b) {
                    (Some(a), Some(b)) => Some(a + b),
                    (a, b) => a.or(b),
                })
                .collect()
        };
    }
    Ok((loss, sum))
}

impl<AB: AutodiffBackend> TrainStep for Llama<AB> {
    type Input = StepBatch<AB>;
    type Output = Stepped;

    /// The step's loss and gradient sum ([`accumulate`]), the gradients registered by parameter
    /// id, flat, on the inner backend.
    fn step(&self, x: StepBatch<AB>) -> TrainOutput<Stepped> {
        let mut grads = GradientsParams::new();
        let (loss, error) = match accumulate(self, &x.batches, x.micro, &x.devices) {
            Ok((loss, sum)) => {
                for ((_, p), g) in self.params().iter().zip(sum) {
                    if let Some(g) = g {
                        grads.register::<AB::InnerBackend, 1>(p.id(), g);
                    }
                }
                (loss, None)
            }
            Err(e) => (f64::NAN, Some(format!("{e:#}"))),
        };
        let log = StepLog {
            step: 0,
            loss,
            lr: 0.0,
            grad_norm: 0.0,
            tokens_per_s: 0.0,
        };
        TrainOutput {
            grads,
            item: Stepped {
                log,
                tokens: x.tokens,
                error,
            },
        }
    }
}

/// One held-out set: a language's raw code blocks, or its pairs.
#[derive(Clone)]
pub struct HeldoutBatch {
    pub lang: String,
    pub pairs: bool,
    pub rows: Arc<Vec<Vec<u32>>>,
    pub batch: usize,
    pub pad: u32,
}

impl<B: Backend> InferenceStep for Llama<B> {
    type Input = HeldoutBatch;
    type Output = HeldoutOut;

    fn step(&self, x: HeldoutBatch) -> HeldoutOut {
        if x.pairs {
            let items = super::pairs::example_nll(self, &x.rows, x.batch, x.pad);
            let (n, t) = items.iter().fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            HeldoutOut {
                lang: x.lang,
                pairs: true,
                loss: n / t.max(1.0),
                items,
            }
        } else {
            HeldoutOut {
                lang: x.lang,
                pairs: false,
                loss: super::mean_loss(self, &x.rows, x.batch),
                items: vec![],
            }
        }
    }
}

/// The held-out log of `step` from the held-out sets' outputs; each pair set's paired change is
/// against `base` (step 0's items, kept only at step 0).
pub(crate) fn heldout_log(step: usize, outs: Vec<HeldoutOut>, base: Option<&HeldoutLog>) -> HeldoutLog {
    let mut h = HeldoutLog {
        step,
        loss: BTreeMap::new(),
        pair_loss: BTreeMap::new(),
        pair_items: BTreeMap::new(),
    };
    for o in outs {
        if !o.pairs {
            h.loss.insert(o.lang, o.loss);
            continue;
        }
        let b = base.and_then(|b| b.pair_items.get(&o.lang)).map(Vec::as_slice);
        h.pair_loss
            .insert(o.lang.clone(), super::pairs::pair_loss(&o.items, b, step as u64));
        if step == 0 {
            h.pair_items.insert(o.lang, o.items);
        }
    }
    h
}

/// Evaluate every held-out set on `model` (the validation step, outside burn-train: step 0).
pub(crate) fn evaluate<B: Backend>(model: &Llama<B>, sets: &[HeldoutBatch]) -> Vec<HeldoutOut> {
    sets.iter().map(|s| InferenceStep::step(model, s.clone())).collect()
}

// ---------------------------------------------------------------------------------------------
// The optimizer and the schedule

/// codespot's one-pass AdamW behind burn's `Optimizer`: gradients are multiplied by
/// `1 / grad_accum` and clipped to `train.grad_clip` in the same pass. Its state is shared by
/// every clone (burn-train clones optimizers) and saved by codespot's checkpoint, so its burn
/// record is empty.
#[derive(Clone)]
pub(crate) struct TuneOptimizer<B: Backend> {
    pub(crate) adamw: Arc<Mutex<Sharded<B>>>,
    avg: f64,
    clip: f64,
    /// The last step's gradient norm (after averaging, before clipping).
    norm: Arc<Mutex<f64>>,
}

impl<B: Backend> TuneOptimizer<B> {
    pub fn new(adamw: Sharded<B>, t: &TrainSection) -> Self {
        TuneOptimizer {
            adamw: Arc::new(Mutex::new(adamw)),
            avg: 1.0 / t.grad_accum as f64,
            clip: t.grad_clip,
            norm: Arc::new(Mutex::new(0.0)),
        }
    }

    fn apply<AB: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        lr: f64,
        module: Llama<AB>,
        grads: Vec<Option<Tensor<B, 1>>>,
    ) -> Llama<AB> {
        let norm = AdamW::grad_norm(&grads) * self.avg;
        *lock(&self.norm) = norm;
        let clip = if self.clip > 0.0 && norm > self.clip {
            self.clip / norm
        } else {
            1.0
        };
        lock(&self.adamw).step(module, grads, lr, self.avg * clip)
    }

    pub(crate) fn last_norm(&self) -> f64 {
        *lock(&self.norm)
    }
}

impl<B: Backend, AB: AutodiffBackend<InnerBackend = B>> Optimizer<Llama<AB>, AB> for TuneOptimizer<B> {
    type Record = ();

    fn step(&mut self, lr: f64, module: Llama<AB>, mut grads: GradientsParams) -> Llama<AB> {
        let flat = module
            .params()
            .iter()
            .map(|(_, p)| grads.remove::<B, 1>(p.id()))
            .collect();
        self.apply(lr, module, flat)
    }

    fn step_multi(&mut self, lr: f64, module: Llama<AB>, mut grads: MultiGradientsParams) -> Llama<AB> {
        let flat = module
            .params()
            .iter()
            .map(|(_, p)| grads.remove::<B, 1>(p.id()).map(|(g, _)| g))
            .collect();
        self.apply(lr, module, flat)
    }

    fn to_record(&self) {}

    fn load_record(self, _: ()) -> Self {
        self
    }
}

/// `train`'s schedule (linear warm-up, then cosine or constant; [`super::lr_at`]) behind burn's
/// `LrScheduler`; its record is the number of steps taken.
#[derive(Clone)]
pub struct Schedule {
    train: TrainSection,
    step: usize,
}

impl Schedule {
    pub fn new(train: &TrainSection, done: usize) -> Self {
        Schedule {
            train: train.clone(),
            step: done,
        }
    }
}

impl LrScheduler for Schedule {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> f64 {
        self.step += 1;
        super::lr_at(&self.train, self.step)
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.step
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.step = record;
        self
    }
}

// ---------------------------------------------------------------------------------------------
// The data

/// The training data and where it is: the data position, the last step handed out and the
/// current epoch's last step.
pub(super) struct Cursor<B: Backend> {
    data: TrainData,
    pub(crate) pos: usize,
    step: usize,
    start: usize,
    end: usize,
    batch: usize,
    accum: usize,
    micro: usize,
    devices: Vec<B::Device>,
}

/// The training loader: each item is one optimizer step's batches, drawn at the cursor.
#[derive(Clone)]
pub(crate) struct StepLoader<B: Backend> {
    cursor: Arc<Mutex<Cursor<B>>>,
}

struct StepIter<B: Backend> {
    cursor: Arc<Mutex<Cursor<B>>>,
}

impl<B: Backend> Iterator for StepIter<B> {
    type Item = StepBatch<B>;

    fn next(&mut self) -> Option<StepBatch<B>> {
        let mut c = lock(&self.cursor);
        if c.step >= c.end {
            return None;
        }
        c.step += 1;
        let (batch, accum) = (c.batch, c.accum);
        let mut tokens = 0;
        let mut pos = c.pos;
        let batches = (0..accum)
            .map(|_| {
                let (rows, n) = c.data.rows(&mut pos, batch);
                tokens += n;
                rows
            })
            .collect();
        c.pos = pos;
        Some(StepBatch {
            batches,
            tokens,
            micro: c.micro,
            devices: c.devices.clone(),
        })
    }
}

impl<B: Backend> DataLoaderIterator<StepBatch<B>> for StepIter<B> {
    fn progress(&self) -> Progress {
        let c = lock(&self.cursor);
        Progress::new(c.step - c.start, c.end - c.start)
    }
}

impl<B: Backend> DataLoader<B, StepBatch<B>> for StepLoader<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<StepBatch<B>> + 'a> {
        Box::new(StepIter {
            cursor: self.cursor.clone(),
        })
    }

    fn num_items(&self) -> usize {
        let c = lock(&self.cursor);
        c.end - c.start
    }

    /// The cursor is the data position of the run: every device draws from the same one.
    fn to_device(&self, _: &B::Device) -> Arc<dyn DataLoader<B, StepBatch<B>>> {
        Arc::new(self.clone())
    }

    /// The steps of one epoch are drawn in order from one cursor, so a slice is the loader.
    fn slice(&self, _: usize, _: usize) -> Arc<dyn DataLoader<B, StepBatch<B>>> {
        Arc::new(self.clone())
    }
}

/// The validation loader: every held-out set, once per epoch.
#[derive(Clone)]
pub(crate) struct HeldoutLoader {
    sets: Arc<Vec<HeldoutBatch>>,
}

struct HeldoutIter {
    sets: Arc<Vec<HeldoutBatch>>,
    i: usize,
}

impl Iterator for HeldoutIter {
    type Item = HeldoutBatch;
    fn next(&mut self) -> Option<HeldoutBatch> {
        let s = self.sets.get(self.i).cloned();
        self.i += 1;
        s
    }
}

impl DataLoaderIterator<HeldoutBatch> for HeldoutIter {
    fn progress(&self) -> Progress {
        Progress::new(self.i.min(self.sets.len()), self.sets.len())
    }
}

impl<B: Backend> DataLoader<B, HeldoutBatch> for HeldoutLoader {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<HeldoutBatch> + 'a> {
        Box::new(HeldoutIter {
            sets: self.sets.clone(),
            i: 0,
        })
    }

    fn num_items(&self) -> usize {
        self.sets.len()
    }

    fn to_device(&self, _: &B::Device) -> Arc<dyn DataLoader<B, HeldoutBatch>> {
        Arc::new(self.clone())
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, HeldoutBatch>> {
        let end = end.min(self.sets.len());
        Arc::new(HeldoutLoader {
            sets: Arc::new(self.sets[start.min(end)..end].to_vec()),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The strategy

/// What the strategy writes at each step and checkpoint, owned (burn-train keeps the strategy
/// for the whole run); `tune` takes it back afterwards.
pub(crate) struct Session {
    pub loaded: Loaded,
    pub corpora: crate::data::Corpora,
    pub ck: Checkpoint,
    pub lang: String,
    pub dir: PathBuf,
    pub base_sha: String,
    /// Snapshot progress bars and a line per checkpoint (not under the dashboard).
    pub lines: bool,
    pub progress: bool,
    pub tb: Tb,
    pub state: TrainState,
    pub elapsed_before: f64,
    pub started: std::time::Instant,
    /// Why the run stopped early: an error, or an interruption (then `interrupted`).
    pub error: Option<anyhow::Error>,
    pub interrupted: bool,
}

impl Session {
    fn train(&self) -> &TrainSection {
        &self.loaded.recipe.train
    }

    /// Record a finished step: state, history, TensorBoard.
    fn stepped(&mut self, log: StepLog, tokens: usize, pos: usize) -> Result<()> {
        let t = self.train().clone();
        self.state.step = log.step;
        self.state.tokens_seen += tokens;
        self.state.blocks_consumed = pos;
        if !log.loss.is_finite() {
            bail!(
                "tune {}: loss is {} at step {} (lower train.lr?)",
                self.lang,
                log.loss,
                log.step
            );
        }
        if log.step.is_multiple_of(t.log_every) || log.step == t.steps {
            super::log_train(&mut self.tb, &log)?;
        }
        self.state.history.push(log);
        Ok(())
    }

    /// The checkpoint at the current step: held-out log (unless `outs` is `None`: an
    /// interruption between checkpoints), codespot's checkpoint, then the snapshot.
    fn checkpoint<B: Backend>(
        &mut self,
        model: &Llama<Ad<B>>,
        outs: Option<Vec<HeldoutOut>>,
        opt: &Mutex<Sharded<B>>,
    ) -> Result<()> {
        let step = self.state.step;
        let t = self.train().clone();
        let ckpt_dir = crate::layout::checkpoints_dir(&self.dir);
        if let Some(outs) = outs {
            let base = self.state.heldout.iter().find(|h| h.step == 0);
            let h = heldout_log(step, outs, base);
            super::log_heldout(&mut self.tb, &h)?;
            if self.progress && self.lines {
                // A line per checkpoint, for logs.
                let held: Vec<String> = h
                    .loss
                    .iter()
                    .map(|(l, v)| match h.pair_loss.get(l) {
                        Some(p) => format!("{l} {v:.4} (pairs {:.4} [{:.4}, {:.4}])", p.mean, p.lo, p.hi),
                        None => format!("{l} {v:.4}"),
                    })
                    .collect();
                eprintln!(
                    "tune {}: step {step}/{}, train loss {:.4}, held-out {}",
                    self.lang,
                    t.steps,
                    self.state.history.last().map_or(f64::NAN, |h| h.loss),
                    held.join(", ")
                );
            }
            self.state.heldout.push(h);
        }
        self.state.elapsed_s = self.elapsed_before + self.started.elapsed().as_secs_f64();
        let here = ckpt_dir.join(super::step_name(step));
        super::write_checkpoint(&here, &self.ck, model, &lock(opt), &self.state)?;
        super::prune_checkpoints(&ckpt_dir, t.keep_checkpoints)?;
        self.tb.flush()?;
        if std::env::var(super::ABORT_ENV)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            == Some(step)
        {
            eprintln!("{}={step}: aborting after the checkpoint", super::ABORT_ENV);
            std::process::abort();
        }
        if t.checkpoints_at(step) {
            // The checkpoint holds the moments now: free them while the snapshot runs (the next
            // step reads them back, the same bits), so the two never share memory.
            lock(opt).park(&here.join("optimizer"))?;
            let snap_dir = crate::layout::snapshots_dir(&self.dir);
            let ctx = SnapCtx {
                loaded: &self.loaded,
                ck: &self.ck,
                corpora: &self.corpora,
                lang: &self.lang,
                snap_dir: &snap_dir,
                base_sha: &self.base_sha,
                progress: self.progress && self.lines,
            };
            ctx.ensure_snapshot(model, step, &mut self.tb)?;
        }
        Ok(())
    }
}

/// Test hook: ask burn-train's interrupter to stop right after this step (as Ctrl-C would).
const INTERRUPT_ENV: &str = "CODESPOT_INTERRUPT_AFTER_STEP";

/// SIGINT asks the run to stop after the current step (a checkpoint is written there); a
/// second one kills the process.
static SIGINT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    SIGINT.store(true, Ordering::SeqCst);
    // SAFETY: signal(2) is async-signal-safe; back to the default action for a second Ctrl-C.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
    }
}

/// codespot's learning strategy: burn-train's epochs and events around codespot's step,
/// update, checkpoint and snapshot.
pub(crate) struct Tuning<B: Backend> {
    session: Arc<Mutex<Option<Session>>>,
    cursor: Arc<Mutex<Cursor<Ad<B>>>>,
    optim: TuneOptimizer<B>,
    schedule: Schedule,
    /// The last step of each epoch still to run.
    ends: Vec<usize>,
}

impl<B: Backend> SupervisedLearningStrategy<Components<B>> for Tuning<B> {
    fn fit(
        &self,
        components: TrainingComponents<Components<B>>,
        learner: Learner<Components<B>>,
        train: TrainLoader<Components<B>>,
        valid: ValidLoader<Components<B>>,
        starting_epoch: usize,
    ) -> (Llama<Ad<B>>, SupervisedTrainingEventProcessor<Components<B>>) {
        // The strategy owns the model from here: AdamW updates it in place.
        let model = learner.model();
        drop(learner);
        let mut processor = components.event_processor;
        let interrupter = components.interrupter;
        let mut session = lock(&self.session).take().expect("the session is set before launch");
        let epochs = components.num_epochs;
        let mut model = Some(model);
        let r = self.epochs(
            &mut model,
            &mut session,
            &mut processor,
            &interrupter,
            (&train, &valid),
            (starting_epoch, epochs),
        );
        if let Err(e) = r {
            session.error = Some(e);
        }
        *lock(&self.session) = Some(session);
        (model.expect("the model is back after each update"), processor)
    }
}

impl<B: Backend> Tuning<B> {
    /// The epochs still to run; `model` is `None` only inside an update.
    fn epochs(
        &self,
        model: &mut Option<Llama<Ad<B>>>,
        session: &mut Session,
        processor: &mut SupervisedTrainingEventProcessor<Components<B>>,
        interrupter: &burn_train::Interrupter,
        (train, valid): (&TrainLoader<Components<B>>, &ValidLoader<Components<B>>),
        (starting_epoch, epochs): (usize, usize),
    ) -> Result<()> {
        let mut schedule = self.schedule.clone();
        let mut optim = self.optim.clone();
        for (i, end) in self.ends.iter().enumerate() {
            let epoch = starting_epoch + i;
            let global = Progress::new(epoch, epochs);
            {
                let mut c = lock(&self.cursor);
                c.start = c.step;
                c.end = *end;
            }
            let mut it = train.iter();
            let mut stopped = false;
            loop {
                let t0 = std::time::Instant::now();
                let Some(batch) = it.next() else { break };
                let progress = it.progress();
                let lr = schedule.step();
                let m = model.take().expect("the model is back after each update");
                let out = TrainStep::step(&m, batch);
                let mut item = out.item;
                if let Some(e) = item.error.take() {
                    *model = Some(m);
                    bail!("tune {}: {e}", session.lang);
                }
                if let Err(e) = lock(&optim.adamw).restore(&m) {
                    *model = Some(m);
                    return Err(e);
                }
                *model = Some(Optimizer::step(&mut optim, lr, m, out.grads));
                let step = schedule.step;
                item.log = StepLog {
                    step,
                    loss: item.log.loss,
                    lr,
                    grad_norm: optim.last_norm(),
                    tokens_per_s: item.tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                };
                let pos = lock(&self.cursor).pos;
                session.stepped(item.log.clone(), item.tokens, pos)?;
                processor.process_train(LearnerEvent::ProcessedItem(TrainingItem::new(
                    item,
                    progress,
                    global.clone(),
                    Some(step),
                    Some(lr),
                )));
                if SIGINT.load(Ordering::SeqCst) {
                    interrupter.stop(Some("interrupted (SIGINT)"));
                }
                if std::env::var(INTERRUPT_ENV).ok().and_then(|v| v.parse::<usize>().ok()) == Some(step) {
                    interrupter.stop(Some(INTERRUPT_ENV));
                }
                if interrupter.should_stop() && step < *end {
                    stopped = true;
                    break;
                }
            }
            processor.process_train(LearnerEvent::EndEpoch(epoch));
            if stopped {
                // Keep what was done: a checkpoint at this step, no held-out log or snapshot.
                session.interrupted = true;
                session.checkpoint(model_ref_of(model), None, &optim.adamw)?;
                return Ok(());
            }
            // The validation epoch: every held-out set on the inner model (dropped before
            // the next update, so the parameters are again held once).
            let outs = {
                let inner = model_ref_of(model).valid();
                let mut outs = vec![];
                let mut vit = valid.iter();
                while let Some(x) = vit.next() {
                    let o = InferenceStep::step(&inner, x);
                    outs.push(o.clone());
                    processor.process_valid(LearnerEvent::ProcessedItem(TrainingItem::new(
                        o,
                        vit.progress(),
                        global.clone(),
                        None,
                        None,
                    )));
                }
                outs
            };
            processor.process_valid(LearnerEvent::EndEpoch(epoch));
            session.checkpoint(model_ref_of(model), Some(outs), &optim.adamw)?;
            if SIGINT.load(Ordering::SeqCst) {
                interrupter.stop(Some("interrupted (SIGINT)"));
            }
            // A stop asked for during the checkpoint ends the run there (unless it was the
            // last: then the run is simply done).
            if interrupter.should_stop() && i + 1 < self.ends.len() {
                session.interrupted = true;
                return Ok(());
            }
        }
        Ok(())
    }
}

fn model_ref_of<M>(m: &Option<M>) -> &M {
    m.as_ref().expect("the model is back after each update")
}

/// Run the steps after `session.state.step` through burn-train. Returns the session (its state
/// and TensorBoard writer) and the tuned model.
#[allow(clippy::too_many_arguments)]
pub(super) fn run<B: Backend>(
    session: Session,
    model: Llama<Ad<B>>,
    adamw: Sharded<B>,
    data: TrainData,
    heldout: Vec<HeldoutBatch>,
    devices: Vec<burn::tensor::Device<Ad<B>>>,
) -> Result<(Session, Llama<B>)> {
    let t = session.train().clone();
    let done = session.state.step;
    let ends: Vec<usize> = (done + 1..=t.steps).filter(|s| t.checkpoints_at(*s)).collect();
    let epochs_done = (1..=done).filter(|s| t.checkpoints_at(*s)).count();
    let cursor = Arc::new(Mutex::new(Cursor {
        data,
        pos: session.state.blocks_consumed,
        step: done,
        start: done,
        end: done,
        batch: t.batch,
        accum: t.grad_accum,
        micro: t.micro_batch,
        devices,
    }));
    let optim = TuneOptimizer::new(adamw, &t);
    let schedule = Schedule::new(&t, done);
    let pairs = heldout.iter().any(|h| h.pairs);
    let dashboard = session.progress && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let label = format!("tune {}", session.lang);
    let quiet = !session.progress;
    let dir = session.dir.join("learner");
    let mut session = session;
    session.lines = !dashboard;
    SIGINT.store(false, Ordering::SeqCst);
    // SAFETY: installing a handler that only stores to an atomic and calls signal(2); the
    // previous disposition is put back after the run, and an ignored SIGINT stays ignored.
    let previous = if session.progress {
        let old = unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
        if old == libc::SIG_IGN {
            unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
        }
        Some(old)
    } else {
        None
    };
    let shared = Arc::new(Mutex::new(Some(session)));
    let strategy = Tuning::<B> {
        session: shared.clone(),
        cursor: cursor.clone(),
        optim: optim.clone(),
        schedule: schedule.clone(),
        ends: ends.clone(),
    };
    let train: TrainLoader<Components<B>> = Arc::new(StepLoader { cursor });
    let valid: ValidLoader<Components<B>> = Arc::new(HeldoutLoader {
        sets: Arc::new(heldout),
    });
    let mut training = SupervisedTraining::<Components<B>>::new(&dir, train, valid)
        .with_application_logger(None)
        .with_training_strategy(TrainingStrategy::Custom(Arc::new(strategy)))
        .num_epochs(epochs_done + ends.len())
        .metric_train_numeric(LearningRateMetric::new())
        .metric_train_numeric(CpuUse::new())
        .metric_train_numeric(CpuMemory::new());
    for m in Scalar::train() {
        training = training.metric_train_numeric(m);
    }
    for m in Scalar::valid(pairs) {
        training = training.metric_valid_numeric(m);
    }
    if epochs_done > 0 {
        training = training.checkpoint(epochs_done);
    }
    if !dashboard {
        training = training.renderer(LineRenderer::new(&label, quiet));
    }
    let LearningResult { model: tuned, .. } = training.launch(Learner::<Components<B>>::new(model, optim, schedule));
    if let Some(old) = previous {
        // SAFETY: back to the disposition before the run.
        unsafe {
            libc::signal(libc::SIGINT, old);
        }
    }
    let session = lock(&shared).take().expect("the strategy hands the session back");
    Ok((session, tuned))
}
