// safetensors files (the format Hugging Face tools read): an 8-byte little-endian header
// length, a JSON header {"__metadata__": {str: str}, name: {dtype, shape, data_offsets}},
// then the raw tensor bytes. qopt writes F32 tensors (and U8 for packed quantized weights); the reader validates the header
// (offsets in bounds, sizes matching dtype x shape, no overlaps) before handing out data.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace qopt {

struct TensorView {
    std::string name;
    std::vector<int64_t> shape;
    const float* data = nullptr;
    const uint8_t* bytes = nullptr;  // set instead of data: a U8 tensor
    size_t numel() const;
};

// Serialises F32 (and U8) tensors, in the given order, with string metadata.
std::string safetensors_serialize(const std::vector<TensorView>& tensors,
                                  const std::map<std::string, std::string>& metadata);

class SafetensorsFile {
public:
    // Parses and validates; errors name `origin` (usually the path).
    static SafetensorsFile parse(std::string bytes, const std::string& origin);
    static SafetensorsFile load(const std::string& path);

    const std::map<std::string, std::string>& metadata() const { return metadata_; }
    bool has(const std::string& name) const { return index_.count(name) != 0; }
    std::vector<std::string> names() const;
    std::vector<int64_t> shape(const std::string& name) const;  // throws naming file and tensor
    // A copy of F32 tensor `name`, checked against `expected_shape`; throws naming file and tensor.
    std::vector<float> f32(const std::string& name, const std::vector<int64_t>& expected_shape) const;
    // A copy of U8 tensor `name` (packed quantized weights), checked likewise.
    std::vector<uint8_t> u8(const std::string& name, const std::vector<int64_t>& expected_shape) const;

    struct Entry {
        std::string dtype;
        std::vector<int64_t> shape;
        uint64_t begin, end;
    };

private:
    std::string origin_;
    std::string bytes_;
    size_t data_start_ = 0;
    std::map<std::string, std::string> metadata_;
    std::map<std::string, Entry> index_;
};

std::string shape_string(const std::vector<int64_t>& shape);

}  // namespace qopt
