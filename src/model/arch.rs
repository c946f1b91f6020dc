//! The one description of the supported architectures. Each parameter slot is written once
//! here: its HF and GGUF names, module kind, shape from the config, and how its elements group
//! into attention heads or MLP neurons. So are each family's variants: `model_type`s, norm form,
//! gate activation, biases and embedding scale.
//!
//! Everything else derives from these tables: parameter lists and their order
//! (`LlamaConfig::tensor_shapes`), loading and GGUF names, export names, module kinds
//! (`names::parse`), head and neuron layouts, TensorBoard's module order and the memory plan.
//! No tensor name is spelled anywhere else. Adding a slot means a row here, a field of
//! `llama::Block` (the burn module), and the arithmetic that uses it (`Llama`'s forward pass and
//! the hand-written block in `fused`).

use serde::{Deserialize, Serialize};

/// A model family codespot computes. Mistral's block is Llama's, so a Mistral config reads as
/// `Llama`; see [`ARCHS`] for what each one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[default]
    Llama,
    Qwen2,
    Gemma,
}

/// RMSNorm's scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NormForm {
    /// `x̂ · w`.
    Weight,
    /// `x̂ · (1 + w)`, computed in f32 (Gemma).
    OnePlusWeight,
}

/// The gated MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// SiLU (SwiGLU).
    Silu,
    /// GELU's tanh approximation (GeGLU).
    GeluTanh,
}

impl Activation {
    /// The `hidden_act` value export writes.
    pub(crate) fn hf_name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }

    /// Whether config field `key` (`hidden_act` or `hidden_activation`) = `value` means this
    /// activation. Gemma's legacy `hidden_act` "gelu" means the tanh approximation
    /// (transformers rewrites it so); an explicit `hidden_activation` "gelu" asks for the exact
    /// (erf) one, which is not implemented.
    pub(crate) fn accepts(self, key: &str, value: &str) -> bool {
        match self {
            Activation::Silu => ["silu", "swish"].contains(&value),
            Activation::GeluTanh => {
                ["gelu_pytorch_tanh", "gelu_new"].contains(&value) || (key == "hidden_act" && value == "gelu")
            }
        }
    }

    /// For error messages.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Activation::Silu => "silu (SwiGLU)",
            Activation::GeluTanh => "gelu_pytorch_tanh (GeGLU)",
        }
    }
}

/// What a family is.
#[derive(Debug)]
pub(crate) struct ArchSpec {
    pub arch: Arch,
    /// `config.json` `model_type`s read as this family; export writes the first.
    pub model_types: &'static [&'static str],
    /// The transformers class export names in `architectures`.
    pub hf_class: &'static str,
    pub norm: NormForm,
    pub activation: Activation,
    /// The q, k and v projections have biases ([`BIASES`]).
    pub qkv_bias: bool,
    /// Embedding rows are multiplied by √hidden on the way in.
    pub embed_scale: bool,
    /// `tie_word_embeddings` when the config does not say (transformers' default).
    pub tied_by_default: bool,
    /// `sliding_window` is in force when `use_sliding_window` is not given (Qwen2's configs
    /// carry a window that its default `false` leaves off).
    pub sliding_window_by_default: bool,
}

/// Every supported family.
pub(crate) const ARCHS: [ArchSpec; 3] = [
    ArchSpec {
        arch: Arch::Llama,
        model_types: &["llama", "mistral"],
        hf_class: "LlamaForCausalLM",
        norm: NormForm::Weight,
        activation: Activation::Silu,
        qkv_bias: false,
        embed_scale: false,
        tied_by_default: false,
        sliding_window_by_default: true,
    },
    ArchSpec {
        arch: Arch::Qwen2,
        model_types: &["qwen2"],
        hf_class: "Qwen2ForCausalLM",
        norm: NormForm::Weight,
        activation: Activation::Silu,
        qkv_bias: true,
        embed_scale: false,
        tied_by_default: false,
        sliding_window_by_default: false,
    },
    ArchSpec {
        arch: Arch::Gemma,
        model_types: &["gemma"],
        hf_class: "GemmaForCausalLM",
        norm: NormForm::OnePlusWeight,
        activation: Activation::GeluTanh,
        qkv_bias: false,
        embed_scale: true,
        tied_by_default: true,
        sliding_window_by_default: true,
    },
];

impl Arch {
    pub(crate) fn spec(self) -> &'static ArchSpec {
        ARCHS.iter().find(|s| s.arch == self).expect("every Arch is in ARCHS")
    }

    /// The family of a `config.json` `model_type` (Llama when it is absent or empty).
    pub(crate) fn from_model_type(model_type: &str) -> Option<Arch> {
        if model_type.is_empty() {
            return Some(Arch::Llama);
        }
        ARCHS
            .iter()
            .find(|s| s.model_types.contains(&model_type))
            .map(|s| s.arch)
    }

    /// The `model_type`s codespot reads, for error messages: "llama, mistral, qwen2, gemma".
    pub(crate) fn model_types() -> String {
        ARCHS
            .iter()
            .flat_map(|s| s.model_types.iter().copied())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The `model_type` export writes.
    pub(crate) fn model_type(self) -> &'static str {
        self.spec().model_types[0]
    }

    /// RMSNorm scales by `1 + w` rather than `w`.
    pub(crate) fn norm_plus_one(self) -> bool {
        self.spec().norm == NormForm::OnePlusWeight
    }

    /// The MLP's gate activation is GELU's tanh approximation rather than SiLU.
    pub(crate) fn gelu_gate(self) -> bool {
        self.spec().activation == Activation::GeluTanh
    }

    pub(crate) fn is_llama(&self) -> bool {
        *self == Arch::Llama
    }
}

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
    /// The per-layer kinds, in [`BLOCK`] order (the order of tables and TensorBoard's
    /// layer × module heatmap).
    pub(crate) const LAYER_KINDS: [ModuleKind; BLOCK.len()] = {
        let mut k = [ModuleKind::Q; BLOCK.len()];
        let mut i = 0;
        while i < BLOCK.len() {
            k[i] = BLOCK[i].kind;
            i += 1;
        }
        k
    };

    pub const fn short(self) -> &'static str {
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

    pub(crate) fn is_mlp(self) -> bool {
        matches!(self, ModuleKind::Gate | ModuleKind::Up | ModuleKind::Down)
    }

    pub(crate) fn is_norm(self) -> bool {
        matches!(self, ModuleKind::AttnNorm | ModuleKind::MlpNorm | ModuleKind::FinalNorm)
    }
}

/// A dimension of a slot's shape, read from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dim {
    Vocab,
    Hidden,
    /// The MLP's inner width (`intermediate_size`).
    Inner,
    /// All query heads: `heads · head_dim`.
    QueryWidth,
    /// All key/value heads: `kv_heads · head_dim`.
    KvWidth,
}

/// How a slot's elements group into attention heads or MLP neurons (a 1-D slot's element `i`
/// counts as row `i`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Groups {
    None,
    /// Rows in blocks of `head_dim`, one per query head (q).
    QueryHeadRows,
    /// Rows in blocks of `head_dim`, one per key/value head (k, v).
    KvHeadRows,
    /// Columns in blocks of `head_dim`, one per query head (o).
    QueryHeadCols,
    /// One MLP neuron per row (gate, up).
    NeuronRows,
    /// One MLP neuron per column (down).
    NeuronCols,
}

impl Groups {
    /// Heads or neurons run along rows (else along columns).
    pub(crate) fn along_rows(self) -> bool {
        matches!(self, Groups::QueryHeadRows | Groups::KvHeadRows | Groups::NeuronRows)
    }
}

/// One parameter tensor of the model.
#[derive(Debug)]
pub(crate) struct Slot {
    /// HF name: the part after `model.layers.{l}.` for [`BLOCK`] and [`BIASES`], the whole
    /// name for the others.
    pub hf: &'static str,
    /// llama.cpp's GGUF name, likewise after `blk.{l}.`.
    pub gguf: &'static str,
    pub kind: ModuleKind,
    /// HF layout: `[out, in]` for a projection.
    pub shape: &'static [Dim],
    pub groups: Groups,
}

const fn slot(hf: &'static str, gguf: &'static str, kind: ModuleKind, shape: &'static [Dim], groups: Groups) -> Slot {
    Slot {
        hf,
        gguf,
        kind,
        shape,
        groups,
    }
}

use Dim::{Hidden, Inner, KvWidth, QueryWidth, Vocab};

/// The token embeddings (also the head when the model ties them).
pub(crate) const EMBED: Slot = slot(
    "model.embed_tokens.weight",
    "token_embd.weight",
    ModuleKind::Embed,
    &[Vocab, Hidden],
    Groups::None,
);
/// The norm before the head.
pub(crate) const FINAL_NORM: Slot = slot(
    "model.norm.weight",
    "output_norm.weight",
    ModuleKind::FinalNorm,
    &[Hidden],
    Groups::None,
);
/// The output head of an untied model.
pub(crate) const LM_HEAD: Slot = slot(
    "lm_head.weight",
    "output.weight",
    ModuleKind::LmHead,
    &[Vocab, Hidden],
    Groups::None,
);

/// A block's tensors, in the order of `llama::Block`'s fields and of each layer's run in
/// `Llama::params`.
pub(crate) const BLOCK: [Slot; 9] = [
    slot(
        "input_layernorm.weight",
        "attn_norm.weight",
        ModuleKind::AttnNorm,
        &[Hidden],
        Groups::None,
    ),
    slot(
        "self_attn.q_proj.weight",
        "attn_q.weight",
        ModuleKind::Q,
        &[QueryWidth, Hidden],
        Groups::QueryHeadRows,
    ),
    slot(
        "self_attn.k_proj.weight",
        "attn_k.weight",
        ModuleKind::K,
        &[KvWidth, Hidden],
        Groups::KvHeadRows,
    ),
    slot(
        "self_attn.v_proj.weight",
        "attn_v.weight",
        ModuleKind::V,
        &[KvWidth, Hidden],
        Groups::KvHeadRows,
    ),
    slot(
        "self_attn.o_proj.weight",
        "attn_output.weight",
        ModuleKind::O,
        &[Hidden, QueryWidth],
        Groups::QueryHeadCols,
    ),
    slot(
        "post_attention_layernorm.weight",
        "ffn_norm.weight",
        ModuleKind::MlpNorm,
        &[Hidden],
        Groups::None,
    ),
    slot(
        "mlp.gate_proj.weight",
        "ffn_gate.weight",
        ModuleKind::Gate,
        &[Inner, Hidden],
        Groups::NeuronRows,
    ),
    slot(
        "mlp.up_proj.weight",
        "ffn_up.weight",
        ModuleKind::Up,
        &[Inner, Hidden],
        Groups::NeuronRows,
    ),
    slot(
        "mlp.down_proj.weight",
        "ffn_down.weight",
        ModuleKind::Down,
        &[Hidden, Inner],
        Groups::NeuronCols,
    ),
];

/// A block's biases, where the family has them ([`ArchSpec::qkv_bias`]). They come after every
/// other tensor in `Llama::params` (all layers' in layer order), so the index of every other
/// parameter is the same with or without them.
pub(crate) const BIASES: [Slot; 3] = [
    slot(
        "self_attn.q_proj.bias",
        "attn_q.bias",
        ModuleKind::Q,
        &[QueryWidth],
        Groups::QueryHeadRows,
    ),
    slot(
        "self_attn.k_proj.bias",
        "attn_k.bias",
        ModuleKind::K,
        &[KvWidth],
        Groups::KvHeadRows,
    ),
    slot(
        "self_attn.v_proj.bias",
        "attn_v.bias",
        ModuleKind::V,
        &[KvWidth],
        Groups::KvHeadRows,
    ),
];

/// Index in `slots` of the slot of `kind`.
const fn index_of(slots: &[Slot], kind: ModuleKind) -> Option<usize> {
    let mut i = 0;
    while i < slots.len() {
        if slots[i].kind as u8 == kind as u8 {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Index in [`BLOCK`] of the slot of `kind` (a per-layer kind).
pub(crate) const fn block_slot(kind: ModuleKind) -> usize {
    match index_of(&BLOCK, kind) {
        Some(i) => i,
        None => panic!("not a per-layer kind"),
    }
}

/// Index in [`BIASES`] of the bias of `kind` (q, k or v).
pub(crate) const fn bias_slot(kind: ModuleKind) -> usize {
    match index_of(&BIASES, kind) {
        Some(i) => i,
        None => panic!("not a biased kind"),
    }
}

/// The canonical name of layer `l`'s block slot or bias `s`.
pub(crate) fn layer_name(l: usize, s: &Slot) -> String {
    format!("model.layers.{l}.{}", s.hf)
}

/// The slot of a canonical HF name, with its layer (`None` for the global slots).
pub(crate) fn slot_of(name: &str) -> Option<(Option<usize>, &'static Slot)> {
    if let Some(s) = [&EMBED, &FINAL_NORM, &LM_HEAD].into_iter().find(|s| s.hf == name) {
        return Some((None, s));
    }
    let (l, leaf) = name.strip_prefix("model.layers.")?.split_once('.')?;
    let s = BLOCK.iter().chain(&BIASES).find(|s| s.hf == leaf)?;
    Some((Some(l.parse().ok()?), s))
}

/// GGUF tensor name → canonical HF name (None for tensors codespot does not use).
pub(crate) fn gguf_to_hf(name: &str) -> Option<String> {
    if let Some(s) = [&EMBED, &FINAL_NORM, &LM_HEAD].into_iter().find(|s| s.gguf == name) {
        return Some(s.hf.to_string());
    }
    let (l, leaf) = name.strip_prefix("blk.")?.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let s = BLOCK.iter().chain(&BIASES).find(|s| s.gguf == leaf)?;
    Some(layer_name(l, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_kind_has_its_slot() {
        let all: Vec<&Slot> = [&EMBED, &FINAL_NORM, &LM_HEAD]
            .into_iter()
            .chain(&BLOCK)
            .chain(&BIASES)
            .collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert!(a.hf != b.hf && a.gguf != b.gguf, "{a:?} and {b:?}");
            }
            assert_eq!(slot_of(&name_of(a)).map(|(_, s)| s.hf), Some(a.hf));
        }
        for (i, k) in ModuleKind::LAYER_KINDS.iter().enumerate() {
            assert_eq!(block_slot(*k), i);
        }
        for (i, b) in BIASES.iter().enumerate() {
            assert_eq!(bias_slot(b.kind), i);
            assert_eq!(
                b.groups,
                BLOCK[block_slot(b.kind)].groups,
                "a bias groups as its weight's rows"
            );
        }
        assert_eq!(
            gguf_to_hf("blk.7.ffn_down.weight").as_deref(),
            Some("model.layers.7.mlp.down_proj.weight")
        );
        assert_eq!(gguf_to_hf("output_norm.weight").as_deref(), Some("model.norm.weight"));
        assert_eq!(gguf_to_hf("blk.7.rope_freqs.weight"), None);
    }

    fn name_of(s: &Slot) -> String {
        if s.hf.starts_with("model.") || s.hf.starts_with("lm_head") {
            s.hf.to_string()
        } else {
            layer_name(3, s)
        }
    }

    #[test]
    fn model_types_name_their_family() {
        assert_eq!(Arch::model_types(), "llama, mistral, qwen2, gemma");
        assert_eq!(Arch::from_model_type("mistral"), Some(Arch::Llama));
        assert_eq!(Arch::from_model_type(""), Some(Arch::Llama));
        assert_eq!(Arch::from_model_type("gemma2"), None);
        for s in &ARCHS {
            assert_eq!(s.arch.spec().hf_class, s.hf_class);
            assert_eq!(Arch::from_model_type(s.arch.model_type()), Some(s.arch));
        }
    }
}
