// Brute-force evidence for attn_common.jit_helpers.div_rn_by_row_scale: the helper's arithmetic, step for step in
// C (fmaf is a fused multiply-add; -ffp-contract=off keeps the compiler from fusing anything else), against IEEE
// float division, over billions of (x, scale) pairs. tests/attn_common/test_div_rn_by_row_scale.py runs the same
// checks, smaller, in numpy and through the jit helper itself.
//
//   gcc -O2 -mfma -ffp-contract=off -fopenmp tools/check_div_rn_by_row_scale.c -o /tmp/check_div -lm
//   /tmp/check_div hard 1                 # every mantissa pair whose quotient is within 6 units of a midpoint
//   /tmp/check_div random 1 1e9 -149 127  # any finite x (all bit patterns alike), scale exponent in [lo, hi]
//   /tmp/check_div mant 1 1e9             # random mantissas, exponents in [-20, 20]
//   /tmp/check_div xall 1 16 -20 20       # 1/128 of all finite x against 16 random scales
//   /tmp/check_div fp8mid 1 2e7 -20 20    # x / scale within 3 ulps of every FP8 value and midpoint
//   /tmp/check_div special 1              # scales +-0 and +-inf against a spread of all x
//
// The second argument picks the arithmetic: 1 = ANY_SCALE, 0 = without it (then scales outside [2^-62, 2^126)
// are outside the claim), 2 = no correction step and 3 = a reciprocal one ulp off (both must fail: they show
// that the cases bite). Counted per run: pairs, differences from the IEEE quotient where the helper claims equality
// (must be 0; variant 1 draws negative scales half the time), broken weaker claims outside it (must be 0), all float32 differences, and FP8 codes (e4m3fn,
// e5m2, after the kernel's clamp) that differ (must be 0 where the scale is in the claimed range).
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline float f_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t u_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

// The jit helper (tl.clamp without NaN propagation is fmaxf/fminf here).
static inline float helper(float x, float s, int variant) {
  float xn;
  if (variant == 1) {
    float a = fabsf(s);
    float p = a < 0x1p-62f ? 0x1p64f : (a >= 0x1p64f ? 0x1p-64f : 1.f);
    if (s < 0) p = -p;
    s = s * p;
    xn = x * (p * -1.f);
  } else {
    xn = x * -1.f;
  }
  float nr = -1.f / s;  // correctly rounded (divss)
  if (variant == 3) nr = nextafterf(nr, 0.f);
  s = fminf(fmaxf(s, -0x1.fffffep127f), 0x1.fffffep127f);
  float q = fminf(fmaxf(xn * nr, -0x1p126f), 0x1p126f);
  if (variant == 2) return q;
  float e = fmaf(q, s, xn);
  return fmaf(e, nr, q);
}

// clamp(v, -fmax, fmax) rounded to an FP8 format (m mantissa bits, smallest normal mn), ties to even, as float.
static inline float fp8(float v, int m, float mn, float fmax) {
  v = fminf(fmaxf(v, -fmax), fmax);
  uint32_t b = u_of(v);
  int drop = 23 - m;
  uint32_t normal = (b + (1u << (drop - 1)) - 1 + ((b >> drop) & 1)) & ~((1u << drop) - 1);
  float c = mn * (float)(1u << drop);
  uint32_t sub = u_of((fabsf(v) + c) - c) | (b & 0x80000000u);
  return f_of(fabsf(v) < mn ? sub : normal);
}

typedef struct { long n, claim_diff, outside_broken, f32_diff, e4m3_diff, e5m2_diff; } stats;

static void add(stats *to, const stats *from) {
  to->n += from->n; to->claim_diff += from->claim_diff; to->outside_broken += from->outside_broken;
  to->f32_diff += from->f32_diff; to->e4m3_diff += from->e4m3_diff; to->e5m2_diff += from->e5m2_diff;
}

static void check(float x, float s, int variant, stats *st) {
  float got = helper(x, s, variant);
  float want = x / s;
  if (u_of(want) != u_of((float)((double)x / (double)s))) { printf("reference mismatch %a %a\n", x, s); exit(1); }
  st->n++;
  float aw = fabsf(want);
  int scale_ok = variant != 0 || (s >= 0x1p-62f && s < 0x1p126f);
  int claim = scale_ok && (x == 0 || (aw >= 0x1p-40f && aw < 0x1p126f));
  if (u_of(got) != u_of(want)) {
    st->f32_diff++;
    if (claim && ++st->claim_diff <= 3) printf("  claim broken: x=%a s=%a got=%a want=%a\n", x, s, got, want);
  }
  if (scale_ok && !claim) {  // same sign; tiny stays tiny, huge stays huge
    int ok = signbit(got) == signbit(want) && (aw < 0x1p-40f ? fabsf(got) < 0x1p-39f : fabsf(got) >= 0x1p125f);
    if (!ok && ++st->outside_broken <= 3) printf("  outside claim broken: x=%a s=%a got=%a want=%a\n", x, s, got, want);
  }
  if (u_of(fp8(got, 3, 0x1p-6f, 448.f)) != u_of(fp8(want, 3, 0x1p-6f, 448.f)) && ++st->e4m3_diff <= 3)
    printf("  e4m3 differs: x=%a s=%a got=%a want=%a\n", x, s, got, want);
  if (u_of(fp8(got, 2, 0x1p-14f, 57344.f)) != u_of(fp8(want, 2, 0x1p-14f, 57344.f)) && ++st->e5m2_diff <= 3)
    printf("  e5m2 differs: x=%a s=%a got=%a want=%a\n", x, s, got, want);
}

static inline uint64_t rnd(uint64_t *s) { uint64_t x = *s; x ^= x << 13; x ^= x >> 7; x ^= x << 17; return *s = x; }

static float rand_finite(uint64_t *sd) {
  for (;;) { uint32_t u = (uint32_t)rnd(sd); if (((u >> 23) & 0xff) != 0xff) return f_of(u); }
}

// Positive, mantissa uniform, exponent uniform in [lo, hi] (below -126: rounded into the subnormals).
static float rand_scale(uint64_t *sd, int lo, int hi) {
  uint32_t u = (uint32_t)rnd(sd);
  int e = lo + (int)(rnd(sd) % (uint64_t)(hi - lo + 1));
  return ldexpf(f_of(0x3f800000u | (u & 0x7fffff)), e);
}

static int negative_scales;  // variant 1 claims negative scales too: draw them half the time

static float rand_signed_scale(uint64_t *sd, int lo, int hi) {
  float s = rand_scale(sd, lo, hi);
  return negative_scales && (rnd(sd) & 1) ? -s : s;
}

// Calls check() on the pairs with a / b within N <= 6 units (2^-48 b^-1 relative) of a rounding midpoint, a and b
// mantissas in [1, 2): the only pairs the error bound does not settle (see the test module). With a = A 2^-23,
// b = B 2^-23 and midpoint M 2^-c (c = 25 when a / b < 1, else 24, M odd), N = |A 2^c - B M|; B M = -+N mod 2^c
// fixes M modulo 2^(c - tz(B)), and 8 | B leaves no N <= 6.
static void hard_cases(int variant, stats *st) {
  static const int placements[][2] = {{0, 0}, {100, -20}, {-100, 20}, {-79, -126}, {127, 125}, {3, -5}, {-60, -90}};
  #pragma omp parallel
  {
    stats loc = {0};
    #pragma omp for schedule(dynamic, 4096)
    for (long B = 1L << 23; B < (1L << 24); B++) {
      int tz = __builtin_ctzl(B);
      if (tz > 2) continue;
      for (int c = 24; c <= 25; c++)
        for (int N = 1; N <= 6; N++) {
          if (N % (1 << tz) || ((N >> tz) & 1) == 0) continue;
          uint64_t bo = (uint64_t)B >> tz, mod = 1ull << (c - tz), no = (uint64_t)N >> tz, inv = 1;
          for (int k = 0; k < 6; k++) inv = inv * (2 - bo * inv) % mod;
          for (int sg = -1; sg <= 1; sg += 2) {
            uint64_t m0 = ((sg > 0 ? no : mod - no) % mod) * inv % mod;
            for (uint64_t M = m0; M < (1ull << c); M += mod) {
              if (M < (1ull << (c - 1)) || !(M & 1)) continue;
              int64_t num = (int64_t)((uint64_t)B * M) - sg * N;
              if (num % (1LL << c)) { printf("enumeration error\n"); exit(1); }
              int64_t A = num >> c;
              if (A < (1L << 23) || A >= (1L << 24)) continue;
              float a = ldexpf((float)A, -23), b = ldexpf((float)B, -23);
              for (int p = 0; p < 7; p++) {
                float x = ldexpf(a, placements[p][0]), s = ldexpf(b, placements[p][1]);
                check(x, s, variant, &loc);
                check(-x, s, variant, &loc);
                if (variant == 1) check(x, -s, variant, &loc);
              }
            }
          }
        }
    }
    #pragma omp critical
    add(st, &loc);
  }
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: see the header\n"); return 2; }
  const char *mode = argv[1];
  int variant = atoi(argv[2]);
  long n = argc > 3 ? (long)atof(argv[3]) : 100000000;
  negative_scales = variant == 1;
  int lo = argc > 5 ? atoi(argv[4]) : -126, hi = argc > 5 ? atoi(argv[5]) : 125;
  stats st = {0};
  if (!strcmp(mode, "hard")) {
    hard_cases(variant, &st);
  } else if (!strcmp(mode, "special")) {  // zero and infinite scales: IEEE's quotients exactly, NaN as NaN
    const float scales[] = {0.f, -0.f, INFINITY, -INFINITY};
    long bad = 0;
    for (int k = 0; k < 4; k++)
      for (uint64_t u = 0; u < (1ull << 32); u += 1 + (u & 0xfff)) {
        float x = f_of((uint32_t)u), got = helper(x, scales[k], variant), want = x / scales[k];
        st.n++;
        if (isnan(x)) continue;
        if ((isnan(want) ? !isnan(got) : u_of(got) != u_of(want)) && ++bad <= 3)
          printf("  special: x=%a s=%a got=%a want=%a\n", x, scales[k], got, want);
      }
    st.claim_diff = bad;
  } else if (!strcmp(mode, "fp8mid")) {
    float targets[1024]; int nt = 0;  // every positive finite e4m3fn / e5m2 value and midpoint
    for (int fmt = 0; fmt < 2; fmt++) {
      int m = fmt ? 2 : 3, emin = fmt ? -14 : -6; float fmax = fmt ? 57344.f : 448.f;
      for (int e = emin - 1; e <= 15; e++)
        for (int k = 0; k < (2 << m); k++) {
          float g = e < emin ? ldexpf((float)k, emin - m - 1) : ldexpf(1.f, e) + ldexpf((float)k, e - m - 1);
          if (g > 0 && g <= fmax) targets[nt++] = g;
        }
    }
    #pragma omp parallel
    {
      stats loc = {0}; uint64_t sd = 0x9E3779B97F4A7C15ull ^ (uint64_t)(size_t)&loc;
      #pragma omp for
      for (long i = 0; i < n; i++) {
        float s = rand_signed_scale(&sd, lo, hi), x0 = (float)((double)targets[rnd(&sd) % nt] * (double)s);
        if (!isfinite(s) || !isfinite(x0)) continue;
        for (int d = -3; d <= 3; d++) {
          float x = f_of(u_of(x0) + d);
          if (isfinite(x)) { check(x, s, variant, &loc); check(-x, s, variant, &loc); }
        }
      }
      #pragma omp critical
      add(&st, &loc);
    }
  } else {
    int xall = !strcmp(mode, "xall"), mant = !strcmp(mode, "mant");
    if (!xall && !mant && strcmp(mode, "random")) { fprintf(stderr, "unknown mode %s\n", mode); return 2; }
    #pragma omp parallel
    {
      stats loc = {0}; uint64_t sd = 0xD1B54A32D192ED03ull ^ (uint64_t)(size_t)&loc;
      #pragma omp for schedule(dynamic, 1)
      for (long i = 0; i < n; i++) {
        if (xall) {
          float s = rand_signed_scale(&sd, lo, hi);
          for (uint64_t u = 0; u < (1ull << 32); u += 1 + (rnd(&sd) & 0xff))
            if (((u >> 23) & 0xff) != 0xff) check(f_of((uint32_t)u), s, variant, &loc);
        } else if (mant) {
          float x = rand_scale(&sd, -20, 20) * ((rnd(&sd) & 1) ? -1.f : 1.f);
          check(x, rand_signed_scale(&sd, -20, 20), variant, &loc);
        } else {
          check(rand_finite(&sd), rand_signed_scale(&sd, lo, hi), variant, &loc);
        }
      }
      #pragma omp critical
      add(&st, &loc);
    }
  }
  printf("%s variant %d (scale exponents [%d, %d] where drawn): pairs %ld, claim broken %ld, weaker claim broken %ld, "
         "float32 differences %ld, e4m3fn differences %ld, e5m2 differences %ld\n",
         mode, variant, lo, hi, st.n, st.claim_diff, st.outside_broken, st.f32_diff, st.e4m3_diff, st.e5m2_diff);
  return 0;
}
