// AdamW over a model's flat fp32 parameter buffer on the GPU (fused kernel: optim/adamw.cu),
// the same rule as the CPU class AdamW (optim/adamw.hpp): weight decay on 2-D tensors only.
// Consecutive tensors with the same decay rule are updated by one launch.
#pragma once
#include <vector>

#include "kernels/gpu.hpp"
#include "model/params.hpp"
#include "optim/adamw.hpp"

namespace qopt {

class AdamWGpu {
public:
    AdamWGpu(const ParamLayout& layout, const AdamWConfig& config);
    // step_count() += 1 first; gradients are multiplied by grad_scale (clipping) on the fly;
    // params_bf16 (may be null) receives the bf16 copy of the updated weights.
    void step(float* params, const float* grads, double lr, double grad_scale, bf16* params_bf16 = nullptr);
    long step_count() const { return step_; }
    void set_step_count(long step) { step_ = step; }
    std::vector<float> first_moment() const { return m_.download(); }
    std::vector<float> second_moment() const { return v_.download(); }
    void set_moments(const std::vector<float>& m, const std::vector<float>& v);

private:
    struct Run {
        size_t offset, count;
        bool decay;
    };
    AdamWConfig config_;
    std::vector<Run> runs_;
    size_t total_;
    DeviceBuffer<float> m_, v_;
    long step_ = 0;
};

}  // namespace qopt
