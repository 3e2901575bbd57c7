// SOAP (nikhilvyas/SOAP, "SOAP: Improving and Stabilizing Shampoo using Adam"), CPU reference
// for one matrix G [m, n]. Adam runs in the eigenbasis of Shampoo's factors:
//   L = lerp(L, G G^T, 1 - sb),  R = lerp(R, G^T G, 1 - sb)         (sb = shampoo_beta or beta2)
//   G' = QL^T G QR                                                 (rotate into the eigenbasis)
//   M = b1 M + (1 - b1) G',  V = b2 V + (1 - b2) G'^2              (M and V live in the rotated basis)
//   W -= lr sqrt(1 - b2^t) / (1 - b1^t) * QL (M / (sqrt(V) + eps)) QR^T,  then W -= lr wd W
// The first call only accumulates L, R and takes their eigenvectors (descending eigenvalues);
// the update starts on the second call (t counts from there), as the reference skips step 1.
// Every `precondition_frequency` updates the bases are refreshed by one power-iteration step
// and QR: sort Q's columns by the estimated eigenvalues diag(Q^T L Q) (permuting V's axis to
// match), Q = qr(L Q); M is rotated from the old basis to the new one.
// As the reference, a side longer than max_precond_dim has no factor: its basis is the identity
// (one-sided SOAP; both sides: Adam with the first step skipped). With merge_dims, a matrix of
// m n <= max_precond_dim values is preconditioned as one dimension of m n, i.e. as the [1, m n]
// view whose left side has no factor (the reference merges dimensions while their product stays
// within max_precond_dim; for two dimensions that is all or nothing).
#pragma once
#include <vector>

#include "core/json.hpp"
#include "optim/dense.hpp"

namespace qopt {

struct SoapConfig {
    double lr = 3e-3;
    double beta1 = 0.95, beta2 = 0.95;
    double shampoo_beta = -1;  // < 0: use beta2
    double eps = 1e-8;
    int precondition_frequency = 10;
    int max_precond_dim = 10000;
    bool normalize_grads = false;
    bool correct_bias = true;
    bool merge_dims = false;
    double factor_beta() const { return shampoo_beta >= 0 ? shampoo_beta : beta2; }
    void validate() const;
    Json to_json() const;
};

// How SOAP sees an m x n matrix: the [rows, cols] view it rotates, and which sides have a factor.
struct SoapView {
    int rows, cols;
    bool left, right;  // false: no factor, the identity basis
};
SoapView soap_view(int rows, int cols, const SoapConfig& c);

// One matrix's state: factors left [m, m], right [n, n] (of the view; empty for a side without
// one), their bases, and Adam's moments [m, n].
struct SoapMatrixState {
    std::vector<float> left, right, left_basis, right_basis, exp_avg, exp_avg_sq;
    SoapView view{0, 0, false, false};
    void init(int rows, int cols, const SoapConfig& c);
};

// call: 1 on the first call (which only sets up the bases), then 2, 3, ...
// A basis that comes out non-finite (overflowing factors) is not taken: the matrix keeps its
// last good basis, or the identity at the first call (commit_preconditioner), and its moments
// stay as they are. Returns the number of bases not taken.
int soap_update_cpu(float* param, const float* grad, SoapMatrixState& state, int rows, int cols, double lr,
                     double weight_decay, long call, const SoapConfig& c);

// The eigenvectors of a symmetric matrix as SOAP's first call takes them (descending order).
Dense soap_initial_basis(const Dense& factor);
// One refresh: returns the new basis, and the permutation applied to the old basis' columns.
Dense soap_refresh_basis(const Dense& factor, const Dense& basis, std::vector<int>& order);

}  // namespace qopt
