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

void TileGroup::gather(const float* all_grads, float grad_scale, const float* params, float decay) {
    gather_tiles_gpu(grads.data(), all_grads, table.data(), count(), rows, cols, grad_scale, params, decay);
}

std::vector<TileGroup> group_tiles(const Routing& routing, int block_size, const std::vector<bool>* owned_matrices) {
    QOPT_CHECK(!owned_matrices || owned_matrices->size() == routing.matrices.size(),
               "group_tiles: the owned-matrix list does not match the routing");
    std::vector<TileGroup> groups;
    std::map<std::pair<int, int>, size_t> group_of;
    for (size_t i = 0; i < routing.matrices.size(); ++i) {
        if (owned_matrices && !(*owned_matrices)[i]) continue;
        const MatrixSlot& m = routing.matrices[i];
        const auto blocks = block_size > 0 ? shampoo_blocks(m.rows, m.cols, block_size)
                                           : std::vector<ShampooBlock>{{0, 0, m.rows, m.cols}};
        for (size_t b = 0; b < blocks.size(); ++b) {
            const ShampooBlock& block = blocks[b];
            auto [it, added] = group_of.emplace(std::make_pair(block.block_rows, block.block_cols), groups.size());
            if (added) {
                groups.emplace_back();
                groups.back().rows = block.block_rows;
                groups.back().cols = block.block_cols;
            }
            TileGroup& g = groups[it->second];
            g.tiles.push_back({m.offset + size_t(block.row0) * m.cols + size_t(block.col0), m.cols});
            g.names.push_back(block_size > 0 ? m.name + ".block" + std::to_string(b) : m.name);
            g.matrix_index.push_back(int(i));
        }
    }
    for (TileGroup& g : groups) g.upload_table();
    return groups;
}

GroupScratch group_scratch(const std::vector<TileGroup>& groups) {
    GroupScratch sizes;
    for (const TileGroup& g : groups) {
        const size_t side = size_t(std::max(g.rows, g.cols)), count = size_t(g.count());
        sizes.work = std::max(sizes.work, g.tile_size() * count);
        sizes.factor = std::max(sizes.factor, side * side * count);
        sizes.dim = std::max(sizes.dim, side * count);
    }
    return sizes;
}

void GpuMatrixMethod::save(OptimizerState& state) const {
    // visit_state only reads the buffers here.
    const_cast<GpuMatrixMethod*>(this)->visit_state(
        [&](const TileGroup& group, const std::string& suffix, std::vector<int64_t> shape, DeviceBuffer<float>& values) {
            const std::vector<float> all = values.download();
            size_t per = 1;
            for (int64_t d : shape) per *= size_t(d);
            QOPT_CHECK(all.size() == per * group.tiles.size(), "optimizer state ", suffix, ": ", all.size(),
                       " values for ", group.tiles.size(), " tiles of ", per);
            for (size_t t = 0; t < group.tiles.size(); ++t)
                state.tensors.push_back({group.names[t] + "." + suffix, shape,
                                         {all.begin() + long(t * per), all.begin() + long((t + 1) * per)}});
        });
}

void GpuMatrixMethod::load(const OptimizerState& state) {
    visit_state([&](const TileGroup& group, const std::string& suffix, std::vector<int64_t> shape,
                    DeviceBuffer<float>& values) {
        size_t per = 1;
        for (int64_t d : shape) per *= size_t(d);
        std::vector<float> all(values.size());
        for (size_t t = 0; t < group.tiles.size(); ++t) {
            const auto& v = state.values(group.names[t] + "." + suffix, per);
            std::copy(v.begin(), v.end(), all.begin() + long(t * per));
        }
        values.upload_prefix(all);
    });
}

GpuMatrixMethod::GpuMatrixMethod() : rejected_(1) { rejected_.fill_bytes(0); }

long GpuMatrixMethod::rejected_preconditioners() const { return rejected_.download()[0]; }

void GpuMatrixMethod::commit_tiles(float* kept, const float* candidate, int n, int count, int* accepted,
                                   bool diagonal) {
    if (commit_flags_.size() < size_t(2 * count)) commit_flags_.resize(size_t(2 * count));
    commit_finite_tiles_gpu(kept, candidate, n, count, accepted, rejected_.data(), commit_flags_.data(), diagonal);
}

size_t GpuMatrixMethod::state_bytes() const {
    size_t floats = 0;
    const_cast<GpuMatrixMethod*>(this)->visit_state(
        [&](const TileGroup&, const std::string&, std::vector<int64_t>, DeviceBuffer<float>& values) {
            floats += values.size();
        });
    return floats * sizeof(float);
}

}  // namespace qopt
