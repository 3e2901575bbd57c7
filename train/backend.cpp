#include "train/backend.hpp"

#include <cuda_runtime.h>
#include <omp.h>

#include <cmath>

#include "core/error.hpp"
#include "kernels/cuda_common.cuh"
#include "kernels/device.hpp"
#include "kernels/gpu.hpp"
#include "model/cpu_model.hpp"
#include "model/gpu_model.hpp"
#include "optim/gpu_optimizer.hpp"
#include "optim/grad_clip.hpp"

namespace qopt {

namespace {

class CpuBackend final : public TrainBackend {
public:
    CpuBackend(const ModelConfig& config, const OptimizerConfig& optimizer, const OwnedSlots* owned)
        : model_(config), optimizer_(make_cpu_optimizer(model_.layout(), optimizer, owned)) {}
    std::string describe() const override { return "cpu, " + std::to_string(omp_get_max_threads()) + " threads"; }
    void set_params(const std::vector<float>& params) override {
        QOPT_CHECK(params.size() == model_.params().size(), "set_params: wrong size");
        model_.params() = params;
    }
    std::vector<float> params() override { return model_.params(); }
    void set_optimizer_state(const OptimizerState& state) override { optimizer_->load_state(state); }
    OptimizerState optimizer_state() override { return optimizer_->state(); }
    long optimizer_step() const override { return optimizer_->step_count(); }
    size_t optimizer_state_bytes() const override { return optimizer_->state_bytes(); }
    long rejected_preconditioners() const override { return optimizer_->rejected_preconditioners(); }
    EigenRefreshCounts eigen_refreshes() const override { return optimizer_->eigen_refreshes(); }
    void zero_grads() override { model_.zero_grads(); }
    double forward_backward(const int* inputs, const int* targets, int batch, int seq_len,
                            double grad_scale) override {
        return model_.forward_backward(inputs, targets, batch, seq_len, float(grad_scale));
    }
    double loss(const int* inputs, const int* targets, int batch, int seq_len) override {
        return model_.loss(inputs, targets, batch, seq_len);
    }
    double grad_norm() override { return clip_grad_norm_cpu(model_.grads().data(), model_.grads().size(), 0.0); }
    void step(double lr, double grad_scale) override {
        optimizer_->step(model_.params().data(), model_.grads().data(), lr, grad_scale);
    }
    void set_linear_quant(const LinearQuantConfig& quant) override { model_.set_linear_quant(quant); }
    std::string memory_report(int, int) override { return ""; }
    void reduce_gradients(Communicator& comm) override {
        comm.all_reduce_mean(model_.grads().data(), model_.grads().size());
    }
    void share_parameters(Communicator& comm, const std::vector<std::vector<ParamRange>>& ranges_by_rank) override {
        comm.share_ranges(model_.params().data(), ranges_by_rank);
    }

private:
    CpuModel<float> model_;
    std::unique_ptr<Optimizer> optimizer_;
};

class CudaBackend final : public TrainBackend {
public:
    CudaBackend(const ModelConfig& config, const OptimizerConfig& optimizer, std::string device, bool recompute,
                const OwnedSlots* owned)
        : device_(std::move(device)), model_(config), optimizer_(model_.layout(), optimizer, owned), norm_(1) {
        model_.set_recompute(recompute);
    }
    std::string describe() const override {
        return "cuda, " + device_ + (model_.recompute() ? ", MLP activations recomputed" : "");
    }
    void set_params(const std::vector<float>& params) override { model_.upload_params(params); }
    std::vector<float> params() override { return model_.download_params(); }
    void set_optimizer_state(const OptimizerState& state) override { optimizer_.load_state(state); }
    OptimizerState optimizer_state() override { return optimizer_.state(); }
    long optimizer_step() const override { return optimizer_.step_count(); }
    size_t optimizer_state_bytes() const override { return optimizer_.state_bytes(); }
    long rejected_preconditioners() const override { return optimizer_.rejected_preconditioners(); }
    EigenRefreshCounts eigen_refreshes() const override { return optimizer_.eigen_refreshes(); }
    void zero_grads() override { model_.zero_grads(); }
    double forward_backward(const int* inputs, const int* targets, int batch, int seq_len,
                            double grad_scale) override {
        return model_.forward_backward(inputs, targets, batch, seq_len, float(grad_scale));
    }
    double loss(const int* inputs, const int* targets, int batch, int seq_len) override {
        return model_.loss(inputs, targets, batch, seq_len);
    }
    double grad_norm() override {
        global_norm_gpu(norm_.data(), model_.grads_device(), model_.layout().total);
        return double(norm_.download()[0]);
    }
    void step(double lr, double grad_scale) override {
        optimizer_.step(model_.params_device(), model_.grads_device(), lr, grad_scale,
                        model_.compute_weights_device());
    }
    void set_linear_quant(const LinearQuantConfig& quant) override { model_.set_linear_quant(quant); }
    void reduce_gradients_during_backward(Communicator& comm) override {
        DeviceCollectives* device = comm.device_collectives();
        if (!device) return;
        float* grads = model_.grads_device();
        model_.set_gradients_ready_hook([device, grads](size_t offset, size_t count) {
            device->all_reduce_mean_beside_default_stream(grads + offset, count);
        });
        reducing_during_backward_ = true;
    }
    void reduce_gradients(Communicator& comm) override {
        float* grads = model_.grads_device();
        const size_t count = model_.layout().total;
        if (reducing_during_backward_) {  // every part is under way: wait for them
            model_.set_gradients_ready_hook(nullptr);
            reducing_during_backward_ = false;
            comm.device_collectives()->join_reductions();
            return;
        }
        if (DeviceCollectives* device = comm.device_collectives()) {
            device->all_reduce_mean_on_device(grads, count);
            return;
        }
        staging_.resize(count);
        CUDA_CHECK(cudaMemcpy(staging_.data(), grads, count * sizeof(float), cudaMemcpyDeviceToHost));
        comm.all_reduce_mean(staging_.data(), count);
        CUDA_CHECK(cudaMemcpy(grads, staging_.data(), count * sizeof(float), cudaMemcpyHostToDevice));
    }
    void share_parameters(Communicator& comm, const std::vector<std::vector<ParamRange>>& ranges_by_rank) override {
        float* params = model_.params_device();
        const size_t count = model_.layout().total;
        if (DeviceCollectives* device = comm.device_collectives()) {
            device->share_ranges_on_device(params, ranges_by_rank);
        } else {
            // This rank's ranges out, the others' in, through a host copy of the buffer.
            staging_.resize(count);
            for (const ParamRange& r : ranges_by_rank[size_t(comm.rank())])
                CUDA_CHECK(cudaMemcpy(staging_.data() + r.offset, params + r.offset, r.count * sizeof(float),
                                      cudaMemcpyDeviceToHost));
            comm.share_ranges(staging_.data(), ranges_by_rank);
            for (size_t owner = 0; owner < ranges_by_rank.size(); ++owner)
                if (int(owner) != comm.rank())
                    for (const ParamRange& r : ranges_by_rank[owner])
                        CUDA_CHECK(cudaMemcpy(params + r.offset, staging_.data() + r.offset, r.count * sizeof(float),
                                              cudaMemcpyHostToDevice));
        }
        // The optimizer wrote the bf16 copy of this rank's share only: the rest from the new masters.
        to_bf16_gpu(model_.compute_weights_device(), params, count);
    }
    std::string memory_report(int batch, int seq_len) override {
        // The weights and optimizer state are allocated by now; the activations are planned
        // (exactly, by the code that allocates them) and refused before allocating when they
        // would not fit in what is free, less headroom for the cuBLASLt workspaces (the optimizer
        // reserved its cuSOLVER ones when it was built).
        const size_t activations = model_.planned_activation_bytes(batch, seq_len);
        const GpuMemory memory = gpu_memory();
        const size_t headroom = size_t(512) << 20;
        if (activations + headroom > memory.free) {
            std::string recompute_hint;
            if (!model_.recompute()) {
                model_.set_recompute(true);
                recompute_hint = ", --recompute (activations then " +
                                 gigabytes(model_.planned_activation_bytes(batch, seq_len)) + ")";
                model_.set_recompute(false);
            }
            fail("the run does not fit in GPU memory: activations for ", batch, " x ", seq_len, " tokens need ",
                 gigabytes(activations), " but ", gigabytes(memory.free), " of ", gigabytes(memory.total),
                 " are free beside the weights (", gigabytes(model_.weight_bytes()), ") and optimizer state (",
                 gigabytes(optimizer_.state_bytes()), "); use a smaller --batch-size with a larger --grad-accum (same "
                 "tokens per step)", recompute_hint, ", or a shorter --seq-len");
        }
        model_.allocate(batch, seq_len);
        // The optimizer reserved its refreshes' eigendecomposition/QR workspaces when it was built.
        const size_t linalg_bytes = linalg_workspace_bytes();
        return model_.memory_report() +
               (linalg_bytes ? ", optimizer's linear-algebra workspaces " + gigabytes(linalg_bytes) : "");
    }

private:
    std::string device_;
    GpuModel model_;
    GpuOptimizer optimizer_;
    DeviceBuffer<float> norm_;
    std::vector<float> staging_;  // host copies for a communicator without device collectives
    bool reducing_during_backward_ = false;
};

}  // namespace

std::unique_ptr<TrainBackend> make_cpu_backend(const ModelConfig& config, const OptimizerConfig& optimizer,
                                               const OwnedSlots* owned) {
    return std::make_unique<CpuBackend>(config, optimizer, owned);
}

std::unique_ptr<TrainBackend> make_cuda_backend(const ModelConfig& config, const OptimizerConfig& optimizer,
                                                bool recompute, const OwnedSlots* owned) {
    const CudaDeviceInfo gpu = query_cuda_device();
    if (!gpu.usable) fail("--device cuda: ", gpu.problem);
    const GpuMemory memory = gpu_memory();
    try {
        return std::make_unique<CudaBackend>(config, optimizer, gpu.description, recompute, owned);
    } catch (const Error& e) {
        if (std::string(e.what()).find("out of memory") == std::string::npos) throw;
        const size_t weights = ParamLayout::build(config).total * (2 * sizeof(float) + sizeof(bf16));
        fail("the model does not fit in GPU memory: its weights take ", gigabytes(weights),
             " (fp32 master + fp32 grads + bf16 copy) before the ", optimizer_name(optimizer.kind), " state, and ",
             gigabytes(memory.free), " of ", gigabytes(memory.total),
             " were free; use a smaller model, or an optimizer with less state (AdamW: 8 bytes per parameter)");
    }
}

}  // namespace qopt
