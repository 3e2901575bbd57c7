#include <algorithm>
#include <cfloat>
#include <vector>

#include "core/error.hpp"
#include "kernels/block_reduce.cuh"
#include "kernels/cuda_common.cuh"
#include "optim/dense.hpp"
#include "optim/optimizer_state.hpp"
#include "optim/preconditioner_kernels.hpp"

namespace qopt {

namespace {

constexpr int kThreads = 256;

#define GRID_STRIDE(i, n) \
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

__global__ void gather_tiles_kernel(float* out, const float* grads, const int64_t* table, int rows, int cols,
                                    float grad_scale, const float* params, float decay) {
    const int t = blockIdx.y;
    const int64_t offset = table[2 * t], ld = table[2 * t + 1], n = int64_t(rows) * cols;
    float* dst = out + t * n;
    GRID_STRIDE(i, n) {
        const int64_t p = offset + (i / cols) * ld + i % cols;
        dst[i] = params ? grads[p] * grad_scale + decay * params[p] : grads[p] * grad_scale;
    }
}

__global__ void apply_tiles_kernel(float* params, bf16* params_bf16, const float* direction, const float* tile_scale,
                                   float* momentum, float mu, float dampening, bool nesterov, const int64_t* table,
                                   int rows, int cols, float decay, float keep, float step) {
    const int t = blockIdx.y;
    const int64_t offset = table[2 * t], ld = table[2 * t + 1], n = int64_t(rows) * cols;
    const float scale = tile_scale ? tile_scale[t] : 1.0f;
    GRID_STRIDE(i, n) {
        const int64_t p = offset + (i / cols) * ld + i % cols;
        float d = scale * direction[t * n + i] + decay * params[p];
        if (momentum) {
            const float undamped = (1.0f - dampening) * d;
            const float k = mu * momentum[t * n + i] + undamped;
            momentum[t * n + i] = k;
            d = nesterov ? undamped + mu * k : k;
        }
        const float w = keep * params[p] - step * d;
        params[p] = w;
        if (params_bf16) params_bf16[p] = __float2bfloat16(w);
    }
}

// Per-matrix reductions (sum of squares, mean |x|, max |x|) in two passes with a fixed order:
// blocks_per_matrix blocks per matrix each reduce a grid-stride share into per_matrix_partials,
// then one block per matrix combines its partials in order. The partials live in this fixed
// device array (no allocation during a step; every caller is on the default stream, one at a
// time); a matrix gets at most kMaxBlocksPerMatrix of them and fewer when count is large.
constexpr int kPartialsCapacity = 1 << 16, kMaxBlocksPerMatrix = 128;
__device__ double per_matrix_partials[kPartialsCapacity];

// Transforms see each element and its index in the matrix.
struct SquareOf {
    __device__ double operator()(float x, int64_t) const { return double(x) * x; }
};
struct AbsOf {
    __device__ double operator()(float x, int64_t) const { return fabs(double(x)); }
};
// Squares of an n x n matrix's entries off its diagonal.
struct OffDiagonalSquareOf {
    int n;
    __device__ double operator()(float x, int64_t i) const { return i / n == i % n ? 0.0 : double(x) * x; }
};

template <typename Transform, typename Combine>
__global__ void matrix_partials_kernel(const float* x, int64_t n, Transform transform, Combine combine) {
    const int t = blockIdx.y;
    const float* m = x + t * n;
    double value = 0;  // the identity of + and of max over |x| alike
    GRID_STRIDE(i, n) value = combine(value, transform(m[i], i));
    value = block_reduce(value, combine);
    if (threadIdx.x == 0) per_matrix_partials[int64_t(t) * gridDim.x + blockIdx.x] = value;
}

template <typename Combine>
__global__ void combine_partials_kernel(float* out, int blocks_per_matrix, Combine combine, double divisor) {
    if (threadIdx.x != 0) return;
    const double* partials = per_matrix_partials + int64_t(blockIdx.x) * blocks_per_matrix;
    double value = partials[0];
    for (int b = 1; b < blocks_per_matrix; ++b) value = combine(value, partials[b]);
    out[blockIdx.x] = float(value / divisor);
}

template <typename Transform, typename Combine>
void reduce_matrices(float* out, const float* x, int count, int64_t n, Transform transform, Combine combine,
                     double divisor) {
    if (count == 0) return;
    QOPT_CHECK(count <= kPartialsCapacity, "per-matrix reduction over ", count, " matrices (at most ",
               kPartialsCapacity, ")");
    const int64_t wanted = (n + kThreads * 8 - 1) / (kThreads * 8);
    const int blocks = int(std::max<int64_t>(1, std::min<int64_t>({wanted, kMaxBlocksPerMatrix,
                                                                    kPartialsCapacity / count})));
    matrix_partials_kernel<<<dim3(unsigned(blocks), unsigned(count)), kThreads>>>(x, n, transform, combine);
    CUDA_CHECK_LAUNCH();
    combine_partials_kernel<<<count, 32>>>(out, blocks, combine, divisor);
    CUDA_CHECK_LAUNCH();
}

__global__ void shampoo_filter_graft_kernel(float* filtered_hat, float* graft, float* filtered, float* graft_sq,
                                            const float* g, int64_t n, float beta1, float beta3, float bias1,
                                            bool second_moment, float graft_keep, float graft_weight,
                                            float graft_bias, float graft_eps) {
    GRID_STRIDE(i, n) {
        const float gi = g[i], before = filtered[i];
        const float f = beta1 * before + (1.0f - beta1) * gi;
        filtered[i] = f;
        const float fh = (beta3 == beta1 ? f : beta3 * before + (1.0f - beta3) * gi) / bias1;
        filtered_hat[i] = fh;
        if (second_moment) {
            const float v = graft_keep * graft_sq[i] + graft_weight * gi * gi;
            graft_sq[i] = v;
            graft[i] = fh / (sqrtf(v / graft_bias) + graft_eps);
        } else {
            graft[i] = fh;
        }
    }
}

__global__ void norm_ratio_kernel(float* scale, const float* numerator_sq, const float* denominator_sq, int count) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < count) scale[t] = denominator_sq[t] > 0 ? sqrtf(numerator_sq[t] / denominator_sq[t]) : 0.0f;
}

__global__ void inverse_root_columns_kernel(float* scaled, const float* vectors, const float* values, int n,
                                            float divisor, double eps, int root) {
    const int t = blockIdx.y;
    const float* lambda = values + int64_t(t) * n;
    // The smallest value (values need not be sorted: a kept eigenbasis gives estimates in its order).
    float low = INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) low = Min{}(low, lambda[j]);
    const float smallest = block_reduce(low, Min{});
    const double shift = fmin(double(smallest) / divisor, 0.0);
    const int64_t size = int64_t(n) * n;
    GRID_STRIDE(i, size) {
        const int j = int(i % n);
        const double power = pow(double(lambda[j]) / divisor - shift + eps, -1.0 / root);
        scaled[t * size + i] = float(double(vectors[t * size + i]) * power);
    }
}

// Shampoo's kept eigenbasis (see shampoo_amortized_eigen in optim/shampoo.cpp).
__global__ void diagonals_kernel(float* diagonal, const float* x, int n, int count) {
    GRID_STRIDE(i, int64_t(n) * count) {
        const int64_t t = i / n, j = i % n;
        diagonal[i] = x[(t * n + j) * n + j];
    }
}

__global__ void within_tolerance_kernel(int* within, const float* off_diagonal_sq, const float* total_sq,
                                        double tolerance, int count) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < count) within[t] = sqrt(double(off_diagonal_sq[t])) <= tolerance * sqrt(double(total_sq[t]));
}

__global__ void select_tiles_kernel(float* kept, const float* candidate, const int* flags, bool when_set,
                                    int64_t size) {
    const int t = blockIdx.y;
    if ((flags[t] != 0) != when_set) return;
    GRID_STRIDE(i, size) kept[t * size + i] = candidate[t * size + i];
}

__global__ void identity_where_kernel(float* x, const int* flags, int n) {
    const int t = blockIdx.y;
    if (flags[t] == 0) return;
    const int64_t size = int64_t(n) * n;
    GRID_STRIDE(i, size) x[t * size + i] = i / n == i % n ? 1.0f : 0.0f;
}

__global__ void take_estimated_values_kernel(float* values, const float* estimates, const int* within, float divisor,
                                             int n, int count) {
    GRID_STRIDE(i, int64_t(n) * count) values[i] = within[i / n] ? estimates[i] : values[i] / divisor;
}

__global__ void soap_adam_kernel(float* direction, float* exp_avg, float* exp_avg_sq, const float* rotated, int64_t n,
                                 float beta1, float beta2, float eps) {
    GRID_STRIDE(i, n) {
        const float x = rotated[i];
        const float m = beta1 * exp_avg[i] + (1.0f - beta1) * x;
        const float v = beta2 * exp_avg_sq[i] + (1.0f - beta2) * x * x;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        direction[i] = m / (sqrtf(v) + eps);
    }
}

// One thread per column j of matrix t (blockIdx.y): coalesced over j.
__global__ void column_dots_kernel(float* diag, const float* basis, const float* projected, int n) {
    const int t = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const int64_t base = int64_t(t) * n * n;
    double sum = 0;
    for (int r = 0; r < n; ++r) sum += double(basis[base + int64_t(r) * n + j]) * projected[base + int64_t(r) * n + j];
    diag[int64_t(t) * n + j] = float(sum);
}

__global__ void permute_rows_columns_kernel(float* out, const float* in, const int* row_order, const int* col_order,
                                            int rows, int cols) {
    const int t = blockIdx.y;
    const int64_t n = int64_t(rows) * cols;
    const int* ro = row_order ? row_order + int64_t(t) * rows : nullptr;
    const int* co = col_order + int64_t(t) * cols;
    GRID_STRIDE(i, n) {
        const int r = int(i / cols), c = int(i % cols);
        out[t * n + i] = in[t * n + int64_t(ro ? ro[r] : r) * cols + co[c]];
    }
}

// Commit in two passes over a (chunks, count) grid, so that large matrices are spread over the
// whole GPU: first per matrix whether the candidate has a non-finite entry (flags[2t]) and
// whether the kept one has a non-zero entry (flags[2t + 1]), then the copy (or the identity).
__global__ void commit_flags_kernel(int* flags, const float* kept, const float* candidate, int64_t size) {
    const int64_t base = int64_t(blockIdx.y) * size;
    int bad = 0, set = 0;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < size; i += int64_t(gridDim.x) * blockDim.x) {
        bad |= !isfinite(candidate[base + i]);
        set |= kept[base + i] != 0.0f;
    }
    bad = block_reduce(bad, Max());
    set = block_reduce(set, Max());
    if (threadIdx.x == 0) {
        if (bad) atomicOr(&flags[2 * blockIdx.y], 1);
        if (set) atomicOr(&flags[2 * blockIdx.y + 1], 1);
    }
}

// identity_stride: n + 1 for n x n matrices (the diagonal's entries are n + 1 apart), 1 for
// diagonal factors stored as vectors (all ones).
__global__ void commit_copy_kernel(float* kept, const float* candidate, const int* flags, int64_t size,
                                   int64_t identity_stride, int* accepted, int* rejected_count) {
    const int64_t base = int64_t(blockIdx.y) * size;
    const bool bad = flags[2 * blockIdx.y], set = flags[2 * blockIdx.y + 1];
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        if (bad) atomicAdd(rejected_count, 1);
        if (accepted) accepted[blockIdx.y] = !bad;
    }
    if (bad && set) return;  // the last good one stays
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < size; i += int64_t(gridDim.x) * blockDim.x)
        kept[base + i] = bad ? (i % identity_stride == 0 ? 1.0f : 0.0f) : candidate[base + i];
}

__global__ void identity_order_where_rejected_kernel(int* order, const int* accepted, int n) {
    if (accepted && accepted[blockIdx.x]) return;
    for (int j = threadIdx.x; j < n; j += blockDim.x) order[int64_t(blockIdx.x) * n + j] = j;
}

__global__ void psgd_momentum_kernel(float* debiased, float* momentum, const float* g, int64_t n, float beta1,
                                     float debias) {
    GRID_STRIDE(i, n) {
        const float m = beta1 * momentum[i] + (1.0f - beta1) * g[i];
        momentum[i] = m;
        debiased[i] = m / debias;
    }
}

__global__ void psgd_probe_perturb_kernel(float* probe, float* x, const float* mean_abs, const int* matrix_index,
                                          int64_t n, uint64_t seed, long step, float noise_scale) {
    const int t = blockIdx.y;
    const uint64_t stream = (uint64_t(step) << 20) ^ uint64_t(matrix_index[t]);
    const float noise = noise_scale * mean_abs[t];
    GRID_STRIDE(i, n) {
        const float v = counter_normal(seed, stream, uint64_t(i));
        probe[t * n + i] = v;
        x[t * n + i] += noise * v;
    }
}

__global__ void psgd_balance_kernel(float* q_left, float* q_right, const float* left_max, const float* right_max,
                                    int64_t left_n, int64_t right_n) {
    const int t = blockIdx.y;
    const double mean = sqrt(double(left_max[t]) * double(right_max[t]));
    const float left_scale = float(mean / left_max[t]), right_scale = float(mean / right_max[t]);
    GRID_STRIDE(i, left_n) q_left[t * left_n + i] *= left_scale;
    GRID_STRIDE(i, right_n) q_right[t * right_n + i] *= right_scale;
}

// PSGD's lower bound of ||a||_2 for symmetric a = t1 + t2, as the CPU reference computes it
// (there on a / max|a|, which changes nothing but rounding):
//   x = the column of a with the largest norm (the first on ties);  y = a^T x;
//   bound = ||a y|| / ||y||
// In passes parallel over columns or rows of every matrix (count in blockIdx.z or .y); the two
// column sums run over kBoundRowChunks slices of the rows at once (enough blocks to fill the
// GPU at n = 3072, count = 12), then add the slices in order.
__device__ inline double sum_entry(const float* t1, const float* t2, int64_t i) { return double(t1[i]) + double(t2[i]); }

constexpr int kBoundRowChunks = 16;

// partial[t][k][c] = sum over rows r of slice k of a(r, c) a(r, chosen[t]) (chosen null: a(r, c)^2);
// one thread per column, coalesced.
__global__ void column_partials_kernel(double* partial, const int* chosen, const float* t1, const float* t2, int n) {
    const int t = blockIdx.z, k = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    const int64_t base = int64_t(t) * n * n;
    const int rows_per_chunk = (n + kBoundRowChunks - 1) / kBoundRowChunks;
    const int r_end = min(n, (k + 1) * rows_per_chunk);
    const int x = chosen ? chosen[t] : c;
    double sum = 0;
    for (int r = k * rows_per_chunk; r < r_end; ++r)
        sum += sum_entry(t1, t2, base + int64_t(r) * n + x) * sum_entry(t1, t2, base + int64_t(r) * n + c);
    partial[(int64_t(t) * kBoundRowChunks + k) * n + c] = sum;
}

// out[t][c] = sum over slices k of partial[t][k][c], in order.
__global__ void sum_row_chunks_kernel(float* out, const double* partial, int n) {
    const int t = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    double sum = 0;
    for (int k = 0; k < kBoundRowChunks; ++k) sum += partial[(int64_t(t) * kBoundRowChunks + k) * n + c];
    out[int64_t(t) * n + c] = float(sum);
}

// chosen[t] = arg max of column_sq[t] (the first on ties); one block per matrix.
__global__ void choose_column_kernel(int* chosen, const float* column_sq, int n) {
    const float* sq = column_sq + int64_t(blockIdx.x) * n;
    float best = -1;
    int best_index = 0;
    for (int c = threadIdx.x; c < n; c += blockDim.x)
        if (sq[c] > best) best = sq[c], best_index = c;
    __shared__ float values[256];
    __shared__ int indices[256];
    values[threadIdx.x] = best;
    indices[threadIdx.x] = best_index;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < int(blockDim.x); ++i)
            if (values[i] > values[0] || (values[i] == values[0] && indices[i] < indices[0]))
                values[0] = values[i], indices[0] = indices[i];
        chosen[blockIdx.x] = indices[0];
    }
}

// row_sq[t][r] = (sum_c a(r, c) y_c)^2, one warp per row.
__global__ void apply_rows_kernel(float* row_sq, const float* y, const float* t1, const float* t2, int n) {
    const int t = blockIdx.y;
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= n) return;
    const int64_t base = int64_t(t) * n * n + int64_t(r) * n;
    const float* yt = y + int64_t(t) * n;
    double sum = 0;
    for (int c = lane; c < n; c += 32) sum += sum_entry(t1, t2, base + c) * double(yt[c]);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) row_sq[int64_t(t) * n + r] = float(sum * sum);
}

// bound[t] = sqrt(sum row_sq) / ||y||  (0 when a is 0); one block per matrix.
__global__ void finish_bound_kernel(float* bound, const float* row_sq, const float* y, int n) {
    const int t = blockIdx.x;
    double rows = 0, norm = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        rows += double(row_sq[int64_t(t) * n + i]);
        norm += double(y[int64_t(t) * n + i]) * y[int64_t(t) * n + i];
    }
    rows = block_reduce(rows, Add{});
    norm = block_reduce(norm, Add{});
    if (threadIdx.x == 0) bound[t] = norm > 0 ? float(sqrt(rows) / sqrt(norm)) : 0.0f;
}

__global__ void psgd_factor_multiplier_kernel(float* multiplier, const float* t1, const float* t2, const float* bound,
                                              int n, float precond_lr) {
    const int t = blockIdx.y;
    const int64_t size = int64_t(n) * n;
    const float factor = precond_lr / fmaxf(bound[t], FLT_MIN);
    GRID_STRIDE(i, size) {
        const int r = int(i / n), c = int(i % n);
        const float step = c >= r ? (t1[t * size + i] - t2[t * size + i]) * factor : 0.0f;
        multiplier[t * size + i] = (r == c ? 1.0f : 0.0f) - step;
    }
}

// out[t][r, c] = in[t][r, c] (left[t][r] right[t][c])^power, a side's factor 1 where its
// vector is null (PSGD's diagonal factors: power 1 in A, -1 in B, 2 in the update).
__global__ void psgd_scale_rows_columns_kernel(float* out, const float* in, const float* left, const float* right,
                                               int power, int rows, int cols) {
    const int t = blockIdx.y;
    const int64_t size = int64_t(rows) * cols;
    GRID_STRIDE(i, size) {
        float scale = 1.0f;
        if (left) scale *= left[int64_t(t) * rows + i / cols];
        if (right) scale *= right[int64_t(t) * cols + i % cols];
        const float factor = power == 1 ? scale : power == 2 ? scale * scale : 1.0f / scale;
        out[t * size + i] = in[t * size + i] * factor;
    }
}

// out[t][r] = sum_c x[t][r, c]^2: one warp per row (fixed order: lanes stride the row, then
// the warp's shuffle tree).
__global__ void row_sums_of_squares_kernel(float* out, const float* x, int rows, int cols) {
    const int t = blockIdx.y;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* r = x + (int64_t(t) * rows + row) * cols;
    double sum = 0;
    for (int c = lane; c < cols; c += 32) sum += double(r[c]) * r[c];
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) out[int64_t(t) * rows + row] = float(sum);
}

// out[t][c] = sum_r x[t][r, c]^2: a block of 32 x 32 threads per 32 columns; threadIdx.y
// strides the rows (coalesced reads along a row), then the 32 partial sums of each column are
// added in a fixed order.
__global__ void column_sums_of_squares_kernel(float* out, const float* x, int rows, int cols) {
    __shared__ double partial[32][33];
    const int t = blockIdx.y, c = blockIdx.x * 32 + threadIdx.x;
    double sum = 0;
    if (c < cols)
        for (int r = threadIdx.y; r < rows; r += 32) {
            const float v = x[(int64_t(t) * rows + r) * cols + c];
            sum += double(v) * v;
        }
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        double total = 0;
        for (int k = 0; k < 32; ++k) total += partial[k][threadIdx.x];
        out[int64_t(t) * cols + c] = float(total);
    }
}

// PSGD's diagonal factor update, one block per factor:
//   candidate = q - precond_lr (t1 - t2) q / max(max_i |t1_i + t2_i|, tiny)
__global__ void psgd_diagonal_factor_update_kernel(float* candidate, const float* q, const float* t1, const float* t2,
                                                   int n, float precond_lr) {
    const int64_t base = int64_t(blockIdx.x) * n;
    double norm = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) norm = fmax(norm, fabs(double(t1[base + i]) + t2[base + i]));
    norm = fmax(block_reduce(norm, Max{}), double(FLT_MIN));
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double qi = q[base + i];
        candidate[base + i] = float(qi - precond_lr * (double(t1[base + i]) - t2[base + i]) * qi / norm);
    }
}

__global__ void psgd_clip_scale_kernel(float* scale, const float* sum_sq, int count, int64_t n) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < count) scale[t] = float(fmin(1.0, 1.1 / (sqrt(double(sum_sq[t]) / double(n)) + 1e-12)));
}

__global__ void inverse_rms_kernel(float* scale, const float* sum_sq, int count, int64_t n) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < count) scale[t] = float(1.0 / (1e-30 + sqrt(double(sum_sq[t]) / double(n))));
}

// Blocks for a per-matrix grid-stride loop: (x blocks per matrix, count matrices).
dim3 per_matrix_grid(int64_t n, int count) {
    const int64_t blocks = (n + kThreads - 1) / kThreads;
    const int64_t cap = std::max<int64_t>(1, 4096 / std::max(count, 1));
    return dim3(unsigned(std::max<int64_t>(1, std::min(blocks, cap))), unsigned(count));
}

}  // namespace

void gather_tiles_gpu(float* out, const float* grads, const int64_t* table, int count, int rows, int cols,
                      float grad_scale, const float* params, float decay) {
    if (count == 0) return;
    gather_tiles_kernel<<<per_matrix_grid(int64_t(rows) * cols, count), kThreads>>>(out, grads, table, rows, cols,
                                                                                     grad_scale, params, decay);
    CUDA_CHECK_LAUNCH();
}

void apply_tiles_gpu(float* params, bf16* params_bf16, const float* direction, const float* tile_scale,
                     float* momentum, float mu, float dampening, bool nesterov, const int64_t* table, int count,
                     int rows, int cols, float decay, float keep, float step) {
    if (count == 0) return;
    apply_tiles_kernel<<<per_matrix_grid(int64_t(rows) * cols, count), kThreads>>>(
        params, params_bf16, direction, tile_scale, momentum, mu, dampening, nesterov, table, rows, cols, decay, keep,
        step);
    CUDA_CHECK_LAUNCH();
}

void sum_squares_gpu(float* out, const float* x, int count, int64_t n) {
    reduce_matrices(out, x, count, n, SquareOf{}, Add{}, 1.0);
}

void shampoo_filter_graft_gpu(float* filtered_hat, float* graft, float* filtered, float* graft_sq, const float* g,
                              int64_t n, float beta1, float beta3, float bias1, bool second_moment, float graft_keep,
                              float graft_weight, float graft_bias, float graft_eps) {
    shampoo_filter_graft_kernel<<<grid_for(size_t(n)), kThreads>>>(filtered_hat, graft, filtered, graft_sq, g, n, beta1,
                                                                   beta3, bias1, second_moment, graft_keep,
                                                                   graft_weight, graft_bias, graft_eps);
    CUDA_CHECK_LAUNCH();
}

void norm_ratio_gpu(float* scale, const float* numerator_sq, const float* denominator_sq, int count) {
    norm_ratio_kernel<<<(count + 255) / 256, 256>>>(scale, numerator_sq, denominator_sq, count);
    CUDA_CHECK_LAUNCH();
}

void inverse_root_columns_gpu(float* scaled, const float* vectors, const float* values, int n, int count,
                              float divisor, double eps, int root, cudaStream_t stream) {
    inverse_root_columns_kernel<<<per_matrix_grid(int64_t(n) * n, count), kThreads, 0, stream>>>(
        scaled, vectors, values, n, divisor, eps, root);
    CUDA_CHECK_LAUNCH();
}

void soap_adam_gpu(float* direction, float* exp_avg, float* exp_avg_sq, const float* rotated, int64_t n, float beta1,
                   float beta2, float eps) {
    soap_adam_kernel<<<grid_for(size_t(n)), kThreads>>>(direction, exp_avg, exp_avg_sq, rotated, n, beta1, beta2, eps);
    CUDA_CHECK_LAUNCH();
}

void column_dots_gpu(float* diag, const float* basis, const float* projected, int n, int count) {
    column_dots_kernel<<<dim3((n + 127) / 128, count), 128>>>(diag, basis, projected, n);
    CUDA_CHECK_LAUNCH();
}

namespace {

// One block per matrix: a bitonic sort of (key, index) pairs over n padded to a power of two,
// in shared memory. The key is the value, NaN replaced by the end's infinity; pairs compare by
// key, then by index, so the order is total and equals a stable sort's. Padding pairs carry the
// end's infinity and index n, so they sort after every real pair. Each stage compares i with
// i ^ stride: within a run of `size`, ascending where bit `size` of i is clear, descending where
// set, which merges the runs into one sorted sequence at size = padded.
__global__ void orders_per_matrix_kernel(int* order, const float* values, int n, int padded, bool descending) {
    extern __shared__ float sort_keys[];
    int* sort_indices = reinterpret_cast<int*>(sort_keys + padded);
    const float end = descending ? -INFINITY : INFINITY;
    const float* row = values + int64_t(blockIdx.x) * n;
    for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        const float v = i < n ? row[i] : end;
        sort_keys[i] = isnan(v) ? end : v;
        sort_indices[i] = i < n ? i : n;
    }
    __syncthreads();
    auto first = [descending](float key_a, int index_a, float key_b, int index_b) {
        if (key_a != key_b) return descending ? key_a > key_b : key_a < key_b;
        return index_a < index_b;
    };
    for (int size = 2; size <= padded; size <<= 1)
        for (int stride = size / 2; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < padded; i += blockDim.x) {
                const int j = i ^ stride;
                if (j <= i) continue;
                const bool j_first = first(sort_keys[j], sort_indices[j], sort_keys[i], sort_indices[i]);
                if (j_first == ((i & size) == 0)) {  // out of this run's direction: swap
                    const float key = sort_keys[i];
                    sort_keys[i] = sort_keys[j];
                    sort_keys[j] = key;
                    const int index = sort_indices[i];
                    sort_indices[i] = sort_indices[j];
                    sort_indices[j] = index;
                }
            }
            __syncthreads();
        }
    for (int i = threadIdx.x; i < n; i += blockDim.x) order[int64_t(blockIdx.x) * n + i] = sort_indices[i];
}

}  // namespace

void orders_per_matrix_gpu(int* order, const float* values, int n, int count, bool descending) {
    QOPT_CHECK(n > 0 && count >= 0, "orders_per_matrix_gpu: n must be positive");
    if (count == 0) return;
    if (n > kDeviceSortMax) {
        std::vector<float> host(size_t(n) * count);
        CUDA_CHECK(cudaMemcpy(host.data(), values, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
        const std::vector<int> sorted = orders_per_matrix(host, n, descending);
        CUDA_CHECK(cudaMemcpy(order, sorted.data(), sorted.size() * sizeof(int), cudaMemcpyHostToDevice));
        return;
    }
    int padded = 1;
    while (padded < n) padded <<= 1;
    const size_t shared = size_t(padded) * (sizeof(float) + sizeof(int));  // at most 128 KiB
    if (shared > (48 << 10))  // above the default limit (per device, so set at every such call)
        CUDA_CHECK(cudaFuncSetAttribute(orders_per_matrix_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(shared)));
    const int threads = std::min(1024, std::max(32, padded / 2));
    orders_per_matrix_kernel<<<unsigned(count), unsigned(threads), shared>>>(order, values, n, padded, descending);
    CUDA_CHECK_LAUNCH();
}

void permute_columns_gpu(float* out, const float* in, const int* order, int n, int count) {
    permute_rows_columns_kernel<<<per_matrix_grid(int64_t(n) * n, count), kThreads>>>(out, in, nullptr, order, n, n);
    CUDA_CHECK_LAUNCH();
}

void permute_rows_columns_gpu(float* out, const float* in, const int* row_order, const int* col_order, int rows,
                              int cols, int count) {
    permute_rows_columns_kernel<<<per_matrix_grid(int64_t(rows) * cols, count), kThreads>>>(out, in, row_order,
                                                                                            col_order, rows, cols);
    CUDA_CHECK_LAUNCH();
}

void commit_finite_tiles_gpu(float* kept, const float* candidate, int n, int count, int* accepted, int* rejected_count,
                             int* flags, bool diagonal) {
    CUDA_CHECK(cudaMemsetAsync(flags, 0, size_t(2 * count) * sizeof(int)));
    const int64_t size = diagonal ? int64_t(n) : int64_t(n) * n;
    const dim3 grid(unsigned(std::min<int64_t>((size + kThreads * 8 - 1) / (kThreads * 8), 1024)), unsigned(count));
    commit_flags_kernel<<<grid, kThreads>>>(flags, kept, candidate, size);
    CUDA_CHECK_LAUNCH();
    commit_copy_kernel<<<grid, kThreads>>>(kept, candidate, flags, size, diagonal ? 1 : int64_t(n) + 1, accepted,
                                           rejected_count);
    CUDA_CHECK_LAUNCH();
}

void identity_order_where_rejected_gpu(int* order, const int* accepted, int n, int count) {
    identity_order_where_rejected_kernel<<<count, kThreads>>>(order, accepted, n);
    CUDA_CHECK_LAUNCH();
}

void psgd_momentum_gpu(float* debiased, float* momentum, const float* g, int64_t n, float beta1, float debias) {
    psgd_momentum_kernel<<<grid_for(size_t(n)), kThreads>>>(debiased, momentum, g, n, beta1, debias);
    CUDA_CHECK_LAUNCH();
}

void mean_abs_gpu(float* mean_abs, const float* x, int count, int64_t n) {
    reduce_matrices(mean_abs, x, count, n, AbsOf{}, Add{}, double(n));
}

void max_abs_gpu(float* max_abs, const float* x, int count, int64_t n) {
    reduce_matrices(max_abs, x, count, n, AbsOf{}, Max{}, 1.0);
}

void psgd_probe_perturb_gpu(float* probe, float* x, const float* mean_abs, const int* matrix_index, int count,
                            int64_t n, uint64_t seed, long step, float noise_scale) {
    psgd_probe_perturb_kernel<<<per_matrix_grid(n, count), kThreads>>>(probe, x, mean_abs, matrix_index, n, seed, step,
                                                                      noise_scale);
    CUDA_CHECK_LAUNCH();
}

void psgd_balance_gpu(float* q_left, float* q_right, const float* left_max, const float* right_max, int count,
                      int64_t left_n, int64_t right_n) {
    psgd_balance_kernel<<<per_matrix_grid(std::max(left_n, right_n), count), kThreads>>>(q_left, q_right, left_max,
                                                                                         right_max, left_n, right_n);
    CUDA_CHECK_LAUNCH();
}

size_t psgd_norm_lower_bound_work(int n, int count) { return (3 + 2 * kBoundRowChunks) * size_t(n) * count + 1; }

void psgd_norm_lower_bound_gpu(float* bound, const float* t1, const float* t2, float* work, int n, int count) {
    float* column_sq = work;  // later the rows' squares
    float* y = work + size_t(n) * count;
    int* chosen = reinterpret_cast<int*>(work + 2 * size_t(n) * count);
    // The partial sums as doubles, 8-byte aligned (work is a device allocation).
    double* partial = reinterpret_cast<double*>(work + 3 * size_t(n) * count + (3 * size_t(n) * count) % 2);
    const dim3 columns((n + 127) / 128, count), column_chunks((n + 127) / 128, kBoundRowChunks, count);
    column_partials_kernel<<<column_chunks, 128>>>(partial, nullptr, t1, t2, n);
    CUDA_CHECK_LAUNCH();
    sum_row_chunks_kernel<<<columns, 128>>>(column_sq, partial, n);
    CUDA_CHECK_LAUNCH();
    choose_column_kernel<<<count, 256>>>(chosen, column_sq, n);
    CUDA_CHECK_LAUNCH();
    column_partials_kernel<<<column_chunks, 128>>>(partial, chosen, t1, t2, n);
    CUDA_CHECK_LAUNCH();
    sum_row_chunks_kernel<<<columns, 128>>>(y, partial, n);
    CUDA_CHECK_LAUNCH();
    apply_rows_kernel<<<dim3((n + 7) / 8, count), 256>>>(column_sq, y, t1, t2, n);
    CUDA_CHECK_LAUNCH();
    finish_bound_kernel<<<count, 256>>>(bound, column_sq, y, n);
    CUDA_CHECK_LAUNCH();
}

void psgd_factor_multiplier_gpu(float* multiplier, const float* t1, const float* t2, const float* bound, int n,
                                int count, float precond_lr) {
    psgd_factor_multiplier_kernel<<<per_matrix_grid(int64_t(n) * n, count), kThreads>>>(multiplier, t1, t2, bound, n,
                                                                                       precond_lr);
    CUDA_CHECK_LAUNCH();
}

void psgd_scale_rows_columns_gpu(float* out, const float* in, const float* left, const float* right, int power,
                                 int rows, int cols, int count) {
    QOPT_CHECK(power == 1 || power == -1 || power == 2, "psgd_scale_rows_columns_gpu: power ", power);
    if (count == 0) return;
    psgd_scale_rows_columns_kernel<<<per_matrix_grid(int64_t(rows) * cols, count), kThreads>>>(out, in, left, right,
                                                                                               power, rows, cols);
    CUDA_CHECK_LAUNCH();
}

void sums_of_squares_gpu(float* out, const float* x, int rows, int cols, int count, bool columns) {
    if (count == 0) return;
    if (columns) {
        column_sums_of_squares_kernel<<<dim3(unsigned((cols + 31) / 32), unsigned(count)), dim3(32, 32)>>>(out, x, rows,
                                                                                                          cols);
    } else {
        constexpr int kWarps = kThreads / 32;
        row_sums_of_squares_kernel<<<dim3(unsigned((rows + kWarps - 1) / kWarps), unsigned(count)), kThreads>>>(
            out, x, rows, cols);
    }
    CUDA_CHECK_LAUNCH();
}

void psgd_diagonal_factor_update_gpu(float* candidate, const float* q, const float* t1, const float* t2, int n,
                                     int count, float precond_lr) {
    if (count == 0) return;
    psgd_diagonal_factor_update_kernel<<<count, kThreads>>>(candidate, q, t1, t2, n, precond_lr);
    CUDA_CHECK_LAUNCH();
}

void psgd_clip_scale_gpu(float* scale, const float* sum_sq, int count, int64_t n) {
    psgd_clip_scale_kernel<<<(count + 255) / 256, 256>>>(scale, sum_sq, count, n);
    CUDA_CHECK_LAUNCH();
}

void inverse_rms_gpu(float* scale, const float* sum_sq, int count, int64_t n) {
    inverse_rms_kernel<<<(count + 255) / 256, 256>>>(scale, sum_sq, count, n);
    CUDA_CHECK_LAUNCH();
}

void diagonals_gpu(float* diagonal, const float* x, int n, int count) {
    if (count == 0) return;
    diagonals_kernel<<<grid_for(size_t(n) * count), kThreads>>>(diagonal, x, n, count);
    CUDA_CHECK_LAUNCH();
}

void off_diagonal_sum_squares_gpu(float* out, const float* x, int n, int count) {
    reduce_matrices(out, x, count, int64_t(n) * n, OffDiagonalSquareOf{n}, Add{}, 1.0);
}

void within_tolerance_gpu(int* within, const float* off_diagonal_sq, const float* total_sq, double tolerance,
                          int count) {
    if (count == 0) return;
    within_tolerance_kernel<<<(count + 255) / 256, 256>>>(within, off_diagonal_sq, total_sq, tolerance, count);
    CUDA_CHECK_LAUNCH();
}

void select_tiles_gpu(float* kept, const float* candidate, const int* flags, bool when_set, int64_t size, int count) {
    if (count == 0) return;
    select_tiles_kernel<<<per_matrix_grid(size, count), kThreads>>>(kept, candidate, flags, when_set, size);
    CUDA_CHECK_LAUNCH();
}

void identity_where_gpu(float* x, const int* flags, int n, int count) {
    if (count == 0) return;
    identity_where_kernel<<<per_matrix_grid(int64_t(n) * n, count), kThreads>>>(x, flags, n);
    CUDA_CHECK_LAUNCH();
}

void take_estimated_values_gpu(float* values, const float* estimates, const int* within, float divisor, int n,
                               int count) {
    if (count == 0) return;
    take_estimated_values_kernel<<<grid_for(size_t(n) * count), kThreads>>>(values, estimates, within, divisor, n,
                                                                          count);
    CUDA_CHECK_LAUNCH();
}

}  // namespace qopt
