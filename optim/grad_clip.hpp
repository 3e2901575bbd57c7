// Global gradient norm ||g||_2 over every parameter (summed in double, in a fixed order)
// and clipping: when max_norm > 0 and ||g|| > max_norm, every gradient is scaled by
// max_norm / ||g||. Returns the norm before clipping; a non-finite norm is returned as is
// (and nothing is scaled) so the caller can detect a bad step.
#pragma once
#include <cmath>
#include <cstddef>

namespace qopt {

template <typename T>
double clip_grad_norm_cpu(T* grads, size_t n, double max_norm) {
    double sum_sq = 0;
    for (size_t i = 0; i < n; ++i) sum_sq += double(grads[i]) * double(grads[i]);
    const double norm = std::sqrt(sum_sq);
    if (max_norm > 0 && std::isfinite(norm) && norm > max_norm) {
        const T scale = T(max_norm / norm);
        for (size_t i = 0; i < n; ++i) grads[i] *= scale;
    }
    return norm;
}

}  // namespace qopt
