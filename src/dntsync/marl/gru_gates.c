/* Fused GRU gate arithmetic (torch.nn.GRUCell's equations) for one slot of M stacked nets.
 *
 * Plain C on raw float32 buffers, compiled on first use and called through ctypes by
 * dntsync.marl.gru_scan; the matmuls stay in torch. Why our own code: on the Q networks'
 * small tensors ([M=3, B=16, H=128]) eager torch spends more time launching the dozen
 * elementwise ops of a GRU step (and their backward) than computing them, and no library
 * op fuses them on CPU (torch's fused GRU cell is CUDA only).
 *
 * Every array is M blocks (one per net) of B rows; a row holds 3H gate values (r, z, n, as
 * torch.nn.GRUCell) or H state values; `*_stride` is the distance in floats between two
 * nets' blocks, rows inside a block are contiguous. */
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
