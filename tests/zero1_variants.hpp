// The optimizer settings the ZeRO-1 tests run on the CPU (test_shard_plan.cpp) and the GPU
// (test_gpu_data_parallel.cpp): each optimizer at its defaults plus settings that change its
// state (a kept eigenbasis, a refresh lag, one-sided SOAP, diagonal PSGD factors).
#pragma once
#include <string>
#include <vector>

#include "optim/optimizer.hpp"

namespace qopt::test {

struct Zero1Variant {
    std::string name;
    OptimizerConfig config;
};
inline std::vector<Zero1Variant> zero1_variants() {
    std::vector<Zero1Variant> all;
    for (const char* name : {"adamw", "muon", "scion", "shampoo", "soap", "psgd"}) {
        OptimizerConfig c;
        c.kind = parse_optimizer(name);
        c.shampoo.precondition_frequency = 2;
        c.shampoo.block_size = 48;  // 64-wide matrices cut into uneven blocks
        c.soap.precondition_frequency = 2;
        all.push_back({name, c});
    }
    OptimizerConfig c = all[3].config;
    c.shampoo.momentum = 0.5;
    c.shampoo.eigen_method = ShampooEigenMethod::qr;
    all.push_back({"shampoo momentum + kept eigenbasis", c});
    c = all[3].config;
    c.shampoo.precondition_frequency = 3;
    c.shampoo.refresh_lag = 2;
    all.push_back({"shampoo refresh lag", c});
    c = all[4].config;
    c.soap.max_precond_dim = 100;
    all.push_back({"soap one-sided", c});
    c = all[5].config;
    c.psgd.memory_save_mode = "one_diag";
    all.push_back({"psgd one_diag", c});
    return all;
}

}  // namespace qopt::test
