#include "optim/optimizer_state.hpp"

#include "core/error.hpp"

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

}  // namespace qopt
