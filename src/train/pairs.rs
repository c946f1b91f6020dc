//! Instruction-format tuning data (`train.format = "pairs"`): each corpus's (instruction,
//! response) pairs rendered in the model's chat template, the prompt's tokens flagged out of the
//! loss ([`crate::model::NO_LOSS`]) unless `train.train_on_input`, and batched without cutting a
//! pair: the rows of a batch are padded to its longest (padding is never in the loss), and pairs
//! of similar length are batched together.
//!
//! Order: a permutation of the pairs per epoch, seeded by (`train.seed`, epoch), as raw blocks
//! have; then, within each window of [`WINDOW_BATCHES`] batches, sorted by length and cut into
//! batches whose order is shuffled again. The data position (pairs consumed) fixes every batch,
//! so a resumed run sees exactly what an uninterrupted one would.

use crate::model::{Message, Tok, NO_LOSS};
use crate::pairs::Pair;
use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Batches per length-sorted window.
pub(crate) const WINDOW_BATCHES: usize = 8;

/// The token ids of `pair` in `tok`'s chat template: the user turn with the generation prompt,
/// then the assistant's response and the template's end of turn. With `train_on_input` false,
/// every prompt token carries [`NO_LOSS`]. The prompt and the rest are tokenized apart (as
/// torchtune does per message), so no token straddles the boundary.
pub fn render(tok: &Tok, pair: &Pair, train_on_input: bool) -> Result<Vec<u32>> {
    let user = Message::user(&pair.instruction);
    let prompt = tok.apply_chat(std::slice::from_ref(&user), true)?;
    let full = tok.apply_chat(&[user, Message::assistant(&pair.response)], false)?;
    let rest = full.strip_prefix(prompt.as_str()).with_context(|| {
        format!(
            "the chat template's rendering of a conversation does not start with its prompt (pair '{}' of {})",
            pair.name, pair.path
        )
    })?;
    let mut ids = tok.encode(&prompt, false)?;
    if !train_on_input {
        ids.iter_mut().for_each(|x| *x |= NO_LOSS);
    }
    let response = tok.encode(rest, false)?;
    anyhow::ensure!(
        !response.is_empty(),
        "pair '{}' of {}: an empty response",
        pair.name,
        pair.path
    );
    ids.extend(response);
    Ok(ids)
}

/// Rendered pairs of at most `max_len` tokens, and how many were longer (dropped, never cut).
pub fn examples(tok: &Tok, pairs: &[Pair], max_len: usize, train_on_input: bool) -> Result<(Vec<Vec<u32>>, usize)> {
    let mut out = Vec::with_capacity(pairs.len());
    let mut long = 0;
    for p in pairs {
        let ids = render(tok, p, train_on_input)?;
        if ids.len() > max_len {
            long += 1;
        } else {
            out.push(ids);
        }
    }
    Ok((out, long))
}

/// Pad `rows` to the longest with `pad` flagged [`NO_LOSS`].
pub fn pad(rows: Vec<Vec<u32>>, pad: u32) -> Vec<Vec<u32>> {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    rows.into_iter()
        .map(|mut r| {
            r.resize(len, pad | NO_LOSS);
            r
        })
        .collect()
}

/// The deterministic order of examples (see the module's doc).
pub(crate) struct PairOrder {
    lens: Vec<usize>,
    batch: usize,
    seed: u64,
    epoch: Option<(usize, Vec<u32>)>,
}

impl PairOrder {
    pub fn new(lens: Vec<usize>, batch: usize, seed: u64) -> Self {
        Self {
            lens,
            batch: batch.max(1),
            seed,
            epoch: None,
        }
    }

    /// The example at data position `global`.
    pub fn example(&mut self, global: usize) -> usize {
        let n = self.lens.len();
        let (e, i) = (global / n, global % n);
        if self.epoch.as_ref().map(|x| x.0) != Some(e) {
            self.epoch = Some((e, self.order_of(e)));
        }
        self.epoch.as_ref().expect("set above").1[i] as usize
    }

    fn order_of(&self, epoch: usize) -> Vec<u32> {
        let n = self.lens.len();
        let s = self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(s);
        let mut p: Vec<u32> = (0..n as u32).collect();
        p.shuffle(&mut rng);
        let mut out = Vec::with_capacity(n);
        for w in p.chunks(WINDOW_BATCHES * self.batch) {
            let mut w = w.to_vec();
            w.sort_by_key(|&x| self.lens[x as usize]);
            let mut batches: Vec<&[u32]> = w.chunks(self.batch).collect();
            batches.shuffle(&mut rng);
            out.extend(batches.into_iter().flatten());
        }
        out
    }
}

/// Held-out pair loss: the mean next-token loss over the response tokens of held-out pairs,
/// with a 95 % bootstrap interval over pairs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairLoss {
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
    pub pairs: usize,
    pub tokens: usize,
    /// The change of the mean against the base model's on the same pairs, with its paired 95 %
    /// bootstrap interval (negative = lower loss than the base model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<(f64, f64, f64)>,
}

/// Per-example (Σ nll over counted targets, counted targets) of `examples`, `batch` at a time,
/// forward only.
pub(crate) fn example_nll<B: burn::tensor::backend::Backend>(
    m: &crate::model::Llama<B>,
    examples: &[Vec<u32>],
    batch: usize,
    pad_id: u32,
) -> Vec<(f64, f64)> {
    let device = m.embed.val().device();
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch.max(1)) {
        let rows = pad(chunk.to_vec(), pad_id);
        let plain: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| r.iter().map(|&x| crate::model::strip(x)).collect())
            .collect();
        let nll = m.token_nll(crate::model::tokens_tensor::<B>(&plain, &device));
        let v: Vec<f32> = nll.into_data().convert::<f32>().into_vec().expect("f32 nll");
        let t = rows[0].len() - 1;
        for (r, row) in rows.iter().enumerate() {
            let (mut s, mut c) = (0.0, 0.0);
            for (j, &x) in row[1..].iter().enumerate() {
                if x & NO_LOSS == 0 {
                    s += v[r * t + j] as f64;
                    c += 1.0;
                }
            }
            out.push((s, c));
        }
    }
    out
}

fn ratio(x: &[(f64, f64)]) -> f64 {
    x.iter().map(|p| p.0).sum::<f64>() / x.iter().map(|p| p.1).sum::<f64>().max(1.0)
}

/// [`PairLoss`] of per-example (nll sum, counted targets); with `base`, the same pairs' items
/// under the base model, the paired change against it.
pub fn pair_loss(items: &[(f64, f64)], base: Option<&[(f64, f64)]>, seed: u64) -> PairLoss {
    let (lo, hi) = crate::eval::bootstrap(items, seed, ratio);
    PairLoss {
        mean: ratio(items),
        lo,
        hi,
        pairs: items.len(),
        tokens: items.iter().map(|p| p.1 as usize).sum(),
        change: base
            .filter(|b| b.len() == items.len())
            .map(|b| paired_change(items, b, seed)),
    }
}

/// ratio(items) − ratio(base), resampling pairs together (both read the same pairs).
fn paired_change(items: &[(f64, f64)], base: &[(f64, f64)], seed: u64) -> (f64, f64, f64) {
    // Each pair as (its nll under the model, under the base); weights are the same tokens.
    let joint: Vec<(f64, f64)> = items.iter().zip(base).map(|(a, b)| (a.0 - b.0, a.1)).collect();
    let (lo, hi) = crate::eval::bootstrap(&joint, seed ^ 0x70, ratio);
    (ratio(&joint), lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_order_is_a_permutation_with_length_sorted_batches_and_repeatable() {
        let lens: Vec<usize> = (0..40).map(|i| (i * 37) % 23 + 1).collect();
        let mut a = PairOrder::new(lens.clone(), 4, 7);
        let e0: Vec<usize> = (0..40).map(|i| a.example(i)).collect();
        let mut s = e0.clone();
        s.sort();
        assert_eq!(s, (0..40).collect::<Vec<_>>());
        // Within a batch lengths are sorted (the window was sorted before cutting).
        for b in e0.chunks(4) {
            assert!(b.windows(2).all(|w| lens[w[0]] <= lens[w[1]]), "{b:?}");
        }
        // A batch spans a narrower length range than a random one would on average.
        let spread: usize = e0.chunks(4).map(|b| lens[b[3]] - lens[b[0]]).sum();
        let plain: usize = (0..40usize)
            .collect::<Vec<_>>()
            .chunks(4)
            .map(|b| {
                let l: Vec<usize> = b.iter().map(|&i| lens[i]).collect();
                l.iter().max().unwrap() - l.iter().min().unwrap()
            })
            .sum();
        assert!(spread < plain, "bucketed spread {spread} vs unsorted {plain}");
        let e1: Vec<usize> = (40..80).map(|i| a.example(i)).collect();
        assert_ne!(e0, e1, "epochs are reshuffled");
        let mut b = PairOrder::new(lens, 4, 7);
        assert_eq!(b.example(53), e1[13], "a fresh order at position 53 agrees (resume)");
    }

    #[test]
    fn padding_is_flagged_and_not_counted() {
        let rows = pad(vec![vec![5, 6 | NO_LOSS, 7], vec![1, 2]], 9);
        assert_eq!(rows[1], vec![1, 2, 9 | NO_LOSS]);
        // Row 0 predicts 6 (prompt: not counted) and 7; row 1 predicts 2 and the padding.
        assert_eq!(crate::model::loss_targets(&rows), 2);
    }
}
