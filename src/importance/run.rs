//! Scoring as a job: what to score (`ScoreRequest`), the corpus's calibration blocks, the run
//! that writes a snapshot (sharded, data-parallel or multi-node, with split-half agreement and
//! the cross-sample null's folds), the merge of shard snapshots, and the progress bar.

use super::{accumulate_into, accumulate_parallel, accumulate_with, agreement, null, snapshot, summary};
use super::{GroupScores, Method, RawSums, Scores};
use crate::model::Llama;
use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

/// What to score and how.
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    pub lang: String,
    pub split: crate::data::Split,
    pub tokens: usize,
    pub seq_len: usize,
    pub batch: usize,
    /// Sequences per backward pass (the batch's gradient is the sum over its micro-batches).
    pub micro_batch: usize,
    /// Top blocks whose activations a backward pass keeps ([`Llama::keep_blocks`]).
    pub keep_blocks: usize,
    /// Matrix products in bf16 around the f32 weights ([`crate::model::Autocast`]).
    pub autocast: crate::model::Autocast,
    pub method: Method,
    pub seed: u64,
    pub half: bool,
    pub step: Option<usize>,
    pub progress: bool,
    /// Also write snapshots of the two calibration halves (`half-a/`, `half-b/`).
    pub halves: bool,
    /// The model's name and hash in the manifest, when not the loaded source's (a tuned model).
    pub model_label: Option<(String, String)>,
    /// Score only shard `index` (1-based) of `count` slices of the batches (`--shard I/N`).
    pub shard: Option<Shard>,
    /// Data-parallel peers on this node (GPUs 0..n; on the CPU, n peers share it).
    pub devices: usize,
    /// Other nodes of a multi-node run (default: this node alone).
    pub nodes: crate::collective::Nodes,
    /// Record the snapshot's split-half agreement and convergence ([`agreement`]): one more
    /// copy of the sums, kept from the midpoint. Single-device, unsharded runs of 2+ batches.
    pub agreement: bool,
    /// Also sum group Taylor importance of whole heads and neurons ([`GroupScores`], kept in
    /// `summaries.json`). One device, unsharded, a gradient method.
    pub groups: bool,
    /// Deal the calibration documents into 2 × `folds` seeded folds (halves A and B of random
    /// documents) and keep each fold's sums at the halves' candidates ([`null`]): the
    /// cross-sample null of spot movement. 0: off (halves are the first and second half of the
    /// batches).
    pub folds: usize,
    /// The top-k % the folds' candidates are kept for.
    pub folds_k: f64,
}

/// One of `count` disjoint, contiguous slices of a scoring run's batches (1-based `index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{s}': expected I/N with 1 ≤ I ≤ N (e.g. 2/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl ScoreRequest {
    pub fn new(lang: &str) -> Self {
        Self {
            lang: lang.into(),
            split: crate::data::Split::Calib,
            tokens: 16384,
            seq_len: 256,
            batch: 4,
            micro_batch: 4,
            keep_blocks: crate::model::backprop::DEFAULT_KEEP_BLOCKS,
            autocast: crate::model::Autocast::Off,
            method: Method::Taylor,
            seed: 0,
            half: false,
            step: None,
            progress: false,
            halves: false,
            model_label: None,
            shard: None,
            devices: 1,
            nodes: Default::default(),
            agreement: true,
            groups: false,
            folds: 0,
            folds_k: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.seq_len >= 2, "--seq-len must be at least 2");
        anyhow::ensure!(self.batch >= 1, "--batch must be at least 1");
        anyhow::ensure!(self.micro_batch >= 1, "--micro-batch must be at least 1");
        anyhow::ensure!(self.devices >= 1, "--devices must be at least 1");
        anyhow::ensure!(
            !(self.halves && self.devices > 1),
            "--halves runs on one device (use --devices 1)"
        );
        anyhow::ensure!(
            !(self.halves && self.shard.is_some()),
            "--halves and --shard cannot be combined (score each shard whole, then merge)"
        );
        anyhow::ensure!(
            !(self.groups && (self.devices > 1 || self.nodes.count > 1 || self.shard.is_some())),
            "--groups runs on one device, unsharded"
        );
        anyhow::ensure!(
            !self.groups || self.method.needs_gradients(),
            "--groups needs a gradient method ({} has none)",
            self.method.name()
        );
        anyhow::ensure!(
            self.folds == 0 || (self.devices == 1 && self.nodes.count <= 1 && self.shard.is_none()),
            "importance.folds runs on one device, unsharded"
        );
        anyhow::ensure!(self.folds != 1, "importance.folds must be 0 (off) or at least 2");
        if let Some(sh) = self.shard {
            let batches = self.blocks().div_ceil(self.batch);
            anyhow::ensure!(
                sh.count <= batches,
                "--shard {}/{}: the run has only {batches} batches ({} tokens in batches of {} × {}), fewer than {} shards",
                sh.index,
                sh.count,
                self.tokens,
                self.batch,
                self.seq_len,
                sh.count
            );
        }
        anyhow::ensure!(
            self.tokens >= self.seq_len,
            "--tokens ({}) must be at least --seq-len ({})",
            self.tokens,
            self.seq_len
        );
        Ok(())
    }

    /// Number of blocks: ⌈tokens / seq_len⌉, each of seq_len + 1 tokens (seq_len predictions).
    pub fn blocks(&self) -> usize {
        self.tokens.div_ceil(self.seq_len)
    }
}

/// Token blocks of a corpus split (documents shuffled by `seed` when it is not 0).
pub fn corpus_blocks(
    corpora: &crate::data::Corpora,
    req: &ScoreRequest,
    tok: &crate::model::Tok,
    eos: Option<u32>,
) -> Result<Vec<Vec<u32>>> {
    let (docs, what) = crate::data::split_docs(corpora, &req.lang, req.split, req.seed)?;
    crate::data::token_blocks(docs.into_iter().map(Ok), tok, eos, req.seq_len + 1, req.blocks(), &what)
}

/// Score a model on a language's corpus and write a snapshot directory to `out`.
pub fn score_snapshot<B: AutodiffBackend>(
    model: &Llama<B>,
    ck: &crate::model::Checkpoint,
    corpora: &crate::data::Corpora,
    req: &ScoreRequest,
    out: &std::path::Path,
    force: bool,
) -> Result<snapshot::SnapshotManifest> {
    req.validate()?;
    let mut model = model.clone(); // shares the weights
    model.keep_blocks = req.keep_blocks;
    model.set_autocast(req.autocast)?;
    let model = &model;
    let eos = ck.tokenizer.stop_ids(&ck.config.eos_token_ids).first().copied();
    // With folds, each fold's blocks apart (A's folds, then B's); the run reads them in order.
    let fold_blocks = if req.folds > 0 {
        Some(null_fold_blocks(corpora, req, &ck.tokenizer, eos)?)
    } else {
        None
    };
    let blocks = match &fold_blocks {
        Some(f) => f.concat(),
        None => corpus_blocks(corpora, req, &ck.tokenizer, eos)?,
    };
    let all_tokens = blocks.len() * req.seq_len;
    let chunks: Vec<&[Vec<u32>]> = blocks.chunks(req.batch).collect();
    let range = req.shard.map_or(0..chunks.len(), |s| {
        crate::util::shard_range(chunks.len(), s.index, s.count)
    });
    let total: usize = chunks[range.clone()].iter().map(|c| c.len() * req.seq_len).sum();
    let bar = progress_bar(total as u64, &format!("score {}", req.lang), req.progress);
    let t0 = std::time::Instant::now();
    let mut sums = None;
    let mine = &chunks[range.clone()];
    let parallel = req.devices > 1 || req.nodes.count > 1;
    let mut on_batch = |done: usize| bar.set_position(done as u64);
    let (raw, extras) = if let Some(fb) = &fold_blocks {
        fold_run(model, req, fb, &mut on_batch)?
    } else if parallel {
        let devices = crate::collective::peer_devices::<B>(req.devices);
        let acc = accumulate_parallel(model, mine, req.micro_batch, req.method, &devices, &req.nodes)?;
        (acc.raw(model), Extras::default())
    } else if (req.agreement || req.halves) && req.shard.is_none() && mine.len() >= 2 {
        split_half_run(model, req, mine, &mut on_batch)
    } else {
        anyhow::ensure!(!req.halves, "--halves needs at least 2 batches");
        let acc = accumulate_with(
            model,
            mine,
            req.micro_batch,
            req.method,
            req.groups,
            &mut 0,
            &mut on_batch,
        );
        let x = Extras {
            groups: acc.groups(),
            ..Extras::default()
        };
        (acc.raw(model), x)
    };
    if req.shard.is_some() {
        // A shard keeps its raw sums for the merge beside its scores.
        sums = Some(raw.clone());
    }
    let scores = raw.into_scores();
    let elapsed = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let mut summaries = summary::summarize(&scores, &model.config);
    summaries.groups = extras.groups;
    let corpus_sha = corpora.stats(&req.lang).map(|s| s.manifest_sha256).unwrap_or_default();
    let manifest = snapshot::SnapshotManifest {
        format: 1,
        model: req
            .model_label
            .as_ref()
            .map_or_else(|| ck.source.clone(), |l| l.0.clone()),
        model_sha256: match &req.model_label {
            Some(l) => l.1.clone(),
            None => crate::model::load::source_hash(&ck.location)?,
        },
        language: req.lang.clone(),
        split: req.split.name().into(),
        method: req.method,
        tokens: total,
        seq_len: req.seq_len,
        batch: req.batch,
        seed: req.seed,
        half: req.half,
        step: req.step,
        corpus_manifest_sha256: corpus_sha,
        code_version: snapshot::code_version(),
        config: model.config.clone(),
        // Rounded to short decimals, which JSON reads back exactly.
        elapsed_s: (elapsed * 1e3).round() / 1e3,
        tokens_per_s: (total as f64 / elapsed.max(1e-9) * 10.0).round() / 10.0,
        shard: req.shard.map(|s| snapshot::ShardInfo {
            index: s.index,
            count: s.count,
            first_batch: range.start,
            batches: range.len(),
            total_tokens: all_tokens,
        }),
        merged_from: vec![],
        devices: req.devices,
        dtype: model.dtype.name().into(),
        autocast: model.autocast.effective().into(),
        agreement: extras.agreement,
    };
    match extras.halves {
        // Every node of a multi-node run holds the same all-reduced sums; node 0 writes them.
        _ if req.nodes.rank > 0 => {}
        None if req.shard.is_some() => {
            let sums = sums.expect("sums of a shard");
            snapshot::write_shard(out, (&scores, &manifest, &summaries), &sums, force)?
        }
        None => snapshot::write(out, &scores, &manifest, &summaries, force)?,
        Some((a, b)) => {
            let half = |s: &Scores| {
                let mut m = manifest.clone();
                m.tokens = total / 2;
                m.agreement = None;
                (summary::summarize(s, &model.config), m)
            };
            let (sa, ma) = half(&a);
            let (sb, mb) = half(&b);
            snapshot::write_with_halves(
                out,
                (&scores, &manifest, &summaries),
                (&a, &ma, &sa),
                (&b, &mb, &sb),
                force,
            )?;
        }
    }
    if let Some(f) = extras.folds {
        f.write(&out.join(null::FILE))?;
    }
    Ok(manifest)
}

/// What a scoring run's accumulation gives besides the raw sums.
#[derive(Default)]
struct Extras {
    groups: Option<GroupScores>,
    agreement: Option<agreement::Agreement>,
    /// The two calibration halves' scores (`--halves`).
    halves: Option<(Scores, Scores)>,
    folds: Option<null::Folds>,
}

impl Extras {
    /// From the two calibration halves' sums `ab` (their sum `raw`): the split-half agreement
    /// when `req.agreement`, the halves' scores when `req.halves`.
    fn of_halves(
        &mut self,
        req: &ScoreRequest,
        layers: usize,
        (a, b): (RawSums, RawSums),
        raw: &RawSums,
        half_tokens: usize,
        quarters: Option<(&agreement::TopSets, &agreement::TopSets, usize)>,
    ) {
        if req.agreement {
            self.agreement = Some(agreement::measure(&a, &b, raw, layers, half_tokens, quarters));
        }
        if req.halves {
            self.halves = Some((a.into_scores(), b.into_scores()));
        }
    }
}

/// The run over the null's document folds `fb` (A's folds, then B's): the raw sums, with each
/// fold's sums at the halves' candidates, the agreement and the halves.
fn fold_run<B: AutodiffBackend>(
    model: &Llama<B>,
    req: &ScoreRequest,
    fb: &[Vec<Vec<u32>>],
    on_batch: &mut impl FnMut(usize),
) -> Result<(RawSums, Extras)> {
    let mut extras = Extras::default();
    let mut done = 0;
    let mut sums: Vec<null::FoldSums> = vec![];
    let mut half: [Option<RawSums>; 2] = [None, None];
    let mut half_tokens = 0;
    for (f, b) in fb.iter().enumerate() {
        let chunks: Vec<&[Vec<u32>]> = b.chunks(req.batch).collect();
        let acc = accumulate_with(
            model,
            &chunks,
            req.micro_batch,
            req.method,
            req.groups,
            &mut done,
            on_batch,
        );
        if let Some(g) = acc.groups() {
            extras.groups = Some(match extras.groups.take() {
                Some(mut a) => {
                    GroupScores::add(&mut a, &g);
                    a
                }
                None => g,
            });
        }
        let r = acc.raw(model);
        sums.push(null::FoldSums::of(&r)?);
        let h = &mut half[usize::from(f >= req.folds)];
        match h {
            Some(x) => x.add(&r)?,
            None => *h = Some(r),
        }
        if f + 1 == req.folds {
            half_tokens = done;
        }
    }
    let [Some(a), Some(b)] = half else {
        unreachable!("every half has folds")
    };
    // The first ⌊K/2⌋ folds of each half: two disjoint samples of about N/4.
    let q = req.folds / 2;
    let quarter_tops = |h: usize| -> agreement::TopSets {
        let mine = &sums[h * req.folds..h * req.folds + q];
        let batches: usize = mine.iter().map(|f| f.batches).sum();
        agreement::top_sets(mine[0].names().map(|name| {
            let mut acc = vec![0f32; mine[0].len(name)];
            for f in mine {
                f.add_to(name, &mut acc);
            }
            (name, agreement::tensor_scores(req.method, &acc, None, batches))
        }))
    };
    let quarters = (q >= 1).then(|| (quarter_tops(0), quarter_tops(1)));
    let quarter_tokens = fb[..q].iter().map(|b| b.len() * req.seq_len).sum::<usize>();
    let (sa, sb) = (a.clone().into_scores(), b.clone().into_scores());
    extras.folds = Some(null::Folds::build(req.method, req.folds_k, &sums, [&sa, &sb]));
    drop((sums, sa, sb));
    let mut raw = a.clone();
    raw.add(&b)?;
    let quarters = quarters.as_ref().map(|(x, y)| (x, y, quarter_tokens));
    extras.of_halves(req, model.config.num_hidden_layers, (a, b), &raw, half_tokens, quarters);
    Ok((raw, extras))
}

/// The run in two halves summed apart, then added: their scores give the agreement and, with
/// `req.halves`, the half snapshots.
fn split_half_run<B: AutodiffBackend>(
    model: &Llama<B>,
    req: &ScoreRequest,
    mine: &[&[Vec<u32>]],
    on_batch: &mut impl FnMut(usize),
) -> (RawSums, Extras) {
    let mut extras = Extras::default();
    let mid = mine.len() / 2;
    let mut done = 0;
    // Each half's first quarter's top sets are read on the way (the agreement of two
    // disjoint N/4 samples), when the halves have at least 2 batches.
    let quarter = (mid / 2).max(1);
    let with_quarters = req.agreement && mid >= 2 && mine.len() - mid >= 2;
    let mut half = |range: std::ops::Range<usize>, done: &mut usize| {
        let cut = if with_quarters {
            range.start + quarter
        } else {
            range.end
        };
        let mut acc = accumulate_with(
            model,
            &mine[range.start..cut],
            req.micro_batch,
            req.method,
            req.groups,
            done,
            on_batch,
        );
        let tops = with_quarters.then(|| acc.top_sets(model));
        accumulate_into(&mut acc, model, &mine[cut..range.end], req.micro_batch, done, on_batch);
        (acc, tops)
    };
    let (a, qa) = half(0..mid, &mut done);
    let half_tokens = done;
    let quarter_tokens = mine[..quarter].iter().map(|c| c.len() * req.seq_len).sum::<usize>();
    let (b, qb) = half(mid..mine.len(), &mut done);
    extras.groups = a.groups().zip(b.groups()).map(|(mut a, b)| {
        a.add(&b);
        a
    });
    // Added on the device first, then each set of sums moved to the host as it is
    // consumed: three model-sized sets alive at once, not five.
    let raw = a.clone().merge(b.clone()).raw(model);
    let (a, b) = (a.raw(model), b.raw(model));
    let quarters = qa.as_ref().zip(qb.as_ref()).map(|(x, y)| (x, y, quarter_tokens));
    extras.of_halves(req, model.config.num_hidden_layers, (a, b), &raw, half_tokens, quarters);
    (raw, extras)
}

/// The calibration blocks of each of 2 × `req.folds` document folds ([`null::fold_of`]),
/// `req.blocks()` split evenly among them.
fn null_fold_blocks(
    corpora: &crate::data::Corpora,
    req: &ScoreRequest,
    tok: &crate::model::Tok,
    eos: Option<u32>,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let n = 2 * req.folds;
    let (docs, what) = crate::data::split_docs(corpora, &req.lang, req.split, 0)?;
    let mut per: Vec<Vec<crate::data::Doc>> = (0..n).map(|_| vec![]).collect();
    for d in docs {
        per[null::fold_of(&d.sha256, req.seed, n)].push(d);
    }
    let each = req.blocks().div_ceil(n);
    per.into_iter()
        .enumerate()
        .map(|(f, docs)| {
            crate::data::token_blocks(
                docs.into_iter().map(Ok),
                tok,
                eos,
                req.seq_len + 1,
                each,
                &format!("{what}, document fold {} of {n} (importance.folds)", f + 1),
            )
        })
        .collect()
}

/// Add up shard snapshots (`score --shard I/N`, every I of one N) into one snapshot at `out`,
/// equal to an unsharded `score` of the same batches up to f32 summation order. The shards must
/// agree on everything but their slice (model, language, split, method, sizes, seed, step).
pub fn merge_shards(
    dirs: &[std::path::PathBuf],
    out: &std::path::Path,
    force: bool,
) -> Result<snapshot::SnapshotManifest> {
    use anyhow::Context;
    anyhow::ensure!(!dirs.is_empty(), "snapshot merge: no shard directories given");
    if out.exists() && !force {
        anyhow::bail!("{}: already exists (use --force to replace it)", out.display());
    }
    let mut shards = vec![];
    for d in dirs {
        let m = snapshot::read_manifest(d)?;
        let sh = m.shard.clone().with_context(|| {
            format!(
                "{}: manifest.json has no 'shard' field: not a shard (score --shard I/N writes one)",
                d.display()
            )
        })?;
        shards.push((d.clone(), m, sh));
    }
    shards.sort_by_key(|(_, _, sh)| sh.index);
    let (first_dir, first, first_sh) = shards[0].clone();
    let n = first_sh.count;
    for (d, m, sh) in &shards {
        let differs = |field: &str, a: String, b: String| -> Result<()> {
            anyhow::ensure!(
                a == b,
                "{}: manifest.json field '{field}' is {b}, but {} has {a}: not shards of one run",
                d.display(),
                first_dir.display()
            );
            Ok(())
        };
        differs("model_sha256", first.model_sha256.clone(), m.model_sha256.clone())?;
        differs("language", first.language.clone(), m.language.clone())?;
        differs("split", first.split.clone(), m.split.clone())?;
        differs("method", first.method.name().into(), m.method.name().into())?;
        differs("seq_len", first.seq_len.to_string(), m.seq_len.to_string())?;
        differs("batch", first.batch.to_string(), m.batch.to_string())?;
        differs("seed", first.seed.to_string(), m.seed.to_string())?;
        differs("step", format!("{:?}", first.step), format!("{:?}", m.step))?;
        differs("dtype", first.dtype.clone(), m.dtype.clone())?;
        differs("autocast", first.autocast.clone(), m.autocast.clone())?;
        differs(
            "corpus_manifest_sha256",
            first.corpus_manifest_sha256.clone(),
            m.corpus_manifest_sha256.clone(),
        )?;
        differs("shard.count", n.to_string(), sh.count.to_string())?;
        differs(
            "shard.total_tokens",
            first_sh.total_tokens.to_string(),
            sh.total_tokens.to_string(),
        )?;
        anyhow::ensure!(
            m.config == first.config,
            "{}: manifest.json field 'config' differs from {}",
            d.display(),
            first_dir.display()
        );
    }
    let indices: Vec<usize> = shards.iter().map(|(_, _, sh)| sh.index).collect();
    anyhow::ensure!(
        indices == (1..=n).collect::<Vec<_>>(),
        "snapshot merge: need each shard 1..{n} exactly once, got {indices:?}"
    );
    let mut sums: Option<RawSums> = None;
    let mut merged_from = vec![];
    let mut elapsed = 0.0;
    let mut tokens = 0;
    let mut next_batch = 0;
    for (d, m, sh) in &shards {
        anyhow::ensure!(
            sh.first_batch == next_batch,
            "{}: shard {}/{n} starts at batch {}, expected {next_batch}",
            d.display(),
            sh.index,
            sh.first_batch
        );
        next_batch += sh.batches;
        let s = snapshot::read_sums(d, m)?;
        match &mut sums {
            None => sums = Some(s),
            Some(acc) => acc.add(&s).with_context(|| format!("adding {}", d.display()))?,
        }
        elapsed += m.elapsed_s;
        tokens += m.tokens;
        merged_from.push(snapshot::MergedShard {
            dir: d.display().to_string(),
            index: sh.index,
            tokens: m.tokens,
            elapsed_s: m.elapsed_s,
            accumulators_sha256: crate::util::sha256_file(&d.join(snapshot::ACCUMULATORS))?,
        });
    }
    anyhow::ensure!(
        tokens == first_sh.total_tokens,
        "snapshot merge: the shards hold {tokens} tokens, but the run had {}",
        first_sh.total_tokens
    );
    let scores = sums.expect("at least one shard").into_scores();
    let summaries = summary::summarize(&scores, &first.config);
    let manifest = snapshot::SnapshotManifest {
        tokens,
        shard: None,
        merged_from,
        elapsed_s: (elapsed * 1e3).round() / 1e3,
        tokens_per_s: (tokens as f64 / f64::max(elapsed, 1e-9) * 10.0).round() / 10.0,
        code_version: snapshot::code_version(),
        ..first
    };
    snapshot::write(out, &scores, &manifest, &summaries, force)?;
    Ok(manifest)
}

/// An indicatif bar with tokens/s and ETA (hidden when `show` is false).
pub(crate) fn progress_bar(len: u64, label: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tokens  {per_sec}  ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}
