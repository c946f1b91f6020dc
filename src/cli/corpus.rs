//! `corpus build`, `corpus list`.

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum CorpusCmd {
    /// Gather, filter, dedupe and split a language's code (writes corpora/build/LANG).
    Build {
        lang: String,
        #[arg(long, default_value_t = 64.0)]
        max_mb: f64,
        /// Install a manifest's Debian package when it is missing (apt-get).
        #[arg(long)]
        install: bool,
        /// Tokenizer used for the token counts in stats.json.
        #[arg(long, default_value = "default")]
        model: String,
    },
    /// What is built, and what can be built here.
    List,
}

pub fn run(cmd: CorpusCmd) -> Result<()> {
    let corpora = crate::data::Corpora::from_env();
    match cmd {
        CorpusCmd::Build {
            lang,
            max_mb,
            install,
            model,
        } => {
            corpora.manifest(&lang)?;
            let tok = crate::model::load(&model)?.tokenizer;
            let st = crate::data::build(&corpora, &lang, max_mb, &tok, &model, install)?;
            println!("built {} in {}", lang, corpora.build_dir(&lang).display());
            for sp in crate::data::Split::ALL {
                let x = st.split(sp);
                println!(
                    "  {:<8} {:>6} files {:>10} bytes {:>10} tokens",
                    sp.name(),
                    x.files,
                    x.bytes,
                    x.tokens
                );
            }
            println!("  skipped: {:?}", st.skipped);
            for (split, p) in [
                (crate::data::Split::Train, &st.pairs),
                (crate::data::Split::Heldout, &st.heldout_pairs),
            ] {
                if let Some(p) = p {
                    println!(
                        "  pairs     {:>5} instruction pairs from {} ({} + {} tokens; skipped {:?}) in {}",
                        p.pairs,
                        split.name(),
                        p.instruction_tokens,
                        p.response_tokens,
                        p.skipped,
                        crate::data::pairs_file(split)
                    );
                }
            }
        }
        CorpusCmd::List => {
            let rows = crate::data::corpus_list(&corpora);
            if rows.is_empty() {
                println!("no manifests in {}", corpora.dir.display());
            }
            println!(
                "{:<12} {:<10} {:>10} {:>12} {:>12}  notes",
                "language", "built", "files", "train tok", "calib tok"
            );
            for r in rows {
                match r.built {
                    Some((files, train, calib)) => println!(
                        "{:<12} {:<10} {files:>10} {train:>12} {calib:>12}  {}",
                        r.language, "yes", r.sources
                    ),
                    None => println!(
                        "{:<12} {:<10} {:>10} {:>12} {:>12}  {}",
                        r.language, "no", "-", "-", "-", r.sources
                    ),
                }
            }
        }
    }
    Ok(())
}
