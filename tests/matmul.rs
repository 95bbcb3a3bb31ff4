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
use meshd::engine::{select_matmul_kernel, MatmulKernel};

#[test]
fn meshds_matmul_kernels_agree_with_llama_cpps_own() {
    // Not a multiple of the 4-row tiles, so every kernel's tail rows run too.
    const ROWS: i64 = 1027;
    // Every tile shape up to 17 columns (two sweeps of 8 and a tail), then prompt-sized batches.
    let columns: Vec<i64> = (1..=17).chain([33, 100]).collect();
    let ours = [MatmulKernel::MeshdAvx2, MatmulKernel::Meshd];
    assert_eq!(
        select_matmul_kernel(MatmulKernel::Meshd),
        best_matmul_kernel()
    );
    let mut worst = 0f32;
    for (ty, name) in [(sys::GGML_TYPE_Q8_0, "Q8_0"), (sys::GGML_TYPE_Q5_0, "Q5_0")] {
        // The model's two row lengths (the embedding width and the feed-forward width), and a
        // row of an odd number of blocks (21), which the AVX-512 kernel leaves to tinyBLAS.
        for k in [640, 2048, 672] {
            let mm = MulMat::new(ty, ROWS, k, &columns);
            for &n in &columns {
                for threads in [1, 2, 3] {
                    select_matmul_kernel(MatmulKernel::Llama);
                    mm.run(n, threads);
                    let want = mm.output(n);
                    for kernel in ours {
                        let runs = select_matmul_kernel(kernel);
                        mm.run(n, threads);
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
    select_matmul_kernel(MatmulKernel::Meshd);
}
