//! bf16 matrix products on the CPU with f32 accumulation (what PyTorch's CPU autocast does),
//! on Intel AMX tiles or AVX512-BF16 dot products, chosen once at run time.
//!
//! No crate on crates.io gives this: `gemm` (which burn-flex and [`super::fused`] use) has
//! f32/f64/f16 kernels but none for bf16, and burn-flex widens a bf16 product to f32 first.
//! So the two kernels are here, written against one packed layout:
//!
//! - a left operand `a: [m, k]` is packed in tiles of 16 rows × 32 k ([`pack_lhs`]): AMX's
//!   A tile, and for AVX512-BF16 each row's pair `(a[i, 2p], a[i, 2p+1])` is one `u32` to
//!   broadcast;
//! - a right operand `b: [k, n]` is packed in tiles of 16 k-pairs × 16 columns × 2
//!   ([`pack_rhs`]): AMX's B tile (VNNI layout), and for AVX512-BF16 each tile row is one
//!   vector of 16 columns' pairs.
//!
//! Rows and columns are padded with zeros to 32 and `k` to 32, so both kernels work on whole
//! 32 × 32 blocks of the result. Inputs are rounded to bf16 to nearest, ties to even; each
//! product's sums are f32. A weight's packed copies are made once and reused until the weight
//! changes ([`super::fused`]'s pack cache).
//!
//! AMX needs the kernel's permission (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), asked once; its
//! instructions are written as inline assembly, since Rust's AMX intrinsics are not stable.

use rayon::prelude::*;
use std::sync::OnceLock;

/// The unit that runs bf16 products on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Intel AMX tiles (`TDPBF16PS`).
    Amx,
    /// AVX512-BF16 dot products (`VDPBF16PS`).
    Avx512Bf16,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Amx => "AMX tiles",
            Unit::Avx512Bf16 => "AVX512-BF16",
        }
    }
}

/// Environment variable that picks the unit: `amx`, `avx512` or `none` (tests and benchmarks
/// compare them; unset: the best this CPU has).
pub(crate) const UNIT_ENV: &str = "CODESPOT_BF16_UNIT";

/// The unit this CPU has for bf16 products (checked once), or None: products stay f32.
pub fn unit() -> Option<Unit> {
    static UNIT: OnceLock<Option<Unit>> = OnceLock::new();
    *UNIT.get_or_init(|| {
        let units = available_units();
        let (amx, avx) = (units.contains(&Unit::Amx), units.contains(&Unit::Avx512Bf16));
        match std::env::var(UNIT_ENV).ok().as_deref() {
            Some("none") => None,
            Some("avx512") => avx.then_some(Unit::Avx512Bf16),
            Some("amx") => amx.then_some(Unit::Amx),
            _ if amx => Some(Unit::Amx),
            _ => avx.then_some(Unit::Avx512Bf16),
        }
    })
}

/// Every unit this CPU has and this process may use, AVX512-BF16 first (the kernel test and
/// `examples/bf16_shapes.rs` time or check each; [`unit`] picks one).
pub fn available_units() -> Vec<Unit> {
    let mut units = vec![];
    if avx512_bf16() {
        units.push(Unit::Avx512Bf16);
    }
    if amx_usable() {
        units.push(Unit::Amx);
    }
    units
}

/// Whether the CPU has AVX512-BF16 (and the AVX-512 it builds on).
pub(crate) fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::fused::avx512() && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AMX-BF16 and the kernel lets this process use the tiles.
fn amx_usable() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE (`is_x86_feature_detected!`
        // has no stable names for them).
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if !(super::fused::avx512() && edx & (1 << 22) != 0 && edx & (1 << 24) != 0) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; on failure AMX is not used.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// Rows, columns and `k` are padded to a multiple of this.
const BLOCK: usize = 32;
/// bf16 elements in one 16 × 32 tile.
const TILE: usize = 512;

/// An operand of a bf16 product, packed ([`pack_lhs`] or [`pack_rhs`]).
pub struct Packed {
    /// Rows of the product this operand gives (`m` for a left operand, `n` for a right one).
    pub rows: usize,
    /// The inner dimension.
    pub k: usize,
    /// 32-element blocks of `k`.
    kb: usize,
    /// bf16 bits, `[rows / 16][kb][tile]`.
    data: Vec<u16>,
}

impl Packed {
    /// The tile of rows `16·r ..` and `k` block `kb`.
    fn tile(&self, r: usize, kb: usize) -> *const u16 {
        self.data[(r * self.kb + kb) * TILE..].as_ptr()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// `x` rounded to bf16 (to nearest, ties to even; NaN stays NaN). Branch-free, so loops of it
/// vectorise.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let quiet = ((b >> 16) | 0x40) as u16;
    if x.is_nan() {
        quiet
    } else {
        rounded
    }
}

/// `dst[i] = bf16(src[i])` for every `i` of `src`.
///
/// # Safety
/// The CPU has AVX-512 (every CPU with a bf16 [`Unit`] has); `dst` is valid for `src.len()`
/// writes.
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")
)]
unsafe fn round_to(dst: *mut u16, src: &[f32]) {
    for (i, &x) in src.iter().enumerate() {
        // SAFETY: the caller's promise.
        unsafe { *dst.add(i) = bf16_bits(x) };
    }
}

/// `dst[j] = (bf16(lo[j]), bf16(hi[j]))` as one `u32` (the pair's first element in the low
/// half) for every `j` of `lo`.
///
/// # Safety
/// As [`round_to`]; `hi` is as long as `lo`.
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")
)]
unsafe fn pairs_to(dst: *mut u32, lo: &[f32], hi: &[f32]) {
    for (j, (&a, &b)) in lo.iter().zip(&hi[..lo.len()]).enumerate() {
        // SAFETY: the caller's promise.
        unsafe { *dst.add(j) = bf16_bits(a) as u32 | (bf16_bits(b) as u32) << 16 };
    }
}

/// Packs `rows × k` values, element `(i, kk)` at `src[i·s.0 + kk·s.1]`, into `[rows/16][kb]`
/// tiles: a left operand's (`rhs` false: `tile[i·32 + kk]`) or a right operand's (`rhs`:
/// `tile[(kk/2)·32 + 2i + kk%2]`, as `u32` pairs `[kk/2][i]`).
fn pack(src: &[f32], s: (usize, usize), rows: usize, k: usize, rhs: bool) -> Packed {
    let rp = rows.next_multiple_of(BLOCK);
    let kb = k.div_ceil(BLOCK);
    assert!(rows == 0 || k == 0 || (rows - 1) * s.0 + (k - 1) * s.1 < src.len());
    assert!(unit().is_some(), "bf16 packing without a bf16 unit");
    let len = rp * kb * BLOCK;
    let mut data: Vec<u16> = Vec::with_capacity(len);
    let out = Out(data.as_mut_ptr() as *mut f32);
    (0..rp / 16).into_par_iter().for_each(|r| {
        let out = &out;
        let band = out.0 as *mut u16;
        for b in 0..kb {
            // SAFETY: tile (r, b) is inside the capacity; bands are disjoint.
            unsafe { pack_tile(src, s, rows, k, rhs, r, b, band.add((r * kb + b) * TILE)) };
        }
    });
    // SAFETY: every tile of every band was written.
    unsafe { data.set_len(len) };
    Packed { rows, k, kb, data }
}

/// Writes tile `(r, b)` of [`pack`] (rows `16·r ..`, `k` from `32·b`) to `tile`.
///
/// # Safety
/// `tile` is valid for 512 writes, and a bf16 unit exists (so the CPU has AVX-512).
#[inline(never)]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_tile(
    src: &[f32],
    s: (usize, usize),
    rows: usize,
    k: usize,
    rhs: bool,
    r: usize,
    b: usize,
    tile: *mut u16,
) {
    let (i0, k0) = (16 * r, BLOCK * b);
    let (ni, nk) = (16.min(rows.saturating_sub(i0)), BLOCK.min(k - k0));
    let at = |i: usize, kk: usize| &src[(i0 + i) * s.0 + (k0 + kk) * s.1..];
    let pairs = tile as *mut u32;
    // SAFETY (all blocks): writes stay inside the tile; AVX-512 is there (the caller's promise).
    unsafe {
        if ni < 16 || nk < BLOCK {
            // An edge tile, element by element, zero outside the source.
            for i in 0..16 {
                for kk in 0..BLOCK {
                    let x = if i < ni && kk < nk { bf16_bits(at(i, kk)[0]) } else { 0 };
                    *tile.add(if rhs {
                        (kk / 2) * BLOCK + 2 * i + kk % 2
                    } else {
                        i * BLOCK + kk
                    }) = x;
                }
            }
        } else if !rhs && s.1 == 1 {
            // Rows along `k`, as the tile holds them.
            for i in 0..16 {
                round_to(tile.add(i * BLOCK), &at(i, 0)[..BLOCK]);
            }
        } else if rhs && s.0 == 1 {
            // Each `k` along the rows: one pair of source rows gives one tile row.
            for p in 0..16 {
                pairs_to(pairs.add(p * 16), &at(0, 2 * p)[..16], &at(0, 2 * p + 1)[..16]);
            }
        } else {
            // Across the source's rows: pairs `[kk/2][i]` (rows along `i`) or `[i][kk/2]`
            // (along `k`) into a buffer, then transposed where the left operand needs it.
            let mut t = [0u32; TILE / 2];
            if s.0 == 1 {
                for p in 0..16 {
                    pairs_to(t.as_mut_ptr().add(p * 16), &at(0, 2 * p)[..16], &at(0, 2 * p + 1)[..16]);
                }
            } else if s.1 == 1 {
                for i in 0..16 {
                    round_to(t.as_mut_ptr().add(i * 16) as *mut u16, &at(i, 0)[..BLOCK]);
                }
            } else {
                for p in 0..16 {
                    for i in 0..16 {
                        t[p * 16 + i] =
                            bf16_bits(at(i, 2 * p)[0]) as u32 | (bf16_bits(at(i, 2 * p + 1)[0]) as u32) << 16;
                    }
                }
            }
            // `t` is `[p][i]` when `s.0 == 1` or strided, `[i][p]` when `s.1 == 1`; the left
            // operand wants `[i][p]`, the right one `[p][i]`.
            let transpose = (s.1 == 1) == rhs;
            for x in 0..16 {
                for y in 0..16 {
                    *pairs.add(x * 16 + y) = if transpose { t[y * 16 + x] } else { t[x * 16 + y] };
                }
            }
        }
    }
}

/// Packs the left operand `a: [m, k]` of a product, element `(i, kk)` at `src[i·s.0 + kk·s.1]`.
pub fn pack_lhs(src: &[f32], s: (usize, usize), m: usize, k: usize) -> Packed {
    pack(src, s, m, k, false)
}

/// Packs the right operand `b: [k, n]` of a product, element `(kk, j)` at
/// `src[kk·s.0 + j·s.1]`.
pub fn pack_rhs(src: &[f32], s: (usize, usize), k: usize, n: usize) -> Packed {
    pack(src, (s.1, s.0), n, k, true)
}

/// `k` blocks (of 32) per pass over the result: a pass's share of a row band of `a` (16 KiB)
/// stays in L1 while it meets a task's columns of `b`.
const KC: usize = 8;

/// `c[m, n] (+)= a · b` (`c` row-major) with `a` from [`pack_lhs`] and `b` from [`pack_rhs`],
/// on `unit`, over rayon's threads.
pub fn matmul(unit: Unit, c: &mut [f32], a: &Packed, b: &Packed, acc: bool) {
    assert!(c.len() == a.rows * b.rows, "bf16 matmul: output size");
    // SAFETY: `c` holds the `m · n` elements.
    unsafe { matmul_to(unit, c.as_mut_ptr(), a, b, acc) }
}

/// A new `a · b` ([`matmul`]).
pub(crate) fn matmul_new(unit: Unit, a: &Packed, b: &Packed) -> Vec<f32> {
    let len = a.rows * b.rows;
    let mut c = Vec::with_capacity(len);
    // SAFETY: without `acc` every element is written and none read.
    unsafe {
        matmul_to(unit, c.as_mut_ptr(), a, b, false);
        c.set_len(len);
    }
    c
}

/// [`matmul`] through a pointer.
///
/// # Safety
/// `c` is valid for `m · n` writes (and reads when `acc`); without `acc` it may be
/// uninitialised.
unsafe fn matmul_to(unit: Unit, c: *mut f32, a: &Packed, b: &Packed, acc: bool) {
    let (m, n) = (a.rows, b.rows);
    assert!(a.k == b.k, "bf16 matmul: inner dimensions {} and {}", a.k, b.k);
    if m == 0 || n == 0 {
        return;
    }
    if a.kb == 0 {
        // An empty sum: zeros, or `c` unchanged.
        if !acc {
            // SAFETY: the caller's promise: `c` holds `m · n` elements.
            unsafe { std::ptr::write_bytes(c, 0, m * n) };
        }
        return;
    }
    let full = if n % BLOCK == 0 { m / BLOCK } else { 0 };
    if full > 0 {
        // SAFETY: the caller's promise; these row bands are whole blocks of `c`.
        unsafe { blocks(unit, c, n, a, b, acc, 0..full) };
    }
    if full * BLOCK < m {
        // The rest (a last partial row band, or all when `n` has a partial block) into a
        // padded copy.
        let (r0, np) = (full * BLOCK, n.next_multiple_of(BLOCK));
        let rows = m - r0;
        let mut pad = vec![0f32; rows.next_multiple_of(BLOCK) * np];
        for i in 0..rows {
            if acc {
                // SAFETY: row `r0 + i` of `c` (the caller's promise).
                unsafe { std::ptr::copy_nonoverlapping(c.add((r0 + i) * n), pad[i * np..].as_mut_ptr(), n) };
            }
        }
        // SAFETY: `pad` holds whole blocks for row bands `full..`.
        unsafe { blocks(unit, pad.as_mut_ptr(), np, a, b, acc, full..m.div_ceil(BLOCK)) };
        for i in 0..rows {
            // SAFETY: as above; written, not read, when not `acc`.
            unsafe { std::ptr::copy_nonoverlapping(pad[i * np..].as_ptr(), c.add((r0 + i) * n), n) };
        }
    }
}

/// Row bands `ibs` of `c (+)= a · b`, `c` (row stride `ldc`) starting at band `ibs.start` and
/// covering whole 32 × 32 blocks: tasks are column bands of up to 8 blocks; in each, passes of
/// [`KC`] `k` blocks run over every row band.
///
/// # Safety
/// `c` holds the bands' `32 · ibs.len()` rows of `ldc ≥ b.rows`(padded) elements.
#[allow(clippy::too_many_arguments)]
unsafe fn blocks(unit: Unit, c: *mut f32, ldc: usize, a: &Packed, b: &Packed, acc: bool, ibs: std::ops::Range<usize>) {
    let nb = b.rows.div_ceil(BLOCK);
    let threads = rayon::current_num_threads().max(1);
    let band = nb.div_ceil(4 * threads).clamp(1, 8);
    let out = Out(c);
    (0..nb.div_ceil(band)).into_par_iter().for_each(|t| {
        let out = &out;
        let guard = Tiles::start(unit);
        for k0 in (0..a.kb).step_by(KC) {
            let ks = k0..(k0 + KC).min(a.kb);
            let load = acc || k0 > 0;
            for ib in ibs.clone() {
                for jb in t * band..((t + 1) * band).min(nb) {
                    // SAFETY: tasks write disjoint column bands of `c`; the block is inside it.
                    let c = unsafe { out.0.add((ib - ibs.start) * BLOCK * ldc + jb * BLOCK) };
                    let job = Job {
                        ib,
                        jb,
                        ks: ks.clone(),
                        c,
                        ldc,
                        load,
                    };
                    match unit {
                        // SAFETY: the tiles are configured (`guard`).
                        Unit::Amx => unsafe { amx_block(a, b, job) },
                        // SAFETY: `unit()` said the CPU has AVX512-BF16.
                        Unit::Avx512Bf16 => unsafe { avx_block(a, b, job) },
                    }
                }
            }
        }
        drop(guard);
    });
}

/// One 32 × 32 block of a product: row band `ib` of `a`, column band `jb` of `b`, summed over
/// `k` blocks `ks` into the block at `c` (row stride `ldc`), added to it when `load`, else
/// written there.
struct Job {
    ib: usize,
    jb: usize,
    ks: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    load: bool,
}

/// A pointer the tasks write disjoint parts through.
struct Out(*mut f32);
// SAFETY: tasks write disjoint parts of the output.
unsafe impl Sync for Out {}

/// The tile configuration for this thread while a task runs (AMX only).
struct Tiles(bool);

impl Tiles {
    fn start(unit: Unit) -> Self {
        if unit == Unit::Amx {
            // Palette 1; tmm0–7 all 16 rows × 64 bytes.
            let mut cfg = [0u8; 64];
            cfg[0] = 1;
            for t in 0..8 {
                cfg[16 + 2 * t] = 64;
                cfg[48 + t] = 16;
            }
            // SAFETY: `unit()` returned Amx only when the CPU has AMX and the kernel
            // allowed it; the configuration is a valid palette-1 one.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack, readonly));
            }
        }
        Tiles(unit == Unit::Amx)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        if self.0 {
            // SAFETY: releases the tile state this thread configured.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                std::arch::asm!("tilerelease", options(nostack, nomem));
            }
        }
    }
}

/// A [`Job`]'s block of `a · b`, on AMX: tmm0–3 hold the four 16 × 16
/// quarters, tmm4–5 `a`'s two row tiles and tmm6–7 `b`'s two column tiles of each `k` block.
///
/// # Safety
/// The tiles are configured as [`Tiles::start`] does, on a CPU with AMX-BF16; the job's `c`
/// is valid for its block.
#[cfg(target_arch = "x86_64")]
unsafe fn amx_block(a: &Packed, b: &Packed, job: Job) {
    use std::arch::asm;
    let (ib, jb, c, ldc, load, ks) = (job.ib, job.jb, job.c, job.ldc, job.load, job.ks);
    let s = 64usize;
    // Bytes per row of `c`.
    let r = ldc * 4;
    // SAFETY: the caller's promises; every tile read is inside its packed operand.
    unsafe {
        let (c0, c1, c2, c3) = (c, c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
        if load {
            asm!(
                "tileloadd tmm0, [{c0} + {r}*1]",
                "tileloadd tmm1, [{c1} + {r}*1]",
                "tileloadd tmm2, [{c2} + {r}*1]",
                "tileloadd tmm3, [{c3} + {r}*1]",
                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, r = in(reg) r,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for kb in ks {
            let (a0, a1) = (a.tile(2 * ib, kb), a.tile(2 * ib + 1, kb));
            let (b0, b1) = (b.tile(2 * jb, kb), b.tile(2 * jb + 1, kb));
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1, s = in(reg) s,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c0} + {r}*1], tmm0",
            "tilestored [{c1} + {r}*1], tmm1",
            "tilestored [{c2} + {r}*1], tmm2",
            "tilestored [{c3} + {r}*1], tmm3",
            c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, r = in(reg) r,
            options(nostack),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn amx_block(_: &Packed, _: &Packed, _: Job) {
    unreachable!("AMX is x86-64 only")
}

/// [`amx_block`] with AVX512-BF16 dot products: 8 rows × 32 columns at a time in 16
/// accumulators.
///
/// # Safety
/// The CPU has AVX512-BF16; the job's `c` is valid for its block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn avx_block(a: &Packed, b: &Packed, job: Job) {
    use std::arch::x86_64::*;
    let (ib, jb, c, ldc, load, ks) = (job.ib, job.jb, job.c, job.ldc, job.load, job.ks);
    for half in 0..4 {
        // Rows 8·half .. +8 of the block: tile row band `2·ib + half / 2`, rows `8·(half % 2)`.
        let (band, r0) = (2 * ib + half / 2, 8 * (half % 2));
        // SAFETY: the caller's promises; every index is inside its 512-element tile.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; 8];
            if load {
                for (i, row) in acc.iter_mut().enumerate() {
                    let o = c.add((8 * half + i) * ldc);
                    *row = [_mm512_loadu_ps(o), _mm512_loadu_ps(o.add(16))];
                }
            }
            for kb in ks.clone() {
                let at = a.tile(band, kb) as *const u32;
                let (b0, b1) = (b.tile(2 * jb, kb), b.tile(2 * jb + 1, kb));
                for p in 0..16 {
                    let v0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(32 * p) as *const _));
                    let v1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(32 * p) as *const _));
                    for (i, row) in acc.iter_mut().enumerate() {
                        let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*at.add((r0 + i) * 16 + p) as i32));
                        row[0] = _mm512_dpbf16_ps(row[0], x, v0);
                        row[1] = _mm512_dpbf16_ps(row[1], x, v1);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                let o = c.add((8 * half + i) * ldc);
                _mm512_storeu_ps(o, row[0]);
                _mm512_storeu_ps(o.add(16), row[1]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn avx_block(_: &Packed, _: &Packed, _: Job) {
    unreachable!("AVX512-BF16 is x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(x: f32) -> f64 {
        f32::from_bits((bf16_bits(x) as u32) << 16) as f64
    }

    fn inputs(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0 - 0.5)
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(-2.0), 0xc000);
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
    }

    /// Each unit this CPU has against an f64 product of the rounded inputs, on shapes with
    /// tails in every dimension and both operand layouts; `acc` adds.
    #[test]
    fn every_unit_gives_the_product_of_the_rounded_inputs() {
        let units = available_units();
        eprintln!("bf16 units on this CPU: {units:?}");
        if units.is_empty() {
            // Packing needs a unit; autocast is f32 here (tested in tests/importance.rs).
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (37, 70, 45),
            (64, 32, 96),
            (100, 3, 130),
            (64, 64, 600),
            (33, 64, 0),
        ] {
            let a = inputs(m * k, 1);
            let b = inputs(k * n, 2);
            let want = |i: usize, j: usize| (0..k).map(|kk| bf16(a[i * k + kk]) * bf16(b[kk * n + j])).sum::<f64>();
            // a row-major and b row-major; then a transposed (read by columns) and b read as
            // the transpose of an [n, k] matrix.
            let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            // And both read through strides other than 1 (every other element of a copy with
            // zeros between): the packing's general branch.
            let spread = |v: &[f32]| -> Vec<f32> { v.iter().flat_map(|&x| [x, 0.0]).collect() };
            let (a2, b2) = (spread(&a), spread(&b));
            let pairs = [
                (pack_lhs(&a, (k, 1), m, k), pack_rhs(&b, (n, 1), k, n)),
                (pack_lhs(&at, (1, m), m, k), pack_rhs(&bt, (1, k), k, n)),
                (pack_lhs(&a2, (2 * k, 2), m, k), pack_rhs(&b2, (2 * n, 2), k, n)),
            ];
            for &u in &units {
                for (pa, pb) in &pairs {
                    let mut c = vec![1f32; m * n];
                    matmul(u, &mut c, pa, pb, true);
                    for i in 0..m {
                        for j in 0..n {
                            let (got, w) = (c[i * n + j] as f64 - 1.0, want(i, j));
                            assert!(
                                (got - w).abs() <= 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt(),
                                "{u:?} {m}x{n}x{k} ({i},{j}): {got} vs {w}"
                            );
                        }
                    }
                    let mut c2 = vec![f32::NAN; m * n];
                    matmul(u, &mut c2, pa, pb, false);
                    assert!(c2
                        .iter()
                        .zip(&c)
                        .all(|(x, y)| (x + 1.0 - y).abs() <= 1e-6 * (1.0 + y.abs())));
                    assert_eq!(matmul_new(u, pa, pb), c2, "{u:?} {m}x{n}x{k}: a new product");
                }
            }
        }
    }
}
