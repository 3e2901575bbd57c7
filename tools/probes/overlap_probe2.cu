// Probe 2: how much of a side stream's work hides behind bf16 training GEMMs, by kind of work and
// stream priority. Side work: (a) cuSOLVER batched syev 168 x 768^2 (Shampoo's refresh), (b) batched
// float64 GEMMs 12 x 3072^3 (SOAP's Cholesky QR Grams), (c) batched fp32 GEMMs 12 x 3072^2 x 3072
// (SOAP's power iteration). Each side job runs from its own thread on a non-blocking stream of
// the given priority while 200 bf16 GEMMs (32768 x 3072 x 768) run on another.
#include <cstdio>
#include <chrono>
#include <functional>
#include <thread>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <cusolverDn.h>
#include "probe_common.cuh"

int main() {
    int least = 0, greatest = 0;
    CK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    std::printf("stream priorities: least %d greatest %d\n", least, greatest);
    cudaStream_t s_gemm;
    CK(cudaStreamCreateWithFlags(&s_gemm, cudaStreamNonBlocking));
    cudaStream_t side[2];
    CK(cudaStreamCreateWithPriority(&side[0], cudaStreamNonBlocking, least));
    CK(cudaStreamCreateWithPriority(&side[1], cudaStreamNonBlocking, greatest));
    cublasHandle_t blas; CK(cublasCreate(&blas)); CK(cublasSetStream(blas, s_gemm));
    cublasHandle_t side_blas; CK(cublasCreate(&side_blas));
    cusolverDnHandle_t solver; cusolverDnParams_t params;
    CK(cusolverDnCreate(&solver)); CK(cusolverDnCreateParams(&params));
    const int M = 32768, N = 3072, K = 768;
    __nv_bfloat16 *A, *B; float* C;
    CK(cudaMalloc(&A, size_t(M) * K * 2)); CK(cudaMalloc(&B, size_t(N) * K * 2)); CK(cudaMalloc(&C, size_t(M) * N * 4));
    CK(cudaMemset(A, 0, size_t(M) * K * 2)); CK(cudaMemset(B, 0, size_t(N) * K * 2));
    const float one = 1, zero = 0;
    const double done = 1, dzero = 0;
    auto gemm = [&] {
        CK(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, B, CUDA_R_16BF, N, A, CUDA_R_16BF, K, &zero, C,
                        CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    };
    for (int i = 0; i < 5; ++i) gemm();
    CK(cudaStreamSynchronize(s_gemm));
    cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    CK(cudaEventRecord(e0, s_gemm)); for (int i = 0; i < 50; ++i) gemm(); CK(cudaEventRecord(e1, s_gemm));
    CK(cudaEventSynchronize(e1)); float g_ms; CK(cudaEventElapsedTime(&g_ms, e0, e1)); g_ms /= 50;
    std::printf("bf16 gemm alone: %.3f ms each, %.0f TFLOP/s\n", g_ms, 2.0 * M * N * K / (g_ms * 1e-3) / 1e12);

    // Side jobs.
    const int n_eig = 768, b_eig = 168, n_big = 3072, b_big = 12;
    float *eig_src, *eig_a, *eig_w; int* info;
    CK(cudaMalloc(&eig_src, size_t(n_eig) * n_eig * b_eig * 4)); CK(cudaMalloc(&eig_a, size_t(n_eig) * n_eig * b_eig * 4));
    CK(cudaMalloc(&eig_w, size_t(n_eig) * b_eig * 4)); CK(cudaMalloc(&info, b_eig * 4));
    fill_spd<<<1024, 256>>>(eig_src, n_eig, b_eig, 7);
    size_t dbytes = 0, hbytes = 0;
    CK(cusolverDnXsyevBatched_bufferSize(solver, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n_eig,
                                         CUDA_R_32F, eig_a, n_eig, CUDA_R_32F, eig_w, CUDA_R_32F, &dbytes, &hbytes, b_eig));
    void* dwork; CK(cudaMalloc(&dwork, dbytes + 1));
    std::vector<char> hwork(hbytes + 1);
    double *dx, *dy; float *fx, *fy;
    const size_t big = size_t(n_big) * n_big * b_big;
    CK(cudaMalloc(&dx, big * 8)); CK(cudaMalloc(&dy, big * 8)); CK(cudaMemset(dx, 0, big * 8));
    CK(cudaMalloc(&fx, big * 4)); CK(cudaMalloc(&fy, big * 4)); CK(cudaMemset(fx, 0, big * 4));
    const long long stride = (long long)n_big * n_big;
    struct Job { const char* name; std::function<void(cudaStream_t)> run; };
    std::vector<Job> jobs = {
        {"syev 168 x 768^2", [&](cudaStream_t s) {
             CK(cusolverDnSetStream(solver, s));
             CK(cudaMemcpyAsync(eig_a, eig_src, size_t(n_eig) * n_eig * b_eig * 4, cudaMemcpyDeviceToDevice, s));
             CK(cusolverDnXsyevBatched(solver, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n_eig, CUDA_R_32F,
                                       eig_a, n_eig, CUDA_R_32F, eig_w, CUDA_R_32F, dwork, dbytes, hwork.data(), hbytes,
                                       info, b_eig));
         }},
        {"8 x DGEMM 12 x 3072^3", [&](cudaStream_t s) {
             CK(cublasSetStream(side_blas, s));
             for (int r = 0; r < 8; ++r)
                 CK(cublasDgemmStridedBatched(side_blas, CUBLAS_OP_N, CUBLAS_OP_T, n_big, n_big, n_big, &done, dx, n_big,
                                              stride, dx, n_big, stride, &dzero, dy, n_big, stride, b_big));
         }},
        {"8 x SGEMM 12 x 3072^3", [&](cudaStream_t s) {
             CK(cublasSetStream(side_blas, s));
             for (int r = 0; r < 8; ++r)
                 CK(cublasSgemmStridedBatched(side_blas, CUBLAS_OP_N, CUBLAS_OP_N, n_big, n_big, n_big, &one, fx, n_big,
                                              stride, fx, n_big, stride, &zero, fy, n_big, stride, b_big));
         }},
    };
    for (Job& job : jobs) {
        job.run(side[0]); CK(cudaDeviceSynchronize());
        auto t = clk::now(); job.run(side[0]); CK(cudaStreamSynchronize(side[0]));
        const double alone = ms_since(t);
        std::printf("%s alone: %.1f ms\n", job.name, alone);
        for (int p = 0; p < 2; ++p) {
            CK(cudaDeviceSynchronize());
            const int gemms = int(1.5 * alone / g_ms) + 1;
            auto t0 = clk::now();
            double side_done = 0;
            std::thread th([&] { job.run(side[p]); CK(cudaStreamSynchronize(side[p])); side_done = ms_since(t0); });
            CK(cudaEventRecord(e0, s_gemm));
            for (int i = 0; i < gemms; ++i) gemm();
            CK(cudaEventRecord(e1, s_gemm));
            th.join();
            CK(cudaStreamSynchronize(s_gemm));
            const double all_done = ms_since(t0);
            float gm; CK(cudaEventElapsedTime(&gm, e0, e1));
            std::printf("  beside %d gemms, %s priority: side done %.1f ms, gemms %.1f ms (alone %.1f: x%.3f), "
                        "all done %.1f ms vs serial %.1f (hidden %.0f%% of the side job)\n",
                        gemms, p ? "high" : "low", side_done, gm, gemms * g_ms, gm / (gemms * g_ms), all_done,
                        alone + gemms * g_ms, 100.0 * (alone + gemms * g_ms - all_done) / alone);
        }
    }
    return 0;
}
