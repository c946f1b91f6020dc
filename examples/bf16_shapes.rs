//! GFLOP/s of the default model's matrix products in bf16 (`model::bf16`) on each unit this
//! CPU has, beside f32 gemm split over the threads as `model::fused` does: the kernel alone
//! (operands packed beforehand, as a cached weight is) and with the activation packed per
//! call. `cargo run --release --example bf16_shapes`.

use codespot::model::bf16;
use std::time::Instant;

fn rate(flop: f64, mut f: impl FnMut()) -> f64 {
    f();
    let reps = (1e10 / flop).ceil() as usize;
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    flop * reps as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let shapes: &[(usize, usize, usize)] = &[
        (1024, 576, 576),
        (1024, 192, 576),
        (1024, 1536, 576),
        (1024, 576, 1536),
        (576, 1536, 1024),
        (256, 576, 576),
        (341, 49152, 576),
    ];
    let mut units = bf16::available_units();
    if bf16::unit().is_none() {
        println!("this CPU has neither AMX nor AVX512-BF16 (or CODESPOT_BF16_UNIT=none): f32 gemm only");
        units.clear();
    }
    println!(
        "m x n x k | f32 gemm | {}",
        units
            .iter()
            .map(|u| format!("{} kernel | + packing a", u.name()))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    for &(m, n, k) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 / 97.0 - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 89) as f32 / 89.0 - 0.5).collect();
        let mut c = vec![0f32; m * n];
        let flop = 2.0 * (m * n * k) as f64;
        let f32r = rate(flop, || codespot::model::fused::bench_nn(&mut c, &a, &b, m, n, k));
        let pb = bf16::pack_rhs(&b, (n, 1), k, n);
        let pa = bf16::pack_lhs(&a, (k, 1), m, k);
        let mut row = format!("{m} x {n} x {k} | {f32r:.0}");
        for &u in &units {
            let kr = rate(flop, || bf16::matmul(u, &mut c, &pa, &pb, false));
            let pr = rate(flop, || {
                let pa = bf16::pack_lhs(&a, (k, 1), m, k);
                bf16::matmul(u, &mut c, &pa, &pb, false)
            });
            row += &format!(" | {kr:.0} | {pr:.0}");
        }
        println!("{row}");
    }
}
