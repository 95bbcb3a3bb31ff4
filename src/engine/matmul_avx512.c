// meshd's AVX-512 VNNI kernel for quantized products: Q8_0 or Q5_0 weights times Q8_0 token
// columns, the products that dominate batched decoding (and prompt processing) of small models.
//
// This file is compiled on its own with AVX-512 flags (see build.rs). Nothing in it may run on
// a CPU without AVX-512 F/BW/VL/DQ and VNNI: the patched sgemm.cpp calls
// `meshd_q0_gemm_avx512` only after checking the CPU at run time, so one portable binary
// serves old and new x86-64 alike.
//
// Why it is faster than llama.cpp's tinyBLAS (AVX2) on such CPUs: one `vpdpbusd` multiplies
// and sums 64 byte pairs, where AVX2 needs sign fix-ups and two multiply-add steps for 32.
// VNNI multiplies unsigned by signed bytes, so weights are shifted to unsigned (Q8_0: +128,
// Q5_0: its 5-bit code, which is the value +16) and the shift is taken back through each
// column's per-4-byte sums, precomputed once per call: the dot product then costs one
// instruction per 64 weights, plus a convert, a scale multiply and a fused add per 2 blocks.
//
// The block layouts are ggml's (`ggml-common.h`), restated here so this file needs no ggml
// header compiled with other flags.

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint16_t d;     // scale, IEEE half
    int8_t qs[32];  // values
} q8_0_block;

typedef struct {
    uint16_t d;       // scale, IEEE half
    uint8_t qh[4];    // fifth bit of each of the 32 values
    uint8_t qs[16];   // low nibbles: value j in byte j, value j + 16 in byte j's high half
} q5_0_block;

_Static_assert(sizeof(q8_0_block) == 34, "ggml block_q8_0 is 34 bytes");
_Static_assert(sizeof(q5_0_block) == 22, "ggml block_q5_0 is 22 bytes");

enum { WEIGHTS_Q8_0 = 0, WEIGHTS_Q5_0 = 1 };

// Columns per sweep over the weights. A prompt batch sweeps them once per 8 columns; one layer's
// matrix stays in the L2 cache between sweeps. Even the 168 MB output projection, swept twice from
// memory for 16 columns, took 11.7 ms against tinyBLAS's 29.8 (benches/matmul.rs).
#define COLS 8
// The packed columns live on the stack; a longer row goes to tinyBLAS.
#define PACK_BYTES (96 * 1024)
// How far ahead each row's weights are prefetched (measured on the 168 MB output projection:
// 8 rows beat 4, 16 and 32).
#define PREFETCH_ROWS 8

// Two consecutive blocks of one token column, ready for the inner loop.
typedef struct {
    __m512i q;     // the 64 signed values
    __m512i fix;   // -(weight shift) × the sum of each 4 values: undoes the unsigned shift
    __m512 d;      // block scales: lanes 0-7 the first block's, 8-15 the second's
} packed_pair;

static inline __m512 pair_scales(uint16_t d0, uint16_t d1) {
    __m512 lo = _mm512_set1_ps(_cvtsh_ss(d0));
    return _mm512_insertf32x8(lo, _mm256_set1_ps(_cvtsh_ss(d1)), 1);
}

// The 64 values of two consecutive Q8_0 blocks.
static inline __m512i q8_0_pair_values(const q8_0_block *b) {
    return _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)b[0].qs)),
        _mm256_loadu_si256((const __m256i *)b[1].qs), 1);
}

static void pack_columns(const q8_0_block *B, int64_t ldb, int64_t pairs, int64_t col0,
                         int cols, int shift, packed_pair *out) {
    const __m512i ones = _mm512_set1_epi8(1);
    const __m512i neg_shift = _mm512_set1_epi32(-shift);
    for (int64_t p = 0; p < pairs; p++) {
        for (int c = 0; c < cols; c++) {
            const q8_0_block *b = B + ldb * (col0 + c) + 2 * p;
            __m512i q = q8_0_pair_values(b);
            packed_pair *o = &out[p * cols + c];
            o->q = q;
            o->fix = _mm512_mullo_epi32(
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, q), neg_shift);
            o->d = pair_scales(b[0].d, b[1].d);
        }
    }
}

// Weights of blocks 2p and 2p + 1 of a row as 64 unsigned bytes, and their scales.
static inline __m512i load_q8_0(const void *row, int64_t p, __m512 *d) {
    const q8_0_block *b = (const q8_0_block *)row + 2 * p;
    *d = pair_scales(b[0].d, b[1].d);
    return _mm512_xor_si512(q8_0_pair_values(b), _mm512_set1_epi8((char)0x80));
}

static inline __m512i load_q5_0(const void *row, int64_t p, __m512 *d) {
    const q5_0_block *b = (const q5_0_block *)row + 2 * p;
    *d = pair_scales(b[0].d, b[1].d);
    // [qs0, qs0, qs1, qs1]: low nibbles from the 1st and 3rd quarters, high from the others.
    __m512i x = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b[0].qs))),
        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b[1].qs)), 1);
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512i lo = _mm512_and_si512(x, nibble);
    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), nibble);
    __m512i u = _mm512_mask_blend_epi8(0xFFFF0000FFFF0000ull, lo, hi);
    uint32_t h0, h1;
    memcpy(&h0, b[0].qh, 4);
    memcpy(&h1, b[1].qh, 4);
    __mmask64 high = (__mmask64)h0 | ((__mmask64)h1 << 32);
    return _mm512_mask_add_epi8(u, high, u, _mm512_set1_epi8(0x10));
}

static inline __m512i load_pair(int type, const void *row, int64_t p, __m512 *d) {
    return type == WEIGHTS_Q8_0 ? load_q8_0(row, p, d) : load_q5_0(row, p, d);
}

// `rows` (1, 2 or 4) weight rows times `cols` packed columns; constant arguments let the compiler
// unroll this into one kernel per shape.
static inline __attribute__((always_inline)) void rows_times_columns(
    int type, int rows, int cols, const char *A, int64_t row_bytes, int64_t pairs,
    const packed_pair *pack, float *C, int64_t ldc) {
    __m512 acc[4][COLS];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512i a[4];
        __m512 da[4];
        for (int r = 0; r < rows; r++) {
            const char *row = A + r * row_bytes;
            // The hardware prefetcher alone leaves the weight stream short of the memory's
            // bandwidth: ask for the same spot PREFETCH_ROWS rows ahead.
            _mm_prefetch(row + PREFETCH_ROWS * row_bytes + p * (row_bytes / pairs), _MM_HINT_T0);
            a[r] = load_pair(type, row, p, &da[r]);
        }
        const packed_pair *b = pack + p * cols;
        for (int c = 0; c < cols; c++) {
            for (int r = 0; r < rows; r++) {
                __m512i dot = _mm512_dpbusd_epi32(b[c].fix, a[r], b[c].q);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                            _mm512_mul_ps(da[r], b[c].d), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) C[ldc * c + r] = _mm512_reduce_add_ps(acc[r][c]);
}

#define SHAPE(ROWS, COLS_)                                                                   \
    case COLS_:                                                                              \
        rows_times_columns(type, ROWS, COLS_, a, row_bytes, pairs, pack, c, ldc);             \
        break;

static inline __attribute__((always_inline)) void sweep(int type, const char *A, int64_t row_bytes, int64_t pairs, int64_t first,
                  int64_t end, int cols, const packed_pair *pack, float *C, int64_t ldc) {
    int64_t i = first;
    // Four-row tiles for up to four columns, two-row tiles beyond: 16 accumulators either way.
    if (cols <= 4) {
        for (; i + 4 <= end; i += 4) {
            const char *a = A + i * row_bytes;
            float *c = C + i;
            switch (cols) { SHAPE(4, 1) SHAPE(4, 2) SHAPE(4, 3) SHAPE(4, 4) }
        }
    } else {
        for (; i + 2 <= end; i += 2) {
            const char *a = A + i * row_bytes;
            float *c = C + i;
            switch (cols) { SHAPE(2, 5) SHAPE(2, 6) SHAPE(2, 7) SHAPE(2, 8) }
        }
    }
    for (; i < end; i++) {
        const char *a = A + i * row_bytes;
        float *c = C + i;
        switch (cols) {
            SHAPE(1, 1) SHAPE(1, 2) SHAPE(1, 3) SHAPE(1, 4)
            SHAPE(1, 5) SHAPE(1, 6) SHAPE(1, 7) SHAPE(1, 8)
        }
    }
}

// C (m × n, column j at C + ldc·j) = A (m rows of k blocks, lda blocks apart) × B (n columns
// of k Q8_0 blocks, ldb blocks apart). This thread (`ith` of `nth`) computes its share of the
// rows. Returns 0, having done nothing, for shapes it does not take. One token of Q8_0 weights
// is one of those: that product is bound by memory, not arithmetic, and the prefetching AVX2
// tiles ran Gemma's single-sequence decoding faster (load_chat, c=1: 104 against 88 tokens/s).
int meshd_q0_gemm_avx512(int64_t m, int64_t n, int64_t k, const void *A, int64_t lda,
                         const void *B, int64_t ldb, float *C, int64_t ldc, int type,
                         int ith, int nth) {
    if (n < (type == WEIGHTS_Q8_0 ? 2 : 1) || k % 2 != 0 ||
        (type != WEIGHTS_Q8_0 && type != WEIGHTS_Q5_0))
        return 0;
    const int64_t pairs = k / 2;
    if (pairs * COLS * (int64_t)sizeof(packed_pair) > PACK_BYTES)
        return 0;
    const int64_t row_bytes =
        lda * (type == WEIGHTS_Q8_0 ? (int64_t)sizeof(q8_0_block) : (int64_t)sizeof(q5_0_block));
    // Row boundaries on multiples of 4, so each thread runs whole tiles until the very last rows.
    const int64_t first = (m * ith / nth) & ~(int64_t)3;
    const int64_t end = ith == nth - 1 ? m : (m * (ith + 1) / nth) & ~(int64_t)3;
    _Alignas(64) packed_pair pack[PACK_BYTES / sizeof(packed_pair)];
    const int shift = type == WEIGHTS_Q8_0 ? 128 : 16;
    for (int64_t col0 = 0; col0 < n; col0 += COLS) {
        const int cols = n - col0 < COLS ? (int)(n - col0) : COLS;
        pack_columns((const q8_0_block *)B, ldb, pairs, col0, cols, shift, pack);
        float *c = C + ldc * col0;
        if (type == WEIGHTS_Q8_0)
            sweep(WEIGHTS_Q8_0, (const char *)A, row_bytes, pairs, first, end, cols, pack, c, ldc);
        else
            sweep(WEIGHTS_Q5_0, (const char *)A, row_bytes, pairs, first, end, cols, pack, c, ldc);
    }
    return 1;
}
