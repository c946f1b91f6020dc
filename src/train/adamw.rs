//! AdamW (decoupled weight decay, Loshchilov & Hutter), the PyTorch formulation, with its
//! state held as flat tensors under the parameters' canonical names so a checkpoint stores it
//! as plain safetensors and a resumed run continues bit for bit.
//!
//! Hand-written rather than burn-optim's `AdamW`: its state is keyed by burn `ParamId`s and
//! saved through burn records, while codespot's checkpoints are HF directories plus
//! safetensors that any tool can read; the update itself is a few tensor ops.

use crate::model::fused;
use crate::model::{Llama, ParamRef};
use crate::source::{HostTensor, Weights};
use anyhow::{Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied to matrices (projections, embeddings), not to norm weights.
    pub weight_decay: f64,
}

pub struct AdamW<B: Backend> {
    pub cfg: AdamWConfig,
    names: Vec<String>,
    decay: Vec<bool>,
    m: Vec<Tensor<B, 1>>,
    v: Vec<Tensor<B, 1>>,
    /// Updates applied so far (the bias-correction step count).
    pub t: usize,
}

impl<B: Backend> AdamW<B> {
    /// Zero state for every parameter of `model`.
    pub fn new<AB: AutodiffBackend<InnerBackend = B>>(cfg: AdamWConfig, model: &Llama<AB>) -> Self {
        let device = model.embed.val().inner().device();
        let mut s = Self {
            cfg,
            names: vec![],
            decay: vec![],
            m: vec![],
            v: vec![],
            t: 0,
        };
        for (name, p) in model.params() {
            let n: usize = p.shape().iter().product();
            s.decay.push(matches!(p, ParamRef::Matrix(_)));
            s.names.push(name);
            s.m.push(Tensor::zeros([n], &device));
            s.v.push(Tensor::zeros([n], &device));
        }
        s
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
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let mut i = 0;
        model.map_params(|_, theta| {
            let k = i;
            i += 1;
            let Some(g) = grads[k].take() else { return theta };
            let device = g.device();
            if fused::is_cpu::<B>() && theta.dtype() == DType::F32 {
                // One pass over the parameter, in place (the same arithmetic as below).
                let mut th = fused::flex(theta.inner());
                let g = fused::flex(g);
                let mut m = fused::flex(std::mem::replace(&mut self.m[k], Tensor::empty([0], &device)));
                let mut v = fused::flex(std::mem::replace(&mut self.v[k], Tensor::empty([0], &device)));
                let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
                let (sc, bc2, step) = (scale as f32, bc2 as f32, (lr / bc1) as f32);
                let wd = if self.decay[k] && c.weight_decay > 0.0 {
                    (1.0 - lr * c.weight_decay) as f32
                } else {
                    1.0
                };
                let (ms, vs) = (m.storage_mut::<f32>(), v.storage_mut::<f32>());
                th.storage_mut::<f32>()
                    .par_chunks_mut(1 << 14)
                    .zip(fused::values(&g).par_chunks(1 << 14))
                    .zip(ms.par_chunks_mut(1 << 14).zip(vs.par_chunks_mut(1 << 14)))
                    .for_each(|((th, g), (m, v))| adamw_chunk(th, g, m, v, [sc, b1, b2, bc2, eps, step, wd]));
                self.m[k] = fused::unflex(m);
                self.v[k] = fused::unflex(v);
                return Tensor::from_inner(fused::unflex(th));
            }
            let g = if scale == 1.0 { g } else { g.mul_scalar(scale) };
            // The update in f32 whatever the weights' dtype (map_params casts back).
            let mut th = crate::model::dtype::widen(theta.inner());
            if self.decay[k] && c.weight_decay > 0.0 {
                th = th.mul_scalar(1.0 - lr * c.weight_decay);
            }
            let m = std::mem::replace(&mut self.m[k], Tensor::empty([0], &device));
            let v = std::mem::replace(&mut self.v[k], Tensor::empty([0], &device));
            let m = m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
            let v = v.mul_scalar(c.beta2) + g.powi_scalar(2).mul_scalar(1.0 - c.beta2);
            let denom = v.clone().div_scalar(bc2).sqrt().add_scalar(c.eps);
            let th = th - m.clone().div(denom).mul_scalar(lr / bc1);
            self.m[k] = m;
            self.v[k] = v;
            Tensor::from_inner(th)
        })
    }

    /// The state on the host: `m.<name>` and `v.<name>` with the parameters' shapes.
    pub fn to_host<AB: AutodiffBackend<InnerBackend = B>>(&self, model: &Llama<AB>) -> Weights {
        let mut w = Weights::default();
        for (k, (name, p)) in model.params().into_iter().enumerate() {
            let shape = p.shape();
            for (prefix, t) in [("m", &self.m[k]), ("v", &self.v[k])] {
                let data = t
                    .clone()
                    .into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .expect("f32 state");
                w.insert(format!("{prefix}.{name}"), HostTensor::new(shape.clone(), data));
            }
        }
        w
    }

    /// State read back from [`AdamW::to_host`]'s tensors; every parameter must be present
    /// with its shape.
    pub fn from_host<AB: AutodiffBackend<InnerBackend = B>>(
        cfg: AdamWConfig,
        model: &Llama<AB>,
        w: &Weights,
        t: usize,
        what: &str,
    ) -> Result<Self> {
        let mut s = Self::new(cfg, model);
        s.t = t;
        let device = model.embed.val().inner().device();
        for (k, (name, p)) in model.params().into_iter().enumerate() {
            let shape = p.shape();
            for prefix in ["m", "v"] {
                let key = format!("{prefix}.{name}");
                let h = w
                    .get(&key)
                    .with_context(|| format!("{what}: missing optimizer tensor '{key}'"))?;
                anyhow::ensure!(
                    h.shape == shape,
                    "{what}: optimizer tensor '{key}' has shape {:?}, expected {shape:?}",
                    h.shape
                );
                let n = h.data.len();
                let t =
                    Tensor::<B, 1>::from_data(TensorData::new(h.data.clone(), [n]).convert::<B::FloatElem>(), &device);
                if prefix == "m" {
                    s.m[k] = t;
                } else {
                    s.v[k] = t;
                }
            }
        }
        Ok(s)
    }
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
