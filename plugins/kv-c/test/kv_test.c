/* Native unit test of the kv logic (src/kv.c, src/map.c, src/text.c), with
 * no WebAssembly involved. build.sh runs it with the host's C compiler,
 * under AddressSanitizer and UndefinedBehaviorSanitizer where available:
 *
 *     cc -O1 -g -fsanitize=address,undefined -Isrc src/kv.c src/map.c \
 *        src/text.c test/kv_test.c -o /tmp/kv_test
 *     /tmp/kv_test ../../tests/conformance/kv.cases
 *
 * It runs every line of the shared conformance cases (raw-* lines too) the
 * way the host would, then checks what the cases cannot reach: the snapshot
 * bytes, restore's error messages, Rust's {:?} quoting and a large state. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv.h"

static int passed, failed;

#define CHECK(cond)                                                           \
    do {                                                                      \
        if (cond) {                                                           \
            passed++;                                                         \
        } else {                                                              \
            failed++;                                                         \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                     \
    } while (0)

/* Result of one call as text: the bytes, or "err: " and the message. */
static char *outcome(bool ok, kv_buf *b) {
    size_t prefix = ok ? 0 : 5;
    char *s = malloc(prefix + b->len + 1);
    memcpy(s, "err: ", prefix);
    if (b->len) memcpy(s + prefix, b->ptr, b->len);
    s[prefix + b->len] = 0;
    buf_free(b);
    return s;
}

static void check_text(const char *got, const char *want, const char *what) {
    if (strcmp(got, want) == 0) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "MISMATCH %s\n  want %s\n  got  %s\n", what, want, got);
    }
}

/* What the host does for `propose TEXT` / `query TEXT`: encode, then apply
 * or query, then render. */
static char *run_text(kv_map *kv, bool propose, const char *text) {
    kv_buf entry = {0}, result = {0}, rendered = {0};
    if (!kv_encode((const uint8_t *)text, strlen(text), &entry)) return outcome(false, &entry);
    bool ok = propose ? kv_apply(kv, entry.ptr, entry.len, &result)
                      : kv_query(kv, entry.ptr, entry.len, &result);
    buf_free(&entry);
    if (!ok) return outcome(false, &result);
    ok = kv_render(result.ptr, result.len, &rendered);
    buf_free(&result);
    return outcome(ok, &rendered);
}

/* What a hostile client does: bytes straight to apply or query. */
static char *run_raw(kv_map *kv, bool propose, const uint8_t *bytes, size_t len) {
    kv_buf result = {0};
    bool ok = propose ? kv_apply(kv, bytes, len, &result) : kv_query(kv, bytes, len, &result);
    return outcome(ok, &result);
}

/* ---- the shared conformance cases ------------------------------------------ */

/* Turns \xNN escapes into bytes, in place; returns the new length. */
static size_t unescape(char *s) {
    size_t out = 0;
    for (size_t i = 0; s[i];) {
        if (s[i] == '\\' && s[i + 1] == 'x' && s[i + 2] && s[i + 3]) {
            char hex[3] = {s[i + 2], s[i + 3], 0};
            s[out++] = (char)strtol(hex, NULL, 16);
            i += 4;
        } else {
            s[out++] = s[i++];
        }
    }
    return out;
}

static void run_cases(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        failed++;
        return;
    }
    kv_map kv = KV_MAP_EMPTY;
    char line[4096];
    int cases = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (line[0] == 0 || line[0] == '#') continue;
        /* KIND COMMAND => EXPECTED, split at the first space and the last " => ". */
        char *space = strchr(line, ' ');
        char *arrow = NULL;
        for (char *p = line; (p = strstr(p, " => ")); p++) arrow = p;
        if (!space || !arrow || arrow < space) {
            fprintf(stderr, "bad case line: %s\n", line);
            failed++;
            continue;
        }
        char label[4096];
        snprintf(label, sizeof label, "%s", line);
        *space = 0;
        *arrow = 0;
        const char *kind = line, *expected = arrow + 4;
        char *command = space + 1;
        char *got;
        if (strcmp(kind, "propose") == 0 || strcmp(kind, "query") == 0) {
            got = run_text(&kv, kind[0] == 'p', command);
        } else if (strcmp(kind, "raw-propose") == 0 || strcmp(kind, "raw-query") == 0) {
            size_t len = unescape(command);
            got = run_raw(&kv, kind[4] == 'p', (const uint8_t *)command, len);
        } else {
            fprintf(stderr, "unknown kind in: %s\n", label);
            failed++;
            continue;
        }
        check_text(got, expected, label);
        free(got);
        cases++;
    }
    fclose(f);
    map_clear(&kv);
    printf("conformance cases: %d run\n", cases);
}

/* ---- what the cases do not cover ------------------------------------------ */

static void test_encode_canonical(void) {
    struct {
        const char *text, *want;
    } cases[] = {
        {"  set   a  1 ", "set a 1"},
        {"incr n", "incr n 1"},
        {"incr k +5", "incr k 5"},
        {"incr k 007", "incr k 7"},
        {"incr k -0", "incr k 0"},
        {"incr k -9223372036854775808", "incr k -9223372036854775808"},
        {"\xc2\xa0get\xe3\x80\x80k\xe2\x80\xa8", "get k"}, /* Unicode whitespace */
        {"len\x0b", "len"},
        {"append l\fx", "append l x"},
        {"incr k +", "err: increment \"+\" is not an integer"},
        {"incr k +-1", "err: increment \"+-1\" is not an integer"},
        {"incr k  1 ", "incr k 1"},
        {"incr k 9223372036854775807", "incr k 9223372036854775807"},
        {"incr k -9223372036854775809", "err: increment \"-9223372036854775809\" is not an integer"},
        {"incr k \xef\xbc\x91", "err: increment \"\xef\xbc\x91\" is not an integer"}, /* fullwidth 1 */
        /* Rust's {:?}: named escapes, \u{..} for controls and combining marks,
         * everything else as is. */
        {"a\"b\\c", "err: unknown command \"a\\\"b\\\\c\": expected set, del, incr, append, get or len"},
        {"x\x01y\x7f", "err: unknown command \"x\\u{1}y\\u{7f}\": expected set, del, incr, append, get or len"},
        {"q\xcc\x81", "err: unknown command \"q\\u{301}\": expected set, del, incr, append, get or len"},
        {"\xc2\x80\xe2\x80\x8b\xef\xbb\xbf", "err: unknown command \"\\u{80}\\u{200b}\\u{feff}\": expected set, del, incr, append, get or len"},
        {"\xee\x80\x80\xf4\x8f\xbf\xbf", "err: unknown command \"\\u{e000}\\u{10ffff}\": expected set, del, incr, append, get or len"},
        {"caf\xc3\xa9'\xf0\x9f\xa6\x80", "err: unknown command \"caf\xc3\xa9'\xf0\x9f\xa6\x80\": expected set, del, incr, append, get or len"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kv_buf out = {0};
        bool ok = kv_encode((const uint8_t *)cases[i].text, strlen(cases[i].text), &out);
        char *got = outcome(ok, &out);
        check_text(got, cases[i].want, cases[i].text);
        free(got);
    }
    /* A NUL inside a word is part of the word (Rust: "\0"). */
    kv_buf out = {0};
    static const char want[] =
        "unknown command \"a\\0b\": expected set, del, incr, append, get or len";
    CHECK(!kv_encode((const uint8_t *)"a\0b", 3, &out));
    CHECK(out.len == sizeof want - 1 && memcmp(out.ptr, want, out.len) == 0);
    buf_free(&out);
}

static void test_utf8(void) {
    struct {
        const char *bytes;
        bool valid;
    } cases[] = {
        {"", true}, {"abc", true}, {"\xc3\xa9", true}, {"\xf0\x9f\xa6\x80", true},
        {"\xef\xbf\xbf", true}, {"\xf4\x8f\xbf\xbf", true}, {"\xed\x9f\xbf", true},
        {"\xc0\x80", false},           /* overlong NUL */
        {"\xc1\xbf", false},           /* overlong */
        {"\xe0\x9f\xbf", false},       /* overlong */
        {"\xf0\x8f\xbf\xbf", false},   /* overlong */
        {"\xed\xa0\x80", false},       /* surrogate */
        {"\xf4\x90\x80\x80", false},   /* above U+10FFFF */
        {"\xf5\x80\x80\x80", false},   /* F5 */
        {"\xff", false},               /* FF */
        {"\x80", false},               /* lone continuation */
        {"\xe2\x82", false},           /* truncated */
        {"\xe2\x82x", false},          /* bad continuation */
        {"\xc3", false},               /* truncated */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        CHECK(utf8_valid((const uint8_t *)cases[i].bytes, strlen(cases[i].bytes)) == cases[i].valid);
    }
    kv_buf out = {0};
    CHECK(!kv_decode((const uint8_t *)"\xff", 1, &out));
    CHECK(out.len == 23 && memcmp(out.ptr, "entry is not UTF-8 text", 23) == 0);
    buf_free(&out);
    CHECK(!kv_render((const uint8_t *)"\xc3", 1, &out));
    CHECK(out.len == 26 && memcmp(out.ptr, "response is not UTF-8 text", 26) == 0);
    buf_free(&out);
    CHECK(kv_decode((const uint8_t *)"set  a 1", 8, &out)); /* returned as is */
    CHECK(out.len == 8 && memcmp(out.ptr, "set  a 1", 8) == 0);
    buf_free(&out);
}

static void test_errors_change_nothing(void) {
    kv_map kv = KV_MAP_EMPTY;
    free(run_text(&kv, true, "set word hello"));
    free(run_text(&kv, true, "set big 9223372036854775807"));
    kv_buf before = {0};
    kv_snapshot(&kv, &before);
    const char *bad[] = {"", "frob a", "set a", "set a b c", "incr a x", "incr word",
                         "incr big", "get word", "len", "del"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *got = run_raw(&kv, true, (const uint8_t *)bad[i], strlen(bad[i]));
        CHECK(strncmp(got, "err: ", 5) == 0);
        free(got);
    }
    char *got = run_raw(&kv, false, (const uint8_t *)"set a 1", 7);
    CHECK(strncmp(got, "err: ", 5) == 0);
    free(got);
    kv_buf after = {0};
    kv_snapshot(&kv, &after);
    CHECK(before.len == after.len && memcmp(before.ptr, after.ptr, before.len) == 0);
    buf_free(&before);
    buf_free(&after);
    /* Values that are not canonical integers still parse like Rust's i64. */
    free(run_text(&kv, true, "set p +5"));
    got = run_text(&kv, true, "incr p");
    check_text(got, "6", "incr of +5");
    free(got);
    free(run_text(&kv, true, "set s -"));
    got = run_text(&kv, true, "incr s");
    check_text(got, "err: value of \"s\" is not an integer", "incr of -");
    free(got);
    map_clear(&kv);
}

/* The snapshot bytes for {"a": "1", "bb": "x y"}, written out by hand. */
static const uint8_t SNAP_AB[] = {
    'R', 'K', 'V', '1', 2, 0, 0, 0, 0, 0, 0, 0,
    1, 0, 0, 0, 'a', 1, 0, 0, 0, '1',
    2, 0, 0, 0, 'b', 'b', 3, 0, 0, 0, 'x', ' ', 'y',
};

static char *restore_outcome(kv_map *kv, const uint8_t *bytes, size_t len) {
    kv_buf err = {0};
    bool ok = kv_restore(kv, bytes, len, &err);
    return outcome(ok, &err);
}

static void test_snapshot(void) {
    kv_map kv = KV_MAP_EMPTY;
    free(run_text(&kv, true, "append bb x"));
    free(run_text(&kv, true, "set a 1"));
    free(run_text(&kv, true, "append bb y"));
    kv_buf snap = {0};
    kv_snapshot(&kv, &snap);
    CHECK(snap.len == sizeof SNAP_AB && memcmp(snap.ptr, SNAP_AB, snap.len) == 0);
    buf_free(&snap);

    kv_map empty = KV_MAP_EMPTY;
    kv_snapshot(&empty, &snap);
    CHECK(snap.len == 12 && memcmp(snap.ptr, "RKV1\0\0\0\0\0\0\0\0", 12) == 0);
    buf_free(&snap);

    /* Round trip, and every kind of corruption (messages as the Rust kv's). */
    kv_map other = KV_MAP_EMPTY;
    char *got = restore_outcome(&other, SNAP_AB, sizeof SNAP_AB);
    check_text(got, "", "restore");
    free(got);
    got = run_text(&other, false, "get bb");
    check_text(got, "x y", "restored get");
    free(got);
    uint8_t buf[64];
    struct {
        size_t len;
        void (*edit)(uint8_t *);
        const char *want;
    } bad[] = {
        {0, NULL, "err: corrupt kv snapshot: truncated"},
        {3, NULL, "err: corrupt kv snapshot: truncated"},
        {11, NULL, "err: corrupt kv snapshot: truncated"},
        {sizeof SNAP_AB - 1, NULL, "err: corrupt kv snapshot: truncated"},
        {sizeof SNAP_AB + 1, NULL, "err: corrupt kv snapshot: trailing bytes"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(buf, 0, sizeof buf);
        memcpy(buf, SNAP_AB, bad[i].len < sizeof SNAP_AB ? bad[i].len : sizeof SNAP_AB);
        got = restore_outcome(&other, buf, bad[i].len);
        check_text(got, bad[i].want, "corrupt snapshot");
        free(got);
    }
    memcpy(buf, SNAP_AB, sizeof SNAP_AB);
    buf[0] = 'X';
    got = restore_outcome(&other, buf, sizeof SNAP_AB);
    check_text(got, "err: not a kv snapshot: bad magic", "bad magic");
    free(got);
    got = restore_outcome(&other, (const uint8_t *)"XXX", 3);
    check_text(got, "err: corrupt kv snapshot: truncated", "short magic");
    free(got);
    memcpy(buf, SNAP_AB, sizeof SNAP_AB);
    buf[26] = 'a'; /* "bb" -> "ab": still after "a" */
    got = restore_outcome(&other, buf, sizeof SNAP_AB);
    check_text(got, "", "ascending keys");
    free(got);
    buf[16] = 'b'; /* "a" -> "b": now "b" then "ab" */
    got = restore_outcome(&other, buf, sizeof SNAP_AB);
    check_text(got, "err: corrupt kv snapshot: keys not in ascending order", "descending keys");
    free(got);
    memcpy(buf, SNAP_AB, sizeof SNAP_AB);
    buf[26] = 'a';
    buf[27] = 0; /* "bb" -> "a\0": equal prefix "a", longer: ascending */
    got = restore_outcome(&other, buf, sizeof SNAP_AB);
    check_text(got, "", "longer key after its prefix");
    free(got);
    static const uint8_t DUPLICATE[] = {'R', 'K', 'V', '1', 2, 0, 0, 0, 0, 0, 0, 0,
                                        1, 0, 0, 0, 'a', 0, 0, 0, 0,
                                        1, 0, 0, 0, 'a', 0, 0, 0, 0};
    got = restore_outcome(&other, DUPLICATE, sizeof DUPLICATE);
    check_text(got, "err: corrupt kv snapshot: keys not in ascending order", "duplicate key");
    free(got);
    memcpy(buf, SNAP_AB, sizeof SNAP_AB);
    buf[31] = 1; /* value length of "bb" 3 -> 2^24 + 3 */
    got = restore_outcome(&other, buf, sizeof SNAP_AB);
    check_text(got, "err: corrupt kv snapshot: truncated", "field longer than the rest");
    free(got);
    memcpy(buf, SNAP_AB, sizeof SNAP_AB);
    buf[21] = 0xff; /* value of "a" not UTF-8 */
    got = restore_outcome(&other, buf, sizeof SNAP_AB);
    check_text(got, "err: corrupt kv snapshot: field is not UTF-8", "non-UTF-8 value");
    free(got);
    memcpy(buf, SNAP_AB, sizeof SNAP_AB);
    buf[4] = 0xff; /* count: 255 pairs, only 2 present */
    got = restore_outcome(&other, buf, sizeof SNAP_AB);
    check_text(got, "err: corrupt kv snapshot: truncated", "count too large");
    free(got);
    memcpy(buf, SNAP_AB, sizeof SNAP_AB);
    buf[11] = 0xff; /* count: ~2^63 */
    got = restore_outcome(&other, buf, sizeof SNAP_AB);
    check_text(got, "err: corrupt kv snapshot: truncated", "huge count");
    free(got);
    /* Failed restores left the last good state in place. */
    got = run_text(&other, false, "len");
    check_text(got, "2", "state after failed restores");
    free(got);
    /* An empty key and an empty value are fine in a snapshot. */
    static const uint8_t EMPTY_KEY[] = {'R', 'K', 'V', '1', 1, 0, 0, 0, 0, 0, 0, 0,
                                        0, 0, 0, 0, 0, 0, 0, 0};
    got = restore_outcome(&other, EMPTY_KEY, sizeof EMPTY_KEY);
    check_text(got, "", "empty key");
    free(got);
    kv_snapshot(&other, &snap);
    CHECK(snap.len == sizeof EMPTY_KEY && memcmp(snap.ptr, EMPTY_KEY, snap.len) == 0);
    buf_free(&snap);
    map_clear(&other);
    map_clear(&kv);
}

/* Many keys in scrambled order, deletes, the snapshot's order, and a
 * restore of it: exercises the tree's rotations. */
static void test_large_state(void) {
    enum { N = 100000 };
    kv_map kv = KV_MAP_EMPTY;
    char cmd[64];
    for (unsigned i = 0; i < N; i++) {
        unsigned k = (i * 7919u) % N; /* a permutation of 0..N-1 */
        snprintf(cmd, sizeof cmd, "set k%u v%u", k, k);
        free(run_raw(&kv, true, (const uint8_t *)cmd, strlen(cmd)));
    }
    CHECK(kv.count == N);
    for (unsigned k = 0; k < N; k += 3) {
        snprintf(cmd, sizeof cmd, "del k%u", k);
        char *got = run_raw(&kv, true, (const uint8_t *)cmd, strlen(cmd));
        check_text(got, "1", cmd);
        free(got);
    }
    size_t left = N - (N + 2) / 3;
    CHECK(kv.count == left);
    /* The AVL bound: height <= 1.44 log2(n + 2). */
    CHECK(kv.root->height <= 25);
    kv_buf snap = {0};
    kv_snapshot(&kv, &snap);
    /* Walk the snapshot: ascending keys, the right count. */
    size_t at = 12, pairs = 0;
    const uint8_t *prev = NULL;
    uint32_t prev_len = 0;
    bool sorted = true;
    while (at < snap.len) {
        uint32_t klen;
        memcpy(&klen, snap.ptr + at, 4); /* little-endian host assumed */
        const uint8_t *key = snap.ptr + at + 4;
        if (prev && key_cmp(prev, prev_len, key, klen) >= 0) sorted = false;
        prev = key;
        prev_len = klen;
        uint32_t vlen;
        memcpy(&vlen, key + klen, 4);
        at += 8 + klen + vlen;
        pairs++;
    }
    CHECK(sorted && pairs == left && at == snap.len);
    kv_map copy = KV_MAP_EMPTY;
    kv_buf err = {0};
    CHECK(kv_restore(&copy, snap.ptr, snap.len, &err));
    buf_free(&err);
    kv_buf again = {0};
    kv_snapshot(&copy, &again);
    CHECK(again.len == snap.len && memcmp(again.ptr, snap.ptr, snap.len) == 0);
    char *got = run_text(&copy, false, "get k99999");
    check_text(got, "(nil)", "deleted key");
    free(got);
    got = run_text(&copy, false, "get k99998");
    check_text(got, "v99998", "kept key");
    free(got);
    /* The restored tree takes further updates. */
    for (unsigned k = 0; k < N; k += 2) {
        snprintf(cmd, sizeof cmd, "incr n%u %u", k, k);
        free(run_raw(&copy, true, (const uint8_t *)cmd, strlen(cmd)));
    }
    CHECK(copy.count == left + N / 2);
    buf_free(&snap);
    buf_free(&again);
    map_clear(&copy);
    map_clear(&kv);
}

static void test_append_many(void) {
    kv_map kv = KV_MAP_EMPTY;
    for (int i = 0; i < 10000; i++) free(run_raw(&kv, true, (const uint8_t *)"append l ab", 11));
    const kv_node *n = map_find(&kv, (const uint8_t *)"l", 1);
    CHECK(n && n->value_len == 10000 * 3 - 1);
    CHECK(n && memcmp(n->value, "ab ab ab", 8) == 0);
    map_clear(&kv);
}

int main(int argc, char **argv) {
    run_cases(argc > 1 ? argv[1] : "../../tests/conformance/kv.cases");
    test_encode_canonical();
    test_utf8();
    test_errors_change_nothing();
    test_snapshot();
    test_large_state();
    test_append_many();
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
