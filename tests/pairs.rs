//! Instruction-format tuning (`train.format = "pairs"`): pairs only from train and held-out
//! files, the chat-template rendering with the prompt out of the loss, the loss mask against a
//! hand-computed masked loss, and a pair-tuning run that resumes bit for bit.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Tensor, TensorData};
use codespot::data::{Corpora, Split};
use codespot::model::{self, tokens_tensor, Llama, LlamaConfig, ParamRef, NO_LOSS};
use std::collections::BTreeSet;
use std::path::Path;

type F64Ad = Autodiff<NdArray<f64>>;

/// A corpus `toypy` of Python files with documented functions (scanned as Python), built.
fn documented_corpus(dir: &Path, gguf: &Path, files: usize) -> Corpora {
    let src = dir.join("py");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..files {
        let body: String = (0..6)
            .map(|j| {
                format!(
                    "def scale_{i}_{j}(x, y):\n    \"\"\"Return x plus y, shifted by {j} and scaled for file {i}.\"\"\"\n    total = x + y + {j}\n    if total > {i}:\n        total -= 1\n    return total * {i}\n\n\n"
                )
            })
            .collect();
        std::fs::write(src.join(format!("m{i}.py")), body).unwrap();
    }
    let cdir = dir.join("corpora");
    std::fs::create_dir_all(&cdir).unwrap();
    std::fs::write(
        cdir.join("toypy.toml"),
        format!(
            "language = \"toypy\"\npairs = \"python\"\n[[sources]]\nkind = \"dir\"\nroots = [\"{}\"]\ninclude = [\"**/*.py\"]\n",
            src.display()
        ),
    )
    .unwrap();
    let corpora = Corpora { dir: cdir };
    let tok = model::load(gguf.to_str().unwrap()).unwrap().tokenizer;
    codespot::data::build(&corpora, "toypy", 64.0, &tok, "tiny", false).unwrap();
    corpora
}

fn split_paths(corpora: &Corpora, split: Split) -> BTreeSet<String> {
    let p = corpora.split_path("toypy", split).unwrap();
    codespot::data::read_split(&p)
        .unwrap()
        .map(|d| d.unwrap().path)
        .collect()
}

#[test]
fn pairs_come_from_train_and_heldout_files_only_never_calibration() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, _) = common::tiny_gguf(dir.path(), 3, true);
    let corpora = documented_corpus(dir.path(), &gguf, 80);
    let st = corpora.stats("toypy").unwrap();
    let (train, held) = (st.pairs.clone().unwrap(), st.heldout_pairs.clone().unwrap());
    assert!(train.pairs > 0 && held.pairs > 0, "{train:?} {held:?}");
    let calib = split_paths(&corpora, Split::Calib);
    assert!(!calib.is_empty(), "some files are calibration files");
    for (split, n) in [(Split::Train, train.pairs), (Split::Heldout, held.pairs)] {
        let pairs = codespot::data::read_pairs(&corpora, "toypy", split).unwrap();
        assert_eq!(pairs.len(), n);
        let own = split_paths(&corpora, split);
        for p in &pairs {
            assert!(own.contains(&p.path), "{} is not a {} file", p.path, split.name());
            assert!(!calib.contains(&p.path));
            // The pair is right: the doc is the instruction, the function without it the response.
            let j: usize = p.name.rsplit('_').next().unwrap().parse().unwrap();
            assert!(
                p.instruction.contains(&format!("shifted by {j} and scaled")),
                "{}",
                p.instruction
            );
            assert!(p.instruction.contains(&format!("Python function `{}`", p.name)));
            assert!(
                p.response.starts_with(&format!("def {}(x, y):", p.name)),
                "{}",
                p.response
            );
            assert!(!p.response.contains("\"\"\""), "the docstring is not in the response");
            assert!(p.response.contains(&format!("total = x + y + {j}")));
        }
    }
    assert!(codespot::data::read_pairs(&corpora, "toypy", Split::Calib).is_err());
}

/// Rows with prompt tokens and padding flagged out of the loss, of unequal counted lengths.
fn masked_rows() -> Vec<Vec<u32>> {
    let f = NO_LOSS;
    vec![
        vec![3 | f, 17 | f, 42 | f, 5, 60, 61, 2, 9, 33],
        vec![7 | f, 7 | f, 1, 0, 12, 50, 44 | f, 3 | f, 21 | f],
        vec![9 | f, 8 | f, 30 | f, 31 | f, 32 | f, 11, 12, 4 | f, 4 | f],
    ]
}

/// The masked mean loss computed by hand on burn's full autodiff graph in f64: Σ over counted
/// positions of −log p(target) / their count, and its gradients by name.
fn hand_masked(cfg: &LlamaConfig, w: &codespot::source::Weights, rows: &[Vec<u32>]) -> (f64, Vec<(String, Vec<f64>)>) {
    let dev = Default::default();
    let m = Llama::<F64Ad>::from_weights(cfg, w, &dev).unwrap();
    let plain: Vec<Vec<u32>> = rows.iter().map(|r| r.iter().map(|&x| x & !NO_LOSS).collect()).collect();
    let (b, t) = (rows.len(), rows[0].len() - 1);
    let mask: Vec<f64> = rows
        .iter()
        .flat_map(|r| r[1..].iter().map(|&x| if x & NO_LOSS == 0 { 1.0 } else { 0.0 }))
        .collect();
    let count: f64 = mask.iter().sum();
    let mask = Tensor::<F64Ad, 2>::from_data(TensorData::new(mask, [b, t]), &dev);
    let loss = (m.token_nll(tokens_tensor::<F64Ad>(&plain, &dev)) * mask).sum() / count;
    let l: f64 = loss.clone().into_data().convert::<f64>().into_vec().unwrap()[0];
    let grads = loss.backward();
    let g = m
        .params()
        .into_iter()
        .map(|(name, p)| {
            let v = match p {
                ParamRef::Vector(p) => p.val().grad(&grads).unwrap().into_data(),
                ParamRef::Matrix(p) => p.val().grad(&grads).unwrap().flatten::<1>(0, 1).into_data(),
            };
            (name, v.convert::<f64>().into_vec().unwrap())
        })
        .collect();
    (l, g)
}

/// The loss mask: flagged targets are out of the loss (the hand-computed masked mean and its
/// gradients, on the hand-written CPU path and on burn's path, with micro-batches of unequal
/// counts), and a flagged target's id changes nothing at all.
#[test]
fn loss_mask_gives_the_hand_computed_masked_loss_and_gradients() {
    type Ad = codespot::backend::CpuAd;
    let rows = masked_rows();
    for (c, cfg) in common::fused_variants().into_iter().enumerate() {
        let w = model::llama::random_weights(&cfg, 11 + c as u64);
        let (hl, hg) = hand_masked(&cfg, &w, &rows);
        let fused = Llama::<Ad>::from_weights(&cfg, &w, &Default::default()).unwrap();
        let mut burn_path = fused.clone();
        burn_path.fused = false;
        for (what, m) in [("fused", &fused), ("burn", &burn_path)] {
            for micro in [1, 3] {
                let (l, g) = codespot::engine::batch_loss_grads(m, &rows, micro, true);
                assert!(
                    (l - hl).abs() <= 1e-5 * hl.abs(),
                    "config {c} {what} micro {micro}: loss {l} vs hand {hl}"
                );
                for ((name, h), g) in hg.iter().zip(g) {
                    let g: Vec<f32> = g.unwrap().into_data().into_vec().unwrap();
                    let max = h.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let diff = g.iter().zip(h).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
                    assert!(
                        max > 0.0 && diff <= 1e-4 * max,
                        "config {c} {what} micro {micro} {name}: max |g| {max:e}, diff {diff:e}"
                    );
                }
            }
        }
        // A flagged target's id does not matter: the same bits with other ids at the rows' last
        // positions (targets only, never inputs).
        let mut other = rows.clone();
        other[1][8] = 1 | NO_LOSS;
        other[2][8] = 63 | NO_LOSS;
        let (la, ga) = codespot::engine::batch_loss_grads(&fused, &rows, 3, true);
        let (lb, gb) = codespot::engine::batch_loss_grads(&fused, &other, 3, true);
        assert_eq!(la.to_bits(), lb.to_bits());
        for (a, b) in ga.into_iter().zip(gb) {
            let a: Vec<f32> = a.unwrap().into_data().into_vec().unwrap();
            let b: Vec<f32> = b.unwrap().into_data().into_vec().unwrap();
            assert_eq!(a, b);
        }
    }
}

/// The default model's chat template renders a pair as SmolLM2's ChatML: the prompt (system and
/// user turns and the assistant header) flagged out of the loss, the response and its end of turn
/// in it; and the tiny model's template (ChatML without a system turn) the same way.
#[test]
fn a_pair_renders_in_the_chat_template_with_only_the_response_in_the_loss() {
    let pair = codespot::pairs::Pair {
        language: "python".into(),
        path: "m.py".into(),
        name: "twice".into(),
        instruction: "Return twice x.\n\nWrite this as the Python function `twice`.".into(),
        response: "def twice(x):\n    return 2 * x".into(),
    };
    let ck = model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let tok = &ck.tokenizer;
    let ids = codespot::train::pairs::render(tok, &pair, false).unwrap();
    let prompt: Vec<u32> = ids
        .iter()
        .take_while(|&&x| x & NO_LOSS != 0)
        .map(|&x| x & !NO_LOSS)
        .collect();
    let rest: Vec<u32> = ids[prompt.len()..].to_vec();
    assert!(rest.iter().all(|&x| x & NO_LOSS == 0), "one prompt, then the response");
    let p = tok.decode(&prompt).unwrap();
    assert!(
        p.starts_with("<|im_start|>system\n")
            && p.ends_with(&format!(
                "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                pair.instruction
            )),
        "{p:?}"
    );
    assert_eq!(tok.decode(&rest).unwrap(), format!("{}<|im_end|>\n", pair.response));
    // The whole rendering is the template's text, token for token.
    let full = tok
        .apply_chat(
            &[
                codespot::model::Message::user(&pair.instruction),
                codespot::model::Message::assistant(&pair.response),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        tok.decode(&ids.iter().map(|&x| x & !NO_LOSS).collect::<Vec<_>>())
            .unwrap(),
        full
    );
    // train_on_input: nothing flagged.
    let all = codespot::train::pairs::render(tok, &pair, true).unwrap();
    assert!(all.iter().all(|&x| x & NO_LOSS == 0));
    assert_eq!(all.len(), ids.len());

    let dir = tempfile::tempdir().unwrap();
    let (gguf, _) = common::tiny_gguf(dir.path(), 3, true);
    let tiny = model::load(gguf.to_str().unwrap()).unwrap().tokenizer;
    let ids = codespot::train::pairs::render(&tiny, &pair, false).unwrap();
    let n = ids.iter().filter(|&&x| x & NO_LOSS != 0).count();
    let plain: Vec<u32> = ids.iter().map(|&x| x & !NO_LOSS).collect();
    assert_eq!(
        tiny.decode(&plain[..n]).unwrap(),
        format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            pair.instruction
        )
    );
    assert_eq!(
        tiny.decode(&plain[n..]).unwrap(),
        format!("{}<|im_end|>\n", pair.response)
    );
}

fn pair_recipe(gguf: &Path, out: &Path) -> String {
    format!(
        "name = \"pairs\"\nmodel = \"{}\"\nlanguages = [\"toypy\"]\nout = \"{}\"\n\n[train]\nsteps = 4\nbatch = 2\nseq_len = 320\nlr = 3e-3\nwarmup = 1\ncheckpoint_every = 2\ncheckpoint_at = [1]\nheldout_tokens = 64\nheldout_pairs = 8\n\n[importance]\ntokens = 64\nseq_len = 16\nbatch = 2\nfolds = 2\n",
        gguf.display(),
        out.display()
    )
}

/// Pair tuning end to end through the CLI: the held-out pair loss with its interval at every
/// checkpoint (and `checkpoint_at`'s extra step), falling on the tuned language, and a run killed
/// after a checkpoint resumes on the same losses and weights, bit for bit.
#[test]
fn pair_tuning_reports_heldout_pair_loss_and_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (gguf, _) = common::tiny_gguf(root, 3, true);
    let corpora = documented_corpus(root, &gguf, 200);
    let cli = |recipe: &Path, extra: &[&str], env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_codespot"));
        c.args(["tune", recipe.to_str().unwrap(), "--lang", "toypy"])
            .args(extra)
            .env("CODESPOT_CORPORA", &corpora.dir);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let full = root.join("full.toml");
    std::fs::write(&full, pair_recipe(&gguf, &root.join("full"))).unwrap();
    let out = cli(&full, &[], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d = root.join("full/tune/toypy");
    let sum: codespot::train::TuneSummary =
        serde_json::from_str(&std::fs::read_to_string(d.join("tune.json")).unwrap()).unwrap();
    let steps: Vec<usize> = sum.heldout.iter().map(|h| h.step).collect();
    assert_eq!(steps, vec![0, 1, 2, 4]);
    assert_eq!(codespot::train::steps_in(&d.join("snapshots")), vec![0, 1, 2, 4]);
    for h in &sum.heldout {
        let p = h.pair_loss["toypy"];
        assert!(p.lo <= p.mean && p.mean <= p.hi && p.lo < p.hi, "{p:?}");
        assert!(p.pairs > 0 && p.pairs <= 8 && p.tokens > p.pairs);
    }
    let (first, last) = (sum.heldout[0].pair_loss["toypy"], sum.heldout[3].pair_loss["toypy"]);
    assert!(
        last.mean < first.mean,
        "tuning lowers the held-out pair loss: {first:?} → {last:?}"
    );
    // The paired change against the base model on the same pairs.
    assert_eq!(first.change, None);
    let (dl, lo, hi) = last.change.expect("a paired change at the last checkpoint");
    assert!(
        (dl - (last.mean - first.mean)).abs() < 1e-9,
        "{dl} vs {}",
        last.mean - first.mean
    );
    assert!(lo <= dl && dl <= hi && hi < 0.0, "paired: {last:?}");
    assert!(sum.history.iter().all(|h| h.loss.is_finite() && h.tokens_per_s > 0.0));
    // burn-train's learner gives the plain reference loop's losses and weights, bit for bit.
    let loaded = codespot::recipe::load(&full, &[]).unwrap();
    let r = codespot::train::reference::run::<codespot::backend::Cpu>(&loaded, &corpora, "toypy", &Default::default())
        .unwrap();
    let got: Vec<(f64, f64)> = sum.history.iter().map(|h| (h.loss, h.grad_norm)).collect();
    assert_eq!(got, r.steps);
    let tuned =
        codespot::source::weights::from_safetensors(&[d.join("checkpoints/step-000004/model.safetensors")]).unwrap();
    assert_eq!(tuned.tensors, r.weights.tensors);
    // Every checkpoint's movement against the base, measured against the cross-sample null.
    assert!(d.join("snapshots/step-000000/folds.safetensors").is_file());
    for m in &sum.metrics {
        match &m.movement {
            None => assert_eq!(m.step, 0),
            Some(mv) => {
                assert_eq!(mv.folds_per_half, 2);
                for iv in [mv.within, mv.within_tuned, mv.cross, mv.diff] {
                    assert!(iv.lo <= iv.value + 1e-12 && iv.value <= iv.hi + 1e-12, "{mv:?}");
                }
                assert!((mv.diff.value - (mv.within.value - mv.cross.value)).abs() < 1e-12);
                assert!(mv.verdict == "moved" || mv.verdict == "not distinguishable");
            }
        }
    }

    let killed = root.join("killed.toml");
    std::fs::write(&killed, pair_recipe(&gguf, &root.join("killed"))).unwrap();
    let out = cli(&killed, &[], &[("CODESPOT_ABORT_AFTER_CHECKPOINT", "2")]);
    assert!(!out.status.success(), "the abort hook kills the process");
    let out = cli(&killed, &["--resume"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let k = root.join("killed/tune/toypy");
    let again: codespot::train::TuneSummary =
        serde_json::from_str(&std::fs::read_to_string(k.join("tune.json")).unwrap()).unwrap();
    let bits = |s: &codespot::train::TuneSummary| s.history.iter().map(|h| h.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&sum), bits(&again), "the same losses at every step");
    assert_eq!(sum.heldout, again.heldout, "the same held-out losses and intervals");
    let moves = |s: &codespot::train::TuneSummary| s.metrics.iter().map(|m| m.movement.clone()).collect::<Vec<_>>();
    assert_eq!(moves(&sum), moves(&again), "the same movement intervals");
    let w = |p: &Path| {
        codespot::source::weights::from_safetensors(&[p.join("checkpoints/step-000004/model.safetensors")]).unwrap()
    };
    assert_eq!(w(&d).tensors, w(&k).tensors, "the same final weights");
}

/// `train.seeds`: each language is tuned again with another data order, from the main run's base
/// snapshot, and at each common checkpoint the two tuned spots are compared through the
/// cross-sample null (`seeds.json`): the tuning-noise level. A replicate seed equal to
/// `train.seed`, or replicates without folds, are refused.
#[test]
fn seed_replicates_give_the_tuning_noise_level_at_each_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (gguf, _) = common::tiny_gguf(root, 3, true);
    let corpora = documented_corpus(root, &gguf, 200);
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_codespot"))
            .args(args)
            .env("CODESPOT_CORPORA", &corpora.dir)
            .output()
            .unwrap()
    };
    let out = root.join("seeds");
    let with = |rest: &str, folds: bool| {
        let t = pair_recipe(&gguf, &out).replace("heldout_pairs = 8\n", &format!("heldout_pairs = 8\n{rest}"));
        if folds {
            t
        } else {
            t.replace("folds = 2\n", "")
        }
    };
    let p = root.join("seeds.toml");
    std::fs::write(&p, with("seeds = [7]\n", true)).unwrap();
    let o = cli(&["tune", p.to_str().unwrap(), "--lang", "toypy"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = out.join("tune/toypy");
    let r = d.join("seed-7");
    assert_eq!(codespot::train::steps_in(&r.join("snapshots")), vec![0, 1, 2, 4]);
    for f in ["scores.safetensors", "folds.safetensors"] {
        assert_eq!(
            std::fs::read(d.join("snapshots/step-000000").join(f)).unwrap(),
            std::fs::read(r.join("snapshots/step-000000").join(f)).unwrap(),
            "the replicate starts from the main run's base snapshot"
        );
    }
    let losses = |p: &Path| -> Vec<f64> {
        let s: codespot::train::TuneSummary = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        s.history.iter().map(|h| h.loss).collect()
    };
    let (main, rep) = (losses(&d.join("tune.json")), losses(&r.join("tune.json")));
    assert_eq!(main.len(), rep.len());
    assert_ne!(main, rep, "another seed, another data order");
    let sm = codespot::train::seeds::read(&d).unwrap().expect("seeds.json");
    assert_eq!(
        sm.iter().map(|m| (m.seed, m.step)).collect::<Vec<_>>(),
        vec![(7, 1), (7, 2), (7, 4)]
    );
    for m in &sm {
        let mv = &m.movement;
        for iv in [mv.within, mv.within_tuned, mv.cross, mv.diff] {
            assert!(iv.lo <= iv.value + 1e-12 && iv.value <= iv.hi + 1e-12, "{mv:?}");
        }
        assert!((mv.diff.value - (mv.within.value - mv.cross.value)).abs() < 1e-12);
    }
    // A resumed, finished run keeps what it measured.
    let o = cli(&["tune", p.to_str().unwrap(), "--lang", "toypy", "--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(codespot::train::seeds::read(&d).unwrap().unwrap(), sm);

    for (text, want) in [
        (with("seeds = [1]\n", true), "train.seeds"),
        (with("seeds = [7]\n", false), "importance.folds"),
    ] {
        let bad = root.join("bad-seeds.toml");
        std::fs::write(&bad, text).unwrap();
        let o = cli(&["recipe", "check", bad.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{err}");
    }
}
