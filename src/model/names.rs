//! Canonical parameter names (HF style) and their taxonomy: layer, module kind, head slices,
//! all read from the slot tables in [`super::arch`].

use super::arch::{self, Groups, ModuleKind};
use super::config::LlamaConfig;

/// A parsed canonical name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamName {
    /// `None` for embeddings, the final norm and the LM head.
    pub layer: Option<usize>,
    pub kind: ModuleKind,
}

/// Parse a canonical HF name such as `model.layers.3.self_attn.q_proj.weight`.
pub fn parse(name: &str) -> Option<ParamName> {
    let (layer, slot) = arch::slot_of(name)?;
    Some(ParamName { layer, kind: slot.kind })
}

/// How a tensor splits into attention heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeadSlicing {
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
    pub(crate) fn head_of(&self, i: usize, shape: &[usize]) -> usize {
        let cols = if shape.len() >= 2 { shape[shape.len() - 1] } else { 1 };
        let (r, c) = (i / cols, i % cols);
        if self.along_rows {
            r / self.head_dim
        } else {
            c / self.head_dim
        }
    }

    /// Query heads that head `h` of this tensor feeds (GQA-aware).
    pub(crate) fn query_heads(&self, h: usize) -> std::ops::Range<usize> {
        h * self.group..(h + 1) * self.group
    }
}

/// Head slicing of q/k/v/o tensors (their slots' [`Groups`]); `None` for other kinds.
pub(crate) fn head_slicing(kind: ModuleKind, cfg: &LlamaConfig) -> Option<HeadSlicing> {
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let groups = arch::BLOCK.iter().find(|s| s.kind == kind)?.groups;
    let (heads, group) = match groups {
        Groups::QueryHeadRows | Groups::QueryHeadCols => (nh, 1),
        Groups::KvHeadRows => (nkv, nh / nkv),
        Groups::None | Groups::NeuronRows | Groups::NeuronCols => return None,
    };
    Some(HeadSlicing {
        along_rows: groups.along_rows(),
        heads,
        head_dim: hd,
        group,
    })
}

/// Tensors and parameters per module kind (q, k, …, norms, embeddings) of a config.
pub(crate) fn params_by_kind(c: &super::LlamaConfig) -> std::collections::BTreeMap<ModuleKind, (usize, usize)> {
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
