// scrypt's ROMix, the memory-hard core of scrypt (RFC 7914), written for one lane.
//
// Words of each 64-byte Salsa20 block are kept in "diagonal" order while mixing:
// position i holds word (5*i) mod 16, so four 32-bit vectors hold the four diagonals
// (0,5,10,15), (4,9,14,3), (8,13,2,7), (12,1,6,11). A Salsa20 column round is then
// four vector quarter-rounds, and a lane rotation of three of the vectors turns the
// diagonals into rows for the row round. Without SSE2 the same order is mixed word by
// word. Blocks are put back in the natural order before returning.

#include "cabackup_romix.h"

#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
typedef __m128i vec;
#define VADD(a, b) _mm_add_epi32((a), (b))
#define VXOR(a, b) _mm_xor_si128((a), (b))
#define VROTL(a, k) _mm_xor_si128(_mm_slli_epi32((a), (k)), _mm_srli_epi32((a), 32 - (k)))
// Lane rotations: result lane i = input lane (i - 1), (i - 2), (i + 1) mod 4.
#define VROT_RIGHT1(a) _mm_shuffle_epi32((a), 0x93)
#define VROT2(a) _mm_shuffle_epi32((a), 0x4E)
#define VROT_LEFT1(a) _mm_shuffle_epi32((a), 0x39)
#else
typedef struct {
    uint32_t w[4];
} vec;
static inline vec vadd(vec a, vec b) {
    for (int i = 0; i < 4; i++) a.w[i] += b.w[i];
    return a;
}
static inline vec vxor(vec a, vec b) {
    for (int i = 0; i < 4; i++) a.w[i] ^= b.w[i];
    return a;
}
static inline vec vrotl(vec a, int k) {
    for (int i = 0; i < 4; i++) a.w[i] = (a.w[i] << k) | (a.w[i] >> (32 - k));
    return a;
}
static inline vec vrot(vec a, int by) {
    vec r;
    for (int i = 0; i < 4; i++) r.w[i] = a.w[(i - by + 4) & 3];
    return r;
}
#define VADD(a, b) vadd((a), (b))
#define VXOR(a, b) vxor((a), (b))
#define VROTL(a, k) vrotl((a), (k))
#define VROT_RIGHT1(a) vrot((a), 1)
#define VROT2(a) vrot((a), 2)
#define VROT_LEFT1(a) vrot((a), 3)
#endif

// Four vector quarter-rounds: a column round with (x, y, z) = (b, c, d), a row round
// with (d, c, b), for whichever vector type ADD, XOR and ROTL work on.
#define QUARTER_ROUNDS(ADD, XOR, ROTL, a, x, y, z) \
    do {                                           \
        x = XOR(x, ROTL(ADD(a, z), 7));            \
        y = XOR(y, ROTL(ADD(x, a), 9));            \
        z = XOR(z, ROTL(ADD(y, x), 13));           \
        a = XOR(a, ROTL(ADD(z, y), 18));           \
    } while (0)

// Salsa20/8 of x (diagonal order), added to its input, in place.
static inline void salsa8(vec *x0, vec *x1, vec *x2, vec *x3) {
    vec a = *x0, b = *x1, c = *x2, d = *x3;
    for (int round = 0; round < 8; round += 2) {
        QUARTER_ROUNDS(VADD, VXOR, VROTL, a, b, c, d);
        b = VROT_RIGHT1(b);
        c = VROT2(c);
        d = VROT_LEFT1(d);
        QUARTER_ROUNDS(VADD, VXOR, VROTL, a, d, c, b);
        b = VROT_LEFT1(b);
        c = VROT2(c);
        d = VROT_RIGHT1(d);
    }
    *x0 = VADD(*x0, a);
    *x1 = VADD(*x1, b);
    *x2 = VADD(*x2, c);
    *x3 = VADD(*x3, d);
}

// BlockMix_salsa20/8: out = BlockMix(in XOR other), other may be NULL. 2r blocks of
// four vectors each; even results fill the first half of out, odd ones the second.
static inline void block_mix(const vec *in, const vec *other, vec *out, size_t r) {
    size_t last = (2 * r - 1) * 4;
    vec x0 = in[last], x1 = in[last + 1], x2 = in[last + 2], x3 = in[last + 3];
    if (other) {
        x0 = VXOR(x0, other[last]);
        x1 = VXOR(x1, other[last + 1]);
        x2 = VXOR(x2, other[last + 2]);
        x3 = VXOR(x3, other[last + 3]);
    }
    for (size_t i = 0; i < 2 * r; i++) {
        const vec *b = in + i * 4;
        x0 = VXOR(x0, b[0]);
        x1 = VXOR(x1, b[1]);
        x2 = VXOR(x2, b[2]);
        x3 = VXOR(x3, b[3]);
        if (other) {
            const vec *o = other + i * 4;
            x0 = VXOR(x0, o[0]);
            x1 = VXOR(x1, o[1]);
            x2 = VXOR(x2, o[2]);
            x3 = VXOR(x3, o[3]);
        }
        salsa8(&x0, &x1, &x2, &x3);
        vec *dst = out + ((i & 1) * r + (i >> 1)) * 4;
        dst[0] = x0;
        dst[1] = x1;
        dst[2] = x2;
        dst[3] = x3;
    }
}

static inline uint32_t load_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void store_le32(uint8_t *p, uint32_t w) {
    p[0] = (uint8_t)w;
    p[1] = (uint8_t)(w >> 8);
    p[2] = (uint8_t)(w >> 16);
    p[3] = (uint8_t)(w >> 24);
}

// Natural little-endian words of a lane into diagonal order, and back.
static void load_lane(vec *x, const uint8_t *block, size_t r) {
    for (size_t k = 0; k < 2 * r; k++) {
        uint32_t *dst = (uint32_t *)(x + k * 4);
        for (int i = 0; i < 16; i++) dst[i] = load_le32(block + k * 64 + ((i * 5) & 15) * 4);
    }
}

static void store_lane(uint8_t *block, const vec *x, size_t r) {
    for (size_t k = 0; k < 2 * r; k++) {
        const uint32_t *src = (const uint32_t *)(x + k * 4);
        for (int i = 0; i < 16; i++) store_le32(block + k * 64 + ((i * 5) & 15) * 4, src[i]);
    }
}

// Integerify(X) mod n for n < 2^32: word 0 of the last block, which the diagonal order
// leaves at position 0.
static inline uint32_t integerify(const vec *x, size_t vecs, uint32_t mask) {
    return ((const uint32_t *)(x + vecs - 4))[0] & mask;
}

void cabackup_romix(uint8_t *block, size_t r, uint64_t n, void *v_memory, void *xy) {
    const size_t vecs = 8 * r;  // vectors per 128*r bytes
    vec *v = (vec *)v_memory;
    vec *x = (vec *)xy;
    vec *y = x + vecs;

    load_lane(x, block, r);
    // V[i] = X; X = BlockMix(X), each result written straight into the next V slot.
    memcpy(v, x, vecs * sizeof(vec));
    for (uint64_t i = 0; i + 1 < n; i++) block_mix(v + i * vecs, NULL, v + (i + 1) * vecs, r);
    block_mix(v + (n - 1) * vecs, NULL, x, r);
    // X = BlockMix(X XOR V[Integerify(X) mod N]), alternating between x and y.
    const uint32_t mask = (uint32_t)(n - 1);
    for (uint64_t i = 0; i < n; i += 2) {
        block_mix(x, v + (size_t)integerify(x, vecs, mask) * vecs, y, r);
        block_mix(y, v + (size_t)integerify(y, vecs, mask) * vecs, x, r);
    }
    store_lane(block, x, r);
}

// V[j] for the half table: kept when j is even, else BlockMix of the V before it, into t.
static inline const vec *half_v(const vec *v, uint32_t j, vec *t, size_t vecs, size_t r) {
    const vec *kept = v + (size_t)(j >> 1) * vecs;
    if ((j & 1) == 0) return kept;
    block_mix(kept, NULL, t, r);
    return t;
}

void cabackup_romix_half(uint8_t *block, size_t r, uint64_t n, void *v_memory, void *xyt) {
    const size_t vecs = 8 * r;
    vec *v = (vec *)v_memory;
    vec *x = (vec *)xyt;
    vec *y = x + vecs;
    vec *t = y + vecs;

    load_lane(v, block, r);  // V[0] = X
    // V[2k+1] = BlockMix(V[2k]) passes through t; V[2k+2] = BlockMix(V[2k+1]) is kept,
    // and the last one is X after n BlockMixes.
    for (uint64_t k = 0; k < n / 2; k++) {
        block_mix(v + k * vecs, NULL, t, r);
        block_mix(t, NULL, k + 1 < n / 2 ? v + (k + 1) * vecs : x, r);
    }
    const uint32_t mask = (uint32_t)(n - 1);
    for (uint64_t i = 0; i < n; i += 2) {
        block_mix(x, half_v(v, integerify(x, vecs, mask), t, vecs, r), y, r);
        block_mix(y, half_v(v, integerify(y, vecs, mask), t, vecs, r), x, r);
    }
    store_lane(block, x, r);
}

// Two lanes in lockstep with AVX2: lane A in the low and lane B in the high 128 bits of
// each 256-bit vector, so one instruction stream mixes both (1.8-2x the throughput of two
// lanes one after the other). A lane keeps every 2^shift-th entry of its table and
// recomputes the others when read; the two lanes read different entries, so the pair
// runs as many BlockMix steps as the farther of the two needs.
#if defined(__x86_64__)
#include <immintrin.h>

#define PAIR_TARGET __attribute__((target("avx2")))
typedef __m256i wvec;
#define WADD(a, b) _mm256_add_epi32((a), (b))
#define WXOR(a, b) _mm256_xor_si256((a), (b))
#define WROTL(a, k) _mm256_xor_si256(_mm256_slli_epi32((a), (k)), _mm256_srli_epi32((a), 32 - (k)))
// Low 128 bits from a, high 128 bits from b.
#define WPAIR(a, b) _mm256_blend_epi32((a), (b), 0xF0)

int cabackup_romix_pair_supported(void) { return __builtin_cpu_supports("avx2") ? 1 : 0; }

PAIR_TARGET static inline __attribute__((always_inline)) void salsa8_pair(
    wvec *x0, wvec *x1, wvec *x2, wvec *x3) {
    wvec a = *x0, b = *x1, c = *x2, d = *x3;
    for (int round = 0; round < 8; round += 2) {
        // The same lane rotations as salsa8's, within each 128-bit half.
        QUARTER_ROUNDS(WADD, WXOR, WROTL, a, b, c, d);
        b = _mm256_shuffle_epi32(b, 0x93);
        c = _mm256_shuffle_epi32(c, 0x4E);
        d = _mm256_shuffle_epi32(d, 0x39);
        QUARTER_ROUNDS(WADD, WXOR, WROTL, a, d, c, b);
        b = _mm256_shuffle_epi32(b, 0x39);
        c = _mm256_shuffle_epi32(c, 0x4E);
        d = _mm256_shuffle_epi32(d, 0x93);
    }
    *x0 = WADD(*x0, a);
    *x1 = WADD(*x1, b);
    *x2 = WADD(*x2, c);
    *x3 = WADD(*x3, d);
}

// BlockMix of a pair. The input is lane A from `in_a` and lane B from `in_b` (the same
// array when `split_in` is 0), XORed with lane A of `other_a` and lane B of `other_b` when
// `other_a` is given. Callers pass constants for the flags, so each use compiles to its
// own loop.
PAIR_TARGET static inline __attribute__((always_inline)) void block_mix_pair(
    const wvec *in_a, const wvec *in_b, int split_in, const wvec *other_a, const wvec *other_b, wvec *out,
    size_t r) {
    size_t last = (2 * r - 1) * 4;
    wvec x[4];
    for (int k = 0; k < 4; k++) {
        x[k] = split_in ? WPAIR(in_a[last + k], in_b[last + k]) : in_a[last + k];
        if (other_a) x[k] = WXOR(x[k], WPAIR(other_a[last + k], other_b[last + k]));
    }
    for (size_t i = 0; i < 2 * r; i++) {
        for (int k = 0; k < 4; k++) {
            size_t at = i * 4 + k;
            x[k] = WXOR(x[k], split_in ? WPAIR(in_a[at], in_b[at]) : in_a[at]);
            if (other_a) x[k] = WXOR(x[k], WPAIR(other_a[at], other_b[at]));
        }
        salsa8_pair(&x[0], &x[1], &x[2], &x[3]);
        wvec *dst = out + ((i & 1) * r + (i >> 1)) * 4;
        for (int k = 0; k < 4; k++) dst[k] = x[k];
    }
}

// out = BlockMix(in XOR V[j]) for both lanes, j = Integerify of each lane of `in`. V[j] is
// the kept entry j >> shift followed by (j mod 2^shift) BlockMixes, run in lockstep for
// both lanes into `steps` (up to 2^shift - 1 arrays).
PAIR_TARGET static inline __attribute__((always_inline)) void mix_with_table(
    const wvec *in, wvec *out, const wvec *v, unsigned shift, uint32_t mask, wvec *steps, size_t r) {
    const size_t vecs = 8 * r;
    const uint32_t *w = (const uint32_t *)(in + vecs - 4);
    uint32_t ja = w[0] & mask, jb = w[4] & mask;
    const wvec *va = v + (size_t)(ja >> shift) * vecs, *vb = v + (size_t)(jb >> shift) * vecs;
    uint32_t step_mask = (1u << shift) - 1, a = ja & step_mask, b = jb & step_mask;
    uint32_t n_steps = a > b ? a : b;
    const wvec *got_a = va, *got_b = vb;
    // The first step takes each lane from its own kept entry; later ones take the pair
    // the step before wrote, whole.
    for (uint32_t k = 1; k <= n_steps; k++) {
        wvec *dst = steps + (k - 1) * vecs;
        if (k == 1) {
            block_mix_pair(va, vb, 1, NULL, NULL, dst, r);
        } else {
            block_mix_pair(dst - vecs, dst - vecs, 0, NULL, NULL, dst, r);
        }
        if (k == a) got_a = dst;
        if (k == b) got_b = dst;
    }
    block_mix_pair(in, in, 0, got_a, got_b, out, r);
}

PAIR_TARGET void cabackup_romix_pair(
    uint8_t *block_a, uint8_t *block_b, size_t r, uint64_t n, unsigned shift, void *v_memory, void *work) {
    const size_t vecs = 8 * r;
    const uint64_t keep_mask = ((uint64_t)1 << shift) - 1;
    wvec *v = (wvec *)v_memory;
    wvec *x = (wvec *)work;
    wvec *y = x + vecs;
    wvec *passing[2] = {y + vecs, y + 2 * vecs};  // entries that are not kept
    wvec *steps = y + 3 * vecs;                  // 2^shift - 1 recomputed entries

    vec *lane_a = (vec *)passing[0], *lane_b = lane_a + vecs;
    load_lane(lane_a, block_a, r);
    load_lane(lane_b, block_b, r);
    for (size_t k = 0; k < vecs; k++) x[k] = _mm256_set_m128i(lane_b[k], lane_a[k]);

    // V[i] = BlockMix(V[i - 1]); kept when i is a multiple of 2^shift. X = BlockMix(V[n - 1]).
    memcpy(v, x, vecs * sizeof(wvec));
    const wvec *previous = v;
    for (uint64_t i = 1; i < n; i++) {
        wvec *dst = (i & keep_mask) == 0 ? v + (size_t)(i >> shift) * vecs : passing[i & 1];
        block_mix_pair(previous, previous, 0, NULL, NULL, dst, r);
        previous = dst;
    }
    block_mix_pair(previous, previous, 0, NULL, NULL, x, r);

    const uint32_t mask = (uint32_t)(n - 1);
    for (uint64_t i = 0; i < n; i += 2) {
        mix_with_table(x, y, v, shift, mask, steps, r);
        mix_with_table(y, x, v, shift, mask, steps, r);
    }

    for (size_t k = 0; k < vecs; k++) {
        lane_a[k] = _mm256_castsi256_si128(x[k]);
        lane_b[k] = _mm256_extracti128_si256(x[k], 1);
    }
    store_lane(block_a, lane_a, r);
    store_lane(block_b, lane_b, r);
}
#else
int cabackup_romix_pair_supported(void) { return 0; }

void cabackup_romix_pair(
    uint8_t *block_a, uint8_t *block_b, size_t r, uint64_t n, unsigned shift, void *v_memory, void *work) {
    (void)block_a, (void)block_b, (void)r, (void)n, (void)shift, (void)v_memory, (void)work;
    __builtin_trap();  // callers check cabackup_romix_pair_supported() first
}
#endif
