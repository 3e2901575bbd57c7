// Rotary position embedding, CPU reference. Features are taken in adjacent pairs
// (2i, 2i+1) within each head; pair i at position t is rotated by the angle
// t * theta^(-2i / head_dim):
//   (x0, x1) -> (x0 cos a - x1 sin a,  x0 sin a + x1 cos a).
// The backward pass is the inverse rotation of the gradient (rotation is orthogonal),
// accumulated into din. Rows are tokens in (batch, position) order: position = row % seq_len.
#pragma once
#include <cmath>
#include <vector>

namespace qopt {

// cos/sin table of shape [seq_len, head_dim/2], computed in double.
template <typename T>
void rope_angles(T* cos_table, T* sin_table, int seq_len, int head_dim, double theta) {
    const int half = head_dim / 2;
    for (int t = 0; t < seq_len; ++t)
        for (int i = 0; i < half; ++i) {
            const double angle = double(t) * std::pow(theta, -2.0 * i / head_dim);
            cos_table[t * half + i] = T(std::cos(angle));
            sin_table[t * half + i] = T(std::sin(angle));
        }
}

// Rotates every pair by direction * angle (+1: forward, -1: the inverse); writes or adds to out.
template <typename T>
void rope_rotate_cpu(T* out, const T* in, int n_rows, int seq_len, int n_heads, int head_dim, double theta,
                     T direction, bool accumulate) {
    const int half = head_dim / 2, dim = n_heads * head_dim;
    std::vector<T> cos_table(size_t(seq_len) * half), sin_table(size_t(seq_len) * half);
    rope_angles(cos_table.data(), sin_table.data(), seq_len, head_dim, theta);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < n_rows; ++n) {
        const int t = n % seq_len;
        for (int h = 0; h < n_heads; ++h)
            for (int i = 0; i < half; ++i) {
                const size_t at = size_t(n) * dim + size_t(h) * head_dim + 2 * i;
                const T c = cos_table[t * half + i], s = direction * sin_table[t * half + i];
                const T x0 = in[at], x1 = in[at + 1];
                const T y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
                out[at] = accumulate ? out[at] + y0 : y0;
                out[at + 1] = accumulate ? out[at + 1] + y1 : y1;
            }
    }
}

template <typename T>
void rope_forward_cpu(T* out, const T* in, int n_rows, int seq_len, int n_heads, int head_dim, double theta) {
    rope_rotate_cpu(out, in, n_rows, seq_len, n_heads, head_dim, theta, T(1), false);
}

template <typename T>
void rope_backward_cpu(T* din, const T* dout, int n_rows, int seq_len, int n_heads, int head_dim, double theta) {
    rope_rotate_cpu(din, dout, n_rows, seq_len, n_heads, head_dim, theta, T(-1), true);
}

}  // namespace qopt
