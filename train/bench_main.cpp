// bench: training throughput on the GPU. For each preset:B:T and each optimizer it runs full
// training steps on random tokens (after warm-up) and prints tokens/s, MFU, ms per phase
// (median) and GPU memory, and the optimizer's mean step time as a share of forward+backward;
// it measures the bf16 matmul ceiling of this GPU first (cuBLASLt, 8192^3) for the MFU, and
// the attention kernels' own TFLOP/s with --attention. --cpu-linalg times the CPU references'
// float64 helpers instead (no GPU needed).
//
// FLOPs per token (the convention of ../shared/PEERS.md and llm.c): 6 N + 12 L d T, N = all
// parameters (tied embedding counted once), L layers, d = d_model, T = sequence length; the
// attention term counts the full T x T square although causal kernels skip half of it.
// Optimizer FLOPs: Newton-Schulz on an r x c matrix (s = min(r, c)) costs per iteration
// 2 s^2 max(r,c) (the Gram matrix) + 2 s^3 (its square) + 2 s^2 max(r,c) (the product back).
// Shampoo's, SOAP's and PSGD's matrix products are counted as they are issued
// (issued_matrix_flops: GEMMs, syrk, triangular products and solves; not cuSOLVER's
// eigendecompositions and Householder QRs) and set against the fp32 GEMM ceiling measured here.
#include <cuda_runtime.h>

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <CLI/CLI.hpp>

#include "core/error.hpp"
#include "train/train_cli.hpp"
#include "kernels/cuda_common.cuh"
#include "kernels/device.hpp"
#include "kernels/gpu.hpp"
#include "model/gpu_model.hpp"
#include "optim/dense.hpp"
#include "optim/gpu_optimizer.hpp"
#include "optim/shard_plan.hpp"
#include "optim/optimizer_cli.hpp"
#include "optim/optimizer_kernels.hpp"
#include "optim/preconditioner_kernels.hpp"
#include "kernels/side_stream.hpp"
#include "quant/hadamard.hpp"
#include "quant/quant_cli.hpp"
#include "quant/int8_linear.hpp"
#include "quant/w4a16_linear.hpp"
#include "quant/quant_gpu.hpp"

namespace qopt {
namespace {

// Times GPU work between two events on stream 0, in milliseconds.
class Timer {
public:
    Timer() {
        CUDA_CHECK(cudaEventCreate(&start_));
        CUDA_CHECK(cudaEventCreate(&stop_));
    }
    ~Timer() {
        cudaEventDestroy(start_);
        cudaEventDestroy(stop_);
    }
    void start() { CUDA_CHECK(cudaEventRecord(start_)); }
    float stop() {
        CUDA_CHECK(cudaEventRecord(stop_));
        CUDA_CHECK(cudaEventSynchronize(stop_));
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
        return ms;
    }

private:
    cudaEvent_t start_, stop_;
};

// The same interface on the host's steady clock, for work that runs on the CPU.
class WallTimer {
public:
    void start() { start_ = std::chrono::steady_clock::now(); }
    double stop() const {
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
    }

private:
    std::chrono::steady_clock::time_point start_;
};

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// Median milliseconds of `runs` timed calls after `warmup` untimed ones (Timer: GPU work,
// WallTimer: CPU work).
template <typename Clock, typename Call>
double median_call_ms(Clock& timer, Call&& call, int warmup, int runs) {
    for (int i = 0; i < warmup; ++i) call();
    std::vector<double> ms;
    for (int i = 0; i < runs; ++i) {
        timer.start();
        call();
        ms.push_back(timer.stop());
    }
    return median(ms);
}

// TFLOP/s of one n x n x n product multiply(out, a, b) on operands of small finite values
// (median of 10 calls after 3).
template <typename T, typename Multiply>
double square_product_tflops(int n, Multiply multiply) {
    DeviceBuffer<T> a(size_t(n) * n), b(size_t(n) * n), out(size_t(n) * n);
    a.fill_bytes(0x3c), b.fill_bytes(0x3c);
    Timer timer;
    const double ms = median_call_ms(timer, [&] { multiply(out.data(), a.data(), b.data()); }, 3, 10);
    return 2.0 * n * n * double(n) / (ms * 1e-3) / 1e12;
}

// Dense bf16 matmul ceiling: out[n, n] = a[n, n] b^T through the same cuBLASLt path.
double measure_matmul_tflops() {
    const int n = 8192;
    return square_product_tflops<bf16>(
        n, [&](bf16* out, const bf16* a, const bf16* b) { matmul_forward_gpu(out, a, b, nullptr, n, n, n); });
}

// The fp32 ceiling the preconditioned optimizers' products run against: one 4096^3 product in
// full fp32 through the same call they use (batched_matmul_f32_gpu, a batch of one).
double measure_matmul_f32_tflops() {
    const int n = 4096;
    return square_product_tflops<float>(n, [&](float* out, const float* a, const float* b) {
        batched_matmul_f32_gpu(out, out, a, false, b, false, n, n, n, 1.0f, 0.0f, 1, int64_t(n) * n, int64_t(n) * n,
                               int64_t(n) * n);
    });
}

struct BenchConfig {
    std::string preset;
    ModelConfig model;  // the preset's
    int batch = 0, seq_len = 0;
};

BenchConfig parse_config(const std::string& text) {
    BenchConfig c;
    std::stringstream stream(text);
    std::string batch, seq_len;
    if (!std::getline(stream, c.preset, ':') || !std::getline(stream, batch, ':') || !std::getline(stream, seq_len))
        fail("--config '", text, "': expected PRESET:BATCH:SEQ_LEN, e.g. gpt2-124m:32:1024");
    try {
        c.batch = std::stoi(batch);
        c.seq_len = std::stoi(seq_len);
    } catch (const std::exception&) {
        fail("--config '", text, "': batch and sequence length must be integers");
    }
    QOPT_CHECK(c.batch > 0 && c.seq_len > 0, "--config '", text, "': batch and sequence length must be positive");
    c.model = preset_config(c.preset);  // fails naming the known presets
    QOPT_CHECK(c.seq_len <= c.model.max_seq_len, "--config '", text, "': sequence length above the preset's ",
               c.model.max_seq_len);
    return c;
}

double mean(const std::vector<double>& v) {
    double sum = 0;
    for (double x : v) sum += x;
    return sum / double(v.size());
}

// Muon's and Scion's Newton-Schulz products per step (optim/shard_plan.hpp's count); 0 for the
// other methods, whose products bench counts as they are issued.
double newton_schulz_flops(const Routing& routing, const OptimizerConfig& config) {
    if (config.kind != OptimizerKind::Muon && config.kind != OptimizerKind::Scion) return 0;
    double flops = 0;
    for (const auto& m : routing.matrices) flops += matrix_product_flops(m.rows, m.cols, config);
    return flops;
}

// Returns the median step time (ms).
double bench_training(const BenchConfig& bc, int warmup, int steps, double peak_tflops, double f32_peak_tflops,
                      bool recompute,
                      const OptimizerConfig& optimizer_config, const LinearQuantConfig& quant) {
    const ModelConfig& config = bc.model;
    GpuModel model(config);
    model.set_recompute(recompute);
    model.set_linear_quant(quant);
    {
        std::vector<float> params(model.layout().total);
        init_params(model.layout(), 1234, params.data());
        model.upload_params(params);
    }
    GpuOptimizer optimizer(model.layout(), optimizer_config);
    const double lr = optimizer_config.method_lr() * 0.1;
    DeviceBuffer<float> norm(1);
    model.allocate(bc.batch, bc.seq_len);
    const size_t N = size_t(bc.batch) * bc.seq_len;
    std::mt19937_64 gen(42);
    std::vector<int> inputs(N), targets(N);
    Timer timer;
    std::vector<double> forward_ms, backward_ms, optimizer_ms, step_ms, optimizer_flops;
    // Taken again at the first timed step: the QRs and refreshes reported are the timed steps'.
    CholeskyQrReport qr_before = cholesky_qr_totals();
    EigenRefreshCounts refreshes_before;
    double loss = 0;
    size_t peak_in_use = 0;
    for (int step = 0; step < warmup + steps; ++step) {
        for (size_t i = 0; i < N; ++i) inputs[i] = int(gen() % uint64_t(config.vocab_size));
        for (size_t i = 0; i < N; ++i) targets[i] = int(gen() % uint64_t(config.vocab_size));
        // The last step's work on the default stream is done; a Shampoo refresh on its side stream
        // (--shampoo-refresh-lag) may still run, overlapping this step, as in training.
        CUDA_CHECK(cudaStreamSynchronize(0));
        Timer whole;
        whole.start();
        timer.start();
        model.zero_grads();
        model.forward(inputs.data(), targets.data(), bc.batch, bc.seq_len, 1.0f);
        const double f = timer.stop();
        timer.start();
        model.backward();
        const double b = timer.stop();
        timer.start();
        global_norm_gpu(norm.data(), model.grads_device(), model.layout().total);
        const float grad_norm = norm.download()[0];
        const double flops_before = issued_matrix_flops();
        if (step == warmup) {
            qr_before = cholesky_qr_totals();
            refreshes_before = optimizer.eigen_refreshes();
        }
        optimizer.step(model.params_device(), model.grads_device(), lr, grad_norm > 1.0f ? 1.0 / grad_norm : 1.0,
                       model.compute_weights_device());
        const double o = timer.stop();
        const double step_flops = issued_matrix_flops() - flops_before;
        const double total = whole.stop();
        // Device memory in use after each step (this process: model, optimizer state, library
        // workspaces and scratch); its maximum is the peak reported. Outside the timed region.
        size_t free_now = 0, total_now = 0;
        CUDA_CHECK(cudaMemGetInfo(&free_now, &total_now));
        peak_in_use = std::max(peak_in_use, total_now - free_now);
        loss = model.mean_loss();
        if (step < warmup) continue;
        forward_ms.push_back(f), backward_ms.push_back(b), optimizer_ms.push_back(o), step_ms.push_back(total);
        optimizer_flops.push_back(step_flops);
    }
    const double ms = median(step_ms);
    const double tokens_per_second = double(N) / (ms * 1e-3);
    const double params = double(model.layout().total);
    const double flops_per_token =
        6.0 * params + 12.0 * config.n_layers * double(config.d_model) * double(bc.seq_len);
    const double tflops = flops_per_token * tokens_per_second / 1e12;
    std::printf("%-11s B=%-3d T=%-5d%s %-7s%s%s | %9.0f tok/s | step %7.2f ms (fwd %6.2f, bwd %6.2f, opt %5.2f) | %6.1f TFLOP/s, "
                "MFU %4.1f%% | memory planned %.2f GB, peak in use %.2f GB | loss %.3f\n",
                bc.preset.c_str(), bc.batch, bc.seq_len, recompute ? " recompute" : "",
                optimizer_name(optimizer_config.kind), quant.enabled() ? " qat " : "",
                quant.enabled() ? quant.short_name().c_str() : "", tokens_per_second, ms, median(forward_ms), median(backward_ms),
                median(optimizer_ms), tflops, 100.0 * tflops / peak_tflops, double(model.device_bytes()) / 1e9,
                double(peak_in_use) / 1e9, loss);
    // The optimizer's share: mean step time (includes the gradient norm) over mean fwd+bwd.
    const double opt_mean = mean(optimizer_ms), fwd_bwd_mean = mean(forward_ms) + mean(backward_ms);
    const Routing routing = route_parameters(model.layout(), optimizer_config);
    const double ns_flops = newton_schulz_flops(routing, optimizer_config);
    std::printf("  optimizer %-7s | mean %6.2f ms, median %6.2f ms, max %6.2f ms = %5.1f%% of fwd+bwd (%.2f ms) | whole step %9.0f "
                "tok/s (mean) | state %.2f GB",
                optimizer_name(optimizer_config.kind), opt_mean, median(optimizer_ms),
                *std::max_element(optimizer_ms.begin(), optimizer_ms.end()), 100.0 * opt_mean / fwd_bwd_mean,
                fwd_bwd_mean, double(N) / ((fwd_bwd_mean + opt_mean) * 1e-3), double(optimizer.state_bytes()) / 1e9);
    // What the optimizer costs the whole step, slowdowns of forward and backward by work it runs
    // beside them included: mean step over the median forward+backward (steps without such work).
    std::vector<double> fwd_bwd_ms(forward_ms.size());
    for (size_t i = 0; i < fwd_bwd_ms.size(); ++i) fwd_bwd_ms[i] = forward_ms[i] + backward_ms[i];
    const double fwd_bwd_median = median(fwd_bwd_ms), step_over = mean(step_ms) - fwd_bwd_median;
    std::printf(" | mean step - median fwd+bwd %.2f ms = %.1f%%", step_over, 100.0 * step_over / fwd_bwd_median);
    if (ns_flops > 0)
        std::printf(" | Newton-Schulz %.2f TFLOP per step, %.0f TFLOP/s over the whole optimizer step", ns_flops / 1e12,
                    ns_flops / (opt_mean * 1e-3) / 1e12);
    const double products_mean = mean(optimizer_flops);
    if (products_mean > 0) {
        const double rate = products_mean / (opt_mean * 1e-3) / 1e12;
        std::printf(" | fp32 products %.2f TFLOP per step (mean; most %.2f), %.1f TFLOP/s over the whole optimizer step "
                    "= %.0f%% of the fp32 GEMM ceiling (%.1f TFLOP/s%s)",
                    products_mean / 1e12, *std::max_element(optimizer_flops.begin(), optimizer_flops.end()) / 1e12,
                    rate, 100.0 * rate / f32_peak_tflops, f32_peak_tflops,
                    optimizer_config.precond_tf32 ? "; TF32 products can run above it" : "");
    }
    const CholeskyQrReport qr_after = cholesky_qr_totals();
    const long qr_matrices = qr_after.matrices - qr_before.matrices;
    if (qr_matrices > 0)
        std::printf(" | %ld Cholesky QRs, %.2f passes and %.2f Gram matrices each, %ld to Householder", qr_matrices,
                    double(qr_after.passes - qr_before.passes) / double(qr_matrices),
                    double(qr_after.grams - qr_before.grams) / double(qr_matrices),
                    qr_after.householder_fallbacks - qr_before.householder_fallbacks);
    // Over the timed steps, as the QRs above.
    const EigenRefreshCounts refreshes_after = optimizer.eigen_refreshes();
    const long kept = refreshes_after.kept - refreshes_before.kept;
    const long refreshed = kept + refreshes_after.decomposed - refreshes_before.decomposed;
    if (refreshed > 0) std::printf(" | %ld of %ld factor refreshes kept the eigenbasis", kept, refreshed);
    std::printf("\n");
    std::fflush(stdout);
    return ms;
}

// Quantization kernels alone, on an activation-shaped tensor [rows, cols]: bytes moved per
// call over time, against the memory roofline. Forward: read bf16, write bf16 + a mask bit;
// backward (masked rotation, accumulating into bf16): read grad, mask and out, write out.
void bench_quant_kernels(const LinearQuantConfig& quant, long rows, int cols) {
    DeviceBuffer<bf16> in(size_t(rows) * cols), out(size_t(rows) * cols);
    DeviceBuffer<uint32_t> keep(keep_mask_words(size_t(rows) * cols));
    in.fill_bytes(0x3c), out.fill_bytes(0);
    const int block = hadamard_block_for(cols, quant.hadamard_block);
    Timer timer;
    std::vector<double> forward_ms, backward_ms;
    for (int i = 0; i < 12; ++i) {
        timer.start();
        rotate_fake_quant_rows_gpu(out.data(), keep.data(), in.data(), rows, cols, block, quant.activations,
                                   quant.trust);
        const double f = timer.stop();
        timer.start();
        masked_hadamard_rows_gpu(out.data(), in.data(), keep.data(), rows, cols, block, true);
        const double b = timer.stop();
        if (i >= 2) forward_ms.push_back(f), backward_ms.push_back(b);
    }
    const double n = double(rows) * cols;
    const double f = median(forward_ms), b = median(backward_ms);
    std::printf("quant kernels [%ld x %d] block %d: rotate+fake-quant %.3f ms (%.0f GB/s), masked rotation (accumulate) "
                "%.3f ms (%.0f GB/s)\n",
                rows, cols, block, f, 4.125 * n / (f * 1e-3) / 1e9, b, 6.125 * n / (b * 1e-3) / 1e9);
    std::fflush(stdout);
}

// One linear layer's forward product, bf16 (cuBLASLt) against int8 (cuBLASLt, int32 result) and
// packed 4-bit weights (quant/w4a16_linear.hpp), for [rows, in_dim] x [out_dim, in_dim]^T: median
// of 10 after 2 warm-up calls.
void bench_integer_gemm(int rows, int in_dim, int out_dim) {
    DeviceBuffer<bf16> a(size_t(rows) * in_dim), w(size_t(out_dim) * in_dim), c(size_t(rows) * out_dim);
    DeviceBuffer<int8_t> a8(size_t(rows) * in_dim), w8(size_t(out_dim) * in_dim);
    DeviceBuffer<int32_t> c32(size_t(rows) * out_dim);
    a.fill_bytes(0x3c), w.fill_bytes(0x3c), a8.fill_bytes(3), w8.fill_bytes(5);
    Timer timer;
    auto time = [&](auto&& call) { return median_call_ms(timer, call, 2, 10); };
    const double bf16_ms = time([&] { matmul_forward_gpu(c.data(), a.data(), w.data(), nullptr, rows, in_dim, out_dim); });
    const double int8_ms = time([&] { int8_matmul_gpu(c32.data(), a8.data(), w8.data(), rows, in_dim, out_dim); });
    const double ops = 2.0 * rows * in_dim * out_dim;
    std::printf("GEMM %6d x %5d -> %5d: bf16 %.3f ms (%.0f TFLOP/s), int8 %.3f ms (%.0f TOP/s), int8 speedup %.2fx\n",
                rows, in_dim, out_dim, bf16_ms, ops / (bf16_ms * 1e-3) / 1e12, int8_ms, ops / (int8_ms * 1e-3) / 1e12,
                bf16_ms / int8_ms);
    // The whole W8A8 layer (quant/int8_linear.hpp): per-token quantization of the bf16 input,
    // then the int8 product with the scales in its epilogue (Hopper) — or, for comparison and
    // where that kernel does not apply, cuBLASLt's int32 product and the scale pass; the passes'
    // bytes against the HBM rate.
    QuantSpec spec;
    spec.bits = 8;
    DeviceBuffer<float> w_steps(static_cast<size_t>(out_dim)), x_steps(static_cast<size_t>(rows));
    w_steps.fill_bytes(0x3c), x_steps.fill_bytes(0x3c);
    Int8LinearScratch scratch;
    const double layer_ms = time([&] {
        int8_linear_forward_gpu(c.data(), a.data(), w8.data(), w_steps.data(), nullptr, rows, in_dim, out_dim, spec, 0,
                                scratch);
    });
    const double quantize_ms = time([&] { quantize_rows_int8_gpu(a8.data(), x_steps.data(), a.data(), rows, in_dim, spec); });
    const double scales_ms = time([&] {
        dequantize_product_gpu(c.data(), c32.data(), x_steps.data(), w_steps.data(), nullptr, rows, out_dim);
    });
    std::printf("  W8A8 layer %.3f ms (%.2fx bf16): quantize input %.3f ms (%.0f GB/s)", layer_ms, bf16_ms / layer_ms,
                quantize_ms, 3.0 * rows * in_dim / (quantize_ms * 1e-3) / 1e9);
    if (int8_scaled_matmul_available(in_dim)) {
        const double fused_ms = time([&] {
            int8_scaled_matmul_gpu(c.data(), a8.data(), w8.data(), x_steps.data(), w_steps.data(), nullptr, rows, in_dim,
                                   out_dim);
        });
        std::printf(", int8 GEMM with the scales in its epilogue (wgmma) %.3f ms (%.0f TOP/s, %.2fx bf16)", fused_ms,
                    ops / (fused_ms * 1e-3) / 1e12, bf16_ms / fused_ms);
    }
    std::printf("; two-pass: cuBLASLt int8 product %.3f ms + scales %.3f ms (%.0f GB/s)\n", int8_ms, scales_ms,
                6.0 * rows * out_dim / (scales_ms * 1e-3) / 1e9);
    // W4A4 (symmetric 4-bit codes, exact in e4m3) on fp8 tensor cores, both steps in the GEMM's
    // epilogue: the per-token quantization writes e4m3 codes, nothing else runs.
    QuantSpec spec4 = spec;
    spec4.bits = 4;
    DeviceBuffer<uint8_t> a_fp8(size_t(rows) * in_dim), w_fp8(size_t(out_dim) * in_dim);
    a_fp8.fill_bytes(0x40), w_fp8.fill_bytes(0x48);  // e4m3 2 and 4
    const double fp8_ms = time([&] {
        fp8_scaled_matmul_gpu(c.data(), false, a_fp8.data(), w_fp8.data(), x_steps.data(), w_steps.data(), nullptr,
                              rows, in_dim, out_dim);
    });
    const double w4a4_ms = time([&] {
        fp8_linear_forward_gpu(c.data(), a.data(), w_fp8.data(), w_steps.data(), nullptr, rows, in_dim, out_dim, spec4, 0,
                               scratch);
    });
    std::printf("  W4A4 layer on fp8 tensor cores %.3f ms (%.2fx bf16): fp8 GEMM with both scales in its epilogue "
                "%.3f ms (%.0f TFLOP/s, %.2fx bf16)\n",
                w4a4_ms, bf16_ms / w4a4_ms, fp8_ms, ops / (fp8_ms * 1e-3) / 1e12, bf16_ms / fp8_ms);
    // Packed 4-bit weights (groups of 128, asymmetric: the usual W4A16 format) on the bf16 input:
    // the prefill-sized product above, then decoding-sized ones (1, 4, 16 rows) where the weights'
    // bytes dominate — reported as the weights' read rate (bf16: 2 bytes per weight; packed: 0.5 +
    // 8 bytes per group of 128).
    PackedWeights host_packed;
    host_packed.rows = out_dim, host_packed.cols = in_dim, host_packed.group_cols = 128;
    host_packed.packed.assign(size_t(out_dim) * in_dim / 2, 0x5a);
    host_packed.steps.assign(size_t(out_dim) * in_dim / 128, 0.01f);
    host_packed.offsets.assign(host_packed.steps.size(), 0.5f);
    DevicePackedWeights packed;
    packed.upload(host_packed);
    const double w4_ms = time([&] { w4a16_linear_forward_gpu(c.data(), a.data(), packed, nullptr, rows); });
    std::printf("  W4A16 layer (packed, g128) %.3f ms (%.0f TFLOP/s, %.2fx bf16)\n", w4_ms,
                ops / (w4_ms * 1e-3) / 1e12, bf16_ms / w4_ms);
    const double bf16_weight_bytes = 2.0 * in_dim * out_dim, packed_weight_bytes = 0.5 * in_dim * out_dim + 8.0 * in_dim * out_dim / 128;
    for (int decode_rows : {1, 4, 16}) {
        const double b = time([&] { matmul_forward_gpu(c.data(), a.data(), w.data(), nullptr, decode_rows, in_dim, out_dim); });
        const double p = time([&] { w4a16_linear_forward_gpu(c.data(), a.data(), packed, nullptr, decode_rows); });
        std::printf("  %2d rows: bf16 %.4f ms (weights %.0f GB/s), W4A16 %.4f ms (weights %.0f GB/s), %.2fx bf16\n",
                    decode_rows, b, bf16_weight_bytes / (b * 1e-3) / 1e9, p, packed_weight_bytes / (p * 1e-3) / 1e9, b / p);
    }
    std::fflush(stdout);
}

// PSGD's products with its triangular factors at gpt2-124m's sizes: 12 matrices with a
// 3072-wide factor beside a 768-wide side, and 48 with two 768-wide ones; each product as a
// dense batched GEMM and by GEMMs over the triangle's blocks (kernels/linalg.cu) of 512 and 256.
// Rates count the multiply-adds of the dense product, so a faster time shows as a higher rate.
void bench_psgd_products() {
    Timer timer;
    auto time = [&](auto&& call) { return median_call_ms(timer, call, 1, 3); };
    for (const auto& [big, small, batch] : {std::tuple{3072, 768, 12}, std::tuple{768, 768, 48}}) {
        const size_t square = size_t(big) * big, side = size_t(big) * small;
        DeviceBuffer<float> u(square * batch), u2(square * batch), out_square(square * batch), x(side * batch),
            y(side * batch);
        std::vector<float> host(square * batch, 0.0f);
        std::mt19937 generator(7);
        std::normal_distribution<float> normal;
        for (int b = 0; b < batch; ++b)
            for (int r = 0; r < big; ++r)
                for (int c = r; c < big; ++c)
                    host[b * square + size_t(r) * big + c] = c == r ? 3.0f : 0.01f * normal(generator);
        u.upload(host);
        u2.upload(host);
        host.resize(side * batch);
        for (float& v : host) v = normal(generator);
        x.upload(host);
        const double side_flops = 2.0 * big * big * small * batch, square_flops = 2.0 * big * double(big) * big * batch;
        auto report = [&](const std::string& what, double dense_flops, double ms) {
            std::printf("PSGD %4d^2 factor x %2d, %-44s %7.2f ms (%5.1f dense-equivalent TFLOP/s)\n", big, batch,
                        what.c_str(), ms, dense_flops / (ms * 1e-3) / 1e12);
        };
        report("U X dense GEMM", side_flops, time([&] {
                   batched_matmul_f32_gpu(y.data(), y.data(), u.data(), false, x.data(), false, big, small, big, 1.0f,
                                          0.0f, batch, int64_t(square), int64_t(side), int64_t(side));
               }));
        report("U U2 dense GEMM", square_flops, time([&] {
                   batched_matmul_f32_gpu(out_square.data(), out_square.data(), u.data(), false, u2.data(), false, big,
                                          big, big, 1.0f, 0.0f, batch, int64_t(square), int64_t(square),
                                          int64_t(square));
               }));
        for (int block : {512, 256}) {
            const std::string by = " by blocks of " + std::to_string(block);
            for (bool transpose : {false, true}) {
                const std::string op = transpose ? "U^T" : "U";
                report(op + " X" + by, side_flops, time([&] {
                           upper_triangular_product_batched_gpu(y.data(), u.data(), transpose, x.data(), big, small,
                                                                batch, false, block);
                       }));
                report("X " + op + by, side_flops, time([&] {
                           product_with_upper_triangular_batched_gpu(y.data(), x.data(), u.data(), transpose, small,
                                                                     big, batch, false, block);
                       }));
            }
            report("U U2" + by, square_flops, time([&] {
                       upper_triangular_square_product_batched_gpu(out_square.data(), u.data(), u2.data(), big, batch,
                                                                   false, block);
                   }));
        }
        // The solves run in place; u's diagonal of 3 keeps x finite over the repetitions.
        const double solve_left = time([&] { solve_upper_transposed_left_batched_gpu(x.data(), u.data(), big, small, batch); });
        const double solve_right = time([&] { solve_upper_right_batched_gpu(y.data(), u.data(), small, big, batch); });
        std::printf("PSGD %4d^2 factor x %2d, triangular solves (batched trsm): U^-T X %.2f ms, X U^-1 %.2f ms\n", big,
                    batch, solve_left, solve_right);
    }
}

// The CPU references' float64 helpers (optim/dense) at the factor sizes of the small presets, on
// this machine's OpenMP threads: n^3 products (plain, and with both transposes), the symmetric
// eigendecomposition of a Gram matrix, Householder QR, and 128 right-hand sides through an
// upper-triangular n x n solve. Median of three calls each, after one untimed call.
void bench_cpu_linalg() {
    std::mt19937_64 gen(20261204);
    std::normal_distribution<double> normal;
    auto random_dense = [&](int rows, int cols) {
        Dense d(rows, cols);
        for (double& v : d.values) v = normal(gen);
        return d;
    };
    WallTimer timer;
    auto seconds = [&](auto&& call) { return median_call_ms(timer, call, 1, 3) / 1e3; };
    std::printf("CPU dense helpers (float64, %d OpenMP threads), seconds per call:\n", omp_get_max_threads());
    for (int n : {128, 256, 512, 768}) {
        const Dense a = random_dense(n, n), b = random_dense(n, n), rhs = random_dense(128, n);
        const Dense gram = matmul(a, a, false, true);
        Dense upper = random_dense(n, n);
        for (int i = 0; i < n; ++i)
            for (int j = 0; j <= i; ++j) upper(i, j) = i == j ? 2 + std::abs(upper(i, j)) : 0.0;
        const double product = seconds([&] { return matmul(a, b); });
        const double product_transposed = seconds([&] { return matmul(a, b, true, true); });
        const double eigen = seconds([&] { return symmetric_eigen(gram); });
        const double qr = seconds([&] { return householder_q(a); });
        const double solve = seconds([&] { return solve_upper_right(rhs, upper); });
        std::printf("  n = %4d | product %.4f s (%.1f GFLOP/s), transposed %.4f s | eigendecomposition %.4f s | "
                    "Householder QR %.4f s | solve 128 x n %.4f s\n",
                    n, product, 2.0 * n * n * n / product / 1e9, product_transposed, eigen, qr, solve);
    }
}

// `batch` diagonally dominant symmetric n x n matrices (a Gram matrix's shape without its cost):
// small hashed entries, mirrored, plus 1 + r on the diagonal (condition ~n).
std::vector<float> diagonally_dominant_symmetric(int n, int batch) {
    const size_t floats = size_t(n) * n * batch;
    std::vector<float> host(floats);
    for (size_t i = 0; i < floats; ++i) host[i] = ((i * 2654435761u) % 1000) * 1e-6f;
    for (int b = 0; b < batch; ++b)
        for (int r = 0; r < n; ++r)
            for (int c = 0; c < r; ++c)
                host[size_t(b) * n * n + size_t(c) * n + r] = host[size_t(b) * n * n + size_t(r) * n + c];
    for (int b = 0; b < batch; ++b)
        for (int r = 0; r < n; ++r) host[size_t(b) * n * n + size_t(r) * n + r] += 1.0f + r;
    return host;
}

// The matrix functions of the preconditioned optimizers (kernels/linalg.cu) at the sizes
// gpt2-124m gives them, over several batch sizes: whether a batched call's time grows with the
// batch (work-bound) or stays flat (latency-bound) decides how the optimizers should group them.
void bench_linalg() {
    Timer timer;
    auto time = [&](auto&& call) { return median_call_ms(timer, call, 1, 3); };  // warm-up: workspaces
    for (int n : {768, 1024})
        for (int batch : {1, 12, 48, 168}) {
            const size_t floats = size_t(n) * n * batch;
            DeviceBuffer<float> a(floats), vectors(floats), scratch(floats), values(size_t(n) * batch);
            a.upload(diagonally_dominant_symmetric(n, batch));
            const double ms = time([&] { symmetric_eigen_batched_gpu(vectors.data(), values.data(), a.data(), n, batch, scratch.data()); });
            std::printf("symmetric eigendecomposition %4d^2 x %3d: %8.2f ms (%.2f ms per matrix)\n", n, batch, ms,
                        ms / batch);
        }
    // Factor statistics: G G^T of [n, 768] gradients, batched GEMM against one syrk per matrix and
    // GEMMs over the upper triangle's block rows (fp32; and TF32).
    for (int n : {768, 1024, 2048, 3072})
        for (int batch : {12, 96}) {
            if (n > 1024 && batch > 12) continue;
            const int k = 768;
            DeviceBuffer<float> g(size_t(n) * k * batch), d(size_t(n) * n * batch);
            g.fill_bytes(0x3c), d.fill_bytes(0);
            const double gemm = time([&] {
                batched_matmul_f32_gpu(d.data(), d.data(), g.data(), false, g.data(), true, n, n, k, 1.0f, 0.0f, batch,
                                       int64_t(n) * k, int64_t(n) * k, int64_t(n) * n);
            });
            const double syrk = time([&] { symmetric_gram_batched_gpu(d.data(), g.data(), false, n, k, batch, 1.0f, 0.0f); });
            auto blocked_ms = [&](bool tf32, int block) {
                return time([&] {
                    symmetric_gram_blocked_batched_gpu(d.data(), g.data(), false, n, k, batch, 1.0f, 0.0f, tf32, block);
                });
            };
            const double blocked = blocked_ms(false, 0), blocked_128 = blocked_ms(false, 128),
                         blocked_512 = blocked_ms(false, 512);
            const double gemm_tf32 = time([&] {
                batched_matmul_f32_gpu(d.data(), d.data(), g.data(), false, g.data(), true, n, n, k, 1.0f, 0.0f, batch,
                                       int64_t(n) * k, int64_t(n) * k, int64_t(n) * n, true);
            });
            const double blocked_tf32 = blocked_ms(true, 0);
            std::printf("Gram product %4d^2 (k %d) x %2d: batched GEMM %6.2f ms, syrk per matrix %6.2f ms, upper block "
                        "rows of %d %6.2f ms (128: %6.2f, 512: %6.2f); TF32: GEMM %6.2f, block rows %6.2f\n",
                        n, k, batch, gemm, syrk, triangular_product_block(n), blocked, blocked_128, blocked_512,
                        gemm_tf32, blocked_tf32);
        }
    for (int n : {768, 1024, 2048, 3072, 4096})
        for (int requested : {1, 12, 48}) {
            const int batch = std::min(requested, n > 3072 ? 12 : n > 1024 ? 24 : 48);  // fewer of the large ones
            const size_t floats = size_t(n) * n * batch;
            DeviceBuffer<float> a(floats), q(floats), scratch(floats);
            // Gaussian entries: full rank, as SOAP's power-iteration products are in practice.
            std::vector<float> host(floats);
            std::mt19937 generator(n + batch);
            std::normal_distribution<float> normal;
            for (float& x : host) x = normal(generator);
            a.upload(host);
            const double householder = time([&] { householder_q_batched_gpu(q.data(), a.data(), n, batch, scratch.data()); });
            CholeskyQrReport report;
            const double cholesky = time([&] { report = cholesky_q_batched_gpu(q.data(), a.data(), n, batch, scratch.data()); });
            // Near an orthogonal matrix (its Q plus noise of relative size 1e-3), as SOAP's
            // power-iteration products L Q are near the last basis Q during a run.
            std::vector<float> near = q.download();
            for (size_t i = 0; i < floats; ++i) near[i] += 1e-3f * host[i] / std::sqrt(float(n));
            a.upload(near);
            CholeskyQrReport near_report;
            const double cholesky_near =
                time([&] { near_report = cholesky_q_batched_gpu(q.data(), a.data(), n, batch, scratch.data()); });
            std::printf("QR %4d^2 x %3d: Householder %8.2f ms (%.2f ms per matrix), Cholesky QR (float64) %8.2f ms "
                        "(%.2f ms per matrix, %.1f passes and %.1f Gram matrices each; %ld fell back to Householder); near "
                        "an orthogonal matrix: %.2f ms per matrix, %.1f passes and %.1f Gram matrices each\n",
                        n, batch, householder, householder / batch, cholesky, cholesky / batch,
                        double(report.passes) / batch, double(report.grams) / batch, report.householder_fallbacks,
                        cholesky_near / batch, double(near_report.passes) / batch, double(near_report.grams) / batch);
        }
    bench_psgd_products();
    std::fflush(stdout);
}

// Muon's and Scion's Newton-Schulz loop (optim/optimizer_kernels.hpp: newton_schulz_batched_gpu,
// 5 iterations) on gpt2-124m's hidden matrices, grouped by shape as GpuOptimizer groups them:
// each product of one iteration and the group's whole loop alone, with its rate (FLOPs as in the
// header), then all groups one after another on the default stream against each group on a
// stream of its own (GpuOptimizer's order).
void bench_newton_schulz() {
    struct Group {
        int count, rows, cols;
        DeviceBuffer<bf16> x, x2, a, p;
    };
    std::vector<Group> groups;
    for (auto [count, rows, cols] : {std::tuple{48, 768, 768}, std::tuple{12, 3072, 768}, std::tuple{12, 768, 3072}})
        groups.push_back({count, rows, cols, {}, {}, {}, {}});
    OptimizerConfig muon_config;
    muon_config.kind = OptimizerKind::Muon;
    const MuonConfig& mc = muon_config.muon;
    std::mt19937 generator(7);
    std::normal_distribution<float> normal;
    Timer timer;
    auto time = [&](auto&& call) { return median_call_ms(timer, call, 2, 10); };
    auto loop = [&](Group& g, int steps, cudaStream_t stream) {
        newton_schulz_batched_gpu(g.x.data(), g.x2.data(), g.a.data(), g.p.data(), g.count, g.rows, g.cols, steps,
                                  float(mc.ns_a), float(mc.ns_b), float(mc.ns_c), stream);
    };
    double serial_flops = 0;
    for (Group& g : groups) {
        const size_t n = size_t(g.rows) * g.cols, s = size_t(std::min(g.rows, g.cols));
        // Frobenius norm 1 per matrix, as the momentum/normalise pass leaves it.
        std::vector<bf16> host(n * g.count);
        for (bf16& v : host) v = __float2bfloat16(normal(generator) / std::sqrt(float(n)));
        g.x.upload(host), g.x2.resize(n * g.count), g.a.resize(s * s * g.count), g.p.resize(s * s * g.count);
        const int64_t ld = std::max(g.rows, g.cols);
        const double gram_flops = 2.0 * double(s) * s * ld * g.count, square_flops = 2.0 * double(s) * s * s * g.count;
        const double gram = time([&] { newton_schulz_gram_gpu(g.a.data(), g.x.data(), g.count, g.rows, g.cols); });
        const double square = time([&] {
            newton_schulz_polynomial_gpu(g.p.data(), g.a.data(), g.count, int(s), float(mc.ns_b), float(mc.ns_c));
        });
        const double back = time([&] {
            newton_schulz_product_back_gpu(g.x2.data(), g.x.data(), g.p.data(), g.count, g.rows, g.cols, float(mc.ns_a));
        });
        const double whole = time([&] { loop(g, mc.ns_steps, 0); });
        const double loop_flops = g.count * matrix_product_flops(g.rows, g.cols, muon_config);
        serial_flops += loop_flops;
        auto rate = [](double flops, double ms) { return flops / (ms * 1e-3) / 1e12; };
        std::printf("Newton-Schulz %2d x %4d x %4d: Gram %.3f ms (%.0f TFLOP/s), its square %.3f ms (%.0f), product "
                    "back %.3f ms (%.0f); %d iterations %.3f ms (%.0f TFLOP/s)\n",
                    g.count, g.rows, g.cols, gram, rate(gram_flops, gram), square, rate(square_flops, square), back,
                    rate(gram_flops, back), mc.ns_steps, whole, rate(loop_flops, whole));
    }
    const double one_after_another = time([&] {
        for (Group& g : groups) loop(g, mc.ns_steps, 0);
    });
    std::vector<std::unique_ptr<SideStream>> streams;
    for (size_t i = 0; i < groups.size(); ++i) streams.push_back(std::make_unique<SideStream>());
    const double concurrent = time([&] {
        for (size_t i = 0; i < groups.size(); ++i) loop(groups[i], mc.ns_steps, streams[i]->after_default_stream());
        for (auto& stream : streams) stream->join_into_default_stream();
    });
    std::printf("Newton-Schulz, all groups (%.2f TFLOP): one after another %.3f ms (%.0f TFLOP/s), each on its own "
                "stream %.3f ms (%.0f TFLOP/s)\n",
                serial_flops / 1e12, one_after_another, serial_flops / (one_after_another * 1e-3) / 1e12, concurrent,
                serial_flops / (concurrent * 1e-3) / 1e12);
    std::fflush(stdout);
}

// Shampoo's inverse 4th roots at gpt2-124m's factor batches (168 of 768^2, 72 of 1024^2), eps
// 1e-12: the eigendecomposition qopt uses (cuSOLVER's batched syev, the columns scaled, one
// GEMM) against Distributed Shampoo's CoupledNewtonConfig (tolerance 1e-6, at most 100 steps,
// kernels/newton_root.cu), on two kinds of factor: diagonally dominant (condition ~1e3, as
// the eigendecomposition lines of --linalg) and the Gram matrix of an n x n Gaussian gradient
// (a factor after one step: condition ~1e6 and more). Also how far the Newton roots are from the
// eigendecomposition's (relative Frobenius error, mean over the batch).
void bench_inverse_roots() {
    Timer timer;
    auto once = [&](auto&& call) { return median_call_ms(timer, call, 1, 1); };  // warm-up: workspaces
    for (auto [n, batch] : {std::pair{768, 168}, std::pair{1024, 72}}) {
        const size_t floats = size_t(n) * n * batch;
        DeviceBuffer<float> a(floats), gradient(floats), vectors(floats), scaled(floats), scratch(5 * floats),
            eigen_root(floats), newton_root(floats), values(size_t(n) * batch);
        for (const char* kind : {"diagonally dominant", "Gram of a Gaussian gradient"}) {
            if (kind[0] == 'd') {
                a.upload(diagonally_dominant_symmetric(n, batch));
            } else {
                std::mt19937 generator(n);
                std::normal_distribution<float> normal;
                std::vector<float> host(floats);
                for (float& x : host) x = normal(generator) / std::sqrt(float(n));
                gradient.upload(host);
                batched_matmul_f32_gpu(a.data(), a.data(), gradient.data(), false, gradient.data(), true, n, n, n, 1.0f,
                                       0.0f, batch, int64_t(n) * n, int64_t(n) * n, int64_t(n) * n);
            }
            const double eigen_ms = once([&] {
                symmetric_eigen_batched_gpu(vectors.data(), values.data(), a.data(), n, batch, scratch.data());
                inverse_root_columns_gpu(scaled.data(), vectors.data(), values.data(), n, batch, 1.0f, 1e-12, 4);
                batched_matmul_f32_gpu(eigen_root.data(), eigen_root.data(), scaled.data(), false, vectors.data(), true,
                                       n, n, n, 1.0f, 0.0f, batch, int64_t(n) * n, int64_t(n) * n, int64_t(n) * n);
            });
            NewtonBatchReport report;
            const double newton_ms = once([&] {
                report = coupled_newton_inverse_root_batched_gpu(newton_root.data(), a.data(), n, batch, 4, 1e-12, 100,
                                                                 1e-6, scratch.data());
            });
            const std::vector<float> eigen_host = eigen_root.download(), newton_host = newton_root.download();
            // Mean error over the matrices whose roots are finite on both sides; the others counted.
            double error_sum = 0;
            int eigen_bad = 0, newton_bad = 0, compared = 0;
            for (int b = 0; b < batch; ++b) {
                double diff = 0, norm = 0;
                bool eigen_finite = true, newton_finite = true;
                for (size_t i = size_t(b) * n * n; i < size_t(b + 1) * n * n; ++i) {
                    eigen_finite = eigen_finite && std::isfinite(eigen_host[i]);
                    newton_finite = newton_finite && std::isfinite(newton_host[i]);
                    const double d = double(newton_host[i]) - eigen_host[i];
                    diff += d * d;
                    norm += double(eigen_host[i]) * eigen_host[i];
                }
                eigen_bad += !eigen_finite;
                newton_bad += !newton_finite;
                if (eigen_finite && newton_finite) {
                    error_sum += std::sqrt(diff / norm);
                    ++compared;
                }
            }
            std::printf("inverse 4th roots %4d^2 x %3d, %s: eigendecomposition %8.1f ms (%d roots not finite); "
                        "coupled Newton %8.1f ms (%d steps, %d of %d within 1e-6, %d roots not finite), %.1e from "
                        "the eigendecomposition's roots (mean where both are finite)\n",
                        n, batch, kind, eigen_ms, eigen_bad, newton_ms, report.iterations, report.converged, batch,
                        newton_bad, compared > 0 ? error_sum / compared : NAN);
        }
    }
    std::fflush(stdout);
}

// Attention kernels alone: causal FLOPs (half the square) of forward (2 products) and
// backward (the 5 products of the math; the kernels recompute P once more).
void bench_attention(int seq_len, int head_dim, int n_heads, int batch) {
    const int C = n_heads * head_dim;
    const size_t N = size_t(batch) * seq_len;
    DeviceBuffer<bf16> qkv(N * 3 * C), out(N * C), dout(N * C), dqkv(N * 3 * C);
    DeviceBuffer<float> lse(size_t(batch) * n_heads * seq_len), delta(size_t(batch) * n_heads * seq_len);
    qkv.fill_bytes(0x3c), dout.fill_bytes(0x3c);
    bf16* q = qkv.data();
    const Rows<const bf16> rq{q, 3 * C}, rk{q + C, 3 * C}, rv{q + 2 * C, 3 * C};
    auto forward = [&] { attention_forward_gpu({out.data(), C}, lse.data(), rq, rk, rv, batch, seq_len, n_heads, head_dim); };
    auto backward = [&] {
        attention_backward_gpu({dqkv.data(), 3 * C}, {dqkv.data() + C, 3 * C}, {dqkv.data() + 2 * C, 3 * C},
                               delta.data(), {dout.data(), C}, {out.data(), C}, lse.data(), rq, rk, rv, batch,
                               seq_len, n_heads, head_dim);
    };
    Timer timer;
    std::vector<double> f_ms, b_ms;
    for (int i = 0; i < 13; ++i) {
        timer.start();
        forward();
        const double f = timer.stop();
        timer.start();
        backward();
        const double b = timer.stop();
        if (i >= 3) f_ms.push_back(f), b_ms.push_back(b);
    }
    const double forward_flops = 4.0 * batch * n_heads * double(seq_len) * seq_len * head_dim / 2.0;
    std::printf("attention T=%-5d head_dim %-3d B=%d H=%d, %s | forward %.3f ms, %.0f TFLOP/s | backward %.3f ms, "
                "%.0f TFLOP/s\n",
                seq_len, head_dim, batch, n_heads, attention_kernels_name(head_dim), median(f_ms),
                forward_flops / (median(f_ms) * 1e-3) / 1e12,
                median(b_ms), 2.5 * forward_flops / (median(b_ms) * 1e-3) / 1e12);
    std::fflush(stdout);
}

}  // namespace
}  // namespace qopt

int main(int argc, char** argv) {
    CLI::App app{"qopt bench: GPU training throughput (tokens/s, MFU, ms per phase, memory) per model preset"};
    std::vector<std::string> configs;
    int warmup = 12, steps = 20;
    bool attention = false, skip_training = false, recompute = false;
    std::vector<std::string> optimizers;
    std::string optimizer_flag = "adamw";
    qopt::OptimizerConfig optimizer_config;
    qopt::add_optimizer_flags(app, optimizer_flag, optimizer_config);
    qopt::QuantOptions qat_options;
    qopt::add_quant_flags(app, qat_options, "qat", qopt::QuantStyle::Quest);
    app.add_option("--optimizers", optimizers,
                   "Optimizers to bench in turn, e.g. adamw muon scion (default: --optimizer). Peak memory is the "
                   "process's, and libraries' workspaces stay from one to the next: bench one per process to "
                   "attribute it");
    app.add_option("--config", configs,
                   "PRESET:BATCH:SEQ_LEN, repeatable (default: gpt2-124m:32:1024 olmo2-125m:32:1024 "
                   "olmo2-50m:32:1024 olmo2-350m:16:1024 olmo2-500m:16:1024 olmo2-760m:8:1024 olmo2-1.5b:8:1024)");
    app.add_option("--warmup", warmup,
                   "untimed steps first (as PEERS.md's optimizer figures: the first preconditioner refresh, at step "
                   "10 by default, falls in them with its one-time library and kernel loading)")
        ->capture_default_str();
    app.add_option("--steps", steps,
                   "timed steps: medians of the model's phases, mean and median of the optimizer step (20: two "
                   "preconditioner periods at the default frequency 10)")
        ->capture_default_str();
    app.add_flag("--attention", attention, "also time the attention kernels alone (T = 1024 and 4096)");
    app.add_flag("--attention-only", skip_training, "only the attention kernels");
    app.add_flag("--recompute", recompute, "recompute MLP activations in the backward pass (as train --recompute)");
    bool linalg = false;
    app.add_flag("--linalg", linalg,
                 "also time the optimizers' factor statistics (batched GEMM, syrk, the triangle's block rows), batched eigendecomposition and QRs "
                 "(Householder, Cholesky QR with its passes per matrix) at gpt2-124m's factor sizes (QRs up to 4096) "
                 "over several batch sizes, and PSGD's "
                 "triangular products (dense GEMM, blocked) and solves");
    bool newton_schulz = false;
    app.add_flag("--newton-schulz", newton_schulz,
                 "also time Muon's and Scion's Newton-Schulz products at gpt2-124m's shape groups: each product of "
                 "an iteration, each group's loop, and the groups one after another against each on its own stream");
    bool inverse_roots = false;
    app.add_flag("--inverse-roots", inverse_roots,
                 "also time Shampoo's inverse 4th roots at gpt2-124m's factor batches: the eigendecomposition "
                 "against Distributed Shampoo's coupled Newton iteration, on well- and ill-conditioned factors");
    bool cpu_linalg = false;
    app.add_flag("--cpu-linalg", cpu_linalg,
                 "time the CPU references' float64 helpers (products, eigendecomposition, Householder QR, triangular "
                 "solve) at n = 128-768 and exit; needs no GPU (OMP_NUM_THREADS sets the threads)");
    bool integer_gemm = false;
    app.add_flag("--integer-gemm", integer_gemm,
                 "also time the int8 GEMM (cuBLASLt's int32 product, and ours with the scales in its epilogue), "
                 "the whole W8A8 layer, the W4A4 layer on fp8 tensor cores and the "
                 "packed-4-bit W4A16 layer against bf16 on "
                 "gpt2-124m's and olmo2-1.5b's linear shapes (32768 tokens; W4A16 also at 1, 4, 16 tokens)");
    return qopt::run_main(app, argc, argv, "bench", [&] {
        QOPT_CHECK(warmup >= 0 && steps > 0, "--steps must be positive and --warmup non-negative");
        if (cpu_linalg) {
            qopt::bench_cpu_linalg();
            return 0;
        }
        // The configurations first, so that a bad one is named on any machine.
        if (configs.empty())
            configs = {"gpt2-124m:32:1024", "olmo2-125m:32:1024", "olmo2-50m:32:1024", "olmo2-350m:16:1024",
                       "olmo2-500m:16:1024", "olmo2-760m:8:1024", "olmo2-1.5b:8:1024"};
        std::vector<qopt::BenchConfig> parsed;
        for (const auto& c : configs) parsed.push_back(qopt::parse_config(c));
        const qopt::CudaDeviceInfo gpu = qopt::query_cuda_device();
        if (!gpu.usable) qopt::fail(gpu.problem);
        std::printf("GPU: %s\n", gpu.description.c_str());
        const double peak = qopt::measure_matmul_tflops();
        std::printf("bf16 matmul ceiling (cuBLASLt 8192^3): %.0f TFLOP/s\n", peak);
        const double f32_peak = qopt::measure_matmul_f32_tflops();
        std::printf("fp32 matmul ceiling (cuBLASLt 4096^3, full fp32): %.1f TFLOP/s\n", f32_peak);
        if (attention || skip_training) {
            // The kernels training uses, then the portable ones where those differ.
            for (auto kernels : {qopt::AttentionKernels::automatic, qopt::AttentionKernels::portable}) {
                qopt::set_attention_kernels(kernels);
                for (int head_dim : {64, 128}) {
                    qopt::set_attention_kernels(qopt::AttentionKernels::automatic);
                    const std::string automatic_name = qopt::attention_kernels_name(head_dim);
                    qopt::set_attention_kernels(kernels);
                    const bool same_as_automatic = automatic_name == qopt::attention_kernels_name(head_dim);
                    if (kernels == qopt::AttentionKernels::portable && same_as_automatic) continue;
                    for (int seq_len : {1024, 4096})
                        qopt::bench_attention(seq_len, head_dim, 2048 / head_dim, 32768 / seq_len * 2);
                }
            }
            qopt::set_attention_kernels(qopt::AttentionKernels::automatic);
        }
        if (linalg) qopt::bench_linalg();
        if (newton_schulz) qopt::bench_newton_schulz();
        if (inverse_roots) qopt::bench_inverse_roots();
        if (integer_gemm)
            for (auto [in_dim, out_dim] : {std::pair{768, 2304}, std::pair{768, 768}, std::pair{768, 3072},
                                           std::pair{3072, 768}, std::pair{2048, 6144}, std::pair{8192, 2048}})
                qopt::bench_integer_gemm(32768, in_dim, out_dim);
        if (optimizers.empty()) optimizers.push_back(optimizer_flag);
        std::vector<qopt::OptimizerConfig> optimizer_configs;
        for (const auto& name : optimizers) {
            qopt::OptimizerConfig c = optimizer_config;
            qopt::resolve_optimizer(name, c);
            optimizer_configs.push_back(c);
        }
        // With --qat, each configuration runs in full precision and quantized, and the ratio is printed.
        const qopt::LinearQuantConfig qat = qopt::resolve_linear_quant(qat_options, qopt::QuantStyle::Quest);
        if (qat.enabled()) {
            std::printf("QAT: %s\n", qat.describe().c_str());
            if (qat.activations.enabled())
                for (int cols : {768, 3072}) qopt::bench_quant_kernels(qat, 32768, cols);
        }
        if (!skip_training)
            for (const auto& c : parsed)
                for (const auto& o : optimizer_configs) {
                    const double full_ms = qopt::bench_training(c, warmup, steps, peak, f32_peak, recompute, o, {});
                    if (!qat.enabled()) continue;
                    const double qat_ms = qopt::bench_training(c, warmup, steps, peak, f32_peak, recompute, o, qat);
                    std::printf("  QAT %s step / full-precision step: %.3fx (%.2f ms vs %.2f ms)\n",
                                qat.short_name().c_str(), qat_ms / full_ms, qat_ms, full_ms);
                }
        return 0;
    });
}
