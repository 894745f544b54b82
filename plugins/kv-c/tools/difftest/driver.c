/* Runs operations on the C kv; the twin of driver.rs (same input, same
 * output format). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv.h"

static void put_hex(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) printf("%02x", p[i]);
}

int main(void) {
    static char line[1 << 24];
    static uint8_t arg[1 << 23];
    kv_map kv = KV_MAP_EMPTY;
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        size_t n = 0;
        char *space = strchr(line, ' ');
        if (space) {
            *space = 0;
            for (const char *h = space + 1; h[0] && h[1]; h += 2) {
                unsigned byte;
                if (sscanf(h, "%2x", &byte) != 1) abort();
                arg[n++] = (uint8_t)byte;
            }
        }
        const char *op = line;
        kv_buf out = {0};
        bool ok;
        if (!strcmp(op, "encode")) {
            ok = utf8_valid(arg, n) ? kv_encode(arg, n, &out) : (buf_puts(&out, "SKIP"), false);
        } else if (!strcmp(op, "decode")) {
            ok = kv_decode(arg, n, &out);
        } else if (!strcmp(op, "render")) {
            ok = kv_render(arg, n, &out);
        } else if (!strcmp(op, "apply")) {
            ok = kv_apply(&kv, arg, n, &out);
        } else if (!strcmp(op, "query")) {
            ok = kv_query(&kv, arg, n, &out);
        } else if (!strcmp(op, "snapshot")) {
            kv_snapshot(&kv, &out);
            ok = true;
        } else if (!strcmp(op, "restore")) {
            ok = kv_restore(&kv, arg, n, &out);
        } else {
            fprintf(stderr, "unknown op %s\n", op);
            return 2;
        }
        printf(ok ? "ok " : "err ");
        put_hex(out.ptr, out.len);
        printf("\n");
        buf_free(&out);
    }
    map_clear(&kv);
    return 0;
}
