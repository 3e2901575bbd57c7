#include "core/safetensors.hpp"

#include <algorithm>
#include <cstring>
#include <string_view>

#include "core/error.hpp"
#include "core/files.hpp"
#include "core/json.hpp"

namespace qopt {

size_t TensorView::numel() const {
    size_t n = 1;
    for (int64_t d : shape) n *= size_t(d);
    return n;
}

std::string shape_string(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

std::string safetensors_serialize(const std::vector<TensorView>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
    Json header = Json::object();
    if (!metadata.empty()) {
        Json meta = Json::object();
        for (const auto& [key, value] : metadata) meta[key] = value;
        header["__metadata__"] = meta;
    }
    uint64_t offset = 0;
    for (const auto& t : tensors) {
        Json entry = Json::object();
        entry["dtype"] = t.bytes ? "U8" : "F32";
        Json shape = Json::array();
        for (int64_t d : t.shape) shape.push_back(Json(d));
        entry["shape"] = shape;
        Json offsets = Json::array();
        offsets.push_back(Json(offset));
        offset += t.numel() * (t.bytes ? 1 : sizeof(float));
        offsets.push_back(Json(offset));
        entry["data_offsets"] = offsets;
        header.append_member(t.name, entry);
    }
    std::string header_text = header.dump();
    while (header_text.size() % 8 != 0) header_text += ' ';  // keeps the data 8-byte aligned
    const uint64_t header_size = header_text.size();
    std::string bytes(8 + header_size + offset, '\0');
    for (int i = 0; i < 8; ++i) bytes[size_t(i)] = char((header_size >> (8 * i)) & 0xFF);
    std::memcpy(&bytes[8], header_text.data(), header_size);
    size_t at = 8 + header_size;
    for (const auto& t : tensors) {
        const size_t size = t.numel() * (t.bytes ? 1 : sizeof(float));
        std::memcpy(&bytes[at], t.bytes ? static_cast<const void*>(t.bytes) : t.data, size);
        at += size;
    }
    return bytes;
}

static size_t dtype_size(const std::string& dtype) {
    if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
    if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
    if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
    if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" || dtype == "F8_E5M2") return 1;
    return 0;
}

SafetensorsFile SafetensorsFile::load(const std::string& path) { return parse(read_file(path), path); }

SafetensorsFile SafetensorsFile::parse(std::string bytes, const std::string& origin) {
    SafetensorsFile file;
    file.origin_ = origin;
    if (bytes.size() < 8) fail(origin, ": too short for a safetensors file (", bytes.size(), " bytes)");
    uint64_t header_size = 0;
    for (int i = 0; i < 8; ++i) header_size |= uint64_t(static_cast<unsigned char>(bytes[size_t(i)])) << (8 * i);
    if (header_size > bytes.size() - 8)
        fail(origin, ": safetensors header length ", header_size, " exceeds the file (", bytes.size(), " bytes)");
    Json header;
    try {
        header = Json::parse(bytes.substr(8, header_size));
    } catch (const Error& e) {
        fail(origin, ": bad safetensors header: ", e.what());
    }
    if (!header.is_object()) fail(origin, ": safetensors header is not a JSON object");
    file.data_start_ = 8 + header_size;
    const uint64_t data_size = bytes.size() - file.data_start_;
    std::vector<std::pair<uint64_t, uint64_t>> spans;
    for (const auto& [name, value] : header.items()) {
        if (name == "__metadata__") {
            if (!value.is_object()) fail(origin, ": __metadata__ is not an object");
            for (const auto& [key, text] : value.items()) {
                if (!text.is_string()) fail(origin, ": metadata '", key, "' is not a string");
                file.metadata_[key] = text.as_string();
            }
            continue;
        }
        try {
            Entry entry;
            entry.dtype = value.at("dtype").as_string("dtype");
            const size_t element = dtype_size(entry.dtype);
            if (element == 0) fail("unknown dtype ", entry.dtype);
            const Json& shape = value.at("shape");
            if (!shape.is_array()) fail("shape is not an array");
            uint64_t numel = 1;
            for (size_t i = 0; i < shape.size(); ++i) {
                int64_t d = shape[i].as_int("shape entry");
                if (d < 0 || d > (int64_t(1) << 40)) fail("bad dimension ", d);
                entry.shape.push_back(d);
                numel *= uint64_t(d);
                if (numel > (uint64_t(1) << 40)) fail("tensor too large");
            }
            const Json& offsets = value.at("data_offsets");
            if (!offsets.is_array() || offsets.size() != 2) fail("data_offsets must be [begin, end]");
            entry.begin = offsets[0].as_uint("data_offsets");
            entry.end = offsets[1].as_uint("data_offsets");
            if (entry.begin > entry.end || entry.end > data_size)
                fail("data_offsets [", entry.begin, ", ", entry.end, "] outside the ", data_size, " data bytes");
            if (entry.end - entry.begin != numel * element)
                fail("holds ", entry.end - entry.begin, " bytes, but ", entry.dtype, " ", shape_string(entry.shape),
                     " needs ", numel * element);
            spans.emplace_back(entry.begin, entry.end);
            file.index_[name] = entry;
        } catch (const Error& e) {
            fail(origin, ": tensor '", name, "': ", e.what());
        }
    }
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i)
        if (spans[i].first < spans[i - 1].second) fail(origin, ": tensors overlap in the data section");
    file.bytes_ = std::move(bytes);
    return file;
}

std::vector<std::string> SafetensorsFile::names() const {
    std::vector<std::string> out;
    for (const auto& entry : index_) out.push_back(entry.first);
    return out;
}

std::vector<int64_t> SafetensorsFile::shape(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end()) fail(origin_, ": missing tensor '", name, "'");
    return it->second.shape;
}

// Raw bytes of tensor `name` after checking its dtype and shape.
static std::string_view checked_tensor(const std::map<std::string, SafetensorsFile::Entry>& index,
                                       const std::string& origin, const std::string& bytes, size_t data_start,
                                       const std::string& name, const char* dtype,
                                       const std::vector<int64_t>& expected_shape) {
    auto it = index.find(name);
    if (it == index.end()) fail(origin, ": missing tensor '", name, "'");
    const auto& e = it->second;
    if (e.dtype != dtype) fail(origin, ": tensor '", name, "' is ", e.dtype, ", expected ", dtype);
    if (e.shape != expected_shape)
        fail(origin, ": tensor '", name, "' has shape ", shape_string(e.shape), ", expected ",
             shape_string(expected_shape));
    return std::string_view(bytes.data() + data_start + e.begin, e.end - e.begin);
}

std::vector<float> SafetensorsFile::f32(const std::string& name, const std::vector<int64_t>& expected_shape) const {
    const std::string_view raw = checked_tensor(index_, origin_, bytes_, data_start_, name, "F32", expected_shape);
    std::vector<float> values(raw.size() / sizeof(float));
    std::memcpy(values.data(), raw.data(), raw.size());
    return values;
}

std::vector<uint8_t> SafetensorsFile::u8(const std::string& name, const std::vector<int64_t>& expected_shape) const {
    const std::string_view raw = checked_tensor(index_, origin_, bytes_, data_start_, name, "U8", expected_shape);
    return std::vector<uint8_t>(raw.begin(), raw.end());
}

}  // namespace qopt
