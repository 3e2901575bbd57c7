#include "optim/optimizer_state.hpp"

#include "core/error.hpp"
#include "core/safetensors.hpp"

namespace qopt {

const StateTensor* OptimizerState::find(const std::string& name) const {
    for (const auto& t : tensors)
        if (t.name == name) return &t;
    return nullptr;
}

const std::vector<float>& OptimizerState::values(const std::string& name, size_t count) const {
    const StateTensor* t = find(name);
    if (!t) fail("optimizer state has no tensor '", name, "' (was it written by another optimizer?)");
    QOPT_CHECK(t->values.size() == count, "optimizer state tensor '", name, "' has ", t->values.size(),
               " values, expected ", count);
    return t->values;
}

size_t OptimizerState::total_floats() const {
    size_t n = 0;
    for (const auto& t : tensors) n += t.values.size();
    return n;
}

std::string serialize_state(const OptimizerState& state) {
    std::vector<TensorView> views;
    std::map<std::string, std::string> metadata = {
        {"optimizer", state.optimizer}, {"step", std::to_string(state.step)}, {"extra", state.extra.dump()}};
    for (const StateTensor& t : state.tensors) {
        views.push_back({t.name, t.shape, t.values.data()});
        if (t.row_begin != 0) metadata["row_begin." + t.name] = std::to_string(t.row_begin);
    }
    return safetensors_serialize(views, metadata);
}

OptimizerState parse_state(std::string bytes, const std::string& origin) {
    const SafetensorsFile file = SafetensorsFile::parse(std::move(bytes), origin);
    const auto& metadata = file.metadata();
    auto field = [&](const std::string& key) {
        const auto it = metadata.find(key);
        if (it == metadata.end()) fail(origin, ": optimizer state without '", key, "'");
        return it->second;
    };
    // A non-negative decimal integer, or a refusal naming the field.
    auto count = [&](const std::string& key, const std::string& text) {
        int64_t value = 0;
        QOPT_CHECK(!text.empty() && text.size() <= 18, origin, ": optimizer state's ", key, " '", text,
                   "' is not a count");
        for (char c : text) {
            QOPT_CHECK(c >= '0' && c <= '9', origin, ": optimizer state's ", key, " '", text, "' is not a count");
            value = value * 10 + (c - '0');
        }
        return value;
    };
    OptimizerState state;
    state.optimizer = field("optimizer");
    state.step = long(count("step", field("step")));
    state.extra = Json::parse(field("extra"));
    for (const std::string& name : file.names()) {
        StateTensor t{name, file.shape(name), {}, 0};
        t.values = file.f32(name, t.shape);
        const auto row = metadata.find("row_begin." + name);
        if (row != metadata.end()) t.row_begin = count(row->first, row->second);
        state.tensors.push_back(std::move(t));
    }
    return state;
}

}  // namespace qopt
