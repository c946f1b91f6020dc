//! `codespot run` end to end on a tiny random model and tiny corpora: every stage, the report
//! and its images, results for every task; an interrupted run picks up where it stopped; and
//! `codespot compare`.

mod common;

use std::path::Path;
use std::process::Command;

fn recipe(gguf: &Path, out: &Path) -> String {
    common::tiny_recipe(
        "tiny-study",
        gguf,
        out,
        "heldout_tokens = 32\n",
        "\n[spot]\nk = [1.0, 5.0]\ncontrols = [\"random\"]\n\n[eval]\ntasks = [\"humaneval-bpb\", \"code-bpb\", \"hellaswag\", \"arc-easy\"]\nlimit = 3\nmax_bpb_tokens = 64\ntuned_k = [5.0]\n",
    )
}

fn run(corpora: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_codespot"));
    c.args(args).env("CODESPOT_CORPORA", corpora);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn run_does_every_stage_resumes_after_an_interrupt_and_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (gguf, _) = common::tiny_gguf(root, 5, true);
    let corpora = common::two_language_corpora(root, &gguf);
    let out = root.join("run");
    let rp = root.join("study.toml");
    std::fs::write(&rp, recipe(&gguf, &out)).unwrap();
    let r = rp.to_str().unwrap();

    // Interrupted while tuning the first language, right after its first checkpoint.
    let (ok, _, err) = run(&corpora.dir, &["run", r], &[("CODESPOT_ABORT_AFTER_CHECKPOINT", "2")]);
    assert!(!ok, "aborted: {err}");
    assert!(err.contains("[run] base snapshot toy: running"), "{err}");
    assert!(out.join("tune/toy/checkpoints/step-000002").is_dir());
    assert!(!out.join("tune/toy/tune.json").exists());
    assert!(!out.join("report.md").exists());
    let base_scores = out.join("base/toy/scores.safetensors");
    let t_base = mtime(&base_scores);
    let t_spot = mtime(&out.join("spots/base/spot.safetensors"));

    // Rerun: finished stages are skipped, tuning resumes from its checkpoint.
    let (ok, stdout, err) = run(&corpora.dir, &["run", r], &[]);
    assert!(ok, "{err}");
    for s in ["base snapshot toy", "base snapshot toyrs", "base spot"] {
        assert!(err.contains(&format!("[run] {s}: done, skipped")), "{s}: {err}");
    }
    assert!(
        err.contains("[run] tune toy: running") && err.contains("resuming toy from"),
        "{err}"
    );
    assert_eq!(mtime(&base_scores), t_base, "base snapshot not redone");
    assert_eq!(
        mtime(&out.join("spots/base/spot.safetensors")),
        t_spot,
        "base spot not redone"
    );
    assert!(stdout.contains("report.md"), "{stdout}");
    // Tuning reused the run's base snapshot as its step 0.
    let m0 = codespot::importance::snapshot::read_manifest(&out.join("tune/toyrs/snapshots/step-000000")).unwrap();
    let mb = codespot::importance::snapshot::read_manifest(&out.join("base/toyrs")).unwrap();
    assert_eq!(m0, mb);

    // Every stage's outputs.
    for l in ["toy", "toyrs"] {
        assert!(out.join("tune").join(l).join("tune.json").is_file());
        assert!(out
            .join("compare")
            .join(format!("{l}-base-vs-final/compare.json"))
            .is_file());
    }
    assert!(out.join("spots/tuned/spot.safetensors").is_file());
    let cmp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare/base-vs-tuned-spot/compare.json")).unwrap())
            .unwrap();
    assert_eq!(cmp["jaccard"].as_array().unwrap().len(), 2, "k = 1 and 5");
    assert!(out.join("compare/base-vs-tuned-spot/layer_module.png").is_file());

    // Results hold every task (code-bpb expanded per language) in every condition.
    let want = [
        "humaneval-bpb",
        "code-bpb:toy",
        "code-bpb:toyrs",
        "hellaswag",
        "arc-easy",
    ];
    for (name, conds) in [
        ("base", vec!["base", "spot 1%", "random 1%", "spot 5%", "random 5%"]),
        ("tuned-toy", vec!["base", "spot 5%", "random 5%"]),
        ("tuned-toyrs", vec!["base", "spot 5%", "random 5%"]),
    ] {
        let v: Vec<codespot::eval::ConditionResults> =
            serde_json::from_str(&std::fs::read_to_string(out.join("eval").join(name).join("results.json")).unwrap())
                .unwrap();
        assert_eq!(
            v.iter().map(|c| c.condition.as_str()).collect::<Vec<_>>(),
            conds,
            "{name}"
        );
        for c in &v {
            for t in want {
                let r = c
                    .results
                    .iter()
                    .find(|r| r.task == t)
                    .unwrap_or_else(|| panic!("{name}/{}: no {t}", c.condition));
                assert!(
                    r.skipped.is_none() && r.value.is_finite() && r.n > 0,
                    "{name}/{}: {t}: {r:?}",
                    c.condition
                );
            }
        }
    }

    // The report and its images.
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "## Tuning",
        "## Spot before and after tuning",
        "## Results: base",
        "## Results: tuned-toyrs",
        "## What tuning did",
        "| tuned-toy | code-bpb:toy |",
    ] {
        assert!(report.contains(needle), "{needle} not in report");
    }
    // The tuned spot's drop on its tuned model beside the base spot's on the base model, at
    // the k both evaluated.
    let row = report
        .lines()
        .find(|l| l.starts_with("| tuned-toy | code-bpb:toy |") && l.contains("| 5% |"))
        .unwrap_or_else(|| panic!("no k = 5 % row:\n{report}"));
    assert_eq!(row.matches(" %").count(), 3, "{row}");
    let images: Vec<String> = report
        .lines()
        .filter_map(|l| {
            l.strip_prefix("![")
                .and_then(|x| x.split_once("]("))
                .map(|x| x.1.trim_end_matches(')').to_string())
        })
        .collect();
    for f in [
        "report/loss.png",
        "report/heldout.png",
        "report/overlap.png",
        "report/convergence.png",
        "report/mass_base_layer_module.png",
        "report/mass_base_layer_head.png",
        "report/mass_tuned_layer_module.png",
        "report/mass_tuned_layer_head.png",
        "report/dose_humaneval_bpb_bits_byte.png",
    ] {
        assert!(images.iter().any(|i| i == f), "{f} not linked");
    }
    for i in &images {
        let bytes = std::fs::read(out.join(i)).unwrap_or_else(|e| panic!("{i}: {e}"));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 2000,
            "{i} is a real PNG"
        );
    }

    // A third run redoes nothing but the report.
    let (ok, _, err) = run(&corpora.dir, &["run", r], &[]);
    assert!(ok, "{err}");
    assert!(!err.contains(": running"), "{err}");

    // `compare` on two snapshots from the command line.
    let (ok, stdout, err) = run(
        &corpora.dir,
        &[
            "compare",
            out.join("base/toy").to_str().unwrap(),
            out.join("tune/toy/snapshots/step-000004").to_str().unwrap(),
            "--k",
            "1,5",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(stdout.contains("Spearman") && stdout.contains("| 5 |"), "{stdout}");
}

/// A base-only run (`train.steps = 0`) with the selection study's additions: baseline criteria
/// scored and selected, the noise-matched set difference and its random set, the arms, a
/// held-out language, the language and transfer matrices, specificity at matched damage and
/// Holm's correction in the report.
#[test]
fn base_only_run_with_baselines_matrix_and_matched_damage() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (gguf, _) = common::tiny_gguf(root, 6, true);
    let corpora = common::two_language_corpora(root, &gguf);
    let out = root.join("run");
    let rp = root.join("selection.toml");
    std::fs::write(
        &rp,
        format!(
            "name = \"selection\"\nmodel = \"{}\"\nlanguages = [\"toy\", \"toyrs\"]\nout = \"{}\"\n\n[train]\nsteps = 0\n\n\
             [importance]\ntokens = 64\nseq_len = 16\nbatch = 2\nseed = 3\nhalves = true\ngroups = true\n\n\
             [spot]\nk = [1.0, 5.0]\nheld_out = [\"toy\"]\ncriteria = [\"wanda\", \"molchanov\"]\n\
             controls = [\"random\", \"magnitude\", \"code-minus-code\", \"arms\", \"own-language\", \"structured\"]\n\n\
             [eval]\ntasks = [\"code-bpb\"]\nlimit = 3\nmax_bpb_tokens = 64\ndetail_k = 5.0\nmatched_reference = \"code-bpb:toy\"\nmatched_pct = 5.0\n",
            gguf.display(),
            out.display()
        ),
    )
    .unwrap();
    let (ok, stdout, err) = run(&corpora.dir, &["run", rp.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    assert!(stdout.contains("report.md"), "{stdout}");
    assert!(err.contains("train.steps = 0: no tuning"), "{err}");
    assert!(err.contains("heads 5% is empty, skipped"), "{err}");
    assert!(!out.join("tune").exists() && !out.join("spots/tuned").exists());
    for m in ["wanda", "molchanov"] {
        for l in ["toy", "toyrs"] {
            let man = codespot::importance::snapshot::read_manifest(&out.join(format!("base-{m}/{l}"))).unwrap();
            assert_eq!(man.method.name(), m);
        }
    }
    assert!(out.join("base/toyrs/half-a/scores.safetensors").is_file());
    let man = codespot::spot::file::read_manifest(&out.join("spots/base")).unwrap();
    assert_eq!(
        (man.languages.clone(), man.held_out.clone()),
        (vec!["toyrs".to_string()], vec!["toy".to_string()])
    );
    assert_eq!(man.language_matrix["5"].languages, vec!["toy", "toyrs"]);
    assert!(man.overlap.contains_key("k1:wanda") && man.overlap.contains_key("k5:molchanov"));
    let v: Vec<codespot::eval::ConditionResults> =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval/base/results.json")).unwrap()).unwrap();
    let names: Vec<&str> = v.iter().map(|c| c.condition.as_str()).collect();
    let sets = [
        "spot",
        "random",
        "magnitude",
        "code-minus-code",
        "code-minus-code-random",
        // Whole heads hold more than the spot's q+o count at these k: empty, skipped.
        "neurons",
        "neurons-random",
        "wanda",
        "molchanov",
    ];
    let mut want = vec!["base".to_string()];
    for k in ["1", "5"] {
        want.extend(sets.iter().map(|s| format!("{s} {k}%")));
    }
    // The arms and the own spots at detail_k only.
    for s in [
        "spot-attn",
        "spot-mlp",
        "spot-norms",
        "random-attn",
        "random-mlp",
        "random-norms",
        "own=toy",
        "own=toyrs",
    ] {
        want.push(format!("{s} 5%"));
    }
    assert_eq!(names, want);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    if std::env::var_os("CODESPOT_PRINT_REPORT").is_some() {
        println!("{report}");
    }
    for section in [
        "Specificity at matched damage",
        "Baselines' overlap with the spot",
        "Language matrix at k = 5 %",
        "Transfer matrix and arms at k = 5 %",
        "Holm–Bonferroni",
    ] {
        assert!(report.contains(section), "{section}:\n{report}");
    }
}

/// A tiny random model of `cfg`'s architecture as an HF directory, with the tiny GGUF's
/// tokenizer.
fn tiny_hf_dir(root: &Path, make: fn(usize) -> codespot::model::LlamaConfig, tied: bool) -> std::path::PathBuf {
    let (gguf, _) = common::tiny_gguf(root, 6, true);
    let ck = codespot::model::load(gguf.to_str().unwrap()).unwrap();
    let mut cfg = make(ck.config.vocab_size);
    cfg.tie_word_embeddings = tied;
    (cfg.bos_token_id, cfg.eos_token_ids) = (ck.config.bos_token_id, ck.config.eos_token_ids.clone());
    let w = codespot::model::llama::random_weights(&cfg, 8);
    let out = root.join("model");
    codespot::model::export::export_hf_dir(&cfg, &w, &ck.tokenizer, &out, false).unwrap();
    out
}

/// Every stage on Qwen2 and Gemma models: scoring (Taylor and Wanda), tuning, selection,
/// evaluation of the base and tuned models with the spot ablated, and `ablate --export` to an
/// HF directory that reloads as the same architecture with the spot's elements zero.
#[test]
fn qwen2_and_gemma_run_every_stage_and_export() {
    use codespot::model::{Arch, LlamaConfig};
    type Make = fn(usize) -> LlamaConfig;
    let cases: [(Arch, Make, bool, &str); 2] = [
        (Arch::Qwen2, LlamaConfig::tiny_qwen2, false, "qwen2"),
        (Arch::Gemma, LlamaConfig::tiny_gemma, true, "gemma"),
    ];
    for (arch, make, tied, model_type) in cases {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (gguf, _) = common::tiny_gguf(root, 5, true);
        let corpora = common::two_language_corpora(root, &gguf);
        let model = tiny_hf_dir(root, make, tied);
        let out = root.join("run");
        let rp = root.join("arch.toml");
        let text = common::tiny_recipe(
        "tiny-arch",
        &model,
        &out,
        "heldout_tokens = 32\n",
        "\n[spot]\nk = [5.0]\ncontrols = [\"random\"]\ncriteria = [\"wanda\"]\n\n[eval]\ntasks = [\"code-bpb\", \"arc-easy\"]\nlimit = 3\nmax_bpb_tokens = 64\ntuned_k = [5.0]\n",
    );
        std::fs::write(&rp, text).unwrap();
        let (ok, stdout, err) = run(&corpora.dir, &["run", rp.to_str().unwrap()], &[]);
        assert!(ok, "{model_type}: {err}");
        assert!(stdout.contains("report.md"), "{stdout}");
        assert!(out.join("spots/tuned/spot.safetensors").is_file());
        // Every tensor was scored by both criteria (Qwen2's biases among them).
        let taylor = codespot::source::weights::from_safetensors(&[out.join("base/toy/scores.safetensors")]).unwrap();
        let wanda =
            codespot::source::weights::from_safetensors(&[out.join("base-wanda/toy/scores.safetensors")]).unwrap();
        let n = codespot::model::load(model.to_str().unwrap())
            .unwrap()
            .config
            .tensor_shapes()
            .len();
        assert_eq!((taylor.tensors.len(), wanda.tensors.len()), (n, n));
        for s in [&taylor, &wanda] {
            for (name, t) in &s.tensors {
                assert!(t.data.iter().any(|&x| x > 0.0), "{model_type}: {name} has no score");
            }
        }
        if arch == Arch::Qwen2 {
            assert!(taylor.tensors.contains_key("model.layers.1.self_attn.k_proj.bias"));
        }
        // Export the base model with the spot ablated; it reloads as Qwen2, spot elements zero.
        let exp = root.join("ablated");
        let (ok, _, err) = run(
            &corpora.dir,
            &[
                "ablate",
                "--model",
                model.to_str().unwrap(),
                "--spot",
                out.join("spots/base").to_str().unwrap(),
                "--k",
                "5",
                "--export",
                exp.to_str().unwrap(),
            ],
            &[],
        );
        assert!(ok, "{err}");
        let back = codespot::model::load(exp.to_str().unwrap()).unwrap();
        assert_eq!(back.config.arch, arch);
        let orig = codespot::model::load(model.to_str().unwrap()).unwrap();
        let zeroed: usize = back
            .weights
            .tensors
            .iter()
            .map(|(n, t)| {
                t.data
                    .iter()
                    .zip(&orig.weights.tensors[n].data)
                    .filter(|(a, b)| **a == 0.0 && **b != 0.0)
                    .count()
            })
            .sum();
        assert!(zeroed > 0, "the spot was zeroed in the export");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(exp.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], model_type);
    }
}
