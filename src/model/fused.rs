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
//!
//! `model::backprop` uses this for the f32 CPU backend; the tests compare it with burn's
//! autodiff on the same weights (`tests/importance.rs`) and with the f64 reference.

use super::config::{LlamaConfig, RopeLayout};
pub use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::any::{Any, TypeId};

/// Whether `B` is the f32 CPU backend, whose tensors' storage this module reads and writes.
pub fn is_cpu<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<crate::backend::Cpu>()
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
pub fn unflex<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    let p: Box<dyn Any> = Box::new(t);
    let prim = *p.downcast::<B::FloatTensorPrimitive>().expect("the CPU backend");
    Tensor::from_primitive(TensorPrimitive::Float(prim))
}

/// A flex tensor's f32 values.
pub fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 storage")
}

/// Rows `ids` of a `[rows, d]` table (an embedding lookup), as `[ids.len(), d]`.
pub fn rows_of(table: &[f32], ids: &[u32], d: usize) -> Vec<f32> {
    ids.iter()
        .flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].iter().copied())
        .collect()
}

/// Shapes of one call.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    /// Rows and tokens per row (`n = b · t` tokens in all).
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub ff: usize,
    pub eps: f32,
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

/// One block's weights, HF layout (`[out, in]`), in `BLOCK_TENSORS` (llama.rs) order,
/// borrowed from the backend's storage.
pub struct BlockWeights<'a> {
    pub w: [&'a [f32]; 9],
}

const AN: usize = 0;
const WQ: usize = 1;
const WK: usize = 2;
const WV: usize = 3;
const WO: usize = 4;
const MN: usize = 5;
const WG: usize = 6;
const WU: usize = 7;
const WD: usize = 8;

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
    lse: Vec<f32>,
    x2: Vec<f32>,
    rstd2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

/// RoPE tables for positions `0..t`: `cos`, `sin` as `[t, hd]`.
pub struct Rope {
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
        x.par_chunks_mut(width).enumerate().for_each_init(
            || vec![0f32; hd],
            |tmp, (r, row)| {
                let p = r % t;
                let (c, s) = (&self.cos[p * hd..(p + 1) * hd], &self.sin[p * hd..(p + 1) * hd]);
                for head in row.chunks_exact_mut(hd) {
                    tmp.copy_from_slice(head);
                    match self.layout {
                        RopeLayout::Half => {
                            let h2 = hd / 2;
                            for i in 0..h2 {
                                head[i] = tmp[i] * c[i] - sign * tmp[i + h2] * s[i];
                            }
                            for i in h2..hd {
                                head[i] = tmp[i] * c[i] + sign * tmp[i - h2] * s[i];
                            }
                        }
                        RopeLayout::Interleaved => {
                            for i in (0..hd).step_by(2) {
                                head[i] = tmp[i] * c[i] - sign * tmp[i + 1] * s[i];
                                head[i + 1] = tmp[i + 1] * c[i + 1] + sign * tmp[i] * s[i + 1];
                            }
                        }
                    }
                }
            },
        );
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

/// Σ x in eight lanes (a plain f32 sum is a sequential chain the compiler may not vectorise).
#[inline]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    it.remainder().iter().sum::<f32>() + acc.iter().sum::<f32>()
}

/// max x in eight lanes.
#[inline]
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

/// `x ← e^(x − max x)` in place; returns `(max x, Σ e^(x − max x))`.
#[inline]
fn exp_shifted(x: &mut [f32]) -> (f32, f32) {
    let m = max_lanes(x);
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    (m, sum_lanes(x))
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

fn all() -> Parallelism {
    Parallelism::Rayon(0)
}

/// `c[m,n] (+)= a · b` over both threads, `a` an `m × k` and `b` a `k × n` matrix read with the
/// given (row, column) strides from slices of exactly their sizes.
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
    unsafe {
        mm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            (n, 1),
            a.as_ptr(),
            a_s,
            b.as_ptr(),
            b_s,
            acc,
            1.0,
            all(),
        )
    }
}

/// `c[m,n] (+)= a[m,k] · bᵀ`, `b: [n,k]` (a projection with an HF-layout weight).
fn mm_nt(c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, acc: bool) {
    mm_into(c, a, (k, 1), b, (1, k), m, n, k, acc)
}

/// `c[m,n] (+)= a[m,k] · b[k,n]` (the input gradient of a projection).
fn mm_nn(c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, acc: bool) {
    mm_into(c, a, (k, 1), b, (n, 1), m, n, k, acc)
}

/// `c[m,n] = aᵀ · b`, `a: [k,m]`, `b: [k,n]` (a projection's weight gradient).
fn mm_tn(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    mm_tn_into(&mut c, a, b, m, n, k, false);
    c
}

/// `c[m,n] (+)= aᵀ · b`, `a: [k,m]`, `b: [k,n]`.
fn mm_tn_into(c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, acc: bool) {
    mm_into(c, a, (1, m), b, (n, 1), m, n, k, acc)
}

/// Rows of `d` per rayon task in element-wise loops.
fn chunk_rows(n: usize) -> usize {
    n.div_ceil(4 * rayon::current_num_threads()).max(1)
}

/// RMSNorm forward: `out = x · rstd · w`, `rstd` per row.
fn rms_fwd(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], rstd: &mut [f32]) {
    let d = w.len();
    let rows = chunk_rows(rstd.len());
    out.par_chunks_mut(rows * d)
        .zip(rstd.par_chunks_mut(rows))
        .zip(x.par_chunks(rows * d))
        .for_each(|((o, r), x)| {
            for ((o, r), x) in o.chunks_exact_mut(d).zip(r.iter_mut()).zip(x.chunks_exact(d)) {
                let ss: f32 = x.iter().map(|v| v * v).sum();
                *r = 1.0 / (ss / d as f32 + eps).sqrt();
                for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                    *o = x * *r * w;
                }
            }
        });
}

/// RMSNorm with known per-row `rstd` (the backward pass's recomputation): `out = x · rstd · w`.
fn rms_apply(x: &[f32], rstd: &[f32], w: &[f32], out: &mut [f32]) {
    let d = w.len();
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(rstd)
        .for_each(|((o, x), r)| {
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = x * r * w;
            }
        });
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
            for (((dx, dh), x), &r) in dx
                .chunks_exact_mut(d)
                .zip(dh.chunks_exact(d))
                .zip(x.chunks_exact(d))
                .zip(rstd)
            {
                // x̂ = x·r; ∂L/∂x̂ = dh·w; ∂L/∂x = r·(∂L/∂x̂ − x̂·mean(∂L/∂x̂ · x̂)).
                let mut dot = 0f32;
                for (((dw, dh), x), w) in dw.iter_mut().zip(dh).zip(x).zip(w) {
                    let xh = x * r;
                    *dw += dh * xh;
                    dot += dh * w * xh;
                }
                let m = dot / d as f32;
                for (((dx, dh), x), w) in dx.iter_mut().zip(dh).zip(x).zip(w) {
                    *dx += r * (dh * w - x * r * m);
                }
            }
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

/// Causal attention of `q: [b·t, nh·hd]` over `k, v: [b·t, nkv·hd]` (head `h` reads key/value
/// head `h / (nh / nkv)`), into `a: [b·t, nh·hd]`; each query row's log-sum-exp into `lse`.
fn attn_fwd(dm: &Dims, q: &[f32], k: &[f32], v: &[f32], a: &mut [f32], lse: &mut [f32]) {
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
                unsafe {
                    let q0 = qp.add(r0 * qw);
                    mm(
                        r1 - r0,
                        r1,
                        hd,
                        sp,
                        (t, 1),
                        q0,
                        (qw, 1),
                        kp,
                        (1, kw),
                        false,
                        scale,
                        Parallelism::None,
                    );
                }
                for i in r0..r1 {
                    let row = &mut s[i * t..i * t + r1];
                    let (live, masked) = row.split_at_mut(i + 1);
                    let (m, sum) = exp_shifted(live);
                    let inv = 1.0 / sum;
                    live.iter_mut().for_each(|x| *x *= inv);
                    masked.fill(0.0);
                    lse[i] = m + sum.ln();
                }
                // A[r0..r1] = P[r0..r1, 0..r1] · V[0..r1]
                unsafe {
                    let o = out.at(bi * t * qw + r0 * qw + h * hd);
                    mm(
                        r1 - r0,
                        hd,
                        r1,
                        o,
                        (qw, 1),
                        s[r0 * t..].as_ptr(),
                        (t, 1),
                        vp,
                        (kw, 1),
                        false,
                        1.0,
                        Parallelism::None,
                    );
                }
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
    lse: &[f32],
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
                        mm(
                            m,
                            r1,
                            hd,
                            pp,
                            (t, 1),
                            q0,
                            (qw, 1),
                            kp,
                            (1, kw),
                            false,
                            scale,
                            Parallelism::None,
                        );
                        mm(
                            m,
                            r1,
                            hd,
                            dsp,
                            (t, 1),
                            da0,
                            (qw, 1),
                            vp,
                            (1, kw),
                            false,
                            1.0,
                            Parallelism::None,
                        );
                    }
                    for i in r0..r1 {
                        // D_i = dA_i · A_i;  P = exp(S − lse);  dS = P ⊙ (dP − D)
                        let o = off + i * qw;
                        let di: f32 = da[o..o + hd].iter().zip(&a[o..o + hd]).map(|(x, y)| x * y).sum();
                        let l = lse[i];
                        let (prow, dsrow) = (&mut p[i * t..i * t + r1], &mut ds[i * t..i * t + r1]);
                        let (pl, pm) = prow.split_at_mut(i + 1);
                        let (dl, dmk) = dsrow.split_at_mut(i + 1);
                        for (pv, dv) in pl.iter_mut().zip(dl.iter_mut()) {
                            *pv = exp(*pv - l);
                            *dv = *pv * (*dv - di);
                        }
                        pm.fill(0.0);
                        dmk.fill(0.0);
                    }
                    unsafe {
                        let (p0, ds0) = (p[r0 * t..].as_ptr(), ds[r0 * t..].as_ptr());
                        let (q0, da0) = (qp.add(r0 * qw), dap.add(r0 * qw));
                        // dV[0..r1] += Pᵀ · dA;  dQ[r0..r1] = scale · dS · K;  dK[0..r1] += scale · dSᵀ · Q
                        mm(
                            r1,
                            hd,
                            m,
                            dv_at,
                            (kw, 1),
                            p0,
                            (1, t),
                            da0,
                            (qw, 1),
                            true,
                            1.0,
                            Parallelism::None,
                        );
                        mm(
                            m,
                            hd,
                            r1,
                            dqp.at(off + r0 * qw),
                            (qw, 1),
                            ds0,
                            (t, 1),
                            kp,
                            (kw, 1),
                            false,
                            scale,
                            Parallelism::None,
                        );
                        mm(
                            r1,
                            hd,
                            m,
                            dk_at,
                            (kw, 1),
                            ds0,
                            (1, t),
                            q0,
                            (qw, 1),
                            true,
                            scale,
                            Parallelism::None,
                        );
                    }
                }
            }
        },
    );
    (dq, dk, dv)
}

/// `y = x2 + (SiLU(gate) · up) · W_downᵀ`'s inner product, fused: `SiLU(g) · u`.
fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let c = chunk_rows(out.len());
    out.par_chunks_mut(c)
        .zip(gate.par_chunks(c))
        .zip(up.par_chunks(c))
        .for_each(|((o, g), u)| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + exp(-g)) * u;
            }
        });
}

impl<'a> BlockWeights<'a> {
    /// The weights in `storage` (`Block::storage` in llama.rs).
    pub fn of(storage: &'a [FlexTensor; 9]) -> Self {
        Self {
            w: std::array::from_fn(|j| values(&storage[j])),
        }
    }

    /// The block on `x: [b·t, d]`; returns its output and what its backward pass needs.
    pub fn forward(&self, dm: &Dims, rope: &Rope, x: Vec<f32>) -> (Vec<f32>, Saved) {
        let w = &self.w;
        let (n, d, ff, qw, kw) = (dm.n(), dm.d, dm.ff, dm.qw(), dm.kw());
        let mut h = vec![0f32; n * d];
        let mut rstd1 = vec![0f32; n];
        rms_fwd(&x, w[AN], dm.eps, &mut h, &mut rstd1);
        let mut q = vec![0f32; n * qw];
        let mut k = vec![0f32; n * kw];
        let mut v = vec![0f32; n * kw];
        mm_nt(&mut q, &h, w[WQ], n, qw, d, false);
        mm_nt(&mut k, &h, w[WK], n, kw, d, false);
        mm_nt(&mut v, &h, w[WV], n, kw, d, false);
        rope.apply(&mut q, qw, dm.t, false);
        rope.apply(&mut k, kw, dm.t, false);
        let mut a = vec![0f32; n * qw];
        let mut lse = vec![0f32; dm.b * dm.nh * dm.t];
        attn_fwd(dm, &q, &k, &v, &mut a, &mut lse);
        let mut x2 = x.clone();
        mm_nt(&mut x2, &a, w[WO], n, d, qw, true);
        let mut rstd2 = vec![0f32; n];
        rms_fwd(&x2, w[MN], dm.eps, &mut h, &mut rstd2);
        let mut gate = vec![0f32; n * ff];
        let mut up = vec![0f32; n * ff];
        mm_nt(&mut gate, &h, w[WG], n, ff, d, false);
        mm_nt(&mut up, &h, w[WU], n, ff, d, false);
        let mut gs = vec![0f32; n * ff];
        swiglu(&gate, &up, &mut gs);
        let mut y = x2.clone();
        mm_nt(&mut y, &gs, w[WD], n, d, ff, true);
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

    /// The backward pass from `dy = ∂L/∂y`: `∂L/∂x`, and each parameter's gradient where
    /// `need[j]` (in `BLOCK_TENSORS` (llama.rs) order).
    pub fn backward(
        &self,
        dm: &Dims,
        rope: &Rope,
        s: Saved,
        dy: &[f32],
        need: [bool; 9],
    ) -> (Vec<f32>, [Option<Vec<f32>>; 9]) {
        let w = &self.w;
        let (n, d, ff, qw, kw) = (dm.n(), dm.d, dm.ff, dm.qw(), dm.kw());
        let mut grads: [Option<Vec<f32>>; 9] = Default::default();

        // MLP: y = x2 + (SiLU(gate) · up) · W_dᵀ.
        let mut buf = vec![0f32; n * ff];
        if need[WD] {
            swiglu(&s.gate, &s.up, &mut buf);
            grads[WD] = Some(mm_tn(dy, &buf, d, ff, n));
        }
        mm_nn(&mut buf, dy, w[WD], n, ff, d, false); // ∂L/∂(SiLU(g)·u)
        let mut dup = vec![0f32; n * ff];
        {
            let c = chunk_rows(n * ff);
            buf.par_chunks_mut(c)
                .zip(dup.par_chunks_mut(c))
                .zip(s.gate.par_chunks(c))
                .zip(s.up.par_chunks(c))
                .for_each(|(((dg, du), g), u)| {
                    for (((dg, du), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u) {
                        let sg = 1.0 / (1.0 + exp(-g));
                        let ds = *dg;
                        *du = ds * g * sg;
                        *dg = ds * u * sg * (1.0 + g * (1.0 - sg));
                    }
                });
        }
        let dgate = buf;
        drop(s.gate);
        drop(s.up);
        let mut h = vec![0f32; n * d];
        rms_apply(&s.x2, &s.rstd2, w[MN], &mut h);
        if need[WG] {
            grads[WG] = Some(mm_tn(&dgate, &h, ff, d, n));
        }
        if need[WU] {
            grads[WU] = Some(mm_tn(&dup, &h, ff, d, n));
        }
        let mut dh = vec![0f32; n * d];
        mm_nn(&mut dh, &dgate, w[WG], n, d, ff, false);
        mm_nn(&mut dh, &dup, w[WU], n, d, ff, true);
        drop(dgate);
        drop(dup);
        let mut dx2 = dy.to_vec();
        let dmn = rms_bwd(&dh, &s.x2, &s.rstd2, w[MN], &mut dx2);
        if need[MN] {
            grads[MN] = Some(dmn);
        }

        // Attention: x2 = x + a · W_oᵀ.
        if need[WO] {
            grads[WO] = Some(mm_tn(&dx2, &s.a, d, qw, n));
        }
        let mut da = vec![0f32; n * qw];
        mm_nn(&mut da, &dx2, w[WO], n, qw, d, false);
        let (mut dq, mut dk, dv) = attn_bwd(dm, &s.q, &s.k, &s.v, &s.a, &s.lse, &da);
        drop(da);
        rope.apply(&mut dq, qw, dm.t, true);
        rope.apply(&mut dk, kw, dm.t, true);
        rms_apply(&s.x, &s.rstd1, w[AN], &mut h);
        if need[WQ] {
            grads[WQ] = Some(mm_tn(&dq, &h, qw, d, n));
        }
        if need[WK] {
            grads[WK] = Some(mm_tn(&dk, &h, kw, d, n));
        }
        if need[WV] {
            grads[WV] = Some(mm_tn(&dv, &h, kw, d, n));
        }
        mm_nn(&mut dh, &dq, w[WQ], n, d, qw, false);
        mm_nn(&mut dh, &dk, w[WK], n, d, kw, true);
        mm_nn(&mut dh, &dv, w[WV], n, d, kw, true);
        let mut dx = dx2;
        let dan = rms_bwd(&dh, &s.x, &s.rstd1, w[AN], &mut dx);
        if need[AN] {
            grads[AN] = Some(dan);
        }
        (dx, grads)
    }
}

/// The final RMSNorm: normed `x` and its per-row `rstd`.
pub fn final_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut h = vec![0f32; x.len()];
    let mut rstd = vec![0f32; x.len() / w.len()];
    rms_fwd(x, w, eps, &mut h, &mut rstd);
    (h, rstd)
}

/// The final RMSNorm's backward pass: `∂L/∂x` and `∂L/∂w`.
pub fn final_norm_bwd(dh: &[f32], x: &[f32], rstd: &[f32], w: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; x.len()];
    let dw = rms_bwd(dh, x, rstd, w, &mut dx);
    (dx, dw)
}

/// Logit elements computed at once in [`head`] (64 MB): 341 tokens of a 49152 vocabulary.
const HEAD_CHUNK_ELEMS: usize = 1 << 24;

/// The output head's cross-entropy, fused and chunked: logits `h · Wᵀ` (`h: [n, d]`,
/// `w: [vocab, d]`) a few hundred tokens at a time, the softmax and `∂L/∂logits = softmax −
/// onehot` in one pass over each row, then `∂L/∂h` and `∂L/∂W` by two matmuls. Returns
/// Σ nll (natural log) and `∂(scale · Σ nll)/∂h`; adds `∂(scale · Σ nll)/∂W` into `dw` when
/// given.
pub fn head(h: &[f32], w: &[f32], targets: &[u32], scale: f32, mut dw: Option<&mut [f32]>) -> (f64, Vec<f32>) {
    let n = targets.len();
    let d = h.len() / n;
    let vocab = w.len() / d;
    let chunk = (HEAD_CHUNK_ELEMS / vocab).clamp(1, n);
    let mut logits = vec![0f32; chunk * vocab];
    let mut dh = vec![0f32; n * d];
    let mut nll = 0f64;
    for start in (0..n).step_by(chunk) {
        let c = chunk.min(n - start);
        let (hc, lc) = (&h[start * d..(start + c) * d], &mut logits[..c * vocab]);
        mm_nt(lc, hc, w, c, vocab, d, false);
        nll += lc
            .par_chunks_mut(vocab)
            .zip(&targets[start..start + c])
            .map(|(row, &tg)| {
                let picked = row[tg as usize];
                let (m, sum) = exp_shifted(row);
                let k = scale / sum;
                row.iter_mut().for_each(|x| *x *= k);
                row[tg as usize] -= scale;
                (m as f64 + (sum as f64).ln()) - picked as f64
            })
            .collect::<Vec<f64>>()
            .iter()
            .sum::<f64>();
        mm_nn(&mut dh[start * d..(start + c) * d], lc, w, c, d, vocab, false);
        if let Some(dw) = dw.as_deref_mut() {
            mm_tn_into(dw, lc, hc, vocab, d, c, true);
        }
    }
    (nll, dh)
}

#[cfg(test)]
mod tests {
    use super::exp;

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
}
