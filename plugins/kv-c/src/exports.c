/* The plugin's exports: wit/0.2.0/fsm.wit's `state-machine` and `codec`
 * interfaces, implemented on top of kv.c. Snapshots cross the boundary in
 * chunks: kv.c makes and reads the whole snapshot, and this file hands it
 * out, and collects it, a chunk at a time.
 *
 * This is the only file that knows about the WebAssembly component ABI. The
 * functions it defines are declared in plugin.h, which wit-bindgen generates
 * from ../../wit/0.2.0 at build time (see build.sh); the generated plugin.c turns
 * the canonical ABI's flat arguments into these calls and back.
 *
 * Ownership, as wit-bindgen's C bindings define it:
 * - arguments (`entry`, `text`, ...) were allocated by the host through
 *   cabi_realloc (that is, malloc) and now belong to us: free each one, on
 *   every path, once done with it;
 * - results (`ret`, `err`) are handed over: the generated post-return
 *   function frees them with free() after the host has copied them out.
 *   So a result must be malloc'd memory (or NULL with length 0), never a
 *   pointer into our state or a string literal.
 *
 * Each function returns true for `ok` (filling *ret) and false for `err`
 * (filling *err). */

#include "kv.h"
#include "plugin.h" /* generated */

/* The replicated state. One instance of the component is one replica; the
 * host calls one function at a time, so a plain global is all we need.
 * Zero-initialized: an empty map. */
static kv_map STATE;

static void hand_over_err(kv_buf *b, plugin_string_t *err);

/* A snapshot being read (taken whole at its begin, so entries applied while
 * the host reads the chunks do not show in them), and a restore's pieces
 * being collected. */
static kv_buf OUTGOING;
static size_t OUTGOING_AT;
static kv_buf INCOMING;
static bool RESTORING;

/* An `err` with a fixed message (malloc'd, as results must be). */
static bool fail(const char *message, plugin_string_t *err) {
    kv_buf b = {0};
    buf_puts(&b, message);
    hand_over_err(&b, err);
    return false;
}

/* Hands a buffer's bytes over as an ABI list or string. The post-return
 * function frees only non-empty results, so an empty buffer is freed here. */
static void hand_over(kv_buf *b, uint8_t **ptr, size_t *len) {
    if (b->len == 0) buf_free(b);
    *ptr = b->ptr;
    *len = b->len;
}

static void hand_over_err(kv_buf *b, plugin_string_t *err) {
    hand_over(b, &err->ptr, &err->len);
}

/* Gives the result of a kv_* call to `ret` (ok) or `err` (not ok). */
static bool give_list(bool ok, kv_buf *b, plugin_list_u8_t *ret, plugin_string_t *err) {
    if (ok) {
        hand_over(b, &ret->ptr, &ret->len);
    } else {
        hand_over(b, &err->ptr, &err->len);
    }
    return ok;
}

static bool give_string(bool ok, kv_buf *b, plugin_string_t *ret, plugin_string_t *err) {
    hand_over(b, ok ? &ret->ptr : &err->ptr, ok ? &ret->len : &err->len);
    return ok;
}

/* ---- state-machine ----------------------------------------------------- */

bool exports_raftify_fsm_state_machine_apply(uint64_t index, plugin_list_u8_t *entry,
                                             plugin_list_u8_t *ret, plugin_string_t *err) {
    (void)index; /* kv's results do not depend on the log index */
    kv_buf out = {0};
    bool ok = kv_apply(&STATE, entry->ptr, entry->len, &out);
    plugin_list_u8_free(entry);
    return give_list(ok, &out, ret, err);
}

bool exports_raftify_fsm_state_machine_query(plugin_list_u8_t *request, plugin_list_u8_t *ret,
                                             plugin_string_t *err) {
    kv_buf out = {0};
    bool ok = kv_query(&STATE, request->ptr, request->len, &out);
    plugin_list_u8_free(request);
    return give_list(ok, &out, ret, err);
}

bool exports_raftify_fsm_state_machine_snapshot_begin(plugin_string_t *err) {
    (void)err; /* a snapshot of a kv cannot fail */
    buf_free(&OUTGOING);
    OUTGOING_AT = 0;
    kv_snapshot(&STATE, &OUTGOING);
    return true;
}

bool exports_raftify_fsm_state_machine_snapshot_next(uint32_t max_bytes, plugin_list_u8_t *ret,
                                                     plugin_string_t *err) {
    size_t left = OUTGOING.len - OUTGOING_AT;
    size_t take = left < (size_t)max_bytes ? left : (size_t)max_bytes;
    if (take == 0 && left > 0) take = 1;
    kv_buf out = {0};
    if (take > 0) buf_put(&out, OUTGOING.ptr + OUTGOING_AT, take);
    OUTGOING_AT += take;
    if (OUTGOING_AT >= OUTGOING.len) {
        buf_free(&OUTGOING);
        OUTGOING_AT = 0;
    }
    return give_list(true, &out, ret, err);
}

bool exports_raftify_fsm_state_machine_restore_begin(plugin_string_t *err) {
    (void)err;
    buf_free(&INCOMING);
    RESTORING = true;
    return true;
}

bool exports_raftify_fsm_state_machine_restore_chunk(plugin_list_u8_t *chunk, plugin_string_t *err) {
    if (!RESTORING) {
        plugin_list_u8_free(chunk);
        return fail("restore-chunk without restore-begin", err);
    }
    buf_put(&INCOMING, chunk->ptr, chunk->len);
    plugin_list_u8_free(chunk);
    return true;
}

bool exports_raftify_fsm_state_machine_restore_finish(plugin_string_t *err) {
    if (!RESTORING) return fail("restore-finish without restore-begin", err);
    RESTORING = false;
    kv_buf message = {0};
    bool ok = kv_restore(&STATE, INCOMING.ptr, INCOMING.len, &message);
    buf_free(&INCOMING);
    if (!ok) hand_over_err(&message, err);
    return ok;
}

/* ---- codec --------------------------------------------------------------- */

bool exports_raftify_fsm_codec_encode(plugin_string_t *text, plugin_list_u8_t *ret,
                                      plugin_string_t *err) {
    kv_buf out = {0};
    bool ok = kv_encode(text->ptr, text->len, &out);
    plugin_string_free(text);
    return give_list(ok, &out, ret, err);
}

bool exports_raftify_fsm_codec_decode(plugin_list_u8_t *entry, plugin_string_t *ret,
                                      plugin_string_t *err) {
    kv_buf out = {0};
    bool ok = kv_decode(entry->ptr, entry->len, &out);
    plugin_list_u8_free(entry);
    return give_string(ok, &out, ret, err);
}

bool exports_raftify_fsm_codec_render(plugin_list_u8_t *response, plugin_string_t *ret,
                                      plugin_string_t *err) {
    kv_buf out = {0};
    bool ok = kv_render(response->ptr, response->len, &out);
    plugin_list_u8_free(response);
    return give_string(ok, &out, ret, err);
}
