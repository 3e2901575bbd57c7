// Scion (LIONS-EPFL/scion, "Training Deep Learning Models with Norm-Constrained LMOs"), CPU
// reference. Each tensor has a norm whose linear minimisation oracle (LMO) gives the step
// direction d = lmo(M) for the momentum M:
//   Spectral  NS5(M) * sqrt(d_out / d_in)          hidden matrices (M's spectral norm direction)
//   Sign      sign(M) / d_in                       embeddings and the tied head
//   ColNorm   M[:, j] * sqrt(d_out) / ||M[:, j]||  (rows of the stored embedding: transpose)
//   RowNorm   M[i, :] / (||M[i, :]|| sqrt(d_in))
//   BiasRMS   M / rms(M)                           norm gains and biases (1-D)
// The reference's momentum is "one minus the usual momentum": M = (1 - a) M + a G with
// a = 0.1 by default. Update (constrained, the default): W = (1 - lr) W - lr * scale * d, which
// keeps ||W|| <= scale in the chosen norm; unconstrained: W = W - lr * scale * d (then the
// shared --weight-decay applies as W *= 1 - lr * wd).
#pragma once
#include <cmath>
#include <string>
#include <vector>

#include "core/json.hpp"
#include "optim/muon.hpp"

namespace qopt {

enum class ScionNorm { Spectral, Sign, ColNorm, RowNorm, BiasRMS };
ScionNorm parse_scion_norm(const std::string& name);
const char* scion_norm_name(ScionNorm norm);
// Whether the LMO of a block of rows is that block of the whole tensor's LMO, given the same
// d_in: Sign, RowNorm and ColNorm (which, on the stored embedding, normalises each stored row), so
// their rows can be updated apart (e.g. by different ranks); not BiasRMS or Spectral.
inline bool scion_rows_separable(ScionNorm norm) {
    return norm == ScionNorm::Sign || norm == ScionNorm::RowNorm || norm == ScionNorm::ColNorm;
}

struct ScionConfig {
    double lr = 0.000244140625;  // 2^-12, the reference's nanoGPT setting
    double momentum = 0.1;       // a in M = (1 - a) M + a G
    bool unconstrained = false;
    double hidden_scale = 50.0;   // radius of the hidden matrices (the reference's nanoGPT radius)
    double embed_scale = 3000.0;  // radius * 60 for the tied embedding/head, as the reference
    double vector_scale = 1.0;    // norm gains and biases (BiasRMS); 1 keeps gains near their init
    ScionNorm embed_norm = ScionNorm::Sign;
    int ns_steps = 5;
    void validate() const;
    Json to_json() const;
};

// out = lmo(m) for an [rows, cols] tensor (rows = d_out, cols = d_in; 1-D: rows = 1).
void scion_lmo_cpu(double* out, const double* m, int rows, int cols, ScionNorm norm, int ns_steps);

// One Scion step on one tensor; momentum holds M.
void scion_update_cpu(float* param, const float* grad, float* momentum, int rows, int cols, ScionNorm norm,
                      double scale, double lr, double weight_decay, const ScionConfig& c);

}  // namespace qopt
