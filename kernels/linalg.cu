// Dense linear algebra on the GPU for the preconditioned optimizers (Shampoo, SOAP, PSGD) and
// GPTQ. For the optimizers, over batches of row-major fp32 matrices: the symmetric
// eigendecomposition (cuSOLVER's batched syev), the Q factor of a QR (Cholesky QR in float64:
// batched GEMMs, Cholesky factorizations and triangular solves; or Householder, cuSOLVER geqrf
// + orgqr, one matrix per worker stream), triangular solves (cuBLAS batched trsm) and products
// with upper-triangular matrices (strided-batched cuBLASLt GEMMs over the triangle's blocks,
// strided_matmul_f32_gpu in kernels/matmul.cu); CPU references in optim/dense.hpp
// (symmetric_eigen, householder_q, solve_upper_right), checked against these in
// tests/test_gpu_optimizers.cpp. For GPTQ: the Cholesky factor of the inverse Hessian (float64
// potrf, potri, potrf; reference: quant/gptq.cpp, checked in tests/test_ptq.cpp). This file owns
// the cuSOLVER and cuBLAS handles and their workspaces.
//
// Row-major X [r, c] is column-major X^T, which is how the row-major matrices are handed to
// the column-major libraries: a symmetric matrix needs no change, a QR input is transposed
// first, and a triangular solve with row-major upper U is one with column-major lower U^T.
//
// Why these routines (measured on an H100, fp32): the batched syev takes 1.1 ms per 768 x 768
// and 2.8 ms per 1024 x 1024 matrix, 4-7x faster than syevd one at a time (7.6 / 10.6 ms)
// and 30x faster than Jacobi (syevj); a call is latency-bound (12, 48 and 168 matrices of 768^2
// take 57, 61 and 156 ms: `bench --linalg`), so callers batch all matrices of one size into one
// call; independent batched calls on separate streams issued from one thread did not overlap
// (measured: no gain; the call holds its thread, see docs/optimizer-speed.md). geqrf + orgqr take 3.1 ms (768)
// and 4.5 ms (1024) one at a time, latency bound: on 4 worker streams 1.4 / 2.0 ms each
// (8.8 ms for 3072; more streams do not help). So up to 4096^2 the QR is a Cholesky QR over the
// whole batch, which is work-bound (see kCholeskyQrMax).
#include <cublas_v2.h>
#include <cusolverDn.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels/block_reduce.cuh"
#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

namespace qopt {

namespace {

#define SOLVER_CHECK(call)                                                                          \
    do {                                                                                            \
        cusolverStatus_t status_ = (call);                                                          \
        if (status_ != CUSOLVER_STATUS_SUCCESS)                                                     \
            ::qopt::fail("cuSOLVER error ", int(status_), " in ", #call, " at ", __FILE__, ":", __LINE__); \
    } while (0)
#define BLAS_CHECK(call)                                                                            \
    do {                                                                                            \
        cublasStatus_t status_ = (call);                                                            \
        if (status_ != CUBLAS_STATUS_SUCCESS)                                                       \
            ::qopt::fail("cuBLAS error ", int(status_), " in ", #call, " at ", __FILE__, ":", __LINE__); \
    } while (0)

// Device bytes held by all Scratch buffers (linalg_workspace_bytes).
size_t held_scratch_bytes = 0;
// issued_matrix_flops (atomic: Shampoo's side refresh issues products from its own thread).
std::atomic<double> matrix_flops_issued{0};
// cholesky_qr_totals.
CholeskyQrReport cholesky_qr_totals_so_far;

// A growable device scratch buffer, kept once grown (or until released).
struct Scratch {
    void* data = nullptr;
    size_t bytes = 0;
    void release() {
        if (data) cudaFree(data);
        held_scratch_bytes -= bytes;
        data = nullptr;
        bytes = 0;
    }
    void* at_least(size_t wanted) {
        if (wanted > bytes) {
            release();
            CUDA_CHECK(cudaMalloc(&data, wanted));
            bytes = wanted;
            held_scratch_bytes += bytes;
        }
        return data;
    }
};

// One cuSOLVER handle on its own stream, with its workspaces. Streams are created blocking,
// so they wait for earlier work on the default stream and the default stream waits for them.
struct SolverWorker {
    cusolverDnHandle_t handle = nullptr;
    cusolverDnParams_t params = nullptr;
    cudaStream_t stream = nullptr;
    Scratch device_work, tau, info;
    std::vector<char> host_work;
    SolverWorker() {
        SOLVER_CHECK(cusolverDnCreate(&handle));
        SOLVER_CHECK(cusolverDnCreateParams(&params));
        CUDA_CHECK(cudaStreamCreate(&stream));
        SOLVER_CHECK(cusolverDnSetStream(handle, stream));
    }
};

constexpr int kSolverWorkers = 4;

std::vector<SolverWorker>& workers() {
    static std::vector<SolverWorker> instance(kSolverWorkers);
    return instance;
}

// A worker per caller's stream (a side stream that runs beside the default one, fed from a
// thread of its own): its handle is pointed at that stream, its workspaces are its own, until
// release_side_solver.
std::mutex side_workers_mutex;
std::map<cudaStream_t, std::unique_ptr<SolverWorker>> side_workers;
SolverWorker& side_worker(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(side_workers_mutex);
    std::unique_ptr<SolverWorker>& worker = side_workers[stream];
    if (!worker) {
        worker = std::make_unique<SolverWorker>();
        SOLVER_CHECK(cusolverDnSetStream(worker->handle, stream));
    }
    return *worker;
}

cublasHandle_t blas() {
    static cublasHandle_t handle = [] {
        cublasHandle_t h;
        BLAS_CHECK(cublasCreate(&h));
        return h;
    }();
    return handle;
}

// out[b][r, c] = in[b][c, r] for n x n matrices; with `reverse_columns`, out[b][r, c] =
// in[b][n-1-c, r] (the eigenvectors, rows of the column-major result, become columns in
// descending order).
__global__ void transpose_square_kernel(float* out, const float* in, int n, int batch, bool reverse_columns) {
    __shared__ float tile[32][33];
    const int b = blockIdx.z;
    const int r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
    const float* src = in + size_t(b) * n * n;
    float* dst = out + size_t(b) * n * n;
    // Read rows c0.. of `in` (source row index = output column, possibly reversed).
    for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
        const int c = c0 + dy, r = r0 + threadIdx.x;
        if (c < n && r < n) tile[dy][threadIdx.x] = src[size_t(reverse_columns ? n - 1 - c : c) * n + r];
    }
    __syncthreads();
    for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
        const int r = r0 + dy, c = c0 + threadIdx.x;
        if (r < n && c < n) dst[size_t(r) * n + c] = tile[threadIdx.x][dy];
    }
}

void transpose_square(float* out, const float* in, int n, int batch, bool reverse_columns, cudaStream_t stream) {
    const dim3 grid((n + 31) / 32, (n + 31) / 32, batch), block(32, 8);
    transpose_square_kernel<<<grid, block, 0, stream>>>(out, in, n, batch, reverse_columns);
    CUDA_CHECK_LAUNCH();
}

__global__ void reverse_values_kernel(float* out, const float* in, int n, int batch) {
    const size_t total = size_t(n) * batch;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
        const size_t b = i / n, j = i % n;
        out[i] = in[b * n + (n - 1 - j)];
    }
}

// Device array of pointers base + i * stride for i = 0 .. batch - 1 (cuBLAS's batched calls take
// pointer arrays).
template <class T>
T** pointer_array(Scratch& storage, T* base, int64_t stride, int batch) {
    std::vector<T*> host(static_cast<size_t>(batch));
    for (int i = 0; i < batch; ++i) host[size_t(i)] = base + i * stride;
    T** device = static_cast<T**>(storage.at_least(std::max<size_t>(host.size(), 1) * sizeof(T*)));
    CUDA_CHECK(cudaMemcpy(device, host.data(), host.size() * sizeof(T*), cudaMemcpyHostToDevice));
    return device;
}

}  // namespace

namespace {

// The batched eigendecomposition's workspaces on worker w for `batch` n x n matrices at a (grown
// as needed; shared by the call and its reservation).
struct EigenWork {
    float* raw_values;
    void* device_work;
    size_t device_bytes = 0, host_bytes = 0;
    int* info;
};
EigenWork eigen_work(SolverWorker& w, int n, int batch, float* a) {
    EigenWork work;
    work.raw_values = static_cast<float*>(w.tau.at_least(size_t(n) * batch * sizeof(float)));
    SOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(w.handle, w.params, CUSOLVER_EIG_MODE_VECTOR,
                                                   CUBLAS_FILL_MODE_LOWER, n, CUDA_R_32F, a, n, CUDA_R_32F,
                                                   work.raw_values, CUDA_R_32F, &work.device_bytes, &work.host_bytes,
                                                   batch));
    work.device_work = w.device_work.at_least(work.device_bytes + 1);
    if (w.host_work.size() < work.host_bytes + 1) w.host_work.resize(work.host_bytes + 1);
    work.info = static_cast<int*>(w.info.at_least(size_t(batch) * sizeof(int)));
    return work;
}

}  // namespace

void symmetric_eigen_batched_gpu(float* vectors, float* values, const float* a, int n, int batch, float* scratch,
                                 cudaStream_t stream) {
    // On the default stream: worker 0, whose stream is blocking, so it starts after the copy
    // below and the default stream waits for it. On a side stream: everything on that stream.
    SolverWorker& w = stream ? side_worker(stream) : workers()[0];
    const cudaStream_t run_on = stream ? stream : w.stream;
    const size_t matrix = size_t(n) * n;
    if (scratch != a)
        CUDA_CHECK(cudaMemcpyAsync(scratch, a, matrix * batch * sizeof(float), cudaMemcpyDeviceToDevice, stream));
    const EigenWork work = eigen_work(w, n, batch, scratch);
    SOLVER_CHECK(cusolverDnXsyevBatched(w.handle, w.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                        CUDA_R_32F, scratch, n, CUDA_R_32F, work.raw_values, CUDA_R_32F,
                                        work.device_work, work.device_bytes, w.host_work.data(), work.host_bytes,
                                        work.info, batch));
    // Column-major eigenvectors (ascending) -> row-major, columns in descending order.
    transpose_square(vectors, scratch, n, batch, true, run_on);
    reverse_values_kernel<<<grid_for(size_t(n) * batch), 256, 0, run_on>>>(values, work.raw_values, n, batch);
    CUDA_CHECK_LAUNCH();
}

void symmetric_eigen_listed_gpu(float* vectors, float* values, const float* a, int n, int batch,
                                const std::vector<int>& listed, float* scratch) {
    for (size_t k = 0; k < listed.size(); ++k)
        QOPT_CHECK(listed[k] >= 0 && listed[k] < batch && (k == 0 || listed[k] > listed[k - 1]),
                   "symmetric_eigen_listed_gpu: the list must be increasing indices into the batch of ", batch);
    const int count = int(listed.size());
    if (count == 0) return;
    const size_t matrix = size_t(n) * n;
    // The listed matrices to the front of scratch, in order. Where scratch is a itself, slot k <=
    // listed[k] and every earlier copy wrote a slot below listed[k]: no source is overwritten
    // before it is read (the copies run in order on the default stream).
    for (int k = 0; k < count; ++k)
        if (scratch + k * matrix != a + listed[size_t(k)] * matrix)
            CUDA_CHECK(cudaMemcpyAsync(scratch + k * matrix, a + listed[size_t(k)] * matrix, matrix * sizeof(float),
                                       cudaMemcpyDeviceToDevice, 0));
    symmetric_eigen_batched_gpu(vectors, values, scratch, n, count, scratch);
    // Then each result from slot k to its place listed[k] >= k, the last first, so that no slot
    // is overwritten before it has moved (the default stream waits for the worker's stream).
    for (int k = count - 1; k >= 0; --k) {
        const int place = listed[size_t(k)];
        if (place == k) continue;
        CUDA_CHECK(cudaMemcpyAsync(vectors + place * matrix, vectors + k * matrix, matrix * sizeof(float),
                                   cudaMemcpyDeviceToDevice, 0));
        CUDA_CHECK(cudaMemcpyAsync(values + size_t(place) * n, values + size_t(k) * n, size_t(n) * sizeof(float),
                                   cudaMemcpyDeviceToDevice, 0));
    }
}

namespace {

// geqrf's and orgqr's workspaces on worker w for one n x n matrix m (grown as needed).
struct HouseholderWork {
    float* tau;
    int* info;
    void* device_work;
    size_t geqrf_bytes = 0, host_bytes = 0;
    int orgqr_floats = 0;
};
HouseholderWork householder_work(SolverWorker& w, int n, float* m) {
    HouseholderWork work;
    work.tau = static_cast<float*>(w.tau.at_least(size_t(n) * sizeof(float)));
    work.info = static_cast<int*>(w.info.at_least(sizeof(int)));
    SOLVER_CHECK(cusolverDnXgeqrf_bufferSize(w.handle, w.params, n, n, CUDA_R_32F, m, n, CUDA_R_32F, work.tau,
                                             CUDA_R_32F, &work.geqrf_bytes, &work.host_bytes));
    SOLVER_CHECK(cusolverDnSorgqr_bufferSize(w.handle, n, n, n, m, n, work.tau, &work.orgqr_floats));
    work.device_work =
        w.device_work.at_least(std::max(work.geqrf_bytes, size_t(work.orgqr_floats) * sizeof(float)) + 16);
    if (w.host_work.size() < work.host_bytes + 1) w.host_work.resize(work.host_bytes + 1);
    return work;
}

// Householder Q of the batch's matrices listed in `which` (q, a and scratch hold batch slices of
// n * n floats; only the listed ones are touched), the matrices taken in turn by the worker
// streams.
void householder_q_selected(float* q, const float* a, int n, const std::vector<int>& which, float* scratch) {
    const size_t matrix = size_t(n) * n;
    for (int b : which) transpose_square(scratch + b * matrix, a + b * matrix, n, 1, false, 0);  // column-major
    std::vector<SolverWorker>& pool = workers();
    for (size_t k = 0; k < which.size(); ++k) {
        SolverWorker& w = pool[k % pool.size()];
        float* m = scratch + size_t(which[k]) * matrix;
        const HouseholderWork work = householder_work(w, n, m);
        SOLVER_CHECK(cusolverDnXgeqrf(w.handle, w.params, n, n, CUDA_R_32F, m, n, CUDA_R_32F, work.tau, CUDA_R_32F,
                                      work.device_work, work.geqrf_bytes, w.host_work.data(), work.host_bytes,
                                      work.info));
        SOLVER_CHECK(cusolverDnSorgqr(w.handle, n, n, n, m, n, work.tau, static_cast<float*>(work.device_work),
                                      work.orgqr_floats, work.info));
    }
    // Blocking worker streams: these default-stream launches wait for all of them.
    for (int b : which) transpose_square(q + b * matrix, scratch + b * matrix, n, 1, false, 0);
}

}  // namespace

void householder_q_batched_gpu(float* q, const float* a, int n, int batch, float* scratch) {
    std::vector<int> all(static_cast<size_t>(batch));
    for (int b = 0; b < batch; ++b) all[size_t(b)] = b;
    householder_q_selected(q, a, n, all, scratch);
}

namespace {

// out (float64) = row-major in [n, n] with every column scaled to unit length (a zero column stays
// zero). A QR's Q does not change when a column is scaled by a positive factor (A D = Q (R D)),
// and the scaling brings the columns of a power-iteration product L Q, whose lengths follow L's
// eigenvalues over many decades, to one size: the condition number the Cholesky QR sees drops
// to that of the directions alone.
__global__ void unit_columns_to_double_kernel(double* out, const float* in, int n) {
    const int column = blockIdx.x * blockDim.x + threadIdx.x;
    if (column >= n) return;
    const size_t base = size_t(blockIdx.y) * n * n;
    double sum_squares = 0;
    for (int r = 0; r < n; ++r) {
        const double x = in[base + size_t(r) * n + column];
        sum_squares += x * x;
    }
    const double inverse_length = sum_squares > 0 ? 1.0 / sqrt(sum_squares) : 0.0;
    for (int r = 0; r < n; ++r) out[base + size_t(r) * n + column] = in[base + size_t(r) * n + column] * inverse_length;
}

__global__ void add_to_diagonal_kernel(double* w, int n, double shift) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) w[size_t(blockIdx.y) * n * n + size_t(i) * n + i] += shift;
}

__global__ void double_to_float_kernel(float* out, const double* in, size_t count) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x)
        out[i] = float(in[i]);
}

// Square matrices up to this size take the Cholesky QR, larger ones Householder (not measured
// there). Measured on an H200, 2026-12-03, `bench --linalg` (batch of 48; 24 from 2048, 12 at
// 4096): ms per matrix, Householder on four streams against the Cholesky QR for Gaussian inputs
// (two passes each) and for inputs near an orthogonal matrix (one pass), 768^2 1.45 / 0.24 /
// 0.13, 1024^2 1.98 / 0.45 / 0.25, 2048^2 3.85 / 2.41 / 1.36, 3072^2 7.56 / 6.23 / 3.53, 4096^2
// 12.9 / 12.4 / 7.2.
constexpr int kCholeskyQrMax = 4096;

// From this size a pass's Gram matrix is one DSYRK per matrix (half a GEMM's multiply-adds; a
// single call fills the GPU) and its Cholesky factorization one potrf per matrix on the worker
// streams; below, one strided-batched DGEMM and one potrfBatched for the whole list. Measured on
// an H200 (2026-12-03, 7 matrices, ms per matrix): Gram 1024^2 0.04 / 0.04, 2048^2 0.28 / 0.15,
// 3072^2 0.91 / 0.48 (batched GEMM / syrk); Cholesky 0.26 / 0.39, 0.88 / 0.78, 2.05 / 1.20
// (potrfBatched / one potrf after another). The triangular solve stays batched at every size
// (trsmBatched 0.16, 0.51, 1.26 against one trsm after another 0.51, 1.11, 2.28).
constexpr int kPerMatrixCholeskyMin = 2048;

// A pass is skipped for a matrix whose Gram matrix W = X^T X is already the identity to
// ||W - I||_F <= this. Skipping it leaves out X <- X R^-1 with R^T R = W = I + E, a change of
// ~X E / 2, at most 2^-31 in Frobenius norm (X has orthonormal columns to that order): below the
// rounding of X to fp32 at the end (~2^-25 per entry, so ||.||_F >= 2^-25 for any n).
constexpr double kOrthonormalTolerance = 0x1p-30;

// The first pass needs its shift only for a matrix that may be too ill-conditioned for a plain
// Cholesky factorization. If ||W - I||_F <= d < 1, W's eigenvalues lie in [1 - d, 1 + d]:
// kappa(X)^2 = kappa(W) <= (1 + d) / (1 - d), here < 2^11, the factorization cannot break down,
// and one plain pass leaves X orthonormal to ~u kappa(W) (a power-iteration product near the last
// basis is done after that one pass, where the shifted pass would need a second to undo its
// shift). Beyond 1 the Frobenius norm bounds nothing, so the shift stays.
constexpr double kUnshiftedDeviationMax = 1.0 - 0x1p-10;

// A plain pass from ||W - I||_F <= this is a matrix's last: its Gram matrix is not formed again
// to confirm it (that confirmation cost SOAP ~6 ms per batch of twelve 3072^2). One Cholesky QR
// pass leaves ||X^T X - I||_2 <= 6 kappa(X)^2 (m n + n (n + 1)) u (Yamamoto, Nakatsukasa,
// Yanagisawa, Fukaya 2015, for kappa(X)^2 (m n + n (n + 1)) u <= 1/8); here m = n,
// kappa(X)^2 = kappa(W) <= (1 + 1/2) / (1 - 1/2) = 3, so <= 36 n^2 u (n = 4096: 2^-24.6),
// below what rounding X to fp32 at the end leaves (~2^-23 in the 2-norm).
constexpr double kLastPassDeviationMax = 0.5;

// The Cholesky QR's float64 work for `chunk` matrices of n x n at a time: X and W, the pointer
// arrays of the matrices a pass works on, each pass's Cholesky infos and the Gram matrices'
// deviation partial sums (grown as needed).
struct CholeskyQrWork {
    Scratch x_storage, w_storage, pointer_storage, info_storage, deviation_storage;
    static constexpr int kPasses = 3;
    static constexpr int kDeviationBlocks = 64;
    double* x;
    double* w;
    int* infos;
    double* deviation_partials;
    void ensure(int n, int chunk) {
        const size_t matrix = size_t(n) * n;
        x = static_cast<double*>(x_storage.at_least(matrix * chunk * sizeof(double)));
        w = static_cast<double*>(w_storage.at_least(matrix * chunk * sizeof(double)));
        infos = static_cast<int*>(info_storage.at_least(size_t(kPasses) * chunk * sizeof(int)));
        deviation_partials =
            static_cast<double*>(deviation_storage.at_least(size_t(kDeviationBlocks) * chunk * sizeof(double)));
        pointer_storage.at_least(2 * size_t(chunk) * sizeof(double*));
        pointed.clear();
        pointed_n = 0;
    }
    // The listed matrices' X and W as device pointer arrays (cuBLAS's batched calls take them),
    // uploaded only when the list changed since the last call: a pass's Gram matrices, their
    // check, its factorizations and its solve, and often the next pass, share one list.
    struct Pointers {
        double** xs;
        double** ws;
    };
    Pointers pointers(int n, const std::vector<int>& listed) {
        double** device = static_cast<double**>(pointer_storage.data);
        const Pointers arrays{device, device + listed.size()};
        if (listed == pointed && n == pointed_n) return arrays;
        const size_t matrix = size_t(n) * n;
        std::vector<double*> host(2 * listed.size());
        for (size_t k = 0; k < listed.size(); ++k) {
            host[k] = x + listed[k] * matrix;
            host[listed.size() + k] = w + listed[k] * matrix;
        }
        // Synchronous on the default stream: the calls that read the last arrays have finished.
        CUDA_CHECK(cudaMemcpy(device, host.data(), host.size() * sizeof(double*), cudaMemcpyHostToDevice));
        pointed = listed;
        pointed_n = n;
        return arrays;
    }

private:
    std::vector<int> pointed;  // the list (and size) whose pointers the storage holds
    int pointed_n = 0;
};
CholeskyQrWork& cholesky_qr_work() {
    static CholeskyQrWork instance;
    return instance;
}

// potrf's float64 workspace on worker w for an n x n matrix (grown as needed; shared by the
// Cholesky QR's per-matrix factorizations and their reservation).
struct PotrfWork {
    double* device;
    int doubles;
};
PotrfWork potrf_work(SolverWorker& w, int n, double* matrix) {
    int doubles = 0;
    SOLVER_CHECK(cusolverDnDpotrf_bufferSize(w.handle, CUBLAS_FILL_MODE_LOWER, n, matrix, n, &doubles));
    ++doubles;
    return {static_cast<double*>(w.device_work.at_least(size_t(doubles) * sizeof(double))), doubles};
}

// Matrices per chunk: as many as fit in the limit (two n x n float64 each), at least one.
int cholesky_qr_chunk(int n, int batch, size_t scratch_limit_bytes) {
    const size_t matrix_bytes = 2 * size_t(n) * n * sizeof(double);
    return int(std::clamp<size_t>(scratch_limit_bytes / matrix_bytes, 1, size_t(std::max(batch, 1))));
}

// ||W - I||_F^2 of column-major symmetric W from its lower triangle, for the listed matrices:
// each of gridDim.x blocks sums every gridDim.x-th column, in a fixed order; partials[k *
// gridDim.x + block] (added up on the host, also in a fixed order).
__global__ void gram_deviation_partials_kernel(double* partials, double* const* ws, int n) {
    const double* w = ws[blockIdx.y];
    double sum = 0;
    for (int j = blockIdx.x; j < n; j += gridDim.x)
        for (int i = j + threadIdx.x; i < n; i += blockDim.x) {
            const double deviation = w[size_t(j) * n + i] - (i == j ? 1.0 : 0.0);
            sum += (i == j ? 1.0 : 2.0) * deviation * deviation;
        }
    sum = block_reduce(sum, Add{});
    if (threadIdx.x == 0) partials[size_t(blockIdx.y) * gridDim.x + blockIdx.x] = sum;
}

// W = X^T X for the listed matrices of the work (lower triangle at least): one strided DGEMM
// over the list, or from kPerMatrixCholeskyMin one DSYRK per matrix.
void gram_matrices(CholeskyQrWork& work, int n, const std::vector<int>& listed, bool per_matrix) {
    const size_t matrix = size_t(n) * n;
    const double one = 1.0, zero = 0.0;
    if (per_matrix) {
        for (int b : listed)
            BLAS_CHECK(cublasDsyrk(blas(), CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, n, n, &one, work.x + b * matrix, n,
                                   &zero, work.w + b * matrix, n));
    } else {
        const CholeskyQrWork::Pointers p = work.pointers(n, listed);
        BLAS_CHECK(cublasDgemmBatched(blas(), CUBLAS_OP_N, CUBLAS_OP_T, n, n, n, &one, p.xs, n, p.xs, n, &zero, p.ws,
                                      n, int(listed.size())));
    }
    count_matrix_flops((per_matrix ? 1.0 : 2.0) * n * n * double(n) * listed.size());  // syrk: half a GEMM
}

// ||W - I||_F of the listed matrices' Gram matrices.
std::vector<double> gram_deviations(CholeskyQrWork& work, int n, const std::vector<int>& listed) {
    constexpr int kBlocks = CholeskyQrWork::kDeviationBlocks;
    const int count = int(listed.size());
    gram_deviation_partials_kernel<<<dim3(kBlocks, count), 256>>>(work.deviation_partials,
                                                                  work.pointers(n, listed).ws, n);
    CUDA_CHECK_LAUNCH();
    std::vector<double> partials(size_t(kBlocks) * count);
    CUDA_CHECK(cudaMemcpy(partials.data(), work.deviation_partials, partials.size() * sizeof(double),
                          cudaMemcpyDeviceToHost));
    std::vector<double> deviations(static_cast<size_t>(count));
    for (int k = 0; k < count; ++k) {
        double sum_squares = 0;
        for (int p = 0; p < kBlocks; ++p) sum_squares += partials[size_t(k) * kBlocks + p];
        deviations[size_t(k)] = std::sqrt(sum_squares);
    }
    return deviations;
}

// W = L L^T in place for the listed matrices, infos[k] for the k-th: one potrfBatched, or from
// kPerMatrixCholeskyMin one potrf per matrix on the worker streams (blocking streams: they start
// after the Gram matrices, and the default stream's next call waits for all of them).
void cholesky_factors(CholeskyQrWork& work, int n, const std::vector<int>& listed, bool per_matrix, int* infos) {
    const size_t matrix = size_t(n) * n;
    std::vector<SolverWorker>& pool = workers();
    if (per_matrix) {
        for (size_t k = 0; k < listed.size(); ++k) {
            SolverWorker& worker = pool[k % pool.size()];
            const PotrfWork potrf = potrf_work(worker, n, work.w);
            SOLVER_CHECK(cusolverDnDpotrf(worker.handle, CUBLAS_FILL_MODE_LOWER, n, work.w + listed[k] * matrix, n,
                                          potrf.device, potrf.doubles, infos + k));
        }
    } else {
        double** ws = work.pointers(n, listed).ws;
        SolverWorker& worker = pool[0];
        SOLVER_CHECK(cusolverDnSetStream(worker.handle, 0));
        SOLVER_CHECK(cusolverDnDpotrfBatched(worker.handle, CUBLAS_FILL_MODE_LOWER, n, ws, n, infos, int(listed.size())));
        SOLVER_CHECK(cusolverDnSetStream(worker.handle, worker.stream));
    }
}

// X <- X L^-T (column-major: Y <- L^-1 Y) for the listed matrices, one batched solve.
void solve_with_factors(CholeskyQrWork& work, int n, const std::vector<int>& listed) {
    const CholeskyQrWork::Pointers p = work.pointers(n, listed);
    const double one = 1.0;
    BLAS_CHECK(cublasDtrsmBatched(blas(), CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT,
                                  n, n, &one, p.ws, n, p.xs, n, int(listed.size())));
    count_matrix_flops(double(n) * n * n * listed.size());  // the solve: n^3
}

}  // namespace

CholeskyQrReport cholesky_q_batched_gpu(float* q, const float* a, int n, int batch, float* scratch,
                                        size_t scratch_limit_bytes) {
    // Shifted CholeskyQR3 (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020) in float64 on
    // the unit-column copy X of a: up to three times W = X^T X, W = L L^T (Cholesky), X <- X
    // L^-T. The first pass adds s = 11 (n^2 + n (n + 1)) u ||X||_F^2 to W's diagonal so that the
    // Cholesky factorization exists for any condition number up to ~1/u (u = 2^-53; ||X||_F^2
    // <= n for unit columns); its X is then well enough conditioned for two plain passes to
    // make it orthonormal to rounding. A matrix leaves the passes as soon as its W is the
    // identity to kOrthonormalTolerance or after a plain pass that started close to it
    // (kLastPassDeviationMax), and its first pass is plain where W is close enough to the
    // identity (kUnshiftedDeviationMax): an input whose columns are already orthonormal takes
    // no pass, one near an orthogonal matrix one pass, any other two or three. Row-major X is column-major X^T =: Y,
    // so in the libraries' terms W = Y Y^T, and X L^-T is Y <- L^-1 Y. X and W (float64) are
    // held for at most scratch_limit_bytes' worth of matrices at a time: the batch goes in
    // chunks of that many.
    CholeskyQrReport report;
    if (batch <= 0) return report;
    const size_t matrix = size_t(n) * n;
    const int chunk = cholesky_qr_chunk(n, batch, scratch_limit_bytes);
    CholeskyQrWork& work = cholesky_qr_work();
    work.ensure(n, chunk);
    constexpr int kPasses = CholeskyQrWork::kPasses;
    const bool per_matrix = n >= kPerMatrixCholeskyMin;
    BLAS_CHECK(cublasSetStream(blas(), 0));
    const double unit_roundoff = 0x1p-53;
    const double shift = 11.0 * (double(n) * n + double(n) * (n + 1)) * unit_roundoff * n;
    std::vector<int> broke_down;
    for (int first = 0; first < batch; first += chunk) {
        const int count = std::min(chunk, batch - first);
        unit_columns_to_double_kernel<<<dim3((n + 127) / 128, count), 128>>>(work.x, a + first * matrix, n);
        CUDA_CHECK_LAUNCH();
        std::vector<int> active(static_cast<size_t>(count));
        for (int b = 0; b < count; ++b) active[size_t(b)] = b;
        std::vector<std::vector<int>> factored(kPasses);  // per pass, the matrices it factored
        for (int pass = 0; pass < kPasses && !active.empty(); ++pass) {
            gram_matrices(work, n, active, per_matrix);
            report.grams += long(active.size());
            // Which of them still need this pass, (first pass) which need its shift, and for
            // which it is the last.
            const std::vector<double> deviations = gram_deviations(work, n, active);
            std::vector<int> remaining, continuing;
            for (size_t k = 0; k < active.size(); ++k) {
                // Not "> tolerance": a NaN deviation (non-finite input) stays in the passes.
                if (deviations[k] <= kOrthonormalTolerance) continue;
                remaining.push_back(active[k]);
                const bool shifted = pass == 0 && !(deviations[k] <= kUnshiftedDeviationMax);
                if (shifted) {
                    add_to_diagonal_kernel<<<dim3((n + 255) / 256, 1), 256>>>(work.w + active[k] * matrix, n, shift);
                    CUDA_CHECK_LAUNCH();
                }
                if (shifted || !(deviations[k] <= kLastPassDeviationMax)) continuing.push_back(active[k]);
            }
            if (remaining.empty()) break;
            report.passes += long(remaining.size());
            factored[size_t(pass)] = remaining;
            cholesky_factors(work, n, remaining, per_matrix, work.infos + size_t(pass) * chunk);
            solve_with_factors(work, n, remaining);
            active = continuing;
        }
        double_to_float_kernel<<<grid_for(matrix * count), 256>>>(q + first * matrix, work.x, matrix * count);
        CUDA_CHECK_LAUNCH();
        // A Cholesky factorization that broke down (a zero or dependent column: the Gram
        // matrix is singular) leaves that matrix to Householder's QR, which completes any basis.
        std::vector<int> host_infos(size_t(kPasses) * chunk);
        CUDA_CHECK(cudaMemcpy(host_infos.data(), work.infos, host_infos.size() * sizeof(int), cudaMemcpyDeviceToHost));
        std::vector<bool> failed(static_cast<size_t>(count), false);
        for (int pass = 0; pass < kPasses; ++pass)
            for (size_t k = 0; k < factored[size_t(pass)].size(); ++k)
                if (host_infos[size_t(pass) * chunk + k] != 0) failed[size_t(factored[size_t(pass)][k])] = true;
        for (int b = 0; b < count; ++b)
            if (failed[size_t(b)]) broke_down.push_back(first + b);
    }
    if (!broke_down.empty()) householder_q_selected(q, a, n, broke_down, scratch);
    report.matrices = batch;
    report.householder_fallbacks = long(broke_down.size());
    cholesky_qr_totals_so_far.matrices += report.matrices;
    cholesky_qr_totals_so_far.passes += report.passes;
    cholesky_qr_totals_so_far.grams += report.grams;
    cholesky_qr_totals_so_far.householder_fallbacks += report.householder_fallbacks;
    return report;
}

CholeskyQrReport cholesky_qr_totals() { return cholesky_qr_totals_so_far; }

void reserve_symmetric_eigen_gpu(int n, int batch, float* scratch, cudaStream_t stream) {
    if (batch > 0) eigen_work(stream ? side_worker(stream) : workers()[0], n, batch, scratch);
}

void reserve_qr_q_gpu(int n, int batch, float* scratch) {
    if (batch <= 0) return;
    // Householder on every worker (above kCholeskyQrMax, or the Cholesky QR's fallback).
    for (SolverWorker& w : workers()) householder_work(w, n, scratch);
    if (n <= kCholeskyQrMax) {
        cholesky_qr_work().ensure(n, cholesky_qr_chunk(n, batch, kCholeskyQrScratchLimit));
        if (n >= kPerMatrixCholeskyMin)  // one potrf per matrix on every worker
            for (SolverWorker& w : workers()) potrf_work(w, n, cholesky_qr_work().w);
    }
    blas();
}

size_t linalg_workspace_bytes() { return held_scratch_bytes; }

void release_side_solver(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(side_workers_mutex);
    auto found = side_workers.find(stream);
    if (found == side_workers.end()) return;
    SolverWorker& w = *found->second;
    for (Scratch* scratch : {&w.device_work, &w.tau, &w.info}) scratch->release();
    cusolverDnDestroyParams(w.params);
    cusolverDnDestroy(w.handle);
    cudaStreamDestroy(w.stream);
    side_workers.erase(found);
}

double issued_matrix_flops() { return matrix_flops_issued.load(); }
void count_matrix_flops(double flops) {
    double seen = matrix_flops_issued.load();
    while (!matrix_flops_issued.compare_exchange_weak(seen, seen + flops)) {
    }
}

void qr_q_batched_gpu(float* q, const float* a, int n, int batch, float* scratch) {
    if (n <= kCholeskyQrMax)
        cholesky_q_batched_gpu(q, a, n, batch, scratch);
    else
        householder_q_batched_gpu(q, a, n, batch, scratch);
}

void solve_upper_right_batched_gpu(float* x, const float* u, int rows, int n, int batch) {
    // Row-major Y = X U^-1  <=>  column-major Y^T = (U^T)^-1 X^T with U^T lower triangular.
    static Scratch u_pointers, x_pointers;
    float** us = pointer_array(u_pointers, const_cast<float*>(u), int64_t(n) * n, batch);
    float** xs = pointer_array(x_pointers, x, int64_t(rows) * n, batch);
    const float one = 1.0f;
    BLAS_CHECK(cublasSetStream(blas(), 0));
    BLAS_CHECK(cublasStrsmBatched(blas(), CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, n,
                                  rows, &one, us, n, xs, n, batch));
    count_matrix_flops(double(n) * n * rows * batch);  // a triangular solve: n^2 / 2 multiply-adds per column
}

void solve_upper_transposed_left_batched_gpu(float* x, const float* u, int n, int cols, int batch) {
    // Row-major Y = U^-T X (X [n, cols])  <=>  column-major Y^T = X^T ((U^T)^T)^-1.
    static Scratch u_pointers, x_pointers;
    float** us = pointer_array(u_pointers, const_cast<float*>(u), int64_t(n) * n, batch);
    float** xs = pointer_array(x_pointers, x, int64_t(n) * cols, batch);
    const float one = 1.0f;
    BLAS_CHECK(cublasSetStream(blas(), 0));
    BLAS_CHECK(cublasStrsmBatched(blas(), CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_T, CUBLAS_DIAG_NON_UNIT,
                                  cols, n, &one, us, n, xs, cols, batch));
    count_matrix_flops(double(n) * n * cols * batch);
}

// The products with upper-triangular u below skip u's zero blocks: cut u into blocks of `block`
// rows and columns; a row block of op(u) b, or a column block of b op(u), is one GEMM over the
// blocks of u that are not zero, batched over the matrices (strided). ~n^2/2 (1 + block/n) of
// u's n^2 entries take part.
void upper_triangular_product_batched_gpu(float* out, const float* u, bool transpose_u, const float* b, int n,
                                          int cols, int batch, bool tf32, int block) {
    if (block <= 0) block = triangular_product_block(n);
    const int64_t u_size = int64_t(n) * n, b_size = int64_t(n) * cols;
    for (int r0 = 0; r0 < n; r0 += block) {
        const int rows = std::min(block, n - r0), r1 = r0 + rows;
        if (!transpose_u)  // out[r0:r1] = u[r0:r1, r0:n] b[r0:n]
            strided_matmul_f32_gpu(out + int64_t(r0) * cols, cols, b_size, u + int64_t(r0) * n + r0, n, u_size,
                                   false, b + int64_t(r0) * cols, cols, b_size, false, rows, cols, n - r0, batch, 1.0f,
                                   0.0f, tf32);
        else  // out[r0:r1] = u^T[r0:r1, 0:r1] b[0:r1] = (u[0:r1, r0:r1])^T b[0:r1]
            strided_matmul_f32_gpu(out + int64_t(r0) * cols, cols, b_size, u + r0, n, u_size, true, b, cols, b_size,
                                   false, rows, cols, r1, batch, 1.0f, 0.0f, tf32);
    }
}

void product_with_upper_triangular_batched_gpu(float* out, const float* b, const float* u, bool transpose_u, int rows,
                                               int n, int batch, bool tf32, int block) {
    if (block <= 0) block = triangular_product_block(n);
    const int64_t u_size = int64_t(n) * n, b_size = int64_t(rows) * n;
    for (int c0 = 0; c0 < n; c0 += block) {
        const int cols = std::min(block, n - c0), c1 = c0 + cols;
        if (!transpose_u)  // out[:, c0:c1] = b[:, 0:c1] u[0:c1, c0:c1]
            strided_matmul_f32_gpu(out + c0, n, b_size, b, n, b_size, false, u + c0, n, u_size, false, rows, cols, c1,
                                   batch, 1.0f, 0.0f, tf32);
        else  // out[:, c0:c1] = b[:, c0:n] u^T[c0:n, c0:c1] = b[:, c0:n] (u[c0:c1, c0:n])^T
            strided_matmul_f32_gpu(out + c0, n, b_size, b + c0, n, b_size, false, u + int64_t(c0) * n + c0, n, u_size,
                                   true, rows, cols, n - c0, batch, 1.0f, 0.0f, tf32);
    }
}

void upper_triangular_square_product_batched_gpu(float* out, const float* u, const float* q, int n, int batch,
                                                 bool tf32, int block) {
    if (block <= 0) block = triangular_product_block(n);
    // out[I, J] = u[I, r0_I : c1_J] q[r0_I : c1_J, J] for the blocks on and above the diagonal
    // (u is zero left of row block I's start, q below column block J's end); the rest is zero.
    CUDA_CHECK(cudaMemsetAsync(out, 0, size_t(n) * n * batch * sizeof(float), 0));
    const int64_t size = int64_t(n) * n;
    for (int r0 = 0; r0 < n; r0 += block)
        for (int c0 = r0; c0 < n; c0 += block) {
            const int rows = std::min(block, n - r0), cols = std::min(block, n - c0);
            strided_matmul_f32_gpu(out + int64_t(r0) * n + c0, n, size, u + int64_t(r0) * n + r0, n, size, false,
                                   q + int64_t(r0) * n + c0, n, size, false, rows, cols, c0 + cols - r0, batch, 1.0f,
                                   0.0f, tf32);
        }
}

double upper_triangular_product_fraction(int n, int block) {
    if (block <= 0) block = triangular_product_block(n);
    double multiply_adds = 0;  // per output column: sum over row blocks of rows x (n - r0)
    for (int r0 = 0; r0 < n; r0 += block) multiply_adds += double(std::min(block, n - r0)) * (n - r0);
    return multiply_adds / (double(n) * n);
}

double upper_triangular_square_product_fraction(int n, int block) {
    if (block <= 0) block = triangular_product_block(n);
    double multiply_adds = 0;
    for (int r0 = 0; r0 < n; r0 += block)
        for (int c0 = r0; c0 < n; c0 += block)
            multiply_adds += double(std::min(block, n - r0)) * std::min(block, n - c0) * (c0 + std::min(block, n - c0) - r0);
    return multiply_adds / (double(n) * n * n);
}

namespace {

// d[b][r, c] = d[b][c, r] for r > c: the upper triangle mirrored into the lower one, by 32 x 32
// tiles (a tile on or below the diagonal reads its transposed partner through shared memory).
__global__ void mirror_upper_to_lower_kernel(float* d, int n) {
    if (blockIdx.y < blockIdx.x) return;
    __shared__ float tile[32][33];
    float* matrix = d + size_t(blockIdx.z) * n * n;
    const int row0 = blockIdx.y * 32, col0 = blockIdx.x * 32;
    // Source: rows col0.., columns row0.. (the upper partner).
    for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
        const int r = col0 + dy, c = row0 + threadIdx.x;
        if (r < n && c < n) tile[dy][threadIdx.x] = matrix[size_t(r) * n + c];
    }
    __syncthreads();
    for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
        const int r = row0 + dy, c = col0 + threadIdx.x;
        if (r < n && c < n && r > c) matrix[size_t(r) * n + c] = tile[threadIdx.x][dy];
    }
}

void mirror_upper_to_lower(float* d, int n, int batch) {
    const dim3 grid((n + 31) / 32, (n + 31) / 32, batch), threads(32, 8);
    mirror_upper_to_lower_kernel<<<grid, threads>>>(d, n);
    CUDA_CHECK_LAUNCH();
}

}  // namespace

void symmetric_gram_batched_gpu(float* d, const float* a, bool transpose_a, int n, int k, int batch, float alpha,
                                float beta) {
    // Row-major a [n, k] is column-major M = a^T [k, n]: a a^T = M^T M (syrk with OP_T). Row-major
    // a [k, n] is column-major M = a^T [n, k]: a^T a = M M^T (OP_N). The column-major lower
    // triangle that syrk writes is the row-major upper one.
    BLAS_CHECK(cublasSetStream(blas(), 0));
    const int64_t a_size = int64_t(n) * k, d_size = int64_t(n) * n;
    for (int t = 0; t < batch; ++t)
        BLAS_CHECK(cublasSsyrk(blas(), CUBLAS_FILL_MODE_LOWER, transpose_a ? CUBLAS_OP_N : CUBLAS_OP_T, n, k, &alpha,
                               a + t * a_size, transpose_a ? n : k, &beta, d + t * d_size, n));
    count_matrix_flops(double(n) * (n + 1) * k * batch);  // one triangle: n (n + 1) / 2 dot products of k
    mirror_upper_to_lower(d, n, batch);
}

void symmetric_gram_blocked_batched_gpu(float* d, const float* a, bool transpose_a, int n, int k, int batch,
                                        float alpha, float beta, bool tf32, int block) {
    if (block <= 0) block = triangular_product_block(n);
    // Row block [r0, r0 + rows) of the upper triangle, from the diagonal on: op(a)[r0 : r0 + rows]
    // times op(a)[r0 : n]^T. Row-major a [n, k]: rows of a; a [k, n] (transpose_a): its columns.
    const int64_t a_size = int64_t(n) * k, d_size = int64_t(n) * n;
    const int64_t ld_a = transpose_a ? n : k;
    for (int r0 = 0; r0 < n; r0 += block) {
        const int rows = std::min(block, n - r0);
        const float* from = transpose_a ? a + r0 : a + int64_t(r0) * k;
        strided_matmul_f32_gpu(d + int64_t(r0) * n + r0, n, d_size, from, ld_a, a_size, transpose_a, from, ld_a, a_size,
                               !transpose_a, rows, n - r0, k, batch, alpha, beta, tf32);
    }
    mirror_upper_to_lower(d, n, batch);
}

void upper_cholesky_of_inverse_gpu(double* h, int n) {
    // Column-major, LOWER throughout: potrf gives h = L L^T; potri overwrites the lower triangle
    // with h^-1; potrf of that gives h^-1 = L2 L2^T. The row-major view of column-major L2 is
    // L2^T =: U, upper, with U^T U = L2 L2^T = h^-1.
    SolverWorker& w = workers()[0];
    int* info = static_cast<int*>(w.info.at_least(sizeof(int)));
    auto check_info = [&](const char* what) {
        int host_info = 0;
        CUDA_CHECK(cudaMemcpyAsync(&host_info, info, sizeof(int), cudaMemcpyDeviceToHost, w.stream));
        CUDA_CHECK(cudaStreamSynchronize(w.stream));
        if (host_info > 0) fail("GPTQ: the Hessian is not positive definite (raise --damp)");
        if (host_info < 0) fail("cuSOLVER ", what, ": argument ", -host_info, " is wrong");
    };
    int potrf_doubles = 0, potri_doubles = 0;
    SOLVER_CHECK(cusolverDnDpotrf_bufferSize(w.handle, CUBLAS_FILL_MODE_LOWER, n, h, n, &potrf_doubles));
    SOLVER_CHECK(cusolverDnDpotri_bufferSize(w.handle, CUBLAS_FILL_MODE_LOWER, n, h, n, &potri_doubles));
    const int work_doubles = std::max(potrf_doubles, potri_doubles) + 1;
    double* work = static_cast<double*>(w.device_work.at_least(size_t(work_doubles) * sizeof(double)));
    SOLVER_CHECK(cusolverDnDpotrf(w.handle, CUBLAS_FILL_MODE_LOWER, n, h, n, work, work_doubles, info));
    check_info("potrf");
    SOLVER_CHECK(cusolverDnDpotri(w.handle, CUBLAS_FILL_MODE_LOWER, n, h, n, work, work_doubles, info));
    check_info("potri");
    SOLVER_CHECK(cusolverDnDpotrf(w.handle, CUBLAS_FILL_MODE_LOWER, n, h, n, work, work_doubles, info));
    check_info("potrf");
}

}  // namespace qopt
