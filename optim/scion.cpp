#include "optim/scion.hpp"

#include "core/error.hpp"

namespace qopt {

ScionNorm parse_scion_norm(const std::string& name) {
    if (name == "spectral") return ScionNorm::Spectral;
    if (name == "sign") return ScionNorm::Sign;
    if (name == "colnorm") return ScionNorm::ColNorm;
    if (name == "rownorm") return ScionNorm::RowNorm;
    if (name == "biasrms") return ScionNorm::BiasRMS;
    fail("unknown Scion norm '", name, "' (known: spectral, sign, colnorm, rownorm, biasrms)");
}

const char* scion_norm_name(ScionNorm norm) {
    switch (norm) {
        case ScionNorm::Spectral: return "spectral";
        case ScionNorm::Sign: return "sign";
        case ScionNorm::ColNorm: return "colnorm";
        case ScionNorm::RowNorm: return "rownorm";
        case ScionNorm::BiasRMS: return "biasrms";
    }
    return "?";
}

void ScionConfig::validate() const {
    QOPT_CHECK(momentum > 0 && momentum <= 1, "--scion-momentum must be in (0, 1], got ", momentum);
    QOPT_CHECK(hidden_scale > 0 && embed_scale > 0 && vector_scale > 0, "Scion scales must be positive");
    QOPT_CHECK(ns_steps > 0, "--scion-ns-steps must be positive");
}

Json ScionConfig::to_json() const {
    Json j = Json::object();
    j["lr"] = lr;
    j["momentum"] = momentum;
    j["unconstrained"] = unconstrained;
    j["hidden_scale"] = hidden_scale;
    j["embed_scale"] = embed_scale;
    j["vector_scale"] = vector_scale;
    j["embed_norm"] = std::string(scion_norm_name(embed_norm));
    j["ns_steps"] = int64_t(ns_steps);
    return j;
}

void scion_lmo_cpu(double* out, const double* m, int rows, int cols, ScionNorm norm, int ns_steps) {
    const size_t n = size_t(rows) * cols;
    const double eps = 1e-8;
    switch (norm) {
        case ScionNorm::Spectral: {
            MuonConfig ns;
            ns.ns_steps = ns_steps;
            newton_schulz_cpu(out, m, rows, cols, ns);
            const double scale = std::sqrt(double(rows) / double(cols));
            for (size_t i = 0; i < n; ++i) out[i] *= scale;
            break;
        }
        case ScionNorm::Sign:
            for (size_t i = 0; i < n; ++i) out[i] = (m[i] > 0 ? 1.0 : m[i] < 0 ? -1.0 : 0.0) / cols;
            break;
        case ScionNorm::ColNorm:
            // Embedding rows are the columns of the [d_model, vocab] map: normalise each stored row
            // to RMS 1 over d_model, i.e. ||row|| = sqrt(cols) (the reference's transpose=True).
            for (int r = 0; r < rows; ++r) {
                double sq = 0;
                for (int c = 0; c < cols; ++c) sq += m[size_t(r) * cols + c] * m[size_t(r) * cols + c];
                const double rms = std::sqrt(sq / cols);
                for (int c = 0; c < cols; ++c) out[size_t(r) * cols + c] = m[size_t(r) * cols + c] / (rms + eps);
            }
            break;
        case ScionNorm::RowNorm:
            for (int r = 0; r < rows; ++r) {
                double sq = 0;
                for (int c = 0; c < cols; ++c) sq += m[size_t(r) * cols + c] * m[size_t(r) * cols + c];
                const double denom = std::sqrt(sq) * std::sqrt(double(cols));
                for (int c = 0; c < cols; ++c) out[size_t(r) * cols + c] = m[size_t(r) * cols + c] / (denom + eps);
            }
            break;
        case ScionNorm::BiasRMS: {
            double sq = 0;
            for (size_t i = 0; i < n; ++i) sq += m[i] * m[i];
            const double rms = std::sqrt(sq / double(n));
            for (size_t i = 0; i < n; ++i) out[i] = m[i] / (rms + eps);
            break;
        }
    }
}

void scion_update_cpu(float* param, const float* grad, float* momentum, int rows, int cols, ScionNorm norm,
                      double scale, double lr, double weight_decay, const ScionConfig& c) {
    const size_t n = size_t(rows) * cols;
    std::vector<double> m(n), d(n);
    for (size_t i = 0; i < n; ++i) {
        momentum[i] = float((1.0 - c.momentum) * double(momentum[i]) + c.momentum * double(grad[i]));
        m[i] = momentum[i];
    }
    scion_lmo_cpu(d.data(), m.data(), rows, cols, norm, c.ns_steps);
    const double keep = c.unconstrained ? 1.0 - lr * weight_decay : 1.0 - lr;
    for (size_t i = 0; i < n; ++i) param[i] = float(double(param[i]) * keep - lr * scale * d[i]);
}

}  // namespace qopt
