/* kv: the sample key-value state machine, in C.
 *
 * This is the plugin's logic with no WebAssembly in it: plugin.c connects it
 * to the ABI (wit/fsm.wit), and test/kv_test.c runs it natively. It behaves
 * exactly like the Rust kv (plugins/kv), byte for byte: same results, same
 * error messages, same entry bytes, same snapshot format, so a cluster can
 * hot-swap between the two.
 *
 * Every function that can fail returns true with its result in *out, or
 * false with an error message (UTF-8 text) in *out. Either way *out starts
 * empty ({0}) and the caller owns out->ptr afterwards. Inputs are borrowed:
 * nothing here keeps or frees them. */
#ifndef KV_KV_H
#define KV_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "map.h"
#include "text.h"

/* ---- state-machine ----------------------------------------------------- */

/* Runs a proposal (`set`, `del`, `incr`, `append`). On error the state is
 * unchanged. */
bool kv_apply(kv_map *state, const uint8_t *entry, size_t len, kv_buf *out);

/* Runs a query (`get`, `len`). Never changes the state. */
bool kv_query(const kv_map *state, const uint8_t *request, size_t len, kv_buf *out);

/* The whole state in the shared kv snapshot format (plugins/kv/README.md). */
void kv_snapshot(const kv_map *state, kv_buf *out);

/* Replaces the state with a decoded snapshot. On error (a message in *err)
 * the state is unchanged. */
bool kv_restore(kv_map *state, const uint8_t *snapshot, size_t len, kv_buf *err);

/* ---- codec --------------------------------------------------------------- */

/* Command text to its canonical entry bytes (`incr k` -> `incr k 1`). */
bool kv_encode(const uint8_t *text, size_t len, kv_buf *out);

/* Entry bytes back to text: the entry itself, if it is UTF-8. */
bool kv_decode(const uint8_t *entry, size_t len, kv_buf *out);

/* Result bytes to text: the bytes themselves, if they are UTF-8. */
bool kv_render(const uint8_t *response, size_t len, kv_buf *out);

#endif
