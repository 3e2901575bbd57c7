#include "optim/dense.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.hpp"

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

Dense matmul(const Dense& a_in, const Dense& b_in, bool transpose_a, bool transpose_b) {
    const Dense a = transpose_a ? a_in.transposed() : a_in;
    const Dense bt = transpose_b ? b_in : b_in.transposed();  // bt holds op(b)^T: rows are op(b)'s columns
    QOPT_CHECK(a.cols == bt.cols, "matmul: inner dimensions ", a.cols, " and ", bt.cols, " differ");
    Dense out(a.rows, bt.rows);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < a.rows; ++i)
        for (int j = 0; j < bt.rows; ++j) {
            const double* x = &a.values[size_t(i) * a.cols];
            const double* y = &bt.values[size_t(j) * bt.cols];
            double sum = 0;
            for (int k = 0; k < a.cols; ++k) sum += x[k] * y[k];
            out(i, j) = sum;
        }
    return out;
}

// Cyclic Jacobi: rotate away each off-diagonal pair (p, q) in turn until the off-diagonal
// mass is negligible; the product of the rotations is the eigenvector matrix.
SymmetricEigen symmetric_eigen(const Dense& input) {
    QOPT_CHECK(input.rows == input.cols, "symmetric_eigen: matrix is not square");
    const int n = input.rows;
    Dense a = input;
    Dense v = Dense::identity(n);
    double total = 0;
    for (double x : a.values) total += x * x;
    for (int sweep = 0; sweep < 100; ++sweep) {
        double off = 0;
        for (int p = 0; p < n; ++p)
            for (int q = p + 1; q < n; ++q) off += a(p, q) * a(p, q);
        if (off <= 1e-30 * total || off == 0) break;
        for (int p = 0; p < n; ++p)
            for (int q = p + 1; q < n; ++q) {
                const double apq = a(p, q);
                if (std::abs(apq) < 1e-300) continue;
                const double theta = (a(q, q) - a(p, p)) / (2 * apq);
                const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
                const double c = 1 / std::sqrt(t * t + 1), s = t * c;
                for (int k = 0; k < n; ++k) {  // columns p, q of a
                    const double akp = a(k, p), akq = a(k, q);
                    a(k, p) = c * akp - s * akq;
                    a(k, q) = s * akp + c * akq;
                }
                for (int k = 0; k < n; ++k) {  // rows p, q of a
                    const double apk = a(p, k), aqk = a(q, k);
                    a(p, k) = c * apk - s * aqk;
                    a(q, k) = s * apk + c * aqk;
                }
                for (int k = 0; k < n; ++k) {
                    const double vkp = v(k, p), vkq = v(k, q);
                    v(k, p) = c * vkp - s * vkq;
                    v(k, q) = s * vkp + c * vkq;
                }
            }
    }
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return a(x, x) > a(y, y); });
    SymmetricEigen result;
    result.vectors = Dense(n, n);
    for (int j = 0; j < n; ++j) {
        result.values.push_back(a(order[j], order[j]));
        for (int k = 0; k < n; ++k) result.vectors(k, j) = v(k, order[j]);
    }
    return result;
}

// Householder QR: reflections H_j = I - 2 w w^T zero the sub-diagonal of column j; Q is
// H_0 H_1 ... H_{n-1} applied to the first n columns of the identity.
Dense householder_q(const Dense& input) {
    const int m = input.rows, n = input.cols;
    QOPT_CHECK(m >= n, "householder_q: needs rows >= cols");
    Dense a = input;
    std::vector<std::vector<double>> reflectors;
    for (int j = 0; j < n; ++j) {
        std::vector<double> w(m, 0.0);
        double norm = 0;
        for (int i = j; i < m; ++i) norm += a(i, j) * a(i, j);
        norm = std::sqrt(norm);
        const double alpha = a(j, j) > 0 ? -norm : norm;
        for (int i = j; i < m; ++i) w[i] = a(i, j);
        w[j] -= alpha;
        double wnorm = 0;
        for (int i = j; i < m; ++i) wnorm += w[i] * w[i];
        if (wnorm > 0) {
            wnorm = std::sqrt(wnorm);
            for (int i = j; i < m; ++i) w[i] /= wnorm;
            for (int c = j; c < n; ++c) {
                double dot = 0;
                for (int i = j; i < m; ++i) dot += w[i] * a(i, c);
                for (int i = j; i < m; ++i) a(i, c) -= 2 * w[i] * dot;
            }
        }
        reflectors.push_back(std::move(w));
    }
    Dense q(m, n);
    for (int j = 0; j < n; ++j) q(j, j) = 1;
    for (int j = n - 1; j >= 0; --j) {
        const auto& w = reflectors[j];
        for (int c = 0; c < n; ++c) {
            double dot = 0;
            for (int i = j; i < m; ++i) dot += w[i] * q(i, c);
            for (int i = j; i < m; ++i) q(i, c) -= 2 * w[i] * dot;
        }
    }
    return q;
}

// y u = x, row by row: y[:, j] = (x[:, j] - sum_{i<j} y[:, i] u[i, j]) / u[j, j].
Dense solve_upper_right(const Dense& x, const Dense& u) {
    QOPT_CHECK(u.rows == u.cols && x.cols == u.rows, "solve_upper_right: shapes do not fit");
    Dense y(x.rows, x.cols);
    for (int r = 0; r < x.rows; ++r)
        for (int j = 0; j < x.cols; ++j) {
            double sum = x(r, j);
            for (int i = 0; i < j; ++i) sum -= y(r, i) * u(i, j);
            y(r, j) = sum / u(j, j);
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

}  // namespace qopt
