// PSGD Kron (lixilinx/psgd_torch; evanatyourservice/kron_torch's defaults), CPU reference for
// one matrix G [m, n] with upper-triangular Kronecker factors Q1 [m, m], Q2 [n, n]
// (preconditioner P = Q1^T Q1 (x) Q2^T Q2). The reference's memory-saving rules make a factor
// diagonal instead (a vector q, Q = diag(q)): a dimension above max_size_triangular (or of
// size 1, where a 1 x 1 triangular factor is the same), every dimension when the tensor has
// fewer than min_ndim_triangular dimensions, and by memory_save_mode the largest one
// (one_diag: of two equal sizes the last; smart_one_diag: only if strictly larger) or all
// (all_diag). A diagonal factor enters A and B by scaling rows or columns, its Gram "matrix" is
// the vector of row (column) sums of squares, and its update is q -= lr_p (t1 - t2) q /
// max|t1 + t2| (element-wise).
//   M = b1 M + (1 - b1) G,  D = M / (1 - b1^t)                     (debiased momentum)
//   preconditioner update, on the steps the probability schedule picks:
//     V ~ N(0, 1) [m, n];  D += sqrt(eps_f32) mean|D| V          (the reference perturbs D in place)
//     A = Q1 D Q2^T,  B = Q1^-T V Q2^-1
//     Q1 -= lr_p / lb(AA^T + BB^T) * triu(AA^T - BB^T) Q1       (lb: a cheap lower bound of the
//     Q2 -= lr_p / lb(A^TA + B^TB) * triu(A^TA - B^TB) Q2        spectral norm, as the reference)
//   U = Q1^T Q1 D Q2^T Q2,  U *= min(1, 1.1 / rms(U))             (update RMS clipped at 1.1)
//   W -= lr (U + wd W)
// Schedule: p(n) = clamp(max_p exp(-decay (n - flat_start)), min_p, max_p) with n the step
// before this one; the update runs when a counter reaches 1/p (deterministic, as the
// reference). About every 100 updates (probability 0.01, from a seeded generator) the two
// factors are rebalanced to equal max-abs norms.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/json.hpp"
#include "optim/dense.hpp"

namespace qopt {

// The reference's memory_save_mode values (None spelled "none").
inline const std::vector<std::string> kPsgdMemorySaveModes = {"none", "smart_one_diag", "one_diag", "all_diag"};

struct PsgdConfig {
    double lr = 3e-4;
    double beta1 = 0.9;
    double precond_lr = 0.1;
    double precond_init_scale = 1.0;
    double update_prob_max = 1.0, update_prob_min = 0.03, update_prob_decay = 0.001;
    long update_prob_flat_start = 500;
    int max_size_triangular = 8192;
    int min_ndim_triangular = 2;
    std::string memory_save_mode = "none";  // none, smart_one_diag, one_diag, all_diag
    bool momentum_into_precond_update = true;
    double balance_probability = 0.01;  // per preconditioner update, as the reference
    uint64_t seed = 42;
    double update_probability(long n) const;
    // Whether an m x n matrix's left and right factors are diagonal (the rules above).
    std::pair<bool, bool> diagonal_factors(int rows, int cols) const;
    void validate() const;
    Json to_json() const;
};

// The optimizer-wide decisions of one step (shared by every matrix, as in the reference).
struct PsgdSchedule {
    long prob_step = 0;       // steps scheduled so far
    long update_counter = 0;  // steps since the last preconditioner update
    uint64_t balance_draws = 0;
    struct Decision {
        bool update = false, balance = false;
    };
    Decision next(const PsgdConfig& c);
    Json to_json() const;
    static PsgdSchedule from_json(const Json& j);
};

struct PsgdMatrixState {
    std::vector<float> momentum, q_left, q_right;  // [m, n]; [m, m] or [m] when diagonal; [n, n] or [n]
    bool left_diagonal = false, right_diagonal = false;
    void init(int rows, int cols, const PsgdConfig& c);
};

// Probe V for matrix `matrix_index` at optimizer step `step` (counter-based normal numbers).
float psgd_probe(const PsgdConfig& c, long step, int matrix_index, size_t element);

// lb(a): the reference's lower bound of ||a||_2 for symmetric a, from its largest column.
double psgd_norm_lower_bound(const Dense& a);

// A factor update that comes out non-finite is not taken: the factor stays as it was
// (commit_preconditioner). Returns the number of factor updates not taken.
int psgd_update_cpu(float* param, const float* grad, PsgdMatrixState& state, int rows, int cols, double lr,
                     double weight_decay, long step, int matrix_index, PsgdSchedule::Decision decision,
                     const PsgdConfig& c);

}  // namespace qopt
