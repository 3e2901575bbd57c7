#include "eval/eval_model.hpp"

#include <omp.h>

#include <chrono>

#include "core/error.hpp"
#include "data/loader.hpp"
#include "kernels/cuda_common.cuh"
#include "kernels/device.hpp"
#include "kernels/gpu.hpp"
#include "model/cpu_model.hpp"
#include "model/gpu_model.hpp"

namespace qopt {

namespace {

class CpuEvalModel final : public EvalModel {
public:
    explicit CpuEvalModel(const ModelConfig& config) : model_(config) {}
    std::string describe() const override { return "cpu, " + std::to_string(omp_get_max_threads()) + " threads"; }
    bool on_gpu() const override { return false; }
    void run_in_integers(const std::vector<QuantizedTensor>&) override {
        fail("integer execution (--integer) runs on the GPU only (int8 tensor cores, packed-weight GEMM): use --device cuda");
    }
    const ModelConfig& config() const override { return model_.config(); }
    void set_params(const std::vector<float>& params) override { model_.params() = params; }
    void set_linear_quant(const LinearQuantConfig& quant) override { model_.set_linear_quant(quant); }
    double loss(const int* inputs, const int* targets, int batch, int seq_len) override {
        return model_.loss(inputs, targets, batch, seq_len);
    }
    std::vector<float> token_losses() override { return model_.token_losses(); }
    void set_module_tap(ModuleTap tap, ModuleFilter wanted) override {
        if (!tap) return model_.set_module_hook(nullptr);
        model_.set_module_hook([tap, wanted](int layer, Module module, const float* out, int rows, int cols) {
            if (!wanted || wanted(layer, module)) tap(layer, module, out, rows, cols);
        });
    }
    void linear_apply(int layer, int site, std::vector<float>& out, const float* input, int rows,
                      bool quantize_weight, bool quantize_input, bool add_bias) override {
        const LinearMatrix m = linear_matrix(model_.config(), model_.layout(), layer, site);
        out.resize(size_t(rows) * m.rows);
        model_.linear_apply(layer, site, out.data(), input, rows, quantize_weight, quantize_input, add_bias);
    }
    void start_hessians() override {
        const ModelConfig& c = model_.config();
        hessians_.assign(size_t(c.n_layers) * kLinearSites, {});
        model_.set_input_hook([this](int layer, int site, const float* x, int rows, int cols) {
            std::vector<double>& h = hessians_[size_t(layer) * kLinearSites + site];
            h.resize(size_t(cols) * cols, 0.0);
#pragma omp parallel for schedule(dynamic, 4)
            for (int i = 0; i < cols; ++i)
                for (int n = 0; n < rows; ++n) {
                    const double xi = x[size_t(n) * cols + i];
                    const float* row = x + size_t(n) * cols;
                    double* hi = &h[size_t(i) * cols];
                    for (int j = 0; j < cols; ++j) hi[j] += xi * double(row[j]);
                }
        });
    }
    std::vector<std::vector<double>> finish_hessians() override {
        model_.set_input_hook(nullptr);
        return std::move(hessians_);
    }

private:
    CpuModel<float> model_;
    std::vector<std::vector<double>> hessians_;
};

std::vector<float> to_host_floats(const bf16* device, size_t count) {
    std::vector<bf16> staged(count);
    CUDA_CHECK(cudaMemcpy(staged.data(), device, count * sizeof(bf16), cudaMemcpyDeviceToHost));
    std::vector<float> out(count);
#pragma omp parallel for schedule(static) if (count > (1 << 16))
    for (size_t i = 0; i < count; ++i) out[i] = __bfloat162float(staged[i]);
    return out;
}

class GpuEvalModel final : public EvalModel {
public:
    GpuEvalModel(const ModelConfig& config, std::string device) : model_(config), device_(std::move(device)) {}
    std::string describe() const override { return "cuda, " + device_; }
    bool on_gpu() const override { return true; }
    void run_in_integers(const std::vector<QuantizedTensor>& matrices) override {
        LinearQuantConfig quant = model_.linear_quant();  // (set_integer_weights checks it is quantized)
        quant.weights_offline = true;  // the hidden weights come from `matrices`, not the bf16 copy
        model_.set_linear_quant(quant);
        model_.set_integer_weights(matrices);
    }
    const ModelConfig& config() const override { return model_.config(); }
    void set_params(const std::vector<float>& params) override { model_.upload_params(params); }
    void set_linear_quant(const LinearQuantConfig& quant) override { model_.set_linear_quant(quant); }
    double loss(const int* inputs, const int* targets, int batch, int seq_len) override {
        return model_.loss(inputs, targets, batch, seq_len);
    }
    std::vector<float> token_losses() override { return model_.token_losses(); }
    void set_module_tap(ModuleTap tap, ModuleFilter wanted) override {
        if (!tap) return model_.set_module_hook(nullptr);
        model_.set_module_hook([tap, wanted](int layer, Module module, const bf16* out, int rows, int cols) {
            if (wanted && !wanted(layer, module)) return;
            const std::vector<float> host = to_host_floats(out, size_t(rows) * cols);
            tap(layer, module, host.data(), rows, cols);
        });
    }
    void linear_apply(int layer, int site, std::vector<float>& out, const float* input, int rows,
                      bool quantize_weight, bool quantize_input, bool add_bias) override {
        const LinearMatrix m = linear_matrix(model_.config(), model_.layout(), layer, site);
        std::vector<bf16> staged(size_t(rows) * m.cols);
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < staged.size(); ++i) staged[i] = __float2bfloat16(input[i]);
        apply_in_.upload(staged);
        if (apply_out_.size() < size_t(rows) * m.rows) apply_out_.resize(size_t(rows) * m.rows);
        model_.linear_apply(layer, site, apply_out_.data(), apply_in_.data(), rows, quantize_weight, quantize_input,
                            add_bias);
        out = to_host_floats(apply_out_.data(), size_t(rows) * m.rows);
    }
    // x^T x accumulates in fp32 on the device: the weight-gradient product with dout = in = x.
    void start_hessians() override {
        const ModelConfig& c = model_.config();
        hessians_.clear();
        hessians_.resize(size_t(c.n_layers) * kLinearSites);
        model_.set_input_hook([this](int layer, int site, const bf16* x, int rows, int cols) {
            DeviceBuffer<float>& h = hessians_[size_t(layer) * kLinearSites + site];
            if (h.size() == 0) h.resize(size_t(cols) * cols), h.fill_bytes(0);
            matmul_backward_weight_gpu(h.data(), x, x, rows, cols, cols);
        });
    }
    std::vector<std::vector<double>> finish_hessians() override {
        model_.set_input_hook(nullptr);
        std::vector<std::vector<double>> out;
        for (auto& h : hessians_) {
            const std::vector<float> host = h.download();
            out.emplace_back(host.begin(), host.end());
            h.release();
        }
        return out;
    }

private:
    GpuModel model_;
    std::string device_;
    std::vector<DeviceBuffer<float>> hessians_;
    DeviceBuffer<bf16> apply_in_, apply_out_;
};

}  // namespace

double mean_loss(EvalModel& model, TokenLoader& loader, int batches, int batch_size, int seq_len,
                 double* seconds_after_first) {
    loader.reset();
    std::vector<int> inputs, targets;
    double sum = 0;
    auto start = std::chrono::steady_clock::now();
    for (int b = 0; b < batches; ++b) {
        if (b == 1) start = std::chrono::steady_clock::now();
        loader.next_batch(inputs, targets);
        sum += model.loss(inputs.data(), targets.data(), batch_size, seq_len);
    }
    if (seconds_after_first)
        *seconds_after_first = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return sum / batches;
}

std::unique_ptr<EvalModel> make_eval_model(const ModelConfig& config, const std::string& device) {
    QOPT_CHECK(device == "cpu" || device == "cuda" || device == "auto", "--device must be cpu, cuda or auto, got '",
               device, "'");
    if (device == "cpu") return std::make_unique<CpuEvalModel>(config);
    const CudaDeviceInfo gpu = query_cuda_device();
    const std::string unsupported = GpuModel::unsupported_reason(config);
    if (device == "cuda") {
        if (!gpu.usable) fail("--device cuda: ", gpu.problem);
        if (!unsupported.empty()) fail("--device cuda: ", unsupported);
    }
    if (gpu.usable && unsupported.empty()) return std::make_unique<GpuEvalModel>(config, gpu.description);
    return std::make_unique<CpuEvalModel>(config);
}

}  // namespace qopt
