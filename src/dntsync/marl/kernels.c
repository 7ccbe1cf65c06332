/* The Q networks' two C kernels (why: dntsync/marl/kernels.py, which compiles this file on
 * first use and calls it through ctypes). Plain C on raw float32 buffers.
 *
 * 1. Fused GRU gate arithmetic (torch.nn.GRUCell's equations) for one slot of M stacked
 *    nets, forward and backward; the matmuls stay in torch.
 *
 *    Every array is M blocks (one per net) of B rows; a row holds 3H gate values (r, z, n, as
 *    torch.nn.GRUCell) or H state values; `*_stride` is the distance in floats between two
 *    nets' blocks, rows inside a block are contiguous.
 * 2. The flat head's masked max over valid actions, row by row (acting). */
#include <stdint.h>

/* exp(x) in float32 without libm or branches, so that the loops vectorise: x = k ln2 + f,
 * |f| <= ln2 / 2, exp(f) by the Cephes library's expf polynomial, 2^k from the exponent
 * bits. Relative error about 2e-7 over the clamped range (tests compare with torch). */
static inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    /* k = round(x / ln 2) by the 1.5 * 2^23 trick (round to nearest, no branch) */
    float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float f = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)k + 127) << 23};
    return p * scale.f;
}

static inline float sigmoid_(float x) { return 1.0f / (1.0f + fast_exp(-x)); }
static inline float tanh_(float x) { return 1.0f - 2.0f / (1.0f + fast_exp(2.0f * x)); }

static void row_forward(const float *restrict gi, const float *restrict gh,
                        const float *restrict s, float *restrict out, float *restrict r_out,
                        float *restrict z_out, float *restrict n_out, int64_t H) {
    for (int64_t j = 0; j < H; ++j) {
        float r = sigmoid_(gi[j] + gh[j]);
        float z = sigmoid_(gi[H + j] + gh[H + j]);
        float n = tanh_(gi[2 * H + j] + r * gh[2 * H + j]);
        out[j] = n + z * (s[j] - n);
        r_out[j] = r;
        z_out[j] = z;
        n_out[j] = n;
    }
}

/* row_forward without the stores for the backward (target nets, acting): a separate
 * branch-free loop, so that both vectorise. */
static void row_forward_nosave(const float *restrict gi, const float *restrict gh,
                               const float *restrict s, float *restrict out, int64_t H) {
    for (int64_t j = 0; j < H; ++j) {
        float r = sigmoid_(gi[j] + gh[j]);
        float z = sigmoid_(gi[H + j] + gh[H + j]);
        float n = tanh_(gi[2 * H + j] + r * gh[2 * H + j]);
        out[j] = n + z * (s[j] - n);
    }
}

/* s' = (1 - z) n + z s with r = sig(gi_r + gh_r), z = sig(gi_z + gh_z), n = tanh(gi_n + r gh_n).
 * gi and gh [M][B][3H] (gh = s W_hh + b_hh), s and s' = out [M][B][H]. With `save`, r, z
 * and n are also written ([M][B][H]), for the backward. */
void gru_gates_forward(const float *gi, int64_t gi_stride, const float *gh, int64_t gh_stride,
                       const float *s, int64_t s_stride, float *out, int64_t out_stride,
                       float *r, float *z, float *n, int64_t save_stride, int64_t M, int64_t B,
                       int64_t H, int save) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t b = 0; b < B; ++b) {
            const float *gi_row = gi + m * gi_stride + b * 3 * H, *gh_row = gh + m * gh_stride + b * 3 * H;
            const float *s_row = s + m * s_stride + b * H;
            float *out_row = out + m * out_stride + b * H;
            int64_t at = m * save_stride + b * H;
            if (save)
                row_forward(gi_row, gh_row, s_row, out_row, r + at, z + at, n + at, H);
            else
                row_forward_nosave(gi_row, gh_row, s_row, out_row, H);
        }
}

static void row_backward(const float *restrict g_out, const float *restrict carry,
                         const float *restrict s, const float *restrict r_,
                         const float *restrict z_, const float *restrict n_,
                         const float *restrict gh, float *restrict d_gi, float *restrict d_gh,
                         float *restrict ds, int64_t H) {
    for (int64_t j = 0; j < H; ++j) {
        float r = r_[j], z = z_[j], n = n_[j], g = g_out[j] + carry[j];
        float dn = g * (1.0f - z) * (1.0f - n * n);
        float dz = g * (s[j] - n) * z * (1.0f - z);
        float dr = dn * gh[2 * H + j] * r * (1.0f - r);
        d_gi[j] = dr;
        d_gi[H + j] = dz;
        d_gi[2 * H + j] = dn;
        d_gh[j] = dr;
        d_gh[H + j] = dz;
        d_gh[2 * H + j] = dn * r;
        ds[j] = g * z;
    }
}

/* Backward of one slot. g = dL/ds' is g_out (the slot's output gradient, nets g_stride apart)
 * plus carry (from the later slots, [M][B][H] contiguous); s, r, z, n as saved, gh the slot's
 * hidden projections -> d_gi, d_gh [M][B][3H] and ds = z g [M][B][H] contiguous (dL/ds through
 * the direct path; the caller adds the path through gh = s W_hh + b_hh with a matmul). */
void gru_gates_backward(const float *g_out, int64_t g_stride, const float *carry,
                        const float *s, int64_t s_stride, const float *r, const float *z,
                        const float *n, int64_t save_stride, const float *gh, int64_t gh_stride,
                        float *d_gi, int64_t dgi_stride, float *d_gh, int64_t dgh_stride,
                        float *ds, int64_t M, int64_t B, int64_t H) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t b = 0; b < B; ++b) {
            int64_t at = m * save_stride + b * H, here = (m * B + b) * H;
            row_backward(g_out + m * g_stride + b * H, carry + here, s + m * s_stride + b * H,
                         r + at, z + at, n + at, gh + m * gh_stride + b * 3 * H,
                         d_gi + m * dgi_stride + b * 3 * H, d_gh + m * dgh_stride + b * 3 * H,
                         ds + here, H);
        }
}

/* ------------------------------------------------------------ 2. flat head's masked max
 * For each row: max and argmax of Q(a) = w_a . x + b_a over the row's valid actions, the
 * upload bit times every subset of its covered users (see dntsync.marl.networks). Valid
 * action j in 0 .. 2^(k+1) - 1 of a row covering users u_1 < ... < u_k sets bit 0 (upload)
 * if bit 0 of j is set and bit u_i + 1 if bit i of j is; ties go to the smallest j (the
 * order of `valid_actions_of`). No gathered copy of the weight rows is made: acting with
 * B environments needs only B rows, and copying their valid actions' weights cost more
 * than the dot products. */

static float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; ++l)
            acc[l] += a[j + l] * b[j + l];
    float total = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; j < n; ++j)
        total += a[j] * b[j];
    return total;
}

/* x [R][H], covered [R][U] (0/1 bytes), weight [2^(U+1)][H], bias [2^(U+1)] -> values [R],
 * best [R] (action codes). */
void flat_head_masked_max(const float *x, const uint8_t *covered, const float *weight,
                          const float *bias, float *values, int64_t *best, int64_t R,
                          int64_t U, int64_t H) {
    int64_t bit_value[64];
    for (int64_t row = 0; row < R; ++row) {
        const float *x_row = x + row * H;
        int64_t k = 0;
        bit_value[k++] = 1;  /* upload */
        for (int64_t u = 0; u < U; ++u)
            if (covered[row * U + u])
                bit_value[k++] = (int64_t)1 << (u + 1);
        float top = 0.0f;
        int64_t top_action = -1;
        for (int64_t j = 0; j < ((int64_t)1 << k); ++j) {
            int64_t action = 0;
            for (int64_t i = 0; i < k; ++i)
                if (j >> i & 1)
                    action += bit_value[i];
            float q = dot(weight + action * H, x_row, H) + bias[action];
            if (top_action < 0 || q > top) {
                top = q;
                top_action = action;
            }
        }
        values[row] = top;
        best[row] = top_action;
    }
}
