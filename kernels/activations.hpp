// Pointwise MLP activations, CPU reference. Backward accumulates: din += dout * f'(in).
//  GELU (tanh form, GPT-2): y = x/2 * (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi)
//    y' = (1 + t)/2 + x/2 * (1 - t^2) * k * (1 + 3 * 0.044715 x^2),  t = tanh(...)
//  ReLU^2 (the paper's MLP): y = max(x, 0)^2,  y' = 2 max(x, 0)
#pragma once
#include <cmath>
#include <cstddef>

namespace qopt {

template <typename T>
void gelu_forward_cpu(T* out, const T* in, size_t n) {
    const T k = T(0.7978845608028654);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) {
        const T x = in[i];
        out[i] = T(0.5) * x * (T(1) + std::tanh(k * (x + T(0.044715) * x * x * x)));
    }
}

template <typename T>
void gelu_backward_cpu(T* din, const T* dout, const T* in, size_t n) {
    const T k = T(0.7978845608028654);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) {
        const T x = in[i];
        const T t = std::tanh(k * (x + T(0.044715) * x * x * x));
        const T grad = T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * k * (T(1) + T(3 * 0.044715) * x * x);
        din[i] += dout[i] * grad;
    }
}

template <typename T>
void relu2_forward_cpu(T* out, const T* in, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) {
        const T r = in[i] > T(0) ? in[i] : T(0);
        out[i] = r * r;
    }
}

template <typename T>
void relu2_backward_cpu(T* din, const T* dout, const T* in, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) din[i] += dout[i] * (in[i] > T(0) ? T(2) * in[i] : T(0));
}

}  // namespace qopt
