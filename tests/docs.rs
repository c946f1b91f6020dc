//! The documents point at things that exist: every file named in backticks in ARCHITECTURE.md
//! exists, every `Type::function` and `function` it names is defined in the sources, and every
//! relative link in README.md and docs/*.md reaches a file.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sources() -> String {
    let mut all = String::new();
    let mut stack = vec![root().join("src")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                all.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    all
}

/// The names of every file under src/, tests/, scripts/, tools/ and recipes/.
fn file_names() -> Vec<String> {
    let mut out = vec![];
    let mut stack: Vec<PathBuf> = ["src", "tests", "scripts", "tools", "recipes"]
        .iter()
        .map(|d| root().join(d))
        .collect();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// Backticked spans of `text`.
fn spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[test]
fn architecture_names_files_and_items_that_exist() {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let src = sources();
    let mut files = 0;
    let mut items = 0;
    let mut missing = vec![];
    let names = file_names();
    // The on-disk formats table names run outputs, not sources: skip table rows.
    let prose: String = text
        .lines()
        .filter(|l| !l.starts_with('|'))
        .collect::<Vec<_>>()
        .join("\n");
    for s in spans(&prose) {
        let s = s.trim();
        let is_file = [".rs", ".sh", ".py", ".toml"].iter().any(|x| s.ends_with(x))
            && !s.contains(' ')
            && !s.contains('*')
            && !s.contains('<');
        if is_file {
            files += 1;
            let here = [root().join(s), root().join("src").join(s)];
            // A bare name (in a module's list of files) exists somewhere in the tree.
            if !here.iter().any(|p| p.exists()) && (s.contains('/') || !names.contains(&s.to_string())) {
                missing.push(format!("file {s}"));
            }
            continue;
        }
        // `Type::function` or `module::function`: the function is defined somewhere.
        if let Some((head, f)) = s.split_once("::") {
            if is_ident(head) && is_ident(f) && f.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                items += 1;
                if !src.contains(&format!("fn {f}(")) && !src.contains(&format!("fn {f}<")) {
                    missing.push(format!("function {s}"));
                }
            }
        }
    }
    assert!(
        files > 20 && items > 5,
        "{files} files, {items} items: the parser found too few"
    );
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names what does not exist: {missing:?}"
    );
}

#[test]
fn relative_links_in_the_readme_and_docs_reach_files() {
    let mut docs: Vec<PathBuf> = vec![root().join("README.md"), root().join("ARCHITECTURE.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            docs.push(p);
        }
    }
    let mut missing = vec![];
    let mut links = 0;
    for d in &docs {
        let text = std::fs::read_to_string(d).unwrap();
        for part in text.split("](").skip(1) {
            let target = part.split(')').next().unwrap();
            if target.starts_with("http") || target.starts_with('#') {
                continue;
            }
            links += 1;
            let base: &Path = d.parent().unwrap();
            if !base.join(target.split('#').next().unwrap()).exists() {
                missing.push(format!("{}: {target}", d.display()));
            }
        }
    }
    assert!(links > 10, "only {links} links found");
    assert!(missing.is_empty(), "links to nothing: {missing:?}");
}
