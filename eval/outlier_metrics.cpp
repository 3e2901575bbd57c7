#include "eval/outlier_metrics.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace qopt {

void RowStatsSum::add(const RowStatsSum& o) {
    mmr_median += o.mmr_median, mmr_mean += o.mmr_mean, kurtosis += o.kurtosis;
    max_abs = std::max(max_abs, o.max_abs);
    rows += o.rows, skipped += o.skipped;
}

RowStatsSum row_outlier_stats(const float* values, long rows, int cols) {
    RowStatsSum total;
    total.rows = size_t(rows);
#pragma omp parallel
    {
        RowStatsSum local;
        std::vector<double> magnitudes(static_cast<size_t>(cols));
#pragma omp for schedule(static)
        for (long r = 0; r < rows; ++r) {
            const float* x = values + size_t(r) * cols;
            double sum = 0, abs_sum = 0, max_abs = 0;
            for (int i = 0; i < cols; ++i) {
                const double v = x[i];
                sum += v, abs_sum += std::fabs(v), max_abs = std::max(max_abs, std::fabs(v));
                magnitudes[size_t(i)] = std::fabs(v);
            }
            const double mean = sum / cols;
            double m2 = 0, m4 = 0;
            for (int i = 0; i < cols; ++i) {
                const double d = x[i] - mean, d2 = d * d;
                m2 += d2, m4 += d2 * d2;
            }
            m2 /= cols, m4 /= cols;
            // Median of |x|: the mean of the two middle values for an even count.
            const size_t mid = size_t(cols) / 2;
            std::nth_element(magnitudes.begin(), magnitudes.begin() + long(mid), magnitudes.end());
            double median = magnitudes[mid];
            if (cols % 2 == 0) median = 0.5 * (median + *std::max_element(magnitudes.begin(), magnitudes.begin() + long(mid)));
            const double abs_mean = abs_sum / cols;
            local.max_abs = std::max(local.max_abs, max_abs);
            if (median <= 0 || abs_mean <= 0 || m2 <= 0) {
                ++local.skipped;
                continue;
            }
            local.mmr_median += max_abs / median;
            local.mmr_mean += max_abs / abs_mean;
            local.kurtosis += m4 / (m2 * m2);
        }
#pragma omp critical
        {
            total.mmr_median += local.mmr_median, total.mmr_mean += local.mmr_mean;
            total.kurtosis += local.kurtosis, total.skipped += local.skipped;
            total.max_abs = std::max(total.max_abs, local.max_abs);
        }
    }
    return total;
}

double kurtosis(const float* values, size_t n) {
    if (n == 0) return 0.0;
    double sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (size_t i = 0; i < n; ++i) sum += values[i];
    const double mean = sum / double(n);
    double m2 = 0, m4 = 0;
#pragma omp parallel for reduction(+ : m2, m4) schedule(static)
    for (size_t i = 0; i < n; ++i) {
        const double d = values[i] - mean, d2 = d * d;
        m2 += d2, m4 += d2 * d2;
    }
    m2 /= double(n), m4 /= double(n);
    return m2 > 0 ? m4 / (m2 * m2) : 0.0;
}

double spectral_norm(const float* w, int rows, int cols, int max_iterations, double tolerance) {
    // v <- W^T W v / ||W^T W v||; ||W v|| converges to sigma_max from below.
    std::vector<double> v(static_cast<size_t>(cols)), u(static_cast<size_t>(rows));
    for (int j = 0; j < cols; ++j) v[size_t(j)] = 1.0 + 0.01 * std::sin(double(j));  // not orthogonal to the top vector
    double estimate = 0;
    for (int it = 0; it < max_iterations; ++it) {
        double v_norm = 0;
        for (double x : v) v_norm += x * x;
        v_norm = std::sqrt(v_norm);
        if (v_norm == 0) return 0.0;
        for (double& x : v) x /= v_norm;
        double u_norm = 0;
#pragma omp parallel for reduction(+ : u_norm) schedule(static)
        for (int r = 0; r < rows; ++r) {
            const float* row = w + size_t(r) * cols;
            double dot = 0;
            for (int j = 0; j < cols; ++j) dot += double(row[j]) * v[size_t(j)];
            u[size_t(r)] = dot;
            u_norm += dot * dot;
        }
        const double next = std::sqrt(u_norm);
        // v = W^T u, accumulated per thread over row blocks.
        std::fill(v.begin(), v.end(), 0.0);
#pragma omp parallel
        {
            std::vector<double> local(static_cast<size_t>(cols), 0.0);
#pragma omp for schedule(static)
            for (int r = 0; r < rows; ++r) {
                const float* row = w + size_t(r) * cols;
                const double ur = u[size_t(r)];
                for (int j = 0; j < cols; ++j) local[size_t(j)] += ur * row[j];
            }
#pragma omp critical
            for (int j = 0; j < cols; ++j) v[size_t(j)] += local[size_t(j)];
        }
        const bool converged = std::fabs(next - estimate) <= tolerance * next;
        estimate = next;
        if (converged) break;
    }
    return estimate;
}

}  // namespace qopt
