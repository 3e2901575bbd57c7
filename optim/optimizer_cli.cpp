#include "optim/optimizer_cli.hpp"

namespace qopt {

namespace {

// The choice among `choices` whose name_of(choice) is `value`, or a CLI error naming the flag and
// every name.
template <typename Choice, typename NameOf>
Choice parse_choice(const std::string& value, std::initializer_list<Choice> choices, NameOf name_of,
                    const char* flag) {
    std::string names;
    for (Choice choice : choices) {
        if (value == name_of(choice)) return choice;
        names += (names.empty() ? "" : ", ") + std::string(name_of(choice));
    }
    throw CLI::ValidationError(flag, "must be one of " + names);
}

}  // namespace

void add_optimizer_flags(CLI::App& app, std::string& name, OptimizerConfig& c) {
    const char* g = "Optimizer";
    app.add_option("--optimizer", name, "adamw, muon, scion, shampoo, soap or psgd (routing: see README)")->group(g);
    app.add_option("--lr", c.lr,
                   "Peak learning rate of the method (0: its reference default: adamw 1e-3, muon 0.02, scion 2^-12, "
                   "shampoo 1e-3, soap 3e-3, psgd 3e-4)")
        ->group(g);
    app.add_option("--adamw-lr", c.adamw_lr,
                   "Peak learning rate of the AdamW that updates the tensors the method does not (0: 3e-4)")
        ->group(g);
    app.add_option("--beta1", c.adamw.beta1, "AdamW beta1")->group(g);
    app.add_option("--beta2", c.adamw.beta2, "AdamW beta2")->group(g);
    app.add_option("--adam-eps", c.adamw.eps, "AdamW epsilon")->group(g);
    app.add_option("--weight-decay", c.adamw.weight_decay,
                   "Decoupled weight decay for every method, W *= 1 - lr wd (2-D tensors only)")
        ->group(g);
    app.add_flag("--precond-tf32", c.precond_tf32,
                 "GPU: run Shampoo's, SOAP's and PSGD's fp32 matrix products on TF32 tensor cores (about 4x faster, "
                 "10-bit mantissa inputs; default: full fp32 as the references)")
        ->group(g);

    const char* m = "Muon";
    app.add_option("--muon-momentum", c.muon.momentum, "Muon momentum")->group(m);
    app.add_option("--muon-nesterov", c.muon.nesterov, "Muon Nesterov momentum (true/false)")->group(m);
    app.add_option("--muon-ns-steps", c.muon.ns_steps, "Newton-Schulz iterations")->group(m);
    app.add_option("--muon-ns-a", c.muon.ns_a, "Newton-Schulz quintic coefficient a")->group(m);
    app.add_option("--muon-ns-b", c.muon.ns_b, "Newton-Schulz quintic coefficient b")->group(m);
    app.add_option("--muon-ns-c", c.muon.ns_c, "Newton-Schulz quintic coefficient c")->group(m);

    const char* s = "Scion";
    app.add_option("--scion-momentum", c.scion.momentum,
                   "Scion momentum as the reference defines it: M = (1 - a) M + a G (a = 1 - the usual momentum)")
        ->group(s);
    app.add_flag("--scion-unconstrained", c.scion.unconstrained,
                 "Unconstrained Scion (W -= lr scale d, with --weight-decay) instead of W = (1 - lr) W - lr scale d")
        ->group(s);
    app.add_option("--scion-hidden-scale", c.scion.hidden_scale, "Radius of the hidden matrices (spectral LMO)")->group(s);
    app.add_option("--scion-embed-scale", c.scion.embed_scale, "Radius of the (tied) embedding")->group(s);
    app.add_option("--scion-vector-scale", c.scion.vector_scale, "Radius of norm gains and biases (BiasRMS LMO)")
        ->group(s);
    app.add_option_function<std::string>(
           "--scion-embed-norm", [&c](const std::string& v) { c.scion.embed_norm = parse_scion_norm(v); },
           "LMO of the embeddings: sign (default, as the reference's tied head), colnorm or rownorm")
        ->group(s);
    app.add_option("--scion-ns-steps", c.scion.ns_steps, "Newton-Schulz iterations of the spectral LMO")->group(s);

    const char* h = "Shampoo";
    app.add_option("--shampoo-beta1", c.shampoo.beta1, "Filtered-gradient EMA")->group(h);
    app.add_option("--shampoo-beta2", c.shampoo.beta2, "Factor EMA (1: sum, the reference's default)")->group(h);
    app.add_option("--shampoo-eps", c.shampoo.eps, "Added to the factors' eigenvalues before the inverse root")
        ->group(h);
    app.add_option("--shampoo-momentum", c.shampoo.momentum,
                   "Heavy-ball momentum on the update, weight decay included (the reference's ClassicMomentumConfig)")
        ->group(h);
    app.add_option("--shampoo-nesterov", c.shampoo.nesterov, "Nesterov form of that momentum (true/false)")->group(h);
    app.add_option("--shampoo-dampening", c.shampoo.dampening,
                   "Dampening d of that momentum: K = mu K + (1 - d) D (ClassicMomentumConfig.dampening)")
        ->group(h);
    app.add_option("--shampoo-beta3", c.shampoo.beta3,
                   "Weight of the step's own filtered gradient, D = b3 F + (1 - b3) G (-1: beta1, the reference's "
                   "default; b3 = beta1^2 gives a NAdam-like step)")
        ->group(h);
    app.add_option("--shampoo-bias-correction", c.shampoo.bias_correction,
                   "Divide the filtered gradient by 1 - beta3 beta1^(t-1) (true/false; use_bias_correction)")
        ->group(h);
    app.add_option_function<std::string>(
           "--shampoo-weight-decay-type",
           [&c](const std::string& v) {
               c.shampoo.decay_type = parse_choice(
                   v, {ShampooDecay::l2, ShampooDecay::decoupled, ShampooDecay::corrected, ShampooDecay::independent},
                   shampoo_decay_name, "--shampoo-weight-decay-type");
           },
           "Where --weight-decay enters (weight_decay_type): l2 (into the gradient, before the factors), decoupled "
           "(the default: alpha = wd, into the direction), corrected (alpha = wd lr / peak lr) or independent "
           "(alpha = wd / peak lr)")
        ->group(h);
    app.add_option("--shampoo-block-size", c.shampoo.block_size, "Max preconditioner dimension (blocking)")->group(h);
    app.add_option("--shampoo-precondition-frequency", c.shampoo.precondition_frequency,
                   "Steps between inverse-root computations (the reference's default is 1; 10 as the study)")
        ->group(h);
    app.add_option("--shampoo-start-step", c.shampoo.start_preconditioning_step,
                   "First step that uses Shampoo's direction (-1: the precondition frequency)")
        ->group(h);
    app.add_option("--shampoo-inverse-root", c.shampoo.inverse_root, "r in L^(-1/r) (0: 4 for matrices)")->group(h);
    app.add_option_function<std::string>(
           "--shampoo-grafting",
           [&c](const std::string& v) {
               c.shampoo.grafting =
                   parse_choice(v, {ShampooGrafting::adam, ShampooGrafting::rmsprop, ShampooGrafting::adagrad,
                                    ShampooGrafting::sgd, ShampooGrafting::none},
                                shampoo_grafting_name, "--shampoo-grafting");
           },
           "Grafting (grafting_config): adam (default, the study's), rmsprop, adagrad, sgd or none (the reference's "
           "default)")
        ->group(h);
    app.add_option("--shampoo-graft-beta2", c.shampoo.graft_beta2,
                   "Grafting beta2 of adam and rmsprop (the reference's defaults: 0.999, 0.99)")
        ->group(h);
    app.add_option("--shampoo-graft-eps", c.shampoo.graft_eps,
                   "Grafting epsilon of adam, rmsprop and adagrad (the reference's default: 1e-10)")
        ->group(h);
    app.add_option("--shampoo-graft-drop-weighting", c.shampoo.graft_drop_weighting,
                   "rmsprop/adam grafting: V = beta2 V + G^2, no bias correction (drop_weighting_factor_on_gsquare; "
                   "true/false)")
        ->group(h);
    app.add_option_function<std::string>(
           "--shampoo-eigen-method",
           [&c](const std::string& v) {
               c.shampoo.eigen_method = parse_choice(v, {ShampooEigenMethod::eigh, ShampooEigenMethod::qr},
                                                     shampoo_eigen_method_name, "--shampoo-eigen-method");
           },
           "How a refresh computes the factors' eigendecompositions (the reference's amortized_computation_config): "
           "eigh (default: a full symmetric eigendecomposition) or qr (the QR algorithm from the eigenbasis kept "
           "since the last refresh, QREigendecompositionConfig)")
        ->group(h);
    app.add_option("--shampoo-eigen-tolerance", c.shampoo.eigen_tolerance,
                   "Keep the last eigenbasis V while ||B - diag(B)||_F <= T ||B||_F for B = V^T L V (eigh: skip the "
                   "eigendecomposition and take diag(B); qr: stop iterating); 0: never (the reference's default). "
                   "Above 0 or with qr the eigenbasis is kept in the state")
        ->group(h)
        ->capture_default_str();
    app.add_option("--shampoo-qr-iterations", c.shampoo.qr_iterations,
                   "qr: at most this many QR-algorithm steps per refresh (QREigendecompositionConfig.max_iterations)")
        ->group(h)
        ->capture_default_str();
    app.add_option("--shampoo-refresh-lag", c.shampoo.refresh_lag,
                   "Steps from a refresh to its roots taking effect; 0: at once (the reference). K > 0 (below the "
                   "steps between refreshes; eigh without tolerance only): the GPU computes the roots on a side "
                   "stream during the next K steps, and Shampoo's direction starts K steps after the start step")
        ->group(h)
        ->capture_default_str();

    const char* p = "SOAP";
    app.add_option("--soap-beta1", c.soap.beta1, "Adam beta1 in the eigenbasis")->group(p);
    app.add_option("--soap-beta2", c.soap.beta2, "Adam beta2 in the eigenbasis")->group(p);
    app.add_option("--soap-shampoo-beta", c.soap.shampoo_beta, "Factor EMA (< 0: --soap-beta2)")->group(p);
    app.add_option("--soap-eps", c.soap.eps, "Adam epsilon")->group(p);
    app.add_option("--soap-precondition-frequency", c.soap.precondition_frequency, "Steps between eigenbasis refreshes")
        ->group(p);
    app.add_option("--soap-max-precond-dim", c.soap.max_precond_dim,
                   "Largest preconditioned dimension: a longer side gets no factor (identity basis)")
        ->group(p);
    app.add_option("--soap-merge-dims", c.soap.merge_dims,
                   "Precondition a matrix of at most --soap-max-precond-dim values as one dimension (true/false; CPU only)")
        ->group(p);
    app.add_option("--soap-normalize-grads", c.soap.normalize_grads, "Normalise each update to RMS 1 (true/false)")
        ->group(p);
    app.add_option("--soap-correct-bias", c.soap.correct_bias, "Adam bias correction (true/false)")->group(p);

    const char* k = "PSGD";
    app.add_option("--psgd-beta1", c.psgd.beta1, "Momentum")->group(k);
    app.add_option("--psgd-precond-lr", c.psgd.precond_lr, "Preconditioner learning rate")->group(k);
    app.add_option("--psgd-precond-init-scale", c.psgd.precond_init_scale, "Initial preconditioner scale")->group(k);
    app.add_option("--psgd-update-prob-max", c.psgd.update_prob_max, "Update probability before the anneal")->group(k);
    app.add_option("--psgd-update-prob-min", c.psgd.update_prob_min, "Update probability floor")->group(k);
    app.add_option("--psgd-update-prob-decay", c.psgd.update_prob_decay, "Exponential anneal rate per step")->group(k);
    app.add_option("--psgd-update-prob-flat-start", c.psgd.update_prob_flat_start, "Steps at the maximum probability")
        ->group(k);
    app.add_option("--psgd-max-size-triangular", c.psgd.max_size_triangular,
                   "Largest dimension with a triangular factor (larger ones get a diagonal factor)")
        ->group(k);
    app.add_option("--psgd-min-ndim-triangular", c.psgd.min_ndim_triangular,
                   "Fewest tensor dimensions for triangular factors (above 2: every matrix's factors are diagonal)")
        ->group(k);
    app.add_option("--psgd-memory-save-mode", c.psgd.memory_save_mode,
                   "Diagonal factors to save memory: none, smart_one_diag (the larger dimension, if strictly "
                   "larger), one_diag (the larger; the right one of a square matrix), all_diag")
        ->check(CLI::IsMember(kPsgdMemorySaveModes))
        ->group(k);
    app.add_option("--psgd-momentum-into-precond-update", c.psgd.momentum_into_precond_update,
                   "Fit the preconditioner to the momentum instead of the gradient (true/false)")
        ->group(k);
    app.add_option("--psgd-balance-prob", c.psgd.balance_probability,
                   "Probability of rebalancing the factors' norms on a preconditioner update")
        ->group(k);
    app.add_option("--psgd-seed", c.psgd.seed, "Seed of the random probes and rebalancing draws")->group(k);
}

}  // namespace qopt
