// Linear layer, CPU reference: out[n, o] = sum_i in[n, i] * weight[o, i] + bias[o]
// (weight in PyTorch's [out, in] layout). Backward, accumulating into its outputs:
//   din[n, i]     += sum_o dout[n, o] * weight[o, i]
//   dweight[o, i] += sum_n dout[n, o] * in[n, i]
//   dbias[o]      += sum_n dout[n, o]
// Loop orders are chosen so that a large weight (the tied head: vocab x d_model) is streamed
// from memory few times; every output element is summed in ascending index order, so
// results do not depend on the thread count.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace qopt {

template <typename T>
void matmul_forward_cpu(T* out, const T* in, const T* weight, const T* bias, int n_rows, int in_dim,
                        int out_dim) {
    // The weight is transposed to [in, out]; then for a strip of 64 outputs (which stays in
    // cache) every block of 4 rows accumulates out[n, o0:o0+64] += in[n, i] * weight_t[i, o0:o0+64]
    // in registers. The buffer belongs to the calling thread; OpenMP workers use `wt` only.
    static thread_local std::vector<T> weight_t;
    weight_t.resize(size_t(in_dim) * out_dim);
    T* const wt = weight_t.data();
#pragma omp parallel for schedule(static)
    for (int o = 0; o < out_dim; ++o)
        for (int i = 0; i < in_dim; ++i) wt[size_t(i) * out_dim + o] = weight[size_t(o) * in_dim + i];
    constexpr int kCols = 64, kRows = 4;
    const int col_blocks = (out_dim + kCols - 1) / kCols;
#pragma omp parallel for schedule(static)
    for (int cb = 0; cb < col_blocks; ++cb) {
        const int o0 = cb * kCols;
        const int cols = out_dim - o0 < kCols ? out_dim - o0 : kCols;
        for (int n0 = 0; n0 < n_rows; n0 += kRows) {
            const int rows = n_rows - n0 < kRows ? n_rows - n0 : kRows;
            T acc[kRows][kCols] = {};
            for (int i = 0; i < in_dim; ++i) {
                const T* w = wt + size_t(i) * out_dim + o0;
                for (int r = 0; r < rows; ++r) {
                    const T a = in[size_t(n0 + r) * in_dim + i];
#pragma omp simd
                    for (int c = 0; c < kCols; ++c) acc[r][c] += a * (c < cols ? w[c] : T(0));
                }
            }
            for (int r = 0; r < rows; ++r)
                for (int c = 0; c < cols; ++c)
                    out[size_t(n0 + r) * out_dim + o0 + c] = acc[r][c] + (bias ? bias[o0 + c] : T(0));
        }
    }
}

template <typename T>
void matmul_backward_cpu(T* din, T* dweight, T* dbias, const T* dout, const T* in, const T* weight,
                         int n_rows, int in_dim, int out_dim) {
    if (din) {
        // Blocks of 16 rows share each pass over the weight (n_rows/16 passes, not n_rows).
        constexpr int kRows = 16;
        const int row_blocks = (n_rows + kRows - 1) / kRows;
#pragma omp parallel for schedule(static)
        for (int rb = 0; rb < row_blocks; ++rb) {
            const int n0 = rb * kRows;
            const int rows = n_rows - n0 < kRows ? n_rows - n0 : kRows;
            for (int o = 0; o < out_dim; ++o) {
                const T* w = weight + size_t(o) * in_dim;
                for (int r = 0; r < rows; ++r) {
                    const T go = dout[size_t(n0 + r) * out_dim + o];
                    T* di = din + size_t(n0 + r) * in_dim;
#pragma omp simd
                    for (int i = 0; i < in_dim; ++i) di[i] += go * w[i];
                }
            }
        }
    }
    // One output row of dweight per iteration: the inputs (n_rows x in_dim) stay in cache.
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

// The exact integer product of W8A8: out[n, o] = sum_i in[n, i] * weight[o, i] in int32.
inline void int8_matmul_cpu(int32_t* out, const int8_t* in, const int8_t* weight, int n_rows, int in_dim,
                            int out_dim) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < n_rows; ++n)
        for (int o = 0; o < out_dim; ++o) {
            int32_t sum = 0;
            for (int i = 0; i < in_dim; ++i) sum += int32_t(in[size_t(n) * in_dim + i]) * weight[size_t(o) * in_dim + i];
            out[size_t(n) * out_dim + o] = sum;
        }
}

}  // namespace qopt
