//! meshd's CPU matmul kernels (build.rs: the prefetching AVX2 tiles, and the AVX-512 VNNI kernel
//! where the CPU has it) against llama.cpp's own, on the same ggml products: every kernel must
//! give the same values up to float rounding, for each weight type meshd takes over, the
//! model's row lengths and an odd one, 1 to 17 token columns and two prompt-sized batches (33
//! and 100), and thread counts that split the rows unevenly. `scripts/test` also runs this test
//! under an emulated CPU without AVX-512, where it must pick the AVX2 tiles and not crash.

mod common;
#[path = "../benches/ggml/mod.rs"]
mod ggml;

use common::best_matmul_kernel;
use ggml::{largest_difference, MulMat};
use llama_cpp_sys_2 as sys;
use meshd::engine::{
    available_matmul_kernels, matmul_kernel_calls, select_matmul_kernel, KernelCalls, MatmulKernel,
};

/// Which of meshd's paths must have run for a product (and which must not): the AVX-512 kernel
/// takes Q8_0 weights from two columns and Q5_0 from one, on rows of an even number of blocks;
/// a one-token product it leaves goes to the prefetching tiles.
fn expected_paths(runs: &str, q8: bool, blocks: i64, n: i64) -> (bool, bool) {
    let avx512 = runs == "meshd-avx512" && blocks % 2 == 0 && (n >= if q8 { 2 } else { 1 });
    let one_token = runs != "llama.cpp" && n == 1 && !avx512;
    (one_token, avx512)
}

#[test]
fn meshds_matmul_kernels_agree_with_llama_cpps_own() {
    // Not a multiple of the 4-row tiles, so every kernel's tail rows run too.
    const ROWS: i64 = 1027;
    // Every tile shape up to 17 columns (two sweeps of 8 and a tail), then prompt-sized batches.
    // Under an emulated CPU (`MESHD_MATMUL_SUBSET=1`, scripts/test's qemu run, ~20× slower) a
    // subset: one and two columns, a 4-column tile with a tail, a full sweep, a sweep and a
    // tail, and a prompt batch.
    let subset = std::env::var("MESHD_MATMUL_SUBSET").is_ok_and(|v| v == "1");
    let columns: Vec<i64> = if subset {
        vec![1, 2, 5, 8, 9, 33]
    } else {
        (1..=17).chain([33, 100]).collect()
    };
    let thread_counts: &[usize] = if subset { &[1, 3] } else { &[1, 2, 3] };
    let ours = [MatmulKernel::MeshdAvx2, MatmulKernel::Meshd];
    assert_eq!(
        select_matmul_kernel(MatmulKernel::Meshd),
        best_matmul_kernel()
    );
    let mut worst = 0f32;
    let mut avx512_products = 0u64;
    for (ty, name) in [(sys::GGML_TYPE_Q8_0, "Q8_0"), (sys::GGML_TYPE_Q5_0, "Q5_0")] {
        // The model's two row lengths (the embedding width and the feed-forward width), and a
        // row of an odd number of blocks (21), which the AVX-512 kernel leaves to tinyBLAS.
        for k in [640, 2048, 672] {
            let mm = MulMat::new(ty, ROWS, k, &columns);
            for &n in &columns {
                for &threads in thread_counts {
                    select_matmul_kernel(MatmulKernel::Llama);
                    // Listing the kernels must leave llama.cpp's own in force: if it switched,
                    // meshd's counters would move below.
                    let listed = available_matmul_kernels();
                    assert_eq!(listed.last().unwrap().1, best_matmul_kernel());
                    let before = matmul_kernel_calls();
                    mm.run(n, threads);
                    assert_eq!(
                        matmul_kernel_calls(),
                        before,
                        "{name} k={k} n={n}: a meshd path ran under llama.cpp's own kernels"
                    );
                    let want = mm.output(n);
                    for kernel in ours {
                        let runs = select_matmul_kernel(kernel);
                        let before = matmul_kernel_calls();
                        mm.run(n, threads);
                        let after = matmul_kernel_calls();
                        let ran = |f: fn(&KernelCalls) -> u64| f(&after) > f(&before);
                        let (one_token, avx512) = expected_paths(runs, name == "Q8_0", k / 32, n);
                        assert_eq!(
                            (ran(|c| c.avx2_one_token), ran(|c| c.avx512)),
                            (one_token, avx512),
                            "{name} k={k} n={n} threads={threads} {runs}: \
                             (prefetching one-token path, AVX-512 kernel) ran / should have run"
                        );
                        avx512_products += u64::from(avx512);
                        let got = mm.output(n);
                        let (err, row, col) = largest_difference(&want, &got, ROWS as usize);
                        worst = worst.max(err);
                        let at = col * ROWS as usize + row;
                        assert!(
                            err < 1e-5,
                            "{name} k={k} n={n} threads={threads} {runs}: row {row} col {col}: \
                             {} vs llama.cpp's {}",
                            got[at],
                            want[at]
                        );
                    }
                }
            }
        }
    }
    eprintln!("largest difference, relative to the column's largest value: {worst:e}");
    if best_matmul_kernel() == "meshd-avx512" {
        assert!(avx512_products > 0);
        eprintln!("the AVX-512 VNNI kernel computed {avx512_products} of these products");
    } else {
        eprintln!(
            "NOTE: this CPU has no AVX-512 VNNI: the AVX-512 kernel was NOT tested here (only that \
             it never runs); the prefetching AVX2 tiles were"
        );
    }
    select_matmul_kernel(MatmulKernel::Meshd);
}
