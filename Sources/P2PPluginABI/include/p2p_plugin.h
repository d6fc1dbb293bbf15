/*
 * SwiftP2P loadable plugin ABI, version 1.
 *
 * A plugin is a shared object exporting one symbol:
 *
 *     const p2p_plugin_descriptor *p2p_plugin_entry(const p2p_host_api *host, uint32_t abi_version);
 *
 * The entry must do nothing but return a pointer to a static descriptor (the SDK's does exactly
 * that). The host compares descriptor->abi_version with its own before it calls any other plugin
 * code, then calls descriptor->initialize, in which the plugin registers its callbacks through the host
 * table. Only C types cross this boundary: bytes in, bytes out, every buffer with its length.
 *
 * Memory: every p2p_slice the host passes is borrowed, valid until the callback returns. Every
 * p2p_bytes a plugin fills is allocated with host->alloc (or left {NULL, 0}); the host frees it.
 * Strings are UTF-8 with an explicit length unless marked NUL-terminated.
 *
 * Threads: callbacks may be called from several threads at once; a plugin guards its own state.
 * A callback must not block for long: it runs on a network event loop.
 */
#ifndef P2P_PLUGIN_H
#define P2P_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define P2P_PLUGIN_ABI_VERSION 1u
#define P2P_PLUGIN_ENTRY_SYMBOL "p2p_plugin_entry"

/* Result codes of callbacks and host functions. A non-OK result may come with a message in the
 * callback's out buffer (UTF-8), which the host shows to the requesting peer. */
enum {
    P2P_OK = 0,
    P2P_ERR_DENIED = 1,      /* refused: the requester may not do this */
    P2P_ERR_NOT_FOUND = 2,   /* nothing there */
    P2P_ERR_BAD_REQUEST = 3, /* the input is malformed */
    P2P_ERR_FAILED = 4       /* anything else */
};

/* Log levels for host->log. */
enum { P2P_LOG_DEBUG = 0, P2P_LOG_INFO = 1, P2P_LOG_WARNING = 2, P2P_LOG_ERROR = 3 };

/* Borrowed bytes: the host owns them; valid only during the call. */
typedef struct p2p_slice {
    const uint8_t *data;
    size_t len;
} p2p_slice;

/* Bytes a plugin hands to the host: data is allocated with host->alloc, or NULL when len is 0.
 * The host frees it. */
typedef struct p2p_bytes {
    uint8_t *data;
    size_t len;
} p2p_bytes;

/* A 160-bit id or key, big-endian. */
typedef struct p2p_key160 { uint8_t bytes[20]; } p2p_key160;
/* A storage key: location, domain, content, version (80 bytes). */
typedef struct p2p_key640 { p2p_key160 location, domain, content, version; } p2p_key640;

/* ---- callbacks a plugin registers ------------------------------------------------------------ */

/* A command: request bytes from `sender` in, reply bytes out (in *out). */
typedef int (*p2p_command_fn)(void *user, const p2p_key160 *sender, p2p_slice request, p2p_bytes *out);

/* A raw reply handler for direct messages and routed sends: same shape as a command. */
typedef p2p_command_fn p2p_reply_fn;

/* A storage interceptor, called for each value put into its domain. `current` is the value
 * stored under the key now (data NULL when there is none). Write the value to store into *out;
 * leave *out empty ({NULL, 0}) to store `value` unchanged. A non-OK result refuses the put, with
 * the message in *out. */
typedef int (*p2p_put_interceptor_fn)(void *user, const p2p_key640 *key, p2p_slice value, p2p_slice current,
                                      p2p_bytes *out);

/* An evaluation scheme. `answers` encodes what each peer answered:
 *   u32 peer count, then per peer: 20-byte peer id, u32 entry count,
 *   then per entry: 80-byte key, u32 value length, value bytes.
 * Write the chosen entries to *out as: u32 entry count, then per entry: 80-byte key,
 * u32 value length, value bytes. All integers big-endian. */
typedef int (*p2p_evaluate_fn)(void *user, p2p_slice answers, p2p_bytes *out);

/* Completion of an asynchronous host call: result code and reply (borrowed). */
typedef void (*p2p_completion_fn)(void *user, int result, p2p_slice reply);

/* ---- what the host offers ----------------------------------------------------------------------- */

typedef struct p2p_host_api {
    /* The host's ABI version (P2P_PLUGIN_ABI_VERSION of the host). */
    uint32_t abi_version;
    /* Passed back as the first argument of every host function. */
    void *context;

    /* Allocates memory for p2p_bytes the plugin hands back (freed by the host). */
    uint8_t *(*alloc)(size_t len);
    /* Writes a line to the node's log. */
    void (*log)(void *context, int level, const char *message, size_t len);

    /* Registration: only during initialize. Names are NUL-terminated UTF-8. Each returns P2P_OK, or an
     * error with a reason logged by the host (duplicate name, wire id collision …). */
    int (*register_command)(void *context, const char *name, p2p_command_fn fn, void *user);
    /* domain: NULL intercepts every domain. */
    int (*register_put_interceptor)(void *context, const p2p_key160 *domain, p2p_put_interceptor_fn fn, void *user);
    int (*register_reply_handler)(void *context, p2p_reply_fn fn, void *user);
    int (*register_evaluation_scheme)(void *context, const char *name, p2p_evaluate_fn fn, void *user);

    /* Local storage of this node, straight to the backend (after the node started).
     * get: P2P_OK with the value in *out, or P2P_ERR_NOT_FOUND. */
    int (*storage_get)(void *context, const p2p_key640 *key, p2p_bytes *out);
    int (*storage_put)(void *context, const p2p_key640 *key, p2p_slice value, uint32_t ttl_seconds);

    /* Asynchronous sends (after the node started). `done` is called exactly once, on any thread.
     * send_direct: to a peer's raw reply handler at "host:port" (NUL-terminated).
     * routed_send: to the raw reply handlers of the peers closest to `key`; the reply is the
     * first peer's answer. */
    void (*send_direct)(void *context, const char *address, p2p_slice message, p2p_completion_fn done, void *user);
    void (*routed_send)(void *context, const p2p_key160 *key, p2p_slice message, p2p_completion_fn done, void *user);
} p2p_host_api;

/* ---- what the plugin returns -------------------------------------------------------------------- */

typedef struct p2p_plugin_descriptor {
    /* The ABI the plugin was built against: P2P_PLUGIN_ABI_VERSION of its header. */
    uint32_t abi_version;
    /* NUL-terminated; the name must be unique among a node's plugins. */
    const char *name;
    const char *version;
    /* Registers the plugin's callbacks through `host`. Return P2P_OK, or an error code with a
     * message written to *error (allocated with host->alloc) — the node then runs without it. */
    int (*initialize)(const p2p_host_api *host, p2p_bytes *error);
    /* Called once when the node shuts down (may be NULL). */
    void (*shutdown)(void);
} p2p_plugin_descriptor;

/* The one symbol a plugin exports. */
typedef const p2p_plugin_descriptor *(*p2p_plugin_entry_fn)(const p2p_host_api *host, uint32_t abi_version);

#ifdef __cplusplus
}
#endif

#endif /* P2P_PLUGIN_H */
