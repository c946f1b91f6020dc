//! A checked GGUF (v2/v3) reader: metadata, tensor directory and dequantisation to f32.
//!
//! Hand-written on purpose (see README, "Exceptions"): the `ggus` crate transmutes file bytes
//! into enums and panics on truncated files; this reader treats every byte as untrusted and
//! turns each problem into an error that names the file and the field.

use anyhow::{bail, Context, Result};
use half::f16;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::U64(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub(crate) fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// GGML tensor types codespot can dequantise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::BF16,
            _ => return None,
        })
    }
    /// (elements per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::BF16 => "BF16",
        }
    }
}

/// Directory entry of one tensor.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the innermost (row length).
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub nbytes: usize,
}

impl TensorInfo {
    /// Row-major shape, outermost first (the HF / PyTorch order).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// An opened GGUF file (memory-mapped).
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub meta: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    map: Mmap,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => bail!(
                "truncated while reading {what} at byte {} (file has {} bytes)",
                self.pos,
                self.buf.len()
            ),
        }
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        // A length can never exceed what is left in the file: reject before allocating.
        if n > (self.buf.len() - self.pos) as u64 {
            bail!("{what}: length {n} at byte {} runs past the end of the file", self.pos);
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).with_context(|| format!("{what} is not UTF-8"))
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.take(1, what)?[0] as u64),
            1 => Value::I64(self.take(1, what)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap()) as i64),
            4 => Value::U64(self.u32(what)? as u64),
            5 => Value::I64(self.u32(what)? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32(what)?) as f64),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 2 {
                    bail!("{what}: arrays nested too deeply");
                }
                let ety = self.u32(what)?;
                let n = self.len(what)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(ety, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => bail!("{what}: unknown metadata value type {t}"),
        })
    }
}

impl Gguf {
    /// Open and validate a GGUF file: header, metadata, tensor directory, data bounds.
    pub fn open(path: &Path) -> Result<Self> {
        let ctx = || format!("GGUF file {}", path.display());
        let file = File::open(path).with_context(ctx)?;
        // SAFETY: the file is opened read-only; codespot never writes model files in place.
        let map = unsafe { Mmap::map(&file) }.with_context(ctx)?;
        let (version, meta, tensors) = Self::parse(&map).with_context(ctx)?;
        Ok(Self {
            path: path.to_path_buf(),
            version,
            meta,
            tensors,
            map,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(buf: &[u8]) -> Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>)> {
        let mut c = Cursor { buf, pos: 0 };
        if c.take(4, "magic")? != b"GGUF" {
            bail!("not a GGUF file (magic bytes are not 'GGUF')");
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            bail!("unsupported GGUF version {version} (2 or 3 supported)");
        }
        let n_tensors = c.u64("tensor_count")?;
        let n_kv = c.u64("metadata_kv_count")?;
        if n_tensors > 1 << 24 || n_kv > 1 << 24 {
            bail!("implausible header: {n_tensors} tensors, {n_kv} metadata entries");
        }
        let mut meta = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of metadata '{key}'"))?;
            let v = c.value(ty, &format!("metadata '{key}'"), 0)?;
            meta.insert(key, v);
        }
        let mut raw = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor #{i}"))?;
            let nd = c.u32(&format!("tensor '{name}' n_dims"))? as usize;
            if nd == 0 || nd > 4 {
                bail!("tensor '{name}': {nd} dimensions (1..=4 allowed)");
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(c.u64(&format!("tensor '{name}' dims"))? as usize);
            }
            let tid = c.u32(&format!("tensor '{name}' type"))?;
            let ty = GgmlType::from_id(tid).with_context(|| {
                format!("tensor '{name}': ggml type {tid} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0 are)")
            })?;
            let off = c.u64(&format!("tensor '{name}' offset"))? as usize;
            raw.push((name, dims, ty, off));
        }
        let align = match meta.get("general.alignment") {
            Some(v) => {
                v.as_u64()
                    .filter(|a| *a > 0 && a.is_power_of_two())
                    .context("metadata 'general.alignment' must be a power-of-two integer")? as usize
            }
            None => 32,
        };
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty, off) in raw {
            let numel = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .with_context(|| format!("tensor '{name}': shape {dims:?} overflows"))?;
            let (bs, bb) = ty.block();
            if dims[0] % bs != 0 {
                bail!(
                    "tensor '{name}': row length {} is not a multiple of the {} block size {bs}",
                    dims[0],
                    ty.name()
                );
            }
            let nbytes = numel / bs * bb;
            let offset = data_start
                .checked_add(off)
                .with_context(|| format!("tensor '{name}': offset overflows"))?;
            let end = offset.saturating_add(nbytes);
            if end > buf.len() {
                bail!(
                    "truncated: tensor '{name}' needs bytes {offset}..{end} but the file has {} bytes",
                    buf.len()
                );
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                nbytes,
            });
        }
        Ok((version, meta, tensors))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    /// A required metadata field, with an error naming the file and the key.
    pub(crate) fn require(&self, key: &str) -> Result<&Value> {
        self.meta
            .get(key)
            .with_context(|| format!("{}: missing metadata field '{key}'", self.path.display()))
    }

    pub(crate) fn require_u64(&self, key: &str) -> Result<u64> {
        self.require(key)?.as_u64().with_context(|| {
            format!(
                "{}: metadata field '{key}' is not an unsigned integer",
                self.path.display()
            )
        })
    }

    pub(crate) fn require_f64(&self, key: &str) -> Result<f64> {
        self.require(key)?
            .as_f64()
            .with_context(|| format!("{}: metadata field '{key}' is not a number", self.path.display()))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Dequantise one tensor to f32, row-major in [`TensorInfo::shape`] order.
    pub fn read_f32(&self, t: &TensorInfo) -> Vec<f32> {
        dequantize(t.ty, &self.map[t.offset..t.offset + t.nbytes], t.numel())
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantise `n` elements of type `ty` stored in `bytes` (llama.cpp's block layouts).
pub(crate) fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()))),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for blk in bytes.chunks_exact(34) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        GgmlType::Q4_0 => {
            for blk in bytes.chunks_exact(18) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..];
                out.extend(qs.iter().map(|&q| d * ((q & 0xf) as i32 - 8) as f32));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
            }
        }
        GgmlType::Q4_1 => {
            for blk in bytes.chunks_exact(20) {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                let qs = &blk[4..];
                out.extend(qs.iter().map(|&q| d * (q & 0xf) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
    }
    debug_assert_eq!(out.len(), n);
    out
}

/// Write a GGUF v3 file holding F32 tensors and the given metadata (tests and tools use it
/// to build small models; tensors are given in row-major shape order).
pub fn write_f32(path: &Path, meta: &[(&str, Value)], tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<()> {
    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }
    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
        }
    }
    fn put_val(b: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U64(x) => b.extend(x.to_le_bytes()),
            Value::I64(x) => b.extend(x.to_le_bytes()),
            Value::F64(x) => b.extend(x.to_le_bytes()),
            Value::Bool(x) => b.push(*x as u8),
            Value::Str(s) => put_str(b, s),
            Value::Array(a) => {
                b.extend(a.first().map(type_id).unwrap_or(4).to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|x| put_val(b, x));
            }
        }
    }
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut b, k);
        b.extend(type_id(v).to_le_bytes());
        put_val(&mut b, v);
    }
    let mut off = 0u64;
    for (name, shape, data) in tensors {
        put_str(&mut b, name);
        b.extend((shape.len() as u32).to_le_bytes());
        shape.iter().rev().for_each(|d| b.extend((*d as u64).to_le_bytes()));
        b.extend(0u32.to_le_bytes());
        b.extend(off.to_le_bytes());
        off += (data.len() * 4).div_ceil(32) as u64 * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    for (_, _, data) in tensors {
        let start = b.len();
        data.iter().for_each(|x| b.extend(x.to_le_bytes()));
        b.resize(start + (data.len() * 4).div_ceil(32) * 32, 0);
    }
    crate::util::write_atomic(path, &b)
}
