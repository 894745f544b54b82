/* Text helpers: see text.h. */
#include "text.h"

#include <stdlib.h>
#include <string.h>

#include "unicode_tables.h"

/* ---- memory ------------------------------------------------------------ */

void *xmalloc(size_t size) {
    void *p = malloc(size ? size : 1);
    if (!p) __builtin_trap(); /* out of memory: let the host roll back */
    return p;
}

void *xrealloc(void *ptr, size_t size) {
    void *p = realloc(ptr, size ? size : 1);
    if (!p) __builtin_trap();
    return p;
}

/* ---- byte buffer --------------------------------------------------------- */

void buf_reserve(kv_buf *b, size_t extra) {
    if (extra > SIZE_MAX - b->len) __builtin_trap();
    size_t need = b->len + extra;
    if (need <= b->cap) return;
    /* Double, so that a run of small appends costs O(1) each on average. */
    size_t cap = b->cap > SIZE_MAX / 2 ? SIZE_MAX : b->cap * 2;
    if (cap < need) cap = need;
    if (cap < 16) cap = 16;
    b->ptr = xrealloc(b->ptr, cap);
    b->cap = cap;
}

void buf_put(kv_buf *b, const void *bytes, size_t len) {
    if (len == 0) return; /* bytes may be NULL for an empty slice */
    buf_reserve(b, len);
    memcpy(b->ptr + b->len, bytes, len);
    b->len += len;
}

void buf_puts(kv_buf *b, const char *cstr) { buf_put(b, cstr, strlen(cstr)); }

void buf_put_byte(kv_buf *b, uint8_t byte) { buf_put(b, &byte, 1); }

void buf_put_u32le(kv_buf *b, uint32_t v) {
    uint8_t le[4];
    for (int i = 0; i < 4; i++) le[i] = (uint8_t)(v >> (8 * i));
    buf_put(b, le, 4);
}

void buf_put_u64le(kv_buf *b, uint64_t v) {
    uint8_t le[8];
    for (int i = 0; i < 8; i++) le[i] = (uint8_t)(v >> (8 * i));
    buf_put(b, le, 8);
}

void buf_put_i64(kv_buf *b, int64_t v) {
    /* Work on the magnitude as unsigned, so INT64_MIN needs no special case. */
    uint64_t mag = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
    char digits[20];
    size_t n = 0;
    do {
        digits[n++] = (char)('0' + mag % 10);
        mag /= 10;
    } while (mag);
    if (v < 0) buf_put_byte(b, '-');
    while (n) buf_put_byte(b, (uint8_t)digits[--n]);
}

void buf_free(kv_buf *b) {
    free(b->ptr);
    b->ptr = NULL;
    b->len = b->cap = 0;
}

/* ---- UTF-8 --------------------------------------------------------------- */

bool utf8_valid(const uint8_t *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        /* Lead byte: how many continuation bytes follow, and the allowed
         * range of the first one (which rules out overlong forms,
         * surrogates and code points above U+10FFFF). */
        size_t n;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) {
            n = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            if (c == 0xE0) lo = 0xA0;      /* overlong */
            else if (c == 0xED) hi = 0x9F; /* surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            if (c == 0xF0) lo = 0x90;      /* overlong */
            else if (c == 0xF4) hi = 0x8F; /* above U+10FFFF */
        } else {
            return false; /* continuation byte, C0, C1 or F5..FF */
        }
        if (len - i - 1 < n) return false; /* truncated */
        if (s[i + 1] < lo || s[i + 1] > hi) return false;
        for (size_t k = 2; k <= n; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return false;
        }
        i += n + 1;
    }
    return true;
}

/* Decodes the code point at s[*i] of valid UTF-8 and moves *i past it. */
static uint32_t utf8_next(const uint8_t *s, size_t *i) {
    uint8_t c = s[*i];
    if (c < 0x80) {
        *i += 1;
        return c;
    }
    if (c < 0xE0) {
        uint32_t cp = ((uint32_t)(c & 0x1F) << 6) | (s[*i + 1] & 0x3F);
        *i += 2;
        return cp;
    }
    if (c < 0xF0) {
        uint32_t cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[*i + 1] & 0x3F) << 6) |
                      (s[*i + 2] & 0x3F);
        *i += 3;
        return cp;
    }
    uint32_t cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[*i + 1] & 0x3F) << 12) |
                  ((uint32_t)(s[*i + 2] & 0x3F) << 6) | (s[*i + 3] & 0x3F);
    *i += 4;
    return cp;
}

/* ---- words --------------------------------------------------------------- */

bool is_rust_whitespace(uint32_t cp) {
    /* 25 code points: a linear scan after a fast path for plain ASCII. */
    if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
    for (size_t i = 0; i < sizeof RUST_WHITESPACE / sizeof RUST_WHITESPACE[0]; i++) {
        if (RUST_WHITESPACE[i] == cp) return true;
    }
    return false;
}

size_t split_words(const uint8_t *s, size_t len, kv_str *words, size_t max) {
    size_t count = 0;
    size_t i = 0;
    size_t start = 0;
    bool in_word = false;
    while (i < len) {
        size_t at = i;
        bool space = is_rust_whitespace(utf8_next(s, &i));
        if (!space && !in_word) {
            start = at;
            in_word = true;
        } else if (space && in_word) {
            if (count < max) words[count] = (kv_str){s + start, at - start};
            count++;
            in_word = false;
        }
    }
    if (in_word) {
        if (count < max) words[count] = (kv_str){s + start, len - start};
        count++;
    }
    return count;
}

/* ---- integers ------------------------------------------------------------ */

bool parse_i64(kv_str s, int64_t *out) {
    const uint8_t *p = s.ptr;
    size_t n = s.len;
    bool negative = false;
    if (n > 0 && (p[0] == '+' || p[0] == '-')) {
        negative = p[0] == '-';
        p++;
        n--;
    }
    if (n == 0) return false; /* "", "+" and "-" are not numbers */
    /* Accumulate the magnitude as unsigned; the limit is one larger on the
     * negative side (INT64_MIN has no positive counterpart). */
    uint64_t limit = negative ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    uint64_t mag = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return false;
        uint64_t digit = (uint64_t)(p[i] - '0');
        if (mag > (limit - digit) / 10) return false; /* out of range */
        mag = mag * 10 + digit;
    }
    *out = negative ? (int64_t)(0 - mag) : (int64_t)mag;
    return true;
}

/* ---- Rust {:?} quoting ---------------------------------------------------- */

/* Whether Rust's {:?} prints code point `cp` as \u{hex}: binary search in
 * the generated table of ranges. */
static bool debug_escaped(uint32_t cp) {
    size_t lo = 0, hi = sizeof RUST_DEBUG_ESCAPED / sizeof RUST_DEBUG_ESCAPED[0];
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < RUST_DEBUG_ESCAPED[mid][0]) {
            hi = mid;
        } else if (cp > RUST_DEBUG_ESCAPED[mid][1]) {
            lo = mid + 1;
        } else {
            return true;
        }
    }
    return false;
}

void buf_put_debug(kv_buf *b, const uint8_t *s, size_t len) {
    static const char hex[] = "0123456789abcdef";
    buf_put_byte(b, '"');
    size_t i = 0;
    while (i < len) {
        size_t at = i;
        uint32_t cp = utf8_next(s, &i);
        switch (cp) {
        case 0: buf_puts(b, "\\0"); continue;
        case '\t': buf_puts(b, "\\t"); continue;
        case '\r': buf_puts(b, "\\r"); continue;
        case '\n': buf_puts(b, "\\n"); continue;
        case '\\': buf_puts(b, "\\\\"); continue;
        case '"': buf_puts(b, "\\\""); continue;
        default: break;
        }
        if (debug_escaped(cp)) {
            /* \u{hex}: lowercase, no leading zeros. */
            char digits[8];
            size_t n = 0;
            do {
                digits[n++] = hex[cp & 0xF];
                cp >>= 4;
            } while (cp);
            buf_puts(b, "\\u{");
            while (n) buf_put_byte(b, (uint8_t)digits[--n]);
            buf_put_byte(b, '}');
        } else {
            buf_put(b, s + at, i - at); /* printed as is */
        }
    }
    buf_put_byte(b, '"');
}
