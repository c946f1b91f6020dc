//! Greedy and sampled generation with a KV cache.

use super::llama::{tokens_tensor, KvCache, Llama};
use super::tokenizer::Tok;
use anyhow::Result;
use burn::tensor::backend::Backend;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct GenOptions {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
    /// Stop when the decoded completion contains one of these.
    pub stop: Vec<String>,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: vec![],
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenOutput {
    pub ids: Vec<u32>,
    pub text: String,
    /// Why it stopped: "eos", "stop", or "length".
    pub finish: &'static str,
}

/// Pick the next token from a logits row.
pub fn sample(logits: &[f32], opts: &GenOptions, rng: &mut impl Rng) -> u32 {
    if opts.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.top_k > 0 {
        idx.truncate(opts.top_k);
    }
    let m = logits[idx[0]];
    let mut p: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - m) / opts.temperature) as f64).exp())
        .collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= z);
    if opts.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = p.iter().position(|x| {
            acc += x;
            acc >= opts.top_p as f64
        });
        if let Some(k) = keep {
            p.truncate(k + 1);
            idx.truncate(k + 1);
        }
    }
    let z: f64 = p.iter().sum();
    let mut u = rng.random::<f64>() * z;
    for (j, x) in p.iter().enumerate() {
        u -= x;
        if u <= 0.0 {
            return idx[j] as u32;
        }
    }
    idx[p.len() - 1] as u32
}

pub(crate) fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// One prompt of a batch and how to continue it (its own seed, length and stop strings).
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub opts: GenOptions,
}

/// Generate from `prompt` token ids; `on_text` receives each new piece of decoded text.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    tok: &Tok,
    prompt: &[u32],
    opts: &GenOptions,
    on_text: impl FnMut(&str),
) -> Result<GenOutput> {
    let req = GenRequest {
        prompt: prompt.to_vec(),
        opts: opts.clone(),
    };
    Ok(decode_batch(model, tok, std::slice::from_ref(&req), on_text)?.remove(0))
}

/// Generate for several prompts at once, at most `batch` rows per forward pass: prompts are
/// taken in order of length (so a batch pads little), a batch's identical prompts share one
/// prefill, and the outputs come back in `reqs`' order. Each row is what [`generate`] gives
/// for it alone, up to the rounding of a longer attention row (greedy: the same tokens
/// unless two logits tie to within that rounding).
pub fn generate_many<B: Backend>(
    model: &Llama<B>,
    tok: &Tok,
    reqs: &[GenRequest],
    batch: usize,
    mut on_done: impl FnMut(usize),
) -> Result<Vec<GenOutput>> {
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by(|&a, &b| (reqs[a].prompt.len(), &reqs[a].prompt).cmp(&(reqs[b].prompt.len(), &reqs[b].prompt)));
    let mut out: Vec<Option<GenOutput>> = vec![None; reqs.len()];
    for chunk in order.chunks(batch.max(1)) {
        let part: Vec<GenRequest> = chunk.iter().map(|&i| reqs[i].clone()).collect();
        for (&i, o) in chunk.iter().zip(decode_batch(model, tok, &part, |_| {})?) {
            out[i] = Some(o);
        }
        on_done(chunk.len());
    }
    Ok(out.into_iter().map(|o| o.expect("every request decoded")).collect())
}

/// One row's decoding state.
struct Row {
    rng: rand::rngs::StdRng,
    ids: Vec<u32>,
    printed: usize,
    done: Option<GenOutput>,
}

/// Decode every request of one batch together: the distinct prompts, left-padded to the
/// longest, are prefilled in one pass; their cache rows are repeated for the requests that
/// share them; each step feeds every unfinished row its last token, and a finished row leaves
/// the batch (its cache rows are dropped). `on_text` streams row 0's text.
fn decode_batch<B: Backend>(
    model: &Llama<B>,
    tok: &Tok,
    reqs: &[GenRequest],
    mut on_text: impl FnMut(&str),
) -> Result<Vec<GenOutput>> {
    let device = model.embed.val().device();
    let stop_ids = tok.stop_ids(&model.config.eos_token_ids);
    // Distinct prompts, and which one each request continues.
    let mut distinct: Vec<&[u32]> = Vec::new();
    let of: Vec<usize> = reqs
        .iter()
        .map(|r| {
            distinct
                .iter()
                .position(|p| *p == r.prompt.as_slice())
                .unwrap_or_else(|| {
                    distinct.push(&r.prompt);
                    distinct.len() - 1
                })
        })
        .collect();
    anyhow::ensure!(
        distinct.iter().all(|p| !p.is_empty()),
        "generation needs a non-empty prompt"
    );
    let longest = distinct.iter().map(|p| p.len()).max().unwrap_or(0);
    let pads: Vec<usize> = distinct.iter().map(|p| longest - p.len()).collect();
    let rows: Vec<Vec<u32>> = distinct
        .iter()
        .map(|p| {
            std::iter::repeat_n(p[0], longest - p.len())
                .chain(p.iter().copied())
                .collect()
        })
        .collect();
    let mut cache = KvCache::padded(model.config.num_hidden_layers, pads);
    let mut logits = last_row_logits(model, tokens_tensor::<B>(&rows, &device), &mut cache);
    cache.select_rows(&of);
    logits = of.iter().map(|&u| logits[u].clone()).collect();
    let mut state: Vec<Row> = reqs
        .iter()
        .map(|r| Row {
            rng: rand::rngs::StdRng::seed_from_u64(r.opts.seed),
            ids: Vec::new(),
            printed: 0,
            done: None,
        })
        .collect();
    // The requests still decoding, in cache-row order.
    let mut live: Vec<usize> = (0..reqs.len()).collect();
    loop {
        for (row, &r) in live.iter().enumerate() {
            let (opts, st) = (&reqs[r].opts, &mut state[r]);
            let mut finish = None;
            if opts.max_tokens == 0 {
                finish = Some("length");
            } else {
                let next = sample(&logits[row], opts, &mut st.rng);
                if stop_ids.contains(&next) {
                    finish = Some("eos");
                } else {
                    st.ids.push(next);
                }
            }
            let mut text = tok.decode_clean(&st.ids)?;
            if finish.is_none() {
                if let Some(pos) = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                    text.truncate(pos);
                    finish = Some("stop");
                } else if st.ids.len() >= opts.max_tokens {
                    finish = Some("length");
                }
            }
            // Row 0 streams: complete UTF-8 only while decoding (a character may span tokens),
            // the rest at the end.
            let whole = finish.is_some() || !text.ends_with('\u{FFFD}');
            if r == 0 && whole && text.len() > st.printed && text.is_char_boundary(st.printed) {
                on_text(&text[st.printed..]);
                st.printed = text.len();
            }
            if let Some(finish) = finish {
                st.done = Some(GenOutput {
                    ids: std::mem::take(&mut st.ids),
                    text,
                    finish,
                });
            }
        }
        let keep: Vec<usize> = (0..live.len()).filter(|&i| state[live[i]].done.is_none()).collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() < live.len() {
            cache.select_rows(&keep);
            live = keep.iter().map(|&i| live[i]).collect();
        }
        let step: Vec<Vec<u32>> = live
            .iter()
            .map(|&r| vec![*state[r].ids.last().expect("a token")])
            .collect();
        logits = last_row_logits(model, tokens_tensor::<B>(&step, &device), &mut cache);
    }
    Ok(state.into_iter().map(|s| s.done.expect("every row finished")).collect())
}

/// The last position's logits of each row after feeding `tokens` through the cache (the
/// vocabulary projection only at that position).
fn last_row_logits<B: Backend>(
    model: &Llama<B>,
    tokens: burn::tensor::Tensor<B, 2, burn::tensor::Int>,
    cache: &mut KvCache<B>,
) -> Vec<Vec<f32>> {
    let [b, t] = tokens.dims();
    let h = model.hidden(tokens, Some(cache)).narrow(1, t - 1, 1);
    let logits = model.logits_of(h);
    let v = logits.dims()[2];
    let flat: Vec<f32> = logits.into_data().convert::<f32>().into_vec().expect("f32 logits");
    (0..b).map(|i| flat[i * v..(i + 1) * v].to_vec()).collect()
}

/// Logits of the last position for one sequence.
pub fn last_logits<B: Backend>(m: &Llama<B>, ids: &[u32], device: &B::Device) -> Vec<f32> {
    let t = ids.len();
    let logits = m.forward(tokens_tensor::<B>(&[ids.to_vec()], device), None);
    let v = logits.dims()[2];
    logits
        .narrow(1, t - 1, 1)
        .reshape([v])
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 logits")
}
