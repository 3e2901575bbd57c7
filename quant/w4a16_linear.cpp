#include "quant/w4a16_linear.hpp"

#include "core/error.hpp"
#include "quant/packed_checkpoint.hpp"

namespace qopt {

void check_weight_only_spec(const QuantSpec& spec) {
    QOPT_CHECK(spec.enabled() && spec.bits <= 4, "weight-only integer execution packs 2-4-bit weights, not ",
               spec.describe(), " (8-bit weights run as W8A8: quantize the activations too)");
    spec.validate();
    QOPT_CHECK(spec.granularity != Granularity::Group || spec.group_size % 16 == 0,
               "weight-only integer execution needs groups of a multiple of 16 columns, not ", spec.group_size);
}

PackedWeights pack_weights(const QuantizedTensor& q) {
    check_weight_only_spec(q.spec);
    QOPT_CHECK(q.cols % 32 == 0, "weight-only integer execution: ", q.rows, " x ", q.cols,
               " weights; the packed GEMM needs a multiple of 32 columns");
    PackedWeights w;
    w.rows = q.rows, w.cols = q.cols, w.group_cols = q.spec.group_cols(q.cols);
    w.packed = pack_codes(q);
    const size_t groups = size_t(w.rows) * w.groups_per_row();
    const bool per_tensor = q.spec.granularity == Granularity::Tensor;
    QOPT_CHECK(q.grids.size() == (per_tensor ? 1 : groups), "weight-only integer execution: ", q.grids.size(),
               " grids for ", groups, " groups");
    for (size_t g = 0; g < groups; ++g) {
        const GroupGrid& grid = q.grids[per_tensor ? 0 : g];
        w.steps.push_back(grid.step);
        w.offsets.push_back(grid.offset);
    }
    return w;
}

std::vector<float> dequantized_weights(const PackedWeights& w) {
    // (2- and 3-bit codes are stored as 4-bit nibbles)
    const std::vector<int8_t> codes = unpack_codes(w.packed, w.rows, w.cols, 4);
    std::vector<float> values(codes.size());
    for (size_t i = 0; i < codes.size(); ++i) {
        const size_t g = (i / size_t(w.cols)) * size_t(w.groups_per_row()) + (i % size_t(w.cols)) / size_t(w.group_cols);
        GroupGrid grid;
        grid.step = w.steps[g], grid.offset = w.offsets[g];
        values[i] = __bfloat162float(__float2bfloat16_rn(quant_value(grid, codes[i])));
    }
    return values;
}

void w4a16_linear_cpu(float* out, const float* in, const PackedWeights& w, const float* bias, int n_rows) {
    const std::vector<float> weight = dequantized_weights(w);
    const size_t K = size_t(w.cols);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < n_rows; ++n)
        for (int o = 0; o < w.rows; ++o) {
            double sum = bias ? double(bias[o]) : 0.0;
            for (size_t k = 0; k < K; ++k) sum += double(in[size_t(n) * K + k]) * double(weight[size_t(o) * K + k]);
            out[size_t(n) * w.rows + o] = float(sum);
        }
}

void DevicePackedWeights::upload(const PackedWeights& w) {
    rows = w.rows, cols = w.cols, group_cols = w.group_cols;
    packed.upload(w.packed);
    steps.upload(w.steps);
    offsets.upload(w.offsets);
}

}  // namespace qopt
