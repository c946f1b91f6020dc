//! The model layer: config → weights → burn module, tokenizer, generation, export.

pub mod arch;
pub mod backprop;
pub mod bf16;
pub mod config;
pub mod dtype;
pub mod export;
pub mod fused;
pub mod generate;
pub mod head;
pub mod llama;
pub mod load;
pub mod names;
pub mod tokenizer;

pub use arch::Arch;
pub use config::{LlamaConfig, RopeLayout};
pub use dtype::{Autocast, Dtype};
pub(crate) use llama::{loss_targets, strip};
pub use llama::{tokens_tensor, KvCache, Llama, ParamRef, NO_LOSS};
pub use load::{load, Checkpoint};
pub use tokenizer::{Message, Tok};
