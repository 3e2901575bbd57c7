// Every CPU reference layer's backward pass against central finite differences in float64.
// For a layer y = f(x; w) we take the scalar L = sum(r * y) with a fixed random r, so the
// analytic gradient is the layer's backward pass with dout = r, and compare it with
// (L(x + h e_i) - L(x - h e_i)) / 2h on every input and parameter element.
// Bound: relative error (norm of difference / norm of reference) below 1e-7; central
// differences with h = 1e-5 in float64 are accurate to about 1e-10 here.
#include <cuda_bf16.h>
#include <omp.h>

#include <cstring>
#include <functional>

#include "helpers.hpp"
#include "kernels/activations.hpp"
#include "kernels/attention.hpp"
#include "kernels/classifier.hpp"
#include "kernels/elementwise.hpp"
#include "kernels/embedding.hpp"
#include "kernels/matmul.hpp"
#include "kernels/norms.hpp"
#include "kernels/rope.hpp"

using namespace qopt;
using namespace qopt::test;
using Vec = std::vector<double>;

namespace {

constexpr double kBound = 1e-7;

// Numerical gradient of loss() with respect to every element of `x` (modified in place and restored).
Vec numeric_grad(Vec& x, const std::function<double()>& loss, double h = 1e-5) {
    Vec grad(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
        const double saved = x[i];
        x[i] = saved + h;
        const double plus = loss();
        x[i] = saved - h;
        const double minus = loss();
        x[i] = saved;
        grad[i] = (plus - minus) / (2 * h);
    }
    return grad;
}

double dot(const Vec& a, const Vec& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
    return s;
}

}  // namespace

TEST_CASE("matmul backward matches finite differences (with and without bias, odd sizes)") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    for (bool with_bias : {true, false}) {
        const int N = 7, IC = 5, OC = 6;  // not multiples of the 4x4 blocking
        Vec in = random_vector<double>(N * IC, gen), w = random_vector<double>(OC * IC, gen),
            b = random_vector<double>(OC, gen), r = random_vector<double>(N * OC, gen), out(N * OC);
        auto loss = [&] {
            matmul_forward_cpu(out.data(), in.data(), w.data(), with_bias ? b.data() : nullptr, N, IC, OC);
            return dot(out, r);
        };
        Vec din(N * IC, 0), dw(OC * IC, 0), db(OC, 0);
        matmul_backward_cpu(din.data(), dw.data(), with_bias ? db.data() : nullptr, r.data(), in.data(), w.data(), N,
                            IC, OC);
        CHECK(relative_error(din, numeric_grad(in, loss)) < kBound);
        CHECK(relative_error(dw, numeric_grad(w, loss)) < kBound);
        if (with_bias) CHECK(relative_error(db, numeric_grad(b, loss)) < kBound);
    }
}

TEST_CASE("matmul forward equals the naive triple loop") {
    std::mt19937_64 gen(fresh_seed());
    const int N = 9, IC = 13, OC = 11;
    auto in = random_vector<float>(N * IC, gen), w = random_vector<float>(OC * IC, gen), b = random_vector<float>(OC, gen);
    std::vector<float> out(N * OC, NAN);
    matmul_forward_cpu(out.data(), in.data(), w.data(), b.data(), N, IC, OC);
    std::vector<double> ref(N * OC);
    for (int n = 0; n < N; ++n)
        for (int o = 0; o < OC; ++o) {
            double s = b[o];
            for (int i = 0; i < IC; ++i) s += double(in[n * IC + i]) * w[o * IC + i];
            ref[n * OC + o] = s;
        }
    CHECK(relative_error(out, ref) < 1e-6);
}

// The register-tiled products at sizes that cross every block (64-row blocks of the input
// gradient, 256-output blocks, 64-wide column tiles, ragged edges), float and double, against
// the textbook loops in float64; and the same bits on 1 and 2 threads, as matmul.hpp promises.
template <typename T>
void check_linear_products(std::mt19937_64& gen) {
    const int N = 130, IC = 150, OC = 600;
    const auto in = random_vector<T>(size_t(N) * IC, gen), w = random_vector<T>(size_t(OC) * IC, gen),
               b = random_vector<T>(OC, gen), dout = random_vector<T>(size_t(N) * OC, gen),
               din_start = random_vector<T>(size_t(N) * IC, gen), dw_start = random_vector<T>(size_t(OC) * IC, gen),
               db_start = random_vector<T>(OC, gen);
    auto run = [&](std::vector<T>& out, std::vector<T>& din, std::vector<T>& dw, std::vector<T>& db) {
        out.assign(size_t(N) * OC, T(NAN));
        din = din_start, dw = dw_start, db = db_start;
        matmul_forward_cpu(out.data(), in.data(), w.data(), b.data(), N, IC, OC);
        matmul_backward_cpu(din.data(), dw.data(), db.data(), dout.data(), in.data(), w.data(), N, IC, OC);
    };
    const int threads = omp_get_max_threads();
    std::vector<T> out, din, dw, db, out_1, din_1, dw_1, db_1;
    omp_set_num_threads(2);
    run(out, din, dw, db);
    omp_set_num_threads(1);
    run(out_1, din_1, dw_1, db_1);
    omp_set_num_threads(threads);
    CHECK(out == out_1);
    CHECK(din == din_1);
    CHECK(dw == dw_1);
    CHECK(db == db_1);

    std::vector<double> out_ref(out.size()), din_ref(din_start.begin(), din_start.end()),
        dw_ref(dw_start.begin(), dw_start.end()), db_ref(db_start.begin(), db_start.end());
    for (int n = 0; n < N; ++n)
        for (int o = 0; o < OC; ++o) {
            double sum = b[size_t(o)];
            for (int i = 0; i < IC; ++i) sum += double(in[size_t(n) * IC + i]) * w[size_t(o) * IC + i];
            out_ref[size_t(n) * OC + o] = sum;
            const double g = dout[size_t(n) * OC + o];
            db_ref[size_t(o)] += g;
            for (int i = 0; i < IC; ++i) {
                din_ref[size_t(n) * IC + i] += g * w[size_t(o) * IC + i];
                dw_ref[size_t(o) * IC + i] += g * in[size_t(n) * IC + i];
            }
        }
    const double bound = sizeof(T) == 4 ? 1e-5 : 1e-12;
    CHECK(relative_error(out, out_ref) < bound);
    CHECK(relative_error(din, din_ref) < bound);
    CHECK(relative_error(dw, dw_ref) < bound);
    CHECK(relative_error(db, db_ref) < bound);
}

TEST_CASE("linear layer products: blocked tiles equal the plain loops and do not depend on the thread count") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    check_linear_products<float>(gen);
    check_linear_products<double>(gen);
}

TEST_CASE("rmsnorm backward matches finite differences") {
    std::mt19937_64 gen(fresh_seed());
    const int N = 5, C = 7;
    Vec in = random_vector<double>(N * C, gen), w = random_vector<double>(C, gen), r = random_vector<double>(N * C, gen);
    Vec out(N * C), rstd(N);
    auto loss = [&] {
        rmsnorm_forward_cpu(out.data(), rstd.data(), in.data(), w.data(), N, C, 1e-6);
        return dot(out, r);
    };
    loss();
    Vec din(N * C, 0), dw(C, 0);
    rmsnorm_backward_cpu(din.data(), dw.data(), r.data(), in.data(), w.data(), rstd.data(), N, C);
    CHECK(relative_error(din, numeric_grad(in, loss)) < kBound);
    CHECK(relative_error(dw, numeric_grad(w, loss)) < kBound);
}

TEST_CASE("rmsnorm output has unit RMS before the gain") {
    std::mt19937_64 gen(fresh_seed());
    const int C = 64;
    Vec in = random_vector<double>(C, gen, 3.0), w(C, 1.0), out(C), rstd(1);
    rmsnorm_forward_cpu(out.data(), rstd.data(), in.data(), w.data(), 1, C, 0.0 + 1e-12);
    CHECK(std::sqrt(dot(out, out) / C) == doctest::Approx(1.0).epsilon(1e-9));
}

TEST_CASE("layernorm backward matches finite differences") {
    std::mt19937_64 gen(fresh_seed());
    const int N = 4, C = 9;
    Vec in = random_vector<double>(N * C, gen), w = random_vector<double>(C, gen), b = random_vector<double>(C, gen),
        r = random_vector<double>(N * C, gen);
    Vec out(N * C), mean(N), rstd(N);
    auto loss = [&] {
        layernorm_forward_cpu(out.data(), mean.data(), rstd.data(), in.data(), w.data(), b.data(), N, C, 1e-5);
        return dot(out, r);
    };
    loss();
    Vec din(N * C, 0), dw(C, 0), db(C, 0);
    layernorm_backward_cpu(din.data(), dw.data(), db.data(), r.data(), in.data(), w.data(), mean.data(), rstd.data(), N,
                           C);
    CHECK(relative_error(din, numeric_grad(in, loss)) < kBound);
    CHECK(relative_error(dw, numeric_grad(w, loss)) < kBound);
    CHECK(relative_error(db, numeric_grad(b, loss)) < kBound);
}

TEST_CASE("GELU and ReLU^2 backward match finite differences") {
    std::mt19937_64 gen(fresh_seed());
    const size_t n = 50;
    Vec in = random_vector<double>(n, gen, 2.0), r = random_vector<double>(n, gen), out(n);
    for (auto& x : in)
        if (std::fabs(x) < 1e-3) x = 0.5;  // keep ReLU^2's kink out of the difference stencil
    SUBCASE("gelu") {
        auto loss = [&] {
            gelu_forward_cpu(out.data(), in.data(), n);
            return dot(out, r);
        };
        Vec din(n, 0);
        gelu_backward_cpu(din.data(), r.data(), in.data(), n);
        CHECK(relative_error(din, numeric_grad(in, loss)) < kBound);
    }
    SUBCASE("relu2") {
        auto loss = [&] {
            relu2_forward_cpu(out.data(), in.data(), n);
            return dot(out, r);
        };
        Vec din(n, 0);
        relu2_backward_cpu(din.data(), r.data(), in.data(), n);
        CHECK(relative_error(din, numeric_grad(in, loss)) < kBound);
    }
}

TEST_CASE("GELU tanh form at known points") {
    double x[3] = {0.0, 1.0, -2.0}, y[3];
    gelu_forward_cpu(y, x, 3);
    CHECK(y[0] == 0.0);
    CHECK(y[1] == doctest::Approx(0.8411919906).epsilon(1e-9));   // 0.5 (1 + tanh(0.79788456 * 1.044715))
    CHECK(y[2] == doctest::Approx(-0.0454023059).epsilon(1e-8));
}

TEST_CASE("RoPE: backward matches finite differences, preserves norms, position 0 is identity") {
    std::mt19937_64 gen(fresh_seed());
    const int B = 2, T = 5, H = 2, hd = 6, C = H * hd, N = B * T;
    Vec in = random_vector<double>(N * C, gen), r = random_vector<double>(N * C, gen), out(N * C);
    auto loss = [&] {
        rope_forward_cpu(out.data(), in.data(), N, T, H, hd, 10000.0);
        return dot(out, r);
    };
    loss();
    for (int n = 0; n < N; ++n) {
        double a = 0, b = 0;
        for (int c = 0; c < C; ++c) a += in[n * C + c] * in[n * C + c], b += out[n * C + c] * out[n * C + c];
        CHECK(b == doctest::Approx(a).epsilon(1e-12));
        if (n % T == 0)
            for (int c = 0; c < C; ++c) CHECK(out[n * C + c] == in[n * C + c]);
    }
    Vec din(N * C, 0);
    rope_backward_cpu(din.data(), r.data(), N, T, H, hd, 10000.0);
    CHECK(relative_error(din, numeric_grad(in, loss)) < kBound);
}

TEST_CASE("RoPE makes attention scores depend only on relative position") {
    // <rope(q, t1), rope(k, s1)> == <rope(q, t2), rope(k, s2)> when t1 - s1 == t2 - s2.
    std::mt19937_64 gen(fresh_seed());
    const int T = 8, hd = 8;
    Vec q1 = random_vector<double>(hd, gen), k1 = random_vector<double>(hd, gen);
    Vec q(T * hd), k(T * hd), qr(T * hd), kr(T * hd);
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < hd; ++i) q[t * hd + i] = q1[i], k[t * hd + i] = k1[i];
    rope_forward_cpu(qr.data(), q.data(), T, T, 1, hd, 10000.0);
    rope_forward_cpu(kr.data(), k.data(), T, T, 1, hd, 10000.0);
    auto score = [&](int t, int s) {
        double d = 0;
        for (int i = 0; i < hd; ++i) d += qr[t * hd + i] * kr[s * hd + i];
        return d;
    };
    CHECK(score(5, 2) == doctest::Approx(score(7, 4)).epsilon(1e-12));
    CHECK(score(3, 3) == doctest::Approx(score(0, 0)).epsilon(1e-12));
}

TEST_CASE("attention backward matches finite differences; causal mask holds") {
    std::mt19937_64 gen(fresh_seed());
    const int B = 2, T = 5, H = 2, hd = 3, C = H * hd, N = B * T;
    Vec q = random_vector<double>(N * C, gen), k = random_vector<double>(N * C, gen),
        v = random_vector<double>(N * C, gen), r = random_vector<double>(N * C, gen);
    Vec out(N * C), probs(B * H * T * T);
    auto loss = [&] {
        attention_forward_cpu(out.data(), probs.data(), q.data(), k.data(), v.data(), B, T, H, hd);
        return dot(out, r);
    };
    loss();
    Vec dq(N * C, 0), dk(N * C, 0), dv(N * C, 0);
    attention_backward_cpu(dq.data(), dk.data(), dv.data(), r.data(), q.data(), k.data(), v.data(), probs.data(), B, T,
                           H, hd);
    CHECK(relative_error(dq, numeric_grad(q, loss)) < kBound);
    CHECK(relative_error(dk, numeric_grad(k, loss)) < kBound);
    CHECK(relative_error(dv, numeric_grad(v, loss)) < kBound);
    // Changing a later token's key/value must not change earlier outputs.
    Vec before = out;
    for (int c = 0; c < C; ++c) k[(T - 1) * C + c] += 1.0, v[(T - 1) * C + c] -= 2.0;
    loss();
    for (int t = 0; t < T - 1; ++t)
        for (int c = 0; c < C; ++c) CHECK(out[t * C + c] == before[t * C + c]);
}

TEST_CASE("embedding backward matches finite differences, repeated tokens included") {
    std::mt19937_64 gen(fresh_seed());
    const int V = 6, T = 4, B = 2, C = 3, N = B * T;
    std::vector<int> tokens = {1, 3, 1, 5, 0, 1, 3, 2};
    Vec wte = random_vector<double>(V * C, gen), wpe = random_vector<double>(T * C, gen),
        r = random_vector<double>(N * C, gen), out(N * C);
    auto loss = [&] {
        embedding_forward_cpu(out.data(), tokens.data(), wte.data(), wpe.data(), N, T, C);
        return dot(out, r);
    };
    Vec dwte(V * C, 0), dwpe(T * C, 0);
    embedding_backward_cpu(dwte.data(), dwpe.data(), r.data(), tokens.data(), N, T, C);
    CHECK(relative_error(dwte, numeric_grad(wte, loss)) < kBound);
    CHECK(relative_error(dwpe, numeric_grad(wpe, loss)) < kBound);
}

TEST_CASE("classifier cross-entropy: loss value, and backward matches finite differences") {
    std::mt19937_64 gen(fresh_seed());
    const int N = 70, C = 5, V = 11, Vpad = 16;  // N > the 64-row chunk; padded rows unused
    Vec x = random_vector<double>(N * C, gen), wte = random_vector<double>(Vpad * C, gen);
    std::vector<int> targets(N);
    for (auto& t : targets) t = int(gen() % V);
    Vec losses(N);
    auto loss = [&] {
        classifier_cpu(losses.data(), static_cast<double*>(nullptr), static_cast<double*>(nullptr), x.data(),
                       wte.data(), targets.data(), N, C, V, 0.0);
        double s = 0;
        for (double l : losses) s += l;
        return s / N;
    };
    // Reference loss of row 0 from its definition.
    loss();
    double logits[V], max_logit = -1e300;
    for (int v = 0; v < V; ++v) {
        logits[v] = 0;
        for (int c = 0; c < C; ++c) logits[v] += x[c] * wte[v * C + c];
        max_logit = std::max(max_logit, logits[v]);
    }
    double sum = 0;
    for (int v = 0; v < V; ++v) sum += std::exp(logits[v] - max_logit);
    CHECK(losses[0] == doctest::Approx(std::log(sum) + max_logit - logits[targets[0]]).epsilon(1e-12));

    Vec dx(N * C, 0), dwte(Vpad * C, 0);
    classifier_cpu(losses.data(), dx.data(), dwte.data(), x.data(), wte.data(), targets.data(), N, C, V, 1.0 / N);
    CHECK(relative_error(dx, numeric_grad(x, loss)) < kBound);
    CHECK(relative_error(dwte, numeric_grad(wte, loss)) < kBound);
    for (int i = V * C; i < Vpad * C; ++i) CHECK(dwte[i] == 0.0);
}

// The float head at GPT-2's vocabulary against the same head in double: the losses and both
// gradients within float rounding (a float sum of the 50,257 exponentials, added one by one,
// was off by ~5e-5 relative; the head sums them in double).
TEST_CASE("classifier in float at GPT-2's vocabulary stays within float rounding of float64") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int N = 6, C = 16, V = 50257, Vpad = 50304;
    const std::vector<double> x = random_vector<double>(size_t(N) * C, gen),
                              wte = random_vector<double>(size_t(Vpad) * C, gen, 1.0);
    std::vector<int> targets(N);
    for (auto& t : targets) t = int(gen() % V);
    const std::vector<float> x_float(x.begin(), x.end()), wte_float(wte.begin(), wte.end());
    const std::vector<double> x_rounded(x_float.begin(), x_float.end()), wte_rounded(wte_float.begin(), wte_float.end());
    std::vector<double> losses(N), dx(size_t(N) * C, 0), dwte(size_t(Vpad) * C, 0);
    classifier_cpu(losses.data(), dx.data(), dwte.data(), x_rounded.data(), wte_rounded.data(), targets.data(), N, C, V,
                   1.0 / N);
    std::vector<float> losses_float(N), dx_float(size_t(N) * C, 0), dwte_float(size_t(Vpad) * C, 0);
    classifier_cpu(losses_float.data(), dx_float.data(), dwte_float.data(), x_float.data(), wte_float.data(),
                   targets.data(), N, C, V, 1.0f / N);
    CHECK(relative_error(losses_float, losses) < 1e-6);
    CHECK(relative_error(dx_float, dx) < 1e-4);  // 50,257 float multiply-adds per entry, with cancellation
    CHECK(relative_error(dwte_float, dwte) < 1e-5);
}

TEST_CASE("to_bf16_bits_cpu rounds like CUDA's __float2bfloat16 (nearest, ties to even, NaN stays NaN)") {
    std::mt19937_64 gen(fresh_seed());
    std::vector<float> values = random_vector<float>(20000, gen, 5.0);
    for (float v : {1.00390625f, 1.01171875f, -1.00390625f, 0.0f, -0.0f, 3.0e38f, 1e-40f, INFINITY, -INFINITY, NAN})
        values.push_back(v);
    for (float v : values) {
        const __nv_bfloat16 reference = __float2bfloat16(v);
        uint16_t reference_bits;
        std::memcpy(&reference_bits, &reference, sizeof reference_bits);
        const uint16_t bits = to_bf16_bits_cpu(v);
        if (std::isnan(v)) CHECK(((bits & 0x7F80u) == 0x7F80u && (bits & 0x7Fu) != 0));
        else CHECK(bits == reference_bits);
    }
    CHECK(to_bf16_bits_cpu(1.00390625f) == 0x3F80);  // halfway, even neighbour 1.0
    CHECK(to_bf16_bits_cpu(1.01171875f) == 0x3F82);  // halfway, even neighbour above
}
