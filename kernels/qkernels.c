/* Matrix-vector kernels over GGUF (ggml) block formats, for kernels/cpu_c.py.
 *
 * Built at first use by cpu_c.py (cffi ABI mode, no Python headers needed) in one of two
 * variants: with -mavx2 -mfma -mf16c on CPUs that have them (the SIMD paths below), or plain
 * (portable scalar code that gcc may auto-vectorize).  Always compiled with -ffp-contract=off:
 * dequantization must round exactly like ggml/gguf-py (a multiply, then a subtract), and only the
 * explicit _mm256_fmadd_ps intrinsics below fuse.
 *
 * Weights: `rows` rows of `rb` bytes each (rb is the row stride; a row is row_bytes(fmt, cols)).
 * The x8 layouts (q4_0x8, q4_kx8, q8_0x8: eight rows interleaved, formats.py) are contiguous runs
 * of eight rows, so for them rb is the row size and rows a multiple of 8.
 * Activations: X is float32 (n, cols), row-major; results Y are float32 (n, rows), row-major.
 *
 * SIMD dot products quantize each activation vector to int16 per 32-weight block (scale = the
 * block's max |x| / 32767) and multiply in integers with _mm256_madd_epi16.  llama.cpp uses int8
 * activations (q8_0/q8_K) instead; that costs ~0.5% relative error on a dot product (~1e-2 where a
 * block holds an outlier), while int16 loses ~2e-5 at the same instruction count for 4-bit weights
 * with AVX2.  Block sums that undo the formats' offsets (q6_k's -32, q3_k's -4, the mins of q4_k,
 * q5_k, q2_k, q4_1, q5_1) use the float activations, so they add no quantization error; q4_0's -8
 * and q5_0's -16 come off the integer sums of the int16 activations, exactly.
 * The exception: with AVX-512 VNNI, products of several vectors (prompts) in q4_0, q8_0, q4_k, q5_k,
 * q6_k and iq4_xs and their x8 layouts take llama.cpp's trade (i8_runs, dot_x16_i8): int8 activations per
 * 32-block, where vpdpbusd does twice the products an instruction; that error stays an order of
 * magnitude below the 4-bit weights' own.  The avxvnni variant does the same in 256-bit registers
 * (dot_x8_i8: eight rows, one run, a call), and so does the avx2 variant, with vpmaddubsw + vpmaddwd for
 * vpdpbusd, for the formats of 4-6-bit codes (q4_0, q4_k, q5_k, q6_k: not q8_0 or iq4_xs, whose products
 * could saturate vpmaddubsw's int16 sums).  Decoding (one vector) keeps int16.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MK_SIMD 1
#else
#define MK_SIMD 0
#endif
/* The avx512 variant: the AVX2 kernels, plus AVX-512 VNNI ones for the products of several vectors
 * by the super-block formats (prefill; see dot_ksb). */
#if MK_SIMD && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define MK_AVX512 1
#else
#define MK_AVX512 0
#endif
/* The avxvnni variant (CPUs with AVX-VNNI but not AVX-512: Intel's client cores since Alder Lake): the
 * AVX2 kernels, plus 256-bit vpdpbusd ones for the products of several vectors (dot_x8_i8, the int8 trade
 * below).  The avx2 variant builds the same 256-bit int8 kernels with vpmaddubsw + vpmaddwd in place of
 * vpdpbusd (MK_I8_256), for the formats whose codes cannot saturate vpmaddubsw's int16 sums. */
#if MK_SIMD && !MK_AVX512 && defined(__AVXVNNI__)
#define MK_VNNI256 1
#else
#define MK_VNNI256 0
#endif
#define MK_I8_256 (MK_SIMD && !MK_AVX512)
/* Variants with int8 kernels for prompts (i8_runs): every SIMD one */
#define MK_I8 MK_SIMD

#define MK_API __attribute__((visibility("default")))
#define INLINE static inline __attribute__((always_inline))

enum { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4, Q4_K = 5, Q6_K = 6, Q4_0X8 = 7, Q4_KX8 = 8, Q8_0X8 = 9,
       Q5_K = 10, Q3_K = 11, Q2_K = 12, IQ4_NL = 13, IQ4_XS = 14, Q4_1 = 15, Q5_0 = 16, Q5_1 = 17,
       IQ4_XSX8 = 18, Q5_KX8 = 19 };

/* The x8 layouts (formats.py): a GGUF format with each run of eight rows interleaved block by block. */
INLINE int is_x8(int fmt) { return fmt == Q4_0X8 || fmt == Q4_KX8 || fmt == Q8_0X8 || fmt == IQ4_XSX8 || fmt == Q5_KX8; }

static int64_t fmt_row_bytes(int fmt, int64_t cols);

/* A matrix an x8 layout cannot be: its rows not whole runs of eight, or not contiguous (a run is
 * eight rows' bytes in one piece, so no other row stride means anything). */
INLINE int x8_misfit(int fmt, int64_t rb, int64_t rows, int64_t cols) {
    return is_x8(fmt) && (rows % 8 || rb != fmt_row_bytes(fmt, cols));
}

/* Bytes of weights one thread claims at a time: large enough to amortize the claim, small
 * enough that a core slowed by another process holds up the call for little (see the pool). */
#define CHUNK_BYTES (32 * 1024)
/* Below this many weight bytes a call runs on the calling thread alone. */
#define SERIAL_BYTES (64 * 1024)
#define MAX_HELPERS 255
/* Software prefetch: each dot reads R rows side by side, so the hardware sees R short streams
 * that restart at every row group; the kernels prefetch the same offset R rows further on (the
 * next group), which keeps the next streams warm.  On Zen 3 this took a cold 8192x4096 q4_0
 * product from 15 to 24 G weights/s per core, and a 2048x1024 one from 9 to 20. */

/* Decode takes q8_0 rows of at most this many bytes one at a time instead of four side by side.
 * Four rows share each load of the vector, which pays where the data is cached or the rows are long;
 * but four short rows read side by side are four streams of a few cache lines each, which a core
 * fetched from DRAM at about half the rate of one sequential stream.  Measured on Zen 3 (cold, the
 * same binary but for this switch): q8_0 2048x1024 one thread 10-11 -> 17-19 GB/s, and `bench kernels`
 * ratio to numpy f32 0.54-0.59 -> 0.80-0.83 (1024x2048: 0.54-0.61 -> 0.63-1.03); hot it falls from 24
 * to 16 GB/s, which decode never is.  q4_0 gained nothing (one row at a time its dot is compute-bound
 * at ~9 GB/s a core), q4_k lost, and rows of 4 KiB and more were slower one at a time. */
#define SEQ_ROW_BYTES 2304

MK_API int mk_version(void) { return 16; }
/* 0: portable, 1: AVX2, 2: AVX2 and AVX-512 VNNI, 3: AVX2 and AVX-VNNI */
MK_API int mk_simd(void) { return MK_SIMD + MK_AVX512 + 2 * MK_VNNI256; }

/* ---------- half precision ---------- */

INLINE uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static __attribute__((unused)) float half_to_float_soft(uint16_t h) {
    /* Exact IEEE binary16 -> binary32, subnormals, infinities and NaNs included. */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000 | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

INLINE uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

INLINE float h2f(const uint8_t *p) {
#if MK_SIMD
    return _cvtsh_ss(rd16(p));
#else
    return half_to_float_soft(rd16(p));
#endif
}

INLINE float bf2f(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* q4_k packs 8 six-bit scales and 8 six-bit mins in 12 bytes. */
INLINE void q4k_scales(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

/* The 16 values an iq4 nibble stands for (ggml's kvalues_iq4nl). */
static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* 32-block k of an iq4_xs super-block at p: its 6-bit scale, stored plus 32, is nibble k % 2 of byte
 * 4 + k / 2 with bits 2k, 2k+1 of the 16-bit word at 2 above it (iq4xs_ls).  Then d * scale weighs the
 * block. */
INLINE int iq4xs_ls(const uint8_t *p, int k) {
    return ((p[4 + k / 2] >> (4 * (k % 2))) & 0xF) | (((rd16(p + 2) >> (2 * k)) & 3) << 4);
}
INLINE float iq4xs_scale(const uint8_t *p, int k) {
    return h2f(p) * (float)(iq4xs_ls(p, k) - 32);
}

/* 32-block b of an iq4_nl (xs = 0) or iq4_xs row: its weight scale, and where its 16 bytes of nibbles are. */
INLINE float iq4_block(int xs, const uint8_t *row, int64_t b, const uint8_t **qs) {
    if (!xs) {
        *qs = row + 18 * b + 2;
        return h2f(row + 18 * b);
    }
    const uint8_t *p = row + 136 * (b / 8);
    *qs = p + 8 + 16 * (b % 8);
    return iq4xs_scale(p, (int)(b % 8));
}

/* q3_k's 16 six-bit scales, stored plus 32 in 12 bytes: scale k's low four bits are a nibble of byte
 * k % 8 (the low one for k < 8), its high two bits 2 (k / 4) of byte 8 + k % 4. */
INLINE int q3k_scale(const uint8_t *s, int k) {
    return (int)(((s[k % 8] >> (k < 8 ? 0 : 4)) & 0xF) | (((s[8 + k % 4] >> (2 * (k / 4))) & 3) << 4)) - 32;
}

/* ---------- dequantization: bit-exact with ggml's dequantize_row_* ---------- */

/* x8 layouts: where byte i of row rr's block lies in its run's block of eight (formats.x8_positions):
 * the header fields, each for rows 0..7 in turn (q4_0, q8_0: the f16 scale; q4_k, q5_k: d, dmin, then
 * each of the 12 scale bytes; iq4_xs: d, the u16 of high scale bits, then each of the 4 low-bit bytes), then
 * the payload two bytes at a time, row by row. */
INLINE int64_t x8_pos(int fmt, int rr, int i) {
    int hdr;
    if (fmt == Q4_0X8 || fmt == Q8_0X8) {
        if (i < 2) return 2 * rr + i;
        hdr = 2;
    } else { /* two 2-byte fields, then 1-byte ones */
        hdr = fmt == IQ4_XSX8 ? 8 : 16;
        if (i < 4) return (i / 2 * 8 + rr) * 2 + i % 2;
        if (i < hdr) return 32 + (i - 4) * 8 + rr;
    }
    return 8 * hdr + 16 * ((i - hdr) / 2) + 2 * rr + (i - hdr) % 2;
}

/* The x8 layout of a GGUF format, or -1. */
INLINE int x8_of(int fmt) {
    return fmt == Q4_0 ? Q4_0X8 : fmt == Q8_0 ? Q8_0X8 : fmt == Q4_K ? Q4_KX8 : fmt == Q5_K ? Q5_KX8 : fmt == IQ4_XS ? IQ4_XSX8 : -1;
}
INLINE int x8_base(int fmt) {
    return fmt == Q4_0X8 ? Q4_0 : fmt == Q8_0X8 ? Q8_0 : fmt == Q4_KX8 ? Q4_K : fmt == Q5_KX8 ? Q5_K : IQ4_XS;
}
#define X8_MAX_BLOCK 176 /* q5_k's */
INLINE int x8_block_bytes(int fmt) {
    return fmt == Q4_0X8 ? 18 : fmt == Q8_0X8 ? 34 : fmt == Q4_KX8 ? 144 : fmt == Q5_KX8 ? 176 : 136;
}
INLINE int x8_block_weights(int fmt) { return fmt == Q4_0X8 || fmt == Q8_0X8 ? 32 : 256; }

/* Row rr of the run at grp, block b, as its GGUF format's block (the portable paths). */
static void x8_block(int fmt, const uint8_t *grp, int rr, int64_t b, uint8_t *blk) {
    const int nbytes = x8_block_bytes(fmt);
    const uint8_t *q = grp + 8 * nbytes * b;
    for (int i = 0; i < nbytes; i++) blk[i] = q[x8_pos(fmt, rr, i)];
}

static void deq_row(int fmt, const uint8_t *w, int64_t cols, float *y);

/* Row r of an x8 matrix (row stride rb) as float32. */
static void deq_row_x8(int fmt, const uint8_t *w, int64_t rb, int64_t r, int64_t cols, float *y) {
    const uint8_t *grp = w + (r - r % 8) * rb;
    const int per = x8_block_weights(fmt);
    uint8_t blk[X8_MAX_BLOCK];
    for (int64_t b = 0; b < cols / per; b++) {
        x8_block(fmt, grp, (int)(r % 8), b, blk);
        deq_row(x8_base(fmt), blk, per, y + per * b);
    }
}

/* q4_1, q5_0, q5_1 (the 32-blocks llama-quantize falls back to on rows that are not whole 256-weight
 * super-blocks): bytes per block, where the nibbles start, where the 32 fifth bits are (0: none).  All
 * start with d; q4_1 and q5_1 have a min m after it. */
INLINE int b32_bytes(int fmt) { return fmt == Q4_1 ? 20 : fmt == Q5_0 ? 22 : 24; }
INLINE int b32_qs(int fmt) { return fmt == Q4_1 ? 4 : fmt == Q5_0 ? 6 : 8; }
INLINE int b32_qh(int fmt) { return fmt == Q5_0 ? 2 : fmt == Q5_1 ? 4 : 0; }

static void deq_row(int fmt, const uint8_t *w, int64_t cols, float *y) {
    switch (fmt) {
    case Q4_1: case Q5_0: case Q5_1: /* weight j (< 16) is byte j's low nibble, 16 + j its high one;
                                      * bit j of the little-endian u32 qh its fifth: d q + m, or d (q - 16) */
        for (int64_t b = 0; b < cols / 32; b++) {
            const uint8_t *p = w + b32_bytes(fmt) * b, *q = p + b32_qs(fmt);
            const float d = h2f(p), m = fmt == Q5_0 ? 0.0f : h2f(p + 2);
            const uint32_t qh = b32_qh(fmt) ? rd32(p + b32_qh(fmt)) : 0;
            for (int j = 0; j < 16; j++) {
                const int x0 = (q[j] & 0xF) | (int)(((qh >> j) & 1) << 4), x1 = (q[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
                if (fmt == Q5_0) {
                    y[32 * b + j] = (float)(x0 - 16) * d;
                    y[32 * b + 16 + j] = (float)(x1 - 16) * d;
                } else {
                    y[32 * b + j] = (float)x0 * d + m;
                    y[32 * b + 16 + j] = (float)x1 * d + m;
                }
            }
        }
        break;
    case IQ4_NL: case IQ4_XS: /* low nibbles are weights 0-15 of a block, high ones 16-31 */
        for (int64_t b = 0; b < cols / 32; b++) {
            const uint8_t *q;
            const float d = iq4_block(fmt == IQ4_XS, w, b, &q);
#if MK_SIMD
            /* the lookup as a byte shuffle: the scalar loop's table reads do not vectorize (a 33-vector
             * iq4_xs product, which dequantizes tiles, ran 2.6x faster with this) */
            const __m128i tab = _mm_loadu_si128((const __m128i *)IQ4_VALUES), m15 = _mm_set1_epi8(0x0F);
            const __m128i v = _mm_loadu_si128((const __m128i *)q);
            const __m128i vals[2] = {_mm_shuffle_epi8(tab, _mm_and_si128(v, m15)),
                                     _mm_shuffle_epi8(tab, _mm_and_si128(_mm_srli_epi16(v, 4), m15))};
            const __m256 dv = _mm256_set1_ps(d);
            for (int h = 0; h < 2; h++)
                for (int e = 0; e < 2; e++)
                    _mm256_storeu_ps(y + 32 * b + 16 * h + 8 * e,
                                     _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(vals[h], 8 * e)))));
            continue;
#endif
            for (int i = 0; i < 16; i++) {
                y[32 * b + i] = d * (float)IQ4_VALUES[q[i] & 0xF];
                y[32 * b + 16 + i] = d * (float)IQ4_VALUES[q[i] >> 4];
            }
        }
        break;
    case F32:
        memcpy(y, w, (size_t)cols * 4);
        break;
    case F16: {
        int64_t i = 0;
#if MK_SIMD
        for (; i + 8 <= cols; i += 8)
            _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * i))));
#endif
        for (; i < cols; i++) y[i] = h2f(w + 2 * i);
        break;
    }
    case BF16:
        for (int64_t i = 0; i < cols; i++) y[i] = bf2f(rd16(w + 2 * i));
        break;
    case Q8_0:
        for (int64_t b = 0; b < cols / 32; b++) {
            const uint8_t *p = w + 34 * b;
            const float d = h2f(p);
            for (int i = 0; i < 32; i++) y[32 * b + i] = (float)(int8_t)p[2 + i] * d;
        }
        break;
    case Q4_0:
        for (int64_t b = 0; b < cols / 32; b++) {
            const uint8_t *p = w + 18 * b;
            const float d = h2f(p);
            for (int i = 0; i < 16; i++) {
                y[32 * b + i] = d * (float)((p[2 + i] & 0xF) - 8);
                y[32 * b + 16 + i] = d * (float)((p[2 + i] >> 4) - 8);
            }
        }
        break;
    case Q4_K:
        for (int64_t s = 0; s < cols / 256; s++) {
            const uint8_t *p = w + 144 * s;
            const float d = h2f(p), dmin = h2f(p + 2);
            uint8_t sc[8], mn[8];
            q4k_scales(p + 4, sc, mn);
            float *o = y + 256 * s;
            for (int c = 0; c < 4; c++) {
                const float d1 = d * sc[2 * c], m1 = dmin * mn[2 * c];
                const float d2 = d * sc[2 * c + 1], m2 = dmin * mn[2 * c + 1];
                const uint8_t *q = p + 16 + 32 * c;
                for (int l = 0; l < 32; l++) o[64 * c + l] = d1 * (float)(q[l] & 0xF) - m1;
                for (int l = 0; l < 32; l++) o[64 * c + 32 + l] = d2 * (float)(q[l] >> 4) - m2;
            }
        }
        break;
    case Q5_K:  /* q4_k's layout (qs at 48) with a fifth bit: bit 2c (low nibbles) or 2c + 1 of qh[l] */
        for (int64_t s = 0; s < cols / 256; s++) {
            const uint8_t *p = w + 176 * s, *qh = p + 16;
            const float d = h2f(p), dmin = h2f(p + 2);
            uint8_t sc[8], mn[8];
            q4k_scales(p + 4, sc, mn);
            float *o = y + 256 * s;
            for (int c = 0; c < 4; c++) {
                const float d1 = d * sc[2 * c], m1 = dmin * mn[2 * c];
                const float d2 = d * sc[2 * c + 1], m2 = dmin * mn[2 * c + 1];
                const uint8_t *q = p + 48 + 32 * c;
                for (int l = 0; l < 32; l++) o[64 * c + l] = d1 * (float)((q[l] & 0xF) | (((qh[l] >> (2 * c)) & 1) << 4)) - m1;
                for (int l = 0; l < 32; l++)
                    o[64 * c + 32 + l] = d2 * (float)((q[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4)) - m2;
            }
        }
        break;
    case Q3_K: case Q2_K:
        /* 16 groups of 16: weight 128 h + 32 j + l (group 8 h + 2 j + l / 16) is bits 2j, 2j+1 of byte
         * 32 h + l of qs; q3_k subtracts 4 where bit 4 h + j of hmask[l] is clear, q2_k has a min a group. */
        for (int64_t s = 0; s < cols / 256; s++) {
            const int three = fmt == Q3_K;
            const uint8_t *p = w + (three ? 110 : 84) * s, *qs = p + (three ? 32 : 16);
            const float d = h2f(p + (three ? 108 : 80)), dmin = three ? 0.0f : h2f(p + 82);
            float *o = y + 256 * s;
            for (int g = 0; g < 16; g++) {
                const int h = g / 8, j = g % 8 / 2, l0 = 16 * (g % 2);
                float *og = o + 128 * h + 32 * j;
                if (three) {
                    const float dl = d * (float)q3k_scale(p + 96, g);
                    for (int l = l0; l < l0 + 16; l++)
                        og[l] = dl * (float)((int)((qs[32 * h + l] >> (2 * j)) & 3) - ((p[l] >> (4 * h + j)) & 1 ? 0 : 4));
                } else {
                    const float dl = d * (float)(p[g] & 0xF), ml = dmin * (float)(p[g] >> 4);
                    for (int l = l0; l < l0 + 16; l++) og[l] = dl * (float)((qs[32 * h + l] >> (2 * j)) & 3) - ml;
                }
            }
        }
        break;
    case Q6_K:
        for (int64_t s = 0; s < cols / 256; s++) {
            const uint8_t *p = w + 210 * s;
            const float d = h2f(p + 208);
            const int8_t *sc = (const int8_t *)(p + 192);
            float *o = y + 256 * s;
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = p + 64 * h, *qh = p + 128 + 32 * h;
                const int8_t *s8 = sc + 8 * h;
                float *oh = o + 128 * h;
                for (int is = 0; is < 2; is++) { /* a constant scale per 16: vectorizes */
                    const float d1 = d * (float)s8[is], d2 = d * (float)s8[is + 2];
                    const float d3 = d * (float)s8[is + 4], d4 = d * (float)s8[is + 6];
                    for (int l = 16 * is; l < 16 * is + 16; l++) {
                        const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                        const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                        const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                        const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                        oh[l] = d1 * (float)q1;
                        oh[l + 32] = d2 * (float)q2;
                        oh[l + 64] = d3 * (float)q3;
                        oh[l + 96] = d4 * (float)q4;
                    }
                }
            }
        }
        break;
    }
}

static int64_t fmt_row_bytes(int fmt, int64_t cols) {
    switch (fmt) {
    case F32: return 4 * cols;
    case F16: case BF16: return 2 * cols;
    case Q8_0: case Q8_0X8: return cols / 32 * 34;
    case Q4_0: case Q4_0X8: return cols / 32 * 18;
    case Q4_K: case Q4_KX8: return cols / 256 * 144;
    case Q6_K: return cols / 256 * 210;
    case Q5_K: case Q5_KX8: return cols / 256 * 176;
    case Q3_K: return cols / 256 * 110;
    case Q2_K: return cols / 256 * 84;
    case IQ4_NL: return cols / 32 * 18;
    case IQ4_XS: case IQ4_XSX8: return cols / 256 * 136;
    case Q4_1: case Q5_0: case Q5_1: return cols / 32 * b32_bytes(fmt);
    }
    return -1;
}


/* ---------- the thread pool ----------
 *
 * Opportunistic fork-join.  The calling thread publishes a job (a function over chunk indices),
 * wakes the helpers and starts working on it itself; helpers that are awake join.  When no chunk
 * is left the caller withdraws the job, so helpers that wake late never join, and it waits only
 * for chunks already claimed.  OpenMP's fork-join instead waits for every team member to arrive:
 * on a machine where other processes keep the cores busy a descheduled member costs a whole
 * scheduler time slice (milliseconds) on every call, and a decode step makes thousands of calls.
 * Here a call is never much slower than running it alone.
 *
 * Which chunks a thread claims matters as much as how many.  The chunks are split into one
 * contiguous region per thread; a thread adopts a region nobody owns and claims its chunks front
 * to back, so each core streams one run of consecutive rows, which the hardware prefetchers and
 * the kernels' own prefetch (the next row group) follow.  A thread whose region is empty steals
 * single chunks from the back of the fullest other region, so a descheduled thread holds up at
 * most the chunk it is in.  Handing out chunks round-robin instead (one shared counter) made the
 * two cores of a Zen 3 machine interleave 32 KiB pieces: each core's prefetch of "the next rows"
 * fetched rows the other core was about to read, and two threads ran a cold q4_0 product no
 * faster than one (25 G weights/s on one, 22 on two; 48 on two with regions).
 *
 * Jobs from several calling threads (the engine's worker and prefetch threads) can be open at
 * once; helpers serve whichever has work left.  All pool state is behind one mutex except the
 * per-job counters. */
typedef void (*chunk_fn)(void *ctx, int64_t chunk);

#define MAX_REGIONS 64

typedef struct {
    /* The region's unclaimed chunks [lo, hi): lo in the low 32 bits, hi in the high 32, so that
     * the owner (taking lo) and thieves (taking hi - 1) can never both take the last chunk. */
    _Alignas(64) _Atomic uint64_t span;
} mk_region;

typedef struct mk_job {
    chunk_fn fn;
    void *ctx;
    int nregions;
    mk_region *regions;
    _Atomic int next_region; /* regions not yet adopted start here */
    _Atomic int exhausted;   /* set once a thread found nothing left to claim */
    _Atomic int helpers;     /* helpers inside run_chunks */
    int max_helpers;
    struct mk_job *prev, *nxt;
} mk_job;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    mk_job *head;
    _Atomic unsigned gen;   /* bumped whenever a job is published; helpers spin on it */
    int started;
    int atfork;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0, 0};

INLINE uint64_t span_of(uint32_t lo, uint32_t hi) { return ((uint64_t)hi << 32) | lo; }

/* Claims the region's first (front) or last (!front) unclaimed chunk; 0 when it has none. */
static int claim(mk_region *g, int front, int64_t *chunk) {
    uint64_t s = atomic_load_explicit(&g->span, memory_order_relaxed);
    for (;;) {
        const uint32_t lo = (uint32_t)s, hi = (uint32_t)(s >> 32);
        if (lo >= hi) return 0;
        const uint64_t t = front ? span_of(lo + 1, hi) : span_of(lo, hi - 1);
        if (atomic_compare_exchange_weak_explicit(&g->span, &s, t, memory_order_relaxed, memory_order_relaxed)) {
            *chunk = front ? lo : hi - 1;
            return 1;
        }
    }
}

static void run_chunks(mk_job *j) {
    int64_t c;
    for (int r; (r = atomic_fetch_add_explicit(&j->next_region, 1, memory_order_relaxed)) < j->nregions;)
        while (claim(&j->regions[r], 1, &c)) j->fn(j->ctx, c);
    for (;;) {
        int fullest = -1;
        uint32_t most = 0;
        for (int r = 0; r < j->nregions; r++) {
            const uint64_t s = atomic_load_explicit(&j->regions[r].span, memory_order_relaxed);
            const uint32_t lo = (uint32_t)s, hi = (uint32_t)(s >> 32);
            if (hi > lo && hi - lo > most) {
                most = hi - lo;
                fullest = r;
            }
        }
        if (fullest < 0) break;
        if (claim(&j->regions[fullest], 0, &c)) j->fn(j->ctx, c);
    }
    atomic_store_explicit(&j->exhausted, 1, memory_order_relaxed);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *helper_main(void *arg) {
    (void)arg;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        mk_job *j = pool.head;
        while (j && (atomic_load(&j->exhausted) || atomic_load(&j->helpers) >= j->max_helpers))
            j = j->nxt;
        if (!j) {
            const unsigned seen = atomic_load(&pool.gen);
            pthread_mutex_unlock(&pool.mu);
            /* Spin a little (tens of microseconds) before sleeping: decode issues products back
             * to back, and a helper that is still awake joins the next one at once. */
            for (int i = 0; i < 4000 && atomic_load_explicit(&pool.gen, memory_order_relaxed) == seen; i++)
                cpu_relax();
            pthread_mutex_lock(&pool.mu);
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            continue;
        }
        atomic_fetch_add(&j->helpers, 1);
        pthread_mutex_unlock(&pool.mu);
        run_chunks(j);
        atomic_fetch_sub(&j->helpers, 1); /* from here on the job may be gone */
        pthread_mutex_lock(&pool.mu);
    }
    return NULL;
}

static void pool_child_after_fork(void) {
    /* The helpers do not exist in a forked child; start afresh there. */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pool.head = NULL;
    pool.started = 0;
}

/* Runs fn(ctx, c) for c in [0, nchunks) on up to nthreads threads (the caller included). */
static void mk_parallel(chunk_fn fn, void *ctx, int64_t nchunks, int nthreads) {
    if (nthreads > MAX_HELPERS + 1) nthreads = MAX_HELPERS + 1;
    if (nthreads > nchunks) nthreads = (int)nchunks;
    if (nthreads <= 1 || nchunks > UINT32_MAX) {
        for (int64_t c = 0; c < nchunks; c++) fn(ctx, c);
        return;
    }
    mk_region regions[MAX_REGIONS];
    mk_job j;
    j.fn = fn;
    j.ctx = ctx;
    j.nregions = nthreads < MAX_REGIONS ? nthreads : MAX_REGIONS;
    j.regions = regions;
    for (int r = 0; r < j.nregions; r++)
        atomic_init(&regions[r].span, span_of((uint32_t)(nchunks * r / j.nregions),
                                              (uint32_t)(nchunks * (r + 1) / j.nregions)));
    atomic_init(&j.next_region, 0);
    atomic_init(&j.exhausted, 0);
    atomic_init(&j.helpers, 0);
    j.max_helpers = nthreads - 1;
    j.prev = NULL;
    pthread_mutex_lock(&pool.mu);
    if (!pool.atfork) {
        pthread_atfork(NULL, NULL, pool_child_after_fork);
        pool.atfork = 1;
    }
    while (pool.started < nthreads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&t, &attr, helper_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc) break; /* fewer helpers: the caller still does all the work it must */
        pool.started++;
    }
    j.nxt = pool.head;
    if (pool.head) pool.head->prev = &j;
    pool.head = &j;
    atomic_fetch_add(&pool.gen, 1);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);

    run_chunks(&j);

    pthread_mutex_lock(&pool.mu);
    if (j.prev) j.prev->nxt = j.nxt; else pool.head = j.nxt;
    if (j.nxt) j.nxt->prev = j.prev;
    pthread_mutex_unlock(&pool.mu);
    /* Only helpers that joined before the withdrawal can be inside; each finishes its chunk. */
    for (int i = 0; atomic_load(&j.helpers) > 0; i++) {
        if (i < 2000) cpu_relax(); else sched_yield();
    }
}

static int pick_threads(int nt, int64_t bytes) {
    if (nt < 1) nt = 1;
    return bytes < SERIAL_BYTES ? 1 : nt;
}

static int64_t chunk_rows(int64_t rb, int64_t align) {
    int64_t c = CHUNK_BYTES / (rb > 0 ? rb : 1);
    if (c < align) c = align;
    return c / align * align;
}

typedef struct {
    int fmt;
    const uint8_t *w;
    int64_t rb, rows, cols, ch;
    float *out;
} deq_ctx;

static void deq_chunk(void *vctx, int64_t c) {
    const deq_ctx *x = vctx;
    const int64_t r1 = (c + 1) * x->ch < x->rows ? (c + 1) * x->ch : x->rows;
    for (int64_t r = c * x->ch; r < r1; r++) {
        if (is_x8(x->fmt)) deq_row_x8(x->fmt, x->w, x->rb, r, x->cols, x->out + r * x->cols);
        else deq_row(x->fmt, x->w + r * x->rb, x->cols, x->out + r * x->cols);
    }
}

MK_API int mk_dequant(int fmt, const uint8_t *w, int64_t rb, int64_t rows, int64_t cols, float *out,
                      int nthreads) {
    if (fmt_row_bytes(fmt, cols) < 0 || x8_misfit(fmt, rb, rows, cols)) return -1;
    deq_ctx x = {fmt, w, rb, rows, cols, chunk_rows(rb, 1), out};
    mk_parallel(deq_chunk, &x, (rows + x.ch - 1) / x.ch, pick_threads(nthreads, rows * rb));
    return 0;
}

/* ---------- prepared activations ---------- */

typedef struct {
    int64_t n, cols, nb;  /* vectors, length, 32-blocks per vector */
    const float *xf;      /* the float activations, (n, cols) */
    int16_t *xq;          /* int16 activations, (n, cols), 32-byte aligned */
    float *xd;            /* per 32-block scale, (n, nb) */
    float *xs;            /* per 32-block sum of the float activations, (n, nb) */
    float *xs16;          /* 32 * per 16-group sum (q6_k's offset), (n, 2 nb) */
    float *xd16;          /* per 16-group scale (xd repeated), (n, 2 nb), for q6_k */
    int32_t *xc;          /* q4_0: 8 * madd lanes of the block, (n, nb, 8) */
    int32_t *xc4;         /* q4_0, groups of 4 blocks: xc summed in the hadd layout, (n, nb/4, 8) */
    float *xd4;           /* groups of 4 blocks: [xd0..xd3, xd0..xd3], (n, nb/4, 8) */
    int32_t *xc1;         /* q4_0x8: 8 * the block's sum of xq, (n, nb) */
    int16_t *xq256;       /* avx512, several vectors: int16 activations with one scale per 256, (n, cols) */
    float *xd256;         /* their scales, (n, cols / 256) */
    int8_t *xq8;          /* several vectors, i8_runs: int8 activations per 32-block, (n, cols) */
    float *xd8;           /* their scales, (n, nb) */
    int32_t *xk8;         /* the block's sum of xq8, (n, nb) */
    int32_t *xk16;        /* the sums of xq8's 16-halves (q6_k's sub-blocks), (n, 2 nb) */
    void *mem;            /* the one allocation behind all of the above */
} xprep;

static void xprep_free(xprep *p) {
    free(p->mem);
    memset(p, 0, sizeof(*p));
}

/* Which products the avx512 variant's dot_ksb computes (below, with the kernels): the super-block
 * formats from two vectors, where the int8 kernels do not (i8_runs: all of the x8 layouts, and q4_k,
 * q5_k and iq4_xs from I8_PACK_N vectors, q6_k from I8_Q6_N). */
INLINE int is_ksb(int fmt) {
    return fmt == Q4_K || fmt == Q5_K || fmt == Q6_K || fmt == IQ4_XS || fmt == Q3_K || fmt == Q2_K;
}
#define I8_PACK_N 8
/* q6_k from I8_Q6_N vectors: it has no x8 layout, and packing it (q6_pack) costs more than the others; the
 * AVX2 int16 q6_k kernel (the avxvnni and avx2 variants') is slower than avx512's dot_ksb, so there it pays
 * sooner */
#define I8_Q6_N (MK_AVX512 ? 16 : 4)
INLINE int i8_runs(int fmt, int64_t n);
INLINE int ksb_runs(int fmt, int64_t n) {
    return MK_AVX512 && is_ksb(fmt) && n >= 2 && !i8_runs(fmt, n); /* the x8 layouts: dot_x16 */
}

/* Which products the int8 kernels compute (below, with the kernels: dot_x16 on the avx512 variant,
 * dot_x8_i8 on the others): the x8 layouts with int8 activations from two vectors (one vector, a decode
 * step, keeps the int16 kernels), their GGUF formats and q6_k from more.  Without vpdpbusd (the avx2
 * variant) only the formats of 4-6-bit unsigned codes: a pair of q8_0's or iq4_xs's weights (as w + 128)
 * times activations of up to 127 can pass vpmaddubsw's int16. */
INLINE int i8_runs(int fmt, int64_t n) {
    const int x8 = fmt == Q4_0X8 || fmt == Q8_0X8 || fmt == Q4_KX8 || fmt == Q5_KX8 || fmt == IQ4_XSX8;
    /* their GGUF formats, a chunk of rows interleaved first (x8_pack): from I8_PACK_N vectors */
    const int plain = fmt == Q4_0 || fmt == Q8_0 || fmt == Q4_K || fmt == Q5_K || fmt == IQ4_XS;
    const int wide = fmt == Q8_0X8 || fmt == IQ4_XSX8 || fmt == Q8_0 || fmt == IQ4_XS;
    /* q6_k's packing (q6_pack) costs more: 2048x1024 tokens/s, int16 vs int8, avx512 n=8 47-58k vs 26-32k,
     * n=16 79-90k vs 77-90k, n=32 80-92k vs 107-131k; avxvnni n=2 9-17k vs 9-13k, n=4 28-30k vs 40k */
    return (MK_AVX512 || MK_VNNI256 || (MK_I8_256 && !wide))
        && ((x8 && n >= 2) || (plain && n >= I8_PACK_N) || (fmt == Q6_K && n >= I8_Q6_N));
}

/* What a product's activations are prepared for, beside the int16 blocks every SIMD kernel reads. */
enum { XP_KSB = 1, XP_I8 = 2, XP_NO16 = 4 };
INLINE int xprep_needs(int fmt, int64_t n) {
    /* an x8 layout's int8 products read nothing else (a GGUF format's fall back on int16 without memory) */
    const int i8 = i8_runs(fmt, n);
    return (ksb_runs(fmt, n) ? XP_KSB : 0) | (i8 ? XP_I8 : 0) | (i8 && is_x8(fmt) ? XP_NO16 : 0);
}

/* Allocates the buffers (one allocation, 64-byte aligned regions); xprep_fill then fills vectors
 * [j0, j1).  needs (xprep_needs): XP_KSB, the vectors are for dot_ksb, which reads them with one
 * scale per 256; XP_I8, for the int8 kernels (i8_runs); XP_NO16, only for them (the int16 blocks and
 * their sums are neither allocated nor filled). */
static int xprep_init(xprep *p, const float *X, int64_t n, int64_t cols, int needs) {
    /* the portable build has none of these kernels */
    const int sb = needs & XP_KSB, i8 = needs & XP_I8, i16 = !(needs & XP_NO16);
    memset(p, 0, sizeof(*p));
    p->n = n;
    p->cols = cols;
    p->nb = cols / 32;
    p->xf = X;
#if MK_SIMD
    if (cols % 32 == 0) {
        const size_t nb = (size_t)(n * p->nb), ng = (size_t)n * (size_t)(p->nb / 4);
        const size_t sizes[15] = {i16 ? (size_t)(n * cols) * 2 : 0, i16 ? nb * 4 : 0, i16 ? nb * 4 : 0,
                                  i16 ? nb * 8 : 0, i16 ? nb * 8 : 0, i16 ? nb * 32 : 0, i16 ? ng * 32 : 0,
                                  i16 ? ng * 32 : 0, i16 ? nb * 4 : 0, sb ? (size_t)(n * cols) * 2 : 0, sb ? nb / 8 * 4 : 0,
                                  i8 ? (size_t)(n * cols) : 0, i8 ? nb * 4 : 0, i8 ? nb * 4 : 0, i8 ? nb * 8 : 0};
        size_t total = 0;
        for (int i = 0; i < 15; i++) total += (sizes[i] + 63) / 64 * 64;
        char *m = aligned_alloc(64, total ? total : 64);
        if (!m) return -2;
        p->mem = m;
        void **dst[15] = {(void **)&p->xq, (void **)&p->xd, (void **)&p->xs, (void **)&p->xs16,
                          (void **)&p->xd16, (void **)&p->xc, (void **)&p->xc4, (void **)&p->xd4,
                          (void **)&p->xc1, (void **)&p->xq256, (void **)&p->xd256,
                          (void **)&p->xq8, (void **)&p->xd8, (void **)&p->xk8, (void **)&p->xk16};
        for (int i = 0; i < 15; i++) {
            *dst[i] = sizes[i] ? m : NULL;
            m += (sizes[i] + 63) / 64 * 64;
        }
    }
#else
    (void)sb;
    (void)i8;
    (void)i16;
#endif
    return 0;
}

#if MK_SIMD
INLINE float hsum(__m256 v);
#endif

#if MK_AVX512
/* Vector j's int16 activations with one scale per 256 (xq256, xd256), for dot_ksb: as the 32-blocks
 * (the largest |x| maps to 32767, rounding to nearest even; x / d stays within a few thousandths of
 * that, so no code is -32768, which dot_ksb's int32 sums rely on), saturated against NaN and infinities. */
static void xprep_fill256(xprep *p, int64_t j) {
    for (int64_t b = 0; b < p->cols / 256; b++) {
        const float *x = p->xf + j * p->cols + 256 * b;
        __m512 m = _mm512_setzero_ps();
        for (int i = 0; i < 16; i++) m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + 16 * i)), m);
        const float d = _mm512_reduce_max_ps(m) / 32767.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        const __m512 vid = _mm512_set1_ps(id);
        int16_t *q = p->xq256 + j * p->cols + 256 * b;
        for (int i = 0; i < 16; i++)
            _mm256_store_si256((__m256i *)(q + 16 * i),
                               _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * i), vid))));
        p->xd256[j * (p->cols / 256) + b] = d;
    }
}
#endif

#if MK_SIMD
/* The largest |x| of a 32-block in four registers.  max_ps keeps its second operand when the first is
 * NaN, as the scalar max did. */
INLINE float amax32(const __m256 v[4]) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_setzero_ps());
    for (int i = 1; i < 4; i++) m = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), m);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    return _mm_cvtss_f32(m4);
}
#endif

#if MK_I8
INLINE int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)));
}

/* Vector j's int8 activations per 32-block (xq8, xd8, xk8, xk16), for the int8 kernels: llama.cpp's q8_0
 * of the activations (the largest |x| maps to 127, rounding to nearest even, saturated), with each block's
 * and each 16-half's sum of codes for the weights' offsets (q4_0's nibbles are w + 8, q8_0's bytes are
 * read as w + 128, q6_k's codes q + 32). */
static void xprep_fill8(xprep *p, int64_t j) {
    /* packs interleaves 128-bit lanes: dword i of the packed bytes holds elements 4 perm[i] .. +3 */
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < p->nb; b++) {
        const float *x = p->xf + j * p->cols + 32 * b;
        __m256 v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(x + 8 * i);
        const float d = amax32(v) / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid));
        const __m256i q8 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(p->xq8 + j * p->cols + 32 * b), _mm256_permutevar8x32_epi32(q8, perm));
        const int64_t k = j * p->nb + b;
        p->xd8[k] = d;
        p->xk16[2 * k] = hsum_i32(_mm256_add_epi32(q[0], q[1]));
        p->xk16[2 * k + 1] = hsum_i32(_mm256_add_epi32(q[2], q[3]));
        p->xk8[k] = p->xk16[2 * k] + p->xk16[2 * k + 1];
    }
}
#endif

/* Vector j's int16 activations per 32-block and the sums and scales the int16 kernels read beside them. */
static void xprep_fill16(xprep *p, int64_t j) {
    const float *x = p->xf + j * p->cols;
    for (int64_t b = 0; b < p->nb; b++) {
        const float *xb = x + 32 * b;
        int16_t *q = p->xq + j * p->cols + 32 * b;
        const int64_t k = j * p->nb + b;
#if MK_SIMD
        /* The same arithmetic in eight lanes (a decode call's vector is prepared on the calling
         * thread before the others join: the scalar loop was ~2 us of a ~55 us product). */
        const __m256 v[4] = {_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8), _mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)};
        const float amax = amax32(v);
        const float s0 = hsum(_mm256_add_ps(v[0], v[1])), s1 = hsum(_mm256_add_ps(v[2], v[3]));
        const float d = amax / 32767.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        /* cvtps rounds to nearest even, as lrintf does in the default rounding mode */
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], vid)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], vid));
        const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], vid)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], vid));
        /* packs interleaves 128-bit lanes; the permute puts elements back in order */
        const __m256i q01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
        const __m256i q23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8);
        _mm256_storeu_si256((__m256i *)q, q01);
        _mm256_storeu_si256((__m256i *)(q + 16), q23);
        const __m256i ones = _mm256_set1_epi16(1);
        const __m256i c = _mm256_slli_epi32(_mm256_add_epi32(_mm256_madd_epi16(q01, ones), _mm256_madd_epi16(q23, ones)), 3);
        _mm256_storeu_si256((__m256i *)(p->xc + 8 * k), c);
#else
        float amax = 0.0f, s0 = 0.0f, s1 = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
        }
        for (int i = 0; i < 16; i++) s0 += xb[i];
        for (int i = 16; i < 32; i++) s1 += xb[i];
        const float d = amax / 32767.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < 32; i++) q[i] = (int16_t)lrintf(xb[i] * id);
        /* _mm256_madd_epi16 lane l sums elements 2l and 2l+1 of each 16-element half. */
        for (int l = 0; l < 8; l++)
            p->xc[8 * k + l] = 8 * ((int32_t)q[2 * l] + q[2 * l + 1] + q[16 + 2 * l] + q[17 + 2 * l]);
#endif
        p->xc1[k] = 0;
        for (int l = 0; l < 8; l++) p->xc1[k] += p->xc[8 * k + l];
        p->xd[k] = d;
        p->xs[k] = s0 + s1;
        p->xs16[2 * k] = 32.0f * s0; /* exact: a power of two */
        p->xs16[2 * k + 1] = 32.0f * s1;
        p->xd16[2 * k] = d;
        p->xd16[2 * k + 1] = d;
    }
    /* Groups of four blocks in the layout of hadd(hadd(s0, s1), hadd(s2, s3)): lane k holds
     * block k's madd lanes 0-3, lane 4+k its lanes 4-7. */
    const int64_t ng = p->nb / 4;
    for (int64_t g = 0; g < ng; g++) {
        const int64_t k0 = j * p->nb + 4 * g, o = 8 * (j * ng + g);
        for (int k = 0; k < 4; k++) {
            const int32_t *c = p->xc + 8 * (k0 + k);
            p->xc4[o + k] = c[0] + c[1] + c[2] + c[3];
            p->xc4[o + 4 + k] = c[4] + c[5] + c[6] + c[7];
            p->xd4[o + k] = p->xd4[o + 4 + k] = p->xd[k0 + k];
        }
    }
}

static void xprep_fill(xprep *p, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        if (p->xq) xprep_fill16(p, j);
#if MK_AVX512
        if (p->xq256) xprep_fill256(p, j);
#endif
#if MK_I8
        if (p->xq8) xprep_fill8(p, j);
#endif
    }
}

/* ---------- dot products: R rows (R <= 4) against one prepared vector j ---------- */

#if MK_SIMD
/* Each dot_* below multiplies R rows (from w, stride rb) by J prepared vectors (from j0) and
 * writes out[r * J + jj].  R * J <= 4: one accumulator per pair stays in a register.  A weight
 * block is decoded once per row and used for all J vectors, so a few tokens (prefill routed to
 * one expert) cost little more than one. */
INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE __m256i ld16(const uint8_t *p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)); }

INLINE void pf(const uint8_t *p) { _mm_prefetch((const char *)p, _MM_HINT_T0); }

/* How far ahead the kernels prefetch: the same offset a whole number of row groups on, and at
 * least PF_BYTES ahead.  One group (R rows) is enough for long rows; OLMoE's 576-byte q4_0 rows
 * make a group 2.3 KB, which DRAM latency outruns: four groups on took a cold 2048x1024 product
 * from 16.5 to 18.6 GB/s on two Zen 3 cores (longer rows unchanged). */
#define PF_BYTES 8192

/* Prefetches both cache lines an n <= 65 byte span can touch: its first and last byte.  One
 * prefetch per 72-byte q4_0 group left every ninth line to a demand miss, which the hardware
 * prefetchers cover on long rows but not on short ones (a cold 2048x1024 q4_0 product on one
 * core: 125 -> 106-114 us); the bigger blocks below add a prefetch of their last byte likewise. */
#define pf_span(p, n) (pf(p), pf((p) + (n) - 1))

/* Prefetches the n bytes from p, front to back, whatever their alignment. */
INLINE void pf_run(const uint8_t *p, int64_t n) {
    const uintptr_t a = (uintptr_t)p & ~(uintptr_t)63, e = (uintptr_t)(p + n - 1);
    for (uintptr_t l = a; l <= e; l += 64) pf((const uint8_t *)l);
}
INLINE int64_t pf_ahead(int R, int64_t rb) {
    int64_t d = R * rb;
    while (d < PF_BYTES) d += R * rb;
    return d;
}

INLINE __m256i ldx(const int16_t *p) { return _mm256_load_si256((const __m256i *)p); }

/* Lane k of v, in every lane: vpermps with a constant index (no store/reload through memory,
 * which would stall on store forwarding). */
INLINE __m256 lane(__m256 v, int k) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(k)); }

#define ACC_INIT                                                                             \
    __m256 acc[4][4];                                                                        \
    for (int r = 0; r < R; r++)                                                              \
        for (int jj = 0; jj < J; jj++) acc[r][jj] = _mm256_setzero_ps();

INLINE __m256 bf8(const uint8_t *p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

INLINE __m256 hf8(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* f16 and bf16: exact conversion, float32 products and sums (no activation rounding). */
INLINE void dot_half(int bf, const uint8_t *w, int64_t rb, int R, int J, const xprep *p, int64_t j0,
                     float *out) {
    const int64_t pfd = pf_ahead(R, rb);
    const int64_t cols = p->cols;
    ACC_INIT
    int64_t i = 0;
    for (; i + 8 <= cols; i += 8) {
        for (int r = 0; r < R; r++) {
            if (i % 32 == 0) pf(w + r * rb + pfd + 2 * i);
            const __m256 wv = bf ? bf8(w + r * rb + 2 * i) : hf8(w + r * rb + 2 * i);
            for (int jj = 0; jj < J; jj++)
                acc[r][jj] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p->xf + (j0 + jj) * cols + i), acc[r][jj]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int jj = 0; jj < J; jj++) {
            float s = hsum(acc[r][jj]);
            const float *x = p->xf + (j0 + jj) * cols;
            for (int64_t k = i; k < cols; k++)
                s += (bf ? bf2f(rd16(w + r * rb + 2 * k)) : h2f(w + r * rb + 2 * k)) * x[k];
            out[r * J + jj] = s;
        }
}

/* Four f16 scales at byte stride `stride`, as floats in lanes 0-3 and again in 4-7: 32-bit
 * loads (one uop each) and unpacks; the high halves of the loads and lanes 4-7 of the unpacked
 * vector are dropped by the unpacks and by cvtph. */
INLINE __m256 scales4(const uint8_t *q, int64_t stride) {
    const __m128i h01 = _mm_unpacklo_epi16(_mm_cvtsi32_si128((int)rd32(q)), _mm_cvtsi32_si128((int)rd32(q + stride)));
    const __m128i h23 = _mm_unpacklo_epi16(_mm_cvtsi32_si128((int)rd32(q + 2 * stride)),
                                           _mm_cvtsi32_si128((int)rd32(q + 3 * stride)));
    const __m128 d = _mm_cvtph_ps(_mm_unpacklo_epi32(h01, h23));
    return _mm256_set_m128(d, d);
}

/* hadd(hadd(s0, s1), hadd(s2, s3)): lane k holds lanes 0-3 of s_k summed, lane 4+k lanes 4-7. */
INLINE __m256i fold4(__m256i s0, __m256i s1, __m256i s2, __m256i s3) {
    return _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
}

INLINE __m256i q8_0_block(const uint8_t *q, const int16_t *x) {
    const __m256i v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 2)));
    const __m256i v1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 18)));
    return _mm256_add_epi32(_mm256_madd_epi16(v0, ldx(x)), _mm256_madd_epi16(v1, ldx(x + 16)));
}

INLINE void dot_q8_0(const uint8_t *w, int64_t rb, int R, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t pfd = pf_ahead(R, rb);
    const int64_t cols = p->cols, nb = p->nb;
    ACC_INIT
    int64_t b = 0;
    if (J == 1) { /* decode: four blocks per step, as in q4_0 */
        const int64_t ng = nb / 4;
        const int16_t *xq = p->xq + j0 * cols;
        const float *d4 = p->xd4 + 8 * j0 * ng;
        for (int64_t g = 0; g < ng; g++) {
            const int16_t *x = xq + 128 * g;
            for (int r = 0; r < R; r++) {
                const uint8_t *q = w + r * rb + 136 * g;
                for (int l = 0; l < 3; l++) pf(q + pfd + 64 * l);
                pf(q + pfd + 135);
                const __m256i t = fold4(q8_0_block(q, x), q8_0_block(q + 34, x + 32), q8_0_block(q + 68, x + 64),
                                        q8_0_block(q + 102, x + 96));
                const __m256 sc = _mm256_mul_ps(scales4(q, 34), _mm256_load_ps(d4 + 8 * g));
                acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sc, acc[r][0]);
            }
        }
        b = 4 * ng;
    }
    for (; b < nb; b++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *q = w + r * rb + 34 * b;
            if (b % 2 == 0) pf_span(q + pfd, 68);
            const __m256i v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 2)));
            const __m256i v1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 18)));
            const float dw = h2f(q);
            for (int jj = 0; jj < J; jj++) {
                const int16_t *x = p->xq + (j0 + jj) * cols + 32 * b;
                const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(v0, ldx(x)), _mm256_madd_epi16(v1, ldx(x + 16)));
                acc[r][jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw * p->xd[(j0 + jj) * nb + b]),
                                             acc[r][jj]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int jj = 0; jj < J; jj++) out[r * J + jj] = hsum(acc[r][jj]);
}

INLINE __m256i q4_0_block(const uint8_t *q, const int16_t *x, __m256i m4) {
    /* One byte per int16 lane: the low nibble is weight i, the high nibble weight 16+i. */
    const __m256i v = ld16(q + 2);
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(v, m4), ldx(x)),
                            _mm256_madd_epi16(_mm256_srli_epi16(v, 4), ldx(x + 16)));
}

INLINE void dot_q4_0(const uint8_t *w, int64_t rb, int R, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t pfd = pf_ahead(R, rb);
    const int64_t cols = p->cols, nb = p->nb;
    const __m256i m4 = _mm256_set1_epi16(0x0F);
    ACC_INIT
    int64_t b = 0;
    if (J == 1) {
        /* Decode: four blocks per step.  Their eight-lane integer sums fold into one vector
         * (three hadds), so the int->float conversion, the f16 scales and the FMA are paid once
         * per four blocks instead of per block: the float side was half the work. */
        const int64_t ng = nb / 4;
        const int16_t *xq = p->xq + j0 * cols;
        const int32_t *c4 = p->xc4 + 8 * j0 * ng;
        const float *d4 = p->xd4 + 8 * j0 * ng;
        for (int64_t g = 0; g < ng; g++) {
            const int16_t *x = xq + 128 * g;
            /* The R rows are one run of memory read side by side.  Prefetching it as one run,
             * R * 72 bytes further along it each step, instead of each row's next 72 bytes R
             * rows on, turns R short interleaved streams into one sequential one, which DRAM
             * serves faster: a cold 2048x1024 product (576-byte rows) called from C on one Zen 3
             * core 11.4 -> 13.2 GB/s, on two 16.5 -> 18.8 (medians of seven processes).  Through
             * `bench kernels` the gain is smaller than this VM's noise: +1% to +7% in alternation
             * within one process, no loss on longer rows.  (q4_k and q8_0 tried the same: +-8%,
             * no clear sign, left as they were.) */
            pf_run(w + pfd + R * 72 * g, R * 72);
            for (int r = 0; r < R; r++) {
                const uint8_t *q = w + r * rb + 72 * g;
                const __m256i t = _mm256_sub_epi32(
                    fold4(q4_0_block(q, x, m4), q4_0_block(q + 18, x + 32, m4), q4_0_block(q + 36, x + 64, m4),
                          q4_0_block(q + 54, x + 96, m4)),
                    _mm256_load_si256((const __m256i *)(c4 + 8 * g)));
                const __m256 sc = _mm256_mul_ps(scales4(q, 18), _mm256_load_ps(d4 + 8 * g));
                acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sc, acc[r][0]);
            }
        }
        b = 4 * ng;
    } else {
        /* Several vectors: decode four blocks once, then fold each vector's four sums. */
        const int64_t ng = nb / 4;
        for (int64_t g = 0; g < ng; g++) {
            for (int r = 0; r < R; r++) {
                const uint8_t *q = w + r * rb + 72 * g;
                pf_span(q + pfd, 72);
                __m256i lo[4], hi[4];
                for (int k = 0; k < 4; k++) {
                    const __m256i v = ld16(q + 18 * k + 2);
                    lo[k] = _mm256_and_si256(v, m4);
                    hi[k] = _mm256_srli_epi16(v, 4);
                }
                const __m256 dw = scales4(q, 18);
                for (int jj = 0; jj < J; jj++) {
                    const int16_t *x = p->xq + (j0 + jj) * cols + 128 * g;
                    __m256i s[4];
                    for (int k = 0; k < 4; k++)
                        s[k] = _mm256_add_epi32(_mm256_madd_epi16(lo[k], ldx(x + 32 * k)),
                                                _mm256_madd_epi16(hi[k], ldx(x + 32 * k + 16)));
                    const int64_t o = 8 * ((j0 + jj) * ng + g);
                    const __m256i t = _mm256_sub_epi32(fold4(s[0], s[1], s[2], s[3]),
                                                       _mm256_load_si256((const __m256i *)(p->xc4 + o)));
                    acc[r][jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(dw, _mm256_load_ps(p->xd4 + o)),
                                                 acc[r][jj]);
                }
            }
        }
        b = 4 * ng;
    }
    for (; b < nb; b++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *q = w + r * rb + 18 * b;
            if (b % 4 == 0) pf_span(q + pfd, 72);
            /* One byte per int16 lane: the low nibble is weight i, the high nibble weight 16+i. */
            const __m256i v = ld16(q + 2);
            const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_srli_epi16(v, 4);
            const float dw = h2f(q);
            for (int jj = 0; jj < J; jj++) {
                const int64_t k = (j0 + jj) * nb + b;
                const int16_t *x = p->xq + (j0 + jj) * cols + 32 * b;
                __m256i s = _mm256_add_epi32(_mm256_madd_epi16(lo, ldx(x)), _mm256_madd_epi16(hi, ldx(x + 16)));
                s = _mm256_sub_epi32(s, _mm256_load_si256((const __m256i *)(p->xc + 8 * k))); /* the -8 */
                acc[r][jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw * p->xd[k]), acc[r][jj]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int jj = 0; jj < J; jj++) out[r * J + jj] = hsum(acc[r][jj]);
}

/* q4_k's 8 scales (bytes 0-7) and 8 mins (bytes 8-15) from the 12 packed bytes at s, as dwords
 * u0 u1 u2: sc_lo = u0 & 0x3f.., sc_hi = (u2 & 0x0f..) | top two bits of u0's bytes, mn_lo = u1 &
 * 0x3f.., mn_hi = (u2 >> 4 & 0x0f..) | top two bits of u1's bytes.  In vector registers: with
 * scalar arithmetic and _mm_set_epi32 this took a hot 2048x1024 product 95 -> 87 us on one core.
 * The 16-byte load reads the block's first 4 quant bytes too (ignored). */
INLINE __m128i q4k_unpack(const uint8_t *s) {
    const __m128i v = _mm_loadu_si128((const __m128i *)s);
    const __m128i l = _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 2, 0)); /* u0 u2 u1 u2 */
    const __m128i h = _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0)); /* u0 u0 u1 u1 */
    const __m128i lo = _mm_and_si128(_mm_srlv_epi32(l, _mm_setr_epi32(0, 0, 0, 4)),
                                     _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    /* (u >> 2) & 0x30 moves bits 6-7 of each byte to bits 4-5 */
    const __m128i hi = _mm_and_si128(_mm_srli_epi32(h, 2), _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    return _mm_or_si128(lo, hi);
}

/* Bit k of each int16 lane of h, moved to bit `to` (the others cleared).  k and `to` are constants
 * once inlined: one shift and one mask. */
INLINE __m256i bit_to(__m256i h, int k, int to) {
    const __m256i v = k >= to ? _mm256_srli_epi16(h, k - to) : _mm256_slli_epi16(h, to - k);
    return _mm256_and_si256(v, _mm256_set1_epi16((short)(1 << to)));
}

/* q4_k (five = 0) and q5_k (five = 1): q5_k is q4_k's super-block with the 32 bytes of fifth bits
 * (qh) before the nibbles; weight l of sub-block s takes bit s of qh[l] as its 16. */
INLINE void dot_q45_k(int five, const uint8_t *w, int64_t rb, int R, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t pfd = pf_ahead(R, rb), bs = five ? 176 : 144, qo = five ? 48 : 16;
    const int64_t cols = p->cols, nb = p->nb;
    const __m256i m4 = _mm256_set1_epi16(0x0F);
    ACC_INIT
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *q = w + r * rb + bs * sb;
            for (int l = 0; l < 3; l++) pf(q + pfd + 64 * l);
            pf(q + pfd + bs - 1);
            /* fifth bits of bytes l = 0-15 and 16-31 of each 32-byte run of nibbles */
            const __m256i H0 = five ? ld16(q + 16) : _mm256_setzero_si256(), H1 = five ? ld16(q + 32) : H0;
            const __m128i smv = q4k_unpack(q + 4);
            const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)rd32(q))); /* d, dmin */
            const __m256 scd = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(smv)), _mm256_broadcastss_ps(dm));
            const __m256 mnd = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(smv, 8))),
                                             _mm256_broadcastss_ps(_mm_movehdup_ps(dm)));
            __m256 sv[4];
            for (int jj = 0; jj < J; jj++) {
                const int64_t k = (j0 + jj) * nb + 8 * sb;
                /* the mins: minus dmin * m_j * (sum of x over sub-block j) */
                acc[r][jj] = _mm256_fnmadd_ps(mnd, _mm256_loadu_ps(p->xs + k), acc[r][jj]);
                sv[jj] = _mm256_mul_ps(scd, _mm256_loadu_ps(p->xd + k));
            }
            if (J == 1) {
                /* Decode: the integer sums of four sub-blocks fold into one vector (hadds), then
                 * one conversion and one FMA against their four scales (as in q4_0). */
                const int16_t *x = p->xq + j0 * cols + 256 * sb;
                for (int h = 0; h < 2; h++) {
                    __m256i s4[4];
                    for (int c = 0; c < 2; c++) {
                        const int cc = 2 * h + c; /* the 64-weight run: sub-blocks 2 cc, 2 cc + 1 */
                        const uint8_t *qc = q + qo + 32 * cc;
                        const int16_t *xc = x + 64 * cc;
                        const __m256i v0 = ld16(qc), v1 = ld16(qc + 16);
                        __m256i l0 = _mm256_and_si256(v0, m4), l1 = _mm256_and_si256(v1, m4);
                        __m256i h0 = _mm256_srli_epi16(v0, 4), h1 = _mm256_srli_epi16(v1, 4);
                        if (five) {
                            l0 = _mm256_or_si256(l0, bit_to(H0, 2 * cc, 4));
                            l1 = _mm256_or_si256(l1, bit_to(H1, 2 * cc, 4));
                            h0 = _mm256_or_si256(h0, bit_to(H0, 2 * cc + 1, 4));
                            h1 = _mm256_or_si256(h1, bit_to(H1, 2 * cc + 1, 4));
                        }
                        s4[2 * c] = _mm256_add_epi32(_mm256_madd_epi16(l0, ldx(xc)), _mm256_madd_epi16(l1, ldx(xc + 16)));
                        s4[2 * c + 1] = _mm256_add_epi32(_mm256_madd_epi16(h0, ldx(xc + 32)), _mm256_madd_epi16(h1, ldx(xc + 48)));
                    }
                    const __m256i t = fold4(s4[0], s4[1], s4[2], s4[3]);
                    const __m256 sc4 = _mm256_permutevar8x32_ps(
                        sv[0], h ? _mm256_setr_epi32(4, 5, 6, 7, 4, 5, 6, 7) : _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3));
                    acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sc4, acc[r][0]);
                }
                continue;
            }
            for (int c = 0; c < 4; c++) {
                const __m256i v0 = ld16(q + qo + 32 * c), v1 = ld16(q + qo + 16 + 32 * c);
                __m256i l0 = _mm256_and_si256(v0, m4), l1 = _mm256_and_si256(v1, m4);
                __m256i h0 = _mm256_srli_epi16(v0, 4), h1 = _mm256_srli_epi16(v1, 4);
                if (five) {
                    l0 = _mm256_or_si256(l0, bit_to(H0, 2 * c, 4));
                    l1 = _mm256_or_si256(l1, bit_to(H1, 2 * c, 4));
                    h0 = _mm256_or_si256(h0, bit_to(H0, 2 * c + 1, 4));
                    h1 = _mm256_or_si256(h1, bit_to(H1, 2 * c + 1, 4));
                }
                for (int jj = 0; jj < J; jj++) {
                    const int16_t *x = p->xq + (j0 + jj) * cols + 256 * sb + 64 * c;
                    const __m256i sa = _mm256_add_epi32(_mm256_madd_epi16(l0, ldx(x)), _mm256_madd_epi16(l1, ldx(x + 16)));
                    const __m256i sh = _mm256_add_epi32(_mm256_madd_epi16(h0, ldx(x + 32)), _mm256_madd_epi16(h1, ldx(x + 48)));
                    acc[r][jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sa), lane(sv[jj], 2 * c), acc[r][jj]);
                    acc[r][jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sh), lane(sv[jj], 2 * c + 1), acc[r][jj]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int jj = 0; jj < J; jj++) out[r * J + jj] = hsum(acc[r][jj]);
}

/* acc + the dot of eight 16-weight groups (int16 codes qv[g], activations x + 16 g) with their scales
 * sv (lane g: the group's weight scale times its activations' scale).  fold (decode): four groups'
 * sums fold into one vector (as q4_k's), then one conversion and one FMA against their four scales;
 * else one per group. */
/* acc + the eight integer sums s[g] (8 lanes each) weighed by lane g of sv: four groups' sums folded
 * into one vector (as q4_k's decode), then one conversion and one FMA against their four scales. */
INLINE __m256 fold8(const __m256i s[8], __m256 sv, __m256 acc) {
    for (int f = 0; f < 2; f++) {
        const __m256i t = fold4(s[4 * f], s[4 * f + 1], s[4 * f + 2], s[4 * f + 3]);
        const __m256 sc4 = _mm256_permutevar8x32_ps(
            sv, f ? _mm256_setr_epi32(4, 5, 6, 7, 4, 5, 6, 7) : _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sc4, acc);
    }
    return acc;
}

INLINE __m256 groups8(const __m256i qv[8], const int16_t *x, __m256 sv, int fold, __m256 acc) {
    __m256i s[8];
    for (int g = 0; g < 8; g++) s[g] = _mm256_madd_epi16(qv[g], ldx(x + 16 * g));
    if (fold) return fold8(s, sv, acc);
    for (int g = 0; g < 8; g++) acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[g]), lane(sv, g), acc);
    return acc;
}

/* The vectors' part of a 16-group kernel (q6_k, q3_k, q2_k) once half h of super-block sb is decoded
 * (qv[g]: group 8 h + g's codes, sc: the groups' scales): for each vector, minus off * xs16 (lane g:
 * the group's offset, per 32 of its activations' sum), plus the groups' dot products weighed by sc. */
INLINE void k16_half(__m256 *acc, int J, const __m256i qv[8], __m256 sc, __m256 off, const xprep *p, int64_t j0,
                     int64_t sb, int h) {
    for (int jj = 0; jj < J; jj++) {
        const int64_t k = 2 * ((j0 + jj) * p->nb + 8 * sb) + 8 * h; /* 16-group index */
        acc[jj] = _mm256_fnmadd_ps(off, _mm256_loadu_ps(p->xs16 + k), acc[jj]);
        const __m256 sv = _mm256_mul_ps(sc, _mm256_loadu_ps(p->xd16 + k));
        acc[jj] = groups8(qv, p->xq + (j0 + jj) * p->cols + 256 * sb + 128 * h, sv, J == 1, acc[jj]);
    }
}

INLINE void dot_q6_k(const uint8_t *w, int64_t rb, int R, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t pfd = pf_ahead(R, rb);
    const int64_t nb = p->nb;
    const __m256i m4 = _mm256_set1_epi16(0x0F), m30 = _mm256_set1_epi16(0x30);
    ACC_INIT
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *q = w + r * rb + 210 * sb;
            for (int l = 0; l < 4; l++) pf(q + pfd + 64 * l);
            pf(q + pfd + 209);
            const __m256 d = _mm256_set1_ps(h2f(q + 208));
            const __m128i s8 = _mm_loadu_si128((const __m128i *)(q + 192));
            const __m256 sc[2] = {
                _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8))),
                _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s8, 8))))};
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = q + 64 * h, *qh = q + 128 + 32 * h;
                __m256i qv[8];
                for (int t = 0; t < 2; t++) {
                    const __m256i A = ld16(ql + 16 * t), B = ld16(ql + 32 + 16 * t), H = ld16(qh + 16 * t);
                    qv[0 + t] = _mm256_or_si256(_mm256_and_si256(A, m4), _mm256_and_si256(_mm256_slli_epi16(H, 4), m30));
                    qv[2 + t] = _mm256_or_si256(_mm256_and_si256(B, m4), _mm256_and_si256(_mm256_slli_epi16(H, 2), m30));
                    qv[4 + t] = _mm256_or_si256(_mm256_srli_epi16(A, 4), _mm256_and_si256(H, m30));
                    qv[6 + t] = _mm256_or_si256(_mm256_srli_epi16(B, 4), _mm256_and_si256(_mm256_srli_epi16(H, 2), m30));
                }
                /* the offset: minus d*sc_g * 32 * (sum of x over group g) */
                k16_half(acc[r], J, qv, sc[h], sc[h], p, j0, sb, h);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int jj = 0; jj < J; jj++) out[r * J + jj] = hsum(acc[r][jj]);
}

/* q3_k's 16 scales (as q3k_scale, minus 32) from the 12 bytes at s, as int8 lanes. */
INLINE __m128i q3k_scales16(const uint8_t *s) {
    const __m128i lo8 = _mm_loadl_epi64((const __m128i *)s), m15 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(lo8, m15), _mm_and_si128(_mm_srli_epi16(lo8, 4), m15));
    /* byte k of hi: byte 8 + k % 4 shifted right by 2 (k / 4), then its low two bits */
    const __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)rd32(s + 8)), _mm_setr_epi32(0, 2, 4, 6)),
                                     _mm_set1_epi8(3));
    return _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32));
}

/* q3_k (three = 1) and q2_k (three = 0): as q6_k, 16 groups of 16 weights with a scale each, two
 * bits a weight in qs (weight 128 h + 32 j + l: bits 2j, 2j+1 of byte 32 h + l).  q3_k's third bit is
 * bit 4 h + j of hmask[l], the weight minus 4 where it is clear: the codes are summed as (two bits |
 * third bit << 2) and the 4 taken off per group, minus d * s_g * 4 * (sum of x over group g), from
 * xs16 (32 times that sum) as q6_k takes its 32.  q2_k's mins likewise: minus dmin * m_g * that sum. */
INLINE void dot_q23_k(int three, const uint8_t *w, int64_t rb, int R, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t pfd = pf_ahead(R, rb), bs = three ? 110 : 84;
    const int64_t nb = p->nb;
    const __m256i m3 = _mm256_set1_epi16(3);
    ACC_INIT
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *q = w + r * rb + bs * sb;
            pf(q + pfd);
            pf(q + pfd + 64);
            pf(q + pfd + bs - 1);
            const uint8_t *qs = q + (three ? 32 : 16);
            __m128i s8; /* the 16 groups' scales as int8 */
            __m256 d, mn[2];
            if (three) {
                s8 = q3k_scales16(q + 96);
                d = _mm256_set1_ps(h2f(q + 108));
            } else {
                const __m128i raw = _mm_loadu_si128((const __m128i *)q), m15 = _mm_set1_epi8(0x0F);
                s8 = _mm_and_si128(raw, m15);
                const __m128i m8 = _mm_and_si128(_mm_srli_epi16(raw, 4), m15);
                d = _mm256_set1_ps(h2f(q + 80));
                /* dmin / 32 (exact): xs16 holds 32 times each group's sum */
                const __m256 dm = _mm256_set1_ps(h2f(q + 82) * 0.03125f);
                mn[0] = _mm256_mul_ps(dm, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m8)));
                mn[1] = _mm256_mul_ps(dm, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(m8, 8))));
            }
            const __m256 sc[2] = {_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8))),
                                  _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s8, 8))))};
            if (three) { /* the offset: 4 d s_g per 32 in xs16 (exact: a power of two) */
                mn[0] = _mm256_mul_ps(sc[0], _mm256_set1_ps(0.125f));
                mn[1] = _mm256_mul_ps(sc[1], _mm256_set1_ps(0.125f));
            }
            const __m256i H0 = three ? ld16(q) : _mm256_setzero_si256(), H1 = three ? ld16(q + 16) : H0;
            for (int h = 0; h < 2; h++) {
                const __m256i A0 = ld16(qs + 32 * h), A1 = ld16(qs + 32 * h + 16);
                __m256i qv[8]; /* group 2 j + t of this half */
                for (int j = 0; j < 4; j++) {
                    qv[2 * j] = _mm256_and_si256(_mm256_srli_epi16(A0, 2 * j), m3);
                    qv[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(A1, 2 * j), m3);
                    if (three) {
                        qv[2 * j] = _mm256_or_si256(qv[2 * j], bit_to(H0, 4 * h + j, 2));
                        qv[2 * j + 1] = _mm256_or_si256(qv[2 * j + 1], bit_to(H1, 4 * h + j, 2));
                    }
                }
                k16_half(acc[r], J, qv, sc[h], mn[h], p, j0, sb, h);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int jj = 0; jj < J; jj++) out[r * J + jj] = hsum(acc[r][jj]);
}

/* iq4_nl (xs = 0) and iq4_xs: 32-blocks of 4-bit indices into IQ4_VALUES (a table lookup, pshufb),
 * each block with its scale, taken eight blocks at a time (an iq4_xs super-block): the eight scales
 * as one vector (iq4_xs: its packed 6-bit scales unpacked in lanes; iq4_nl: eight f16 at a stride of
 * 18), the sums folded (fold8).  An iq4_nl row's last blocks that make no eight go one by one. */
INLINE __m256i iq4_lookup(__m128i tab, __m128i idx) { return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(tab, idx)); }

INLINE void dot_iq4(int xs, const uint8_t *w, int64_t rb, int R, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t pfd = pf_ahead(R, rb), cols = p->cols, nb = p->nb, gb = xs ? 136 : 144;
    const __m128i tab = _mm_loadu_si128((const __m128i *)IQ4_VALUES), m15 = _mm_set1_epi8(0x0F);
    ACC_INIT
    for (int64_t g = 0; g < nb / 8; g++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *q = w + r * rb + gb * g;
            pf(q + pfd);
            pf(q + pfd + 64);
            pf(q + pfd + gb - 1);
            __m256 scv;
            const uint8_t *qs = q + (xs ? 8 : 2);
            const int64_t stride = xs ? 16 : 18;
            if (xs) { /* scale k: nibble k of the u32 at 4 (bits 4k..4k+3), bits 2k, 2k+1 of the u16 at 2 */
                const __m256i lo = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)rd32(q + 4)),
                                                                      _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                                    _mm256_set1_epi32(15));
                const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)rd16(q + 2)),
                                                                      _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                                    _mm256_set1_epi32(3));
                const __m256i ls = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
                scv = _mm256_mul_ps(_mm256_set1_ps(h2f(q)), _mm256_cvtepi32_ps(ls));
            } else {
                scv = _mm256_set_m128(_mm256_castps256_ps128(scales4(q + 72, 18)), _mm256_castps256_ps128(scales4(q, 18)));
            }
            __m256i wl[8], wh[8];
            for (int k = 0; k < 8; k++) {
                const __m128i v = _mm_loadu_si128((const __m128i *)(qs + stride * k));
                wl[k] = iq4_lookup(tab, _mm_and_si128(v, m15));
                wh[k] = iq4_lookup(tab, _mm_and_si128(_mm_srli_epi16(v, 4), m15));
            }
            for (int jj = 0; jj < J; jj++) {
                const int16_t *x = p->xq + (j0 + jj) * cols + 256 * g;
                __m256i sum[8];
                for (int k = 0; k < 8; k++)
                    sum[k] = _mm256_add_epi32(_mm256_madd_epi16(wl[k], ldx(x + 32 * k)), _mm256_madd_epi16(wh[k], ldx(x + 32 * k + 16)));
                acc[r][jj] = fold8(sum, _mm256_mul_ps(scv, _mm256_loadu_ps(p->xd + (j0 + jj) * nb + 8 * g)), acc[r][jj]);
            }
        }
    }
    for (int64_t b = nb / 8 * 8; b < nb; b++) { /* iq4_nl only: the rest of the row */
        for (int r = 0; r < R; r++) {
            const uint8_t *q;
            const float d = iq4_block(xs, w + r * rb, b, &q);
            const __m128i v = _mm_loadu_si128((const __m128i *)q);
            const __m256i lo = iq4_lookup(tab, _mm_and_si128(v, m15)), hi = iq4_lookup(tab, _mm_and_si128(_mm_srli_epi16(v, 4), m15));
            for (int jj = 0; jj < J; jj++) {
                const int16_t *x = p->xq + (j0 + jj) * cols + 32 * b;
                const __m256i t = _mm256_add_epi32(_mm256_madd_epi16(lo, ldx(x)), _mm256_madd_epi16(hi, ldx(x + 16)));
                acc[r][jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(d * p->xd[(j0 + jj) * nb + b]), acc[r][jj]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int jj = 0; jj < J; jj++) out[r * J + jj] = hsum(acc[r][jj]);
}

/* q4_1, q5_0, q5_1: 32-blocks of 4-bit codes, the last two with a fifth bit each from a 32-bit word
 * (spread to the sixteen int16 lanes by a mask and compare), q4_1 and q5_1 with a min m: d * sum(q x) +
 * m * sum(x), the second from the float sums (xs); q5_0's codes are q - 16: 16 * sum(xq) (2 xc1) comes
 * off in integers. */
INLINE __m256i fifth_bits(uint32_t half) {
    const __m256i bits = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                           (short)0x8000);
    const __m256i h = _mm256_and_si256(_mm256_set1_epi16((short)half), bits);
    return _mm256_and_si256(_mm256_cmpeq_epi16(h, bits), _mm256_set1_epi16(16));
}

/* One block's codes (lo: weights 0-15, hi: 16-31) and, on q5_0, 16 * sum(xq) taken off in lane 0. */
INLINE __m256i b32_block(int fmt, const __m256i lo, const __m256i hi, const int16_t *x, int32_t xc1) {
    const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(lo, ldx(x)), _mm256_madd_epi16(hi, ldx(x + 16)));
    return fmt == Q5_0 ? _mm256_sub_epi32(s, _mm256_setr_epi32(2 * xc1, 0, 0, 0, 0, 0, 0, 0)) : s;
}

INLINE void b32_codes(int fmt, const uint8_t *q, __m256i *lo, __m256i *hi) {
    const __m256i v = ld16(q + b32_qs(fmt)), m4 = _mm256_set1_epi16(0x0F);
    *lo = _mm256_and_si256(v, m4);
    *hi = _mm256_srli_epi16(v, 4);
    if (b32_qh(fmt)) {
        const uint32_t qh = rd32(q + b32_qh(fmt));
        *lo = _mm256_or_si256(*lo, fifth_bits(qh & 0xFFFF));
        *hi = _mm256_or_si256(*hi, fifth_bits(qh >> 16));
    }
}

/* Four blocks at a time: their sums folded (fold4), their four d (and m) as vectors of f16 at the block
 * stride; a row's last blocks one by one. */
INLINE void dot_b32(int fmt, const uint8_t *w, int64_t rb, int R, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t pfd = pf_ahead(R, rb), cols = p->cols, nb = p->nb, bs = b32_bytes(fmt);
    ACC_INIT
    float mins[4][4] = {{0}};
    __m128 mv[4][4];
    for (int r = 0; r < R; r++)
        for (int jj = 0; jj < J; jj++) mv[r][jj] = _mm_setzero_ps();
    for (int64_t b0 = 0; b0 + 4 <= nb; b0 += 4) {
        for (int r = 0; r < R; r++) {
            const uint8_t *q = w + r * rb + bs * b0;
            pf_span(q + pfd, 4 * bs);
            if (4 * bs > 64) pf(q + pfd + 64);
            __m256i lo[4], hi[4];
            for (int k = 0; k < 4; k++) b32_codes(fmt, q + bs * k, &lo[k], &hi[k]);
            const __m128 d4 = _mm256_castps256_ps128(scales4(q, bs));
            const __m128 m4v = fmt == Q5_0 ? _mm_setzero_ps() : _mm256_castps256_ps128(scales4(q + 2, bs));
            for (int jj = 0; jj < J; jj++) {
                const int64_t k0 = (j0 + jj) * nb + b0;
                const int16_t *x = p->xq + (j0 + jj) * cols + 32 * b0;
                __m256i t[4];
                for (int k = 0; k < 4; k++) t[k] = b32_block(fmt, lo[k], hi[k], x + 32 * k, p->xc1[k0 + k]);
                const __m128 s4 = _mm_mul_ps(d4, _mm_loadu_ps(p->xd + k0));
                acc[r][jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(fold4(t[0], t[1], t[2], t[3])), _mm256_set_m128(s4, s4), acc[r][jj]);
                if (fmt != Q5_0) mv[r][jj] = _mm_fmadd_ps(m4v, _mm_loadu_ps(p->xs + k0), mv[r][jj]);
            }
        }
    }
    for (int64_t b = nb / 4 * 4; b < nb; b++) {
        for (int r = 0; r < R; r++) {
            const uint8_t *q = w + r * rb + bs * b;
            __m256i lo, hi;
            b32_codes(fmt, q, &lo, &hi);
            const float d = h2f(q), m = fmt == Q5_0 ? 0.0f : h2f(q + 2);
            for (int jj = 0; jj < J; jj++) {
                const int64_t k = (j0 + jj) * nb + b;
                const __m256i t = b32_block(fmt, lo, hi, p->xq + (j0 + jj) * cols + 32 * b, p->xc1[k]);
                acc[r][jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(d * p->xd[k]), acc[r][jj]);
                mins[r][jj] += m * p->xs[k];
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int jj = 0; jj < J; jj++) {
            __m128 m = mv[r][jj];
            m = _mm_add_ps(m, _mm_movehl_ps(m, m));
            m = _mm_add_ss(m, _mm_movehdup_ps(m));
            out[r * J + jj] = hsum(acc[r][jj]) + _mm_cvtss_f32(m) + mins[r][jj];
        }
}

/* x8 runs are read front to back: the kernels prefetch each run PF_BYTES ahead, line by line.
 * *next starts at the run's first line plus PF_BYTES; pf_run_upto issues every line up to `end`. */
INLINE uintptr_t pf_run_start(const uint8_t *w) { return ((uintptr_t)w & ~(uintptr_t)63) + PF_BYTES; }
INLINE void pf_run_upto(uintptr_t *next, const uint8_t *end) {
    for (; *next < (uintptr_t)end + PF_BYTES; *next += 64) pf((const uint8_t *)*next);
}

/* q4_0x8 (q8 = 0) and q8_0x8 (q8 = 1): one run of eight interleaved rows against J prepared vectors,
 * out[jj * 8 + rr].  Each 32-bit lane of a madd is one row's two adjacent weights times the same two
 * activations in every lane (a broadcast), so the eight lanes are the eight rows' sums: no
 * horizontal fold, and one conversion, one scale vector (eight contiguous f16) and one FMA serve
 * eight rows.  A q4_0 byte holds weights i (low nibble) and 16 + i (high); q8_0's are signed. */
INLINE void dot_x8_32(int q8, const uint8_t *w, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb, bs = q8 ? 272 : 144;
    const __m256i m4 = _mm256_set1_epi16(0x0F);
    __m256 acc[4];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm256_setzero_ps();
    uintptr_t next_pf = pf_run_start(w);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = w + bs * b;
        pf_run_upto(&next_pf, q + bs);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q));
        __m256i s[4];
        for (int jj = 0; jj < J; jj++) s[jj] = _mm256_setzero_si256();
        for (int k = 0; k < (q8 ? 16 : 8); k++) {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(q + 16 + 16 * k));
            const __m256i v = q8 ? _mm256_cvtepi8_epi16(raw) : _mm256_cvtepu8_epi16(raw);
            const __m256i lo = q8 ? v : _mm256_and_si256(v, m4), hi = _mm256_srli_epi16(v, 4);
            for (int jj = 0; jj < J; jj++) {
                const int16_t *x = p->xq + (j0 + jj) * cols + 32 * b + 2 * k;
                const __m256i m = _mm256_madd_epi16(lo, _mm256_set1_epi32((int)rd32((const uint8_t *)x)));
                s[jj] = _mm256_add_epi32(s[jj], q8 ? m : _mm256_add_epi32(m, _mm256_madd_epi16(
                                                              hi, _mm256_set1_epi32((int)rd32((const uint8_t *)(x + 16))))));
            }
        }
        for (int jj = 0; jj < J; jj++) {
            const int64_t k = (j0 + jj) * nb + b;
            /* q4_0's nibbles are weight + 8: take 8 * (the block's sum of xq) back off */
            const __m256i t = q8 ? s[jj] : _mm256_sub_epi32(s[jj], _mm256_set1_epi32(p->xc1[k]));
            acc[jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(dw, _mm256_set1_ps(p->xd[k])), acc[jj]);
        }
    }
    for (int jj = 0; jj < J; jj++) _mm256_storeu_ps(out + 8 * jj, acc[jj]);
}

/* q4_kx8: one run of eight interleaved rows, super-block by super-block, as dot_x8_32 (one row per
 * lane).  The eight rows' 6-bit scales and mins come from the 12 packed bytes, which the layout holds
 * byte by byte for rows 0..7: one 8-byte load and a widening per byte position gives a vector of it. */
INLINE __m256i kx8_byte(const uint8_t *q, int t) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 32 + 8 * t)));
}

/* Sub-block j's scale (min = 0) or min (min = 1) for the eight rows, as q4k_scales unpacks them. */
INLINE __m256 kx8_scale(const uint8_t *q, int j, int min) {
    const __m256i m6 = _mm256_set1_epi32(63);
    __m256i v;
    if (j < 4) {
        v = _mm256_and_si256(kx8_byte(q, j + 4 * min), m6);
    } else {
        const __m256i lo = kx8_byte(q, j + 4), hi = _mm256_slli_epi32(_mm256_srli_epi32(kx8_byte(q, j - 4 + 4 * min), 6), 4);
        v = _mm256_or_si256(min ? _mm256_srli_epi32(lo, 4) : _mm256_and_si256(lo, _mm256_set1_epi32(15)), hi);
    }
    return _mm256_cvtepi32_ps(v);
}

/* q4_kx8 (five = 0) and q5_kx8: q5_k's payload holds its 32 bytes of fifth bits first (16 pairs), so
 * its nibbles start 16 pairs on; the pair of fifth-bit bytes 2k, 2k+1 of the eight rows lines up lane
 * for lane with nibble pair k of every 64-weight run c, whose bits 2c and 2c + 1 it holds. */
INLINE void dot_q45_kx8(int five, const uint8_t *w, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb, run = five ? 1408 : 1152, nib = five ? 16 : 0;
    const __m256i m4 = _mm256_set1_epi16(0x0F);
    __m256 acc[4];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm256_setzero_ps();
    uintptr_t next_pf = pf_run_start(w);
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *q = w + run * sb;
        pf_run_upto(&next_pf, q + run);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + 16)));
        /* the mins: minus dmin * sum_j m_j * (sum of x over sub-block j) */
        for (int j = 0; j < 8; j++) {
            const __m256 mn = _mm256_mul_ps(dmin, kx8_scale(q, j, 1));
            for (int jj = 0; jj < J; jj++)
                acc[jj] = _mm256_fnmadd_ps(mn, _mm256_set1_ps(p->xs[(j0 + jj) * nb + 8 * sb + j]), acc[jj]);
        }
        for (int c = 0; c < 4; c++) {
            __m256i sl[4], sh[4];
            for (int jj = 0; jj < J; jj++) sl[jj] = sh[jj] = _mm256_setzero_si256();
            for (int k = 0; k < 16; k++) {
                const __m256i v = ld16(q + 128 + 16 * (nib + 16 * c + k));
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_srli_epi16(v, 4);
                if (five) {
                    const __m256i H = ld16(q + 128 + 16 * k);
                    lo = _mm256_or_si256(lo, bit_to(H, 2 * c, 4));
                    hi = _mm256_or_si256(hi, bit_to(H, 2 * c + 1, 4));
                }
                for (int jj = 0; jj < J; jj++) {
                    const int16_t *x = p->xq + (j0 + jj) * cols + 256 * sb + 64 * c + 2 * k;
                    sl[jj] = _mm256_add_epi32(sl[jj], _mm256_madd_epi16(lo, _mm256_set1_epi32((int)rd32((const uint8_t *)x))));
                    sh[jj] = _mm256_add_epi32(sh[jj], _mm256_madd_epi16(hi, _mm256_set1_epi32((int)rd32((const uint8_t *)(x + 32)))));
                }
            }
            const __m256 s0 = _mm256_mul_ps(d, kx8_scale(q, 2 * c, 0)), s1 = _mm256_mul_ps(d, kx8_scale(q, 2 * c + 1, 0));
            for (int jj = 0; jj < J; jj++) {
                const int64_t k = (j0 + jj) * nb + 8 * sb + 2 * c;
                acc[jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sl[jj]), _mm256_mul_ps(s0, _mm256_set1_ps(p->xd[k])), acc[jj]);
                acc[jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sh[jj]), _mm256_mul_ps(s1, _mm256_set1_ps(p->xd[k + 1])), acc[jj]);
            }
        }
    }
    for (int jj = 0; jj < J; jj++) _mm256_storeu_ps(out + 8 * jj, acc[jj]);
}

/* iq4_xsx8: one run of eight interleaved rows as q4_kx8's kernel reads it (one row per lane), each
 * 16-byte load of payload (two bytes of each row) looked up in IQ4_VALUES (pshufb) before the madds.
 * The eight rows' 6-bit scales of sub-block k: nibble k % 2 of their scales_l byte k / 2 (a byte per
 * row, side by side), bits 2k, 2k+1 of their scales_h (a u16 per row). */
INLINE void dot_iq4_xsx8(const uint8_t *w, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb;
    const __m128i tab = _mm_loadu_si128((const __m128i *)IQ4_VALUES), m15 = _mm_set1_epi8(0x0F);
    __m256 acc[4];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm256_setzero_ps();
    uintptr_t next_pf = pf_run_start(w);
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *q = w + 1088 * sb;
        pf_run_upto(&next_pf, q + 1088);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q));
        const __m256i sh = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
        for (int k = 0; k < 8; k++) {
            const __m256i sl = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 32 + 8 * (k / 2))));
            const __m256i ls = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(sl, 4 * (k % 2)), _mm256_set1_epi32(15)),
                                               _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(sh, 2 * k), _mm256_set1_epi32(3)), 4));
            const __m256 sc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(ls, _mm256_set1_epi32(32))));
            __m256i s[4];
            for (int jj = 0; jj < J; jj++) s[jj] = _mm256_setzero_si256();
            for (int t = 0; t < 8; t++) {
                const __m128i v = _mm_loadu_si128((const __m128i *)(q + 64 + 16 * (8 * k + t)));
                const __m256i wl = iq4_lookup(tab, _mm_and_si128(v, m15));
                const __m256i wh = iq4_lookup(tab, _mm_and_si128(_mm_srli_epi16(v, 4), m15));
                for (int jj = 0; jj < J; jj++) {
                    const int16_t *x = p->xq + (j0 + jj) * cols + 256 * sb + 32 * k + 2 * t;
                    s[jj] = _mm256_add_epi32(s[jj], _mm256_add_epi32(
                        _mm256_madd_epi16(wl, _mm256_set1_epi32((int)rd32((const uint8_t *)x))),
                        _mm256_madd_epi16(wh, _mm256_set1_epi32((int)rd32((const uint8_t *)(x + 16))))));
                }
            }
            for (int jj = 0; jj < J; jj++)
                acc[jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[jj]),
                                          _mm256_mul_ps(sc, _mm256_set1_ps(p->xd[(j0 + jj) * nb + 8 * sb + k])), acc[jj]);
        }
    }
    for (int jj = 0; jj < J; jj++) _mm256_storeu_ps(out + 8 * jj, acc[jj]);
}

#if MK_I8
/* The int8 kernels' weight kinds of the 32-block x8 layouts (dot_x16_i8, dot_x8_i8) */
enum { X16_Q4_0, X16_Q8_0, X16_IQ4_XS };

/* Half h of a q6_k super-block at q as codes 0..63: c[t] holds weights 128 h + 32 t + l (byte l), as deq_row
 * reads them; for the int8 kernels' packed q6_k (q6_pack). */
INLINE void q6_codes(const uint8_t *q, int h, __m256i c[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    const __m256i A = _mm256_loadu_si256((const __m256i *)(q + 64 * h));
    const __m256i B = _mm256_loadu_si256((const __m256i *)(q + 64 * h + 32));
    const __m256i H = _mm256_loadu_si256((const __m256i *)(q + 128 + 32 * h));
    c[0] = _mm256_or_si256(_mm256_and_si256(A, m4), _mm256_and_si256(_mm256_slli_epi16(H, 4), m30));
    c[1] = _mm256_or_si256(_mm256_and_si256(B, m4), _mm256_and_si256(_mm256_slli_epi16(H, 2), m30));
    c[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), m4), _mm256_and_si256(H, m30));
    c[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), m4), _mm256_and_si256(_mm256_srli_epi16(H, 2), m30));
}

/* A packed q6_k block for a run of `run` rows (16: dot_q6x16_i8, 8: dot_q6x8_i8): 8 registers of 4 * run code
 * bytes (lane r: row r's codes 4m..4m+3), then d * scale of the run's rows for each 16-weight sub-block. */
#define Q6P_BLOCK(run) (40 * (run))

/* Rows [0, rows) (rows <= run; the rest zeros) of a q6_k matrix, row stride rb, nb 32-blocks a row, as
 * Q6P_BLOCK(run) blocks at out: a row's codes go out a dword at a time (as fast as AVX-512's scatter was). */
static void q6_pack(const uint8_t *w, int64_t rb, int rows, int run, int64_t nb, uint8_t *out) {
    memset(out, 0, (size_t)(nb * Q6P_BLOCK(run)));
    for (int r = 0; r < rows; r++) {
        for (int64_t s = 0; s < nb / 8; s++) {
            const uint8_t *q = w + r * rb + 210 * s;
            const float d = h2f(q + 208);
            for (int h = 0; h < 2; h++) {
                __m256i c[4];
                q6_codes(q, h, c);
                for (int t = 0; t < 4; t++) {
                    uint8_t *blk = out + Q6P_BLOCK(run) * (8 * s + 4 * h + t), codes[32];
                    _mm256_storeu_si256((__m256i *)codes, c[t]);
                    for (int m = 0; m < 8; m++) memcpy(blk + 4 * run * m + 4 * r, codes + 4 * m, 4);
                    float *sc = (float *)(blk + 32 * run);
                    sc[r] = d * (float)((const int8_t *)(q + 192))[2 * (4 * h + t)];
                    sc[run + r] = d * (float)((const int8_t *)(q + 192))[2 * (4 * h + t) + 1];
                }
            }
        }
    }
}
#endif

#if MK_I8_256
/* ---------- 256-bit: the x8 layouts against several vectors, in int8 ----------
 * dot_x16_i8's arithmetic in 256-bit registers, one run of eight rows a call: lane r of a register holds
 * row r's four weights 4m..4m+3 (units 2m and 2m + 1 of the run), a vector's four int8 activations are one
 * broadcast and one vpdpbusd does 32 products (the AVX2 kernels' int16 madd does 16, and an add; without
 * AVX-VNNI, vpmaddubsw + vpmaddwd + an add do 32).  Up to four vectors a call: the eight weight registers,
 * four accumulators and the temporaries fill the sixteen registers AVX2 has. */

/* Units 2m and 2m + 1 of a run (32 bytes at u: the eight rows' words 0-7 of each) in lane order: vpermq
 * puts both units' words 0-3 in the low 128-bit lane and 4-7 in the high, vpshufb pairs them word by word. */
INLINE __m256i x8_lanes(const uint8_t *u) {
    const __m256i order = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                           0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
    return _mm256_shuffle_epi8(_mm256_permute4x64_epi64(_mm256_loadu_si256((const __m256i *)u), 0xD8), order);
}

/* acc + the eight rows' weights in z (unsigned) times the four activations at x, lane by lane.  vpmaddubsw
 * saturates its pair sums at 32767: exact for codes below 64 (63 * 127 * 2 = 16002), see i8_runs. */
INLINE __m256i dp4(__m256i acc, __m256i z, const int8_t *x) {
    const __m256i xv = _mm256_set1_epi32((int)rd32((const uint8_t *)x));
#if MK_VNNI256
    return _mm256_dpbusd_avx_epi32(acc, z, xv);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(z, xv), _mm256_set1_epi16(1)));
#endif
}

/* q4_0x8, q8_0x8 and iq4_xsx8 (X16_*): one run against J <= 4 vectors of int8 activations, out[8 jj + r].
 * As dot_x16_i8: the weights made unsigned (q4_0's nibbles w + 8, q8_0's bytes read as w + 128, iq4_xs's
 * values looked up as w + 128), the block's sum of activation codes times 8 or 128 taken off. */
INLINE void dot_x8_i8(int kind, const uint8_t *w, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb;
    const __m256i m4 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x80);
    const __m256i tab = _mm256_xor_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_VALUES)), flip);
    const int32_t offset = kind == X16_Q4_0 ? 8 : 128;
    __m256 acc[4];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm256_setzero_ps();
    uintptr_t next_pf = pf_run_start(w);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *u; /* the block's units */
        __m256 dw;
        if (kind == X16_IQ4_XS) { /* super-block b / 8: d, scales_h, scales_l (x8_pos), then 8 x 128 bytes */
            const int k = (int)(b % 8);
            const uint8_t *q = w + 1088 * (b / 8);
            u = q + 64 + 128 * k;
            if (k == 0) pf_run_upto(&next_pf, q + 1088);
            const __m256i sh = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
            const __m256i sl = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 32 + 8 * (k / 2))));
            const __m256i ls = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(sl, 4 * (k % 2)), _mm256_set1_epi32(15)),
                                               _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(sh, 2 * k), _mm256_set1_epi32(3)), 4));
            dw = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q)),
                               _mm256_cvtepi32_ps(_mm256_sub_epi32(ls, _mm256_set1_epi32(32))));
        } else {
            const int64_t bs = kind == X16_Q8_0 ? 272 : 144;
            const uint8_t *q = w + bs * b;
            u = q + 16;
            pf_run_upto(&next_pf, q + bs);
            dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q));
        }
        __m256i z[8]; /* register m: weights 4m..4m+3 of each row */
        if (kind == X16_Q8_0) {
            for (int m = 0; m < 8; m++) z[m] = _mm256_xor_si256(x8_lanes(u + 32 * m), flip);
        } else {
            /* byte i of a q4_0 or iq4_xs block holds weights i (low nibble) and 16 + i (high) */
            for (int m = 0; m < 4; m++) {
                const __m256i g = x8_lanes(u + 32 * m);
                z[m] = _mm256_and_si256(g, m4);
                z[4 + m] = _mm256_and_si256(_mm256_srli_epi16(g, 4), m4);
            }
            if (kind == X16_IQ4_XS)
                for (int m = 0; m < 8; m++) z[m] = _mm256_shuffle_epi8(tab, z[m]);
        }
        for (int jj = 0; jj < J; jj++) {
            const int64_t k = (j0 + jj) * nb + b;
            const int8_t *x = p->xq8 + (j0 + jj) * cols + 32 * b;
            __m256i se = dp4(_mm256_setzero_si256(), z[0], x), so = dp4(_mm256_setzero_si256(), z[1], x + 4);
            for (int m = 2; m < 8; m += 2) {
                se = dp4(se, z[m], x + 4 * m);
                so = dp4(so, z[m + 1], x + 4 * m + 4);
            }
            const __m256i t = _mm256_sub_epi32(_mm256_add_epi32(se, so), _mm256_set1_epi32(p->xk8[k] * offset));
            acc[jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(dw, _mm256_set1_ps(p->xd8[k])), acc[jj]);
        }
    }
    for (int jj = 0; jj < J; jj++) _mm256_storeu_ps(out + 8 * jj, acc[jj]);
}

INLINE __m256i fifth_bit256(__m256i qh, int b) { /* bit b of each byte, moved to bit 4 */
    const __m256i v = b >= 4 ? _mm256_srli_epi16(qh, b - 4) : _mm256_slli_epi16(qh, 4 - b);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* q4_kx8 (five = 0) and q5_kx8: one run against J <= 4 vectors of int8 activations, sub-block by sub-block
 * (the low nibbles of a 64-weight group c are sub-block 2c, the high ones 2c + 1; q5_k's fifth bits lined up
 * with them as in dot_kx16_i8), each sub-block's sum scaled by d * its scale and its min taken off with its
 * sum of rounded activations (xd8 * xk8).  A group's bytes are put in lane order once (g), each sub-block's
 * weights taken from them as it comes (2048x1024 at 32 vectors: 3-6% faster than gathering for each). */
INLINE void dot_kx8_i8(int five, const uint8_t *w, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb, rs = five ? 1408 : 1152, nib = five ? 384 : 128;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[4];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm256_setzero_ps();
    uintptr_t next_pf = pf_run_start(w);
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *q = w + rs * sb;
        pf_run_upto(&next_pf, q + rs);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + 16)));
        __m256i g[8];
        for (int j = 0; j < 8; j++) { /* sub-block j: group j / 2's low (j even) or high nibbles */
            __m256i z[8];
            for (int m = 0; m < 8; m++) {
                if (j % 2 == 0) g[m] = x8_lanes(q + nib + 256 * (j / 2) + 32 * m);
                z[m] = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(g[m], 4) : g[m], m4);
                if (five) z[m] = _mm256_or_si256(z[m], fifth_bit256(x8_lanes(q + 128 + 32 * m), j));
            }
            const __m256 sc = _mm256_mul_ps(d, kx8_scale(q, j, 0)), mn = _mm256_mul_ps(dmin, kx8_scale(q, j, 1));
            for (int jj = 0; jj < J; jj++) {
                const int64_t k = (j0 + jj) * nb + 8 * sb + j;
                const int8_t *x = p->xq8 + (j0 + jj) * cols + 256 * sb + 32 * j;
                __m256i te = dp4(_mm256_setzero_si256(), z[0], x), to = dp4(_mm256_setzero_si256(), z[1], x + 4);
                for (int m = 2; m < 8; m += 2) {
                    te = dp4(te, z[m], x + 4 * m);
                    to = dp4(to, z[m + 1], x + 4 * m + 4);
                }
                const __m256 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(te, to)),
                                                 _mm256_mul_ps(sc, _mm256_set1_ps(p->xd8[k])), acc[jj]);
                acc[jj] = _mm256_fnmadd_ps(mn, _mm256_set1_ps(p->xd8[k] * (float)p->xk8[k]), a);
            }
        }
    }
    for (int jj = 0; jj < J; jj++) _mm256_storeu_ps(out + 8 * jj, acc[jj]);
}

#define MK_X8I8(J) \
    static void dot_i8q4_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_x8_i8(X16_Q4_0, w, J, p, j0, out); } \
    static void dot_i8q8_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_x8_i8(X16_Q8_0, w, J, p, j0, out); } \
    static void dot_i8k4_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_kx8_i8(0, w, J, p, j0, out); } \
    static void dot_i8k5_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_kx8_i8(1, w, J, p, j0, out); } \
    static void dot_i8i4_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_x8_i8(X16_IQ4_XS, w, J, p, j0, out); }
MK_X8I8(1)
MK_X8I8(2)
MK_X8I8(3)
MK_X8I8(4)
#undef MK_X8I8

/* q6_k in int8, eight rows: dot_q6x16_i8's arithmetic in 256-bit registers, over q6_pack's blocks of a run
 * of eight. */
INLINE void dot_q6x8_i8(const uint8_t *pk, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb;
    __m256 acc[4];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = pk + Q6P_BLOCK(8) * b;
        __m256i z[8];
        for (int m = 0; m < 8; m++) z[m] = _mm256_load_si256((const __m256i *)(blk + 32 * m));
        const __m256 sa = _mm256_load_ps((const float *)(blk + 256)), sb = _mm256_load_ps((const float *)(blk + 288));
        for (int jj = 0; jj < J; jj++) {
            const int64_t k = (j0 + jj) * nb + b;
            const int8_t *x = p->xq8 + (j0 + jj) * cols + 32 * b;
            __m256i ta = dp4(_mm256_setzero_si256(), z[0], x), tb = dp4(_mm256_setzero_si256(), z[4], x + 16);
            for (int m = 1; m < 4; m++) {
                ta = dp4(ta, z[m], x + 4 * m);
                tb = dp4(tb, z[4 + m], x + 16 + 4 * m);
            }
            /* codes are q + 32: 32 times each sub-block's sum of activation codes comes off */
            ta = _mm256_sub_epi32(ta, _mm256_set1_epi32(p->xk16[2 * k] * 32));
            tb = _mm256_sub_epi32(tb, _mm256_set1_epi32(p->xk16[2 * k + 1] * 32));
            const __m256 dx = _mm256_set1_ps(p->xd8[k]);
            const __m256 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ta), _mm256_mul_ps(sa, dx), acc[jj]);
            acc[jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tb), _mm256_mul_ps(sb, dx), a);
        }
    }
    for (int jj = 0; jj < J; jj++) _mm256_storeu_ps(out + 8 * jj, acc[jj]);
}

#define MK_Q6X8(J) \
    static void dot_q6x8_##J(const uint8_t *pk, const xprep *p, int64_t j0, float *out) { dot_q6x8_i8(pk, J, p, j0, out); }
MK_Q6X8(1)
MK_Q6X8(2)
MK_Q6X8(3)
MK_Q6X8(4)
#undef MK_Q6X8

/* Rows [r0, r1) of a matrix in an x8 layout against p's int8 vectors, a run and up to four vectors a call. */
static void rows_x8_i8(int fmt, const uint8_t *w, int64_t rb, int64_t r0, int64_t r1, const xprep *p, float *Y,
                       int64_t ldy) {
    typedef void (*x8i8dot)(const uint8_t *, const xprep *, int64_t, float *);
    static const x8i8dot fns[5][4] = {{dot_i8q4_1, dot_i8q4_2, dot_i8q4_3, dot_i8q4_4},
                                      {dot_i8q8_1, dot_i8q8_2, dot_i8q8_3, dot_i8q8_4},
                                      {dot_i8k4_1, dot_i8k4_2, dot_i8k4_3, dot_i8k4_4},
                                      {dot_i8i4_1, dot_i8i4_2, dot_i8i4_3, dot_i8i4_4},
                                      {dot_i8k5_1, dot_i8k5_2, dot_i8k5_3, dot_i8k5_4}};
    const x8i8dot *f = fns[fmt == Q8_0X8 ? 1 : fmt == Q4_KX8 ? 2 : fmt == IQ4_XSX8 ? 3 : fmt == Q5_KX8 ? 4 : 0];
    float o[32];
    for (int64_t r = r0; r < r1; r += 8)
        for (int64_t j = 0; j < p->n; j += 4) {
            const int64_t J = p->n - j < 4 ? p->n - j : 4;
            f[J - 1](w + r * rb, p, j, o);
            for (int64_t jj = 0; jj < J; jj++) memcpy(Y + (j + jj) * ldy + r, o + 8 * jj, 32);
        }
}
#endif /* MK_I8_256 */

#if MK_AVX512
/* ---------- AVX-512 VNNI: super-block formats against several vectors ----------
 *
 * Prefill multiplies each expert's rows by a few to a few dozen vectors.  The kernels above take
 * each 32 weights' integer sum to float against its own activation scale (a conversion and an FMA
 * per 32-block and vector); here the activations have one scale per 256 (xq256), so a row's
 * super-block is decoded once into int16 codes with the sub-block scales multiplied in (ksb_decode),
 * and each vector's dot with it is eight vpdpwssd (32 products each, summed in int32) and one
 * conversion and FMA.  The int32 sums cannot overflow: |code * scale| <= 4096 (q6_k's -32 * -128; q4_k
 * 945, q5_k 1953, iq4_xs -127 * -32, q3_k 128, q2_k 45) and |activation| <= 32767, so a lane's 16 products
 * stay below 2^31.
 * Accuracy: one scale per 256 instead of 32 costs a few bits where a 256-run's largest |x| is far
 * above the rest; the codes still have 15 bits (relative error ~1e-4 on the tests' data). */
INLINE __m512i ld32w(const uint8_t *p) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p)); }

/* Bit k of each int16 lane of h, moved to bit `to`. */
INLINE __m512i bit_to512(__m512i h, int k, int to) {
    const __m512i v = k >= to ? _mm512_srli_epi16(h, k - to) : _mm512_slli_epi16(h, to - k);
    return _mm512_and_si512(v, _mm512_set1_epi16((short)(1 << to)));
}

/* Lanes 0-15 from int16 lane a of v, lanes 16-31 from lane b (vpermw). */
INLINE __m512i pick2(__m512i v, int a, int b) {
    return _mm512_permutexvar_epi16(_mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16((short)a), _mm512_set1_epi16((short)b)), v);
}

/* One row's super-block: w[j] = weights 32 j .. 32 j + 31 as int16 times their integer scales (and,
 * q6_k, minus its 32; q3_k, minus 4 where the third bit is clear; iq4_xs, looked up in IQ4_VALUES), d
 * the float scale of those products, mn the mins for the float sums of the activations: q4_k and q5_k
 * dmin times the eight sub-blocks' (lanes 0-7, against xs), q2_k dmin / 32 times the sixteen groups'
 * (against xs16, 32 times each group's sum). */
typedef struct {
    __m512i w[8];
    float d;
    __m512 mn;
} ksb_t;

INLINE void ksb_decode(int fmt, const uint8_t *q, ksb_t *k) {
    const __m512i m4 = _mm512_set1_epi16(0x0F);
    k->mn = _mm512_setzero_ps();
    if (fmt == Q3_K || fmt == Q2_K) { /* as deq_row: weight 128 h + 32 j + l is bits 2j, 2j+1 of byte 32 h + l */
        const int three = fmt == Q3_K;
        const uint8_t *qs = q + (three ? 32 : 16);
        const __m128i s8 = three ? q3k_scales16(q + 96) : _mm_and_si128(_mm_loadu_si128((const __m128i *)q), _mm_set1_epi8(0x0F));
        const __m512i scv = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(s8));
        k->d = h2f(q + (three ? 108 : 80));
        if (!three) {
            const __m128i m8 = _mm_srli_epi16(_mm_and_si128(_mm_loadu_si128((const __m128i *)q), _mm_set1_epi8((char)0xF0)), 4);
            k->mn = _mm512_mul_ps(_mm512_set1_ps(h2f(q + 82) * 0.03125f), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m8)));
        }
        const __m512i HM = three ? ld32w(q) : _mm512_setzero_si512(), m3 = _mm512_set1_epi16(3);
        for (int h = 0; h < 2; h++) {
            const __m512i Q = ld32w(qs + 32 * h);
            for (int j = 0; j < 4; j++) {
                __m512i c = _mm512_and_si512(_mm512_srli_epi16(Q, 2 * j), m3);
                if (three) c = _mm512_sub_epi16(_mm512_or_si512(c, bit_to512(HM, 4 * h + j, 2)), _mm512_set1_epi16(4));
                const int t = 4 * h + j; /* groups 2 t, 2 t + 1 */
                k->w[t] = _mm512_mullo_epi16(c, pick2(scv, 2 * t, 2 * t + 1));
            }
        }
        return;
    }
    if (fmt == IQ4_XS) { /* block k: 16 bytes at 8 + 16 k, weights 0-15 the low nibbles, 16-31 the high */
        const __m128i tab = _mm_loadu_si128((const __m128i *)IQ4_VALUES), m15 = _mm_set1_epi8(0x0F);
        k->d = h2f(q);
        for (int j = 0; j < 8; j++) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(q + 8 + 16 * j));
            const __m256i c = _mm256_set_m128i(_mm_shuffle_epi8(tab, _mm_and_si128(_mm_srli_epi16(v, 4), m15)),
                                               _mm_shuffle_epi8(tab, _mm_and_si128(v, m15)));
            k->w[j] = _mm512_mullo_epi16(_mm512_cvtepi8_epi16(c), _mm512_set1_epi16((short)(iq4xs_ls(q, j) - 32)));
        }
        return;
    }
    if (fmt == Q6_K) {
        const __m512i m30 = _mm512_set1_epi16(0x30), o32 = _mm512_set1_epi16(32);
        const __m512i sc = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 192))));
        k->d = h2f(q + 208);
        for (int h = 0; h < 2; h++) { /* weights 128 h + l, 32 + l, 64 + l, 96 + l from byte l (as dot_q6_k) */
            const uint8_t *ql = q + 64 * h, *qh = q + 128 + 32 * h;
            const __m512i A = ld32w(ql), B = ld32w(ql + 32), H = ld32w(qh);
            const __m512i c[4] = {
                _mm512_or_si512(_mm512_and_si512(A, m4), _mm512_and_si512(_mm512_slli_epi16(H, 4), m30)),
                _mm512_or_si512(_mm512_and_si512(B, m4), _mm512_and_si512(_mm512_slli_epi16(H, 2), m30)),
                _mm512_or_si512(_mm512_srli_epi16(A, 4), _mm512_and_si512(H, m30)),
                _mm512_or_si512(_mm512_srli_epi16(B, 4), _mm512_and_si512(_mm512_srli_epi16(H, 2), m30))};
            for (int t = 0; t < 4; t++) {
                const int j = 4 * h + t; /* 16-groups 2 j and 2 j + 1 */
                k->w[j] = _mm512_mullo_epi16(_mm512_sub_epi16(c[t], o32), pick2(sc, 2 * j, 2 * j + 1));
            }
        }
        return;
    }
    const int five = fmt == Q5_K;
    const uint8_t *qs = q + (five ? 48 : 16);
    const __m128i smv = q4k_unpack(q + 4); /* bytes 0-7 the scales, 8-15 the mins */
    const __m512i sc = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(smv));
    k->d = h2f(q);
    k->mn = _mm512_zextps256_ps512(
        _mm256_mul_ps(_mm256_set1_ps(h2f(q + 2)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(smv, 8)))));
    const __m512i H = five ? ld32w(q + 16) : _mm512_setzero_si512(); /* bit s of qh[l]: weight l of sub-block s */
    for (int c = 0; c < 4; c++) {
        const __m512i v = ld32w(qs + 32 * c);
        __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_srli_epi16(v, 4);
        if (five) {
            lo = _mm512_or_si512(lo, bit_to512(H, 2 * c, 4));
            hi = _mm512_or_si512(hi, bit_to512(H, 2 * c + 1, 4));
        }
        k->w[2 * c] = _mm512_mullo_epi16(lo, pick2(sc, 2 * c, 2 * c));
        k->w[2 * c + 1] = _mm512_mullo_epi16(hi, pick2(sc, 2 * c + 1, 2 * c + 1));
    }
}

/* One row (w) against J <= 8 vectors from j0: out[jj]. */
INLINE void dot_ksb(int fmt, const uint8_t *w, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nsb = cols / 256, nb = p->nb, bs = fmt_row_bytes(fmt, 256);
    __m512 acc[8];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *q = w + bs * sb;
        pf(q + 4 * bs);
        pf(q + 4 * bs + 64);
        pf(q + 4 * bs + 128);
        pf(q + 4 * bs + bs - 1);
        ksb_t k;
        ksb_decode(fmt, q, &k);
        for (int jj = 0; jj < J; jj++) {
            const __m512i *x = (const __m512i *)(p->xq256 + (j0 + jj) * cols + 256 * sb);
            /* two chains of four: half the latency of one */
            __m512i s0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), k.w[0], _mm512_load_si512(x));
            __m512i s1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), k.w[1], _mm512_load_si512(x + 1));
            for (int t = 2; t < 8; t += 2) {
                s0 = _mm512_dpwssd_epi32(s0, k.w[t], _mm512_load_si512(x + t));
                s1 = _mm512_dpwssd_epi32(s1, k.w[t + 1], _mm512_load_si512(x + t + 1));
            }
            const float dx = k.d * p->xd256[(j0 + jj) * nsb + sb];
            acc[jj] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_set1_ps(dx), acc[jj]);
            if (fmt == Q4_K || fmt == Q5_K) /* the mins: minus dmin * m_j * (sum of x over sub-block j), in lanes 0-7 */
                acc[jj] = _mm512_fnmadd_ps(k.mn, _mm512_maskz_loadu_ps(0xFF, p->xs + (j0 + jj) * nb + 8 * sb), acc[jj]);
            if (fmt == Q2_K) /* minus dmin * m_g * (sum of x over group g) */
                acc[jj] = _mm512_fnmadd_ps(k.mn, _mm512_loadu_ps(p->xs16 + 2 * ((j0 + jj) * nb + 8 * sb)), acc[jj]);
        }
    }
    for (int jj = 0; jj < J; jj++) out[jj] = _mm512_reduce_add_ps(acc[jj]);
}

#define MK_KSB(J) \
    static void ksb4_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_ksb(Q4_K, w, J, p, j0, out); } \
    static void ksb5_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_ksb(Q5_K, w, J, p, j0, out); } \
    static void ksb6_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_ksb(Q6_K, w, J, p, j0, out); } \
    static void ksbi_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_ksb(IQ4_XS, w, J, p, j0, out); } \
    static void ksb3_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_ksb(Q3_K, w, J, p, j0, out); } \
    static void ksb2_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_ksb(Q2_K, w, J, p, j0, out); }
MK_KSB(1)
MK_KSB(2)
MK_KSB(3)
MK_KSB(4)
MK_KSB(5)
MK_KSB(6)
MK_KSB(7)
MK_KSB(8)
#undef MK_KSB

/* q4_0x8 (q8 = 0) and q8_0x8 in 512-bit registers: dot_x8_32's arithmetic with two 16-byte units (two
 * weight pairs of each of the eight rows) in one register, lanes 0-7 the first unit's rows and 8-15 the
 * second's; each vector's block of activations is loaded once, its pairs put in place for a unit pair by
 * one vpermd, and one vpdpwssd does 32 products (dot_x8_32: a broadcast, a madd and an add do 16).  The
 * two halves are added at the end of the block, then converted and scaled as there. */
INLINE void dot_x8_32_512(int q8, const uint8_t *w, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb, bs = q8 ? 272 : 144;
    const __m512i m4 = _mm512_set1_epi16(0x0F);
    __m256 acc[4];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm256_setzero_ps();
    uintptr_t next_pf = pf_run_start(w);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = w + bs * b;
        pf_run_upto(&next_pf, q + bs);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q));
        __m512i xv[4], s[4];
        for (int jj = 0; jj < J; jj++) {
            xv[jj] = _mm512_load_si512((const __m512i *)(p->xq + (j0 + jj) * cols + 32 * b)); /* pair i: dword i */
            s[jj] = _mm512_setzero_si512();
        }
        for (int k = 0; k < (q8 ? 16 : 8); k += 2) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(q + 16 + 16 * k));
            const __m512i v = q8 ? _mm512_cvtepi8_epi16(raw) : _mm512_cvtepu8_epi16(raw);
            /* lanes 0-7: activation pair k (q4_0's high nibbles: 8 + k), lanes 8-15: the next */
            const __m512i ilo = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(k), _mm512_set1_epi32(k + 1));
            if (q8) {
                for (int jj = 0; jj < J; jj++) s[jj] = _mm512_dpwssd_epi32(s[jj], v, _mm512_permutexvar_epi32(ilo, xv[jj]));
                continue;
            }
            const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_srli_epi16(v, 4);
            const __m512i ihi = _mm512_add_epi32(ilo, _mm512_set1_epi32(8));
            for (int jj = 0; jj < J; jj++) {
                s[jj] = _mm512_dpwssd_epi32(s[jj], lo, _mm512_permutexvar_epi32(ilo, xv[jj]));
                s[jj] = _mm512_dpwssd_epi32(s[jj], hi, _mm512_permutexvar_epi32(ihi, xv[jj]));
            }
        }
        for (int jj = 0; jj < J; jj++) {
            const int64_t k = (j0 + jj) * nb + b;
            __m256i t = _mm256_add_epi32(_mm512_castsi512_si256(s[jj]), _mm512_extracti64x4_epi64(s[jj], 1));
            if (!q8) t = _mm256_sub_epi32(t, _mm256_set1_epi32(p->xc1[k])); /* q4_0's nibbles are weight + 8 */
            acc[jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(dw, _mm256_set1_ps(p->xd[k])), acc[jj]);
        }
    }
    for (int jj = 0; jj < J; jj++) _mm256_storeu_ps(out + 8 * jj, acc[jj]);
}
/* The word indices (vpermt2w) that put the x8 units of two runs, four units of each in one register
 * apiece, in the int8 kernels' order: output words 2r and 2r + 1 (lane r) of the first register are
 * unit 0's and unit 1's word r (row r's two bytes in each), of the second units 2's and 3's; rows 8-15
 * (lanes 8-15) from the second run, vpermt2w's second source (words 32-63). */
INLINE void x16_gather(__m512i *even, __m512i *odd) {
    int16_t ie[32], io[32];
    for (int o = 0; o < 32; o++) {
        const int r = (o / 2) % 8, second = o / 16, unit = o % 2;
        ie[o] = (int16_t)(32 * second + 8 * unit + r);
        io[o] = (int16_t)(32 * second + 8 * (2 + unit) + r);
    }
    *even = _mm512_loadu_si512(ie);
    *odd = _mm512_loadu_si512(io);
}

/* q4_0x8, q8_0x8 and iq4_xsx8 (X16_*), two runs (sixteen rows: w, and w + run bytes) against J vectors
 * of int8 activations (xq8): one 32-bit lane per row, so that a vector's four activations at a time are
 * one broadcast and one vpdpbusd does 64 products (dot_x8_32_512: 32, and a vpermd per vector).  A
 * 32-weight block's weights are put in that order once for all J vectors: lane r of register m holds
 * row r's weights 4m..4m+3, which lie in units 2m and 2m+1 (two bytes each; one vpermt2w a register
 * gathers them from both runs).  vpdpbusd takes unsigned weights: q4_0's nibbles are w + 8, q8_0's
 * bytes are read as w + 128 and iq4_xs's values looked up as w + 128, so the block's sum of activation
 * codes (xk8) times 8 or 128 is taken off before scaling.  Sums stay far inside int32: 32 products of at
 * most 255 * 128 a block. */
INLINE void dot_x16_i8(int kind, const uint8_t *w, int64_t run, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb;
    __m512i idx_e, idx_o;
    x16_gather(&idx_e, &idx_o);
    const __m512i m4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    /* iq4_xs's values + 128, in every 128-bit lane for vpshufb */
    const __m512i tab = _mm512_xor_si512(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)IQ4_VALUES)), flip);
    const int shift = kind == X16_Q4_0 ? 3 : 7;
    __m512 acc[8];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm512_setzero_ps();
    uintptr_t next_pf0 = pf_run_start(w), next_pf1 = pf_run_start(w + run);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q0, *q1, *u0, *u1; /* the block's header (scales), its units */
        __m512 dw;
        if (kind == X16_IQ4_XS) { /* super-block b / 8: d, scales_h, scales_l (x8_pos), then 8 x 128 bytes */
            const int k = (int)(b % 8);
            q0 = w + 1088 * (b / 8);
            q1 = q0 + run;
            u0 = q0 + 64 + 128 * k;
            u1 = q1 + 64 + 128 * k;
            if (k == 0) {
                pf_run_upto(&next_pf0, q0 + 1088);
                pf_run_upto(&next_pf1, q1 + 1088);
            }
            const __m512i sh = _mm512_cvtepu16_epi32(_mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(q0 + 16))), _mm_loadu_si128((const __m128i *)(q1 + 16)), 1));
            const __m512i sl = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(q0 + 32 + 8 * (k / 2))),
                                                                       _mm_loadl_epi64((const __m128i *)(q1 + 32 + 8 * (k / 2)))));
            const __m512i ls = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(sl, 4 * (k % 2)), _mm512_set1_epi32(15)),
                                               _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(sh, 2 * k), _mm512_set1_epi32(3)), 4));
            const __m512 d = _mm512_cvtph_ps(_mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)q0)), _mm_loadu_si128((const __m128i *)q1), 1));
            dw = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(ls, _mm512_set1_epi32(32))));
        } else {
            const int64_t bs = kind == X16_Q8_0 ? 272 : 144;
            q0 = w + bs * b;
            q1 = q0 + run;
            u0 = q0 + 16;
            u1 = q1 + 16;
            pf_run_upto(&next_pf0, q0 + bs);
            pf_run_upto(&next_pf1, q1 + bs);
            dw = _mm512_cvtph_ps(_mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)q0)), _mm_loadu_si128((const __m128i *)q1), 1));
        }
        __m512i z[8]; /* register m: weights 4m..4m+3 of each row */
        if (kind == X16_Q8_0) {
            for (int k = 0; k < 4; k++) {
                const __m512i a = _mm512_loadu_si512(u0 + 64 * k), c = _mm512_loadu_si512(u1 + 64 * k);
                z[2 * k] = _mm512_xor_si512(_mm512_permutex2var_epi16(a, idx_e, c), flip);
                z[2 * k + 1] = _mm512_xor_si512(_mm512_permutex2var_epi16(a, idx_o, c), flip);
            }
        } else {
            /* byte i of a q4_0 or iq4_xs block holds weights i (low nibble) and 16 + i (high) */
            for (int k = 0; k < 2; k++) {
                const __m512i a = _mm512_loadu_si512(u0 + 64 * k), c = _mm512_loadu_si512(u1 + 64 * k);
                const __m512i ze = _mm512_permutex2var_epi16(a, idx_e, c), zo = _mm512_permutex2var_epi16(a, idx_o, c);
                z[2 * k] = _mm512_and_si512(ze, m4);
                z[2 * k + 1] = _mm512_and_si512(zo, m4);
                z[4 + 2 * k] = _mm512_and_si512(_mm512_srli_epi16(ze, 4), m4);
                z[5 + 2 * k] = _mm512_and_si512(_mm512_srli_epi16(zo, 4), m4);
            }
            if (kind == X16_IQ4_XS)
                for (int m = 0; m < 8; m++) z[m] = _mm512_shuffle_epi8(tab, z[m]);
        }
        for (int jj = 0; jj < J; jj++) {
            const int64_t k = (j0 + jj) * nb + b;
            const int32_t *x = (const int32_t *)(p->xq8 + (j0 + jj) * cols + 32 * b);
            __m512i se = _mm512_dpbusd_epi32(_mm512_setzero_si512(), z[0], _mm512_set1_epi32(x[0]));
            __m512i so = _mm512_dpbusd_epi32(_mm512_setzero_si512(), z[1], _mm512_set1_epi32(x[1]));
            for (int m = 2; m < 8; m += 2) {
                se = _mm512_dpbusd_epi32(se, z[m], _mm512_set1_epi32(x[m]));
                so = _mm512_dpbusd_epi32(so, z[m + 1], _mm512_set1_epi32(x[m + 1]));
            }
            const __m512i t = _mm512_sub_epi32(_mm512_add_epi32(se, so), _mm512_set1_epi32(p->xk8[k] << shift));
            acc[jj] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(dw, _mm512_set1_ps(p->xd8[k])), acc[jj]);
        }
    }
    for (int jj = 0; jj < J; jj++) _mm512_storeu_ps(out + 16 * jj, acc[jj]);
}

/* Scale byte t (q4_kx8's header) of sixteen rows: run q0's eight, then run q1's. */
INLINE __m512i kx16_byte(const uint8_t *q0, const uint8_t *q1, int t) {
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(q0 + 32 + 8 * t)),
                                                   _mm_loadl_epi64((const __m128i *)(q1 + 32 + 8 * t))));
}

/* Sub-block j's scale (min = 0) or min (min = 1) of sixteen rows, as kx8_scale unpacks eight. */
INLINE __m512 kx16_scale(const uint8_t *q0, const uint8_t *q1, int j, int min) {
    const __m512i m6 = _mm512_set1_epi32(63);
    __m512i v;
    if (j < 4) {
        v = _mm512_and_si512(kx16_byte(q0, q1, j + 4 * min), m6);
    } else {
        const __m512i lo = kx16_byte(q0, q1, j + 4);
        const __m512i hi = _mm512_slli_epi32(_mm512_srli_epi32(kx16_byte(q0, q1, j - 4 + 4 * min), 6), 4);
        v = _mm512_or_si512(min ? _mm512_srli_epi32(lo, 4) : _mm512_and_si512(lo, _mm512_set1_epi32(15)), hi);
    }
    return _mm512_cvtepi32_ps(v);
}

/* q4_kx8, two runs against J vectors of int8 activations: dot_x16_i8's arrangement over each 64-weight
 * group c of a super-block (units 16c..16c+15: register m holds weights 4m..4m+3 of sub-block 2c in its
 * low nibbles and of sub-block 2c + 1 in its high ones), each sub-block's sum scaled by d * its scale;
 * the mins are taken off with the sub-block's sum of rounded activations (xd8 * xk8), as llama.cpp
 * takes them off with q8_K's sums.  Sums stay far inside int32: 32 products of at most 15 * 127. */
INLINE __m512i fifth_bit(__m512i qh, int b) { /* bit b of each byte, moved to bit 4 */
    const __m512i v = b >= 4 ? _mm512_srli_epi16(qh, (unsigned)(b - 4)) : _mm512_slli_epi16(qh, (unsigned)(4 - b));
    return _mm512_and_si512(v, _mm512_set1_epi8(0x10));
}

INLINE void dot_kx16_i8(int five, const uint8_t *w, int64_t run, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb, rs = five ? 1408 : 1152, nib = five ? 384 : 128;
    __m512i idx_e, idx_o;
    x16_gather(&idx_e, &idx_o);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 acc[8];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm512_setzero_ps();
    uintptr_t next_pf0 = pf_run_start(w), next_pf1 = pf_run_start(w + run);
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *q0 = w + rs * sb, *q1 = w + run + rs * sb;
        pf_run_upto(&next_pf0, q0 + rs);
        pf_run_upto(&next_pf1, q1 + rs);
        const __m512 d = _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)q0)), _mm_loadu_si128((const __m128i *)q1), 1));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(q0 + 16))), _mm_loadu_si128((const __m128i *)(q1 + 16)), 1));
        for (int c = 0; c < 4; c++) {
            __m512i zl[8], zh[8];
            for (int k = 0; k < 4; k++) {
                const __m512i a = _mm512_loadu_si512(q0 + nib + 256 * c + 64 * k);
                const __m512i b = _mm512_loadu_si512(q1 + nib + 256 * c + 64 * k);
                const __m512i ze = _mm512_permutex2var_epi16(a, idx_e, b), zo = _mm512_permutex2var_epi16(a, idx_o, b);
                zl[2 * k] = _mm512_and_si512(ze, m4);
                zl[2 * k + 1] = _mm512_and_si512(zo, m4);
                zh[2 * k] = _mm512_and_si512(_mm512_srli_epi16(ze, 4), m4);
                zh[2 * k + 1] = _mm512_and_si512(_mm512_srli_epi16(zo, 4), m4);
                if (five) { /* q5_k's fifth bits: byte l of a row's qh holds those of weights 64c + l (bit 2c) and
                             * 64c + 32 + l (bit 2c + 1), its units lined up with each group's nibble units */
                    const __m512i ha = _mm512_loadu_si512(q0 + 128 + 64 * k), hb = _mm512_loadu_si512(q1 + 128 + 64 * k);
                    const __m512i he = _mm512_permutex2var_epi16(ha, idx_e, hb), ho = _mm512_permutex2var_epi16(ha, idx_o, hb);
                    zl[2 * k] = _mm512_or_si512(zl[2 * k], fifth_bit(he, 2 * c));
                    zl[2 * k + 1] = _mm512_or_si512(zl[2 * k + 1], fifth_bit(ho, 2 * c));
                    zh[2 * k] = _mm512_or_si512(zh[2 * k], fifth_bit(he, 2 * c + 1));
                    zh[2 * k + 1] = _mm512_or_si512(zh[2 * k + 1], fifth_bit(ho, 2 * c + 1));
                }
            }
            const __m512 sl = _mm512_mul_ps(d, kx16_scale(q0, q1, 2 * c, 0)), sh = _mm512_mul_ps(d, kx16_scale(q0, q1, 2 * c + 1, 0));
            const __m512 ml = _mm512_mul_ps(dmin, kx16_scale(q0, q1, 2 * c, 1)), mh = _mm512_mul_ps(dmin, kx16_scale(q0, q1, 2 * c + 1, 1));
            for (int jj = 0; jj < J; jj++) {
                const int64_t k = (j0 + jj) * nb + 8 * sb + 2 * c;
                const int32_t *x = (const int32_t *)(p->xq8 + (j0 + jj) * cols + 256 * sb + 64 * c);
                __m512i tl = _mm512_dpbusd_epi32(_mm512_setzero_si512(), zl[0], _mm512_set1_epi32(x[0]));
                __m512i th = _mm512_dpbusd_epi32(_mm512_setzero_si512(), zh[0], _mm512_set1_epi32(x[8]));
                for (int m = 1; m < 8; m++) {
                    tl = _mm512_dpbusd_epi32(tl, zl[m], _mm512_set1_epi32(x[m]));
                    th = _mm512_dpbusd_epi32(th, zh[m], _mm512_set1_epi32(x[8 + m]));
                }
                __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tl), _mm512_mul_ps(sl, _mm512_set1_ps(p->xd8[k])), acc[jj]);
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(th), _mm512_mul_ps(sh, _mm512_set1_ps(p->xd8[k + 1])), a);
                a = _mm512_fnmadd_ps(ml, _mm512_set1_ps(p->xd8[k] * (float)p->xk8[k]), a);
                acc[jj] = _mm512_fnmadd_ps(mh, _mm512_set1_ps(p->xd8[k + 1] * (float)p->xk8[k + 1]), a);
            }
        }
    }
    for (int jj = 0; jj < J; jj++) _mm512_storeu_ps(out + 16 * jj, acc[jj]);
}

#define MK_X16(J) \
    static void dot_x16q4_##J(const uint8_t *w, int64_t run, const xprep *p, int64_t j0, float *out) { dot_x16_i8(X16_Q4_0, w, run, J, p, j0, out); } \
    static void dot_x16q8_##J(const uint8_t *w, int64_t run, const xprep *p, int64_t j0, float *out) { dot_x16_i8(X16_Q8_0, w, run, J, p, j0, out); } \
    static void dot_x16k4_##J(const uint8_t *w, int64_t run, const xprep *p, int64_t j0, float *out) { dot_kx16_i8(0, w, run, J, p, j0, out); } \
    static void dot_x16k5_##J(const uint8_t *w, int64_t run, const xprep *p, int64_t j0, float *out) { dot_kx16_i8(1, w, run, J, p, j0, out); } \
    static void dot_x16i4_##J(const uint8_t *w, int64_t run, const xprep *p, int64_t j0, float *out) { dot_x16_i8(X16_IQ4_XS, w, run, J, p, j0, out); }
MK_X16(1)
MK_X16(2)
MK_X16(3)
MK_X16(4)
MK_X16(5)
MK_X16(6)
MK_X16(7)
MK_X16(8)
#undef MK_X16

/* q6_k in int8: sixteen rows' codes (q, 0..63) laid out once per product in dot_x16's lane order
 * (q6_pack), then each 32-weight block's two 16-weight sub-blocks summed apart (registers 0-3 and 4-7),
 * the -32 taken off with the sub-block's sum of activation codes (xk16), and scaled by d * its int8 scale. */
INLINE void dot_q6x16_i8(const uint8_t *pk, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb;
    __m512 acc[8];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = pk + Q6P_BLOCK(16) * b;
        __m512i z[8];
        for (int m = 0; m < 8; m++) z[m] = _mm512_loadu_si512(blk + 64 * m);
        const __m512 sa = _mm512_loadu_ps((const float *)(blk + 512)), sb = _mm512_loadu_ps((const float *)(blk + 576));
        for (int jj = 0; jj < J; jj++) {
            const int64_t k = (j0 + jj) * nb + b;
            const int32_t *x = (const int32_t *)(p->xq8 + (j0 + jj) * cols + 32 * b);
            __m512i ta = _mm512_dpbusd_epi32(_mm512_setzero_si512(), z[0], _mm512_set1_epi32(x[0]));
            __m512i tb = _mm512_dpbusd_epi32(_mm512_setzero_si512(), z[4], _mm512_set1_epi32(x[4]));
            for (int m = 1; m < 4; m++) {
                ta = _mm512_dpbusd_epi32(ta, z[m], _mm512_set1_epi32(x[m]));
                tb = _mm512_dpbusd_epi32(tb, z[4 + m], _mm512_set1_epi32(x[4 + m]));
            }
            ta = _mm512_sub_epi32(ta, _mm512_set1_epi32(p->xk16[2 * k] << 5));
            tb = _mm512_sub_epi32(tb, _mm512_set1_epi32(p->xk16[2 * k + 1] << 5));
            const __m512 dx = _mm512_set1_ps(p->xd8[k]);
            __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ta), _mm512_mul_ps(sa, dx), acc[jj]);
            acc[jj] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tb), _mm512_mul_ps(sb, dx), a);
        }
    }
    for (int jj = 0; jj < J; jj++) _mm512_storeu_ps(out + 16 * jj, acc[jj]);
}

#define MK_Q6X16(J) \
    static void dot_q6x16_##J(const uint8_t *pk, const xprep *p, int64_t j0, float *out) { dot_q6x16_i8(pk, J, p, j0, out); }
MK_Q6X16(1)
MK_Q6X16(2)
MK_Q6X16(3)
MK_Q6X16(4)
MK_Q6X16(5)
MK_Q6X16(6)
MK_Q6X16(7)
MK_Q6X16(8)
#undef MK_Q6X16

/* Rows [r0, r1) of a matrix in an i8_runs format against p's int8 vectors, sixteen rows and up
 * to eight vectors a call; a last run of eight is computed as both halves (so that every row of a
 * matrix sees the same activations' rounding). */
static void rows_x16(int fmt, const uint8_t *w, int64_t rb, int64_t r0, int64_t r1, const xprep *p, float *Y,
                     int64_t ldy) {
    typedef void (*x16dot)(const uint8_t *, int64_t, const xprep *, int64_t, float *);
    static const x16dot fns[5][8] = {
        {dot_x16q4_1, dot_x16q4_2, dot_x16q4_3, dot_x16q4_4, dot_x16q4_5, dot_x16q4_6, dot_x16q4_7, dot_x16q4_8},
        {dot_x16q8_1, dot_x16q8_2, dot_x16q8_3, dot_x16q8_4, dot_x16q8_5, dot_x16q8_6, dot_x16q8_7, dot_x16q8_8},
        {dot_x16k4_1, dot_x16k4_2, dot_x16k4_3, dot_x16k4_4, dot_x16k4_5, dot_x16k4_6, dot_x16k4_7, dot_x16k4_8},
        {dot_x16i4_1, dot_x16i4_2, dot_x16i4_3, dot_x16i4_4, dot_x16i4_5, dot_x16i4_6, dot_x16i4_7, dot_x16i4_8},
        {dot_x16k5_1, dot_x16k5_2, dot_x16k5_3, dot_x16k5_4, dot_x16k5_5, dot_x16k5_6, dot_x16k5_7, dot_x16k5_8}};
    const x16dot *f = fns[fmt == Q8_0X8 ? 1 : fmt == Q4_KX8 ? 2 : fmt == IQ4_XSX8 ? 3 : fmt == Q5_KX8 ? 4 : 0];
    float o[128];
    for (int64_t r = r0; r < r1; r += 16) {
        const int whole = r + 16 <= r1; /* else rows r..r+7, the last run */
        for (int64_t j = 0; j < p->n; j += 8) {
            const int64_t J = p->n - j < 8 ? p->n - j : 8;
            f[J - 1](w + r * rb, whole ? 8 * rb : 0, p, j, o);
            for (int64_t jj = 0; jj < J; jj++) memcpy(Y + (j + jj) * ldy + r, o + 16 * jj, whole ? 64 : 32);
        }
    }
}

/* q4_kx8 (five = 0) and q5_kx8 in 512-bit registers: dot_q45_kx8 with two units a register, as
 * dot_x8_32_512 does it; a 64-weight run's activations are two registers per vector (its low and its
 * high nibbles' 32), from which one vpermd each puts a unit pair's activation pairs in place. */
INLINE void dot_q45_kx8_512(int five, const uint8_t *w, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb, run = five ? 1408 : 1152, nib = five ? 16 : 0;
    const __m512i m4 = _mm512_set1_epi16(0x0F);
    __m256 acc[4];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm256_setzero_ps();
    uintptr_t next_pf = pf_run_start(w);
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *q = w + run * sb;
        pf_run_upto(&next_pf, q + run);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + 16)));
        for (int j = 0; j < 8; j++) { /* the mins, as dot_q45_kx8 */
            const __m256 mn = _mm256_mul_ps(dmin, kx8_scale(q, j, 1));
            for (int jj = 0; jj < J; jj++)
                acc[jj] = _mm256_fnmadd_ps(mn, _mm256_set1_ps(p->xs[(j0 + jj) * nb + 8 * sb + j]), acc[jj]);
        }
        for (int c = 0; c < 4; c++) {
            __m512i xl[4], xh[4], sl[4], sh[4];
            for (int jj = 0; jj < J; jj++) {
                const int16_t *x = p->xq + (j0 + jj) * cols + 256 * sb + 64 * c;
                xl[jj] = _mm512_load_si512((const __m512i *)x);
                xh[jj] = _mm512_load_si512((const __m512i *)(x + 32));
                sl[jj] = sh[jj] = _mm512_setzero_si512();
            }
            for (int k = 0; k < 16; k += 2) {
                const __m512i v = ld32w(q + 128 + 16 * (nib + 16 * c + k));
                __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_srli_epi16(v, 4);
                if (five) {
                    const __m512i H = ld32w(q + 128 + 16 * k);
                    lo = _mm512_or_si512(lo, bit_to512(H, 2 * c, 4));
                    hi = _mm512_or_si512(hi, bit_to512(H, 2 * c + 1, 4));
                }
                const __m512i idx = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(k), _mm512_set1_epi32(k + 1));
                for (int jj = 0; jj < J; jj++) {
                    sl[jj] = _mm512_dpwssd_epi32(sl[jj], lo, _mm512_permutexvar_epi32(idx, xl[jj]));
                    sh[jj] = _mm512_dpwssd_epi32(sh[jj], hi, _mm512_permutexvar_epi32(idx, xh[jj]));
                }
            }
            const __m256 s0 = _mm256_mul_ps(d, kx8_scale(q, 2 * c, 0)), s1 = _mm256_mul_ps(d, kx8_scale(q, 2 * c + 1, 0));
            for (int jj = 0; jj < J; jj++) {
                const int64_t k = (j0 + jj) * nb + 8 * sb + 2 * c;
                const __m256i tl = _mm256_add_epi32(_mm512_castsi512_si256(sl[jj]), _mm512_extracti64x4_epi64(sl[jj], 1));
                const __m256i th = _mm256_add_epi32(_mm512_castsi512_si256(sh[jj]), _mm512_extracti64x4_epi64(sh[jj], 1));
                acc[jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tl), _mm256_mul_ps(s0, _mm256_set1_ps(p->xd[k])), acc[jj]);
                acc[jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(th), _mm256_mul_ps(s1, _mm256_set1_ps(p->xd[k + 1])), acc[jj]);
            }
        }
    }
    for (int jj = 0; jj < J; jj++) _mm256_storeu_ps(out + 8 * jj, acc[jj]);
}

/* iq4_xsx8 in 512-bit registers: dot_iq4_xsx8 with two units a register, as dot_x8_32_512 (the
 * lookup on both units' 32 bytes at once, IQ4_VALUES in both 128-bit lanes of the table). */
INLINE void dot_iq4_xsx8_512(const uint8_t *w, int J, const xprep *p, int64_t j0, float *out) {
    const int64_t cols = p->cols, nb = p->nb;
    const __m256i tab = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_VALUES));
    const __m256i m15 = _mm256_set1_epi8(0x0F);
    __m256 acc[4];
    for (int jj = 0; jj < J; jj++) acc[jj] = _mm256_setzero_ps();
    uintptr_t next_pf = pf_run_start(w);
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *q = w + 1088 * sb;
        pf_run_upto(&next_pf, q + 1088);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q));
        const __m256i sh = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
        for (int k = 0; k < 8; k++) {
            const __m256i sl = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 32 + 8 * (k / 2))));
            const __m256i ls = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(sl, 4 * (k % 2)), _mm256_set1_epi32(15)),
                                               _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(sh, 2 * k), _mm256_set1_epi32(3)), 4));
            const __m256 sc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(ls, _mm256_set1_epi32(32))));
            __m512i xv[4], s[4];
            for (int jj = 0; jj < J; jj++) {
                xv[jj] = _mm512_load_si512((const __m512i *)(p->xq + (j0 + jj) * cols + 256 * sb + 32 * k));
                s[jj] = _mm512_setzero_si512();
            }
            for (int t = 0; t < 8; t += 2) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 64 + 16 * (8 * k + t)));
                const __m512i wl = _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(tab, _mm256_and_si256(v, m15)));
                const __m512i wh = _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(v, 4), m15)));
                /* lanes 0-7: activation pair t (the high nibbles: 8 + t), lanes 8-15: the next */
                const __m512i ilo = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(t), _mm512_set1_epi32(t + 1));
                const __m512i ihi = _mm512_add_epi32(ilo, _mm512_set1_epi32(8));
                for (int jj = 0; jj < J; jj++) {
                    s[jj] = _mm512_dpwssd_epi32(s[jj], wl, _mm512_permutexvar_epi32(ilo, xv[jj]));
                    s[jj] = _mm512_dpwssd_epi32(s[jj], wh, _mm512_permutexvar_epi32(ihi, xv[jj]));
                }
            }
            for (int jj = 0; jj < J; jj++) {
                const __m256i t = _mm256_add_epi32(_mm512_castsi512_si256(s[jj]), _mm512_extracti64x4_epi64(s[jj], 1));
                acc[jj] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(sc, _mm256_set1_ps(p->xd[(j0 + jj) * nb + 8 * sb + k])),
                                          acc[jj]);
            }
        }
    }
    for (int jj = 0; jj < J; jj++) _mm256_storeu_ps(out + 8 * jj, acc[jj]);
}

#define MK_X8_512(J) \
    static void dot_x8z_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_x8_32_512(0, w, J, p, j0, out); } \
    static void dot_8x8z_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_x8_32_512(1, w, J, p, j0, out); } \
    static void dot_kx8z_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_q45_kx8_512(0, w, J, p, j0, out); } \
    static void dot_5x8z_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_q45_kx8_512(1, w, J, p, j0, out); } \
    static void dot_ix8z_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_iq4_xsx8_512(w, J, p, j0, out); }
MK_X8_512(1) /* one vector, decode: several go to dot_x16 (i8_runs) */
#undef MK_X8_512

/* Rows [r0, r1) against all of p's vectors, eight at a time: a group's activations (8 x cols int16)
 * stay in L1 while the rows stream past. */
static void rows_ksb(int fmt, const uint8_t *w, int64_t rb, int64_t r0, int64_t r1, const xprep *p, float *Y,
                     int64_t ldy) {
    typedef void (*ksbdot)(const uint8_t *, const xprep *, int64_t, float *);
    static const ksbdot fns[6][8] = {{ksb4_1, ksb4_2, ksb4_3, ksb4_4, ksb4_5, ksb4_6, ksb4_7, ksb4_8},
                                     {ksb5_1, ksb5_2, ksb5_3, ksb5_4, ksb5_5, ksb5_6, ksb5_7, ksb5_8},
                                     {ksb6_1, ksb6_2, ksb6_3, ksb6_4, ksb6_5, ksb6_6, ksb6_7, ksb6_8},
                                     {ksbi_1, ksbi_2, ksbi_3, ksbi_4, ksbi_5, ksbi_6, ksbi_7, ksbi_8},
                                     {ksb3_1, ksb3_2, ksb3_3, ksb3_4, ksb3_5, ksb3_6, ksb3_7, ksb3_8},
                                     {ksb2_1, ksb2_2, ksb2_3, ksb2_4, ksb2_5, ksb2_6, ksb2_7, ksb2_8}};
    const ksbdot *f = fns[fmt == Q4_K ? 0 : fmt == Q5_K ? 1 : fmt == Q6_K ? 2 : fmt == IQ4_XS ? 3 : fmt == Q3_K ? 4 : 5];
    float o[8];
    for (int64_t j = 0; j < p->n; j += 8) {
        const int64_t J = p->n - j < 8 ? p->n - j : 8;
        for (int64_t r = r0; r < r1; r++) {
            f[J - 1](w + r * rb, p, j, o);
            for (int64_t jj = 0; jj < J; jj++) Y[(j + jj) * ldy + r] = o[jj];
        }
    }
}
#endif /* MK_AVX512 */

/* (unused in the avx512 variant, which has its own) */
#define MK_X8(J) \
    static __attribute__((unused)) void dot_x8_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_x8_32(0, w, J, p, j0, out); } \
    static __attribute__((unused)) void dot_kx8_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_q45_kx8(0, w, J, p, j0, out); } \
    static __attribute__((unused)) void dot_5x8_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_q45_kx8(1, w, J, p, j0, out); } \
    static __attribute__((unused)) void dot_8x8_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_x8_32(1, w, J, p, j0, out); } \
    static __attribute__((unused)) void dot_ix8_##J(const uint8_t *w, const xprep *p, int64_t j0, float *out) { dot_iq4_xsx8(w, J, p, j0, out); }
MK_X8(1)
MK_X8(2)
MK_X8(3)
MK_X8(4)
#undef MK_X8

INLINE void dot_simd(int fmt, const uint8_t *w, int64_t rb, int R, int J, const xprep *p, int64_t j0,
                     float *out) {
    switch (fmt) {
    case F16: dot_half(0, w, rb, R, J, p, j0, out); break;
    case BF16: dot_half(1, w, rb, R, J, p, j0, out); break;
    case Q8_0: dot_q8_0(w, rb, R, J, p, j0, out); break;
    case Q4_0: dot_q4_0(w, rb, R, J, p, j0, out); break;
    case Q4_K: dot_q45_k(0, w, rb, R, J, p, j0, out); break;
    case Q5_K: dot_q45_k(1, w, rb, R, J, p, j0, out); break;
    case Q6_K: dot_q6_k(w, rb, R, J, p, j0, out); break;
    case Q3_K: dot_q23_k(1, w, rb, R, J, p, j0, out); break;
    case Q2_K: dot_q23_k(0, w, rb, R, J, p, j0, out); break;
    case IQ4_NL: dot_iq4(0, w, rb, R, J, p, j0, out); break;
    case IQ4_XS: dot_iq4(1, w, rb, R, J, p, j0, out); break;
    case Q4_1: case Q5_0: case Q5_1: dot_b32(fmt, w, rb, R, J, p, j0, out); break;
    }
}

/* Out-of-line instantiations with constant R and J, so each is fully unrolled. */
#define MK_INST(R, J)                                                                         \
    static void dot_##R##_##J(int fmt, const uint8_t *w, int64_t rb, const xprep *p, int64_t j0, \
                              float *out) {                                                   \
        dot_simd(fmt, w, rb, R, J, p, j0, out);                                               \
    }
MK_INST(4, 1)
MK_INST(2, 2)
MK_INST(1, 1)
MK_INST(1, 2)
MK_INST(1, 3)
MK_INST(1, 4)
#undef MK_INST
#endif /* MK_SIMD */

/* Portable dots on the float activations: 8 independent partial sums so that gcc can
 * vectorize without reassociating (we never pass -ffast-math). */
static float dot_generic(int fmt, const uint8_t *w, const float *x, int64_t cols) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float tail = 0.0f;
    float buf[256];
    switch (fmt) {
    case F32: case F16: case BF16: {
        const int64_t step = 256;
        for (int64_t i = 0; i < cols; i += step) {
            const int64_t m = cols - i < step ? cols - i : step;
            deq_row(fmt, w + (fmt == F32 ? 4 : 2) * i, m, buf);
            int64_t k = 0;
            for (; k + 8 <= m; k += 8)
                for (int l = 0; l < 8; l++) lane[l] += buf[k + l] * x[i + k + l];
            for (; k < m; k++) tail += buf[k] * x[i + k];
        }
        break;
    }
    case Q8_0: case Q4_0: case IQ4_NL: case Q4_1: case Q5_0: case Q5_1: {
        const int64_t bs = fmt_row_bytes(fmt, 32);
        for (int64_t b = 0; b < cols / 32; b++) {
            float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            deq_row(fmt, w + bs * b, 32, buf);
            for (int k = 0; k < 32; k += 8)
                for (int l = 0; l < 8; l++) part[l] += buf[k + l] * x[32 * b + k + l];
            for (int l = 0; l < 8; l++) lane[l] += part[l];
        }
        break;
    }
    case Q4_K: case Q6_K: case Q5_K: case Q3_K: case Q2_K: case IQ4_XS: {
        const int64_t bs = fmt_row_bytes(fmt, 256);
        for (int64_t s = 0; s < cols / 256; s++) {
            deq_row(fmt, w + bs * s, 256, buf);
            for (int k = 0; k < 256; k += 8)
                for (int l = 0; l < 8; l++) lane[l] += buf[k + l] * x[256 * s + k + l];
        }
        break;
    }
    }
    float s = tail;
    for (int l = 0; l < 8; l++) s += lane[l];
    return s;
}

/* Portable x8 dot: row rr of the run at grp, block by block through its GGUF format's block. */
static float dot_generic_x8(int fmt, const uint8_t *grp, int rr, const float *x, int64_t cols) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float buf[256];
    uint8_t blk[X8_MAX_BLOCK];
    const int per = x8_block_weights(fmt);
    for (int64_t b = 0; b < cols / per; b++) {
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        x8_block(fmt, grp, rr, b, blk);
        deq_row(x8_base(fmt), blk, per, buf);
        for (int k = 0; k < per; k += 8)
            for (int l = 0; l < 8; l++) part[l] += buf[k + l] * x[per * b + k + l];
        for (int l = 0; l < 8; l++) lane[l] += part[l];
    }
    float s = 0.0f;
    for (int l = 0; l < 8; l++) s += lane[l];
    return s;
}

/* Rows [r0, r1) of W against every prepared vector: Y[j * ldy + r].  (x8 layouts: r0 and r1 are
 * multiples of 8.) */
/* The x8 layouts' kernels: in 512-bit registers where the variant has them, for one vector (products of
 * several are dot_x16's there and never reach these; the AVX2 kernels stand in the table for them) */
#if MK_AVX512
#define X8_PICK(J, one, several) X8_PICK_##J(one, several)
#define X8_PICK_1(one, several) one
#define X8_PICK_2(one, several) several
#define X8_PICK_3(one, several) several
#define X8_PICK_4(one, several) several
#define X8_Q4_0(J) X8_PICK(J, dot_x8z_1, dot_x8_##J)
#define X8_Q8_0(J) X8_PICK(J, dot_8x8z_1, dot_8x8_##J)
#define X8_Q4_K(J) X8_PICK(J, dot_kx8z_1, dot_kx8_##J)
#define X8_Q5_K(J) X8_PICK(J, dot_5x8z_1, dot_5x8_##J)
#define X8_IQ4_XS(J) X8_PICK(J, dot_ix8z_1, dot_ix8_##J)
#else
#define X8_Q4_0(J) dot_x8_##J
#define X8_Q8_0(J) dot_8x8_##J
#define X8_Q4_K(J) dot_kx8_##J
#define X8_Q5_K(J) dot_5x8_##J
#define X8_IQ4_XS(J) dot_ix8_##J
#endif

/* Rows a thread claims together: whole groups of the kernels that will run (sixteen rows for dot_x16, runs
 * of eight for the other x8 and int8 kernels, a GGUF format's rows packed into them included; four rows
 * otherwise). */
INLINE int64_t row_align(int fmt, int64_t n) { return i8_runs(fmt, n) ? (MK_AVX512 ? 16 : 8) : is_x8(fmt) ? 8 : 4; }

#if MK_I8
#if MK_AVX512
/* The word indices (vpermt2w over two registers of 64 words) that transpose 8 x 8 16-bit words: eight
 * rows' 16 bytes (row r: word k is its pair k) into eight x8 units (unit k: word r is row r's pair k).
 * Output word o of the first half (*lo) is input word 8 (o % 8) + o / 8, of the second (*hi)
 * 8 (o % 8) + 4 + o / 8. */
INLINE void x8_transpose(__m512i *lo, __m512i *hi) {
    int16_t ta[32], tb[32];
    for (int o = 0; o < 32; o++) {
        ta[o] = (int16_t)(8 * (o % 8) + o / 8);
        tb[o] = (int16_t)(8 * (o % 8) + 4 + o / 8);
    }
    *lo = _mm512_loadu_si512(ta);
    *hi = _mm512_loadu_si512(tb);
}
#else
/* Eight rows' 16 bytes at b[r] + o (row r: word k is its pair k) as eight x8 units at dst (unit k: word r
 * is row r's pair k): an 8 x 8 transpose of 16-bit words in three rounds of unpacks. */
INLINE void x8_transpose_sse(const uint8_t *const b[8], int o, uint8_t *dst) {
    __m128i a[8], t[8], u[8];
    for (int r = 0; r < 8; r++) a[r] = _mm_loadu_si128((const __m128i *)(b[r] + o));
    for (int i = 0; i < 4; i++) { /* rows 2i, 2i + 1: words 0-3 (t[2i]) and 4-7 (t[2i + 1]) paired */
        t[2 * i] = _mm_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
        t[2 * i + 1] = _mm_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++) /* rows 4h..4h+3: u[4h + i] holds their words 2i and 2i + 1 */
        for (int i = 0; i < 2; i++) {
            u[4 * h + 2 * i] = _mm_unpacklo_epi32(t[4 * h + i], t[4 * h + 2 + i]);
            u[4 * h + 2 * i + 1] = _mm_unpackhi_epi32(t[4 * h + i], t[4 * h + 2 + i]);
        }
    for (int i = 0; i < 4; i++) {
        _mm_storeu_si128((__m128i *)(dst + 32 * i), _mm_unpacklo_epi64(u[i], u[4 + i]));
        _mm_storeu_si128((__m128i *)(dst + 32 * i + 16), _mm_unpackhi_epi64(u[i], u[4 + i]));
    }
}
#endif

/* Rows of a GGUF format (row stride rb; `rows` <= 8 of them, the rest of the run
 * zeros: products of zero weights) as one run of its x8 layout `fmt`, nblk blocks a row, at out.  The
 * payload's 16-byte pieces of the eight rows are transposed word by word (two vpermt2w on the avx512
 * variant, unpacks on the avxvnni one); the header (2, 8 or 16 bytes a row) byte by byte. */
static void x8_pack(int fmt, const uint8_t *w, int64_t rb, int rows, int64_t nblk, uint8_t *out) {
    static const uint8_t zeros[X8_MAX_BLOCK];
    const int bs = x8_block_bytes(fmt), hdr = fmt == Q4_0X8 || fmt == Q8_0X8 ? 2 : fmt == IQ4_XSX8 ? 8 : 16;
#if MK_AVX512
    __m512i ia, ib;
    x8_transpose(&ia, &ib);
#endif
    const uint8_t *src[8]; /* each row's block k at src[rr] + step[rr] * k */
    int64_t step[8];
    for (int rr = 0; rr < 8; rr++) {
        src[rr] = rr < rows ? w + rr * rb : zeros;
        step[rr] = rr < rows ? bs : 0;
    }
    for (int64_t k = 0; k < nblk; k++) {
        uint8_t *q = out + 8 * bs * k;
        const uint8_t *b[8];
        for (int rr = 0; rr < 8; rr++) {
            b[rr] = src[rr] + step[rr] * k;
            for (int i = 0; i < hdr; i++) q[x8_pos(fmt, rr, i)] = b[rr][i];
        }
        for (int g = 0; g < (bs - hdr) / 16; g++) {
            const int o = hdr + 16 * g;
#if MK_AVX512
#define LD(r) _mm_loadu_si128((const __m128i *)(b[r] + o))
            __m512i a = _mm512_inserti32x4(_mm512_castsi128_si512(LD(0)), LD(1), 1);
            __m512i c = _mm512_inserti32x4(_mm512_castsi128_si512(LD(4)), LD(5), 1);
            a = _mm512_inserti32x4(_mm512_inserti32x4(a, LD(2), 2), LD(3), 3);
            c = _mm512_inserti32x4(_mm512_inserti32x4(c, LD(6), 2), LD(7), 3);
#undef LD
            _mm512_storeu_si512(q + 8 * hdr + 128 * g, _mm512_permutex2var_epi16(a, ia, c));
            _mm512_storeu_si512(q + 8 * hdr + 128 * g + 64, _mm512_permutex2var_epi16(a, ib, c));
#else
            x8_transpose_sse(b, o, q + 8 * hdr + 128 * g);
#endif
        }
    }
}

/* The int8 kernels over rows of an x8 layout: sixteen rows a call on the avx512 variant, eight on avxvnni. */
#if MK_AVX512
#define rows_i8 rows_x16
#else
#define rows_i8 rows_x8_i8
#endif

/* Rows [r0, r1) of a q6_k matrix against p's int8 vectors: a run of rows packed at a time (q6_pack: sixteen
 * rows and up to eight vectors a call on the avx512 variant, eight and four on avxvnni).  -2 where the
 * packed copy cannot be allocated. */
static int rows_q6(const uint8_t *w, int64_t rb, int64_t r0, int64_t r1, const xprep *p, float *Y, int64_t ldy) {
    typedef void (*q6dot)(const uint8_t *, const xprep *, int64_t, float *);
#if MK_AVX512
    enum { RUN = 16, JMAX = 8 };
    static const q6dot fns[JMAX] = {dot_q6x16_1, dot_q6x16_2, dot_q6x16_3, dot_q6x16_4,
                                    dot_q6x16_5, dot_q6x16_6, dot_q6x16_7, dot_q6x16_8};
#else
    enum { RUN = 8, JMAX = 4 };
    static const q6dot fns[JMAX] = {dot_q6x8_1, dot_q6x8_2, dot_q6x8_3, dot_q6x8_4};
#endif
    uint8_t *pk = aligned_alloc(64, (size_t)(p->nb * Q6P_BLOCK(RUN)));
    if (!pk) return -2;
    float o[RUN * JMAX];
    for (int64_t r = r0; r < r1; r += RUN) {
        const int rows = (int)(r1 - r < RUN ? r1 - r : RUN);
        q6_pack(w + r * rb, rb, rows, RUN, p->nb, pk);
        for (int64_t j = 0; j < p->n; j += JMAX) {
            const int64_t J = p->n - j < JMAX ? p->n - j : JMAX;
            fns[J - 1](pk, p, j, o);
            for (int64_t jj = 0; jj < J; jj++) memcpy(Y + (j + jj) * ldy + r, o + RUN * jj, (size_t)rows * sizeof(float));
        }
    }
    free(pk);
    return 0;
}

/* Rows [r0, r1) of a matrix in a GGUF format with an x8 layout, against p's int8 vectors: the rows
 * interleaved first (x8_pack; a last run of fewer than eight padded with zero rows, its outputs through
 * a scratch matrix).  -2 where the copies cannot be allocated. */
static int rows_packed(int fmt, const uint8_t *w, int64_t rb, int64_t r0, int64_t r1, const xprep *p, float *Y,
                       int64_t ldy) {
    const int x8 = x8_of(fmt), padded = (r1 - r0) % 8 != 0;
    const int64_t xrb = fmt_row_bytes(fmt, p->cols), runs = (r1 - r0 + 7) / 8;
    uint8_t *packed = malloc((size_t)(runs * 8 * xrb));
    float *Yp = packed && padded ? malloc((size_t)(p->n * runs * 8) * sizeof(float)) : NULL;
    if (!packed || (padded && !Yp)) {
        free(packed);
        return -2;
    }
    for (int64_t k = 0; k < runs; k++) {
        const int64_t r = r0 + 8 * k;
        x8_pack(x8, w + r * rb, rb, (int)(r1 - r < 8 ? r1 - r : 8), xrb / x8_block_bytes(x8), packed + 8 * k * xrb);
    }
    if (padded) {
        rows_i8(x8, packed, xrb, 0, runs * 8, p, Yp, runs * 8);
        for (int64_t j = 0; j < p->n; j++) memcpy(Y + j * ldy + r0, Yp + j * runs * 8, (size_t)(r1 - r0) * sizeof(float));
    } else {
        rows_i8(x8, packed, xrb, 0, r1 - r0, p, Y + r0, ldy);
    }
    free(Yp);
    free(packed);
    return 0;
}
#endif

static void rows_dot(int fmt, const uint8_t *w, int64_t rb, int64_t r0, int64_t r1, const xprep *p,
                     float *Y, int64_t ldy) {
#if MK_AVX512
    if (p->xq256) { /* prepared for dot_ksb: ksb_runs */
        rows_ksb(fmt, w, rb, r0, r1, p, Y, ldy);
        return;
    }
#endif
#if MK_I8
    if (p->xq8 && i8_runs(fmt, p->n)) { /* prepared for the int8 kernels */
        if (is_x8(fmt)) {
            rows_i8(fmt, w, rb, r0, r1, p, Y, ldy);
            return;
        }
        /* a GGUF format: its rows put in the int8 kernels' order first (q6_k, with no x8 layout, its own
         * way); without memory for that copy, the int16 kernels below (xq is always prepared) */
        if ((fmt == Q6_K ? rows_q6(w, rb, r0, r1, p, Y, ldy) : rows_packed(fmt, w, rb, r0, r1, p, Y, ldy)) == 0)
            return;
    }
#endif
    if (is_x8(fmt)) {
#if MK_SIMD
        if (p->xq) {
            float o[32];
            for (int64_t r = r0; r < r1; r += 8)
                for (int64_t j = 0; j < p->n; j += 4) {
                    const int64_t J = p->n - j < 4 ? p->n - j : 4;
                    typedef void (*x8dot)(const uint8_t *, const xprep *, int64_t, float *);
                    static const x8dot fns[5][4] = {{X8_Q4_0(1), X8_Q4_0(2), X8_Q4_0(3), X8_Q4_0(4)},
                                                    {X8_Q4_K(1), X8_Q4_K(2), X8_Q4_K(3), X8_Q4_K(4)},
                                                    {X8_Q8_0(1), X8_Q8_0(2), X8_Q8_0(3), X8_Q8_0(4)},
                                                    {X8_IQ4_XS(1), X8_IQ4_XS(2), X8_IQ4_XS(3), X8_IQ4_XS(4)},
                                                    {X8_Q5_K(1), X8_Q5_K(2), X8_Q5_K(3), X8_Q5_K(4)}};
                    fns[fmt == Q4_0X8 ? 0 : fmt == Q4_KX8 ? 1 : fmt == Q8_0X8 ? 2 : fmt == IQ4_XSX8 ? 3 : 4][J - 1](
                        w + r * rb, p, j, o);
                    for (int64_t jj = 0; jj < J; jj++) memcpy(Y + (j + jj) * ldy + r, o + 8 * jj, 32);
                }
            return;
        }
#endif
        for (int64_t r = r0; r < r1; r++)
            for (int64_t j = 0; j < p->n; j++)
                Y[j * ldy + r] = dot_generic_x8(fmt, w + (r - r % 8) * rb, (int)(r % 8), p->xf + j * p->cols, p->cols);
        return;
    }
#if MK_SIMD
    if (fmt != F32 && (p->xq || fmt == F16 || fmt == BF16)) {
        float o[4];
        if (p->n == 1) { /* decode: four rows share each load of the vector, except short ones */
            const int seq = fmt == Q8_0 && rb <= SEQ_ROW_BYTES;
            int64_t r = r0;
            for (; !seq && r + 4 <= r1; r += 4) {
                dot_4_1(fmt, w + r * rb, rb, p, 0, o);
                for (int k = 0; k < 4; k++) Y[r + k] = o[k];
            }
            for (; r < r1; r++) {
                dot_1_1(fmt, w + r * rb, rb, p, 0, o);
                Y[r] = o[0];
            }
            return;
        }
        /* Several vectors: each row is decoded once per group of up to four vectors, with
         * four accumulators in flight (FMA latency would bound fewer). */
        int64_t r = r0;
        for (; r + 4 <= r1; r += 4) {
            for (int64_t j = 0; j < p->n; j += 4) {
                const int64_t J = p->n - j < 4 ? p->n - j : 4;
                for (int k = 0; k < 4; k += (J == 2 ? 2 : 1)) {
                    if (J == 1) {
                        dot_4_1(fmt, w + r * rb, rb, p, j, o);
                        for (int i = 0; i < 4; i++) Y[j * ldy + r + i] = o[i];
                        break;
                    }
                    if (J == 2) {
                        dot_2_2(fmt, w + (r + k) * rb, rb, p, j, o);
                        for (int i = 0; i < 2; i++)
                            for (int jj = 0; jj < 2; jj++) Y[(j + jj) * ldy + r + k + i] = o[2 * i + jj];
                        continue;
                    }
                    if (J == 3) dot_1_3(fmt, w + (r + k) * rb, rb, p, j, o);
                    else dot_1_4(fmt, w + (r + k) * rb, rb, p, j, o);
                    for (int64_t jj = 0; jj < J; jj++) Y[(j + jj) * ldy + r + k] = o[jj];
                }
            }
        }
        for (; r < r1; r++) {
            for (int64_t j = 0; j < p->n; j += 4) {
                const int64_t J = p->n - j < 4 ? p->n - j : 4;
                switch (J) {
                case 1: dot_1_1(fmt, w + r * rb, rb, p, j, o); break;
                case 2: dot_1_2(fmt, w + r * rb, rb, p, j, o); break;
                case 3: dot_1_3(fmt, w + r * rb, rb, p, j, o); break;
                default: dot_1_4(fmt, w + r * rb, rb, p, j, o); break;
                }
                for (int64_t k = 0; k < J; k++) Y[(j + k) * ldy + r] = o[k];
            }
        }
        return;
    }
#endif
    for (int64_t r = r0; r < r1; r++)
        for (int64_t j = 0; j < p->n; j++)
            Y[j * ldy + r] = dot_generic(fmt, w + r * rb, p->xf + j * p->cols, p->cols);
}

typedef struct {
    int fmt;
    const uint8_t *w;
    int64_t rb, rows, ch;
    const xprep *p;
    float *Y;
    int64_t ldy;
} mm_ctx;

static void mm_chunk(void *vctx, int64_t c) {
    const mm_ctx *x = vctx;
    const int64_t r1 = (c + 1) * x->ch < x->rows ? (c + 1) * x->ch : x->rows;
    rows_dot(x->fmt, x->w, x->rb, c * x->ch, r1, x->p, x->Y, x->ldy);
}

MK_API int mk_matmul(int fmt, const uint8_t *w, int64_t rb, int64_t rows, int64_t cols, const float *X,
                     int64_t n, float *Y, int nthreads) {
    if (fmt_row_bytes(fmt, cols) < 0 || x8_misfit(fmt, rb, rows, cols)) return -1;
    xprep p;
    if (xprep_init(&p, X, n, cols, xprep_needs(fmt, n))) return -2;
    xprep_fill(&p, 0, n);
    mm_ctx x = {fmt, w, rb, rows, chunk_rows(rb, row_align(fmt, n)), &p, Y, rows};
    mk_parallel(mm_chunk, &x, (rows + x.ch - 1) / x.ch, pick_threads(nthreads, rows * rb * (n < 4 ? n : 4)));
    xprep_free(&p);
    return 0;
}

typedef struct {
    float *G;
    const float *U;
    int64_t inter;
    xprep *ph;
} act_ctx;

static void act_chunk(void *vctx, int64_t j) {
    act_ctx *x = vctx;
    float *gj = x->G + j * x->inter;
    const float *uj = x->U + j * x->inter;
    for (int64_t i = 0; i < x->inter; i++) gj[i] = gj[i] / (1.0f + expf(-gj[i])) * uj[i];
    xprep_fill(x->ph, j, j + 1);
}

/* Several products as one parallel job: the chunks of sub-job k are numbered from start[k], so a
 * thread's contiguous region runs through whole matrices one after another (long streams). */
typedef struct {
    chunk_fn fn;
    void *ctx;
    int64_t nchunks;
} subjob;

typedef struct {
    int64_t n;
    const subjob *jobs;
    const int64_t *start; /* n + 1 entries */
} multi_ctx;

static void multi_chunk(void *vctx, int64_t c) {
    const multi_ctx *m = vctx;
    int64_t lo = 0, hi = m->n - 1;
    while (lo < hi) { /* the last sub-job starting at or before c */
        const int64_t mid = (lo + hi + 1) / 2;
        if (m->start[mid] <= c) lo = mid; else hi = mid - 1;
    }
    m->jobs[lo].fn(m->jobs[lo].ctx, c - m->start[lo]);
}

static int run_multi(const subjob *jobs, int64_t n, int nthreads, int64_t work_bytes) {
    int64_t *start = malloc((size_t)(n + 1) * sizeof(int64_t));
    if (!start) return -2;
    start[0] = 0;
    for (int64_t k = 0; k < n; k++) start[k + 1] = start[k] + jobs[k].nchunks;
    multi_ctx m = {n, jobs, start};
    mk_parallel(multi_chunk, &m, start[n], pick_threads(nthreads, work_bytes));
    free(start);
    return 0;
}

/* FFNs of E experts of one layer, down_e(silu(gate_e X_e) * (up_e X_e)), each on its own n[e]
 * vectors X[e] (n[e], hidden) into Y[e] (n[e], hidden), in three parallel phases over all the
 * experts together: gate and up rows, the activations, the down rows.  One call per layer instead
 * of one per expert pays the thread pool's fork-join three times per layer rather than three
 * times per expert, and gives each thread a run of whole matrices to stream.
 * gate and up are (inter, hidden) in fmt_gu with row stride rb_gu; down is (hidden, inter) in fmt_d. */
MK_API int mk_moe(int fmt_gu, int fmt_d, int64_t hidden, int64_t inter, int64_t E, const uint8_t *const *g,
                  const uint8_t *const *u, int64_t rb_gu, const uint8_t *const *dn, int64_t rb_d,
                  const float *const *X, const int64_t *n, float *const *Y, int nthreads) {
    if (fmt_row_bytes(fmt_gu, hidden) < 0 || fmt_row_bytes(fmt_d, inter) < 0) return -1;
    if (x8_misfit(fmt_gu, rb_gu, inter, hidden) || x8_misfit(fmt_d, rb_d, hidden, inter)) return -1;
    if (E <= 0) return 0;
    int64_t ntok = 0;
    for (int64_t e = 0; e < E; e++) ntok += n[e];
    /* one allocation for the per-expert state, one for the gate/up outputs */
    const size_t per = sizeof(xprep) * 2 + sizeof(mm_ctx) * 3 + sizeof(act_ctx) + sizeof(subjob) * 4;
    char *mem = calloc((size_t)E, per);
    float *G = malloc((size_t)(2 * ntok * inter + 1) * sizeof(float));
    if (!mem || !G) {
        free(mem);
        free(G);
        return -2;
    }
    xprep *px = (xprep *)mem, *ph = px + E;
    mm_ctx *mg = (mm_ctx *)(ph + E), *mu = mg + E, *md = mu + E;
    act_ctx *act = (act_ctx *)(md + E);
    subjob *jgu = (subjob *)(act + E), *jact = jgu + 2 * E, *jd = jact + E;
    int rc = 0;
    int64_t e_ok = 0, nmax = 0;
    float *Gi = G;
    for (; e_ok < E; e_ok++) {
        const int64_t e = e_ok, ne = n[e];
        if (xprep_init(&px[e], X[e], ne, hidden, xprep_needs(fmt_gu, ne))) { rc = -2; break; }
        if (xprep_init(&ph[e], NULL, ne, inter, xprep_needs(fmt_d, ne))) { xprep_free(&px[e]); rc = -2; break; }
        float *Ge = Gi, *Ue = Gi + ne * inter;
        Gi += 2 * ne * inter;
        ph[e].xf = Ge; /* filled (silu(gate) * up) before ph is quantized */
        xprep_fill(&px[e], 0, ne);
        mg[e] = (mm_ctx){fmt_gu, g[e], rb_gu, inter, chunk_rows(rb_gu, row_align(fmt_gu, ne)), &px[e], Ge, inter};
        mu[e] = (mm_ctx){fmt_gu, u[e], rb_gu, inter, chunk_rows(rb_gu, row_align(fmt_gu, ne)), &px[e], Ue, inter};
        md[e] = (mm_ctx){fmt_d, dn[e], rb_d, hidden, chunk_rows(rb_d, row_align(fmt_d, ne)), &ph[e], Y[e], hidden};
        act[e] = (act_ctx){Ge, Ue, inter, &ph[e]};
        jgu[2 * e] = (subjob){mm_chunk, &mg[e], (inter + mg[e].ch - 1) / mg[e].ch};
        jgu[2 * e + 1] = (subjob){mm_chunk, &mu[e], (inter + mu[e].ch - 1) / mu[e].ch};
        jact[e] = (subjob){act_chunk, &act[e], ne};
        jd[e] = (subjob){mm_chunk, &md[e], (hidden + md[e].ch - 1) / md[e].ch};
        if (ne > nmax) nmax = ne;
    }
    if (!rc) {
        const int64_t vec = nmax < 4 ? nmax : 4; /* rows are decoded once per group of four vectors */
        rc = run_multi(jgu, 2 * E, nthreads, 2 * E * inter * rb_gu * vec);
        if (!rc) rc = run_multi(jact, E, nthreads, ntok * inter * 64);
        if (!rc) rc = run_multi(jd, E, nthreads, E * hidden * rb_d * vec);
    }
    for (int64_t e = 0; e < e_ok; e++) {
        xprep_free(&px[e]);
        xprep_free(&ph[e]);
    }
    free(G);
    free(mem);
    return rc;
}

/* One expert's FFN for n vectors: mk_moe with one expert. */
MK_API int mk_ffn(int fmt_gu, const uint8_t *g, const uint8_t *u, int64_t rb_gu, int fmt_d,
                  const uint8_t *dn, int64_t rb_d, int64_t hidden, int64_t inter, const float *X,
                  int64_t n, float *Y, int nthreads) {
    return mk_moe(fmt_gu, fmt_d, hidden, inter, 1, &g, &u, rb_gu, &dn, rb_d, &X, &n, &Y, nthreads);
}

typedef struct {
    const float *buf;
    int64_t n, ch;
    double *part;
} sum_ctx;

static void sum_chunk(void *vctx, int64_t c) {
    sum_ctx *x = vctx;
    const int64_t i1 = (c + 1) * x->ch < x->n ? (c + 1) * x->ch : x->n;
    float lane[16] = {0};
    int64_t i = c * x->ch;
    for (; i + 16 <= i1; i += 16)
        for (int l = 0; l < 16; l++) lane[l] += x->buf[i + l];
    for (; i < i1; i++) lane[0] += x->buf[i];
    float s = 0.0f;
    for (int l = 0; l < 16; l++) s += lane[l];
    x->part[c] = s;
}

/* ---------- a decoded token's attention over float16 or q8_0 keys and values ---------- */

/* The KV cache keeps keys and values in float16, as llama.cpp does: a decoded token reads all of
 * them (at 2048 tokens of OLMoE's shape 256 MiB, 512 in float32), and numpy has no float16 product.
 * Or in q8_0 (llama.cpp's --cache-type-k/v q8_0): 34 bytes a 32 of them, 53% of float16.
 * A KV head's `group` query rows against its keys and values [t0, T) of `cap`-row buffers, out =
 * softmax(scale * q K^T) V, computed in float32 (scores, then one pass over V); a chunk of work is a
 * head, or a part of its keys where the heads are few (mk_attend). */
typedef struct {
    const float *q;
    const uint8_t *K, *V;
    int kind; /* F16 or Q8_0: the rows' layout */
    int64_t group, cap, t0, T, d, rb;
    float scale;
    int64_t parts;         /* of each head's keys, one chunk each */
    float *acc, *mx, *sm;  /* per chunk and query: sum exp(s - mx) V, the largest score, sum exp(s - mx) */
    int failed;
} attend_ctx;

/* IEEE binary32 -> binary16, rounding to nearest even, for the portable build (F16C's vcvtps2ph else). */
static __attribute__((unused)) uint16_t float_to_half_soft(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u));
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* 65520 and up round past 65504 */
    if (a >= 0x38800000u) {                                   /* a normal half: rebias, round at bit 13 */
        const uint32_t r = a - 0x38000000u;
        return (uint16_t)(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
    }
    if (a < 0x33000000u) return (uint16_t)sign; /* below 2^-25 (2^-25 itself ties to even: 0) */
    const uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u, shift = 126u - e; /* units of 2^-24 */
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

INLINE uint16_t f2h(float f) {
#if MK_SIMD
    return (uint16_t)_cvtss_sh(f, 0);
#else
    return float_to_half_soft(f);
#endif
}

/* Rows of `cols` floats (a multiple of 32) to q8_0 rows, as ggml's quantize_row_q8_0_ref: the
 * same bytes as kernels.quantize(x, "q8_0").  The KV cache's keys and values as they are appended. */
MK_API void mk_quant_q8_0(const float *x, int64_t rows, int64_t cols, uint8_t *out) {
    for (int64_t i = 0; i < rows * cols / 32; i++) {
        const float *b = x + 32 * i;
        uint8_t *o = out + 34 * i;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fabsf(b[j]) > amax ? fabsf(b[j]) : amax;
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t h = f2h(d);
        memcpy(o, &h, 2);
        for (int j = 0; j < 32; j++) o[2 + j] = (uint8_t)(int8_t)roundf(b[j] * id);
    }
}

#if MK_SIMD
INLINE __m256 i8x8(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
#endif

/* One query a KV head: a key's dot product and a value's axpy, row by row, as the rows lie. */
INLINE float dot_h(const float *q, const uint16_t *k, int64_t d) {
    int64_t j = 0;
    float s = 0.0f;
#if MK_SIMD
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; j + 16 <= d; j += 16) {
        acc0 = _mm256_fmadd_ps(hf8((const uint8_t *)(k + j)), _mm256_loadu_ps(q + j), acc0);
        acc1 = _mm256_fmadd_ps(hf8((const uint8_t *)(k + j + 8)), _mm256_loadu_ps(q + j + 8), acc1);
    }
    s = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; j < d; j++) s += q[j] * half_to_float_soft(k[j]);
    return s;
}

INLINE void axpy_h(float *o, float p, const uint16_t *v, int64_t d) {
    int64_t j = 0;
#if MK_SIMD
    const __m256 pv = _mm256_set1_ps(p);
    for (; j + 8 <= d; j += 8)
        _mm256_storeu_ps(o + j, _mm256_fmadd_ps(hf8((const uint8_t *)(v + j)), pv, _mm256_loadu_ps(o + j)));
#endif
    for (; j < d; j++) o[j] += p * half_to_float_soft(v[j]);
}

/* q . row for a q8_0 row of d values (d a multiple of 32). */
INLINE float dot_q8(const float *q, const uint8_t *k, int64_t d) {
    float s = 0.0f;
#if MK_SIMD
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < d / 32; b++, k += 34, q += 32) {
        __m256 blk = _mm256_mul_ps(i8x8(k + 2), _mm256_loadu_ps(q));
        blk = _mm256_fmadd_ps(i8x8(k + 10), _mm256_loadu_ps(q + 8), blk);
        blk = _mm256_fmadd_ps(i8x8(k + 18), _mm256_loadu_ps(q + 16), blk);
        blk = _mm256_fmadd_ps(i8x8(k + 26), _mm256_loadu_ps(q + 24), blk);
        acc = _mm256_fmadd_ps(blk, _mm256_set1_ps(h2f(k)), acc);
    }
    s = hsum(acc);
#else
    for (int64_t b = 0; b < d / 32; b++, k += 34, q += 32) {
        float blk = 0.0f;
        for (int j = 0; j < 32; j++) blk += q[j] * (float)(int8_t)k[2 + j];
        s += blk * h2f(k);
    }
#endif
    return s;
}

INLINE void axpy_q8(float *o, float p, const uint8_t *v, int64_t d) {
    for (int64_t b = 0; b < d / 32; b++, v += 34, o += 32) {
        const float pd = p * h2f(v);
#if MK_SIMD
        const __m256 pv = _mm256_set1_ps(pd);
        for (int j = 0; j < 32; j += 8)
            _mm256_storeu_ps(o + j, _mm256_fmadd_ps(i8x8(v + 2 + j), pv, _mm256_loadu_ps(o + j)));
#else
        for (int j = 0; j < 32; j++) o[j] += pd * (float)(int8_t)v[2 + j];
#endif
    }
}

/* Where a tile's rows come from: the cache's f16 or q8_0 rows. */
enum { ATT_F16 = 1, ATT_Q8 = 2 };

/* Value j of a row (j < d). */
INLINE float att_ld1(const int src, const uint8_t *row, int64_t j) {
    if (src == ATT_F16) return half_to_float_soft(((const uint16_t *)row)[j]);
    const uint8_t *blk = row + j / 32 * 34;
    return h2f(blk) * (float)(int8_t)blk[2 + j % 32];
}

#if MK_SIMD
/* Values j .. j + 7 of a row (j a multiple of 8). */
INLINE __m256 att_ld8(const int src, const uint8_t *row, int64_t j) {
    if (src == ATT_F16) return hf8(row + 2 * j);
    const uint8_t *blk = row + j / 32 * 34;
    return _mm256_mul_ps(i8x8(blk + 2 + j % 32), _mm256_set1_ps(h2f(blk)));
}

/* The sums of a[0] .. a[7]'s lanes, in that order. */
INLINE __m256 hsum8(const __m256 *a) {
    const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67); /* [0..3 low | 0..3 high] */
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}
#endif

/* out[t] = scale * (q . rows[t]) for t < m (rows m x d float32).  Eight keys at once: eight sums in
 * flight keep the FMA units busy where one dot product's chain waits on each FMA's latency.  `wide`: in
 * 512-bit registers where the build has them (a prompt's blocks of rows, compute-bound: 1.2-1.3x at 4096
 * tokens; a decoded token's few queries ran slower so, see BENCHMARKS.md). */
INLINE void att_scores(const float *q, const float *rows, int64_t m, int64_t d, float scale, float *out,
                       const int wide) {
    int64_t t = 0;
#if MK_AVX512
    if (wide && d % 16 == 0)
        for (; t + 8 <= m; t += 8) {
            const float *r = rows + t * d;
            __m512 a[8];
            for (int k = 0; k < 8; k++) a[k] = _mm512_setzero_ps();
            for (int64_t j = 0; j < d; j += 16) {
                const __m512 qv = _mm512_loadu_ps(q + j);
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) a[k] = _mm512_fmadd_ps(_mm512_loadu_ps(r + k * d + j), qv, a[k]);
            }
            __m256 h[8];   /* each register's two halves added: then as the 256-bit sums */
            for (int k = 0; k < 8; k++)
                h[k] = _mm256_add_ps(_mm512_castps512_ps256(a[k]),
                                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[k]), 1)));
            _mm256_storeu_ps(out + t, _mm256_mul_ps(hsum8(h), _mm256_set1_ps(scale)));
        }
#else
    (void)wide;
#endif
#if MK_SIMD
    if (d % 8 == 0)
        for (; t + 8 <= m; t += 8) {
            const float *r = rows + t * d;
            __m256 a[8];
            for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
            for (int64_t j = 0; j < d; j += 8) {
                const __m256 qv = _mm256_loadu_ps(q + j);
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) a[k] = _mm256_fmadd_ps(_mm256_loadu_ps(r + k * d + j), qv, a[k]);
            }
            _mm256_storeu_ps(out + t, _mm256_mul_ps(hsum8(a), _mm256_set1_ps(scale)));
        }
#endif
    for (; t < m; t++) {
        float s = 0.0f;
        for (int64_t j = 0; j < d; j++) s += q[j] * rows[t * d + j];
        out[t] = scale * s;
    }
}

#if MK_SIMD
/* acc[g * d + j0 ..] += sum over t < m of p[g * ps + t] rows[t][j0 ..], for GB queries and JB 8-float
 * chunks: GB * JB = 8 sums in registers, one FMA each a key. */
INLINE void att_pv_block(const int GB, const int JB, const float *p, int64_t ps, const float *rows, int64_t m,
                         int64_t d, float *acc, int64_t j0) {
    __m256 a[4][8];
#pragma GCC unroll 4
    for (int g = 0; g < GB; g++)
#pragma GCC unroll 8
        for (int k = 0; k < JB; k++) a[g][k] = _mm256_loadu_ps(acc + g * d + j0 + 8 * k);
    for (int64_t t = 0; t < m; t++) {
        const float *r = rows + t * d + j0;
        __m256 v[8];
#pragma GCC unroll 8
        for (int k = 0; k < JB; k++) v[k] = _mm256_loadu_ps(r + 8 * k);
#pragma GCC unroll 4
        for (int g = 0; g < GB; g++) {
            const __m256 w = _mm256_broadcast_ss(p + g * ps + t);
#pragma GCC unroll 8
            for (int k = 0; k < JB; k++) a[g][k] = _mm256_fmadd_ps(v[k], w, a[g][k]);
        }
    }
#pragma GCC unroll 4
    for (int g = 0; g < GB; g++)
#pragma GCC unroll 8
        for (int k = 0; k < JB; k++) _mm256_storeu_ps(acc + g * d + j0 + 8 * k, a[g][k]);
}

#endif

#if MK_AVX512
/* att_pv_block in 512-bit registers: 16-float chunks. */
INLINE void att_pv_block16(const int GB, const int JB, const float *p, int64_t ps, const float *rows, int64_t m,
                           int64_t d, float *acc, int64_t j0) {
    __m512 a[4][8];
#pragma GCC unroll 4
    for (int g = 0; g < GB; g++)
#pragma GCC unroll 8
        for (int k = 0; k < JB; k++) a[g][k] = _mm512_loadu_ps(acc + g * d + j0 + 16 * k);
    for (int64_t t = 0; t < m; t++) {
        const float *r = rows + t * d + j0;
        __m512 v[8];
#pragma GCC unroll 8
        for (int k = 0; k < JB; k++) v[k] = _mm512_loadu_ps(r + 16 * k);
#pragma GCC unroll 4
        for (int g = 0; g < GB; g++) {
            const __m512 w = _mm512_set1_ps(p[g * ps + t]);
#pragma GCC unroll 8
            for (int k = 0; k < JB; k++) a[g][k] = _mm512_fmadd_ps(v[k], w, a[g][k]);
        }
    }
#pragma GCC unroll 4
    for (int g = 0; g < GB; g++)
#pragma GCC unroll 8
        for (int k = 0; k < JB; k++) _mm512_storeu_ps(acc + g * d + j0 + 16 * k, a[g][k]);
}

#endif

#if MK_SIMD
/* One block of GB queries x JB chunks (8 floats, or 16 `wide`) from column j0. */
INLINE void att_pv_run(const int GB, const int JB, const float *p, int64_t ps, const float *rows, int64_t m,
                       int64_t d, float *acc, int64_t j0, const int wide) {
#if MK_AVX512
    if (wide) {
        att_pv_block16(GB, JB, p, ps, rows, m, d, acc, j0);
        return;
    }
#endif
    (void)wide;
    att_pv_block(GB, JB, p, ps, rows, m, d, acc, j0);
}

/* All of a row's chunks for GB queries: JB = 8 / GB chunks at a time, then one. */
INLINE void att_pv_queries(const int GB, const float *p, int64_t ps, const float *rows, int64_t m, int64_t d,
                           float *acc, const int wide) {
    const int JB = 8 / GB, W = wide ? 16 : 8;
    int64_t j0 = 0;
    for (; j0 + W * JB <= d; j0 += W * JB) att_pv_run(GB, JB, p, ps, rows, m, d, acc, j0, wide);
    for (; j0 < d; j0 += W) att_pv_run(GB, 1, p, ps, rows, m, d, acc, j0, wide);
}
#endif

/* acc[g] += sum over t < m of p[g * ps + t] rows[t] for the group's G queries (rows m x d float32); `wide` as
 * att_scores'. */
INLINE void att_values(const float *p, int64_t ps, const float *rows, int64_t m, int64_t d, int64_t G, float *acc,
                       const int wide) {
    int64_t g = 0;
#if MK_SIMD
    if (d % 8 == 0) {
        const int w = MK_AVX512 && wide && d % 16 == 0;
        for (; g + 4 <= G; g += 4) att_pv_queries(4, p + g * ps, ps, rows, m, d, acc + g * d, w);
        for (; g + 2 <= G; g += 2) att_pv_queries(2, p + g * ps, ps, rows, m, d, acc + g * d, w);
        for (; g < G; g++) att_pv_queries(1, p + g * ps, ps, rows, m, d, acc + g * d, w);
    }
#else
    (void)wide;
#endif
    for (; g < G; g++)
        for (int64_t t = 0; t < m; t++)
            for (int64_t j = 0; j < d; j++) acc[g * d + j] += p[g * ps + t] * rows[t * d + j];
}

/* With several queries a KV head (GQA: 4 in Mixtral, 8 in Qwen3-MoE) keys and values are converted to
 * float32 ATT_TILE rows at a time, and every query of the group reads the tile from L1 (16 KB at head size
 * 128): a row is converted once, not once a query, and the sums run eight at a time (att_scores,
 * att_pv_block) where dot_h's one chain waits on each FMA.  With fewer queries the tile's extra pass costs
 * more than it saves (1 to 3 a head: 5-30% slower, bench/attention), and rows are read as they lie. */
#define ATT_TILED_FROM 4
#define ATT_TILE 32

/* Asks for the next tile's rows (up to `left` bytes) while the cores work on this one's: the tile's sums
 * run from L1 with no load of their own for DRAM to answer. */
INLINE void att_prefetch(const uint8_t *next, int64_t left, int64_t rb) {
#if MK_SIMD
    const int64_t n = left < ATT_TILE * rb ? left : ATT_TILE * rb;
    if (n > 0) pf_run(next, n);
#else
    (void)next, (void)left, (void)rb;
#endif
}

/* m rows of f16 or q8_0 (row bytes rb, d values) to float32, m x d row-major. */
INLINE void att_rows_f32(const int src, const uint8_t *rows, int64_t rb, int64_t m, int64_t d, float *out) {
    for (int64_t t = 0; t < m; t++, rows += rb, out += d) {
        int64_t j = 0;
#if MK_SIMD
        for (; j + 8 <= d; j += 8) _mm256_storeu_ps(out + j, att_ld8(src, rows, j));
#endif
        for (; j < d; j++) out[j] = att_ld1(src, rows, j);
    }
}

#if MK_SIMD
/* exp of 8 floats at most 0 (scores less their largest): Cephes' expf, x = n ln2 + r with |r| <= ln2 / 2,
 * a degree-6 polynomial of r, 2^n put in the exponent: a relative error near 2e-7 on [-87, 0] (Cephes'
 * figure; the attention tests hold the whole softmax to 2e-6 of float64's, scores spread past 87 too).  Below
 * -87.3 it gives exp(-87.3), ~1e-38, where expf underflows: nothing against a softmax's sum of at least 1.
 * A decoded token's softmax took one scalar expf a (key, query): 65,536 a layer at 4096 keys of 16 heads. */
INLINE __m256 exp_nonpos(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* p[t] = exp(p[t] - m) for t < n; returns their sum. */
INLINE float exp_sum(float *p, int64_t n, float m) {
    int64_t t = 0;
    float sum = 0.0f;
#if MK_SIMD
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(p + t), mv));
        _mm256_storeu_ps(p + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; t < n; t++) sum += (p[t] = expf(p[t] - m));
    return sum;
}

/* Chunk c: KV head c / S, its keys' part c % S of S.  Leaves the part's softmax unnormalised: per query
 * its largest score (mx), the sum of exp(score - mx) (sm) and sum exp(score - mx) V (acc, d floats),
 * which mk_attend merges over the parts. */
static void attend_part(void *ctx, int64_t c) {
    attend_ctx *x = ctx;
    const int64_t h = c / x->parts, part = c % x->parts, d = x->d, G = x->group, rb = x->rb;
    const int64_t all = x->T - x->t0, a = all * part / x->parts, n = all * (part + 1) / x->parts - a;
    const float *q = x->q + h * G * d;
    const uint8_t *K = x->K + (h * x->cap + x->t0 + a) * rb, *V = x->V + (h * x->cap + x->t0 + a) * rb;
    float *acc = x->acc + c * G * d, *mx = x->mx + c * G, *sm = x->sm + c * G;
    const int q8 = x->kind == Q8_0, src = q8 ? ATT_Q8 : ATT_F16, tiled = G >= ATT_TILED_FROM;
    /* the scores (G x n), then (tiled) a tile of rows in float32 */
    float *p = malloc((size_t)(G * n + (tiled ? ATT_TILE * d : 0)) * sizeof(float));
    if (!p) {
        x->failed = 1;
        return;
    }
    float *tile = p + G * n;
    if (tiled)
        for (int64_t t = 0; t < n; t += ATT_TILE) {
            const int64_t m = n - t < ATT_TILE ? n - t : ATT_TILE;
            att_rows_f32(src, K + t * rb, rb, m, d, tile);
            att_prefetch(K + (t + m) * rb, (n - t - m) * rb, rb);
            for (int64_t g = 0; g < G; g++) att_scores(q + g * d, tile, m, d, x->scale, p + g * n + t, 0);
        }
    else
        for (int64_t t = 0; t < n; t++)
            for (int64_t g = 0; g < G; g++)
                p[g * n + t] = x->scale * (q8 ? dot_q8(q + g * d, K + t * rb, d)
                                              : dot_h(q + g * d, (const uint16_t *)(K + t * rb), d));
    for (int64_t g = 0; g < G; g++) {
        float *pg = p + g * n, m = -INFINITY;
        for (int64_t t = 0; t < n; t++) m = pg[t] > m ? pg[t] : m;
        mx[g] = m;
        sm[g] = exp_sum(pg, n, m);
    }
    memset(acc, 0, (size_t)(G * d) * sizeof(float));
    if (tiled)
        for (int64_t t = 0; t < n; t += ATT_TILE) {
            const int64_t m = n - t < ATT_TILE ? n - t : ATT_TILE;
            att_rows_f32(src, V + t * rb, rb, m, d, tile);
            att_prefetch(V + (t + m) * rb, (n - t - m) * rb, rb);
            att_values(p + t, n, tile, m, d, G, acc, 0);
        }
    else
        for (int64_t t = 0; t < n; t++)
            for (int64_t g = 0; g < G; g++) {
                if (q8)
                    axpy_q8(acc + g * d, p[g * n + t], V + t * rb, d);
                else
                    axpy_h(acc + g * d, p[g * n + t], (const uint16_t *)(V + t * rb), d);
            }
    free(p);
}

/* Keys a part at least: below that a part's fixed costs (its own softmax, its d-float accumulator) and the
 * merge outweigh reading its keys on another core. */
#define ATTEND_PART_KEYS 256

/* fmt: the FMT_CODE of K's and V's rows, f16 or q8_0 (d a multiple of 32).  A chunk of work is a KV head's
 * keys, or a part of them where the heads are fewer than the threads can take: a model with 4 KV heads
 * (Qwen3-MoE) would otherwise read its cache on 4 cores of 16.  The parts merge into one softmax. */
MK_API int mk_attend(int fmt, const float *q, const uint8_t *K, const uint8_t *V, int64_t heads, int64_t group,
                     int64_t cap, int64_t t0, int64_t T, int64_t d, float scale, float *out, int nthreads) {
    if (heads < 1 || group < 1 || d < 1 || t0 < 0 || T <= t0 || T > cap) return 1;
    if (fmt != F16 && !(fmt == Q8_0 && d % 32 == 0)) return 3;
    const int64_t rb = fmt == F16 ? 2 * d : d / 32 * 34, n = T - t0;
    const int nt = pick_threads(nthreads, heads * n * rb * 2);
    int64_t parts = heads >= 2 * (int64_t)nt ? 1 : (2 * (int64_t)nt + heads - 1) / heads; /* 2 chunks a thread */
    if (parts > n / ATTEND_PART_KEYS) parts = n / ATTEND_PART_KEYS > 1 ? n / ATTEND_PART_KEYS : 1;
    const int64_t chunks = heads * parts;
    attend_ctx x = {q, K, V, fmt, group, cap, t0, T, d, rb, scale, parts,
                    malloc((size_t)(chunks * group * d) * sizeof(float)),
                    malloc((size_t)(chunks * group) * sizeof(float)), malloc((size_t)(chunks * group) * sizeof(float)), 0};
    if (!x.acc || !x.mx || !x.sm) {
        free(x.acc), free(x.mx), free(x.sm);
        return 2;
    }
    mk_parallel(attend_part, &x, chunks, nt);
    for (int64_t h = 0; h < heads && !x.failed; h++)
        for (int64_t g = 0; g < group; g++) {
            float M = -INFINITY, L = 0.0f, *o = out + (h * group + g) * d;
            for (int64_t c = h * parts; c < (h + 1) * parts; c++) M = x.mx[c * group + g] > M ? x.mx[c * group + g] : M;
            memset(o, 0, (size_t)d * sizeof(float));
            for (int64_t c = h * parts; c < (h + 1) * parts; c++) {
                const float w = expf(x.mx[c * group + g] - M);
                const float *acc = x.acc + (c * group + g) * d;
                L += w * x.sm[c * group + g];
                for (int64_t j = 0; j < d; j++) o[j] += w * acc[j];
            }
            for (int64_t j = 0; j < d; j++) o[j] /= L;
        }
    free(x.acc), free(x.mx), free(x.sm);
    return x.failed ? 2 : 0;
}

/* ---------- a prompt's attention: many query rows over the keys before them ---------- */

/* The scores a prompt chunk's query rows have for all the keys they see were numpy's batched products, then a
 * mask, a max, an exp, a sum and a division, each a pass over a (heads, rows, keys) array far larger than the
 * caches (128 MiB a layer for 256 rows of 32 heads over 4096 keys): at 4096 tokens of a Qwen3-MoE-shaped
 * model three quarters of the prompt's time.  Here a work item is one KV head and a block of query rows (its
 * `group` heads each): their scores against a tile of keys at a time (the tile converted to float32 once, in
 * L1, for all of them), a softmax over each query's own keys with the vector exp, then the values tile by
 * tile into accumulators in L1.  The keys a query may see: from max(0, p - window + 1) (window 0: all) up to
 * its own position p = start + row. */
typedef struct {
    const float *q;            /* (n, heads * group, d): row i's queries, KV head h's group at h * group */
    const uint8_t *K, *V;      /* (heads, cap, rb) rows of fmt */
    int kind;                  /* F32, F16 or Q8_0 */
    int64_t heads, group, cap, rb, n, start, window, d, rows; /* rows: query rows an item */
    float scale;
    float *out;                /* like q */
    int failed;
} prompt_ctx;

INLINE int64_t prompt_first_key(const prompt_ctx *x, int64_t pos) {
    return x->window && pos - x->window + 1 > 0 ? pos - x->window + 1 : 0;
}

/* Rows [t, t + m) of a KV head's buffer as float32: the rows themselves where they are float32, else
 * converted into `tile`. */
INLINE const float *prompt_rows(const prompt_ctx *x, const uint8_t *buf, int64_t h, int64_t t, int64_t m,
                                float *tile) {
    const uint8_t *rows = buf + (h * x->cap + t) * x->rb;
    if (x->kind == F32) return (const float *)rows;
    att_rows_f32(x->kind == Q8_0 ? ATT_Q8 : ATT_F16, rows, x->rb, m, x->d, tile);
    return tile;
}

static void prompt_item(void *ctx, int64_t c) {
    prompt_ctx *x = ctx;
    const int64_t blocks = (x->n + x->rows - 1) / x->rows, h = c / blocks, r0 = c % blocks * x->rows;
    const int64_t r1 = r0 + x->rows < x->n ? r0 + x->rows : x->n, G = x->group, d = x->d, H = x->heads * G;
    const int64_t Q = (r1 - r0) * G;                       /* queries: row-major, then the group's heads */
    const int64_t lo = prompt_first_key(x, x->start + r0), hi = x->start + r1, L = hi - lo;
    float *p = malloc((size_t)(Q * L + Q * d + Q + ATT_TILE * d) * sizeof(float));
    if (!p) {
        x->failed = 1;
        return;
    }
    float *acc = p + Q * L, *sum = acc + Q * d, *tile = sum + Q;
    for (int64_t t = lo; t < hi; t += ATT_TILE) {
        const int64_t m = hi - t < ATT_TILE ? hi - t : ATT_TILE;
        const float *rows = prompt_rows(x, x->K, h, t, m, tile);
        for (int64_t r = r0; r < r1; r++) {
            const int64_t last = x->start + r;           /* the row's own key: the last it sees */
            if (t > last) continue;                       /* a tile wholly after it (set to 0 below) */
            const int64_t k = last + 1 - t < m ? last + 1 - t : m;
            for (int64_t g = 0; g < G; g++) {
                const int64_t qi = (r - r0) * G + g;
                att_scores(x->q + (r * H + h * G + g) * d, rows, k, d, x->scale, p + qi * L + (t - lo), 1);
            }
        }
    }
    for (int64_t r = r0; r < r1; r++) {
        const int64_t a = prompt_first_key(x, x->start + r) - lo, e = x->start + r + 1 - lo;
        for (int64_t g = 0; g < G; g++) {
            const int64_t qi = (r - r0) * G + g;
            float *row = p + qi * L, mx = -INFINITY;
            for (int64_t t = a; t < e; t++) mx = row[t] > mx ? row[t] : mx;
            sum[qi] = exp_sum(row + a, e - a, mx);
            memset(row, 0, (size_t)a * sizeof(float));   /* keys it does not see weigh nothing */
            memset(row + e, 0, (size_t)(L - e) * sizeof(float));
        }
    }
    memset(acc, 0, (size_t)(Q * d) * sizeof(float));
    for (int64_t t = lo; t < hi; t += ATT_TILE) {
        const int64_t m = hi - t < ATT_TILE ? hi - t : ATT_TILE;
        att_values(p + (t - lo), L, prompt_rows(x, x->V, h, t, m, tile), m, d, Q, acc, 1);
    }
    for (int64_t r = r0; r < r1; r++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t qi = (r - r0) * G + g;
            const float inv = 1.0f / sum[qi];
            float *o = x->out + (r * H + h * G + g) * d;
            for (int64_t j = 0; j < d; j++) o[j] = acc[qi * d + j] * inv;
        }
    free(p);
}

/* Queries an item at most: its scores (queries x keys) stay in L2 (32 x 4096 keys: 512 KiB). */
#define PROMPT_QUERIES 32

/* A prompt chunk's attention.  q: (n, heads * group, d) float32 rows for positions start .. start + n - 1;
 * K, V: (heads, cap, rb) rows of fmt (f32, f16 or q8_0 with d a multiple of 32) holding keys 0 .. start + n - 1;
 * window: a sliding window's length, 0 for none.  out: like q. */
MK_API int mk_attend_prompt(int fmt, const float *q, const uint8_t *K, const uint8_t *V, int64_t heads,
                            int64_t group, int64_t cap, int64_t start, int64_t n, int64_t window, int64_t d,
                            float scale, float *out, int nthreads) {
    if (heads < 1 || group < 1 || d < 1 || n < 1 || start < 0 || start + n > cap || window < 0) return 1;
    if (fmt != F32 && fmt != F16 && !(fmt == Q8_0 && d % 32 == 0)) return 3;
    const int64_t rb = fmt == F32 ? 4 * d : fmt == F16 ? 2 * d : d / 32 * 34;
    const int64_t rows = PROMPT_QUERIES / group > 1 ? PROMPT_QUERIES / group : 1;
    prompt_ctx x = {q, K, V, fmt, heads, group, cap, rb, n, start, window, d, rows, scale, out, 0};
    const int64_t items = heads * ((n + rows - 1) / rows);
    mk_parallel(prompt_item, &x, items, pick_threads(nthreads, items * rows * group * (start + n) * d * 4));
    return x.failed ? 2 : 0;
}

/* Sums a float buffer with every thread streaming its own chunks: a DRAM read-bandwidth probe
 * for the benchmark (the work per byte is far below what a core can do). */
MK_API double mk_read_sum(const float *buf, int64_t n, int nthreads) {
    sum_ctx x = {buf, n, 1 << 16, NULL};
    const int64_t nchunks = (n + x.ch - 1) / x.ch;
    x.part = malloc((size_t)(nchunks > 0 ? nchunks : 1) * sizeof(double));
    if (!x.part) return NAN;
    mk_parallel(sum_chunk, &x, nchunks, nthreads);
    double total = 0.0;
    for (int64_t c = 0; c < nchunks; c++) total += x.part[c];
    free(x.part);
    return total;
}

/* ---------- CRC-32 (zlib's) of expert reads ---------- */

/* The engine checks each expert bundle's CRC-32 (index.json) the first time it reads it, on the
 * decoding thread when the read was a demand read.  zlib's table code does ~3 GB/s here, ~1.2 ms a
 * 3.5 MiB OLMoE bundle; carry-less multiplication folds 64 bytes per step instead (Intel's "Fast CRC
 * Computation for Generic Polynomials Using PCLMULQDQ", in its bit-reflected form).  The folding
 * constants are x^(k) mod P(x) for the IEEE polynomial 0x04C11DB7, bit-reflected and shifted one
 * left: the values every implementation of the method uses (Linux's crc32-pclmul among them).
 * Bytes that do not fill a 16-byte step go through the plain bitwise loop. */

static uint32_t crc32_bits(uint32_t crc, const uint8_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int b = 0; b < 8; b++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MK_CLMUL 1

#define CLMUL_TARGET __attribute__((target("pclmul,sse4.1")))

CLMUL_TARGET static inline __m128i fold16(__m128i x, __m128i k, __m128i next) {
    /* x's low half times k's low, its high half times k's high: x moved 128 (or 512) bits on */
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next);
}

/* crc: the running value (zlib's, already inverted); n >= 64 and a multiple of 16. */
CLMUL_TARGET static uint32_t crc32_clmul(uint32_t crc, const uint8_t *p, int64_t n) {
    const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);   /* 512-bit fold */
    const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);   /* 128-bit fold */
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);                  /* 64 -> 32 */
    const __m128i poly_mu = _mm_set_epi64x(0x1f7011641LL, 0x1db710641LL); /* Barrett: P', mu */
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    __m128i x0 = _mm_loadu_si128((const __m128i *)p), x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32)), x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)crc));
    p += 64;
    n -= 64;
    for (; n >= 64; p += 64, n -= 64) {
        x0 = fold16(x0, k1k2, _mm_loadu_si128((const __m128i *)p));
        x1 = fold16(x1, k1k2, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = fold16(x2, k1k2, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = fold16(x3, k1k2, _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    x0 = fold16(x0, k3k4, x1);
    x0 = fold16(x0, k3k4, x2);
    x0 = fold16(x0, k3k4, x3);
    for (; n >= 16; p += 16, n -= 16) x0 = fold16(x0, k3k4, _mm_loadu_si128((const __m128i *)p));
    /* 128 -> 96 bits (the low half times x^64 mod P, into the high half) */
    x0 = _mm_xor_si128(_mm_srli_si128(x0, 8), _mm_clmulepi64_si128(k3k4, x0, 0x01));
    /* 96 -> 64 bits */
    x0 = _mm_xor_si128(_mm_srli_si128(x0, 4), _mm_clmulepi64_si128(_mm_and_si128(x0, mask32), k5, 0x00));
    /* Barrett reduction to 32 bits */
    __m128i t = _mm_clmulepi64_si128(_mm_and_si128(x0, mask32), poly_mu, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, mask32), poly_mu, 0x00);
    return (uint32_t)_mm_extract_epi32(_mm_xor_si128(x0, t), 1);
}
#else
#define MK_CLMUL 0
#endif

/* 1 where mk_crc32 folds with carry-less multiplication (x86-64 with PCLMULQDQ), else 0: then it
 * is the bitwise loop, and callers should use zlib's table code instead. */
MK_API int mk_crc32_fast(void) {
#if MK_CLMUL
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#else
    return 0;
#endif
}

/* zlib.crc32(buf, crc): crc is the CRC of what came before (0 at the start). */
MK_API uint32_t mk_crc32(uint32_t crc, const uint8_t *p, int64_t n) {
    crc = ~crc;
#if MK_CLMUL
    if (n >= 64 && mk_crc32_fast()) {
        const int64_t body = n & ~(int64_t)15;
        crc = crc32_clmul(crc, p, body);
        p += body;
        n -= body;
    }
#endif
    return ~crc32_bits(crc, p, n);
}
