// Token (+ learned position) embedding, CPU reference:
//   out[n, :] = embed[token[n], :] + pos_embed[n % T, :]   (pos_embed may be null)
// Backward accumulates the rows back: d_embed[token[n]] += dout[n], d_pos[n % T] += dout[n].
// Each thread owns a slice of feature columns and walks the tokens in order, so repeated
// tokens are summed in a fixed order (deterministic, no atomics).
#pragma once
#include <cstddef>

namespace qopt {

template <typename T>
void embedding_forward_cpu(T* out, const int* tokens, const T* embed, const T* pos_embed, int n_rows,
                           int seq_len, int dim) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < n_rows; ++n) {
        const T* e = embed + size_t(tokens[n]) * dim;
        const T* p = pos_embed ? pos_embed + size_t(n % seq_len) * dim : nullptr;
        T* o = out + size_t(n) * dim;
        for (int c = 0; c < dim; ++c) o[c] = e[c] + (p ? p[c] : T(0));
    }
}

template <typename T>
void embedding_backward_cpu(T* d_embed, T* d_pos_embed, const T* dout, const int* tokens, int n_rows,
                            int seq_len, int dim) {
#pragma omp parallel for schedule(static)
    for (int c = 0; c < dim; ++c)
        for (int n = 0; n < n_rows; ++n) {
            const T g = dout[size_t(n) * dim + c];
            d_embed[size_t(tokens[n]) * dim + c] += g;
            if (d_pos_embed) d_pos_embed[size_t(n % seq_len) * dim + c] += g;
        }
}

}  // namespace qopt
