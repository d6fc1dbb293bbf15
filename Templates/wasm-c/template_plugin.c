/* template-plugin: a WebAssembly plugin in C (the wasm-c template).
 *
 * It shows each extension point once:
 *   - the command "template-plugin.hello" answers "hello, <request>";
 *   - a put interceptor on the domain SHA-1("template-plugin") counts votes: each value put is a
 *     decimal integer added to the one stored (TomP2P's storage-extension example);
 *   - the evaluation scheme "template-plugin.max" keeps, per key, the largest count any replica
 *     answered (replicas that missed a vote answer less).
 * Build: p2p plugin build .   Load: p2p node --plugin template-plugin.wasm
 */
#include "p2p_wasm.h"

/* SHA-1 of "template-plugin", written in by `p2p plugin new`. */
static const uint8_t VOTE_DOMAIN[20] = { TEMPLATE_DOMAIN_BYTES };

static int32_t register_text(int32_t (*reg)(const char *, uint32_t, const char *, uint32_t), const char *name, const char *export_name) {
    return reg(name, p2p_strlen(name), export_name, p2p_strlen(export_name));
}

int32_t p2p_plugin_init(void) {
    const char *name = "template-plugin", *version = "1.0.0";
    p2p_describe(name, p2p_strlen(name), version, p2p_strlen(version));
    int32_t r = register_text(p2p_register_command, "template-plugin.hello", "hello");
    if (r != P2P_OK) return p2p_fail(r, "cannot register the command");
    r = p2p_register_put_interceptor(VOTE_DOMAIN, "count_votes", p2p_strlen("count_votes"));
    if (r != P2P_OK) return p2p_fail(r, "cannot register the interceptor");
    r = register_text(p2p_register_evaluation_scheme, "template-plugin.max", "largest");
    if (r != P2P_OK) return p2p_fail(r, "cannot register the scheme");
    return P2P_OK;
}

/* ---- the command ---- */

P2P_EXPORT("hello") int32_t hello(const uint8_t *sender, const uint8_t *request, uint32_t len) {
    (void)sender;
    if (len > 1024) return p2p_fail(P2P_ERR_BAD_REQUEST, "a name of at most 1024 bytes");
    uint8_t *out = p2p_alloc(len + 7);
    if (!out) return p2p_fail(P2P_ERR_FAILED, "out of memory");
    memcpy(out, "hello, ", 7);
    memcpy(out + 7, request, len);
    p2p_output(out, len + 7);
    p2p_free(out);
    return P2P_OK;
}

/* ---- the interceptor ---- */

/* Parses a decimal integer (optional sign, surrounding blanks); returns 0 if it is not one. */
static int parse(const uint8_t *s, uint32_t len, int64_t *out) {
    uint32_t i = 0;
    while (i < len && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t')) i++;
    int negative = 0;
    if (i < len && (s[i] == '-' || s[i] == '+')) { negative = s[i] == '-'; i++; }
    if (i == len || s[i] < '0' || s[i] > '9') return 0;
    int64_t v = 0;
    for (; i < len && s[i] >= '0' && s[i] <= '9'; i++) {
        if (v > (INT64_MAX - (s[i] - '0')) / 10) return 0;
        v = v * 10 + (s[i] - '0');
    }
    while (i < len && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t')) i++;
    if (i != len) return 0;
    *out = negative ? -v : v;
    return 1;
}

static uint32_t format(int64_t v, uint8_t *out) {
    uint8_t tmp[24];
    uint32_t n = 0, len = 0;
    uint64_t u = v < 0 ? (uint64_t)(-(v + 1)) + 1 : (uint64_t)v;
    do { tmp[n++] = (uint8_t)('0' + u % 10); u /= 10; } while (u);
    if (v < 0) out[len++] = '-';
    while (n) out[len++] = tmp[--n];
    return len;
}

P2P_EXPORT("count_votes") int32_t count_votes(const uint8_t *key, const uint8_t *value, uint32_t len,
                                              const uint8_t *current, uint32_t current_len) {
    (void)key;
    int64_t vote, before = 0;
    if (!parse(value, len, &vote)) return p2p_fail(P2P_ERR_BAD_REQUEST, "a vote must be a decimal integer");
    if (current_len != 0xFFFFFFFFu && !parse(current, current_len, &before)) before = 0;
    if ((vote > 0 && before > INT64_MAX - vote) || (vote < 0 && before < INT64_MIN - vote))
        return p2p_fail(P2P_ERR_DENIED, "the vote count would overflow");
    uint8_t text[24];
    p2p_output(text, format(before + vote, text));
    return P2P_OK;
}

/* ---- the evaluation scheme ---- */

static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }

/* answers: u32 peers, per peer: 20-byte id, u32 entries, per entry: 80-byte key, u32 length, bytes.
 * Output: u32 entries, per entry: 80-byte key, u32 length, bytes (here: the largest count of each key). */
P2P_EXPORT("largest") int32_t largest(const uint8_t *answers, uint32_t len) {
    /* At most 64 distinct keys: one pass keeps, per key, where its largest value is. */
    enum { MAX_KEYS = 64 };
    const uint8_t *keys[MAX_KEYS], *values[MAX_KEYS];
    uint32_t lengths[MAX_KEYS];
    int64_t best[MAX_KEYS];
    uint32_t count = 0, at = 0, size = 4;
    if (len < 4) return p2p_fail(P2P_ERR_BAD_REQUEST, "truncated");
    uint32_t peers = be32(answers); at = 4;
    for (uint32_t p = 0; p < peers; p++) {
        if (at + 24 > len) return p2p_fail(P2P_ERR_BAD_REQUEST, "truncated");
        uint32_t entries = be32(answers + at + 20); at += 24;
        for (uint32_t e = 0; e < entries; e++) {
            if (at + 84 > len) return p2p_fail(P2P_ERR_BAD_REQUEST, "truncated");
            const uint8_t *key = answers + at;
            uint32_t vlen = be32(answers + at + 80);
            if (vlen > len - at - 84) return p2p_fail(P2P_ERR_BAD_REQUEST, "truncated");
            const uint8_t *value = answers + at + 84;
            at += 84 + vlen;
            int64_t v;
            if (!parse(value, vlen, &v)) continue;
            uint32_t k = 0;
            while (k < count) {
                uint32_t same = 1;
                for (uint32_t b = 0; b < 80 && same; b++) same = keys[k][b] == key[b];
                if (same) break;
                k++;
            }
            if (k == count) {
                if (count == MAX_KEYS) continue;
                keys[count] = key; values[count] = value; lengths[count] = vlen; best[count] = v; count++;
                size += 84 + vlen;
            } else if (v > best[k]) {
                size += vlen - lengths[k];
                values[k] = value; lengths[k] = vlen; best[k] = v;
            }
        }
    }
    uint8_t *out = p2p_alloc(size);
    if (!out) return p2p_fail(P2P_ERR_FAILED, "out of memory");
    put32(out, count);
    uint32_t w = 4;
    for (uint32_t k = 0; k < count; k++) {
        memcpy(out + w, keys[k], 80); put32(out + w + 80, lengths[k]);
        memcpy(out + w + 84, values[k], lengths[k]); w += 84 + lengths[k];
    }
    p2p_output(out, w);
    p2p_free(out);
    return P2P_OK;
}
