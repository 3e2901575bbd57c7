#include "quant/integer_execution.hpp"

#include "core/error.hpp"
#include "model/params.hpp"
#include "quant/hadamard.hpp"
#include "quant/int8_linear.hpp"
#include "quant/w4a16_linear.hpp"

namespace qopt {

IntegerPath integer_path(const LinearQuantConfig& quant) {
    QOPT_CHECK(quant.enabled(), "integer execution needs a quantized configuration (--format wXaY or a quantized file)");
    if (!quant.activations.enabled()) {
        check_weight_only_spec(quant.weights);
        return IntegerPath::PackedWeights;
    }
    check_integer_spec(quant.weights, false);
    check_integer_spec(quant.activations, true);
    return IntegerPath::Int8Product;
}

const char* integer_execution_name(const LinearQuantConfig& quant) {
    if (integer_path(quant) == IntegerPath::PackedWeights) return "packed 4-bit weights, bf16 GEMM";
    if (fp8_exact(quant.weights) && fp8_exact(quant.activations))
        return "fp8 tensor cores, scales in the epilogue (int8 where a size is not a multiple of 16)";
    return "int8 tensor cores";
}

std::vector<QuantizedTensor> integer_matrices(const ModelConfig& config, const std::vector<float>& params,
                                              const LinearQuantConfig& quant, const std::vector<QuantizedTensor>* stored) {
    integer_path(quant);
    const ParamLayout layout = ParamLayout::build(config);
    const std::vector<LinearMatrix> matrices = linear_matrices(config, layout);
    QOPT_CHECK(!stored || stored->size() == matrices.size(), "integer execution: ", stored ? stored->size() : 0,
               " stored matrices for ", matrices.size());
    std::vector<QuantizedTensor> out;
    for (size_t i = 0; i < matrices.size(); ++i) {
        const LinearMatrix& m = matrices[i];
        if (stored) {
            const QuantizedTensor& q = (*stored)[i];
            QOPT_CHECK(q.rows == m.rows && q.cols == m.cols, "integer execution: ", m.name, " is stored as ", q.rows,
                       " x ", q.cols);
            out.push_back(q);
            continue;
        }
        std::vector<float> w(params.begin() + long(m.offset), params.begin() + long(m.offset + size_t(m.rows) * m.cols));
        hadamard_rows_cpu(w.data(), m.rows, m.cols, hadamard_block_for(m.cols, quant.hadamard_block));
        out.push_back(quantize_cpu(w.data(), m.rows, m.cols, quant.weights));
    }
    return out;
}

}  // namespace qopt
