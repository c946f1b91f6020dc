//! The Taylor importance engine on tiny random models, and the corpus → snapshot pipeline.

mod common;

use burn::backend::{Autodiff, NdArray};
use codespot::engine;
use codespot::importance::{self, Method};
use codespot::model::{self, tokens_tensor, Llama, LlamaConfig};
use codespot::source::Weights;

type F64 = NdArray<f64>;
type F64Ad = Autodiff<NdArray<f64>>;

fn blocks() -> Vec<Vec<u32>> {
    vec![
        vec![3, 17, 42, 5, 60, 61, 2, 9, 33],
        vec![7, 7, 1, 0, 12, 50, 44, 3, 21],
        vec![8, 30, 31, 32, 1, 2, 3, 4, 5],
        vec![63, 62, 61, 60, 59, 1, 1, 1, 9],
    ]
}

/// Central finite-difference gradient of the batch loss for every element of one tensor.
fn fd_grad(cfg: &LlamaConfig, w: &Weights, rows: &[Vec<u32>], name: &str) -> Vec<f64> {
    let dev = Default::default();
    let n = w.tensors[name].numel();
    let loss = |i: usize, d: f64| -> f64 {
        let m = Llama::<F64>::from_weights(cfg, w, &dev).unwrap().map_params(|nm, t| {
            if nm != name {
                return t;
            }
            let mut v: Vec<f64> = t.into_data().convert::<f64>().into_vec().unwrap();
            v[i] += d;
            burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(v, [n]), &dev)
        });
        m.loss(tokens_tensor::<F64>(rows, &dev))
            .into_data()
            .convert::<f64>()
            .into_vec::<f64>()
            .unwrap()[0]
    };
    let eps = 1e-5;
    (0..n).map(|i| (loss(i, eps) - loss(i, -eps)) / (2.0 * eps)).collect()
}

/// The scores use the block-at-a-time backward (`model::backprop`): check it against finite
/// differences with every block re-run (keep 0), some kept (1) and all kept (2), tied and untied.
#[test]
fn taylor_equals_theta_times_finite_difference_gradient() {
    for tied in [true, false] {
        let mut cfg = LlamaConfig::tiny(64);
        cfg.tie_word_embeddings = tied;
        let w = model::llama::random_weights(&cfg, 9);
        let dev = Default::default();
        let rows = &blocks()[..2];
        let mut names = vec![
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.input_layernorm.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.norm.weight",
        ];
        if !tied {
            names.push("lm_head.weight");
        }
        let fd: Vec<Vec<f64>> = names.iter().map(|n| fd_grad(&cfg, &w, rows, n)).collect();
        for keep in [0, 1, 2] {
            let mut m = Llama::<F64Ad>::from_weights(&cfg, &w, &dev).unwrap();
            m.keep_blocks = keep;
            let s = importance::score(&m, rows, 2, 2, Method::Taylor, |_| {}).unwrap();
            // Every tensor is scored, with its parameter's shape.
            for (name, shape) in cfg.tensor_shapes() {
                assert_eq!(s.tensors[&name].shape, shape, "{name}");
            }
            for (name, g) in names.iter().zip(&fd) {
                let theta = &w.tensors[*name].data;
                let got = &s.tensors[*name].data;
                // The embedding: only rows of tokens that occur have a gradient from the input side.
                for i in (0..g.len()).step_by(if g.len() > 2000 { 7 } else { 1 }) {
                    let want = (theta[i] as f64 * g[i]).abs();
                    let err = (got[i] as f64 - want).abs();
                    assert!(
                        err <= 1e-7 + 1e-4 * want,
                        "tied {tied}, keep {keep}, {name}[{i}]: taylor {} vs |θ·g_fd| {want}",
                        got[i]
                    );
                }
            }
        }
    }
}

/// The tool's backend (burn-flex, f32) gives the f64 reference's gradients.
#[test]
fn cpu_backend_gradients_match_the_f64_reference() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 3);
    let rows = &blocks()[..3];
    let mut a = Llama::<codespot::backend::CpuAd>::from_weights(&cfg, &w, &Default::default()).unwrap();
    a.keep_blocks = 1;
    let b = Llama::<F64Ad>::from_weights(&cfg, &w, &Default::default()).unwrap();
    let ga = engine::batch_grads(&a, rows, 3);
    let gb = engine::batch_grads(&b, rows, 2);
    for (((name, _), x), y) in a.params().iter().zip(ga).zip(gb) {
        let x: Vec<f64> = x.unwrap().into_data().convert::<f64>().into_vec().unwrap();
        let y: Vec<f64> = y.unwrap().into_data().convert::<f64>().into_vec().unwrap();
        let max = y.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = x.iter().zip(&y).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            max > 0.0 && diff <= 1e-4 * max,
            "{name}: max |g| {max:e}, max diff {diff:e}"
        );
    }
}

/// The hand-written f32 block (`model::fused`, the CPU backend's default) gives burn
/// autodiff's loss and gradients on the same weights: tied and untied heads, both RoPE
/// layouts, query groups of 2 and 3, rows over several attention query blocks, and a frozen
/// tensor gets no gradient.
#[test]
fn fused_block_gives_burn_autodiffs_gradients() {
    type Ad = codespot::backend::CpuAd;
    // Rows longer than the attention's 64-row query blocks (three blocks, the last partial) for
    // the first config.
    let long: Vec<Vec<u32>> = (0..2)
        .map(|r| (0..151).map(|i| ((i * 13 + r * 7 + 1) % 64) as u32).collect())
        .collect();
    for (c, cfg) in common::fused_variants()
        .into_iter()
        .chain(common::other_archs())
        .enumerate()
    {
        let rows = if c == 0 { long.clone() } else { blocks() };
        let w = model::llama::random_weights(&cfg, 5 + c as u64);
        let fused = Llama::<Ad>::from_weights(&cfg, &w, &Default::default()).unwrap();
        let mut reference = fused.clone();
        reference.fused = false;
        assert!(fused.uses_fused() && !reference.uses_fused());
        let (la, ga) = engine::batch_loss_grads(&fused, &rows, 2, true);
        let (lb, gb) = engine::batch_loss_grads(&reference, &rows, 2, true);
        assert!((la - lb).abs() <= 1e-5 * lb.abs(), "config {c}: loss {la} vs {lb}");
        for (((name, _), x), y) in fused.params().iter().zip(ga).zip(gb) {
            let x: Vec<f32> = x.unwrap().into_data().into_vec().unwrap();
            let y: Vec<f32> = y.unwrap().into_data().into_vec().unwrap();
            let max = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = x.iter().zip(&y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                max > 0.0 && diff <= 2e-5 * max,
                "config {c} {name}: max |g| {max:e}, max diff {diff:e}"
            );
        }
        // A frozen tensor: no gradient for it, the same for the others.
        let mut frozen = fused.clone();
        frozen.layers[1].up = frozen.layers[1].up.clone().map(|t| t.set_require_grad(false));
        let g = engine::batch_grads(&frozen, &rows, 4);
        for ((name, _), g) in frozen.params().iter().zip(&g) {
            assert_eq!(g.is_none(), name == "model.layers.1.mlp.up_proj.weight", "{name}");
        }
    }
}

/// bf16 autocast through the hand-written block gives f32's loss and gradients up to bf16's
/// rounding of the products' inputs (about 2⁻⁹ relative), on every fused variant; on a CPU
/// without a bf16 unit it is f32, bit for bit.
#[test]
fn bf16_autocast_gives_f32s_gradients_within_bf16_rounding() {
    type Ad = codespot::backend::CpuAd;
    for (c, cfg) in common::fused_variants()
        .into_iter()
        .chain(common::other_archs())
        .enumerate()
    {
        let rows = blocks();
        let w = model::llama::random_weights(&cfg, 5 + c as u64);
        let f32m = Llama::<Ad>::from_weights(&cfg, &w, &Default::default()).unwrap();
        let mut bf = f32m.clone();
        bf.set_autocast(model::Autocast::Bf16).unwrap();
        let (la, ga) = engine::batch_loss_grads(&bf, &rows, 2, true);
        let (lb, gb) = engine::batch_loss_grads(&f32m, &rows, 2, true);
        let unit = model::bf16::unit();
        let mut worst = 0f32;
        for (((name, _), x), y) in f32m.params().iter().zip(ga).zip(gb) {
            let x: Vec<f32> = x.unwrap().into_data().into_vec().unwrap();
            let y: Vec<f32> = y.unwrap().into_data().into_vec().unwrap();
            if unit.is_none() {
                assert!(x == y, "config {c} {name}: autocast without a bf16 unit must be f32");
                continue;
            }
            let max = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = x.iter().zip(&y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                max > 0.0 && diff <= 3e-2 * max,
                "config {c} {name}: max |g| {max:e}, max diff {diff:e}"
            );
            worst = worst.max(diff / max);
        }
        if unit.is_some() {
            assert!(worst > 0.0, "config {c}: the bf16 products did not run");
            assert!((la - lb).abs() <= 1e-2 * lb.abs(), "config {c}: loss {la} vs {lb}");
        }
        // The forward-only path (evaluation's): logits within bf16 rounding, f32 without a unit.
        type Cpu = codespot::backend::Cpu;
        let plain = Llama::<Cpu>::from_weights(&cfg, &w, &Default::default()).unwrap();
        let mut cast = plain.clone();
        cast.set_autocast(model::Autocast::Bf16).unwrap();
        let logits = |m: &Llama<Cpu>| -> Vec<f32> {
            m.forward(tokens_tensor::<Cpu>(&rows, &Default::default()), None)
                .into_data()
                .into_vec()
                .unwrap()
        };
        let (x, y) = (logits(&cast), logits(&plain));
        let max = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = x.iter().zip(&y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        match unit {
            None => assert!(x == y, "config {c}: forward autocast without a unit must be f32"),
            Some(_) => assert!(
                diff > 0.0 && diff <= 2e-2 * max,
                "config {c}: logits max {max}, diff {diff:e}"
            ),
        }
        eprintln!("config {c}: loss {la} vs f32 {lb}, worst gradient difference {worst:e} of the tensor's largest");
    }
}

/// A weight changed after its bf16 copy was packed is packed again: autocast losses after an
/// AdamW step and after zeroing a weight equal those of a fresh model with the same weights.
#[test]
fn bf16_packed_weights_follow_every_change_of_the_weights() {
    use codespot::train::adamw::{AdamW, AdamWConfig};
    type Ad = codespot::backend::CpuAd;
    let cfg = LlamaConfig::tiny(64);
    let rows = blocks();
    let w = model::llama::random_weights(&cfg, 9);
    let mut m = Llama::<Ad>::from_weights(&cfg, &w, &Default::default()).unwrap();
    m.set_autocast(model::Autocast::Bf16).unwrap();
    let fresh = |m: &Llama<Ad>| {
        let mut f = Llama::<Ad>::from_weights(&cfg, &m.to_weights(), &Default::default()).unwrap();
        f.set_autocast(model::Autocast::Bf16).unwrap();
        engine::batch_loss_grads(&f, &rows, 2, true).0
    };
    let cfg_opt = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamW::new(cfg_opt, &m);
    let mut losses = vec![];
    let unit = model::bf16::unit();
    for _ in 0..2 {
        let (loss, grads) = engine::batch_loss_grads(&m, &rows, 2, true);
        losses.push(loss);
        // The packed copies are kept across passes, and the same weights reuse them.
        let held = m.packs.bytes();
        assert_eq!(held > 0, unit.is_some(), "packed copies held: {held}");
        engine::batch_loss_grads(&m, &rows, 2, true);
        assert_eq!(m.packs.bytes(), held, "a second pass packs nothing new");
        m = opt.step(m, grads, 1e-2, 1.0);
        assert_eq!(m.packs.bytes(), 0, "an optimizer step drops the packed copies");
        assert_eq!(
            engine::batch_loss_grads(&m, &rows, 2, true).0,
            fresh(&m),
            "after an AdamW step"
        );
    }
    assert!(losses[1] < losses[0], "the steps lowered the loss: {losses:?}");
    // Zero one projection in place of the model's own tensor.
    m.layers[0].q = m.layers[0].q.clone().map(|t| t.zeros_like());
    assert_eq!(
        engine::batch_loss_grads(&m, &rows, 2, true).0,
        fresh(&m),
        "after zeroing q_proj"
    );
}

#[test]
#[allow(clippy::needless_range_loop)]
fn taylor_and_taylor_sum_differ_as_they_should_over_two_batches() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 4);
    let dev = Default::default();
    let m = Llama::<F64Ad>::from_weights(&cfg, &w, &dev).unwrap();
    let b = blocks();
    let taylor = importance::score(&m, &b, 2, 2, Method::Taylor, |_| {}).unwrap();
    let tsum = importance::score(&m, &b, 2, 2, Method::TaylorSum, |_| {}).unwrap();
    // Per-batch scores, for reference.
    let one = importance::score(&m, &b[..2], 2, 2, Method::TaylorSum, |_| {}).unwrap();
    let two = importance::score(&m, &b[2..], 2, 2, Method::TaylorSum, |_| {}).unwrap();
    let mut strictly_less = 0;
    let mut total = 0;
    for (name, t) in &taylor.tensors {
        let theta = &w.tensors[name].data;
        for i in 0..t.data.len() {
            let (a, s) = (t.data[i] as f64, tsum.tensors[name].data[i] as f64);
            let (s1, s2) = (one.tensors[name].data[i] as f64, two.tensors[name].data[i] as f64);
            let tol = 1e-9 + 1e-6 * a;
            // Σ|θg| = |θg₁| + |θg₂|; |θΣg| ≤ Σ|θg| (triangle inequality).
            assert!((a - (s1 + s2)).abs() <= tol, "{name}[{i}]");
            assert!(s <= a + tol, "{name}[{i}]: |θΣg| {s} > Σ|θg| {a}");
            // |θ(g₁+g₂)| is either |θg₁|+|θg₂| (same sign) or ||θg₁|-|θg₂|| (opposite).
            let same = (s - (s1 + s2)).abs() <= tol;
            let opp = (s - (s1 - s2).abs()).abs() <= tol;
            assert!(same || opp, "{name}[{i}]: {s} vs {s1} ± {s2}");
            if theta[i] != 0.0 && s < a - tol {
                strictly_less += 1;
            }
            total += 1;
        }
    }
    // Gradient signs disagree between the batches for a real share of the elements.
    assert!(strictly_less > total / 20, "{strictly_less} of {total}");
}

#[test]
fn taylor2_adds_the_second_order_term() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 4);
    let dev = Default::default();
    let m = Llama::<F64Ad>::from_weights(&cfg, &w, &dev).unwrap();
    let b = blocks();
    let t2 = importance::score(&m, &b, 2, 2, Method::Taylor2, |_| {}).unwrap();
    let tsum = importance::score(&m, &b, 2, 2, Method::TaylorSum, |_| {}).unwrap();
    // With one batch, g² is known from the taylor-sum score of that batch: |θg|² / θ².
    let name = "model.layers.0.mlp.gate_proj.weight";
    let one = importance::score(&m, &b[..2], 2, 2, Method::TaylorSum, |_| {}).unwrap();
    let two = importance::score(&m, &b[2..], 2, 2, Method::TaylorSum, |_| {}).unwrap();
    for i in 0..w.tensors[name].numel() {
        let th = w.tensors[name].data[i] as f64;
        let first = tsum.tensors[name].data[i] as f64 / 2.0;
        let (a1, a2) = (one.tensors[name].data[i] as f64, two.tensors[name].data[i] as f64);
        // ½ θ² · (g₁² + g₂²)/2 = ¼ (|θg₁|² + |θg₂|²)
        let want = first + 0.25 * (a1 * a1 + a2 * a2);
        let got = t2.tensors[name].data[i] as f64;
        assert!(
            (got - want).abs() <= 1e-9 + 1e-6 * want,
            "[{i}] θ={th}: {got} vs {want}"
        );
    }
}

#[test]
fn scores_are_bit_identical_across_runs() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 12);
    let dev = Default::default();
    type Ad = codespot::backend::CpuAd;
    let run = || {
        let m = Llama::<Ad>::from_weights(&cfg, &w, &dev).unwrap();
        importance::score(&m, &blocks(), 2, 2, Method::Taylor, |_| {}).unwrap()
    };
    let (a, b) = (run(), run());
    for (k, t) in &a.tensors {
        let same = t
            .data
            .iter()
            .zip(&b.tensors[k].data)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{k} differs between runs");
    }
}

#[test]
fn micro_batches_give_the_batch_gradient() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 8);
    let dev = Default::default();
    let m = Llama::<F64Ad>::from_weights(&cfg, &w, &dev).unwrap();
    let whole = importance::score(&m, &blocks(), 4, 4, Method::Taylor, |_| {}).unwrap();
    let micro = importance::score(&m, &blocks(), 4, 1, Method::Taylor, |_| {}).unwrap();
    for (k, t) in &whole.tensors {
        for (a, b) in t.data.iter().zip(&micro.tensors[k].data) {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1e-6), "{k}: {a} vs {b}");
        }
    }
}

/// The loss the block-at-a-time backward reports (tuning logs it) is the model's mean loss.
#[test]
fn backward_reports_the_models_mean_loss() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 5);
    let dev = Default::default();
    for keep in [0, 2] {
        let mut m = Llama::<F64Ad>::from_weights(&cfg, &w, &dev).unwrap();
        m.keep_blocks = keep;
        let want: f64 = Llama::<F64>::from_weights(&cfg, &w, &dev)
            .unwrap()
            .loss(tokens_tensor::<F64>(&blocks(), &dev))
            .into_data()
            .convert::<f64>()
            .into_vec::<f64>()
            .unwrap()[0];
        for micro in [4, 1] {
            let (got, _) = engine::batch_loss_grads(&m, &blocks(), micro, true);
            assert!(
                (got - want).abs() <= 1e-9 * want,
                "keep {keep}, micro {micro}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn corpus_build_filters_dedupes_and_splits_stably() {
    let dir = tempfile::tempdir().unwrap();
    let corpora = common::tiny_corpora(dir.path(), 60);
    let (gg, _) = common::tiny_gguf(dir.path(), 1, true);
    let tok = model::load(gg.to_str().unwrap()).unwrap().tokenizer;
    let st = codespot::data::build(&corpora, "toy", 64.0, &tok, "tiny", false).unwrap();
    assert_eq!(st.train.files + st.calib.files + st.heldout.files, 60);
    assert_eq!(st.skipped.get("duplicate"), Some(&1));
    assert_eq!(st.skipped.get("too_small"), Some(&1));
    assert_eq!(st.skipped.get("generated"), Some(&1));
    assert!(st.train.files > st.calib.files && st.calib.files > 0 && st.heldout.files > 0);
    assert!(st.train.tokens > 0);
    // Splits are disjoint, and a file keeps its split when the corpus grows.
    let read = |s: codespot::data::Split| -> Vec<String> {
        codespot::data::read_split(&corpora.split_path("toy", s).unwrap())
            .unwrap()
            .map(|d| d.unwrap().sha256)
            .collect()
    };
    let before: Vec<Vec<String>> = codespot::data::Split::ALL.iter().map(|&s| read(s)).collect();
    let corpora2 = common::tiny_corpora(dir.path(), 90);
    codespot::data::build(&corpora2, "toy", 64.0, &tok, "tiny", false).unwrap();
    for (i, &s) in codespot::data::Split::ALL.iter().enumerate() {
        let after = read(s);
        for h in &before[i] {
            assert!(after.contains(h), "{h} left split {}", s.name());
        }
        for (j, other) in before.iter().enumerate() {
            if i != j {
                assert!(other.iter().all(|h| !after.contains(h)));
            }
        }
    }
    // --max-mb caps the corpus.
    let st = codespot::data::build(&corpora, "toy", 0.005, &tok, "tiny", false).unwrap();
    assert!(st.train.bytes + st.calib.bytes + st.heldout.bytes <= 6000, "{st:?}");
    assert!(st.skipped.get("over_max_mb").copied().unwrap_or(0) > 0);
}

#[test]
fn snapshot_from_corpus_covers_every_tensor_and_head_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let corpora = common::tiny_corpora(dir.path(), 60);
    let (gg, cfg) = common::tiny_gguf(dir.path(), 1, true);
    let mut ck = model::load(gg.to_str().unwrap()).unwrap();
    codespot::data::build(&corpora, "toy", 64.0, &ck.tokenizer, "tiny", false).unwrap();
    let dev = Default::default();
    let m = Llama::<codespot::backend::CpuAd>::from_weights(&ck.config, &ck.weights, &dev).unwrap();
    ck.weights = Default::default();
    let mut req = importance::run::ScoreRequest::new("toy");
    req.tokens = 64;
    req.seq_len = 16;
    req.batch = 2;
    let out = dir.path().join("snap");
    let man = importance::run::score_snapshot(&m, &ck, &corpora, &req, &out, false).unwrap();
    assert_eq!(man.tokens, 64);
    let snap = importance::snapshot::read(&out).unwrap();
    assert_eq!(snap.manifest, man);
    assert_eq!(snap.scores.tensors.len(), cfg.tensor_shapes().len());
    let s = &snap.summaries;
    assert_eq!(s.layer_module_mass.len(), cfg.num_hidden_layers);
    assert!(s.layer_module_mass.values().all(|r| r.len() == 9));
    assert_eq!(s.head_mass.len(), cfg.num_hidden_layers);
    assert!(s
        .head_mass
        .iter()
        .all(|r| r.len() == cfg.num_attention_heads && r.iter().all(|&x| x > 0.0)));
    // q/k/v/o heads: 4 + 2 + 2 + 4 per layer.
    assert_eq!(s.heads.len(), cfg.num_hidden_layers * 12);
    assert_eq!(s.neuron_mass[0].len(), cfg.intermediate_size);
    let share: f64 = s.layer_share.iter().sum::<f64>()
        + s.tensors
            .iter()
            .filter(|t| t.layer.is_none())
            .map(|t| t.sum)
            .sum::<f64>()
            / s.total_mass;
    assert!((share - 1.0).abs() < 1e-9);
    let top1: usize =
        s.top1_counts.values().flat_map(|r| r.values()).sum::<usize>() + s.top1_global_counts.values().sum::<usize>();
    let n = cfg.num_params();
    assert!(top1 >= n / 100 && top1 <= n / 100 + 2, "{top1} of {n}");
    // The same request again is bit-identical; an existing directory needs force.
    let e = importance::run::score_snapshot(&m, &ck, &corpora, &req, &out, false).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let out2 = dir.path().join("snap2");
    importance::run::score_snapshot(&m, &ck, &corpora, &req, &out2, false).unwrap();
    assert_eq!(
        std::fs::read(out.join("scores.safetensors")).unwrap(),
        std::fs::read(out2.join("scores.safetensors")).unwrap()
    );
    // Asking for more tokens than the split holds is a clear error, and leaves nothing behind.
    req.tokens = 1_000_000;
    let out3 = dir.path().join("snap3");
    let e = importance::run::score_snapshot(&m, &ck, &corpora, &req, &out3, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("corpus 'toy' calib split") && e.contains("fewer than the"),
        "{e}"
    );
    assert!(!out3.exists());
}

#[test]
fn halves_merge_exactly_into_the_whole() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 8);
    let dev = Default::default();
    let m = Llama::<F64Ad>::from_weights(&cfg, &w, &dev).unwrap();
    for &method in <Method as clap::ValueEnum>::value_variants() {
        let whole = importance::score(&m, &blocks(), 1, 1, method, |_| {}).unwrap();
        let (full, a, b) = importance::score_halves(&m, &blocks(), 1, 1, method, |_| {}).unwrap();
        let first = importance::score(&m, &blocks()[..2], 1, 1, method, |_| {}).unwrap();
        for (k, t) in &whole.tensors {
            for i in 0..t.numel() {
                let (x, y) = (t.data[i], full.tensors[k].data[i]);
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1e-9),
                    "{method:?} {k}[{i}]: {x} vs {y}"
                );
            }
            assert_eq!(
                first.tensors[k].data, a.tensors[k].data,
                "{method:?} {k}: half a is the first two batches"
            );
        }
        assert_ne!(a.tensors["model.norm.weight"].data, b.tensors["model.norm.weight"].data);
    }
}

fn raw(method: Method, batches: usize, tensors: &[(&str, Vec<f32>)]) -> importance::RawSums {
    let mut w = Weights::default();
    for (n, v) in tensors {
        w.insert(
            n.to_string(),
            codespot::source::HostTensor::new(vec![v.len()], v.clone()),
        );
    }
    importance::RawSums {
        method,
        batches,
        sum: w,
        sq: None,
    }
}

/// Split-half agreement on constructed sums: two identical halves agree exactly (floor 1.0,
/// convergence 1.0); halves whose top elements are disjoint agree not at all; non-layer tensors
/// are left out, as from the spot.
#[test]
fn agreement_of_identical_and_disjoint_halves() {
    use importance::agreement::measure;
    let v: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32).collect();
    let names = [
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ];
    let half = raw(Method::Taylor, 2, &[(names[0], v.clone()), (names[1], v.clone())]);
    let twice: Vec<f32> = v.iter().map(|x| 2.0 * x).collect();
    let total = raw(Method::Taylor, 4, &[(names[0], twice.clone()), (names[1], twice)]);
    let a = measure(&half, &half, &total, 2, 32, None);
    assert!(a.split_half.iter().all(|&j| j == 1.0), "{a:?}");
    assert!(a.convergence.iter().all(|&j| j == 1.0), "{a:?}");
    assert!(a.split_half_layer.iter().flatten().all(|&j| j == 1.0));
    assert_eq!(a.floor(1.0), Some(1.0));
    // The second half ranks every element in reverse: its top 5 % are the first half's bottom.
    let rev: Vec<f32> = v.iter().map(|x| 999.0 - x).collect();
    let b = raw(Method::Taylor, 2, &[(names[0], rev.clone()), (names[1], rev)]);
    let sum: Vec<f32> = v.iter().map(|x| x + (999.0 - x) + x * 1e-3).collect();
    let total = raw(Method::Taylor, 4, &[(names[0], sum.clone()), (names[1], sum)]);
    let d = measure(&half, &b, &total, 2, 32, None);
    assert!(d.split_half.iter().all(|&j| j == 0.0), "{d:?}");
    // Embeddings are not layer parameters: a tensor only there changes nothing.
    let mut e = half.clone();
    e.sum.insert(
        "model.embed_tokens.weight",
        codespot::source::HostTensor::new(vec![4], vec![1.0, 2.0, 3.0, 4.0]),
    );
    assert_eq!(
        measure(&e, &e, &total, 2, 32, None).split_half,
        d.split_half.iter().map(|_| 1.0).collect::<Vec<_>>()
    );
}

/// A real scoring pass records its agreement (halves of its batches), `--no-agreement` leaves
/// it out, and `compare` of a snapshot with itself prints its floor beside each Jaccard and
/// says the (perfect) agreement is within it.
#[test]
fn snapshots_carry_their_noise_floor_and_compare_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let corpora = common::tiny_corpora(dir.path(), 60);
    let (gg, _) = common::tiny_gguf(dir.path(), 1, true);
    let mut ck = model::load(gg.to_str().unwrap()).unwrap();
    codespot::data::build(&corpora, "toy", 64.0, &ck.tokenizer, "tiny", false).unwrap();
    let m = Llama::<codespot::backend::CpuAd>::from_weights(&ck.config, &ck.weights, &Default::default()).unwrap();
    ck.weights = Default::default();
    let mut req = importance::run::ScoreRequest::new("toy");
    req.tokens = 128;
    req.seq_len = 16;
    req.batch = 2;
    let out = dir.path().join("snap");
    let man = importance::run::score_snapshot(&m, &ck, &corpora, &req, &out, false).unwrap();
    let a = man.agreement.clone().expect("agreement recorded");
    assert_eq!(a.half_tokens, 64);
    assert!(a
        .split_half
        .iter()
        .chain(&a.convergence)
        .all(|j| (0.0..=1.0).contains(j)));
    assert!(a.split_half[0] < 1.0, "random halves of a random model differ: {a:?}");
    // Two disjoint quarters (the first batch of each half), checked against scoring those
    // batches on their own.
    assert_eq!(a.quarter_tokens, 32);
    let eos = ck.tokenizer.stop_ids(&ck.config.eos_token_ids).first().copied();
    let blocks = importance::run::corpus_blocks(&corpora, &req, &ck.tokenizer, eos).unwrap();
    let q = |r: std::ops::Range<usize>| importance::score(&m, &blocks[r], 2, 4, Method::Taylor, |_| {}).unwrap();
    let (q1, q3) = (q(0..2), q(4..6));
    assert_eq!(a.split_quarter.len(), a.ks.len());
    for (k, j) in a.ks.iter().zip(&a.split_quarter) {
        let want = codespot::topk::jaccard(&codespot::topk::top_masks(&q1, *k), &codespot::topk::top_masks(&q3, *k));
        assert!((j - want).abs() <= 1e-6, "k {k}: quarters {j} vs {want}");
    }
    req.agreement = false;
    let none = importance::run::score_snapshot(&m, &ck, &corpora, &req, &dir.path().join("plain"), false).unwrap();
    assert!(none.agreement.is_none());
    // The full scores do not depend on whether the halves were kept apart (same sums, up to
    // the f32 order of adding them).
    let (x, y) = (
        importance::snapshot::read(&out).unwrap(),
        importance::snapshot::read(&dir.path().join("plain")).unwrap(),
    );
    for (n, t) in &x.scores.tensors {
        let u = &y.scores.tensors[n];
        let scale = u.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        assert!(
            t.data.iter().zip(&u.data).all(|(p, q)| (p - q).abs() <= 1e-5 * scale),
            "{n}"
        );
    }

    let c = codespot::track::compare::compare(&out, &out, &[1.0, 5.0]).unwrap();
    assert!(c.jaccard.iter().all(|(_, j)| *j == 1.0));
    for f in &c.floor {
        assert_eq!(f.floor, a.floor(f.k), "{f:?}");
        assert_eq!(f.within, Some(true));
    }
    assert_eq!(c.floor_layer.len(), 2);
    let text = codespot::track::compare::text(&c);
    assert!(
        text.contains("noise floor (A / B)") && text.contains("at or above the floor (no test"),
        "{text}"
    );
    // Against a snapshot without a floor: no floor, said so.
    let c = codespot::track::compare::compare(&out, &dir.path().join("plain"), &[1.0]).unwrap();
    assert_eq!(c.floor[0].floor, None);
    assert!(codespot::track::compare::text(&c).contains("no floor recorded"));

    // A spot carries the lowest floor of the snapshots it was selected from, so comparing two
    // spots shows it too; one selected with a snapshot that recorded none carries none.
    let select = |snaps: Vec<std::path::PathBuf>, name: &str| {
        let sel = codespot::spot::SelectRequest {
            snapshots: snaps,
            aggregation: codespot::spot::Aggregation::Sum,
            scope: codespot::spot::Scope::PerTensor,
            eligible: codespot::spot::Eligible::Layers,
            ks: vec![1.0, 5.0],
            controls: vec![],
            seed: 1,
            model: None,
            text: None,
            held_out: vec![],
            criteria: vec![],
        };
        let (sets, man) = codespot::spot::select(&sel).unwrap();
        let d = dir.path().join(name);
        codespot::spot::file::write(&d, &sets, &man, false).unwrap();
        (d, man)
    };
    let (sa, ma) = select(vec![out.clone()], "spot-a");
    assert_eq!(ma.floor.as_ref(), Some(&a));
    let (sb, mb) = select(vec![out.clone(), dir.path().join("plain")], "spot-b");
    assert!(mb.floor.is_none());
    let c = codespot::track::compare::compare(&sa, &sa, &[1.0, 5.0]).unwrap();
    for f in &c.floor {
        assert_eq!(f.floor, a.floor(f.k), "{f:?}");
        assert_eq!(f.within, Some(true));
    }
    assert_eq!(c.floor_layer[0], a.floor_layer(1.0, 0));
    let c = codespot::track::compare::compare(&sa, &sb, &[1.0]).unwrap();
    assert_eq!((c.floor[0].a, c.floor[0].b), (a.floor(1.0), None));
    // The lowest of two agreements, element by element.
    let mut lower = a.clone();
    lower.split_half[1] = 0.0;
    lower.split_half_layer[1][1] = 0.0;
    let low = codespot::importance::agreement::Agreement::lowest(&[Some(&a), Some(&lower)]).unwrap();
    assert_eq!(low, lower);
    assert_eq!(
        codespot::importance::agreement::Agreement::lowest(&[Some(&a), None]),
        None
    );
}

/// `[chunk]` cuts collections of short texts (fortune files) into documents: pieces between
/// separator lines are packed into documents of at least `bytes`, a short tail joins the
/// document before it, separators vanish, and a manifest with it builds a corpus of such
/// documents.
#[test]
fn chunked_manifests_pack_short_texts_into_documents() {
    let c = codespot::data::Chunk {
        separator: "%".into(),
        bytes: 100,
        split_by_file: false,
    };
    let piece = |i: usize| format!("Quote number {i}: {}", "words ".repeat(6));
    let text: String = (0..10).map(|i| format!("{}\n%\n", piece(i))).collect();
    let docs = c.split("f", text.as_bytes());
    assert!(docs.len() >= 3, "{}", docs.len());
    for (i, (p, d)) in docs.iter().enumerate() {
        assert_eq!(p, &format!("f#{i}"));
        let d = String::from_utf8(d.clone()).unwrap();
        assert!(d.len() >= 50, "{d}");
        assert!(!d.lines().any(|l| l == "%"), "{d}");
    }
    let all: String = docs
        .iter()
        .map(|(_, d)| String::from_utf8_lossy(d).into_owned())
        .collect();
    for i in 0..10 {
        assert!(all.contains(&piece(i).trim_end().to_string()), "piece {i} lost");
    }

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("quotes");
    std::fs::create_dir_all(&src).unwrap();
    for f in 0..3 {
        let body: String = (0..200)
            .map(|i| format!("Saying {f}.{i}: {}\n%\n", "a b c ".repeat(8)))
            .collect();
        std::fs::write(src.join(format!("q{f}")), body).unwrap();
    }
    let cdir = dir.path().join("corpora");
    std::fs::create_dir_all(&cdir).unwrap();
    std::fs::write(
        cdir.join("prose.toml"),
        format!(
            "language = \"prose\"\n[[sources]]\nkind = \"dir\"\nroots = [\"{}\"]\ninclude = [\"*\"]\n\n[chunk]\nseparator = \"%\"\nbytes = 1024\n",
            src.display()
        ),
    )
    .unwrap();
    let corpora = codespot::data::Corpora { dir: cdir };
    let (gg, _) = common::tiny_gguf(dir.path(), 1, true);
    let tok = model::load(gg.to_str().unwrap()).unwrap().tokenizer;
    let st = codespot::data::build(&corpora, "prose", 64.0, &tok, "tiny", false).unwrap();
    let files = st.train.files + st.calib.files + st.heldout.files;
    assert!(files > 30, "3 files become many documents: {st:?}");
    let held = codespot::data::read_split(&corpora.split_path("prose", codespot::data::Split::Heldout).unwrap())
        .unwrap()
        .collect::<anyhow::Result<Vec<_>>>()
        .unwrap();
    assert!(held.iter().all(|d| d.path.contains('#')));
}

/// Molchanov's criterion is Σ_b (θ g_b)²: each batch's |θ g_b| (a one-batch taylor-sum score)
/// squared and added.
#[test]
fn molchanov_sums_the_squared_taylor_terms_of_each_batch() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 5);
    let dev = Default::default();
    let m = Llama::<F64Ad>::from_weights(&cfg, &w, &dev).unwrap();
    let b = blocks();
    let mol = importance::score(&m, &b, 2, 2, Method::Molchanov, |_| {}).unwrap();
    let one = importance::score(&m, &b[..2], 2, 2, Method::TaylorSum, |_| {}).unwrap();
    let two = importance::score(&m, &b[2..], 2, 2, Method::TaylorSum, |_| {}).unwrap();
    let mut nonzero = 0;
    for (name, t) in &mol.tensors {
        for i in 0..t.numel() {
            let (a1, a2) = (one.tensors[name].data[i] as f64, two.tensors[name].data[i] as f64);
            let want = a1 * a1 + a2 * a2;
            let got = t.data[i] as f64;
            assert!((got - want).abs() <= 1e-9 + 1e-6 * want, "{name}[{i}]: {got} vs {want}");
            nonzero += usize::from(got > 0.0);
        }
    }
    assert!(nonzero > 1000, "{nonzero}");
}

/// Wanda's |W_ij|·‖X_j‖₂ against a forward pass written out by hand on the host: one input
/// token per row, so attention over a single position passes each value head through, and
/// layer 0's every input (normed stream, q/k/v/o/gate/up/down inputs) is a few loops.
#[test]
#[allow(clippy::needless_range_loop)]
fn wanda_weighs_each_weight_by_its_input_channels_norm() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 6);
    let dev = Default::default();
    let m = Llama::<F64Ad>::from_weights(&cfg, &w, &dev).unwrap();
    // Rows of two tokens: one input token each (the last token is only a target).
    let rows: Vec<Vec<u32>> = vec![vec![3, 9], vec![17, 1], vec![3, 2], vec![60, 5]];
    let s = importance::score(&m, &rows, 2, 1, Method::Wanda, |_| {}).unwrap();
    let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let t = |n: &str| -> Vec<f64> { w.tensors[n].data.iter().map(|&x| x as f64).collect() };
    let matvec = |wm: &[f64], x: &[f64], out: usize| -> Vec<f64> {
        (0..out)
            .map(|r| (0..x.len()).map(|c| wm[r * x.len() + c] * x[c]).sum())
            .collect()
    };
    let normed = |x: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        x.iter().map(|v| v / (ms + cfg.rms_norm_eps).sqrt()).collect()
    };
    let l0 = |n: &str| t(&format!("model.layers.0.{n}"));
    let (emb, an, mn) = (
        t("model.embed_tokens.weight"),
        l0("input_layernorm.weight"),
        l0("post_attention_layernorm.weight"),
    );
    let (wv, wo, wg, wu) = (
        l0("self_attn.v_proj.weight"),
        l0("self_attn.o_proj.weight"),
        l0("mlp.gate_proj.weight"),
        l0("mlp.up_proj.weight"),
    );
    // Σ over rows of each input's squares, per channel.
    let mut sums: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut add = |k: &'static str, x: &[f64]| {
        let e = sums.entry(k).or_insert_with(|| vec![0.0; x.len()]);
        e.iter_mut().zip(x).for_each(|(a, v)| *a += v * v);
    };
    for r in &rows {
        let x: Vec<f64> = emb[r[0] as usize * d..][..d].to_vec();
        let xn = normed(&x);
        let h: Vec<f64> = xn.iter().zip(&an).map(|(a, b)| a * b).collect();
        let v = matvec(&wv, &h, nkv * hd);
        let a: Vec<f64> = (0..nh * hd).map(|i| v[(i / hd) / (nh / nkv) * hd + i % hd]).collect();
        let o = matvec(&wo, &a, d);
        let x1: Vec<f64> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
        let x1n = normed(&x1);
        let h2: Vec<f64> = x1n.iter().zip(&mn).map(|(a, b)| a * b).collect();
        let g: Vec<f64> = matvec(&wg, &h2, ff)
            .iter()
            .zip(matvec(&wu, &h2, ff))
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        add("attn_norm", &xn);
        add("h", &h);
        add("a", &a);
        add("mlp_norm", &x1n);
        add("h2", &h2);
        add("g", &g);
    }
    let check = |name: &str, input: &str| {
        let theta = t(name);
        let x = &sums[input];
        let got = &s.tensors[name].data;
        for i in 0..theta.len() {
            let want = theta[i].abs() * x[i % x.len()].sqrt();
            let g = got[i] as f64;
            assert!((g - want).abs() <= 1e-9 + 1e-6 * want, "{name}[{i}]: {g} vs {want}");
        }
    };
    check("model.layers.0.input_layernorm.weight", "attn_norm");
    for p in ["q_proj", "k_proj", "v_proj"] {
        check(&format!("model.layers.0.self_attn.{p}.weight"), "h");
    }
    check("model.layers.0.self_attn.o_proj.weight", "a");
    check("model.layers.0.post_attention_layernorm.weight", "mlp_norm");
    check("model.layers.0.mlp.gate_proj.weight", "h2");
    check("model.layers.0.mlp.up_proj.weight", "h2");
    check("model.layers.0.mlp.down_proj.weight", "g");
    // The embedding: a row's weight times √(its token's count); rows never seen score 0.
    let e = &s.tensors["model.embed_tokens.weight"].data;
    for tok in 0..cfg.vocab_size {
        let count = rows.iter().filter(|r| r[0] as usize == tok).count() as f64;
        for j in 0..d {
            let want = emb[tok * d + j].abs() * count.sqrt();
            assert!(
                (e[tok * d + j] as f64 - want).abs() <= 1e-9 + 1e-6 * want,
                "embed[{tok},{j}]"
            );
        }
    }
    // Every tensor is scored with its parameter's shape, and no score is negative.
    for (name, shape) in cfg.tensor_shapes() {
        assert_eq!(s.tensors[&name].shape, shape, "{name}");
        assert!(s.tensors[&name].data.iter().all(|&x| x >= 0.0), "{name}");
    }
}

/// Group Taylor importance: per batch, a head's θ · g summed over its q rows and o columns (a
/// neuron's over its gate and up rows and down column), squared, summed over batches; checked
/// against the batches' own gradients.
#[test]
fn group_scores_square_each_batchs_summed_taylor_terms() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 11);
    let dev = Default::default();
    let m = Llama::<F64Ad>::from_weights(&cfg, &w, &dev).unwrap();
    let b = blocks();
    let (scores, g) = importance::score_groups(&m, &b, 2, 1, Method::Taylor).unwrap();
    assert_eq!(g.batches, 2);
    // The element scores are the plain taylor ones.
    let plain = importance::score(&m, &b, 2, 1, Method::Taylor, |_| {}).unwrap();
    assert_eq!(
        scores.tensors["model.norm.weight"].data,
        plain.tensors["model.norm.weight"].data
    );
    let (hd, d, ff) = (cfg.head_dim, cfg.hidden_size, cfg.intermediate_size);
    let q_cols = cfg.num_attention_heads * hd;
    let mut heads = vec![vec![0.0f64; cfg.num_attention_heads]; cfg.num_hidden_layers];
    let mut neurons = vec![vec![0.0f64; ff]; cfg.num_hidden_layers];
    for batch in b.chunks(2) {
        let grads = engine::batch_grads(&m, batch, 1);
        let tg: std::collections::BTreeMap<String, Vec<f64>> = m
            .params()
            .iter()
            .zip(&grads)
            .map(|((n, p), g)| {
                let th: Vec<f64> = p.host_values().iter().map(|&x| x as f64).collect();
                let g: Vec<f64> = g.clone().unwrap().into_data().convert::<f64>().into_vec().unwrap();
                (n.clone(), th.iter().zip(g).map(|(a, b)| a * b).collect())
            })
            .collect();
        for l in 0..cfg.num_hidden_layers {
            let t = |s: &str| &tg[&format!("model.layers.{l}.{s}.weight")];
            let (q, o) = (t("self_attn.q_proj"), t("self_attn.o_proj"));
            for (h, acc) in heads[l].iter_mut().enumerate() {
                let mut s = 0.0;
                for r in h * hd..(h + 1) * hd {
                    s += q[r * d..(r + 1) * d].iter().sum::<f64>();
                    s += (0..d).map(|row| o[row * q_cols + r]).sum::<f64>();
                }
                *acc += s * s;
            }
            let (ga, up, down) = (t("mlp.gate_proj"), t("mlp.up_proj"), t("mlp.down_proj"));
            for (j, acc) in neurons[l].iter_mut().enumerate() {
                let s = ga[j * d..(j + 1) * d].iter().sum::<f64>()
                    + up[j * d..(j + 1) * d].iter().sum::<f64>()
                    + (0..d).map(|row| down[row * ff + j]).sum::<f64>();
                *acc += s * s;
            }
        }
    }
    for (want, got) in [(&heads, &g.heads), (&neurons, &g.neurons)] {
        for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
            assert!((a - b).abs() <= 1e-9 + 1e-5 * a.abs(), "{a} vs {b}");
        }
    }
    assert!(g.heads.iter().flatten().all(|&x| x > 0.0));
}

/// Instruction pairs come from the train split only: every pair names a train file, no
/// calibration or held-out file's function appears, a function repeated in two train files is
/// one pair, and stats.json counts them.
#[test]
fn corpus_build_takes_instruction_pairs_from_the_train_split_only() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("rs");
    std::fs::create_dir_all(&src).unwrap();
    let func = |i: usize, name: &str| {
        format!(
            "/// Scale every value of `xs` by the factor {i}\n/// and return their sum.\npub fn {name}(xs: &[i64]) -> i64 {{\n    let mut t = 0;\n    for x in xs {{\n        t += x * {i};\n    }}\n    t\n}}\n\n"
        )
    };
    for i in 0..40 {
        // Each file: one documented function of its own, padding code, and (files 0 and 1) the
        // same shared function.
        let mut body = func(i, &format!("scaled_sum_{i}"));
        body += &format!("fn pad_{i}() -> u32 {{\n    {i}\n}}\n");
        if i < 2 {
            body += &func(99, "shared");
        }
        std::fs::write(src.join(format!("m{i}.rs")), body).unwrap();
    }
    let cdir = dir.path().join("corpora");
    std::fs::create_dir_all(&cdir).unwrap();
    std::fs::write(
        cdir.join("rust.toml"),
        format!(
            "language = \"rust\"\n[[sources]]\nkind = \"dir\"\nroots = [\"{}\"]\ninclude = [\"**/*.rs\"]\n",
            src.display()
        ),
    )
    .unwrap();
    let corpora = codespot::data::Corpora { dir: cdir };
    let (gg, _) = common::tiny_gguf(dir.path(), 1, true);
    let tok = model::load(gg.to_str().unwrap()).unwrap().tokenizer;
    let st = codespot::data::build(&corpora, "rust", 64.0, &tok, "tiny", false).unwrap();
    let paths = |s: codespot::data::Split| -> Vec<String> {
        codespot::data::read_split(&corpora.split_path("rust", s).unwrap())
            .unwrap()
            .map(|d| {
                let p = d.unwrap().path;
                std::path::Path::new(&p)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    };
    let (train, others) = (
        paths(codespot::data::Split::Train),
        [
            paths(codespot::data::Split::Calib),
            paths(codespot::data::Split::Heldout),
        ]
        .concat(),
    );
    assert!(!others.is_empty() && train.len() > others.len());
    let pairs = codespot::data::read_pairs(&corpora, "rust", codespot::data::Split::Train).unwrap();
    for p in &pairs {
        let file = std::path::Path::new(&p.path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(train.contains(&file), "{} is not a train file", p.path);
        assert!(p.instruction.starts_with("Scale every value of `xs`") && p.response.starts_with("pub fn "));
    }
    // One pair per train file's own function, the shared one once (if a train file holds it).
    let own: Vec<String> = train
        .iter()
        .map(|p| p.trim_start_matches("m").trim_end_matches(".rs").to_string())
        .map(|i| format!("scaled_sum_{i}"))
        .collect();
    let names: Vec<&str> = pairs.iter().map(|p| p.name.as_str()).collect();
    for n in &own {
        assert!(names.contains(&n.as_str()), "{n} missing");
    }
    for o in &others {
        let i = o.trim_start_matches("m").trim_end_matches(".rs");
        assert!(
            !names.contains(&format!("scaled_sum_{i}").as_str()),
            "{o}: a non-train file's function"
        );
    }
    let shared = names.iter().filter(|n| **n == "shared").count();
    let train_with_shared = train.iter().filter(|p| *p == "m0.rs" || *p == "m1.rs").count();
    assert_eq!(shared, train_with_shared.min(1));
    let ps = st.pairs.unwrap();
    assert_eq!(ps.pairs, pairs.len());
    assert_eq!(
        ps.skipped.get("duplicate").copied().unwrap_or(0),
        train_with_shared.saturating_sub(1)
    );
    // The undocumented padding functions are not pairs; tokens are counted.
    assert!(!names.iter().any(|n| n.starts_with("pad_")));
    assert!(ps.instruction_tokens > 0 && ps.response_tokens > ps.pairs * 10);
}
