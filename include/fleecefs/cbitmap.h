/* cbitmap: a fixed-size bitmap of clusters with atomic bit operations.
 *
 * Owns: one array of 64-bit words.
 * Locking: every single-bit and range operation is atomic per word, so
 * concurrent set/clear of distinct bits never lose updates. Range operations
 * are not atomic as a whole. cbitmap_test() is an acquire load and
 * cbitmap_clear*() are release operations: a thread that sees a bit clear
 * also sees everything the clearing thread did before clearing it. The copy
 * engine relies on this (see blockcopy.h).
 * Errors: cbitmap_init returns 0 or -ENOMEM.
 */
#ifndef FLEECEFS_CBITMAP_H
#define FLEECEFS_CBITMAP_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

struct cbitmap {
	uint64_t nbits;
	_Atomic uint64_t *words;
};

int cbitmap_init(struct cbitmap *bm, uint64_t nbits, bool all_set);
void cbitmap_destroy(struct cbitmap *bm);

static inline bool cbitmap_test(const struct cbitmap *bm, uint64_t bit)
{
	return (atomic_load_explicit(&bm->words[bit / 64], memory_order_acquire) >> (bit % 64)) & 1;
}

void cbitmap_set(struct cbitmap *bm, uint64_t bit);
void cbitmap_clear(struct cbitmap *bm, uint64_t bit);
void cbitmap_set_range(struct cbitmap *bm, uint64_t first, uint64_t count);
void cbitmap_clear_range(struct cbitmap *bm, uint64_t first, uint64_t count);
void cbitmap_fill(struct cbitmap *bm, bool value);
/* Any bit set in [first, first + count)? */
bool cbitmap_any_set(const struct cbitmap *bm, uint64_t first, uint64_t count);
/* First set (clear) bit at or after `from`, or nbits when there is none. */
uint64_t cbitmap_next_set(const struct cbitmap *bm, uint64_t from);
uint64_t cbitmap_next_clear(const struct cbitmap *bm, uint64_t from);
uint64_t cbitmap_count(const struct cbitmap *bm);
/* Sets [first, first + count), looking before writing: words already set
 * are not written (keeps hot, shared cache lines clean on the write path). */
void cbitmap_mark_range(struct cbitmap *bm, uint64_t first, uint64_t count);
/* dst |= src (same size). */
void cbitmap_or(struct cbitmap *dst, const struct cbitmap *src);
/* dst = src (same size; not atomic as a whole). */
void cbitmap_copy(struct cbitmap *dst, const struct cbitmap *src);
uint64_t cbitmap_words(const struct cbitmap *bm);

#endif
