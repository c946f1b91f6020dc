//! The training gradient engine: the loss and every parameter's gradient of a batch, micro-batch
//! by micro-batch on one device or data-parallel over several. Importance scoring and tuning both
//! call it; it knows nothing of either (no criterion, no optimizer).

use crate::model::Llama;
use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

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
/// of the counted targets and all-reduced through burn's collective, so the result is the whole batch's
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
        let mine = &rows[crate::util::shard_range(rows.len(), peer.rank + 1, n)];
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
