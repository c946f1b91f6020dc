//! The dtype weights are held and computed in. `f32` is the backend's own float type (f64 on
//! the tests' reference backend); `bf16` and `f16` halve the weights' memory. Whatever the
//! weights' dtype, RMSNorm statistics, softmaxes, the head's cross-entropy, gradients handed
//! out of the backward pass, Taylor sums and AdamW moments are f32 ([`widen`]).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }

    /// Bytes per weight.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// The burn dtype to cast weights to (`None`: the backend's own float type).
    pub(crate) fn half_dtype(self) -> Option<FloatDType> {
        match self {
            Dtype::F32 => None,
            Dtype::Bf16 => Some(FloatDType::BF16),
            Dtype::F16 => Some(FloatDType::F16),
        }
    }

    /// `t` in this dtype (unchanged for `f32`).
    pub(crate) fn apply<B: Backend, const D: usize>(self, t: Tensor<B, D>) -> Tensor<B, D> {
        match self.half_dtype() {
            Some(d) if t.dtype() != DType::from(d) => t.cast(d),
            _ => t,
        }
    }
}

/// Matrix products in bf16 with f32 sums, around f32 weights (PyTorch's CPU autocast): on the
/// hand-written CPU path (`model::fused`), on AMX tiles or AVX512-BF16 (`model::bf16`), f32
/// where the CPU has neither. Weights, gradients, Taylor sums and AdamW moments stay f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Autocast {
    #[default]
    Off,
    Bf16,
}

impl Autocast {
    pub fn name(self) -> &'static str {
        match self {
            Autocast::Off => "off",
            Autocast::Bf16 => "bf16",
        }
    }

    /// What runs on this CPU: `off`, or bf16 on its unit (`bf16-amx`, `bf16-avx512bf16`). The
    /// two units round differently, and a CPU with neither runs f32: snapshots and run hashes
    /// record this, so shards or a resume from another kind of CPU are told apart.
    pub(crate) fn effective(self) -> &'static str {
        match (self, super::bf16::unit()) {
            (Autocast::Off, _) | (Autocast::Bf16, None) => "off",
            (Autocast::Bf16, Some(super::bf16::Unit::Amx)) => "bf16-amx",
            (Autocast::Bf16, Some(super::bf16::Unit::Avx512Bf16)) => "bf16-avx512bf16",
        }
    }
}

/// A half-precision tensor as f32; any other unchanged (no graph node, no copy).
pub(crate) fn widen<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    match t.dtype() {
        DType::BF16 | DType::F16 => t.cast(FloatDType::F32),
        _ => t,
    }
}

/// `t` in the dtype of `like` (unchanged when they agree).
pub fn like<B: Backend, const D: usize, const E: usize>(t: Tensor<B, D>, like: &Tensor<B, E>) -> Tensor<B, D> {
    let d = like.dtype();
    if t.dtype() == d {
        t
    } else {
        t.cast(FloatDType::from(d))
    }
}
