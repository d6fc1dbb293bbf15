/* Plain C functions that become network commands through the manifest beside the library
 * (libtemplate-plugin.json): no glue code, no SwiftP2P header. `make` builds libtemplate-plugin.so;
 * `p2p node --plugin libtemplate-plugin.so` serves them, `p2p call` calls them. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* template-plugin.add: i64, i64 -> i64 */
int64_t template_plugin_add(int64_t a, int64_t b) {
    return a + b;
}

/* template-plugin.reverse: string -> string (malloc'ed; the manifest says free_result) */
char *template_plugin_reverse(const char *text) {
    size_t n = strlen(text);
    char *out = malloc(n + 1);
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) out[i] = text[n - 1 - i];
    out[n] = 0;
    return out;
}

/* template-plugin.checksum: bytes -> u32 (a bytes parameter arrives as pointer and length) */
uint32_t template_plugin_checksum(const uint8_t *data, uint64_t len) {
    uint32_t a = 1, b = 0;
    for (uint64_t i = 0; i < len; i++) {
        a = (a + data[i]) % 65521;
        b = (b + a) % 65521;
    }
    return b << 16 | a;
}
