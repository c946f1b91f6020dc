//! Spot selection, ablation, the evaluation harness and multiple-choice scoring.

mod common;

use codespot::eval::{self, humaneval, mc, sandbox};
use codespot::model::{self, tokens_tensor, Llama, LlamaConfig};
use codespot::source::{HostTensor, Weights};
use codespot::spot::{self, Aggregation, Eligible, Scope};
use std::collections::BTreeMap;

fn scores(seed: u64) -> Weights {
    let cfg = LlamaConfig::tiny(64);
    let mut w = model::llama::random_weights(&cfg, seed);
    for t in w.tensors.values_mut() {
        t.data.iter_mut().for_each(|x| *x = x.abs());
    }
    w
}

#[test]
fn per_tensor_spot_has_exact_counts_and_controls_match() {
    let s = scores(1);
    for k in [0.5, 1.0, 3.0, 5.0] {
        let agg = spot::aggregate(&[&s, &scores(2)], Aggregation::Sum, Scope::PerTensor, Eligible::Layers).unwrap();
        assert!(
            agg.tensors.keys().all(|n| n.starts_with("model.layers.")),
            "layers only"
        );
        let c = spot::counts(&agg, k / 100.0, Scope::PerTensor);
        let top = spot::select_by(&agg, &c, true);
        let rnd = spot::select_random(&agg, &c, 7);
        let bot = spot::select_by(&agg, &c, false);
        for (n, t) in &agg.tensors {
            let want = (k / 100.0 * t.numel() as f64).round() as usize;
            assert_eq!(top[n].count(), want, "{n} k={k}");
            assert_eq!(rnd[n].count(), want);
            assert_eq!(bot[n].count(), want);
            // Every selected score is ≥ every unselected one.
            let min_in = top[n].indices().map(|i| t.data[i]).fold(f32::INFINITY, f32::min);
            let max_out = (0..t.numel())
                .filter(|&i| !top[n].get(i))
                .map(|i| t.data[i])
                .fold(f32::MIN, f32::max);
            if want > 0 {
                assert!(min_in >= max_out, "{n}");
            }
        }
        // The random control is seeded: same seed, same mask; other seed, other mask.
        assert_eq!(rnd, spot::select_random(&agg, &c, 7));
        assert_ne!(rnd, spot::select_random(&agg, &c, 8));
    }
}

#[test]
fn global_scope_takes_the_overall_top() {
    let s = scores(3);
    let agg = spot::aggregate(&[&s], Aggregation::Sum, Scope::Global, Eligible::All).unwrap();
    let n: usize = agg.tensors.values().map(|t| t.numel()).sum();
    let c = spot::counts(&agg, 0.01, Scope::Global);
    assert_eq!(c.values().sum::<usize>(), (0.01 * n as f64).round() as usize);
    let m = spot::select_by(&agg, &c, true);
    let thr = m
        .iter()
        .flat_map(|(k, mk)| mk.indices().map(|i| agg.tensors[k].data[i]).collect::<Vec<_>>())
        .fold(f32::INFINITY, f32::min);
    let above: usize = agg
        .tensors
        .values()
        .map(|t| t.data.iter().filter(|&&x| x > thr).count())
        .sum();
    assert!(above < c.values().sum::<usize>());
}

#[test]
fn aggregations_on_known_scores() {
    let mk = |v: Vec<f32>| {
        let mut w = Weights::default();
        w.insert("model.layers.0.mlp.up_proj.weight", HostTensor::new(vec![2, 2], v));
        w
    };
    let a = mk(vec![4.0, 0.0, 2.0, 2.0]); // total 8
    let b = mk(vec![0.0, 2.0, 1.0, 1.0]); // total 4
    let get = |how| {
        spot::aggregate(&[&a, &b], how, Scope::PerTensor, Eligible::Layers)
            .unwrap()
            .tensors["model.layers.0.mlp.up_proj.weight"]
            .data
            .clone()
    };
    assert_eq!(get(Aggregation::Sum), vec![4.0, 2.0, 3.0, 3.0]);
    assert_eq!(get(Aggregation::Mean), vec![0.25, 0.25, 0.25, 0.25]);
    assert_eq!(get(Aggregation::Min), vec![0.0, 0.0, 0.25, 0.25]);
    // ranks (0 = best): a → [0, 3, 1, 2]; b → [3, 0, 1, 2]; mean → [1.5, 1.5, 1, 2], negated.
    assert_eq!(get(Aggregation::Rank), vec![-1.5, -1.5, -1.0, -2.0]);
}

#[test]
fn ablate_then_restore_is_bit_identical() {
    let cfg = LlamaConfig::tiny(64);
    let w0 = model::llama::random_weights(&cfg, 5);
    let agg = spot::aggregate(&[&scores(1)], Aggregation::Sum, Scope::PerTensor, Eligible::Layers).unwrap();
    let c = spot::counts(&agg, 0.03, Scope::PerTensor);
    let masks = spot::select_by(&agg, &c, true);
    let mut w = w0.clone();
    let saved = codespot::ablate::zero(&mut w, &masks).unwrap();
    assert_eq!(saved.count(), c.values().sum::<usize>());
    for (n, m) in &masks {
        assert!(m.indices().all(|i| w.tensors[n].data[i] == 0.0));
        let untouched = (0..m.len)
            .filter(|&i| !m.get(i))
            .all(|i| w.tensors[n].data[i].to_bits() == w0.tensors[n].data[i].to_bits());
        assert!(untouched, "{n}");
    }
    // The ablated model's logits differ; after restore every bit is back.
    let dev = Default::default();
    let rows = vec![vec![1u32, 5, 9, 13, 40, 2]];
    let l0 = Llama::<codespot::backend::Cpu>::from_weights(&cfg, &w0, &dev)
        .unwrap()
        .forward(tokens_tensor(&rows, &dev), None)
        .into_data();
    let l1 = Llama::<codespot::backend::Cpu>::from_weights(&cfg, &w, &dev)
        .unwrap()
        .forward(tokens_tensor(&rows, &dev), None)
        .into_data();
    assert_ne!(l0, l1);
    codespot::ablate::restore(&mut w, saved);
    for (n, t) in &w0.tensors {
        assert!(
            t.data
                .iter()
                .zip(&w.tensors[n].data)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{n}"
        );
    }
    // A mask for a tensor the model lacks is an error.
    let mut bad = BTreeMap::new();
    bad.insert("model.layers.9.mlp.up_proj.weight".to_string(), spot::Mask::empty(4));
    assert!(codespot::ablate::zero(&mut w, &bad)
        .unwrap_err()
        .to_string()
        .contains("model.layers.9.mlp.up_proj.weight"));
}

#[test]
fn spot_files_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let agg = spot::aggregate(&[&scores(1)], Aggregation::Sum, Scope::PerTensor, Eligible::Layers).unwrap();
    let c = spot::counts(&agg, 0.01, Scope::PerTensor);
    let mut sets = BTreeMap::new();
    sets.insert(spot::file::key(1.0, "spot"), spot::select_by(&agg, &c, true));
    sets.insert(spot::file::key(1.0, "random"), spot::select_random(&agg, &c, 0));
    let cfg = LlamaConfig::tiny(64);
    let man = spot::file::SpotManifest {
        format: 1,
        inputs: vec![],
        languages: vec!["rust".into()],
        held_out: vec![],
        python_included: false,
        aggregation: Aggregation::Sum,
        scope: Scope::PerTensor,
        eligible: Eligible::Layers,
        ks: vec![1.0],
        sets: vec!["spot".into(), "random".into()],
        seed: 0,
        counts: sets
            .iter()
            .map(|(k, m)| (k.clone(), m.values().map(|x| x.count()).sum()))
            .collect(),
        shares: BTreeMap::new(),
        stability: BTreeMap::new(),
        overlap: BTreeMap::new(),
        language_matrix: BTreeMap::new(),
        floor: None,
        config: cfg,
        code_version: "test".into(),
    };
    let out = dir.path().join("spot");
    spot::file::write(&out, &sets, &man, false).unwrap();
    assert_eq!(spot::file::read_set(&out, 1.0, "spot").unwrap(), sets["k1:spot"]);
    assert_eq!(spot::file::read_set(&out, 1.0, "random").unwrap(), sets["k1:random"]);
    let e = spot::file::read_set(&out, 3.0, "spot").unwrap_err().to_string();
    assert!(e.contains("no set 'k3:spot'"), "{e}");
}

#[test]
fn harness_passes_every_canonical_solution_and_fails_pass() {
    let probs = eval::datasets::humaneval().unwrap();
    assert_eq!(probs.len(), 164);
    let limits = sandbox::Limits {
        wall: std::time::Duration::from_secs(10),
        cpu_s: 10,
        ..Default::default()
    };
    let failures: Vec<String> = probs
        .iter()
        .filter(|p| !humaneval::passes(p, &p.canonical_solution, &limits).unwrap())
        .map(|p| p.task_id.clone())
        .collect();
    assert!(failures.is_empty(), "canonical solutions failed: {failures:?}");
    let passed_with_pass: Vec<String> = probs
        .iter()
        .filter(|p| humaneval::passes(p, "    pass\n", &limits).unwrap())
        .map(|p| p.task_id.clone())
        .collect();
    assert!(passed_with_pass.is_empty(), "`pass` passed: {passed_with_pass:?}");
}

#[test]
fn sandbox_stops_loops_memory_hogs_and_fork_bombs() {
    let limits = sandbox::Limits {
        wall: std::time::Duration::from_secs(3),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    // Stopped by the wall clock or by the CPU-time limit (SIGKILL), whichever comes first.
    let looped = sandbox::run_python("while True:\n    pass\n", &limits).unwrap();
    assert!(
        matches!(looped, sandbox::Outcome::TimedOut | sandbox::Outcome::Signalled(_)),
        "{looped:?}"
    );
    assert!(t0.elapsed().as_secs_f64() < 6.0);
    let hog = sandbox::run_python("x = bytearray(10 * 1024**3)\n", &limits).unwrap();
    assert_ne!(hog, sandbox::Outcome::Passed, "a 10 GB allocation must fail");
    let bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let t0 = std::time::Instant::now();
    assert_ne!(sandbox::run_python(bomb, &limits).unwrap(), sandbox::Outcome::Passed);
    assert!(t0.elapsed().as_secs_f64() < 8.0);
    // The machine is fine afterwards: a normal program still runs and passes.
    assert_eq!(
        sandbox::run_python("assert sum(range(10)) == 45\n", &limits).unwrap(),
        sandbox::Outcome::Passed
    );
    assert!(matches!(
        sandbox::run_python("raise SystemExit(3)\n", &limits).unwrap(),
        sandbox::Outcome::Failed(3)
    ));
    // No network inside.
    let net = "import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('1.1.1.1', 80))\n";
    assert_ne!(sandbox::run_python(net, &limits).unwrap(), sandbox::Outcome::Passed);
}

/// Generated code is confined to its own directory: reading the project or a planted file in
/// the home dir or /var/tmp, writing outside its dir, opening a socket to a listener of this
/// process, or signalling this process each make the program fail; a HumanEval completion that
/// reads the project first is scored as a failure even though its answer is right; and programs
/// after those still run and pass.
#[test]
fn generated_code_cannot_leave_its_directory() {
    let limits = sandbox::Limits {
        wall: std::time::Duration::from_secs(5),
        cpu_s: 5,
        ..Default::default()
    };
    let run = |src: &str| sandbox::run_python(src, &limits).unwrap();
    let project = std::fs::canonicalize(env!("CARGO_MANIFEST_DIR"))
        .unwrap()
        .join("Cargo.toml");
    // A world-readable planted file in a world-readable dir: only Landlock keeps it out of reach.
    let planted = tempfile::Builder::new()
        .prefix("codespot-canary-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let home = std::path::PathBuf::from(std::env::var("HOME").unwrap());
    let home_canary = tempfile::Builder::new()
        .prefix(".codespot-canary-")
        .tempdir_in(&home)
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [planted.path(), home_canary.path()] {
            std::fs::write(d.join("secret.txt"), "secret").unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
            std::fs::set_permissions(d.join("secret.txt"), std::fs::Permissions::from_mode(0o666)).unwrap();
        }
    }
    // Controls: the program's own dir is writable, the system's files are readable.
    assert_eq!(
        run("open('own.txt', 'w').write('x')\nassert open('own.txt').read() == 'x'\nassert open('/etc/hostname').read() is not None or True\nimport json, os\nassert os.listdir('/usr')\n"),
        sandbox::Outcome::Passed
    );
    let read = |p: &std::path::Path| format!("print(open({:?}).read())\n", p.to_str().unwrap());
    for (what, src) in [
        ("the project", read(&project)),
        ("a file planted in /var/tmp", read(&planted.path().join("secret.txt"))),
        (
            "a file planted in the home dir",
            read(&home_canary.path().join("secret.txt")),
        ),
        (
            "a listing of the home dir",
            format!("import os\nprint(os.listdir({:?}))\n", home.to_str().unwrap()),
        ),
        ("/tmp", "import os\nprint(os.listdir('/tmp'))\n".to_string()),
    ] {
        assert_ne!(run(&src), sandbox::Outcome::Passed, "reading {what} must fail");
    }
    let escape = planted.path().join("escape.txt");
    let write = format!("open({:?}, 'w').write('out')\n", escape.to_str().unwrap());
    assert_ne!(
        run(&write),
        sandbox::Outcome::Passed,
        "writing outside its dir must fail"
    );
    assert!(!escape.exists(), "a program wrote {}", escape.display());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connect = format!("import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n");
    assert_ne!(
        run(&connect),
        sandbox::Outcome::Passed,
        "a socket to this host must fail"
    );
    let bind = "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 0))\ns.listen()\nprint(s.getsockname())\nimport urllib.request\nurllib.request.urlopen('http://127.0.0.1:%d' % s.getsockname()[1], timeout=1)\n";
    assert_ne!(
        run(bind),
        sandbox::Outcome::Passed,
        "a listening socket must be unreachable"
    );
    let signal = format!("import os, signal\nos.kill({}, signal.SIGCONT)\n", std::process::id());
    assert_ne!(run(&signal), sandbox::Outcome::Passed, "signalling codespot must fail");

    // A right answer that first reads the project is scored as a failure; the run goes on.
    let probs = eval::datasets::humaneval().unwrap();
    let p = &probs[0];
    assert!(humaneval::passes(p, &p.canonical_solution, &limits).unwrap());
    let snoop = format!(
        "    open({:?}).read()\n{}",
        project.to_str().unwrap(),
        p.canonical_solution
    );
    assert!(
        !humaneval::passes(p, &snoop, &limits).unwrap(),
        "a snooping completion passed"
    );
    assert!(humaneval::passes(&probs[1], &probs[1].canonical_solution, &limits).unwrap());
}

#[test]
fn pass_at_k_matches_the_unbiased_estimator() {
    assert_eq!(humaneval::pass_at_k(1, 1, 1), 1.0);
    assert_eq!(humaneval::pass_at_k(1, 0, 1), 0.0);
    assert!((humaneval::pass_at_k(10, 3, 1) - 0.3).abs() < 1e-12);
    // 1 - C(8,2)/C(10,2) = 1 - 28/45
    assert!((humaneval::pass_at_k(10, 2, 2) - (1.0 - 28.0 / 45.0)).abs() < 1e-12);
    assert_eq!(humaneval::pass_at_k(5, 4, 2), 1.0);
}

#[test]
fn multiple_choice_scores_match_a_full_forward_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (gg, _) = common::tiny_gguf(dir.path(), 6, true);
    let ck = model::load(gg.to_str().unwrap()).unwrap();
    let dev = Default::default();
    let m = Llama::<codespot::backend::Cpu>::from_weights(&ck.config, &ck.weights, &dev).unwrap();
    let tok = &ck.tokenizer;
    let ctx = "def ret(x):\n  ";
    let conts = [" return x", " ret  def", "def def"];
    // Reference: log-likelihood of each continuation from one full forward of ctx + cont.
    let reference: Vec<f64> = conts
        .iter()
        .map(|c| {
            let (a, b) = (tok.encode(ctx, false).unwrap(), tok.encode(c, false).unwrap());
            let ids: Vec<u32> = a.iter().chain(&b).copied().collect();
            let nll: Vec<f32> = m
                .token_nll(tokens_tensor(&[ids], &dev))
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap();
            -nll[a.len() - 1..].iter().map(|&x| x as f64).sum::<f64>()
        })
        .collect();
    let best = (0..3).max_by(|&a, &b| reference[a].total_cmp(&reference[b])).unwrap();
    // lm-evaluation-harness's acc_norm: divided by len(choice), the text without its leading
    // target delimiter, in characters.
    let norm = |c: &str| c.strip_prefix(' ').unwrap_or(c).chars().count() as f64;
    let best_norm = (0..3)
        .max_by(|&a, &b| (reference[a] / norm(conts[a])).total_cmp(&(reference[b] / norm(conts[b]))))
        .unwrap();
    for label in 0..3 {
        let item = mc::McItem {
            options: conts.iter().map(|c| (ctx.to_string(), c.to_string())).collect(),
            label,
        };
        let r = mc::score_item(&m, tok, &item).unwrap();
        assert_eq!(r.acc, (label == best) as u8 as f64, "label {label}");
        assert_eq!(r.acc_norm, (label == best_norm) as u8 as f64, "label {label}");
    }
}

#[test]
fn the_default_model_gets_obvious_items_right() {
    let ck = model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let dev = Default::default();
    let m = Llama::<codespot::backend::Cpu>::from_weights(&ck.config, &ck.weights, &dev).unwrap();
    let items = [
        ("1, 2, 3, 4, 5, 6,", [" 7", " banana", " Tuesday"]),
        ("The capital of France is", [" Paris", " a carrot", " 1984"]),
        ("def add(a, b):\n    return", [" a + b", " Paris", " {{{"]),
    ];
    for (ctx, opts) in items {
        let item = mc::McItem {
            options: opts.iter().map(|o| (ctx.to_string(), o.to_string())).collect(),
            label: 0,
        };
        assert_eq!(mc::score_item(&m, &ck.tokenizer, &item).unwrap().acc, 1.0, "{ctx}");
    }
    // Real benchmark data loads and has the expected shape.
    let hs = mc::load("hellaswag", 0).unwrap();
    assert_eq!(hs.len(), 10042);
    assert!(hs.iter().all(|i| i.options.len() == 4 && i.label < 4));
    let arc = mc::load("arc-easy", 0).unwrap();
    assert_eq!(arc.len(), 570);
}

/// Batched, length-sorted, right-padded scoring (what `eval` runs) gives each option the
/// log-likelihood the one-item-at-a-time KV-cache path gives, on real items of four tasks
/// whose lengths differ within a batch, and with batches of 1, 3 and 8 rows.
#[test]
fn batched_multiple_choice_equals_item_by_item() {
    let ck = model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let dev = Default::default();
    let m = Llama::<codespot::backend::Cpu>::from_weights(&ck.config, &ck.weights, &dev).unwrap();
    let mut items = vec![];
    for (task, n) in [("arc-easy", 6), ("hellaswag", 3), ("winogrande", 4), ("piqa", 3)] {
        items.extend(mc::load(task, 0).unwrap().into_iter().take(n));
    }
    let refs: Vec<&mc::McItem> = items.iter().collect();
    let single: Vec<Vec<f64>> = items
        .iter()
        .map(|it| mc::item_loglikelihoods(&m, &ck.tokenizer, it).unwrap())
        .collect();
    for rows in [1, 3, 8] {
        let batched = mc::loglikelihoods(&m, &ck.tokenizer, &refs, rows).unwrap();
        for (i, (a, b)) in single.iter().zip(&batched).enumerate() {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 2e-3 * x.abs().max(1.0),
                    "rows {rows}, item {i}: {x} vs {y}"
                );
            }
        }
    }
    let outs = mc::score_items(&m, &ck.tokenizer, &refs, 8).unwrap();
    for (it, o) in items.iter().zip(&outs) {
        assert_eq!(mc::score_item(&m, &ck.tokenizer, it).unwrap().acc, o.acc);
    }
}

#[test]
fn table_reports_drop_relative_to_base() {
    let r = |v: f64, lower: bool| eval::TaskResult {
        task: "t".into(),
        metric: "m".into(),
        value: v,
        ci95: (v, v),
        n: 10,
        lower_is_better: lower,
        settings: serde_json::Value::Null,
        skipped: None,
        items: vec![],
    };
    let c = |name: &str, v: f64, lower: bool| eval::ConditionResults {
        condition: name.into(),
        model: "x".into(),
        model_sha256: "y".into(),
        spot: None,
        spot_set: None,
        zeroed: 0,
        results: vec![r(v, lower)],
        seconds: 0.0,
    };
    let t = eval::table(&[c("base", 0.5, false), c("spot 1%", 0.25, false)]);
    assert!(t.contains("(+50.0%)"), "{t}");
    let t = eval::table(&[c("base", 1.0, true), c("spot 1%", 1.5, true)]);
    assert!(t.contains("(+50.0%)"), "{t}");
}

/// score --halves → spot select reports the Jaccard overlap of the halves' spots, and the
/// per-language control sets exclude the other languages' top-k.
#[test]
fn spot_select_from_snapshots_with_halves_reports_stability() {
    let dir = tempfile::tempdir().unwrap();
    let corpora = common::tiny_corpora(dir.path(), 60);
    // A second language: the same files under another name.
    let toy = std::fs::read_to_string(corpora.dir.join("toy.toml")).unwrap();
    std::fs::write(
        corpora.dir.join("toy2.toml"),
        toy.replace("language = \"toy\"", "language = \"toy2\""),
    )
    .unwrap();
    let (gg, cfg) = common::tiny_gguf(dir.path(), 2, true);
    let exe = env!("CARGO_BIN_EXE_codespot");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(exe)
            .args(args)
            .env("CODESPOT_CORPORA", &corpora.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let g = gg.to_str().unwrap();
    let mut snaps = Vec::new();
    for (lang, seed) in [("toy", "0"), ("toy2", "7")] {
        run(&["corpus", "build", lang, "--model", g]);
        let out = dir.path().join(format!("snap-{lang}"));
        run(&[
            "score",
            "--model",
            g,
            "--lang",
            lang,
            "--tokens",
            "128",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--seed",
            seed,
            "--halves",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(out.join("half-a/scores.safetensors").is_file() && out.join("half-b/manifest.json").is_file());
        snaps.push(out.to_str().unwrap().to_string());
    }
    let out = dir.path().join("spot");
    let mut args = vec![
        "spot",
        "select",
        &snaps[0],
        &snaps[1],
        "--k",
        "1,5",
        "--model",
        g,
        "--out",
        out.to_str().unwrap(),
    ];
    run(&args);
    let man = spot::file::read_manifest(&out).unwrap();
    assert_eq!(man.languages, vec!["toy", "toy2"]);
    assert!(!man.python_included);
    for k in ["1", "5"] {
        let j = man.stability[k];
        assert!((0.0..=1.0).contains(&j) && j > 0.0, "k={k}: {j}");
    }
    let spot1 = spot::file::read_set(&out, 5.0, "spot").unwrap();
    let n_layers: usize = cfg
        .tensor_shapes()
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers."))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(spot1.len(), cfg.num_hidden_layers * 9, "layers only");
    let total: usize = spot1.values().map(|m| m.count()).sum();
    assert!(
        total.abs_diff(n_layers / 20) <= cfg.num_hidden_layers * 9,
        "{total} vs {}",
        n_layers / 20
    );
    for set in ["random", "bottom", "magnitude"] {
        let m = spot::file::read_set(&out, 5.0, set).unwrap();
        for (n, mm) in &m {
            assert_eq!(mm.count(), spot1[n].count(), "{set} {n}");
        }
    }
    let (a, b) = (
        spot::file::read_set(&out, 5.0, "lang=toy").unwrap(),
        spot::file::read_set(&out, 5.0, "lang=toy2").unwrap(),
    );
    for (n, ma) in &a {
        assert_eq!(ma.inter_union(&b[n]).0, 0, "{n}: per-language sets overlap");
    }
    // An existing output needs --force.
    args.push("--force");
    run(&args);

    // The text and code-specific sets, with toy2 standing in for prose: the text set has the
    // spot's counts; the code-specific set is the spot minus the text top-k, so it holds no
    // element of the text set and everything of the spot that is not in it.
    let out_t = dir.path().join("spot-text");
    run(&[
        "spot",
        "select",
        &snaps[0],
        "--k",
        "5",
        "--controls",
        "random,text,code-specific",
        "--text",
        &snaps[1],
        "--out",
        out_t.to_str().unwrap(),
    ]);
    let spot5 = spot::file::read_set(&out_t, 5.0, "spot").unwrap();
    let text = spot::file::read_set(&out_t, 5.0, "text").unwrap();
    let specific = spot::file::read_set(&out_t, 5.0, "code-specific").unwrap();
    let (mut overlap, mut kept) = (0, 0);
    for (n, s) in &spot5 {
        assert_eq!(text[n].count(), s.count(), "{n}: text set matched to the spot");
        assert_eq!(specific[n].inter_union(&text[n]).0, 0, "{n}: code-specific ∩ text ≠ ∅");
        let (i, _) = s.inter_union(&text[n]);
        assert_eq!(specific[n].count(), s.count() - i, "{n}");
        assert_eq!(
            specific[n].inter_union(s).0,
            specific[n].count(),
            "{n}: inside the spot"
        );
        overlap += i;
        kept += specific[n].count();
    }
    assert!(overlap > 0 && kept > 0, "overlap {overlap}, kept {kept}");
    // Without --text the text sets are refused, naming the flag.
    let o = std::process::Command::new(exe)
        .args(["spot", "select", &snaps[0], "--controls", "text", "--out"])
        .arg(dir.path().join("no-text"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--text"));

    noise_matched_controls_arms_matrix_and_criteria(dir.path(), &snaps, g, &run);
}

/// The set differences' own random controls, `code-minus-code`, the arms, the language matrix,
/// a held-out language and a baseline criterion, on the two toy snapshots with halves.
fn noise_matched_controls_arms_matrix_and_criteria(
    dir: &std::path::Path,
    snaps: &[String],
    g: &str,
    run: &dyn Fn(&[&str]),
) {
    use codespot::importance::snapshot;
    let read = |d: &std::path::Path, k: f64, set: &str| spot::file::read_set(d, k, set).unwrap();
    // A snapshot of the toy language with extra `score` flags.
    let score_toy = |extra: &[&str], out: &std::path::Path| {
        let mut args = vec![
            "score",
            "--model",
            g,
            "--lang",
            "toy",
            "--tokens",
            "128",
            "--seq-len",
            "16",
            "--batch",
            "2",
        ];
        args.extend(extra);
        args.extend(["--out", out.to_str().unwrap()]);
        run(&args);
    };
    let top = |scores: &Weights, k: f64| {
        let agg = spot::aggregate(&[scores], Aggregation::Sum, Scope::PerTensor, Eligible::Layers).unwrap();
        let c = spot::counts(&agg, k / 100.0, Scope::PerTensor);
        spot::select_by(&agg, &c, true)
    };
    let out = dir.join("spot-noise");
    run(&[
        "spot",
        "select",
        &snaps[0],
        &snaps[1],
        "--k",
        "5",
        "--controls",
        "random,code-specific,code-minus-code,arms,own-language",
        "--text",
        &snaps[1],
        "--model",
        g,
        "--out",
        out.to_str().unwrap(),
    ]);
    let spot5 = read(&out, 5.0, "spot");
    // Each set difference has a random set of its own size, tensor by tensor.
    for set in ["code-specific", "code-minus-code"] {
        let diff = read(&out, 5.0, set);
        let rnd = read(&out, 5.0, &format!("{set}-random"));
        assert_eq!(diff.keys().collect::<Vec<_>>(), rnd.keys().collect::<Vec<_>>());
        for (n, m) in &diff {
            assert_eq!(rnd[n].count(), m.count(), "{set}-random {n}");
        }
        assert!(diff.values().map(|m| m.count()).sum::<usize>() > 0, "{set} is empty");
    }
    // code-minus-code: the first halves' top-k minus the second halves' top-k.
    let halves = |i: usize, h: &str| snapshot::read(&std::path::Path::new(&snaps[i]).join(h)).unwrap().scores;
    let sum = |a: &Weights, b: &Weights| {
        spot::aggregate(&[a, b], Aggregation::Sum, Scope::PerTensor, Eligible::Layers).unwrap()
    };
    let (ha, hb) = (
        top(&sum(&halves(0, "half-a"), &halves(1, "half-a")), 5.0),
        top(&sum(&halves(0, "half-b"), &halves(1, "half-b")), 5.0),
    );
    let cmc = read(&out, 5.0, "code-minus-code");
    for (n, m) in &cmc {
        assert_eq!(m.count(), ha[n].count() - ha[n].inter_union(&hb[n]).0, "{n}");
        assert_eq!(m.inter_union(&ha[n]).0, m.count(), "{n}: inside half A's top-k");
        assert_eq!(m.inter_union(&hb[n]).0, 0, "{n}: outside half B's top-k");
    }
    // The arms split the spot by module kind; the random arms match them tensor by tensor.
    let mut arms_total = 0;
    for arm in ["attn", "mlp", "norms"] {
        let s = read(&out, 5.0, &format!("spot-{arm}"));
        let r = read(&out, 5.0, &format!("random-{arm}"));
        for (n, m) in &s {
            let kind = codespot::model::names::parse(n).unwrap().kind;
            let want = match arm {
                "attn" => kind.is_attention(),
                "mlp" => n.contains(".mlp."),
                _ => n.contains("layernorm"),
            };
            assert!(want, "{arm}: {n}");
            assert_eq!(m.count(), spot5[n].count(), "{n}");
            assert_eq!(r[n].count(), m.count(), "{n}");
        }
        arms_total += s.values().map(|m| m.count()).sum::<usize>();
    }
    assert_eq!(arms_total, spot5.values().map(|m| m.count()).sum::<usize>());
    // The language matrix: own top-k sets off the diagonal, each language's split-half
    // agreement (from its own halves) on it.
    let man = spot::file::read_manifest(&out).unwrap();
    let m = &man.language_matrix["5"];
    assert_eq!(m.languages, vec!["toy", "toy2"]);
    let own: Vec<_> = ["toy", "toy2"]
        .iter()
        .map(|l| read(&out, 5.0, &format!("own={l}")))
        .collect();
    // (Within 1e-12: serde_json reads floats back to about the last bit.)
    let near = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(near(m.jaccard[0][1], spot::jaccard(&own[0], &own[1])));
    assert!(near(m.jaccard[0][1], m.jaccard[1][0]));
    for i in 0..2 {
        let floor = spot::jaccard(&top(&halves(i, "half-a"), 5.0), &top(&halves(i, "half-b"), 5.0));
        assert!(
            near(m.jaccard[i][i], floor),
            "diagonal {i}: {} vs {floor}",
            m.jaccard[i][i]
        );
        assert!(floor < 1.0);
    }

    // Identical samples: a snapshot whose second half is a copy of its first gives an empty
    // code-minus-code set (set difference alone, between equal samples, removes everything).
    let twin = dir.join("snap-twin");
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.path().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    };
    copy(std::path::Path::new(&snaps[0]), &twin);
    copy(&std::path::Path::new(&snaps[0]).join("half-a"), &twin.join("half-a"));
    copy(&std::path::Path::new(&snaps[0]).join("half-a"), &twin.join("half-b"));
    let out_twin = dir.join("spot-twin");
    run(&[
        "spot",
        "select",
        twin.to_str().unwrap(),
        "--k",
        "5",
        "--controls",
        "code-minus-code",
        "--out",
        out_twin.to_str().unwrap(),
    ]);
    let empty = read(&out_twin, 5.0, "code-minus-code");
    assert!(!empty.is_empty() && empty.values().all(|m| m.count() == 0));

    // A held-out language is scored but not aggregated: the spot is the other one's own set.
    let out_ho = dir.join("spot-held-out");
    run(&[
        "spot",
        "select",
        &snaps[0],
        &snaps[1],
        "--k",
        "5",
        "--controls",
        "own-language",
        "--held-out",
        "toy2",
        "--out",
        out_ho.to_str().unwrap(),
    ]);
    let man = spot::file::read_manifest(&out_ho).unwrap();
    assert_eq!(
        (man.languages.clone(), man.held_out.clone()),
        (vec!["toy".to_string()], vec!["toy2".to_string()])
    );
    assert_eq!(read(&out_ho, 5.0, "spot"), read(&out_ho, 5.0, "own=toy"));
    assert!(man.sets.contains(&"own=toy2".to_string()));

    // A baseline criterion: a wanda snapshot of the same language gives a set of the spot's
    // counts, and its overlap with the spot is recorded.
    let wanda = dir.join("snap-toy-wanda");
    score_toy(&["--method", "wanda"], &wanda);
    let out_c = dir.join("spot-criteria");
    let crit = format!("wanda={}", wanda.display());
    run(&[
        "spot",
        "select",
        &snaps[0],
        "--k",
        "5",
        "--controls",
        "magnitude",
        "--model",
        g,
        "--criterion",
        &crit,
        "--out",
        out_c.to_str().unwrap(),
    ]);
    let (s, w) = (read(&out_c, 5.0, "spot"), read(&out_c, 5.0, "wanda"));
    for (n, m) in &s {
        assert_eq!(w[n].count(), m.count(), "{n}");
    }
    let man = spot::file::read_manifest(&out_c).unwrap();
    assert!((man.overlap["k5:wanda"] - spot::jaccard(&s, &w)).abs() < 1e-12);
    assert!(man.overlap.contains_key("k5:magnitude"));
    // A criterion snapshot scored with another method is refused, naming it.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_codespot"))
        .args(["spot", "select", &snaps[0], "--criterion"])
        .arg(format!("molchanov={}", wanda.display()))
        .arg("--out")
        .arg(dir.join("bad-criterion"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("scored with wanda"), "{err}");

    // Structured: whole heads and neurons by group Taylor importance, as many as hold the
    // spot's q+o (gate+up+down) count, and as many random ones.
    let grouped = dir.join("snap-toy-groups");
    score_toy(&["--groups"], &grouped);
    let out_s = dir.join("spot-structured");
    run(&[
        "spot",
        "select",
        grouped.to_str().unwrap(),
        "--k",
        "30",
        "--controls",
        "structured",
        "--out",
        out_s.to_str().unwrap(),
    ]);
    let groups = snapshot::read(&grouped).unwrap().summaries.groups.unwrap();
    let cfg = spot::file::read_manifest(&out_s).unwrap().config;
    let (hd, d) = (cfg.head_dim, cfg.hidden_size);
    let spot = read(&out_s, 30.0, "spot");
    let in_kinds = |m: &BTreeMap<String, spot::Mask>, kinds: &[&str]| -> usize {
        m.iter()
            .filter(|(n, _)| kinds.iter().any(|k| n.contains(k)))
            .map(|(_, x)| x.count())
            .sum()
    };
    let n_heads = (in_kinds(&spot, &["q_proj", "o_proj"]) as f64 / (2 * hd * d) as f64).round() as usize;
    let n_neurons = (in_kinds(&spot, &["gate_proj", "up_proj", "down_proj"]) as f64 / (3 * d) as f64).round() as usize;
    assert!(n_heads >= 1 && n_neurons >= 1, "{n_heads} {n_neurons}");
    for (set, per_unit, n) in [("heads", 2 * hd * d, n_heads), ("neurons", 3 * d, n_neurons)] {
        for s in [set.to_string(), format!("{set}-random")] {
            let m = read(&out_s, 30.0, &s);
            assert_eq!(m.values().map(|x| x.count()).sum::<usize>(), n * per_unit, "{s}");
        }
    }
    // The chosen heads are the top ones: each q row block of a chosen head is whole.
    let heads = read(&out_s, 30.0, "heads");
    for (l, h) in spot::top_units(&groups.heads, n_heads) {
        let q = &heads[&format!("model.layers.{l}.self_attn.q_proj.weight")];
        assert!((h * hd * d..(h + 1) * hd * d).all(|i| q.get(i)), "L{l}.H{h}");
        let o = &heads[&format!("model.layers.{l}.self_attn.o_proj.weight")];
        let cols = cfg.num_attention_heads * hd;
        assert!((0..d).all(|r| o.get(r * cols + h * hd)), "L{l}.H{h} o column");
    }
    // Without group scores the control is refused, naming the flag.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_codespot"))
        .args(["spot", "select", &snaps[0], "--controls", "structured", "--out"])
        .arg(dir.join("no-groups"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--groups"), "{err}");
}

fn x_problems(lang: &str) -> Vec<eval::datasets::CodeProblem> {
    eval::datasets::humaneval_x(lang, std::path::Path::new("../shared/data/humaneval-x")).unwrap()
}

/// HumanEval-X canonical solutions pass and a failing body fails, for the languages whose
/// execution is implemented (C++ on a sample: each program is compiled).
#[test]
fn humaneval_x_harness_runs_cpp_java_js_python() {
    let limits = sandbox::Limits {
        wall: std::time::Duration::from_secs(10),
        cpu_s: 10,
        ..Default::default()
    };
    for (lang, bad, take) in [
        ("python", "    raise SystemExit(1)\n", 164),
        ("js", "  throw new Error('no');\n}\n", 164),
        ("cpp", "    exit(1);\n}\n", 12),
        ("java", "        throw new RuntimeException();\n    }\n}\n", 6),
    ] {
        let probs = x_problems(lang);
        assert_eq!(probs.len(), 164);
        let idx = eval::sample_indices(probs.len(), Some(take), 5);
        let fail: Vec<&str> = idx
            .iter()
            .filter(|&&i| !humaneval::x_passes(lang, &probs[i], &probs[i].canonical_solution, &limits).unwrap())
            .map(|&i| probs[i].task_id.as_str())
            .collect();
        // Known dataset defects that fail outside codespot too: JS/112 and JS/155 compare arrays
        // with `===` inside console.assert, JS/162 needs the npm package js-md5, CPP/137 needs
        // Boost headers (libboost-dev, not installed here).
        let known = ["JavaScript/112", "JavaScript/155", "JavaScript/162", "CPP/137"];
        assert!(
            fail.iter().all(|f| known.contains(f)),
            "{lang}: canonical solutions failed: {fail:?}"
        );
        assert!(fail.len() <= 3, "{fail:?}");
        let passed_bad = idx
            .iter()
            .take(12)
            .filter(|&&i| humaneval::x_passes(lang, &probs[i], bad, &limits).unwrap())
            .count();
        assert_eq!(passed_bad, 0, "{lang}: a failing body passed");
    }
    // A JS assertion that fails only prints; the harness must still see it.
    let probs = x_problems("js");
    let wrong = probs[0].canonical_solution.replace("return true", "return false");
    assert!(!humaneval::x_passes("js", &probs[0], &wrong, &limits).unwrap());
}

fn with_items(task: &str, lower: bool, vals: &[(f64, f64)]) -> eval::TaskResult {
    let items: Vec<eval::Item> = vals
        .iter()
        .enumerate()
        .map(|(i, &(v, w))| eval::Item::new(i, v, w, serde_json::Value::Null))
        .collect();
    let pairs: Vec<(f64, f64)> = vals.to_vec();
    eval::TaskResult {
        task: task.into(),
        metric: "m".into(),
        value: eval::ratio(&pairs),
        ci95: eval::bootstrap(&pairs, 1, eval::ratio),
        n: items.len(),
        lower_is_better: lower,
        settings: serde_json::Value::Null,
        skipped: None,
        items,
    }
}

/// A constant per-item difference gives a zero-width paired interval; a real drop on half the
/// items is significant while its two independent intervals overlap; noise is not; the drop of
/// a bits-per-byte task is signed the other way; items are matched by id, not position.
#[test]
fn paired_bootstrap_intervals() {
    use eval::paired::paired_drop;
    let vals: Vec<f64> = (0..200).map(|i| ((i * 37) % 11) as f64 / 10.0 + 0.5).collect();
    let a = with_items("t", false, &vals.iter().map(|&v| (v, 1.0)).collect::<Vec<_>>());
    let b = with_items("t", false, &vals.iter().map(|&v| (v - 0.1, 1.0)).collect::<Vec<_>>());
    let p = paired_drop(&a, &b, 7).unwrap();
    assert!((p.diff - 0.1).abs() < 1e-12, "{p:?}");
    assert!((p.diff_ci95.1 - p.diff_ci95.0).abs() < 1e-12, "zero width: {p:?}");
    assert!(p.significant && p.n == 200);

    // Accuracy 0/1 items: the condition gets 20 of 200 right answers wrong.
    let acc: Vec<(f64, f64)> = (0..200).map(|i| (((i * 7) % 3 != 0) as u8 as f64, 1.0)).collect();
    let mut worse = acc.clone();
    let mut flipped = 0;
    for x in worse.iter_mut() {
        if x.0 == 1.0 && flipped < 20 {
            x.0 = 0.0;
            flipped += 1;
        }
    }
    let (a, b) = (with_items("t", false, &acc), with_items("t", false, &worse));
    let p = paired_drop(&a, &b, 7).unwrap();
    assert!(p.significant && p.diff_ci95.0 > 0.0, "{p:?}");
    assert!(
        a.ci95.0 < b.ci95.1,
        "the independent intervals overlap: {:?} {:?}",
        a.ci95,
        b.ci95
    );
    // A condition that swaps 10 right answers for 10 wrong ones: no drop.
    let mut swapped = acc.clone();
    let (mut on, mut off) = (0, 0);
    for x in swapped.iter_mut() {
        if x.0 == 1.0 && off < 10 {
            x.0 = 0.0;
            off += 1;
        } else if x.0 == 0.0 && on < 10 {
            x.0 = 1.0;
            on += 1;
        }
    }
    let p = paired_drop(&a, &with_items("t", false, &swapped), 7).unwrap();
    assert!(!p.significant && p.diff.abs() < 1e-12, "{p:?}");

    // Bits per byte: more bits is worse.
    let bits = with_items("b", true, &[(10.0, 10.0), (20.0, 10.0), (30.0, 10.0)]);
    let more = with_items("b", true, &[(12.0, 10.0), (22.0, 10.0), (32.0, 10.0)]);
    let p = paired_drop(&bits, &more, 7).unwrap();
    assert!(
        (p.diff - 0.2).abs() < 1e-12 && (p.drop_pct - 10.0).abs() < 1e-9,
        "{p:?}"
    );

    // Matched by id: reversing one side's order changes nothing.
    let mut rev = b.clone();
    rev.items.reverse();
    assert_eq!(paired_drop(&a, &rev, 7), paired_drop(&a, &b, 7));

    // The table marks the significant drop and lists the paired intervals.
    let cond = |name: &str, set: Option<&str>, r: &eval::TaskResult| eval::ConditionResults {
        condition: name.into(),
        model: "x".into(),
        model_sha256: "y".into(),
        spot: None,
        spot_set: set.map(String::from),
        zeroed: 0,
        results: vec![r.clone()],
        seconds: 0.0,
    };
    let t = eval::table(&[
        cond("base", None, &a),
        cond("spot 1%", Some("spot"), &b),
        cond("random 1%", Some("random"), &with_items("t", false, &swapped)),
    ]);
    assert!(t.contains("%*)"), "{t}");
    assert!(
        t.contains("spot 1% vs base") && t.contains("spot 1% vs random 1%"),
        "{t}"
    );
}

/// mt-mbpp: 500 items in each of the 17 languages, the same MBPP problems in the same order,
/// each with a context (3 examples + the problem) and a gold continuation.
#[test]
fn mt_mbpp_items_load_for_every_language() {
    let mut ids: Option<Vec<u64>> = None;
    for lang in eval::MT_MBPP_LANGS {
        let rows = eval::datasets::mt_mbpp(lang).unwrap();
        assert_eq!(rows.len(), 500, "{lang}");
        assert!(rows
            .iter()
            .all(|r| !r.context.is_empty() && !r.continuation.trim().is_empty()));
        assert!(
            rows[0].context.contains(&format!("```{lang}")),
            "{lang}: {}",
            &rows[0].context
        );
        let these: Vec<u64> = rows.iter().map(|r| r.task_id).collect();
        match &ids {
            None => ids = Some(these),
            Some(first) => assert_eq!(first, &these, "{lang}: other problems"),
        }
        assert_eq!(
            eval::Task::parse(&format!("mt-mbpp:{lang}")).unwrap().name(),
            format!("mt-mbpp:{lang}")
        );
    }
    assert!(eval::Task::parse("mt-mbpp:cobol").is_err());
}
