//! A Llama block's forward and backward pass written out by hand, in f32 on the CPU.
//!
//! burn's generic ops spend about half of a training step outside matrix multiplication on
//! this CPU: every element-wise op is its own pass over memory (RMSNorm is six, SiLU·up four,
//! RoPE five), softmax is materialised together with its gradient, and the block-at-a-time
//! backward pass re-runs most blocks' forward pass. Here each block is a few `gemm` calls
//! (the same AVX-512 kernels burn-flex uses) and one fused loop per element-wise step, split
//! over rayon's threads:
//!
//! - RMSNorm, RoPE and SiLU·up are single passes, forward and backward; the normed inputs and
//!   `SiLU(gate)·up` are recomputed in the backward pass instead of being kept.
//! - Attention keeps only each row's log-sum-exp (FlashAttention's trick): the backward pass
//!   recomputes the probabilities from Q, K and it, so no `[heads, t, t]` tensor is kept.
//! - The forward pass keeps what the backward pass needs of every block (~24 MB a block at
//!   batch 4 × 256 on the default model), so no block runs twice.
//! - Each matrix product is cut into one single-threaded gemm per thread (`mm_par`), and
//!   gemm writes fresh outputs without their being zero-filled first (`written`).
//! - Each element-wise loop is compiled for the baseline and for AVX-512 and picked at run
//!   time (`simd_fn!`), with the same bits either way.
//!
//! `model::backprop` uses this for the f32 CPU backend; the tests compare it with burn's
//! autodiff on the same weights (`tests/importance.rs`) and with the f64 reference.

use super::arch::{self, Dim, ModuleKind};
use super::bf16;
use super::config::{LlamaConfig, RopeLayout};
use super::dtype::Autocast;
pub use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Whether this CPU runs the AVX-512 copies that [`simd_fn!`] makes (checked once).
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Defines an element-wise kernel twice: once for the x86-64 baseline the binary targets
/// (SSE2: 4 lanes) and once compiled for AVX-512 (16 lanes), taken at run time when the CPU has
/// it ([`avx512`]), as gemm does for its micro-kernels. Both copies do the same IEEE
/// operations in the same order (Rust never fuses a multiply and an add on its own), so they
/// give the same bits; only the vector width differs.
macro_rules! simd_fn {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if $crate::model::fused::avx512() {
                    // SAFETY: the CPU has every feature `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// Whether `B` is the f32 CPU backend, whose tensors' storage this module reads and writes.
pub(crate) fn is_cpu<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<crate::backend::Cpu>()
}

/// Whether `B` is the f32 CPU backend, with or without autodiff around it.
pub(crate) fn cpu_or_autodiff_cpu<B: Backend>() -> bool {
    is_cpu::<B>() || TypeId::of::<B>() == TypeId::of::<crate::backend::Ad<crate::backend::Cpu>>()
}

/// Set (to anything) to run the generic path on the CPU: burn's ops for the forward, backward
/// and AdamW, exactly what another device runs, with this module's hand-written kernels off.
pub const GENERIC_ENV: &str = "CODESPOT_GENERIC";

/// Whether the hand-written path may run at all (not turned off by [`GENERIC_ENV`]).
pub(crate) fn hand_written() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(GENERIC_ENV).is_none())
}

/// The CPU backend's storage of a tensor (shared, not copied), made contiguous from offset 0.
/// Panics on another backend: callers check [`is_cpu`].
pub fn flex<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexTensor {
    let p: Box<dyn Any> = Box::new(t.into_primitive().tensor());
    let t = *p.downcast::<FlexTensor>().expect("the CPU backend");
    match t.layout().contiguous_offsets() {
        Some((0, _)) => t,
        _ => t.to_contiguous(),
    }
}

/// A CPU-backend tensor from its storage (the inverse of [`flex`]).
pub(crate) fn unflex<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    let p: Box<dyn Any> = Box::new(t);
    let prim = *p.downcast::<B::FloatTensorPrimitive>().expect("the CPU backend");
    Tensor::from_primitive(TensorPrimitive::Float(prim))
}

/// A flex tensor's f32 values.
pub fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 storage")
}

/// Products with at most this many rows (a decoding step's tokens) go through
/// [`few_rows_matmul`] instead of gemm.
pub(crate) const FEW_ROWS: usize = 16;

simd_fn! {
    /// `Σ_i a[i]·b[i]`, in 16 lanes summed at the end (the same order for every row, whatever
    /// the number of rows beside it).
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for l in 0..16 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s = 0f32;
        for (x, y) in ar.iter().zip(br) {
            s += x * y;
        }
        acc.iter().sum::<f32>() + s
    }
}

/// `x · Wᵀ` for a few rows `x: [rows, k]` and an HF-layout `W: [n, k]`, as `[rows, n]`: each
/// weight row is read from memory once and dotted with every row of `x` while it is in cache,
/// with no packing (gemm packs the whole weight matrix on every call, which dominates a
/// decoding step's product of a handful of rows). Parallel over weight rows. A row's result
/// does not depend on how many rows are beside it.
pub(crate) fn few_rows_matmul(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    debug_assert!(x.len() == rows * k && w.len() == n * k);
    // Output transposed, `[n, rows]`, so each task owns a contiguous run of it.
    let per = 64usize;
    let mut yt = vec![0f32; n * rows];
    yt.par_chunks_mut(per * rows).enumerate().for_each(|(c, out)| {
        for (j, o) in out.chunks_exact_mut(rows).enumerate() {
            let wr = &w[(c * per + j) * k..(c * per + j + 1) * k];
            for (r, y) in o.iter_mut().enumerate() {
                *y = dot(&x[r * k..(r + 1) * k], wr);
            }
        }
    });
    let mut y = vec![0f32; rows * n];
    for (o, col) in yt.chunks_exact(rows).enumerate() {
        for (r, v) in col.iter().enumerate() {
            y[r * n + o] = *v;
        }
    }
    y
}

/// Rows `ids` of an embedding table, times `scale` when there is one (Gemma's √hidden, as an
/// f32 constant like transformers' buffer).
pub(crate) fn embed_rows(table: &[f32], ids: &[u32], d: usize, scale: Option<f64>) -> Vec<f32> {
    let mut x = rows_of(table, ids, d);
    if let Some(s) = scale {
        let s = s as f32;
        x.par_chunks_mut(1 << 14)
            .for_each(|c| c.iter_mut().for_each(|v| *v *= s));
    }
    x
}

/// Rows `ids` of a `[rows, d]` table (an embedding lookup), as `[ids.len(), d]`.
pub(crate) fn rows_of(table: &[f32], ids: &[u32], d: usize) -> Vec<f32> {
    ids.iter()
        .flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].iter().copied())
        .collect()
}

/// Shapes of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    /// Rows and tokens per row (`n = b · t` tokens in all).
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub ff: usize,
    pub eps: f32,
    /// The unit the block's matrix products run on in bf16 (autocast), or None: f32 gemm.
    pub bf16: Option<bf16::Unit>,
    /// The MLP's gate activation is GELU's tanh approximation (Gemma), not SiLU.
    pub gelu: bool,
    /// RMSNorm scales by `1 + w` (Gemma), not `w`.
    pub plus_one: bool,
}

impl Dims {
    pub fn new(cfg: &LlamaConfig, b: usize, t: usize) -> Self {
        Self {
            b,
            t,
            d: cfg.hidden_size,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_key_value_heads,
            hd: cfg.head_dim,
            ff: cfg.intermediate_size,
            eps: cfg.rms_norm_eps as f32,
            bf16: None,
            gelu: cfg.arch.gelu_gate(),
            plus_one: cfg.arch.norm_plus_one(),
        }
    }

    /// These shapes with the products under `autocast` (bf16 when this CPU has a unit for it,
    /// [`bf16::unit`]; f32 otherwise).
    pub fn autocast(mut self, autocast: Autocast) -> Self {
        self.bf16 = match autocast {
            Autocast::Off => None,
            Autocast::Bf16 => bf16::unit(),
        };
        self
    }

    /// `[out, in]` of the block's weight `j` (a matrix), from its slot in `arch::BLOCK`.
    fn shape(&self, j: usize) -> (usize, usize) {
        let dim = |d: &Dim| match d {
            Dim::Hidden => self.d,
            Dim::Inner => self.ff,
            Dim::QueryWidth => self.qw(),
            Dim::KvWidth => self.kw(),
            Dim::Vocab => unreachable!("no block slot spans the vocabulary"),
        };
        match arch::BLOCK[j].shape {
            [out, inp] => (dim(out), dim(inp)),
            _ => unreachable!("not a matrix: {j}"),
        }
    }

    fn n(&self) -> usize {
        self.b * self.t
    }
    fn qw(&self) -> usize {
        self.nh * self.hd
    }
    fn kw(&self) -> usize {
        self.nkv * self.hd
    }
}

/// One block's weights, HF layout (`[out, in]`), in `arch::BLOCK` order,
/// borrowed from the backend's storage.
pub(crate) struct BlockWeights<'a> {
    pub w: [&'a [f32]; 9],
    /// The matrices' bf16 packed copies when the products run in bf16.
    packs: [Option<Arc<WeightPacks>>; 9],
    /// The q, k and v biases (Qwen2), in `arch::BIASES` order.
    bias: Option<[&'a [f32]; 3]>,
    /// `1 + w` of the two norms (Gemma), else None: the norms scale by `w`.
    norms: Option<[Vec<f32>; 2]>,
}

/// A norm's scale: `1 + w` when `plus_one` (Gemma), else `w` itself.
pub(crate) fn norm_scale(w: &[f32], plus_one: bool) -> std::borrow::Cow<'_, [f32]> {
    if plus_one {
        std::borrow::Cow::Owned(w.iter().map(|w| w + 1.0).collect())
    } else {
        std::borrow::Cow::Borrowed(w)
    }
}

/// Adds `b` to every row of `x` (`[rows, b.len()]`).
fn add_bias(x: &mut [f32], b: &[f32]) {
    x.par_chunks_mut(b.len() * 64).for_each(|rows| {
        for row in rows.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(x, b)| *x += b);
        }
    });
}

/// Σ over the rows of `g: [rows, width]` (a bias's gradient), summed in f64.
fn column_sums(g: &[f32], width: usize) -> Vec<f32> {
    let mut s = vec![0f64; width];
    for row in g.chunks_exact(width) {
        s.iter_mut().zip(row).for_each(|(s, g)| *s += *g as f64);
    }
    s.into_iter().map(|v| v as f32).collect()
}

/// A weight `w: [rows, cols]`'s bf16 packed copy as the right operand of `x · wᵀ` (a
/// projection), made when first needed. The copy for `dy · w` (its input gradient) is made
/// afresh by each backward pass and dropped after ([`WeightPacks::nn`]): keeping it too would
/// cost another 2 bytes a weight of resident memory for about 5 % of a Taylor pass's time.
pub struct WeightPacks {
    rows: usize,
    cols: usize,
    nt: OnceLock<bf16::Packed>,
}

impl WeightPacks {
    fn new(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            nt: OnceLock::new(),
        }
    }
    /// `wᵀ: [cols, rows]` packed (`w` the weight's values).
    fn nt(&self, w: &[f32]) -> &bf16::Packed {
        self.nt
            .get_or_init(|| bf16::pack_rhs(w, (1, self.cols), self.cols, self.rows))
    }
    /// `w: [rows, cols]` packed, afresh.
    fn nn(&self, w: &[f32]) -> bf16::Packed {
        bf16::pack_rhs(w, (self.cols, 1), self.rows, self.cols)
    }
}

/// Weights' bf16 packed copies, kept across calls (scoring and evaluation pack each weight
/// once) and made again only when a weight changes. An entry holds the weight's storage (a
/// shared handle, not a copy): while it does, that buffer is neither freed nor written in
/// place (burn-flex copies a shared buffer before writing), so the same address means the same
/// values. An optimizer step empties the cache first, so its in-place update needs no copy.
#[derive(Clone, Default)]
pub struct PackCache(Arc<Mutex<PackMap>>);

/// A weight's data address → its storage (held) and its packed copies.
type PackMap = HashMap<usize, (FlexTensor, Arc<WeightPacks>)>;

impl std::fmt::Debug for PackCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackCache({} weights)", self.lock().len())
    }
}

impl PackCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, PackMap> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The packed copies of weight `t: [rows, cols]`.
    pub fn of(&self, t: &FlexTensor, rows: usize, cols: usize) -> Arc<WeightPacks> {
        let v = values(t);
        assert_eq!(v.len(), rows * cols, "packed weight shape");
        let key = v.as_ptr() as usize;
        let mut map = self.lock();
        match map.get(&key) {
            Some((held, p)) if values(held).len() == v.len() && p.rows == rows => p.clone(),
            _ => {
                let p = Arc::new(WeightPacks::new(rows, cols));
                map.insert(key, (t.clone(), p.clone()));
                p
            }
        }
    }

    /// Drops every packed copy (before the weights are updated in place).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Bytes held in packed copies.
    pub fn bytes(&self) -> usize {
        let map = self.lock();
        let b = |o: &OnceLock<bf16::Packed>| o.get().map_or(0, |p| p.bytes());
        map.values().map(|(_, p)| b(&p.nt)).sum()
    }
}

/// `x: [m, k]` packed as a left operand when the products run in bf16.
fn lhs(dm: &Dims, x: &[f32], m: usize) -> Option<bf16::Packed> {
    dm.bf16.map(|_| bf16::pack_lhs(x, (x.len() / m, 1), m, x.len() / m))
}

/// `b: [k, n]` packed as the right operand of weight gradients ([`tn`]) when the products run
/// in bf16 (one packing for every gradient that shares `b`).
fn rhs(dm: &Dims, b: &[f32], k: usize) -> Option<bf16::Packed> {
    dm.bf16.map(|_| bf16::pack_rhs(b, (b.len() / k, 1), k, b.len() / k))
}

/// A new `aᵀ · b`, `a: [k,m]`, `b: [k,n]` (a projection's weight gradient), in bf16 when `dm`
/// says so (`bp`: `b` packed by [`rhs`]).
fn tn(dm: &Dims, a: &[f32], b: &[f32], bp: Option<&bf16::Packed>, m: usize, n: usize, k: usize) -> Vec<f32> {
    match (dm.bf16, bp) {
        (Some(u), Some(bp)) => bf16::matmul_new(u, &bf16::pack_lhs(a, (1, m), m, k), bp),
        _ => mm_tn(a, b, m, n, k),
    }
}

// The block's slots, by index in `arch::BLOCK`.
const AN: usize = arch::block_slot(ModuleKind::AttnNorm);
const WQ: usize = arch::block_slot(ModuleKind::Q);
const WK: usize = arch::block_slot(ModuleKind::K);
const WV: usize = arch::block_slot(ModuleKind::V);
const WO: usize = arch::block_slot(ModuleKind::O);
const MN: usize = arch::block_slot(ModuleKind::MlpNorm);
const WG: usize = arch::block_slot(ModuleKind::Gate);
const WU: usize = arch::block_slot(ModuleKind::Up);
const WD: usize = arch::block_slot(ModuleKind::Down);

/// A block's backward pass's results: `∂L/∂x`, its nine tensors' gradients and its three
/// biases'.
pub(crate) type BlockGrads = (Vec<f32>, [Option<Vec<f32>>; 9], [Option<Vec<f32>>; 3]);

/// What a block's backward pass needs of its forward pass.
pub struct Saved {
    x: Vec<f32>,
    rstd1: Vec<f32>,
    /// Queries and keys after RoPE, values.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output before `o_proj`, and each query row's log-sum-exp (`[b, nh, t]`).
    a: Vec<f32>,
    lse: Vec<f64>,
    x2: Vec<f32>,
    rstd2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

/// RoPE tables for positions `0..t`: `cos`, `sin` as `[t, hd]`.
pub(crate) struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    layout: RopeLayout,
    hd: usize,
}

impl Rope {
    pub fn new(cfg: &LlamaConfig, t: usize) -> Self {
        let hd = cfg.head_dim;
        let freqs = cfg.rope_dim_freqs();
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        for p in 0..t {
            for &f in &freqs {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self {
            cos,
            sin,
            layout: cfg.rope_layout,
            hd,
        }
    }

    /// Rotate every head of `x: [b·t, heads·hd]` in place by its position's angle, or back by
    /// it when `inverse` (the backward pass: RoPE is orthogonal, so its gradient map is its
    /// inverse, `dx = dy·cos − rot(dy)·sin`).
    fn apply(&self, x: &mut [f32], width: usize, t: usize, inverse: bool) {
        let hd = self.hd;
        let sign = if inverse { -1.0f32 } else { 1.0 };
        let half = matches!(self.layout, RopeLayout::Half);
        x.par_chunks_mut(width).enumerate().for_each_init(
            || vec![0f32; hd],
            |tmp, (r, row)| {
                let p = r % t;
                let (c, s) = (&self.cos[p * hd..(p + 1) * hd], &self.sin[p * hd..(p + 1) * hd]);
                rope_row(row, tmp, c, s, half, sign);
            },
        );
    }
}

simd_fn! {
    /// Rotate each head (`tmp.len()` wide) of one row by the angles whose cosines and sines are
    /// `c`, `s`, times `sign`; `half`: rotate-half pairs (i, i + hd/2), else adjacent pairs.
    fn rope_row(row: &mut [f32], tmp: &mut [f32], c: &[f32], s: &[f32], half: bool, sign: f32) {
        let hd = tmp.len();
        for head in row.chunks_exact_mut(hd) {
            tmp.copy_from_slice(head);
            if half {
                let h2 = hd / 2;
                let (lo, hi) = head.split_at_mut(h2);
                let (tl, th) = tmp.split_at(h2);
                let (cl, ch) = c.split_at(h2);
                let (sl, sh) = s.split_at(h2);
                for i in 0..h2 {
                    lo[i] = tl[i] * cl[i] - sign * th[i] * sl[i];
                    hi[i] = th[i] * ch[i] + sign * tl[i] * sh[i];
                }
            } else {
                for i in (0..hd).step_by(2) {
                    head[i] = tmp[i] * c[i] - sign * tmp[i + 1] * s[i];
                    head[i + 1] = tmp[i + 1] * c[i + 1] + sign * tmp[i] * s[i + 1];
                }
            }
        }
    }
}

/// `e^x` for f32, as a polynomial the compiler vectorises (≤ 2 ulp on the range used here:
/// softmax and sigmoid arguments; inputs are clamped to [-87, 88]).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding and subtracting rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Σ x in eight f64 lanes. A softmax's sum holds one term near 1 and thousands of tiny ones: an
/// f32 lane that already holds the large term drops each tiny one below half its ulp, a
/// systematic under-count that `softmax − onehot` then amplifies for confident predictions
/// (1e-3 of the largest Taylor score on the default model; `tests/numerics.rs`).
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v as f64;
        }
    }
    it.remainder().iter().map(|&v| v as f64).sum::<f64>() + acc.iter().sum::<f64>()
}

/// Σ x·y in eight lanes.
#[inline(always)]
fn dot_lanes(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (mut a, mut b) = (x.chunks_exact(8), y.chunks_exact(8));
    for (c, e) in (&mut a).zip(&mut b) {
        for ((s, u), v) in acc.iter_mut().zip(c).zip(e) {
            *s += u * v;
        }
    }
    let tail: f32 = a.remainder().iter().zip(b.remainder()).map(|(u, v)| u * v).sum();
    tail + acc.iter().sum::<f32>()
}

/// max x in eight lanes.
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    let m = it.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    acc.iter().fold(m, |m, &v| m.max(v))
}

/// `x ← e^(x − max x)` in place; returns `(max x, Σ e^(x − max x))`, the sum in f64.
#[inline(always)]
fn exp_shifted(x: &mut [f32]) -> (f32, f64) {
    let m = max_lanes(x);
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    (m, sum_lanes(x))
}

simd_fn! {
    /// `x ← softmax(x)` in place; returns its log-sum-exp, in f64: the backward pass recomputes
    /// `e^(s − lse)`, and an f32 `lse` of a row whose scores reach 20 is off by 1e-6.
    fn softmax_row(x: &mut [f32]) -> f64 {
        let (m, sum) = exp_shifted(x);
        let inv = (1.0 / sum) as f32;
        x.iter_mut().for_each(|v| *v *= inv);
        m as f64 + sum.ln()
    }
}

simd_fn! {
    /// One row of the output head's softmax cross-entropy: `row ← scale·(softmax(row) −
    /// onehot(target))`; returns the row's nll.
    fn head_row(row: &mut [f32], target: usize, scale: f32) -> f64 {
        let picked = row[target];
        let (m, sum) = exp_shifted(row);
        let k = (scale as f64 / sum) as f32;
        // The target's `scale·(p − 1)` from the other terms' sum, in f64: `p·scale − scale` in
        // f32 loses the digits that matter when p is near 1.
        let others = sum - row[target] as f64;
        row.iter_mut().for_each(|x| *x *= k);
        row[target] = (-(scale as f64) * others / sum) as f32;
        (m as f64 + sum.ln()) - picked as f64
    }
}

simd_fn! {
    /// One query row of the attention backward pass: `p ← exp(s − lse)` (the recomputed
    /// probabilities, `p` holding the scores `s` on entry) and `ds ← p ⊙ (dp − D)`, `ds`
    /// holding `dp` on entry.
    fn dsoftmax_row(p: &mut [f32], ds: &mut [f32], lse: f64, d: f32) {
        for (pv, dv) in p.iter_mut().zip(ds.iter_mut()) {
            *pv = exp((*pv as f64 - lse) as f32);
            *dv = *pv * (*dv - d);
        }
    }
}

struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}
impl Ptr {
    fn at(&self, off: usize) -> *mut f32 {
        unsafe { self.0.add(off) }
    }
}

/// `dst = beta·lhs·rhs` (or `dst += …` when `acc`), every operand given by pointer and
/// (row stride, column stride).
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_s: (usize, usize),
    lhs: *const f32,
    lhs_s: (usize, usize),
    rhs: *const f32,
    rhs_s: (usize, usize),
    acc: bool,
    beta: f32,
    par: Parallelism,
) {
    gemm(
        m,
        n,
        k,
        dst,
        dst_s.1 as isize,
        dst_s.0 as isize,
        acc,
        lhs,
        lhs_s.1 as isize,
        lhs_s.0 as isize,
        rhs,
        rhs_s.1 as isize,
        rhs_s.0 as isize,
        1.0,
        beta,
        false,
        false,
        false,
        par,
    )
}

/// Rows or columns per part of a split product are a multiple of this (the micro-kernels'
/// register tiles divide it).
const SPLIT_ALIGN: usize = 48;

/// `c[m,n] (+)= a · b` over every thread, `a` an `m × k` and `b` a `k × n` matrix read with the
/// given (row, column) strides. The larger of `m` and `n` is cut into one part per thread and
/// each part is an independent single-threaded product: on this 2-core machine that is as fast
/// as gemm's own threading or faster on every shape of this model measured, up to 1.4× on the
/// small ones (`examples/gemm_shapes.rs`). The split depends only on the shape and the thread
/// count.
///
/// # Safety
/// `c` is valid for writes of `m · n` elements (and reads when `acc`); `a` and `b` for reads
/// of `m · k` and `k · n`. Without `acc`, `c` may be uninitialised: every element is written
/// and none read.
#[allow(clippy::too_many_arguments)]
unsafe fn mm_par(
    c: *mut f32,
    a: *const f32,
    a_s: (usize, usize),
    b: *const f32,
    b_s: (usize, usize),
    m: usize,
    n: usize,
    k: usize,
    acc: bool,
) {
    let along_m = m >= n;
    let len = m.max(n);
    let step = len
        .div_ceil(rayon::current_num_threads().max(1))
        .next_multiple_of(SPLIT_ALIGN);
    let (cp, ap, bp) = (Ptr(c), Ptr(a as *mut f32), Ptr(b as *mut f32));
    (0..len.div_ceil(step)).into_par_iter().for_each(|part| {
        let (i0, i1) = (part * step, ((part + 1) * step).min(len));
        let (mm_, nn_, c0, a0, b0) = if along_m {
            (i1 - i0, n, i0 * n, i0 * a_s.0, 0)
        } else {
            (m, i1 - i0, i0, 0, i0 * b_s.1)
        };
        // SAFETY: the parts write disjoint rows (or columns) of `c`; the caller vouches for
        // the extents.
        unsafe {
            mm(
                mm_,
                nn_,
                k,
                cp.at(c0),
                (n, 1),
                ap.at(a0),
                a_s,
                bp.at(b0),
                b_s,
                acc,
                1.0,
                Parallelism::None,
            )
        }
    });
}

/// `c[m,n] (+)= a · b` ([`mm_par`]) on slices of exactly the operands' sizes.
#[allow(clippy::too_many_arguments)]
fn mm_into(
    c: &mut [f32],
    a: &[f32],
    a_s: (usize, usize),
    b: &[f32],
    b_s: (usize, usize),
    m: usize,
    n: usize,
    k: usize,
    acc: bool,
) {
    assert!(c.len() == m * n && a.len() == m * k && b.len() == k * n);
    // SAFETY: the sizes are checked above.
    unsafe { mm_par(c.as_mut_ptr(), a.as_ptr(), a_s, b.as_ptr(), b_s, m, n, k, acc) }
}

/// A new `len`-element vector whose every element `write` stores through the pointer it gets,
/// without zero-filling it first (gemm overwrites its output; `vec![0; len]` would be one more
/// pass over memory).
///
/// # Safety
/// `write` stores all `len` elements and reads none it has not stored.
unsafe fn written(len: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    write(v.as_mut_ptr());
    // SAFETY: the caller's promise: all `len` elements are initialised.
    unsafe { v.set_len(len) };
    v
}

/// A new `c[m,n] = a · b` ([`mm_into`]'s operands).
#[allow(clippy::too_many_arguments)]
fn mm_new(a: &[f32], a_s: (usize, usize), b: &[f32], b_s: (usize, usize), m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(a.len() == m * k && b.len() == k * n);
    // SAFETY: without `acc` gemm writes every element of `c` and reads none; sizes checked.
    unsafe { written(m * n, |c| mm_par(c, a.as_ptr(), a_s, b.as_ptr(), b_s, m, n, k, false)) }
}

/// `c[m,n] (+)= a[m,k] · bᵀ`, `b: [n,k]` (a projection with an HF-layout weight).
fn mm_nt(c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, acc: bool) {
    mm_into(c, a, (k, 1), b, (1, k), m, n, k, acc)
}

/// A new `a[m,k] · bᵀ`, `b: [n,k]`.
fn nt_new(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    mm_new(a, (k, 1), b, (1, k), m, n, k)
}

/// `c[m,n] (+)= a[m,k] · b[k,n]` (the input gradient of a projection).
fn mm_nn(c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, acc: bool) {
    mm_into(c, a, (k, 1), b, (n, 1), m, n, k, acc)
}

/// `c[m,n] = a[m,k] · b[k,n]` as the block computes it (for `examples/bf16_shapes.rs`).
#[doc(hidden)]
pub fn bench_nn(c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize) {
    mm_nn(c, a, b, m, n, k, false)
}

/// A new `a[m,k] · b[k,n]`.
fn nn_new(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    mm_new(a, (k, 1), b, (n, 1), m, n, k)
}

/// A new `aᵀ · b`, `a: [k,m]`, `b: [k,n]` (a projection's weight gradient).
fn mm_tn(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    mm_new(a, (1, m), b, (n, 1), m, n, k)
}

/// Rows of `d` per rayon task in element-wise loops.
fn chunk_rows(n: usize) -> usize {
    n.div_ceil(4 * rayon::current_num_threads()).max(1)
}

simd_fn! {
    /// [`rms_fwd`] on whole rows: `o = x · r · w`, `r = 1/√(mean x² + eps)` per row.
    fn rms_fwd_rows(o: &mut [f32], r: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let d = w.len();
        for ((o, r), x) in o.chunks_exact_mut(d).zip(r.iter_mut()).zip(x.chunks_exact(d)) {
            *r = 1.0 / (dot_lanes(x, x) / d as f32 + eps).sqrt();
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = x * *r * w;
            }
        }
    }
}

/// RMSNorm forward: `out = x · rstd · w`, `rstd` per row.
fn rms_fwd(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], rstd: &mut [f32]) {
    let d = w.len();
    let rows = chunk_rows(rstd.len());
    out.par_chunks_mut(rows * d)
        .zip(rstd.par_chunks_mut(rows))
        .zip(x.par_chunks(rows * d))
        .for_each(|((o, r), x)| rms_fwd_rows(o, r, x, w, eps));
}

simd_fn! {
    /// [`rms_apply`] on whole rows.
    fn rms_apply_rows(o: &mut [f32], x: &[f32], r: &[f32], w: &[f32]) {
        let d = w.len();
        for ((o, x), r) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(r) {
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = x * r * w;
            }
        }
    }
}

/// RMSNorm with known per-row `rstd` (the backward pass's recomputation): `out = x · rstd · w`.
fn rms_apply(x: &[f32], rstd: &[f32], w: &[f32], out: &mut [f32]) {
    let d = w.len();
    let rows = chunk_rows(rstd.len());
    out.par_chunks_mut(rows * d)
        .zip(x.par_chunks(rows * d))
        .zip(rstd.par_chunks(rows))
        .for_each(|((o, x), r)| rms_apply_rows(o, x, r, w));
}

simd_fn! {
    /// [`rms_bwd`] on whole rows, adding these rows' share of `∂L/∂w` into `dw`.
    fn rms_bwd_rows(dx: &mut [f32], dh: &[f32], x: &[f32], rstd: &[f32], w: &[f32], dw: &mut [f32]) {
        let d = w.len();
        for (((dx, dh), x), &r) in dx.chunks_exact_mut(d).zip(dh.chunks_exact(d)).zip(x.chunks_exact(d)).zip(rstd) {
            // x̂ = x·r; ∂L/∂x̂ = dh·w; ∂L/∂x = r·(∂L/∂x̂ − x̂·mean(∂L/∂x̂ · x̂)).
            // The mean's sum in eight lanes, as `dot_lanes`.
            let mut dot = [0f32; 8];
            let (mut dwc, mut dhc, mut xc, mut wc) =
                (dw.chunks_exact_mut(8), dh.chunks_exact(8), x.chunks_exact(8), w.chunks_exact(8));
            for (((dw, dh), x), w) in (&mut dwc).zip(&mut dhc).zip(&mut xc).zip(&mut wc) {
                for j in 0..8 {
                    let xh = x[j] * r;
                    dw[j] += dh[j] * xh;
                    dot[j] += dh[j] * w[j] * xh;
                }
            }
            let mut tail = 0f32;
            let rest = dwc.into_remainder().iter_mut().zip(dhc.remainder()).zip(xc.remainder());
            for (((dw, dh), x), w) in rest.zip(wc.remainder()) {
                let xh = x * r;
                *dw += dh * xh;
                tail += dh * w * xh;
            }
            let m = (tail + dot.iter().sum::<f32>()) / d as f32;
            for (((dx, dh), x), w) in dx.iter_mut().zip(dh).zip(x).zip(w) {
                *dx += r * (dh * w - x * r * m);
            }
        }
    }
}

/// RMSNorm backward from `dh = ∂L/∂out`: adds `∂L/∂x` into `dx`, returns `∂L/∂w`.
fn rms_bwd(dh: &[f32], x: &[f32], rstd: &[f32], w: &[f32], dx: &mut [f32]) -> Vec<f32> {
    let d = w.len();
    // A fixed number of rows per partial sum of ∂L/∂w, whatever the thread count.
    let rows = 32;
    dx.par_chunks_mut(rows * d)
        .zip(dh.par_chunks(rows * d))
        .zip(x.par_chunks(rows * d))
        .zip(rstd.par_chunks(rows))
        .map(|(((dx, dh), x), rstd)| {
            let mut dw = vec![0f32; d];
            rms_bwd_rows(dx, dh, x, rstd, w, &mut dw);
            dw
        })
        // Summed in chunk order (a rayon reduce's tree depends on work stealing): the same
        // bits every run.
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0f32; d], |mut a, b| {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
            a
        })
}

/// Query rows per block of causal attention: block `[r0, r1)` only meets keys `0..r1`, so the
/// masked upper triangle is mostly skipped (10 of 16 score tiles at t = 256).
const QBLOCK: usize = 64;

/// The query-row blocks of a causal `t × t` attention: `(r0, r1)`.
fn qblocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(QBLOCK).map(move |r0| (r0, (r0 + QBLOCK).min(t)))
}

// The three single-threaded products of one query block of attention, on one thread's `[t, t]`
// scratch (row stride `t`), query-side rows (stride `qw`: Q, dA, dQ, A) and key-side rows
// (stride `kw`: K, V, dK, dV); `m` query rows meet `keys` keys. Safety: each pointer must
// reach the rows and columns its matrix names.

/// `w[m, keys] = beta · x[m, hd] · y[keys, hd]ᵀ`: scores `Q Kᵀ` or `dA Vᵀ`.
unsafe fn attn_scores(dm: &Dims, w: *mut f32, x: *const f32, y: *const f32, m: usize, keys: usize, beta: f32) {
    let (t, qw, kw) = (dm.t, dm.qw(), dm.kw());
    unsafe {
        mm(
            m,
            keys,
            dm.hd,
            w,
            (t, 1),
            x,
            (qw, 1),
            y,
            (1, kw),
            false,
            beta,
            Parallelism::None,
        )
    }
}

/// `x[m, hd] = beta · w[m, keys] · y[keys, hd]`: `A = P V` or `dQ = dS K`.
unsafe fn attn_rows(dm: &Dims, x: *mut f32, w: *const f32, y: *const f32, m: usize, keys: usize, beta: f32) {
    let (t, qw, kw) = (dm.t, dm.qw(), dm.kw());
    unsafe {
        mm(
            m,
            dm.hd,
            keys,
            x,
            (qw, 1),
            w,
            (t, 1),
            y,
            (kw, 1),
            false,
            beta,
            Parallelism::None,
        )
    }
}

/// `y[keys, hd] += beta · w[m, keys]ᵀ · x[m, hd]`: `dV += Pᵀ dA` or `dK += dSᵀ Q`.
unsafe fn attn_keys(dm: &Dims, y: *mut f32, w: *const f32, x: *const f32, m: usize, keys: usize, beta: f32) {
    let (t, qw, kw) = (dm.t, dm.qw(), dm.kw());
    unsafe {
        mm(
            keys,
            dm.hd,
            m,
            y,
            (kw, 1),
            w,
            (1, t),
            x,
            (qw, 1),
            true,
            beta,
            Parallelism::None,
        )
    }
}

/// Causal attention of `q: [b·t, nh·hd]` over `k, v: [b·t, nkv·hd]` (head `h` reads key/value
/// head `h / (nh / nkv)`), into `a: [b·t, nh·hd]`; each query row's log-sum-exp into `lse`.
fn attn_fwd(dm: &Dims, q: &[f32], k: &[f32], v: &[f32], a: &mut [f32], lse: &mut [f64]) {
    let (t, hd, nh, rep) = (dm.t, dm.hd, dm.nh, dm.nh / dm.nkv);
    let (qw, kw) = (dm.qw(), dm.kw());
    let scale = 1.0 / (hd as f32).sqrt();
    let out = Ptr(a.as_mut_ptr());
    lse.par_chunks_mut(t).enumerate().for_each_init(
        || vec![0f32; t * t],
        |s, (task, lse)| {
            let (bi, h) = (task / nh, task % nh);
            let g = h / rep;
            let qp = q[bi * t * qw + h * hd..].as_ptr();
            let kp = k[bi * t * kw + g * hd..].as_ptr();
            let vp = v[bi * t * kw + g * hd..].as_ptr();
            for (r0, r1) in qblocks(t) {
                let sp = s[r0 * t..].as_mut_ptr();
                // S[r0..r1, 0..r1] = scale · Q Kᵀ
                unsafe { attn_scores(dm, sp, qp.add(r0 * qw), kp, r1 - r0, r1, scale) };
                for i in r0..r1 {
                    let row = &mut s[i * t..i * t + r1];
                    let (live, masked) = row.split_at_mut(i + 1);
                    lse[i] = softmax_row(live);
                    masked.fill(0.0);
                }
                // A[r0..r1] = P[r0..r1, 0..r1] · V[0..r1]
                let o = out.at(bi * t * qw + r0 * qw + h * hd);
                unsafe { attn_rows(dm, o, s[r0 * t..].as_ptr(), vp, r1 - r0, r1, 1.0) };
            }
        },
    );
}

/// The backward pass of [`attn_fwd`] from `da = ∂L/∂a`: `∂L/∂q`, `∂L/∂k`, `∂L/∂v` (with
/// respect to the rotated queries and keys).
#[allow(clippy::too_many_arguments)]
fn attn_bwd(
    dm: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    a: &[f32],
    lse: &[f64],
    da: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, hd, nh, nkv, rep) = (dm.t, dm.hd, dm.nh, dm.nkv, dm.nh / dm.nkv);
    let (n, qw, kw) = (dm.n(), dm.qw(), dm.kw());
    let scale = 1.0 / (hd as f32).sqrt();
    let mut dq = vec![0f32; n * qw];
    let mut dk = vec![0f32; n * kw];
    let mut dv = vec![0f32; n * kw];
    let (dqp, dkp, dvp) = (Ptr(dq.as_mut_ptr()), Ptr(dk.as_mut_ptr()), Ptr(dv.as_mut_ptr()));
    // One task per (row, key/value head): its query heads accumulate into its dk, dv alone.
    (0..dm.b * nkv).into_par_iter().for_each_init(
        || (vec![0f32; t * t], vec![0f32; t * t]),
        |(p, ds), task| {
            let (bi, g) = (task / nkv, task % nkv);
            let kp = k[bi * t * kw + g * hd..].as_ptr();
            let vp = v[bi * t * kw + g * hd..].as_ptr();
            let (dk_at, dv_at) = (dkp.at(bi * t * kw + g * hd), dvp.at(bi * t * kw + g * hd));
            for r in 0..rep {
                let h = g * rep + r;
                let off = bi * t * qw + h * hd;
                let (qp, dap) = (q[off..].as_ptr(), da[off..].as_ptr());
                let lse = &lse[(bi * nh + h) * t..(bi * nh + h + 1) * t];
                for (r0, r1) in qblocks(t) {
                    let m = r1 - r0;
                    let (pp, dsp) = (p[r0 * t..].as_mut_ptr(), ds[r0 * t..].as_mut_ptr());
                    unsafe {
                        let (q0, da0) = (qp.add(r0 * qw), dap.add(r0 * qw));
                        // S = scale · Q Kᵀ (recomputed), dP = dA · Vᵀ, over keys 0..r1
                        attn_scores(dm, pp, q0, kp, m, r1, scale);
                        attn_scores(dm, dsp, da0, vp, m, r1, 1.0);
                    }
                    for i in r0..r1 {
                        // D_i = dA_i · A_i;  P = exp(S − lse);  dS = P ⊙ (dP − D)
                        let o = off + i * qw;
                        let di = dot_lanes(&da[o..o + hd], &a[o..o + hd]);
                        let (prow, dsrow) = (&mut p[i * t..i * t + r1], &mut ds[i * t..i * t + r1]);
                        let (pl, pm) = prow.split_at_mut(i + 1);
                        let (dl, dmk) = dsrow.split_at_mut(i + 1);
                        dsoftmax_row(pl, dl, lse[i], di);
                        pm.fill(0.0);
                        dmk.fill(0.0);
                    }
                    unsafe {
                        let (p0, ds0) = (p[r0 * t..].as_ptr(), ds[r0 * t..].as_ptr());
                        let (q0, da0) = (qp.add(r0 * qw), dap.add(r0 * qw));
                        // dV[0..r1] += Pᵀ · dA;  dQ[r0..r1] = scale · dS · K;  dK[0..r1] += scale · dSᵀ · Q
                        attn_keys(dm, dv_at, p0, da0, m, r1, 1.0);
                        attn_rows(dm, dqp.at(off + r0 * qw), ds0, kp, m, r1, scale);
                        attn_keys(dm, dk_at, ds0, q0, m, r1, scale);
                    }
                }
            }
        },
    );
    (dq, dk, dv)
}

simd_fn! {
    /// `o = SiLU(g) · u`.
    fn swiglu_chunk(o: &mut [f32], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

simd_fn! {
    /// The backward pass of [`swiglu_chunk`]: `dg` holds `∂L/∂(SiLU(g)·u)` on entry and
    /// `∂L/∂g` on return; `du ← ∂L/∂u`.
    fn swiglu_bwd_chunk(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32]) {
        for (((dg, du), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u) {
            let sg = 1.0 / (1.0 + exp(-g));
            let ds = *dg;
            *du = ds * g * sg;
            *dg = ds * u * sg * (1.0 + g * (1.0 - sg));
        }
    }
}

/// `√(2/π)`, GELU's tanh approximation's scale.
const GELU_C: f32 = 0.797_884_6;
/// The cubic term's coefficient of GELU's tanh approximation.
const GELU_A: f32 = 0.044_715;

simd_fn! {
    /// `o = GELU_tanh(g) · u`, with `GELU_tanh(g) = g/2 · (1 + tanh(z)) = g · σ(2z)`,
    /// `z = √(2/π) · (g + 0.044715 g³)` (transformers' `gelu_pytorch_tanh`).
    fn geglu_chunk(o: &mut [f32], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            let z = GELU_C * (g + GELU_A * g * g * g);
            *o = g / (1.0 + exp(-2.0 * z)) * u;
        }
    }
}

simd_fn! {
    /// The backward pass of [`geglu_chunk`], as [`swiglu_bwd_chunk`]'s:
    /// `d/dg [g·σ(2z)] = σ(2z) + g · σ(2z)·(1 − σ(2z)) · 2z'`, `z' = √(2/π)·(1 + 3·0.044715 g²)`.
    fn geglu_bwd_chunk(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32]) {
        for (((dg, du), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u) {
            let z = GELU_C * (g + GELU_A * g * g * g);
            let s = 1.0 / (1.0 + exp(-2.0 * z));
            let dz = GELU_C * (1.0 + 3.0 * GELU_A * g * g);
            let ds = *dg;
            *du = ds * g * s;
            *dg = ds * u * (s + g * s * (1.0 - s) * 2.0 * dz);
        }
    }
}

/// The gated MLP's inner product `act(gate) · up` (SiLU, or GELU's tanh form when `dm.gelu`).
fn glu(dm: &Dims, gate: &[f32], up: &[f32], out: &mut [f32]) {
    let kernel = if dm.gelu { geglu_chunk } else { swiglu_chunk };
    let c = chunk_rows(out.len());
    out.par_chunks_mut(c)
        .zip(gate.par_chunks(c))
        .zip(up.par_chunks(c))
        .for_each(|((o, g), u)| kernel(o, g, u));
}

impl<'a> BlockWeights<'a> {
    /// The weights in `storage` (`Block::storage` in llama.rs).
    pub fn of(storage: &'a [FlexTensor; 9]) -> Self {
        Self {
            w: std::array::from_fn(|j| values(&storage[j])),
            packs: Default::default(),
            bias: None,
            norms: None,
        }
    }

    /// With the block's q, k and v biases (Qwen2) and its norm form (`dm.plus_one`: Gemma).
    pub fn with(mut self, dm: &Dims, bias: Option<&'a [FlexTensor; 3]>) -> Self {
        self.bias = bias.map(|b| std::array::from_fn(|j| values(&b[j])));
        if dm.plus_one {
            self.norms = Some([AN, MN].map(|j| norm_scale(self.w[j], true).into_owned()));
        }
        self
    }

    /// The scale of norm `j` (`AN` or `MN`): `1 + w` or `w`.
    fn norm(&self, j: usize) -> &[f32] {
        match &self.norms {
            Some(n) => &n[usize::from(j == MN)],
            None => self.w[j],
        }
    }

    /// The weights in `storage`, with their packed copies from `cache` when `dm`'s products run
    /// in bf16.
    pub fn packed(storage: &'a [FlexTensor; 9], dm: &Dims, cache: &PackCache) -> Self {
        let mut s = Self::of(storage);
        if dm.bf16.is_some() {
            for j in [WQ, WK, WV, WO, WG, WU, WD] {
                let (r, c) = dm.shape(j);
                s.packs[j] = Some(cache.of(&storage[j], r, c));
            }
        }
        s
    }

    /// `c (+)= x · w[j]ᵀ` (`x: [n, in]` and, in bf16, `xp` it packed).
    fn proj_into(&self, dm: &Dims, c: &mut [f32], x: &[f32], xp: Option<&bf16::Packed>, j: usize, acc: bool) {
        let (out, inp) = dm.shape(j);
        match (dm.bf16, xp, &self.packs[j]) {
            (Some(u), Some(xp), Some(p)) => bf16::matmul(u, c, xp, p.nt(self.w[j]), acc),
            _ => mm_nt(c, x, self.w[j], dm.n(), out, inp, acc),
        }
    }

    /// A new `x · w[j]ᵀ`.
    fn proj(&self, dm: &Dims, x: &[f32], xp: Option<&bf16::Packed>, j: usize) -> Vec<f32> {
        let (out, inp) = dm.shape(j);
        match (dm.bf16, xp, &self.packs[j]) {
            (Some(u), Some(xp), Some(p)) => bf16::matmul_new(u, xp, p.nt(self.w[j])),
            _ => nt_new(x, self.w[j], dm.n(), out, inp),
        }
    }

    /// `c (+)= dy · w[j]` (`dy: [n, out]` and, in bf16, `dyp` it packed).
    fn back_into(&self, dm: &Dims, c: &mut [f32], dy: &[f32], dyp: Option<&bf16::Packed>, j: usize, acc: bool) {
        let (out, inp) = dm.shape(j);
        match (dm.bf16, dyp, &self.packs[j]) {
            (Some(u), Some(dyp), Some(p)) => bf16::matmul(u, c, dyp, &p.nn(self.w[j]), acc),
            _ => mm_nn(c, dy, self.w[j], dm.n(), inp, out, acc),
        }
    }

    /// A new `dy · w[j]`.
    fn back(&self, dm: &Dims, dy: &[f32], dyp: Option<&bf16::Packed>, j: usize) -> Vec<f32> {
        let (out, inp) = dm.shape(j);
        match (dm.bf16, dyp, &self.packs[j]) {
            (Some(u), Some(dyp), Some(p)) => bf16::matmul_new(u, dyp, &p.nn(self.w[j])),
            _ => nn_new(dy, self.w[j], dm.n(), inp, out),
        }
    }

    /// The block on `x: [b·t, d]`; returns its output and what its backward pass needs.
    pub fn forward(&self, dm: &Dims, rope: &Rope, x: Vec<f32>) -> (Vec<f32>, Saved) {
        let (n, d, ff, qw) = (dm.n(), dm.d, dm.ff, dm.qw());
        let mut h = vec![0f32; n * d];
        let mut rstd1 = vec![0f32; n];
        rms_fwd(&x, self.norm(AN), dm.eps, &mut h, &mut rstd1);
        let hp = lhs(dm, &h, n);
        let mut q = self.proj(dm, &h, hp.as_ref(), WQ);
        let mut k = self.proj(dm, &h, hp.as_ref(), WK);
        let mut v = self.proj(dm, &h, hp.as_ref(), WV);
        drop(hp);
        if let Some([bq, bk, bv]) = self.bias {
            add_bias(&mut q, bq);
            add_bias(&mut k, bk);
            add_bias(&mut v, bv);
        }
        rope.apply(&mut q, qw, dm.t, false);
        rope.apply(&mut k, dm.kw(), dm.t, false);
        let mut a = vec![0f32; n * qw];
        let mut lse = vec![0f64; dm.b * dm.nh * dm.t];
        attn_fwd(dm, &q, &k, &v, &mut a, &mut lse);
        let mut x2 = x.clone();
        self.proj_into(dm, &mut x2, &a, lhs(dm, &a, n).as_ref(), WO, true);
        let mut rstd2 = vec![0f32; n];
        rms_fwd(&x2, self.norm(MN), dm.eps, &mut h, &mut rstd2);
        let hp = lhs(dm, &h, n);
        let gate = self.proj(dm, &h, hp.as_ref(), WG);
        let up = self.proj(dm, &h, hp.as_ref(), WU);
        drop(hp);
        let mut gs = vec![0f32; n * ff];
        glu(dm, &gate, &up, &mut gs);
        let mut y = x2.clone();
        self.proj_into(dm, &mut y, &gs, lhs(dm, &gs, n).as_ref(), WD, true);
        let saved = Saved {
            x,
            rstd1,
            q,
            k,
            v,
            a,
            lse,
            x2,
            rstd2,
            gate,
            up,
        };
        (y, saved)
    }

    /// The backward pass from `dy = ∂L/∂y`: `∂L/∂x`, each parameter's gradient where
    /// `need[j]` (in `arch::BLOCK` order), and each bias's where `need_bias[j]`
    /// (`arch::BIASES` order; a block without biases gives none).
    pub fn backward(
        &self,
        dm: &Dims,
        rope: &Rope,
        s: Saved,
        dy: &[f32],
        need: [bool; 9],
        need_bias: [bool; 3],
    ) -> BlockGrads {
        let mut bias_grads: [Option<Vec<f32>>; 3] = Default::default();
        let (n, d, ff, qw, kw) = (dm.n(), dm.d, dm.ff, dm.qw(), dm.kw());
        let mut grads: [Option<Vec<f32>>; 9] = Default::default();

        // MLP: y = x2 + (SiLU(gate) · up) · W_dᵀ.
        if need[WD] {
            let mut gs = vec![0f32; n * ff];
            glu(dm, &s.gate, &s.up, &mut gs);
            grads[WD] = Some(tn(dm, dy, &gs, rhs(dm, &gs, n).as_ref(), d, ff, n));
        }
        let mut buf = self.back(dm, dy, lhs(dm, dy, n).as_ref(), WD); // ∂L/∂(SiLU(g)·u)
        let mut dup = vec![0f32; n * ff];
        {
            let kernel = if dm.gelu { geglu_bwd_chunk } else { swiglu_bwd_chunk };
            let c = chunk_rows(n * ff);
            buf.par_chunks_mut(c)
                .zip(dup.par_chunks_mut(c))
                .zip(s.gate.par_chunks(c))
                .zip(s.up.par_chunks(c))
                .for_each(|(((dg, du), g), u)| kernel(dg, du, g, u));
        }
        let dgate = buf;
        drop(s.gate);
        drop(s.up);
        let mut h = vec![0f32; n * d];
        rms_apply(&s.x2, &s.rstd2, self.norm(MN), &mut h);
        let hp = if need[WG] || need[WU] { rhs(dm, &h, n) } else { None };
        if need[WG] {
            grads[WG] = Some(tn(dm, &dgate, &h, hp.as_ref(), ff, d, n));
        }
        if need[WU] {
            grads[WU] = Some(tn(dm, &dup, &h, hp.as_ref(), ff, d, n));
        }
        drop(hp);
        let mut dh = self.back(dm, &dgate, lhs(dm, &dgate, n).as_ref(), WG);
        self.back_into(dm, &mut dh, &dup, lhs(dm, &dup, n).as_ref(), WU, true);
        drop(dgate);
        drop(dup);
        let mut dx2 = dy.to_vec();
        let dmn = rms_bwd(&dh, &s.x2, &s.rstd2, self.norm(MN), &mut dx2);
        if need[MN] {
            grads[MN] = Some(dmn);
        }

        // Attention: x2 = x + a · W_oᵀ.
        if need[WO] {
            grads[WO] = Some(tn(dm, &dx2, &s.a, rhs(dm, &s.a, n).as_ref(), d, qw, n));
        }
        let da = self.back(dm, &dx2, lhs(dm, &dx2, n).as_ref(), WO);
        let (mut dq, mut dk, dv) = attn_bwd(dm, &s.q, &s.k, &s.v, &s.a, &s.lse, &da);
        drop(da);
        rope.apply(&mut dq, qw, dm.t, true);
        rope.apply(&mut dk, kw, dm.t, true);
        if self.bias.is_some() {
            for (j, (g, width)) in [(&dq, qw), (&dk, kw), (&dv, kw)].into_iter().enumerate() {
                if need_bias[j] {
                    bias_grads[j] = Some(column_sums(g, width));
                }
            }
        }
        rms_apply(&s.x, &s.rstd1, self.norm(AN), &mut h);
        let hp = if need[WQ] || need[WK] || need[WV] {
            rhs(dm, &h, n)
        } else {
            None
        };
        if need[WQ] {
            grads[WQ] = Some(tn(dm, &dq, &h, hp.as_ref(), qw, d, n));
        }
        if need[WK] {
            grads[WK] = Some(tn(dm, &dk, &h, hp.as_ref(), kw, d, n));
        }
        if need[WV] {
            grads[WV] = Some(tn(dm, &dv, &h, hp.as_ref(), kw, d, n));
        }
        drop(hp);
        self.back_into(dm, &mut dh, &dq, lhs(dm, &dq, n).as_ref(), WQ, false);
        self.back_into(dm, &mut dh, &dk, lhs(dm, &dk, n).as_ref(), WK, true);
        self.back_into(dm, &mut dh, &dv, lhs(dm, &dv, n).as_ref(), WV, true);
        let mut dx = dx2;
        let dan = rms_bwd(&dh, &s.x, &s.rstd1, self.norm(AN), &mut dx);
        if need[AN] {
            grads[AN] = Some(dan);
        }
        (dx, grads, bias_grads)
    }
}

/// The final RMSNorm: normed `x` and its per-row `rstd`.
pub(crate) fn final_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut h = vec![0f32; x.len()];
    let mut rstd = vec![0f32; x.len() / w.len()];
    rms_fwd(x, w, eps, &mut h, &mut rstd);
    (h, rstd)
}

/// The final RMSNorm's backward pass: `∂L/∂x` and `∂L/∂w`.
pub(crate) fn final_norm_bwd(dh: &[f32], x: &[f32], rstd: &[f32], w: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; x.len()];
    let dw = rms_bwd(dh, x, rstd, w, &mut dx);
    (dx, dw)
}

/// Logits `h · Wᵀ` (`h: [n, d]`, `w: [vocab, d]`) in bf16 on `unit`, with `w`'s packed copy
/// from `cache`.
pub(crate) fn head_logits(unit: bf16::Unit, h: &[f32], w: &FlexTensor, cache: &PackCache, d: usize) -> Vec<f32> {
    let wv = values(w);
    let p = cache.of(w, wv.len() / d, d);
    bf16::matmul_new(unit, &bf16::pack_lhs(h, (d, 1), h.len() / d, d), p.nt(wv))
}

/// Logit elements computed at once in [`head`] (64 MB): 341 tokens of a 49152 vocabulary.
const HEAD_CHUNK_ELEMS: usize = 1 << 24;

/// The output head's cross-entropy, fused and chunked: logits `h · Wᵀ` (`h: [n, d]`,
/// `w: [vocab, d]`) a few hundred tokens at a time, the softmax and `∂L/∂logits = softmax −
/// onehot` in one pass over each row, then `∂L/∂h` and `∂L/∂W` by two matmuls. Returns
/// Σ nll (natural log), `∂(scale · Σ nll)/∂h` and, when `want_dw`, `∂(scale · Σ nll)/∂W`.
pub fn head(
    h: &[f32],
    w: &[f32],
    targets: &[u32],
    scale: f32,
    want_dw: bool,
    bf16: Option<(bf16::Unit, &WeightPacks)>,
) -> (f64, Vec<f32>, Option<Vec<f32>>) {
    let n = targets.len();
    let d = h.len() / n;
    let vocab = w.len() / d;
    assert!(n > 0 && h.len() == n * d && w.len() == vocab * d);
    let chunk = (HEAD_CHUNK_ELEMS / vocab).clamp(1, n);
    let mut dh: Vec<f32> = Vec::with_capacity(n * d);
    let mut dw: Vec<f32> = Vec::with_capacity(if want_dw { vocab * d } else { 0 });
    if bf16.is_some() {
        // The bf16 products write into initialised memory.
        dh.resize(n * d, 0.0);
        if want_dw {
            dw.resize(vocab * d, 0.0);
        }
    }
    // `dh = ∂L/∂logits · W`'s packed `W`, once for every chunk.
    let wn = bf16.map(|(_, p)| p.nn(w));
    let mut nll = 0f64;
    for start in (0..n).step_by(chunk) {
        let c = chunk.min(n - start);
        let hc = &h[start * d..(start + c) * d];
        let mut lc = match bf16 {
            Some((u, p)) => bf16::matmul_new(u, &bf16::pack_lhs(hc, (d, 1), c, d), p.nt(w)),
            None => nt_new(hc, w, c, vocab, d),
        };
        nll += lc
            .par_chunks_mut(vocab)
            .zip(&targets[start..start + c])
            .map(|(row, &tg)| head_row(row, tg as usize, scale))
            .collect::<Vec<f64>>()
            .iter()
            .sum::<f64>();
        if let (Some((u, _)), Some(wn)) = (bf16, &wn) {
            let dhc = &mut dh[start * d..(start + c) * d];
            bf16::matmul(u, dhc, &bf16::pack_lhs(&lc, (vocab, 1), c, vocab), wn, false);
            if want_dw {
                let a = bf16::pack_lhs(&lc, (1, vocab), vocab, c);
                bf16::matmul(u, &mut dw, &a, &bf16::pack_rhs(hc, (d, 1), c, d), start > 0);
            }
            continue;
        }
        // SAFETY: rows start..start + c of `dh` (inside its capacity) are written, not read;
        // the first chunk writes all of `dw` and the later ones add to it.
        unsafe {
            let dh0 = dh.as_mut_ptr().add(start * d);
            mm_par(dh0, lc.as_ptr(), (vocab, 1), w.as_ptr(), (d, 1), c, d, vocab, false);
            if want_dw {
                mm_par(
                    dw.as_mut_ptr(),
                    lc.as_ptr(),
                    (1, vocab),
                    hc.as_ptr(),
                    (d, 1),
                    vocab,
                    d,
                    c,
                    start > 0,
                );
            }
        }
    }
    // SAFETY: the chunks cover rows 0..n of `dh`, and the first chunk all of `dw`.
    unsafe {
        dh.set_len(n * d);
        if want_dw {
            dw.set_len(vocab * d);
        }
    }
    (nll, dh, want_dw.then_some(dw))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic inputs in [-4, 4).
    fn inputs(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 8000) as f32 / 1000.0 - 4.0)
            .collect()
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// The kernels [`simd_fn!`] makes run their AVX-512 copy on a CPU that has it; each must
    /// give the bits of the same loop written plainly here (compiled for the baseline), with
    /// lengths that leave a tail after every vector width.
    #[test]
    fn avx512_kernels_give_the_baseline_bits() {
        let n = 1003;
        let (g, u, x) = (inputs(n, 1), inputs(n, 2), inputs(n, 3));

        // The few-row product's dot: 16 lanes, then the tail.
        let mut lanes = [0f32; 16];
        let cut = n / 16 * 16;
        for i in 0..cut {
            lanes[i % 16] += g[i] * u[i];
        }
        let tail = (cut..n).fold(0f32, |s, i| s + g[i] * u[i]);
        assert_eq!(dot(&g, &u).to_bits(), (lanes.iter().sum::<f32>() + tail).to_bits());

        let mut o = vec![0f32; n];
        swiglu_chunk(&mut o, &g, &u);
        let want: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| g / (1.0 + exp(-g)) * u).collect();
        assert_eq!(bits(&o), bits(&want));

        let (mut dg, mut du) = (x.clone(), vec![0f32; n]);
        swiglu_bwd_chunk(&mut dg, &mut du, &g, &u);
        for i in 0..n {
            let sg = 1.0 / (1.0 + exp(-g[i]));
            assert_eq!(du[i].to_bits(), (x[i] * g[i] * sg).to_bits());
            assert_eq!(
                dg[i].to_bits(),
                (x[i] * u[i] * sg * (1.0 + g[i] * (1.0 - sg))).to_bits()
            );
        }

        let mut p = x.clone();
        let lse = softmax_row(&mut p);
        let mut want = x.clone();
        let m = max_lanes(&want);
        want.iter_mut().for_each(|v| *v = exp(*v - m));
        let sum = sum_lanes(&want);
        want.iter_mut().for_each(|v| *v *= (1.0 / sum) as f32);
        assert_eq!(bits(&p), bits(&want));
        assert_eq!(lse.to_bits(), (m as f64 + sum.ln()).to_bits());

        let (d, rows) = (59, 17);
        let (xr, w) = (inputs(d * rows, 4), inputs(d, 5));
        let (mut o, mut r) = (vec![0f32; d * rows], vec![0f32; rows]);
        rms_fwd_rows(&mut o, &mut r, &xr, &w, 1e-5);
        for (i, row) in xr.chunks(d).enumerate() {
            let ri = 1.0 / (dot_lanes(row, row) / d as f32 + 1e-5).sqrt();
            assert_eq!(r[i].to_bits(), ri.to_bits());
            for j in 0..d {
                assert_eq!(o[i * d + j].to_bits(), (row[j] * ri * w[j]).to_bits());
            }
        }

        let (hd, heads) = (10, 3);
        let row0 = inputs(hd * heads, 6);
        let (c, sn) = (inputs(hd, 7), inputs(hd, 8));
        for half in [true, false] {
            let mut row = row0.clone();
            rope_row(&mut row, &mut vec![0f32; hd], &c, &sn, half, -1.0);
            for (h, t) in row.chunks(hd).zip(row0.chunks(hd)) {
                for i in 0..hd {
                    let (partner, sign) = match (half, i < hd / 2, i % 2 == 0) {
                        (true, true, _) => (i + hd / 2, -1.0),
                        (true, false, _) => (i - hd / 2, 1.0),
                        (false, _, true) => (i + 1, -1.0),
                        (false, _, false) => (i - 1, 1.0),
                    };
                    let want = t[i] * c[i] + -sign * t[partner] * sn[i];
                    assert_eq!(h[i].to_bits(), want.to_bits(), "half {half} i {i}");
                }
            }
        }
    }

    #[test]
    fn polynomial_exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 2.5e-7, "max relative error {worst:e}");
    }

    /// The few-row product (a decoding step's) against an f64 dot product, for 1 to 16 rows,
    /// a weight count that is not a multiple of a task's 64 rows and a width with a tail after
    /// the 16 lanes; and each row's bits do not depend on the rows beside it.
    #[test]
    fn few_rows_matmul_is_the_product_and_rows_are_independent() {
        let (n, k) = (200, 75);
        let w = inputs(n * k, 3);
        let x = inputs(FEW_ROWS * k, 9);
        let alone: Vec<Vec<f32>> = (0..FEW_ROWS)
            .map(|r| few_rows_matmul(&x[r * k..(r + 1) * k], 1, &w, n, k))
            .collect();
        for rows in [1, 3, FEW_ROWS] {
            let y = few_rows_matmul(&x[..rows * k], rows, &w, n, k);
            for r in 0..rows {
                for o in 0..n {
                    let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[o * k + i] as f64).sum();
                    let got = y[r * n + o] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "rows {rows} [{r}, {o}]: {got} vs {want}"
                    );
                }
                assert_eq!(bits(&y[r * n..(r + 1) * n]), bits(&alone[r]), "rows {rows}, row {r}");
            }
        }
    }
}
