// Linear layers on the GPU through cuBLASLt (bf16 operands, fp32 accumulation), and the fp32
// products of the optimizers and GPTQ. This file is the one place that owns the cuBLASLt handle,
// its workspace and the algorithm choice (the heuristic's first answer, cached per shape; timing
// its other answers was tried and gained ~1%, see README "Optimizers"). Math and CPU reference:
// kernels/matmul.hpp.
//
// Row-major X[rows, cols] is column-major X^T, so with weight W[out, in] row-major:
//   forward  out^T[out, n] = op_T(W as [in, out]) * in^T[in, n]          (m=out, n=rows, k=in)
//   dinput   din^T[in, n]  = (W as [in, out]) * dout^T[out, n]           (m=in,  n=rows, k=out)
//   dweight  dW^T[in, out] += in^T[in, n] * op_T(dout^T[out, n])         (m=in,  n=out,  k=rows)
#include <cublasLt.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

namespace qopt {

namespace {

#define CUBLAS_CHECK(call)                                                                          \
    do {                                                                                            \
        cublasStatus_t status_ = (call);                                                            \
        if (status_ != CUBLAS_STATUS_SUCCESS)                                                       \
            ::qopt::fail("cuBLASLt error ", int(status_), " in ", #call, " at ", __FILE__, ":", __LINE__); \
    } while (0)

constexpr size_t kWorkspaceBytes = size_t(32) << 20;

// The handle and one workspace per stream (products on different streams may run at once; a
// shared workspace would be written by both). Products may be issued from more than one host
// thread (Shampoo's side refresh): `mutex` guards the workspaces and the algorithm cache.
struct Lt {
    cublasLtHandle_t handle = nullptr;
    std::mutex mutex;
    std::map<cudaStream_t, void*> workspaces;
    Lt() { CUBLAS_CHECK(cublasLtCreate(&handle)); }
    void* workspace(cudaStream_t stream) {
        auto found = workspaces.find(stream);
        if (found != workspaces.end()) return found->second;
        void* bytes = nullptr;
        CUDA_CHECK(cudaMalloc(&bytes, kWorkspaceBytes));
        return workspaces.emplace(stream, bytes).first->second;
    }
};

Lt& lt() {
    static Lt instance;  // created on first use, lives for the process
    return instance;
}

// What runs after the product, inside the same kernel: a bias add, GELU (saving the
// pre-activation in aux), or GELU's derivative (reading the pre-activation from aux).
enum class Epilogue { None, Gelu, DGelu };

// The heuristic's first algorithm for this product (callers cache it per shape).
// `alignment`: the bytes that all four operands' addresses are multiples of (at most 256).
cublasLtMatmulAlgo_t first_algorithm(cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t layout_a,
                                     cublasLtMatrixLayout_t layout_b, cublasLtMatrixLayout_t layout_c, int m, int n,
                                     int k, uint32_t alignment = 256) {
    cublasLtMatmulPreference_t preference;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                      &kWorkspaceBytes, sizeof kWorkspaceBytes));
    for (auto attribute : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                           CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, attribute, &alignment, sizeof alignment));
    cublasLtMatmulHeuristicResult_t heuristic;
    int returned = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt().handle, op, layout_a, layout_b, layout_c, layout_c, preference, 1,
                                                &heuristic, &returned));
    cublasLtMatmulPreferenceDestroy(preference);
    if (returned == 0) fail("cuBLASLt has no algorithm for a ", m, "x", n, "x", k, " matmul");
    return heuristic.algo;
}

// A product's algorithm (cache[key], found by `find_first` the first time) and its stream's
// workspace, under Lt's mutex: products may be issued from more than one host thread.
struct Chosen {
    cublasLtMatmulAlgo_t algorithm;
    void* workspace;
};
template <class Key, class Find>
Chosen choose(std::map<Key, cublasLtMatmulAlgo_t>& cache, const Key& key, cudaStream_t stream, Find find_first) {
    std::lock_guard<std::mutex> lock(lt().mutex);
    auto found = cache.find(key);
    if (found == cache.end()) found = cache.emplace(key, find_first()).first;
    return {found->second, lt().workspace(stream)};
}

// How the operands of a product sit in memory: `count` products, the b-th reading A + b *
// stride_a, B + b * stride_b and C/D + b * stride_c; leading dimensions in elements (0: packed,
// the column-major operand's row count).
struct Operands {
    int count = 1;
    int64_t stride_a = 0, stride_b = 0, stride_c = 0;
    int64_t ld_a = 0, ld_b = 0, ld_c = 0;
};

// The largest power of two (up to 256) that divides the address: cuBLASLt's algorithms state
// the alignment they need, and its heuristic assumes 256 bytes unless told less (sub-matrices of
// the blocked triangular products and GPTQ's updates start anywhere).
uint32_t alignment_of(const void* pointer) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(pointer);
    return address == 0 ? 256u : uint32_t(std::min<uintptr_t>(256, address & (~address + 1)));
}

// D[m, n] (column-major, type c_type) = alpha * op(A) op(B) + beta * C, then the epilogue (bias
// first, for forward products); aux is [m, n] column-major like D. c_in (if given) is the C read
// by beta * C while the result goes to c. Operands are bf16 unless ab_type says fp32 (CUDA_R_32F:
// then C is fp32 too and the product runs in full fp32, or on TF32 tensor cores with `tf32`).
// The algorithm: the heuristic's first answer for this shape, layout and alignment, cached.
void lt_matmul(void* c, cudaDataType_t c_type, const void* a, bool transpose_a, const void* b, bool transpose_b,
               int m, int n, int k, float beta, const bf16* bias, cudaStream_t stream,
               Epilogue extra = Epilogue::None, void* aux = nullptr, float alpha = 1.0f, const void* c_in = nullptr,
               Operands operands = Operands{}, cudaDataType_t ab_type = CUDA_R_16BF, bool tf32 = false) {
    cublasLtMatmulDesc_t op;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    if (extra == Epilogue::Gelu) epilogue = bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    else if (extra == Epilogue::DGelu) epilogue = CUBLASLT_EPILOGUE_DGELU;
    else if (bias) epilogue = CUBLASLT_EPILOGUE_BIAS;
    if (epilogue != CUBLASLT_EPILOGUE_DEFAULT)
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue));
    if (bias) {
        const cudaDataType_t bias_type = CUDA_R_16BF;
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    if (aux) {
        const int64_t aux_ld = m;
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof aux));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof aux_ld));
    }
    const int64_t rows_a = transpose_a ? k : m, rows_b = transpose_b ? n : k;
    const int64_t ld_a = operands.ld_a ? operands.ld_a : rows_a, ld_b = operands.ld_b ? operands.ld_b : rows_b,
                  ld_c = operands.ld_c ? operands.ld_c : m;
    cublasLtMatrixLayout_t layout_a, layout_b, layout_c;
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout_a, ab_type, rows_a, transpose_a ? m : k, ld_a));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout_b, ab_type, rows_b, transpose_b ? k : n, ld_b));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout_c, c_type, m, n, ld_c));
    if (operands.count > 1) {
        const int32_t count = operands.count;
        const std::pair<cublasLtMatrixLayout_t, int64_t> strided[3] = {
            {layout_a, operands.stride_a}, {layout_b, operands.stride_b}, {layout_c, operands.stride_c}};
        for (const auto& [layout, stride] : strided) {
            CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count));
            CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                          sizeof stride));
        }
    }
    // The operands' alignment (all four pointers' smallest) goes to the heuristic and the key.
    const uint32_t alignment = std::min({alignment_of(a), alignment_of(b), alignment_of(c), alignment_of(c_in)});

    using Key = std::tuple<int, int, int, bool, bool, int, int, bool, int, int, bool, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t, uint32_t>;
    static std::map<Key, cublasLtMatmulAlgo_t> cache;
    const Key key{m, n, k, transpose_a, transpose_b, int(c_type), int(epilogue), beta != 0.0f, operands.count,
                  int(ab_type), tf32, ld_a, ld_b, ld_c, operands.stride_a, operands.stride_b, operands.stride_c,
                  alignment};
    const Chosen chosen = choose(cache, key, stream, [&] {
        return first_algorithm(op, layout_a, layout_b, layout_c, m, n, k, alignment);
    });
    CUBLAS_CHECK(cublasLtMatmul(lt().handle, op, &alpha, a, layout_a, b, layout_b, &beta, c_in ? c_in : c, layout_c, c,
                                layout_c, &chosen.algorithm, chosen.workspace, kWorkspaceBytes, stream));
    cublasLtMatrixLayoutDestroy(layout_a);
    cublasLtMatrixLayoutDestroy(layout_b);
    cublasLtMatrixLayoutDestroy(layout_c);
    cublasLtMatmulDescDestroy(op);
}

}  // namespace

void reserve_matmul_workspace(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(lt().mutex);
    lt().workspace(stream);
}

namespace {

// The forward layout ("TN", the one cuBLASLt's int8 and fp8 kernels take) for quantized operands:
// out[m, n] (column-major, out_type) = weight[k, m]^T in[k, n], both of ab_type; `op` carries the
// compute type, scales and epilogue, and is destroyed here. Algorithms are cached per shape,
// types and `variant` (what else in `op` changes the choice).
void quantized_tn_product(cublasLtMatmulDesc_t op, cudaDataType_t ab_type, cudaDataType_t out_type, int variant,
                          const void* alpha, const void* beta, void* out, const void* in, const void* weight, int m,
                          int n, int k, cudaStream_t stream) {
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    cublasLtMatrixLayout_t layout_a, layout_b, layout_c;
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout_a, ab_type, k, m, k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout_b, ab_type, k, n, k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout_c, out_type, m, n, m));
    static std::map<std::tuple<int, int, int, int, int, int>, cublasLtMatmulAlgo_t> cache;
    const auto key = std::make_tuple(m, n, k, int(ab_type), int(out_type), variant);
    const Chosen chosen =
        choose(cache, key, stream, [&] { return first_algorithm(op, layout_a, layout_b, layout_c, m, n, k); });
    CUBLAS_CHECK(cublasLtMatmul(lt().handle, op, alpha, weight, layout_a, in, layout_b, beta, out, layout_c, out,
                                layout_c, &chosen.algorithm, chosen.workspace, kWorkspaceBytes, stream));
    cublasLtMatrixLayoutDestroy(layout_a);
    cublasLtMatrixLayoutDestroy(layout_b);
    cublasLtMatrixLayoutDestroy(layout_c);
    cublasLtMatmulDescDestroy(op);
}

}  // namespace

// The integer product for W8A8: int8 operands, int32 accumulation and output, exact.
void int8_matmul_gpu(int32_t* out, const int8_t* in, const int8_t* weight, int n_rows, int in_dim, int out_dim,
                     cudaStream_t stream) {
    QOPT_CHECK(n_rows % 4 == 0 && in_dim % 4 == 0 && out_dim % 4 == 0, "int8 matmul: sizes ", n_rows, " x ", in_dim,
               " x ", out_dim, " must be multiples of 4");
    cublasLtMatmulDesc_t op;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32I, CUDA_R_32I));
    const int32_t alpha = 1, beta = 0;
    quantized_tn_product(op, CUDA_R_8I, CUDA_R_32I, 0, &alpha, &beta, out, in, weight, out_dim, n_rows, in_dim, stream);
}

// Small integer codes on fp8 tensor cores: every integer of magnitude <= 16 is exact in e4m3,
// so codes of symmetric grids up to 5 bits multiply exactly, and with cuBLASLt's default
// (promoted, not "fast") fp8 accumulation the fp32 sums are exact integers as long as they stay
// below 2^24 (15^2 * in_dim: in_dim < 74,000). The per-token and per-channel steps are
// cuBLASLt's outer-vector scales, applied in the GEMM's epilogue with the bias:
//   out[n, o] = (sum_i in[n, i] weight[o, i]) * in_scales[n] * weight_scales[o] + bias[o]
void fp8_scaled_matmul_gpu(void* out, bool out_fp32, const uint8_t* in, const uint8_t* weight, const float* in_scales,
                           const float* weight_scales, const bf16* bias, int n_rows, int in_dim, int out_dim,
                           cudaStream_t stream) {
    QOPT_CHECK(n_rows % 16 == 0 && in_dim % 16 == 0 && out_dim % 16 == 0, "fp8 matmul: sizes ", n_rows, " x ",
               in_dim, " x ", out_dim, " must be multiples of 16");
    QOPT_CHECK(!(bias && out_fp32), "fp8 matmul: a bias goes with bf16 output only");
    cublasLtMatmulDesc_t op;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    // A = the weight (m = out rows), B = the input (n = tokens).
    const cublasLtMatmulMatrixScale_t outer = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer, sizeof outer));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer, sizeof outer));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &weight_scales,
                                                sizeof weight_scales));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &in_scales, sizeof in_scales));
    if (bias) {
        const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
        const cudaDataType_t bias_type = CUDA_R_16BF;
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    const float alpha = 1.0f, beta = 0.0f;
    quantized_tn_product(op, CUDA_R_8F_E4M3, out_fp32 ? CUDA_R_32F : CUDA_R_16BF, bias ? 1 : 0, &alpha, &beta, out, in,
                         weight, out_dim, n_rows, in_dim, stream);
}

void matmul_forward_gpu(bf16* out, const bf16* in, const bf16* weight, const bf16* bias, int n_rows, int in_dim,
                        int out_dim, cudaStream_t stream) {
    lt_matmul(out, CUDA_R_16BF, weight, true, in, false, out_dim, n_rows, in_dim, 0.0f, bias, stream);
}

void matmul_forward_gelu_gpu(bf16* out, bf16* pre_activation, const bf16* in, const bf16* weight, const bf16* bias,
                             int n_rows, int in_dim, int out_dim, cudaStream_t stream) {
    lt_matmul(out, CUDA_R_16BF, weight, true, in, false, out_dim, n_rows, in_dim, 0.0f, bias, stream, Epilogue::Gelu,
              pre_activation);
}

void matmul_backward_input_dgelu_gpu(bf16* d_pre_activation, const bf16* dout, const bf16* weight,
                                     const bf16* pre_activation, int n_rows, int in_dim, int out_dim,
                                     cudaStream_t stream) {
    lt_matmul(d_pre_activation, CUDA_R_16BF, weight, false, dout, false, in_dim, n_rows, out_dim, 0.0f, nullptr, stream,
              Epilogue::DGelu, const_cast<bf16*>(pre_activation));
}

void matmul_backward_input_gpu(bf16* din, const bf16* dout, const bf16* weight, int n_rows, int in_dim, int out_dim,
                               bool accumulate, cudaStream_t stream) {
    lt_matmul(din, CUDA_R_16BF, weight, false, dout, false, in_dim, n_rows, out_dim, accumulate ? 1.0f : 0.0f, nullptr,
              stream);
}

void matmul_backward_weight_gpu(float* dweight, const bf16* dout, const bf16* in, int n_rows, int in_dim, int out_dim,
                                bool accumulate, cudaStream_t stream) {
    lt_matmul(dweight, CUDA_R_32F, in, false, dout, true, in_dim, out_dim, n_rows, accumulate ? 1.0f : 0.0f, nullptr,
              stream);
}

// Row-major D[m, n] = alpha op(A) op(B) + beta C is column-major D^T = op(B)^T op(A)^T: the
// column-major call takes B as its first operand (m' = n, n' = m).
void batched_matmul_gpu(bf16* d, const bf16* c, const bf16* a, bool transpose_a, const bf16* b, bool transpose_b,
                        int m, int n, int k, float alpha, float beta, int batch, int64_t stride_a, int64_t stride_b,
                        int64_t stride_c, cudaStream_t stream) {
    lt_matmul(d, CUDA_R_16BF, b, transpose_b, a, transpose_a, n, m, k, beta, nullptr, stream, Epilogue::None, nullptr,
              alpha, c, Operands{batch, stride_b, stride_a, stride_c});
}

void batched_matmul_f32_gpu(float* d, const float* c, const float* a, bool transpose_a, const float* b,
                            bool transpose_b, int m, int n, int k, float alpha, float beta, int batch,
                            int64_t stride_a, int64_t stride_b, int64_t stride_c, bool tf32, cudaStream_t stream) {
    lt_matmul(d, CUDA_R_32F, b, transpose_b, a, transpose_a, n, m, k, beta, nullptr, stream, Epilogue::None, nullptr,
              alpha, c, Operands{batch, stride_b, stride_a, stride_c}, CUDA_R_32F, tf32);
    count_matrix_flops(2.0 * m * n * double(k) * batch);
}

void strided_matmul_f32_gpu(float* d, int64_t ld_d, int64_t stride_d, const float* a, int64_t ld_a, int64_t stride_a,
                            bool transpose_a, const float* b, int64_t ld_b, int64_t stride_b, bool transpose_b, int m,
                            int n, int k, int batch, float alpha, float beta, bool tf32, cudaStream_t stream) {
    lt_matmul(d, CUDA_R_32F, b, transpose_b, a, transpose_a, n, m, k, beta, nullptr, stream, Epilogue::None, nullptr,
              alpha, nullptr, Operands{batch, stride_b, stride_a, stride_d, ld_b, ld_a, ld_d}, CUDA_R_32F, tf32);
    count_matrix_flops(2.0 * m * n * double(k) * batch);
}

}  // namespace qopt
