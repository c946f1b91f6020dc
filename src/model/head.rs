//! The output head's cross-entropy and its gradient, fused and chunked.
//!
//! Autodiff through `log_softmax(h · Wᵀ)` keeps several `[tokens, vocab]` tensors alive (the
//! logits, their exponentials, the log-probabilities and the gradient of each): at batch
//! 4 × 256 on a 49152-token vocabulary that is ~200 MB apiece. Here the head runs outside the
//! autodiff graph, a few hundred tokens at a time: logits, softmax, `∂L/∂logits = softmax −
//! onehot`, then `∂L/∂h` and `∂L/∂W` by two matmuls.

use super::dtype::{like, widen};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, IndexingUpdateOp, Int, Tensor};

/// Logit elements computed at once (64 MB in f32): 341 tokens of a 49152 vocabulary.
const CHUNK_ELEMS: usize = 1 << 24;

/// The head's loss and gradients.
pub(crate) struct HeadGrads<B: Backend> {
    /// Σ over tokens of the next-token negative log-likelihood (natural log).
    pub nll_sum: f64,
    /// `∂(scale · Σ nll)/∂h`, `[tokens, hidden]`.
    pub dh: Tensor<B, 2>,
    /// `∂(scale · Σ nll)/∂W`, `[vocab, hidden]`, in f32 (or wider).
    pub dw: Tensor<B, 2>,
}

/// Cross-entropy of `h · Wᵀ` (`h: [tokens, hidden]`, `W: [vocab, hidden]`) against `targets:
/// [tokens, 1]`, and the gradients of `scale` times its sum.
pub(crate) fn head_grads<B: Backend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
    scale: f64,
) -> HeadGrads<B> {
    let device = h.device();
    let [n, _] = h.dims();
    let vocab = w.dims()[0];
    let chunk = (CHUNK_ELEMS / vocab).max(1);
    let mut nll = Tensor::<B, 1>::zeros([1], &device);
    let mut dh = Vec::with_capacity(n.div_ceil(chunk));
    let mut dw: Option<Tensor<B, 2>> = None;
    for start in (0..n).step_by(chunk) {
        let c = chunk.min(n - start);
        let hc = h.clone().narrow(0, start, c);
        let tc = targets.clone().narrow(0, start, c);
        // The softmax and its gradient in f32 whatever the weights' dtype.
        let logits = widen(hc.clone().matmul(w.clone().transpose()));
        let max = logits.clone().max_dim(1);
        let picked = logits.clone().gather(1, tc.clone());
        let e = (logits - max.clone()).exp();
        let sum = e.clone().sum_dim(1);
        nll = nll + (max + sum.clone().log() - picked).sum();
        let minus_one = Tensor::full([c, 1], -1.0, &device);
        let dlogits = (e / sum)
            .scatter(1, tc, minus_one, IndexingUpdateOp::Add)
            .mul_scalar(scale);
        let dlogits = like(dlogits, &w);
        dh.push(dlogits.clone().matmul(w.clone()));
        let g = widen(dlogits.transpose().matmul(hc));
        dw = Some(match dw {
            Some(a) => a + g,
            None => g,
        });
    }
    HeadGrads {
        nll_sum: nll.into_scalar().elem::<f64>(),
        dh: Tensor::cat(dh, 0),
        dw: dw.expect("at least one token"),
    }
}
