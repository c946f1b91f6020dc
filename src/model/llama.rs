//! The Llama architecture in burn: RMSNorm, RoPE (half or interleaved), grouped-query
//! attention with a KV cache, SwiGLU MLP, tied or untied output embedding.
//!
//! Weights keep the HF layout (`[out, in]` for projections) so canonical names, per-head
//! slicing and export stay one-to-one with `transformers`.

use super::arch::{self, ModuleKind as K};
use super::config::{LlamaConfig, RopeLayout};
use super::dtype::{like, widen, Autocast, Dtype};
use super::fused;
use crate::source::{HostTensor, Weights};
use anyhow::{bail, Result};
use burn::module::{Module, Param};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Default [`Llama::keep_blocks`]: the top blocks whose autodiff graphs a backward pass
/// (`model::backprop`) keeps from the forward pass instead of re-running them (each ~75 MB at
/// batch 4 × 256 on the default model; 6 keeps `bench score` under 2.5 GB there).
pub(crate) const DEFAULT_KEEP_BLOCKS: usize = 6;

/// One transformer block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub attn_norm: Param<Tensor<B, 1>>,
    pub q: Param<Tensor<B, 2>>,
    pub k: Param<Tensor<B, 2>>,
    pub v: Param<Tensor<B, 2>>,
    pub o: Param<Tensor<B, 2>>,
    pub mlp_norm: Param<Tensor<B, 1>>,
    pub gate: Param<Tensor<B, 2>>,
    pub up: Param<Tensor<B, 2>>,
    pub down: Param<Tensor<B, 2>>,
    /// The q, k and v projections' biases (Qwen2).
    pub q_bias: Option<Param<Tensor<B, 1>>>,
    pub k_bias: Option<Param<Tensor<B, 1>>>,
    pub v_bias: Option<Param<Tensor<B, 1>>>,
}

/// A Llama causal language model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub embed: Param<Tensor<B, 2>>,
    pub layers: Vec<Block<B>>,
    pub norm: Param<Tensor<B, 1>>,
    /// `None` when the output projection is tied to `embed`.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    #[module(skip)]
    pub config: LlamaConfig,
    /// Backward passes keep the autodiff graphs of this many top blocks from the forward pass
    /// and re-run the others (memory against speed; the backward pass is in `backprop.rs`).
    #[module(skip)]
    pub keep_blocks: usize,
    /// Backward passes on the f32 CPU backend use the hand-written block
    /// (`model::fused`) instead of burn's autodiff (`false`: burn's, the tests' reference).
    #[module(skip)]
    pub fused: bool,
    /// The dtype the weights are held and computed in.
    #[module(skip)]
    pub dtype: Dtype,
    /// Matrix products in bf16 around the f32 weights on the hand-written CPU path
    /// ([`Autocast`]).
    #[module(skip)]
    pub autocast: Autocast,
    /// The weights' bf16 packed copies under autocast (`fused::PackCache`).
    #[module(skip)]
    pub packs: fused::PackCache,
}

/// Keys and values of past positions, per layer (`[batch, past, kv_heads, head_dim]`).
#[derive(Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<KvSlot<B>>,
    /// Number of positions already cached.
    pub len: usize,
    /// Left padding of each row of a batch of prompts of different lengths: row `r`'s first
    /// `pads[r]` positions are padding, masked from every query, and its token at position `j`
    /// takes RoPE position `j − pads[r]`, as alone. Empty: no row is padded.
    pads: Vec<usize>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| None).collect(),
            len: 0,
            pads: Vec::new(),
        }
    }

    /// An empty cache for a batch whose row `r` is left-padded with `pads[r]` tokens.
    pub fn padded(n_layers: usize, pads: Vec<usize>) -> Self {
        Self {
            pads,
            ..Self::new(n_layers)
        }
    }

    /// Keep (or repeat) the batch rows `rows`, in that order: finished rows leave a batch, and
    /// one prompt's cache serves several samples.
    pub fn select_rows(&mut self, rows: &[usize]) {
        if !self.pads.is_empty() {
            self.pads = rows.iter().map(|&r| self.pads[r]).collect();
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let idx = Tensor::<B, 1, Int>::from_data(
                TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [rows.len()])
                    .convert::<B::IntElem>(),
                &k.device(),
            );
            *k = k.clone().select(0, idx.clone());
            *v = v.clone().select(0, idx);
        }
    }
}

/// A borrowed parameter of either rank.
pub enum ParamRef<'a, B: Backend> {
    Vector(&'a Param<Tensor<B, 1>>),
    Matrix(&'a Param<Tensor<B, 2>>),
}

impl<B: Backend> ParamRef<'_, B> {
    /// The parameter's id (what optimizers and burn's gradient containers key it by).
    pub fn id(&self) -> burn::module::ParamId {
        match self {
            ParamRef::Vector(p) => p.id,
            ParamRef::Matrix(p) => p.id,
        }
    }

    /// The value, flattened to one dimension.
    pub fn flat(&self) -> Tensor<B, 1> {
        match self {
            ParamRef::Vector(p) => p.val(),
            ParamRef::Matrix(p) => p.val().flatten(0, 1),
        }
    }
    pub fn shape(&self) -> Vec<usize> {
        match self {
            ParamRef::Vector(p) => p.val().dims().to_vec(),
            ParamRef::Matrix(p) => p.val().dims().to_vec(),
        }
    }
    /// The values on the host, flat, in f32.
    pub fn host_values(&self) -> Vec<f32> {
        self.flat()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 data")
    }
}

fn param<B: Backend, const D: usize>(data: TensorData, device: &B::Device, dtype: Dtype) -> Param<Tensor<B, D>> {
    Param::from_tensor(dtype.apply(Tensor::<B, D>::from_data(data.convert::<B::FloatElem>(), device)))
}

impl<B: Backend> Llama<B> {
    /// Build from canonical host weights, checking every name and shape.
    pub fn from_weights(config: &LlamaConfig, w: &Weights, device: &B::Device) -> Result<Self> {
        Self::from_weights_as(config, w, device, Dtype::F32)
    }

    /// [`Llama::from_weights`] with the weights held in `dtype`.
    pub fn from_weights_as(config: &LlamaConfig, w: &Weights, device: &B::Device, dtype: Dtype) -> Result<Self> {
        Self::build(config, device, dtype, |name| {
            w.get(name).map(|t| (t.shape.clone(), t.data.clone()))
        })
    }

    /// [`Llama::from_weights`], consuming the host weights tensor by tensor (peak memory: the
    /// weights once, not twice).
    pub(crate) fn from_weights_owned(
        config: &LlamaConfig,
        mut w: Weights,
        device: &B::Device,
        dtype: Dtype,
    ) -> Result<Self> {
        Self::build(config, device, dtype, |name| {
            w.tensors.remove(name).map(|t| (t.shape, t.data))
        })
    }

    fn build(
        config: &LlamaConfig,
        device: &B::Device,
        dtype: Dtype,
        mut get: impl FnMut(&str) -> Option<(Vec<usize>, Vec<f32>)>,
    ) -> Result<Self> {
        config.validate()?;
        let shapes: std::collections::HashMap<String, Vec<usize>> = config.tensor_shapes().into_iter().collect();
        let mut take = |name: String| -> Result<TensorData> {
            let shape = &shapes[&name];
            let Some((s, data)) = get(&name) else {
                bail!("missing tensor '{name}'");
            };
            if s != *shape {
                bail!("tensor '{name}' has shape {s:?}, expected {shape:?}");
            }
            Ok(TensorData::new(data, s))
        };
        let embed = param::<B, 2>(take(arch::EMBED.hf.into())?, device, dtype);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let mut t = |kind: K| take(arch::layer_name(l, &arch::BLOCK[arch::block_slot(kind)]));
            layers.push(Block {
                attn_norm: param(t(K::AttnNorm)?, device, dtype),
                q: param(t(K::Q)?, device, dtype),
                k: param(t(K::K)?, device, dtype),
                v: param(t(K::V)?, device, dtype),
                o: param(t(K::O)?, device, dtype),
                mlp_norm: param(t(K::MlpNorm)?, device, dtype),
                gate: param(t(K::Gate)?, device, dtype),
                up: param(t(K::Up)?, device, dtype),
                down: param(t(K::Down)?, device, dtype),
                q_bias: None,
                k_bias: None,
                v_bias: None,
            });
        }
        let norm = param(take(arch::FINAL_NORM.hf.into())?, device, dtype);
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(param(take(arch::LM_HEAD.hf.into())?, device, dtype))
        };
        if config.qkv_bias {
            for (l, blk) in layers.iter_mut().enumerate() {
                let mut t = |kind: K| take(arch::layer_name(l, &arch::BIASES[arch::bias_slot(kind)]));
                blk.q_bias = Some(param(t(K::Q)?, device, dtype));
                blk.k_bias = Some(param(t(K::K)?, device, dtype));
                blk.v_bias = Some(param(t(K::V)?, device, dtype));
            }
        }
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            config: config.clone(),
            keep_blocks: DEFAULT_KEEP_BLOCKS,
            fused: true,
            dtype,
            autocast: Autocast::Off,
            packs: Default::default(),
        })
    }

    /// Every parameter with its canonical name, in a stable order.
    pub fn params(&self) -> Vec<(String, ParamRef<'_, B>)> {
        let mut v = vec![(arch::EMBED.hf.to_string(), ParamRef::Matrix(&self.embed))];
        for (l, b) in self.layers.iter().enumerate() {
            for (s, r) in arch::BLOCK.iter().zip(b.param_refs()) {
                v.push((arch::layer_name(l, s), r));
            }
        }
        v.push((arch::FINAL_NORM.hf.into(), ParamRef::Vector(&self.norm)));
        if let Some(h) = &self.lm_head {
            v.push((arch::LM_HEAD.hf.into(), ParamRef::Matrix(h)));
        }
        for (l, b) in self.layers.iter().enumerate() {
            for (s, r) in b.bias_refs() {
                v.push((arch::layer_name(l, s), r));
            }
        }
        v
    }

    /// Replace every parameter's value through `f(name, flat value) -> flat value` (same
    /// length). Parameter ids are kept, so optimizer state still matches, and a parameter that
    /// required gradients still does (as a fresh leaf when `f` returns an untracked tensor).
    pub fn map_params(self, mut f: impl FnMut(&str, Tensor<B, 1>) -> Tensor<B, 1>) -> Self {
        fn m1<B: Backend>(
            p: Param<Tensor<B, 1>>,
            name: &str,
            f: &mut impl FnMut(&str, Tensor<B, 1>) -> Tensor<B, 1>,
        ) -> Param<Tensor<B, 1>> {
            p.map(|t| {
                let req = t.is_require_grad();
                let dt = t.dtype();
                let out = f(name, t);
                let out = if out.dtype() == dt { out } else { out.cast(dt) };
                out.set_require_grad(req)
            })
        }
        fn m2<B: Backend>(
            p: Param<Tensor<B, 2>>,
            name: &str,
            f: &mut impl FnMut(&str, Tensor<B, 1>) -> Tensor<B, 1>,
        ) -> Param<Tensor<B, 2>> {
            p.map(|t| {
                let [r, c] = t.dims();
                let req = t.is_require_grad();
                let dt = t.dtype();
                let out = f(name, t.flatten(0, 1));
                let out = if out.dtype() == dt { out } else { out.cast(dt) };
                out.reshape([r, c]).set_require_grad(req)
            })
        }
        let n = |l: usize, kind: K| arch::layer_name(l, &arch::BLOCK[arch::block_slot(kind)]);
        let nb = |l: usize, kind: K| arch::layer_name(l, &arch::BIASES[arch::bias_slot(kind)]);
        let embed = m2(self.embed, arch::EMBED.hf, &mut f);
        let layers: Vec<Block<B>> = self
            .layers
            .into_iter()
            .enumerate()
            .map(|(l, b)| Block {
                attn_norm: m1(b.attn_norm, &n(l, K::AttnNorm), &mut f),
                q: m2(b.q, &n(l, K::Q), &mut f),
                k: m2(b.k, &n(l, K::K), &mut f),
                v: m2(b.v, &n(l, K::V), &mut f),
                o: m2(b.o, &n(l, K::O), &mut f),
                mlp_norm: m1(b.mlp_norm, &n(l, K::MlpNorm), &mut f),
                gate: m2(b.gate, &n(l, K::Gate), &mut f),
                up: m2(b.up, &n(l, K::Up), &mut f),
                down: m2(b.down, &n(l, K::Down), &mut f),
                q_bias: b.q_bias,
                k_bias: b.k_bias,
                v_bias: b.v_bias,
            })
            .collect();
        let norm = m1(self.norm, arch::FINAL_NORM.hf, &mut f);
        let lm_head = self.lm_head.map(|h| m2(h, arch::LM_HEAD.hf, &mut f));
        // The biases last, as in [`Llama::params`].
        let layers = layers
            .into_iter()
            .enumerate()
            .map(|(l, b)| Block {
                q_bias: b.q_bias.map(|p| m1(p, &nb(l, K::Q), &mut f)),
                k_bias: b.k_bias.map(|p| m1(p, &nb(l, K::K), &mut f)),
                v_bias: b.v_bias.map(|p| m1(p, &nb(l, K::V), &mut f)),
                ..b
            })
            .collect();
        Self {
            embed,
            layers,
            norm,
            lm_head,
            config: self.config,
            keep_blocks: self.keep_blocks,
            fused: self.fused,
            dtype: self.dtype,
            autocast: self.autocast,
            packs: self.packs,
        }
    }

    /// Copy every parameter back to the host under its canonical name.
    pub fn to_weights(&self) -> Weights {
        let mut w = Weights::default();
        for (name, p) in self.params() {
            w.insert(name, HostTensor::new(p.shape(), p.host_values()));
        }
        w
    }

    /// Every parameter as a tensor for a safetensors file, copied to the host only when the
    /// writer reaches it (so writing needs no second copy of the whole model).
    pub(crate) fn lazy_weights(&self) -> std::collections::BTreeMap<String, crate::source::weights::Lazy<'_>> {
        self.params()
            .into_iter()
            .map(|(name, p)| {
                (
                    name,
                    crate::source::weights::Lazy::fetch(p.shape(), move || p.host_values()),
                )
            })
            .collect()
    }

    pub fn num_params(&self) -> usize {
        self.params()
            .iter()
            .map(|(_, p)| p.shape().iter().product::<usize>())
            .sum()
    }

    /// RoPE tables for positions `start..start+len`, repeated over `heads` heads and flattened
    /// to `[1, len·heads·head_dim]` (so they broadcast over the batch as one shared row, the
    /// fast broadcast of CPU backends), each scaled by `scale` (the attention's 1/√d is folded
    /// into the query's tables).
    ///
    /// One row per entry of `shifts`: row `r`'s position `p` takes the angle of `p − shifts[r]`
    /// (left-padded batches; a padding position's angle is position 0's, and it is masked).
    fn rope_tables(
        &self,
        start: usize,
        len: usize,
        heads: usize,
        scale: f64,
        shifts: &[usize],
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let hd = self.config.head_dim;
        let freqs = self.config.rope_dim_freqs();
        let n = len * heads * hd;
        let mut cos = Vec::with_capacity(shifts.len() * n);
        let mut sin = Vec::with_capacity(shifts.len() * n);
        for &shift in shifts {
            for p in start..start + len {
                for _ in 0..heads {
                    for &f in &freqs {
                        let a = p.saturating_sub(shift) as f64 * f;
                        cos.push((a.cos() * scale) as f32);
                        sin.push((a.sin() * scale) as f32);
                    }
                }
            }
        }
        let mk = |v: Vec<f32>| {
            self.dtype.apply(Tensor::<B, 2>::from_data(
                TensorData::new(v, [shifts.len(), n]).convert::<B::FloatElem>(),
                device,
            ))
        };
        (mk(cos), mk(sin))
    }

    /// The rotation of RoPE as a `[head_dim, head_dim]` matrix `R` (entries 0, ±1), so that
    /// `rotate(x) = x · R`: `[-x₂, x₁]` for the half layout, `[-x₁, x₀, -x₃, x₂, …]` for the
    /// interleaved one. A small matmul instead of slices and a concatenation, whose copies
    /// dominate on CPU backends.
    fn rope_rotation(&self, device: &B::Device) -> Tensor<B, 2> {
        let hd = self.config.head_dim;
        let mut r = vec![0f32; hd * hd];
        for i in 0..hd {
            // Output column i takes ±x[j].
            let (j, sign) = match self.config.rope_layout {
                RopeLayout::Half if i < hd / 2 => (i + hd / 2, -1.0),
                RopeLayout::Half => (i - hd / 2, 1.0),
                RopeLayout::Interleaved if i % 2 == 0 => (i + 1, -1.0),
                RopeLayout::Interleaved => (i - 1, 1.0),
            };
            r[j * hd + i] = sign;
        }
        self.dtype.apply(Tensor::from_data(
            TensorData::new(r, [hd, hd]).convert::<B::FloatElem>(),
            device,
        ))
    }

    /// RMSNorm over the last dimension of `[tokens, hidden]`.
    pub(crate) fn rms_norm(&self, x: Tensor<B, 2>, w: &Param<Tensor<B, 1>>) -> Tensor<B, 2> {
        rms_norm(x, w, self.config.rms_norm_eps, self.config.arch.norm_plus_one())
    }

    /// The per-call constants of the blocks for `b` rows of `t` new tokens after `past` cached ones.
    pub(crate) fn block_context(&self, b: usize, t: usize, past: usize, device: &B::Device) -> BlockContext<B> {
        self.block_context_padded(b, t, past, &[], device)
    }

    /// [`Llama::block_context`] for a batch whose row `r` starts with `pads[r]` padding
    /// positions (empty: none): the mask is then one row per batch row, hiding the padding
    /// keys as well as the future, and the RoPE tables are shifted per row.
    fn block_context_padded(
        &self,
        b: usize,
        t: usize,
        past: usize,
        pads: &[usize],
        device: &B::Device,
    ) -> BlockContext<B> {
        let cfg = &self.config;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let total = past + t;
        let padded = pads.iter().any(|&p| p > 0);
        let shifts = if padded { pads } else { &[0] };
        let (cos, sin) = self.rope_tables(past, t, nkv, 1.0, shifts, device);
        let (cos_q, sin_q) = self.rope_tables(past, t, nh, 1.0 / (hd as f64).sqrt(), shifts, device);
        let mask = (t > 1 || padded).then(|| {
            let mut m = vec![0f32; shifts.len() * t * total];
            for (r, &pad) in shifts.iter().enumerate() {
                for i in 0..t {
                    let row = &mut m[(r * t + i) * total..(r * t + i + 1) * total];
                    // A padding query sees only itself: a row with every key masked would be
                    // −inf throughout in f16 (−1e9 overflows) and softmax would make NaN.
                    for (j, x) in row.iter_mut().enumerate() {
                        if (j < pad && j != past + i) || j > past + i {
                            *x = -1e9;
                        }
                    }
                }
            }
            self.dtype.apply(Tensor::<B, 2>::from_data(
                TensorData::new(m, [shifts.len(), t * total]).convert::<B::FloatElem>(),
                device,
            ))
        });
        BlockContext {
            b,
            t,
            past,
            cos,
            sin,
            cos_q,
            sin_q,
            rot: self.rope_rotation(device),
            mask,
        }
    }

    /// Embeddings of `tokens` as `[batch·seq, hidden]`.
    pub fn embed_tokens(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t] = tokens.dims();
        let x = self.embed.val().select(0, tokens.reshape([b * t]));
        match self.config.embed_scale() {
            Some(s) => x * s,
            None => x,
        }
    }

    /// Hidden states after the final norm: `[batch, seq, hidden]`.
    ///
    /// Activations are kept token-major (`[batch·seq, features]`, contiguous) so every
    /// projection is one 2-D matmul and no reshape of a transposed tensor forces a copy;
    /// attention broadcasts each key/value head over its query group instead of repeating it.
    pub(crate) fn hidden(&self, tokens: Tensor<B, 2, Int>, mut cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        if cache.is_none() && self.fused_on::<B>() {
            return self.hidden_fused(tokens);
        }
        let device = tokens.device();
        let [b, t] = tokens.dims();
        let past = cache.as_ref().map(|c| c.len).unwrap_or(0);
        let pads = cache.as_ref().map(|c| c.pads.clone()).unwrap_or_default();
        assert!(
            pads.is_empty() || pads.len() == b,
            "a padded cache has one pad count per row"
        );
        let ctx = self.block_context_padded(b, t, past, &pads, &device);
        let mut x = self.embed_tokens(tokens);
        for (l, blk) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            x = blk.forward(&self.config, x, &ctx, slot);
        }
        if let Some(c) = cache {
            c.len = past + t;
        }
        self.rms_norm(x, &self.norm).reshape([b, t, self.config.hidden_size])
    }

    /// Whether this model's passes on backend `C` (its own, or its inner one under autodiff) go
    /// through the hand-written f32 CPU block: `fused` is on, the weights are f32 and `C` is the
    /// CPU backend.
    pub(crate) fn fused_on<C: Backend>(&self) -> bool {
        self.fused_arch() && fused::is_cpu::<C>()
    }

    /// [`Llama::fused_on`] but for the backend: the hand-written block (every supported
    /// architecture: Qwen2's biases, Gemma's norms, GELU and embedding scale), in f32, and not
    /// turned off.
    fn fused_arch(&self) -> bool {
        self.fused && self.dtype == Dtype::F32 && fused::hand_written()
    }

    /// Runs the matrix products under `autocast`. bf16 autocast is the hand-written CPU path's
    /// (Llama and Mistral, f32 weights, the CPU backend); elsewhere it is an error that says
    /// what to use instead.
    pub fn set_autocast(&mut self, autocast: Autocast) -> anyhow::Result<()> {
        if autocast != Autocast::Off && self.dtype != Dtype::F32 {
            anyhow::bail!(
                "autocast = \"{}\" keeps the weights in f32 and rounds the products' inputs; these weights are {} (dtype): use dtype = \"f32\" with autocast, or dtype alone",
                autocast.name(),
                self.dtype.name()
            );
        }
        if autocast != Autocast::Off && !(self.fused_arch() && fused::cpu_or_autodiff_cpu::<B>()) {
            anyhow::bail!(
                "autocast = \"{}\" runs on the hand-written CPU path only (weights in f32 on the CPU backend); \
                 this model is {:?} with {} weights on another path: on a GPU hold the weights in bf16 (dtype = \"bf16\") instead",
                autocast.name(),
                self.config.arch,
                self.dtype.name()
            );
        }
        self.autocast = autocast;
        Ok(())
    }

    /// Whether a forward pass without a cache takes the hand-written CPU block.
    pub(crate) fn uses_fused_forward(&self) -> bool {
        self.fused_on::<B>()
    }

    /// How the hand-written path computes its matrix products, in words.
    pub fn products(&self) -> String {
        match (self.autocast, super::bf16::unit()) {
            (Autocast::Off, _) => "fused f32 CPU block".into(),
            (Autocast::Bf16, Some(u)) => format!("fused CPU block, bf16 products on {}", u.name()),
            (Autocast::Bf16, None) => {
                "fused f32 CPU block (autocast bf16 asked, but this CPU has neither AMX nor AVX512-BF16)".into()
            }
        }
    }

    /// [`Llama::hidden`] without a cache through the hand-written f32 CPU block
    /// ([`fused`]), on the backend's own weight storage.
    fn hidden_fused(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let device = tokens.device();
        let [b, t] = tokens.dims();
        let ids: Vec<i64> = tokens.into_data().convert::<i64>().into_vec().expect("token ids");
        let cfg = &self.config;
        let d = cfg.hidden_size;
        let dm = fused::Dims::new(cfg, b, t).autocast(self.autocast);
        let rope = fused::Rope::new(cfg, t);
        let ids: Vec<u32> = ids.into_iter().map(|t| t as u32).collect();
        let mut x = fused::embed_rows(
            fused::values(&fused::flex(self.embed.val())),
            &ids,
            d,
            cfg.embed_scale(),
        );
        for blk in &self.layers {
            let (storage, bias) = (blk.storage(), blk.bias_storage());
            let w = fused::BlockWeights::packed(&storage, &dm, &self.packs).with(&dm, bias.as_ref());
            x = w.forward(&dm, &rope, x).0;
        }
        let norm = fused::flex(self.norm.val());
        let (h, _) = fused::final_norm(&x, &fused::norm_scale(fused::values(&norm), dm.plus_one), dm.eps);
        Tensor::<B, 1>::from_data(TensorData::new(h, [b * t * d]), &device).reshape([b, t, d])
    }

    /// Project hidden states to vocabulary logits.
    pub(crate) fn logits_of(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = h.dims();
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        if let (Autocast::Bf16, Some(unit), true) = (self.autocast, super::bf16::unit(), self.fused_on::<B>()) {
            // The head's product in bf16 too, on its packed copy (kept across calls).
            let device = h.device();
            let hv = fused::flex(h.reshape([b * t, d]));
            let w = fused::flex(head.val());
            let logits = fused::head_logits(unit, fused::values(&hv), &w, &self.packs, d);
            let v = logits.len() / (b * t);
            return Tensor::<B, 1>::from_data(TensorData::new(logits, [b * t * v]), &device).reshape([b, t, v]);
        }
        // Log-probabilities are taken in f32 whatever the weights' dtype.
        let logits = widen(linear(h.reshape([b * t, d]), head));
        let v = logits.dims()[1];
        logits.reshape([b, t, v])
    }

    /// Logits `[batch, seq, vocab]`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let h = self.hidden(tokens, cache);
        self.logits_of(h)
    }

    /// Negative log-likelihood of each next token: `[batch, seq-1]` (natural log).
    pub fn token_nll(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t] = tokens.dims();
        let inputs = tokens.clone().narrow(1, 0, t - 1);
        let targets = tokens.narrow(1, 1, t - 1);
        let logp = log_softmax(self.forward(inputs, None), 2);
        logp.gather(2, targets.reshape([b, t - 1, 1])).reshape([b, t - 1]).neg()
    }

    /// Mean next-token cross-entropy over the batch (a one-element tensor).
    pub fn loss(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        self.token_nll(tokens).mean()
    }

    /// For each parameter (in [`Llama::params`] order), the sum over `tokens` of the squared
    /// input it multiplies, per input channel: Σ_t X_tj² for a projection `[out, in]` (length
    /// `in`), Σ_t x̂_tj² for a norm weight (x̂ = the normalised stream it scales), and for the
    /// embedding the count of each token id (its input is one-hot; length `vocab`). A tied
    /// embedding is counted as the input embedding. In f32, through burn's ops (forward only).
    pub(crate) fn input_sq_sums(&self, tokens: Tensor<B, 2, Int>) -> Vec<Tensor<B, 1>> {
        let cfg = &self.config;
        let device = tokens.device();
        let [b, t] = tokens.dims();
        let eps = cfg.rms_norm_eps;
        let colsq = |x: &Tensor<B, 2>| widen(x.clone()).powi_scalar(2).sum_dim(0).squeeze_dim::<1>(0);
        let normed = |x: &Tensor<B, 2>| {
            let x = widen(x.clone());
            let ms = x.clone().powi_scalar(2).mean_dim(1);
            x * (ms + eps).sqrt().recip()
        };
        let ids: Vec<i64> = tokens.to_data().convert::<i64>().into_vec().expect("token ids");
        // A row's input is one-hot, times the embedding scale where there is one.
        let s2 = cfg.embed_scale().map_or(1.0, |s| (s * s) as f32);
        let mut counts = vec![0f32; cfg.vocab_size];
        for &i in &ids {
            counts[i as usize] += s2;
        }
        let mut out = vec![Tensor::<B, 1>::from_data(
            TensorData::new(counts, [cfg.vocab_size]),
            &device,
        )];
        let ctx = self.block_context(b, t, 0, &device);
        let mut x = self.embed_tokens(tokens);
        for blk in &self.layers {
            let mut seen: Vec<(Site, Tensor<B, 1>)> = Vec::with_capacity(6);
            x = blk.forward_observed(cfg, x, &ctx, None, &mut |site, a| {
                let v = match site {
                    Site::AttnResidual | Site::MlpResidual => colsq(&normed(a)),
                    _ => colsq(a),
                };
                seen.push((site, v));
            });
            let at = |s: Site| {
                seen.iter()
                    .find(|(x, _)| *x == s)
                    .expect("every site is shown")
                    .1
                    .clone()
            };
            out.extend(K::LAYER_KINDS.map(|k| at(Site::input_of(k))));
        }
        out.push(colsq(&normed(&x)));
        if self.lm_head.is_some() {
            out.push(colsq(&self.rms_norm(x, &self.norm)));
        }
        // A bias's input is 1 at every token: Σ_t 1² = the token count, for each element.
        for blk in &self.layers {
            for (_, r) in blk.bias_refs() {
                let len = r.shape()[0];
                out.push(Tensor::full([len], (b * t) as f32, &device));
            }
        }
        out
    }
}

/// What every block of one forward call shares: RoPE tables, rotation, causal mask.
pub struct BlockContext<B: Backend> {
    b: usize,
    t: usize,
    past: usize,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    cos_q: Tensor<B, 2>,
    sin_q: Tensor<B, 2>,
    rot: Tensor<B, 2>,
    mask: Option<Tensor<B, 2>>,
}

/// An activation inside a block, as [`Block::forward_observed`] shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Site {
    /// The residual stream entering the attention norm.
    AttnResidual,
    /// The attention norm's output: the input of q, k and v.
    AttnInput,
    /// The heads' outputs, concatenated: the input of o.
    OInput,
    /// The residual stream entering the MLP norm.
    MlpResidual,
    /// The MLP norm's output: the input of gate and up.
    MlpInput,
    /// silu(gate) · up: the input of down.
    DownInput,
}

impl Site {
    /// What a block slot of `kind` multiplies: a projection's input, a norm's residual stream.
    pub(crate) fn input_of(kind: K) -> Site {
        match kind {
            K::AttnNorm => Site::AttnResidual,
            K::Q | K::K | K::V => Site::AttnInput,
            K::O => Site::OInput,
            K::MlpNorm => Site::MlpResidual,
            K::Gate | K::Up => Site::MlpInput,
            K::Down => Site::DownInput,
            K::Embed | K::FinalNorm | K::LmHead => {
                unreachable!("{kind:?} is not a block slot")
            }
        }
    }
}

/// One layer's cached keys and values, in the layout attention reads them,
/// `[batch, kv_heads, 1, capacity, head_dim]`: positions `0..len` hold data, the rest is room
/// to grow into, so a decoding step writes its token in place instead of copying the cache.
pub(crate) type KvSlot<B> = Option<(Tensor<B, 5>, Tensor<B, 5>)>;

/// Positions a KV buffer is rounded up to when it is made or grows.
const KV_CHUNK: usize = 256;

/// Write `k`, `v` (`[b, t, kv_heads, head_dim]`, positions `past..past+t`) into `slot`'s
/// buffers, growing them (doubling) when full, and return views of positions `0..past+t`,
/// `[b, kv_heads, 1, past+t, head_dim]`. The buffers are written in place when nothing else
/// holds them (burn-flex copies on write otherwise, so a cloned cache never changes its source).
fn kv_append<B: Backend>(
    slot: &mut KvSlot<B>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    past: usize,
) -> (Tensor<B, 5>, Tensor<B, 5>) {
    let [b, t, nkv, hd] = k.dims();
    let total = past + t;
    let layout = |x: Tensor<B, 4>| x.permute([0, 2, 1, 3]).reshape([b, nkv, 1, t, hd]);
    let (k, v) = (layout(k), layout(v));
    let device = k.device();
    let room = |cap: usize| total.max(cap).div_ceil(KV_CHUNK) * KV_CHUNK;
    let (kb, vb) = match slot.take() {
        Some((kb, vb)) if kb.dims()[3] >= total => (kb, vb),
        old => {
            let cap = room(old.as_ref().map_or(0, |(kb, _)| 2 * kb.dims()[3]));
            let fresh = || Tensor::<B, 5>::zeros([b, nkv, 1, cap, hd], (&device, k.dtype()));
            match old {
                Some((kb, vb)) if past > 0 => {
                    let keep = |x: Tensor<B, 5>| x.narrow(3, 0, past);
                    let at = [0..b, 0..nkv, 0..1, 0..past, 0..hd];
                    (
                        fresh().slice_assign(at.clone(), keep(kb)),
                        fresh().slice_assign(at, keep(vb)),
                    )
                }
                _ => (fresh(), fresh()),
            }
        }
    };
    let at = [0..b, 0..nkv, 0..1, past..total, 0..hd];
    let (kb, vb) = (kb.slice_assign(at.clone(), k), vb.slice_assign(at, v));
    *slot = Some((kb.clone(), vb.clone()));
    (kb.narrow(3, 0, total), vb.narrow(3, 0, total))
}

impl<B: Backend> Block<B> {
    /// The block's parameters' storage on the f32 CPU backend, in [`arch::BLOCK`] order
    /// (shared, not copied; for [`fused::BlockWeights::of`]).
    pub fn storage(&self) -> [fused::FlexTensor; 9] {
        self.param_refs().map(|p| fused::flex(p.flat()))
    }

    /// The block's q, k and v biases' storage on the f32 CPU backend (None without biases).
    pub(crate) fn bias_storage(&self) -> Option<[fused::FlexTensor; 3]> {
        match (&self.q_bias, &self.k_bias, &self.v_bias) {
            (Some(q), Some(k), Some(v)) => Some([q, k, v].map(|p| fused::flex(p.val()))),
            _ => None,
        }
    }

    /// The parameter of the slot of `kind` (`bias`: the projection's bias, None where the
    /// block has none): how the slots of [`arch::BLOCK`] and [`arch::BIASES`] reach `Block`'s
    /// fields for reading. Building (`Llama::from_weights`), `Llama::map_params` and
    /// `Block::bias_storage` name the fields by kind too.
    pub(crate) fn slot(&self, kind: K, bias: bool) -> Option<ParamRef<'_, B>> {
        let p = match (kind, bias) {
            (K::AttnNorm, false) => ParamRef::Vector(&self.attn_norm),
            (K::Q, false) => ParamRef::Matrix(&self.q),
            (K::K, false) => ParamRef::Matrix(&self.k),
            (K::V, false) => ParamRef::Matrix(&self.v),
            (K::O, false) => ParamRef::Matrix(&self.o),
            (K::MlpNorm, false) => ParamRef::Vector(&self.mlp_norm),
            (K::Gate, false) => ParamRef::Matrix(&self.gate),
            (K::Up, false) => ParamRef::Matrix(&self.up),
            (K::Down, false) => ParamRef::Matrix(&self.down),
            (K::Q, true) => ParamRef::Vector(self.q_bias.as_ref()?),
            (K::K, true) => ParamRef::Vector(self.k_bias.as_ref()?),
            (K::V, true) => ParamRef::Vector(self.v_bias.as_ref()?),
            _ => return None,
        };
        Some(p)
    }

    /// The block's parameters in [`arch::BLOCK`] order.
    pub(crate) fn param_refs(&self) -> [ParamRef<'_, B>; 9] {
        K::LAYER_KINDS.map(|k| self.slot(k, false).expect("every block slot is a field"))
    }

    /// The block's biases with their slots, in [`arch::BIASES`] order (none without `qkv_bias`).
    pub(crate) fn bias_refs(&self) -> Vec<(&'static arch::Slot, ParamRef<'_, B>)> {
        arch::BIASES
            .iter()
            .filter_map(|s| Some((s, self.slot(s.kind, true)?)))
            .collect()
    }

    /// The block on `x: [batch·seq, hidden]` (residual stream in, residual stream out).
    pub fn forward(
        &self,
        cfg: &LlamaConfig,
        x: Tensor<B, 2>,
        ctx: &BlockContext<B>,
        cache: Option<&mut KvSlot<B>>,
    ) -> Tensor<B, 2> {
        self.forward_observed(cfg, x, ctx, cache, &mut |_, _| {})
    }

    /// [`Block::forward`], showing `obs` the input of each of the block's products (token-major
    /// `[batch·seq, features]`): what activation-aware criteria (Wanda) weigh the weights by.
    pub(crate) fn forward_observed(
        &self,
        cfg: &LlamaConfig,
        x: Tensor<B, 2>,
        ctx: &BlockContext<B>,
        cache: Option<&mut KvSlot<B>>,
        obs: &mut impl FnMut(Site, &Tensor<B, 2>),
    ) -> Tensor<B, 2> {
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let (b, t) = (ctx.b, ctx.t);
        let (n, rep, total) = (b * t, nh / nkv, ctx.past + t);
        let (eps, plus_one) = (cfg.rms_norm_eps, cfg.arch.norm_plus_one());
        obs(Site::AttnResidual, &x);
        let h = rms_norm(x.clone(), &self.attn_norm, eps, plus_one);
        obs(Site::AttnInput, &h);
        let q = biased(linear(h.clone(), &self.q), &self.q_bias).reshape([b, t, nh, hd]);
        let k = biased(linear(h.clone(), &self.k), &self.k_bias).reshape([b, t, nkv, hd]);
        let v = biased(linear(h, &self.v), &self.v_bias).reshape([b, t, nkv, hd]);
        let q = rope(q, &ctx.rot, &ctx.cos_q, &ctx.sin_q);
        let k = rope(k, &ctx.rot, &ctx.cos, &ctx.sin);
        // [b, kv head, group member, t, hd] against [b, kv head, 1, ·, ·].
        let q = q.reshape([b, t, nkv, rep, hd]).permute([0, 2, 3, 1, 4]);
        let (kt, v) = match cache {
            Some(slot) => {
                let (k, v) = kv_append(slot, k, v, ctx.past);
                (k.swap_dims(3, 4), v)
            }
            None => (
                k.reshape([b, total, nkv, 1, hd]).permute([0, 2, 3, 4, 1]),
                v.reshape([b, total, nkv, 1, hd]).permute([0, 2, 3, 1, 4]),
            ),
        };
        let mut s = q.matmul(kt);
        if let Some(m) = &ctx.mask {
            s = if m.dims()[0] == 1 {
                // One shared row of t·total per (batch, head): the backends' fast broadcast.
                (s.reshape([b * nh, t * total]) + m.clone()).reshape([b, nkv, rep, t, total])
            } else {
                // A left-padded batch: one row per batch row, shared by its heads.
                (s.reshape([b, nh, t * total]) + m.clone().reshape([b, 1, t * total])).reshape([b, nkv, rep, t, total])
            };
        }
        let a = like(softmax(widen(s), 4), &v)
            .matmul(v)
            .permute([0, 3, 1, 2, 4])
            .reshape([n, nh * hd]);
        obs(Site::OInput, &a);
        let x = x + linear(a, &self.o);
        obs(Site::MlpResidual, &x);
        let h = rms_norm(x.clone(), &self.mlp_norm, eps, plus_one);
        obs(Site::MlpInput, &h);
        let gate = linear(h.clone(), &self.gate);
        let gate = if cfg.arch.gelu_gate() {
            gelu_tanh(gate)
        } else {
            silu(gate)
        };
        let g = gate * linear(h, &self.up);
        obs(Site::DownInput, &g);
        x + linear(g, &self.down)
    }
}

/// RMSNorm over the last dimension of `[tokens, hidden]`, scaled by `w` (or by `1 + w`:
/// Gemma, whose product is taken in f32 before the cast back, as transformers does).
/// The statistics in f32 whatever the weights' dtype (as transformers does).
fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: &Param<Tensor<B, 1>>, eps: f64, plus_one: bool) -> Tensor<B, 2> {
    let w = w.val();
    let x = widen(x);
    let ms = x.clone().powi_scalar(2).mean_dim(1);
    let xn = x * (ms + eps).sqrt().recip();
    if plus_one {
        like(xn * (widen(w.clone()) + 1.0).unsqueeze_dim(0), &w)
    } else {
        like(xn, &w) * w.unsqueeze_dim(0)
    }
}

/// GELU's tanh approximation, `x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))` (transformers'
/// `gelu_pytorch_tanh`), in f32 or wider.
fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let w = widen(x.clone());
    let inner = (w.clone() + w.clone().powi_scalar(3) * 0.044715) * (2.0 / std::f64::consts::PI).sqrt();
    like((inner.tanh() + 1.0) * w * 0.5, &x)
}

/// RoPE on `[batch, seq, heads, head_dim]`, with tables from `Llama::rope_tables`.
fn rope<B: Backend>(x: Tensor<B, 4>, rot: &Tensor<B, 2>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, t, h, hd] = x.dims();
    let rotated = x
        .clone()
        .reshape([b * t * h, hd])
        .matmul(rot.clone())
        .reshape([b, t * h * hd]);
    (x.reshape([b, t * h * hd]) * cos.clone() + rotated * sin.clone()).reshape([b, t, h, hd])
}

/// SiLU. In f32 as `x · sigmoid(x)`: the backends' own sigmoid is one op forward and one
/// backward (four element-wise passes fewer than the composed form, measured on burn-flex). In
/// f64 (the tests' reference backend) as `x / (1 + e^-x)`: burn-ndarray's sigmoid is accurate
/// only to ~5e-7 relative even in f64 (measured), which breaks finite-difference checks.
fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if std::mem::size_of::<B::FloatElem>() >= 8 {
        x.clone() / (x.neg().exp() + 1.0)
    } else {
        x.clone() * burn::tensor::activation::sigmoid(x)
    }
}

/// `x · Wᵀ` for `x: [tokens, in]` and HF-layout `W: [out, in]`: the transpose is a strided
/// view that the matmul reads in place, and the output is contiguous.
fn linear<B: Backend>(x: Tensor<B, 2>, w: &Param<Tensor<B, 2>>) -> Tensor<B, 2> {
    let [rows, k] = x.dims();
    // A decoding step's few rows on the f32 CPU backend: no gemm packing of the weights.
    if (1..=fused::FEW_ROWS).contains(&rows)
        && fused::is_cpu::<B>()
        && fused::hand_written()
        && x.dtype() == burn::tensor::DType::F32
        && w.val().dtype() == burn::tensor::DType::F32
    {
        let device = x.device();
        let n = w.val().dims()[0];
        let (xs, ws) = (fused::flex(x), fused::flex(w.val()));
        let y = fused::few_rows_matmul(fused::values(&xs), rows, fused::values(&ws), n, k);
        return Tensor::from_data(TensorData::new(y, [rows, n]), &device);
    }
    x.matmul(w.val().transpose())
}

/// `y + bias` on every row, when there is a bias.
fn biased<B: Backend>(y: Tensor<B, 2>, bias: &Option<Param<Tensor<B, 1>>>) -> Tensor<B, 2> {
    match bias {
        Some(b) => y + b.val().unsqueeze_dim(0),
        None => y,
    }
}

/// Set on a token of a training row whose prediction is not in the loss: the token is still
/// an input (a prompt token when `train.train_on_input = false`, or padding). Vocabularies are
/// far below 2³¹, so the flag never collides with an id.
pub const NO_LOSS: u32 = 1 << 31;

/// A row token's id, without [`NO_LOSS`].
pub(crate) fn strip(token: u32) -> u32 {
    token & !NO_LOSS
}

/// How many of `rows`' next-token predictions count in the loss (targets without [`NO_LOSS`]).
pub(crate) fn loss_targets(rows: &[Vec<u32>]) -> usize {
    rows.iter()
        .flat_map(|r| r.iter().skip(1))
        .filter(|&&x| x & NO_LOSS == 0)
        .count()
}

/// Token ids as a `[batch, seq]` Int tensor.
pub fn tokens_tensor<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let b = rows.len();
    let t = rows.first().map(|r| r.len()).unwrap_or(0);
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&x| x as i64)).collect();
    Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, t]).convert::<B::IntElem>(), device)
}

/// Deterministic pseudo-random token rows for benchmarks (`rows` × `len`, ids below `vocab`).
pub fn synthetic_tokens(vocab: usize, rows: usize, len: usize) -> Vec<Vec<u32>> {
    (0..rows)
        .map(|b| {
            (0..len)
                .map(|i| ((i * 7919 + b * 104729 + 17) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// Random weights for a config (seeded): tests and tiny experiments.
pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> Weights {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = Weights::default();
    for (name, shape) in cfg.tensor_shapes() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with(".bias") {
            (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect()
        } else if shape.len() == 1 {
            (0..n).map(|_| 1.0 + rng.random_range(-0.1f32..0.1)).collect()
        } else {
            let s = 1.0 / (shape[1] as f32).sqrt();
            (0..n).map(|_| rng.random_range(-s..s)).collect()
        };
        w.insert(name, HostTensor::new(shape, data));
    }
    w
}
