//! Backends: burn-flex on CPU (chosen by measurement against ndarray + OpenBLAS and candle,
//! see README and `benches/backends.rs`), and burn-cuda behind the `cuda` feature.

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
pub type Cuda = burn::backend::Cuda<f32, i32>;
#[cfg(feature = "cuda")]
pub type CudaAd = Autodiff<Cuda>;

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
