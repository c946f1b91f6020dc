//! AdamW (decoupled weight decay, Loshchilov & Hutter), the PyTorch formulation, with its
//! state held as flat tensors under the parameters' canonical names so a checkpoint stores it
//! as plain safetensors and a resumed run continues bit for bit.
//!
//! Hand-written rather than burn-optim's `AdamW`: its state is keyed by burn `ParamId`s and
//! saved through burn records, while codespot's checkpoints are HF directories plus
//! safetensors that any tool can read; the update itself is a few tensor ops.

use crate::model::fused;
use crate::model::{Llama, ParamRef};
use anyhow::{Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied to matrices (projections, embeddings), not to norm weights.
    pub weight_decay: f64,
}

impl From<&crate::recipe::TrainSection> for AdamWConfig {
    fn from(t: &crate::recipe::TrainSection) -> Self {
        AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        }
    }
}

pub struct AdamW<B: Backend> {
    pub cfg: AdamWConfig,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    decay: Vec<bool>,
    moments: Moments<B>,
    /// Updates applied so far (the bias-correction step count).
    pub t: usize,
    /// Hold the moments in host memory and stream each tensor's to the device around its
    /// update (`train.offload_optimizer`): the device holds one tensor's state at a time.
    pub offload: bool,
    /// f32 master copies of the parameters held in bf16/f16 (`None` for f32 ones), made from
    /// the weights at the first update: the update runs on them and is rounded into the
    /// low-precision copy, so updates below the copy's precision accumulate instead of
    /// vanishing. Saved as `w.<name>`.
    master: Vec<Option<Tensor<B, 1>>>,
    /// The parameters this optimizer updates and holds state for (all of them, or one peer's
    /// shard: [`Sharded`]); the others get no state, no file entries and no update.
    owned: Vec<bool>,
    /// Where the state is allocated (default: the model's device).
    device: Option<B::Device>,
}

/// Where the first and second moments are.
enum Moments<B: Backend> {
    /// No update yet: both are zero (the first step allocates them).
    Zero,
    /// In memory, flat, in `model.params()` order.
    Held { m: Vec<Tensor<B, 1>>, v: Vec<Tensor<B, 1>> },
    /// In host memory ([`AdamW::offload`]), f32, in `model.params()` order.
    Host { m: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    /// Only in this safetensors file ([`AdamW::park`], [`AdamW::resume`]); [`AdamW::restore`]
    /// reads them back.
    InFile(PathBuf),
}

impl<B: Backend> AdamW<B> {
    /// Zero state for every parameter of `model` (allocated by the first step).
    pub fn new<AB: AutodiffBackend<InnerBackend = B>>(cfg: AdamWConfig, model: &Llama<AB>) -> Self {
        let mut s = Self {
            cfg,
            names: vec![],
            shapes: vec![],
            decay: vec![],
            moments: Moments::Zero,
            t: 0,
            offload: false,
            master: vec![],
            owned: vec![],
            device: None,
        };
        for (name, p) in model.params() {
            s.decay.push(matches!(p, ParamRef::Matrix(_)));
            s.names.push(name);
            s.shapes.push(p.shape());
            s.owned.push(true);
        }
        s
    }

    /// The state [`AdamW::save`] wrote to `path`, for `model`. Only the file's header is read
    /// and checked here (the update count, and every `m.<name>` and `v.<name>` present with its
    /// parameter's shape); the moments stay in the file until [`AdamW::restore`].
    pub fn resume<AB: AutodiffBackend<InnerBackend = B>>(
        cfg: AdamWConfig,
        model: &Llama<AB>,
        path: &Path,
    ) -> Result<Self> {
        let mut s = Self::new(cfg, model);
        s.attach(path)?;
        Ok(s)
    }

    /// Check `path` against this optimizer's parameters and take its update count, leaving
    /// the moments in the file until [`AdamW::restore`].
    fn attach(&mut self, path: &Path) -> Result<()> {
        let header = crate::source::weights::safetensors_header(path)?;
        self.check_file(path, |key| header.shapes.get(key))?;
        self.t = saved_updates(path, &header)?;
        self.moments = Moments::InFile(path.to_path_buf());
        Ok(())
    }

    /// Free the moments when `file` (written by [`AdamW::save`]) holds them, i.e. was saved
    /// after as many updates as this optimizer has made; returns whether it did.
    /// [`AdamW::restore`] reads them back, bit for bit.
    pub fn park(&mut self, file: &Path) -> Result<bool> {
        if !matches!(self.moments, Moments::Held { .. } | Moments::Host { .. }) {
            return Ok(false);
        }
        let header = crate::source::weights::safetensors_header(file)?;
        if saved_updates(file, &header)? != self.t {
            return Ok(false);
        }
        self.moments = Moments::InFile(file.to_path_buf());
        Ok(true)
    }

    /// Read parked moments back into memory (a no-op when they are there or still zero).
    pub fn restore<AB: AutodiffBackend<InnerBackend = B>>(&mut self, model: &Llama<AB>) -> Result<()> {
        let Moments::InFile(path) = &self.moments else {
            return Ok(());
        };
        let mut w = crate::source::weights::from_safetensors(std::slice::from_ref(path))?;
        self.check_file(path, |key| w.tensors.get(key).map(|t| &t.shape))?;
        let device = self
            .device
            .clone()
            .unwrap_or_else(|| model.embed.val().inner().device());
        // A master already held (moments parked after a checkpoint) is the file's, bit for bit:
        // keep it rather than hold two copies while reading.
        if self.master.is_empty() && self.names.iter().any(|n| w.tensors.contains_key(&format!("w.{n}"))) {
            self.master = self
                .names
                .iter()
                .map(|n| {
                    w.tensors
                        .remove(&format!("w.{n}"))
                        .map(|h| upload::<B>(h.data, &device))
                })
                .collect();
        }
        let (mut hm, mut hv) = (vec![], vec![]);
        for (name, &own) in self.names.iter().zip(&self.owned) {
            for (prefix, out) in [("m", &mut hm), ("v", &mut hv)] {
                out.push(match own {
                    true => {
                        w.tensors
                            .remove(&format!("{prefix}.{name}"))
                            .expect("checked above")
                            .data
                    }
                    false => vec![],
                });
            }
        }
        self.moments = if self.offload {
            Moments::Host { m: hm, v: hv }
        } else {
            let up = |x: Vec<Vec<f32>>| x.into_iter().map(|h| upload::<B>(h, &device)).collect();
            Moments::Held { m: up(hm), v: up(hv) }
        };
        Ok(())
    }

    /// Every `m.<name>` and `v.<name>` of a state file present (`shape_of`) with its
    /// parameter's shape.
    fn check_file<'a>(&self, path: &Path, shape_of: impl Fn(&str) -> Option<&'a Vec<usize>>) -> Result<()> {
        for ((name, shape), _) in self.names.iter().zip(&self.shapes).zip(&self.owned).filter(|x| *x.1) {
            for prefix in ["m", "v"] {
                let key = format!("{prefix}.{name}");
                let found =
                    shape_of(&key).with_context(|| format!("{}: missing optimizer tensor '{key}'", path.display()))?;
                anyhow::ensure!(
                    found == shape,
                    "{}: optimizer tensor '{key}' has shape {found:?}, expected {shape:?}",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// Global L2 norm of flat gradients.
    pub fn grad_norm(grads: &[Option<Tensor<B, 1>>]) -> f64 {
        use burn::tensor::ElementConversion;
        let mut total: Option<Tensor<B, 1>> = None;
        for g in grads.iter().flatten() {
            let s = g.clone().powi_scalar(2).sum();
            total = Some(match total {
                Some(t) => t + s,
                None => s,
            });
        }
        total.map(|t| t.into_scalar().elem::<f64>().sqrt()).unwrap_or(0.0)
    }

    /// One update with learning rate `lr`; gradients are multiplied by `scale` first (grad
    /// clipping, accumulation averaging). Returns the updated model.
    pub fn step<AB: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        model: Llama<AB>,
        mut grads: Vec<Option<Tensor<B, 1>>>,
        lr: f64,
        scale: f64,
    ) -> Llama<AB> {
        // Packed bf16 copies would keep the old weights shared, and the in-place update copy them.
        model.packs.clear();
        // Where this optimizer's state lives (a peer's device, for a shard), whether fresh,
        // resumed or uploaded from the host: every update runs there.
        let device = self
            .device
            .clone()
            .unwrap_or_else(|| model.embed.val().inner().device());
        if matches!(self.moments, Moments::Zero) {
            let sizes = self
                .shapes
                .iter()
                .zip(&self.owned)
                .map(|(s, &own)| if own { s.iter().product::<usize>() } else { 0 });
            self.moments = if self.offload {
                let zeros = || sizes.clone().map(|n| vec![0f32; n]).collect();
                Moments::Host { m: zeros(), v: zeros() }
            } else {
                let zeros = || sizes.clone().map(|n| Tensor::zeros([n], &device)).collect();
                Moments::Held { m: zeros(), v: zeros() }
            };
        }
        if self.master.is_empty() {
            self.master = model
                .params()
                .iter()
                .zip(&self.owned)
                .map(|((_, p), &own)| {
                    let f = p.flat().inner();
                    (own && f.dtype() != DType::F32).then(|| crate::model::dtype::widen(f).to_device(&device))
                })
                .collect();
        }
        let moments = &mut self.moments;
        if matches!(moments, Moments::InFile(_)) {
            panic!("AdamW::step with parked moments: call AdamW::restore first");
        }
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let mut i = 0;
        model.map_params(|_, theta| {
            let k = i;
            i += 1;
            // No gradient here (frozen, or another shard's): the same values, as a fresh leaf
            // (`theta` is a reshaped view of the tracked parameter).
            let Some(g) = grads[k].take() else {
                return Tensor::from_inner(theta.inner());
            };
            let (mk, vk) = take_moments(moments, k, &device);
            if fused::is_cpu::<B>() && fused::hand_written() && theta.dtype() == DType::F32 {
                // One pass over the parameter, in place (the same arithmetic as below).
                let mut th = fused::flex(theta.inner());
                let g = fused::flex(g);
                let mut m = fused::flex(mk);
                let mut v = fused::flex(vk);
                let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
                let (sc, bc2, step) = (scale as f32, bc2 as f32, (lr / bc1) as f32);
                let wd = if self.decay[k] && c.weight_decay > 0.0 {
                    (1.0 - lr * c.weight_decay) as f32
                } else {
                    1.0
                };
                let (mf, vf) = (m.storage_mut::<f32>(), v.storage_mut::<f32>());
                th.storage_mut::<f32>()
                    .par_chunks_mut(1 << 14)
                    .zip(fused::values(&g).par_chunks(1 << 14))
                    .zip(mf.par_chunks_mut(1 << 14).zip(vf.par_chunks_mut(1 << 14)))
                    .for_each(|((th, g), (m, v))| adamw_chunk(th, g, m, v, [sc, b1, b2, bc2, eps, step, wd]));
                put_moments(moments, k, fused::unflex(m), fused::unflex(v));
                return Tensor::from_inner(fused::unflex(th));
            }
            let g = if scale == 1.0 { g } else { g.mul_scalar(scale) };
            // The update in f32 whatever the weights' dtype: on the master copy of a bf16/f16
            // parameter (map_params rounds the result into the low-precision copy).
            let master = self.master[k].take();
            let keep = master.is_some();
            let theta = theta.inner();
            let home = theta.device();
            // The state's device (a peer's, for a shard): the update runs there.
            let at = mk.device();
            let g = g.to_device(&at);
            let mut th = master.unwrap_or_else(|| crate::model::dtype::widen(theta).to_device(&at));
            if self.decay[k] && c.weight_decay > 0.0 {
                th = th.mul_scalar(1.0 - lr * c.weight_decay);
            }
            let (m, v) = (mk, vk);
            let m = m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
            let v = v.mul_scalar(c.beta2) + g.powi_scalar(2).mul_scalar(1.0 - c.beta2);
            let denom = v.clone().div_scalar(bc2).sqrt().add_scalar(c.eps);
            let th = th - m.clone().div(denom).mul_scalar(lr / bc1);
            put_moments(moments, k, m, v);
            if keep {
                self.master[k] = Some(th.clone());
            }
            Tensor::from_inner(th.to_device(&home))
        })
    }

    /// Write the state to `path` (safetensors, atomically): `m.<name>` and `v.<name>` with the
    /// parameters' shapes, f32, each copied off the device only when the writer reaches it, and
    /// the update count as metadata `t`. [`AdamW::resume`] reads it back.
    pub fn save(&self, path: &Path) -> Result<()> {
        use crate::source::weights::Lazy;
        if let Moments::InFile(from) = &self.moments {
            // Parked: that file holds them already.
            if from != path {
                std::fs::copy(from, path)
                    .with_context(|| format!("copying {} to {}", from.display(), path.display()))?;
            }
            return Ok(());
        }
        let host = |t: &Tensor<B, 1>| {
            t.clone()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 state")
        };
        let mut tensors = vec![];
        for (k, (name, shape)) in self.names.iter().zip(&self.shapes).enumerate() {
            if !self.owned[k] {
                continue;
            }
            for prefix in ["m", "v"] {
                let t = match &self.moments {
                    Moments::Held { m, v } => {
                        let t = if prefix == "m" { &m[k] } else { &v[k] };
                        Lazy::fetch(shape.clone(), move || host(t))
                    }
                    Moments::Host { m, v } => {
                        let t = if prefix == "m" { &m[k] } else { &v[k] };
                        Lazy::fetch(shape.clone(), move || t.clone())
                    }
                    _ => {
                        let n = shape.iter().product();
                        Lazy::fetch(shape.clone(), move || vec![0.0; n])
                    }
                };
                tensors.push((format!("{prefix}.{name}"), t));
            }
        }
        for ((name, shape), w) in self.names.iter().zip(&self.shapes).zip(&self.master) {
            if let Some(w) = w {
                tensors.push((format!("w.{name}"), Lazy::fetch(shape.clone(), move || host(w))));
            }
        }
        let meta = [("t".to_string(), self.t.to_string())].into();
        crate::source::weights::write_safetensors(tensors, path, Some(meta), false)
    }
}

/// An f32 host vector as a flat device tensor.
fn upload<B: Backend>(h: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = h.len();
    Tensor::from_data(TensorData::new(h, [n]).convert::<B::FloatElem>(), device)
}

/// Parameter `k`'s moments on the device, taken out of `moments` (uploaded when offloaded).
fn take_moments<B: Backend>(moments: &mut Moments<B>, k: usize, device: &B::Device) -> (Tensor<B, 1>, Tensor<B, 1>) {
    match moments {
        Moments::Held { m, v } => (
            std::mem::replace(&mut m[k], Tensor::empty([0], device)),
            std::mem::replace(&mut v[k], Tensor::empty([0], device)),
        ),
        Moments::Host { m, v } => (
            upload(std::mem::take(&mut m[k]), device),
            upload(std::mem::take(&mut v[k]), device),
        ),
        _ => unreachable!("the moments are allocated or restored before an update"),
    }
}

/// Put parameter `k`'s updated moments back (downloaded when offloaded).
fn put_moments<B: Backend>(moments: &mut Moments<B>, k: usize, mk: Tensor<B, 1>, vk: Tensor<B, 1>) {
    let down = |t: Tensor<B, 1>| t.into_data().convert::<f32>().into_vec::<f32>().expect("f32 state");
    match moments {
        Moments::Held { m, v } => {
            m[k] = mk;
            v[k] = vk;
        }
        Moments::Host { m, v } => {
            m[k] = down(mk);
            v[k] = down(vk);
        }
        _ => unreachable!("the moments are allocated or restored before an update"),
    }
}

/// The update count in the metadata of a file [`AdamW::save`] wrote.
fn saved_updates(path: &Path, header: &crate::source::weights::SafetensorsHeader) -> Result<usize> {
    let t = header
        .metadata
        .get("t")
        .with_context(|| format!("{}: no metadata 't' (the optimizer's update count)", path.display()))?;
    t.parse()
        .with_context(|| format!("{}: metadata 't' is '{t}', not an update count", path.display()))
}

fused::simd_fn! {
    /// One chunk of [`AdamW::step`]'s one-pass update; `k` = [gradient scale, β₁, β₂, bias
    /// correction of v, ε, lr / bias correction of m, weight-decay factor].
    fn adamw_chunk(th: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: [f32; 7]) {
        let [sc, b1, b2, bc2, eps, step, wd] = k;
        for (((th, &g), m), v) in th.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * sc;
            *m = *m * b1 + g * (1.0 - b1);
            *v = *v * b2 + g * g * (1.0 - b2);
            *th = *th * wd - *m / ((*v / bc2).sqrt() + eps) * step;
        }
    }
}

/// AdamW with its state sharded over data-parallel peers (`train.zero = 1`, ZeRO stage 1): peer
/// `r` holds the moments (and masters) of a contiguous run of parameters, about 1/N of the
/// elements, on its own device, and updates them there; the updated weights go back to the
/// model every peer reads. One shard is the plain optimizer with its one file. Each parameter is
/// updated once, with the same arithmetic, so N shards give the unsharded bits.
pub struct Sharded<B: Backend> {
    shards: Vec<AdamW<B>>,
    /// Parameter index → the shard that owns it.
    owner: Vec<usize>,
}

impl<B: Backend> Sharded<B> {
    /// The state file of shard `r` of `n` in a checkpoint's `optimizer/` directory.
    pub fn file(dir: &Path, r: usize, n: usize) -> PathBuf {
        if n == 1 {
            dir.join("adamw.safetensors")
        } else {
            dir.join(format!("adamw-{r}-of-{n}.safetensors"))
        }
    }

    /// Contiguous runs of parameters, one per shard, each about 1/n of the elements.
    fn owners(shapes: &[Vec<usize>], n: usize) -> Vec<usize> {
        let sizes: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        let total: usize = sizes.iter().sum();
        let mut before = 0usize;
        sizes
            .iter()
            .map(|&len| {
                // The shard holding this parameter's middle element.
                let r = ((before + len / 2) * n / total.max(1)).min(n - 1);
                before += len;
                r
            })
            .collect()
    }

    fn split(mut shards: Vec<AdamW<B>>, devices: &[B::Device]) -> Self {
        let n = shards.len();
        let owner = Self::owners(&shards[0].shapes, n);
        for (r, s) in shards.iter_mut().enumerate() {
            s.owned = owner.iter().map(|&o| o == r).collect();
            s.device = devices.get(r).cloned();
        }
        Self { shards, owner }
    }

    /// Zero state over `devices.len().max(1)` shards (the first device is the model's).
    pub fn new<AB: AutodiffBackend<InnerBackend = B>>(
        cfg: AdamWConfig,
        model: &Llama<AB>,
        devices: &[B::Device],
    ) -> Self {
        let n = devices.len().max(1);
        Self::split((0..n).map(|_| AdamW::new(cfg, model)).collect(), devices)
    }

    /// The state in a checkpoint's `optimizer/` directory, written by [`Sharded::save`] over as
    /// many shards as `devices`; state written over another number is refused, naming it.
    pub fn resume<AB: AutodiffBackend<InnerBackend = B>>(
        cfg: AdamWConfig,
        model: &Llama<AB>,
        dir: &Path,
        devices: &[B::Device],
    ) -> Result<Self> {
        let n = devices.len().max(1);
        if let Some(r) = (0..n).find(|&r| !Self::file(dir, r, n).is_file()) {
            let found: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.starts_with("adamw"))
                .collect();
            anyhow::bail!(
                "{}: no {} (this run's optimizer state is sharded over {n}: train.zero and devices); the checkpoint holds {}: resume with the sharding it was written with, or --force",
                dir.display(),
                Self::file(dir, r, n).file_name().unwrap_or_default().to_string_lossy(),
                if found.is_empty() { "none".to_string() } else { found.join(", ") }
            );
        }
        let mut sharded = Self::split((0..n).map(|_| AdamW::new(cfg, model)).collect(), devices);
        for (r, a) in sharded.shards.iter_mut().enumerate() {
            a.attach(&Self::file(dir, r, n))?;
        }
        Ok(sharded)
    }

    /// Updates made (every shard makes each one).
    pub fn t(&self) -> usize {
        self.shards[0].t
    }

    pub(crate) fn set_offload(&mut self, offload: bool) {
        self.shards.iter_mut().for_each(|s| s.offload = offload);
    }

    /// Each shard updates its parameters with their gradients (the others pass through).
    pub fn step<AB: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        mut model: Llama<AB>,
        grads: Vec<Option<Tensor<B, 1>>>,
        lr: f64,
        scale: f64,
    ) -> Llama<AB> {
        let n = self.shards.len();
        let len = grads.len();
        let mut per: Vec<Vec<Option<Tensor<B, 1>>>> = (0..n).map(|_| (0..len).map(|_| None).collect()).collect();
        for (k, g) in grads.into_iter().enumerate() {
            per[self.owner[k]][k] = g;
        }
        for (s, g) in self.shards.iter_mut().zip(per) {
            model = s.step(model, g, lr, scale);
        }
        model
    }

    pub fn restore<AB: AutodiffBackend<InnerBackend = B>>(&mut self, model: &Llama<AB>) -> Result<()> {
        self.shards.iter_mut().try_for_each(|s| s.restore(model))
    }

    /// Write every shard's file into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let n = self.shards.len();
        self.shards
            .iter()
            .enumerate()
            .try_for_each(|(r, s)| s.save(&Self::file(dir, r, n)))
    }

    /// Park every shard in its file in `dir` (see [`AdamW::park`]).
    pub fn park(&mut self, dir: &Path) -> Result<()> {
        let n = self.shards.len();
        for (r, s) in self.shards.iter_mut().enumerate() {
            s.park(&Self::file(dir, r, n))?;
        }
        Ok(())
    }
}
