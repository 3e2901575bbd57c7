#!/usr/bin/env python3
"""Fuzzes the sweep config reader (tools/sweep.py's load_config and the run list it expands).
The reader is Python, so libFuzzer does not reach it; this is a mutational fuzzer of the same
kind: it starts from the shipped configs (tools/sweeps/*.json) and the kept corpus, mutates them
structurally (drop, retype, nest, duplicate values; unknown keys; huge, negative, empty values)
and byte by byte (flips, truncation, invalid UTF-8), and requires that every input is either
accepted or refused with a ConfigError: any other exception is a bug. A failing input is saved
in the corpus directory, which the tests replay (--replay).

Usage: tools/fuzz_sweep_config.py --seconds 60 --corpus tests/fuzz/corpus/sweep_config
       tools/fuzz_sweep_config.py --replay tests/fuzz/corpus/sweep_config
"""
import argparse
import copy
import glob
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # noqa: E402

ODD_VALUES = [None, True, False, 0, -1, 1, 2 ** 63, -2 ** 63, 1e308, -0.0, 0.5, "", "x", "off", "w4a4", "adamw",
              "../..", "a b", "\u00e9", [], {}, [[]], [{}], {"": None}, ["adamw"], [1, 2], "olmo2-tiny"]


def mutate_value(value, rng, depth=0):
    """A structurally mutated copy of a parsed JSON value."""
    roll = rng.random()
    if roll < 0.15 or depth > 6:
        return copy.deepcopy(rng.choice(ODD_VALUES))
    if isinstance(value, dict) and value:
        value = dict(value)
        key = rng.choice(list(value))
        action = rng.random()
        if action < 0.25:
            del value[key]
        elif action < 0.35:
            value[key + rng.choice(["_", "x", ""])] = copy.deepcopy(rng.choice(ODD_VALUES))
        else:
            value[key] = mutate_value(value[key], rng, depth + 1)
        return value
    if isinstance(value, list):
        value = list(value)
        action = rng.random()
        if value and action < 0.3:
            del value[rng.randrange(len(value))]
        elif value and action < 0.5:
            value.append(copy.deepcopy(rng.choice(value)))
        elif value:
            i = rng.randrange(len(value))
            value[i] = mutate_value(value[i], rng, depth + 1)
        else:
            value.append(copy.deepcopy(rng.choice(ODD_VALUES)))
        return value
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([0, -value, value * 1000003, value + 1, str(value), float(min(value, 2 ** 1000))])
    if isinstance(value, float):
        return rng.choice([0.0, -value, value * 1e300, int(value) if math.isfinite(value) else 0, str(value)])
    if isinstance(value, str):
        return rng.choice(["", value * 3, value[:1], value + "\x00", value.upper(), 7, [value], {value: value}])
    return copy.deepcopy(rng.choice(ODD_VALUES))


def mutate_bytes(data, rng):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        action = rng.random()
        if action < 0.3 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif action < 0.5 and data:
            del data[rng.randrange(len(data)):]
        elif action < 0.7:
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.choice([b"\xff\xfe", b"\xc3", b"{", b"]", b"\"", b"\\u12", b"NaN", b"1e999", b"\x00"])
        elif data:
            i = rng.randrange(len(data))
            data[i:i] = data[i:i + rng.randint(1, 64)]
    return bytes(data)


def check(data):
    """None when the reader accepted or refused `data` properly, else the traceback."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        f.write(data)
        path = f.name
    try:
        config = sweep.load_config(path)
        list(sweep.runs_of(config))  # what the driver does next with an accepted config
        return None
    except sweep.ConfigError:
        return None
    except Exception:  # noqa: BLE001 - anything else is the bug this looks for
        return traceback.format_exc()
    finally:
        os.unlink(path)


def replay(directory):
    failures = 0
    files = sorted(glob.glob(os.path.join(directory, "*")))
    for path in files:
        problem = check(open(path, "rb").read())
        if problem:
            failures += 1
            print(f"fuzz_sweep_config: {path}: not refused with a ConfigError:\n{problem}")
    print(f"fuzz_sweep_config: replayed {len(files)} inputs, {failures} failed")
    return 1 if failures else 0


def fuzz(seconds, corpus, seed):
    rng = random.Random(seed)
    here = os.path.dirname(os.path.abspath(__file__))
    seeds = [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(here, "sweeps", "*.json")))]
    os.makedirs(corpus, exist_ok=True)
    seeds += [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(corpus, "*")))]
    deadline, runs = time.time() + seconds, 0
    while time.time() < deadline:
        base = rng.choice(seeds)
        try:
            parsed = json.loads(base)
            structural = rng.random() < 0.8
        except (ValueError, UnicodeDecodeError):
            structural = False
        if structural:
            for _ in range(rng.randint(1, 4)):
                parsed = mutate_value(parsed, rng)
            data = json.dumps(parsed).encode()
        else:
            data = mutate_bytes(base, rng)
        runs += 1
        problem = check(data)
        if problem:
            name = os.path.join(corpus, "crash-" + hashlib.sha1(data).hexdigest()[:16] + ".json")
            with open(name, "wb") as f:
                f.write(data)
            print(f"fuzz_sweep_config: input {name} is not refused with a ConfigError:\n{problem}")
            return 1
    print(f"fuzz_sweep_config: {runs} inputs in {seconds} s, all accepted or refused with a ConfigError")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--corpus", default="tests/fuzz/corpus/sweep_config")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--replay", metavar="DIR", help="check every input in DIR instead of fuzzing")
    args = p.parse_args()
    sys.exit(replay(args.replay) if args.replay else fuzz(args.seconds, args.corpus, args.seed))


if __name__ == "__main__":
    main()
