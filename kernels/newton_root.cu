// Inverse matrix roots by the coupled inverse Newton iteration on the GPU, a batch at a time:
// Distributed Shampoo's matrix_inverse_root_newton (CoupledNewtonConfig), matmul-only. The CPU
// reference is coupled_newton_inverse_root (optim/dense.hpp), which states the iteration; here
// every product is one strided-batched fp32 GEMM over the batch (batched_matmul_f32_gpu), and the
// element-wise steps and each matrix's distance max |M - I| are one kernel each.
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "kernels/block_reduce.cuh"
#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

namespace qopt {

namespace {

constexpr int kThreads = 256;

// One block per matrix: norms[b] = ||a_b + eps I||_F (in double, a fixed order per block).
__global__ void ridge_norms_kernel(double* norms, const float* a, int n, double eps) {
    const int64_t nn = int64_t(n) * n;
    const float* ab = a + blockIdx.x * nn;
    double sum = 0;
    for (int64_t i = threadIdx.x; i < nn; i += blockDim.x) {
        const double v = double(ab[i]) + (i / n == i % n ? eps : 0.0);
        sum += v * v;
    }
    sum = block_reduce(sum, Add{});
    if (threadIdx.x == 0) norms[blockIdx.x] = std::sqrt(sum);
}

// z = (root + 1) / (2 norm):  X = z^(1/root) I,  M = z (a + eps I).
__global__ void newton_start_kernel(float* x, float* m, const float* a, const double* norms, int n, int root,
                                    double eps) {
    const int b = blockIdx.y;
    const int64_t nn = int64_t(n) * n;
    const double z = (root + 1) / (2 * norms[b]);
    const float x_diagonal = float(std::pow(z, 1.0 / root));
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nn; i += int64_t(gridDim.x) * blockDim.x) {
        const bool diagonal = i / n == i % n;
        x[b * nn + i] = diagonal ? x_diagonal : 0.0f;
        m[b * nn + i] = float(z * (double(a[b * nn + i]) + (diagonal ? eps : 0.0)));
    }
}

// step = alpha M + (1 - alpha) I.
__global__ void newton_step_matrix_kernel(float* step, const float* m, int n, float alpha, int64_t total) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t within = i % (int64_t(n) * n);
        step[i] = alpha * m[i] + (within / n == within % n ? 1.0f - alpha : 0.0f);
    }
}

// One block per matrix: distance[b] = max |M_b - I|, NaN where an entry is NaN (Max keeps it:
// the host then reads the matrix as not converged).
__global__ void distance_to_identity_kernel(float* distance, const float* m, int n) {
    const int64_t nn = int64_t(n) * n;
    const float* mb = m + blockIdx.x * nn;
    float largest = 0;
    for (int64_t i = threadIdx.x; i < nn; i += blockDim.x)
        largest = Max{}(largest, fabsf(mb[i] - (i / n == i % n ? 1.0f : 0.0f)));
    largest = block_reduce(largest, Max{});
    if (threadIdx.x == 0) distance[blockIdx.x] = largest;
}

}  // namespace

NewtonBatchReport coupled_newton_inverse_root_batched_gpu(float* x, const float* a, int n, int batch, int root,
                                                          double eps, int max_iterations, double tolerance,
                                                          float* scratch, bool tf32) {
    QOPT_CHECK(root >= 1 && n >= 1 && batch >= 1, "coupled Newton: root, n and batch must be positive");
    const int64_t nn = int64_t(n) * n, total = nn * batch;
    // scratch: M, three rotating product buffers and X's alternate.
    float* m = scratch;
    float* rotation[3] = {scratch + total, scratch + 2 * total, scratch + 3 * total};
    float* x_alternate = scratch + 4 * total;
    float* x_now = x;
    DeviceBuffer<double> norms{size_t(batch)};
    DeviceBuffer<float> distance{size_t(batch)};
    const unsigned blocks = unsigned(std::min<int64_t>((nn + kThreads - 1) / kThreads, 1024));
    ridge_norms_kernel<<<batch, kThreads>>>(norms.data(), a, n, eps);
    CUDA_CHECK_LAUNCH();
    newton_start_kernel<<<dim3(blocks, unsigned(batch)), kThreads>>>(x_now, m, a, norms.data(), n, root, eps);
    CUDA_CHECK_LAUNCH();
    auto product = [&](float* out, const float* left, const float* right) {
        batched_matmul_f32_gpu(out, out, left, false, right, false, n, n, n, 1.0f, 0.0f, batch, nn, nn, nn, tf32);
    };
    // Every matrix's distance; the loop goes on while any is above the tolerance (or not finite).
    auto worst_distance = [&](int* within) {
        distance_to_identity_kernel<<<batch, kThreads>>>(distance.data(), m, n);
        CUDA_CHECK_LAUNCH();
        const std::vector<float> host = distance.download();
        float worst = 0;
        *within = 0;
        for (float d : host) {
            worst = std::isfinite(d) ? std::max(worst, d) : INFINITY;
            *within += d <= tolerance;  // false for NaN
        }
        return worst;
    };
    NewtonBatchReport report;
    float worst = worst_distance(&report.converged);
    const float alpha = float(-1.0 / root);
    const int64_t grid = std::min<int64_t>((total + kThreads - 1) / kThreads, 4096);
    while (worst > tolerance && report.iterations < max_iterations) {
        ++report.iterations;
        float* step = rotation[0];
        newton_step_matrix_kernel<<<unsigned(grid), kThreads>>>(step, m, n, alpha, total);
        CUDA_CHECK_LAUNCH();
        product(x_alternate, x_now, step);  // X <- X M'
        std::swap(x_now, x_alternate);
        // step^root by repeated squaring over the three rotating buffers: base, power, spare.
        float *base = step, *power = rotation[1], *spare = rotation[2];
        bool have_power = false;
        for (int e = root; e > 0; e >>= 1) {
            if (e & 1) {
                if (!have_power) {
                    CUDA_CHECK(cudaMemcpyAsync(power, base, size_t(total) * sizeof(float), cudaMemcpyDeviceToDevice));
                    have_power = true;
                } else {
                    product(spare, power, base);
                    std::swap(power, spare);
                }
            }
            if (e > 1) {
                product(spare, base, base);
                std::swap(base, spare);
            }
        }
        product(spare, power, m);  // M <- M'^root M
        // M's old buffer joins the rotation in place of the one that now holds M.
        float* old_m = m;
        m = spare;
        for (float*& r : rotation)
            if (r == spare) r = old_m;
        worst = worst_distance(&report.converged);
    }
    if (x_now != x) CUDA_CHECK(cudaMemcpy(x, x_now, size_t(total) * sizeof(float), cudaMemcpyDeviceToDevice));
    return report;
}

}  // namespace qopt
