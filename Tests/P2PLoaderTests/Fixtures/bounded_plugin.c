/* A C plugin for the bounds tests: its state is a global, so two nodes that loaded the same file
 * share it unless each maps its own copy.
 *   bounded.count  → the number of times it ran in this copy (as text); fails once shut down
 *   bounded.sleep  → blocks for the request's milliseconds (decimal text), then answers "slept" */
#include "p2p_plugin.h"
#include <stdio.h>
#include <string.h>
#include <time.h>

static const p2p_host_api *host;
static int count;
static int stopped;

static int text_out(p2p_bytes *out, const char *text) {
    size_t n = strlen(text);
    out->data = host->alloc(n);
    out->len = out->data ? n : 0;
    if (out->data) memcpy(out->data, text, n);
    return P2P_OK;
}

static int count_cmd(void *user, const p2p_key160 *sender, p2p_slice request, p2p_bytes *out) {
    (void)user; (void)sender; (void)request;
    if (stopped) { text_out(out, "shut down"); return P2P_ERR_FAILED; }
    char text[32];
    snprintf(text, sizeof text, "%d", ++count);
    return text_out(out, text);
}

static int sleep_cmd(void *user, const p2p_key160 *sender, p2p_slice request, p2p_bytes *out) {
    (void)user; (void)sender;
    long ms = 0;
    for (size_t i = 0; i < request.len && request.data[i] >= '0' && request.data[i] <= '9'; i++) ms = ms * 10 + (request.data[i] - '0');
    struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&t, &t) != 0) {}
    return text_out(out, "slept");
}

static int init(const p2p_host_api *h, p2p_bytes *error) {
    (void)error;
    host = h;
    if (h->register_command(h->context, "bounded.count", count_cmd, NULL) != P2P_OK) return P2P_ERR_FAILED;
    if (h->register_command(h->context, "bounded.sleep", sleep_cmd, NULL) != P2P_OK) return P2P_ERR_FAILED;
    return P2P_OK;
}

static void shutdown_plugin(void) { stopped = 1; }

static const p2p_plugin_descriptor descriptor = { P2P_PLUGIN_ABI_VERSION, "bounded", "1.0.0", init, shutdown_plugin };

const p2p_plugin_descriptor *p2p_plugin_entry(const p2p_host_api *h, uint32_t abi) { (void)h; (void)abi; return &descriptor; }
