//! One quantized weight matrix multiplied by a few token columns through ggml itself, the way
//! llama.cpp runs it: shared by `benches/matmul.rs` (timing) and `tests/matmul.rs` (agreement
//! between the kernels).

use std::os::raw::c_int;
use std::time::Instant;

use llama_cpp_sys_2 as sys;

/// A `rows` × `k` weight matrix in `ty`, quantized from a fixed pseudo-random pattern, and one
/// graph per column count that multiplies it by that many token columns.
pub struct MulMat {
    ctx: *mut sys::ggml_context,
    graphs: Vec<(i64, *mut sys::ggml_cgraph, *mut sys::ggml_tensor)>,
}

impl MulMat {
    pub fn new(ty: sys::ggml_type, rows: i64, k: i64, columns: &[i64]) -> MulMat {
        let weights = (rows * k) as usize;
        let activations: i64 = columns.iter().map(|&n| n * (k + rows)).sum();
        let mem = weights * 6 + activations as usize * 8 + (64 << 20);
        // SAFETY: ggml allocates every tensor below inside this context's own buffer, sized for
        // the f32 source, the quantized copy, the activations and the results; the pointers
        // stay valid for the context's life, which ends in `drop`.
        unsafe {
            let ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: mem,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: false,
            });
            assert!(!ctx.is_null(), "ggml_init failed");
            let src = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, k, rows);
            let data = std::slice::from_raw_parts_mut((*src).data as *mut f32, weights);
            fill(data, 1);
            let w = sys::ggml_new_tensor_2d(ctx, ty, k, rows);
            sys::ggml_quantize_chunk(ty, data.as_ptr(), (*w).data, 0, rows, k, std::ptr::null());
            let graphs = columns
                .iter()
                .map(|&n| {
                    let x = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, k, n);
                    fill(
                        std::slice::from_raw_parts_mut((*x).data as *mut f32, (k * n) as usize),
                        n as u64 + 7,
                    );
                    let y = sys::ggml_mul_mat(ctx, w, x);
                    let g = sys::ggml_new_graph(ctx);
                    sys::ggml_build_forward_expand(g, y);
                    (n, g, y)
                })
                .collect();
            MulMat { ctx, graphs }
        }
    }

    /// Multiplies by `n` columns on `threads` threads; returns the milliseconds it took.
    pub fn run(&self, n: i64, threads: usize) -> f64 {
        let graph = self.graph(n).1;
        let t = Instant::now();
        // SAFETY: the graph and its tensors belong to `self.ctx`, alive while `self` is.
        let status = unsafe { sys::ggml_graph_compute_with_ctx(self.ctx, graph, threads as c_int) };
        assert_eq!(status, sys::GGML_STATUS_SUCCESS, "ggml compute failed");
        t.elapsed().as_secs_f64() * 1e3
    }

    /// The last product by `n` columns: `n` columns of `rows` values.
    pub fn output(&self, n: i64) -> Vec<f32> {
        let y = self.graph(n).2;
        // SAFETY: `y` is an f32 tensor of this context; `ggml_nelements` counts its values.
        unsafe {
            let len = sys::ggml_nelements(y) as usize;
            std::slice::from_raw_parts((*y).data as *const f32, len).to_vec()
        }
    }

    fn graph(&self, n: i64) -> (i64, *mut sys::ggml_cgraph, *mut sys::ggml_tensor) {
        *self
            .graphs
            .iter()
            .find(|g| g.0 == n)
            .expect("a column count given to MulMat::new")
    }
}

impl Drop for MulMat {
    fn drop(&mut self) {
        // SAFETY: nothing uses the context after this; `self` owns it.
        unsafe { sys::ggml_free(self.ctx) };
    }
}

/// The largest difference between two products of `rows`-value columns, relative to the largest
/// value in `want`'s column, with the row and column where it is. NaN (a column of zeros, or a
/// NaN in either product) is returned at once, so that no bound passes it.
pub fn largest_difference(want: &[f32], got: &[f32], rows: usize) -> (f32, usize, usize) {
    let mut worst = (0f32, 0, 0);
    for (col, (w, g)) in want.chunks(rows).zip(got.chunks(rows)).enumerate() {
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (row, (a, b)) in w.iter().zip(g).enumerate() {
            let err = (a - b).abs() / scale;
            if err.is_nan() {
                return (err, row, col);
            }
            if err > worst.0 {
                worst = (err, row, col);
            }
        }
    }
    worst
}

/// Deterministic values in [-0.5, 0.5): the same matrix for every kernel and every run.
fn fill(out: &mut [f32], seed: u64) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for v in out {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        *v = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
    }
}
