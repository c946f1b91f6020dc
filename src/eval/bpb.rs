//! Bits per byte: of held-out code (`code-bpb:<lang>`), of HumanEval's canonical solutions
//! given their prompts (`humaneval-bpb`), and of MBPP's gold solutions (`mbpp`).

use super::mc::{sum_logprobs, Request};
use crate::model::{tokens_tensor, KvCache, Llama, Tok};
use anyhow::Result;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// One scoring request: the token ids of context and continuation (as they will be scored) and
/// the byte length of the continuation that was kept.
struct Prepared {
    ids: Vec<u32>,
    n_ctx: usize,
    bytes: usize,
}

/// Tokens of `ctx` + `cont` as scored: `cont` cut to its first `max_tokens` tokens, the context
/// kept whole or cut from the left where both together exceed the model's positions; an empty
/// context is the separator token `sep`.
fn prepare(room: usize, tok: &Tok, ctx: &str, cont: &str, sep: u32, max_tokens: usize) -> Result<Prepared> {
    let mut ids = if ctx.is_empty() {
        vec![sep]
    } else {
        tok.encode(ctx, false)?
    };
    let full = tok.encode(cont, false)?;
    let mut cont_ids = full.clone();
    cont_ids.truncate(max_tokens.max(1));
    let room = room.max(2);
    cont_ids.truncate(room - 1);
    if ids.len() + cont_ids.len() > room {
        ids.drain(..ids.len() + cont_ids.len() - room);
    }
    if ids.is_empty() {
        ids.push(sep);
    }
    let n_ctx = ids.len();
    let bytes = if cont_ids.len() == full.len() {
        cont.len()
    } else {
        tok.decode(&cont_ids)?.len()
    };
    ids.extend(&cont_ids);
    Ok(Prepared { ids, n_ctx, bytes })
}

/// Bits (NLL / ln 2) summed over the tokens of `cont` after `ctx` (ctx may be empty: then the
/// separator token `sep` stands before the text), and the byte length of what was scored:
/// `cont` cut to its first `max_tokens` tokens. The context is kept whole, or cut from the left
/// where context and continuation together exceed the model's positions.
pub fn nll_bits<B: Backend>(
    m: &Llama<B>,
    tok: &Tok,
    ctx: &str,
    cont: &str,
    sep: u32,
    max_tokens: usize,
) -> Result<(f64, usize)> {
    let p = prepare(m.config.max_position_embeddings, tok, ctx, cont, sep, max_tokens)?;
    Ok((full_bits(m, &p), p.bytes))
}

fn full_bits<B: Backend>(m: &Llama<B>, p: &Prepared) -> f64 {
    if p.ids.len() == p.n_ctx {
        return 0.0; // an empty continuation
    }
    let dev = m.embed.val().device();
    let nll = m.token_nll(tokens_tensor::<B>(std::slice::from_ref(&p.ids), &dev));
    let v: Vec<f32> = nll.into_data().convert::<f32>().into_vec().expect("f32");
    // Position i predicts token i+1: the continuation's tokens are predicted at n_ctx-1 ….
    let s: f64 = v[p.n_ctx - 1..].iter().map(|&x| x as f64).sum();
    s / std::f64::consts::LN_2
}

/// A shared prefix shorter than this is not worth a cache.
const MIN_SHARED_PREFIX: usize = 16;

/// [`nll_bits`] of many (context, continuation) pairs, equal to it up to float rounding. Where
/// the contexts share a token prefix (the few-shot examples of mt-mbpp: about 90 % of each
/// context), its KV cache is computed once and every item runs only its own tokens after it;
/// otherwise (documents after the separator) the sequences run in padded batches.
pub fn nll_bits_many<B: Backend>(
    m: &Llama<B>,
    tok: &Tok,
    pairs: &[(&str, &str)],
    sep: u32,
    max_tokens: usize,
) -> Result<Vec<(f64, usize)>> {
    let room = m.config.max_position_embeddings;
    let prep: Vec<Prepared> = pairs
        .iter()
        .map(|(c, x)| prepare(room, tok, c, x, sep, max_tokens))
        .collect::<Result<_>>()?;
    // The longest token prefix that every item shares inside its context.
    let mut shared = prep.iter().map(|p| p.n_ctx).min().unwrap_or(0);
    if let Some(first) = prep.first() {
        for p in &prep[1..] {
            shared = shared.min(first.ids.iter().zip(&p.ids).take_while(|(a, b)| a == b).count());
        }
    }
    if prep.len() < 2 || shared < MIN_SHARED_PREFIX {
        // No common prefix worth caching (documents after the separator): padded batches of
        // whole sequences, as multiple choice runs them.
        let reqs: Vec<Request> = prep
            .iter()
            .map(|p| Request {
                ids: p.ids[..p.ids.len() - 1].to_vec(),
                first: p.n_ctx - 1,
                targets: p.ids[p.n_ctx..].to_vec(),
            })
            .collect();
        let sums = sum_logprobs(m, &reqs, 1);
        return Ok(prep
            .iter()
            .zip(sums)
            .map(|(p, s)| (-s / std::f64::consts::LN_2, p.bytes))
            .collect());
    }
    let dev = m.embed.val().device();
    let mut cache = KvCache::new(m.config.num_hidden_layers);
    let prefix = &prep[0].ids[..shared];
    let h = m.hidden(tokens_tensor::<B>(&[prefix.to_vec()], &dev), Some(&mut cache));
    // The hidden state that predicts token `shared`: the prefix's last position.
    let last = h.narrow(1, shared - 1, 1);
    let mut out = Vec::with_capacity(prep.len());
    for p in &prep {
        if p.ids.len() == p.n_ctx {
            out.push((0.0, p.bytes)); // an empty continuation
            continue;
        }
        let mut parts = vec![last.clone()];
        if p.ids.len() - 1 > shared {
            let mut c = cache.clone();
            let own = &p.ids[shared..p.ids.len() - 1];
            parts.push(m.hidden(tokens_tensor::<B>(&[own.to_vec()], &dev), Some(&mut c)));
        }
        // Row j predicts token shared + j; only the continuation's rows go through the head.
        let n = p.ids.len() - p.n_ctx;
        let rows = Tensor::cat(parts, 1).narrow(1, p.n_ctx - shared, n);
        let lp = log_softmax(m.logits_of(rows), 2);
        let targets = Tensor::<B, 1, Int>::from_data(
            TensorData::new(p.ids[p.n_ctx..].iter().map(|&t| t as i64).collect::<Vec<_>>(), [n])
                .convert::<B::IntElem>(),
            &dev,
        );
        let nll = lp.gather(2, targets.reshape([1, n, 1])).neg();
        let v: Vec<f32> = nll.into_data().convert::<f32>().into_vec().expect("f32");
        let s: f64 = v.iter().map(|&x| x as f64).sum();
        out.push((s / std::f64::consts::LN_2, p.bytes));
    }
    Ok(out)
}
