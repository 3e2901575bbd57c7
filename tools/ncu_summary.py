#!/usr/bin/env python3
"""Sums kernel times from an `ncu --metrics gpu__time_duration.sum --csv` log, per kernel name.

Usage: tools/ncu_summary.py ncu.csv [--top 30]
Prints total ms, launches and share for each kernel (template arguments shortened).
"""
import csv
import re
import sys
from collections import defaultdict


def short_name(name):
    name = re.sub(r"\(.*$", "", name)  # drop the parameter list
    return name[:110]


def main():
    path = sys.argv[1]
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 30
    totals, counts = defaultdict(float), defaultdict(int)
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond")
        scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, 1e-6)
        name = short_name(row["Kernel Name"])
        totals[name] += value * scale
        counts[name] += 1
    grand = sum(totals.values())
    print(f"total {grand:.2f} ms over {sum(counts.values())} launches")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{ms:9.3f} ms {100 * ms / grand:5.1f}% {counts[name]:6d}x  {name}")


if __name__ == "__main__":
    main()
