#!/usr/bin/env python3
"""How far do Shampoo's inverse roots drift between two refreshes, and can a warm start track them?

Reads the Kronecker factors of two Shampoo checkpoints (optimizer.safetensors of refresh steps t
and t + frequency, written by `train --optimizer shampoo`) and compares, for each factor A at the
later step, roots against the exact (A + eps I)^(-1/r) (float64; negative eigenvalues shifted up
to >= 0 first, as the refresh does):

  fp32 eig    an fp32 eigendecomposition of A (what the GPU refresh computes: its own error)
  previous    the exact root of the factor at step t (what every step between refreshes uses)
  kept basis  the eigenbasis X of the step-t factor with A's new eigenvalue estimates
              lambda_i = (X^T A X)_ii (three products, no decomposition)
  one OA step one step of Ogita & Aishima's refinement of X (2018), rotating the pairs with
              |S_ij| <= sqrt(T) |lambda_j - lambda_i|, S = X^T A X, and its per-pair error
              estimate max |S_ij f[mu_i, mu_j]| / f(min(mu_i, mu_j)) over the pairs left alone
              (what qopt's withdrawn --shampoo-refine-tolerance did)
  first order the kept basis plus the first-order (Daleckii-Krein) term of all couplings,
              X (f(Lambda) + F o S_offdiagonal) X^T, F_ij = f[mu_i, mu_j] (divided differences)

f(mu) = mu^(-1/r). Errors: `pair` = max_ij |V^T (root - exact) V|_ij / f(min(mu_i, mu_j)) in A's
exact eigenbasis V (the OA estimate's measure), `fro` = ||root - exact||_F / ||exact||_F.

Needs PyTorch (the GPU machine has it). Example:
  tools/shampoo_root_drift.py runs/s/checkpoints/step_00000200 runs/s/checkpoints/step_00000210
  tools/shampoo_root_drift.py --factors factors.safetensors   (pairs saved by --save-factors)
"""
import argparse
import json
import math
import re
import struct
import sys

import torch


def read_tensors(path, wanted):
    """The float32 tensors of a safetensors file whose names match the regex `wanted`."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        out = {}
        for name, info in header.items():
            if name == "__metadata__" or not re.search(wanted, name):
                continue
            if info["dtype"] != "F32":
                sys.exit(f"{path}: {name} is {info['dtype']}, expected F32")
            begin, end = info["data_offsets"]
            f.seek(base + begin)
            data = bytearray(f.read(end - begin))
            out[name] = torch.frombuffer(data, dtype=torch.float32).reshape(info["shape"]).clone()
        return out


def save_factors(path, old, new):
    """Both checkpoints' matched factors as one safetensors file (<name>@old, <name>@new)."""
    tensors = [(k + "@old", old[k]) for k in sorted(old)] + [(k + "@new", new[k]) for k in sorted(new)]
    header, offset = {}, 0
    for name, t in tensors:
        size = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, t in tensors:
            f.write(t.contiguous().numpy().tobytes())


def shifted(values, eps):
    return values - min(values.min().item(), 0.0) + eps


def divided_differences(mu, r):
    """F_ij = f[mu_i, mu_j] for f(mu) = mu^(-1/r); f'(mu) where the two are (nearly) equal."""
    a, b = mu[:, None], mu[None, :]
    close = (a - b).abs() <= 1e-7 * torch.maximum(a, b)
    middle = 0.5 * (a + b)
    derivative = -(1.0 / r) * middle.pow(-1.0 / r) / middle
    return torch.where(close, derivative, (a.pow(-1.0 / r) - b.pow(-1.0 / r)) / torch.where(close, 1.0, a - b))


def analyse(a_old, a_new, eps, r, tolerance):
    n = a_new.shape[0]
    new64 = a_new.double()
    values, vectors = torch.linalg.eigh(new64)
    mu_exact = shifted(values, eps)
    exact = (vectors * mu_exact.pow(-1.0 / r)) @ vectors.T
    pair_scale = torch.minimum(mu_exact[:, None], mu_exact[None, :]).pow(-1.0 / r)

    def errors(root):
        delta = root - exact
        pair = ((vectors.T @ delta @ vectors).abs() / pair_scale).max().item()
        return pair, (torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(exact)).item()

    def root_from(basis, eigenvalues):
        return (basis * shifted(eigenvalues, eps).pow(-1.0 / r)) @ basis.T

    v32, x32 = torch.linalg.eigh(a_new.float())
    old_values, x = torch.linalg.eigh(a_old.float())
    x, old_values = x.double(), old_values.double()
    previous_values, previous_vectors = torch.linalg.eigh(a_old.double())
    rows = {"fp32 eig": errors(root_from(x32.double(), v32.double())),
            "previous": errors(root_from(previous_vectors, previous_values))}

    s = x.T @ new64 @ x
    gram = x.T @ x
    resid = torch.eye(n, dtype=torch.float64, device=a_new.device) - gram
    lam = torch.diagonal(s) / torch.diagonal(gram)
    mu = shifted(lam, eps)
    rows["kept basis"] = errors(root_from(x, lam))

    gap = lam[None, :] - lam[:, None]
    off = ~torch.eye(n, dtype=torch.bool, device=a_new.device)
    rotate = off & (s.abs() <= math.sqrt(tolerance) * gap.abs())
    e = torch.where(rotate, (s + lam[None, :] * resid) / torch.where(rotate, gap, 1.0), resid / 2)
    rows["one OA step"] = errors(root_from(x + x @ e, lam))
    rounding = 2.0 * math.sqrt(n) * 2.0 ** -24 * lam.abs().max().item()
    fdiv = divided_differences(mu, r)
    left_alone = off & ~rotate & (s.abs() > rounding)
    fmin = torch.minimum(mu[:, None], mu[None, :]).pow(-1.0 / r)
    oa_estimate = ((s.abs() * fdiv.abs() / fmin) * left_alone).max().item()

    # First order in the couplings C = S_offdiagonal + (lambda_i + lambda_j) R_ij / 2 (the
    # orthogonalising half step X (I + R/2)).
    coupling = torch.where(off, s + 0.5 * (lam[:, None] + lam[None, :]) * resid, torch.zeros_like(s))
    y = x + 0.5 * x @ resid
    rows["first order"] = errors(y @ (torch.diag(mu.pow(-1.0 / r)) + fdiv * coupling) @ y.T)
    return rows, oa_estimate, (mu_exact.max() / mu_exact.min()).item(), rotate.sum().item() / off.sum().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old", nargs="?", help="checkpoint directory at a refresh step t")
    p.add_argument("new", nargs="?", help="checkpoint directory at the next refresh, t + frequency")
    p.add_argument("--factors", help="instead of two checkpoints: a file written by --save-factors")
    p.add_argument("--match", default=r"layers\.(0|5|11)\.(attn\.qkv\.weight\.q|attn\.out\.weight|mlp\.up\.weight|mlp\.down\.weight)\.block0\.(left|right)$",
                   help="regex of the factor names to analyse")
    p.add_argument("--eps", type=float, default=1e-12, help="--shampoo-eps of the run")
    p.add_argument("--root", type=int, default=4, help="inverse root exponent r")
    p.add_argument("--tolerance", type=float, default=0.01, help="T of the OA step's rotation rule")
    p.add_argument("--save-factors", help="also write the matched factors of both steps to this safetensors file")
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.factors:
        saved = read_tensors(args.factors, ".")
        old = {k[:-4]: v for k, v in saved.items() if k.endswith("@old")}
        new = {k[:-4]: v for k, v in saved.items() if k.endswith("@new")}
        origin = args.factors
    elif args.old and args.new:
        old = read_tensors(args.old + "/optimizer.safetensors", args.match)
        new = read_tensors(args.new + "/optimizer.safetensors", args.match)
        origin = f"{args.old} and {args.new}"
    else:
        sys.exit("give two checkpoint directories or --factors FILE")
    if not old or set(old) != set(new):
        sys.exit(f"no common factors (matching {args.match!r}) in {origin}")
    if args.save_factors:
        save_factors(args.save_factors, old, new)
    labels = ["fp32 eig", "previous", "kept basis", "one OA step", "first order"]
    print(f"errors pair / fro (see --help); OA step with T = {args.tolerance}")
    print(f"{'factor':44s} {'n':>5s} {'cond':>8s} " + " ".join(f"{l:>17s}" for l in labels) + f" {'OA est':>8s} {'rot%':>5s}")
    worst = {l: [0.0, 0.0] for l in labels}
    for name in sorted(old):
        rows, estimate, cond, rotated = analyse(old[name].to(dev), new[name].to(dev), args.eps, args.root, args.tolerance)
        short = name.replace(".weight", "").replace("layers.", "")
        print(f"{short:44s} {old[name].shape[0]:5d} {cond:8.1e} "
              + " ".join(f"{rows[l][0]:8.1e}/{rows[l][1]:8.1e}" for l in labels) + f" {estimate:8.1e} {100 * rotated:5.1f}")
        for l in labels:
            worst[l] = [max(worst[l][0], rows[l][0]), max(worst[l][1], rows[l][1])]
    print(f"{'largest':44s} {'':5s} {'':8s} " + " ".join(f"{worst[l][0]:8.1e}/{worst[l][1]:8.1e}" for l in labels))


if __name__ == "__main__":
    main()
