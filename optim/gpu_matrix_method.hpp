// The preconditioned methods on the GPU (Shampoo, SOAP, PSGD-Kron): the part of a step that
// updates the hidden matrices, behind one interface that GpuOptimizer calls after its fused
// AdamW pass. Each method batches its work over groups of same-shape tiles (a tile is a whole
// matrix, or a Shampoo block of one): the tiles' gradients are gathered into one contiguous
// [count, rows, cols] buffer, every product of the group is one strided-batched fp32 GEMM (or,
// where measured faster: one syrk per matrix for large Gram matrices, and for PSGD's triangular
// factors GEMMs over the triangle's blocks), and
// one pass writes the new fp32 weights and their bf16 copy back. State is fp32, named and
// shaped as the CPU references name it (optim/cpu_optimizer.cpp), so checkpoints move freely
// between CPU and GPU runs.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "kernels/gpu.hpp"
#include "optim/optimizer.hpp"

namespace qopt {

// A tile of the flat parameter buffer: rows x cols starting at `offset`, rows `ld` apart.
struct Tile {
    size_t offset;
    int ld;
};

// Same-shape tiles, with their table on the device ({offset, ld} per tile) and the gathered
// gradients.
struct TileGroup {
    int rows = 0, cols = 0;
    std::vector<Tile> tiles;
    std::vector<std::string> names;  // state-name prefix of each tile
    std::vector<int> matrix_index;   // the tile's matrix in Routing::matrices
    DeviceBuffer<int64_t> table;
    DeviceBuffer<float> grads;  // count x rows x cols
    int count() const { return int(tiles.size()); }
    size_t tile_size() const { return size_t(rows) * cols; }
    void upload_table();
    // grads = grad_scale * the tiles of `all_grads` (+ decay * the tiles of params, if given).
    void gather(const float* all_grads, float grad_scale, const float* params = nullptr, float decay = 0.0f);
};

class GpuMatrixMethod {
public:
    GpuMatrixMethod();
    virtual ~GpuMatrixMethod() = default;
    // step: the optimizer's step count after incrementing (1, 2, ...).
    virtual void step(float* params, const float* grads, double lr, double grad_scale, bf16* params_bf16,
                      long step) = 0;
    // Appends every state buffer as named tensors (and, in overrides, scalars to extra).
    virtual void save(OptimizerState& state) const;
    virtual void load(const OptimizerState& state);
    size_t state_bytes() const;                // persistent state
    virtual size_t scratch_bytes() const = 0;  // per-step work buffers
    // Preconditioner matrices computed non-finite and not taken so far (Optimizer::
    // rejected_preconditioners); reads a device counter (waits for the GPU).
    long rejected_preconditioners() const;
    // Optimizer::eigen_refreshes (Shampoo's kept eigenbasis; zero for the other methods).
    virtual EigenRefreshCounts eigen_refreshes() const { return {}; }

protected:
    // commit_finite_tiles_gpu with this method's rejection counter: candidate[t] replaces
    // kept[t] (n x n, count of them; n-vectors when `diagonal`) where finite; accepted[t] (when
    // given) says where.
    void commit_tiles(float* kept, const float* candidate, int n, int count, int* accepted = nullptr,
                      bool diagonal = false);

    // Each state buffer of a group: its name suffix, one tile's shape, and the [count, ...]
    // buffer; one list per method serves save, load and state_bytes.
    using StateVisitor = std::function<void(const TileGroup& group, const std::string& suffix,
                                            std::vector<int64_t> shape, DeviceBuffer<float>& values)>;
    virtual void visit_state(const StateVisitor& fn) = 0;

private:
    DeviceBuffer<int> rejected_;
    DeviceBuffer<int> commit_flags_;  // commit_tiles' scratch, grown as needed
};

// Scratch sizes over a method's groups: the largest group's count x rows x cols (work), count x
// side^2 (factor) and count x side (dim), side = max(rows, cols).
struct GroupScratch {
    size_t work = 0, factor = 0, dim = 0;
};
GroupScratch group_scratch(const std::vector<TileGroup>& groups);

// owned_matrices (null: all): a ZeRO-1 rank's matrices (OwnedSlots::matrices); the method keeps
// state for and updates only those, and indices stay those of the whole routing.
std::unique_ptr<GpuMatrixMethod> make_gpu_shampoo(const Routing& routing, const OptimizerConfig& config,
                                                  const std::vector<bool>* owned_matrices = nullptr);
std::unique_ptr<GpuMatrixMethod> make_gpu_soap(const Routing& routing, const OptimizerConfig& config,
                                               const std::vector<bool>* owned_matrices = nullptr);
std::unique_ptr<GpuMatrixMethod> make_gpu_psgd(const Routing& routing, const OptimizerConfig& config,
                                               const std::vector<bool>* owned_matrices = nullptr);
// PSGD on the GPU, for a group of m x n matrices whose factors are expected to stay for
// steps_until_change steps: whether forming P = Q^T Q for the triangular factors (kept until
// they change) costs fewer multiply-adds than chaining the preconditioned update through them
// (optim/gpu_psgd.cpp explains the count; a diagonal factor is a scaling either way).
bool psgd_products_pay_off(int m, int n, double steps_until_change, bool left_diagonal = false,
                           bool right_diagonal = false);

// Groups the routed matrices' tiles by shape, in routing order within each group: whole
// matrices (block_size 0; state named after the matrix), or Shampoo's blocks of at most
// block_size (shampoo_blocks; state named "<matrix>.block<b>"); of the owned matrices only, when
// owned_matrices is given.
std::vector<TileGroup> group_tiles(const Routing& routing, int block_size = 0,
                                   const std::vector<bool>* owned_matrices = nullptr);

// d[t] = alpha op(a[t]) op(b[t]) + beta d[t] for each of `count` contiguous matrices
// (op(a) m x k, op(b) k x n, d m x n); one strided-batched fp32 GEMM, its products on TF32
// tensor cores when `tf32` (--precond-tf32). d must not alias a or b.
struct GroupGemm {
    bool tf32 = false;
    cudaStream_t stream = 0;  // Shampoo's refresh on a side stream (--shampoo-refresh-lag)
    void operator()(float* d, const float* a, bool transpose_a, const float* b, bool transpose_b, int m, int n, int k,
                    int count, float alpha = 1.0f, float beta = 0.0f) const {
        batched_matmul_f32_gpu(d, d, a, transpose_a, b, transpose_b, m, n, k, alpha, beta, count, int64_t(m) * k,
                               int64_t(k) * n, int64_t(m) * n, tf32, stream);
    }
    // The factor statistics d[t] = alpha op(a[t]) op(a[t])^T + beta d[t] (op(a) n x k; a stored
    // k x n when transpose_a; d symmetric). From n = kSymmetricGramMin in full fp32 one syrk per
    // matrix (half the multiply-adds; `bench --linalg` on an H200: 3072^2 from k = 768, 12
    // matrices, 2.5 ms against the batched GEMM's 3.5; a single 768^2 or 1024^2 syrk fills too
    // little of the GPU: 8.8 against 1.85 ms for 96). From kBlockedGramMin in full fp32 the upper
    // triangle's block rows as batched GEMMs (symmetric_gram_blocked_batched_gpu; H100, 96
    // matrices from k = 768: 768^2 1.40 against 1.83 ms, 1024^2 2.25 against 3.11), below it and
    // in TF32 the batched GEMM (TF32 block rows are slower: 0.38 against 0.27 ms at 768^2).
    static constexpr int kSymmetricGramMin = 2048;
    static constexpr int kBlockedGramMin = 512;
    void gram(float* d, const float* a, bool transpose_a, int n, int k, int count, float alpha, float beta) const {
        QOPT_CHECK(stream == 0, "GroupGemm::gram runs on the default stream only");
        if (!tf32 && n >= kSymmetricGramMin)
            symmetric_gram_batched_gpu(d, a, transpose_a, n, k, count, alpha, beta);
        else if (!tf32 && n >= kBlockedGramMin)
            symmetric_gram_blocked_batched_gpu(d, a, transpose_a, n, k, count, alpha, beta);
        else
            (*this)(d, a, transpose_a, a, !transpose_a, n, n, k, count, alpha, beta);
    }
};

// buffer = n zeros (fresh state).
inline void zeroed(DeviceBuffer<float>& buffer, size_t n) {
    buffer.resize(n);
    buffer.fill_bytes(0);
}


}  // namespace qopt
