// An optimizer's whole state as named fp32 tensors plus a few scalars, the form checkpoints
// store (optimizer.safetensors + state.json) and every optimizer, CPU or GPU, saves and loads.
// Tensor names are "<parameter name>[.<part>].<buffer>", e.g. "layers.0.mlp.up.weight.exp_avg"
// or "layers.0.attn.qkv.weight.q.momentum" (the fused q/k/v weight is three matrices).
#pragma once
#include <math.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/json.hpp"

namespace qopt {

struct StateTensor {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> values;
    // Under ZeRO-1 a rank may hold rows [row_begin, row_begin + shape[0]) of an AdamW tensor's
    // state (optim/shard_plan.hpp); merge_rank_states joins the parts. Whole tensors: 0.
    int64_t row_begin = 0;
};

struct OptimizerState {
    std::string optimizer;  // "adamw", "muon", ...
    long step = 0;          // optimizer steps taken
    Json extra = Json::object();  // method-specific scalars (PSGD's update counter and RNG)
    std::vector<StateTensor> tensors;

    const StateTensor* find(const std::string& name) const;
    // The values of tensor `name`, checked to hold `count` numbers; throws naming what is wrong.
    const std::vector<float>& values(const std::string& name, size_t count) const;
    size_t total_floats() const;
};

// The whole state as bytes (a safetensors image: tensors, with the optimizer, step, scalars and
// row parts in its metadata), e.g. to send a rank's share to the rank that writes checkpoints;
// parse_state reads it back, errors naming `origin`.
std::string serialize_state(const OptimizerState& state);
OptimizerState parse_state(std::string bytes, const std::string& origin);

// Counter-based normal random numbers: the same (seed, stream, index) gives the same value on
// the CPU and on the GPU (splitmix64 hashing, then Box-Muller), so PSGD's random probes can be
// compared between the two without copying them.
#if defined(__CUDACC__)
#define QOPT_HOST_DEVICE __host__ __device__
#else
#define QOPT_HOST_DEVICE
#endif
QOPT_HOST_DEVICE inline uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
QOPT_HOST_DEVICE inline float counter_normal(uint64_t seed, uint64_t stream, uint64_t index) {
    const uint64_t bits = mix64(mix64(seed ^ mix64(stream)) + index);
    const float u1 = (float((bits >> 40) & 0xFFFFFF) + 1.0f) * (1.0f / 16777217.0f);  // (0, 1)
    const float u2 = float((bits >> 16) & 0xFFFFFF) * (1.0f / 16777216.0f);          // [0, 1)
    return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

}  // namespace qopt
