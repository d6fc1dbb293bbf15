/* A plugin written in plain C against p2p_plugin.h, used by the loader tests.
 * Variants (compile-time): SAMPLE_ABI (ABI version to claim), SAMPLE_NAME (plugin name),
 * NO_ENTRY (export no entry symbol), DUPLICATE_COMMAND (register "sample.upper" twice),
 * FAIL_INIT (initialize fails with a message). */
#include "p2p_plugin.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef SAMPLE_ABI
#define SAMPLE_ABI P2P_PLUGIN_ABI_VERSION
#endif
#ifndef SAMPLE_NAME
#define SAMPLE_NAME "sample"
#endif

static const p2p_host_api *host;

static int copy_out(p2p_bytes *out, const void *data, size_t len) {
    out->data = len ? host->alloc(len) : NULL;
    out->len = out->data ? len : 0;
    if (len && out->data) memcpy(out->data, data, len);
    return P2P_OK;
}

/* Command: the request uppercased. */
static int upper(void *user, const p2p_key160 *sender, p2p_slice request, p2p_bytes *out) {
    (void)user; (void)sender;
    uint8_t *buf = request.len ? host->alloc(request.len) : NULL;
    for (size_t i = 0; i < request.len; i++) {
        uint8_t c = request.data[i];
        buf[i] = (c >= 'a' && c <= 'z') ? (uint8_t)(c - 32) : c;
    }
    out->data = buf;
    out->len = request.len;
    return P2P_OK;
}

/* Reply handler: "hello" is answered "world". */
static int reply(void *user, const p2p_key160 *sender, p2p_slice request, p2p_bytes *out) {
    (void)user; (void)sender;
    if (request.len == 5 && memcmp(request.data, "hello", 5) == 0) return copy_out(out, "world", 5);
    copy_out(out, "say hello", 9);
    return P2P_ERR_BAD_REQUEST;
}

static long long parse(p2p_slice s, int *ok) {
    char tmp[32];
    if (s.len == 0 || s.len >= sizeof tmp) { *ok = 0; return 0; }
    memcpy(tmp, s.data, s.len);
    tmp[s.len] = 0;
    char *end;
    long long v = strtoll(tmp, &end, 10);
    *ok = (*end == 0);
    return v;
}

/* Put interceptor: values are integers; a put adds to the stored one. */
static int tally(void *user, const p2p_key640 *key, p2p_slice value, p2p_slice current, p2p_bytes *out) {
    (void)user; (void)key;
    int ok = 1;
    long long add = parse(value, &ok);
    if (!ok) return copy_out(out, "a tally takes an integer", 24), P2P_ERR_BAD_REQUEST;
    long long before = 0;
    if (current.data) { before = parse(current, &ok); if (!ok) before = 0; }
    char text[32];
    int n = snprintf(text, sizeof text, "%lld", before + add);
    return copy_out(out, text, (size_t)n);
}

static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

/* Evaluation scheme: per key, the longest value any peer returned. */
static int longest(void *user, p2p_slice answers, p2p_bytes *out) {
    (void)user;
    const uint8_t *p = answers.data, *end = answers.data + answers.len;
    if (answers.len < 4) return P2P_ERR_BAD_REQUEST;
    uint32_t peers = be32(p); p += 4;
    const uint8_t *best_key = NULL, *best_val = NULL; uint32_t best_len = 0;
    for (uint32_t i = 0; i < peers; i++) {
        if (end - p < 24) return P2P_ERR_BAD_REQUEST;
        p += 20;
        uint32_t entries = be32(p); p += 4;
        for (uint32_t j = 0; j < entries; j++) {
            if (end - p < 84) return P2P_ERR_BAD_REQUEST;
            const uint8_t *key = p; p += 80;
            uint32_t len = be32(p); p += 4;
            if ((uint32_t)(end - p) < len) return P2P_ERR_BAD_REQUEST;
            if (!best_key || len > best_len) { best_key = key; best_val = p; best_len = len; }
            p += len;
        }
    }
    if (!best_key) return copy_out(out, "\0\0\0\0", 4);
    size_t total = 4 + 80 + 4 + best_len;
    uint8_t *buf = host->alloc(total);
    buf[0] = 0; buf[1] = 0; buf[2] = 0; buf[3] = 1;
    memcpy(buf + 4, best_key, 80);
    buf[84] = (uint8_t)(best_len >> 24); buf[85] = (uint8_t)(best_len >> 16); buf[86] = (uint8_t)(best_len >> 8); buf[87] = (uint8_t)best_len;
    memcpy(buf + 88, best_val, best_len);
    out->data = buf;
    out->len = total;
    return P2P_OK;
}

static int initialize(const p2p_host_api *h, p2p_bytes *error) {
    host = h;
#ifdef FAIL_INIT
    copy_out(error, "the sample refuses to start", 27);
    return P2P_ERR_FAILED;
#endif
    /* "tally" domain: SHA-1 of "tally" would need a hash here; the tests pass this fixed domain. */
    static p2p_key160 domain = {{0x7a, 0x11, 0x7a, 0x11}};
    if (h->register_command(h->context, "sample.upper", upper, NULL) != P2P_OK) goto refused;
#ifdef DUPLICATE_COMMAND
    if (h->register_command(h->context, "sample.upper", upper, NULL) != P2P_OK) goto refused;
#endif
    if (h->register_reply_handler(h->context, reply, NULL) != P2P_OK) goto refused;
    if (h->register_put_interceptor(h->context, &domain, tally, NULL) != P2P_OK) goto refused;
    if (h->register_evaluation_scheme(h->context, "sample.longest", longest, NULL) != P2P_OK) goto refused;
    h->log(h->context, P2P_LOG_INFO, "sample ready", 12);
    return P2P_OK;
refused:
    copy_out(error, "registration refused", 20);
    return P2P_ERR_FAILED;
}

static const p2p_plugin_descriptor descriptor = {SAMPLE_ABI, SAMPLE_NAME, "1.0.0", initialize, NULL};

#ifndef NO_ENTRY
const p2p_plugin_descriptor *p2p_plugin_entry(const p2p_host_api *h, uint32_t abi_version) {
    (void)h; (void)abi_version;
    return &descriptor;
}
#else
int not_the_entry(void) { return 0; }
#endif
