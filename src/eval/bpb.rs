//! Bits per byte: of held-out code (`code-bpb:<lang>`), of HumanEval's canonical solutions
//! given their prompts (`humaneval-bpb`), and of MBPP's gold solutions (`mbpp`).

use crate::model::{tokens_tensor, Llama, Tok};
use anyhow::Result;
use burn::tensor::backend::Backend;

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
    let dev = m.embed.val().device();
    let mut ids = if ctx.is_empty() {
        vec![sep]
    } else {
        tok.encode(ctx, false)?
    };
    let mut cont_ids = tok.encode(cont, false)?;
    cont_ids.truncate(max_tokens.max(1));
    let room = m.config.max_position_embeddings.max(2);
    cont_ids.truncate(room - 1);
    if ids.len() + cont_ids.len() > room {
        ids.drain(..ids.len() + cont_ids.len() - room);
    }
    let n_ctx = ids.len();
    let bytes = if cont_ids.len() == tok.encode(cont, false)?.len() {
        cont.len()
    } else {
        tok.decode(&cont_ids)?.len()
    };
    ids.extend(&cont_ids);
    let nll = m.token_nll(tokens_tensor::<B>(&[ids.clone()], &dev));
    let v: Vec<f32> = nll.into_data().convert::<f32>().into_vec().expect("f32");
    // Position i predicts token i+1: the continuation's tokens are predicted at n_ctx-1 ….
    let s: f64 = v[n_ctx - 1..].iter().map(|&x| x as f64).sum();
    Ok((s / std::f64::consts::LN_2, bytes))
}
