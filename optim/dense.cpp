#include "optim/dense.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.hpp"
#include "kernels/matmul.hpp"

namespace qopt {

Dense Dense::identity(int n, double diagonal) {
    Dense d(n, n);
    for (int i = 0; i < n; ++i) d(i, i) = diagonal;
    return d;
}

Dense Dense::transposed() const {
    Dense t(cols, rows);
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) t(c, r) = (*this)(r, c);
    return t;
}

// out = op(a) op(b): the CPU linear layer's product (kernels/matmul.hpp: out = in weight^T,
// register tiles, every entry summed over the inner index in order, so the result does not
// depend on the thread count) with in = op(a) and weight = op(b)^T, both made row-major first.
// On the 2-core development machine (AVX-512): 512^3 in 0.025 s, 768^3 in 0.063 s (11-14
// GFLOP/s; `bench --cpu-linalg`), against 0.055 and 0.17 s as row-by-column dot products.
Dense matmul(const Dense& a_in, const Dense& b_in, bool transpose_a, bool transpose_b) {
    const Dense a = transpose_a ? a_in.transposed() : a_in;
    const Dense bt = transpose_b ? b_in : b_in.transposed();  // bt holds op(b)^T: rows are op(b)'s columns
    QOPT_CHECK(a.cols == bt.cols, "matmul: inner dimensions ", a.cols, " and ", bt.cols, " differ");
    Dense out(a.rows, bt.rows);
    matmul_forward_cpu(out.values.data(), a.values.data(), bt.values.data(), static_cast<const double*>(nullptr),
                       a.rows, a.cols, bt.rows);
    return out;
}

namespace {

// The unit Householder vector w of x[0..len): (I - 2 w w^T) x = alpha e_1 with alpha =
// -sign(x_0) ||x|| (so x - alpha e_1 has no cancellation); w empty when x is zero (H = I).
struct Reflector {
    std::vector<double> w;
    double alpha;
};
Reflector householder_reflector(const double* x, int len) {
    double norm = 0;
    for (int i = 0; i < len; ++i) norm += x[i] * x[i];
    norm = std::sqrt(norm);
    Reflector h{std::vector<double>(x, x + len), x[0] > 0 ? -norm : norm};
    h.w[0] -= h.alpha;
    double w_norm = 0;
    for (double v : h.w) w_norm += v * v;
    if (w_norm == 0) {
        h.w.clear();
        return h;
    }
    w_norm = std::sqrt(w_norm);
    for (double& v : h.w) v /= w_norm;
    return h;
}

// y <- (I - 2 w w^T) y for contiguous y of w's length: y -= 2 (w . y) w.
void reflect(double* y, const std::vector<double>& w) {
    double dot = 0;
    for (size_t i = 0; i < w.size(); ++i) dot += w[i] * y[i];
    for (size_t i = 0; i < w.size(); ++i) y[i] -= 2 * w[i] * dot;
}

// Householder tridiagonalization of symmetric a (row-major; its trailing blocks are overwritten,
// entries outside the tridiagonal left stale): a = Q T Q^T with T tridiagonal (diagonal ->
// diagonal, off_diagonal[i] = T(i, i + 1)) and Q = H_0 H_1 ... H_{n-3}, H_k = I - 2 v_k v_k^T
// acting on indices k+1.. . Step k maps row k's part right of the diagonal onto alpha e_1 and
// updates the trailing block A22 <- H A22 H as a symmetric rank-2 update: p = 2 A22 v,
// w = p - (v^T p) v, A22 <- A22 - v w^T - w v^T. Returns Q^T (row i = column i of Q).
Dense tridiagonalize(Dense& a, std::vector<double>& diagonal, std::vector<double>& off_diagonal) {
    const int n = a.rows;
    diagonal.assign(size_t(n), 0.0);
    off_diagonal.assign(size_t(n), 0.0);
    std::vector<std::vector<double>> reflectors(size_t(std::max(n - 2, 0)));  // empty: H_k = I
    std::vector<double> p(static_cast<size_t>(n)), w(static_cast<size_t>(n));
    for (int k = 0; k + 2 < n; ++k) {
        const int first = k + 1, len = n - first;
        Reflector h = householder_reflector(&a(k, first), len);
        if (h.w.empty()) continue;  // already tridiagonal in this row: off_diagonal[k] is a(k, k+1) = 0
        off_diagonal[size_t(k)] = h.alpha;
        const std::vector<double>& v = reflectors[size_t(k)] = std::move(h.w);
#pragma omp parallel for schedule(static)
        for (int i = 0; i < len; ++i) {
            const double* row = &a(first + i, first);
            double sum = 0;
            for (int j = 0; j < len; ++j) sum += row[j] * v[size_t(j)];
            p[size_t(i)] = 2 * sum;
        }
        double vp = 0;
        for (int i = 0; i < len; ++i) vp += v[size_t(i)] * p[size_t(i)];
        for (int i = 0; i < len; ++i) w[size_t(i)] = p[size_t(i)] - vp * v[size_t(i)];
#pragma omp parallel for schedule(static)
        for (int i = 0; i < len; ++i) {
            double* row = &a(first + i, first);
            for (int j = 0; j < len; ++j) row[j] -= v[size_t(i)] * w[size_t(j)] + w[size_t(i)] * v[size_t(j)];
        }
    }
    for (int i = 0; i < n; ++i) diagonal[size_t(i)] = a(i, i);
    if (n >= 2) off_diagonal[size_t(n - 2)] = a(n - 2, n - 1);  // the last pair has no reflection
    // Q^T = H_{n-3} ... H_0 (each H_k symmetric), built from the identity by multiplying with
    // H_{n-3} first, from the right: M <- M H_k reflects columns k+1.. of every row of M.
    Dense q_transposed = Dense::identity(n);
    for (int k = n - 3; k >= 0; --k) {
        const std::vector<double>& v = reflectors[size_t(k)];
        if (v.empty()) continue;
#pragma omp parallel for schedule(static)
        for (int r = 0; r < n; ++r) reflect(&q_transposed(r, k + 1), v);
    }
    return q_transposed;
}

// One Givens rotation of a QL sweep: rows `row` and `row + 1` of the transposed eigenvectors
// become (c x - s y, s x + c y) for rows x, y.
struct PlaneRotation {
    int row;
    double c, s;
};

// Applies a sweep's rotations, in order, to every column of vectors_t; the columns are
// independent, so threads take slices of them.
void apply_rotations(Dense& vectors_t, const std::vector<PlaneRotation>& rotations) {
    const int n = vectors_t.cols;
    constexpr int kSlice = 64;
#pragma omp parallel for schedule(static)
    for (int first = 0; first < n; first += kSlice) {
        const int last = std::min(n, first + kSlice);
        for (const PlaneRotation& g : rotations) {
            double* x = &vectors_t(g.row, 0);
            double* y = &vectors_t(g.row + 1, 0);
            for (int k = first; k < last; ++k) {
                const double xk = x[k], yk = y[k];
                x[k] = g.c * xk - g.s * yk;
                y[k] = g.s * xk + g.c * yk;
            }
        }
    }
}

// Implicit QL iteration with Wilkinson-style shifts on the symmetric tridiagonal matrix
// (diagonal, off_diagonal), accumulating its rotations into the rows of vectors_t. For each l,
// sweeps run over the unreduced block l..m (m: the first index from l whose off-diagonal is
// negligible) until off_diagonal[l] is negligible too; a sweep
// chases the bulge of the shifted QL step from m up to l with one rotation per pair. Returns
// false when an eigenvalue takes more than 60 sweeps (never seen on finite input).
bool tridiagonal_ql(std::vector<double>& diagonal, std::vector<double>& off_diagonal, Dense& vectors_t) {
    const int n = int(diagonal.size());
    std::vector<double>& d = diagonal;
    std::vector<double>& e = off_diagonal;
    const double eps = std::numeric_limits<double>::epsilon();
    // An off-diagonal entry counts as zero below eps ||T|| (||T|| bounded by its largest row sum):
    // the rounding of every sweep is of that size, so a test relative to the two diagonal entries
    // alone would never be met by a block of (near-)zero eigenvalues beside large ones.
    double t_norm = 0;
    for (int i = 0; i < n; ++i)
        t_norm = std::max(t_norm, std::abs(d[size_t(i)]) + std::abs(e[size_t(i)]) + (i ? std::abs(e[size_t(i - 1)]) : 0.0));
    const double negligible = eps * t_norm;
    std::vector<PlaneRotation> rotations;
    for (int l = 0; l < n; ++l) {
        for (int sweep = 0;; ++sweep) {
            int m = l;
            while (m + 1 < n && std::abs(e[size_t(m)]) > negligible) ++m;
            if (m == l) break;
            if (sweep == 60) return false;
            // Shift: the eigenvalue of the leading 2 x 2 block [d_l e_l; e_l d_l+1] closer to d_l.
            double g = (d[size_t(l + 1)] - d[size_t(l)]) / (2 * e[size_t(l)]);
            double r = std::hypot(g, 1.0);
            g = d[size_t(m)] - d[size_t(l)] + e[size_t(l)] / (g + std::copysign(r, g));
            double s = 1, c = 1, p = 0;
            bool underflow = false;
            rotations.clear();
            for (int i = m - 1; i >= l; --i) {
                const double f = s * e[size_t(i)], b = c * e[size_t(i)];
                r = std::hypot(f, g);
                e[size_t(i + 1)] = r;
                if (r == 0) {  // the bulge vanished: deflate at i + 1 and start again
                    d[size_t(i + 1)] -= p;
                    e[size_t(m)] = 0;
                    underflow = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[size_t(i + 1)] - p;
                r = (d[size_t(i)] - g) * s + 2 * c * b;
                p = s * r;
                d[size_t(i + 1)] = g + p;
                g = c * r - b;
                // Columns i, i+1 of the eigenvector matrix (rows of vectors_t): (x, y) <- (c x - s y,
                // s x + c y) for x the column i, y the column i+1.
                rotations.push_back({i, c, s});
            }
            apply_rotations(vectors_t, rotations);
            if (underflow) continue;
            d[size_t(l)] -= p;
            e[size_t(l)] = g;
            e[size_t(m)] = 0;
        }
    }
    return true;
}

}  // namespace

// Householder tridiagonalization, then the implicit QL iteration on the tridiagonal matrix (as
// LAPACK's steqr does; ~9 n^3 flops with the vectors, against cyclic Jacobi's ~30 n^3 in strided
// column passes: 512 x 512 in 0.2 s instead of 21 s on the 2-core development machine). Backward
// stable: the pairs are exact for a matrix within ~n u ||a|| of a. Non-finite input, or a QL iteration that does not converge, gives NaN values and vectors,
// which every caller's finiteness check then refuses.
SymmetricEigen symmetric_eigen(const Dense& input) {
    QOPT_CHECK(input.rows == input.cols, "symmetric_eigen: matrix is not square");
    const int n = input.rows;
    auto undefined = [n] { return SymmetricEigen{std::vector<double>(size_t(n), std::nan("")), Dense(n, n, std::nan(""))}; };
    if (!all_finite(input)) return undefined();
    Dense a = input;
    std::vector<double> diagonal, off_diagonal;
    Dense vectors_t = tridiagonalize(a, diagonal, off_diagonal);
    if (!tridiagonal_ql(diagonal, off_diagonal, vectors_t)) return undefined();
    const std::vector<int> order = descending_order(diagonal);
    SymmetricEigen result;
    result.vectors = Dense(n, n);
    for (int j = 0; j < n; ++j) {
        result.values.push_back(diagonal[size_t(order[size_t(j)])]);
        const double* vector = &vectors_t(order[size_t(j)], 0);
        for (int k = 0; k < n; ++k) result.vectors(k, j) = vector[k];
    }
    return result;
}

// Householder QR: reflections H_j = I - 2 w w^T zero the sub-diagonal of column j; Q is
// H_0 H_1 ... H_{n-1} applied to the first n columns of the identity. Both passes work on
// transposed copies (a row per column of a, of Q), so every dot product and update runs along
// contiguous memory, and the columns a reflection updates are independent (threads take them).
// 512 x 512: 0.07-0.08 s against 1.8 s column-wise on the 2-core development machine.
Dense householder_q(const Dense& input) {
    const int m = input.rows, n = input.cols;
    QOPT_CHECK(m >= n, "householder_q: needs rows >= cols");
    Dense columns = input.transposed();                     // [n, m]: row c is column c of a
    std::vector<std::vector<double>> reflectors(static_cast<size_t>(n));  // w_j, entries j..m-1 (none: H_j = I)
    for (int j = 0; j < n; ++j) {
        const std::vector<double>& w = reflectors[size_t(j)] = householder_reflector(&columns(j, j), m - j).w;
        if (w.empty()) continue;
#pragma omp parallel for schedule(static) if (size_t(n - j) * size_t(m - j) > 16384)
        for (int c = j; c < n; ++c) reflect(&columns(c, j), w);
    }
    Dense q_columns(n, m);  // row c is column c of Q
    for (int j = 0; j < n; ++j) q_columns(j, j) = 1;
    for (int j = n - 1; j >= 0; --j) {
        const std::vector<double>& w = reflectors[size_t(j)];
        if (w.empty()) continue;
#pragma omp parallel for schedule(static) if (size_t(n) * size_t(m - j) > 16384)
        for (int c = 0; c < n; ++c) reflect(&q_columns(c, j), w);
    }
    return q_columns.transposed();
}

// y u = x by forward substitution along each row of x: once y[:, j] = x[:, j] / u[j, j] is
// final, x[:, j+1:] -= y[:, j] u[j, j+1:] (the same subtractions in the same order as
// y[:, j] = (x[:, j] - sum_{i<j} y[:, i] u[i, j]) / u[j, j], but along u's contiguous rows).
// Rows of x are independent: threads take them.
Dense solve_upper_right(const Dense& x, const Dense& u) {
    QOPT_CHECK(u.rows == u.cols && x.cols == u.rows, "solve_upper_right: shapes do not fit");
    const int n = u.rows;
    Dense y = x;
#pragma omp parallel for schedule(static) if (size_t(x.rows) * n * n > 65536)
    for (int r = 0; r < x.rows; ++r) {
        double* row = &y.values[size_t(r) * n];
        for (int j = 0; j < n; ++j) {
            const double y_j = row[j] /= u(j, j);
            const double* u_row = &u.values[size_t(j) * n];
#pragma omp simd
            for (int c = j + 1; c < n; ++c) row[c] -= y_j * u_row[c];
        }
    }
    return y;
}

double frobenius_norm(const Dense& a) {
    double sum = 0;
    for (double x : a.values) sum += x * x;
    return std::sqrt(sum);
}

Dense dense_from(const float* values, int rows, int cols) {
    Dense d(rows, cols);
    for (size_t i = 0; i < d.values.size(); ++i) d.values[i] = values[i];
    return d;
}

void store_floats(const Dense& d, std::vector<float>& out) {
    out.resize(d.values.size());
    for (size_t i = 0; i < d.values.size(); ++i) out[i] = float(d.values[i]);
}

bool all_finite(const Dense& a) {
    for (double x : a.values)
        if (!std::isfinite(x)) return false;
    return true;
}

bool commit_preconditioner(std::vector<float>& kept, const Dense& candidate) {
    bool finite = true;
    for (double x : candidate.values) finite = finite && std::isfinite(float(x));
    if (finite) {
        store_floats(candidate, kept);
        return true;
    }
    if (std::all_of(kept.begin(), kept.end(), [](float x) { return x == 0.0f; }))
        store_floats(Dense::identity(candidate.rows), kept);
    return false;
}

namespace {

std::vector<int> sorted_order(const std::vector<double>& values, bool descending) {
    std::vector<int> order(values.size());
    std::iota(order.begin(), order.end(), 0);
    const double last = descending ? -INFINITY : INFINITY;
    auto key = [&](int j) { return std::isnan(values[size_t(j)]) ? last : values[size_t(j)]; };
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return descending ? key(a) > key(b) : key(a) < key(b); });
    return order;
}

}  // namespace

std::vector<int> ascending_order(const std::vector<double>& values) { return sorted_order(values, false); }
std::vector<int> descending_order(const std::vector<double>& values) { return sorted_order(values, true); }

std::vector<int> orders_per_matrix(const std::vector<float>& values, int n, bool descending) {
    QOPT_CHECK(n > 0 && values.size() % size_t(n) == 0, "orders_per_matrix: ", values.size(),
               " values are not whole matrices of ", n);
    std::vector<int> orders;
    orders.reserve(values.size());
    for (size_t first = 0; first < values.size(); first += size_t(n)) {
        const std::vector<double> one(values.begin() + long(first), values.begin() + long(first + size_t(n)));
        const std::vector<int> order = sorted_order(one, descending);
        orders.insert(orders.end(), order.begin(), order.end());
    }
    return orders;
}

NewtonRoot coupled_newton_inverse_root(const Dense& a, int root, double eps, int max_iterations, double tolerance) {
    const int n = a.rows;
    const double alpha = -1.0 / root;
    Dense ridge = a;
    for (int i = 0; i < n; ++i) ridge(i, i) += eps;
    const double z = (root + 1) / (2 * frobenius_norm(ridge));
    NewtonRoot result{Dense::identity(n, std::pow(z, -alpha)), 0, false};
    Dense m = ridge;
    for (double& v : m.values) v *= z;
    auto distance_to_identity = [&](const Dense& x) {
        double largest = 0;
        for (int r = 0; r < n; ++r)
            for (int c = 0; c < n; ++c) largest = std::max(largest, std::abs(x(r, c) - (r == c ? 1.0 : 0.0)));
        return largest;
    };
    double error = distance_to_identity(m);
    while (error > tolerance && result.iterations < max_iterations) {
        ++result.iterations;
        Dense step = m;  // M' = alpha M + (1 - alpha) I
        for (double& v : step.values) v *= alpha;
        for (int i = 0; i < n; ++i) step(i, i) += 1 - alpha;
        result.root = matmul(result.root, step);
        // M'^root by repeated squaring, then times M.
        Dense power = Dense::identity(n), base = step;
        for (int e = root; e > 0; e >>= 1) {
            if (e & 1) power = matmul(power, base);
            if (e > 1) base = matmul(base, base);
        }
        m = matmul(power, m);
        error = distance_to_identity(m);
    }
    result.converged = error <= tolerance;
    return result;
}

}  // namespace qopt
