// Shampoo as facebookresearch/optimizers' Distributed Shampoo computes it for a matrix, CPU
// reference. The matrix is cut into blocks of at most block_size x block_size; each block B
// (gradient G_B) has its own Kronecker factors and Adam grafting state:
//   L += G G^T, R += G^T G        (beta2 = 1, the reference's default; else an EMA, bias-corrected)
//   at the start step, then every `precondition_frequency` steps after it:
//     L_root = (L + eps I)^(-1/r), R_root likewise, by a symmetric eigendecomposition
//     (eigenvalues shifted up to >= 0 first); r = 4 for matrices. With a kept eigenbasis (the
//     reference's EigendecomposedShampooPreconditionerConfig: eigen_tolerance > 0 or the QR
//     method), the eigendecomposition is amortized as the reference's matrix_eigendecomposition
//     does it, from the eigenvectors V of the last refresh (the identity before the first):
//       B = V^T L V; within tolerance means ||B - diag(B)||_F <= tolerance ||B||_F;
//       eigh: within tolerance, V stays and diag(B) are the eigenvalues; else L's eigendecomposition;
//       qr: while not within tolerance, at most qr_iterations times: B = Q R (QR), B <- R Q = Q^T B Q,
//           V <- V Q; then diag(B) are the eigenvalues, the pairs sorted by ascending value
//           (stable, as the reference: the next refresh's QR starts from this order).
//   weight decay as the reference's weight_decay_type: l2 adds alpha W to G before everything
//   (factors, filtered gradient, grafting); decoupled, corrected and independent add alpha W to
//   the direction (below), with alpha = wd, wd lr / peak lr and wd / peak lr respectively
//   F = b1 F + (1 - b1) G                                              (filtered gradient)
//   F_hat = D / (1 - b3 b1^(t-1)), D = b3 F_old + (1 - b3) G (b3 = beta3; b3 = b1 gives D = F
//           and the usual 1 - b1^t; without bias correction the divisor is 1; b1 = 0: D = G)
//   grafting (the reference's grafting_config): A = F_hat / (sqrt(V / bias_g) + eps_g) with
//     adam:    V = bg V + (1 - bg) G^2, bias_g = 1 - bg^t
//     rmsprop: V = bg V + (1 - bg) G^2, bias_g = 1
//     adagrad: V = V + G^2, bias_g = 1
//     (adam, rmsprop with drop_weighting: V = bg V + G^2, bias_g = 1); sgd: A = F_hat
//   S = L_root F_hat R_root,  direction = S * ||A||_F / ||S||_F     (Shampoo's direction, A's size;
//   without grafting, S itself)
//   before the first root (t < start step): direction = A
//   with refresh_lag K > 0: the roots computed at refresh step s are held (pending) and replace
//   the roots in use at step s + K, before that step's direction; the direction is A before
//   start step + K
//   decoupled weight decay: direction += alpha W (before momentum, as the reference orders it)
//   optional momentum (ClassicMomentumConfig, dampening d): K = mu K + (1 - d) direction,
//   direction = K (Nesterov: (1 - d) direction + mu K); then
//   W = W - lr direction                   (without momentum: W (1 - lr alpha) - lr direction)
#pragma once
#include <vector>

#include "core/json.hpp"
#include "optim/dense.hpp"

namespace qopt {

// How a refresh computes each factor's eigendecomposition (the reference's
// amortized_computation_config): cuSOLVER's / optim/dense's symmetric eigendecomposition (eigh), or
// the QR algorithm warm-started from the kept eigenbasis (qr).
enum class ShampooEigenMethod { eigh, qr };

// The grafting method: its direction A sets the size of Shampoo's (the reference's
// SGD/AdaGrad/RMSprop/AdamPreconditionerConfig as grafting_config, or none).
enum class ShampooGrafting { none, sgd, adagrad, rmsprop, adam };

// Where weight decay enters and how large it is (the reference's WeightDecayType).
enum class ShampooDecay { l2, decoupled, corrected, independent };

struct ShampooConfig {
    double lr = 1e-3;
    double beta1 = 0.9, beta2 = 1.0;
    double eps = 1e-12;
    double beta3 = -1.0;          // weight of the step's own gradient in F_hat's EMA (-1: beta1, the reference's default)
    bool bias_correction = true;  // use_bias_correction (of F_hat)
    double momentum = 0.0;
    bool nesterov = false;
    double dampening = 0.0;  // ClassicMomentumConfig.dampening
    ShampooDecay decay_type = ShampooDecay::decoupled;  // weight_decay_type (the reference's default)
    int block_size = 1024;            // max_preconditioner_dim
    int precondition_frequency = 10;  // the study's / PEERS.md setting (the reference's default is 1)
    int start_preconditioning_step = -1;  // -1: precondition_frequency
    int inverse_root = 0;                 // 0: 2 x tensor order = 4 for matrices
    ShampooGrafting grafting = ShampooGrafting::adam;  // the study's choice (the reference's default: none)
    double graft_beta2 = 0.999, graft_eps = 1e-8;
    bool graft_drop_weighting = false;  // drop_weighting_factor_on_gsquare (rmsprop, adam)
    ShampooEigenMethod eigen_method = ShampooEigenMethod::eigh;
    double eigen_tolerance = 0.0;  // EigendecompositionConfig.tolerance (0: the reference's default)
    int qr_iterations = 1;         // QREigendecompositionConfig.max_iterations
    // Steps from a refresh to its roots taking effect (0: at once, as the reference). With lag K the
    // roots of the factors at refresh step s are used from step s + K on (the GPU computes them
    // on a side stream meanwhile, during steps s+1 .. s+K's forward and backward passes); Shampoo's
    // direction starts at start step + K. Stale roots by K steps, as the asynchronous refreshes of
    // Anil et al.'s "Scalable Second Order Optimization"; not the reference's behaviour.
    int refresh_lag = 0;
    // Whether refreshes start from the last eigenbasis (kept in the state with its eigenvalues).
    bool keeps_eigenbasis() const { return eigen_method == ShampooEigenMethod::qr || eigen_tolerance > 0; }
    int root() const { return inverse_root > 0 ? inverse_root : 4; }
    bool grafts() const { return grafting != ShampooGrafting::none; }
    // The grafting's second moment V = graft_keep() V + graft_weight() G^2 (adagrad, rmsprop,
    // adam; none for sgd and none) and its divisor at step t.
    bool graft_second_moment() const { return grafting != ShampooGrafting::none && grafting != ShampooGrafting::sgd; }
    double graft_keep() const { return grafting == ShampooGrafting::adagrad ? 1.0 : graft_beta2; }
    double graft_weight() const {
        return grafting == ShampooGrafting::adagrad || graft_drop_weighting ? 1.0 : 1 - graft_beta2;
    }
    double graft_divisor(long step) const;
    // beta3 in effect: beta1 when -1; 0 without a filtered gradient (beta1 = 0: D = G).
    double step_beta3() const { return beta1 == 0 ? 0.0 : beta3 < 0 ? beta1 : beta3; }
    // F_hat's divisor at step t (1-based): 1 - b3 b1^(t-1), or 1 without bias correction.
    double filter_divisor(long step) const;
    // alpha (see the header) for weight decay wd at learning rate lr of peak peak_lr.
    double decay_coefficient(double wd, double lr, double peak_lr) const;
    int start_step() const { return start_preconditioning_step > 0 ? start_preconditioning_step : precondition_frequency; }
    // The reference's schedule: roots first at the start step, then at every multiple of the
    // frequency after it; Shampoo's direction from the start step on (the grafting one before).
    bool refreshes_roots(long step) const {
        return step == start_step() || (step > start_step() && step % precondition_frequency == 0);
    }
    // With a lag, the step at which the roots of the refresh K steps earlier take effect.
    bool switches_roots(long step) const { return refresh_lag > 0 && refreshes_roots(step - refresh_lag); }
    bool preconditions(long step) const { return step >= start_step() + refresh_lag; }
    // Steps from the start step's refresh to the next one (the lag must stay below it).
    int first_refresh_gap() const { return (start_step() / precondition_frequency + 1) * precondition_frequency - start_step(); }
    void validate() const;
    Json to_json() const;
};

// Refreshes of factors with a kept eigenbasis and eigh (--shampoo-eigen-tolerance): how many kept
// the last basis (within tolerance) and how many ran an eigendecomposition.
struct EigenRefreshCounts {
    long kept = 0, decomposed = 0;
};

// Block b of a [rows, cols] matrix: rows [row0, row0 + block_rows), cols likewise.
struct ShampooBlock {
    int row0, col0, block_rows, block_cols;
};
std::vector<ShampooBlock> shampoo_blocks(int rows, int cols, int block_size);
const char* shampoo_decay_name(ShampooDecay type);  // "l2", "decoupled", "corrected", "independent"
const char* shampoo_grafting_name(ShampooGrafting type);  // "none", "sgd", "adagrad", "rmsprop", "adam"
const char* shampoo_eigen_method_name(ShampooEigenMethod method);  // "eigh", "qr"

struct ShampooBlockState {
    std::vector<float> left, right, left_root, right_root;  // [br, br], [bc, bc]
    std::vector<float> filtered, graft_sq, momentum;        // [br, bc] (momentum only if used)
    // With a kept eigenbasis only: the factors' eigenvectors (identity at first) and eigenvalues
    // (ones at first) from the last refresh, [br, br], [br], [bc, bc], [bc].
    std::vector<float> left_vectors, left_values, right_vectors, right_values;
    // With a refresh lag only: the roots of the last refresh until they take effect (as computed,
    // possibly non-finite: the check is at the switch), [br, br], [bc, bc].
    std::vector<float> pending_left_root, pending_right_root;
    void init(const ShampooBlock& block, const ShampooConfig& c);
};

// (a + eps I)^(-1/root) for symmetric positive semi-definite a.
Dense shampoo_inverse_root(const Dense& a, double eps, int root);
// The same from a's eigendecomposition (values in any order): vectors diag(p) vectors^T with
// p_j = (values_j - min(min_k values_k, 0) + eps)^(-1/root).
Dense shampoo_inverse_root(const SymmetricEigen& eigen, double eps, int root);
// The reference's criterion: ||b - diag(b)||_F <= tolerance ||b||_F.
bool eigenbasis_within_tolerance(const Dense& b, double tolerance);
// a's eigendecomposition amortized from the kept eigenvectors (see the top of this file; values
// unsorted unless a full eigendecomposition ran).
// counts (if given) adds this factor to the eigh path's tally.
SymmetricEigen shampoo_amortized_eigen(const Dense& a, const Dense& kept_vectors, const ShampooConfig& c,
                                       EigenRefreshCounts* counts = nullptr);

// step: 1, 2, ... (the optimizer's step after incrementing). decay: alpha, the weight decay's
// coefficient (ShampooConfig::decay_coefficient), entering as c.decay_type says. A root that comes out non-finite
// (overflowing factors) is not taken: the block keeps its last good root (commit_preconditioner).
// Returns the number of roots not taken.
int shampoo_update_cpu(float* param, const float* grad, std::vector<ShampooBlockState>& blocks, int rows, int cols,
                        double lr, double decay, long step, const ShampooConfig& c,
                        EigenRefreshCounts* counts = nullptr);

}  // namespace qopt
