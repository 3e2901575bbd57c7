// ZeRO-1 over data-parallel ranks: which rank owns each routed unit of the optimizer, keeps its
// state and updates its values. After the gradients are reduced, every rank steps only what it
// owns, and the owners' new values are then gathered to all ranks (on GPUs: one broadcast per
// owned range from its owner). Method matrices are owned whole, so each method's per-matrix
// algorithm and its state names stay exactly those of a single process; AdamW tensors (an
// element-wise update) and Scion's Sign / RowNorm / ColNorm tensors (rows apart) may be cut at
// row boundaries; Scion's BiasRMS tensors are owned whole. The union of the
// ranks' states is the unsharded state, and a checkpoint of any rank count resumes at any other
// (merge_rank_states, then each rank loads its share of the merged state).
//
// Balance, in three passes:
//   1. matrices, heaviest first, each to the rank with the least estimated work so far (LPT:
//      within 4/3 of the best possible maximum; ties to the rank with fewer state bytes);
//   2. Scion's tensors that are not cut (BiasRMS), largest first, each to the rank with the fewest
//      state bytes;
//   3. the tensors that can be cut, laid end to end in buffer order and cut at row boundaries so
//      that each rank in turn is filled up to the mean state per rank (the last takes the rest):
//      at most one cut per rank, and no rank ends more than a few rows above the mean unless
//      passes 1-2 already put it there.
// Estimated work per step (FLOPs, multiply-adds counted twice, refreshes spread over their
// period f; m x n matrices, s = min(m, n), l = max(m, n)):
//   Muon / Scion   k Newton-Schulz steps:           k (4 s^2 l + 2 s^3)
//   Shampoo        per block b_r x b_c:             4 b_r b_c (b_r + b_c) + 11 (b_r^3 + b_c^3) / f
//                  (statistics and preconditioning; eigendecomposition ~9 n^3 and root 2 n^3)
//   SOAP           per side with a factor (n wide):  6 m n n + (12 n^3 + 8 m n n) / f
//                  (rotations in and out, factor EMA; power iteration + QR, moves of M)
//   PSGD           p (9 m n (a + b) + 4 (a^3 + b^3)) + (1 - p) 2 m n (a + b), a = m and b = n for
//                  triangular factors (0 when diagonal), p the schedule's largest probability
// plus kElementwiseFlops m n for each matrix's element-wise passes (momentum, Adam in the basis,
// the update), so that matrices of methods whose products vanish (SOAP without factors) still
// spread. These are estimates for balancing, not measurements: the GPU's refreshes are
// latency-bound.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "optim/optimizer.hpp"

namespace qopt {

// Rows [row_begin, row_end) of an element-wise tensor, owned by `rank`.
struct RowShare {
    int rank, row_begin, row_end;
};

struct ShardPlan {
    int world_size = 1;
    // Per element-wise slot (Routing::adamw, Routing::scion): its shares in row order, covering its rows.
    std::vector<std::vector<RowShare>> adamw_shares, scion_shares;
    std::vector<int> matrix_owner;  // rank per Routing::matrices slot
    std::vector<double> rank_flops;                           // estimated optimizer FLOPs per step
    std::vector<size_t> rank_state_bytes;                     // optimizer state per rank

    OwnedSlots owned_by(int rank) const;
    // The parameter values `rank` updates, in buffer order, adjacent ranges merged. Over all
    // ranks they tile the whole buffer exactly once.
    std::vector<ParamRange> ranges_of(const Routing& routing, int rank) const;
    double flops_imbalance() const;  // largest rank's estimated work / mean (1: perfect)
    double state_imbalance() const;  // largest rank's state bytes / mean
    std::string describe() const;    // one line for the run log
};

ShardPlan plan_shards(const Routing& routing, const OptimizerConfig& config, int world_size);

constexpr double kElementwiseFlops = 10;  // per matrix value and step, see above

// The estimates above (with and without the element-wise term), and the state one matrix /
// element-wise tensor keeps (in floats).
double matrix_step_flops(int rows, int cols, const OptimizerConfig& config);
double matrix_product_flops(int rows, int cols, const OptimizerConfig& config);
size_t matrix_state_floats(int rows, int cols, const OptimizerConfig& config);
size_t elementwise_state_floats(size_t numel, bool scion_rule);

// The unsharded state from every rank's: same optimizer, step and method scalars (checked),
// tensors concatenated (a name held twice is an error).
OptimizerState merge_rank_states(const std::vector<OptimizerState>& ranks);

}  // namespace qopt
