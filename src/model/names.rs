//! Canonical parameter names (HF style) and their taxonomy: layer, module kind, head slices.

use super::config::LlamaConfig;
use serde::{Deserialize, Serialize};

/// What a parameter tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    AttnNorm,
    MlpNorm,
    Embed,
    FinalNorm,
    LmHead,
}

impl ModuleKind {
    /// The per-layer kinds, in table order.
    pub const LAYER_KINDS: [ModuleKind; 9] = [
        ModuleKind::Q,
        ModuleKind::K,
        ModuleKind::V,
        ModuleKind::O,
        ModuleKind::Gate,
        ModuleKind::Up,
        ModuleKind::Down,
        ModuleKind::AttnNorm,
        ModuleKind::MlpNorm,
    ];

    pub fn short(self) -> &'static str {
        match self {
            ModuleKind::Q => "q",
            ModuleKind::K => "k",
            ModuleKind::V => "v",
            ModuleKind::O => "o",
            ModuleKind::Gate => "gate",
            ModuleKind::Up => "up",
            ModuleKind::Down => "down",
            ModuleKind::AttnNorm => "attn_norm",
            ModuleKind::MlpNorm => "mlp_norm",
            ModuleKind::Embed => "embed",
            ModuleKind::FinalNorm => "final_norm",
            ModuleKind::LmHead => "lm_head",
        }
    }

    pub fn is_attention(self) -> bool {
        matches!(self, ModuleKind::Q | ModuleKind::K | ModuleKind::V | ModuleKind::O)
    }
}

/// A parsed canonical name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamName {
    /// `None` for embeddings, the final norm and the LM head.
    pub layer: Option<usize>,
    pub kind: ModuleKind,
}

/// Parse a canonical HF name such as `model.layers.3.self_attn.q_proj.weight`.
pub fn parse(name: &str) -> Option<ParamName> {
    let global = match name {
        "model.embed_tokens.weight" => Some(ModuleKind::Embed),
        "model.norm.weight" => Some(ModuleKind::FinalNorm),
        "lm_head.weight" => Some(ModuleKind::LmHead),
        _ => None,
    };
    if let Some(kind) = global {
        return Some(ParamName { layer: None, kind });
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (l, leaf) = rest.split_once('.')?;
    let kind = match leaf {
        // A projection's bias is of its projection's kind (Qwen2's q/k/v biases).
        "self_attn.q_proj.weight" | "self_attn.q_proj.bias" => ModuleKind::Q,
        "self_attn.k_proj.weight" | "self_attn.k_proj.bias" => ModuleKind::K,
        "self_attn.v_proj.weight" | "self_attn.v_proj.bias" => ModuleKind::V,
        "self_attn.o_proj.weight" => ModuleKind::O,
        "mlp.gate_proj.weight" => ModuleKind::Gate,
        "mlp.up_proj.weight" => ModuleKind::Up,
        "mlp.down_proj.weight" => ModuleKind::Down,
        "input_layernorm.weight" => ModuleKind::AttnNorm,
        "post_attention_layernorm.weight" => ModuleKind::MlpNorm,
        _ => return None,
    };
    Some(ParamName {
        layer: Some(l.parse().ok()?),
        kind,
    })
}

/// How a tensor splits into attention heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadSlicing {
    /// Heads along rows (q, k, v: `[heads*head_dim, d]`) or columns (o: `[d, heads*head_dim]`).
    pub along_rows: bool,
    /// Number of heads in this tensor (KV heads for k and v).
    pub heads: usize,
    pub head_dim: usize,
    /// Query heads served by one head of this tensor (GQA group size for k/v, 1 otherwise).
    pub group: usize,
}

impl HeadSlicing {
    /// Head of the element at flat index `i` of a tensor of `shape` (a bias, 1-D, is one
    /// column: its element `i` is row `i`).
    pub fn head_of(&self, i: usize, shape: &[usize]) -> usize {
        let cols = if shape.len() >= 2 { shape[shape.len() - 1] } else { 1 };
        let (r, c) = (i / cols, i % cols);
        if self.along_rows {
            r / self.head_dim
        } else {
            c / self.head_dim
        }
    }

    /// Query heads that head `h` of this tensor feeds (GQA-aware).
    pub fn query_heads(&self, h: usize) -> std::ops::Range<usize> {
        h * self.group..(h + 1) * self.group
    }
}

/// Head slicing of q/k/v/o tensors; `None` for other kinds.
pub fn head_slicing(kind: ModuleKind, cfg: &LlamaConfig) -> Option<HeadSlicing> {
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    match kind {
        ModuleKind::Q => Some(HeadSlicing {
            along_rows: true,
            heads: nh,
            head_dim: hd,
            group: 1,
        }),
        ModuleKind::K | ModuleKind::V => Some(HeadSlicing {
            along_rows: true,
            heads: nkv,
            head_dim: hd,
            group: nh / nkv,
        }),
        ModuleKind::O => Some(HeadSlicing {
            along_rows: false,
            heads: nh,
            head_dim: hd,
            group: 1,
        }),
        _ => None,
    }
}

/// Tensors and parameters per module kind (q, k, …, norms, embeddings) of a config.
pub fn params_by_kind(c: &super::LlamaConfig) -> std::collections::BTreeMap<ModuleKind, (usize, usize)> {
    let mut by_kind = std::collections::BTreeMap::new();
    for (name, shape) in c.tensor_shapes() {
        let kind = parse(&name)
            .map(|p| p.kind)
            .expect("tensor_shapes gives canonical names");
        let e: &mut (usize, usize) = by_kind.entry(kind).or_default();
        e.0 += 1;
        e.1 += shape.iter().product::<usize>();
    }
    by_kind
}
