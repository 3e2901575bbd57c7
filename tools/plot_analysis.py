#!/usr/bin/env python3
"""Plots one `analyze` result (the JSON it writes): per module R with its parts A (error carried
in), B (error made here) and |C| on a log scale, norms and linear layers marked; and per linear
layer the gain G with its factors G1 (spectral ratio) and G2 (alignment ratio), and the layer's
own PTQ error. Needs matplotlib.

Usage: tools/plot_analysis.py ANALYSIS.json [OUT.png]   (default: ANALYSIS.png beside it)
"""
import json
import os
import sys


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[-1])
    path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) == 3 else os.path.splitext(path)[0] + ".png"
    with open(path) as f:
        result = json.load(f)
    modules = result["modules"]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7))
    x = range(len(modules))
    floor = 1e-8  # log scale: zeros drawn at the floor
    for key, style in (("R", "k-"), ("A", "C0--"), ("B", "C3:")):
        top.plot(x, [max(m[key], floor) for m in modules], style, lw=1, label=key)
    top.plot(x, [max(abs(m["C"]), floor) for m in modules], "C2-.", lw=0.8, label="|C|")
    norms = [i for i, m in enumerate(modules) if m["module"].endswith("norm")]
    linear = [i for i, m in enumerate(modules) if "G1" in m]
    top.scatter(norms, [max(modules[i]["R"], floor) for i in norms], marker="v", color="k", s=12, label="norm outputs")
    top.scatter(linear, [max(modules[i]["R"], floor) for i in linear], marker="o", color="C1", s=10,
                label="linear layers")
    top.set_yscale("log"), top.set_ylabel("relative error"), top.legend(fontsize=7, ncol=3)
    top.set_title(f"{result.get('model', '?')} {result.get('optimizer', '?')}, {result.get('format', '?')}: "
                  "R = A + B + C per module")

    names = [f"{modules[i]['layer']}.{modules[i]['module']}" for i in linear]
    for key, style in (("G", "k-o"), ("G1", "C0-s"), ("G2", "C3-^")):
        values = [modules[i][key] if modules[i][key] is not None else float("nan") for i in linear]
        bottom.plot(range(len(linear)), values, style, ms=3, lw=1, label=key)
    bottom.plot(range(len(linear)), [modules[i]["local_error"] * 10 for i in linear], "C2:", lw=1,
                label="own PTQ error x10")
    bottom.axhline(1, color="gray", lw=0.5)
    bottom.set_xticks(range(len(linear)))
    bottom.set_xticklabels(names, rotation=90, fontsize=6)
    bottom.set_ylabel("gain"), bottom.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
