//! f32 numerics of the Taylor pass on the real default model against codespot's own f64
//! reference (burn's NdArray<f64> autodiff on the same weights and tokens): per tensor, the
//! largest difference of |θ·g| relative to that tensor's largest score.

mod common;

use burn::backend::{Autodiff, NdArray};
use codespot::engine;
use codespot::model::{self, Llama};

type F64Ad = Autodiff<NdArray<f64>>;

/// Two rows of 257 tokens of Python (this repository's own reference script).
fn rows(ck: &model::Checkpoint) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/reference_logits.py")).unwrap();
    let ids = ck.tokenizer.encode(&text, false).unwrap();
    assert!(ids.len() >= 514, "{} tokens", ids.len());
    vec![ids[..257].to_vec(), ids[257..514].to_vec()]
}

fn scores<B: burn::tensor::backend::AutodiffBackend>(m: &Llama<B>, rows: &[Vec<u32>]) -> Vec<(String, Vec<f64>)> {
    let grads = engine::batch_grads(m, rows, 2);
    m.params()
        .iter()
        .zip(grads)
        .map(|((name, p), g)| {
            let th: Vec<f64> = p.flat().into_data().convert::<f64>().into_vec().unwrap();
            let g: Vec<f64> = g.unwrap().into_data().convert::<f64>().into_vec().unwrap();
            (name.clone(), th.iter().zip(&g).map(|(a, b)| (a * b).abs()).collect())
        })
        .collect()
}

/// Per tensor: max |a − b| / max |b|, worst first.
fn errors(a: &[(String, Vec<f64>)], b: &[(String, Vec<f64>)]) -> Vec<(f64, String)> {
    let mut v: Vec<(f64, String)> = a
        .iter()
        .zip(b)
        .map(|((n, x), (_, y))| {
            let max = y.iter().fold(0f64, |m, v| m.max(*v));
            let d = x.iter().zip(y).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
            (d / max.max(f64::MIN_POSITIVE), n.clone())
        })
        .collect();
    v.sort_by(|p, q| q.0.total_cmp(&p.0));
    v
}

/// burn's f32 autodiff gives the f64 reference's Taylor scores on the real model to ≤ 1e-4 of
/// each tensor's largest score (measured 3.5e-5). The hand-written f32 path was at 1.5e-3 (its
/// softmax sums in f32 lanes dropped the tiny terms); with f64 sums it measures 1.2e-4 on one
/// tensor (`model.layers.29.post_attention_layernorm.weight`) and ≤ 5.6e-5 on every other, so
/// its bound here is 1.5e-4 until that last one is found.
#[test]
fn taylor_scores_in_f32_match_the_f64_reference_on_the_default_model() {
    let ck = model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let rows = rows(&ck);
    let f64s = {
        let m = Llama::<F64Ad>::from_weights(&ck.config, &ck.weights, &Default::default()).unwrap();
        scores(&m, &rows)
    };
    let mut fused =
        Llama::<codespot::backend::CpuAd>::from_weights(&ck.config, &ck.weights, &Default::default()).unwrap();
    assert!(fused.uses_fused());
    let e_fused = errors(&scores(&fused, &rows), &f64s);
    fused.fused = false;
    let e_burn = errors(&scores(&fused, &rows), &f64s);
    eprintln!("hand-written f32, worst 5: {:?}", &e_fused[..5]);
    eprintln!("burn f32, worst 5: {:?}", &e_burn[..5]);
    assert!(e_burn[0].0 <= 1e-4, "burn f32: {:?}", &e_burn[..3]);
    assert!(e_fused[0].0 <= 1.5e-4, "hand-written f32: {:?}", &e_fused[..3]);
    assert!(e_fused[1].0 <= 1e-4, "hand-written f32: {:?}", &e_fused[..3]);
}

/// Issue #25's guard for bf16 autocast (matrix products in bf16 on AMX tiles or AVX512-BF16,
/// f32 sums) against the hand-written f32 path, on the same tokens of the real default model:
/// the per-tensor top-1 % sets agree (pooled Jaccard ≥ 0.95) and the scores' ranks too. The
/// issue asks Spearman ≥ 0.999 on the calibration tokens; on the recipe's 16384 Python tokens
/// `codespot compare` measures 0.99997 (Jaccard 0.985). Here, on 512 tokens, the small scores'
/// bf16 noise has fewer tokens to average over: measured 0.9987 (Jaccard 0.973), so the bound
/// is 0.998. On a CPU with neither unit autocast is f32, bit for bit.
#[test]
fn bf16_autocast_taylor_scores_agree_with_f32_on_the_default_model() {
    let ck = model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let rows = rows(&ck);
    let mut m = Llama::<codespot::backend::CpuAd>::from_weights(&ck.config, &ck.weights, &Default::default()).unwrap();
    let f32s = scores(&m, &rows);
    m.set_autocast(model::Autocast::Bf16).unwrap();
    let bf16s = scores(&m, &rows);
    let Some(unit) = model::bf16::unit() else {
        assert!(bf16s == f32s, "without a bf16 unit autocast must be f32");
        return;
    };
    // Pooled Jaccard of each tensor's top 1 %.
    let (mut inter, mut union) = (0usize, 0usize);
    for ((name, a), (_, b)) in f32s.iter().zip(&bf16s) {
        let k = (a.len() / 100).max(1);
        let top = |v: &[f64]| {
            let mut idx: Vec<usize> = (0..v.len()).collect();
            idx.select_nth_unstable_by(k - 1, |&i, &j| v[j].total_cmp(&v[i]));
            idx.truncate(k);
            idx.sort_unstable();
            idx
        };
        let (ta, tb) = (top(a), top(b));
        let common = ta.iter().filter(|i| tb.binary_search(i).is_ok()).count();
        assert!(common > 0 || k < 10, "{name}: no common top-1 % element");
        inter += common;
        union += 2 * k - common;
    }
    let jaccard = inter as f64 / union as f64;
    // Spearman on every 97th element of the concatenated scores.
    let sample =
        |s: &[(String, Vec<f64>)]| -> Vec<f64> { s.iter().flat_map(|(_, v)| v.iter().copied()).step_by(97).collect() };
    let rank = |v: Vec<f64>| -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0f64; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for &x in &idx[i..=j] {
                r[x] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    };
    let (ra, rb) = (rank(sample(&f32s)), rank(sample(&bf16s)));
    let n = ra.len() as f64;
    let mean = (n - 1.0) / 2.0;
    let (mut sab, mut saa, mut sbb) = (0f64, 0f64, 0f64);
    for (x, y) in ra.iter().zip(&rb) {
        sab += (x - mean) * (y - mean);
        saa += (x - mean) * (x - mean);
        sbb += (y - mean) * (y - mean);
    }
    let spearman = sab / (saa * sbb).sqrt();
    eprintln!("bf16 autocast on {unit:?}: top-1 % Jaccard {jaccard:.4}, Spearman {spearman:.6}");
    assert!(
        bf16s != f32s,
        "autocast on {unit:?} gave f32's bits: the bf16 products did not run"
    );
    assert!(jaccard >= 0.95, "top-1 % Jaccard {jaccard}");
    assert!(spearman >= 0.998, "Spearman {spearman}");
}
