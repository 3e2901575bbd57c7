// Normalisation layers, CPU reference, one row of C features at a time.
//
// RMSNorm: r = 1/sqrt(mean(x^2) + eps), y = w * x * r.
//   Backward with g = dy * w:  dx = r * (g - x * r^2 * mean(g * x)),  dw += dy * x * r.
// LayerNorm: m = mean(x), s = 1/sqrt(var(x) + eps), xh = (x - m) * s, y = w * xh + b.
//   Backward with g = dy * w:  dx = s * (g - mean(g) - xh * mean(g * xh)),
//   dw += dy * xh, db += dy.
// Backward functions accumulate into dx, dw, db. Parameter gradients are summed over rows
// in row order by one thread per feature, so results do not depend on the thread count.
#pragma once
#include <cmath>

namespace qopt {

template <typename T>
void rmsnorm_forward_cpu(T* out, T* rstd, const T* in, const T* weight, int n_rows, int dim, T eps) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < n_rows; ++n) {
        const T* x = in + size_t(n) * dim;
        T sum_sq = 0;
        for (int i = 0; i < dim; ++i) sum_sq += x[i] * x[i];
        const T r = T(1) / std::sqrt(sum_sq / T(dim) + eps);
        rstd[n] = r;
        T* y = out + size_t(n) * dim;
        for (int i = 0; i < dim; ++i) y[i] = weight[i] * x[i] * r;
    }
}

template <typename T>
void rmsnorm_backward_cpu(T* din, T* dweight, const T* dout, const T* in, const T* weight, const T* rstd,
                          int n_rows, int dim) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < n_rows; ++n) {
        const T* x = in + size_t(n) * dim;
        const T* dy = dout + size_t(n) * dim;
        const T r = rstd[n];
        T dot = 0;
        for (int i = 0; i < dim; ++i) dot += dy[i] * weight[i] * x[i];
        const T mean_gx = dot / T(dim);
        T* dx = din + size_t(n) * dim;
        for (int i = 0; i < dim; ++i) dx[i] += r * (dy[i] * weight[i] - x[i] * r * r * mean_gx);
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < dim; ++i) {
        T acc = 0;
        for (int n = 0; n < n_rows; ++n) acc += dout[size_t(n) * dim + i] * in[size_t(n) * dim + i] * rstd[n];
        dweight[i] += acc;
    }
}

template <typename T>
void layernorm_forward_cpu(T* out, T* mean, T* rstd, const T* in, const T* weight, const T* bias, int n_rows,
                           int dim, T eps) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < n_rows; ++n) {
        const T* x = in + size_t(n) * dim;
        T m = 0;
        for (int i = 0; i < dim; ++i) m += x[i];
        m /= T(dim);
        T var = 0;
        for (int i = 0; i < dim; ++i) var += (x[i] - m) * (x[i] - m);
        var /= T(dim);
        const T s = T(1) / std::sqrt(var + eps);
        mean[n] = m;
        rstd[n] = s;
        T* y = out + size_t(n) * dim;
        for (int i = 0; i < dim; ++i) y[i] = (x[i] - m) * s * weight[i] + bias[i];
    }
}

template <typename T>
void layernorm_backward_cpu(T* din, T* dweight, T* dbias, const T* dout, const T* in, const T* weight,
                            const T* mean, const T* rstd, int n_rows, int dim) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < n_rows; ++n) {
        const T* x = in + size_t(n) * dim;
        const T* dy = dout + size_t(n) * dim;
        const T m = mean[n], s = rstd[n];
        T mean_g = 0, mean_gxh = 0;
        for (int i = 0; i < dim; ++i) {
            const T g = dy[i] * weight[i];
            mean_g += g;
            mean_gxh += g * (x[i] - m) * s;
        }
        mean_g /= T(dim);
        mean_gxh /= T(dim);
        T* dx = din + size_t(n) * dim;
        for (int i = 0; i < dim; ++i) {
            const T xh = (x[i] - m) * s;
            dx[i] += s * (dy[i] * weight[i] - mean_g - xh * mean_gxh);
        }
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < dim; ++i) {
        T dw = 0, db = 0;
        for (int n = 0; n < n_rows; ++n) {
            const T dy = dout[size_t(n) * dim + i];
            dw += dy * (in[size_t(n) * dim + i] - mean[n]) * rstd[n];
            db += dy;
        }
        dweight[i] += dw;
        dbias[i] += db;
    }
}

}  // namespace qopt
