// GPU kernels against their CPU references on fresh random inputs, odd sizes included.
// Inputs are rounded to bf16 first and the references run in float64 on the rounded values,
// so the bounds measure the kernels' own error: bf16 outputs (8-bit mantissa) within 1e-2
// relative (norm of difference / norm of reference), fp32 paths within 1e-5. Outputs are
// poisoned with NaN bytes before each launch so unwritten elements fail the comparison.
// Every test skips with a message where there is no usable GPU.
#include <cstring>

#include "gpu_helpers.hpp"
#include "kernels/activations.hpp"
#include "kernels/attention.hpp"
#include "kernels/classifier.hpp"
#include "kernels/device.hpp"
#include "kernels/gpu.hpp"
#include "kernels/matmul.hpp"
#include "kernels/elementwise.hpp"
#include "kernels/embedding.hpp"
#include "kernels/norms.hpp"
#include "kernels/rope.hpp"
#include "optim/adamw.hpp"
#include "optim/optimizer_kernels.hpp"

using namespace qopt;
using namespace qopt::test;


TEST_CASE("GPU rmsnorm forward and backward match the CPU reference") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    // 300 x 768 and 130 x 1024: several blocks of the fused backward; 100, 1536, 2056: the
    // two-pass kernels.
    for (auto [N, C] : {std::pair{37, 768}, std::pair{300, 768}, std::pair{130, 1024}, std::pair{5, 100},
                        std::pair{600, 64}, std::pair{9, 1536}, std::pair{3, 2056}}) {
        CAPTURE(N);
        CAPTURE(C);
        const Bf16Input x = random_bf16(size_t(N) * C, gen, 2.0), dy = random_bf16(size_t(N) * C, gen);
        const std::vector<float> weight = random_vector<float>(C, gen);
        const std::vector<float> dweight_init = random_vector<float>(C, gen);
        std::vector<double> weight64(weight.begin(), weight.end());
        std::vector<double> out_ref(size_t(N) * C), rstd_ref(N), din_ref(size_t(N) * C, 0.0), dw_ref(C, 0.0);
        rmsnorm_forward_cpu(out_ref.data(), rstd_ref.data(), x.exact.data(), weight64.data(), N, C, 1e-6);
        rmsnorm_backward_cpu(din_ref.data(), dw_ref.data(), dy.exact.data(), x.exact.data(), weight64.data(),
                             rstd_ref.data(), N, C);

        auto d_x = uploaded(x.device_values), d_dy = uploaded(dy.device_values);
        auto d_w = uploaded(weight), d_dw = uploaded(dweight_init);
        auto d_out = poisoned<bf16>(size_t(N) * C), d_din = poisoned<bf16>(size_t(N) * C);
        auto d_rstd = poisoned<float>(N);
        rmsnorm_forward_gpu(d_out.data(), d_rstd.data(), d_x.data(), d_w.data(), N, C, 1e-6f);
        rmsnorm_backward_gpu(d_din.data(), d_dw.data(), d_dy.data(), d_x.data(), d_w.data(), d_rstd.data(), N, C);
        CHECK(relative_error(to_double(d_out.download()), out_ref) < kBf16Bound);
        CHECK(relative_error(d_rstd.download(), rstd_ref) < 1e-5);
        CHECK(relative_error(to_double(d_din.download()), din_ref) < kBf16Bound);
        std::vector<float> dw = d_dw.download();
        for (int i = 0; i < C; ++i) dw[i] -= dweight_init[i];
        CHECK(relative_error(dw, dw_ref) < 1e-5);
    }
}

TEST_CASE("GPU layernorm forward and backward match the CPU reference") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    for (auto [N, C] : {std::pair{37, 768}, std::pair{300, 768}, std::pair{130, 1024}, std::pair{5, 100},
                        std::pair{64, 200}, std::pair{9, 1536}, std::pair{3, 2056}}) {
        CAPTURE(N);
        CAPTURE(C);
        const Bf16Input x = random_bf16(size_t(N) * C, gen, 1.5), dy = random_bf16(size_t(N) * C, gen);
        const std::vector<float> weight = random_vector<float>(C, gen), bias = random_vector<float>(C, gen);
        std::vector<double> w64(weight.begin(), weight.end()), b64(bias.begin(), bias.end());
        std::vector<double> out_ref(size_t(N) * C), mean_ref(N), rstd_ref(N), din_ref(size_t(N) * C, 0.0),
            dw_ref(C, 0.0), db_ref(C, 0.0);
        layernorm_forward_cpu(out_ref.data(), mean_ref.data(), rstd_ref.data(), x.exact.data(), w64.data(), b64.data(),
                              N, C, 1e-5);
        layernorm_backward_cpu(din_ref.data(), dw_ref.data(), db_ref.data(), dy.exact.data(), x.exact.data(),
                               w64.data(), mean_ref.data(), rstd_ref.data(), N, C);
        auto d_x = uploaded(x.device_values), d_dy = uploaded(dy.device_values);
        auto d_w = uploaded(weight), d_b = uploaded(bias);
        auto d_dw = uploaded(std::vector<float>(C, 0.0f)), d_db = uploaded(std::vector<float>(C, 0.0f));
        const std::vector<float> branch_init = random_vector<float>(C, gen);
        auto d_branch = uploaded(branch_init);
        auto d_out = poisoned<bf16>(size_t(N) * C), d_din = poisoned<bf16>(size_t(N) * C);
        auto d_mean = poisoned<float>(N), d_rstd = poisoned<float>(N);
        layernorm_forward_gpu(d_out.data(), d_mean.data(), d_rstd.data(), d_x.data(), d_w.data(), d_b.data(), N, C,
                              1e-5f);
        layernorm_backward_gpu(d_din.data(), d_dw.data(), d_db.data(), d_dy.data(), d_x.data(), d_w.data(),
                               d_mean.data(), d_rstd.data(), N, C, /*accumulate=*/false, d_branch.data());
        CHECK(relative_error(to_double(d_out.download()), out_ref) < kBf16Bound);
        CHECK(relative_error(d_mean.download(), mean_ref) < 1e-5);
        const std::vector<double> din = to_double(d_din.download());
        CHECK(relative_error(din, din_ref) < kBf16Bound);
        CHECK(relative_error(d_dw.download(), dw_ref) < 1e-5);
        CHECK(relative_error(d_db.download(), db_ref) < 1e-5);
        // The branch bias gradient: column sums of din as stored, added to what was there.
        std::vector<double> branch_ref(C, 0.0);
        for (int n = 0; n < N; ++n)
            for (int c = 0; c < C; ++c) branch_ref[c] += din[size_t(n) * C + c];
        std::vector<float> branch = d_branch.download();
        for (int c = 0; c < C; ++c) branch[c] -= branch_init[c];
        CHECK(relative_error(branch, branch_ref) < 1e-5);
    }
}

TEST_CASE("GPU norm parameter gradients are deterministic (bitwise equal on repeat)") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    const int N = 4099, C = 512;
    const Bf16Input x = random_bf16(size_t(N) * C, gen), dy = random_bf16(size_t(N) * C, gen);
    auto d_x = uploaded(x.device_values), d_dy = uploaded(dy.device_values);
    auto d_w = uploaded(random_vector<float>(C, gen));
    auto d_rstd = poisoned<float>(N);
    auto d_out = poisoned<bf16>(size_t(N) * C), d_din = poisoned<bf16>(size_t(N) * C);
    rmsnorm_forward_gpu(d_out.data(), d_rstd.data(), d_x.data(), d_w.data(), N, C, 1e-6f);
    std::vector<std::vector<float>> results;
    for (int run = 0; run < 2; ++run) {
        auto d_dw = uploaded(std::vector<float>(C, 0.0f));
        rmsnorm_backward_gpu(d_din.data(), d_dw.data(), d_dy.data(), d_x.data(), d_w.data(), d_rstd.data(), N, C);
        results.push_back(d_dw.download());
    }
    CHECK(results[0] == results[1]);
    // LayerNorm with all three sums (gain, bias, branch bias), accumulating into din.
    auto d_mean = poisoned<float>(N), d_ln_rstd = poisoned<float>(N);
    auto d_bias = uploaded(random_vector<float>(C, gen));
    layernorm_forward_gpu(d_out.data(), d_mean.data(), d_ln_rstd.data(), d_x.data(), d_w.data(), d_bias.data(), N, C,
                          1e-5f);
    std::vector<std::vector<float>> sums;
    std::vector<std::vector<bf16>> dins;
    for (int run = 0; run < 2; ++run) {
        auto d_acc = uploaded(dy.device_values);
        auto d_dw = uploaded(std::vector<float>(C, 0.0f)), d_db = uploaded(std::vector<float>(C, 0.0f)),
             d_branch = uploaded(std::vector<float>(C, 0.0f));
        layernorm_backward_gpu(d_acc.data(), d_dw.data(), d_db.data(), d_dy.data(), d_x.data(), d_w.data(),
                               d_mean.data(), d_ln_rstd.data(), N, C, /*accumulate=*/true, d_branch.data());
        std::vector<float> all = d_dw.download(), db = d_db.download(), branch = d_branch.download();
        all.insert(all.end(), db.begin(), db.end());
        all.insert(all.end(), branch.begin(), branch.end());
        sums.push_back(all);
        dins.push_back(d_acc.download());
    }
    CHECK(sums[0] == sums[1]);
    CHECK(std::memcmp(dins[0].data(), dins[1].data(), dins[0].size() * sizeof(bf16)) == 0);
}

TEST_CASE("GPU GELU and ReLU^2 match the CPU reference") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    const size_t n = 1000003;  // odd, not a multiple of the block
    const Bf16Input x = random_bf16(n, gen, 2.0), dy = random_bf16(n, gen);
    auto d_x = uploaded(x.device_values), d_dy = uploaded(dy.device_values);
    for (bool gelu : {true, false}) {
        CAPTURE(gelu);
        std::vector<double> out_ref(n), din_ref(n, 0.0);
        if (gelu) {
            gelu_forward_cpu(out_ref.data(), x.exact.data(), n);
            gelu_backward_cpu(din_ref.data(), dy.exact.data(), x.exact.data(), n);
        } else {
            relu2_forward_cpu(out_ref.data(), x.exact.data(), n);
            relu2_backward_cpu(din_ref.data(), dy.exact.data(), x.exact.data(), n);
        }
        // offset 0: the 16-byte vector path (plus a 3-element tail); 1: misaligned, element-wise.
        for (size_t offset : {size_t(0), size_t(1)}) {
            CAPTURE(offset);
            auto d_out = poisoned<bf16>(n), d_din = poisoned<bf16>(n);
            const size_t m = n - offset;
            if (gelu) {
                gelu_forward_gpu(d_out.data() + offset, d_x.data() + offset, m);
                gelu_backward_gpu(d_din.data() + offset, d_dy.data() + offset, d_x.data() + offset, m);
            } else {
                relu2_forward_gpu(d_out.data() + offset, d_x.data() + offset, m);
                relu2_backward_gpu(d_din.data() + offset, d_dy.data() + offset, d_x.data() + offset, m);
            }
            const std::vector<double> out = to_double(d_out.download()), din = to_double(d_din.download());
            const auto tail = [&](const std::vector<double>& v) {
                return std::vector<double>(v.begin() + long(offset), v.end());
            };
            CHECK(relative_error(tail(out), tail(out_ref)) < kBf16Bound);
            CHECK(relative_error(tail(din), tail(din_ref)) < kBf16Bound);
        }
    }
}

TEST_CASE("GPU fused AdamW (chunk table) matches the CPU reference over several steps") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    const size_t n = 100003;
    AdamWConfig c;
    c.beta1 = 0.9;
    c.beta2 = 0.95;
    c.eps = 1e-8;
    c.weight_decay = 0.1;
    std::vector<double> p = random_vector<double>(n, gen), m(n, 0.0), v(n, 0.0);
    std::vector<float> p32(p.begin(), p.end());
    auto d_p = uploaded(p32), d_m = uploaded(std::vector<float>(n, 0.0f)), d_v = uploaded(std::vector<float>(n, 0.0f));
    auto d_copy = poisoned<bf16>(n);  // the bf16 compute copy written alongside
    const float grad_scale = 0.5f;
    // One tensor in chunks of kAdamwChunk (the last one partial), decay on.
    std::vector<int64_t> chunks;
    for (size_t start = 0; start < n; start += kAdamwChunk)
        for (int64_t word : {int64_t(start), int64_t(start),
                             int64_t(std::min<size_t>(kAdamwChunk, n - start)) | (int64_t(1) << 32)})
            chunks.push_back(word);
    DeviceBuffer<int64_t> d_chunks;
    d_chunks.upload(chunks);
    for (long step = 1; step <= 4; ++step) {
        const std::vector<float> g = random_vector<float>(n, gen);
        std::vector<double> g64(n);
        for (size_t i = 0; i < n; ++i) g64[i] = double(g[i]) * grad_scale;
        const double lr = 1e-2 * double(step);
        adamw_update_cpu(p.data(), g64.data(), m.data(), v.data(), n, lr, c, step, true);
        auto d_g = uploaded(g);
        adamw_chunks_gpu(d_p.data(), d_g.data(), d_m.data(), d_v.data(), d_copy.data(), d_chunks.data(),
                         int(chunks.size() / 3), float(lr), float(c.beta1), float(c.beta2), float(c.eps),
                         float(c.weight_decay), step, grad_scale);
    }
    const std::vector<float> updated = d_p.download();
    const std::vector<bf16> copy = d_copy.download();
    for (size_t i = 0; i < n; ++i) REQUIRE(__bfloat162float(copy[i]) == __bfloat162float(__float2bfloat16(updated[i])));
    CHECK(relative_error(updated, p) < 1e-5);
    CHECK(relative_error(d_m.download(), m) < 1e-5);
    CHECK(relative_error(d_v.download(), v) < 1e-5);
}

TEST_CASE("GPU cuBLASLt linear layer: forward (with and without bias) and both gradients") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    for (auto [N, IC, OC] : {std::tuple{64, 128, 256}, std::tuple{40, 96, 72}, std::tuple{512, 768, 2304}}) {
        CAPTURE(N);
        CAPTURE(IC);
        CAPTURE(OC);
        const Bf16Input x = random_bf16(size_t(N) * IC, gen), w = random_bf16(size_t(OC) * IC, gen, 0.05),
                        b = random_bf16(OC, gen), dy = random_bf16(size_t(N) * OC, gen);
        const std::vector<float> dw_init = random_vector<float>(size_t(OC) * IC, gen);
        std::vector<double> out_ref(size_t(N) * OC), din_ref(size_t(N) * IC, 0.0), dw_ref(dw_init.begin(), dw_init.end());
        matmul_forward_cpu(out_ref.data(), x.exact.data(), w.exact.data(), b.exact.data(), N, IC, OC);
        matmul_backward_cpu(din_ref.data(), dw_ref.data(), static_cast<double*>(nullptr), dy.exact.data(),
                            x.exact.data(), w.exact.data(), N, IC, OC);
        auto d_x = uploaded(x.device_values), d_w = uploaded(w.device_values), d_b = uploaded(b.device_values),
             d_dy = uploaded(dy.device_values);
        auto d_dw = uploaded(dw_init);
        auto d_out = poisoned<bf16>(size_t(N) * OC), d_din = poisoned<bf16>(size_t(N) * IC);
        matmul_forward_gpu(d_out.data(), d_x.data(), d_w.data(), d_b.data(), N, IC, OC);
        CHECK(relative_error(to_double(d_out.download()), out_ref) < kBf16Bound);
        std::vector<double> out_nobias(size_t(N) * OC);
        matmul_forward_cpu(out_nobias.data(), x.exact.data(), w.exact.data(), static_cast<const double*>(nullptr), N,
                           IC, OC);
        matmul_forward_gpu(d_out.data(), d_x.data(), d_w.data(), nullptr, N, IC, OC);
        CHECK(relative_error(to_double(d_out.download()), out_nobias) < kBf16Bound);
        matmul_backward_input_gpu(d_din.data(), d_dy.data(), d_w.data(), N, IC, OC);
        CHECK(relative_error(to_double(d_din.download()), din_ref) < kBf16Bound);
        matmul_backward_weight_gpu(d_dw.data(), d_dy.data(), d_x.data(), N, IC, OC);
        CHECK(relative_error(d_dw.download(), dw_ref) < 1e-5);  // fp32 accumulation of exact bf16 products
    }
}

TEST_CASE("GPU RoPE forward and backward match the CPU reference") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    for (auto [B, T, H, hd] : {std::tuple{2, 37, 4, 64}, std::tuple{1, 1024, 2, 128}, std::tuple{3, 5, 2, 12}}) {
        const int N = B * T, C = H * hd;
        const Bf16Input x = random_bf16(size_t(N) * C, gen), dy = random_bf16(size_t(N) * C, gen);
        std::vector<double> out_ref(size_t(N) * C), din_ref(size_t(N) * C, 0.0);
        rope_forward_cpu(out_ref.data(), x.exact.data(), N, T, H, hd, 10000.0);
        rope_backward_cpu(din_ref.data(), dy.exact.data(), N, T, H, hd, 10000.0);
        std::vector<float> cos_table(size_t(T) * hd / 2), sin_table(size_t(T) * hd / 2);
        rope_angles(cos_table.data(), sin_table.data(), T, hd, 10000.0);
        auto d_cos = uploaded(cos_table), d_sin = uploaded(sin_table);
        auto d_x = uploaded(x.device_values), d_dy = uploaded(dy.device_values);
        auto d_out = poisoned<bf16>(size_t(N) * C), d_din = poisoned<bf16>(size_t(N) * C);
        rope_forward_gpu(d_out.data(), d_x.data(), d_cos.data(), d_sin.data(), N, T, H, hd);
        rope_backward_gpu(d_din.data(), d_dy.data(), d_cos.data(), d_sin.data(), N, T, H, hd);
        CHECK(relative_error(to_double(d_out.download()), out_ref) < kBf16Bound);
        CHECK(relative_error(to_double(d_din.download()), din_ref) < kBf16Bound);
    }
}

TEST_CASE("GPU embedding forward and deterministic backward match the CPU reference") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    const int V = 1000, B = 4, T = 129, C = 96, N = B * T;
    std::vector<int> tokens(N);
    for (auto& t : tokens) t = int(gen() % 50);  // many repeats
    const Bf16Input embed = random_bf16(size_t(V) * C, gen), pos = random_bf16(size_t(T) * C, gen),
                    dy = random_bf16(size_t(N) * C, gen);
    std::vector<double> out_ref(size_t(N) * C), d_embed_ref(size_t(V) * C, 0.0), d_pos_ref(size_t(T) * C, 0.0);
    embedding_forward_cpu(out_ref.data(), tokens.data(), embed.exact.data(), pos.exact.data(), N, T, C);
    embedding_backward_cpu(d_embed_ref.data(), d_pos_ref.data(), dy.exact.data(), tokens.data(), N, T, C);
    auto d_tokens = uploaded(tokens);
    auto d_embed = uploaded(embed.device_values), d_pos = uploaded(pos.device_values), d_dy = uploaded(dy.device_values);
    auto d_out = poisoned<bf16>(size_t(N) * C);
    embedding_forward_gpu(d_out.data(), d_tokens.data(), d_embed.data(), d_pos.data(), N, T, C);
    CHECK(relative_error(to_double(d_out.download()), out_ref) < kBf16Bound);
    const TokenBuckets buckets = build_token_buckets(tokens.data(), N, V);
    auto d_bt = uploaded(buckets.tokens), d_bo = uploaded(buckets.offsets), d_bp = uploaded(buckets.positions);
    std::vector<std::vector<float>> runs;
    for (int run = 0; run < 2; ++run) {
        auto d_de = uploaded(std::vector<float>(size_t(V) * C, 0.0f)), d_dp = uploaded(std::vector<float>(size_t(T) * C, 0.0f));
        embedding_backward_gpu(d_de.data(), d_dp.data(), d_dy.data(), d_bt.data(), d_bo.data(), d_bp.data(),
                               int(buckets.tokens.size()), N, T, C);
        runs.push_back(d_de.download());
        CHECK(relative_error(runs.back(), d_embed_ref) < 1e-5);
        CHECK(relative_error(d_dp.download(), d_pos_ref) < 1e-5);
    }
    CHECK(runs[0] == runs[1]);  // bitwise deterministic
}

TEST_CASE("GPU classifier head (cuBLASLt logits + fused softmax/cross-entropy/dlogits) matches classifier_cpu") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    const int N = 67, C = 128, V = 50257, Vp = 50304;
    const Bf16Input x = random_bf16(size_t(N) * C, gen), embed = random_bf16(size_t(Vp) * C, gen, 0.2);
    std::vector<int> targets(N);
    for (auto& t : targets) t = int(gen() % V);
    const double scale = 1.0 / N;
    std::vector<double> loss_ref(N), dx_ref(size_t(N) * C, 0.0), de_ref(size_t(Vp) * C, 0.0);
    classifier_cpu(loss_ref.data(), dx_ref.data(), de_ref.data(), x.exact.data(), embed.exact.data(), targets.data(),
                   N, C, V, scale);
    auto d_x = uploaded(x.device_values), d_embed = uploaded(embed.device_values);
    auto d_targets = uploaded(targets);
    auto d_logits = poisoned<bf16>(size_t(N) * Vp), d_dx = poisoned<bf16>(size_t(N) * C);
    auto d_loss = poisoned<float>(N);
    auto d_de = uploaded(std::vector<float>(size_t(Vp) * C, 0.0f));
    matmul_forward_gpu(d_logits.data(), d_x.data(), d_embed.data(), nullptr, N, C, Vp);
    softmax_cross_entropy_gpu(d_loss.data(), d_logits.data(), d_targets.data(), N, V, Vp, float(scale));
    matmul_backward_input_gpu(d_dx.data(), d_logits.data(), d_embed.data(), N, C, Vp);
    matmul_backward_weight_gpu(d_de.data(), d_logits.data(), d_x.data(), N, C, Vp);
    // Logits are rounded to bf16 before the softmax: losses within 1e-2 relative.
    CHECK(relative_error(d_loss.download(), loss_ref) < kBf16Bound);
    CHECK(relative_error(to_double(d_dx.download()), dx_ref) < 2 * kBf16Bound);
    const std::vector<float> de = d_de.download();
    CHECK(relative_error(de, de_ref) < 2 * kBf16Bound);
    for (size_t i = size_t(V) * C; i < size_t(Vp) * C; ++i) REQUIRE(de[i] == 0.0f);  // padded rows untouched
}

TEST_CASE("GPU global gradient norm matches the float64 sum and is deterministic") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    const size_t n = 12345679;
    const std::vector<float> values = random_vector<float>(n, gen);
    double sum_sq = 0;
    for (float v : values) sum_sq += double(v) * v;
    auto d_values = uploaded(values);
    auto d_norm = poisoned<float>(1);
    global_norm_gpu(d_norm.data(), d_values.data(), n);
    const float first = d_norm.download()[0];
    CHECK(first == doctest::Approx(std::sqrt(sum_sq)).epsilon(1e-5));
    global_norm_gpu(d_norm.data(), d_values.data(), n);
    CHECK(d_norm.download()[0] == first);
}

// q, k, v live in one packed [N, 3C] buffer (as the model's QKV projection writes them) and
// the gradients go into another, so the strided addressing is tested too. Both kernel families
// run: Hopper's (wgmma, where the build and GPU have it) and the portable one (mma.sync),
// forced. Lengths cover partial tiles of 64 rows and blocks of 128, a lone row, and sequences
// long enough for several blocks of each kernel.
TEST_CASE("GPU flash attention forward and backward match the CPU reference (odd lengths, head_dim 64 and 128)") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    struct RestoreKernels {
        ~RestoreKernels() { set_attention_kernels(AttentionKernels::automatic); }
    } restore;
    std::vector<std::tuple<AttentionKernels, int, int, int, int>> cases;  // kernels, B, T, H, head_dim
    for (AttentionKernels kernels : {AttentionKernels::automatic, AttentionKernels::portable})
        for (auto [B, T, H, hd] : {std::tuple{2, 100, 3, 64}, std::tuple{1, 257, 2, 128}, std::tuple{3, 64, 2, 64},
                                   std::tuple{2, 1, 2, 128}, std::tuple{1, 300, 1, 64}, std::tuple{1, 700, 2, 64},
                                   std::tuple{1, 129, 1, 64}, std::tuple{1, 520, 1, 128}})
            cases.emplace_back(kernels, B, T, H, hd);
    for (auto [kernels, B, T, H, hd] : cases) {
        set_attention_kernels(kernels);
        const std::string family = attention_kernels_name(hd);
        if (T == 100) MESSAGE("attention kernels: " << family << " (head_dim " << hd << ")");
        CAPTURE(family);
        CAPTURE(B);
        CAPTURE(T);
        CAPTURE(hd);
        const int N = B * T, C = H * hd;
        const Bf16Input qkv = random_bf16(size_t(N) * 3 * C, gen, 1.5), dout = random_bf16(size_t(N) * C, gen);
        std::vector<double> q(size_t(N) * C), k(size_t(N) * C), v(size_t(N) * C);
        for (int n = 0; n < N; ++n)
            for (int c = 0; c < C; ++c) {
                q[size_t(n) * C + c] = qkv.exact[size_t(n) * 3 * C + c];
                k[size_t(n) * C + c] = qkv.exact[size_t(n) * 3 * C + C + c];
                v[size_t(n) * C + c] = qkv.exact[size_t(n) * 3 * C + 2 * C + c];
            }
        std::vector<double> out_ref(size_t(N) * C), probs(size_t(B) * H * T * T);
        std::vector<double> dq_ref(size_t(N) * C, 0.0), dk_ref(size_t(N) * C, 0.0), dv_ref(size_t(N) * C, 0.0);
        attention_forward_cpu(out_ref.data(), probs.data(), q.data(), k.data(), v.data(), B, T, H, hd);
        attention_backward_cpu(dq_ref.data(), dk_ref.data(), dv_ref.data(), dout.exact.data(), q.data(), k.data(),
                               v.data(), probs.data(), B, T, H, hd);

        auto d_qkv = uploaded(qkv.device_values), d_dout = uploaded(dout.device_values);
        auto d_out = poisoned<bf16>(size_t(N) * C);
        auto d_lse = poisoned<float>(size_t(B) * H * T), d_delta = poisoned<float>(size_t(B) * H * T);
        const Rows<const bf16> rq{d_qkv.data(), 3 * C}, rk{d_qkv.data() + C, 3 * C}, rv{d_qkv.data() + 2 * C, 3 * C};
        std::vector<std::vector<bf16>> gradients;
        for (int run = 0; run < 2; ++run) {
            auto d_dqkv = poisoned<bf16>(size_t(N) * 3 * C);
            attention_forward_gpu(Rows<bf16>{d_out.data(), C}, d_lse.data(), rq, rk, rv, B, T, H, hd);
            attention_backward_gpu(Rows<bf16>{d_dqkv.data(), 3 * C}, Rows<bf16>{d_dqkv.data() + C, 3 * C},
                                   Rows<bf16>{d_dqkv.data() + 2 * C, 3 * C}, d_delta.data(),
                                   Rows<const bf16>{d_dout.data(), C}, Rows<const bf16>{d_out.data(), C},
                                   d_lse.data(), rq, rk, rv, B, T, H, hd);
            gradients.push_back(d_dqkv.download());
        }
        CHECK(gradients[0] == gradients[1]);  // bitwise deterministic
        CHECK(relative_error(to_double(d_out.download()), out_ref) < kBf16Bound);
        const std::vector<double> dqkv = to_double(gradients[0]);
        std::vector<double> dq(size_t(N) * C), dk(size_t(N) * C), dv(size_t(N) * C);
        for (int n = 0; n < N; ++n)
            for (int c = 0; c < C; ++c) {
                dq[size_t(n) * C + c] = dqkv[size_t(n) * 3 * C + c];
                dk[size_t(n) * C + c] = dqkv[size_t(n) * 3 * C + C + c];
                dv[size_t(n) * C + c] = dqkv[size_t(n) * 3 * C + 2 * C + c];
            }
        // dq and dk pass through two rounded products (P and dS in bf16): a looser bound. With
        // T = 1 they are exactly zero (softmax of one score has no gradient): absolute bound.
        CHECK(relative_error(dv, dv_ref) < kBf16Bound);
        if (T == 1) {
            for (double g : dq) CHECK(std::abs(g) < 1e-2);  // NaN fails too
            for (double g : dk) CHECK(std::abs(g) < 1e-2);
        } else {
            CHECK(relative_error(dq, dq_ref) < 2 * kBf16Bound);
            CHECK(relative_error(dk, dk_ref) < 2 * kBf16Bound);
        }
    }
}

TEST_CASE("GPU GELU epilogues of cuBLASLt match matmul + gelu on the CPU") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    const int N = 77, in_dim = 96, out_dim = 136;
    const Bf16Input x = random_bf16(size_t(N) * in_dim, gen), w = random_bf16(size_t(out_dim) * in_dim, gen, 0.1),
                    bias = random_bf16(out_dim, gen, 0.5), w_next = random_bf16(size_t(in_dim) * out_dim, gen, 0.1),
                    dy = random_bf16(size_t(N) * in_dim, gen);
    std::vector<double> pre(size_t(N) * out_dim), act(size_t(N) * out_dim);
    matmul_forward_cpu(pre.data(), x.exact.data(), w.exact.data(), bias.exact.data(), N, in_dim, out_dim);
    gelu_forward_cpu(act.data(), pre.data(), pre.size());
    auto d_x = uploaded(x.device_values), d_w = uploaded(w.device_values), d_b = uploaded(bias.device_values);
    auto d_pre = poisoned<bf16>(pre.size()), d_act = poisoned<bf16>(act.size());
    matmul_forward_gelu_gpu(d_act.data(), d_pre.data(), d_x.data(), d_w.data(), d_b.data(), N, in_dim, out_dim);
    const std::vector<double> pre_gpu = to_double(d_pre.download());
    CHECK(relative_error(pre_gpu, pre) < kBf16Bound);
    CHECK(relative_error(to_double(d_act.download()), act) < kBf16Bound);
    // Backward through the next layer (W_next [in_dim, out_dim]) and the GELU, on the GPU's
    // own rounded pre-activation so only the fused epilogue is measured.
    std::vector<double> d_act_ref(act.size(), 0.0), d_pre_ref(act.size(), 0.0);
    std::vector<double> d_w_unused(size_t(in_dim) * out_dim, 0.0);
    matmul_backward_cpu(d_act_ref.data(), d_w_unused.data(), static_cast<double*>(nullptr), dy.exact.data(),
                        act.data(), w_next.exact.data(), N, out_dim, in_dim);
    gelu_backward_cpu(d_pre_ref.data(), d_act_ref.data(), pre_gpu.data(), pre_gpu.size());
    auto d_wn = uploaded(w_next.device_values), d_dy = uploaded(dy.device_values);
    auto d_dpre = poisoned<bf16>(act.size());
    matmul_backward_input_dgelu_gpu(d_dpre.data(), d_dy.data(), d_wn.data(), d_pre.data(), N, out_dim, in_dim);
    CHECK(relative_error(to_double(d_dpre.download()), d_pre_ref) < 2 * kBf16Bound);
}

TEST_CASE("GPU residual adds fused into the norms match add + norm on the CPU; LN backward accumulates") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    const int N = 45, C = 200;
    const Bf16Input a = random_bf16(size_t(N) * C, gen), b = random_bf16(size_t(N) * C, gen),
                    dy = random_bf16(size_t(N) * C, gen), previous = random_bf16(size_t(N) * C, gen);
    const std::vector<float> weight = random_vector<float>(C, gen), bias = random_vector<float>(C, gen);
    const std::vector<double> weight64(weight.begin(), weight.end()), bias64(bias.begin(), bias.end());
    auto d_a = uploaded(a.device_values), d_b = uploaded(b.device_values), d_dy = uploaded(dy.device_values);
    auto d_w = uploaded(weight), d_bias = uploaded(bias);

    // sum = a + b (rounded to bf16 as stored), out = LayerNorm(sum)
    std::vector<double> sum(size_t(N) * C), out(size_t(N) * C), mean(N), rstd(N);
    add_cpu(sum.data(), a.exact.data(), b.exact.data(), sum.size());
    for (double& v : sum) v = double(__bfloat162float(__float2bfloat16(float(v))));
    layernorm_forward_cpu(out.data(), mean.data(), rstd.data(), sum.data(), weight64.data(), bias64.data(), N, C, 1e-5);
    auto d_sum = poisoned<bf16>(sum.size()), d_out = poisoned<bf16>(out.size());
    auto d_mean = poisoned<float>(N), d_rstd = poisoned<float>(N);
    add_layernorm_forward_gpu(d_sum.data(), d_out.data(), d_mean.data(), d_rstd.data(), d_a.data(), d_b.data(),
                              d_w.data(), d_bias.data(), N, C, 1e-5f);
    CHECK(relative_error(to_double(d_sum.download()), sum) < 1e-6);  // exactly the rounded sum
    CHECK(relative_error(to_double(d_out.download()), out) < kBf16Bound);
    CHECK(relative_error(d_rstd.download(), rstd) < 1e-5);

    // din += LayerNorm backward
    std::vector<double> din(previous.exact), dw(C, 0.0), db(C, 0.0);
    layernorm_backward_cpu(din.data(), dw.data(), db.data(), dy.exact.data(), sum.data(), weight64.data(), mean.data(),
                           rstd.data(), N, C);
    auto d_din = uploaded(previous.device_values);
    auto d_dw = uploaded(std::vector<float>(C, 0.0f)), d_db = uploaded(std::vector<float>(C, 0.0f));
    auto d_branch = uploaded(std::vector<float>(C, 0.0f));
    layernorm_backward_gpu(d_din.data(), d_dw.data(), d_db.data(), d_dy.data(), d_sum.data(), d_w.data(),
                           d_mean.data(), d_rstd.data(), N, C, /*accumulate=*/true, d_branch.data());
    const std::vector<double> din_gpu = to_double(d_din.download());
    CHECK(relative_error(din_gpu, din) < kBf16Bound);
    std::vector<double> branch(C, 0.0);  // column sums of the accumulated din as stored
    for (int n = 0; n < N; ++n)
        for (int c = 0; c < C; ++c) branch[c] += din_gpu[size_t(n) * C + c];
    CHECK(relative_error(d_branch.download(), branch) < 1e-5);
    CHECK(relative_error(d_dw.download(), dw) < 1e-4);
    CHECK(relative_error(d_db.download(), db) < 1e-5);

    // out = a + RMSNorm(b)
    std::vector<double> normed(size_t(N) * C), rms_rstd(N), rms_out(size_t(N) * C);
    rmsnorm_forward_cpu(normed.data(), rms_rstd.data(), b.exact.data(), weight64.data(), N, C, 1e-6);
    add_cpu(rms_out.data(), a.exact.data(), normed.data(), rms_out.size());
    auto d_rms_out = poisoned<bf16>(rms_out.size());
    auto d_rms_rstd = poisoned<float>(N);
    rmsnorm_add_forward_gpu(d_rms_out.data(), d_rms_rstd.data(), d_a.data(), d_b.data(), d_w.data(), N, C, 1e-6f);
    CHECK(relative_error(to_double(d_rms_out.download()), rms_out) < kBf16Bound);
    CHECK(relative_error(d_rms_rstd.download(), rms_rstd) < 1e-5);
}

TEST_CASE("GPU fp32 -> bf16 cast of master weights is bit-exact") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    const size_t n = 100001;
    std::vector<float> values = random_vector<float>(n, gen, 3.0);
    values[0] = 1.00390625f;  // exactly halfway between two bf16 values: ties to even
    values[1] = -0.0f;
    auto d_values = uploaded(values);
    auto d_cast = poisoned<bf16>(n);
    to_bf16_gpu(d_cast.data(), d_values.data(), n);
    const std::vector<bf16> cast = d_cast.download();
    for (size_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, &cast[i], sizeof bits);
        REQUIRE(bits == to_bf16_bits_cpu(values[i]));
    }
}
