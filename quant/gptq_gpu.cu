// GPTQ on the GPU (declared in quant/gptq.hpp; the CPU reference gptq_quantize is the oracle,
// compared in tests/test_ptq.cpp). The column loop is the CPU's, cut into blocks:
//   inside a block [col0, col0 + width): one thread per row, the block's columns of a tile of
//     rows in shared memory; column j is quantized and its scaled error e_j = (w_j - q_j) / U_jj
//     pushed onto the block's later columns (w_k -= e_j U_jk), exactly the CPU's update;
//   after the block: every later column gets the block's errors at once,
//     W[:, col0 + width:] -= E U[col0 : col0 + width, col0 + width:],
//   one fp32 GEMM (E = the block's errors [rows, width]) — the same sums the CPU adds one column
//   at a time, regrouped (GPTQ's "lazy batch" updates).
// Per-group grids are chosen when their group starts, from the updated values: a block holds
// whole groups (width a multiple of the group) or a group holds whole blocks (the group then
// starts a block, and its values are current in global memory).
#include <algorithm>

#include "core/error.hpp"
#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"
#include "quant/gptq.hpp"

namespace qopt {

namespace {

constexpr int kRowsPerCta = 64;     // one thread per row
constexpr int kMaxBlockCols = 128;  // columns per block (the reference's block size)

// The block width: 128, or for per-group grids a width that groups tile or that tiles a group.
int block_cols_for(const QuantSpec& spec) {
    if (spec.granularity != Granularity::Group) return kMaxBlockCols;
    const int group = spec.group_size;
    if (group <= kMaxBlockCols) return kMaxBlockCols / group * group;
    int width = kMaxBlockCols;
    while (group % width) --width;
    return width;
}

struct BlockArgs {
    float* weight;             // [rows, n] in processing order, current up to this block
    const float* upper;        // U [n, n] row-major (upper triangle read)
    int8_t* codes;             // [rows, n] in processing order
    GroupGrid* grids;          // per tensor (1), per row (rows) or per group (rows * n / group)
    float* errors;             // [width, rows]: E^T (row j: the scaled errors of column col0 + j)
    int rows, n, col0, width;
    QuantSpec spec;
    float alpha;               // rule_alpha(spec)
};

__global__ void gptq_block_kernel(BlockArgs a) {
    __shared__ float tile[kMaxBlockCols][kRowsPerCta + 1];  // tile[c][r]: row r's column col0 + c
    __shared__ int8_t code_tile[kMaxBlockCols][kRowsPerCta];
    const int row0 = blockIdx.x * kRowsPerCta;
    const int tile_rows = min(kRowsPerCta, a.rows - row0);
    for (int i = threadIdx.x; i < tile_rows * a.width; i += blockDim.x) {
        const int r = i / a.width, c = i % a.width;
        tile[c][r] = a.weight[size_t(row0 + r) * a.n + a.col0 + c];
    }
    __syncthreads();
    const int r = threadIdx.x;
    if (r < tile_rows) {
        const int row = row0 + r;
        const bool per_group = a.spec.granularity == Granularity::Group;
        const int group = per_group ? a.spec.group_size : 0;
        // The grid in force at col0 (per group: chosen by an earlier block when its group started
        // there; a group starting at col0 is chosen below).
        GroupGrid g = per_group ? a.grids[size_t(row) * (a.n / group) + a.col0 / group]
                                : a.grids[a.spec.granularity == Granularity::Tensor ? 0 : row];
        for (int j = 0; j < a.width; ++j) {
            const int column = a.col0 + j;
            if (per_group && column % group == 0) {
                const bool in_tile = j + group <= a.width;
                const float* values = in_tile ? &tile[j][r] : a.weight + size_t(row) * a.n + column;
                const long stride = in_tile ? kRowsPerCta + 1 : 1;
                g = choose_grid(a.spec, a.alpha, group_stats(values, group, stride), values, group, stride);
                a.grids[size_t(row) * (a.n / group) + column / group] = g;
            }
            const float w = tile[j][r];
            const int code = quant_code(g, w);
            code_tile[j][r] = int8_t(code);
            const float* u_row = a.upper + size_t(column) * a.n;
            const float error = (w - quant_value(g, code)) / u_row[column];
            a.errors[size_t(j) * a.rows + row] = error;
            for (int k = j + 1; k < a.width; ++k) tile[k][r] -= error * u_row[a.col0 + k];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < tile_rows * a.width; i += blockDim.x) {
        const int r = i / a.width, c = i % a.width;
        a.codes[size_t(row0 + r) * a.n + a.col0 + c] = code_tile[c][r];
    }
}

__global__ void to_float_kernel(float* out, const double* in, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        out[i] = float(in[i]);
}

}  // namespace

QuantizedTensor gptq_quantize_gpu(const float* weight, int rows, int cols, const std::vector<double>& hessian,
                                  const QuantSpec& spec, const GptqOptions& options) {
    GptqProblem p = prepare_gptq(weight, rows, cols, hessian, spec, options);
    const int n = cols;
    const size_t square = size_t(n) * n, elements = size_t(rows) * n;

    DeviceBuffer<float> upper(square);
    {
        DeviceBuffer<double> upper64;
        upper64.upload(p.hessian);
        upper_cholesky_of_inverse_gpu(upper64.data(), n);
        to_float_kernel<<<grid_for(square), 256>>>(upper.data(), upper64.data(), square);
        CUDA_CHECK_LAUNCH();
    }
    const bool permuted = options.act_order;
    DeviceBuffer<float> work;
    if (permuted) {
        std::vector<float> in_order(elements);
        for (int r = 0; r < rows; ++r)
            for (int a = 0; a < n; ++a) in_order[size_t(r) * n + a] = p.weight[size_t(r) * n + p.order[size_t(a)]];
        work.upload(in_order);
    } else {
        work.upload(p.weight);
    }
    QuantizedTensor& q = p.result;
    DeviceBuffer<int8_t> codes(elements);
    DeviceBuffer<uint8_t> grid_bytes(q.grids.size() * sizeof(GroupGrid));
    GroupGrid* grids = reinterpret_cast<GroupGrid*>(grid_bytes.data());
    CUDA_CHECK(cudaMemcpy(grids, q.grids.data(), grid_bytes.size(), cudaMemcpyHostToDevice));
    const int block_cols = block_cols_for(spec);
    DeviceBuffer<float> errors(size_t(block_cols) * rows);

    BlockArgs args{work.data(), upper.data(), codes.data(), grids, errors.data(), rows, n, 0, 0, spec, rule_alpha(spec)};
    const unsigned ctas = unsigned((rows + kRowsPerCta - 1) / kRowsPerCta);
    for (int col0 = 0; col0 < n; col0 += block_cols) {
        args.col0 = col0;
        args.width = std::min(block_cols, n - col0);
        gptq_block_kernel<<<ctas, kRowsPerCta>>>(args);
        CUDA_CHECK_LAUNCH();
        const int later = col0 + args.width, rest = n - later;
        if (rest > 0)
            strided_matmul_f32_gpu(work.data() + later, n, 0, errors.data(), rows, 0, true,
                                   upper.data() + size_t(col0) * n + later, n, 0, false, rows, rest, args.width, 1,
                                   -1.0f, 1.0f);
    }
    const std::vector<int8_t> in_order = codes.download();
    if (permuted) {
        for (int r = 0; r < rows; ++r)
            for (int a = 0; a < n; ++a) q.codes[size_t(r) * n + p.order[size_t(a)]] = in_order[size_t(r) * n + a];
    } else {
        q.codes = in_order;
    }
    CUDA_CHECK(cudaMemcpy(q.grids.data(), grids, grid_bytes.size(), cudaMemcpyDeviceToHost));
    return std::move(q);
}

}  // namespace qopt
