//! Loss and gradients of a batch, one block at a time.
//!
//! Autodiff over the whole model keeps every block's activations until the backward pass
//! (~75–85 MB a block at batch 4 × 256 on the default model, 2.5 GB in all), and hands back all
//! gradients at once (another copy of the weights). Here the forward pass runs without autodiff
//! and keeps only each block's input; the backward pass then goes from the top: the final norm
//! and the chunked head ([`super::head`]), then each block re-run under autodiff from its saved
//! input and backpropagated from `Σ y ⊙ ∂L/∂y`, whose gradient with respect to `y` is exactly
//! `∂L/∂y`. Each parameter's gradient goes to a sink as soon as it exists, so a caller can fold
//! it into its sums and drop it. The top [`Llama::keep_blocks`] blocks run under autodiff in the
//! forward pass already and keep their graphs (memory traded for their second forward pass);
//! the rest cost one block's graph at a time and one more forward pass each.

use super::arch;
use super::dtype::{like, widen};
use super::fused::{self, flex, values, BlockWeights, Dims, FlexTensor, Rope};
use super::head::head_grads;
use super::llama::{strip, tokens_tensor, Block, Llama, ParamRef, NO_LOSS};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{IndexingUpdateOp, Tensor, TensorData};

pub(crate) use super::llama::DEFAULT_KEEP_BLOCKS;

/// Hand block `l`'s parameter gradients in `grads` to `sink` (its biases' at their indices
/// after every other parameter's, [`crate::model::LlamaConfig::bias_index`]).
fn block_grads<B: AutodiffBackend>(
    cfg: &crate::model::LlamaConfig,
    blk: &Block<B>,
    l: usize,
    grads: &mut B::Gradients,
    sink: &mut impl FnMut(usize, Tensor<B::InnerBackend, 1>),
) {
    let weights = blk
        .param_refs()
        .into_iter()
        .enumerate()
        .map(|(j, p)| (cfg.block_index(l, j), p));
    let biases = blk
        .bias_refs()
        .into_iter()
        .map(|(s, p)| (cfg.bias_index(l, arch::bias_slot(s.kind)), p));
    for (i, p) in weights.chain(biases) {
        let g = match p {
            ParamRef::Vector(p) => p.val().grad_remove(grads),
            ParamRef::Matrix(p) => p.val().grad_remove(grads).map(|g| g.flatten(0, 1)),
        };
        if let Some(g) = g {
            sink(i, widen(g));
        }
    }
}

/// A host vector as a tensor of `shape` on `device`.
fn device<B: Backend, const D: usize>(v: Vec<f32>, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Whether a parameter takes gradients.
fn trains<B: AutodiffBackend>(p: &ParamRef<'_, B>) -> bool {
    match p {
        ParamRef::Vector(p) => p.val().is_require_grad(),
        ParamRef::Matrix(p) => p.val().is_require_grad(),
    }
}

/// Which next-token predictions of a batch count in its loss: every one, unless some row
/// tokens carry [`NO_LOSS`].
struct LossAt {
    /// The counted targets, in row-major order (flag stripped).
    targets: Vec<u32>,
    /// Their positions among the batch's `rows × (len − 1)` predictions; None when all count.
    kept: Option<Vec<usize>>,
}

impl LossAt {
    fn of(rows: &[Vec<u32>]) -> Self {
        let all = rows.iter().flat_map(|r| &r[1..]);
        if !all.clone().any(|&x| x & NO_LOSS != 0) {
            return Self {
                targets: all.copied().collect(),
                kept: None,
            };
        }
        let (kept, targets) = all
            .enumerate()
            .filter(|(_, &x)| x & NO_LOSS == 0)
            .map(|(i, &x)| (i, x))
            .unzip();
        Self {
            targets,
            kept: Some(kept),
        }
    }

    fn count(&self) -> usize {
        self.targets.len()
    }

    /// The counted positions as an index tensor, or None when all count.
    fn rows<B: Backend>(&self, device: &B::Device) -> Option<Tensor<B, 1, burn::tensor::Int>> {
        let kept = self.kept.as_ref()?;
        let v: Vec<i64> = kept.iter().map(|&i| i as i64).collect();
        Some(Tensor::from_data(
            TensorData::new(v, [kept.len()]).convert::<B::IntElem>(),
            device,
        ))
    }
}

impl<B: AutodiffBackend> Llama<B> {
    /// Whether [`Llama::loss_backward`] takes the hand-written f32 CPU path ([`fused`]).
    pub fn uses_fused(&self) -> bool {
        self.fused_on::<B::InnerBackend>()
    }

    /// Mean next-token cross-entropy of `rows` (equal lengths, ≥ 2 tokens, at least one
    /// counted target: tokens flagged [`NO_LOSS`] are inputs only), times `weight`, returned; the gradient of that with respect to each parameter that requires one goes to
    /// `sink(index in [`Llama::params`], flat gradient)`, once per parameter.
    pub fn loss_backward(
        &self,
        rows: &[Vec<u32>],
        weight: f64,
        mut sink: impl FnMut(usize, Tensor<B::InnerBackend, 1>),
    ) -> f64 {
        assert!(
            super::llama::loss_targets(rows) > 0,
            "loss_backward: a batch without a counted target"
        );
        if self.uses_fused() {
            return self.loss_backward_fused(rows, weight, sink);
        }
        let cfg = &self.config;
        let inner = self.valid();
        let device = self.embed.val().device();
        let idev = inner.embed.val().device();
        let (b, t) = (rows.len(), rows[0].len() - 1);
        let n = b * t;
        let inputs: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| r[..t].iter().map(|&x| strip(x)).collect())
            .collect();
        let loss_at = LossAt::of(rows);
        let targets = vec![loss_at.targets.clone()];
        let inputs = tokens_tensor::<B::InnerBackend>(&inputs, &idev);
        let targets = tokens_tensor::<B::InnerBackend>(&targets, &idev).reshape([loss_at.targets.len(), 1]);

        // Forward without autodiff, keeping each block's input; the top `keep` blocks run under
        // autodiff and keep their graphs (no second forward for them).
        let layers = cfg.num_hidden_layers;
        let keep = self.keep_blocks.min(layers);
        let ctx = inner.block_context(b, t, 0, &idev);
        let mut saved = Vec::with_capacity(layers);
        let mut x = inner.embed_tokens(inputs.clone());
        for blk in &inner.layers[..layers - keep] {
            saved.push(x.clone());
            x = blk.forward(cfg, x, &ctx, None);
        }
        drop(ctx);
        let top_in = Tensor::<B, 2>::from_inner(x).require_grad();
        let ctx = self.block_context(b, t, 0, &device);
        let mut x = top_in.clone();
        for blk in &self.layers[layers - keep..] {
            x = blk.forward(cfg, x, &ctx, None);
        }

        // Final norm and head, then back through the kept blocks.
        let h = self.rms_norm(x, &self.norm);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).val().inner();
        let scale = weight / loss_at.count() as f64;
        let out = match loss_at.rows(&idev) {
            // Every target counts: the head sees the rows as they are.
            None => head_grads(h.clone().inner(), head, targets, scale),
            // Only the counted rows go through the head; the others get zero gradient.
            Some(idx) => {
                let mut o = head_grads(h.clone().inner().select(0, idx.clone()), head, targets, scale);
                let d = cfg.hidden_size;
                o.dh = Tensor::zeros([n, d], &idev).select_assign(0, idx, o.dh, IndexingUpdateOp::Add);
                o
            }
        };
        let dh = like(out.dh, &h.clone().inner());
        let mut grads = (h * Tensor::from_inner(dh)).sum().backward();
        let norm_index = cfg.final_norm_index();
        if let Some(g) = self.norm.val().grad_remove(&mut grads) {
            sink(norm_index, widen(g));
        }
        for l in layers - keep..layers {
            block_grads(cfg, &self.layers[l], l, &mut grads, &mut sink);
        }
        let mut dy = top_in
            .grad_remove(&mut grads)
            .expect("gradient of the kept blocks' input");
        drop(grads);

        // The other blocks, top down, each re-run under autodiff from its saved input.
        for l in (0..layers - keep).rev() {
            let x = Tensor::<B, 2>::from_inner(saved.pop().expect("one input per block")).require_grad();
            let y = self.layers[l].forward(cfg, x.clone(), &ctx, None);
            let mut grads = (y * Tensor::from_inner(dy)).sum().backward();
            block_grads(cfg, &self.layers[l], l, &mut grads, &mut sink);
            dy = x.grad_remove(&mut grads).expect("gradient of a block's input");
        }

        // Embedding rows (a scatter-add), and the head's share.
        let embed = if self.embed.val().is_require_grad() {
            let [vocab, d] = self.embed.val().dims();
            // Rows scaled on the way in (Gemma) get the scaled gradient.
            let dy = match cfg.embed_scale() {
                Some(s) => widen(dy) * s,
                None => widen(dy),
            };
            let g = Tensor::<B::InnerBackend, 2>::zeros([vocab, d], &idev).select_assign(
                0,
                inputs.reshape([n]),
                dy,
                IndexingUpdateOp::Add,
            );
            Some(g)
        } else {
            None
        };
        match &self.lm_head {
            None => {
                if let Some(g) = embed {
                    sink(0, (g + out.dw).flatten(0, 1));
                }
            }
            Some(h) => {
                if let Some(g) = embed {
                    sink(0, g.flatten(0, 1));
                }
                if h.val().is_require_grad() {
                    sink(norm_index + 1, out.dw.flatten(0, 1));
                }
            }
        }
        out.nll_sum * scale
    }

    /// [`Llama::loss_backward`] through the hand-written block, head and embedding
    /// ([`fused`]), on the backend's own weight storage: the forward pass keeps what each
    /// block's backward pass needs, so no block runs twice.
    fn loss_backward_fused(
        &self,
        rows: &[Vec<u32>],
        weight: f64,
        mut sink: impl FnMut(usize, Tensor<B::InnerBackend, 1>),
    ) -> f64 {
        let cfg = &self.config;
        let inner = self.valid();
        let idev = inner.embed.val().device();
        let (b, t) = (rows.len(), rows[0].len() - 1);
        let (n, d, layers) = (b * t, cfg.hidden_size, cfg.num_hidden_layers);
        let inputs: Vec<u32> = rows.iter().flat_map(|r| r[..t].iter().map(|&x| strip(x))).collect();
        let loss_at = LossAt::of(rows);
        let dm = Dims::new(cfg, b, t).autocast(self.autocast);
        let rope = Rope::new(cfg, t);
        let blocks: Vec<[FlexTensor; 9]> = inner.layers.iter().map(|blk| blk.storage()).collect();
        let biases: Vec<Option<[FlexTensor; 3]>> = inner.layers.iter().map(|blk| blk.bias_storage()).collect();
        let weights = |l: usize| BlockWeights::packed(&blocks[l], &dm, &self.packs).with(&dm, biases[l].as_ref());
        let embed = flex(inner.embed.val());
        let norm = flex(inner.norm.val());
        let norm_w = fused::norm_scale(values(&norm), dm.plus_one);
        let head = inner.lm_head.as_ref().map(|h| flex(h.val()));
        let embed_scale = cfg.embed_scale();

        let mut x = fused::embed_rows(values(&embed), &inputs, d, embed_scale);
        let mut saved = Vec::with_capacity(layers);
        for l in 0..layers {
            let (y, s) = weights(l).forward(&dm, &rope, x);
            saved.push(s);
            x = y;
        }
        let (h, rstd) = fused::final_norm(&x, &norm_w, dm.eps);

        // The head; with tied embeddings its weight gradient is the embedding's, to which the
        // embedding rows' share is added below.
        let scale = weight / loss_at.count() as f64;
        let embed_trains = self.embed.val().is_require_grad();
        let head_trains = match &self.lm_head {
            Some(h) => h.val().is_require_grad(),
            None => embed_trains,
        };
        let head_t = head.as_ref().unwrap_or(&embed);
        let head_w = values(head_t);
        let head_p = dm.bf16.map(|u| (u, self.packs.of(head_t, head_w.len() / d, d)));
        let head_p = head_p.as_ref().map(|(u, p)| (*u, &**p));
        let (nll, dh, mut head_dw) = match &loss_at.kept {
            None => fused::head(&h, head_w, &loss_at.targets, scale as f32, head_trains, head_p),
            // Only the counted rows go through the head; the others get zero gradient.
            Some(kept) => {
                let hk: Vec<f32> = kept.iter().flat_map(|&i| &h[i * d..(i + 1) * d]).copied().collect();
                let (nll, dhk, dw) = fused::head(&hk, head_w, &loss_at.targets, scale as f32, head_trains, head_p);
                let mut dh = vec![0f32; n * d];
                for (&i, row) in kept.iter().zip(dhk.chunks_exact(d)) {
                    dh[i * d..(i + 1) * d].copy_from_slice(row);
                }
                (nll, dh, dw)
            }
        };
        drop(h);
        let (mut dy, dnorm) = fused::final_norm_bwd(&dh, &x, &rstd, &norm_w);
        drop((x, dh, rstd));
        let norm_index = cfg.final_norm_index();
        if self.norm.val().is_require_grad() {
            sink(norm_index, device(dnorm, [d], &idev));
        }
        for l in (0..layers).rev() {
            let need = self.layers[l].param_refs().map(|p| trains(&p));
            let lb = &self.layers[l];
            let need_bias = arch::BIASES
                .each_ref()
                .map(|s| lb.slot(s.kind, true).is_some_and(|p| trains(&p)));
            let s = saved.pop().expect("one saved state per block");
            let (dx, grads, bias_grads) = weights(l).backward(&dm, &rope, s, &dy, need, need_bias);
            for (j, g) in grads.into_iter().enumerate() {
                if let Some(g) = g {
                    let len = g.len();
                    sink(cfg.block_index(l, j), device(g, [len], &idev));
                }
            }
            for (j, g) in bias_grads.into_iter().enumerate() {
                if let Some(g) = g {
                    let len = g.len();
                    sink(cfg.bias_index(l, j), device(g, [len], &idev));
                }
            }
            dy = dx;
        }

        // The embedding rows' gradient: a scatter-add of the first block's input gradient.
        if embed_trains {
            let tied = if self.lm_head.is_none() { head_dw.take() } else { None };
            let mut g = tied.unwrap_or_else(|| vec![0f32; values(&embed).len()]);
            // With an embedding scale `s` (Gemma), the rows' gradient is `s · ∂L/∂x`.
            let s = embed_scale.map(|s| s as f32);
            for (&tok, row) in inputs.iter().zip(dy.chunks_exact(d)) {
                let at = &mut g[tok as usize * d..(tok as usize + 1) * d];
                match s {
                    Some(s) => at.iter_mut().zip(row).for_each(|(a, b)| *a += s * b),
                    None => at.iter_mut().zip(row).for_each(|(a, b)| *a += b),
                }
            }
            let len = g.len();
            sink(0, device(g, [len], &idev));
        }
        if let Some(g) = head_dw {
            let len = g.len();
            sink(norm_index + 1, device(g, [len], &idev));
        }
        nll * scale
    }
}
