// Shampoo as facebookresearch/optimizers' Distributed Shampoo computes it for a matrix, CPU
// reference. The matrix is cut into blocks of at most block_size x block_size; each block B
// (gradient G_B) has its own Kronecker factors and Adam grafting state:
//   L += G G^T, R += G^T G        (beta2 = 1, the reference's default; else an EMA, bias-corrected)
//   every `precondition_frequency` steps:  L_root = (L + eps I)^(-1/r), R_root likewise, by a
//     symmetric eigendecomposition (eigenvalues shifted up to >= 0 first); r = 4 for matrices
//   F = b1 F + (1 - b1) G, F_hat = F / (1 - b1^t)                    (filtered gradient)
//   grafting (Adam): V = bg V + (1 - bg) G^2, A = F_hat / (sqrt(V / (1 - bg^t)) + eps_g)
//   S = L_root F_hat R_root,  direction = S * ||A||_F / ||S||_F     (Shampoo's direction, Adam's size)
//   before the first root (t < start step): direction = A
//   optional momentum: K = mu K + direction (Nesterov: direction + mu K); then
//   W = W (1 - lr wd) - lr direction                                 (decoupled weight decay)
// With refine_tolerance > 0 (not in the reference; --shampoo-refine-tolerance) a root refresh
// first tries one matmul-only refinement of the last refresh's eigenbasis, kept as state
// (shampoo_refined_inverse_root), and takes the full eigendecomposition only where that step's
// estimated error exceeds the tolerance.
#pragma once
#include <vector>

#include "core/json.hpp"
#include "optim/dense.hpp"

namespace qopt {

struct ShampooConfig {
    double lr = 1e-3;
    double beta1 = 0.9, beta2 = 1.0;
    double eps = 1e-12;
    double momentum = 0.0;
    bool nesterov = false;
    int block_size = 1024;            // max_preconditioner_dim
    int precondition_frequency = 10;  // the study's / PEERS.md setting (the reference's default is 1)
    int start_preconditioning_step = -1;  // -1: precondition_frequency
    int inverse_root = 0;                 // 0: 2 x tensor order = 4 for matrices
    bool adam_grafting = true;            // grafting_config=AdamGraftingConfig (the study's choice)
    double refine_tolerance = 0;          // 0: a full eigendecomposition at every refresh (reference)
    double graft_beta2 = 0.999, graft_eps = 1e-8;
    int root() const { return inverse_root > 0 ? inverse_root : 4; }
    int start_step() const { return start_preconditioning_step > 0 ? start_preconditioning_step : precondition_frequency; }
    void validate() const;
    Json to_json() const;
};

// Block b of a [rows, cols] matrix: rows [row0, row0 + block_rows), cols likewise.
struct ShampooBlock {
    int row0, col0, block_rows, block_cols;
};
std::vector<ShampooBlock> shampoo_blocks(int rows, int cols, int block_size);

struct ShampooBlockState {
    std::vector<float> left, right, left_root, right_root;  // [br, br], [bc, bc]
    std::vector<float> left_basis, right_basis;             // eigenbases (refine_tolerance > 0 only)
    std::vector<float> filtered, graft_sq, momentum;        // [br, bc] (momentum only if used)
    void init(const ShampooBlock& block, const ShampooConfig& c);
};

// (a + eps I)^(-1/root) for symmetric positive semi-definite a, by its eigendecomposition
// (eigenvalues shifted up to >= 0 first); basis = the eigenvectors.
struct ShampooRoot {
    Dense root, basis;
};
ShampooRoot shampoo_inverse_root(const Dense& a, double eps, int root);

// The warm-started root: one step of Ogita & Aishima's refinement of a symmetric
// eigendecomposition ("Iterative refinement for symmetric eigenvalue decomposition", 2018),
// from basis X (columns near eigenvectors of a; four n^3 products instead of an
// eigendecomposition):
//   R = I - X^T X,  S = X^T a X,  lambda_i = S_ii / (1 - R_ii)
//   E_ii = R_ii / 2;  i != j: E_ij = (S_ij + lambda_j R_ij) / (lambda_j - lambda_i) where
//     |S_ij| <= sqrt(tolerance) |lambda_j - lambda_i| (a rotation small enough that the step's
//     second-order error, ~E_ij^2, stays within the tolerance); else E_ij = R_ij / 2 and the pair
//     is left unrotated (S_ij dropped)
//   basis = X (I + E),  root = basis diag(mu^(-1/r)) basis^T,  mu_i = lambda_i - min(lambda, 0) + eps
// A dropped S_ij moves the root by about S_ij f[mu_i, mu_j] (f(mu) = mu^(-1/r); divided
// difference), so error = the largest |S_ij f[mu_i, mu_j]| / f(min(mu_i, mu_j)) over dropped pairs,
// not counting S_ij within the fp32 products' rounding of S, 2 sqrt(n) 2^-24 max|lambda| (what
// an fp32 computation cannot resolve either way). accepted: error <= tolerance and X was a basis
// (every X^T X diagonal entry above 1/2: an all-zero X, none yet, is not).
struct RefinedRoot {
    Dense root, basis;
    double error = 0;
    bool accepted = false;
};
RefinedRoot shampoo_refined_inverse_root(const Dense& a, const Dense& basis, double eps, int root, double tolerance);

// step: 1, 2, ... (the optimizer's step after incrementing). A root that comes out non-finite
// (overflowing factors) is not taken: the block keeps its last good root (commit_preconditioner).
// Returns the number of roots not taken.
int shampoo_update_cpu(float* param, const float* grad, std::vector<ShampooBlockState>& blocks, int rows, int cols,
                        double lr, double weight_decay, long step, const ShampooConfig& c);

}  // namespace qopt
