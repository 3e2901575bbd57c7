#!/usr/bin/env bash
# A small quantization experiment on one GPU: train PRESET with each optimizer in full
# precision and with QAT, then quantize every checkpoint with RTN and GPTQ (W4A4 and W8A8,
# Hadamard off and on). Every ptq call appends a row to OUT/ptq_results.jsonl; tools/ptq_table.py
# prints the table. Usage:
#   tools/quant_experiment.sh [PRESET] [STEPS] [OUT] [OPTIMIZERS...]
#   (defaults: olmo2-50m 400 runs/quant_experiment adamw muon scion)
set -euo pipefail
preset=${1:-olmo2-50m}
steps=${2:-400}
out=${3:-runs/quant_experiment}
shift $(( $# < 3 ? $# : 3 )) || true
optimizers=("$@")
[ ${#optimizers[@]} -eq 0 ] && optimizers=(adamw muon scion)
bin=${QOPT_BIN_DIR:-build/bin}
mkdir -p "$out"
common=(--preset "$preset" --steps "$steps" -b 16 -t 1024 --warmup-steps 40 --eval-every 0 --val-batches 20 --log-every 100 --lr 0 --device cuda)
for opt in "${optimizers[@]}"; do
    for qat in off w4a4; do
        run="$out/${preset}_${opt}_qat-${qat}"
        [ -d "$run/checkpoints" ] || "$bin/train" "${common[@]}" --optimizer "$opt" --qat "$qat" --out-dir "$run" | grep -E "^(val|quantization|step +$steps)"
        ckpt=$(ls -d "$run"/checkpoints/step_* | tail -1)
        ptq=("$bin/ptq" --checkpoint "$ckpt" -b 16 --val-batches 20 --results "$out/ptq_results.jsonl")
        if [ "$qat" = off ]; then
            for format in w4a4 w8a8; do
                for hadamard in 0 128; do
                    "${ptq[@]}" --format "$format" --hadamard "$hadamard" --method rtn | grep "val loss w"
                done
            done
            "${ptq[@]}" --format w4a4 --method gptq --calib-batches 8 | grep -E "val loss w|quantized in"
            "${ptq[@]}" --format w4a4 --hadamard 128 --method gptq --calib-batches 8 | grep -E "val loss w|quantized in"
        else
            # The QAT model evaluated with its own quantizer (QuEST: centered grid, Gaussian scales, Hadamard 128).
            "${ptq[@]}" --format w4a4 --grid centered --weight-rule gaussian --act-rule gaussian --hadamard 128 --method rtn | grep "val loss w"
        fi
    done
done
