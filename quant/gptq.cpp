#include "quant/gptq.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.hpp"

namespace qopt {

// Reverse the order of rows and columns: A = P H P. Its lower Cholesky factor L gives
// H = R R^T with R = P L P upper triangular, so H^-1 = R^-T R^-1 and U = R^-1.
std::vector<double> upper_cholesky_of_inverse(const std::vector<double>& hessian, int n) {
    std::vector<double> L(size_t(n) * n, 0.0);
    auto A = [&](int i, int j) { return hessian[size_t(n - 1 - i) * n + (n - 1 - j)]; };
    for (int j = 0; j < n; ++j) {
        double diagonal = A(j, j);
        const double* lj = &L[size_t(j) * n];
        for (int k = 0; k < j; ++k) diagonal -= lj[k] * lj[k];
        if (!(diagonal > 0)) fail("GPTQ: the Hessian is not positive definite (raise --damp)");
        const double ljj = std::sqrt(diagonal);
        L[size_t(j) * n + j] = ljj;
#pragma omp parallel for schedule(static)
        for (int i = j + 1; i < n; ++i) {
            const double* li = &L[size_t(i) * n];
            double sum = A(i, j);
            for (int k = 0; k < j; ++k) sum -= li[k] * lj[k];
            L[size_t(i) * n + j] = sum / ljj;
        }
    }
    // R[i][j] = L[n-1-i][n-1-j] (upper). U = R^-1 row by row (rows are independent): from
    // U R = I, U[i][k] R[k][k] = [k == i] - sum_{m<k} U[i][m] R[m][k]; the sums are kept in
    // `acc` and grow by one row of R per step (contiguous reads of L's rows).
    std::vector<double> U(size_t(n) * n, 0.0);
#pragma omp parallel
    {
        std::vector<double> acc(static_cast<size_t>(n));
#pragma omp for schedule(dynamic, 8)
        for (int i = 0; i < n; ++i) {
            double* ui = &U[size_t(i) * n];
            std::fill(acc.begin() + i, acc.end(), 0.0);
            for (int k = i; k < n; ++k) {
                const double* lrow = &L[size_t(n - 1 - k) * n];  // R(k, j) = lrow[n - 1 - j]
                ui[k] = ((k == i ? 1.0 : 0.0) - acc[size_t(k)]) / lrow[n - 1 - k];
                const double u = ui[k];
#pragma omp simd
                for (int j = k + 1; j < n; ++j) acc[size_t(j)] += u * lrow[n - 1 - j];
            }
        }
    }
    return U;
}

GptqProblem prepare_gptq(const float* weight, int rows, int cols, const std::vector<double>& hessian,
                         const QuantSpec& spec, const GptqOptions& options) {
    QOPT_CHECK(spec.enabled(), "GPTQ needs a quantizing spec (bits 2..8)");
    spec.validate(cols);
    QOPT_CHECK(rows > 0 && cols > 0, "GPTQ: empty weight [", rows, ", ", cols, "]");
    QOPT_CHECK(hessian.size() == size_t(cols) * cols, "GPTQ: Hessian of ", hessian.size(), " values for ", cols,
               " inputs");
    QOPT_CHECK(!(options.act_order && spec.granularity == Granularity::Group),
               "GPTQ: --act-order with per-group scales is not supported");
    QOPT_CHECK(options.damp >= 0, "GPTQ: damping must be >= 0");
    const int n = cols;
    GptqProblem p;
    std::vector<double> H = hessian;
    p.weight.assign(weight, weight + size_t(rows) * cols);
    // Dead inputs: no signal, so their weights cannot matter; zero them.
    for (int i = 0; i < n; ++i)
        if (H[size_t(i) * n + i] == 0) {
            H[size_t(i) * n + i] = 1;
            for (int r = 0; r < rows; ++r) p.weight[size_t(r) * cols + i] = 0;
        }
    double mean_diagonal = 0;
    for (int i = 0; i < n; ++i) mean_diagonal += H[size_t(i) * n + i];
    mean_diagonal /= n;
    for (int i = 0; i < n; ++i) H[size_t(i) * n + i] += options.damp * mean_diagonal;

    p.order.resize(static_cast<size_t>(n));
    std::iota(p.order.begin(), p.order.end(), 0);
    if (options.act_order)
        std::stable_sort(p.order.begin(), p.order.end(),
                         [&](int a, int b) { return H[size_t(a) * n + a] > H[size_t(b) * n + b]; });
    if (options.act_order) {
        p.hessian.resize(size_t(n) * n);
#pragma omp parallel for schedule(static)
        for (int a = 0; a < n; ++a)
            for (int b = 0; b < n; ++b)
                p.hessian[size_t(a) * n + b] = H[size_t(p.order[size_t(a)]) * n + p.order[size_t(b)]];
    } else {
        p.hessian = std::move(H);
    }

    QuantizedTensor& q = p.result;
    q.rows = rows, q.cols = cols, q.spec = spec;
    q.codes.resize(size_t(rows) * cols);
    // Per-row and per-tensor grids come from the (dead-zeroed) weights before any update.
    if (spec.granularity == Granularity::Tensor) {
        q.grids = {choose_grid(spec, p.weight.data(), long(p.weight.size()))};
    } else if (spec.granularity == Granularity::Group) {
        q.grids.resize(size_t(rows) * (cols / spec.group_size));
    } else {
        q.grids.resize(size_t(rows));
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; ++r) q.grids[size_t(r)] = choose_grid(spec, &p.weight[size_t(r) * cols], cols);
    }
    return p;
}

QuantizedTensor gptq_quantize(const float* weight, int rows, int cols, const std::vector<double>& hessian,
                              const QuantSpec& spec, const GptqOptions& options) {
    GptqProblem p = prepare_gptq(weight, rows, cols, hessian, spec, options);
    const int n = cols;
    const std::vector<double> U = upper_cholesky_of_inverse(p.hessian, n);
    const std::vector<int>& order = p.order;
    const std::vector<float>& W = p.weight;
    QuantizedTensor& q = p.result;
    const bool per_group = spec.granularity == Granularity::Group;
    const int group = spec.group_cols(cols);
    auto grid_of = [&](int r, int column) -> GroupGrid& {
        if (spec.granularity == Granularity::Tensor) return q.grids[0];
        if (per_group) return q.grids[size_t(r) * (cols / group) + column / group];
        return q.grids[size_t(r)];
    };

    constexpr int kTile = 32;
    const int tiles = (rows + kTile - 1) / kTile;
#pragma omp parallel for schedule(dynamic, 1)
    for (int t = 0; t < tiles; ++t) {
        const int r0 = t * kTile, tile_rows = std::min(kTile, rows - r0);
        // The tile column-major in the processing order: Wt[a][r] = W[r0 + r][order[a]].
        std::vector<double> Wt(size_t(n) * kTile, 0.0), err(kTile);
        for (int a = 0; a < n; ++a)
            for (int r = 0; r < tile_rows; ++r) Wt[size_t(a) * kTile + r] = W[size_t(r0 + r) * cols + order[size_t(a)]];
        std::vector<float> group_values(static_cast<size_t>(group));
        for (int j = 0; j < n; ++j) {
            if (per_group && j % group == 0)
                for (int r = 0; r < tile_rows; ++r) {
                    for (int c = 0; c < group; ++c) group_values[size_t(c)] = float(Wt[size_t(j + c) * kTile + r]);
                    grid_of(r0 + r, j) = choose_grid(spec, group_values.data(), group);
                }
            const double ujj = U[size_t(j) * n + j];
            for (int r = 0; r < tile_rows; ++r) {
                const GroupGrid& g = grid_of(r0 + r, order[size_t(j)]);
                const float w = float(Wt[size_t(j) * kTile + r]);
                const int code = quant_code(g, w);
                q.codes[size_t(r0 + r) * cols + order[size_t(j)]] = int8_t(code);
                err[size_t(r)] = (double(w) - double(quant_value(g, code))) / ujj;
            }
            const double* uj = &U[size_t(j) * n];
            for (int k = j + 1; k < n; ++k) {
                double* wk = &Wt[size_t(k) * kTile];
                const double u = uj[k];
#pragma omp simd
                for (int r = 0; r < kTile; ++r) wk[r] -= err[size_t(r)] * u;
            }
        }
    }
    return std::move(q);
}

}  // namespace qopt
