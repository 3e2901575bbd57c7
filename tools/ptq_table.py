#!/usr/bin/env python3
"""Prints a PTQ results table (the JSONL rows `ptq` appends) as Markdown: one row per checkpoint
and quantization config, with the full-precision and quantized validation loss and the increase."""
import json
import sys


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: tools/ptq_table.py RESULTS.jsonl")
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    print("| model | optimizer | trained | method | format | Hadamard | grid / scale | val loss fp | quantized | increase |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["quant"]
        print(f"| {r['model']} | {r['optimizer']} | {'QAT ' + r['trained_qat'] if r['trained_qat'] != 'off' else 'bf16'} "
              f"| {r['method']} | {r['format']} | {q['hadamard_block'] or '-'} | {q['weights']['grid']} / {q['weights']['rule']} "
              f"| {r['val_loss_full']:.4f} | {r['val_loss_quantized']:.4f} | {r['loss_increase']:+.4f} |")


if __name__ == "__main__":
    main()
