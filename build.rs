//! Builds meshd's one change to llama.cpp: a faster quantized matrix multiply on x86-64.
//!
//! llama.cpp multiplies Q8_0/Q5_0 weights by a batch of 2 or more tokens in tinyBLAS
//! (`llamafile/sgemm.cpp`). Its 4-row tiles read four weight rows in lock-step. The hardware
//! prefetcher does not follow that pattern, so the kernel waits on memory. For Gemma 3 270M,
//! the 262,144 × 640 output projection took about 20 ms for 2 tokens, three times the 6.3 ms
//! of the one-token path (`cargo bench --bench matmul` measures both kernels side by side).
//!
//! This script takes `sgemm.cpp` from the llama.cpp sources that `llama-cpp-sys-2` has just
//! built and applies `patches/sgemm-meshd.patch` (a plain unified diff: read it, or apply it to
//! a llama.cpp checkout with `patch -p1`). The patch changes three things:
//! 1. Each tile prefetches the next tile's weight rows.
//! 2. One token (`n == 1`) uses the same kernel for Q8_0, Q5_0 and Q4_0 weights, instead of
//!    ggml's row-by-row dot products.
//! 3. Q8_0/Q5_0 weights go to meshd's AVX-512 VNNI kernel (`src/engine/matmul_avx512.c`) on
//!    CPUs that have it; hit counters (`meshd_sgemm_calls`) prove which path ran.
//!
//! It compiles the result with the exact flags CMake used for ggml-cpu, and links it whole
//! before `libggml-cpu.a`, so the linker never takes that archive's own `sgemm.cpp.o`. If two
//! definitions ever met, the link would fail loudly; it cannot silently pick the wrong one.
//!
//! At run time, the config key `matmul_kernel` chooses the level once at start
//! (`meshd_sgemm_set_level`); `llama.cpp` switches every matmul change off, for comparison runs.
//! The second patch, `patches/ops-fa-tile-rows.patch` (flash attention on a tile's real rows; see
//! `OPS_PATCH`), is built the same way and always on: it changes no result, only the work. The
//! patches are applied only on x86-64 Linux, where they were measured. A patch that does not apply
//! (a different llama.cpp) fails the build, unless `MESHD_ALLOW_UNPATCHED_LLAMA=1` asks for
//! llama.cpp's own kernels instead (then a warning says so).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

/// meshd's change to llama.cpp, as a unified diff against the `sgemm.cpp` of the llama.cpp that
/// `llama-cpp-sys-2` (pinned in Cargo.lock) builds. Regenerate it with `diff -u` after changing it.
const PATCH: &str = "patches/sgemm-meshd.patch";

/// The second change: flash attention's tiled path (`ops.cpp`, used for prompt chunks of 64 or
/// more tokens) multiplies and soft-maxes only a query tile's real rows, not its padding. With 2
/// threads a 140-token chunk split each head into tiles of 64 + 6 + 64 + 6 rows, each computed
/// as 64: 1.8 times the work (the turn-8 time to first token of `benches/multi_turn.rs`).
const OPS_PATCH: &str = "patches/ops-fa-tile-rows.patch";

/// Set to build with llama.cpp's own kernel when the patch does not apply (a llama.cpp meshd does
/// not know yet); without it such a build fails, so a kernel can never go missing unnoticed.
const OPT_OUT: &str = "MESHD_ALLOW_UNPATCHED_LLAMA";

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
    println!("cargo:rerun-if-changed={PATCH}");
    println!("cargo:rerun-if-changed={OPS_PATCH}");
    println!("cargo:rerun-if-env-changed={OPT_OUT}");
    // `meshd --version` names the commit a release was built from (scripts/release sets it); a
    // development build says so instead of naming a commit that may be stale.
    println!("cargo:rerun-if-env-changed=MESHD_GIT_COMMIT");
    let commit = env::var("MESHD_GIT_COMMIT").unwrap_or_default();
    println!("cargo:rustc-env=MESHD_BUILD_COMMIT={commit}");
    println!("cargo:rustc-check-cfg=cfg(meshd_avx512)");
    println!("cargo:rustc-check-cfg=cfg(meshd_sgemm)");
    let target = env::var("TARGET").unwrap_or_default();
    if !(target.starts_with("x86_64") && target.contains("linux")) {
        return;
    }
    match build_patched_kernels() {
        Ok(()) => println!("cargo:rustc-cfg=meshd_sgemm"),
        Err(why) if env::var_os(OPT_OUT).is_some_and(|v| v == "1") => println!(
            "cargo:warning=meshd: using llama.cpp's own kernels ({why}); {OPT_OUT}=1 allows it"
        ),
        Err(why) => panic!(
            "meshd: cannot build the patched llama.cpp kernels: {why}.\n\
             Update {PATCH} and {OPS_PATCH} for this llama.cpp, or set {OPT_OUT}=1 to build with \
             llama.cpp's own (slower) kernels."
        ),
    }
}

/// The patched `sgemm.cpp` and `ops.cpp`, and the AVX-512 kernel; all or none (an error).
fn build_patched_kernels() -> Result<(), String> {
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
    let patched = patched_source(
        &cpu_dir.join("llamafile/sgemm.cpp"),
        PATCH,
        "sgemm-meshd.cpp",
    )?;
    let ops = patched_source(&cpu_dir.join("ops.cpp"), OPS_PATCH, "ops-meshd.cpp")?;

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

    // Each patched file is compiled with the flags CMake used for ggml-cpu, its quoted includes
    // resolving against the original directory, and linked whole: the archive's own object then
    // defines nothing still missing, so the linker never takes it.
    let compile = |file: &Path, dir: &Path, lib: &str, avx512_kernel: bool| {
        let mut build = cc::Build::new();
        if avx512_kernel {
            build.define("MESHD_AVX512_KERNEL", None);
        }
        build
            .cpp(true)
            .file(file)
            .include(dir)
            .warnings(false)
            .link_lib_modifier("+whole-archive");
        for flag in defines.iter().chain(&includes).chain(&cxx_flags) {
            build.flag(flag);
        }
        build
            .try_compile(lib)
            .map_err(|e| format!("cannot compile {}: {e}", file.display()))
    };
    compile(
        &patched,
        &cpu_dir.join("llamafile"),
        "meshd_sgemm",
        avx512.is_ok(),
    )?;
    compile(&ops, &cpu_dir, "meshd_ops", false)?;
    if avx512.is_ok() {
        // After meshd_sgemm, which calls into it; cc put both archives in OUT_DIR.
        println!("cargo:rustc-link-lib=static:+whole-archive=meshd_avx512");
        println!("cargo:rustc-cfg=meshd_avx512");
    }
    Ok(())
}

/// `source` with `patch` applied, written to `OUT_DIR/name`.
fn patched_source(source: &Path, patch: &str, name: &str) -> Result<PathBuf, String> {
    let original =
        fs::read_to_string(source).map_err(|e| format!("cannot read {}: {e}", source.display()))?;
    let diff = fs::read_to_string(patch).map_err(|e| format!("cannot read {patch}: {e}"))?;
    let parsed =
        diffy::Patch::from_str(&diff).map_err(|e| format!("{patch} is not a diff: {e}"))?;
    let text = diffy::apply(&original, &parsed)
        .map_err(|e| format!("{patch} does not apply to {}: {e}", source.display()))?;
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?).join(name);
    fs::write(&out, text).map_err(|e| e.to_string())?;
    Ok(out)
}
