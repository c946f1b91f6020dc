//! Scale-out: sharded scoring merged back (`score --shard I/N` + `snapshot merge`), and
//! data-parallel scoring and tuning through burn-collective with two CPU peers in one process.

mod common;

use codespot::backend::{Cpu, CpuAd};
use codespot::engine;
use codespot::importance::run::Shard;
use codespot::importance::{self, Method};
use codespot::model::{self, Llama};
use std::path::{Path, PathBuf};

/// The largest |a − b| over a tensor, relative to the tensor's largest |a|, over all tensors.
fn max_rel_diff(a: &codespot::source::Weights, b: &codespot::source::Weights) -> f64 {
    assert_eq!(
        a.tensors.keys().collect::<Vec<_>>(),
        b.tensors.keys().collect::<Vec<_>>()
    );
    let mut worst = 0f64;
    for (name, t) in &a.tensors {
        let u = &b.tensors[name];
        assert_eq!(t.shape, u.shape, "{name}");
        let scale = t.data.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30) as f64;
        for (x, y) in t.data.iter().zip(&u.data) {
            worst = worst.max((x - y).abs() as f64 / scale);
        }
    }
    worst
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ck: model::Checkpoint,
    corpora: codespot::data::Corpora,
    model: Llama<CpuAd>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let corpora = common::tiny_corpora(&root, 60);
    let (gg, _) = common::tiny_gguf(&root, 3, false);
    let mut ck = model::load(gg.to_str().unwrap()).unwrap();
    codespot::data::build(&corpora, "toy", 64.0, &ck.tokenizer, "tiny", false).unwrap();
    let model = Llama::<CpuAd>::from_weights(&ck.config, &ck.weights, &Default::default()).unwrap();
    ck.weights = Default::default();
    Setup {
        _dir: dir,
        root,
        ck,
        corpora,
        model,
    }
}

fn request(method: Method) -> importance::run::ScoreRequest {
    let mut req = importance::run::ScoreRequest::new("toy");
    req.tokens = 160; // 10 blocks of 16 → 5 batches of 2
    req.seq_len = 16;
    req.batch = 2;
    req.method = method;
    req
}

fn score(s: &Setup, req: &importance::run::ScoreRequest, out: &Path) -> importance::snapshot::Snapshot {
    importance::run::score_snapshot(&s.model, &s.ck, &s.corpora, req, out, false).unwrap();
    importance::snapshot::read(out).unwrap()
}

#[test]
fn four_shards_merge_into_the_unsharded_snapshot_for_every_method() {
    let s = setup();
    for &method in <Method as clap::ValueEnum>::value_variants() {
        let name = method.name();
        let whole = score(&s, &request(method), &s.root.join(format!("{name}-whole")));
        let mut dirs = vec![];
        let mut shard_scores = vec![];
        for i in 1..=4 {
            let mut req = request(method);
            req.shard = Some(Shard { index: i, count: 4 });
            let d = s.root.join(format!("{name}-shard{i}"));
            let snap = score(&s, &req, &d);
            let sh = snap.manifest.shard.clone().expect("a shard's manifest says so");
            assert_eq!((sh.index, sh.count, sh.total_tokens), (i, 4, 160));
            assert!(d.join(importance::snapshot::ACCUMULATORS).is_file());
            shard_scores.push(snap.scores);
            dirs.push(d);
        }
        // 5 batches over 4 shards: 1, 1, 1, 2 batches, every batch once.
        let batches: Vec<usize> = dirs
            .iter()
            .map(|d| importance::snapshot::read_manifest(d).unwrap().shard.unwrap().batches)
            .collect();
        assert_eq!(batches, vec![1, 1, 1, 2]);
        // Shards given in any order merge the same way.
        dirs.reverse();
        let out = s.root.join(format!("{name}-merged"));
        let man = importance::run::merge_shards(&dirs, &out, false).unwrap();
        assert_eq!(man.tokens, whole.manifest.tokens);
        assert_eq!(man.merged_from.len(), 4);
        assert!(man.shard.is_none());
        let merged = importance::snapshot::read(&out).unwrap();
        let d = max_rel_diff(&whole.scores, &merged.scores);
        println!("{name}: merged vs unsharded max relative difference {d:.2e}");
        assert!(d < 1e-5, "{name}: merged differs from unsharded by {d:e}");
        // Summaries are the whole run's too.
        assert!((merged.summaries.total_mass / whole.summaries.total_mass - 1.0).abs() < 1e-5);
        // The merge is not the sum of the shards' scores where |·| comes after the sum.
        let mut naive = shard_scores[0].clone();
        for sc in &shard_scores[1..] {
            for (k, t) in &mut naive.tensors {
                t.data.iter_mut().zip(&sc.tensors[k].data).for_each(|(a, b)| *a += b);
            }
        }
        let naive_diff = max_rel_diff(&whole.scores, &naive);
        match method {
            // Sums of per-batch terms: the shards' scores add.
            Method::Taylor | Method::Molchanov => assert!(naive_diff < 1e-5),
            _ => assert!(
                naive_diff > 1e-3,
                "{name}: adding scores should differ ({naive_diff:e})"
            ),
        }
    }
}

#[test]
fn merge_refuses_incomplete_or_mismatched_shards() {
    let s = setup();
    let mut dirs = vec![];
    for i in 1..=2 {
        let mut req = request(Method::TaylorSum);
        req.shard = Some(Shard { index: i, count: 2 });
        let d = s.root.join(format!("s{i}"));
        score(&s, &req, &d);
        dirs.push(d);
    }
    let out = s.root.join("merged");
    let e = importance::run::merge_shards(&dirs[..1], &out, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("each shard 1..2 exactly once"), "{e}");
    let e = importance::run::merge_shards(&[dirs[0].clone(), dirs[0].clone()], &out, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("exactly once"), "{e}");
    // A shard of another method.
    let mut req = request(Method::Taylor);
    req.shard = Some(Shard { index: 2, count: 2 });
    let other = s.root.join("other");
    score(&s, &req, &other);
    let e = importance::run::merge_shards(&[dirs[0].clone(), other.clone()], &out, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other") && e.contains("'method'"), "{e}");
    // An unsharded snapshot is not a shard.
    let whole = s.root.join("whole");
    score(&s, &request(Method::TaylorSum), &whole);
    let e = importance::run::merge_shards(&[dirs[0].clone(), whole], &out, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no 'shard' field"), "{e}");
    // A corrupt accumulator file names itself.
    std::fs::write(
        dirs[1].join(importance::snapshot::ACCUMULATORS),
        b"\x10\0\0\0\0\0\0\0{bad",
    )
    .unwrap();
    let e = format!("{:#}", importance::run::merge_shards(&dirs, &out, false).unwrap_err());
    assert!(e.contains("accumulators.safetensors"), "{e}");
    assert!(!out.exists(), "nothing half-written");
    // Bad shard specs.
    assert!("0/4".parse::<Shard>().is_err());
    assert!("5/4".parse::<Shard>().is_err());
    assert!("x".parse::<Shard>().is_err());
    assert_eq!("2/4".parse::<Shard>().unwrap(), Shard { index: 2, count: 4 });
    let mut req = request(Method::Taylor);
    req.shard = Some(Shard { index: 1, count: 9 });
    let e = req.validate().unwrap_err().to_string();
    assert!(e.contains("only 5 batches"), "{e}");
}

#[test]
fn two_cpu_peers_give_one_devices_scores() {
    let s = setup();
    for &method in <Method as clap::ValueEnum>::value_variants() {
        let name = method.name();
        let one = score(&s, &request(method), &s.root.join(format!("{name}-1")));
        let mut req = request(method);
        req.devices = 2;
        let two = score(&s, &req, &s.root.join(format!("{name}-2")));
        assert_eq!(two.manifest.devices, 2);
        assert_eq!(two.manifest.tokens, one.manifest.tokens);
        let d = max_rel_diff(&one.scores, &two.scores);
        println!("{name}: 2 peers vs 1 device max relative difference {d:.2e}");
        assert!(d < 1e-5, "{name}: {d:e}");
    }
}

#[test]
fn two_cpu_peers_give_one_devices_tuning_losses() {
    use codespot::train::adamw::{AdamW, AdamWConfig};
    let cfg = model::LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 5);
    let dev = Default::default();
    let rows: Vec<Vec<u32>> = (0..4)
        .map(|r| (0..13).map(|i| ((i * 7 + r * 11 + 3) % 64) as u32).collect())
        .collect();
    let acfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let run = |devices: usize| -> (Vec<f64>, Vec<f32>) {
        let devs = codespot::collective::peer_devices::<CpuAd>(devices);
        let mut m = Llama::<CpuAd>::from_weights(&cfg, &w, &dev).unwrap();
        let mut opt = AdamW::<Cpu>::new(acfg, &m);
        let mut losses = vec![];
        for _ in 0..4 {
            let (l, g) = engine::batch_loss_grads_parallel(&m, &rows, 2, &devs).unwrap();
            losses.push(l);
            m = opt.step(m, g, 3e-3, 1.0);
        }
        let last = m.to_weights().tensors["model.layers.1.mlp.down_proj.weight"]
            .data
            .clone();
        (losses, last)
    };
    let (one, w1) = run(1);
    let (two, w2) = run(2);
    println!("losses, 1 device: {one:?}\nlosses, 2 peers:  {two:?}");
    assert!(one[3] < one[0], "the model learns: {one:?}");
    for (a, b) in one.iter().zip(&two) {
        assert!((a - b).abs() < 1e-5 * a.abs(), "{a} vs {b}");
    }
    let wd = w1.iter().zip(&w2).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(wd < 1e-5, "weights after 4 steps differ by {wd}");
    // More peers than rows is refused before any peer starts.
    let devs = codespot::collective::peer_devices::<CpuAd>(5);
    let m = Llama::<CpuAd>::from_weights(&cfg, &w, &dev).unwrap();
    let e = engine::batch_loss_grads_parallel(&m, &rows, 2, &devs).unwrap_err();
    assert!(e.to_string().contains("cannot feed 5 devices"), "{e}");
}

#[test]
fn bf16_weights_score_and_tune_close_to_f32() {
    use burn::tensor::DType;
    use codespot::model::Dtype;
    use codespot::track::{spearman, top_masks};
    let mut cfg = model::LlamaConfig::tiny(64);
    cfg.tie_word_embeddings = false;
    let w = model::llama::random_weights(&cfg, 11);
    let dev = Default::default();
    let rows: Vec<Vec<u32>> = (0..8)
        .map(|r| (0..17).map(|i| ((i * 5 + r * 13 + 1) % 64) as u32).collect())
        .collect();
    let f32m = Llama::<CpuAd>::from_weights_as(&cfg, &w, &dev, Dtype::F32).unwrap();
    let bf16m = Llama::<CpuAd>::from_weights_as(&cfg, &w, &dev, Dtype::Bf16).unwrap();
    assert_eq!(bf16m.embed.val().dtype(), DType::BF16);
    assert_eq!(f32m.embed.val().dtype(), DType::F32);
    for method in [Method::Taylor, Method::TaylorSum] {
        let a = importance::score(&f32m, &rows, 2, 2, method, |_| {}).unwrap();
        let b = importance::score(&bf16m, &rows, 2, 2, method, |_| {}).unwrap();
        let rho = spearman(&a, &b, 1 << 20);
        let j = codespot::spot::jaccard(&top_masks(&a, 10.0), &top_masks(&b, 10.0));
        println!(
            "{}: bf16 vs f32 Spearman {rho:.4}, top-10 % Jaccard {j:.3}",
            method.name()
        );
        assert!(rho > 0.95, "{rho}");
        assert!(j > 0.6, "{j}");
    }
    // Loss in bf16 is close to f32, and an AdamW step keeps the weights bf16 (moments f32).
    let (l32, _) = engine::batch_loss_grads(&f32m, &rows, 4, true);
    let (l16, g16) = engine::batch_loss_grads(&bf16m, &rows, 4, true);
    assert!((l32 - l16).abs() < 0.02 * l32, "{l32} vs {l16}");
    assert!(
        g16.iter().flatten().all(|g| g.dtype() == DType::F32),
        "gradients leave the backward in f32"
    );
    let acfg = codespot::train::adamw::AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = codespot::train::adamw::AdamW::<Cpu>::new(acfg, &bf16m);
    let stepped = opt.step(bf16m, g16, 1e-2, 1.0);
    assert_eq!(stepped.layers[0].q.val().dtype(), DType::BF16);
    let (after, _) = engine::batch_loss_grads(&stepped, &rows, 4, true);
    assert!(after < l16, "one bf16 step lowers the loss: {l16} → {after}");
}
