/* Text helpers that reproduce, byte for byte, what the Rust kv gets from the
 * Rust standard library: strict UTF-8 validation (str::from_utf8), word
 * splitting (str::split_whitespace), integer parsing and printing
 * (i64::from_str, i64's Display) and string quoting ({:?} on a str).
 *
 * Nothing here depends on WebAssembly: the same file is compiled natively by
 * the unit test (test/kv_test.c). */
#ifndef KV_TEXT_H
#define KV_TEXT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- memory ------------------------------------------------------------ */

/* malloc/realloc that never return NULL. On out-of-memory they trap, which
 * is what the Rust kv does too: the host discards the instance and rebuilds
 * it to the state before the call, so nothing half-done survives. */
void *xmalloc(size_t size);
void *xrealloc(void *ptr, size_t size);

/* ---- byte buffer --------------------------------------------------------- */

/* A growable byte buffer. `ptr` comes from malloc (or is NULL while empty):
 * its holder frees it with free(), or hands it to the canonical ABI, whose
 * post-return function frees it. */
typedef struct {
    uint8_t *ptr;
    size_t len;
    size_t cap;
} kv_buf;

void buf_reserve(kv_buf *b, size_t extra);
void buf_put(kv_buf *b, const void *bytes, size_t len);
void buf_puts(kv_buf *b, const char *cstr);
void buf_put_byte(kv_buf *b, uint8_t byte);
void buf_put_u32le(kv_buf *b, uint32_t v);
void buf_put_u64le(kv_buf *b, uint64_t v);
/* The decimal text of v, like Rust's `v.to_string()`. */
void buf_put_i64(kv_buf *b, int64_t v);
/* `s` quoted like Rust's `format!("{:?}", s)` for a str: in double quotes,
 * with \0 \t \r \n \\ \" and \u{hex} for what Rust does not print as is
 * (controls, unassigned and private-use code points, combining marks...).
 * `s` must be valid UTF-8. */
void buf_put_debug(kv_buf *b, const uint8_t *s, size_t len);
void buf_free(kv_buf *b);

/* ---- text ---------------------------------------------------------------- */

/* A borrowed slice of bytes (a word of a command, a key, a value). */
typedef struct {
    const uint8_t *ptr;
    size_t len;
} kv_str;

/* Whether bytes are valid UTF-8 by the same rules as Rust's str::from_utf8:
 * no overlong forms, no surrogates, nothing above U+10FFFF, no truncated
 * sequences. */
bool utf8_valid(const uint8_t *s, size_t len);

/* Whether code point `cp` is whitespace for Rust's char::is_whitespace. */
bool is_rust_whitespace(uint32_t cp);

/* Splits valid UTF-8 text into words the way Rust's str::split_whitespace
 * does (Unicode whitespace, runs of it count as one separator, none at the
 * ends). Stores the first `max` words in `words` and returns how many words
 * there are in all, which may be more than `max`. */
size_t split_words(const uint8_t *s, size_t len, kv_str *words, size_t max);

/* Parses a signed 64-bit integer exactly like Rust's `str::parse::<i64>`:
 * an optional `+` or `-`, then one or more ASCII digits, in range. Nothing
 * else: no spaces, no `0x`, no `_`. Returns false if `s` is not one. */
bool parse_i64(kv_str s, int64_t *out);

#endif
