//! Per-language code corpora: manifests (`corpora/<lang>.toml`), building them into
//! train / calibration / held-out splits, and packing a split into token blocks.

use crate::model::Tok;
use crate::util;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// A corpus manifest.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub language: String,
    #[serde(default)]
    pub description: String,
    pub sources: Vec<SourceSpec>,
    /// Cut each file into documents (collections of short texts, such as fortune files).
    #[serde(default)]
    pub chunk: Option<Chunk>,
    /// The scanner that finds documented functions for instruction pairs (`crate::pairs`):
    /// default the language's own name, when it has one.
    #[serde(default)]
    pub pairs: Option<String>,
    /// Running text, whose paragraphs are single long lines: the filter that drops minified
    /// code (very long lines) is off.
    #[serde(default)]
    pub prose: bool,
}

/// Split files at lines equal to `separator`, then pack consecutive pieces into documents of
/// at least `bytes` bytes (the last piece of a file joins the document before it when short).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    /// An empty separator cuts at blank lines (paragraphs).
    pub separator: String,
    pub bytes: usize,
    /// Keep the pieces of one file in one split (by the file's content hash), so held-out
    /// documents never share a file with calibration or training ones. Off: each piece is
    /// split by its own hash (independent pieces, such as fortunes).
    #[serde(default)]
    pub split_by_file: bool,
}

impl Chunk {
    /// The documents of one file: `(path#N, text)`.
    pub fn split(&self, path: &str, text: &[u8]) -> Vec<(String, Vec<u8>)> {
        let text = String::from_utf8_lossy(text);
        let mut docs: Vec<String> = vec![];
        let mut cur = String::new();
        for piece in text.split(&format!("\n{}\n", self.separator)) {
            let piece = piece.trim_matches('\n');
            if piece.is_empty() {
                continue;
            }
            if !cur.is_empty() {
                cur.push_str("\n\n");
            }
            cur.push_str(piece);
            if cur.len() >= self.bytes {
                docs.push(std::mem::take(&mut cur));
            }
        }
        if !cur.is_empty() {
            match docs.last_mut() {
                Some(last) if cur.len() < self.bytes / 2 => {
                    last.push_str("\n\n");
                    last.push_str(&cur);
                }
                _ => docs.push(cur),
            }
        }
        docs.into_iter()
            .enumerate()
            .map(|(i, d)| (format!("{path}#{i}"), d.into_bytes()))
            .collect()
    }
}

/// Where a language's code comes from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SourceSpec {
    /// Local directories (alternatives: the first root that exists is used; `~` and globs expand).
    Dir {
        roots: Vec<String>,
        include: Vec<String>,
        #[serde(default)]
        exclude: Vec<String>,
    },
    /// A Debian package, installed on request (`--install`). Files come from `roots`, or from
    /// an `archive` inside the package (a .zip read directly, a .tar.* unpacked with `tar`).
    Debian {
        package: String,
        #[serde(default)]
        roots: Vec<String>,
        #[serde(default)]
        archive: Option<String>,
        include: Vec<String>,
        #[serde(default)]
        exclude: Vec<String>,
    },
    /// A package from the npm registry, fetched once with the machine's `npm pack` into
    /// codespot's cache (`npm/`; offline mode reads only the cache); `include` and `exclude`
    /// match paths inside the tarball (`package/…`).
    Npm {
        package: String,
        version: String,
        include: Vec<String>,
        #[serde(default)]
        exclude: Vec<String>,
    },
    /// An HF dataset (JSON lines files) through hf-hub.
    HfDataset {
        repo: String,
        files: Vec<String>,
        field: String,
        #[serde(default)]
        filter_field: Option<String>,
        #[serde(default)]
        filter_equals: Option<String>,
        /// Keep only the first fenced code block of the field (the research's tiny-codes use).
        #[serde(default)]
        first_fenced_block: bool,
    },
}

/// The three splits of a built corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Calib,
    Heldout,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Calib, Split::Heldout];
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Calib => "calib",
            Split::Heldout => "heldout",
        }
    }
    /// 80 / 10 / 10 by a stable hash of the file's content.
    pub(crate) fn of_hash(h: u64) -> Split {
        match h % 100 {
            0..=79 => Split::Train,
            80..=89 => Split::Calib,
            _ => Split::Heldout,
        }
    }
}

/// One document of a corpus.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Doc {
    pub path: String,
    pub sha256: String,
    pub text: String,
    /// The SHA-256 of the file this document was cut from, when the manifest keeps a file's
    /// pieces in one split (`chunk.split_by_file`): the split is then the file's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_sha256: Option<String>,
}

impl Doc {
    /// The document's split: 80 / 10 / 10 by its content hash, or its file's.
    pub fn split(&self) -> Split {
        Split::of_hash(self.split_key())
    }

    fn split_key(&self) -> u64 {
        hash64(self.file_sha256.as_deref().unwrap_or(&self.sha256))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SplitStats {
    pub files: usize,
    pub bytes: usize,
    pub tokens: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CorpusStats {
    pub language: String,
    pub manifest_sha256: String,
    pub tokenizer_model: String,
    pub train: SplitStats,
    pub calib: SplitStats,
    pub heldout: SplitStats,
    pub skipped: std::collections::BTreeMap<String, usize>,
    /// Instruction pairs taken from the train split (`pairs.jsonl`), for languages with a
    /// scanner (`crate::pairs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairs: Option<PairStats>,
    /// The same of the held-out split (`pairs-heldout.jsonl`): the held-out pair loss while
    /// tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_pairs: Option<PairStats>,
}

/// What a pairs file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PairStats {
    pub pairs: usize,
    /// Tokens of the instructions and of the responses.
    pub instruction_tokens: usize,
    pub response_tokens: usize,
    /// Documented functions not made pairs, by reason (`duplicate` included).
    pub skipped: std::collections::BTreeMap<String, usize>,
}

impl CorpusStats {
    pub fn split(&self, s: Split) -> &SplitStats {
        match s {
            Split::Train => &self.train,
            Split::Calib => &self.calib,
            Split::Heldout => &self.heldout,
        }
    }
    fn split_mut(&mut self, s: Split) -> &mut SplitStats {
        match s {
            Split::Train => &mut self.train,
            Split::Calib => &mut self.calib,
            Split::Heldout => &mut self.heldout,
        }
    }
}

/// The corpora directory: manifests in it, built data under `build/`.
#[derive(Debug, Clone)]
pub struct Corpora {
    pub dir: PathBuf,
}

impl Corpora {
    /// `$CODESPOT_CORPORA`, else `./corpora`.
    pub(crate) fn from_env() -> Self {
        let dir = std::env::var_os("CODESPOT_CORPORA")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("corpora"));
        Self { dir }
    }
    pub fn manifest_path(&self, lang: &str) -> PathBuf {
        self.dir.join(format!("{lang}.toml"))
    }
    pub(crate) fn build_dir(&self, lang: &str) -> PathBuf {
        self.dir.join("build").join(lang)
    }
    pub fn languages(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let p = e.path();
                        if p.extension()? != "toml" {
                            return None;
                        }
                        Some(p.file_stem()?.to_string_lossy().into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
    pub fn manifest(&self, lang: &str) -> Result<Manifest> {
        let p = self.manifest_path(lang);
        if !p.is_file() {
            let known = self.languages();
            bail!(
                "unknown language '{lang}': no manifest {} (known: {})",
                p.display(),
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            );
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let m: Manifest =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", p.display(), one_line(&e.to_string())))?;
        if m.language != lang {
            bail!(
                "{}: field 'language' is '{}', expected '{lang}'",
                p.display(),
                m.language
            );
        }
        Ok(m)
    }
    pub fn stats(&self, lang: &str) -> Option<CorpusStats> {
        let p = self.build_dir(lang).join("stats.json");
        serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
    }
    /// Path of one split's JSON-lines file, checking the corpus is built.
    pub fn split_path(&self, lang: &str, split: Split) -> Result<PathBuf> {
        let dir = self.build_dir(lang);
        let p = dir.join(format!("{}.jsonl", split.name()));
        self.manifest(lang)?;
        if !p.is_file() {
            bail!(
                "corpus '{lang}' is not built ({} missing): run `codespot corpus build {lang}`",
                p.display()
            );
        }
        Ok(p)
    }
}

/// Collapse a multi-line message (toml's errors quote the line) into one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn expand_home(s: &str) -> String {
    match (s.strip_prefix("~/"), std::env::var("HOME")) {
        (Some(rest), Ok(h)) => format!("{h}/{rest}"),
        _ => s.to_string(),
    }
}

/// The first existing root among alternatives (globs allowed, the lexically last match wins).
fn first_root(roots: &[String]) -> Option<PathBuf> {
    for r in roots {
        let pat = expand_home(r);
        let mut hits: Vec<PathBuf> = glob::glob(&pat)
            .map(|g| g.flatten().filter(|p| p.is_dir()).collect())
            .unwrap_or_default();
        hits.sort();
        if let Some(h) = hits.pop() {
            return Some(h);
        }
    }
    None
}

fn patterns(list: &[String], manifest: &str) -> Result<Vec<glob::Pattern>> {
    list.iter()
        .map(|p| glob::Pattern::new(p).with_context(|| format!("{manifest}: bad glob pattern '{p}'")))
        .collect()
}

fn matches(rel: &str, include: &[glob::Pattern], exclude: &[glob::Pattern]) -> bool {
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: false,
        require_literal_leading_dot: false,
    };
    include.iter().any(|p| p.matches_with(rel, opts)) && !exclude.iter().any(|p| p.matches_with(rel, opts))
}

fn walk(root: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            walk(&p, out);
        } else if md.is_file() {
            out.push(p);
        }
    }
}

/// Why a file is left out, or None to keep it.
/// `prose`: running text, whose long lines are paragraphs, not minified code.
pub(crate) fn reject_reason(text: &str, prose: bool) -> Option<&'static str> {
    if text.len() < 200 {
        return Some("too_small");
    }
    if text.len() > 512 * 1024 {
        return Some("too_large");
    }
    let lines: Vec<&str> = text.lines().collect();
    let max = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    if !prose && (max > 1000 || text.len() / lines.len().max(1) > 200) {
        return Some("minified");
    }
    let head = lines
        .iter()
        .take(8)
        .map(|l| l.to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join("\n");
    if [
        "generated by",
        "do not edit",
        "autogenerated",
        "auto-generated",
        "@generated",
    ]
    .iter()
    .any(|m| head.contains(m))
    {
        return Some("generated");
    }
    None
}

fn hash64(sha_hex: &str) -> u64 {
    u64::from_str_radix(&sha_hex[..16], 16).unwrap_or(0)
}

/// Raw documents of a manifest (before filtering), as (path, bytes).
/// Each document is `(path, bytes, the SHA-256 of its file when chunk.split_by_file)`.
#[allow(clippy::type_complexity)]
fn gather(
    m: &Manifest,
    manifest_name: &str,
    corpora: &Corpora,
    install: bool,
) -> Result<Vec<(String, Vec<u8>, Option<String>)>> {
    let mut docs = Vec::new();
    for (i, s) in m.sources.iter().enumerate() {
        let ctx = format!("{manifest_name}: sources[{i}]");
        match s {
            SourceSpec::Dir {
                roots,
                include,
                exclude,
            } => {
                let root = first_root(roots)
                    .with_context(|| format!("{ctx}: none of the roots exists: {}", roots.join(", ")))?;
                read_tree(&root, &patterns(include, &ctx)?, &patterns(exclude, &ctx)?, &mut docs);
            }
            SourceSpec::Debian {
                package,
                roots,
                archive,
                include,
                exclude,
            } => {
                ensure_debian(package, install).with_context(|| ctx.clone())?;
                let (inc, exc) = (patterns(include, &ctx)?, patterns(exclude, &ctx)?);
                if let Some(a) = archive {
                    let apath = glob::glob(&expand_home(a))
                        .ok()
                        .and_then(|mut g| g.find_map(|p| p.ok()))
                        .with_context(|| format!("{ctx}: archive {a} not found (is {package} installed?)"))?;
                    read_archive(
                        &apath,
                        &inc,
                        &exc,
                        &corpora.dir.join("build").join(".extract").join(package),
                        &mut docs,
                    )
                    .with_context(|| format!("{ctx}: reading {}", apath.display()))?;
                } else {
                    let root = first_root(roots)
                        .with_context(|| format!("{ctx}: none of the roots exists: {}", roots.join(", ")))?;
                    read_tree(&root, &inc, &exc, &mut docs);
                }
            }
            SourceSpec::Npm {
                package,
                version,
                include,
                exclude,
            } => {
                let tgz = npm_tarball(package, version).with_context(|| ctx.clone())?;
                let (inc, exc) = (patterns(include, &ctx)?, patterns(exclude, &ctx)?);
                let stem = tgz.file_stem().unwrap_or_default().to_string_lossy().into_owned();
                let to = corpora.dir.join("build").join(".extract").join(format!("npm-{stem}"));
                read_archive(&tgz, &inc, &exc, &to, &mut docs)
                    .with_context(|| format!("{ctx}: reading {}", tgz.display()))?;
            }
            SourceSpec::HfDataset {
                repo,
                files,
                field,
                filter_field,
                filter_equals,
                first_fenced_block,
            } => {
                read_hf_dataset(
                    repo,
                    files,
                    field,
                    filter_field.as_deref(),
                    filter_equals.as_deref(),
                    *first_fenced_block,
                    &mut docs,
                )
                .with_context(|| ctx.clone())?;
            }
        }
    }
    if let Some(c) = &m.chunk {
        anyhow::ensure!(c.bytes > 0, "{manifest_name}: chunk: 'bytes' must be positive");
        return Ok(docs
            .into_iter()
            .flat_map(|(p, t)| {
                let file = c.split_by_file.then(|| util::sha256_bytes(&t));
                c.split(&p, &t).into_iter().map(move |(p, t)| (p, t, file.clone()))
            })
            .collect());
    }
    Ok(docs.into_iter().map(|(p, t)| (p, t, None)).collect())
}

fn read_tree(root: &Path, inc: &[glob::Pattern], exc: &[glob::Pattern], docs: &mut Vec<(String, Vec<u8>)>) {
    let mut files = Vec::new();
    walk(root, &mut files);
    for f in files {
        let rel = f.strip_prefix(root).unwrap_or(&f).to_string_lossy().into_owned();
        if matches(&rel, inc, exc) {
            if let Ok(b) = std::fs::read(&f) {
                docs.push((f.to_string_lossy().into_owned(), b));
            }
        }
    }
}

fn read_archive(
    path: &Path,
    inc: &[glob::Pattern],
    exc: &[glob::Pattern],
    extract_to: &Path,
    docs: &mut Vec<(String, Vec<u8>)>,
) -> Result<()> {
    let name = path.to_string_lossy();
    if name.ends_with(".zip") {
        let mut z = zip::ZipArchive::new(std::fs::File::open(path)?).context("not a valid zip")?;
        for i in 0..z.len() {
            let mut f = z.by_index(i)?;
            let rel = f.name().to_string();
            if f.is_file() && matches(&rel, inc, exc) {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut b)?;
                docs.push((format!("{name}!{rel}"), b));
            }
        }
        return Ok(());
    }
    // .tar.xz / .tar.gz …: unpacked once with the system's tar.
    let done = extract_to.join(".done");
    if !done.is_file() {
        std::fs::create_dir_all(extract_to)?;
        let st = std::process::Command::new("tar")
            .arg("-xf")
            .arg(path)
            .arg("-C")
            .arg(extract_to)
            .status()
            .context("running tar")?;
        if !st.success() {
            bail!("tar -xf failed ({st})");
        }
        std::fs::write(&done, "")?;
    }
    read_tree(extract_to, inc, exc, docs);
    Ok(())
}

fn ensure_debian(package: &str, install: bool) -> Result<()> {
    let installed = std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    if !install {
        bail!("Debian package '{package}' is not installed: rerun with --install (runs apt-get install {package})");
    }
    let sudo = if std::env::var("USER").map(|u| u == "root").unwrap_or(false) || is_root() {
        vec![]
    } else {
        vec!["sudo"]
    };
    let mut cmd = std::process::Command::new(sudo.first().copied().unwrap_or("apt-get"));
    if !sudo.is_empty() {
        cmd.arg("apt-get");
    }
    let st = cmd
        .args(["install", "-y", "-qq", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !st.success() {
        bail!("apt-get install {package} failed ({st})");
    }
    Ok(())
}

/// The tarball of an npm package version in codespot's cache (`npm/NAME-VERSION.tgz`, as
/// `npm pack` names it), fetched with `npm pack` when absent and the network is allowed.
fn npm_tarball(package: &str, version: &str) -> Result<PathBuf> {
    let valid = |s: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "@/._-".contains(c)) && !s.contains("..")
    };
    anyhow::ensure!(
        valid(package),
        "npm package name '{package}' is not a plain package name"
    );
    anyhow::ensure!(
        valid(version) && !version.contains('/'),
        "npm version '{version}' is not a plain version"
    );
    let dir = util::cache_dir().join("npm");
    let name = format!("{}-{version}.tgz", package.trim_start_matches('@').replace('/', "-"));
    let path = dir.join(&name);
    if path.is_file() {
        return Ok(path);
    }
    if util::offline() {
        bail!(
            "npm package {package}@{version}: {} is not in the cache and offline mode is on",
            path.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::tempdir_in(&dir)?;
    let out = std::process::Command::new("npm")
        .args([
            "pack",
            &format!("{package}@{version}"),
            "--silent",
            "--pack-destination",
        ])
        .arg(tmp.path())
        .output()
        .with_context(|| format!("npm package {package}@{version}: running `npm pack` (is npm installed?)"))?;
    if !out.status.success() {
        bail!(
            "npm package {package}@{version}: `npm pack` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let got = tmp.path().join(&name);
    anyhow::ensure!(
        got.is_file(),
        "npm package {package}@{version}: `npm pack` did not write {name}"
    );
    std::fs::rename(&got, &path).with_context(|| format!("moving the tarball to {}", path.display()))?;
    Ok(path)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

fn read_hf_dataset(
    repo: &str,
    files: &[String],
    field: &str,
    filter_field: Option<&str>,
    filter_equals: Option<&str>,
    fenced: bool,
    docs: &mut Vec<(String, Vec<u8>)>,
) -> Result<()> {
    use hf_hub::{Cache, Repo, RepoType};
    let hr = Repo::new(repo.to_string(), RepoType::Dataset);
    for f in files {
        let path = if util::offline() {
            Cache::from_env()
                .repo(hr.clone())
                .get(f)
                .with_context(|| format!("dataset {repo}: '{f}' is not in the HF cache and offline mode is on"))?
        } else {
            hf_hub::api::sync::ApiBuilder::from_env()
                .build()?
                .repo(hr.clone())
                .get(f)
                .map_err(|e| anyhow::anyhow!("dataset {repo}: fetching {f}: {e}"))?
        };
        let r = std::io::BufReader::new(std::fs::File::open(&path)?);
        for (i, line) in r.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
            if let (Some(ff), Some(eq)) = (filter_field, filter_equals) {
                if v.get(ff).and_then(|x| x.as_str()) != Some(eq) {
                    continue;
                }
            }
            let Some(text) = v.get(field).and_then(|x| x.as_str()) else {
                continue;
            };
            let text = if fenced {
                match first_fenced_block(text) {
                    Some(t) => t,
                    None => continue,
                }
            } else {
                text.to_string()
            };
            docs.push((format!("hf:{repo}/{f}#{i}"), text.into_bytes()));
        }
    }
    Ok(())
}

/// The body of the first ``` fenced block.
pub(crate) fn first_fenced_block(s: &str) -> Option<String> {
    let start = s.find("```")?;
    let after = &s[start + 3..];
    let body_start = after.find('\n')? + 1;
    let body = &after[body_start..];
    let end = body.find("```")?;
    Some(body[..end].to_string())
}

/// Build a corpus: gather, filter, dedupe, split by content hash, cap, write atomically.
pub fn build(
    corpora: &Corpora,
    lang: &str,
    max_mb: f64,
    tok: &Tok,
    tokenizer_model: &str,
    install: bool,
) -> Result<CorpusStats> {
    let m = corpora.manifest(lang)?;
    let mpath = corpora.manifest_path(lang);
    let mname = mpath.display().to_string();
    let raw = gather(&m, &mname, corpora, install)?;
    let mut stats = CorpusStats {
        language: lang.into(),
        tokenizer_model: tokenizer_model.into(),
        ..Default::default()
    };
    stats.manifest_sha256 = util::sha256_bytes(&std::fs::read(&mpath)?);
    let mut seen = HashSet::new();
    let mut docs: Vec<Doc> = Vec::new();
    for (path, bytes, file_sha256) in raw {
        let Ok(text) = String::from_utf8(bytes) else {
            *stats.skipped.entry("not_utf8".into()).or_default() += 1;
            continue;
        };
        if let Some(r) = reject_reason(&text, m.prose) {
            *stats.skipped.entry(r.into()).or_default() += 1;
            continue;
        }
        let sha = util::sha256_bytes(text.as_bytes());
        if !seen.insert(sha.clone()) {
            *stats.skipped.entry("duplicate".into()).or_default() += 1;
            continue;
        }
        docs.push(Doc {
            path,
            sha256: sha,
            text,
            file_sha256,
        });
    }
    if docs.is_empty() {
        bail!(
            "{mname}: no usable files found for '{lang}' (skipped: {:?})",
            stats.skipped
        );
    }
    // A stable pseudo-random order; the cap keeps a prefix of it.
    docs.sort_by_key(|d| d.split_key());
    let cap = (max_mb * 1024.0 * 1024.0) as usize;
    let mut total = 0;
    let keep = docs
        .iter()
        .position(|d| {
            total += d.text.len();
            total > cap
        })
        .unwrap_or(docs.len());
    if keep < docs.len() {
        stats.skipped.insert("over_max_mb".into(), docs.len() - keep);
        docs.truncate(keep.max(1));
    }
    util::write_dir_atomic(&corpora.build_dir(lang), true, |tmp| {
        let mut writers = Vec::new();
        for s in Split::ALL {
            let f = std::fs::File::create(tmp.join(format!("{}.jsonl", s.name())))?;
            writers.push(std::io::BufWriter::new(f));
        }
        for d in &docs {
            let s = d.split();
            let st = stats.split_mut(s);
            st.files += 1;
            st.bytes += d.text.len();
            st.tokens += tok.encode(&d.text, false)?.len();
            let w = &mut writers[s as usize];
            serde_json::to_writer(&mut *w, d)?;
            w.write_all(b"\n")?;
        }
        for w in writers {
            w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?.sync_all()?;
        }
        let scanner = m.pairs.as_deref().unwrap_or(lang);
        if crate::pairs::supported(scanner) {
            // Train pairs first: a held-out pair whose response is also a train pair's is dropped.
            let mut seen = HashSet::new();
            for (split, field) in [
                (Split::Train, &mut stats.pairs),
                (Split::Heldout, &mut stats.heldout_pairs),
            ] {
                let of = docs.iter().filter(|d| d.split() == split);
                *field = Some(write_pairs(scanner, of, tok, &tmp.join(pairs_file(split)), &mut seen)?);
            }
        } else if let Some(s) = &m.pairs {
            bail!(
                "{mname}: field 'pairs': no pair scanner for '{s}' (known: {})",
                crate::pairs::SCANNERS.join(", ")
            );
        }
        std::fs::write(tmp.join("stats.json"), serde_json::to_string_pretty(&stats)?)?;
        Ok(())
    })?;
    Ok(stats)
}

/// Instruction pairs of the train split's documents, de-duplicated by their response (its
/// whitespace normalised), written as JSON lines.
fn write_pairs<'a>(
    lang: &str,
    train: impl Iterator<Item = &'a Doc>,
    tok: &Tok,
    out: &Path,
    seen: &mut HashSet<String>,
) -> Result<PairStats> {
    let mut st = PairStats::default();
    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    for d in train {
        for p in crate::pairs::extract(lang, &d.path, &d.text, &mut st.skipped) {
            let norm: String = p.response.split_whitespace().collect::<Vec<_>>().join(" ");
            if !seen.insert(util::sha256_bytes(norm.as_bytes())) {
                *st.skipped.entry("duplicate".into()).or_default() += 1;
                continue;
            }
            st.pairs += 1;
            st.instruction_tokens += tok.encode(&p.instruction, false)?.len();
            st.response_tokens += tok.encode(&p.response, false)?.len();
            serde_json::to_writer(&mut w, &p)?;
            w.write_all(b"\n")?;
        }
    }
    w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?.sync_all()?;
    Ok(st)
}

/// Where a built corpus keeps the instruction pairs of `split` (train and held-out only: the
/// calibration split's files never become pairs).
pub(crate) fn pairs_file(split: Split) -> &'static str {
    match split {
        Split::Heldout => "pairs-heldout.jsonl",
        _ => "pairs.jsonl",
    }
}

/// The instruction pairs of a built corpus's train or held-out split (its documented
/// functions).
pub fn read_pairs(corpora: &Corpora, lang: &str, split: Split) -> Result<Vec<crate::pairs::Pair>> {
    anyhow::ensure!(split != Split::Calib, "calibration files are never made pairs");
    let p = corpora.build_dir(lang).join(pairs_file(split));
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{}: no instruction pairs (rebuild the corpus: codespot corpus build {lang})",
            p.display()
        )
    })?;
    text.lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}", p.display(), i + 1)))
        .collect()
}

/// Read a split's documents in file order.
pub fn read_split(path: &Path) -> Result<impl Iterator<Item = Result<Doc>>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let p = path.to_path_buf();
    Ok(std::io::BufReader::new(f).lines().enumerate().map(move |(i, l)| {
        let l = l.with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&l).with_context(|| format!("{}: line {} is not a document", p.display(), i + 1))
    }))
}

/// Pack documents into `n` blocks of `len` tokens (documents joined by `sep`), streaming.
/// Errors when the documents hold fewer tokens than needed.
pub(crate) fn token_blocks(
    docs: impl Iterator<Item = Result<Doc>>,
    tok: &Tok,
    sep: Option<u32>,
    len: usize,
    n: usize,
    what: &str,
) -> Result<Vec<Vec<u32>>> {
    let (blocks, seen) = token_blocks_at_most(docs, tok, sep, len, n)?;
    if blocks.len() < n {
        bail!(
            "{what} holds {seen} tokens, fewer than the {} requested ({n} blocks of {len})",
            n * len
        );
    }
    Ok(blocks)
}

/// Up to `n` blocks of `len` tokens (fewer when the documents run out), and the tokens seen.
pub(crate) fn token_blocks_at_most(
    docs: impl Iterator<Item = Result<Doc>>,
    tok: &Tok,
    sep: Option<u32>,
    len: usize,
    n: usize,
) -> Result<(Vec<Vec<u32>>, usize)> {
    let mut blocks = Vec::with_capacity(n);
    let mut cur: Vec<u32> = Vec::with_capacity(len);
    let mut seen = 0usize;
    for d in docs {
        if blocks.len() == n {
            break;
        }
        let mut ids = tok.encode(&d?.text, false)?;
        ids.extend(sep);
        seen += ids.len();
        for id in ids {
            cur.push(id);
            if cur.len() == len {
                blocks.push(std::mem::replace(&mut cur, Vec::with_capacity(len)));
                if blocks.len() == n {
                    break;
                }
            }
        }
    }
    Ok((blocks, seen))
}

/// One language of `codespot corpus list`: its manifest's sources and, when built, its sizes.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CorpusRow {
    pub language: String,
    /// The manifest's sources in a few words, or why the manifest is invalid.
    pub sources: String,
    /// Files and train / calib tokens of the built corpus; None when not built.
    pub built: Option<(usize, usize, usize)>,
}

/// Every language with a manifest, with its sources and what is built.
pub(crate) fn corpus_list(corpora: &Corpora) -> Vec<CorpusRow> {
    corpora
        .languages()
        .into_iter()
        .map(|l| {
            let sources = match corpora.manifest(&l) {
                Err(e) => format!("bad manifest: {e:#}"),
                Ok(m) => m
                    .sources
                    .iter()
                    .map(|s| match s {
                        SourceSpec::Dir { roots, .. } => format!("dir {}", roots.first().cloned().unwrap_or_default()),
                        SourceSpec::Debian { package, .. } => format!("debian {package}"),
                        SourceSpec::Npm { package, version, .. } => format!("npm {package}@{version}"),
                        SourceSpec::HfDataset { repo, .. } => format!("hf-dataset {repo}"),
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            };
            let built = corpora.stats(&l).map(|st| {
                (
                    st.train.files + st.calib.files + st.heldout.files,
                    st.train.tokens,
                    st.calib.tokens,
                )
            });
            CorpusRow {
                language: l,
                sources,
                built,
            }
        })
        .collect()
}

/// The documents of a corpus split (shuffled by `seed` when it is not 0), and a description
/// for messages. An empty split is an error.
pub(crate) fn split_docs(corpora: &Corpora, lang: &str, split: Split, seed: u64) -> Result<(Vec<Doc>, String)> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let path = corpora.split_path(lang, split)?;
    let mut docs: Vec<Doc> = read_split(&path)?.collect::<Result<_>>()?;
    if docs.is_empty() {
        anyhow::bail!("corpus '{lang}' {} split is empty ({})", split.name(), path.display());
    }
    if seed != 0 {
        docs.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    }
    Ok((
        docs,
        format!("corpus '{lang}' {} split ({})", split.name(), path.display()),
    ))
}
