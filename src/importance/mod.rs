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

/// The batches `[lo, hi)` of shard `index` (1-based) of `count` over `batches` batches: contiguous,
/// disjoint, covering all batches, sizes differing by at most one.
pub(crate) fn shard_range(batches: usize, index: usize, count: usize) -> std::ops::Range<usize> {
    (index - 1) * batches / count..index * batches / count
}

/// One flat gradient per parameter (`None`: no gradient), on the inner backend.
pub(crate) type FlatGrads<B> = Vec<Option<Tensor<<B as AutodiffBackend>::InnerBackend, 1>>>;

/// Flat gradients of the mean loss over `rows`, computed `micro` rows per backward pass and
/// summed (weighted by their counted targets), so a batch's gradient needs only one micro-batch's activations.
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
    // Each micro-batch weighs by its share of the counted targets (its share of the rows when
    // every target counts, as in raw-code blocks).
    let total = crate::model::loss_targets(rows);
    for chunk in rows.chunks(micro.max(1)) {
        let mine = crate::model::loss_targets(chunk);
        if mine == 0 {
            continue;
        }
        let w = mine as f64 / total as f64;
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

/// [`batch_loss_grads`] (with the loss) data-parallel over `devices`: the rows are split into
/// contiguous slices, one per peer; each peer's loss and gradients are weighted by its share
/// of the rows and all-reduced through burn's collective, so the result is the whole batch's
/// mean loss and gradient, on `devices[0]`. One device: plain [`batch_loss_grads`].
pub fn batch_loss_grads_parallel<B: AutodiffBackend>(
    model: &Llama<B>,
    rows: &[Vec<u32>],
    micro: usize,
    devices: &[B::Device],
) -> Result<(f64, FlatGrads<B>)> {
    use burn::module::Module;
    let n = devices.len();
    if n <= 1 {
        return Ok(batch_loss_grads(model, rows, micro, true));
    }
    anyhow::ensure!(
        rows.len() >= n,
        "a batch of {} rows cannot feed {n} devices",
        rows.len()
    );
    let inputs = devices.iter().map(|d| (d.clone(), model.clone().fork(d))).collect();
    let nodes = crate::collective::Nodes::default();
    let mut outs = crate::collective::run_peers::<B::InnerBackend, _, _, _>(inputs, &nodes, |peer, m: Llama<B>| {
        let mine = &rows[shard_range(rows.len(), peer.rank + 1, n)];
        let w = crate::model::loss_targets(mine) as f64 / crate::model::loss_targets(rows) as f64;
        let (loss, grads) = batch_loss_grads(&m, mine, micro, true);
        let loss = peer.all_reduce_scalar(loss * w)?;
        let grads = grads
            .into_iter()
            .map(|g| g.map(|g| peer.all_reduce_sum(g * w)).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok((peer.rank == 0).then_some((loss, grads)))
    })?;
    Ok(outs.swap_remove(0).expect("peer 0 returns the sums"))
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
            acc.add(model, batch_grads(model, chunk, micro));
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
        let mine = &chunks[shard_range(chunks.len(), nodes.global_rank(peer.rank, n) + 1, world)];
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
    /// Matrix products in bf16 around the f32 weights ([`crate::model::Autocast`]).
    pub autocast: crate::model::Autocast,
    pub method: Method,
    pub seed: u64,
    pub half: bool,
    pub step: Option<usize>,
    pub progress: bool,
    /// Also write snapshots of the two calibration halves (`half-a/`, `half-b/`).
    pub halves: bool,
    /// The model's name and hash in the manifest, when not the loaded source's (a tuned model).
    pub model_label: Option<(String, String)>,
    /// Score only shard `index` (1-based) of `count` slices of the batches (`--shard I/N`).
    pub shard: Option<Shard>,
    /// Data-parallel peers on this node (GPUs 0..n; on the CPU, n peers share it).
    pub devices: usize,
    /// Other nodes of a multi-node run (default: this node alone).
    pub nodes: crate::collective::Nodes,
    /// Record the snapshot's split-half agreement and convergence ([`agreement`]): one more
    /// copy of the sums, kept from the midpoint. Single-device, unsharded runs of 2+ batches.
    pub agreement: bool,
    /// Also sum group Taylor importance of whole heads and neurons ([`GroupScores`], kept in
    /// `summaries.json`). One device, unsharded, a gradient method.
    pub groups: bool,
    /// Deal the calibration documents into 2 × `folds` seeded folds (halves A and B of random
    /// documents) and keep each fold's sums at the halves' candidates ([`null`]): the
    /// cross-sample null of spot movement. 0: off (halves are the first and second half of the
    /// batches).
    pub folds: usize,
    /// The top-k % the folds' candidates are kept for.
    pub folds_k: f64,
}

/// One of `count` disjoint, contiguous slices of a scoring run's batches (1-based `index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{s}': expected I/N with 1 ≤ I ≤ N (e.g. 2/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
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
            autocast: crate::model::Autocast::Off,
            method: Method::Taylor,
            seed: 0,
            half: false,
            step: None,
            progress: false,
            halves: false,
            model_label: None,
            shard: None,
            devices: 1,
            nodes: Default::default(),
            agreement: true,
            groups: false,
            folds: 0,
            folds_k: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.seq_len >= 2, "--seq-len must be at least 2");
        anyhow::ensure!(self.batch >= 1, "--batch must be at least 1");
        anyhow::ensure!(self.micro_batch >= 1, "--micro-batch must be at least 1");
        anyhow::ensure!(self.devices >= 1, "--devices must be at least 1");
        anyhow::ensure!(
            !(self.halves && self.devices > 1),
            "--halves runs on one device (use --devices 1)"
        );
        anyhow::ensure!(
            !(self.halves && self.shard.is_some()),
            "--halves and --shard cannot be combined (score each shard whole, then merge)"
        );
        anyhow::ensure!(
            !(self.groups && (self.devices > 1 || self.nodes.count > 1 || self.shard.is_some())),
            "--groups runs on one device, unsharded"
        );
        anyhow::ensure!(
            !self.groups || self.method.needs_gradients(),
            "--groups needs a gradient method ({} has none)",
            self.method.name()
        );
        anyhow::ensure!(
            self.folds == 0 || (self.devices == 1 && self.nodes.count <= 1 && self.shard.is_none()),
            "importance.folds runs on one device, unsharded"
        );
        anyhow::ensure!(self.folds != 1, "importance.folds must be 0 (off) or at least 2");
        if let Some(sh) = self.shard {
            let batches = self.blocks().div_ceil(self.batch);
            anyhow::ensure!(
                sh.count <= batches,
                "--shard {}/{}: the run has only {batches} batches ({} tokens in batches of {} × {}), fewer than {} shards",
                sh.index,
                sh.count,
                self.tokens,
                self.batch,
                self.seq_len,
                sh.count
            );
        }
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
pub(crate) fn split_docs(
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
    model.set_autocast(req.autocast)?;
    let model = &model;
    let eos = ck.tokenizer.stop_ids(&ck.config.eos_token_ids).first().copied();
    // With folds, each fold's blocks apart (A's folds, then B's); the run reads them in order.
    let fold_blocks = if req.folds > 0 {
        Some(null_fold_blocks(corpora, req, &ck.tokenizer, eos)?)
    } else {
        None
    };
    let blocks = match &fold_blocks {
        Some(f) => f.concat(),
        None => corpus_blocks(corpora, req, &ck.tokenizer, eos)?,
    };
    let all_tokens = blocks.len() * req.seq_len;
    let chunks: Vec<&[Vec<u32>]> = blocks.chunks(req.batch).collect();
    let range = req
        .shard
        .map_or(0..chunks.len(), |s| shard_range(chunks.len(), s.index, s.count));
    let total: usize = chunks[range.clone()].iter().map(|c| c.len() * req.seq_len).sum();
    let bar = progress_bar(total as u64, &format!("score {}", req.lang), req.progress);
    let t0 = std::time::Instant::now();
    let mut sums = None;
    let mut agreement = None;
    let mut groups = None;
    let mine = &chunks[range.clone()];
    let parallel = req.devices > 1 || req.nodes.count > 1;
    let mut on_batch = |done: usize| bar.set_position(done as u64);
    let mut halves = None;
    let mut folds = None;
    let raw = if let Some(fb) = &fold_blocks {
        let mut done = 0;
        let mut sums: Vec<null::FoldSums> = vec![];
        let mut half: [Option<RawSums>; 2] = [None, None];
        let mut half_tokens = 0;
        for (f, b) in fb.iter().enumerate() {
            let chunks: Vec<&[Vec<u32>]> = b.chunks(req.batch).collect();
            let acc = accumulate_with(
                model,
                &chunks,
                req.micro_batch,
                req.method,
                req.groups,
                &mut done,
                &mut on_batch,
            );
            if let Some(g) = acc.groups() {
                groups = Some(match groups.take() {
                    Some(mut a) => {
                        GroupScores::add(&mut a, &g);
                        a
                    }
                    None => g,
                });
            }
            let r = acc.raw(model);
            sums.push(null::FoldSums::of(&r)?);
            let h = &mut half[usize::from(f >= req.folds)];
            match h {
                Some(x) => x.add(&r)?,
                None => *h = Some(r),
            }
            if f + 1 == req.folds {
                half_tokens = done;
            }
        }
        let [Some(a), Some(b)] = half else {
            unreachable!("every half has folds")
        };
        // The first ⌊K/2⌋ folds of each half: two disjoint samples of about N/4.
        let q = req.folds / 2;
        let quarter_tops = |h: usize| -> agreement::TopSets {
            let mine = &sums[h * req.folds..h * req.folds + q];
            let batches: usize = mine.iter().map(|f| f.batches).sum();
            agreement::top_sets(mine[0].names().map(|name| {
                let mut acc = vec![0f32; mine[0].len(name)];
                for f in mine {
                    f.add_to(name, &mut acc);
                }
                (name, agreement::tensor_scores(req.method, &acc, None, batches))
            }))
        };
        let quarters = (q >= 1).then(|| (quarter_tops(0), quarter_tops(1)));
        let quarter_tokens = fb[..q].iter().map(|b| b.len() * req.seq_len).sum::<usize>();
        let (sa, sb) = (a.clone().into_scores(), b.clone().into_scores());
        folds = Some(null::Folds::build(req.method, req.folds_k, &sums, [&sa, &sb]));
        drop((sums, sa, sb));
        let mut raw = a.clone();
        raw.add(&b)?;
        if req.agreement {
            agreement = Some(agreement::measure(
                &a,
                &b,
                &raw,
                model.config.num_hidden_layers,
                half_tokens,
                quarters.as_ref().map(|(x, y)| (x, y, quarter_tokens)),
            ));
        }
        if req.halves {
            halves = Some((a.into_scores(), b.into_scores()));
        }
        raw
    } else if parallel {
        let devices = crate::collective::peer_devices::<B>(req.devices);
        accumulate_parallel(model, mine, req.micro_batch, req.method, &devices, &req.nodes)?.raw(model)
    } else if (req.agreement || req.halves) && req.shard.is_none() && mine.len() >= 2 {
        // The two halves summed apart, then added: their scores give the agreement and, with
        // `halves`, the half snapshots.
        let mid = mine.len() / 2;
        let mut done = 0;
        // Each half's first quarter's top sets are read on the way (the agreement of two
        // disjoint N/4 samples), when the halves have at least 2 batches.
        let quarter = (mid / 2).max(1);
        let with_quarters = req.agreement && mid >= 2 && mine.len() - mid >= 2;
        let mut half = |range: std::ops::Range<usize>, done: &mut usize| {
            let cut = if with_quarters {
                range.start + quarter
            } else {
                range.end
            };
            let mut acc = accumulate_with(
                model,
                &mine[range.start..cut],
                req.micro_batch,
                req.method,
                req.groups,
                done,
                &mut on_batch,
            );
            let tops = with_quarters.then(|| acc.top_sets(model));
            accumulate_into(
                &mut acc,
                model,
                &mine[cut..range.end],
                req.micro_batch,
                done,
                &mut on_batch,
            );
            (acc, tops)
        };
        let (a, qa) = half(0..mid, &mut done);
        let half_tokens = done;
        let quarter_tokens = mine[..quarter].iter().map(|c| c.len() * req.seq_len).sum::<usize>();
        let (b, qb) = half(mid..mine.len(), &mut done);
        groups = a.groups().zip(b.groups()).map(|(mut a, b)| {
            a.add(&b);
            a
        });
        // Added on the device first, then each set of sums moved to the host as it is
        // consumed: three model-sized sets alive at once, not five.
        let raw = a.clone().merge(b.clone()).raw(model);
        let (a, b) = (a.raw(model), b.raw(model));
        if req.agreement {
            agreement = Some(agreement::measure(
                &a,
                &b,
                &raw,
                model.config.num_hidden_layers,
                half_tokens,
                qa.as_ref().zip(qb.as_ref()).map(|(x, y)| (x, y, quarter_tokens)),
            ));
        }
        if req.halves {
            halves = Some((a.into_scores(), b.into_scores()));
        }
        raw
    } else {
        anyhow::ensure!(!req.halves, "--halves needs at least 2 batches");
        let acc = accumulate_with(
            model,
            mine,
            req.micro_batch,
            req.method,
            req.groups,
            &mut 0,
            &mut on_batch,
        );
        groups = acc.groups();
        acc.raw(model)
    };
    if req.shard.is_some() {
        // A shard keeps its raw sums for the merge beside its scores.
        sums = Some(raw.clone());
    }
    let scores = raw.into_scores();
    let elapsed = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let mut summaries = summary::summarize(&scores, &model.config);
    summaries.groups = groups;
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
        shard: req.shard.map(|s| snapshot::ShardInfo {
            index: s.index,
            count: s.count,
            first_batch: range.start,
            batches: range.len(),
            total_tokens: all_tokens,
        }),
        merged_from: vec![],
        devices: req.devices,
        dtype: model.dtype.name().into(),
        autocast: model.autocast.effective().into(),
        agreement,
    };
    match halves {
        // Every node of a multi-node run holds the same all-reduced sums; node 0 writes them.
        _ if req.nodes.rank > 0 => {}
        None if req.shard.is_some() => {
            let sums = sums.expect("sums of a shard");
            snapshot::write_shard(out, (&scores, &manifest, &summaries), &sums, force)?
        }
        None => snapshot::write(out, &scores, &manifest, &summaries, force)?,
        Some((a, b)) => {
            let half = |s: &Scores| {
                let mut m = manifest.clone();
                m.tokens = total / 2;
                m.agreement = None;
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
    if let Some(f) = folds {
        f.write(&out.join(null::FILE))?;
    }
    Ok(manifest)
}

/// The calibration blocks of each of 2 × `req.folds` document folds ([`null::fold_of`]),
/// `req.blocks()` split evenly among them.
fn null_fold_blocks(
    corpora: &crate::data::Corpora,
    req: &ScoreRequest,
    tok: &crate::model::Tok,
    eos: Option<u32>,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let n = 2 * req.folds;
    let (docs, what) = split_docs(corpora, &req.lang, req.split, 0)?;
    let mut per: Vec<Vec<crate::data::Doc>> = (0..n).map(|_| vec![]).collect();
    for d in docs {
        per[null::fold_of(&d.sha256, req.seed, n)].push(d);
    }
    let each = req.blocks().div_ceil(n);
    per.into_iter()
        .enumerate()
        .map(|(f, docs)| {
            crate::data::token_blocks(
                docs.into_iter().map(Ok),
                tok,
                eos,
                req.seq_len + 1,
                each,
                &format!("{what}, document fold {} of {n} (importance.folds)", f + 1),
            )
        })
        .collect()
}

/// Add up shard snapshots (`score --shard I/N`, every I of one N) into one snapshot at `out`,
/// equal to an unsharded `score` of the same batches up to f32 summation order. The shards must
/// agree on everything but their slice (model, language, split, method, sizes, seed, step).
pub fn merge_shards(
    dirs: &[std::path::PathBuf],
    out: &std::path::Path,
    force: bool,
) -> Result<snapshot::SnapshotManifest> {
    use anyhow::Context;
    anyhow::ensure!(!dirs.is_empty(), "snapshot merge: no shard directories given");
    if out.exists() && !force {
        anyhow::bail!("{}: already exists (use --force to replace it)", out.display());
    }
    let mut shards = vec![];
    for d in dirs {
        let m = snapshot::read_manifest(d)?;
        let sh = m.shard.clone().with_context(|| {
            format!(
                "{}: manifest.json has no 'shard' field: not a shard (score --shard I/N writes one)",
                d.display()
            )
        })?;
        shards.push((d.clone(), m, sh));
    }
    shards.sort_by_key(|(_, _, sh)| sh.index);
    let (first_dir, first, first_sh) = shards[0].clone();
    let n = first_sh.count;
    for (d, m, sh) in &shards {
        let differs = |field: &str, a: String, b: String| -> Result<()> {
            anyhow::ensure!(
                a == b,
                "{}: manifest.json field '{field}' is {b}, but {} has {a}: not shards of one run",
                d.display(),
                first_dir.display()
            );
            Ok(())
        };
        differs("model_sha256", first.model_sha256.clone(), m.model_sha256.clone())?;
        differs("language", first.language.clone(), m.language.clone())?;
        differs("split", first.split.clone(), m.split.clone())?;
        differs("method", first.method.name().into(), m.method.name().into())?;
        differs("seq_len", first.seq_len.to_string(), m.seq_len.to_string())?;
        differs("batch", first.batch.to_string(), m.batch.to_string())?;
        differs("seed", first.seed.to_string(), m.seed.to_string())?;
        differs("step", format!("{:?}", first.step), format!("{:?}", m.step))?;
        differs("dtype", first.dtype.clone(), m.dtype.clone())?;
        differs("autocast", first.autocast.clone(), m.autocast.clone())?;
        differs(
            "corpus_manifest_sha256",
            first.corpus_manifest_sha256.clone(),
            m.corpus_manifest_sha256.clone(),
        )?;
        differs("shard.count", n.to_string(), sh.count.to_string())?;
        differs(
            "shard.total_tokens",
            first_sh.total_tokens.to_string(),
            sh.total_tokens.to_string(),
        )?;
        anyhow::ensure!(
            m.config == first.config,
            "{}: manifest.json field 'config' differs from {}",
            d.display(),
            first_dir.display()
        );
    }
    let indices: Vec<usize> = shards.iter().map(|(_, _, sh)| sh.index).collect();
    anyhow::ensure!(
        indices == (1..=n).collect::<Vec<_>>(),
        "snapshot merge: need each shard 1..{n} exactly once, got {indices:?}"
    );
    let mut sums: Option<RawSums> = None;
    let mut merged_from = vec![];
    let mut elapsed = 0.0;
    let mut tokens = 0;
    let mut next_batch = 0;
    for (d, m, sh) in &shards {
        anyhow::ensure!(
            sh.first_batch == next_batch,
            "{}: shard {}/{n} starts at batch {}, expected {next_batch}",
            d.display(),
            sh.index,
            sh.first_batch
        );
        next_batch += sh.batches;
        let s = snapshot::read_sums(d, m)?;
        match &mut sums {
            None => sums = Some(s),
            Some(acc) => acc.add(&s).with_context(|| format!("adding {}", d.display()))?,
        }
        elapsed += m.elapsed_s;
        tokens += m.tokens;
        merged_from.push(snapshot::MergedShard {
            dir: d.display().to_string(),
            index: sh.index,
            tokens: m.tokens,
            elapsed_s: m.elapsed_s,
            accumulators_sha256: crate::util::sha256_file(&d.join(snapshot::ACCUMULATORS))?,
        });
    }
    anyhow::ensure!(
        tokens == first_sh.total_tokens,
        "snapshot merge: the shards hold {tokens} tokens, but the run had {}",
        first_sh.total_tokens
    );
    let scores = sums.expect("at least one shard").into_scores();
    let summaries = summary::summarize(&scores, &first.config);
    let manifest = snapshot::SnapshotManifest {
        tokens,
        shard: None,
        merged_from,
        elapsed_s: (elapsed * 1e3).round() / 1e3,
        tokens_per_s: (tokens as f64 / f64::max(elapsed, 1e-9) * 10.0).round() / 10.0,
        code_version: snapshot::code_version(),
        ..first
    };
    snapshot::write(out, &scores, &manifest, &summaries, force)?;
    Ok(manifest)
}

/// An indicatif bar with tokens/s and ETA (hidden when `show` is false).
pub(crate) fn progress_bar(len: u64, label: &str, show: bool) -> indicatif::ProgressBar {
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

fused::simd_fn! {
    /// `a += |g · θ|` over one chunk ([`Accumulator::add_one`]'s f32 CPU path).
    fn taylor_chunk(a: &mut [f32], g: &[f32], th: &[f32]) {
        for ((a, g), th) in a.iter_mut().zip(g).zip(th) {
            *a += (g * th).abs();
        }
    }
}
