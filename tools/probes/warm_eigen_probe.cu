// Probe (stop 41): could Shampoo's refresh decompose B = V^T L V, with V the eigenbasis kept from
// the last refresh, faster than L itself? B is nearly diagonal when L drifted little, and Jacobi
// methods converge in few sweeps there; the batched syev (tridiagonalization) does not care.
// Factors: L_old = U diag(lambda) U^T (U a random orthogonal basis, lambda from 1 down to 1e-6,
// log-spaced), L_new = L_old + c G G^T with ||c G G^T||_F = drift * ||L_old||_F; V from syev of
// L_old. Times: syevBatched on L_new and on B; syevj one matrix at a time on B (1 stream, and on
// 8 threads each with its own handle and stream), with its sweeps, and the error of W = V U_B.
#include <algorithm>
#include <cstdio>
#include <cmath>
#include <thread>
#include <vector>
#include <cublas_v2.h>
#include <cusolverDn.h>
#include "probe_common.cuh"

// A symmetric matrix of hash values in [-0.5, 0.5) (its eigenvectors are a random-looking basis).
__global__ void fill_symmetric(float* a, int n, int batch, unsigned seed, bool symmetric) {
    size_t total = size_t(n) * n * batch;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
        size_t b = i / (size_t(n) * n), r = (i / n) % n, c = i % n;
        size_t lo = symmetric && r > c ? c : r, hi = symmetric && r > c ? r : c;
        unsigned h = unsigned(lo * 2654435761u ^ hi * 40503u ^ b * 9973u ^ seed);
        h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15; h ^= h >> 11; h *= 0x27d4eb2d; h ^= h >> 15;
        a[i] = float(h & 0xffff) / 65536.f - 0.5f;
    }
}

// column j of every matrix times lambda_j = 10^(-6 j / n)
__global__ void scale_columns(float* out, const float* in, int n, int batch) {
    size_t total = size_t(n) * n * batch;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
        int j = int((i / n) % n);
        out[i] = in[i] * powf(10.f, -6.f * j / n);
    }
}

static double frob(const float* d, size_t count) {
    std::vector<float> h(count);
    CK(cudaMemcpy(h.data(), d, count * 4, cudaMemcpyDeviceToHost));
    double s = 0;
    for (float v : h) s += double(v) * v;
    return std::sqrt(s);
}

struct Jacobi {
    cusolverDnHandle_t handle; syevjInfo_t params; cudaStream_t stream; float* work; int lwork; int* info;
};

int main() {
    cublasHandle_t blas; CK(cublasCreate(&blas));
    cusolverDnHandle_t solver; CK(cusolverDnCreate(&solver));
    cusolverDnParams_t xparams; CK(cusolverDnCreateParams(&xparams));
    const float one = 1, zero = 0;
    for (auto [n, batch] : {std::pair{768, 32}, std::pair{1024, 24}}) {
        const size_t matrix = size_t(n) * n;
        float *u, *scaled, *l_old, *l_new, *g, *v, *b, *scratch, *w, *w_ref, *vb, *tmp;
        for (float** p : {&u, &scaled, &l_old, &l_new, &g, &v, &b, &scratch, &vb, &tmp}) CK(cudaMalloc(p, matrix * batch * 4));
        CK(cudaMalloc(&w, size_t(n) * batch * 4)); CK(cudaMalloc(&w_ref, size_t(n) * batch * 4));
        int* infos; CK(cudaMalloc(&infos, batch * 4));
        size_t dbytes = 0, hbytes = 0;
        CK(cusolverDnXsyevBatched_bufferSize(solver, xparams, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_32F,
                                             scratch, n, CUDA_R_32F, w, CUDA_R_32F, &dbytes, &hbytes, batch));
        void* dwork; CK(cudaMalloc(&dwork, dbytes + 1)); std::vector<char> hwork(hbytes + 1);
        auto syev_batched = [&](float* a_inout, float* values) {
            CK(cusolverDnXsyevBatched(solver, xparams, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_32F, a_inout,
                                      n, CUDA_R_32F, values, CUDA_R_32F, dwork, dbytes, hwork.data(), hbytes, infos, batch));
        };
        // U: eigenvectors of a random symmetric matrix.
        fill_symmetric<<<1024, 256>>>(u, n, batch, 5, true);
        syev_batched(u, w);
        scale_columns<<<1024, 256>>>(scaled, u, n, batch);
        CK(cublasSgemmStridedBatched(blas, CUBLAS_OP_N, CUBLAS_OP_T, n, n, n, &one, scaled, n, matrix, u, n, matrix, &zero,
                                     l_old, n, matrix, batch));
        fill_symmetric<<<1024, 256>>>(tmp, n, batch, 77, false);
        CK(cublasSgemmStridedBatched(blas, CUBLAS_OP_N, CUBLAS_OP_T, n, n, n, &one, tmp, n, matrix, tmp, n, matrix, &zero, g,
                                     n, matrix, batch));
        const double l_norm = frob(l_old, matrix * batch), g_norm = frob(g, matrix * batch);
        // V: the basis kept from the last refresh (syev of L_old, fp32).
        CK(cudaMemcpy(v, l_old, matrix * batch * 4, cudaMemcpyDeviceToDevice));
        syev_batched(v, w);
        CK(cudaDeviceSynchronize());
        for (double drift : {1e-3, 1e-2, 1e-1}) {
            const float c = float(drift * l_norm / g_norm);
            CK(cudaMemcpy(l_new, l_old, matrix * batch * 4, cudaMemcpyDeviceToDevice));
            CK(cublasSaxpy(blas, int(matrix * batch), &c, g, 1, l_new, 1));
            // B = V^T L_new V
            CK(cublasSgemmStridedBatched(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, v, n, matrix, l_new, n, matrix, &zero,
                                         tmp, n, matrix, batch));
            CK(cublasSgemmStridedBatched(blas, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, tmp, n, matrix, v, n, matrix, &zero, b,
                                         n, matrix, batch));
            CK(cudaDeviceSynchronize());
            // off-diagonal share of B
            {
                std::vector<float> h(matrix);
                CK(cudaMemcpy(h.data(), b, matrix * 4, cudaMemcpyDeviceToHost));
                double off = 0, all = 0;
                for (int r = 0; r < n; ++r) for (int cc = 0; cc < n; ++cc) { double x = h[size_t(cc) * n + r]; all += x * x; if (r != cc) off += x * x; }
                std::printf("n %d drift %.0e: ||offdiag B||_F / ||B||_F = %.2e\n", n, drift, std::sqrt(off / all));
            }
            for (int rep = 0; rep < 2; ++rep) {
                CK(cudaMemcpy(scratch, l_new, matrix * batch * 4, cudaMemcpyDeviceToDevice));
                CK(cudaDeviceSynchronize());
                auto t0 = clk::now();
                syev_batched(scratch, w_ref);
                CK(cudaDeviceSynchronize());
                const double cold = ms_since(t0);
                CK(cudaMemcpy(scratch, b, matrix * batch * 4, cudaMemcpyDeviceToDevice));
                CK(cudaDeviceSynchronize());
                t0 = clk::now();
                syev_batched(scratch, w);
                CK(cudaDeviceSynchronize());
                if (rep) std::printf("  syevBatched %d x %d^2: L_new %.1f ms, B %.1f ms\n", batch, n, cold, ms_since(t0));
            }
            // syevj per matrix on B, on T threads (own handle + stream each).
            for (int threads : {1, 8, -8}) {
                const bool cold = threads < 0;
                if (cold && drift != 1e-2) continue;
                threads = std::abs(threads);
                std::vector<Jacobi> js(threads);
                for (Jacobi& j : js) {
                    CK(cusolverDnCreate(&j.handle)); CK(cudaStreamCreateWithFlags(&j.stream, cudaStreamNonBlocking));
                    CK(cusolverDnSetStream(j.handle, j.stream)); CK(cusolverDnCreateSyevjInfo(&j.params));
                    CK(cusolverDnXsyevjSetMaxSweeps(j.params, 100));
                    CK(cusolverDnSsyevj_bufferSize(j.handle, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, scratch, n, w,
                                                   &j.lwork, j.params));
                    CK(cudaMalloc(&j.work, size_t(j.lwork) * 4 + 4)); CK(cudaMalloc(&j.info, 4));
                }
                CK(cudaMemcpy(scratch, cold ? l_new : b, matrix * batch * 4, cudaMemcpyDeviceToDevice));
                CK(cudaDeviceSynchronize());
                std::vector<int> sweeps(batch);
                std::vector<double> host_ms(threads, 0);
                auto t0 = clk::now();
                auto run = [&](int t) {
                    Jacobi& j = js[t];
                    for (int k = t; k < batch; k += threads) {
                        auto h0 = clk::now();
                        CK(cusolverDnSsyevj(j.handle, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, scratch + k * matrix, n,
                                            w + size_t(k) * n, j.work, j.lwork, j.info, j.params));
                        host_ms[t] += ms_since(h0);
                        CK(cudaStreamSynchronize(j.stream));
                        int executed = 0;
                        CK(cusolverDnXsyevjGetSweeps(j.handle, j.params, &executed));
                        sweeps[k] = executed;
                    }
                };
                std::vector<std::thread> pool;
                for (int t = 0; t < threads; ++t) pool.emplace_back(run, t);
                for (std::thread& th : pool) th.join();
                const double ms = ms_since(t0);
                int smin = 1000, smax = 0; double smean = 0;
                for (int s : sweeps) { smin = std::min(smin, s); smax = std::max(smax, s); smean += s; }
                std::printf(cold ? "  syevj on L_new (cold), %d threads" : "  syevj on B, %d threads: %.1f ms for %d (%.2f ms each; host in calls %.1f ms on thread 0), sweeps %d..%d mean %.1f\n",
                            threads, ms, batch, ms / batch, host_ms[0], smin, smax, smean / batch);
                // Quality: W = V U_B; residual ||L_new W - W diag(w)||_F / ||L_new||_F, eigenvalues vs syev(L_new).
                if (threads == 8 && !cold) {
                    CK(cublasSgemmStridedBatched(blas, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, v, n, matrix, scratch, n, matrix,
                                                 &zero, vb, n, matrix, batch));
                    CK(cublasSgemmStridedBatched(blas, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, l_new, n, matrix, vb, n, matrix,
                                                 &zero, tmp, n, matrix, batch));
                    std::vector<float> hw(size_t(n) * batch), hr(size_t(n) * batch), hv(matrix), ht(matrix);
                    CK(cudaMemcpy(hw.data(), w, hw.size() * 4, cudaMemcpyDeviceToHost));
                    CK(cudaMemcpy(hr.data(), w_ref, hr.size() * 4, cudaMemcpyDeviceToHost));
                    CK(cudaMemcpy(hv.data(), vb, matrix * 4, cudaMemcpyDeviceToHost));
                    CK(cudaMemcpy(ht.data(), tmp, matrix * 4, cudaMemcpyDeviceToHost));
                    double res = 0;
                    for (int cc = 0; cc < n; ++cc) for (int r = 0; r < n; ++r) { double d = ht[size_t(cc) * n + r] - double(hv[size_t(cc) * n + r]) * hw[cc]; res += d * d; }
                    double werr = 0, wmax = 0;
                    for (int k = 0; k < batch; ++k) {
                        std::vector<float> a(hw.begin() + size_t(k) * n, hw.begin() + size_t(k + 1) * n);
                        std::sort(a.begin(), a.end());
                        for (int i = 0; i < n; ++i) { werr = std::max(werr, double(std::fabs(a[i] - hr[size_t(k) * n + i]))); wmax = std::max(wmax, double(std::fabs(hr[size_t(k) * n + i]))); }
                    }
                    std::printf("  quality: residual (matrix 0) %.2e of ||L||_F %.3e; max |eigenvalue - syev's| %.2e of max %.3e\n",
                                std::sqrt(res), frob(l_new, matrix), werr, wmax);
                }
                for (Jacobi& j : js) { cudaFree(j.work); cudaFree(j.info); cusolverDnDestroySyevjInfo(j.params); cusolverDnDestroy(j.handle); cudaStreamDestroy(j.stream); }
            }
            // syevj cold on L_new, 8 threads, for comparison (first 8 matrices only).
        }
        for (float* p : {u, scaled, l_old, l_new, g, v, b, scratch, vb, tmp, w, w_ref}) cudaFree(p);
        cudaFree(infos); cudaFree(dwork);
    }
    return 0;
}
