// GPU kernels of the preconditioned methods (optim/preconditioner_kernels.cu): the element-wise
// and per-matrix pieces between their batched GEMMs. The CPU references are the methods' own
// per-matrix functions (shampoo.cpp, soap.cpp, psgd.cpp); tests/test_gpu_optimizers.cpp
// compares whole GPU steps against them. Buffers hold `count` row-major matrices back to back.
#pragma once
#include <cstdint>

#include "kernels/gpu.hpp"

namespace qopt {

// out[t] = grad_scale * tile t of grads (table: {offset, ld} per tile; tiles rows x cols),
// plus decay * the same tile of params when params is given (Shampoo's l2 weight decay).
void gather_tiles_gpu(float* out, const float* grads, const int64_t* table, int count, int rows, int cols,
                      float grad_scale, const float* params = nullptr, float decay = 0.0f);

// For each tile t (scale[t] = 1 when tile_scale is null):
//   d = tile_scale[t] * direction + decay W     (Shampoo's decoupled decay enters the direction,
//                                                so momentum carries it, as in the reference)
//   with momentum K (if given): K = mu K + (1 - dampening) d;  d = nesterov ? (1 - dampening) d + mu K : K
//   W = keep W - step d, and the bf16 copy of W (if given).
void apply_tiles_gpu(float* params, bf16* params_bf16, const float* direction, const float* tile_scale,
                     float* momentum, float mu, float dampening, bool nesterov, const int64_t* table, int count,
                     int rows, int cols, float decay, float keep, float step);

// out[t] = sum of squares of matrix t (n elements each); one block per matrix, fixed order.
void sum_squares_gpu(float* out, const float* x, int count, int64_t n);

// Shampoo's filtered gradient and Adam grafting, element-wise over count * n elements:
//   F = b1 F + (1 - b1) G,  F_hat = (b3 = b1 ? F : b3 F_before + (1 - b3) G) / bias1;
//   with a second moment: V = keep V + weight G^2,  A = F_hat / (sqrt(V / graft_bias) + graft_eps)
//   (without one, SGD grafting or none: A = F_hat, V untouched)
void shampoo_filter_graft_gpu(float* filtered_hat, float* graft, float* filtered, float* graft_sq, const float* g,
                              int64_t n, float beta1, float beta3, float bias1, bool second_moment, float graft_keep,
                              float graft_weight, float graft_bias, float graft_eps);

// Ratio per matrix: scale[t] = sqrt(numerator_sq[t] / denominator_sq[t]), 0 when the
// denominator is 0 (Shampoo's grafting: ||A|| / ||S||).
void norm_ratio_gpu(float* scale, const float* numerator_sq, const float* denominator_sq, int count);

// From eigenvectors (columns; values in any order) of factor / divisor:
//   scaled[:, j] = vectors[:, j] * (values[j] / divisor - min(min_k values[k] / divisor, 0) + eps)^(-1/root)
// so that scaled vectors^T = (factor / divisor + eps I)^(-1/root) after the shift.
void inverse_root_columns_gpu(float* scaled, const float* vectors, const float* values, int n, int count,
                              float divisor, double eps, int root, cudaStream_t stream = 0);

// Shampoo's kept eigenbasis (optim/shampoo.hpp, shampoo_amortized_eigen), over count n x n
// matrices: diagonal[t] = diag(x[t]); out[t] = the sum of squares of x[t]'s off-diagonal
// entries; within[t] = sqrt(off_diagonal_sq[t]) <= tolerance sqrt(total_sq[t]) (the reference's
// criterion); kept[t] = candidate[t] (size elements each) where (flags[t] != 0) == when_set;
// x[t] = I where flags[t] != 0; values[t] = within[t] ? estimates[t] : values[t] / divisor.
void diagonals_gpu(float* diagonal, const float* x, int n, int count);
void off_diagonal_sum_squares_gpu(float* out, const float* x, int n, int count);
void within_tolerance_gpu(int* within, const float* off_diagonal_sq, const float* total_sq, double tolerance,
                          int count);
void select_tiles_gpu(float* kept, const float* candidate, const int* flags, bool when_set, int64_t size, int count);
void identity_where_gpu(float* x, const int* flags, int n, int count);
void take_estimated_values_gpu(float* values, const float* estimates, const int* within, float divisor, int n,
                               int count);

// SOAP's Adam in the rotated basis, element-wise:
//   M = b1 M + (1 - b1) X,  V = b2 V + (1 - b2) X^2,  direction = M / (sqrt(V) + eps)
void soap_adam_gpu(float* direction, float* exp_avg, float* exp_avg_sq, const float* rotated, int64_t n, float beta1,
                   float beta2, float eps);

// diag[t][j] = sum_r basis[t][r, j] * projected[t][r, j]  (= (Q^T L Q)_jj with projected = L Q)
void column_dots_gpu(float* diag, const float* basis, const float* projected, int n, int count);
// The GPU side of orders_per_matrix (optim/dense.hpp): order[t] = the indices 0..n-1 of
// values[t] sorted by value, ascending or descending, NaN last, equal values in index order (a
// stable sort), without a round trip to the host. Up to kDeviceSortMax values per matrix on the
// GPU (one block per matrix, a bitonic sort in shared memory); beyond, on the host (synchronous).
constexpr int kDeviceSortMax = 16384;
void orders_per_matrix_gpu(int* order, const float* values, int n, int count, bool descending);
// out[t][r, j] = in[t][r, order[t][j]]  (n x n matrices; order: n ints per matrix)
void permute_columns_gpu(float* out, const float* in, const int* order, int n, int count);
// out[t][r, c] = in[t][row_order[t][r], col_order[t][c]]  (rows x cols matrices)
void permute_rows_columns_gpu(float* out, const float* in, const int* row_order, const int* col_order, int rows,
                              int cols, int count);

// The GPU side of commit_preconditioner (optim/dense.hpp), per n x n matrix t (or, when
// `diagonal`, per n-vector holding a diagonal matrix): a finite candidate[t] is copied into
// kept[t]; otherwise kept[t] stays (the identity when it is all zero: none computed yet),
// *rejected_count += 1, and accepted[t] (when given) is 0, else 1. flags: 2 * count ints of
// scratch.
void commit_finite_tiles_gpu(float* kept, const float* candidate, int n, int count, int* accepted, int* rejected_count,
                             int* flags, bool diagonal = false);
// order[t] = 0, 1, ..., n-1 where accepted[t] == 0 (a rejected SOAP basis keeps its column order),
// or for every t when accepted is null (a side without a factor).
void identity_order_where_rejected_gpu(int* order, const int* accepted, int n, int count);

// PSGD: M = b1 M + (1 - b1) G, D = M / debias.
void psgd_momentum_gpu(float* debiased, float* momentum, const float* g, int64_t n, float beta1, float debias);
// mean_abs[t] = mean |x[t]| over n elements (one block per matrix).
void mean_abs_gpu(float* mean_abs, const float* x, int count, int64_t n);
// max_abs[t] = max |x[t]|.
void max_abs_gpu(float* max_abs, const float* x, int count, int64_t n);
// probe[t][i] = counter_normal(seed, (step << 20) ^ matrix_index[t], i) (as psgd_probe);
// x[t][i] += noise_scale * mean_abs[t] * probe[t][i].
void psgd_probe_perturb_gpu(float* probe, float* x, const float* mean_abs, const int* matrix_index, int count,
                            int64_t n, uint64_t seed, long step, float noise_scale);
// Both factors scaled to the geometric mean of their max-abs values (PSGD's balancing).
void psgd_balance_gpu(float* q_left, float* q_right, const float* left_max, const float* right_max, int count,
                      int64_t left_n, int64_t right_n);
// bound[t] = psgd_norm_lower_bound(t1[t] + t2[t]) for symmetric n x n matrices; work:
// psgd_norm_lower_bound_work(n, count) floats.
void psgd_norm_lower_bound_gpu(float* bound, const float* t1, const float* t2, float* work, int n, int count);
size_t psgd_norm_lower_bound_work(int n, int count);
// multiplier[t] = I - triu(t1[t] - t2[t]) * precond_lr / max(bound[t], tiny), upper triangular
// (then Q <- multiplier Q, i.e. Q -= triu(.) Q, as one product)
void psgd_factor_multiplier_gpu(float* multiplier, const float* t1, const float* t2, const float* bound, int n,
                                int count, float precond_lr);
// PSGD's diagonal factors (vectors q, Q = diag(q)); rows x cols matrices, count of them:
// out[t][r, c] = in[t][r, c] (left[t][r] right[t][c])^power, power 1 (A = Q1 X Q2^T), -1
// (B = Q1^-1 V Q2^-1) or 2 (U = Q1^2 D Q2^2); a null side is the identity; out may be in.
void psgd_scale_rows_columns_gpu(float* out, const float* in, const float* left, const float* right, int power,
                                 int rows, int cols, int count);
// out[t] = the sums of squares of x[t]'s rows ([rows] per matrix), or of its columns ([cols])
// when `columns`: a diagonal factor's "Gram matrix", the diagonal of X X^T (X^T X).
void sums_of_squares_gpu(float* out, const float* x, int rows, int cols, int count, bool columns);
// candidate[t] = q[t] - precond_lr (t1[t] - t2[t]) q[t] / max(max|t1[t] + t2[t]|, tiny),
// element-wise over n (the CPU's update_diagonal_factor).
void psgd_diagonal_factor_update_gpu(float* candidate, const float* q, const float* t1, const float* t2, int n,
                                     int count, float precond_lr);
// scale[t] = min(1, 1.1 / (sqrt(sum_sq[t] / n) + 1e-12))  (PSGD's update RMS clip)
void psgd_clip_scale_gpu(float* scale, const float* sum_sq, int count, int64_t n);
// scale[t] = 1 / (1e-30 + sqrt(sum_sq[t] / n))  (SOAP's normalize_grads)
void inverse_rms_gpu(float* scale, const float* sum_sq, int count, int64_t n);

}  // namespace qopt
