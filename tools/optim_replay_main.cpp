// optim_replay: applies N steps of one optimizer to tensors and gradients read from a
// safetensors file, and writes the resulting tensors and the optimizer's state, so the
// update can be compared with another implementation (tools/compare_optimizers.py runs the
// published references on the same input).
//
// Input: F32 tensors "<name>" (the starting values; 2-D tensors are hidden matrices, routed
// to the method; 1-D tensors go to AdamW, or Scion's BiasRMS) and "<name>.grad.<k>" for
// k = 0 .. N-1 (one gradient per step). Output: "<name>" after N steps and "state.<buffer>"
// for every state tensor; metadata "qopt_optimizer" and "steps".
#include <iostream>
#include <map>

#include <CLI/CLI.hpp>

#include "core/error.hpp"
#include "train/train_cli.hpp"
#include "core/files.hpp"
#include "core/safetensors.hpp"
#include "kernels/device.hpp"
#include "optim/gpu_optimizer.hpp"
#include "optim/optimizer.hpp"
#include "optim/optimizer_cli.hpp"

int main(int argc, char** argv) {
    CLI::App app{"qopt optim_replay: N optimizer steps on tensors and gradients from a safetensors file"};
    std::string in_path, out_path, device = "cpu", optimizer_flag = "adamw";
    long steps = 0;
    double grad_scale = 1.0;
    qopt::OptimizerConfig config;
    app.add_option("--in", in_path, "Input safetensors: <name> and <name>.grad.<k>")->required();
    app.add_option("--out", out_path, "Output safetensors: <name> and state.<buffer>")->required();
    app.add_option("--steps", steps, "Steps to apply (0: as many as the file has gradients)");
    app.add_option("--device", device, "cpu (the reference) or cuda")->capture_default_str();
    app.add_option("--grad-scale", grad_scale, "Multiply every gradient by this (clipping)")->capture_default_str();
    qopt::add_optimizer_flags(app, optimizer_flag, config);
    return qopt::run_main(app, argc, argv, "optim_replay", [&] {
        qopt::resolve_optimizer(optimizer_flag, config);
        QOPT_CHECK(device == "cpu" || device == "cuda", "--device must be cpu or cuda");
        const qopt::SafetensorsFile file = qopt::SafetensorsFile::load(in_path);
        // The tensors (names without ".grad."), in file order, as one flat layout.
        qopt::ParamLayout layout;
        std::map<std::string, long> grad_counts;
        for (const std::string& name : file.names()) {
            const size_t at = name.find(".grad.");
            if (at != std::string::npos) {
                ++grad_counts[name.substr(0, at)];
                continue;
            }
            const std::vector<int64_t> shape = file.shape(name);
            QOPT_CHECK(shape.size() == 1 || shape.size() == 2, in_path, ": tensor '", name, "' must be 1-D or 2-D");
            layout.append(name, shape, shape.size() == 2 ? qopt::ParamKind::Matrix : qopt::ParamKind::Bias);
        }
        QOPT_CHECK(!layout.tensors.empty(), in_path, ": no tensors to optimize");
        long available = -1;
        for (const auto& t : layout.tensors) {
            const long n = grad_counts.count(t.name) ? grad_counts[t.name] : 0;
            QOPT_CHECK(available < 0 || n == available, in_path, ": tensor '", t.name, "' has ", n,
                       " gradients, others ", available);
            available = n;
        }
        if (steps == 0) steps = available;
        QOPT_CHECK(steps > 0 && steps <= available, "--steps ", steps, " but the file has ", available, " gradients");

        std::vector<float> params(layout.total);
        for (const auto& t : layout.tensors) {
            const auto values = file.f32(t.name, t.shape);
            std::copy(values.begin(), values.end(), params.begin() + long(t.offset));
        }
        auto gradients_at = [&](long k) {
            std::vector<float> grads(layout.total);
            for (const auto& t : layout.tensors) {
                const auto values = file.f32(t.name + ".grad." + std::to_string(k), t.shape);
                std::copy(values.begin(), values.end(), grads.begin() + long(t.offset));
            }
            return grads;
        };
        const double lr = config.method_lr();
        qopt::OptimizerState state;
        if (device == "cpu") {
            auto optimizer = qopt::make_cpu_optimizer(layout, config);
            for (long k = 0; k < steps; ++k) {
                std::vector<float> grads = gradients_at(k);
                optimizer->step(params.data(), grads.data(), lr, grad_scale);
            }
            state = optimizer->state();
        } else {
            const qopt::CudaDeviceInfo gpu = qopt::query_cuda_device();
            if (!gpu.usable) qopt::fail("--device cuda: ", gpu.problem);
            qopt::GpuOptimizer optimizer(layout, config);
            qopt::DeviceBuffer<float> d_params, d_grads;
            d_params.upload(params);
            for (long k = 0; k < steps; ++k) {
                d_grads.upload(gradients_at(k));
                optimizer.step(d_params.data(), d_grads.data(), lr, grad_scale, nullptr);
            }
            params = d_params.download();
            state = optimizer.state();
        }
        std::vector<qopt::TensorView> out;
        for (const auto& t : layout.tensors) out.push_back({t.name, t.shape, params.data() + t.offset});
        std::vector<std::string> state_names;
        for (const auto& s : state.tensors) state_names.push_back("state." + s.name);
        for (size_t i = 0; i < state.tensors.size(); ++i)
            out.push_back({state_names[i], state.tensors[i].shape, state.tensors[i].values.data()});
        qopt::write_file_atomic(out_path, qopt::safetensors_serialize(
                                              out, {{"qopt_optimizer", state.optimizer},
                                                    {"steps", std::to_string(steps)},
                                                    {"settings", config.to_json().dump()}}));
        std::cout << "optim_replay: " << state.optimizer << ", " << steps << " steps on " << layout.tensors.size()
                  << " tensors (" << route_parameters(layout, config).describe() << ") -> " << out_path << "\n";
        return 0;
    });
}
