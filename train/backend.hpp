// Where a training run computes: the model (forward, backward, gradients) and the optimizer
// together, on the CPU (reference, fp32) or on the GPU (mixed precision). The training loop
// (train/trainer.cpp) sees only this interface; checkpoints move host copies of the state.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "model/config.hpp"
#include "optim/optimizer.hpp"
#include "quant/linear_quant.hpp"
#include "train/communicator.hpp"

namespace qopt {

class TrainBackend {
public:
    virtual ~TrainBackend() = default;
    virtual std::string describe() const = 0;  // "cpu, 2 threads" / "cuda: NVIDIA H100 ..."

    virtual void set_params(const std::vector<float>& params) = 0;
    virtual std::vector<float> params() = 0;
    virtual void set_optimizer_state(const OptimizerState& state) = 0;
    virtual OptimizerState optimizer_state() = 0;
    virtual long optimizer_step() const = 0;
    virtual size_t optimizer_state_bytes() const = 0;
    // Preconditioner matrices computed non-finite and not taken (Optimizer::rejected_preconditioners).
    virtual long rejected_preconditioners() const = 0;
    // Shampoo's kept eigenbasis (Optimizer::eigen_refreshes).
    virtual EigenRefreshCounts eigen_refreshes() const = 0;

    // As CpuModel::forward_backward: gradients are added to the gradient buffer.
    virtual void zero_grads() = 0;
    virtual double forward_backward(const int* inputs, const int* targets, int batch, int seq_len,
                                    double grad_scale) = 0;
    virtual double loss(const int* inputs, const int* targets, int batch, int seq_len) = 0;
    virtual double grad_norm() = 0;  // ||g||_2 of the whole gradient buffer
    // One optimizer step at the method's scheduled learning rate on grad_scale * gradients
    // (grad_scale < 1 when clipping).
    virtual void step(double lr, double grad_scale) = 0;
    // Quantized hidden linear layers (QAT, PTQ evaluation); off by default.
    virtual void set_linear_quant(const LinearQuantConfig& quant) = 0;
    // Extra line for the run's summary (the GPU's memory plan), empty if none.
    virtual std::string memory_report(int batch, int seq_len) = 0;
    // Data parallelism (train/communicator.hpp): the gradient buffer becomes the mean of the
    // ranks' gradients; after a ZeRO-1 step, each rank's updated share (ranges_by_rank[rank]) goes
    // to every rank.
    virtual void reduce_gradients(Communicator& comm) = 0;
    // Called before the last micro-batch's forward_backward: where the communicator can (device
    // collectives), that backward pass starts reducing each block's gradients as soon as they
    // are final, beside the blocks below; reduce_gradients then reduces the rest and waits.
    // Elsewhere a no-op: reduce_gradients does it all.
    virtual void reduce_gradients_during_backward(Communicator&) {}
    virtual void share_parameters(Communicator& comm, const std::vector<std::vector<ParamRange>>& ranges_by_rank) = 0;
};

// owned (none: all): the optimizer's ZeRO-1 share (optim/shard_plan.hpp).
std::unique_ptr<TrainBackend> make_cpu_backend(const ModelConfig& config, const OptimizerConfig& optimizer,
                                               const OwnedSlots* owned = nullptr);
// On the current GPU (use_cuda_device). Throws qopt::Error when no usable GPU is present or the
// GPU lacks the optimizer. recompute: see GpuModel::set_recompute; owned: as make_cpu_backend's.
// Its reduce_gradients / share_parameters use the communicator's device collectives (NCCL) where
// it has them, else stage the buffers through host memory.
std::unique_ptr<TrainBackend> make_cuda_backend(const ModelConfig& config, const OptimizerConfig& optimizer,
                                                bool recompute = false, const OwnedSlots* owned = nullptr);

}  // namespace qopt
