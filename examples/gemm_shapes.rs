//! GFLOP/s of the default model's matrix products (batch 4 × 256 and 1 × 256) three ways:
//! gemm's own threading (`Parallelism::Rayon`), and the larger of `m` and `n` cut into one
//! independent single-threaded product per thread (what `model::fused` does), by rows or by
//! columns. `cargo run --release --example gemm_shapes`.
//!
//! Layouts: `nt` = a[m,k]·b[n,k]ᵀ (a projection), `nn` = a[m,k]·b[k,n] (its input gradient),
//! `tn` = a[k,m]ᵀ·b[k,n] (its weight gradient).

use gemm::{gemm, Parallelism};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq)]
enum Split {
    Gemm,
    Rows,
    Cols,
}

fn gflops(m: usize, n: usize, k: usize, layout: &str, split: Split) -> f64 {
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0f32; m * n];
    let (a_rs, a_cs) = if layout == "tn" { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if layout == "nt" { (1, k) } else { (n, 1) };
    let (ap, bp, cp) = (a.as_ptr() as usize, b.as_ptr() as usize, c.as_mut_ptr() as usize);
    let part = move |m0: usize, m1: usize, n0: usize, n1: usize, par: Parallelism| unsafe {
        gemm(
            m1 - m0,
            n1 - n0,
            k,
            (cp as *mut f32).add(m0 * n + n0),
            1,
            n as isize,
            false,
            (ap as *const f32).add(m0 * a_rs),
            a_cs as isize,
            a_rs as isize,
            (bp as *const f32).add(n0 * b_cs),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    };
    let run = || match split {
        Split::Gemm => part(0, m, 0, n, Parallelism::Rayon(0)),
        Split::Rows => {
            let h = (m / 2).next_multiple_of(48);
            rayon::join(
                || part(0, h, 0, n, Parallelism::None),
                || part(h, m, 0, n, Parallelism::None),
            );
        }
        Split::Cols => {
            let h = (n / 2).next_multiple_of(48);
            rayon::join(
                || part(0, m, 0, h, Parallelism::None),
                || part(0, m, h, n, Parallelism::None),
            );
        }
    };
    run();
    let reps = (2e10 / (2.0 * (m * n * k) as f64)).ceil() as usize;
    let t = Instant::now();
    for _ in 0..reps {
        run();
    }
    2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let shapes: &[(usize, usize, usize, &str)] = &[
        (1024, 576, 576, "nt"),
        (1024, 192, 576, "nt"),
        (1024, 1536, 576, "nt"),
        (1024, 576, 1536, "nt"),
        (1024, 576, 576, "nn"),
        (1024, 576, 192, "nn"),
        (1024, 1536, 576, "nn"),
        (1024, 576, 1536, "nn"),
        (576, 576, 1024, "tn"),
        (192, 576, 1024, "tn"),
        (1536, 576, 1024, "tn"),
        (576, 1536, 1024, "tn"),
        (341, 49152, 576, "nt"),
        (341, 576, 49152, "nn"),
        (49152, 576, 341, "tn"),
        (256, 576, 576, "nt"),
        (256, 192, 576, "nt"),
        (256, 1536, 576, "nt"),
        (256, 576, 1536, "nt"),
    ];
    println!("| layout | m | n | k | gemm threads | split rows | split columns |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for &(m, n, k, l) in shapes {
        let [g, r, c] = [Split::Gemm, Split::Rows, Split::Cols].map(|s| gflops(m, n, k, l, s));
        println!("| {l} | {m} | {n} | {k} | {g:.0} | {r:.0} | {c:.0} |");
    }
}
