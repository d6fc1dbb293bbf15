/* PeerVote as a WebAssembly plugin in C (built from the wasm-c template): in the domain
 * SHA-1("vote") — the built-in PeerVote's domain — a put adds its integer to the stored one.
 *   p2p plugin build Plugins/PeerVoteWasm
 *   p2p node --plugins dht,messaging,evaluation --plugin Plugins/PeerVoteWasm/peervote.wasm
 * (not together with the built-in peervote, or every vote would count twice). */
#include "p2p_wasm.h"

static const uint8_t VOTE_DOMAIN[20] = {
    0xfd, 0x63, 0xf1, 0xed, 0x32, 0x8d, 0xa3, 0x40, 0x1a, 0x66, 0x77, 0x0b, 0xeb, 0xa9, 0x58, 0x7e, 0x88, 0x29, 0xe1, 0xe1,
};

int32_t p2p_plugin_init(void) {
    p2p_describe("peervote-wasm", 13, "1.0.0", 5);
    int32_t r = p2p_register_put_interceptor(VOTE_DOMAIN, "count_votes", 11);
    if (r != P2P_OK) return r;
    return p2p_register_command("peervote.check", 14, "check", 5);
}

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

/* Hands a number over as decimal text. */
static int32_t answer(int64_t sum) {
    uint8_t text[24], digits[24];
    uint32_t n = 0, w = 0;
    uint64_t u = sum < 0 ? (uint64_t)(-(sum + 1)) + 1 : (uint64_t)sum;
    do { digits[n++] = (uint8_t)('0' + u % 10); u /= 10; } while (u);
    if (sum < 0) text[w++] = '-';
    while (n) text[w++] = digits[--n];
    p2p_output(text, w);
    return P2P_OK;
}

P2P_EXPORT("count_votes") int32_t count_votes(const uint8_t *key, const uint8_t *value, uint32_t len,
                                              const uint8_t *current, uint32_t current_len) {
    (void)key;
    int64_t vote, before = 0;
    if (!parse(value, len, &vote)) return p2p_fail(P2P_ERR_BAD_REQUEST, "a vote must be a decimal integer");
    if (current_len != 0xFFFFFFFFu && !parse(current, current_len, &before)) before = 0;
    if ((vote > 0 && before > INT64_MAX - vote) || (vote < 0 && before < INT64_MIN - vote))
        return p2p_fail(P2P_ERR_DENIED, "the vote count would overflow");
    return answer(before + vote);
}

/* peervote.check: a vote, normalised (the same small work in every PeerVote variant). */
P2P_EXPORT("check") int32_t check(const uint8_t *sender, const uint8_t *request, uint32_t len) {
    (void)sender;
    int64_t vote;
    if (!parse(request, len, &vote)) return p2p_fail(P2P_ERR_BAD_REQUEST, "a vote must be a decimal integer");
    return answer(vote);
}
