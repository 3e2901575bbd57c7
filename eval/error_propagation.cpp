#include "eval/error_propagation.hpp"

#include <cmath>

#include "core/error.hpp"
#include "eval/eval_model.hpp"
#include "eval/outlier_metrics.hpp"
#include "model/params.hpp"
#include "quant/hadamard.hpp"
#include "quant/quantizer.hpp"

namespace qopt {

namespace {

struct ChainEntry {
    int layer;
    Module module;
};

std::vector<ChainEntry> module_chain(const ModelConfig& config) {
    std::vector<ChainEntry> chain{{-1, Module::Embedding}};
    for (int l = 0; l < config.n_layers; ++l)
        for (Module m : block_modules(config.arch)) chain.push_back({l, m});
    chain.push_back({config.n_layers, Module::FinalNorm});
    return chain;
}

// Sums over all calibration tokens of one module.
struct ModuleSums {
    double delta2 = 0, ref2 = 0, a2 = 0, b2 = 0, ab = 0;
    double local2 = 0, dm2 = 0, dh2 = 0, h2 = 0, hw2 = 0;  // linear layers
    RowStatsSum input_stats;
};

double sum_squares(const std::vector<float>& x) {
    double s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
    for (size_t i = 0; i < x.size(); ++i) s += double(x[i]) * x[i];
    return s;
}

// Full-precision statistics of each hidden weight matrix and of its quantized version.
void weight_statistics(ModuleRecord& r, const float* weight, int rows, int cols, const LinearQuantConfig& quant,
                       double& spectral_w, double& spectral_m) {
    const size_t n = size_t(rows) * cols;
    r.weight_kurtosis = kurtosis(weight, n);
    r.weight_mmr_median = row_outlier_stats(weight, rows, cols).mean_mmr_median();
    std::vector<float> rotated(weight, weight + n), quantized;
    hadamard_rows_cpu(rotated.data(), rows, cols, hadamard_block_for(cols, quant.hadamard_block));
    quantized = rotated;
    if (quant.weights.enabled())
        fake_quant_cpu(quantized.data(), static_cast<uint8_t*>(nullptr), quantized.data(), rows, cols, quant.weights,
                       quant.trust);
    double w2 = 0, e2 = 0;
    std::vector<float> midpoint(n);  // M = W + eps_W / 2 = (W + Q(W)) / 2
    for (size_t i = 0; i < n; ++i) {
        const double d = double(quantized[i]) - rotated[i];
        w2 += double(rotated[i]) * rotated[i], e2 += d * d;
        midpoint[i] = 0.5f * (rotated[i] + quantized[i]);
    }
    r.weight_frobenius = std::sqrt(w2);
    r.weight_quant_error = w2 > 0 ? std::sqrt(e2 / w2) : 0.0;
    spectral_w = spectral_norm(weight, rows, cols);
    spectral_m = spectral_norm(midpoint.data(), rows, cols);
    r.weight_spectral_norm = spectral_w;
}

double ratio(double numerator, double denominator) { return denominator > 0 ? numerator / denominator : 0.0; }

}  // namespace

PropagationResult analyze_error_propagation(EvalModel& model, const std::vector<float>& params,
                                            const LinearQuantConfig& quant,
                                            const std::vector<std::vector<int>>& inputs,
                                            const std::vector<std::vector<int>>& targets, int batch, int seq_len) {
    const ModelConfig& config = model.config();
    QOPT_CHECK(quant.enabled(), "the error-propagation analysis needs a quantization (e.g. --format w4a4)");
    QOPT_CHECK(!quant.weights_offline, "the analysis quantizes weights on the fly (RTN)");
    QOPT_CHECK(!inputs.empty() && inputs.size() == targets.size(), "the analysis needs calibration batches");
    const ParamLayout layout = ParamLayout::build(config);
    const std::vector<ChainEntry> chain = module_chain(config);
    const std::vector<LinearMatrix> matrices = linear_matrices(config, layout);
    std::vector<ModuleSums> sums(chain.size());
    std::vector<std::vector<float>> stash(chain.size());
    PropagationResult result;

    for (size_t b = 0; b < inputs.size(); ++b) {
        // Pass 1, full precision: keep every module's output.
        size_t at = 0;
        model.set_linear_quant(LinearQuantConfig());
        model.set_module_tap([&](int layer, Module module, const float* out, int rows, int cols) {
            QOPT_CHECK(at < chain.size() && chain[at].layer == layer && chain[at].module == module,
                       "module hook out of the chain's order at ", module_name(module), " of layer ", layer);
            stash[at].assign(out, out + size_t(rows) * cols);
            ++at;
        });
        result.loss_full += model.loss(inputs[b].data(), targets[b].data(), batch, seq_len);
        QOPT_CHECK(at == chain.size(), "the forward pass showed ", at, " of ", chain.size(), " modules");

        // Pass 2, quantized: compare each output with pass 1's; linear layers also run alone on
        // the other pass's input.
        at = 0;
        std::vector<float> previous, y_qf, y_fq, dh_q, h_w, dh;
        model.set_linear_quant(quant);
        model.set_module_tap([&](int layer, Module module, const float* out, int rows, int cols) {
            QOPT_CHECK(at < chain.size() && chain[at].layer == layer && chain[at].module == module,
                       "module hook out of the chain's order at ", module_name(module), " of layer ", layer);
            ModuleSums& s = sums[at];
            const std::vector<float>& ref = stash[at];
            const size_t n = size_t(rows) * cols;
            double delta2 = 0, ref2 = 0;
#pragma omp parallel for reduction(+ : delta2, ref2) schedule(static)
            for (size_t i = 0; i < n; ++i) {
                const double d = double(out[i]) - ref[i];
                delta2 += d * d, ref2 += double(ref[i]) * ref[i];
            }
            s.delta2 += delta2, s.ref2 += ref2;
            const int site = module_linear_site(module);
            if (site < 0) {
                s.a2 += delta2;  // f^q = f: b = 0, a = dh
            } else {
                const std::vector<float>& h = stash[at - 1];
                const int in_dim = int(h.size() / size_t(rows));
                model.linear_apply(layer, site, y_qf, h.data(), rows, true, true, true);
                model.linear_apply(layer, site, y_fq, previous.data(), rows, false, false, true);
                dh.resize(h.size());
                for (size_t i = 0; i < h.size(); ++i) dh[i] = previous[i] - h[i];
                model.linear_apply(layer, site, dh_q, dh.data(), rows, true, false, false);
                const bool has_bias = matrices[size_t(layer) * kLinearSites + size_t(site)].bias != kAbsent;
                if (has_bias) model.linear_apply(layer, site, h_w, h.data(), rows, false, false, false);
                double a2 = 0, b2 = 0, ab = 0, local2 = 0, dm2 = 0;
#pragma omp parallel for reduction(+ : a2, b2, ab, local2, dm2) schedule(static)
                for (size_t i = 0; i < n; ++i) {
                    const double qq = out[i], ff = ref[i], qf = y_qf[i], fq = y_fq[i];
                    const double a = 0.5 * ((qq - qf) + (fq - ff)), bb = 0.5 * ((qq - fq) + (qf - ff));
                    const double dm = 0.5 * ((fq - ff) + dh_q[i]);  // dh M^T
                    a2 += a * a, b2 += bb * bb, ab += a * bb, local2 += (qf - ff) * (qf - ff), dm2 += dm * dm;
                }
                s.a2 += a2, s.b2 += b2, s.ab += ab, s.local2 += local2, s.dm2 += dm2;
                s.dh2 += sum_squares(dh), s.h2 += sum_squares(h);
                s.hw2 += has_bias ? sum_squares(h_w) : ref2;
                s.input_stats.add(row_outlier_stats(h.data(), rows, in_dim));
            }
            previous.assign(out, out + n);
            ++at;
        });
        result.loss_quantized += model.loss(inputs[b].data(), targets[b].data(), batch, seq_len);
        QOPT_CHECK(at == chain.size(), "the quantized forward pass showed ", at, " of ", chain.size(), " modules");
        result.tokens += long(batch) * seq_len;
    }
    model.set_module_tap(nullptr);
    model.set_linear_quant(LinearQuantConfig());
    for (auto& v : stash) std::vector<float>().swap(v);
    result.loss_full /= double(inputs.size());
    result.loss_quantized /= double(inputs.size());

    for (size_t i = 0; i < chain.size(); ++i) {
        const ModuleSums& s = sums[i];
        ModuleRecord r;
        r.layer = chain[i].layer;
        r.module = chain[i].module;
        r.R = ratio(s.delta2, s.ref2);
        r.A = ratio(s.a2, s.ref2);
        r.B = ratio(s.b2, s.ref2);
        r.C = ratio(2 * s.ab, s.ref2);
        const double previous_R = i > 0 ? result.modules[i - 1].R : 0.0;
        r.G = previous_R > 0 ? r.A / previous_R : -1;
        r.site = module_linear_site(r.module);
        if (r.site >= 0) {
            const LinearMatrix& m = matrices[size_t(r.layer) * kLinearSites + size_t(r.site)];
            double spectral_w = 0, spectral_m = 0;
            weight_statistics(r, params.data() + m.offset, m.rows, m.cols, quant, spectral_w, spectral_m);
            r.G1 = spectral_w > 0 ? (spectral_m / spectral_w) * (spectral_m / spectral_w) : 0.0;
            r.cos_phi = s.dh2 > 0 && spectral_m > 0 ? std::sqrt(s.dm2 / s.dh2) / spectral_m : 0.0;
            r.cos_psi = s.h2 > 0 && spectral_w > 0 ? std::sqrt(s.hw2 / s.h2) / spectral_w : 0.0;
            r.G2 = r.cos_psi > 0 ? (r.cos_phi / r.cos_psi) * (r.cos_phi / r.cos_psi) : 0.0;
            r.local_error = ratio(s.local2, s.ref2);
            r.input_mmr_median = s.input_stats.mean_mmr_median();
            r.input_mmr_mean = s.input_stats.mean_mmr_mean();
            r.input_kurtosis = s.input_stats.mean_kurtosis();
            r.input_max_abs = s.input_stats.max_abs;
        }
        result.modules.push_back(r);
    }
    return result;
}

Json PropagationResult::summary() const {
    Json s = Json::object();
    s["loss_full"] = loss_full;
    s["loss_quantized"] = loss_quantized;
    s["loss_increase"] = loss_quantized - loss_full;
    s["tokens"] = int64_t(tokens);
    double mmr_median = 0, mmr_mean = 0, kurt = 0, mmr_max = 0, kurt_max = 0, g = 0, g1 = 0, g2 = 0, local = 0;
    int linear = 0, gains = 0, median_layers = 0;
    for (const ModuleRecord& r : modules) {
        if (r.module == Module::MlpResidual) s["R_last_block"] = r.R;
        if (r.module == Module::FinalNorm) s["R_final_norm"] = r.R;
        if (r.site < 0) continue;
        ++linear;
        // max/median is left out for the down projections: their inputs (ReLU^2 / GELU outputs)
        // are mostly (near) zero, so the median is ~0 and the ratio says nothing.
        if (r.site != kSiteDown) {
            ++median_layers;
            mmr_median += r.input_mmr_median, mmr_max = std::max(mmr_max, r.input_mmr_median);
        }
        mmr_mean += r.input_mmr_mean, kurt += r.input_kurtosis;
        kurt_max = std::max(kurt_max, r.input_kurtosis);
        local += r.local_error;
        if (r.G >= 0) g += r.G, g1 += r.G1, g2 += r.G2, ++gains;
    }
    if (linear) {
        s["mmr_median_mean"] = median_layers ? mmr_median / median_layers : 0.0;
        s["mmr_mean_mean"] = mmr_mean / linear;
        s["kurtosis_mean"] = kurt / linear;
        s["mmr_median_max"] = mmr_max;
        s["kurtosis_max"] = kurt_max;
        s["local_error_mean"] = local / linear;
    }
    if (gains) {
        s["linear_gain_mean"] = g / gains;
        s["linear_G1_mean"] = g1 / gains;
        s["linear_G2_mean"] = g2 / gains;
    }
    return s;
}

Json PropagationResult::to_json() const {
    Json out = Json::object();
    out["summary"] = summary();
    Json list = Json::array();
    for (const ModuleRecord& r : modules) {
        Json m = Json::object();
        m["layer"] = r.layer;
        m["module"] = module_name(r.module);
        m["R"] = r.R, m["A"] = r.A, m["B"] = r.B, m["C"] = r.C;
        m["G"] = r.G >= 0 ? Json(r.G) : Json(nullptr);
        if (r.site >= 0) {
            // No incoming error (the first layer after the embedding): G2 and cos phi are undefined.
            m["G1"] = r.G1, m["cos_psi"] = r.cos_psi;
            m["G2"] = r.G >= 0 ? Json(r.G2) : Json(nullptr);
            m["cos_phi"] = r.G >= 0 ? Json(r.cos_phi) : Json(nullptr);
            m["local_error"] = r.local_error;
            m["input_mmr_median"] = r.input_mmr_median, m["input_mmr_mean"] = r.input_mmr_mean;
            m["input_kurtosis"] = r.input_kurtosis, m["input_max_abs"] = r.input_max_abs;
            m["weight_kurtosis"] = r.weight_kurtosis, m["weight_mmr_median"] = r.weight_mmr_median;
            m["weight_spectral_norm"] = r.weight_spectral_norm, m["weight_frobenius"] = r.weight_frobenius;
            m["weight_quant_error"] = r.weight_quant_error;
        }
        list.push_back(m);
    }
    out["modules"] = list;
    return out;
}

}  // namespace qopt
