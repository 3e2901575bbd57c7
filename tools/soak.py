#!/usr/bin/env python3
"""Soak test of `train`'s crash safety: one run trained straight through, and the same run
killed at random moments and resumed with --resume auto until it finishes. Checks, and exits
non-zero unless all hold:
  - no resume ever found a damaged checkpoint ("skipping damaged checkpoint" in a log);
  - after every kill, the resumed step is at most --checkpoint-every steps behind the last
    step the killed process had logged (nothing lost beyond the checkpoint interval);
  - a SIGTERM'd life stops within two steps of the one it had logged when the signal was sent;
  - the interrupted run's loss curve (metrics.jsonl) and final validation loss equal the
    uninterrupted run's, bit for bit, step by step.
Most kills are SIGKILL (nothing runs after it); one in --sigterm-every is SIGTERM (the run
finishes its step, checkpoints and exits). Standard library only.

Usage: tools/soak.py --out-dir DIR [--kills N] [--min-delay S] [--max-delay S]
                     [--relative-delays | --step-delays] -- TRAIN FLAGS...
(the flags after -- are passed to every `train`; give --steps and --checkpoint-every there.)
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin-dir", default="build/bin")
    p.add_argument("--out-dir", required=True, help="reference/ and soak/ runs go here (emptied first)")
    p.add_argument("--kills", type=int, default=20, help="kills to deliver before letting the run finish")
    p.add_argument("--min-delay", type=float, default=0.5, help="seconds (with --relative-delays, fractions of the uninterrupted run's seconds; with "
                        "--step-delays, fractions of --steps) a process runs before its kill, at least")
    p.add_argument("--max-delay", type=float, default=5.0, help="... and at most")
    p.add_argument("--relative-delays", action="store_true",
                   help="the delays are fractions of the uninterrupted run's seconds: with kills x max-delay < 1 "
                        "the run cannot finish before every kill is delivered, on a fast machine or a slow one, "
                        "as long as it runs as fast as while the uninterrupted run was timed")
    p.add_argument("--step-delays", action="store_true",
                   help="the delays are fractions of --steps, counted from where each life resumed: a life is "
                        "killed at a random moment within the step after it logs that many steps (train must "
                        "log every step). The kill count then does not depend on how fast the machine was "
                        "while the uninterrupted run was timed; no kill lands before training starts")
    p.add_argument("--sigterm-every", type=int, default=5, help="every Nth kill is SIGTERM (0: never)")
    p.add_argument("--seed", type=int, default=1, help="seeds the kill times")
    p.add_argument("--report", help="also write the summary as JSON here")
    p.add_argument("train_flags", nargs=argparse.REMAINDER)
    args = p.parse_args()
    flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    if "--checkpoint-every" not in flags or "--steps" not in flags:
        p.error("give --steps and --checkpoint-every among the train flags (after --)")
    if any(f in flags for f in ("--out-dir", "--resume")):
        p.error("--out-dir and --resume are set by the soak driver")
    if args.relative_delays and args.step_delays:
        p.error("give at most one of --relative-delays and --step-delays")
    if args.step_delays and "--log-every" in flags and flags[flags.index("--log-every") + 1] != "1":
        p.error("--step-delays reads the step lines: leave train's --log-every at 1")
    args.train_flags = flags
    args.interval = int(flags[flags.index("--checkpoint-every") + 1])
    args.steps = int(flags[flags.index("--steps") + 1])
    return args


def train_command(args, out_dir, resume):
    command = [os.path.join(args.bin_dir, "train"), *args.train_flags, "--out-dir", out_dir]
    return command + (["--resume", "auto"] if resume else [])


def curve(out_dir, problems):
    """{step: loss} of the train records, and the last validation loss."""
    losses, val = {}, None
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["type"] == "train":
                if record["step"] in losses:
                    problems.append(f"step {record['step']} appears twice in {out_dir}/metrics.jsonl")
                losses[record["step"]] = record["loss"]
            elif record["type"] == "val":
                val = record["val_loss"]
    return losses, val


def resumed_step_of(log_text):
    """The step a life started from: its checkpoint's, 0 when it started fresh, None when it had
    not said yet (killed during start-up)."""
    resumed = re.search(r"resumed from \S+ at step (\d+)", log_text)
    return int(resumed.group(1)) if resumed else 0 if "starting fresh" in log_text else None


def last_logged_step(log_text):
    steps = re.findall(r"^step +(\d+)/", log_text, flags=re.M)
    return int(steps[-1]) if steps else None


def wait_for_steps(process, log_path, target_steps, rng):
    """Waits until the life writing `log_path` has logged `target_steps` steps beyond the step it
    resumed at, then a random part of its last step's duration. True if the process still runs
    then (the moment to kill it), False if it ended first."""
    first_step, last_step, last_time, step_seconds = None, None, None, 0.0
    while process.poll() is None:
        text = open(log_path).read()
        step = last_logged_step(text)
        if step is not None and step != last_step:
            now = time.time()
            if last_step is not None:
                step_seconds = (now - last_time) / (step - last_step)
            last_step, last_time = step, now
            if first_step is None:
                first_step = resumed_step_of(text) or 0
            if step - first_step >= target_steps:
                time.sleep(rng.uniform(0.0, step_seconds))
                return process.poll() is None
        time.sleep(0.002)
    return False


def main():
    args = parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.out_dir, ignore_errors=True)
    reference_dir, soak_dir = os.path.join(args.out_dir, "reference"), os.path.join(args.out_dir, "soak")
    os.makedirs(soak_dir)
    logs = os.path.join(args.out_dir, "logs")
    os.makedirs(logs)

    start = time.time()
    with open(os.path.join(logs, "reference.log"), "w") as log:
        if subprocess.call(train_command(args, reference_dir, False), stdout=log, stderr=subprocess.STDOUT) != 0:
            raise SystemExit(f"soak: the uninterrupted run failed; see {logs}/reference.log")
    reference_seconds = time.time() - start
    delay_unit = reference_seconds if args.relative_delays else 1.0

    problems, kills, sigterms, max_lost, attempt = [], 0, 0, 0, 0
    last_step_before_kill = None
    while True:
        attempt += 1
        log_path = os.path.join(logs, f"attempt_{attempt:03d}.log")
        with open(log_path, "w") as log:
            process = subprocess.Popen(train_command(args, soak_dir, True), stdout=log, stderr=subprocess.STDOUT)
            killed_with, step_at_kill = None, None
            if kills < args.kills:
                delay = rng.uniform(args.min_delay, args.max_delay)
                if args.step_delays:
                    due = wait_for_steps(process, log_path, max(1, round(args.steps * delay)), rng)
                else:
                    try:
                        process.wait(timeout=delay_unit * delay)
                        due = False
                    except subprocess.TimeoutExpired:
                        due = True
                if due:
                    use_term = args.sigterm_every > 0 and (kills + 1) % args.sigterm_every == 0
                    killed_with = signal.SIGTERM if use_term else signal.SIGKILL
                    process.send_signal(killed_with)
                    step_at_kill = last_logged_step(open(log_path).read())
            rc = process.wait()
        text = open(log_path).read()
        if "skipping damaged checkpoint" in text:
            problems.append(f"attempt {attempt}: a resume found a damaged checkpoint ({log_path})")
        resumed_step = resumed_step_of(text)
        if last_step_before_kill is not None and resumed_step is not None:
            lost = last_step_before_kill - resumed_step
            max_lost = max(max_lost, lost)
            if lost > args.interval:
                problems.append(f"attempt {attempt}: resumed at step {resumed_step}, {lost} steps behind the "
                                f"{last_step_before_kill} logged before the kill (interval {args.interval})")
        if killed_with is None:  # the run got to its end (or failed) before a kill
            if rc != 0:
                problems.append(f"attempt {attempt}: train exited with {rc} ({log_path})")
            break
        kills += 1
        sigterms += killed_with == signal.SIGTERM
        # (A SIGTERM that lands before main() has installed its handler kills by default; such a
        # process has printed nothing.)
        if killed_with == signal.SIGTERM and rc != 0 and text.strip():
            problems.append(f"attempt {attempt}: SIGTERM should exit cleanly, got {rc} ({log_path})")
        # A SIGTERM stops the run after the step in progress (which may log once more).
        logged = last_logged_step(text)
        if killed_with == signal.SIGTERM and step_at_kill is not None and logged is not None \
                and logged > step_at_kill + 2:
            problems.append(f"attempt {attempt}: SIGTERM at step {step_at_kill}, but the run trained on to step "
                            f"{logged} ({log_path})")
        # Killed before it chose where to start: the previous kill's step still stands.
        if logged is not None or resumed_step is not None:
            last_step_before_kill = logged if logged is not None else resumed_step

    reference, reference_val = curve(reference_dir, problems)
    soaked, soaked_val = curve(soak_dir, problems)
    mismatched = [s for s in sorted(reference) if soaked.get(s) != reference[s]]
    if sorted(soaked) != sorted(reference):
        problems.append(f"the interrupted run logged steps {min(soaked, default=None)}..{max(soaked, default=None)} "
                        f"({len(soaked)}), the reference {len(reference)}")
    if mismatched:
        s = mismatched[0]
        problems.append(f"{len(mismatched)} step losses differ, first at step {s}: {soaked.get(s)} vs {reference[s]}")
    if soaked_val != reference_val:
        problems.append(f"final validation loss {soaked_val} vs {reference_val} uninterrupted")

    summary = {
        "kills": kills, "sigkills": kills - sigterms, "sigterms": sigterms, "attempts": attempt,
        "max_steps_lost": max_lost, "checkpoint_interval": args.interval, "steps": args.steps,
        "identical_loss_curve": not mismatched and sorted(soaked) == sorted(reference),
        "final_val_loss": soaked_val, "reference_seconds": round(reference_seconds, 1),
        "soak_seconds": round(time.time() - start - reference_seconds, 1), "problems": problems,
    }
    print(f"soak: {kills} kills survived ({kills - sigterms} SIGKILL, {sigterms} SIGTERM) over {attempt} starts; "
          f"at most {max_lost} steps redone after a kill (checkpoint interval {args.interval}); loss curve "
          f"{'identical to' if summary['identical_loss_curve'] else 'DIFFERENT from'} the uninterrupted run over "
          f"{len(reference)} steps; final val loss {soaked_val}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(summary, f, indent=1)
    for problem in problems:
        print("soak: FAILED: " + problem)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
