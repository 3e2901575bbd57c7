#!/usr/bin/env python3
"""Experiment sweep driver: optimizers x models x {full precision, QAT} x seeds (x learning
rates), each trained with `train`, then evaluated with `eval`; full-precision runs also go
through every PTQ configuration (`ptq`) and the error-propagation analysis (`analyze`). Every
result is appended, tagged with its run, to one table <out_dir>/results.jsonl; a job that
finished is recorded in <out_dir>/state.json and skipped when the sweep runs again (an
interrupted training run resumes from its newest valid checkpoint).

Usage: tools/sweep.py CONFIG.json [--dry-run] [--only SUBSTRING] [--keep-going] [--parallel N]
(--parallel N runs N runs at once: small models leave most of a GPU idle.)

Config (JSON; unknown keys are refused):
  name          sweep name (tags every row)
  out_dir       where runs/, results.jsonl and state.json live
  bin_dir       the qopt binaries (default build/bin)
  device        cpu | cuda | auto (default auto)
  train_data, val_data   shard globs (default: the bundled Brown shards)
  models        list of preset names, or {"name", "preset", "n_layers", "d_model", "n_heads", "d_ff",
                "max_seq_len"} (overrides optional)
  optimizers    list of adamw | muon | scion | shampoo | soap | psgd
  learning_rates  {optimizer: [lr, ...]} (default: the method's reference lr)
  seeds         list of ints (default [1337])
  qat           list of formats: "off" (full precision) and/or wXaY (QAT from scratch)
  train         {"steps": N} or {"tokens": N} or {"tokens_per_param": r}, plus "batch_size",
                "seq_len", "warmup_steps", "val_batches", "extra" (list of more train flags)
  ptq           list of ptq configs applied to full-precision runs: {"format", "method",
                "hadamard", "extra"}
  eval          {"val_batches", "tasks": [paths], "extra"} or null
  analyze       {"format", "hadamard", "batches", "batch_size", "extra"} or null
  common_loss   {"eval_every": N} or null: the paper's common-loss (CL) protocol. After the runs,
                for each model and seed the target is the lowest validation loss every optimizer
                reached in its full-precision run (the largest of their best losses; with learning-
                rate sweeps, each optimizer's best run); each optimizer's run is trained again with
                `train --target-loss TARGET --eval-every N` (same schedule, stopped at the first
                validation at or below the target: run <name>_cl) and goes through every PTQ
                configuration. Its rows carry "protocol": "common_loss" and "target_loss" (the
                others "protocol": "budget").
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

TOP_KEYS = {"name", "out_dir", "bin_dir", "device", "train_data", "val_data", "models", "optimizers",
            "learning_rates", "seeds", "qat", "train", "ptq", "eval", "analyze", "common_loss"}
MODEL_KEYS = {"name", "preset", "n_layers", "d_model", "n_heads", "d_ff", "max_seq_len"}
TRAIN_KEYS = {"steps", "tokens", "tokens_per_param", "batch_size", "seq_len", "warmup_steps", "val_batches", "extra"}
PTQ_KEYS = {"format", "method", "hadamard", "extra"}
EVAL_KEYS = {"val_batches", "tasks", "extra"}
ANALYZE_KEYS = {"format", "hadamard", "batches", "batch_size", "extra"}
COMMON_LOSS_KEYS = {"eval_every"}
OPTIMIZERS = {"adamw", "muon", "scion", "shampoo", "soap", "psgd"}
FORMAT = re.compile(r"^(off|w(2|3|4|5|6|7|8|16)a(2|3|4|5|6|7|8|16))$")


class ConfigError(Exception):
    pass


def check_keys(obj, allowed, where):
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} must be an object")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def need(obj, key, kind, where, default=None):
    if key not in obj:
        if default is None:
            raise ConfigError(f"{where}: '{key}' is required")
        return default
    value = obj[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def extra_args(obj, where):
    extra = obj.get("extra", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise ConfigError(f"{where}: 'extra' must be a list of strings")
    return extra


def load_config(path):
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})")
    check_keys(config, TOP_KEYS, "config")
    c = {"name": need(config, "name", str, "config"), "out_dir": need(config, "out_dir", str, "config"),
         "bin_dir": need(config, "bin_dir", str, "config", "build/bin"),
         "device": need(config, "device", str, "config", "auto"),
         "train_data": need(config, "train_data", str, "config", "build/data/brown/brown_train_*.bin"),
         "val_data": need(config, "val_data", str, "config", "build/data/brown/brown_val_*.bin")}
    if c["device"] not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"config: device must be cpu, cuda or auto, got {c['device']!r}")
    models = need(config, "models", list, "config")
    if not models:
        raise ConfigError("config: models is empty")
    c["models"] = []
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"name": m, "preset": m}
        check_keys(m, MODEL_KEYS, f"models[{i}]")
        model = {"name": need(m, "name", str, f"models[{i}]"), "preset": need(m, "preset", str, f"models[{i}]")}
        for key in ("n_layers", "d_model", "n_heads", "d_ff", "max_seq_len"):
            if key in m:
                model[key] = need(m, key, int, f"models[{i}]")
        if not re.match(r"^[A-Za-z0-9_.-]+$", model["name"]):
            raise ConfigError(f"models[{i}]: name {model['name']!r} may hold only letters, digits, '_', '.', '-'")
        c["models"].append(model)
    c["optimizers"] = need(config, "optimizers", list, "config")
    for o in c["optimizers"]:
        if not isinstance(o, str) or o not in OPTIMIZERS:
            raise ConfigError(f"config: unknown optimizer {o!r} (known: {', '.join(sorted(OPTIMIZERS))})")
    lrs = need(config, "learning_rates", dict, "config", {})
    for o, values in lrs.items():
        if o not in c["optimizers"]:
            raise ConfigError(f"learning_rates: {o!r} is not among the optimizers")
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            raise ConfigError(f"learning_rates.{o}: a non-empty list of positive numbers")
    c["learning_rates"] = lrs
    c["seeds"] = need(config, "seeds", list, "config", [1337])
    if not c["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in c["seeds"]):
        raise ConfigError("config: seeds must be a non-empty list of non-negative integers")
    c["qat"] = need(config, "qat", list, "config", ["off"])
    for q in c["qat"]:
        if not isinstance(q, str) or not FORMAT.match(q):
            raise ConfigError(f"config: qat format {q!r} is not off or wXaY")
    train = need(config, "train", dict, "config")
    check_keys(train, TRAIN_KEYS, "train")
    budgets = [k for k in ("steps", "tokens", "tokens_per_param") if k in train]
    if len(budgets) != 1:
        raise ConfigError("train: give exactly one of steps, tokens, tokens_per_param")
    c["train"] = {k: need(train, k, float if k == "tokens_per_param" else int, "train") for k in budgets}
    for k, default in (("batch_size", 16), ("seq_len", 256), ("warmup_steps", 0), ("val_batches", 20)):
        c["train"][k] = need(train, k, int, "train", default)
    c["train"]["extra"] = extra_args(train, "train")
    c["ptq"] = []
    for i, p in enumerate(need(config, "ptq", list, "config", [])):
        check_keys(p, PTQ_KEYS, f"ptq[{i}]")
        entry = {"format": need(p, "format", str, f"ptq[{i}]"), "method": need(p, "method", str, f"ptq[{i}]", "rtn"),
                 "hadamard": need(p, "hadamard", int, f"ptq[{i}]", 0), "extra": extra_args(p, f"ptq[{i}]")}
        if not FORMAT.match(entry["format"]) or entry["format"] == "off":
            raise ConfigError(f"ptq[{i}]: format {entry['format']!r} is not wXaY")
        if entry["method"] not in ("rtn", "gptq"):
            raise ConfigError(f"ptq[{i}]: method must be rtn or gptq")
        c["ptq"].append(entry)
    c["eval"] = None
    if config.get("eval") is not None:
        e = config["eval"]
        check_keys(e, EVAL_KEYS, "eval")
        c["eval"] = {"val_batches": need(e, "val_batches", int, "eval", 20), "tasks": need(e, "tasks", list, "eval", []),
                     "extra": extra_args(e, "eval")}
        if not all(isinstance(t, str) and t for t in c["eval"]["tasks"]):
            raise ConfigError("eval: 'tasks' must be a list of file paths")
    c["analyze"] = None
    if config.get("analyze") is not None:
        a = config["analyze"]
        check_keys(a, ANALYZE_KEYS, "analyze")
        c["analyze"] = {"format": need(a, "format", str, "analyze", "w4a4"),
                        "hadamard": need(a, "hadamard", int, "analyze", 0),
                        "batches": need(a, "batches", int, "analyze", 1),
                        "batch_size": need(a, "batch_size", int, "analyze", 4), "extra": extra_args(a, "analyze")}
        if not FORMAT.match(c["analyze"]["format"]) or c["analyze"]["format"] == "off":
            raise ConfigError(f"analyze: format {c['analyze']['format']!r} is not wXaY")
    c["common_loss"] = None
    if config.get("common_loss") is not None:
        cl = config["common_loss"]
        check_keys(cl, COMMON_LOSS_KEYS, "common_loss")
        c["common_loss"] = {"eval_every": need(cl, "eval_every", int, "common_loss", 10)}
        if c["common_loss"]["eval_every"] <= 0:
            raise ConfigError("common_loss: eval_every must be positive")
        if "off" not in c["qat"]:
            raise ConfigError("common_loss: needs full-precision runs (\"off\" in qat)")
        if not c["ptq"]:
            raise ConfigError("common_loss: needs ptq configurations to apply at the common loss")
    return c


def model_flags(model):
    flags = ["--preset", model["preset"]]
    for key in ("n_layers", "d_model", "n_heads", "d_ff", "max_seq_len"):
        if key in model:
            flags += ["--" + key.replace("_", "-"), str(model[key])]
    return flags


def runs_of(c):
    for model in c["models"]:
        for optimizer in c["optimizers"]:
            for lr in c["learning_rates"].get(optimizer, [0]):
                for seed in c["seeds"]:
                    for qat in c["qat"]:
                        name = f"{model['name']}_{optimizer}" + (f"_lr{lr:g}" if lr else "") + f"_s{seed}_qat-{qat}"
                        yield {"name": name, "model": model, "optimizer": optimizer, "lr": lr, "seed": seed,
                               "qat": qat}


class Sweep:
    def __init__(self, config, dry_run, keep_going):
        self.c = config
        self.dry_run = dry_run
        self.keep_going = keep_going
        self.out = config["out_dir"]
        self.state_path = os.path.join(self.out, "state.json")
        self.results = os.path.join(self.out, "results.jsonl")
        self.state = {}
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                self.state = json.load(f)
        self.failed = []
        self.lock = threading.Lock()  # state.json, results.jsonl and the console
        self.env = dict(os.environ)

    def share_cores(self, parallel):
        """N jobs at once share the cores: each gets cores / N OpenMP threads (unless OMP_NUM_THREADS
        is set), since N processes each spinning a thread per core slow each other down many times
        over (measured: analyze 5-20x slower with 8 jobs of 16 threads on 16 cores)."""
        if parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))

    def save_state(self):
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def binary(self, name):
        return os.path.join(self.c["bin_dir"], name)

    def job(self, key, command, run, kind, row_file=None):
        """Runs one job unless state.json says it is done; appends its (tagged) row."""
        with self.lock:
            if self.state.get(key) == "done":
                return True
            print(f"[sweep] {key}: {shlex.join(command)}", flush=True)
        if self.dry_run:
            return True
        if row_file and os.path.exists(row_file):
            os.remove(row_file)  # a row from an interrupted attempt
        log_path = os.path.join(self.out, "logs", key.replace("/", "__") + ".log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        start = time.time()
        with open(log_path, "w") as log:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=self.env).returncode
        seconds = time.time() - start
        if rc != 0:
            with open(log_path) as log:
                tail = log.read().strip().splitlines()[-1:] or ["(no output)"]
            with self.lock:
                print(f"[sweep] {key} FAILED (exit {rc}): {tail[0]}  (log: {log_path})", flush=True)
                self.state[key] = f"failed: exit {rc}"
                self.save_state()
                self.failed.append(key)
            return False
        rows = []
        if row_file:
            with open(row_file) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif kind == "train":
            rows = [self.train_row(run)]
        with self.lock, open(self.results, "a") as f:
            for row in rows:
                row.update({"sweep": self.c["name"], "run": run["name"], "job": kind, "model_name": run["model"]["name"],
                            "optimizer": run["optimizer"], "lr": run["lr"], "seed": run["seed"], "qat": run["qat"],
                            "protocol": run.get("protocol", "budget"), "job_seconds": round(seconds, 2)})
                if "target_loss" in run:
                    row["target_loss"] = run["target_loss"]
                f.write(json.dumps(row) + "\n")
            self.state[key] = "done"
            self.save_state()
            print(f"[sweep] {key} done in {seconds:.1f} s", flush=True)
        return True

    def metrics(self, run):
        """The run's metrics.jsonl records by type ("train", "val", "target"); empty when it has none."""
        records = {"train": [], "val": [], "target": []}
        path = os.path.join(self.run_dir(run), "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for r in map(json.loads, filter(str.strip, f)):
                    records.get(r.get("type"), []).append(r)
        return records

    def train_row(self, run):
        """The run's final validation loss and mean throughput, from its metrics.jsonl."""
        records = self.metrics(run)
        val, train, target = records["val"], records["train"], records["target"]
        tps = [r["tokens_per_second"] for r in train[len(train) // 10:]] if train else []
        return {"val_loss": val[-1]["val_loss"] if val else None, "steps": train[-1]["step"] if train else 0,
                "tokens": train[-1]["tokens_seen"] if train else 0,
                "tokens_per_second": sum(tps) / len(tps) if tps else None,
                "skipped_steps": sum(1 for r in train if r.get("skipped")), "reached_target": bool(target)}

    def best_val_loss(self, run):
        """The lowest validation loss in the run's metrics (None when it has none)."""
        losses = [r["val_loss"] for r in self.metrics(run)["val"]]
        return min(losses) if losses else None

    def common_loss_runs(self, runs):
        """The CL runs: per (model, seed), each optimizer's best full-precision run, trained again to
        the largest of the optimizers' best validation losses."""
        groups = {}
        for run in runs:
            if run["qat"] == "off" and "protocol" not in run:
                groups.setdefault((run["model"]["name"], run["seed"]), []).append(run)
        for (model, seed), members in groups.items():
            best = {}
            for run in members:
                loss = self.best_val_loss(run) if self.state.get(run["name"] + "/train") == "done" else None
                if loss is not None and (run["optimizer"] not in best or loss < best[run["optimizer"]][0]):
                    best[run["optimizer"]] = (loss, run)
            missing = sorted({r["optimizer"] for r in members} - set(best))
            if missing:
                print(f"[sweep] common loss {model} seed {seed}: no finished run of {', '.join(missing)}; "
                      f"target over {', '.join(sorted(best)) or 'none'}", flush=True)
            if not best:
                continue
            target = max(loss for loss, _ in best.values())
            print(f"[sweep] common loss {model} seed {seed}: target {target:.4f} "
                  f"({', '.join(f'{o} {l:.4f}' for o, (l, _) in sorted(best.items()))})", flush=True)
            for _, run in best.values():
                yield dict(run, name=run["name"] + "_cl", protocol="common_loss", target_loss=target)

    def forget_changed_target(self, run):
        """A CL run trained to another target (the set of runs changed) starts again."""
        key = run["name"] + "/target"
        with self.lock:
            if self.state.get(key) == run["target_loss"]:
                return
            for k in [k for k in self.state if k.startswith(run["name"] + "/")]:
                del self.state[k]
            self.state[key] = run["target_loss"]
            self.save_state()
        if not self.dry_run and os.path.isdir(self.run_dir(run)):
            shutil.rmtree(self.run_dir(run))

    def run_dir(self, run):
        return os.path.join(self.out, "runs", run["name"])

    def checkpoint(self, run):
        root = os.path.join(self.run_dir(run), "checkpoints")
        steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
        return os.path.join(root, steps[-1]) if steps else os.path.join(root, "step_?")

    def parameters(self, run):
        """Parameter count of the run's model (for tokens_per_param budgets), via train --list-presets
        for presets; a model with overrides needs steps or tokens."""
        if any(k in run["model"] for k in ("n_layers", "d_model", "n_heads", "d_ff")):
            raise ConfigError(f"model {run['model']['name']}: tokens_per_param needs a plain preset")
        out = subprocess.run([self.binary("train"), "--list-presets"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            cols = line.split()
            if cols and cols[0] == run["model"]["preset"]:
                return int(cols[6].replace(",", ""))
        raise ConfigError(f"unknown preset {run['model']['preset']!r}")

    def run_one(self, run):
        c, t = self.c, self.c["train"]
        run_dir = self.run_dir(run)
        if "steps" in t:
            budget = ["--steps", str(t["steps"])]
        elif "tokens" in t:
            budget = ["--tokens", str(t["tokens"])]
        else:
            budget = ["--tokens", str(int(t["tokens_per_param"] * self.parameters(run)))]
        train = [self.binary("train"), *model_flags(run["model"]), "--optimizer", run["optimizer"],
                 "--lr", f"{run['lr']:g}", "--seed", str(run["seed"]), "--qat", run["qat"], *budget,
                 "-b", str(t["batch_size"]), "-t", str(t["seq_len"]), "--warmup-steps", str(t["warmup_steps"]),
                 "--val-batches", str(t["val_batches"]), "--train-data", c["train_data"], "--val-data",
                 c["val_data"], "--device", c["device"], "--out-dir", run_dir, "--log-every", "100",
                 *t["extra"]]
        common_loss = run.get("protocol") == "common_loss"
        if common_loss:
            self.forget_changed_target(run)
            train += ["--target-loss", repr(run["target_loss"]), "--eval-every", str(c["common_loss"]["eval_every"])]
        if os.path.isdir(os.path.join(run_dir, "checkpoints")) and self.state.get(run["name"] + "/train") != "done":
            train += ["--resume", "auto"]
        if not self.job(run["name"] + "/train", train, run, "train"):
            return
        ckpt = self.checkpoint(run)
        if c["eval"] is not None and not common_loss:
            row_file = os.path.join(run_dir, "eval_row.jsonl")
            command = [self.binary("eval"), "--checkpoint", ckpt, "--device", c["device"], "--val-data", c["val_data"],
                       "--val-batches", str(c["eval"]["val_batches"]), "-b", str(t["batch_size"]), "-t", str(t["seq_len"]),
                       "--results", row_file, *c["eval"]["extra"]]
            for task in c["eval"]["tasks"]:
                command += ["--task", task]
            self.job(run["name"] + "/eval", command, run, "eval", row_file)
        if run["qat"] != "off":
            return
        for p in c["ptq"]:
            tag = f"{p['method']}-{p['format']}-h{p['hadamard']}"
            row_file = os.path.join(run_dir, f"ptq_{tag}.jsonl")
            command = [self.binary("ptq"), "--checkpoint", ckpt, "--device", c["device"], "--format", p["format"],
                       "--method", p["method"], "--hadamard", str(p["hadamard"]), "--calib-data", c["train_data"],
                       "--val-data", c["val_data"], "--val-batches", str(c["eval"]["val_batches"] if c["eval"] else 20),
                       "-b", str(t["batch_size"]), "-t", str(t["seq_len"]), "--results", row_file, *p["extra"]]
            self.job(run["name"] + "/ptq-" + tag, command, run, "ptq", row_file)
        if c["analyze"] is not None and not common_loss:
            a = c["analyze"]
            row_file = os.path.join(run_dir, "analysis_row.jsonl")
            command = [self.binary("analyze"), "--checkpoint", ckpt, "--device", c["device"], "--format", a["format"],
                       "--hadamard", str(a["hadamard"]), "--batches", str(a["batches"]), "-b", str(a["batch_size"]),
                       "-t", str(t["seq_len"]), "--calib-data", c["train_data"],
                       "--out", os.path.join(run_dir, "analysis.json"), "--results", row_file, *a["extra"]]
            self.job(run["name"] + "/analyze", command, run, "analyze", row_file)

    def run(self, only, parallel):
        os.makedirs(self.out, exist_ok=True)
        self.share_cores(parallel)
        runs = [r for r in runs_of(self.c) if not only or only in r["name"]]
        print(f"[sweep] {self.c['name']}: {len(runs)} runs into {self.out}", flush=True)

        def one(run):
            if not self.failed or self.keep_going:
                self.run_one(run)

        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            for future in [pool.submit(one, run) for run in runs]:
                future.result()
            if self.c["common_loss"] is not None and not self.dry_run:
                cl_runs = list(self.common_loss_runs(runs))
                for future in [pool.submit(one, run) for run in cl_runs]:
                    future.result()
        if self.failed:
            print(f"[sweep] {len(self.failed)} job(s) failed: {', '.join(self.failed)}", flush=True)
            return 1
        print(f"[sweep] all jobs done; results in {self.results}", flush=True)
        return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs without running them")
    parser.add_argument("--only", default="", help="only runs whose name contains this")
    parser.add_argument("--keep-going", action="store_true", help="continue with other runs after a failure")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    args = parser.parse_args()
    try:
        config = load_config(args.config)
        return Sweep(config, args.dry_run, args.keep_going).run(args.only, args.parallel)
    except ConfigError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
