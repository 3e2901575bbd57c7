// Linear layer, CPU reference: out[n, o] = sum_i in[n, i] * weight[o, i] + bias[o]
// (weight in PyTorch's [out, in] layout). Backward, accumulating into its outputs:
//   din[n, i]     += sum_o dout[n, o] * weight[o, i]
//   dweight[o, i] += sum_n dout[n, o] * in[n, i]
//   dbias[o]      += sum_n dout[n, o]
// Every output element is summed in ascending index order (i, o or n), one multiply-add at a
// time, so results do not depend on the thread count or on the blocking below. All three
// products keep a LinearTile of outputs in registers while the summed index runs (4 rows of 4
// AVX-512 vectors of floats, or 8 rows of one vector of doubles: the float64 shape measured
// fastest for optim/dense's products), and the large operand (the tied head's
// vocab x d_model weight) is read in blocks that stay in cache for many rows: the forward
// transposes kCols weight rows at a time into a thread-local block, the input gradient takes
// kOutputs weight rows for kRowBlock rows. Timings against the earlier row-at-a-time loops
// (bit-identical results) are in the README's Results of `make run`.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace qopt {

template <typename T>
struct LinearTile {
    static constexpr int kRows = sizeof(T) == 4 ? 4 : 8;   // rows of the output tile
    static constexpr int kCols = sizeof(T) == 4 ? 64 : 8;  // 4 vectors of floats, 1 of doubles
};

// acc[r][c] += sum over p in [0, depth) of a(r, p) * b(p, c), p ascending, for the rows < rows
// and columns < cols of a kRows x kCols tile (a(r, p) = a[r * a_row + p * a_step], b(p, c) =
// b[p * b_row + c]); the tile is loaded from and stored to out (out_row apart), other entries untouched.
template <typename T>
inline void accumulate_linear_tile(T* out, size_t out_row, const T* a, size_t a_row, size_t a_step, const T* b,
                                   size_t b_row, int depth, int rows, int cols) {
    constexpr int kRows = LinearTile<T>::kRows, kCols = LinearTile<T>::kCols;
    T acc[kRows][kCols];
    for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < kCols; ++c) acc[r][c] = r < rows && c < cols ? out[r * out_row + c] : T(0);
    for (int p = 0; p < depth; ++p) {
        const T* b_p = b + size_t(p) * b_row;
        for (int r = 0; r < kRows; ++r) {
            const T a_rp = r < rows ? a[r * a_row + size_t(p) * a_step] : T(0);
#pragma omp simd
            for (int c = 0; c < kCols; ++c) acc[r][c] += a_rp * (c < cols ? b_p[c] : T(0));
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) out[r * out_row + c] = acc[r][c];
}

template <typename T>
void matmul_forward_cpu(T* out, const T* in, const T* weight, const T* bias, int n_rows, int in_dim,
                        int out_dim) {
    // For a strip of kCols outputs the weight's rows o0..o0+kCols are transposed into a
    // thread-local [in, kCols] block (contiguous along o), then every kRows rows of in accumulate
    // out[n, o0:o0+kCols] = sum_i in[n, i] * weight_t[i, :] in registers, then the bias is added.
    constexpr int kRows = LinearTile<T>::kRows, kCols = LinearTile<T>::kCols;
    const int col_blocks = (out_dim + kCols - 1) / kCols;
#pragma omp parallel
    {
        std::vector<T> weight_t(size_t(in_dim) * kCols);
#pragma omp for schedule(static)
        for (int cb = 0; cb < col_blocks; ++cb) {
            const int o0 = cb * kCols, cols = std::min(kCols, out_dim - o0);
            for (int i = 0; i < in_dim; ++i)
                for (int c = 0; c < kCols; ++c) weight_t[size_t(i) * kCols + c] = c < cols ? weight[size_t(o0 + c) * in_dim + i] : T(0);
            for (int n0 = 0; n0 < n_rows; n0 += kRows) {
                const int rows = std::min(kRows, n_rows - n0);
                T* out_tile = out + size_t(n0) * out_dim + o0;
                for (int r = 0; r < rows; ++r)
                    for (int c = 0; c < cols; ++c) out_tile[size_t(r) * out_dim + c] = T(0);
                accumulate_linear_tile(out_tile, size_t(out_dim), in + size_t(n0) * in_dim, size_t(in_dim), 1,
                                       weight_t.data(), kCols, in_dim, rows, cols);
                if (bias)
                    for (int r = 0; r < rows; ++r)
                        for (int c = 0; c < cols; ++c) out_tile[size_t(r) * out_dim + c] += bias[o0 + c];
            }
        }
    }
}

template <typename T>
void matmul_backward_cpu(T* din, T* dweight, T* dbias, const T* dout, const T* in, const T* weight,
                         int n_rows, int in_dim, int out_dim) {
    constexpr int kRows = LinearTile<T>::kRows, kCols = LinearTile<T>::kCols;
    if (din) {
        // din[n0:n0+4, i0:i0+kCols] += dout[n0:n0+4, o] weight[o, i0:i0+kCols] over o, in blocks of
        // kOutputs outputs (a weight block that stays in cache) shared by kRowBlock rows.
        constexpr int kRowBlock = 64, kOutputs = 256;
        const int row_blocks = (n_rows + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static)
        for (int rb = 0; rb < row_blocks; ++rb) {
            const int row_end = std::min(n_rows, (rb + 1) * kRowBlock);
            for (int o0 = 0; o0 < out_dim; o0 += kOutputs) {
                const int outputs = std::min(kOutputs, out_dim - o0);
                for (int n0 = rb * kRowBlock; n0 < row_end; n0 += kRows)
                    for (int i0 = 0; i0 < in_dim; i0 += kCols)
                        accumulate_linear_tile(din + size_t(n0) * in_dim + i0, size_t(in_dim),
                                               dout + size_t(n0) * out_dim + o0, size_t(out_dim), 1,
                                               weight + size_t(o0) * in_dim + i0, size_t(in_dim), outputs,
                                               std::min(kRows, row_end - n0), std::min(kCols, in_dim - i0));
            }
        }
    }
    // dweight[o0:o0+4, i0:i0+kCols] += dout[n, o0:o0+4]^T in[n, i0:i0+kCols] over all n (the
    // inputs, n_rows x in_dim, stay in cache); dbias alongside, over n in order.
    const int output_blocks = (out_dim + kRows - 1) / kRows;
#pragma omp parallel for schedule(static)
    for (int ob = 0; ob < output_blocks; ++ob) {
        const int o0 = ob * kRows, outputs = std::min(kRows, out_dim - o0);
        for (int i0 = 0; i0 < in_dim; i0 += kCols)
            accumulate_linear_tile(dweight + size_t(o0) * in_dim + i0, size_t(in_dim), dout + o0, 1, size_t(out_dim),
                                   in + i0, size_t(in_dim), n_rows, outputs, std::min(kCols, in_dim - i0));
        if (dbias)
            for (int o = o0; o < o0 + outputs; ++o) {
                T bias_sum = 0;
                for (int n = 0; n < n_rows; ++n) bias_sum += dout[size_t(n) * out_dim + o];
                dbias[o] += bias_sum;
            }
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
