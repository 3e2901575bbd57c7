// Small dense linear algebra in double for the optimizers' CPU references (row-major
// matrices): products with either operand transposed, the symmetric eigendecomposition
// (Householder tridiagonalization and the implicit QL iteration, as LAPACK's steqr), QR by
// Householder reflections, and solving with an upper-triangular matrix from the right.
// The GPU versions never call these; the tests check them by their algebraic properties.
#pragma once
#include <cstddef>
#include <vector>

namespace qopt {

struct Dense {
    int rows = 0, cols = 0;
    std::vector<double> values;
    Dense() = default;
    Dense(int r, int c, double fill = 0.0) : rows(r), cols(c), values(size_t(r) * c, fill) {}
    static Dense identity(int n, double diagonal = 1.0);
    double& operator()(int r, int c) { return values[size_t(r) * cols + c]; }
    double operator()(int r, int c) const { return values[size_t(r) * cols + c]; }
    Dense transposed() const;
};

// op(a) op(b) where op transposes when the flag says so.
Dense matmul(const Dense& a, const Dense& b, bool transpose_a = false, bool transpose_b = false);

// Symmetric a = vectors diag(values) vectors^T; values in descending order, vectors' columns
// the matching unit eigenvectors. Non-finite a gives NaN values and vectors.
struct SymmetricEigen {
    std::vector<double> values;
    Dense vectors;
};
SymmetricEigen symmetric_eigen(const Dense& a);

// a [m, n], m >= n: the m x n factor Q with orthonormal columns and a = Q R.
Dense householder_q(const Dense& a);

// x [k, n] times the inverse of the upper-triangular u [n, n].
Dense solve_upper_right(const Dense& x, const Dense& u);

double frobenius_norm(const Dense& a);

// (a + eps I)^(-1/root) of a symmetric positive semi-definite a by the coupled inverse Newton
// iteration, as Distributed Shampoo's matrix_inverse_root_newton (CoupledNewtonConfig): with
// z = (root + 1) / (2 ||a + eps I||_F), start X = z^(1/root) I, M = z (a + eps I); then, while
// max |M - I| > tolerance and fewer than max_iterations steps:
//   M' = (1 + 1/root) I - M / root,   X <- X M',   M <- M'^root M.
// M stays X^root (a + eps I), so M -> I gives X -> (a + eps I)^(-1/root). The result holds X,
// the steps taken and whether the tolerance was met.
struct NewtonRoot {
    Dense root;
    int iterations = 0;
    bool converged = false;
};
NewtonRoot coupled_newton_inverse_root(const Dense& a, int root, double eps, int max_iterations, double tolerance);

// fp32 state <-> Dense (the references keep state in fp32 and compute in double).
Dense dense_from(const float* values, int rows, int cols);
void store_floats(const Dense& d, std::vector<float>& out);

bool all_finite(const Dense& a);

// A freshly computed preconditioner matrix (inverse root, eigenbasis, Kronecker factor; square)
// replaces `kept` only when every entry is finite, and fits fp32. Otherwise the last good one
// stays, or the identity when there was none yet (kept all zero). Returns whether it was taken;
// the GPU methods apply the same rule (commit_finite_tiles_gpu).
bool commit_preconditioner(std::vector<float>& kept, const Dense& candidate);

// Indices of values in ascending / descending order (stable; NaN last in both, so that a
// non-finite estimate cannot break the sort's ordering).
std::vector<int> ascending_order(const std::vector<double>& values);
std::vector<int> descending_order(const std::vector<double>& values);
// The same for each of the matrices' values held back to back, n each (as the GPU methods
// download them): the orders concatenated, each indexing its own matrix's n values.
std::vector<int> orders_per_matrix(const std::vector<float>& values, int n, bool descending);

}  // namespace qopt
