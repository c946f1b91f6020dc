//! Taylor importance: stream batches through forward + backward (no optimizer step) and
//! accumulate, per parameter element and in f32, the first-order Taylor term of the loss.
//!
//! - `taylor` (default): Σ_b |θ ⊙ g_b| over batches b;
//! - `taylor-sum`: |θ ⊙ Σ_b g_b| (what the authors' code computes: gradients add up over
//!   backward passes without an optimizer step, and |·| is taken at the end);
//! - `taylor2`: |θ ⊙ ḡ| + ½ θ² ⊙ Σ_b g_b² / n, with ḡ = Σ_b g_b / n (the diagonal
//!   second-order term, with the Fisher diagonal standing in for the Hessian).
//!
//! Two baselines to compare the criterion with:
//! - `molchanov`: Σ_b (θ ⊙ g_b)², Molchanov et al.'s original per-parameter criterion (summed,
//!   not averaged, over batches: the same ranking);
//! - `wanda`: |θ| ⊙ ‖X‖₂ (Sun et al.): each weight times the ℓ2 norm, over every calibration
//!   token, of the input channel it multiplies (a forward pass only; no gradient). Norm weights
//!   are weighed by the normalised stream they scale, the embedding by √(count) of its token.

pub mod agreement;
pub mod null;
pub mod run;
pub mod snapshot;
pub mod summary;

use crate::model::{fused, Llama, ParamRef};
use crate::source::{HostTensor, Weights};
use anyhow::Result;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Importance scores under canonical names (same shapes as the parameters).
pub(crate) type Scores = Weights;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Taylor,
    TaylorSum,
    Taylor2,
    Molchanov,
    Wanda,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Taylor => "taylor",
            Method::TaylorSum => "taylor-sum",
            Method::Taylor2 => "taylor2",
            Method::Molchanov => "molchanov",
            Method::Wanda => "wanda",
        }
    }

    /// Whether the method needs gradients (all but `wanda`, which needs activations only).
    pub(crate) fn needs_gradients(self) -> bool {
        self != Method::Wanda
    }

    /// One element's score from its raw sums over `n` batches (see [`RawSums`]): the one place
    /// each method's final formula is written.
    #[inline]
    pub fn score(self, sum: f32, sq: Option<f32>, n: f32) -> f32 {
        match self {
            Method::Taylor | Method::Molchanov => sum,
            Method::TaylorSum => sum.abs(),
            Method::Taylor2 => sum.abs() / n + 0.5 * sq.unwrap_or(0.0) / n,
            Method::Wanda => sum.max(0.0).sqrt(),
        }
    }
}

/// Flattened value of a parameter on the inner (non-autodiff) backend, in f32 (or wider).
pub(crate) fn flat_value<B: AutodiffBackend>(p: &ParamRef<'_, B>) -> Tensor<B::InnerBackend, 1> {
    crate::model::dtype::widen(p.flat().inner())
}

/// Group Taylor importance (Molchanov et al.'s group criterion, LLM-Pruner's head and neuron
/// groups): per batch b the signed sum s = Σ θ · g_b over a group's weights, squared and summed
/// over batches. A query head's group is its rows of q and its columns of o (its k and v rows
/// are shared with the other heads of its group and left out); an MLP neuron's is its rows of
/// gate and up and its column of down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GroupScores {
    /// `[layer][query head]`: Σ_b s².
    pub heads: Vec<Vec<f64>>,
    /// `[layer][neuron]`: Σ_b s².
    pub neurons: Vec<Vec<f64>>,
    pub batches: usize,
}

impl GroupScores {
    fn zeros(cfg: &crate::model::LlamaConfig) -> Self {
        let l = cfg.num_hidden_layers;
        Self {
            heads: vec![vec![0.0; cfg.num_attention_heads]; l],
            neurons: vec![vec![0.0; cfg.intermediate_size]; l],
            batches: 0,
        }
    }

    /// Add another pass's sums (disjoint batches of the same model).
    pub fn add(&mut self, o: &GroupScores) {
        let add = |a: &mut Vec<Vec<f64>>, b: &Vec<Vec<f64>>| {
            a.iter_mut()
                .zip(b)
                .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += y))
        };
        add(&mut self.heads, &o.heads);
        add(&mut self.neurons, &o.neurons);
        self.batches += o.batches;
    }
}

/// A batch's signed group sums while its gradients come in, folded into [`GroupScores`] at
/// the end of the batch.
#[derive(Clone)]
struct GroupAcc {
    /// Per parameter index: its layer and kind, for the kinds that belong to a group.
    roles: Vec<Option<(usize, crate::model::arch::Groups)>>,
    head_dim: usize,
    cur: GroupScores,
    total: GroupScores,
}

/// Running sums for one scoring pass, one flat tensor per parameter.
#[derive(Clone)]
pub(crate) struct Accumulator<B: Backend> {
    pub method: Method,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    acc: Vec<Tensor<B, 1>>,
    sq: Vec<Tensor<B, 1>>,
    groups: Option<GroupAcc>,
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
            groups: None,
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

    /// Also sum group Taylor importance of heads and neurons ([`GroupScores`]).
    pub(crate) fn with_groups<AB: AutodiffBackend<InnerBackend = B>>(mut self, model: &Llama<AB>) -> Self {
        use crate::model::arch::{self, Groups as G};
        let roles = self
            .names
            .iter()
            .map(|n| {
                let (l, s) = arch::slot_of(n)?;
                let summed = matches!(
                    s.groups,
                    G::QueryHeadRows | G::QueryHeadCols | G::NeuronRows | G::NeuronCols
                );
                summed.then_some((l?, s.groups))
            })
            .collect();
        self.groups = Some(GroupAcc {
            roles,
            head_dim: model.config.head_dim,
            cur: GroupScores::zeros(&model.config),
            total: GroupScores::zeros(&model.config),
        });
        self
    }

    /// The group sums so far (None unless [`Accumulator::with_groups`]).
    pub fn groups(&self) -> Option<GroupScores> {
        self.groups.as_ref().map(|g| g.total.clone())
    }

    /// Add one batch's gradients (flat, in `model.params()` order; `None` = no gradient).
    pub fn add<AB: AutodiffBackend<InnerBackend = B>>(&mut self, model: &Llama<AB>, grads: Vec<Option<Tensor<B, 1>>>) {
        let params = model.params();
        for (i, g) in grads.into_iter().enumerate() {
            if let Some(g) = g {
                self.add_one(&params[i].1, i, g);
            }
        }
        self.end_batch();
    }

    /// This batch's signed group sums of parameter `i` (θ · g summed over rows or columns).
    fn add_groups<AB: AutodiffBackend<InnerBackend = B>>(&mut self, p: &ParamRef<'_, AB>, i: usize, g: &Tensor<B, 1>) {
        use crate::model::arch::Groups as G;
        let Some(ga) = &mut self.groups else { return };
        let Some((l, groups)) = ga.roles[i] else { return };
        let prod = flat_value(p) * g.clone();
        // q, gate, up: one sum per output row; o, down: one per input column; a q bias's
        // element is its row's.
        let sums = match self.shapes[i].as_slice() {
            [r, c] if groups.along_rows() => prod.reshape([*r, *c]).sum_dim(1).flatten::<1>(0, 1),
            [r, c] => prod.reshape([*r, *c]).sum_dim(0).flatten::<1>(0, 1),
            _ => prod,
        };
        let sums: Vec<f32> = sums.into_data().convert::<f32>().into_vec().expect("f32 sums");
        let hd = ga.head_dim;
        match groups {
            G::QueryHeadRows | G::QueryHeadCols => sums
                .iter()
                .enumerate()
                .for_each(|(j, s)| ga.cur.heads[l][j / hd] += *s as f64),
            _ => sums
                .iter()
                .enumerate()
                .for_each(|(j, s)| ga.cur.neurons[l][j] += *s as f64),
        }
    }

    /// Add one parameter's gradient of the current batch (`i`: its index in `model.params()`);
    /// [`Accumulator::end_batch`] once every parameter's is in.
    pub(crate) fn add_one<AB: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        p: &ParamRef<'_, AB>,
        i: usize,
        g: Tensor<B, 1>,
    ) {
        if self.groups.is_some() && self.method.needs_gradients() {
            self.add_groups(p, i, &g);
        }
        let a = std::mem::replace(&mut self.acc[i], Tensor::empty([0], &g.device()));
        self.acc[i] = match self.method {
            // On the f32 CPU backend in one pass over the sum's own storage (the same f32
            // arithmetic, so the same bits).
            Method::Taylor if fused::is_cpu::<B>() && fused::hand_written() => {
                let (mut a, g, th) = (fused::flex(a), fused::flex(g), fused::flex(flat_value(p)));
                let c = 1 << 14;
                a.storage_mut::<f32>()
                    .par_chunks_mut(c)
                    .zip(fused::values(&g).par_chunks(c))
                    .zip(fused::values(&th).par_chunks(c))
                    .for_each(|((a, g), th)| taylor_chunk(a, g, th));
                fused::unflex(a)
            }
            // Fresh, unshared left operands, so CPU backends can work in place.
            Method::Taylor => a + (g * flat_value(p)).abs(),
            Method::Molchanov => a + (g * flat_value(p)).powi_scalar(2),
            Method::TaylorSum => a + g,
            Method::Taylor2 => {
                let q = std::mem::replace(&mut self.sq[i], Tensor::empty([0], &g.device()));
                self.sq[i] = q + g.clone().powi_scalar(2);
                a + g
            }
            // `g` is θ² ⊙ X², already formed by [`Accumulator::add_inputs`].
            Method::Wanda => a + g,
        };
    }

    /// Add one micro-batch's input statistics (`wanda`): `sq[i]` is [`Llama::input_sq_sums`]'s
    /// entry for parameter `i`; each weight gets θ² times its input channel's Σ X² (a row of
    /// the embedding: times its token's count). [`Accumulator::end_batch`] counts the batch.
    pub(crate) fn add_inputs<AB: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        model: &Llama<AB>,
        sq: Vec<Tensor<B, 1>>,
    ) {
        for (i, ((name, p), x)) in model.params().into_iter().zip(sq).enumerate() {
            let th2 = flat_value(&p).powi_scalar(2);
            let c = match p.shape().as_slice() {
                [r, c] if name == crate::model::arch::EMBED.hf => {
                    (th2.reshape([*r, *c]) * x.reshape([*r, 1])).flatten(0, 1)
                }
                [r, c] => (th2.reshape([*r, *c]) * x.reshape([1, *c])).flatten(0, 1),
                _ => th2 * x,
            };
            self.add_one(&p, i, c);
        }
    }

    /// Count a batch whose gradients went in through [`Accumulator::add_one`] (and fold its
    /// group sums, squared, into the totals).
    pub(crate) fn end_batch(&mut self) {
        self.batches += 1;
        if let Some(ga) = &mut self.groups {
            let fold = |cur: &mut Vec<Vec<f64>>, tot: &mut Vec<Vec<f64>>| {
                for (c, t) in cur.iter_mut().zip(tot) {
                    for (c, t) in c.iter_mut().zip(t) {
                        *t += *c * *c;
                        *c = 0.0;
                    }
                }
            };
            fold(&mut ga.cur.heads, &mut ga.total.heads);
            fold(&mut ga.cur.neurons, &mut ga.total.neurons);
            ga.total.batches += 1;
        }
    }

    /// Combine two passes over disjoint batches: the raw sums add exactly for every method.
    pub fn merge(mut self, other: Self) -> Self {
        for (a, b) in self.acc.iter_mut().zip(other.acc) {
            *a = a.clone() + b;
        }
        for (a, b) in self.sq.iter_mut().zip(other.sq) {
            *a = a.clone() + b;
        }
        if let (Some(a), Some(b)) = (&mut self.groups, &other.groups) {
            a.total.add(&b.total);
        }
        self.batches += other.batches;
        self
    }

    /// The sums on the host, multiplied by θ where the method needs it (see [`RawSums`]).
    pub fn raw<AB: AutodiffBackend<InnerBackend = B>>(self, model: &Llama<AB>) -> RawSums {
        let params = model.params();
        let host = |t: Tensor<B, 1>, i: usize| {
            let data = t.into_data().convert::<f32>().into_vec::<f32>().expect("f32 sums");
            HostTensor::new(self.shapes[i].clone(), data)
        };
        let mut sum = Weights::default();
        let mut sq = Weights::default();
        let mut sqs = self.sq.into_iter();
        for (i, acc) in self.acc.into_iter().enumerate() {
            let theta = || flat_value(&params[i].1);
            let s = match self.method {
                Method::Taylor | Method::Molchanov | Method::Wanda => acc,
                Method::TaylorSum | Method::Taylor2 => theta() * acc,
            };
            sum.insert(self.names[i].clone(), host(s, i));
            if let Some(q) = sqs.next() {
                sq.insert(self.names[i].clone(), host(theta().powi_scalar(2) * q, i));
            }
        }
        RawSums {
            method: self.method,
            batches: self.batches,
            sum,
            sq: (self.method == Method::Taylor2).then_some(sq),
        }
    }

    /// The running scores' top sets at [`agreement::KS`] (layer tensors), one tensor on the
    /// host at a time: the sums stay on, to be added to.
    pub(crate) fn top_sets<AB: AutodiffBackend<InnerBackend = B>>(&self, model: &Llama<AB>) -> agreement::TopSets {
        let params = model.params();
        let host = |t: Tensor<B, 1>| t.into_data().convert::<f32>().into_vec::<f32>().expect("f32 sums");
        let layer = |i: usize| {
            crate::model::names::parse(&self.names[i])
                .and_then(|p| p.layer)
                .is_some()
        };
        let scores = (0..self.acc.len()).filter(|&i| layer(i)).map(|i| {
            let theta = || flat_value(&params[i].1);
            let s = match self.method {
                Method::Taylor | Method::Molchanov | Method::Wanda => self.acc[i].clone(),
                Method::TaylorSum | Method::Taylor2 => theta() * self.acc[i].clone(),
            };
            let q = self.sq.get(i).map(|q| host(theta().powi_scalar(2) * q.clone()));
            let s = agreement::tensor_scores(self.method, &host(s), q.as_deref(), self.batches);
            (self.names[i].as_str(), s)
        });
        agreement::top_sets(scores)
    }

    /// Final scores on the host (f32), under canonical names.
    pub fn finish<AB: AutodiffBackend<InnerBackend = B>>(self, model: &Llama<AB>) -> Scores {
        self.raw(model).into_scores()
    }

    /// The running sums as flat tensors (for an all-reduce across peers).
    pub(crate) fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Tensor<B, 1>> {
        self.acc.iter_mut().chain(self.sq.iter_mut())
    }
}

/// What a scoring pass has summed, on the host, in a form that adds up across disjoint sets of
/// batches without the model: `sum` is Σ_b |θ ⊙ g_b| (`taylor`), Σ_b (θ ⊙ g_b)² (`molchanov`),
/// θ² ⊙ Σ_t X² (`wanda`) or θ ⊙ Σ_b g_b (`taylor-sum`, `taylor2`; signed, so |·| is taken after
/// a merge), `sq` is θ² ⊙ Σ_b g_b² (`taylor2` only).
/// θ is the same for every shard, so θ ⊙ Σ g over all batches is the sum of the shards' θ ⊙ Σ g
/// up to f32 rounding.
#[derive(Debug, Clone)]
pub struct RawSums {
    pub method: Method,
    pub batches: usize,
    pub sum: Weights,
    pub sq: Option<Weights>,
}

impl RawSums {
    /// The scores ([`Method::score`] of each element), computed in place in `sum`'s buffers (no
    /// second copy of a model-sized set of tensors).
    pub(crate) fn into_scores(self) -> Scores {
        let n = self.batches.max(1) as f32;
        let m = self.method;
        let mut out = self.sum;
        match &self.sq {
            _ if matches!(m, Method::Taylor | Method::Molchanov) => {}
            Some(sq) => {
                for (name, t) in &mut out.tensors {
                    let q = &sq.tensors[name].data;
                    t.data
                        .iter_mut()
                        .zip(q)
                        .for_each(|(x, q)| *x = m.score(*x, Some(*q), n));
                }
            }
            None => out
                .tensors
                .values_mut()
                .for_each(|t| t.data.iter_mut().for_each(|x| *x = m.score(*x, None, n))),
        }
        out
    }

    /// Add the sums of another pass over disjoint batches of the same model.
    pub fn add(&mut self, other: &RawSums) -> Result<()> {
        anyhow::ensure!(
            self.method == other.method,
            "method {} cannot merge with {}",
            self.method.name(),
            other.method.name()
        );
        add_weights(&mut self.sum, &other.sum)?;
        if let (Some(a), Some(b)) = (&mut self.sq, &other.sq) {
            add_weights(a, b)?;
        }
        self.batches += other.batches;
        Ok(())
    }

    /// As safetensors tensors: `sum/<name>` and `sq/<name>`.
    pub fn to_weights(&self) -> Weights {
        let mut w = Weights::default();
        for (prefix, part) in [("sum", Some(&self.sum)), ("sq", self.sq.as_ref())] {
            for (name, t) in part.into_iter().flat_map(|p| &p.tensors) {
                w.insert(format!("{prefix}/{name}"), t.clone());
            }
        }
        w
    }

    /// Back from [`RawSums::to_weights`]; `what` names the file for errors.
    pub fn from_weights(method: Method, batches: usize, w: Weights, what: &str) -> Result<Self> {
        let mut sum = Weights::default();
        let mut sq = Weights::default();
        for (key, t) in w.tensors {
            match key.split_once('/') {
                Some(("sum", name)) => sum.insert(name, t),
                Some(("sq", name)) => sq.insert(name, t),
                _ => anyhow::bail!("{what}: unexpected tensor '{key}' (expected sum/<name> or sq/<name>)"),
            }
        }
        let wants_sq = method == Method::Taylor2;
        anyhow::ensure!(
            wants_sq != sq.tensors.is_empty(),
            "{what}: method {} {} sq/ tensors",
            method.name(),
            if wants_sq { "needs" } else { "has no use for" }
        );
        if wants_sq {
            let names = |w: &Weights| w.tensors.keys().cloned().collect::<Vec<_>>();
            anyhow::ensure!(names(&sum) == names(&sq), "{what}: sum/ and sq/ name different tensors");
        }
        Ok(Self {
            method,
            batches,
            sum,
            sq: wants_sq.then_some(sq),
        })
    }
}

/// `a += b`, tensor by tensor; names and shapes must match.
fn add_weights(a: &mut Weights, b: &Weights) -> Result<()> {
    let names = |w: &Weights| w.tensors.keys().cloned().collect::<Vec<_>>();
    anyhow::ensure!(names(a) == names(b), "the two sets of sums name different tensors");
    for (name, t) in &mut a.tensors {
        let o = &b.tensors[name];
        anyhow::ensure!(
            t.shape == o.shape,
            "tensor '{name}': shape {:?} against {:?}",
            t.shape,
            o.shape
        );
        t.data.iter_mut().zip(&o.data).for_each(|(x, y)| *x += y);
    }
    Ok(())
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
    accumulate_with(model, chunks, micro, method, false, done, on_batch)
}

/// [`accumulate`], with the group sums of heads and neurons when `groups`.
fn accumulate_with<B: AutodiffBackend>(
    model: &Llama<B>,
    chunks: &[&[Vec<u32>]],
    micro: usize,
    method: Method,
    groups: bool,
    done: &mut usize,
    on_batch: &mut impl FnMut(usize),
) -> Accumulator<B::InnerBackend> {
    let mut acc = Accumulator::new(method, model);
    if groups {
        acc = acc.with_groups(model);
    }
    accumulate_into(&mut acc, model, chunks, micro, done, on_batch);
    acc
}

/// Group Taylor scores of heads and neurons over `blocks` in batches of `batch` (`micro`
/// sequences per backward pass), beside the element scores of `method`.
pub fn score_groups<B: AutodiffBackend>(
    model: &Llama<B>,
    blocks: &[Vec<u32>],
    batch: usize,
    micro: usize,
    method: Method,
) -> Result<(Scores, GroupScores)> {
    anyhow::ensure!(batch > 0 && micro > 0, "batch and micro-batch must be positive");
    anyhow::ensure!(
        method.needs_gradients(),
        "group scores need gradients ({} has none)",
        method.name()
    );
    let chunks: Vec<&[Vec<u32>]> = blocks.chunks(batch).collect();
    let acc = accumulate_with(model, &chunks, micro, method, true, &mut 0, &mut |_| {});
    let g = acc.groups().expect("groups on");
    Ok((acc.finish(model), g))
}

/// Add the batches' gradients to `acc`.
fn accumulate_into<B: AutodiffBackend>(
    acc: &mut Accumulator<B::InnerBackend>,
    model: &Llama<B>,
    chunks: &[&[Vec<u32>]],
    micro: usize,
    done: &mut usize,
    on_batch: &mut impl FnMut(usize),
) {
    let params = model.params();
    if !acc.method.needs_gradients() {
        // Activations only: a forward pass per micro-batch on the inner backend.
        use burn::module::AutodiffModule;
        let inner = model.valid();
        let device = inner.embed.val().device();
        for chunk in chunks {
            for part in chunk.chunks(micro.max(1)) {
                let inputs: Vec<Vec<u32>> = part.iter().map(|r| r[..r.len() - 1].to_vec()).collect();
                let sq = inner.input_sq_sums(crate::model::tokens_tensor(&inputs, &device));
                acc.add_inputs(model, sq);
            }
            acc.end_batch();
            *done += chunk.iter().map(|b| b.len().saturating_sub(1)).sum::<usize>();
            on_batch(*done);
        }
        return;
    }
    for chunk in chunks {
        if chunk.len() <= micro {
            // One backward pass per batch: each gradient goes into the sums as soon as it exists.
            model.loss_backward(chunk, 1.0, |i, g| acc.add_one(&params[i].1, i, g));
            acc.end_batch();
        } else {
            acc.add(model, crate::engine::batch_grads(model, chunk, micro));
        }
        *done += chunk.iter().map(|b| b.len().saturating_sub(1)).sum::<usize>();
        on_batch(*done);
    }
}

/// [`accumulate`] data-parallel: global peer `r` (node rank × devices + local rank) of all the
/// run's peers takes the `r+1`-th of that many contiguous slices of the batches (as
/// `score --shard`) on its device, and the sums are all-reduced through burn's collective
/// (across nodes too); returns local peer 0's (on `devices[0]`).
pub(crate) fn accumulate_parallel<B: AutodiffBackend>(
    model: &Llama<B>,
    chunks: &[&[Vec<u32>]],
    micro: usize,
    method: Method,
    devices: &[B::Device],
    nodes: &crate::collective::Nodes,
) -> Result<Accumulator<B::InnerBackend>> {
    use burn::module::Module;
    let n = devices.len();
    let world = n * nodes.world();
    anyhow::ensure!(
        chunks.len() >= world,
        "{} batches cannot feed {world} peers",
        chunks.len()
    );
    let inputs = devices.iter().map(|d| (d.clone(), model.clone().fork(d))).collect();
    let mut accs = crate::collective::run_peers::<B::InnerBackend, _, _, _>(inputs, nodes, |peer, m: Llama<B>| {
        let mine = &chunks[crate::util::shard_range(chunks.len(), nodes.global_rank(peer.rank, n) + 1, world)];
        let mut acc = accumulate(&m, mine, micro, method, &mut 0, &mut |_| {});
        // One all-reduce of all sums concatenated: burn-collective 0.21's global (multi-node)
        // strategies reuse transfer ids across consecutive all-reduces (tracel-ai/burn#4549).
        let parts: Vec<Tensor<B::InnerBackend, 1>> = acc
            .tensors_mut()
            .map(|t| std::mem::replace(t, Tensor::empty([0], &peer.device)))
            .collect();
        let lens: Vec<usize> = parts.iter().map(|t| t.dims()[0]).collect();
        let all = peer.all_reduce_sum(Tensor::cat(parts, 0))?;
        let mut at = 0;
        for (t, n) in acc.tensors_mut().zip(lens) {
            *t = all.clone().narrow(0, at, n);
            at += n;
        }
        acc.batches = chunks.len();
        Ok(if peer.rank == 0 { Some(acc) } else { None })
    })?;
    Ok(accs.swap_remove(0).expect("peer 0 returns the sums"))
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

fused::simd_fn! {
    /// `a += |g · θ|` over one chunk ([`Accumulator::add_one`]'s f32 CPU path).
    fn taylor_chunk(a: &mut [f32], g: &[f32], th: &[f32]) {
        for ((a, g), th) in a.iter_mut().zip(g).zip(th) {
            *a += (g * th).abs();
        }
    }
}
