//! Taylor importance: stream batches through forward + backward (no optimizer step) and
//! accumulate, per parameter element and in f32, the first-order Taylor term of the loss.
//!
//! - `taylor` (default): Σ_b |θ ⊙ g_b| over batches b;
//! - `taylor-sum`: |θ ⊙ Σ_b g_b| (what the authors' code computes: gradients add up over
//!   backward passes without an optimizer step, and |·| is taken at the end);
//! - `taylor2`: |θ ⊙ ḡ| + ½ θ² ⊙ Σ_b g_b² / n, with ḡ = Σ_b g_b / n (the diagonal
//!   second-order term, with the Fisher diagonal standing in for the Hessian).

pub mod snapshot;
pub mod summary;

use crate::model::{Llama, ParamRef};
use crate::source::{HostTensor, Weights};
use anyhow::Result;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// Importance scores under canonical names (same shapes as the parameters).
pub type Scores = Weights;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Taylor,
    TaylorSum,
    Taylor2,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Taylor => "taylor",
            Method::TaylorSum => "taylor-sum",
            Method::Taylor2 => "taylor2",
        }
    }
}

/// Flattened value of a parameter on the inner (non-autodiff) backend.
pub fn flat_value<B: AutodiffBackend>(p: &ParamRef<'_, B>) -> Tensor<B::InnerBackend, 1> {
    p.flat().inner()
}

/// Running sums for one scoring pass, one flat tensor per parameter.
#[derive(Clone)]
pub struct Accumulator<B: Backend> {
    pub method: Method,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    acc: Vec<Tensor<B, 1>>,
    sq: Vec<Tensor<B, 1>>,
    /// Batches added so far.
    pub batches: usize,
}

impl<B: Backend> Accumulator<B> {
    /// Zeroed accumulators for every parameter of `model`.
    pub fn new<AB: AutodiffBackend<InnerBackend = B>>(method: Method, model: &Llama<AB>) -> Self {
        let device = model.embed.val().inner().device();
        let mut s = Self {
            method,
            names: vec![],
            shapes: vec![],
            acc: vec![],
            sq: vec![],
            batches: 0,
        };
        for (name, p) in model.params() {
            let shape = p.shape();
            let n: usize = shape.iter().product();
            s.acc.push(Tensor::zeros([n], &device));
            if method == Method::Taylor2 {
                s.sq.push(Tensor::zeros([n], &device));
            }
            s.names.push(name);
            s.shapes.push(shape);
        }
        s
    }

    /// Add one batch's gradients (flat, in `model.params()` order; `None` = no gradient).
    pub fn add<AB: AutodiffBackend<InnerBackend = B>>(&mut self, model: &Llama<AB>, grads: Vec<Option<Tensor<B, 1>>>) {
        let params = model.params();
        for (i, g) in grads.into_iter().enumerate() {
            if let Some(g) = g {
                self.add_one(&params[i].1, i, g);
            }
        }
        self.batches += 1;
    }

    /// Add one parameter's gradient of the current batch (`i`: its index in `model.params()`);
    /// [`Accumulator::end_batch`] once every parameter's is in.
    pub fn add_one<AB: AutodiffBackend<InnerBackend = B>>(&mut self, p: &ParamRef<'_, AB>, i: usize, g: Tensor<B, 1>) {
        let a = std::mem::replace(&mut self.acc[i], Tensor::empty([0], &g.device()));
        self.acc[i] = match self.method {
            // Fresh, unshared left operands, so CPU backends can work in place.
            Method::Taylor => a + (g * flat_value(p)).abs(),
            Method::TaylorSum => a + g,
            Method::Taylor2 => {
                let q = std::mem::replace(&mut self.sq[i], Tensor::empty([0], &g.device()));
                self.sq[i] = q + g.clone().powi_scalar(2);
                a + g
            }
        };
    }

    /// Count a batch whose gradients went in through [`Accumulator::add_one`].
    pub fn end_batch(&mut self) {
        self.batches += 1;
    }

    /// Combine two passes over disjoint batches: the raw sums add exactly for every method.
    pub fn merge(mut self, other: Self) -> Self {
        for (a, b) in self.acc.iter_mut().zip(other.acc) {
            *a = a.clone() + b;
        }
        for (a, b) in self.sq.iter_mut().zip(other.sq) {
            *a = a.clone() + b;
        }
        self.batches += other.batches;
        self
    }

    /// Final scores on the host (f32), under canonical names.
    pub fn finish<AB: AutodiffBackend<InnerBackend = B>>(self, model: &Llama<AB>) -> Scores {
        let n = self.batches.max(1) as f64;
        let mut out = Scores::default();
        let params = model.params();
        for (i, acc) in self.acc.into_iter().enumerate() {
            let theta = || flat_value(&params[i].1);
            let s = match self.method {
                Method::Taylor => acc,
                Method::TaylorSum => (theta() * acc).abs(),
                Method::Taylor2 => {
                    let first = (theta() * acc.div_scalar(n)).abs();
                    let second = theta().powi_scalar(2) * self.sq[i].clone().div_scalar(n) * 0.5;
                    first + second
                }
            };
            let data = s.into_data().convert::<f32>().into_vec::<f32>().expect("f32 scores");
            out.insert(self.names[i].clone(), HostTensor::new(self.shapes[i].clone(), data));
        }
        out
    }
}

/// Flat gradients of the mean loss over `rows`, computed `micro` rows per backward pass and
/// summed (weighted by rows), so a batch's gradient needs only one micro-batch's activations.
pub fn batch_grads<B: AutodiffBackend>(
    model: &Llama<B>,
    rows: &[Vec<u32>],
    micro: usize,
) -> Vec<Option<Tensor<B::InnerBackend, 1>>> {
    batch_loss_grads(model, rows, micro, false).1
}

/// [`batch_grads`], and the mean loss when `want_loss`.
pub fn batch_loss_grads<B: AutodiffBackend>(
    model: &Llama<B>,
    rows: &[Vec<u32>],
    micro: usize,
    want_loss: bool,
) -> (f64, Vec<Option<Tensor<B::InnerBackend, 1>>>) {
    let n = model.params().len();
    let mut sum: Vec<Option<Tensor<B::InnerBackend, 1>>> = (0..n).map(|_| None).collect();
    let mut loss_sum = 0.0;
    for chunk in rows.chunks(micro.max(1)) {
        let w = chunk.len() as f64 / rows.len() as f64;
        let loss = model.loss_backward(chunk, w, |i, g| {
            sum[i] = Some(match sum[i].take() {
                Some(a) => a + g,
                None => g,
            });
        });
        if want_loss {
            loss_sum += loss;
        }
    }
    (loss_sum, sum)
}

/// Accumulate the batches `chunks` into a fresh accumulator; `done` counts predicted tokens.
fn accumulate<B: AutodiffBackend>(
    model: &Llama<B>,
    chunks: &[&[Vec<u32>]],
    micro: usize,
    method: Method,
    done: &mut usize,
    on_batch: &mut impl FnMut(usize),
) -> Accumulator<B::InnerBackend> {
    let mut acc = Accumulator::new(method, model);
    let params = model.params();
    for chunk in chunks {
        if chunk.len() <= micro {
            // One backward pass per batch: each gradient goes into the sums as soon as it exists.
            model.loss_backward(chunk, 1.0, |i, g| acc.add_one(&params[i].1, i, g));
            acc.end_batch();
        } else {
            acc.add(model, batch_grads(model, chunk, micro));
        }
        *done += chunk.iter().map(|b| b.len().saturating_sub(1)).sum::<usize>();
        on_batch(*done);
    }
    acc
}

/// Score `blocks` (each a token sequence) in batches of `batch`, `micro` sequences per
/// backward pass; `on_batch(tokens_done)` reports progress. Gradients are dropped after each
/// batch, so memory stays flat however many batches are scored.
pub fn score<B: AutodiffBackend>(
    model: &Llama<B>,
    blocks: &[Vec<u32>],
    batch: usize,
    micro: usize,
    method: Method,
    mut on_batch: impl FnMut(usize),
) -> Result<Scores> {
    anyhow::ensure!(batch > 0 && micro > 0, "batch and micro-batch must be positive");
    let chunks: Vec<&[Vec<u32>]> = blocks.chunks(batch).collect();
    Ok(accumulate(model, &chunks, micro, method, &mut 0, &mut on_batch).finish(model))
}

/// Score in two halves (first and second half of the batches): returns the scores of the
/// whole set and of each half, for the stability check of spot selection.
pub fn score_halves<B: AutodiffBackend>(
    model: &Llama<B>,
    blocks: &[Vec<u32>],
    batch: usize,
    micro: usize,
    method: Method,
    mut on_batch: impl FnMut(usize),
) -> Result<(Scores, Scores, Scores)> {
    anyhow::ensure!(batch > 0 && micro > 0, "batch and micro-batch must be positive");
    let chunks: Vec<&[Vec<u32>]> = blocks.chunks(batch).collect();
    anyhow::ensure!(chunks.len() >= 2, "--halves needs at least 2 batches");
    let mid = chunks.len() / 2;
    let mut done = 0;
    let a = accumulate(model, &chunks[..mid], micro, method, &mut done, &mut on_batch);
    let b = accumulate(model, &chunks[mid..], micro, method, &mut done, &mut on_batch);
    let full = a.clone().merge(b.clone());
    Ok((full.finish(model), a.finish(model), b.finish(model)))
}

/// What to score and how.
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    pub lang: String,
    pub split: crate::data::Split,
    pub tokens: usize,
    pub seq_len: usize,
    pub batch: usize,
    /// Sequences per backward pass (the batch's gradient is the sum over its micro-batches).
    pub micro_batch: usize,
    /// Top blocks whose activations a backward pass keeps ([`Llama::keep_blocks`]).
    pub keep_blocks: usize,
    pub method: Method,
    pub seed: u64,
    pub half: bool,
    pub step: Option<usize>,
    pub progress: bool,
    /// Also write snapshots of the two calibration halves (`half-a/`, `half-b/`).
    pub halves: bool,
    /// The model's name and hash in the manifest, when not the loaded source's (a tuned model).
    pub model_label: Option<(String, String)>,
}

impl ScoreRequest {
    pub fn new(lang: &str) -> Self {
        Self {
            lang: lang.into(),
            split: crate::data::Split::Calib,
            tokens: 16384,
            seq_len: 256,
            batch: 4,
            micro_batch: 4,
            keep_blocks: crate::model::backprop::DEFAULT_KEEP_BLOCKS,
            method: Method::Taylor,
            seed: 0,
            half: false,
            step: None,
            progress: false,
            halves: false,
            model_label: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.seq_len >= 2, "--seq-len must be at least 2");
        anyhow::ensure!(self.batch >= 1, "--batch must be at least 1");
        anyhow::ensure!(self.micro_batch >= 1, "--micro-batch must be at least 1");
        anyhow::ensure!(
            self.tokens >= self.seq_len,
            "--tokens ({}) must be at least --seq-len ({})",
            self.tokens,
            self.seq_len
        );
        Ok(())
    }

    /// Number of blocks: ⌈tokens / seq_len⌉, each of seq_len + 1 tokens (seq_len predictions).
    pub fn blocks(&self) -> usize {
        self.tokens.div_ceil(self.seq_len)
    }
}

/// Token blocks of a corpus split (documents shuffled by `seed` when it is not 0).
pub fn corpus_blocks(
    corpora: &crate::data::Corpora,
    req: &ScoreRequest,
    tok: &crate::model::Tok,
    eos: Option<u32>,
) -> Result<Vec<Vec<u32>>> {
    let (docs, what) = split_docs(corpora, &req.lang, req.split, req.seed)?;
    crate::data::token_blocks(docs.into_iter().map(Ok), tok, eos, req.seq_len + 1, req.blocks(), &what)
}

/// The documents of a corpus split (shuffled by `seed` when it is not 0), and a description
/// for messages. An empty split is an error.
pub fn split_docs(
    corpora: &crate::data::Corpora,
    lang: &str,
    split: crate::data::Split,
    seed: u64,
) -> Result<(Vec<crate::data::Doc>, String)> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let path = corpora.split_path(lang, split)?;
    let mut docs: Vec<crate::data::Doc> = crate::data::read_split(&path)?.collect::<Result<_>>()?;
    if docs.is_empty() {
        anyhow::bail!("corpus '{lang}' {} split is empty ({})", split.name(), path.display());
    }
    if seed != 0 {
        docs.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    }
    Ok((
        docs,
        format!("corpus '{lang}' {} split ({})", split.name(), path.display()),
    ))
}

/// Score a model on a language's corpus and write a snapshot directory to `out`.
pub fn score_snapshot<B: AutodiffBackend>(
    model: &Llama<B>,
    ck: &crate::model::Checkpoint,
    corpora: &crate::data::Corpora,
    req: &ScoreRequest,
    out: &std::path::Path,
    force: bool,
) -> Result<snapshot::SnapshotManifest> {
    req.validate()?;
    let mut model = model.clone(); // shares the weights
    model.keep_blocks = req.keep_blocks;
    let model = &model;
    let eos = ck.tokenizer.stop_ids(&ck.config.eos_token_ids).first().copied();
    let blocks = corpus_blocks(corpora, req, &ck.tokenizer, eos)?;
    let total = blocks.len() * req.seq_len;
    let bar = progress_bar(total as u64, &format!("score {}", req.lang), req.progress);
    let t0 = std::time::Instant::now();
    let (scores, halves) = if req.halves {
        let (f, a, b) = score_halves(model, &blocks, req.batch, req.micro_batch, req.method, |done| {
            bar.set_position(done as u64)
        })?;
        (f, Some((a, b)))
    } else {
        let s = score(model, &blocks, req.batch, req.micro_batch, req.method, |done| {
            bar.set_position(done as u64)
        })?;
        (s, None)
    };
    let elapsed = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let summaries = summary::summarize(&scores, &model.config);
    let corpus_sha = corpora.stats(&req.lang).map(|s| s.manifest_sha256).unwrap_or_default();
    let manifest = snapshot::SnapshotManifest {
        format: 1,
        model: req
            .model_label
            .as_ref()
            .map_or_else(|| ck.source.clone(), |l| l.0.clone()),
        model_sha256: match &req.model_label {
            Some(l) => l.1.clone(),
            None => crate::model::load::source_hash(&ck.location)?,
        },
        language: req.lang.clone(),
        split: req.split.name().into(),
        method: req.method,
        tokens: total,
        seq_len: req.seq_len,
        batch: req.batch,
        seed: req.seed,
        half: req.half,
        step: req.step,
        corpus_manifest_sha256: corpus_sha,
        code_version: snapshot::code_version(),
        config: model.config.clone(),
        // Rounded to short decimals, which JSON reads back exactly.
        elapsed_s: (elapsed * 1e3).round() / 1e3,
        tokens_per_s: (total as f64 / elapsed.max(1e-9) * 10.0).round() / 10.0,
    };
    match halves {
        None => snapshot::write(out, &scores, &manifest, &summaries, force)?,
        Some((a, b)) => {
            let half = |s: &Scores| {
                let mut m = manifest.clone();
                m.tokens = total / 2;
                (summary::summarize(s, &model.config), m)
            };
            let (sa, ma) = half(&a);
            let (sb, mb) = half(&b);
            snapshot::write_with_halves(
                out,
                (&scores, &manifest, &summaries),
                (&a, &ma, &sa),
                (&b, &mb, &sb),
                force,
            )?;
        }
    }
    Ok(manifest)
}

/// An indicatif bar with tokens/s and ETA (hidden when `show` is false).
pub fn progress_bar(len: u64, label: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tokens  {per_sec}  ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}
