/* An ordinary C library, with no SwiftP2P code at all, served as network commands through its
 * manifest (libcmath.json) and libffi. Built from the c-command template. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* cmath.gcd: u64, u64 -> u64 */
uint64_t cmath_gcd(uint64_t a, uint64_t b) {
    while (b) { uint64_t t = a % b; a = b; b = t; }
    return a;
}

/* cmath.hypot: f64, f64 -> f64 */
double cmath_hypot(double x, double y) {
    /* Written out so that the library needs no libm. */
    double s = x * x + y * y, r = s > 1 ? s : 1;
    for (int i = 0; i < 60; i++) r = 0.5 * (r + s / r);
    return s == 0 ? 0 : r;
}

/* cmath.is_prime: u32 -> bool */
_Bool cmath_is_prime(uint32_t n) {
    if (n < 2) return 0;
    for (uint32_t d = 2; (uint64_t)d * d <= n; d++) if (n % d == 0) return 0;
    return 1;
}

/* cmath.repeat: string, i32 -> string (malloc'ed; the manifest says free_result) */
char *cmath_repeat(const char *text, int32_t times) {
    if (times < 0) times = 0;
    if (times > 1000) times = 1000;
    size_t n = strlen(text);
    char *out = malloc(n * (size_t)times + 1);
    if (!out) return NULL;
    for (int32_t i = 0; i < times; i++) memcpy(out + n * (size_t)i, text, n);
    out[n * (size_t)times] = 0;
    return out;
}
