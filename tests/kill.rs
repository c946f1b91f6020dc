//! Kill anywhere: `codespot run` on a tiny model is SIGKILLed at many moments (while tuning,
//! writing snapshots and checkpoints, selecting spots, evaluating, writing the report), then
//! rerun until it finishes; every finished run's outputs equal an uninterrupted run's. Kills
//! come two ways: after a random delay (anywhere, including mid-computation), and exactly
//! between an atomic write's data and its rename (`CODESPOT_FAULT=kill@N`), the moment a
//! non-atomic writer would leave a half-written file behind.
//!
//! "Equal" means byte for byte, except wall-clock fields (`elapsed_s`, `tokens_per_s`,
//! `seconds` in JSON; timing columns in report.md) and TensorBoard files, whose contents are
//! compared as TensorBoard itself reads them (every tag's steps and values, timing tags aside).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn recipe(gguf: &Path, out: &Path) -> String {
    common::tiny_recipe(
        "tiny-kill",
        gguf,
        out,
        "heldout_tokens = 32\n",
        "\n[spot]\nk = [1.0, 5.0]\ncontrols = [\"random\"]\n\n[eval]\ntasks = [\"humaneval-bpb\", \"code-bpb\", \"hellaswag\"]\nlimit = 3\nmax_bpb_tokens = 64\ntuned_k = [5.0]\n",
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    corpora: PathBuf,
    recipe: PathBuf,
    out: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (gguf, _) = common::tiny_gguf(&root, 5, true);
    let corpora = common::two_language_corpora(&root, &gguf).dir;
    let out = root.join("run");
    let recipe_path = root.join("kill.toml");
    std::fs::write(&recipe_path, recipe(&gguf, &out)).unwrap();
    Setup {
        _dir: dir,
        corpora,
        recipe: recipe_path,
        out,
    }
}

fn command(s: &Setup, fault: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_codespot"));
    c.args(["run", s.recipe.to_str().unwrap()])
        .env("CODESPOT_CORPORA", &s.corpora)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(f) = fault {
        c.env("CODESPOT_FAULT", f);
    }
    c
}

/// How a run ended, and the last stage it announced.
struct Ended {
    finished: bool,
    stage: String,
    stderr: String,
}

/// Run once; with `kill_after`, SIGKILL it after that long (if it is still running).
fn run_once(s: &Setup, fault: Option<&str>, kill_after: Option<Duration>) -> Ended {
    let mut child = command(s, fault).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = vec![];
        for l in BufReader::new(err).lines() {
            lines.push(l.unwrap_or_default());
        }
        lines
    });
    let status = match kill_after {
        None => child.wait().unwrap(),
        Some(d) => {
            let t0 = Instant::now();
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break st;
                }
                if t0.elapsed() >= d {
                    child.kill().unwrap(); // SIGKILL
                    break child.wait().unwrap();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    let lines = reader.join().unwrap();
    let stage = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("[run] "))
        .unwrap_or("(start)")
        .to_string();
    Ended {
        finished: status.success(),
        stage,
        stderr: lines.join("\n"),
    }
}

/// Every output file under `dir` (relative path → normalised contents), plus TensorBoard dirs
/// read by TensorBoard. Leftover temp files fail the comparison by their presence.
fn outputs(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut tb_dirs = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                stack.push(p);
            } else if rel.ends_with(".codespot.lock") || rel.ends_with(".lock") {
                continue; // lock files stay; they hold no data
            } else if rel.contains("/learner/") {
                // burn-train's metric logs: a view written by its logger thread, so a killed
                // process loses what was not yet written; the results are train_state.json,
                // tune.json and TensorBoard, compared here.
                continue;
            } else if rel.contains("events.out.tfevents") {
                tb_dirs.insert(p.parent().unwrap().to_path_buf());
            } else {
                out.insert(rel, normalise(&p));
            }
        }
    }
    for d in tb_dirs {
        let rel = d.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
        let mut v = common::read_tensorboard(&d);
        if let Some(sc) = v["scalars"].as_object_mut() {
            sc.retain(|tag, _| !tag.contains("tokens_per_s"));
        }
        out.insert(format!("{rel}/(tensorboard)"), v.to_string());
    }
    out
}

const TIMING_KEYS: [&str; 3] = ["elapsed_s", "tokens_per_s", "seconds"];

fn strip_timing(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| !TIMING_KEYS.contains(&k.as_str()));
            m.values_mut().for_each(strip_timing);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_timing),
        _ => {}
    }
}

fn normalise(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap();
    let name = p.to_string_lossy();
    if name.ends_with(".json") {
        let mut v: serde_json::Value =
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}: not JSON (half-written?): {e}"));
        strip_timing(&mut v);
        return v.to_string();
    }
    if name.ends_with(".md") {
        // Blank the cells of timing columns (header cells naming a rate or wall time).
        let text = String::from_utf8(bytes).unwrap();
        let mut timing_cols: Vec<usize> = vec![];
        let mut lines = vec![];
        for l in text.lines() {
            if !l.starts_with('|') {
                timing_cols.clear();
                lines.push(l.to_string());
                continue;
            }
            let cells: Vec<&str> = l.split('|').collect();
            if timing_cols.is_empty() && cells.iter().any(|c| c.contains("/s") || c.contains("wall")) {
                timing_cols = (0..cells.len())
                    .filter(|&i| cells[i].contains("/s") || cells[i].contains("wall"))
                    .collect();
                lines.push(l.to_string());
                continue;
            }
            let masked: Vec<&str> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| if timing_cols.contains(&i) { "–" } else { c })
                .collect();
            lines.push(masked.join("|"));
        }
        return lines.join("\n");
    }
    format!("{} bytes, sha256 {}", bytes.len(), codespot::util::sha256_bytes(&bytes))
}

fn assert_same(reference: &BTreeMap<String, String>, got: &BTreeMap<String, String>, what: &str) {
    let a: BTreeSet<_> = reference.keys().collect();
    let b: BTreeSet<_> = got.keys().collect();
    assert_eq!(
        a.symmetric_difference(&b).collect::<Vec<_>>(),
        Vec::<&&String>::new(),
        "{what}: files differ from the uninterrupted run"
    );
    for (k, v) in reference {
        assert!(
            &got[k] == v,
            "{what}: {k} differs from the uninterrupted run:\n{}\nvs\n{v}",
            got[k]
        );
    }
}

/// A small deterministic generator (SplitMix64) for kill moments.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn a_run_killed_anywhere_finishes_with_the_outputs_of_an_uninterrupted_one() {
    let s = setup();
    let t0 = Instant::now();
    let done = run_once(&s, None, None);
    assert!(done.finished, "{}", done.stderr);
    let full = t0.elapsed();
    let reference = outputs(&s.out);
    assert!(reference.keys().any(|k| k.starts_with("tune/toy/checkpoints/")));
    assert!(reference.contains_key("report.md"));
    // The uninterrupted run is itself reproducible.
    std::fs::remove_dir_all(&s.out).unwrap();
    assert!(run_once(&s, None, None).finished);
    assert_same(&reference, &outputs(&s.out), "a second uninterrupted run");

    let mut rng = Rng(7);
    let mut stages_hit: BTreeMap<String, usize> = BTreeMap::new();
    let mut kills = 0;
    // Kills after random delays, several per run dir, each later process resuming the last.
    for chain in 0..4 {
        std::fs::remove_dir_all(&s.out).unwrap();
        for _ in 0..6 {
            let ms = 1 + rng.below(full.as_millis() as u64 + 200);
            let e = run_once(&s, None, Some(Duration::from_millis(ms)));
            if e.finished {
                break;
            }
            kills += 1;
            *stages_hit.entry(stage_name(&e.stage)).or_default() += 1;
        }
        let e = run_once(&s, None, None);
        assert!(e.finished, "chain {chain}: the rerun failed:\n{}", e.stderr);
        assert_same(&reference, &outputs(&s.out), &format!("timed chain {chain}"));
    }
    // Kills exactly between an atomic write's data and its rename. These chains draw from their
    // own generator: which commit each process dies at does not depend on how many draws the
    // timed chains (whose outcome depends on the machine's speed) used, so they land in the same
    // stages on every machine.
    let mut rng = Rng(11);
    let mut commits_hit = 0;
    let mut commit_stages: BTreeMap<String, usize> = BTreeMap::new();
    for chain in 0..3 {
        std::fs::remove_dir_all(&s.out).unwrap();
        for _ in 0..40 {
            let n = 2 + rng.below(8);
            let e = run_once(&s, Some(&format!("kill@{n}")), None);
            if e.finished {
                break;
            }
            commits_hit += 1;
            *stages_hit.entry(stage_name(&e.stage)).or_default() += 1;
            *commit_stages.entry(stage_name(&e.stage)).or_default() += 1;
        }
        let e = run_once(&s, None, None);
        assert!(e.finished, "commit chain {chain}: the rerun failed:\n{}", e.stderr);
        assert_same(&reference, &outputs(&s.out), &format!("commit chain {chain}"));
    }
    eprintln!(
        "{kills} timed kills and {commits_hit} kills mid-commit; last stage announced before each kill: {stages_hit:?} (mid-commit: {commit_stages:?})"
    );
    for want in ["base snapshot", "tune", "spot", "eval", "report"] {
        assert!(
            commit_stages.keys().any(|k| k.starts_with(want)),
            "no mid-commit kill landed in '{want}': {commit_stages:?}"
        );
    }
}

/// "tune toy: running" → "tune"; "base spot: running" → "spot"; "report: writing" → "report".
fn stage_name(line: &str) -> String {
    let s = line.split(':').next().unwrap_or(line);
    match s {
        _ if s.starts_with("base snapshot") => "base snapshot".into(),
        _ if s.starts_with("tune") || s.starts_with("resuming") => "tune".into(),
        _ if s.ends_with("spot") => "spot".into(),
        _ if s.starts_with("compare") => "compare".into(),
        _ if s.starts_with("eval") => "eval".into(),
        _ if s.starts_with("report") => "report".into(),
        other => other.to_string(),
    }
}

/// No `.x.tmp-PID` leftovers, and every JSON and safetensors file present parses whole.
fn assert_nothing_half_written(dir: &Path, what: &str) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp-"), "{what}: a temp file was left: {}", p.display());
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with(".json") {
                let b = std::fs::read(&p).unwrap();
                assert!(
                    serde_json::from_slice::<serde_json::Value>(&b).is_ok(),
                    "{what}: {} is half-written",
                    p.display()
                );
            } else if name.ends_with(".safetensors") {
                let b = std::fs::read(&p).unwrap();
                assert!(
                    safetensors::SafeTensors::deserialize(&b).is_ok(),
                    "{what}: {} is half-written",
                    p.display()
                );
            }
        }
    }
}

/// One clear error line naming the cause, and no panic.
fn assert_clear_error(e: &Ended, cause: &str, what: &str) {
    assert!(!e.finished, "{what}: the run succeeded");
    assert!(!e.stderr.contains("panicked"), "{what}: panicked:\n{}", e.stderr);
    let line = e
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{what}: no error line:\n{}", e.stderr));
    assert!(line.contains(cause), "{what}: the error does not say '{cause}': {line}");
    assert!(line.contains('/'), "{what}: the error names no file: {line}");
    eprintln!("{what}: {line}");
}

/// A full disk, injected at the N-th atomic write (works anywhere): the run stops with one
/// clear error, leaves nothing half-written, and a rerun with space finishes as if nothing had
/// happened.
#[test]
fn a_full_disk_is_a_clear_error_and_leaves_nothing_half_written() {
    let s = setup();
    assert!(run_once(&s, None, None).finished);
    let reference = outputs(&s.out);
    for n in [1, 3, 7, 15, 30] {
        std::fs::remove_dir_all(&s.out).unwrap();
        let e = run_once(&s, Some(&format!("enospc@{n}")), None);
        assert_clear_error(&e, "No space left on device", &format!("enospc@{n}"));
        assert_nothing_half_written(&s.out, &format!("enospc@{n}"));
        let e = run_once(&s, None, None);
        assert!(e.finished, "rerun after enospc@{n}:\n{}", e.stderr);
        assert_same(&reference, &outputs(&s.out), &format!("rerun after enospc@{n}"));
    }
}

/// The same on a real full filesystem (a 256 KiB tmpfs) and a read-only one, in a private
/// mount namespace; where this machine does not allow one (`unshare -m` fails), the test says
/// so and only the injected variant above runs.
#[test]
fn a_real_full_or_read_only_filesystem_is_a_clear_error() {
    if !Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("unshare -m is not allowed here: the tmpfs variant is not run");
        return;
    }
    let s = setup();
    let bin = env!("CARGO_BIN_EXE_codespot");
    let out = s.out.to_str().unwrap();
    let copy = s.out.with_file_name("copy");
    std::fs::create_dir_all(&s.out).unwrap();
    let in_ns = |mount_opts: &str| {
        let script = format!(
            "mount -t tmpfs -o {mount_opts} tmpfs {out} && {bin} run {recipe}; rc=$?; cp -a {out}/. {copy}/ 2>/dev/null; exit $rc",
            recipe = s.recipe.display(),
            copy = copy.display()
        );
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        let o = Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .env("CODESPOT_CORPORA", &s.corpora)
            .output()
            .unwrap();
        Ended {
            finished: o.status.success(),
            stage: String::new(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    };
    let e = in_ns("size=256k");
    assert_clear_error(&e, "No space left on device", "256 KiB tmpfs");
    assert_nothing_half_written(&copy, "256 KiB tmpfs");
    // What it managed to write resumes on a disk with space.
    std::fs::remove_dir_all(&s.out).unwrap();
    std::fs::rename(&copy, &s.out).unwrap();
    let e = run_once(&s, None, None);
    assert!(e.finished, "rerun after the full tmpfs:\n{}", e.stderr);

    let e = in_ns("ro");
    assert_clear_error(&e, "Read-only file system", "read-only tmpfs");
}
