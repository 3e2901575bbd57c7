// Causal multi-head attention, CPU reference. q, k, v, out: [B*T, H*hd], head h in columns
// h*hd .. h*hd+hd-1. For each (batch, head):
//   S = q k^T / sqrt(hd) with S[t, s] = -inf for s > t,  P = softmax_rows(S),  out = P v.
// P is saved ([B, H, T, T], upper triangle unused) for the backward pass:
//   dP = dout v^T,  dv += P^T dout,  dS = P * (dP - rowsum(P * dP)),
//   dq += dS k / sqrt(hd),  dk += dS^T q / sqrt(hd).
// One thread per (batch, head) owns disjoint outputs, so results are deterministic.
#pragma once
#include <cmath>
#include <cstddef>
#include <vector>

namespace qopt {

template <typename T>
void attention_forward_cpu(T* out, T* probs, const T* q, const T* k, const T* v, int batch, int seq_len,
                           int n_heads, int head_dim) {
    const int dim = n_heads * head_dim;
    const T scale = T(1) / std::sqrt(T(head_dim));
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < batch; ++b)
        for (int h = 0; h < n_heads; ++h) {
            const size_t base = size_t(b) * seq_len * dim + size_t(h) * head_dim;
            T* p_bh = probs + (size_t(b) * n_heads + h) * seq_len * seq_len;
            for (int t = 0; t < seq_len; ++t) {
                const T* qt = q + base + size_t(t) * dim;
                T* p = p_bh + size_t(t) * seq_len;
                T max_score = -INFINITY;
                for (int s = 0; s <= t; ++s) {
                    const T* ks = k + base + size_t(s) * dim;
                    T dot = 0;
                    for (int i = 0; i < head_dim; ++i) dot += qt[i] * ks[i];
                    p[s] = dot * scale;
                    if (p[s] > max_score) max_score = p[s];
                }
                T denom = 0;
                for (int s = 0; s <= t; ++s) {
                    p[s] = std::exp(p[s] - max_score);
                    denom += p[s];
                }
                for (int s = 0; s <= t; ++s) p[s] /= denom;
                for (int s = t + 1; s < seq_len; ++s) p[s] = 0;
                T* o = out + base + size_t(t) * dim;
                for (int i = 0; i < head_dim; ++i) o[i] = 0;
                for (int s = 0; s <= t; ++s) {
                    const T* vs = v + base + size_t(s) * dim;
                    for (int i = 0; i < head_dim; ++i) o[i] += p[s] * vs[i];
                }
            }
        }
}

template <typename T>
void attention_backward_cpu(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                            const T* probs, int batch, int seq_len, int n_heads, int head_dim) {
    const int dim = n_heads * head_dim;
    const T scale = T(1) / std::sqrt(T(head_dim));
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < batch; ++b)
        for (int h = 0; h < n_heads; ++h) {
            const size_t base = size_t(b) * seq_len * dim + size_t(h) * head_dim;
            const T* p_bh = probs + (size_t(b) * n_heads + h) * seq_len * seq_len;
            std::vector<T> dp(static_cast<size_t>(seq_len));
            for (int t = 0; t < seq_len; ++t) {
                const T* p = p_bh + size_t(t) * seq_len;
                const T* go = dout + base + size_t(t) * dim;
                T weighted = 0;  // sum_s P[t, s] dP[t, s]
                for (int s = 0; s <= t; ++s) {
                    const T* vs = v + base + size_t(s) * dim;
                    T dot = 0;
                    for (int i = 0; i < head_dim; ++i) dot += go[i] * vs[i];
                    dp[s] = dot;
                    weighted += p[s] * dot;
                    T* dvs = dv + base + size_t(s) * dim;
                    for (int i = 0; i < head_dim; ++i) dvs[i] += p[s] * go[i];
                }
                const T* qt = q + base + size_t(t) * dim;
                T* dqt = dq + base + size_t(t) * dim;
                for (int s = 0; s <= t; ++s) {
                    const T ds = p[s] * (dp[s] - weighted) * scale;
                    const T* ks = k + base + size_t(s) * dim;
                    T* dks = dk + base + size_t(s) * dim;
                    for (int i = 0; i < head_dim; ++i) {
                        dqt[i] += ds * ks[i];
                        dks[i] += ds * qt[i];
                    }
                }
            }
        }
}

}  // namespace qopt
