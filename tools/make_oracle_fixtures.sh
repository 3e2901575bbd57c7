#!/usr/bin/env bash
# Regenerates tests/fixtures/torch_oracle_<preset>.json on a machine with PyTorch (the GPU
# machine has it): init_model writes the initial weights, tools/torch_oracle.py recomputes
# loss, gradients and a training curve in float64. Run from the repository root after `make`.
set -euo pipefail
out_dir=${1:-tests/fixtures}
for preset in olmo2-tiny gpt2-tiny; do
    work=$(mktemp -d)
    build/bin/init_model --preset "$preset" --seed 4242 --out-dir "$work" > /dev/null
    python3 tools/torch_oracle.py "$work/checkpoints/step_00000000" --preset "$preset" --seed 4242 \
        --out "$out_dir/torch_oracle_$preset.json"
    rm -rf "$work"
done
