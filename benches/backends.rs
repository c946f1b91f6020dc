//! CPU backend comparison at the default model's shapes: f32 matmul GFLOP/s at
//! [2048×576]·[576×1536], and a forward+backward step of SmolLM2-135M at batch 4 × 256.
//!
//! `cargo bench --bench backends` measures ndarray + system OpenBLAS (the default);
//! `CARGO_TARGET_DIR=target/alt cargo bench --bench backends --features bench-flex,bench-candle`
//! adds burn-flex (rayon + simd) and burn-candle (a separate target dir keeps the main build).

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use codespot::model::{self, tokens_tensor, Llama};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn matmul_gflops<B: Backend>(dev: &B::Device) -> f64 {
    let (m, k, n) = (2048, 576, 1536);
    let a = Tensor::<B, 2>::random([m, k], Distribution::Default, dev);
    let b = Tensor::<B, 2>::random([k, n], Distribution::Default, dev);
    let _ = a.clone().matmul(b.clone()).into_data();
    let times: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            let _ = a.clone().matmul(b.clone()).into_data();
            t.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * (m * k * n) as f64 / median(times) / 1e9
}

fn step_tokens_per_s<B: Backend>(ck: &model::Checkpoint, dev: &B::Device) -> f64 {
    let m = Llama::<Autodiff<B>>::from_weights(&ck.config, &ck.weights, dev).unwrap();
    let v = ck.config.vocab_size as u32;
    let rows: Vec<Vec<u32>> = (0..4).map(|b| (0..257).map(|i| ((i * 7919 + b * 104729) as u32 + 17) % v).collect()).collect();
    let run = || {
        let t = Instant::now();
        let loss = m.loss(tokens_tensor::<Autodiff<B>>(&rows, dev));
        let grads = loss.backward();
        drop(grads);
        t.elapsed().as_secs_f64()
    };
    run();
    let times: Vec<f64> = (0..3).map(|_| run()).collect();
    (4 * 256) as f64 / median(times)
}

fn report<B: Backend>(name: &str, ck: &model::Checkpoint) {
    let dev = B::Device::default();
    let g = matmul_gflops::<B>(&dev);
    let s = step_tokens_per_s::<B>(ck, &dev);
    println!("| {name:<28} | {g:>8.1} | {s:>10.1} |");
}

fn main() {
    codespot::alloc::tune();
    let ck = model::load("default").expect("default model");
    println!("| backend                      | sgemm GFLOP/s | fwd+bwd tokens/s |");
    println!("|------------------------------|----------:|-----------:|");
    report::<burn::backend::NdArray<f32>>("ndarray + openblas-system", &ck);
    #[cfg(feature = "bench-flex")]
    report::<burn::backend::Flex>("flex (rayon + simd)", &ck);
    #[cfg(feature = "bench-candle")]
    report::<burn::backend::Candle<f32, i64>>("candle", &ck);
}
