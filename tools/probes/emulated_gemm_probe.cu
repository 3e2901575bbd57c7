// Probe (stop 41): fp32-accurate products faster than fp32 SIMT on an H100? cuBLAS 13's
// CUBLAS_COMPUTE_32F_EMULATED_16BFX9 (each fp32 operand as three bf16 values, products on bf16
// tensor cores), our own 6-product split (A = A0 + A1 + A2 in bf16, the products i + j <= 2 as
// one bf16 GEMM over 6k), and CUBLAS_COMPUTE_64F_EMULATED_FIXEDPOINT against native DGEMM, on
// the optimizers' shapes. Error: relative Frobenius distance to a float64 product of the same
// inputs.
#include <cstdio>
#include <cmath>
#include <vector>
#include <algorithm>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <cublasLt.h>
#include "probe_common.cuh"

__global__ void fill_uniform(float* a, size_t count, unsigned seed) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
        unsigned h = unsigned(i * 2654435761u ^ seed * 97u);
        h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15; h ^= h >> 11; h *= 0x27d4eb2d; h ^= h >> 15;
        a[i] = float(h & 0xffffff) / 16777216.f - 0.5f;
    }
}
__global__ void to_double(double* out, const float* in, size_t count) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) out[i] = in[i];
}
// A (rows x k, column-major, `batch` of them, stride rows*k) -> A_cat rows x 6k: column blocks
// [A0 A0 A1 A0 A1 A2] (pieces 0, 0, 1, 0, 1, 2). B (k x cols) -> B_cat 6k x cols: row blocks
// [B0; B1; B0; B2; B1; B0] (pieces 0, 1, 0, 2, 1, 0). Sum over blocks: A0B0 + A0B1 + A1B0 +
// A0B2 + A1B1 + A2B0.
__device__ void split3(float x, __nv_bfloat16* p) {
    p[0] = __float2bfloat16_rn(x);
    float r = x - __bfloat162float(p[0]);
    p[1] = __float2bfloat16_rn(r);
    r -= __bfloat162float(p[1]);
    p[2] = __float2bfloat16_rn(r);
}
__global__ void split_left(__nv_bfloat16* out, const float* a, int rows, int k, int batch) {
    const int pieces[6] = {0, 0, 1, 0, 1, 2};
    size_t total = size_t(rows) * k * batch;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
        size_t b = i / (size_t(rows) * k), col = (i / rows) % k, r = i % rows;
        __nv_bfloat16 p[3]; split3(a[i], p);
        __nv_bfloat16* o = out + b * size_t(rows) * 6 * k;
        for (int s = 0; s < 6; ++s) o[(size_t(s) * k + col) * rows + r] = p[pieces[s]];
    }
}
__global__ void split_right(__nv_bfloat16* out, const float* bm, int k, int cols, int batch) {
    const int pieces[6] = {0, 1, 0, 2, 1, 0};
    size_t total = size_t(k) * cols * batch;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
        size_t b = i / (size_t(k) * cols), col = (i / k) % cols, r = i % k;
        __nv_bfloat16 p[3]; split3(bm[i], p);
        __nv_bfloat16* o = out + b * size_t(6) * k * cols;
        for (int s = 0; s < 6; ++s) o[col * size_t(6) * k + size_t(s) * k + r] = p[pieces[s]];
    }
}

// 3xTF32: a = big + small with big = a rounded to TF32 (10 stored bits), small = a - big (exact);
// the tensor core reads small's top 11 bits. A_cat m x 3k: column blocks [small big big]; B_cat
// 3k x n: row blocks [big; small; big]; the sum is small*big + big*small + big*big (small*small,
// ~2^-22 relative, dropped).
__device__ float round_tf32(float x) {
    unsigned u = __float_as_uint(x);
    u += 0xfffu + ((u >> 13) & 1u);
    return __uint_as_float(u & 0xffffe000u);
}
__global__ void split_tf32_left(float* out, const float* a, int rows, int k, int batch) {
    size_t total = size_t(rows) * k * batch;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
        size_t b = i / (size_t(rows) * k), col = (i / rows) % k, r = i % rows;
        const float big = round_tf32(a[i]), small = a[i] - big;
        float* o = out + b * size_t(rows) * 3 * k;
        o[col * rows + r] = small; o[(size_t(k) + col) * rows + r] = big; o[(size_t(2) * k + col) * rows + r] = big;
    }
}
__global__ void split_tf32_right(float* out, const float* bm, int k, int cols, int batch) {
    size_t total = size_t(k) * cols * batch;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
        size_t b = i / (size_t(k) * cols), col = (i / k) % cols, r = i % k;
        const float big = round_tf32(bm[i]), small = bm[i] - big;
        float* o = out + b * size_t(3) * k * cols + col * size_t(3) * k;
        o[r] = big; o[size_t(k) + r] = small; o[size_t(2) * k + r] = big;
    }
}
// The first block of A_cat (A0) and of B_cat (B0) as float64, to tell the tensor core's
// accumulation error from the split's: A0*B0 has exact bf16 inputs.
__global__ void first_block_to_double(double* out, const __nv_bfloat16* cat, size_t block_count, size_t cat_stride,
                                      size_t rows, size_t ld, int batch) {
    size_t total = block_count * batch;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
        size_t b = i / block_count, j = i % block_count, col = j / rows, r = j % rows;
        out[i] = __bfloat162float(cat[b * cat_stride + col * ld + r]);
    }
}

static double rel_error(const float* d, const double* ref, size_t count) {
    std::vector<float> h(count); std::vector<double> r(count);
    CK(cudaMemcpy(h.data(), d, count * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(r.data(), ref, count * 8, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (size_t i = 0; i < count; ++i) { double e = h[i] - r[i]; num += e * e; den += r[i] * r[i]; }
    return std::sqrt(num / den);
}

template <typename F>
static double time_ms(F f, int reps = 5) {
    f(); CK(cudaDeviceSynchronize());
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) { auto t0 = clk::now(); f(); CK(cudaDeviceSynchronize()); t.push_back(ms_since(t0)); }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

// The same product through cuBLASLt (the path qopt's products take): compute type `type`, an
// emulation descriptor with `strategy`, the heuristic's first algorithm for `workspace_bytes`.
// Returns the median ms, or -1 where the heuristic offers none.
static double lt_product(cublasLtHandle_t lt, cublasComputeType_t type, int strategy, size_t workspace_bytes,
                         void* workspace, float* c, const float* a, const float* b, int m, int n, int k, int batch,
                         int* algorithms) {
    cublasLtMatmulDesc_t op; CK(cublasLtMatmulDescCreate(&op, type, CUDA_R_32F));
    cublasLtEmulationDesc_t emulation = nullptr;
    if (strategy >= 0) {
        CK(cublasLtEmulationDescCreate(&emulation));
        int32_t value = strategy;
        CK(cublasLtEmulationDescSetAttribute(emulation, CUBLASLT_EMULATION_DESC_STRATEGY, &value, sizeof value));
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR, &emulation, sizeof emulation));
    }
    cublasLtMatrixLayout_t la, lb, lc;
    CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, m, k, m)); CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, k, n, k));
    CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, m, n, m));
    const int64_t strides[3] = {int64_t(m) * k, int64_t(k) * n, int64_t(m) * n};
    cublasLtMatrixLayout_t layouts[3] = {la, lb, lc};
    for (int i = 0; i < 3; ++i) {
        CK(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
        CK(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[i], sizeof strides[i]));
    }
    cublasLtMatmulPreference_t pref; CK(cublasLtMatmulPreferenceCreate(&pref));
    CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes, sizeof workspace_bytes));
    cublasLtMatmulHeuristicResult_t result[4]; int found = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 4, result, &found);
    *algorithms = st == CUBLAS_STATUS_SUCCESS ? found : -int(st);
    double ms = -1;
    if (st == CUBLAS_STATUS_SUCCESS && found > 0) {
        const float one = 1, zero = 0;
        ms = time_ms([&] { CK(cublasLtMatmul(lt, op, &one, a, la, b, lb, &zero, c, lc, c, lc, &result[0].algo, workspace,
                                              workspace_bytes, 0)); });
    }
    cublasLtMatmulPreferenceDestroy(pref);
    for (auto l : layouts) cublasLtMatrixLayoutDestroy(l);
    cublasLtMatmulDescDestroy(op);
    if (emulation) cublasLtEmulationDescDestroy(emulation);
    return ms;
}

int main() {
    cublasHandle_t blas; CK(cublasCreate(&blas));
    cublasLtHandle_t lt; CK(cublasLtCreate(&lt));
    void* lt_workspace; const size_t big_workspace = size_t(2) << 30; CK(cudaMalloc(&lt_workspace, big_workspace));
    struct Shape { const char* name; int m, n, k, batch; };
    const Shape shapes[] = {{"SOAP/PSGD factor x matrix 12 x 3072x768x3072", 3072, 768, 3072, 12},
                            {"matrix x factor 12 x 3072x768x768", 3072, 768, 768, 12},
                            {"48 x 768^3", 768, 768, 768, 48},
                            {"12 x 3072^3", 3072, 3072, 3072, 12},
                            {"Shampoo 72 x 1024^3", 1024, 1024, 1024, 72}};
    const float one = 1, zero = 0; const double done = 1, dzero = 0;
    for (const Shape& s : shapes) {
        const size_t a_count = size_t(s.m) * s.k * s.batch, b_count = size_t(s.k) * s.n * s.batch, c_count = size_t(s.m) * s.n * s.batch;
        float *a, *b, *c; double *ad, *bd, *cd, *cd2; __nv_bfloat16 *acat, *bcat;
        CK(cudaMalloc(&a, a_count * 4)); CK(cudaMalloc(&b, b_count * 4)); CK(cudaMalloc(&c, c_count * 4));
        CK(cudaMalloc(&ad, a_count * 8)); CK(cudaMalloc(&bd, b_count * 8)); CK(cudaMalloc(&cd, c_count * 8)); CK(cudaMalloc(&cd2, c_count * 8));
        CK(cudaMalloc(&acat, a_count * 12)); CK(cudaMalloc(&bcat, b_count * 12));
        fill_uniform<<<2048, 256>>>(a, a_count, 1); fill_uniform<<<2048, 256>>>(b, b_count, 2);
        to_double<<<2048, 256>>>(ad, a, a_count); to_double<<<2048, 256>>>(bd, b, b_count);
        const double flops = 2.0 * s.m * s.n * s.k * s.batch;
        auto dgemm = [&](cublasComputeType_t type, double* out) {
            return cublasGemmStridedBatchedEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, s.m, s.n, s.k, &done, ad, CUDA_R_64F, s.m,
                                              size_t(s.m) * s.k, bd, CUDA_R_64F, s.k, size_t(s.k) * s.n, &dzero, out,
                                              CUDA_R_64F, s.m, size_t(s.m) * s.n, s.batch, type, CUBLAS_GEMM_DEFAULT);
        };
        CK(cublasSetEmulationStrategy(blas, CUBLAS_EMULATION_STRATEGY_DEFAULT));
        const double t64 = time_ms([&] { CK(dgemm(CUBLAS_COMPUTE_64F, cd)); });
        std::printf("%s\n  fp64 DGEMM %.3f ms (%.1f TFLOP/s)\n", s.name, t64, flops / t64 / 1e9);
        for (auto strategy : {CUBLAS_EMULATION_STRATEGY_DEFAULT, CUBLAS_EMULATION_STRATEGY_EAGER}) {
            CK(cublasSetEmulationStrategy(blas, strategy));
            cublasStatus_t st = dgemm(CUBLAS_COMPUTE_64F_EMULATED_FIXEDPOINT, cd2);
            CK(cudaDeviceSynchronize());
            if (st != CUBLAS_STATUS_SUCCESS) { std::printf("  fp64 emulated (strategy %d): status %d\n", int(strategy), int(st)); continue; }
            const double t = time_ms([&] { CK(dgemm(CUBLAS_COMPUTE_64F_EMULATED_FIXEDPOINT, cd2)); });
            std::vector<double> h1(c_count), h2(c_count);
            CK(cudaMemcpy(h1.data(), cd, c_count * 8, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(h2.data(), cd2, c_count * 8, cudaMemcpyDeviceToHost));
            double num = 0, den = 0; for (size_t i = 0; i < c_count; ++i) { num += (h1[i] - h2[i]) * (h1[i] - h2[i]); den += h1[i] * h1[i]; }
            std::printf("  fp64 emulated fixed-point (strategy %d): %.3f ms (%.1f TFLOP/s), rel diff to DGEMM %.2e\n", int(strategy), t, flops / t / 1e9, std::sqrt(num / den));
        }
        auto sgemm = [&](cublasComputeType_t type) {
            return cublasGemmStridedBatchedEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, s.m, s.n, s.k, &one, a, CUDA_R_32F, s.m,
                                              size_t(s.m) * s.k, b, CUDA_R_32F, s.k, size_t(s.k) * s.n, &zero, c,
                                              CUDA_R_32F, s.m, size_t(s.m) * s.n, s.batch, type, CUBLAS_GEMM_DEFAULT);
        };
        struct Mode { const char* name; cublasComputeType_t type; cublasEmulationStrategy_t strategy; };
        for (Mode mode : {Mode{"fp32", CUBLAS_COMPUTE_32F, CUBLAS_EMULATION_STRATEGY_DEFAULT},
                          Mode{"tf32", CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_EMULATION_STRATEGY_DEFAULT},
                          Mode{"bf16x9 default", CUBLAS_COMPUTE_32F_EMULATED_16BFX9, CUBLAS_EMULATION_STRATEGY_DEFAULT},
                          Mode{"bf16x9 eager", CUBLAS_COMPUTE_32F_EMULATED_16BFX9, CUBLAS_EMULATION_STRATEGY_EAGER}}) {
            CK(cublasSetEmulationStrategy(blas, mode.strategy));
            cublasStatus_t st = sgemm(mode.type);
            CK(cudaDeviceSynchronize());
            if (st != CUBLAS_STATUS_SUCCESS) { std::printf("  %s: status %d\n", mode.name, int(st)); continue; }
            const double t = time_ms([&] { CK(sgemm(mode.type)); });
            std::printf("  %-15s %.3f ms (%.1f TFLOP/s), rel error %.2e\n", mode.name, t, flops / t / 1e9, rel_error(c, cd, c_count));
        }
        CK(cublasSetEmulationStrategy(blas, CUBLAS_EMULATION_STRATEGY_DEFAULT));
        struct LtMode { const char* name; cublasComputeType_t type; int strategy; size_t workspace; };
        for (LtMode mode : {LtMode{"lt fp32 32MiB", CUBLAS_COMPUTE_32F, -1, size_t(32) << 20},
                            LtMode{"lt bf16x9 eager 32MiB", CUBLAS_COMPUTE_32F_EMULATED_16BFX9, 2, size_t(32) << 20},
                            LtMode{"lt bf16x9 eager 2GiB", CUBLAS_COMPUTE_32F_EMULATED_16BFX9, 2, big_workspace},
                            LtMode{"lt bf16x9 default 2GiB", CUBLAS_COMPUTE_32F_EMULATED_16BFX9, 0, big_workspace}}) {
            int algorithms = 0;
            const double t = lt_product(lt, mode.type, mode.strategy, mode.workspace, lt_workspace, c, a, b, s.m, s.n, s.k,
                                        s.batch, &algorithms);
            if (t < 0) std::printf("  %-24s no algorithm (%d)\n", mode.name, algorithms);
            else std::printf("  %-24s %.3f ms (%.1f TFLOP/s), rel error %.2e\n", mode.name, t, flops / t / 1e9, rel_error(c, cd, c_count));
        }
        // Our split: two passes, then one bf16 GEMM over 6k.
        auto ours = [&](bool with_split) {
            if (with_split) {
                split_left<<<2048, 256>>>(acat, a, s.m, s.k, s.batch);
                split_right<<<2048, 256>>>(bcat, b, s.k, s.n, s.batch);
            }
            CK(cublasGemmStridedBatchedEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, s.m, s.n, 6 * s.k, &one, acat, CUDA_R_16BF, s.m,
                                          size_t(s.m) * 6 * s.k, bcat, CUDA_R_16BF, 6 * s.k, size_t(6) * s.k * s.n, &zero,
                                          c, CUDA_R_32F, s.m, size_t(s.m) * s.n, s.batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        };
        const double t_all = time_ms([&] { ours(true); });
        const double t_gemm = time_ms([&] { ours(false); });
        std::printf("  own bf16x6      %.3f ms with the splits (GEMM alone %.3f ms, %.1f TFLOP/s fp32-equivalent), rel error %.2e\n",
                    t_all, t_gemm, flops / t_all / 1e9, rel_error(c, cd, c_count));
        // The accumulation alone: A0*B0 (exact bf16 inputs) on the tensor cores against float64.
        first_block_to_double<<<2048, 256>>>(ad, acat, size_t(s.m) * s.k, size_t(s.m) * 6 * s.k, s.m, s.m, s.batch);
        first_block_to_double<<<2048, 256>>>(bd, bcat, size_t(s.k) * s.n, size_t(6) * s.k * s.n, s.k, size_t(6) * s.k, s.batch);
        CK(dgemm(CUBLAS_COMPUTE_64F, cd2));
        auto first_blocks_error = [&](cublasComputeType_t type) {
            CK(cublasGemmStridedBatchedEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, s.m, s.n, s.k, &one, acat, CUDA_R_16BF, s.m,
                                          size_t(s.m) * 6 * s.k, bcat, CUDA_R_16BF, 6 * s.k, size_t(6) * s.k * s.n,
                                          &zero, c, CUDA_R_32F, s.m, size_t(s.m) * s.n, s.batch, type,
                                          CUBLAS_GEMM_DEFAULT));
            return rel_error(c, cd2, c_count);
        };
        const double bf16_accumulation = first_blocks_error(CUBLAS_COMPUTE_32F);
        std::printf("  bf16 A0*B0 (exact inputs) on tensor cores: rel error %.2e; pedantic (no tensor cores): %.2e\n",
                    bf16_accumulation, first_blocks_error(CUBLAS_COMPUTE_32F_PEDANTIC));
        // 3xTF32 as one TF32 GEMM over 3k (reuses acat/bcat's memory: 12 bytes per element each).
        float* a3 = reinterpret_cast<float*>(acat); float* b3 = reinterpret_cast<float*>(bcat);
        auto tf32x3 = [&](bool with_split) {
            if (with_split) {
                split_tf32_left<<<2048, 256>>>(a3, a, s.m, s.k, s.batch);
                split_tf32_right<<<2048, 256>>>(b3, b, s.k, s.n, s.batch);
            }
            CK(cublasGemmStridedBatchedEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, s.m, s.n, 3 * s.k, &one, a3, CUDA_R_32F, s.m,
                                          size_t(s.m) * 3 * s.k, b3, CUDA_R_32F, 3 * s.k, size_t(3) * s.k * s.n, &zero,
                                          c, CUDA_R_32F, s.m, size_t(s.m) * s.n, s.batch, CUBLAS_COMPUTE_32F_FAST_TF32,
                                          CUBLAS_GEMM_DEFAULT));
        };
        const double t3_all = time_ms([&] { tf32x3(true); });
        const double t3_gemm = time_ms([&] { tf32x3(false); });
        std::printf("  own tf32x3      %.3f ms with the splits (GEMM alone %.3f ms, %.1f TFLOP/s fp32-equivalent), rel error %.2e\n",
                    t3_all, t3_gemm, flops / t3_all / 1e9, rel_error(c, cd, c_count));
        for (void* p : {(void*)a, (void*)b, (void*)c, (void*)ad, (void*)bd, (void*)cd, (void*)cd2, (void*)acat, (void*)bcat}) cudaFree(p);
    }
    return 0;
}
