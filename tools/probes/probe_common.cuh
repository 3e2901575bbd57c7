// What the standalone GPU probes in this folder share: an error check, a wall clock in ms, and a
// batch of symmetric, diagonally dominant (so positive definite) test matrices.
#pragma once
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
#define CK(x) do { auto e = (x); if (e != 0) { std::printf("error %d at %s:%d\n", int(e), __FILE__, __LINE__); std::exit(1);} } while (0)
using clk = std::chrono::steady_clock;
inline double ms_since(clk::time_point t) { return std::chrono::duration<double, std::milli>(clk::now() - t).count(); }

// a[b][r][c] = n on the diagonal plus a hash of (min(r, c), max(r, c), b, seed) in [-0.5, 0.5).
__global__ void fill_spd(float* a, int n, int batch, unsigned seed) {
    size_t total = size_t(n) * n * batch;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
        size_t b = i / (size_t(n) * n), r = (i / n) % n, c = i % n;
        size_t lo = r < c ? r : c, hi = r < c ? c : r;
        unsigned h = unsigned(lo * 2654435761u ^ hi * 40503u ^ b * 9973u ^ seed);
        h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15;
        a[i] = (r == c ? float(n) : 0.f) + (float(h & 0xffff) / 65536.f - 0.5f);
    }
}
