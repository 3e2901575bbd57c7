#!/usr/bin/env python3
"""Independent oracle: the qopt model rebuilt in PyTorch (float64), fed a qopt checkpoint.

Reads <checkpoint>/model.safetensors (parsed by hand from the safetensors spec, so only torch
is needed) and <checkpoint>/state.json (the model config), then writes a JSON fixture with
  - the mean cross-entropy and every parameter's gradient (L2 norm and first values) on a
    fixed batch, and
  - the loss curve of `--steps` AdamW steps (torch.optim.AdamW, decay on 2-D tensors only,
    global-norm clipping at 1.0, constant learning rate) on fixed batches.
tests/test_oracle.cpp recomputes both with qopt (CPU reference in CI, the GPU path on a GPU)
from the same initial weights (init_model --seed S writes them) and compares.

Batches (the same formula lives in tests/test_oracle.cpp):
  input[i]  = (7 * i + 3 * step) % 97 + (i % 5),   target[i] = (input[i] + 1) % 97,
  for i over B*T tokens in (batch, position) order; step 0 is the gradient batch.

Usage (on a machine with PyTorch; tools/make_oracle_fixtures.sh runs it for both layouts):
  init_model --preset olmo2-tiny --seed 1234 --out-dir /tmp/o
  python3 tools/torch_oracle.py /tmp/o/checkpoints/step_00000000 --seed 1234 --preset olmo2-tiny \\
      --out tests/fixtures/torch_oracle_olmo2-tiny.json
"""
import argparse
import json
import math
import struct
import sys

import torch

DTYPES = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16, "F16": torch.float16}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = bytearray(data[base + start:base + end])
        tensors[name] = torch.frombuffer(raw, dtype=DTYPES[info["dtype"]]).reshape(info["shape"]).clone()
    return tensors, header.get("__metadata__", {})


def rms_norm(x, weight, eps):
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def layer_norm(x, weight, bias, eps):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rope(x, n_heads, theta):
    """Adjacent pairs (2i, 2i+1) of each head rotated by t * theta^(-2i/head_dim)."""
    batch, seq_len, width = x.shape
    head_dim = width // n_heads
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * theta ** (-2.0 * i / head_dim)
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    pairs = x.reshape(batch, seq_len, n_heads, head_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).reshape(batch, seq_len, width)


def causal_attention(q, k, v, n_heads):
    batch, seq_len, width = q.shape
    head_dim = width // n_heads
    split = lambda t: t.reshape(batch, seq_len, n_heads, head_dim).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(head_dim)
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return (probs @ split(v)).transpose(1, 2).reshape(batch, seq_len, width)


def forward(params, config, inputs, targets):
    """Mean cross-entropy of the qopt model (olmo2 or gpt2 layout) on [B, T] token ids."""
    gpt2 = config["arch"] == "gpt2"
    eps, n_heads, width = config["norm_eps"], config["n_heads"], config["d_model"]
    p = lambda name: params[name]
    x = p("embed.weight")[inputs]
    if gpt2:
        x = x + p("pos_embed.weight")[: inputs.shape[1]][None]
    for layer in range(config["n_layers"]):
        pre = f"layers.{layer}."
        if gpt2:
            a = layer_norm(x, p(pre + "attn_in_norm.weight"), p(pre + "attn_in_norm.bias"), eps)
            qkv = a @ p(pre + "attn.qkv.weight").T + p(pre + "attn.qkv.bias")
            q, k, v = qkv.split(width, dim=-1)
            attn = causal_attention(q, k, v, n_heads)
            x = x + attn @ p(pre + "attn.out.weight").T + p(pre + "attn.out.bias")
            m = layer_norm(x, p(pre + "mlp_in_norm.weight"), p(pre + "mlp_in_norm.bias"), eps)
            up = m @ p(pre + "mlp.up.weight").T + p(pre + "mlp.up.bias")
            act = torch.nn.functional.gelu(up, approximate="tanh")
            x = x + act @ p(pre + "mlp.down.weight").T + p(pre + "mlp.down.bias")
        else:
            qkv = x @ p(pre + "attn.qkv.weight").T
            q, k, v = qkv.split(width, dim=-1)
            q = rope(rms_norm(q, p(pre + "attn.q_norm.weight"), eps), n_heads, config["rope_theta"])
            k = rope(rms_norm(k, p(pre + "attn.k_norm.weight"), eps), n_heads, config["rope_theta"])
            attn = causal_attention(q, k, v, n_heads)
            h = x + rms_norm(attn @ p(pre + "attn.out.weight").T, p(pre + "attn_out_norm.weight"), eps)
            act = torch.relu(h @ p(pre + "mlp.up.weight").T) ** 2
            x = h + rms_norm(act @ p(pre + "mlp.down.weight").T, p(pre + "mlp_out_norm.weight"), eps)
    if gpt2:
        x = layer_norm(x, p("final_norm.weight"), p("final_norm.bias"), eps)
    else:
        x = rms_norm(x, p("final_norm.weight"), eps)
    logits = x @ p("embed.weight")[: config["vocab_size"]].T
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def batch(step, batch_size, seq_len):
    i = torch.arange(batch_size * seq_len)
    inputs = (7 * i + 3 * step) % 97 + (i % 5)
    return inputs.reshape(batch_size, seq_len), ((inputs + 1) % 97).reshape(batch_size, seq_len)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a qopt checkpoint directory (model.safetensors, state.json)")
    parser.add_argument("--preset", required=True, help="recorded in the fixture (the test rebuilds the config)")
    parser.add_argument("--seed", type=int, required=True, help="the init_model --seed that wrote the weights")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=40)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_default_dtype(torch.float64)
    weights, metadata = read_safetensors(args.checkpoint + "/model.safetensors")
    with open(args.checkpoint + "/state.json") as f:
        config = json.load(f)["config"]
    if "qopt_config" in metadata and json.loads(metadata["qopt_config"]) != config:
        sys.exit("model.safetensors metadata and state.json disagree on the config")
    params = {name: t.to(torch.float64).requires_grad_(True) for name, t in weights.items()}

    inputs, targets = batch(0, args.batch, args.seq_len)
    loss = forward(params, config, inputs, targets)
    loss.backward()
    gradients = {
        name: {"norm": t.grad.norm().item(), "first": t.grad.reshape(-1)[:4].tolist()}
        for name, t in params.items()
    }

    # Training from the same weights: decay on 2-D tensors only, as qopt's AdamW.
    train_params = {name: t.to(torch.float64).detach().clone().requires_grad_(True) for name, t in weights.items()}
    decay = [t for t in train_params.values() if t.dim() == 2]
    no_decay = [t for t in train_params.values() if t.dim() != 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    curve = []
    for step in range(args.steps):
        inputs, targets = batch(step, args.batch, args.seq_len)
        optimizer.zero_grad()
        step_loss = forward(train_params, config, inputs, targets)
        step_loss.backward()
        torch.nn.utils.clip_grad_norm_(list(train_params.values()), 1.0)
        optimizer.step()
        curve.append(step_loss.item())

    fixture = {
        "tool": "tools/torch_oracle.py (PyTorch %s, float64)" % torch.__version__,
        "preset": args.preset, "seed": args.seed, "config": config,
        "batch": args.batch, "seq_len": args.seq_len,
        "loss": loss.item(), "gradients": gradients,
        "training": {"steps": args.steps, "lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                     "weight_decay": 0.1, "grad_clip": 1.0, "losses": curve},
    }
    with open(args.out, "w") as f:
        json.dump(fixture, f, indent=1)
    print(f"{args.preset}: loss {loss.item():.6f}, training {curve[0]:.4f} -> {curve[-1]:.4f}, wrote {args.out}")


if __name__ == "__main__":
    main()
