//! meshd's CPU matmul kernels (build.rs: the prefetching AVX2 tiles, and the AVX-512 VNNI kernel
//! where the CPU has it) against llama.cpp's own, on the same ggml products: every kernel must
//! give the same values up to float rounding, for each weight type meshd takes over, row
//! lengths of the model, 1 to 17 token columns (17 is past what the AVX-512 kernel takes) and
//! thread counts that split the rows unevenly.

mod common;
#[path = "../benches/ggml/mod.rs"]
mod ggml;

use common::best_matmul_kernel;
use ggml::MulMat;
use llama_cpp_sys_2 as sys;
use meshd::engine::{select_matmul_kernel, MatmulKernel};

#[test]
fn meshds_matmul_kernels_agree_with_llama_cpps_own() {
    // Not a multiple of the 4-row tiles, so every kernel's tail rows run too.
    const ROWS: i64 = 1027;
    let columns: Vec<i64> = (1..=17).collect();
    let ours = [MatmulKernel::MeshdAvx2, MatmulKernel::Meshd];
    assert_eq!(
        select_matmul_kernel(MatmulKernel::Meshd),
        best_matmul_kernel()
    );
    let mut worst = 0f32;
    for (ty, name) in [(sys::GGML_TYPE_Q8_0, "Q8_0"), (sys::GGML_TYPE_Q5_0, "Q5_0")] {
        // The model's two row lengths: the embedding width and the feed-forward width.
        for k in [640, 2048] {
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
                        for (col, (w, g)) in want
                            .chunks(ROWS as usize)
                            .zip(got.chunks(ROWS as usize))
                            .enumerate()
                        {
                            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                            assert!(scale > 0.0);
                            for (row, (a, b)) in w.iter().zip(g).enumerate() {
                                let err = (a - b).abs() / scale;
                                worst = worst.max(err);
                                assert!(
                                    err < 1e-5,
                                    "{name} k={k} n={n} threads={threads} {runs}: \
                                     row {row} col {col}: {b} vs llama.cpp's {a}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!("largest difference, relative to the column's largest value: {worst:e}");
    select_matmul_kernel(MatmulKernel::Meshd);
}
