//! Builds meshd's one change to llama.cpp: a faster quantized matrix multiply on x86-64.
//!
//! llama.cpp multiplies Q8_0/Q5_0 weights by a batch of 2 or more tokens in tinyBLAS
//! (`llamafile/sgemm.cpp`). Its 4-row tiles read four weight rows in lock-step. The hardware
//! prefetcher does not follow that pattern, so the kernel waits on memory. For Gemma 3 270M,
//! the 262,144 × 640 output projection took about 20 ms for 2 tokens, three times the 6.3 ms
//! of the one-token path (`cargo bench --bench matmul` measures both kernels side by side).
//!
//! This script takes `sgemm.cpp` from the llama.cpp sources that `llama-cpp-sys-2` has just
//! built, and changes two things:
//! 1. Each tile prefetches the next tile's weight rows.
//! 2. One token (`n == 1`) uses the same kernel for Q8_0, Q5_0 and Q4_0 weights, instead of
//!    ggml's row-by-row dot products.
//!
//! It compiles the result with the exact flags CMake used for ggml-cpu, and links it whole
//! before `libggml-cpu.a`, so the linker never takes that archive's own `sgemm.cpp.o`. If two
//! definitions ever met, the link would fail loudly; it cannot silently pick the wrong one.
//!
//! At run time, the config key `matmul_kernel = "llama.cpp"` switches both changes off, for
//! comparison runs (the engine calls `meshd_sgemm_set_patched`). The patch is
//! applied only on x86-64 Linux, where it was measured. Where any anchor text is missing (a
//! different llama.cpp), the build goes on with llama.cpp's own kernel and prints a warning.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

/// The text the patch expects in `sgemm.cpp`, and what replaces it.
const PATCHES: [(&str, &str); 3] = [
    (
        "#include <type_traits>\n",
        "#include <type_traits>\n#include <atomic>\n\n\
         // meshd: the engine chooses the kernel at start (config key `matmul_kernel`):\n\
         // 0 llama.cpp's own, 1 the prefetching AVX2 tiles, 2 the AVX-512 VNNI kernel too.\n\
         static std::atomic<int> meshd_sgemm_level{1};\n\
         static inline int meshd_level() {\n\
         \x20   return meshd_sgemm_level.load(std::memory_order_relaxed);\n\
         }\n\
         static inline bool meshd_sgemm_patched() { return meshd_level() > 0; }\n\
         // meshd: calls each of meshd's paths took (per thread), so tests can prove they ran:\n\
         // [1] a one-token product routed into the prefetching tiles, [2] the AVX-512 kernel.\n\
         static std::atomic<unsigned long long> meshd_calls[3];\n\
         extern \"C\" unsigned long long meshd_sgemm_calls(int path) {\n\
         \x20   return path >= 0 && path < 3 ? meshd_calls[path].load(std::memory_order_relaxed) : 0;\n\
         }\n\
         #if defined(MESHD_AVX512_KERNEL)\n\
         extern \"C\" int meshd_q0_gemm_avx512(int64_t m, int64_t n, int64_t k, const void *A,\n\
         \x20   int64_t lda, const void *B, int64_t ldb, float *C, int64_t ldc, int type, int ith,\n\
         \x20   int nth);\n\
         static bool meshd_cpu_has_avx512_vnni() {\n\
         \x20   static const bool has = __builtin_cpu_supports(\"avx512f\") &&\n\
         \x20       __builtin_cpu_supports(\"avx512bw\") && __builtin_cpu_supports(\"avx512vl\") &&\n\
         \x20       __builtin_cpu_supports(\"avx512dq\") && __builtin_cpu_supports(\"avx512vnni\");\n\
         \x20   return has;\n\
         }\n\
         #else\n\
         static bool meshd_cpu_has_avx512_vnni() { return false; }\n\
         #endif\n\
         // Asks for a level; the CPU or the build may allow less. Returns the level that runs.\n\
         extern \"C\" int meshd_sgemm_set_level(int level) {\n\
         \x20   int top = meshd_cpu_has_avx512_vnni() ? 2 : 1;\n\
         \x20   level = level < 0 ? 0 : level > top ? top : level;\n\
         \x20   meshd_sgemm_level.store(level, std::memory_order_relaxed);\n\
         \x20   return level;\n\
         }\n",
    ),
    (
        "            int64_t ii = m0 + job / xtiles * 4;\n\
         \x20           int64_t jj = n0 + job % xtiles * RN;\n\
         \x20           __m256 Cv[RN][4] = {};\n",
        "            int64_t ii = m0 + job / xtiles * 4;\n\
         \x20           int64_t jj = n0 + job % xtiles * RN;\n\
         \x20           // meshd: fetch the next tile's four weight rows while this one computes.\n\
         \x20           if (job % xtiles == 0 && ii + 8 <= m && meshd_sgemm_patched()) {\n\
         \x20               const char * next = (const char *)(A + lda * (ii + 4));\n\
         \x20               const char * stop = (const char *)(A + lda * (ii + 8));\n\
         \x20               for (; next < stop; next += 64)\n\
         \x20                   _mm_prefetch(next, _MM_HINT_T0);\n\
         \x20           }\n\
         \x20           __m256 Cv[RN][4] = {};\n",
    ),
    (
        "#if !defined(__MMA__)\n    if (n < 2)\n        return false;\n#endif\n",
        "#if !defined(__MMA__)\n\
         \x20   // meshd: one token takes the prefetching kernel too for these weight types.\n\
         \x20   const bool meshd_gemv = meshd_sgemm_patched() && (Atype == GGML_TYPE_Q8_0 ||\n\
         \x20       Atype == GGML_TYPE_Q5_0 || Atype == GGML_TYPE_Q4_0);\n\
         \x20   if (n < 2 && !meshd_gemv)\n\
         \x20       return false;\n\
         #endif\n\
         #if defined(MESHD_AVX512_KERNEL)\n\
         \x20   // meshd: Q8_0 and Q5_0 weights on AVX-512 VNNI, where the CPU has it.\n\
         \x20   if (meshd_level() >= 2 && Ctype == GGML_TYPE_F32 && Btype == GGML_TYPE_Q8_0 &&\n\
         \x20       (Atype == GGML_TYPE_Q8_0 || Atype == GGML_TYPE_Q5_0) &&\n\
         \x20       meshd_q0_gemm_avx512(m, n, k, A, lda, B, ldb, (float *)C, ldc,\n\
         \x20           Atype == GGML_TYPE_Q8_0 ? 0 : 1, params->ith, params->nth)) {\n\
         \x20       meshd_calls[2].fetch_add(1, std::memory_order_relaxed);\n\
         \x20       return true;\n\
         \x20   }\n\
         #endif\n\
         #if !defined(__MMA__)\n\
         \x20   // (ggml asks first with the activations in F32, which tinyBLAS declines here.)\n\
         \x20   if (n < 2 && Btype == GGML_TYPE_Q8_0)\n\
         \x20       meshd_calls[1].fetch_add(1, std::memory_order_relaxed);\n\
         #endif\n",
    ),
];

/// meshd's own AVX-512 VNNI kernel for decode steps, and the flags it needs (build.rs and the
/// patched sgemm.cpp make sure it only runs on CPUs that have them).
const AVX512_KERNEL: &str = "src/engine/matmul_avx512.c";
const AVX512_FLAGS: [&str; 7] = [
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512vnni",
    "-mf16c",
    "-mfma",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={AVX512_KERNEL}");
    println!("cargo:rustc-check-cfg=cfg(meshd_sgemm)");
    let target = env::var("TARGET").unwrap_or_default();
    if !(target.starts_with("x86_64") && target.contains("linux")) {
        return;
    }
    match build_sgemm() {
        Ok(()) => println!("cargo:rustc-cfg=meshd_sgemm"),
        Err(why) => println!(
            "cargo:warning=meshd: using llama.cpp's own sgemm kernel ({why}); see build.rs"
        ),
    }
}

fn build_sgemm() -> Result<(), String> {
    // llama-cpp-sys-2 (`links = "llama"`) tells its direct dependents where its CMake tree is.
    let cmake_dir = env::var("DEP_LLAMA_GGML_CMAKE_DIR")
        .map_err(|_| "llama-cpp-sys-2 did not report its build directory".to_string())?;
    let out_root = Path::new(&cmake_dir)
        .ancestors()
        .nth(2)
        .ok_or("unexpected build directory layout")?;
    let flags_file = out_root.join("build/ggml/src/CMakeFiles/ggml-cpu.dir/flags.make");
    let flags = fs::read_to_string(&flags_file)
        .map_err(|e| format!("cannot read {}: {e}", flags_file.display()))?;
    // A rebuild of llama.cpp with other flags (say `GGML_AVX512=ON`) rewrites this file.
    println!("cargo:rerun-if-changed={}", flags_file.display());
    let field = |name: &str| -> Result<Vec<String>, String> {
        let line = flags
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim_start().strip_prefix('='))
            .ok_or_else(|| format!("{name} missing from flags.make"))?;
        if line.contains('\\') || line.contains('"') {
            return Err(format!("{name} has quoting this script does not parse"));
        }
        Ok(line.split_whitespace().map(str::to_string).collect())
    };
    let defines = field("CXX_DEFINES")?;
    let includes = field("CXX_INCLUDES")?;
    let cxx_flags = field("CXX_FLAGS")?;
    if !defines.iter().any(|d| d == "-DGGML_USE_LLAMAFILE") {
        return Err("ggml was built without llamafile".into());
    }

    // The include list names ggml's source tree; sgemm.cpp sits under ggml-cpu there.
    let cpu_dir = includes
        .iter()
        .filter_map(|i| i.strip_prefix("-I"))
        .map(PathBuf::from)
        .find(|p| p.ends_with("ggml-cpu"))
        .ok_or("no ggml-cpu include directory")?;
    let source = cpu_dir.join("llamafile/sgemm.cpp");
    let mut text = fs::read_to_string(&source)
        .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
    for (anchor, replacement) in PATCHES {
        if text.matches(anchor).count() != 1 {
            return Err(format!(
                "sgemm.cpp does not contain the expected text once: {:?}",
                anchor.lines().next().unwrap_or_default()
            ));
        }
        text = text.replacen(anchor, replacement, 1);
    }
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let patched = out.join("sgemm-meshd.cpp");
    fs::write(&patched, text).map_err(|e| e.to_string())?;

    // The AVX-512 kernel is compiled on its own, with AVX-512 flags, so that no code the CPU check
    // guards can leak into code that runs everywhere. A compiler without those flags only costs
    // the kernel, not the build.
    let avx512 = cc::Build::new()
        .file(AVX512_KERNEL)
        .opt_level(3)
        .flags(AVX512_FLAGS)
        .warnings(false)
        .cargo_metadata(false)
        .try_compile("meshd_avx512");
    if let Err(e) = &avx512 {
        println!("cargo:warning=meshd: no AVX-512 matmul kernel ({e}); see build.rs");
    }

    let mut build = cc::Build::new();
    if avx512.is_ok() {
        build.define("MESHD_AVX512_KERNEL", None);
    }
    build
        .cpp(true)
        .file(&patched)
        // Quoted includes in sgemm.cpp resolve against the original directory.
        .include(source.parent().expect("a file has a parent"))
        .warnings(false)
        .link_lib_modifier("+whole-archive");
    for flag in defines.iter().chain(&includes).chain(&cxx_flags) {
        build.flag(flag);
    }
    build
        .try_compile("meshd_sgemm")
        .map_err(|e| format!("cannot compile the patched sgemm.cpp: {e}"))?;
    if avx512.is_ok() {
        // After meshd_sgemm, which calls into it; cc put both archives in OUT_DIR.
        println!("cargo:rustc-link-lib=static:+whole-archive=meshd_avx512");
    }
    Ok(())
}
