// Muon (KellerJordan/Muon), CPU reference (the GPU step, optim/gpu_optimizer.cpp with
// optim/optimizer_kernels.cu's passes and newton_schulz_batched_gpu, follows it).
// For a hidden weight matrix W [rows, cols] with gradient G and momentum buffer M:
//   M = beta M + (1 - beta) G                         (lerp towards the gradient)
//   U = (1 - beta) G + beta M  with Nesterov, else U = M
//   O = NS5(U): the nearest semi-orthogonal matrix, approximately, by Newton-Schulz
//   W = W (1 - lr wd) - lr sqrt(max(1, rows / cols)) O
// NS5 normalises X = U / (||U||_F + 1e-7), works on the wide orientation (X X^T is the
// smaller square), and repeats  A = X X^T,  X = a X + (b A + c A A) X  with the quintic
// coefficients (a, b, c) = (3.4445, -4.7750, 2.0315). Each step maps every singular value
// s of X to a s + b s^3 + c s^5 and keeps the singular vectors, which the tests use.
// Embeddings, the tied head, norm gains and biases are not Muon's: AdamW updates them.
#pragma once
#include <cmath>
#include <vector>

#include "kernels/matmul.hpp"

namespace qopt {

struct MuonConfig {
    double lr = 0.02;  // the reference's default
    double momentum = 0.95;
    bool nesterov = true;
    int ns_steps = 5;
    double ns_a = 3.4445, ns_b = -4.7750, ns_c = 2.0315;
};

// The scalar map one Newton-Schulz step applies to each singular value.
inline double newton_schulz_scalar_step(double s, const MuonConfig& c) {
    return c.ns_a * s + c.ns_b * s * s * s + c.ns_c * s * s * s * s * s;
}

// out [rows, cols] = NS5(g [rows, cols]).
template <typename T>
void newton_schulz_cpu(T* out, const T* g, int rows, int cols, const MuonConfig& c) {
    const bool tall = rows > cols;
    const int r = tall ? cols : rows, k = tall ? rows : cols;  // X is r x k with r <= k
    std::vector<T> x(size_t(r) * k), xt(size_t(k) * r), a(size_t(r) * r), poly(size_t(r) * r);
    double norm_sq = 0;
    for (size_t i = 0; i < size_t(rows) * cols; ++i) norm_sq += double(g[i]) * double(g[i]);
    const T scale = T(1.0 / (std::sqrt(norm_sq) + 1e-7));
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) {
            const T v = g[size_t(i) * cols + j] * scale;
            if (tall) x[size_t(j) * k + i] = v;
            else x[size_t(i) * k + j] = v;
        }
    for (int step = 0; step < c.ns_steps; ++step) {
        // A = X X^T (matmul_forward_cpu computes in . weight^T)
        matmul_forward_cpu(a.data(), x.data(), x.data(), static_cast<const T*>(nullptr), r, k, r);
        // poly = b A + c A A  (A symmetric, so A A = A . A^T)
        matmul_forward_cpu(poly.data(), a.data(), a.data(), static_cast<const T*>(nullptr), r, r, r);
        for (size_t i = 0; i < poly.size(); ++i) poly[i] = T(c.ns_b) * a[i] + T(c.ns_c) * poly[i];
        // X = a X + poly X, with poly X = poly . (X^T)^T
        for (int i = 0; i < r; ++i)
            for (int j = 0; j < k; ++j) xt[size_t(j) * r + i] = x[size_t(i) * k + j];
        std::vector<T> px(size_t(r) * k);
        matmul_forward_cpu(px.data(), poly.data(), xt.data(), static_cast<const T*>(nullptr), r, r, k);
        for (size_t i = 0; i < x.size(); ++i) x[i] = T(c.ns_a) * x[i] + px[i];
    }
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) out[size_t(i) * cols + j] = tall ? x[size_t(j) * k + i] : x[size_t(i) * k + j];
}

// One Muon step on one matrix (param, grad, momentum all [rows, cols]).
template <typename T>
void muon_update_cpu(T* param, const T* grad, T* momentum, int rows, int cols, double lr, double weight_decay,
                     const MuonConfig& c) {
    const size_t n = size_t(rows) * cols;
    std::vector<T> update(n), orthogonal(n);
    for (size_t i = 0; i < n; ++i) {
        momentum[i] = T(c.momentum * double(momentum[i]) + (1.0 - c.momentum) * double(grad[i]));
        update[i] = c.nesterov ? T((1.0 - c.momentum) * double(grad[i]) + c.momentum * double(momentum[i]))
                               : momentum[i];
    }
    newton_schulz_cpu(orthogonal.data(), update.data(), rows, cols, c);
    const double shape_scale = std::sqrt(std::max(1.0, double(rows) / double(cols)));
    for (size_t i = 0; i < n; ++i)
        param[i] = T(double(param[i]) * (1.0 - lr * weight_decay) - lr * shape_scale * double(orthogonal[i]));
}

}  // namespace qopt
