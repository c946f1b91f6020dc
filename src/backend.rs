//! Backends: burn-flex on CPU (chosen by measurement against ndarray + OpenBLAS and candle,
//! see docs/measurements.md and `benches/backends.rs`), and burn-cuda behind the `cuda` feature.

use burn::backend::Autodiff;

/// The default CPU backend.
pub type Cpu = burn::backend::Flex<f32>;
/// Pure-Rust ndarray (matrixmultiply): the tests' f64 backend (burn-flex is f32-only).
pub type Reference = burn::backend::NdArray<f64>;

/// Autodiff without checkpointing: the backward pass re-runs blocks itself, one at a time
/// (`model::backprop`), so burn's balanced checkpointing (which recomputed memory-bound ops,
/// 5.7 → 4.5 GB when the whole model was one graph) would only recompute them twice.
pub type Ad<B> = Autodiff<B>;
/// The CPU backend with autodiff.
pub type CpuAd = Ad<Cpu>;

#[cfg(feature = "cuda")]
pub(crate) type Cuda = burn::backend::Cuda<f32, i32>;

/// f32 matmul GFLOP/s of backend `B` at the default model's MLP shape, [2048×576]·[576×1536]
/// (median of 7): the machine's sgemm rate that `bench score` is measured against.
pub fn sgemm_gflops<B: burn::tensor::backend::Backend>(dev: &B::Device) -> f64 {
    use burn::tensor::{Distribution, Tensor};
    let (m, k, n) = (2048, 576, 1536);
    let a = Tensor::<B, 2>::random([m, k], Distribution::Default, dev);
    let b = Tensor::<B, 2>::random([k, n], Distribution::Default, dev);
    let _ = a.clone().matmul(b.clone()).into_data();
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let t = std::time::Instant::now();
            let _ = a.clone().matmul(b.clone()).into_data();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    2.0 * (m * k * n) as f64 / times[times.len() / 2] / 1e9
}

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    pub fn check(self) -> anyhow::Result<()> {
        if self == DeviceKind::Cuda && !cfg!(feature = "cuda") {
            anyhow::bail!("--device cuda: this codespot was built without the 'cuda' feature (cargo build --release --features cuda)");
        }
        Ok(())
    }
}
