/*
 * SwiftP2P WebAssembly plugin ABI, version 1: the guest side, for C.
 *
 * A plugin is a wasm32 module built with clang --target=wasm32 -nostdlib (`p2p plugin build`
 * does it). It exports memory, p2p_abi_version, p2p_alloc, p2p_free and p2p_init (this header
 * defines them; the plugin writes p2p_plugin_init), and the handlers it registers. It imports
 * only the functions of the module "p2p" declared here. Every pointer is an address in the
 * plugin's own memory; every buffer comes with its length.
 *
 * Handlers (export them with P2P_EXPORT("name")):
 *   command / reply handler:  int32_t f(const uint8_t sender[20], const uint8_t *req, uint32_t len)
 *   put interceptor:          int32_t f(const uint8_t key[80], const uint8_t *value, uint32_t len,
 *                                       const uint8_t *current, uint32_t current_len)
 *                             (current_len is 0xFFFFFFFF when nothing is stored under the key)
 *   evaluation scheme:        int32_t f(const uint8_t *answers, uint32_t len)
 * A handler returns P2P_OK or an error code; its result (or the reason of an error) is what it
 * passes to p2p_output. An interceptor that outputs nothing keeps the value as it is.
 *
 * Limits: each call runs on a fuel budget (about one unit per instruction) and the memory may not
 * grow past the host's limit; past either, the call stops and its caller gets a typed error.
 */
#ifndef P2P_WASM_H
#define P2P_WASM_H

#include <stddef.h>
#include <stdint.h>

#define P2P_WASM_ABI_VERSION 1

enum { P2P_OK = 0, P2P_ERR_DENIED = 1, P2P_ERR_NOT_FOUND = 2, P2P_ERR_BAD_REQUEST = 3, P2P_ERR_FAILED = 4 };
enum { P2P_LOG_DEBUG = 0, P2P_LOG_INFO = 1, P2P_LOG_WARNING = 2, P2P_LOG_ERROR = 3 };

#define P2P_EXPORT(name) __attribute__((export_name(name)))
#define P2P_IMPORT(name) __attribute__((import_module("p2p"), import_name(name)))

/* ---- what the host offers ----------------------------------------------------------------- */

P2P_IMPORT("log") void p2p_log(int32_t level, const char *text, uint32_t len);
/* During init only: the plugin's name and version (default: the file's name, "?"). */
P2P_IMPORT("describe") int32_t p2p_describe(const char *name, uint32_t name_len, const char *version, uint32_t version_len);
/* During init only. `export_name` names the exported handler. */
P2P_IMPORT("register_command") int32_t p2p_register_command(const char *name, uint32_t name_len, const char *export_name, uint32_t export_len);
/* domain: 20 bytes, or NULL for every domain. */
P2P_IMPORT("register_put_interceptor") int32_t p2p_register_put_interceptor(const uint8_t *domain, const char *export_name, uint32_t export_len);
P2P_IMPORT("register_reply_handler") int32_t p2p_register_reply_handler(const char *export_name, uint32_t export_len);
P2P_IMPORT("register_evaluation_scheme") int32_t p2p_register_evaluation_scheme(const char *name, uint32_t name_len, const char *export_name, uint32_t export_len);
/* The result of the call under way (copied by the host; a later call replaces it). */
P2P_IMPORT("output") int32_t p2p_output(const void *data, uint32_t len);
/* The value under an 80-byte key of this node's storage: copies at most `cap` bytes to `out` and
 * returns the value's length (call again with more room if it is larger), or -P2P_ERR_NOT_FOUND. */
P2P_IMPORT("storage_get") int32_t p2p_storage_get(const uint8_t key[80], uint8_t *out, uint32_t cap);
P2P_IMPORT("storage_put") int32_t p2p_storage_put(const uint8_t key[80], const uint8_t *value, uint32_t len, uint32_t ttl_seconds);
/* Sent when the call returns; the reply comes to p2p_on_reply(token, code, bytes, len) if the
 * plugin exports it. address: "host:port". */
P2P_IMPORT("send_direct") int32_t p2p_send_direct(const char *address, uint32_t address_len, const uint8_t *msg, uint32_t len, uint32_t token);
P2P_IMPORT("routed_send") int32_t p2p_routed_send(const uint8_t key[20], const uint8_t *msg, uint32_t len, uint32_t token);

/* ---- what the plugin provides --------------------------------------------------------------- */

/* Registers the plugin's handlers (the plugin defines it). */
int32_t p2p_plugin_init(void);

static inline uint32_t p2p_strlen(const char *s) { uint32_t n = 0; while (s[n]) n++; return n; }
static inline void p2p_log_text(int32_t level, const char *text) { p2p_log(level, text, p2p_strlen(text)); }
static inline int32_t p2p_fail(int32_t code, const char *reason) { p2p_output(reason, p2p_strlen(reason)); return code; }

#ifndef P2P_WASM_NO_RUNTIME
/* memcpy and memset for the compiler's own calls (no libc here). */
void *memcpy(void *dst, const void *src, size_t n) { uint8_t *d = dst; const uint8_t *s = src; while (n--) *d++ = *s++; return dst; }
void *memset(void *dst, int c, size_t n) { uint8_t *d = dst; while (n--) *d++ = (uint8_t)c; return dst; }
void *memmove(void *dst, const void *src, size_t n) {
    uint8_t *d = dst; const uint8_t *s = src;
    if (d < s) { while (n--) *d++ = *s++; } else { d += n; s += n; while (n--) *--d = *--s; }
    return dst;
}

/* A small allocator: blocks in power-of-two size classes from 16 bytes, each class a free list,
 * new blocks from the end of the heap (memory.grow when it runs out). */
extern unsigned char __heap_base;
static uintptr_t p2p_heap_top;
static void *p2p_free_lists[32];

static void *p2p_malloc(uint32_t size) {
    uint32_t cls = 4;
    while (((uint32_t)1 << cls) < size + 8u && cls < 31) cls++;
    if (((uint32_t)1 << cls) < size + 8u) return 0;
    void *block = p2p_free_lists[cls];
    if (block) {
        p2p_free_lists[cls] = *(void **)block;
    } else {
        if (!p2p_heap_top) p2p_heap_top = ((uintptr_t)&__heap_base + 15) & ~(uintptr_t)15;
        uintptr_t end = p2p_heap_top + ((uintptr_t)1 << cls);
        uintptr_t have = __builtin_wasm_memory_size(0) * 65536u;
        if (end > have && __builtin_wasm_memory_grow(0, (end - have + 65535) / 65536) == (size_t)-1) return 0;
        block = (void *)p2p_heap_top;
        p2p_heap_top = end;
    }
    *(uint32_t *)block = cls;
    return (uint8_t *)block + 8;
}

static void p2p_release(void *p) {
    if (!p) return;
    void *block = (uint8_t *)p - 8;
    uint32_t cls = *(uint32_t *)block;
    if (cls < 4 || cls > 31) return;
    *(void **)block = p2p_free_lists[cls];
    p2p_free_lists[cls] = block;
}

P2P_EXPORT("p2p_abi_version") int32_t p2p_abi_version(void) { return P2P_WASM_ABI_VERSION; }
P2P_EXPORT("p2p_alloc") void *p2p_alloc(uint32_t len) { return p2p_malloc(len); }
P2P_EXPORT("p2p_free") void p2p_free(void *p) { p2p_release(p); }
P2P_EXPORT("p2p_init") int32_t p2p_init(void) { return p2p_plugin_init(); }
#endif

#endif /* P2P_WASM_H */
