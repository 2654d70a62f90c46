/* qsim's compiled kernels: one pass over memory where torch needs several (qsim/native.py).
 *
 * Each function is bit-identical to the pure-torch kernel it replaces in formats.py and
 * quantizer.py; the tests run both on the same inputs. Plain C (no torch headers), called
 * through ctypes on contiguous fp32 CPU tensors, threaded with OpenMP.
 *
 * Rows: x is n_rows x row_len; row r is divided by scale[r * scale_stride] (stride 0: one
 * scale for all; scale NULL: no scale), rounded, copysign'ed from x and multiplied back,
 * exactly as formats._run_chunked does: q = round(x / s) * s in fp32.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bits_to_float(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

/* frexp's exponent e (x = f * 2**e, f in [0.5, 1)) for finite x > 0, from the bits; 0 for 0. */
static inline int frexp_exponent(float x) {
    uint32_t b = float_to_bits(x) & 0x7FFFFFFFu;
    if (b == 0) return 0;
    if (b < 0x00800000u) return (int)((float_to_bits(x * 0x1p24f) >> 23) & 0xFF) - 126 - 24; /* subnormal */
    return (int)(b >> 23) - 126;
}

/* frexp's fraction f in [0.5, 1) for finite x > 0, from the bits; 0 for 0. */
static inline float frexp_fraction(float x) {
    uint32_t b = float_to_bits(x) & 0x7FFFFFFFu;
    if (b == 0) return 0.0f;
    if (b < 0x00800000u) b = float_to_bits(x * 0x1p24f) & 0x7FFFFFFFu;
    return bits_to_float((b & 0x007FFFFFu) | (126u << 23));
}

/* 2**e for -149 <= e <= 127, exactly. */
static inline float power_of_two(int e) {
    return e >= -126 ? bits_to_float((uint32_t)(e + 127) << 23) : bits_to_float(1u << (e + 149));
}

/* max |x| over n values, NaN if one is NaN: on the bits, where |x|'s order is the unsigned
 * integers' order and every NaN is above inf (so the loop vectorizes). */
static inline float abs_max(const float *restrict x, int64_t n) {
    uint32_t m = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t b = float_to_bits(x[j]) & 0x7FFFFFFFu;
        m = b > m ? b : m;
    }
    return m > 0x7F800000u ? NAN : bits_to_float(m);
}

/* torch.clamp: NaN stays NaN. */
static inline float clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* FloatFormat._kernel (nearest, saturating, with subnormals): add and subtract
 * 1.5 * 2**(E + 23 - m) with 2**E the value's binade held in [2**emin, 2**emax]; the product
 * is exact, so fma or not gives the same sum. */
static inline float round_minifloat(float v, float binade_lo, float binade_hi, float magic, float max) {
    float binade = clamp(bits_to_float(float_to_bits(v) & 0x7F800000u), binade_lo, binade_hi);
    float shift = binade * magic;
    float q = (v + shift) - shift;
    return clamp(q, -max, max);
}

void qsim_round_float(const float *restrict x, float *restrict out, int64_t n_rows, int64_t row_len, const float *scale,
                      int64_t scale_stride, int emin, int emax, int man_bits, float max, int threads) {
    const float binade_lo = ldexpf(1.0f, emin), binade_hi = ldexpf(1.0f, emax);
    const float magic = 1.5f * ldexpf(1.0f, 23 - man_bits);
#pragma omp parallel for schedule(static) num_threads(threads) if (n_rows * row_len > (1 << 16))
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * row_len;
        float *qr = out + r * row_len;
        if (scale == NULL) {
            for (int64_t j = 0; j < row_len; j++)
                qr[j] = copysignf(round_minifloat(xr[j], binade_lo, binade_hi, magic, max), xr[j]);
        } else {
            const float s = scale[r * scale_stride];
            for (int64_t j = 0; j < row_len; j++)
                qr[j] = copysignf(round_minifloat(xr[j] / s, binade_lo, binade_hi, magic, max), xr[j]) * s;
        }
    }
}

/* IntFormat._kernel (nearest): clamp to +-max, round half to even (keeps the sign of zero). */
void qsim_round_int(const float *restrict x, float *restrict out, int64_t n_rows, int64_t row_len, const float *scale,
                    int64_t scale_stride, float max, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (n_rows * row_len > (1 << 16))
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * row_len;
        float *qr = out + r * row_len;
        if (scale == NULL) {
            for (int64_t j = 0; j < row_len; j++) qr[j] = nearbyintf(clamp(xr[j], -max, max));
        } else {
            const float s = scale[r * scale_stride];
            for (int64_t j = 0; j < row_len; j++) qr[j] = nearbyintf(clamp(xr[j] / s, -max, max)) * s;
        }
    }
}

/* max |x| of each row; NaN if the row holds a NaN (as torch's amax). */
void qsim_row_amax(const float *x, float *amax, int64_t n_rows, int64_t row_len, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (n_rows * row_len > (1 << 16))
    for (int64_t r = 0; r < n_rows; r++) {
        amax[r] = abs_max(x + r * row_len, row_len);
    }
}

/* torch's float -> bf16 conversion (round to nearest even; NaN -> 0x7FC0), back to fp32. */
static inline float round_bf16(float f) {
    if (f != f) return bits_to_float(0x7FC00000u);
    uint32_t b = float_to_bits(f);
    b += 0x7FFFu + ((b >> 16) & 1u);
    return bits_to_float(b & 0xFFFF0000u);
}

enum { SCALE_FP32 = 0, SCALE_BF16 = 1, SCALE_E8M0_FLOOR = 2, SCALE_E8M0_CEIL = 3, SCALE_E4M3 = 4 };

/* quantizer._scale_from_amax for one block. elem_max: the element format's max;
 * e8m0: exp_offset (floor: 1 + emax_elem; ceil: max_e), max_mant, frac_bits (integer elements);
 * e4m3: tensor_scale, the fp32 scale over the block scales (0 already replaced by 1). */
static inline float block_scale(float amax, int rule, float elem_max, int exp_offset, float max_mant, int frac_bits,
                                float tensor_scale) {
    float s;
    int e;
    switch (rule) {
    case SCALE_FP32:
        s = amax / elem_max;
        return s < 0x1p-149f ? 0x1p-149f : s;
    case SCALE_BF16:
        s = round_bf16(amax / elem_max);
        return s < 0x1p-133f ? 0x1p-133f : s;
    case SCALE_E8M0_FLOOR:
    case SCALE_E8M0_CEIL: {
        e = frexp_exponent(amax);
        int exponent = e - exp_offset;
        if (rule == SCALE_E8M0_CEIL && frexp_fraction(amax) > max_mant) exponent++;
        exponent = exponent < -127 ? -127 : (exponent > 127 ? 127 : exponent);
        s = power_of_two(exponent);
        if (frac_bits) s *= power_of_two(-frac_bits);
        return s + (amax - amax);
    }
    default: { /* SCALE_E4M3: e4m3(amax / (elem max * s)) * s, NaN where amax is */
        float b = amax / (elem_max * tensor_scale);
        b = copysignf(round_minifloat(b, 0x1p-6f, 0x1p8f, 1.5f * 0x1p20f, 448.0f), b) + (amax - amax);
        return b * tensor_scale;
    }
    }
}

/* One row of qsim_block_quantize. A power-of-two (E8M0) scale divides by multiplying with its
 * reciprocal where that is a float (2**-127 and up), which is exact: both are the correctly
 * rounded x * 2**-k. */
static inline void block_row(const float *restrict xr, float *restrict qr, int64_t n, int rule, int is_int,
                             float binade_lo, float binade_hi, float magic, float elem_max, int exp_offset,
                             float max_mant, int frac_bits, float ts) {
    float s = block_scale(abs_max(xr, n), rule, elem_max, exp_offset, max_mant, frac_bits, ts);
    const int zero = rule == SCALE_E4M3 && s == 0.0f;
    if (zero) s = 1.0f;
    if ((rule == SCALE_E8M0_FLOOR || rule == SCALE_E8M0_CEIL) && s >= 0x1p-127f) {
        const float inv = 1.0f / s;
        if (is_int) {
            for (int64_t j = 0; j < n; j++) qr[j] = nearbyintf(clamp(xr[j] * inv, -elem_max, elem_max)) * s;
        } else {
            for (int64_t j = 0; j < n; j++)
                qr[j] = copysignf(round_minifloat(xr[j] * inv, binade_lo, binade_hi, magic, elem_max), xr[j]) * s;
        }
        return;
    }
    if (is_int) {
        for (int64_t j = 0; j < n; j++) qr[j] = nearbyintf(clamp(xr[j] / s, -elem_max, elem_max)) * s;
    } else {
        for (int64_t j = 0; j < n; j++)
            qr[j] = copysignf(round_minifloat(xr[j] / s, binade_lo, binade_hi, magic, elem_max), xr[j]) * s;
    }
    if (zero)
        for (int64_t j = 0; j < n; j++) qr[j] *= 0.0f;
}

/* Symmetric block (or token) scaling fused: per row of row_len elements, its amax, its scale,
 * and round(x / scale) * scale on the element grid (is_int: the int grid +-elem_max; else a
 * minifloat as qsim_round_float). Rows come in groups of rows_per_group (E4M3: the rows of
 * blocks of one token, under one fp32 scale: tensor_scale[group], or, if tensor_scale is NULL,
 * the group's amax / (elem max * 448), 1 where that is 0). A two-level (E4M3) scale of 0 decodes
 * its block to 0 (q * 0), as quantizer.quantize_view. */
void qsim_block_quantize(const float *restrict x, float *restrict out, int64_t n_rows, int64_t row_len, int rule,
                         int is_int, int emin, int emax, int man_bits, float elem_max, int exp_offset, float max_mant,
                         int frac_bits, const float *tensor_scale, int64_t rows_per_group, int threads) {
    const float binade_lo = ldexpf(1.0f, emin), binade_hi = ldexpf(1.0f, emax);
    const float magic = 1.5f * ldexpf(1.0f, 23 - man_bits);
    const int64_t n_groups = n_rows / rows_per_group, group_len = rows_per_group * row_len;
#pragma omp parallel for schedule(static) num_threads(threads) if (n_rows * row_len > (1 << 16))
    for (int64_t g = 0; g < n_groups; g++) {
        float ts = 1.0f;
        if (rule == SCALE_E4M3) {
            if (tensor_scale) {
                ts = tensor_scale[g];
            } else {
                ts = abs_max(x + g * group_len, group_len) / (elem_max * 448.0f);
                ts = ts == 0.0f ? 1.0f : ts;
            }
        }
        for (int64_t r = g * rows_per_group; r < (g + 1) * rows_per_group; r++) {
            const float *xr = x + r * row_len;
            float *qr = out + r * row_len;
            /* constant lengths let the compiler unroll MX's 32 and NVFP4's 16 */
            if (row_len == 16)
                block_row(xr, qr, 16, rule, is_int, binade_lo, binade_hi, magic, elem_max, exp_offset, max_mant, frac_bits, ts);
            else if (row_len == 32)
                block_row(xr, qr, 32, rule, is_int, binade_lo, binade_hi, magic, elem_max, exp_offset, max_mant, frac_bits, ts);
            else
                block_row(xr, qr, row_len, rule, is_int, binade_lo, binade_hi, magic, elem_max, exp_offset, max_mant,
                          frac_bits, ts);
        }
    }
}

static inline double bits_to_double(uint64_t b) { double d; memcpy(&d, &b, 8); return d; }
static inline uint64_t double_to_bits(double d) { uint64_t b; memcpy(&b, &d, 8); return b; }

/* accum.round_float64_reference for one float64 value: round once to the grid with man_bits
 * mantissa bits and smallest normal exponent emin (nearest, ties to even), beyond max -> inf;
 * inf and NaN stay. Add and subtract 1.5 * 2**(E + 52 - m), as round_minifloat in double. */
static inline double round_accumulator(double v, int man_bits, double binade_lo, double max) {
    if (!(v - v == 0.0)) return v; /* inf or NaN */
    double binade = bits_to_double(double_to_bits(v) & 0x7FF0000000000000ull);
    binade = binade < binade_lo ? binade_lo : binade;
    const double shift = binade * (1.5 * (double)(1ull << (52 - man_bits)));
    const double q = (v + shift) - shift;
    return fabs(q) > max ? copysign(INFINITY, v) : copysign(q, v);
}

/* One chunk of a narrow-accumulator matmul (accum.py): partial holds the chunk's float64
 * partial sums; each is rounded to the accumulator grid, then added to out in fp32 (first
 * chunk: out = it). */
void qsim_accumulate_chunk(const double *restrict partial, float *restrict out, int64_t n, int first, int man_bits,
                           int emin, double max, int threads) {
    const double binade_lo = ldexp(1.0, emin);
#pragma omp parallel for schedule(static) num_threads(threads) if (n > (1 << 16))
    for (int64_t i = 0; i < n; i++) {
        const float q = (float)round_accumulator(partial[i], man_bits, binade_lo, max);
        out[i] = first ? q : out[i] + q;
    }
}
