// Walsh–Hadamard rotation along rows, CPU reference (CUDA kernel: quant/quant_kernels.cu).
//
// H_b is the normalised Sylvester Hadamard matrix of size b (a power of two):
//   H_1 = [1],  H_2k = [[H_k, H_k], [H_k, -H_k]] / sqrt(2)
// symmetric and orthonormal, so H_b H_b = I: the same transform is its own inverse. A row of
// `cols` elements is rotated block-diagonally, each run of b consecutive elements by H_b
// (b divides cols). The fast transform does log2(b) butterfly stages: at stage h (1, 2, 4,
// ..) each pair (i, i + h) with bit h of i clear becomes (x_i + x_{i+h}, x_i - x_{i+h}); the
// 1/sqrt(b) comes at the end.
//
// Rotating both a linear layer's input rows and its weight rows ([out, in]) leaves the product
// unchanged: (x H)(w H)^T = x H H^T w^T = x w^T; quantizing in the rotated basis spreads
// outliers over a block (QuEST, QuaRot).
#pragma once
#include <cmath>
#include <string>

namespace qopt {

inline bool is_power_of_two(long n) { return n > 0 && (n & (n - 1)) == 0; }

// The block actually used for rows of `cols`: the largest power of two <= requested that
// divides cols (0: no rotation). E.g. requested 128: 768 -> 128, 64 -> 64, 1280 -> 128.
inline int hadamard_block_for(int cols, int requested) {
    if (requested <= 1) return 0;
    int block = 1;
    while (block * 2 <= requested && cols % (block * 2) == 0) block *= 2;
    return block >= 2 ? block : 0;
}

template <typename T>
void hadamard_rows_cpu(T* data, long rows, int cols, int block) {
    if (block <= 1) return;
    const T norm = T(1.0 / std::sqrt(double(block)));
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; ++r) {
        T* row = data + r * cols;
        for (int start = 0; start < cols; start += block) {
            T* x = row + start;
            for (int h = 1; h < block; h *= 2)
                for (int i = 0; i < block; ++i)
                    if (!(i & h)) {
                        const T a = x[i], b = x[i + h];
                        x[i] = a + b;
                        x[i + h] = a - b;
                    }
            for (int i = 0; i < block; ++i) x[i] *= norm;
        }
    }
}

}  // namespace qopt
