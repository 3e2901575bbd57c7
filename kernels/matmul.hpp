// Linear layer, CPU reference: out[n, o] = sum_i in[n, i] * weight[o, i] + bias[o]
// (weight in PyTorch's [out, in] layout). Backward, accumulating into its outputs:
//   din[n, i]     += sum_o dout[n, o] * weight[o, i]
//   dweight[o, i] += sum_n dout[n, o] * in[n, i]
//   dbias[o]      += sum_n dout[n, o]
// Loops are blocked 4x4 so that the inner loops vectorize; every output element is summed
// in a fixed order, so results do not depend on the thread count.
#pragma once
#include <cstddef>

namespace qopt {

template <typename T>
void matmul_forward_cpu(T* out, const T* in, const T* weight, const T* bias, int n_rows, int in_dim,
                        int out_dim) {
    const int row_blocks = (n_rows + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int rb = 0; rb < row_blocks; ++rb) {
        const int n0 = rb * 4;
        const int rows = n_rows - n0 < 4 ? n_rows - n0 : 4;
        for (int o0 = 0; o0 < out_dim; o0 += 4) {
            const int cols = out_dim - o0 < 4 ? out_dim - o0 : 4;
            if (rows == 4 && cols == 4) {
                const T* a0 = in + size_t(n0) * in_dim;
                const T* a1 = a0 + in_dim;
                const T* a2 = a1 + in_dim;
                const T* a3 = a2 + in_dim;
                const T* w0 = weight + size_t(o0) * in_dim;
                const T* w1 = w0 + in_dim;
                const T* w2 = w1 + in_dim;
                const T* w3 = w2 + in_dim;
                T s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
                T s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
                for (int i = 0; i < in_dim; ++i) {
                    s00 += a0[i] * w0[i]; s01 += a0[i] * w1[i]; s02 += a0[i] * w2[i]; s03 += a0[i] * w3[i];
                    s10 += a1[i] * w0[i]; s11 += a1[i] * w1[i]; s12 += a1[i] * w2[i]; s13 += a1[i] * w3[i];
                    s20 += a2[i] * w0[i]; s21 += a2[i] * w1[i]; s22 += a2[i] * w2[i]; s23 += a2[i] * w3[i];
                    s30 += a3[i] * w0[i]; s31 += a3[i] * w1[i]; s32 += a3[i] * w2[i]; s33 += a3[i] * w3[i];
                }
                const T sums[4][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}, {s20, s21, s22, s23}, {s30, s31, s32, s33}};
                for (int r = 0; r < 4; ++r)
                    for (int c = 0; c < 4; ++c)
                        out[size_t(n0 + r) * out_dim + o0 + c] = sums[r][c] + (bias ? bias[o0 + c] : T(0));
            } else {
                for (int r = 0; r < rows; ++r)
                    for (int c = 0; c < cols; ++c) {
                        const T* a = in + size_t(n0 + r) * in_dim;
                        const T* w = weight + size_t(o0 + c) * in_dim;
                        T s = 0;
                        for (int i = 0; i < in_dim; ++i) s += a[i] * w[i];
                        out[size_t(n0 + r) * out_dim + o0 + c] = s + (bias ? bias[o0 + c] : T(0));
                    }
            }
        }
    }
}

template <typename T>
void matmul_backward_cpu(T* din, T* dweight, T* dbias, const T* dout, const T* in, const T* weight,
                         int n_rows, int in_dim, int out_dim) {
    if (din) {
#pragma omp parallel for schedule(static)
        for (int n = 0; n < n_rows; ++n) {
            T* di = din + size_t(n) * in_dim;
            const T* g = dout + size_t(n) * out_dim;
            for (int o = 0; o < out_dim; ++o) {
                const T go = g[o];
                const T* w = weight + size_t(o) * in_dim;
#pragma omp simd
                for (int i = 0; i < in_dim; ++i) di[i] += go * w[i];
            }
        }
    }
#pragma omp parallel for schedule(static)
    for (int o = 0; o < out_dim; ++o) {
        T* dw = dweight + size_t(o) * in_dim;
        T bias_sum = 0;
        for (int n = 0; n < n_rows; ++n) {
            const T go = dout[size_t(n) * out_dim + o];
            bias_sum += go;
            const T* a = in + size_t(n) * in_dim;
#pragma omp simd
            for (int i = 0; i < in_dim; ++i) dw[i] += go * a[i];
        }
        if (dbias) dbias[o] += bias_sum;
    }
}

}  // namespace qopt
