#include "quant/packed_checkpoint.hpp"

#include <map>
#include <set>

#include "core/error.hpp"
#include "core/files.hpp"
#include "core/safetensors.hpp"

namespace qopt {

std::vector<uint8_t> pack_codes(const QuantizedTensor& q) {
    const size_t rows = size_t(q.rows), cols = size_t(q.cols);
    if (q.spec.bits > 4) {
        std::vector<uint8_t> out(rows * cols);
        for (size_t i = 0; i < out.size(); ++i) out[i] = uint8_t(q.codes[i]);
        return out;
    }
    const size_t packed_cols = (cols + 1) / 2;
    std::vector<uint8_t> out(rows * packed_cols, 0);
    for (size_t r = 0; r < rows; ++r)
        for (size_t c = 0; c < cols; ++c) {
            const uint8_t nibble = uint8_t(q.codes[r * cols + c]) & 0x0F;
            out[r * packed_cols + c / 2] |= uint8_t(c % 2 ? nibble << 4 : nibble);
        }
    return out;
}

std::vector<int8_t> unpack_codes(const std::vector<uint8_t>& packed, int rows, int cols, int bits) {
    std::vector<int8_t> codes(size_t(rows) * cols);
    if (bits > 4) {
        QOPT_CHECK(packed.size() == codes.size(), "packed codes: ", packed.size(), " bytes for ", codes.size(), " codes");
        for (size_t i = 0; i < codes.size(); ++i) codes[i] = int8_t(packed[i]);
        return codes;
    }
    const size_t packed_cols = (size_t(cols) + 1) / 2;
    QOPT_CHECK(packed.size() == size_t(rows) * packed_cols, "packed codes: ", packed.size(), " bytes for ",
               rows, " x ", cols, " 4-bit codes");
    for (size_t r = 0; r < size_t(rows); ++r)
        for (size_t c = 0; c < size_t(cols); ++c) {
            const uint8_t byte = packed[r * packed_cols + c / 2];
            const int nibble = c % 2 ? byte >> 4 : byte & 0x0F;
            codes[r * cols + c] = int8_t(nibble >= 8 ? nibble - 16 : nibble);  // sign-extend 4 bits
        }
    return codes;
}

void write_quantized_checkpoint(const std::string& path, const ModelConfig& config, const ParamLayout& layout,
                                const std::vector<float>& params, const std::vector<NamedQuantizedTensor>& weights,
                                const LinearQuantConfig& quant, const Json& source) {
    std::set<std::string> quantized;
    for (const auto& w : weights) quantized.insert(w.name);
    // F32 first, U8 last, so every F32 tensor stays 4-byte aligned in the file.
    std::vector<TensorView> views;
    for (const auto& t : layout.tensors)
        if (!quantized.count(t.name)) views.push_back({t.name, t.shape, params.data() + t.offset});
    std::vector<std::vector<float>> steps(weights.size()), offsets(weights.size());
    std::vector<std::vector<uint8_t>> packed(weights.size());
    std::vector<std::string> names;
    names.reserve(weights.size() * 3);
    for (size_t i = 0; i < weights.size(); ++i) {
        const QuantizedTensor& q = weights[i].tensor;
        for (const GroupGrid& g : q.grids) steps[i].push_back(g.step), offsets[i].push_back(g.offset);
        packed[i] = pack_codes(q);
        names.push_back(weights[i].name + ".step");
        views.push_back({names.back(), {int64_t(q.grids.size())}, steps[i].data()});
        names.push_back(weights[i].name + ".offset");
        views.push_back({names.back(), {int64_t(q.grids.size())}, offsets[i].data()});
    }
    for (size_t i = 0; i < weights.size(); ++i) {
        const QuantizedTensor& q = weights[i].tensor;
        const int64_t packed_cols = q.spec.bits > 4 ? q.cols : (q.cols + 1) / 2;
        names.push_back(weights[i].name + ".qweight");
        TensorView v{names.back(), {q.rows, packed_cols}, nullptr};
        v.bytes = packed[i].data();
        views.push_back(v);
    }
    std::map<std::string, std::string> metadata = {{"qopt_config", config.to_json().dump()},
                                                   {"qopt_quant", quant.to_json().dump()},
                                                   {"qopt_source", source.dump()}};
    write_file_atomic(path, safetensors_serialize(views, metadata));
}

}  // namespace qopt
