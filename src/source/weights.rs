//! Host-side weights under canonical HF names, loaded from GGUF or safetensors.

use super::gguf::{GgmlType, Gguf};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A dense f32 tensor on the host, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Canonical name → tensor.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    pub tensors: BTreeMap<String, HostTensor>,
}

impl Weights {
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }
    pub fn insert(&mut self, name: impl Into<String>, t: HostTensor) {
        self.tensors.insert(name.into(), t);
    }
    pub fn num_params(&self) -> usize {
        self.tensors.values().map(|t| t.numel()).sum()
    }
}

/// GGUF tensor name → canonical HF name (None for tensors codespot does not use).
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match leaf {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undo llama.cpp's Q/K row permutation (for interleaved RoPE) to get the HF layout.
///
/// llama.cpp's converter does `w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2)`, so GGUF row
/// `h*hd + 2*i + j` holds HF row `h*hd + j*hd/2 + i`.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    permute_impl(data, rows, cols, heads, false)
}

/// The inverse of [`unpermute_rows`]: HF layout → llama.cpp (interleaved) layout.
pub fn permute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    permute_impl(data, rows, cols, heads, true)
}

fn permute_impl(data: &[f32], rows: usize, cols: usize, heads: usize, to_gguf: bool) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf_row = h * hd + 2 * i + j;
                let hf_row = h * hd + j * half + i;
                let (src, dst) = if to_gguf {
                    (hf_row, gguf_row)
                } else {
                    (gguf_row, hf_row)
                };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Read every tensor of a GGUF into canonical HF names (Q/K rows un-permuted).
pub fn from_gguf(g: &Gguf, n_head: usize, n_kv_head: usize) -> Result<Weights> {
    let mut w = Weights::default();
    for t in &g.tensors {
        let Some(name) = gguf_to_hf_name(&t.name) else {
            continue;
        };
        let shape = t.shape();
        let mut data = g.read_f32(t);
        if name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight") {
            let heads = if name.ends_with("q_proj.weight") {
                n_head
            } else {
                n_kv_head
            };
            if shape.len() != 2 || shape[0] % heads != 0 || (shape[0] / heads) % 2 != 0 {
                bail!(
                    "{}: tensor '{}' has shape {shape:?}, not [heads*head_dim, d]",
                    g.path.display(),
                    t.name
                );
            }
            data = unpermute_rows(&data, shape[0], shape[1], heads);
        }
        if t.ty == GgmlType::F32 && data.iter().any(|x| !x.is_finite()) {
            bail!("{}: tensor '{}' holds NaN or infinite values", g.path.display(), t.name);
        }
        w.insert(name, HostTensor::new(shape, data));
    }
    Ok(w)
}

/// Load safetensors files (one or several shards) into f32 host tensors.
pub fn from_safetensors(files: &[PathBuf]) -> Result<Weights> {
    let mut w = Weights::default();
    for f in files {
        load_safetensors_file(f, &mut w)?;
    }
    Ok(w)
}

fn load_safetensors_file(path: &Path, w: &mut Weights) -> Result<()> {
    use safetensors::{Dtype, SafeTensors};
    let file = std::fs::File::open(path).with_context(|| format!("safetensors file {}", path.display()))?;
    // SAFETY: read-only map of a file codespot does not modify while it is open.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("safetensors file {}", path.display()))?;
    let st = SafeTensors::deserialize(&map)
        .map_err(|e| anyhow::anyhow!("safetensors file {}: invalid header: {e}", path.display()))?;
    for (name, view) in st.tensors() {
        let b = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => bail!(
                "safetensors file {}: tensor '{name}' has dtype {other:?} (F32, F16, BF16 supported)",
                path.display()
            ),
        };
        w.insert(name, HostTensor::new(view.shape().to_vec(), data));
    }
    Ok(())
}

/// Write weights as one f32 safetensors file (atomic).
pub fn save_safetensors(
    w: &Weights,
    path: &Path,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    save_safetensors_as(w, path, metadata, false)
}

/// Write weights as one safetensors file, f32 or (with `half`) f16, atomically.
pub fn save_safetensors_as(
    w: &Weights,
    path: &Path,
    metadata: Option<std::collections::HashMap<String, String>>,
    half: bool,
) -> Result<()> {
    use safetensors::tensor::TensorView;
    let encode = |x: &f32| -> Vec<u8> {
        if half {
            half::f16::from_f32(*x).to_le_bytes().to_vec()
        } else {
            x.to_le_bytes().to_vec()
        }
    };
    let dtype = if half {
        safetensors::Dtype::F16
    } else {
        safetensors::Dtype::F32
    };
    let bytes: Vec<(&String, Vec<u8>, &Vec<usize>)> = w
        .tensors
        .iter()
        .map(|(n, t)| (n, t.data.iter().flat_map(encode).collect(), &t.shape))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, b, s)| Ok((n.as_str(), TensorView::new(dtype, s.to_vec(), b)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::util::clear_stale_tmp(path);
    let tmp = crate::util::tmp_sibling(path);
    safetensors::serialize_to_file(views, metadata, &tmp)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}
