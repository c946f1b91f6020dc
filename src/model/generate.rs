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

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Generate from `prompt` token ids; `on_text` receives each new piece of decoded text.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    tok: &Tok,
    prompt: &[u32],
    opts: &GenOptions,
    mut on_text: impl FnMut(&str),
) -> Result<GenOutput> {
    let device = model.embed.val().device();
    let stop_ids = tok.stop_ids(&model.config.eos_token_ids);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut out: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut input: Vec<u32> = prompt.to_vec();
    let mut finish = "length";
    for _ in 0..opts.max_tokens {
        let t = input.len();
        let logits = model.forward(tokens_tensor::<B>(&[input.clone()], &device), Some(&mut cache));
        let vocab = logits.dims()[2];
        let last: Vec<f32> = logits
            .narrow(1, t - 1, 1)
            .reshape([vocab])
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32");
        let next = sample(&last, opts, &mut rng);
        if stop_ids.contains(&next) {
            finish = "eos";
            break;
        }
        out.push(next);
        let text = tok.decode_clean(&out)?;
        // Print only complete UTF-8 (a multi-byte char may span tokens).
        if !text.ends_with('\u{FFFD}') && text.len() > printed && text.is_char_boundary(printed) {
            on_text(&text[printed..]);
            printed = text.len();
        }
        if let Some(pos) = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            finish = "stop";
            let text = text[..pos].to_string();
            return Ok(GenOutput { ids: out, text, finish });
        }
        input = vec![next];
    }
    let text = tok.decode_clean(&out)?;
    if text.len() > printed && text.is_char_boundary(printed) {
        on_text(&text[printed..]);
    }
    Ok(GenOutput { ids: out, text, finish })
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
