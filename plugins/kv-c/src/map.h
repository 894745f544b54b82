/* An ordered map from byte-string keys to byte-string values: an AVL tree.
 *
 * Why a balanced tree: kv needs (1) lookups and updates in O(log n) however
 * large the state grows (100k+ keys), whatever the keys are, and (2) the
 * pairs in ascending key order for the snapshot. A sorted array makes every
 * insert O(n); a hash map needs sorting at snapshot time and, since a
 * replicated state machine cannot use a random seed, can be flooded with
 * colliding keys by a hostile client. An AVL tree guarantees O(log n) per
 * operation (height <= 1.44 log2 n) and is walked in order for free.
 *
 * Keys compare as bytes (memcmp, then the shorter first), which is how Rust
 * orders the String keys of the Rust kv's BTreeMap. Keys and values may hold
 * any bytes, NUL included: lengths are explicit, nothing is NUL-terminated. */
#ifndef KV_MAP_H
#define KV_MAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kv_node kv_node;
struct kv_node {
    kv_node *left, *right;
    int height;       /* of the subtree rooted here; a leaf is 1 */
    uint8_t *value;   /* malloc'd, or NULL while value_len == 0 */
    size_t value_len;
    size_t value_cap; /* so that repeated `append`s grow it geometrically */
    size_t key_len;
    uint8_t key[];    /* the key's bytes, allocated with the node */
};

typedef struct {
    kv_node *root;
    size_t count;
} kv_map;

#define KV_MAP_EMPTY ((kv_map){NULL, 0})

/* -1, 0 or 1 as a < b, a == b, a > b, by bytes. */
int key_cmp(const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len);

/* The node for `key`, or NULL. */
kv_node *map_find(const kv_map *m, const uint8_t *key, size_t key_len);

/* The node for `key`, created with an empty value if there was none. */
kv_node *map_upsert(kv_map *m, const uint8_t *key, size_t key_len);

/* Removes `key`; returns whether it was there. */
bool map_remove(kv_map *m, const uint8_t *key, size_t key_len);

/* Frees every node; the map is empty afterwards. */
void map_clear(kv_map *m);

/* Replaces the node's value with a copy of `value`. */
void node_set_value(kv_node *n, const uint8_t *value, size_t len);

/* Appends `value` to the node's value. */
void node_append_value(kv_node *n, const uint8_t *value, size_t len);

/* A node not (yet) in any map, with a copy of the key and value. */
kv_node *node_new(const uint8_t *key, size_t key_len, const uint8_t *value, size_t value_len);

/* Frees a node that is not in a map. */
void node_free(kv_node *n);

/* Calls visit(node, ctx) on every node in ascending key order. */
void map_walk(const kv_map *m, void (*visit)(const kv_node *, void *), void *ctx);

/* Builds a map from `n` nodes already sorted by strictly ascending key, in
 * O(n) (a perfectly balanced tree). The map takes ownership of the nodes;
 * the `nodes` array itself stays the caller's. */
kv_map map_from_sorted(kv_node **nodes, size_t n);

#endif
