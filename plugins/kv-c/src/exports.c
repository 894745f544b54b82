/* The plugin's exports: wit/fsm.wit's `state-machine` and `codec`
 * interfaces, implemented on top of kv.c.
 *
 * This is the only file that knows about the WebAssembly component ABI. The
 * functions it defines are declared in plugin.h, which wit-bindgen generates
 * from ../../wit at build time (see build.sh); the generated plugin.c turns
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

/* Hands a buffer's bytes over as an ABI list or string. The post-return
 * function frees only non-empty results, so an empty buffer is freed here. */
static void hand_over(kv_buf *b, uint8_t **ptr, size_t *len) {
    if (b->len == 0) buf_free(b);
    *ptr = b->ptr;
    *len = b->len;
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

bool exports_raftify_fsm_state_machine_snapshot(plugin_list_u8_t *ret, plugin_string_t *err) {
    (void)err; /* a snapshot of a kv cannot fail */
    kv_buf out = {0};
    kv_snapshot(&STATE, &out);
    return give_list(true, &out, ret, err);
}

bool exports_raftify_fsm_state_machine_restore(plugin_list_u8_t *snapshot, plugin_string_t *err) {
    kv_buf message = {0};
    bool ok = kv_restore(&STATE, snapshot->ptr, snapshot->len, &message);
    plugin_list_u8_free(snapshot);
    if (!ok) hand_over(&message, &err->ptr, &err->len);
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
