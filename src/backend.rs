//! Backends: `ndarray` + system OpenBLAS on CPU (chosen by measurement, see README), and
//! burn-cuda behind the `cuda` feature.

use burn::backend::Autodiff;

/// The default CPU backend.
pub type Cpu = burn::backend::NdArray<f32>;
/// The CPU backend with autodiff.
pub type CpuAd = Autodiff<Cpu>;

#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda<f32, i32>;
#[cfg(feature = "cuda")]
pub type CudaAd = Autodiff<Cuda>;

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
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
