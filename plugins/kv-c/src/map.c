/* The ordered map: an AVL tree. See map.h for why.
 *
 * Insert and remove are recursive; the recursion is as deep as the tree,
 * which an AVL tree keeps below 1.44 log2(n): about 25 levels for a million
 * keys, so the stack is never a concern. */
#include "map.h"

#include <stdlib.h>
#include <string.h>

#include "text.h"

int key_cmp(const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len) {
    size_t n = a_len < b_len ? a_len : b_len;
    int c = n ? memcmp(a, b, n) : 0;
    if (c != 0) return c < 0 ? -1 : 1;
    return a_len < b_len ? -1 : a_len > b_len ? 1 : 0;
}

/* ---- nodes --------------------------------------------------------------- */

kv_node *node_new(const uint8_t *key, size_t key_len, const uint8_t *value, size_t value_len) {
    if (key_len > SIZE_MAX - sizeof(kv_node)) __builtin_trap();
    kv_node *n = xmalloc(sizeof(kv_node) + key_len);
    n->left = n->right = NULL;
    n->height = 1;
    n->key_len = key_len;
    if (key_len) memcpy(n->key, key, key_len);
    n->value = NULL;
    n->value_len = n->value_cap = 0;
    node_set_value(n, value, value_len);
    return n;
}

void node_free(kv_node *n) {
    free(n->value);
    free(n);
}

void node_set_value(kv_node *n, const uint8_t *value, size_t len) {
    /* Always an exact-size copy, so `set` after a long `append` history
     * gives the memory back. */
    free(n->value);
    n->value = NULL;
    n->value_len = n->value_cap = 0;
    if (len == 0) return;
    n->value = xmalloc(len);
    memcpy(n->value, value, len);
    n->value_len = n->value_cap = len;
}

void node_append_value(kv_node *n, const uint8_t *value, size_t len) {
    if (len == 0) return;
    if (len > SIZE_MAX - n->value_len) __builtin_trap();
    size_t need = n->value_len + len;
    if (need > n->value_cap) {
        /* Grow geometrically: appending to the same key k times costs O(k)
         * bytes of copying in all, not O(k^2). */
        size_t cap = n->value_cap > SIZE_MAX / 2 ? SIZE_MAX : n->value_cap * 2;
        if (cap < need) cap = need;
        n->value = xrealloc(n->value, cap);
        n->value_cap = cap;
    }
    memcpy(n->value + n->value_len, value, len);
    n->value_len = need;
}

/* ---- AVL balancing --------------------------------------------------------- */

static int height(const kv_node *n) { return n ? n->height : 0; }

static void update_height(kv_node *n) {
    int l = height(n->left), r = height(n->right);
    n->height = 1 + (l > r ? l : r);
}

static kv_node *rotate_right(kv_node *y) {
    kv_node *x = y->left;
    y->left = x->right;
    x->right = y;
    update_height(y);
    update_height(x);
    return x;
}

static kv_node *rotate_left(kv_node *x) {
    kv_node *y = x->right;
    x->right = y->left;
    y->left = x;
    update_height(x);
    update_height(y);
    return y;
}

/* Restores the AVL property at `n` (children differ in height by at most 1)
 * after one insert or remove below it; returns the subtree's new root. */
static kv_node *rebalance(kv_node *n) {
    update_height(n);
    int balance = height(n->left) - height(n->right);
    if (balance > 1) {
        if (height(n->left->left) < height(n->left->right)) n->left = rotate_left(n->left);
        return rotate_right(n);
    }
    if (balance < -1) {
        if (height(n->right->right) < height(n->right->left)) n->right = rotate_right(n->right);
        return rotate_left(n);
    }
    return n;
}

/* ---- lookups and updates ---------------------------------------------------- */

kv_node *map_find(const kv_map *m, const uint8_t *key, size_t key_len) {
    kv_node *n = m->root;
    while (n) {
        int c = key_cmp(key, key_len, n->key, n->key_len);
        if (c == 0) return n;
        n = c < 0 ? n->left : n->right;
    }
    return NULL;
}

static kv_node *insert(kv_node *n, kv_node *fresh) {
    if (!n) return fresh;
    if (key_cmp(fresh->key, fresh->key_len, n->key, n->key_len) < 0) {
        n->left = insert(n->left, fresh);
    } else {
        n->right = insert(n->right, fresh);
    }
    return rebalance(n);
}

kv_node *map_upsert(kv_map *m, const uint8_t *key, size_t key_len) {
    kv_node *n = map_find(m, key, key_len);
    if (n) return n;
    n = node_new(key, key_len, NULL, 0);
    m->root = insert(m->root, n);
    m->count++;
    return n;
}

/* Detaches the smallest node of subtree `n` into *min; returns the rest. */
static kv_node *detach_min(kv_node *n, kv_node **min) {
    if (!n->left) {
        *min = n;
        return n->right;
    }
    n->left = detach_min(n->left, min);
    return rebalance(n);
}

static kv_node *remove_from(kv_node *n, const uint8_t *key, size_t key_len, bool *removed) {
    if (!n) return NULL;
    int c = key_cmp(key, key_len, n->key, n->key_len);
    if (c < 0) {
        n->left = remove_from(n->left, key, key_len, removed);
    } else if (c > 0) {
        n->right = remove_from(n->right, key, key_len, removed);
    } else {
        /* Replace n by its successor (the smallest node on its right). */
        kv_node *left = n->left, *right = n->right;
        node_free(n);
        *removed = true;
        if (!right) return left;
        kv_node *successor;
        right = detach_min(right, &successor);
        successor->left = left;
        successor->right = right;
        return rebalance(successor);
    }
    return rebalance(n);
}

bool map_remove(kv_map *m, const uint8_t *key, size_t key_len) {
    bool removed = false;
    m->root = remove_from(m->root, key, key_len, &removed);
    if (removed) m->count--;
    return removed;
}

/* ---- whole-map operations ------------------------------------------------- */

static void free_tree(kv_node *n) {
    if (!n) return;
    free_tree(n->left);
    free_tree(n->right);
    node_free(n);
}

void map_clear(kv_map *m) {
    free_tree(m->root);
    *m = KV_MAP_EMPTY;
}

static void walk(const kv_node *n, void (*visit)(const kv_node *, void *), void *ctx) {
    if (!n) return;
    walk(n->left, visit, ctx);
    visit(n, ctx);
    walk(n->right, visit, ctx);
}

void map_walk(const kv_map *m, void (*visit)(const kv_node *, void *), void *ctx) {
    walk(m->root, visit, ctx);
}

/* The middle node becomes the root of each subtree, so the tree is
 * perfectly balanced, which is also a valid AVL tree. */
static kv_node *build(kv_node **nodes, size_t n) {
    if (n == 0) return NULL;
    size_t mid = n / 2;
    kv_node *root = nodes[mid];
    root->left = build(nodes, mid);
    root->right = build(nodes + mid + 1, n - mid - 1);
    update_height(root);
    return root;
}

kv_map map_from_sorted(kv_node **nodes, size_t n) {
    return (kv_map){build(nodes, n), n};
}
