//! HumanEval: generate completions, execute them in the sandbox, pass@k.

use super::datasets::CodeProblem;
use super::sandbox::{run_python, Limits, Outcome};
use crate::model::generate::{GenOptions, GenOutput, GenRequest};
use crate::model::{Message, Tok};
use anyhow::Result;

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
pub(crate) const STOP: [&str; 5] = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"];

/// Turn an instruct model's answer into a completion of `p.prompt`: take the first fenced
/// block (or the whole answer); if it redefines the entry point, keep the whole function and
/// put it after the prompt's imports; else use it as the body.
pub(crate) fn completion_from_chat(p: &CodeProblem, answer: &str) -> String {
    let code = crate::data::first_fenced_block(answer).unwrap_or_else(|| answer.to_string());
    if code.contains(&format!("def {}", p.entry_point)) {
        // The prompt ends inside the function: close it with a body that defers to the new one.
        format!("    pass\n\n{code}")
    } else {
        code
    }
}

/// What a HumanEval completion of `p` decodes (`generate_many` runs many at once): the chat
/// prompt when `chat` and the tokenizer has a template (no stop strings: the answer's code
/// block is taken afterwards), else the raw prompt cut at [`STOP`].
pub fn request(tok: &Tok, p: &CodeProblem, chat: bool, opts: &GenOptions) -> Result<GenRequest> {
    let mut o = opts.clone();
    let prompt = if chat && tok.chat_template.is_some() {
        let msg = format!("Complete the following Python function. Answer with the whole function in one ```python code block.\n\n```python\n{}```", p.prompt);
        tok.encode(&tok.apply_chat(&[Message::user(&msg)], true)?, false)?
    } else {
        o.stop = STOP.iter().map(|s| s.to_string()).collect();
        tok.encode(&p.prompt, true)?
    };
    Ok(GenRequest { prompt, opts: o })
}

/// The completion of `p.prompt` from what [`request`] decoded.
pub fn completion(tok: &Tok, p: &CodeProblem, chat: bool, out: &GenOutput) -> String {
    if chat && tok.chat_template.is_some() {
        completion_from_chat(p, &out.text)
    } else {
        out.text.clone()
    }
}

/// HumanEval-X: the files, steps (compile, run) and failure marker for one language.
#[allow(clippy::type_complexity)]
pub(crate) fn x_program(
    lang: &str,
    p: &CodeProblem,
    completion: &str,
    run: &Limits,
) -> Result<(Vec<(String, String)>, Vec<(Vec<String>, Limits)>, Option<&'static str>)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let compile = Limits {
        wall: std::time::Duration::from_secs(60),
        cpu_s: 60,
        mem_bytes: 4 << 30,
        nproc: 64,
    };
    Ok(match lang {
        "python" => (
            vec![(
                "program.py".into(),
                format!("{}{}\n\n{}\n", p.prompt, completion, p.test),
            )],
            vec![(
                vec![super::sandbox::python(), "-I".into(), "program.py".into()],
                run.clone(),
            )],
            None,
        ),
        "cpp" => (
            vec![(
                "main.cpp".into(),
                format!("{}{}\n{}\n", p.declaration, completion, p.test),
            )],
            vec![
                (s(&["g++", "-std=c++17", "-O0", "-o", "main", "main.cpp"]), compile),
                (s(&["./main"]), run.clone()),
            ],
            None,
        ),
        // node reserves far more address space than it uses, and its ~10 threads count against
        // RLIMIT_NPROC: larger limits.
        "js" => (
            vec![("main.js".into(), format!("{}{}\n{}\n", p.prompt, completion, p.test))],
            vec![(
                s(&["node", "main.js"]),
                Limits {
                    mem_bytes: 16 << 30,
                    nproc: 64,
                    ..run.clone()
                },
            )],
            Some("Assertion failed"),
        ),
        // The JVM reserves large address space and starts many threads.
        "java" => {
            let jvm = |l: &Limits| Limits {
                mem_bytes: 16 << 30,
                nproc: 512,
                ..l.clone()
            };
            (
                vec![(
                    "Main.java".into(),
                    format!("{}{}\n{}\n", p.declaration, completion, p.test),
                )],
                vec![
                    (s(&["javac", "Main.java"]), jvm(&compile)),
                    (s(&["java", "-Xmx512m", "Main"]), jvm(run)),
                ],
                None,
            )
        }
        other => {
            anyhow::bail!(
                "humaneval-x:{other}: executing {other} completions is not implemented (cpp, java, js, python are)"
            )
        }
    })
}

/// Whether a HumanEval-X completion passes.
pub fn x_passes(lang: &str, p: &CodeProblem, completion: &str, limits: &Limits) -> Result<bool> {
    let (files, steps, marker) = x_program(lang, p, completion, limits)?;
    let files: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    Ok(super::sandbox::run_steps(&files, &steps, marker)? == Outcome::Passed)
}

/// What a HumanEval-X completion decodes: the raw prompt, stopped where the function ends.
pub(crate) fn x_request(tok: &Tok, lang: &str, p: &CodeProblem, opts: &GenOptions) -> Result<GenRequest> {
    let mut o = opts.clone();
    o.stop = match lang {
        "python" => STOP.iter().map(|s| s.to_string()).collect(),
        _ => vec!["\n}".to_string()],
    };
    Ok(GenRequest {
        prompt: tok.encode(&p.prompt, true)?,
        opts: o,
    })
}

/// The completion from what [`x_request`] decoded: a brace-language function gets back the
/// closing brace its stop string cut.
pub(crate) fn x_completion(lang: &str, out: &GenOutput) -> String {
    if lang == "python" || out.finish != "stop" {
        out.text.clone()
    } else {
        format!("{}\n}}\n", out.text)
    }
}
