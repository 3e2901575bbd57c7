// Tied output head with softmax cross-entropy, CPU reference, fused like the GPU kernel
// will be: rows are processed in chunks, so full [N, V] logits never exist at once.
//   logits[n, v] = x[n] . embed[v]  for v < V (padded rows of embed are never used)
//   loss[n] = logsumexp_v logits[n, v] - logits[n, target[n]]
// With grad_scale != 0 the backward pass runs in the same sweep (grad_scale is dL/dloss[n],
// e.g. 1/N for a mean):
//   dlogits = (softmax(logits) - onehot(target)) * grad_scale
//   dx[n] += dlogits[n] embed,   d_embed[v] += sum_n dlogits[n, v] x[n]
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/matmul.hpp"

namespace qopt {

template <typename T>
void classifier_cpu(T* losses, T* dx, T* d_embed, const T* x, const T* embed, const int* targets, int n_rows,
                    int dim, int vocab_size, T grad_scale) {
    const int chunk = 128;  // rows per sweep: the logits buffer is chunk x V (51 MB for GPT-2's vocab)
    std::vector<T> logits(size_t(chunk) * vocab_size);
    for (int n0 = 0; n0 < n_rows; n0 += chunk) {
        const int rows = std::min(chunk, n_rows - n0);
        matmul_forward_cpu(logits.data(), x + size_t(n0) * dim, embed, static_cast<const T*>(nullptr), rows, dim,
                           vocab_size);
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; ++r) {
            T* row = logits.data() + size_t(r) * vocab_size;
            const int target = targets[n0 + r];
            T max_logit = row[0];
            for (int v = 1; v < vocab_size; ++v) max_logit = std::max(max_logit, row[v]);
            // One exponential per logit: the row keeps exp(logit - max) for the gradient. The sum
            // is in double: 50,257 terms added one by one in float are off by ~5e-5 relative.
            const T target_logit = row[target];
            double sum = 0;
            for (int v = 0; v < vocab_size; ++v) sum += row[v] = std::exp(row[v] - max_logit);
            losses[n0 + r] = T(std::log(sum) + max_logit - target_logit);
            if (grad_scale != T(0)) {
                const T scale = T(grad_scale / sum);  // softmax = exp(logit - max) / sum
                for (int v = 0; v < vocab_size; ++v) row[v] *= scale;
                row[target] -= grad_scale;
            }
        }
        if (grad_scale != T(0))
            matmul_backward_cpu(dx + size_t(n0) * dim, d_embed, static_cast<T*>(nullptr), logits.data(),
                                x + size_t(n0) * dim, embed, rows, dim, vocab_size);
    }
}

}  // namespace qopt
