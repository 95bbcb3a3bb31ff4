//! The quantized matrix multiply alone: llama.cpp's own kernel against meshd's (see `build.rs`:
//! the prefetching AVX2 tiles, and the AVX-512 VNNI kernel where the CPU has it), in one run,
//! on the shapes that dominate Gemma 3 270M on a CPU. Rows:
//! - `output Q8_0`: the 262,144 × 640 output projection (tied to the token embeddings);
//! - `ffn Q5_0`: every layer's gate and up projections stacked (18 × 2 × 2,048 rows × 640);
//!
//! each by 1, 2, 4, 8 and 16 token columns (one decode step of that many sequences), and
//! - `layer Q5_0`: one layer's gate projection (2,048 × 640), by 32, 128 and 512 columns (a
//!   prompt batch).
//!
//! The kernels alternate, and each figure is the median of `ROUNDS` (default 15) runs, so a
//! busy host slows all alike. The last column is the largest difference between any of meshd's
//! products and llama.cpp's, relative to the largest value of llama.cpp's column. `THREADS`
//! sets the compute threads (default: every core).
//!
//! `GATE=0.9` turns the run into a check of the claim that justifies patching llama.cpp: on every
//! decode shape, each of meshd's kernels must run at least 0.9× as fast as llama.cpp's own
//! (a ratio measured in this one run, the kernels alternating, not a time), or the run fails. A
//! shape below the gate is timed again for three times as many rounds; only a second miss fails.
//! `SHAPES=decode` runs only the decode shapes. CI runs `ROUNDS=5 SHAPES=decode GATE=0.9`.
//!
//! `cargo bench --bench matmul`

mod ggml;

use ggml::{largest_difference, MulMat};
use llama_cpp_sys_2 as sys;
use meshd::engine::{available_matmul_kernels, select_matmul_kernel};

const K: i64 = 640;
/// Token columns: one decode step of that many sequences, or a prompt batch.
const DECODE: &[i64] = &[1, 2, 4, 8, 16];
const PROMPT: &[i64] = &[32, 128, 512];

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median time of each kernel on one product, the kernels alternating round by round.
fn time_kernels(
    shape: &MulMat,
    n: i64,
    kernels: &[(meshd::engine::MatmulKernel, &str)],
    rounds: usize,
    threads: usize,
) -> Vec<f64> {
    let mut times = vec![Vec::new(); kernels.len()];
    shape.run(n, threads); // warm the caches and the page tables
    for _ in 0..rounds {
        for (k, &(kernel, _)) in kernels.iter().enumerate() {
            select_matmul_kernel(kernel);
            times[k].push(shape.run(n, threads));
        }
    }
    times.into_iter().map(median).collect()
}

fn main() {
    let rounds = env_or("ROUNDS", 15).max(1);
    let threads = match env_or("THREADS", 0) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let gate: Option<f64> = std::env::var("GATE").ok().map(|g| {
        g.parse()
            .unwrap_or_else(|_| panic!("GATE={g}: a ratio such as 0.9"))
    });
    let decode_only = std::env::var("SHAPES").is_ok_and(|s| s == "decode");
    let shapes = [
        ("output Q8_0", sys::GGML_TYPE_Q8_0, 262_144, DECODE),
        ("ffn Q5_0", sys::GGML_TYPE_Q5_0, 18 * 2 * 2048, DECODE),
        ("layer Q5_0", sys::GGML_TYPE_Q5_0, 2048, PROMPT),
    ];
    let mut below_gate = Vec::new();
    // llama.cpp's own first; each of meshd's is compared with it.
    let kernels = available_matmul_kernels();
    println!(
        "matmul: {rounds} rounds, {threads} threads; ms per multiply (speed-up over llama.cpp)"
    );
    print!("{:<12} {:>3}", "weights", "n");
    for (_, name) in &kernels {
        print!(" {name:>22}");
    }
    println!("  max diff");
    for (name, ty, rows, columns) in shapes {
        if decode_only && columns != DECODE {
            continue;
        }
        let shape = MulMat::new(ty, rows, K, columns);
        for &n in columns {
            let mut outputs = vec![Vec::new(); kernels.len()];
            let ms = time_kernels(&shape, n, &kernels, rounds, threads);
            for (k, &(kernel, _)) in kernels.iter().enumerate() {
                select_matmul_kernel(kernel);
                shape.run(n, threads);
                outputs[k] = shape.output(n);
            }
            print!("{name:<12} {n:>3}");
            for t in &ms {
                print!(" {:>13.2} ({:>5.2}x)", t, ms[0] / t);
            }
            if let Some(gate) = gate.filter(|_| columns == DECODE) {
                let below = |ms: &[f64]| (1..ms.len()).any(|k| ms[0] / ms[k] < gate);
                // A shared host can slow one kernel's rounds: a shape below the gate is timed
                // again, three times as long, and only a second miss counts.
                let again =
                    below(&ms).then(|| time_kernels(&shape, n, &kernels, 3 * rounds, threads));
                if let Some(again) = again.filter(|a| below(a)) {
                    for k in 1..again.len() {
                        let (first, second) = (ms[0] / ms[k], again[0] / again[k]);
                        if second < gate {
                            below_gate.push(format!(
                                "{name} n={n} {}: {first:.2}x, then {second:.2}x",
                                kernels[k].1
                            ));
                        }
                    }
                }
            }
            let worst = outputs[1..]
                .iter()
                .map(|o| largest_difference(&outputs[0], o, rows as usize).0)
                .fold(0f32, f32::max);
            println!("  {worst:.1e}");
        }
    }
    if let Some(gate) = gate {
        if !below_gate.is_empty() {
            eprintln!(
                "matmul: meshd's kernels ran below {gate}x llama.cpp's on decode shapes: {}",
                below_gate.join("; ")
            );
            std::process::exit(1);
        }
        println!(
            "matmul: every meshd kernel ran at least {gate}x llama.cpp's on every decode shape"
        );
    }
}
