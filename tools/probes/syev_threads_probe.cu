// Probe 3: cuSOLVER's batched syev holds its calling thread. Does a batch split into slices, each
// issued from its own host thread (own handle, own non-blocking stream), run concurrently?
#include <cstdio>
#include <chrono>
#include <thread>
#include <vector>
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include "probe_common.cuh"

struct Slice {
    cusolverDnHandle_t handle; cusolverDnParams_t params; cudaStream_t stream;
    void* dwork = nullptr; size_t dbytes = 0; std::vector<char> hwork; int* info = nullptr;
};

int main() {
    for (auto [n, batch] : {std::pair{768, 168}, std::pair{1024, 72}}) {
        const size_t matrix = size_t(n) * n;
        float *src, *a, *w;
        CK(cudaMalloc(&src, matrix * batch * 4)); CK(cudaMalloc(&a, matrix * batch * 4)); CK(cudaMalloc(&w, size_t(n) * batch * 4));
        fill_spd<<<1024, 256>>>(src, n, batch, 11);
        CK(cudaDeviceSynchronize());
        for (int threads : {1, 2, 3, 4, 6, 8}) {
            std::vector<Slice> slices(threads);
            std::vector<int> first(threads + 1);
            for (int t = 0; t <= threads; ++t) first[t] = int(size_t(batch) * t / threads);
            for (int t = 0; t < threads; ++t) {
                Slice& s = slices[t];
                CK(cusolverDnCreate(&s.handle)); CK(cusolverDnCreateParams(&s.params));
                CK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking)); CK(cusolverDnSetStream(s.handle, s.stream));
                const int count = first[t + 1] - first[t];
                size_t hbytes = 0;
                CK(cusolverDnXsyevBatched_bufferSize(s.handle, s.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                                     CUDA_R_32F, a, n, CUDA_R_32F, w, CUDA_R_32F, &s.dbytes, &hbytes, count));
                CK(cudaMalloc(&s.dwork, s.dbytes + 1)); s.hwork.resize(hbytes + 1); CK(cudaMalloc(&s.info, count * 4));
            }
            auto run = [&](int t) {
                Slice& s = slices[t];
                const int count = first[t + 1] - first[t];
                float* at = a + matrix * first[t];
                CK(cudaMemcpyAsync(at, src + matrix * first[t], matrix * count * 4, cudaMemcpyDeviceToDevice, s.stream));
                CK(cusolverDnXsyevBatched(s.handle, s.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_32F,
                                          at, n, CUDA_R_32F, w + size_t(n) * first[t], CUDA_R_32F, s.dwork, s.dbytes,
                                          s.hwork.data(), s.hwork.size() - 1, s.info, count));
                CK(cudaStreamSynchronize(s.stream));
            };
            for (int rep = 0; rep < 3; ++rep) {
                CK(cudaDeviceSynchronize());
                auto t0 = clk::now();
                std::vector<std::thread> pool;
                for (int t = 0; t < threads; ++t) pool.emplace_back(run, t);
                for (std::thread& th : pool) th.join();
                const double ms = ms_since(t0);
                if (rep > 0) std::printf("%d x %d^2 on %d threads: %.1f ms\n", batch, n, threads, ms);
            }
            // Same slices from one thread (the split that was tried before), for comparison.
            if (threads > 1) {
                CK(cudaDeviceSynchronize());
                auto t0 = clk::now();
                for (int t = 0; t < threads; ++t) run(t);
                std::printf("%d x %d^2 in %d slices from one thread: %.1f ms\n", batch, n, threads, ms_since(t0));
            }
            for (Slice& s : slices) { cudaFree(s.dwork); cudaFree(s.info); cusolverDnDestroy(s.handle); cudaStreamDestroy(s.stream); }
        }
        cudaFree(src); cudaFree(a); cudaFree(w);
    }
    // Shampoo's refresh on gpt2-124m: both sizes at once, each split into S slices, all on threads.
    {
        struct Part { int n, first, count; Slice s; };
        const int sizes[2] = {768, 1024}, batches[2] = {168, 72};
        float *src[2], *a[2], *w[2];
        for (int i = 0; i < 2; ++i) {
            const size_t matrix = size_t(sizes[i]) * sizes[i];
            CK(cudaMalloc(&src[i], matrix * batches[i] * 4)); CK(cudaMalloc(&a[i], matrix * batches[i] * 4));
            CK(cudaMalloc(&w[i], size_t(sizes[i]) * batches[i] * 4));
            fill_spd<<<1024, 256>>>(src[i], sizes[i], batches[i], 13 + i);
        }
        CK(cudaDeviceSynchronize());
        for (int per_size : {1, 2, 4}) {
            std::vector<Part> parts;
            for (int i = 0; i < 2; ++i)
                for (int t = 0; t < per_size; ++t) {
                    Part p; p.n = i; p.first = int(size_t(batches[i]) * t / per_size);
                    p.count = int(size_t(batches[i]) * (t + 1) / per_size) - p.first;
                    Slice& s = p.s; const int n = sizes[i];
                    CK(cusolverDnCreate(&s.handle)); CK(cusolverDnCreateParams(&s.params));
                    CK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking)); CK(cusolverDnSetStream(s.handle, s.stream));
                    size_t hbytes = 0;
                    CK(cusolverDnXsyevBatched_bufferSize(s.handle, s.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                                         CUDA_R_32F, a[i], n, CUDA_R_32F, w[i], CUDA_R_32F, &s.dbytes, &hbytes, p.count));
                    CK(cudaMalloc(&s.dwork, s.dbytes + 1)); s.hwork.resize(hbytes + 1); CK(cudaMalloc(&s.info, p.count * 4));
                    parts.push_back(std::move(p));
                }
            auto run = [&](Part& p) {
                const int i = p.n, n = sizes[i]; const size_t matrix = size_t(n) * n; Slice& s = p.s;
                float* at = a[i] + matrix * p.first;
                CK(cudaMemcpyAsync(at, src[i] + matrix * p.first, matrix * p.count * 4, cudaMemcpyDeviceToDevice, s.stream));
                CK(cusolverDnXsyevBatched(s.handle, s.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_32F,
                                          at, n, CUDA_R_32F, w[i] + size_t(n) * p.first, CUDA_R_32F, s.dwork, s.dbytes,
                                          s.hwork.data(), s.hwork.size() - 1, s.info, p.count));
                CK(cudaStreamSynchronize(s.stream));
            };
            for (int rep = 0; rep < 3; ++rep) {
                CK(cudaDeviceSynchronize());
                auto t0 = clk::now();
                std::vector<std::thread> pool;
                for (Part& p : parts) pool.emplace_back(run, std::ref(p));
                for (std::thread& th : pool) th.join();
                if (rep > 0) std::printf("168 x 768^2 and 72 x 1024^2 together, %d slices each, all on threads: %.1f ms\n", per_size, ms_since(t0));
            }
            for (Part& p : parts) { cudaFree(p.s.dwork); cudaFree(p.s.info); cusolverDnDestroy(p.s.handle); cudaStreamDestroy(p.s.stream); }
        }
    }
    return 0;
}
