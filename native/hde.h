/* dwcp._hde: the per-byte loops of hierarchical delta encoding (HDE).
 *
 * Every call works on a whole buffer (a megabyte or more) and fills caller-owned
 * arrays, so Python pays one call per buffer, never one per block or chunk.
 * Fingerprints are XXH3-128 in canonical (big-endian) byte order, 16 bytes each,
 * identical to Python's xxhash.xxh3_128_digest(). This header is the cffi cdef.
 */
#include <stddef.h>
#include <stdint.h>

enum {
    HDE_ABI = 1,
    HDE_FP_BYTES = 16,
    HDE_FLAG_ZERO = 1,  /* the block or chunk is all zero bytes: never hashed, sent or stored */
    HDE_KIND_ZERO = 0,
    HDE_KIND_COPY = 1,
    HDE_KIND_LITERAL = 2
};

int hde_abi(void);

/* Split buf into ceil(len / block_size) aligned blocks (the last may be short).
 * Block i: flags[i] = HDE_FLAG_ZERO and fps[16i..] zeroed if it is all zeros,
 * else flags[i] = 0 and fps[16i..] = XXH3-128(block). Returns the number of zero
 * blocks, or -1 if block_size is 0. */
int64_t hde_blocks(const uint8_t *buf, size_t len, uint32_t block_size,
                   uint8_t *fps, uint8_t *flags);

/* One hash-tree level: parents[j] = XXH3-128 of the concatenated fingerprints
 * fps[j*fanout .. min(n, (j+1)*fanout)). Returns the number of parents. */
int64_t hde_tree_level(const uint8_t *fps, size_t n, uint32_t fanout, uint8_t *parents);

/* Gear content-defined chunking (FastCDC's gear hash, judged on its high bits;
 * cut points below min_size skipped). The hash at byte i is H(i) = sum over
 * j < 64 of GEAR[buf[i-j]] << j (mod 2^64), GEAR a fixed splitmix64 table: it
 * depends on the 64 bytes ending at i only. With avg_size = 2^b, a chunk of
 * length L ends at the least L >= min_size where the top b bits of H(L-1) are
 * zero, or where the min_size + 64 bytes before L are zero and byte L is not;
 * else at max_size. No normalisation (one mask at every length), so chunkers that start
 * at different offsets fall into step at the next common cut; the same on
 * every machine and build. Cuts chunks from the start of buf; stops when cap chunks
 * were written or when fewer than max_size bytes remain and final is 0 (the
 * caller passes the unconsumed tail again with more data). For chunk k:
 * lens[k], fps[16k..] = XXH3-128, flags[k] = HDE_FLAG_ZERO for an all-zero chunk.
 * *consumed = sum of lens. Returns the number of chunks, or -1 on bad sizes
 * (need 64 <= min_size <= avg_size <= max_size, avg_size a power of two). */
int64_t hde_cdc(const uint8_t *buf, size_t len, uint32_t min_size, uint32_t avg_size,
                uint32_t max_size, int final, uint32_t *lens, uint8_t *fps, uint8_t *flags,
                size_t cap, size_t *consumed);

/* An in-memory fingerprint -> (source, offset, length) hash table. The first
 * location added for a fingerprint wins. */
typedef struct hde_index hde_index;

hde_index *hde_index_new(size_t capacity_hint);
void hde_index_free(hde_index *index);
size_t hde_index_count(const hde_index *index);

/* Add n entries; entry i is at offsets[i] (or base + i*stride when offsets is
 * NULL) with length lens[i] (or stride when lens is NULL). Entries flagged
 * HDE_FLAG_ZERO (flags may be NULL) are skipped. Returns how many were new,
 * or -1 when memory ran out. */
int64_t hde_index_add(hde_index *index, const uint8_t *fps, const uint8_t *flags, size_t n,
                      uint32_t source, const uint64_t *offsets, uint64_t base, uint64_t stride,
                      const uint32_t *lens);

/* Drop every entry of one source. Returns how many were dropped, -1 on OOM. */
int64_t hde_index_remove_source(hde_index *index, uint32_t source);

/* Look up n fingerprints. out_source[i] = -1 for a miss and for entries flagged
 * HDE_FLAG_ZERO (flags may be NULL); else the source, with out_offset[i] and
 * out_len[i] (out_len may be NULL). Returns the number of hits. */
int64_t hde_index_lookup(const hde_index *index, const uint8_t *fps, const uint8_t *flags,
                         size_t n, int32_t *out_source, uint64_t *out_offset, uint32_t *out_len);

/* Merge per-block lookup results into extents of consecutive blocks:
 * zero (flags), copy (source >= 0; merged while the source is the same and its
 * offsets are contiguous) and literal (the rest). Extent e covers blocks
 * out_start[e] .. out_start[e] + out_count[e]; for copies out_source[e] and
 * out_offset[e] give where its first block lives. Returns the number of
 * extents, or -1 if cap is too small. */
int64_t hde_extents(size_t n, uint32_t block_size, const uint8_t *flags, const int32_t *source,
                    const uint64_t *offset, uint64_t *out_start, uint64_t *out_count,
                    uint8_t *out_kind, int32_t *out_source, uint64_t *out_offset, size_t cap);
