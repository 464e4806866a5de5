#ifndef CABACKUP_ROMIX_H
#define CABACKUP_ROMIX_H

#include <stddef.h>
#include <stdint.h>

/// scrypt's ROMix (RFC 7914, section 5) on one lane of 128*r bytes, in place.
/// `v` must hold n*128*r bytes and `xy` 256*r bytes, both 16-byte aligned;
/// n is a power of two, at least 2, below 2^32.
void cabackup_romix(uint8_t *block, size_t r, uint64_t n, void *v, void *xy);

/// The same result in half the memory: only the even entries of V are kept, an odd one
/// is recomputed from the entry before it when it is read (1.25 times the work).
/// `v` must hold n*64*r bytes and `xyt` 384*r bytes.
void cabackup_romix_half(uint8_t *block, size_t r, uint64_t n, void *v, void *xyt);

/// 1 when this CPU can run cabackup_romix_pair (x86-64 with AVX2), else 0.
int cabackup_romix_pair_supported(void);

/// ROMix on two lanes at once, in place, with the same results as cabackup_romix on
/// each. Each lane keeps every 2^shift-th entry of V (shift <= 2) and recomputes the
/// others when read. `v` must hold 2*ceil(n/2^shift)*128*r bytes and `work`
/// (3+2^shift)*256*r bytes, both 32-byte aligned. Call only when
/// cabackup_romix_pair_supported() returns 1.
void cabackup_romix_pair(
    uint8_t *block_a, uint8_t *block_b, size_t r, uint64_t n, unsigned shift, void *v, void *work);

#endif
