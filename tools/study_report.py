#!/usr/bin/env python3
"""Tables and plots of a sweep (tools/sweep.py): full-precision and QAT validation loss per
optimizer and model size, PTQ degradation per configuration, the analysis metrics next to the
degradation with their correlation across checkpoints, scaling-law fits (tools/scaling_fit.py),
and PNG figures. Needs numpy, scipy and matplotlib (Debian: python3-numpy python3-scipy
python3-matplotlib).

Usage: tools/study_report.py SWEEP_OUT_DIR [--figures DIR] [--markdown FILE]
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scaling_fit  # noqa: E402

METRICS = [("mmr_median_mean", "MMR max/median"), ("mmr_mean_mean", "MMR max/mean"), ("kurtosis_mean", "kurtosis"),
           ("linear_gain_mean", "mean linear gain G"), ("R_last_block", "R last block"),
           ("R_final_norm", "R final norm")]


def load_rows(out_dir):
    path = os.path.join(out_dir, "results.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ptq_tag(row):
    q = row["quant"]
    return f"{row['method']} {row['format']}" + (f" H{q['hadamard_block']}" if q.get("hadamard_block") else "")


def spearman(x, y):
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--figures", default=None, help="where PNGs go (default OUT_DIR/report)")
    parser.add_argument("--markdown", default=None, help="write the tables here too")
    args = parser.parse_args()
    rows = load_rows(args.out_dir)
    figures = args.figures or os.path.join(args.out_dir, "report")
    os.makedirs(figures, exist_ok=True)
    lines = []

    def emit(text=""):
        lines.append(text)
        print(text)

    evals = {r["run"]: r for r in rows if r["job"] == "eval"}
    analyses = {r["run"]: r for r in rows if r["job"] == "analyze"}
    ptqs = [r for r in rows if r["job"] == "ptq" and r.get("protocol", "budget") == "budget"]
    cl_ptqs = [r for r in rows if r["job"] == "ptq" and r.get("protocol") == "common_loss"]
    trains = [r for r in rows if r["job"] == "train"]
    size_of = {}
    for r in list(evals.values()) + list(analyses.values()):
        size_of[r["model_name"]] = r.get("non_embedding_parameters", r.get("parameters"))
    models = sorted(size_of, key=lambda m: size_of[m])
    optimizers = sorted({r["optimizer"] for r in rows})
    qats = sorted({r["qat"] for r in rows if r["qat"] != "off"})

    def run_of(model, optimizer, qat):
        for name, r in evals.items():
            if r["model_name"] == model and r["optimizer"] == optimizer and r["qat"] == qat:
                return name
        return None

    # Table 1: validation loss, full precision and QAT.
    emit("| model | non-emb. params | optimizer | val loss bf16 | " + " | ".join(f"QAT {q} (increase)" for q in qats)
         + " |")
    emit("|---|---|---|---|" + "---|" * len(qats))
    for m in models:
        for o in optimizers:
            fp = run_of(m, o, "off")
            if not fp:
                continue
            cells = [f"{evals[fp]['val_loss']:.4f}"]
            for q in qats:
                qr = run_of(m, o, q)
                cells.append(f"{evals[qr]['val_loss']:.4f} ({evals[qr]['val_loss'] - evals[fp]['val_loss']:+.4f})"
                             if qr else "-")
            emit(f"| {m} | {size_of[m]:,} | {o} | " + " | ".join(cells) + " |")
    emit()

    # Table 2: PTQ degradation (val-loss increase) per configuration.
    tags = sorted({ptq_tag(r) for r in ptqs})
    emit("| model | optimizer | " + " | ".join(f"PTQ {t}" for t in tags) + " |")
    emit("|---|---|" + "---|" * len(tags))
    increase = {}
    for r in ptqs:
        increase[(r["model_name"], r["optimizer"], ptq_tag(r))] = r["loss_increase"]
    for m in models:
        for o in optimizers:
            if (m, o, tags[0]) not in increase:
                continue
            emit(f"| {m} | {o} | " + " | ".join(f"{increase.get((m, o, t), float('nan')):+.4f}" for t in tags) + " |")
    emit()

    # Table 2b: PTQ at a common loss (the paper's CL protocol).
    if cl_ptqs:
        cl_tags = sorted({ptq_tag(r) for r in cl_ptqs})
        budget_steps = {(r["model_name"], r["optimizer"], r["seed"]): r["steps"] for r in trains
                        if r.get("protocol", "budget") == "budget" and r["qat"] == "off"}
        cl_train = {(r["model_name"], r["optimizer"], r["seed"]): r for r in trains if r.get("protocol") == "common_loss"}
        cl_increase = {(r["model_name"], r["optimizer"], r["seed"], ptq_tag(r)): r for r in cl_ptqs}
        emit("PTQ at a common loss (CL): each optimizer's full-precision run trained again until its validation loss "
             "reached the model's target (the largest of the optimizers' best losses; same schedule, stopped early), "
             "then quantized:")
        emit()
        emit("| model | seed | target | optimizer | steps (of budget) | val loss | " +
             " | ".join(f"PTQ {t}" for t in cl_tags) + " |")
        emit("|---|---|---|---|---|---|" + "---|" * len(cl_tags))
        for m in models:
            for key in sorted(k for k in cl_train if k[0] == m):
                tr = cl_train[key]
                cells = []
                for t in cl_tags:
                    r = cl_increase.get(key + (t,))
                    cells.append(f"{r['loss_increase']:+.4f}" if r else "-")
                emit(f"| {m} | {key[2]} | {tr.get('target_loss', float('nan')):.4f} | {key[1]} | "
                     f"{tr['steps']} ({budget_steps.get(key, '?')}) | {tr['val_loss']:.4f} | " + " | ".join(cells) + " |")
        emit()
        emit("Mean PTQ increase per optimizer over the models, at the common loss vs at the full budget:")
        emit()
        emit("| optimizer | " + " | ".join(f"{t} CL | {t} budget" for t in cl_tags) + " |")
        emit("|---|" + "---|---|" * len(cl_tags))
        for o in optimizers:
            cells = []
            for t in cl_tags:
                at_cl = [r["loss_increase"] for k, r in cl_increase.items() if k[1] == o and k[3] == t]
                at_budget = [v for (m, oo, tt), v in increase.items() if oo == o and tt == t]
                cells += [f"{np.mean(at_cl):+.4f}" if at_cl else "-", f"{np.mean(at_budget):+.4f}" if at_budget else "-"]
            if any(c != "-" for c in cells):
                emit(f"| {o} | " + " | ".join(cells) + " |")
        emit()

    # Table 3: analysis metrics with the PTQ degradation of the analysed format, and correlations.
    if analyses:
        first = next(iter(analyses.values()))
        analysed_tag = f"rtn {first['format']}" + (f" H{first['quant']['hadamard_block']}"
                                                    if first["quant"].get("hadamard_block") else "")
        emit(f"Analysis (RTN {first['format']}, calibration tokens) next to the PTQ increase of {analysed_tag}:")
        emit()
        emit("| model | optimizer | " + " | ".join(label for _, label in METRICS) + " | PTQ increase |")
        emit("|---|---|" + "---|" * (len(METRICS) + 1))
        points = []
        for m in models:
            for o in optimizers:
                name = run_of(m, o, "off")
                if name not in analyses or (m, o, analysed_tag) not in increase:
                    continue
                a = analyses[name]
                values = [a.get(k, float("nan")) for k, _ in METRICS]
                points.append((m, o, values, increase[(m, o, analysed_tag)]))
                emit(f"| {m} | {o} | " + " | ".join(f"{v:.4g}" for v in values) + f" | {points[-1][3]:+.4f} |")
        emit()
        if len(points) >= 3:
            y = np.array([p[3] for p in points])
            emit(f"Correlation with the PTQ loss increase across {len(points)} checkpoints "
                 "(all sizes and optimizers pooled; the paper correlates with accuracy, so its signs flip):")
            emit()
            emit("| metric | Pearson | Spearman |")
            emit("|---|---|---|")
            for i, (_, label) in enumerate(METRICS):
                x = np.array([p[2][i] for p in points])
                ok = np.isfinite(x)
                if ok.sum() >= 3:
                    emit(f"| {label} | {np.corrcoef(x[ok], y[ok])[0, 1]:+.2f} | {spearman(x[ok], y[ok]):+.2f} |")
            emit()

    # Scaling fits.
    fits = {}
    emit("Scaling fits, L(N) = A / N^alpha + E per optimizer (N: non-embedding parameters), and the QAT runs' "
         "parameter efficiency rho (L = A / (rho N)^alpha + E, same A, alpha, E):")
    emit()
    emit("| optimizer | A | alpha | E | " + " | ".join(f"rho {q} (95% CI)" for q in qats) + " |")
    emit("|---|---|---|---|" + "---|" * len(qats))
    for o in optimizers:
        pts = [(size_of[m], evals[run_of(m, o, "off")]["val_loss"]) for m in models if run_of(m, o, "off")]
        if len(pts) < 3:
            continue
        fit = scaling_fit.fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        if fit is None:
            emit(f"| {o} | fit did not converge | | |" + " |" * len(qats))
            continue
        fits[o] = fit
        cells = []
        for q in qats:
            qp = [(size_of[m], evals[run_of(m, o, q)]["val_loss"]) for m in models if run_of(m, o, q)]
            rho = scaling_fit.fit_rho(fit, [p[0] for p in qp], [p[1] for p in qp]) if qp else None
            fits[(o, q)] = rho
            cells.append(f"{rho[0]:.3f} ({rho[1]:.3f}..{rho[2]:.3f})" if rho else "-")
        emit(f"| {o} | {fit['A']:.3g} | {fit['alpha']:.3f} | {fit['E']:.3f} | " + " | ".join(cells) + " |")
    emit()

    plot(args.out_dir, rows, evals, analyses, increase, models, optimizers, qats, size_of, fits, figures,
         analysed_tag if analyses else None)
    emit(f"Figures: {figures}/")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


def plot(out_dir, rows, evals, analyses, increase, models, optimizers, qats, size_of, fits, figures, analysed_tag):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {o: c for o, c in zip(sorted(optimizers), plt.rcParams["axes.prop_cycle"].by_key()["color"])}
    largest = models[-1]

    def run_name(m, o, q):
        for name, r in evals.items():
            if r["model_name"] == m and r["optimizer"] == o and r["qat"] == q:
                return name
        return None

    # 1. Loss curves of the largest model.
    fig, ax = plt.subplots(figsize=(6, 4))
    for o in optimizers:
        for q, style in [("off", "-")] + [(q, "--") for q in qats]:
            name = run_name(largest, o, q)
            if not name:
                continue
            path = os.path.join(out_dir, "runs", name, "metrics.jsonl")
            steps, losses = [], []
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    if r.get("type") == "train":
                        steps.append(r["step"]), losses.append(r["loss"])
            if not losses:
                continue
            k = max(1, min(20, len(losses) // 5))  # moving average
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, style, color=colors[o], label=f"{o} {'bf16' if q == 'off' else 'QAT ' + q}")
    ax.set_xlabel("step"), ax.set_ylabel("train loss (moving average)"), ax.set_title(f"{largest}: training loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], 8))
    ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(os.path.join(figures, "loss_curves.png"), dpi=110), plt.close(fig)

    # 2. PTQ degradation per optimizer and size.
    tags = sorted({t for (_, _, t) in increase})
    fig, axes = plt.subplots(1, len(tags), figsize=(4 * len(tags), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tags):
        for o in optimizers:
            xs = [size_of[m] for m in models if (m, o, t) in increase]
            ys = [increase[(m, o, t)] for m in models if (m, o, t) in increase]
            ax.plot(xs, ys, "o-", color=colors[o], label=o)
        ax.set_xscale("log"), ax.set_title(f"PTQ {t}"), ax.set_xlabel("non-embedding parameters")
        ax.axhline(0, color="gray", lw=0.5)
    axes[0][0].set_ylabel("val loss increase"), axes[0][0].legend(fontsize=8)
    fig.tight_layout(), fig.savefig(os.path.join(figures, "ptq_degradation.png"), dpi=110), plt.close(fig)

    # 3. Metrics against degradation.
    if analyses and analysed_tag:
        keys = [("mmr_mean_mean", "MMR (max/mean)"), ("kurtosis_mean", "kurtosis"), ("R_final_norm", "R (final norm)")]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for ax, (k, label) in zip(axes, keys):
            for m in models:
                for o in optimizers:
                    name = run_name(m, o, "off")
                    if name in analyses and (m, o, analysed_tag) in increase:
                        ax.scatter(analyses[name][k], increase[(m, o, analysed_tag)], color=colors[o],
                                   s=15 + 25 * models.index(m), label=o if m == largest else None)
            ax.set_xlabel(label)
        axes[0].set_ylabel(f"PTQ {analysed_tag} loss increase"), axes[0].legend(fontsize=8)
        fig.tight_layout(), fig.savefig(os.path.join(figures, "metrics_vs_degradation.png"), dpi=110), plt.close(fig)

        # 4. R per module through the largest model.
        fig, ax = plt.subplots(figsize=(9, 3.8))
        for o in optimizers:
            name = run_name(largest, o, "off")
            path = os.path.join(out_dir, "runs", name or "", "analysis.json")
            if not name or not os.path.exists(path):
                continue
            with open(path) as f:
                modules = json.load(f)["modules"]
            ax.plot(range(len(modules)), [mm["R"] for mm in modules], "-", color=colors[o], label=o, lw=1)
            norms = [i for i, mm in enumerate(modules) if mm["module"].endswith("norm")]
            ax.scatter(norms, [modules[i]["R"] for i in norms], color=colors[o], s=10, marker="v")
        ax.set_yscale("log"), ax.set_xlabel("module (chain order; triangles: RMSNorm outputs)"), ax.set_ylabel("R")
        ax.set_title(f"{largest}: relative error R through the network (RTN W4A4)"), ax.legend(fontsize=8)
        fig.tight_layout(), fig.savefig(os.path.join(figures, "error_propagation.png"), dpi=110), plt.close(fig)

    # 5. Scaling fits.
    fig, ax = plt.subplots(figsize=(6, 4))
    for o in optimizers:
        if o not in fits:
            continue
        xs = np.array([size_of[m] for m in models if run_name(m, o, "off")])
        ax.scatter(xs, [evals[run_name(m, o, "off")]["val_loss"] for m in models if run_name(m, o, "off")],
                   color=colors[o], s=14)
        grid = np.geomspace(xs.min() * 0.8, xs.max() * 1.25, 50)
        ax.plot(grid, scaling_fit.predict(fits[o], grid), "-", color=colors[o], lw=1, label=f"{o} bf16")
        for q in qats:
            qx = [size_of[m] for m in models if run_name(m, o, q)]
            ax.scatter(qx, [evals[run_name(m, o, q)]["val_loss"] for m in models if run_name(m, o, q)],
                       color=colors[o], marker="x", s=18)
            rho = fits.get((o, q))
            if rho:
                ax.plot(grid, scaling_fit.predict(fits[o], grid * rho[0]), "--", color=colors[o], lw=1,
                        label=f"{o} QAT {q}, rho={rho[0]:.2f}")
    ax.set_xscale("log"), ax.set_xlabel("non-embedding parameters"), ax.set_ylabel("val loss")
    ax.legend(fontsize=7), ax.set_title("L(N) = A/(rho N)^alpha + E")
    fig.tight_layout(), fig.savefig(os.path.join(figures, "scaling_fits.png"), dpi=110), plt.close(fig)


if __name__ == "__main__":
    main()
