// Outlier metrics of the study, on host fp32 data, accumulated in double:
//  - MMR of a row (a token's activation vector, or a weight's output row):
//      max_i |x_i| / median_i |x_i|   (the paper's text)   and   max_i |x_i| / mean_i |x_i|
//    (its abstract's "max-to-mean"); both reported, each averaged over rows.
//  - kurtosis (Pearson's, a Gaussian has 3): m4 / m2^2 with central moments of the row,
//    averaged over rows; for weights also over the whole matrix.
//  - the spectral norm ||W||_2 by power iteration on W^T W.
// Rows whose median (or mean) |x| is 0 are skipped by that ratio (counted in `skipped`).
#pragma once
#include <cstddef>

namespace qopt {

struct RowStatsSum {
    double mmr_median = 0, mmr_mean = 0, kurtosis = 0, max_abs = 0;
    size_t rows = 0, skipped = 0;
    void add(const RowStatsSum& other);
    double mean_mmr_median() const { return rows > skipped ? mmr_median / double(rows - skipped) : 0.0; }
    double mean_mmr_mean() const { return rows > skipped ? mmr_mean / double(rows - skipped) : 0.0; }
    double mean_kurtosis() const { return rows > skipped ? kurtosis / double(rows - skipped) : 0.0; }
};

// Adds every row's MMRs and kurtosis of a [rows, cols] array to the sums.
RowStatsSum row_outlier_stats(const float* values, long rows, int cols);

// Pearson kurtosis of all n values together.
double kurtosis(const float* values, size_t n);

// ||W||_2 of a [rows, cols] matrix: power iteration on W^T W from a fixed start vector until
// the estimate changes by less than `tolerance` (relative) or after max_iterations.
double spectral_norm(const float* matrix, int rows, int cols, int max_iterations = 100, double tolerance = 1e-7);

}  // namespace qopt
