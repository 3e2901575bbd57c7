// The optimizers on the GPU, over a model's flat fp32 parameter and gradient buffers, with
// the same routing, update rules and state names as the CPU references (optim/optimizer.hpp).
// Per step: one launch updates every AdamW-routed tensor (chunk table), one launch Scion's
// element-wise rows; Muon and Scion then take, per group of same-shape hidden matrices, a
// momentum/normalise pass, Newton-Schulz as batched bf16 GEMMs through cuBLASLt (all matrices
// of the group in one call per product), and one apply pass that also writes the bf16 compute
// copy; each group runs on a stream of its own, so the groups' GEMMs fill each other's partial
// waves and the element-wise AdamW/Scion launches run beside them. Shampoo, SOAP and PSGD hand the hidden matrices to their GpuMatrixMethod
// (optim/gpu_matrix_method.hpp: batched fp32 GEMMs, cuSOLVER eigendecompositions and QR).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/gpu.hpp"
#include "kernels/side_stream.hpp"
#include "model/params.hpp"
#include "optim/gpu_matrix_method.hpp"
#include "optim/optimizer.hpp"

namespace qopt {

class GpuOptimizer {
public:
    // owned (none: every slot): one rank's ZeRO-1 share, as make_cpu_optimizer takes it: state
    // for, and steps of, those slots and rows only; state() holds their tensors (row parts with
    // their row_begin) and load_state() takes whole tensors (a merged state) and keeps its part.
    GpuOptimizer(const ParamLayout& layout, const OptimizerConfig& config, const OwnedSlots* owned = nullptr);
    // As Optimizer::step; params_bf16 (may be null) receives the bf16 copy of updated weights.
    void step(float* params, const float* grads, double lr, double grad_scale, bf16* params_bf16);
    long step_count() const { return step_; }
    OptimizerState state() const;
    void load_state(const OptimizerState& state);
    size_t state_bytes() const;  // state and work buffers
    long rejected_preconditioners() const { return method_ ? method_->rejected_preconditioners() : 0; }
    EigenRefreshCounts eigen_refreshes() const { return method_ ? method_->eigen_refreshes() : EigenRefreshCounts{}; }

private:
    struct Group {  // hidden matrices of one shape
        int rows, cols;
        std::vector<int> members;  // indices into routing_.matrices
        DeviceBuffer<int64_t> offsets;
        DeviceBuffer<float> momentum;  // members.size() x rows x cols
        // Newton-Schulz scratch (x, x2: like momentum in bf16; a, p: members x s x s) and the
        // group's stream (waits for the default stream's work at each step, then joins it).
        DeviceBuffer<bf16> ns_x, ns_x2, ns_a, ns_p;
        DeviceBuffer<float> ns_partials;
        std::unique_ptr<SideStream> stream;
    };
    // The packed device buffers of the element-wise slots' state, in this order.
    enum PackedBuffer { kAdamExpAvg, kAdamExpAvgSq, kScionMomentum, kPackedBuffers };
    // An element-wise slot's state tensor (its owned rows, named slot.name + "." + state_name) to
    // or from the packed buffer `packed`.
    using RowsVisitor = std::function<void(const TensorSlot& slot, const RowRange& rows, size_t packed_offset,
                                           const char* state_name, PackedBuffer packed)>;
    void visit_rows(const RowsVisitor& fn) const;

    OptimizerConfig config_;
    Routing routing_;
    OwnedSlots owned_;
    long step_ = 0;
    DeviceBuffer<float> adam_m_, adam_v_;
    std::vector<size_t> adam_offsets_;  // each AdamW slot's start in adam_m_/adam_v_
    DeviceBuffer<int64_t> adam_chunks_;
    int n_adam_chunks_ = 0;
    DeviceBuffer<float> scion_momentum_;
    std::vector<size_t> scion_offsets_;
    DeviceBuffer<int64_t> scion_tasks_;
    int n_scion_tasks_ = 0;
    std::vector<Group> groups_;  // Muon and Scion
    std::unique_ptr<GpuMatrixMethod> method_;  // Shampoo, SOAP, PSGD
};

}  // namespace qopt
