#include "optim/gpu_matrix_method.hpp"

#include <map>

#include "core/error.hpp"
#include "optim/preconditioner_kernels.hpp"

namespace qopt {

void TileGroup::upload_table() {
    std::vector<int64_t> host;
    for (const Tile& t : tiles) {
        host.push_back(int64_t(t.offset));
        host.push_back(t.ld);
    }
    table.upload(host);
    grads.resize(tile_size() * tiles.size());
}

void TileGroup::gather(const float* all_grads, float grad_scale) {
    gather_tiles_gpu(grads.data(), all_grads, table.data(), count(), rows, cols, grad_scale);
}

std::vector<TileGroup> group_whole_matrices(const Routing& routing) {
    std::vector<TileGroup> groups;
    std::map<std::pair<int, int>, size_t> group_of;
    for (size_t i = 0; i < routing.matrices.size(); ++i) {
        const MatrixSlot& m = routing.matrices[i];
        auto [it, added] = group_of.emplace(std::make_pair(m.rows, m.cols), groups.size());
        if (added) {
            groups.emplace_back();
            groups.back().rows = m.rows;
            groups.back().cols = m.cols;
        }
        TileGroup& g = groups[it->second];
        g.tiles.push_back({m.offset, m.cols});
        g.names.push_back(m.name);
        g.matrix_index.push_back(int(i));
    }
    for (TileGroup& g : groups) g.upload_table();
    return groups;
}

void save_group_tensors(OptimizerState& state, const TileGroup& group, const std::string& suffix,
                        std::vector<int64_t> shape, const DeviceBuffer<float>& values) {
    const std::vector<float> all = values.download();
    size_t per = 1;
    for (int64_t d : shape) per *= size_t(d);
    QOPT_CHECK(all.size() == per * group.tiles.size(), "optimizer state ", suffix, ": ", all.size(), " values for ",
               group.tiles.size(), " tiles of ", per);
    for (size_t t = 0; t < group.tiles.size(); ++t)
        state.tensors.push_back({group.names[t] + "." + suffix, shape,
                                 {all.begin() + long(t * per), all.begin() + long((t + 1) * per)}});
}

void load_group_tensors(const OptimizerState& state, const TileGroup& group, const std::string& suffix,
                        DeviceBuffer<float>& values) {
    const size_t per = values.size() / std::max<size_t>(1, group.tiles.size());
    std::vector<float> all(values.size());
    for (size_t t = 0; t < group.tiles.size(); ++t) {
        const auto& v = state.values(group.names[t] + "." + suffix, per);
        std::copy(v.begin(), v.end(), all.begin() + long(t * per));
    }
    values.upload_prefix(all);
}

}  // namespace qopt
