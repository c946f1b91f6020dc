//! Recipes and tuning on a tiny random model: checkpoints, snapshots, held-out losses,
//! TensorBoard events read back by TensorBoard itself, kill-and-resume, bad recipes.

mod common;

use codespot::data::Corpora;
use codespot::recipe;
use std::path::{Path, PathBuf};
use std::process::Command;

fn recipe_text(gguf: &Path, out: &Path) -> String {
    common::tiny_recipe("tiny", gguf, out, "keep_checkpoints = 2\nheldout_tokens = 64\n", "")
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    gguf: PathBuf,
    corpora: Corpora,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (gguf, _) = common::tiny_gguf(&root, 3, true);
    let corpora = common::two_language_corpora(&root, &gguf);
    Setup {
        _dir: dir,
        root,
        gguf,
        corpora,
    }
}

fn write_recipe(s: &Setup, name: &str, out: &Path) -> PathBuf {
    let p = s.root.join(name);
    std::fs::write(&p, recipe_text(&s.gguf, out)).unwrap();
    p
}

fn steps_of(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|e| e[0].as_i64().unwrap()).collect()
}

#[test]
fn tune_checkpoints_snapshots_and_tensorboard_reads_every_tag() {
    let s = setup();
    let out = s.root.join("run");
    let rp = write_recipe(&s, "r.toml", &out);
    let loaded = recipe::load(&rp, &[]).unwrap();
    let opts = codespot::train::TuneOptions {
        lang: "toy".into(),
        resume: false,
        force: false,
        progress: false,
        lock: true,
    };
    let sum = codespot::train::tune::<codespot::backend::Cpu>(&loaded, &s.corpora, &opts, &Default::default()).unwrap();
    let dir = out.join("tune/toy");
    // Checkpoints at 2 and 4 (HF dirs a model source can load), snapshots at 0, 2, 4.
    for st in ["step-000002", "step-000004"] {
        let c = dir.join("checkpoints").join(st);
        assert!(c.join("optimizer/adamw.safetensors").is_file());
        let ck = codespot::model::load(c.to_str().unwrap()).unwrap();
        assert_eq!(ck.config.num_hidden_layers, 2);
    }
    assert_eq!(codespot::train::steps_in(&dir.join("snapshots")), vec![0, 2, 4]);
    let m = codespot::importance::snapshot::read_manifest(&dir.join("snapshots/step-000004")).unwrap();
    assert_eq!(m.step, Some(4));
    assert!(m.model.contains("tuned on toy to step 4"), "{}", m.model);
    assert_eq!(sum.history.len(), 4);
    assert_eq!(sum.heldout.iter().map(|h| h.step).collect::<Vec<_>>(), vec![0, 2, 4]);
    assert!(sum.heldout.iter().all(|h| h.loss.len() == 2));
    // Tuning on toy lowers toy's held-out loss.
    let (h0, h4) = (&sum.heldout[0].loss["toy"], &sum.heldout[2].loss["toy"]);
    assert!(h4 < h0, "held-out toy loss {h0} → {h4}");
    // The tuned weights differ from the base ones, and the tracked overlap with the base falls
    // below 1 while it is exactly 1 at the base.
    assert_eq!(sum.metrics[0].jaccard_base, 1.0);
    assert!(sum.metrics[2].jaccard_base < 1.0);

    let tb = common::read_tensorboard(&dir.join("tb"));
    let scalars = tb["scalars"].as_object().unwrap();
    let mut want: Vec<String> = [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "heldout_loss/toy",
        "heldout_loss/toyrs",
        "importance/spearman_base",
        "spot/jaccard_base",
        "spot/jaccard_prev",
        "spot/jaccard_floor",
        "importance/convergence_half_vs_all",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for k in codespot::track::MODULE_ORDER {
        want.push(format!("importance/module_share/{k}"));
    }
    for l in ["L00", "L01"] {
        want.push(format!("importance/layer_share/{l}"));
        want.push(format!("spot/jaccard_base_layer/{l}"));
        want.push(format!("spot/jaccard_prev_layer/{l}"));
        want.push(format!("spot/jaccard_floor_layer/{l}"));
    }
    for t in &want {
        assert!(
            scalars.contains_key(t),
            "scalar '{t}' missing; have {:?}",
            scalars.keys()
        );
    }
    assert_eq!(steps_of(&scalars["train/loss"]), vec![1, 2, 3, 4]);
    assert_eq!(steps_of(&scalars["heldout_loss/toyrs"]), vec![0, 2, 4]);
    assert_eq!(steps_of(&scalars["spot/jaccard_prev"]), vec![2, 4]);
    // Every snapshot's own noise floor, beside the Jaccards it bounds.
    assert_eq!(steps_of(&scalars["spot/jaccard_floor"]), vec![0, 2, 4]);
    assert!(scalars["spot/jaccard_floor"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| (0.0..=1.0).contains(&e[1].as_f64().unwrap())));
    let lr: Vec<f64> = scalars["train/lr"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[1].as_f64().unwrap())
        .collect();
    assert!(
        (lr[0] - 3e-3).abs() < 1e-9 && lr[3] < lr[1],
        "warm-up then decay: {lr:?}"
    );
    let hist = tb["histograms"].as_object().unwrap();
    for t in ["importance_log10/layer/L00", "importance_log10/layer/L01"]
        .into_iter()
        .map(String::from)
        .chain(
            codespot::track::MODULE_ORDER
                .iter()
                .map(|k| format!("importance_log10/module/{k}")),
        )
    {
        assert!(hist.contains_key(&t), "histogram '{t}' missing; have {:?}", hist.keys());
        assert_eq!(steps_of(&hist[&t]), vec![0, 2, 4]);
    }
    let images = tb["images"].as_object().unwrap();
    for t in ["heatmap/layer_x_module", "heatmap/layer_x_head"] {
        let v = images[t].as_array().unwrap();
        assert_eq!(steps_of(&images[t]), vec![0, 2, 4], "{t}");
        assert!(v
            .iter()
            .all(|e| e[1] == 270 && e[2] == 270 && e[3].as_i64().unwrap() > 100));
    }

    // Without --resume an existing run is refused; with it a finished run is a no-op.
    let e =
        codespot::train::tune::<codespot::backend::Cpu>(&loaded, &s.corpora, &opts, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
}

fn cli(s: &Setup, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_codespot"));
    c.args(args).env("CODESPOT_CORPORA", &s.corpora.dir);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn losses(tune_json: &Path) -> Vec<(usize, f64)> {
    let s: codespot::train::TuneSummary = serde_json::from_str(&std::fs::read_to_string(tune_json).unwrap()).unwrap();
    s.history.iter().map(|h| (h.step, h.loss)).collect()
}

#[test]
fn a_killed_run_resumes_on_the_same_loss_trajectory() {
    let s = setup();
    let full = write_recipe(&s, "full.toml", &s.root.join("full"));
    let out = cli(&s, &["tune", full.to_str().unwrap(), "--lang", "toy"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let killed = write_recipe(&s, "killed.toml", &s.root.join("killed"));
    let k = killed.to_str().unwrap();
    let out = cli(
        &s,
        &["tune", k, "--lang", "toy"],
        &[("CODESPOT_ABORT_AFTER_CHECKPOINT", "2")],
    );
    assert!(!out.status.success(), "the abort hook kills the process");
    let d = s.root.join("killed/tune/toy");
    assert!(d.join("checkpoints/step-000002/train_state.json").is_file());
    assert!(!d.join("checkpoints/step-000004").exists());
    assert!(!d.join("tune.json").exists());
    // Killed before the step-2 snapshot: the resumed run takes it.
    assert!(!d.join("snapshots/step-000002/track.json").exists());

    let out = cli(&s, &["tune", k, "--lang", "toy", "--resume"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resuming toy"), "{err}");
    assert!(
        err.contains("took over the lock"),
        "the killed process's lock is taken over: {err}"
    );
    let a = losses(&s.root.join("full/tune/toy/tune.json"));
    let b = losses(&d.join("tune.json"));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "bit-identical losses at every step, before and after the kill");
    assert_eq!(codespot::train::steps_in(&d.join("snapshots")), vec![0, 2, 4]);
    let w = |p: &Path| codespot::source::weights::from_safetensors(&[p.join("model.safetensors")]).unwrap();
    assert_eq!(
        w(&s.root.join("full/tune/toy/checkpoints/step-000004")).tensors,
        w(&d.join("checkpoints/step-000004")).tensors,
        "same final weights"
    );
}

/// `devices = 2`: each step's rows are split over two CPU peers and the gradients all-reduced
/// through burn-collective; the losses, the held-out losses and the snapshots follow the
/// one-device run up to f32 summation order.
#[test]
fn tuning_on_two_collective_peers_follows_one_device() {
    let s = setup();
    let one = write_recipe(&s, "one.toml", &s.root.join("one"));
    let out = cli(&s, &["tune", one.to_str().unwrap(), "--lang", "toy"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let two = write_recipe(&s, "two.toml", &s.root.join("two"));
    let out = cli(
        &s,
        &["tune", two.to_str().unwrap(), "--lang", "toy", "--set", "devices=2"],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a = losses(&s.root.join("one/tune/toy/tune.json"));
    let b = losses(&s.root.join("two/tune/toy/tune.json"));
    assert_eq!(a.len(), 4);
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!((la - lb).abs() <= 1e-5 * la.abs(), "step {sa}: {la} vs {lb}");
    }
    let snap =
        |d: &str| codespot::importance::snapshot::read(&s.root.join(d).join("tune/toy/snapshots/step-000004")).unwrap();
    let (x, y) = (snap("one"), snap("two"));
    assert_eq!(y.manifest.devices, 2);
    let rho = codespot::track::spearman(&x.scores, &y.scores, 1 << 20);
    assert!(rho > 0.9999, "final snapshots agree: Spearman {rho}");
}

/// One writer per output: while a live process holds a run directory (as `codespot run` does),
/// `tune` and `run` on it fail at once naming that process, and `score` likewise on an output
/// being written; a lock left behind by a dead process is taken over.
#[test]
fn a_second_writer_is_refused_while_the_first_lives() {
    use codespot::util::{output_lock_path, run_lock_path, DirLock};
    let s = setup();
    let out = s.root.join("locked");
    let rp = write_recipe(&s, "l.toml", &out);
    let r = rp.to_str().unwrap();
    let me = format!("is being written by process {}", std::process::id());
    let held = DirLock::exclusive(&run_lock_path(&out), &out).unwrap();
    for args in [vec!["tune", r, "--lang", "toy"], vec!["run", r]] {
        let o = cli(&s, &args, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&me) && err.contains(&out.display().to_string()),
            "{args:?}: {err}"
        );
        assert!(!out.join("tune").exists() && !out.join("base").exists());
    }
    let snap = s.root.join("snap");
    let held2 = DirLock::exclusive(&output_lock_path(&snap), &snap).unwrap();
    let gguf = s.gguf.to_str().unwrap();
    let score = [
        "score",
        "--model",
        gguf,
        "--lang",
        "toy",
        "--tokens",
        "32",
        "--seq-len",
        "16",
        "--batch",
        "1",
        "--out",
        snap.to_str().unwrap(),
    ];
    let o = cli(&s, &score, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&me), "{err}");
    assert!(!snap.exists());
    drop((held, held2));
    let o = cli(&s, &score, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A lock file naming a process that is gone: taken over, and the tune runs.
    std::fs::write(run_lock_path(&out), "999999999\ncodespot run l.toml\n0\n").unwrap();
    let o = cli(&s, &["tune", r, "--lang", "toy"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("took over the lock") && err.contains("999999999"), "{err}");
    assert!(out.join("tune/toy/tune.json").is_file());
    // A clean exit leaves the lock file empty (no stale holder for the next writer).
    assert_eq!(std::fs::read_to_string(run_lock_path(&out)).unwrap(), "");
}

#[test]
fn bad_recipes_fail_before_any_work_naming_key_and_line() {
    let s = setup();
    let out_dir = s.root.join("never");
    let base = recipe_text(&s.gguf, &out_dir);
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "unknown key",
            base.replace("lr = 3e-3", "lr = 3e-3\nlearning_rate = 1"),
            &["learning_rate", "line 11"],
        ),
        (
            "wrong type",
            base.replace("steps = 4", "steps = \"four\""),
            &["steps", "line 7"],
        ),
        (
            "missing model",
            base.replace(&format!("model = \"{}\"\n", s.gguf.display()), ""),
            &["missing field `model`"],
        ),
        (
            "model not found",
            base.replace(&s.gguf.display().to_string(), "/no/such/model.gguf"),
            &["model", "line 2", "/no/such/model.gguf"],
        ),
        (
            "lr <= 0",
            base.replace("lr = 3e-3", "lr = 0.0"),
            &["train.lr", "line 10", "> 0"],
        ),
        (
            "checkpoint interval > run",
            base.replace("checkpoint_every = 2", "checkpoint_every = 9"),
            &["train.checkpoint_every", "line 12", "larger than the run"],
        ),
        (
            "unknown language",
            base.replace("\"toyrs\"]", "\"cobol\"]"),
            &["languages", "line 3", "cobol"],
        ),
        (
            "more devices than a batch has rows",
            base.replace("out = ", "devices = 3\nout = "),
            &["train.batch", "devices = 3"],
        ),
        (
            "unknown dtype",
            base.replace("out = ", "dtype = \"fp8\"\nout = "),
            &["dtype", "fp8"],
        ),
        (
            "text controls without a prose corpus",
            format!("{base}\n[spot]\ncontrols = [\"random\", \"code-specific\"]\n"),
            &["spot.controls", "spot.text"],
        ),
        (
            "prose corpus that is one of the languages",
            format!("{base}\n[spot]\ntext = \"toyrs\"\ncontrols = [\"text\"]\n"),
            &["spot.text", "toyrs"],
        ),
        (
            "unknown prose corpus",
            format!("{base}\n[spot]\ntext = \"novels\"\n"),
            &["spot.text", "novels"],
        ),
    ];
    for (what, text, needles) in cases {
        let p = s.root.join("bad.toml");
        std::fs::write(&p, &text).unwrap();
        let out = cli(&s, &["tune", p.to_str().unwrap(), "--lang", "toy"], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        for n in needles {
            assert!(err.contains(n), "{what}: '{n}' not in: {err}");
        }
        assert!(!out_dir.exists(), "{what}: no run dir is written");
        let check = cli(&s, &["recipe", "check", p.to_str().unwrap()], &[]);
        assert_eq!(check.status.code(), Some(1), "{what}: recipe check fails too");
    }
    // --set errors name the override.
    let p = write_recipe(&s, "ok.toml", &out_dir);
    let out = cli(
        &s,
        &["recipe", "check", p.to_str().unwrap(), "--set", "train.lr=-1"],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--set train.lr=-1") && err.contains("train.lr"), "{err}");
    let out = cli(
        &s,
        &["recipe", "check", p.to_str().unwrap(), "--set", "train.lrr=1"],
        &[],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `lrr`"));
    // A good recipe checks and prints the resolved values (defaults filled in).
    let out = cli(
        &s,
        &["recipe", "check", p.to_str().unwrap(), "--set", "train.lr=1e-4"],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("lr = 0.0001") && text.contains("beta2 = 0.95"), "{text}");
}

#[test]
fn shipped_recipes_pass_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpora = Corpora {
        dir: root.join("corpora"),
    };
    let shipped: Vec<String> = std::fs::read_dir(root.join("recipes"))
        .unwrap()
        .flatten()
        .map(|e| format!("recipes/{}", e.file_name().to_string_lossy()))
        .filter(|n| n.ends_with(".toml"))
        .collect();
    assert!(shipped.len() >= 4, "{shipped:?}");
    for r in &shipped {
        let l = recipe::load(&root.join(r), &[]).unwrap();
        l.validate(&corpora).unwrap_or_else(|e| panic!("{r}: {e}"));
    }
}

/// `codespot plan` on the research recipe (the shipped Llama-3.1-8B config): exact parameter
/// and weight bytes per dtype, every stage's total is the sum of its items, bf16 needs less
/// than f32 and tuning more than scoring; a tiny GGUF recipe reads its config from the file;
/// an `hf:` model outside the cache without --config says what to pass.
#[test]
fn plan_prints_the_memory_per_device() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let recipe = root.join("recipes/llama31-8b-instruct.toml");
    let config = root.join("recipes/configs/Llama-3.1-8B-Instruct.config.json");
    let plan_with = |dtype: &str, offload: bool| -> serde_json::Value {
        let o = Command::new(env!("CARGO_BIN_EXE_codespot"))
            .args([
                "plan",
                recipe.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--json",
            ])
            .args(["--set", &format!("dtype={dtype}")])
            .args(["--set", &format!("train.offload_optimizer={offload}")])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let plan = |dtype: &str| plan_with(dtype, false);
    let (f32p, bf16p) = (plan("f32"), plan("bf16"));
    let n = 8_030_261_248u64; // Llama-3.1-8B
    assert_eq!(f32p["params"].as_u64(), Some(n));
    let item =
        |p: &serde_json::Value, stage: usize, i: usize| p["stages"][stage]["items"][i]["bytes"].as_u64().unwrap();
    let total = |p: &serde_json::Value, stage: usize| p["stages"][stage]["total"].as_u64().unwrap();
    assert_eq!(item(&f32p, 0, 0), 4 * n, "f32 weights");
    assert_eq!(item(&bf16p, 0, 0), 2 * n, "bf16 weights");
    assert_eq!(item(&bf16p, 0, 1), 4 * n, "taylor-sum sums stay f32");
    for p in [&f32p, &bf16p] {
        for st in p["stages"].as_array().unwrap() {
            let sum: u64 = st["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["bytes"].as_u64().unwrap())
                .sum();
            assert_eq!(Some(sum), st["total"].as_u64());
        }
        // A step holds two f32 moments and an f32 gradient sum where scoring holds the f32 sums
        // (the 8B recipe records no noise floor, which would add a second copy of the sums).
        assert!(
            total(p, 1) > total(p, 0) + 8 * n,
            "tuning adds moments and a gradient sum"
        );
    }
    assert!(total(&bf16p, 0) < total(&f32p, 0));
    // The shipped recipe offloads the moments: the device holds the largest tensor's two (the
    // 128256 × 4096 embedding), the host all of them, and a step fits one 141 GB H200.
    let off = plan_with("f32", true);
    assert_eq!(item(&off, 1, 1), 2 * 128_256 * 4096 * 4);
    assert_eq!(off["host_optimizer"].as_u64(), Some(8 * n));
    assert_eq!(total(&f32p, 1) - total(&off, 1), 8 * n - 2 * 128_256 * 4096 * 4);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    assert!(gib(total(&f32p, 1)) > 141.0 && gib(total(&off, 1)) < 0.9 * 141.0);
    // The text form names the devices checked.
    let o = Command::new(env!("CARGO_BIN_EXE_codespot"))
        .args([
            "plan",
            recipe.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--memory",
            "A100=40",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("| A100 | 40 | no (") && text.contains("score (importance snapshot)"),
        "{text}"
    );
    // Without --config an hf: model must be in the HF cache.
    let empty = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_codespot"))
        .args(["plan", recipe.to_str().unwrap()])
        .env("HF_HOME", empty.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("not in the HF cache") && err.contains("--config"), "{err}");
    // A GGUF recipe: the config comes from the file.
    let s = setup();
    let rp = write_recipe(&s, "p.toml", &s.root.join("p"));
    let o = cli(&s, &["plan", rp.to_str().unwrap(), "--json"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cfg = codespot::model::load(s.gguf.to_str().unwrap()).unwrap().config;
    assert_eq!(p["params"].as_u64(), Some(cfg.num_params() as u64));
}

/// A tiny random Llama (weights from `seed`), a batch of 4 × 11 tokens and AdamW's settings
/// with weight decay, for the optimizer tests.
fn adamw_case(
    seed: u64,
) -> (
    codespot::model::LlamaConfig,
    codespot::source::Weights,
    Vec<Vec<u32>>,
    codespot::train::adamw::AdamWConfig,
) {
    let cfg = codespot::model::LlamaConfig::tiny(64);
    let w = codespot::model::llama::random_weights(&cfg, seed);
    let rows = (0..4)
        .map(|r| (0..11).map(|i| ((i * 5 + r * 17 + 2) % 64) as u32).collect())
        .collect();
    let acfg = codespot::train::adamw::AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    (cfg, w, rows, acfg)
}

/// AdamW's one-pass update on the CPU backend's storage (`train::adamw`) gives the tensor-op
/// update on the f64 reference backend, fed the same gradients: with weight decay, gradient
/// scaling and bias correction over three steps.
#[test]
fn fused_adamw_matches_the_tensor_op_update() {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData};
    use codespot::backend::{Cpu, CpuAd};
    use codespot::model::Llama;
    use codespot::train::adamw::AdamW;
    type F64 = NdArray<f64>;
    let (cfg, w, rows, acfg) = adamw_case(9);
    let mut a = Llama::<CpuAd>::from_weights(&cfg, &w, &Default::default()).unwrap();
    let mut b = Llama::<Autodiff<F64>>::from_weights(&cfg, &w, &Default::default()).unwrap();
    let (mut oa, mut ob) = (AdamW::<Cpu>::new(acfg, &a), AdamW::<F64>::new(acfg, &b));
    for step in 0..3 {
        let ga = codespot::engine::batch_grads(&a, &rows, 4);
        let gb: Vec<Option<Tensor<F64, 1>>> = ga
            .iter()
            .map(|g| {
                g.as_ref().map(|g| {
                    let v: Vec<f64> = g.clone().into_data().convert::<f64>().into_vec().unwrap();
                    let n = v.len();
                    Tensor::from_data(TensorData::new(v, [n]), &Default::default())
                })
            })
            .collect();
        let scale = [1.0, 0.5, 0.8][step];
        a = oa.step(a, ga, 2e-2, scale);
        b = ob.step(b, gb, 2e-2, scale);
    }
    let (wa, wb) = (a.to_weights(), b.to_weights());
    let mut moved = 0f32;
    for (name, ta) in &wa.tensors {
        let tb = &wb.tensors[name];
        for ((x, y), w0) in ta.data.iter().zip(&tb.data).zip(&w.tensors[name].data) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{name}: {x} vs {y}");
            moved = moved.max((x - w0).abs());
        }
    }
    assert!(moved > 0.01, "the weights moved: {moved}");
}

/// The moments parked in their checkpoint file and read back (`AdamW::park`, `restore`), or a
/// fresh optimizer resumed from that file, continue exactly as the optimizer that kept them in
/// memory; a file of another update count is not parked on, and a file of another model is
/// refused naming the file and the tensor.
#[test]
fn parked_and_resumed_moments_continue_bit_for_bit() {
    use codespot::backend::{Cpu, CpuAd};
    use codespot::model::{self, Llama};
    use codespot::train::adamw::AdamW;
    let (cfg, w, rows, acfg) = adamw_case(5);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("adamw.safetensors");
    let new = || Llama::<CpuAd>::from_weights(&cfg, &w, &Default::default()).unwrap();
    let step = |m: Llama<CpuAd>, o: &mut AdamW<Cpu>| {
        let g = codespot::engine::batch_grads(&m, &rows, 4);
        o.step(m, g, 2e-2, 0.7)
    };
    let (mut kept, mut parked) = (new(), new());
    let (mut ok, mut op) = (AdamW::<Cpu>::new(acfg, &kept), AdamW::<Cpu>::new(acfg, &parked));
    for _ in 0..2 {
        kept = step(kept, &mut ok);
        parked = step(parked, &mut op);
    }
    op.save(&file).unwrap();
    assert!(op.park(&file).unwrap(), "saved at this update count: parked");
    let mut resumed = Llama::<CpuAd>::from_weights(&cfg, &parked.to_weights(), &Default::default()).unwrap();
    let mut or = AdamW::<Cpu>::resume(acfg, &resumed, &file).unwrap();
    assert_eq!(or.t, 2);
    op.restore(&parked).unwrap();
    or.restore(&resumed).unwrap();
    for _ in 0..2 {
        kept = step(kept, &mut ok);
        parked = step(parked, &mut op);
        resumed = step(resumed, &mut or);
    }
    let bits = |m: &Llama<CpuAd>| -> Vec<u32> {
        m.to_weights()
            .tensors
            .values()
            .flat_map(|t| t.data.iter().map(|x| x.to_bits()))
            .collect()
    };
    assert_eq!(bits(&kept), bits(&parked));
    assert_eq!(bits(&kept), bits(&resumed));
    // The file holds update 2; this optimizer has made 4: it keeps its moments.
    assert!(!op.park(&file).unwrap());

    // Another model's optimizer file: refused, naming the file and the tensor.
    let other_cfg = model::LlamaConfig::tiny(96);
    let other = Llama::<CpuAd>::from_weights(
        &other_cfg,
        &model::llama::random_weights(&other_cfg, 1),
        &Default::default(),
    )
    .unwrap();
    let refusal = |m: &Llama<CpuAd>, f: &std::path::Path| match AdamW::<Cpu>::resume(acfg, m, f) {
        Ok(_) => panic!("{}: accepted for a model it does not fit", f.display()),
        Err(e) => format!("{e:#}"),
    };
    let err = refusal(&other, &file);
    assert!(
        err.contains("adamw.safetensors") && err.contains("m.model.embed_tokens.weight"),
        "{err}"
    );
    // A file of weights, not moments.
    let bare = dir.path().join("bare.safetensors");
    codespot::source::weights::save_safetensors(&parked.to_weights(), &bare, None).unwrap();
    let err = refusal(&parked, &bare);
    assert!(
        err.contains("bare.safetensors") && err.contains("missing optimizer tensor"),
        "{err}"
    );
}

/// burn-train drives `tune` (its learner, schedule, metrics and renderer around codespot's step
/// and AdamW): the losses, gradient norms and final weights are the plain reference loop's,
/// bit for bit, with gradient accumulation and clipping in play.
#[test]
fn burn_train_tuning_follows_the_reference_loop_bit_for_bit() {
    let s = setup();
    let out = s.root.join("bt");
    let text = common::tiny_recipe(
        "tiny",
        &s.gguf,
        &out,
        "keep_checkpoints = 2\nheldout_tokens = 64\ngrad_accum = 2\ngrad_clip = 0.5\n",
        "",
    );
    let p = s.root.join("bt.toml");
    std::fs::write(&p, &text).unwrap();
    let o = cli(&s, &["tune", p.to_str().unwrap(), "--lang", "toy"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: codespot::train::TuneSummary =
        serde_json::from_str(&std::fs::read_to_string(out.join("tune/toy/tune.json")).unwrap()).unwrap();

    let loaded = recipe::load(&p, &[]).unwrap();
    let device = Default::default();
    let r = codespot::train::reference::run::<codespot::backend::Cpu>(&loaded, &s.corpora, "toy", &device).unwrap();
    let got: Vec<(f64, f64)> = summary.history.iter().map(|h| (h.loss, h.grad_norm)).collect();
    assert_eq!(got.len(), 4);
    assert_eq!(got, r.steps, "the same loss and gradient norm at every step");
    assert!(
        r.steps.iter().any(|(_, n)| *n > 0.5),
        "clipping is exercised: {:?}",
        r.steps
    );
    let tuned =
        codespot::source::weights::from_safetensors(&[out.join("tune/toy/checkpoints/step-000004/model.safetensors")])
            .unwrap();
    assert_eq!(tuned.tensors, r.weights.tensors, "the same final weights");
    // burn-train's metric logs are written beside the run.
    assert!(out.join("tune/toy/learner").is_dir());
}

/// burn-train's interrupter (Ctrl-C, or `q` in the dashboard) stops the run after the current
/// step: a checkpoint is written there (no held-out log or snapshot off the schedule), `tune`
/// says how to continue, and `--resume` ends with the uninterrupted run's losses, snapshots and
/// weights.
#[test]
fn an_interrupted_run_checkpoints_where_it_stopped_and_resumes_bit_for_bit() {
    let s = setup();
    let full = write_recipe(&s, "full.toml", &s.root.join("full"));
    let out = cli(&s, &["tune", full.to_str().unwrap(), "--lang", "toy"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let stop = write_recipe(&s, "stop.toml", &s.root.join("stop"));
    let k = stop.to_str().unwrap();
    let out = cli(
        &s,
        &["tune", k, "--lang", "toy"],
        &[("CODESPOT_INTERRUPT_AFTER_STEP", "3")],
    );
    assert!(!out.status.success(), "an interrupted tune is not a finished one");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted at step 3") && err.contains("--resume"),
        "{err}"
    );
    let d = s.root.join("stop/tune/toy");
    let st = codespot::train::read_state(&d.join("checkpoints/step-000003")).unwrap();
    assert_eq!((st.step, st.history.len()), (3, 3));
    assert_eq!(st.heldout.iter().map(|h| h.step).collect::<Vec<_>>(), vec![0, 2]);
    assert_eq!(codespot::train::steps_in(&d.join("snapshots")), vec![0, 2]);
    assert!(!d.join("tune.json").exists());

    let out = cli(&s, &["tune", k, "--lang", "toy", "--resume"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        losses(&s.root.join("full/tune/toy/tune.json")),
        losses(&d.join("tune.json"))
    );
    assert_eq!(codespot::train::steps_in(&d.join("snapshots")), vec![0, 2, 4]);
    let w = |p: &Path| codespot::source::weights::from_safetensors(&[p.join("model.safetensors")]).unwrap();
    assert_eq!(
        w(&s.root.join("full/tune/toy/checkpoints/step-000004")).tensors,
        w(&d.join("checkpoints/step-000004")).tensors
    );
    // A stop asked for at the last step is a finished run.
    let last = write_recipe(&s, "last.toml", &s.root.join("last"));
    let out = cli(
        &s,
        &["tune", last.to_str().unwrap(), "--lang", "toy"],
        &[("CODESPOT_INTERRUPT_AFTER_STEP", "4")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        losses(&s.root.join("full/tune/toy/tune.json")),
        losses(&s.root.join("last/tune/toy/tune.json"))
    );
}

/// `train.offload_optimizer`: AdamW's moments live in host memory and each tensor's is streamed
/// to the device around its update. The same losses, weights and optimizer file as resident
/// moments, bit for bit, on the hand-written path and on burn's generic ops (the device path),
/// and a resumed offloaded run continues on the same bits.
#[test]
fn offloaded_moments_give_the_resident_bits() {
    let s = setup();
    for generic in [false, true] {
        let env: &[(&str, &str)] = if generic { &[("CODESPOT_GENERIC", "1")] } else { &[] };
        let run = |name: &str, offload: bool, extra: &[&str]| -> PathBuf {
            let out = s.root.join(format!("{name}-{generic}"));
            let rest = format!(
                "keep_checkpoints = 2\nheldout_tokens = 64\ngrad_accum = 2\n{}",
                if offload { "offload_optimizer = true\n" } else { "" }
            );
            let p = s.root.join(format!("{name}-{generic}.toml"));
            std::fs::write(&p, common::tiny_recipe("tiny", &s.gguf, &out, &rest, "")).unwrap();
            let mut args = vec!["tune", p.to_str().unwrap(), "--lang", "toy"];
            args.extend_from_slice(extra);
            let o = cli(&s, &args, env);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            out.join("tune/toy")
        };
        let resident = run("resident", false, &[]);
        let offloaded = run("offloaded", true, &[]);
        assert_eq!(
            losses(&resident.join("tune.json")),
            losses(&offloaded.join("tune.json"))
        );
        for f in ["model.safetensors", "optimizer/adamw.safetensors"] {
            assert_eq!(
                std::fs::read(resident.join("checkpoints/step-000004").join(f)).unwrap(),
                std::fs::read(offloaded.join("checkpoints/step-000004").join(f)).unwrap(),
                "generic {generic}: {f}"
            );
        }
    }
    // Killed after step 2 and resumed with offloaded moments: the same final weights.
    let out = s.root.join("offload-kill");
    let p = s.root.join("offload-kill.toml");
    std::fs::write(
        &p,
        common::tiny_recipe(
            "tiny",
            &s.gguf,
            &out,
            "keep_checkpoints = 2\nheldout_tokens = 64\ngrad_accum = 2\noffload_optimizer = true\n",
            "",
        ),
    )
    .unwrap();
    let k = p.to_str().unwrap();
    let o = cli(
        &s,
        &["tune", k, "--lang", "toy"],
        &[("CODESPOT_ABORT_AFTER_CHECKPOINT", "2")],
    );
    assert!(!o.status.success());
    let o = cli(&s, &["tune", k, "--lang", "toy", "--resume"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(out.join("tune/toy/checkpoints/step-000004/model.safetensors")).unwrap(),
        std::fs::read(
            s.root
                .join("resident-false/tune/toy/checkpoints/step-000004/model.safetensors")
        )
        .unwrap()
    );
}

/// bf16 weights are tuned through f32 master copies (`w.<name>` in the optimizer file): each
/// update runs in f32 on the master and is rounded into the bf16 copy. At a learning rate whose
/// steps are below bf16's precision the bf16 copy barely changes while the master moves, and
/// the master's steps follow the f32 run's.
#[test]
fn bf16_tuning_keeps_f32_master_weights() {
    let s = setup();
    let run = |name: &str, dtype: &str, abort: Option<&str>| -> PathBuf {
        let out = s.root.join(name);
        let text = format!(
            "dtype = \"{dtype}\"\n{}",
            common::tiny_recipe("tiny", &s.gguf, &out, "heldout_tokens = 64\n", "")
        )
        .replace("lr = 3e-3", "lr = 2e-5");
        let p = s.root.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        if let Some(step) = abort {
            let o = cli(
                &s,
                &["tune", p.to_str().unwrap(), "--lang", "toy"],
                &[("CODESPOT_ABORT_AFTER_CHECKPOINT", step)],
            );
            assert!(!o.status.success());
        }
        let mut args = vec!["tune", p.to_str().unwrap(), "--lang", "toy"];
        if abort.is_some() {
            args.push("--resume");
        }
        let o = cli(&s, &args, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out.join("tune/toy/checkpoints/step-000004")
    };
    let (b, f) = (run("bf16", "bf16", None), run("f32", "f32", None));
    // Killed after step 2 and resumed: the master comes back from the optimizer file.
    let r = run("bf16-resumed", "bf16", Some("2"));
    for file in ["model.safetensors", "optimizer/adamw.safetensors"] {
        assert_eq!(
            std::fs::read(b.join(file)).unwrap(),
            std::fs::read(r.join(file)).unwrap(),
            "{file}"
        );
    }
    let read = |p: PathBuf| codespot::source::weights::from_safetensors(&[p]).unwrap().tensors;
    let (wb, opt, wf) = (
        read(b.join("model.safetensors")),
        read(b.join("optimizer/adamw.safetensors")),
        read(f.join("model.safetensors")),
    );
    let base = codespot::model::load(s.gguf.to_str().unwrap()).unwrap().weights.tensors;
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();
    let (mut moved_master, mut moved_copy, mut n) = (0usize, 0usize, 0usize);
    let (mut off_f32, mut step_f32) = (0f64, 0f64);
    for (name, w) in &wb {
        let master = &opt[&format!("w.{name}")];
        assert_eq!(master.shape, w.shape, "{name}");
        for (((&c, &m), &w0), &w32) in w
            .data
            .iter()
            .zip(&master.data)
            .zip(&base[name].data)
            .zip(&wf[name].data)
        {
            assert_eq!(
                c.to_bits(),
                bf(m).to_bits(),
                "{name}: the bf16 copy is the rounded master"
            );
            n += 1;
            // The master starts from the bf16 weights the model was loaded as.
            moved_master += (m != bf(w0)) as usize;
            moved_copy += (c != bf(w0)) as usize;
            off_f32 += ((m - bf(w0)) - (w32 - w0)).abs() as f64;
            step_f32 += (w32 - w0).abs() as f64;
        }
    }
    assert!(moved_master * 10 > n * 9, "the master moves: {moved_master} of {n}");
    assert!(moved_copy * 4 < n, "the bf16 copy barely does: {moved_copy} of {n}");
    assert!(
        off_f32 < 0.25 * step_f32,
        "the master follows the f32 run: mean |master step − f32 step| {} against mean |f32 step| {}",
        off_f32 / n as f64,
        step_f32 / n as f64
    );
}

/// `train.zero = 1`: AdamW's state sharded over the data-parallel peers (ZeRO stage 1), each
/// shard a file of its own with about 1/N of the state. Sharded tuning gives the unsharded run's
/// losses and weights bit for bit with 2 and 4 peers, a killed sharded run resumes on the same
/// bits, and resuming with another number of shards is refused, naming the files it found.
#[test]
fn sharded_optimizer_state_gives_the_unsharded_bits() {
    let s = setup();
    let run = |name: &str,
               devices: usize,
               zero: bool,
               env: &[(&str, &str)],
               extra: &[&str]|
     -> (PathBuf, std::process::Output) {
        let out = s.root.join(name);
        let text = format!(
            "devices = {devices}\n{}",
            common::tiny_recipe(
                "tiny",
                &s.gguf,
                &out,
                &format!("heldout_tokens = 64\n{}", if zero { "zero = 1\n" } else { "" }),
                "",
            )
            .replace("batch = 2\nseq_len = 16\nlr", "batch = 4\nseq_len = 16\nlr")
            .replace("[importance]\ntokens = 64", "[importance]\ntokens = 128")
        );
        let p = s.root.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        let mut args = vec!["tune", p.to_str().unwrap(), "--lang", "toy"];
        args.extend_from_slice(extra);
        (out.join("tune/toy"), cli(&s, &args, env))
    };
    for n in [2, 4] {
        let (plain, o) = run(&format!("plain{n}"), n, false, &[], &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (sharded, o) = run(&format!("sharded{n}"), n, true, &[], &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let ck = |d: &Path| d.join("checkpoints/step-000004");
        let (la, lb) = (losses(&plain.join("tune.json")), losses(&sharded.join("tune.json")));
        let read = |d: &Path, f: &str| {
            codespot::source::weights::from_safetensors(&[ck(d).join(f)])
                .unwrap()
                .tensors
        };
        if n == 2 {
            // Two peers' all-reduce is one commutative sum: every bit is fixed.
            assert_eq!(la, lb, "{n} peers");
            assert_eq!(
                std::fs::read(ck(&plain).join("model.safetensors")).unwrap(),
                std::fs::read(ck(&sharded).join("model.safetensors")).unwrap(),
                "{n} peers: weights"
            );
        } else {
            // burn-collective adds four peers' gradients in arrival order, so two runs (sharded
            // or not) agree to f32 summation order only.
            for ((_, a), (_, b)) in la.iter().zip(&lb) {
                assert!((a - b).abs() <= 1e-6 * a.abs(), "{n} peers: {la:?} vs {lb:?}");
            }
            let (wa, wb) = (read(&plain, "model.safetensors"), read(&sharded, "model.safetensors"));
            for (name, t) in &wa {
                let d = t
                    .data
                    .iter()
                    .zip(&wb[name].data)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(d <= 1e-5, "{n} peers: {name} differs by {d}");
            }
        }
        // Each shard file holds about 1/n of the state, and together all of it.
        let whole =
            codespot::source::weights::from_safetensors(&[ck(&plain).join("optimizer/adamw.safetensors")]).unwrap();
        let total: usize = whole.tensors.values().map(|t| t.data.len()).sum();
        let mut seen = 0;
        for r in 0..n {
            let f = ck(&sharded).join(format!("optimizer/adamw-{r}-of-{n}.safetensors"));
            let part = codespot::source::weights::from_safetensors(&[f]).unwrap();
            let len: usize = part.tensors.values().map(|t| t.data.len()).sum();
            assert!(
                len as f64 > 0.5 * total as f64 / n as f64 && (len as f64) < 1.6 * total as f64 / n as f64,
                "shard {r} of {n}: {len} of {total}"
            );
            for (name, t) in &part.tensors {
                assert_eq!(t.shape, whole.tensors[name].shape, "{name}");
                if n == 2 {
                    assert_eq!(
                        t.data, whole.tensors[name].data,
                        "{name}: the shard's state is the unsharded state"
                    );
                }
            }
            seen += len;
        }
        assert_eq!(seen, total);
    }
    // Killed after step 2 and resumed: the same bits; another number of shards is refused.
    let (d, o) = run("kill2", 2, true, &[("CODESPOT_ABORT_AFTER_CHECKPOINT", "2")], &[]);
    assert!(!o.status.success());
    let (_, o) = run("kill2", 4, true, &[], &["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("adamw-0-of-4") && err.contains("adamw-0-of-2.safetensors"),
        "{err}"
    );
    let (_, o) = run("kill2", 2, false, &[], &["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("adamw.safetensors"), "{err}");
    let (_, o) = run("kill2", 2, true, &[], &["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(d.join("checkpoints/step-000004/model.safetensors")).unwrap(),
        std::fs::read(
            s.root
                .join("sharded2/tune/toy/checkpoints/step-000004/model.safetensors")
        )
        .unwrap()
    );
}
