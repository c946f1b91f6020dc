//! CPU backend comparison at the default model's shapes: f32 matmul GFLOP/s at
//! [2048×576]·[576×1536], and a forward+backward step of SmolLM2-135M at batch 4 × 256 (plain
//! autodiff over the whole model, as in the backend choice; `codespot bench score` measures
//! the scoring path itself).
//!
//! `cargo bench --bench backends` measures burn-flex (the default CPU backend). With
//! `CARGO_TARGET_DIR=target/alt cargo bench --bench backends --features bench-ndarray,bench-candle`
//! and `BACKEND=ndarray|candle|flex` it measures the others (one per process, so peak RSS is
//! its own; a separate target dir keeps the main build; ndarray needs libopenblas-dev).

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use codespot::model::{self, tokens_tensor, Llama};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Tokens/s of a forward + backward step at batch 4 × 256 on autodiff backend `AB`.
fn step_tokens_per_s<AB: AutodiffBackend>(ck: &model::Checkpoint, dev: &AB::Device) -> f64 {
    let m = Llama::<AB>::from_weights(&ck.config, &ck.weights, dev).unwrap();
    let rows = model::llama::synthetic_tokens(ck.config.vocab_size, 4, 257);
    let run = || {
        let t = Instant::now();
        let loss = m.loss(tokens_tensor::<AB>(&rows, dev));
        drop(loss.backward());
        t.elapsed().as_secs_f64()
    };
    run();
    (4 * 256) as f64 / median((0..3).map(|_| run()).collect())
}

fn decode_tokens_per_s<B: Backend>(ck: &model::Checkpoint, dev: &B::Device) -> f64 {
    let m = Llama::<B>::from_weights(&ck.config, &ck.weights, dev).unwrap();
    let prompt = ck.tokenizer.encode("def fibonacci(n):", false).unwrap();
    let opts = model::generate::GenOptions {
        max_tokens: 32,
        ..Default::default()
    };
    let t = Instant::now();
    let out = model::generate::generate(&m, &ck.tokenizer, &prompt, &opts, |_| {}).unwrap();
    out.ids.len() as f64 / t.elapsed().as_secs_f64()
}

fn report<B: Backend>(name: &str, ck: &model::Checkpoint) {
    let dev = B::Device::default();
    let g = codespot::backend::sgemm_gflops::<B>(&dev);
    let s = step_tokens_per_s::<Autodiff<B>>(ck, &dev);
    let d = decode_tokens_per_s::<B>(ck, &dev);
    let rss = codespot::util::peak_rss_bytes().unwrap_or(0) as f64 / 1048576.0;
    println!("| {name:<28} | {g:>8.1} | {s:>10.1} | {d:>8.1} | {rss:>8.0} |");
}

fn main() {
    codespot::alloc::tune();
    let ck = model::load("default").expect("default model");
    // One backend per process (BACKEND=ndarray|flex|candle), so peak RSS is its own.
    let which = std::env::var("BACKEND").unwrap_or_else(|_| "flex".into());
    if std::env::var("HEADER").is_ok_and(|h| !h.is_empty()) {
        println!("| backend                      | sgemm GFLOP/s | fwd+bwd tok/s | decode tok/s | peak RSS MiB |");
        println!("|------------------------------|---------:|-----------:|---------:|---------:|");
    }
    match which.as_str() {
        "flex" => report::<burn::backend::Flex>("flex (rayon + simd)", &ck),
        #[cfg(feature = "bench-ndarray")]
        "ndarray" => report::<burn::backend::NdArray<f32>>("ndarray + openblas-system", &ck),
        #[cfg(feature = "bench-candle")]
        "candle" => report::<burn::backend::Candle<f32, i64>>("candle", &ck),
        other => eprintln!("BACKEND={other} is not compiled in"),
    }
}
