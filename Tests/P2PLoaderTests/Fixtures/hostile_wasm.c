/* A WebAssembly plugin that misbehaves on request, for the sandbox tests. Each command does one
 * bad thing; hostile.echo behaves, and hostile.version names the build (HOSTILE_VERSION). */
#include "p2p_wasm.h"

#ifndef HOSTILE_VERSION
#define HOSTILE_VERSION "v1"
#endif

static int32_t reg(const char *name, const char *export_name) {
    return p2p_register_command(name, p2p_strlen(name), export_name, p2p_strlen(export_name));
}

static const uint8_t LOOP_DOMAIN[20] = { 0x10, 0x0b };

int32_t p2p_plugin_init(void) {
    const char *names[][2] = {
        { "hostile.echo", "echo" }, { "hostile.loop", "loop" }, { "hostile.trap", "trap" }, { "hostile.oob", "oob" },
        { "hostile.grow", "grow" }, { "hostile.big", "big" }, { "hostile.badptr", "badptr" }, { "hostile.version", "version" },
        { "hostile.recurse", "recurse" }, { "hostile.spin_output", "spin_output" }, { "hostile.logspam", "logspam" },
        { "hostile.slow", "slow" },
    };
    for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++)
        if (reg(names[i][0], names[i][1]) != P2P_OK) return p2p_fail(P2P_ERR_FAILED, names[i][0]);
    return p2p_register_put_interceptor(LOOP_DOMAIN, "intercept", 9);
}

P2P_EXPORT("echo") int32_t echo(const uint8_t *s, const uint8_t *r, uint32_t n) { (void)s; p2p_output(r, n); return P2P_OK; }

P2P_EXPORT("version") int32_t version(const uint8_t *s, const uint8_t *r, uint32_t n) {
    (void)s; (void)r; (void)n;
    p2p_output(HOSTILE_VERSION, p2p_strlen(HOSTILE_VERSION));
    return P2P_OK;
}

static volatile uint32_t sink;

P2P_EXPORT("loop") int32_t loop(const uint8_t *s, const uint8_t *r, uint32_t n) {
    (void)s; (void)r;
    for (;;) sink += n;
    return P2P_OK;
}

P2P_EXPORT("trap") int32_t trap(const uint8_t *s, const uint8_t *r, uint32_t n) { (void)s; (void)r; (void)n; __builtin_trap(); }

P2P_EXPORT("oob") int32_t oob(const uint8_t *s, const uint8_t *r, uint32_t n) {
    (void)s; (void)r; (void)n;
    volatile uint32_t *far = (volatile uint32_t *)0xFFFFFFF0u;
    sink = *far;
    return P2P_OK;
}

P2P_EXPORT("grow") int32_t grow(const uint8_t *s, const uint8_t *r, uint32_t n) {
    (void)s; (void)r; (void)n;
    /* 1 GiB more: past any sane limit. */
    size_t got = __builtin_wasm_memory_grow(0, 16384);
    return got == (size_t)-1 ? P2P_ERR_FAILED : P2P_OK;
}

P2P_EXPORT("big") int32_t big(const uint8_t *s, const uint8_t *r, uint32_t n) {
    (void)s; (void)r; (void)n;
    /* Just over the 1 MiB result limit (the block fits a 4 MiB memory). */
    uint32_t size = (1 << 20) + 4096;
    uint8_t *block = p2p_alloc(size);
    if (!block) return P2P_ERR_FAILED;
    p2p_output(block, size);
    return P2P_OK;
}

P2P_EXPORT("badptr") int32_t badptr(const uint8_t *s, const uint8_t *r, uint32_t n) {
    (void)s; (void)r; (void)n;
    p2p_output((const void *)0xFFFF0000u, 4096);
    return P2P_OK;
}

static uint32_t depth(uint32_t n) { volatile uint8_t frame[256]; frame[0] = (uint8_t)n; return depth(n + 1) + frame[0]; }

P2P_EXPORT("recurse") int32_t recurse(const uint8_t *s, const uint8_t *r, uint32_t n) { (void)s; (void)r; return (int32_t)depth(n); }

/* Counts to the request's number (decimal), then names the build: a call that takes a while. */
P2P_EXPORT("slow") int32_t slow(const uint8_t *s, const uint8_t *r, uint32_t n) {
    (void)s;
    uint32_t count = 0;
    for (uint32_t i = 0; i < n && r[i] >= '0' && r[i] <= '9'; i++) count = count * 10 + (r[i] - '0');
    for (uint32_t i = 0; i < count; i++) sink += i;
    p2p_output(HOSTILE_VERSION " slow", p2p_strlen(HOSTILE_VERSION " slow"));
    return P2P_OK;
}

/* Makes the host copy 64 KiB again and again: paid for with fuel, so it ends. */
P2P_EXPORT("spin_output") int32_t spin_output(const uint8_t *s, const uint8_t *r, uint32_t n) {
    (void)s; (void)r; (void)n;
    uint8_t *block = p2p_alloc(65536);
    if (!block) return P2P_ERR_FAILED;
    for (;;) p2p_output(block, 65536);
    return P2P_OK;
}

/* A thousand log lines: at most 16 reach the log. */
P2P_EXPORT("logspam") int32_t logspam(const uint8_t *s, const uint8_t *r, uint32_t n) {
    (void)s; (void)r; (void)n;
    for (int i = 0; i < 1000; i++) p2p_log(P2P_LOG_DEBUG, "spam", 4);
    p2p_output("done", 4);
    return P2P_OK;
}

/* In its domain, the value "loop" never returns; anything else is stored as it is. */
P2P_EXPORT("intercept") int32_t intercept(const uint8_t *k, const uint8_t *v, uint32_t n, const uint8_t *c, uint32_t cn) {
    (void)k; (void)c; (void)cn;
    if (n == 4 && v[0] == 'l' && v[1] == 'o' && v[2] == 'o' && v[3] == 'p') for (;;) sink++;
    return P2P_OK;
}
