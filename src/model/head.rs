//! The output head and its cross-entropy, fused and chunked for the backward pass.
//!
//! Autodiff through `log_softmax(h · Wᵀ)` keeps several `[tokens, vocab]` tensors alive (the
//! logits, their exponentials, the log-probabilities and the gradient of each): at batch
//! 4 × 256 on a 49152-token vocabulary that is ~200 MB apiece, most of a backward pass's peak
//! memory and a good share of its single-threaded element-wise time. Here the body runs under
//! autodiff up to the final hidden states `h`; the head runs outside the graph, a few hundred
//! tokens at a time: logits, softmax, `∂L/∂logits = softmax − onehot`, then `∂L/∂h` and
//! `∂L/∂W` by two matmuls. The body's gradients come from backpropagating `Σ h ⊙ ∂L/∂h`,
//! whose gradient with respect to `h` is exactly `∂L/∂h`.

use super::llama::{tokens_tensor, Llama};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, IndexingUpdateOp, Tensor};

/// Logit elements computed at once (64 MB in f32): 341 tokens of a 49152 vocabulary.
const CHUNK_ELEMS: usize = 1 << 24;

/// Loss and gradients of one backward pass.
pub struct LossGrads<B: AutodiffBackend> {
    /// The weighted mean next-token cross-entropy (natural log).
    pub loss: f64,
    /// Gradients of every parameter the body uses (the head's share of a tied embedding is
    /// in [`LossGrads::head`], not here).
    pub grads: B::Gradients,
    /// Gradient of the output projection `[vocab, hidden]` (`lm_head`, or the tied embedding).
    pub head: Tensor<B::InnerBackend, 2>,
}

impl<B: AutodiffBackend> Llama<B> {
    /// Mean next-token cross-entropy of `rows` (equal lengths, ≥ 2 tokens) times `weight`, and
    /// its gradients.
    pub fn loss_backward(&self, rows: &[Vec<u32>], weight: f64) -> LossGrads<B> {
        let device = self.embed.val().device();
        let tokens = tokens_tensor::<B>(rows, &device);
        let [b, t] = tokens.dims();
        let n = b * (t - 1);
        let d = self.config.hidden_size;
        let h = self.hidden(tokens.narrow(1, 0, t - 1), None).reshape([n, d]);
        let hi = h.clone().inner();
        let inner_device = hi.device();
        let targets: Vec<Vec<u32>> = rows.iter().map(|r| r[1..].to_vec()).collect();
        let targets = tokens_tensor::<B::InnerBackend>(&targets, &inner_device).reshape([n, 1]);
        let w = self.lm_head.as_ref().unwrap_or(&self.embed).val().inner();
        let vocab = w.dims()[0];
        let scale = weight / n as f64;
        let chunk = (CHUNK_ELEMS / vocab).max(1);
        let mut nll = Tensor::<B::InnerBackend, 1>::zeros([1], &inner_device);
        let mut dh = Vec::with_capacity(n.div_ceil(chunk));
        let mut dw: Option<Tensor<B::InnerBackend, 2>> = None;
        for start in (0..n).step_by(chunk) {
            let c = chunk.min(n - start);
            let hc = hi.clone().narrow(0, start, c);
            let tc = targets.clone().narrow(0, start, c);
            let logits = hc.clone().matmul(w.clone().transpose());
            let max = logits.clone().max_dim(1);
            let picked = logits.clone().gather(1, tc.clone());
            let e = (logits - max.clone()).exp();
            let sum = e.clone().sum_dim(1);
            nll = nll + (max + sum.clone().log() - picked).sum();
            let minus_one = Tensor::full([c, 1], -1.0, &inner_device);
            let dlogits = (e / sum)
                .scatter(1, tc, minus_one, IndexingUpdateOp::Add)
                .mul_scalar(scale);
            dh.push(dlogits.clone().matmul(w.clone()));
            let g = dlogits.transpose().matmul(hc);
            dw = Some(match dw {
                Some(a) => a + g,
                None => g,
            });
        }
        let dh = Tensor::<B, 2>::from_inner(Tensor::cat(dh, 0));
        let grads = (h * dh).sum().backward();
        LossGrads {
            loss: nll.into_scalar().elem::<f64>() * scale,
            grads,
            head: dw.expect("at least one token"),
        }
    }
}
