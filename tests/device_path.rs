//! The device path without a device: `codespot run` (score, tune, spot selection, ablation and
//! evaluation) on the CPU backend with the hand-written kernels off (`CODESPOT_GENERIC`), so
//! every step runs through burn's generic ops, as on burn-cuda; in f32 against the hand-written
//! path's numbers, and in bf16 against f32 within stated bounds. This checks the generic graph's
//! arithmetic and bookkeeping; it says nothing about CUDA's own kernels, launch or memory.

mod common;

use codespot::train::TuneSummary;
use std::path::{Path, PathBuf};
use std::process::Command;

fn recipe(gguf: &Path, out: &Path, dtype: &str) -> String {
    let mut r = common::tiny_recipe(
        "device-path",
        gguf,
        out,
        "heldout_tokens = 32\n",
        "\n[spot]\nk = [5.0]\ncontrols = [\"random\"]\n\n[eval]\ntasks = [\"code-bpb\"]\nlimit = 4\nmax_bpb_tokens = 32\ntuned_k = [5.0]\n",
    );
    r = r.replacen("out = ", &format!("dtype = \"{dtype}\"\nout = "), 1);
    r
}

/// Run the whole study in `out`; `generic` turns the hand-written kernels off.
fn study(root: &Path, corpora: &Path, gguf: &Path, name: &str, dtype: &str, generic: bool) -> PathBuf {
    let out = root.join(name);
    let rp = root.join(format!("{name}.toml"));
    std::fs::write(&rp, recipe(gguf, &out, dtype)).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_codespot"));
    c.args(["run", rp.to_str().unwrap()]).env("CODESPOT_CORPORA", corpora);
    if generic {
        c.env(codespot::model::fused::GENERIC_ENV, "1");
    } else {
        c.env_remove(codespot::model::fused::GENERIC_ENV);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    out
}

fn losses(out: &Path) -> Vec<f64> {
    let s: TuneSummary =
        serde_json::from_str(&std::fs::read_to_string(out.join("tune/toy/tune.json")).unwrap()).unwrap();
    s.history.iter().map(|h| h.loss).collect()
}

fn scores(out: &Path) -> codespot::source::Weights {
    codespot::source::weights::from_safetensors(&[out.join("base/toy/scores.safetensors")]).unwrap()
}

/// (condition, task) → value of each evaluation of the run.
fn evals(out: &Path) -> Vec<(String, String, f64)> {
    let mut v = vec![];
    for name in ["base", "tuned-toy"] {
        let r: Vec<codespot::eval::ConditionResults> =
            serde_json::from_str(&std::fs::read_to_string(out.join("eval").join(name).join("results.json")).unwrap())
                .unwrap();
        for c in r {
            for t in c.results {
                v.push((format!("{name}/{}", c.condition), t.task, t.value));
            }
        }
    }
    v
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn the_generic_path_gives_the_hand_written_paths_numbers_and_bf16_stays_close() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (gguf, _) = common::tiny_gguf(root, 5, true);
    let corpora = common::two_language_corpora(root, &gguf);
    let hand = study(root, &corpora.dir, &gguf, "hand", "f32", false);
    let generic = study(root, &corpora.dir, &gguf, "generic", "f32", true);
    let bf16 = study(root, &corpora.dir, &gguf, "bf16", "bf16", true);

    // f32: the same losses, scores and evaluations up to f32 summation order.
    let (lh, lg, lb) = (losses(&hand), losses(&generic), losses(&bf16));
    assert_eq!(lh.len(), 4);
    for (a, b) in lh.iter().zip(&lg) {
        assert!(rel(*b, *a) <= 1e-4, "generic loss {b} vs hand-written {a}");
    }
    let (sh, sg) = (scores(&hand), scores(&generic));
    for (name, t) in &sh.tensors {
        let g = &sg.tensors[name].data;
        let max = t.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = t.data.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-4 * max, "{name}: max {max:e}, diff {diff:e}");
    }
    // The switch took effect: the two paths round differently somewhere.
    assert!(
        sh.tensors.iter().any(|(n, t)| t.data != sg.tensors[n].data),
        "the generic run gave the hand-written path's bits: was it generic?"
    );
    let worst = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| rel(*y, *x)).fold(0.0, f64::max);
    eprintln!(
        "max relative loss difference: generic f32 {:.2e}, bf16 {:.2e}",
        worst(&lh, &lg),
        worst(&lh, &lb)
    );
    let (eh, eg, eb) = (evals(&hand), evals(&generic), evals(&bf16));
    assert!(eh.len() >= 6, "{eh:?}");
    for (a, b) in eh.iter().zip(&eg) {
        assert_eq!((&a.0, &a.1), (&b.0, &b.1));
        assert!(rel(b.2, a.2) <= 1e-4, "{a:?} vs generic {b:?}");
    }

    // bf16 weights: within 3 % of f32 on losses and bits per byte, and the same top sets mostly.
    for (a, b) in lh.iter().zip(&lb) {
        assert!(rel(*b, *a) <= 0.03, "bf16 loss {b} vs f32 {a}");
    }
    for (a, b) in eh.iter().zip(&eb) {
        assert_eq!((&a.0, &a.1), (&b.0, &b.1));
        assert!(rel(b.2, a.2) <= 0.03, "{a:?} vs bf16 {b:?}");
    }
    let masks = |w: &codespot::source::Weights| codespot::topk::top_masks(w, 5.0);
    let j = codespot::topk::jaccard(&masks(&sh), &masks(&scores(&bf16)));
    eprintln!("bf16 top-5 % Jaccard with f32: {j:.3}");
    assert!(j >= 0.7, "bf16 top-5 % Jaccard with f32: {j}");
}
