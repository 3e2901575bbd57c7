#!/usr/bin/env python3
"""Compare qopt's optimizers with their published reference implementations.

For each optimizer: random matrices (square, tall, wide) and a sequence of random gradients
are written to a safetensors file; `optim_replay` applies the steps (CPU reference, and the
GPU too with --device cuda); the reference implementation, imported from
--refs (a folder holding the references' own files: muon.py from KellerJordan/Muon,
scion.py from LIONS-EPFL/scion, soap.py from nikhilvyas/SOAP, kron.py from
evanatyourservice/kron_torch, and the package folder distributed_shampoo/ from
facebookresearch/optimizers; they are not part of qopt), applies the same steps in PyTorch.
The verdict compares each tensor's total change ||dW_qopt - dW_ref|| / ||dW_ref||.

Shampoo runs twice: "shampoo" (Adam grafting, uneven blocks of 40, roots every 4 steps,
decoupled weight decay) and "shampoo_momentum" (no grafting, EMA factors, Nesterov momentum
through which the weight decay passes, start step 6: roots at 6, 8, 12); and, as "shampoo" but
with the reference's EigendecomposedShampooPreconditionerConfig, "shampoo_eigen_tolerance" (eigh
at tolerance 1: the identity basis is always within it, so the roots come from the factors'
diagonals) and "shampoo_qr" (QREigendecompositionConfig, 3 QR-algorithm steps per refresh from
the kept basis); and "shampoo_options" (as "shampoo", with beta3 0.81, no bias correction, l2
weight decay and Nesterov momentum 0.5 dampened by 0.3) and "shampoo_independent_decay" (as
"shampoo", weight_decay_type INDEPENDENT: alpha = wd / lr = 0.1 with wd 1e-4, ten times the
decoupled alpha of "shampoo"); and "shampoo_rmsprop", "shampoo_adagrad" and "shampoo_sgd", as
"shampoo" with those grafting methods (RMSprop: beta2 0.99; AdaGrad and RMSprop: epsilon 1e-8).
PSGD runs three
times: triangular factors ("psgd"), and with the reference's memory_save_mode one_diag and
all_diag (diagonal factors). SOAP runs three times: its defaults ("soap"), max_precond_dim 64
("soap_max_dim": the tall and wide matrices' 96-long side gets no factor) and merge_dims with
max_precond_dim 100 on 8 x 8, 12 x 6 and 6 x 12 matrices ("soap_merge": each preconditioned as one
dimension); merge_dims is a CPU-only setting in qopt so far, so --device cuda skips that GPU
replay.

Matching choices: weight decay 0 unless the reference's default is used on both sides;
PSGD's random probes are qopt's counter-based normals (computed here, bit-compatible in
their inputs) fed to the reference through torch.randn_like, and the reference's rare
norm rebalancing is switched off on both sides (--psgd-balance-prob 0). Needs torch (the
GPU machine has it); Distributed Shampoo needs Python >= 3.10 (ran on 3.12).
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # the references decorate helpers with torch.compile
import torch  # noqa: E402

SHAPES = {"square": (64, 64), "tall": (96, 48), "wide": (48, 96)}
# For comparisons whose preconditioner grows with m n (SOAP's merge_dims: one factor of (m n)^2).
SMALL_SHAPES = {"square": (8, 8), "tall": (12, 6), "wide": (6, 12)}
MASK = (1 << 64) - 1


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        buf = bytearray(raw[8 + n + begin:8 + n + end])
        out[name] = torch.frombuffer(buf, dtype=torch.float32).reshape(info["shape"]).clone()
    return out


# qopt's counter-based normal numbers (optim/optimizer_state.hpp), in Python integers.
def mix64(z):
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def psgd_probe(seed, step, matrix_index, shape):
    stream = ((step << 20) ^ matrix_index) & MASK
    base = mix64(seed ^ mix64(stream))
    values = []
    for index in range(shape[0] * shape[1]):
        bits = mix64((base + index) & MASK)
        u1 = (float((bits >> 40) & 0xFFFFFF) + 1.0) * (1.0 / 16777217.0)
        u2 = float((bits >> 16) & 0xFFFFFF) * (1.0 / 16777216.0)
        values.append(math.sqrt(-2.0 * math.log(u1)) * math.cos(6.283185307179586 * u2))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def reference_run(name, start, grads, refs, steps, dtype=torch.float32):
    sys.path.insert(0, refs)
    torch.set_default_dtype(dtype)  # state the references create (SOAP's factors) follows the parameters
    shapes = shapes_of(name)
    params = [torch.nn.Parameter(start[k].clone().to(dtype)) for k in shapes]
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    elif name == "muon":
        import muon
        opt = muon.SingleDeviceMuon(params, lr=0.02, weight_decay=0.0, momentum=0.95)
    elif name == "scion":
        import scion
        opt = scion.Scion([{"params": params, "norm": "Spectral", "norm_kwargs": {}, "scale": 50.0}],
                          lr=2 ** -12, momentum=0.1, unconstrained=False)
    elif name.startswith("soap"):
        import soap
        # soap_max_dim: tall and wide have one side beyond max_precond_dim (no factor there);
        # soap_merge: every small matrix (<= 100 values) preconditioned as one dimension.
        extra = {"soap": {}, "soap_max_dim": {"max_precond_dim": 64},
                 "soap_merge": {"max_precond_dim": 100, "merge_dims": True}}[name]
        opt = soap.SOAP(params, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10, **extra)
    elif name.startswith("shampoo"):
        import distributed_shampoo as ds
        from distributed_shampoo.shampoo_types import ClassicMomentumConfig
        if name == "shampoo_eigen_tolerance":
            preconditioner_config = ds.EigendecomposedShampooPreconditionerConfig(
                amortized_computation_config=ds.EighEigendecompositionConfig(tolerance=1.0),
                factor_matrix_dtype=dtype, factor_matrix_eigenvectors_dtype=dtype,
                factor_matrix_eigenvalues_dtype=dtype)
        elif name == "shampoo_qr":
            preconditioner_config = ds.EigendecomposedShampooPreconditionerConfig(
                amortized_computation_config=ds.QREigendecompositionConfig(max_iterations=3),
                factor_matrix_dtype=dtype, factor_matrix_eigenvectors_dtype=dtype,
                factor_matrix_eigenvalues_dtype=dtype)
        else:
            preconditioner_config = ds.RootInvShampooPreconditionerConfig(factor_matrix_dtype=dtype,
                                                                          inv_factor_matrix_dtype=dtype)
        common = dict(lr=1e-3, epsilon=1e-12, max_preconditioner_dim=40, precondition_frequency=4,
                      preconditioner_config=preconditioner_config)
        adam_grafting = ds.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8)
        other_grafting = {"shampoo_rmsprop": ds.RMSpropPreconditionerConfig(beta2=0.99, epsilon=1e-8),
                          "shampoo_adagrad": ds.AdaGradPreconditionerConfig(epsilon=1e-8),
                          "shampoo_sgd": ds.SGDPreconditionerConfig()}
        if name == "shampoo_options":
            opt = ds.DistributedShampoo(params, betas=(0.9, 1.0), beta3=0.81, use_bias_correction=False,
                                        weight_decay=0.01, weight_decay_type=ds.WeightDecayType.L2,
                                        grafting_config=adam_grafting,
                                        iterate_averaging_config=ClassicMomentumConfig(momentum=0.5, dampening=0.3,
                                                                                       use_nesterov=True),
                                        **common)
        elif name in other_grafting:
            opt = ds.DistributedShampoo(params, betas=(0.9, 1.0), weight_decay=0.01,
                                        grafting_config=other_grafting[name], **common)
        elif name == "shampoo_independent_decay":
            opt = ds.DistributedShampoo(params, betas=(0.9, 1.0), weight_decay=1e-4,
                                        weight_decay_type=ds.WeightDecayType.INDEPENDENT,
                                        grafting_config=adam_grafting, **common)
        elif name != "shampoo_momentum":
            opt = ds.DistributedShampoo(params, betas=(0.9, 1.0), weight_decay=0.01, grafting_config=adam_grafting,
                                        **common)
        else:
            opt = ds.DistributedShampoo(params, betas=(0.9, 0.99), weight_decay=0.1, start_preconditioning_step=6,
                                        grafting_config=None,
                                        iterate_averaging_config=ClassicMomentumConfig(momentum=0.5,
                                                                                       use_nesterov=True),
                                        **common)
    elif name.startswith("psgd"):
        import kron
        memory_save_mode = {"psgd": None, "psgd_one_diag": "one_diag", "psgd_all_diag": "all_diag"}[name]
        opt = kron.Kron(params, lr=3e-4, b1=0.9, weight_decay=0.0, memory_save_mode=memory_save_mode)
        opt.rng.random = lambda: 1.0  # no rebalancing (qopt: --psgd-balance-prob 0)
        probes = []
        kron.torch.randn_like = lambda g: probes.pop(0).to(g.dtype)
    else:
        raise SystemExit(f"no reference wired for {name}")
    for k in range(steps):
        if name.startswith("psgd"):
            probes[:] = [psgd_probe(42, k + 1, i, shapes[s]) for i, s in enumerate(shapes)]
        for p, s in zip(params, shapes):
            p.grad = grads[f"{s}.grad.{k}"].clone().to(dtype)
        opt.step()
    torch.set_default_dtype(torch.float32)
    return {s: p.detach().clone().to(torch.float32) for p, s in zip(params, shapes)}


# Every Shampoo comparison's blocks of 40 and roots every 4 steps (the reference's settings in
# reference_run), and the weight decay most of them use.
SHAMPOO_BLOCKS = ["--shampoo-block-size", "40", "--shampoo-precondition-frequency", "4"]
SHAMPOO_COMMON = ["--weight-decay", "0.01"] + SHAMPOO_BLOCKS
QOPT_FLAGS = {
    "adamw": ["--weight-decay", "0.1"],
    "muon": ["--weight-decay", "0"],
    "scion": ["--weight-decay", "0"],
    "soap": ["--weight-decay", "0.01"],
    "soap_max_dim": ["--weight-decay", "0.01", "--soap-max-precond-dim", "64"],
    "soap_merge": ["--weight-decay", "0.01", "--soap-max-precond-dim", "100", "--soap-merge-dims", "true"],
    "psgd": ["--weight-decay", "0", "--psgd-balance-prob", "0"],
    "psgd_one_diag": ["--weight-decay", "0", "--psgd-balance-prob", "0", "--psgd-memory-save-mode", "one_diag"],
    "psgd_all_diag": ["--weight-decay", "0", "--psgd-balance-prob", "0", "--psgd-memory-save-mode", "all_diag"],
    "shampoo": SHAMPOO_COMMON,
    "shampoo_momentum": ["--weight-decay", "0.1"] + SHAMPOO_BLOCKS +
                        ["--shampoo-start-step", "6", "--shampoo-grafting", "none", "--shampoo-beta2", "0.99",
                         "--shampoo-momentum", "0.5", "--shampoo-nesterov", "true"],
    "shampoo_eigen_tolerance": SHAMPOO_COMMON + ["--shampoo-eigen-tolerance", "1"],
    "shampoo_qr": SHAMPOO_COMMON + ["--shampoo-eigen-method", "qr", "--shampoo-qr-iterations", "3"],
    "shampoo_options": SHAMPOO_COMMON + ["--shampoo-beta3", "0.81", "--shampoo-bias-correction", "false",
                                         "--shampoo-weight-decay-type", "l2", "--shampoo-momentum", "0.5",
                                         "--shampoo-dampening", "0.3", "--shampoo-nesterov", "true"],
    "shampoo_rmsprop": SHAMPOO_COMMON + ["--shampoo-grafting", "rmsprop", "--shampoo-graft-beta2", "0.99"],
    "shampoo_adagrad": SHAMPOO_COMMON + ["--shampoo-grafting", "adagrad"],
    "shampoo_sgd": SHAMPOO_COMMON + ["--shampoo-grafting", "sgd"],
    "shampoo_independent_decay": ["--weight-decay", "1e-4"] + SHAMPOO_BLOCKS +
                                 ["--shampoo-weight-decay-type", "independent"],
}
TOLERANCE = {"adamw": 1e-5, "muon": 3e-2, "scion": 3e-2, "soap": 1e-3, "soap_max_dim": 1e-3, "soap_merge": 1e-3,
             "psgd": 1e-3, "psgd_one_diag": 1e-3,
             "psgd_all_diag": 1e-3, "shampoo": 2e-3, "shampoo_momentum": 2e-3, "shampoo_eigen_tolerance": 2e-3,
             "shampoo_qr": 2e-3, "shampoo_options": 2e-3, "shampoo_independent_decay": 2e-3, "shampoo_rmsprop": 2e-3,
             "shampoo_adagrad": 2e-3, "shampoo_sgd": 2e-3}
# A comparison's name -> qopt's optimizer (several comparisons can exercise one optimizer).
QOPT_OPTIMIZER = {name: name.split("_")[0] for name in QOPT_FLAGS}
# Comparisons whose qopt settings only the CPU reference runs (the GPU refuses them with a message).
CPU_ONLY = {"soap_merge"}


def shapes_of(name):
    return SMALL_SHAPES if name == "soap_merge" else SHAPES


def make_inputs(shapes, seed, steps):
    gen = torch.Generator().manual_seed(seed)
    start = {s: torch.randn(shape, generator=gen) * 0.1 for s, shape in shapes.items()}
    tensors = dict(start)
    for k in range(steps):
        for s, shape in shapes.items():
            tensors[f"{s}.grad.{k}"] = torch.randn(shape, generator=gen)
    return start, tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", required=True,
                    help="folder with muon.py, scion.py, soap.py, kron.py and distributed_shampoo/")
    ap.add_argument("--replay", default="build/bin/optim_replay")
    ap.add_argument("--optimizers", nargs="+", choices=list(QOPT_FLAGS), default=list(QOPT_FLAGS))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu, or cuda to also replay qopt's GPU step")
    ap.add_argument("--work", default="/tmp/qopt_compare")
    ap.add_argument("--json", default="", help="write the verdicts here")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    # One input file per shape set (the default set's numbers are those of every earlier run).
    inputs = {}
    for key, shapes, seed in (("default", SHAPES, 20261124), ("small", SMALL_SHAPES, 20261205)):
        if any(shapes_of(name) is shapes for name in args.optimizers):
            start, tensors = make_inputs(shapes, seed, args.steps)
            path = os.path.join(args.work, f"replay_in_{key}.safetensors")
            write_safetensors(path, tensors)
            inputs[key] = (start, tensors, path)
    results = []
    for name in args.optimizers:
        shapes = shapes_of(name)
        start, tensors, in_path = inputs["small" if shapes is SMALL_SHAPES else "default"]
        ref = reference_run(name, start, tensors, args.refs, args.steps)
        # The reference against itself in float64: where its own result depends on rounding
        # (SOAP's eigenbasis of a rank-deficient factor is arbitrary), this spread is large too.
        ref64 = reference_run(name, start, tensors, args.refs, args.steps, torch.float64)
        spread = {s: float(((ref64[s] - start[s]) - (ref[s] - start[s])).norm() / (ref[s] - start[s]).norm())
                  for s in shapes}
        devices = ["cpu"] + (["cuda"] if args.device == "cuda" and name not in CPU_ONLY else [])
        for device in devices:
            out_path = os.path.join(args.work, f"{name}_{device}.safetensors")
            cmd = [args.replay, "--in", in_path, "--out", out_path, "--optimizer", QOPT_OPTIMIZER[name],
                   "--device", device, "--steps", str(args.steps)] + QOPT_FLAGS[name]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            ours = read_safetensors(out_path)
            errors = {}
            for s in shapes:
                d_ours, d_ref = ours[s] - start[s], ref[s] - start[s]
                errors[s] = float((d_ours - d_ref).norm() / d_ref.norm())
            # Agrees: within the tolerance, or within twice the reference's own float32/float64 spread.
            verdicts = {s: errors[s] < TOLERANCE[name] or errors[s] < 2 * spread[s] for s in shapes}
            verdict = "agrees" if all(verdicts.values()) else "DIFFERS"
            results.append({"optimizer": name, "qopt_device": device, "steps": args.steps, "relative_error": errors,
                            "reference_fp32_vs_fp64": spread, "tolerance": TOLERANCE[name], "verdict": verdict})
            print(f"{name:16s} qopt {device:4s} vs reference, {args.steps} steps: " +
                  ", ".join(f"{s} {errors[s]:.2e} (ref fp32/fp64 {spread[s]:.1e})" for s in shapes) +
                  f"  -> {verdict} (tolerance {TOLERANCE[name]:g})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["verdict"] == "agrees" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
