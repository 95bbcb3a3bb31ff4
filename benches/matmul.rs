//! The quantized matrix multiply alone: llama.cpp's own kernel against meshd's patched one (see
//! `build.rs`), in one run, on the shapes that dominate Gemma 3 270M on a CPU. Rows:
//! - `output Q8_0`: the 262,144 × 640 output projection (tied to the token embeddings);
//! - `ffn Q5_0`: every layer's gate and up projections stacked (18 × 2 × 2,048 rows × 640).
//!
//! Each is multiplied by 1, 2, 4 and 8 token columns (one decode step of that many sequences).
//! The two kernels alternate, and each figure is the median of `ROUNDS` (default 15) runs, so a
//! busy host slows both alike. `THREADS` sets the compute threads (default: every core).
//!
//! `cargo bench --bench matmul`

use std::os::raw::c_int;
use std::time::Instant;

use llama_cpp_sys_2 as sys;
use meshd::engine::{select_matmul_kernel, MatmulKernel};

const K: i64 = 640;
const COLUMNS: [i64; 4] = [1, 2, 4, 8];

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A weight matrix of `rows` × K in `ty`, quantized from a fixed pseudo-random pattern, and
/// the graphs that multiply it by 1, 2, 4 and 8 columns.
struct Shape {
    ctx: *mut sys::ggml_context,
    graphs: Vec<(i64, *mut sys::ggml_cgraph)>,
}

impl Shape {
    fn new(ty: sys::ggml_type, rows: i64) -> Shape {
        let weights = (rows * K) as usize;
        let mem = weights * 6 + (64 << 20);
        // SAFETY: ggml allocates every tensor below inside this context's own buffer, sized for
        // the f32 source, the quantized copy and the small activations; the pointers stay valid
        // for the context's life, which is the whole bench.
        unsafe {
            let ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: mem,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: false,
            });
            assert!(!ctx.is_null(), "ggml_init failed");
            let src = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, K, rows);
            let data = std::slice::from_raw_parts_mut((*src).data as *mut f32, weights);
            fill(data, 1);
            let w = sys::ggml_new_tensor_2d(ctx, ty, K, rows);
            sys::ggml_quantize_chunk(ty, data.as_ptr(), (*w).data, 0, rows, K, std::ptr::null());
            let graphs = COLUMNS
                .iter()
                .map(|&n| {
                    let x = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, K, n);
                    fill(
                        std::slice::from_raw_parts_mut((*x).data as *mut f32, (K * n) as usize),
                        n as u64 + 7,
                    );
                    let y = sys::ggml_mul_mat(ctx, w, x);
                    let g = sys::ggml_new_graph(ctx);
                    sys::ggml_build_forward_expand(g, y);
                    (n, g)
                })
                .collect();
            Shape { ctx, graphs }
        }
    }

    /// Milliseconds for one multiply by `n` columns.
    fn run(&self, graph: *mut sys::ggml_cgraph, threads: c_int) -> f64 {
        let t = Instant::now();
        // SAFETY: the graph and its tensors belong to `self.ctx`, alive while `self` is.
        let status = unsafe { sys::ggml_graph_compute_with_ctx(self.ctx, graph, threads) };
        assert_eq!(status, sys::GGML_STATUS_SUCCESS, "ggml compute failed");
        t.elapsed().as_secs_f64() * 1e3
    }
}

/// Deterministic values in [-0.5, 0.5): the same matrix for both kernels and every run.
fn fill(out: &mut [f32], seed: u64) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for v in out {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        *v = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds = env_or("ROUNDS", 15).max(1);
    let threads = match env_or("THREADS", 0) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    } as c_int;
    let shapes = [
        ("output Q8_0", sys::GGML_TYPE_Q8_0, 262_144),
        ("ffn Q5_0", sys::GGML_TYPE_Q5_0, 18 * 2 * 2048),
    ];
    let patched = select_matmul_kernel(MatmulKernel::Meshd) == MatmulKernel::Meshd;
    println!("matmul: {rounds} rounds, {threads} threads, patched kernel built: {patched}");
    println!(
        "{:<12} {:>3} {:>14} {:>10} {:>8}",
        "weights", "n", "llama.cpp ms", "meshd ms", "speedup"
    );
    for (name, ty, rows) in shapes {
        let shape = Shape::new(ty, rows);
        for &(n, graph) in &shape.graphs {
            let (mut stock, mut ours) = (Vec::new(), Vec::new());
            shape.run(graph, threads); // warm the caches and the page tables
            for _ in 0..rounds {
                select_matmul_kernel(MatmulKernel::Llama);
                stock.push(shape.run(graph, threads));
                select_matmul_kernel(MatmulKernel::Meshd);
                ours.push(shape.run(graph, threads));
            }
            let (s, o) = (median(stock), median(ours));
            println!("{name:<12} {n:>3} {s:>14.2} {o:>10.2} {:>7.2}x", s / o);
        }
        // SAFETY: nothing uses the context after this.
        unsafe { sys::ggml_free(shape.ctx) };
    }
}
