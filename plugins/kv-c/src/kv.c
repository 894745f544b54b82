/* kv: the command language and the snapshot format. See kv.h.
 *
 * | command        | kind     | result                                       |
 * |----------------|----------|----------------------------------------------|
 * | `set K V`      | proposal | `OK`                                         |
 * | `del K`        | proposal | `1` if K existed, else `0`                   |
 * | `incr K [BY]`  | proposal | the new integer (K absent counts as 0)       |
 * | `append K V`   | proposal | `OK`; V joins the space-separated list at K  |
 * | `get K`        | query    | the value, or `(nil)`                        |
 * | `len`          | query    | the number of keys                           |
 *
 * Every message below is copied from plugins/kv/src/lib.rs; where Rust
 * writes `{x:?}`, this file calls buf_put_debug. */
#include "kv.h"

#include <stdlib.h>
#include <string.h>

/* ---- parsing --------------------------------------------------------------- */

typedef enum { CMD_SET, CMD_DEL, CMD_INCR, CMD_APPEND, CMD_GET, CMD_LEN } cmd_kind;

/* One parsed command. key and value point into the text that was parsed. */
typedef struct {
    cmd_kind kind;
    kv_str key;
    kv_str value;
    int64_t by; /* incr's increment */
} command;

static bool word_is(kv_str word, const char *literal) {
    size_t n = strlen(literal);
    return word.len == n && memcmp(word.ptr, literal, n) == 0;
}

static bool usage(kv_buf *err, const char *text) {
    buf_puts(err, "wrong number of arguments: usage: ");
    buf_puts(err, text);
    return false;
}

/* Parses valid UTF-8 command text. */
static bool parse(const uint8_t *text, size_t len, command *cmd, kv_buf *err) {
    /* No command has more than 4 words; split_words still counts them all,
     * so `set a b c` is reported as the wrong number of arguments. */
    kv_str w[4];
    size_t words = split_words(text, len, w, 4);
    if (words == 0) {
        buf_puts(err, "empty command");
        return false;
    }
    size_t args = words - 1;
    kv_str verb = w[0];
    *cmd = (command){0};
    if (word_is(verb, "set")) {
        if (args != 2) return usage(err, "set KEY VALUE");
        *cmd = (command){.kind = CMD_SET, .key = w[1], .value = w[2]};
    } else if (word_is(verb, "del")) {
        if (args != 1) return usage(err, "del KEY");
        *cmd = (command){.kind = CMD_DEL, .key = w[1]};
    } else if (word_is(verb, "incr")) {
        if (args != 1 && args != 2) return usage(err, "incr KEY [BY]");
        *cmd = (command){.kind = CMD_INCR, .key = w[1], .by = 1};
        if (args == 2 && !parse_i64(w[2], &cmd->by)) {
            buf_puts(err, "increment ");
            buf_put_debug(err, w[2].ptr, w[2].len);
            buf_puts(err, " is not an integer");
            return false;
        }
    } else if (word_is(verb, "append")) {
        if (args != 2) return usage(err, "append KEY VALUE");
        *cmd = (command){.kind = CMD_APPEND, .key = w[1], .value = w[2]};
    } else if (word_is(verb, "get")) {
        if (args != 1) return usage(err, "get KEY");
        *cmd = (command){.kind = CMD_GET, .key = w[1]};
    } else if (word_is(verb, "len")) {
        if (args != 0) return usage(err, "len");
        *cmd = (command){.kind = CMD_LEN};
    } else {
        buf_puts(err, "unknown command ");
        buf_put_debug(err, verb.ptr, verb.len);
        buf_puts(err, ": expected set, del, incr, append, get or len");
        return false;
    }
    return true;
}

/* Parses entry or request bytes, which are untrusted: not even UTF-8 yet. */
static bool parse_bytes(const uint8_t *bytes, size_t len, command *cmd, kv_buf *err) {
    if (!utf8_valid(bytes, len)) {
        buf_puts(err, "command is not UTF-8 text");
        return false;
    }
    return parse(bytes, len, cmd, err);
}

/* The canonical text of a command: its words joined by one space, incr
 * always with its increment. This is what kv stores as entry bytes. */
static void canonical(const command *cmd, kv_buf *out) {
    static const char *const verbs[] = {"set", "del", "incr", "append", "get", "len"};
    buf_puts(out, verbs[cmd->kind]);
    if (cmd->kind == CMD_LEN) return;
    buf_put_byte(out, ' ');
    buf_put(out, cmd->key.ptr, cmd->key.len);
    if (cmd->kind == CMD_SET || cmd->kind == CMD_APPEND) {
        buf_put_byte(out, ' ');
        buf_put(out, cmd->value.ptr, cmd->value.len);
    } else if (cmd->kind == CMD_INCR) {
        buf_put_byte(out, ' ');
        buf_put_i64(out, cmd->by);
    }
}

/* Writes `{canonical:?}`: the command's canonical text, quoted. */
static void put_quoted_canonical(const command *cmd, kv_buf *out) {
    kv_buf text = {0};
    canonical(cmd, &text);
    buf_put_debug(out, text.ptr, text.len);
    buf_free(&text);
}

static bool is_query(const command *cmd) { return cmd->kind == CMD_GET || cmd->kind == CMD_LEN; }

/* ---- state-machine ----------------------------------------------------- */

/* Every branch decides success or failure before touching the state, so an
 * error leaves it unchanged. */
bool kv_apply(kv_map *state, const uint8_t *entry, size_t len, kv_buf *out) {
    command cmd;
    if (!parse_bytes(entry, len, &cmd, out)) return false;
    if (is_query(&cmd)) {
        put_quoted_canonical(&cmd, out);
        buf_puts(out, " is a query, not a proposal: use `query`");
        return false;
    }
    kv_str k = cmd.key;
    switch (cmd.kind) {
    case CMD_SET:
        node_set_value(map_upsert(state, k.ptr, k.len), cmd.value.ptr, cmd.value.len);
        buf_puts(out, "OK");
        return true;
    case CMD_DEL:
        buf_puts(out, map_remove(state, k.ptr, k.len) ? "1" : "0");
        return true;
    case CMD_INCR: {
        int64_t current = 0, next;
        kv_node *n = map_find(state, k.ptr, k.len);
        if (n && !parse_i64((kv_str){n->value, n->value_len}, &current)) {
            buf_puts(out, "value of ");
            buf_put_debug(out, k.ptr, k.len);
            buf_puts(out, " is not an integer");
            return false;
        }
        if (__builtin_add_overflow(current, cmd.by, &next)) {
            buf_puts(out, "incr would overflow the value of ");
            buf_put_debug(out, k.ptr, k.len);
            return false;
        }
        size_t start = out->len;
        buf_put_i64(out, next);
        node_set_value(map_upsert(state, k.ptr, k.len), out->ptr + start, out->len - start);
        return true;
    }
    case CMD_APPEND: {
        kv_node *n = map_find(state, k.ptr, k.len);
        if (n) {
            node_append_value(n, (const uint8_t *)" ", 1);
            node_append_value(n, cmd.value.ptr, cmd.value.len);
        } else {
            node_set_value(map_upsert(state, k.ptr, k.len), cmd.value.ptr, cmd.value.len);
        }
        buf_puts(out, "OK");
        return true;
    }
    default:
        __builtin_trap(); /* queries were handled above */
    }
}

bool kv_query(const kv_map *state, const uint8_t *request, size_t len, kv_buf *out) {
    command cmd;
    if (!parse_bytes(request, len, &cmd, out)) return false;
    if (cmd.kind == CMD_GET) {
        const kv_node *n = map_find(state, cmd.key.ptr, cmd.key.len);
        if (n) {
            buf_put(out, n->value, n->value_len);
        } else {
            buf_puts(out, "(nil)");
        }
        return true;
    }
    if (cmd.kind == CMD_LEN) {
        buf_put_i64(out, (int64_t)state->count);
        return true;
    }
    put_quoted_canonical(&cmd, out);
    buf_puts(out, " changes state, so it is a proposal, not a query: use `propose`");
    return false;
}

/* ---- snapshot ------------------------------------------------------------ */
/*
 *   magic   4 bytes   "RKV1"
 *   count   u64 LE    number of pairs
 *   pairs   count x { key_len u32 LE, key (UTF-8), value_len u32 LE, value (UTF-8) }
 *
 * Pairs sorted by key bytes, ascending, no duplicates, nothing after the last
 * pair. Shared by kv in every language. */

static const uint8_t SNAPSHOT_MAGIC[4] = {'R', 'K', 'V', '1'};

static void add_pair_size(const kv_node *n, void *total) {
    *(size_t *)total += 8 + n->key_len + n->value_len;
}

static void put_pair(const kv_node *n, void *out) {
    /* Lengths fit in u32: a wasm32 memory is at most 4 GiB. */
    buf_put_u32le(out, (uint32_t)n->key_len);
    buf_put(out, n->key, n->key_len);
    buf_put_u32le(out, (uint32_t)n->value_len);
    buf_put(out, n->value, n->value_len);
}

void kv_snapshot(const kv_map *state, kv_buf *out) {
    size_t total = 12;
    map_walk(state, add_pair_size, &total);
    buf_reserve(out, total); /* one allocation for the whole snapshot */
    buf_put(out, SNAPSHOT_MAGIC, 4);
    buf_put_u64le(out, (uint64_t)state->count);
    map_walk(state, put_pair, out); /* in-order walk: ascending keys */
}

/* Reads the snapshot front to back. */
typedef struct {
    const uint8_t *bytes;
    size_t len;
    size_t at;
} reader;

static bool take(reader *r, size_t n, const uint8_t **out) {
    if (n > r->len - r->at) return false;
    *out = r->bytes + r->at;
    r->at += n;
    return true;
}

static uint64_t le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* A u32 length, then that many bytes of UTF-8. The error messages are in
 * the same order as the Rust kv's checks. */
static const char *take_field(reader *r, kv_str *field) {
    const uint8_t *p;
    if (!take(r, 4, &p)) return "corrupt kv snapshot: truncated";
    size_t n = (size_t)le(p, 4);
    if (!take(r, n, &p)) return "corrupt kv snapshot: truncated";
    if (!utf8_valid(p, n)) return "corrupt kv snapshot: field is not UTF-8";
    *field = (kv_str){p, n};
    return NULL;
}

static const char *decode_snapshot(reader *r, kv_node ***nodes, size_t *count) {
    const uint8_t *p;
    if (!take(r, 4, &p)) return "corrupt kv snapshot: truncated";
    if (memcmp(p, SNAPSHOT_MAGIC, 4) != 0) return "not a kv snapshot: bad magic";
    if (!take(r, 8, &p)) return "corrupt kv snapshot: truncated";
    uint64_t pairs = le(p, 8);
    /* `pairs` is untrusted: grow the array as pairs actually arrive rather
     * than allocating `pairs` slots up front. */
    size_t cap = 0;
    for (uint64_t i = 0; i < pairs; i++) {
        kv_str key, value;
        const char *err = take_field(r, &key);
        if (!err) err = take_field(r, &value);
        if (err) return err;
        if (*count > 0) {
            const kv_node *prev = (*nodes)[*count - 1];
            if (key_cmp(prev->key, prev->key_len, key.ptr, key.len) >= 0) {
                return "corrupt kv snapshot: keys not in ascending order";
            }
        }
        if (*count == cap) {
            cap = cap ? cap * 2 : 64;
            *nodes = xrealloc(*nodes, cap * sizeof **nodes);
        }
        (*nodes)[(*count)++] = node_new(key.ptr, key.len, value.ptr, value.len);
    }
    if (r->at != r->len) return "corrupt kv snapshot: trailing bytes";
    return NULL;
}

bool kv_restore(kv_map *state, const uint8_t *snapshot, size_t len, kv_buf *err) {
    reader r = {snapshot, len, 0};
    kv_node **nodes = NULL;
    size_t count = 0;
    const char *message = decode_snapshot(&r, &nodes, &count);
    if (message) {
        for (size_t i = 0; i < count; i++) node_free(nodes[i]);
        free(nodes);
        buf_puts(err, message);
        return false;
    }
    /* Only now, with the new state complete, drop the old one. */
    map_clear(state);
    *state = map_from_sorted(nodes, count);
    free(nodes);
    return true;
}

/* ---- codec --------------------------------------------------------------- */

bool kv_encode(const uint8_t *text, size_t len, kv_buf *out) {
    command cmd;
    /* `string` arguments are valid UTF-8 by the canonical ABI; parse_bytes
     * checks anyway, which costs little and keeps native callers honest. */
    if (!parse_bytes(text, len, &cmd, out)) return false;
    canonical(&cmd, out);
    return true;
}

bool kv_decode(const uint8_t *entry, size_t len, kv_buf *out) {
    if (!utf8_valid(entry, len)) {
        buf_puts(out, "entry is not UTF-8 text");
        return false;
    }
    buf_put(out, entry, len);
    return true;
}

bool kv_render(const uint8_t *response, size_t len, kv_buf *out) {
    if (!utf8_valid(response, len)) {
        buf_puts(out, "response is not UTF-8 text");
        return false;
    }
    buf_put(out, response, len);
    return true;
}
