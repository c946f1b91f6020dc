//! HumanEval: generate completions, execute them in the sandbox, pass@k.

use super::datasets::CodeProblem;
use super::sandbox::{run_python, Limits, Outcome};
use crate::model::generate::{generate, GenOptions};
use crate::model::{Llama, Message, Tok};
use anyhow::Result;
use burn::tensor::backend::Backend;

/// The program HumanEval's harness runs: prompt + completion + tests + `check(entry_point)`.
pub fn program(p: &CodeProblem, completion: &str) -> String {
    format!("{}{}\n\n{}\n\ncheck({})\n", p.prompt, completion, p.test, p.entry_point)
}

/// Whether a completion passes the problem's tests.
pub fn passes(p: &CodeProblem, completion: &str, limits: &Limits) -> Result<bool> {
    Ok(run_python(&program(p, completion), limits)? == Outcome::Passed)
}

/// Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n < k || n - c < k {
        return if c > 0 { 1.0 } else { 0.0 };
    }
    let mut prod = 1.0;
    for i in (n - c + 1)..=n {
        prod *= 1.0 - k as f64 / i as f64;
    }
    1.0 - prod
}

/// Stop sequences for raw (base-model) completion.
pub const STOP: [&str; 5] = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"];

/// Turn an instruct model's answer into a completion of `p.prompt`: take the first fenced
/// block (or the whole answer); if it redefines the entry point, keep the whole function and
/// put it after the prompt's imports; else use it as the body.
pub fn completion_from_chat(p: &CodeProblem, answer: &str) -> String {
    let code = crate::data::first_fenced_block(answer).unwrap_or_else(|| answer.to_string());
    if code.contains(&format!("def {}", p.entry_point)) {
        // The prompt ends inside the function: close it with a body that defers to the new one.
        format!("    pass\n\n{code}")
    } else {
        code
    }
}

/// Generate one completion (greedy when `opts.temperature` is 0).
pub fn complete<B: Backend>(m: &Llama<B>, tok: &Tok, p: &CodeProblem, chat: bool, opts: &GenOptions) -> Result<String> {
    if chat && tok.chat_template.is_some() {
        let msg = format!("Complete the following Python function. Answer with the whole function in one ```python code block.\n\n```python\n{}```", p.prompt);
        let text = tok.apply_chat(&[Message::user(&msg)], true)?;
        let ids = tok.encode(&text, false)?;
        let out = generate(m, tok, &ids, opts, |_| {})?;
        Ok(completion_from_chat(p, &out.text))
    } else {
        let ids = tok.encode(&p.prompt, true)?;
        let mut o = opts.clone();
        o.stop = STOP.iter().map(|s| s.to_string()).collect();
        Ok(generate(m, tok, &ids, &o, |_| {})?.text)
    }
}
