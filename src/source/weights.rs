//! Host-side weights under canonical HF names, loaded from GGUF or safetensors.

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
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).with_context(|| format!("safetensors file {}", path.display()))?;
    // The map serves the header's checks (offsets against the file's length) and is never read
    // past the header: the data is read with `pread` in chunks, so the file's pages never count
    // in this process's resident memory (a 1 GB file read through the map would, while mapped).
    // SAFETY: read-only map of a file codespot does not modify while it is open.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("safetensors file {}", path.display()))?;
    let (n, meta) = SafeTensors::read_metadata(&map)
        .map_err(|e| anyhow::anyhow!("safetensors file {}: invalid header: {e}", path.display()))?;
    let start = 8 + n;
    const CHUNK: usize = 1 << 22;
    let mut buf = vec![0u8; CHUNK];
    for (name, info) in meta.tensors() {
        let width = match info.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => bail!(
                "safetensors file {}: tensor '{name}' has dtype {other:?} (F32, F16, BF16 supported)",
                path.display()
            ),
        };
        let (from, to) = info.data_offsets;
        let mut data: Vec<f32> = Vec::with_capacity((to - from) / width);
        let mut at = from;
        while at < to {
            let len = (to - at).min(CHUNK);
            let b = &mut buf[..len];
            file.read_exact_at(b, (start + at) as u64)
                .with_context(|| format!("safetensors file {}: reading tensor '{name}'", path.display()))?;
            match info.dtype {
                Dtype::F32 => data.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
                Dtype::F16 => data.extend(
                    b.chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
                _ => data.extend(
                    b.chunks_exact(2)
                        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
            }
            at += len;
        }
        w.insert(name, HostTensor::new(info.shape.clone(), data));
    }
    Ok(())
}

/// The header of a safetensors file: its tensors' shapes by name and its metadata.
pub(crate) struct SafetensorsHeader {
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub metadata: std::collections::HashMap<String, String>,
}

/// Read and check a safetensors file's header (the tensors' data is not read).
pub(crate) fn safetensors_header(path: &Path) -> Result<SafetensorsHeader> {
    use safetensors::SafeTensors;
    let file = std::fs::File::open(path).with_context(|| format!("safetensors file {}", path.display()))?;
    // SAFETY: read-only map of a file codespot does not modify while it is open.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("safetensors file {}", path.display()))?;
    let invalid =
        |e: safetensors::SafeTensorError| anyhow::anyhow!("safetensors file {}: invalid header: {e}", path.display());
    // Checks the offsets against the file's length too.
    let (_, meta) = SafeTensors::read_metadata(&map).map_err(invalid)?;
    Ok(SafetensorsHeader {
        shapes: meta.tensors().into_iter().map(|(n, t)| (n, t.shape.clone())).collect(),
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
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
pub(crate) fn save_safetensors_as(
    w: &Weights,
    path: &Path,
    metadata: Option<std::collections::HashMap<String, String>>,
    half: bool,
) -> Result<()> {
    let tensors = w.tensors.iter().map(|(n, t)| (n.clone(), Lazy::host(t))).collect();
    write_safetensors(tensors, path, metadata, half)
}

/// A tensor of a safetensors file being written, encoded only when the writer reaches it: a
/// file of many tensors then never holds a second, encoded copy of all of them in memory.
pub(crate) struct Lazy<'a> {
    shape: Vec<usize>,
    values: Values<'a>,
}

enum Values<'a> {
    Host(&'a [f32]),
    /// Fetched when needed (e.g. copied off a device) and dropped once encoded.
    Fetch(Box<dyn Fn() -> Vec<f32> + 'a>),
}

impl<'a> Lazy<'a> {
    /// A host tensor, borrowed.
    pub fn host(t: &'a HostTensor) -> Self {
        Self {
            shape: t.shape.clone(),
            values: Values::Host(&t.data),
        }
    }

    /// A tensor of `shape` whose values `fetch` returns (row-major, `shape`'s product of them).
    pub(crate) fn fetch(shape: Vec<usize>, fetch: impl Fn() -> Vec<f32> + 'a) -> Self {
        Self {
            shape,
            values: Values::Fetch(Box::new(fetch)),
        }
    }
}

/// A [`Lazy`] tensor as the writer sees it: f32, or f16 with `half`.
struct Encoded<'a> {
    tensor: Lazy<'a>,
    half: bool,
}

impl safetensors::View for Encoded<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        if self.half {
            safetensors::Dtype::F16
        } else {
            safetensors::Dtype::F32
        }
    }
    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let encode = |x: &[f32]| -> Vec<u8> {
            if self.half {
                x.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()
            } else {
                x.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        };
        let bytes = match &self.tensor.values {
            Values::Host(x) => encode(x),
            Values::Fetch(f) => {
                let x = f();
                assert_eq!(
                    x.len(),
                    self.tensor.shape.iter().product::<usize>(),
                    "a fetched tensor's length must match its shape"
                );
                encode(&x)
            }
        };
        std::borrow::Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.tensor.shape.iter().product::<usize>() * if self.half { 2 } else { 4 }
    }
}

/// Write named tensors as one safetensors file, f32 or (with `half`) f16, atomically (a temp
/// sibling renamed into place). Each tensor is encoded when the writer reaches it.
pub(crate) fn write_safetensors(
    tensors: Vec<(String, Lazy<'_>)>,
    path: &Path,
    metadata: Option<std::collections::HashMap<String, String>>,
    half: bool,
) -> Result<()> {
    let tensors = tensors.into_iter().map(|(n, tensor)| (n, Encoded { tensor, half }));
    crate::util::clear_stale_tmp(path);
    let tmp = crate::util::tmp_sibling(path);
    safetensors::serialize_to_file(tensors, metadata, &tmp)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}
