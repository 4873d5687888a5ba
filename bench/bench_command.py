"""The default command's wall time, start to exit, with the `t2i-fast` process's garbage-collector tuning
(t2i_fast/command_gc.py) against its plain twin (T2I_FAST_GC=plain), in the same run.

Each run is a fresh process that does what the `t2i-fast` console script does (sys.exit(cli.console(argv))),
with a gc.callbacks hook that adds up the collector's time, and a time stamp taken by the last atexit handler,
once the command has finished:
    wall_s   process start to exit, as the bench's parent sees it
    gc_s     time spent in the collector while the command ran
    exit_s   from that time stamp to the process's end (the interpreter's teardown, where it runs)
Rounds alternate which variant goes first; medians over rounds are reported, and the ratio tuned / plain of the
wall times, paired by round. Rows go to bench/results.csv (bench "command").

    taskset -c 0 python bench/bench_command.py --rounds 5
    taskset -c 0 python bench/bench_command.py --rounds 3 -- --method textual_inversion --max-steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

DRIVER = """
import atexit, gc, json, sys, time
collector = [0.0, None]
def _timed(phase, info):
    if phase == "start":
        collector[1] = time.perf_counter()
    elif collector[1] is not None:
        collector[0] += time.perf_counter() - collector[1]
gc.callbacks.append(_timed)
def _returned():  # registered first, so it runs after every other atexit handler, on either exit path
    print("BENCH_COMMAND " + json.dumps({"returned": time.time(), "gc_s": collector[0]}), file=sys.stderr, flush=True)
atexit.register(_returned)
from t2i_fast import cli
sys.exit(cli.console(sys.argv[1:]))
"""
VARIANTS = {"plain": "plain", "tuned": ""}  # variant -> T2I_FAST_GC


def run_once(argv: list[str], gc_setting: str, out: Path, threads: int) -> dict:
    env = {**os.environ, "T2I_FAST_GC": gc_setting, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", DRIVER, "train", "--out", str(out), *argv]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    end = time.time()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[3:])} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stderr.splitlines() if x.startswith("BENCH_COMMAND ")][-1]
    info = json.loads(line.split(" ", 1)[1])
    return {"wall_s": end - t0, "gc_s": info["gc_s"], "exit_s": end - info["returned"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("train_args", nargs="*", help="after --: more `t2i-fast train` flags (default: none, the main job)")
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-command-") as tmp:
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for v in order:
                res = run_once(args.train_args, VARIANTS[v], Path(tmp) / f"run-{v}-{r}", args.threads)
                runs[v].append(res)
                print(f"round {r} {v:6s} wall {res['wall_s']:6.2f} s  collector {res['gc_s']:5.2f} s  "
                      f"exit {res['exit_s']:5.2f} s", flush=True)
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "gc_s", "exit_s")} for v, rs in runs.items()}
    ratios = [t["wall_s"] / p_["wall_s"] for t, p_ in zip(runs["tuned"], runs["plain"])]
    ratio = statistics.median(ratios)
    print(f"\nmedians over {args.rounds} rounds ({' '.join(args.train_args) or 'the main job'}):")
    for v, m in med.items():
        print(f"  {v:6s} wall {m['wall_s']:6.2f} s  collector {m['gc_s']:5.2f} s  exit {m['exit_s']:5.2f} s")
    print(f"  tuned / plain wall: {ratio:.3f} (per round {min(ratios):.3f}-{max(ratios):.3f})")
    if not args.no_csv:
        case = "train " + (" ".join(args.train_args) or "default")
        rows = [dict(bench="command", case=case, variant=v, metric=k, value=f"{m[k]:.3f}", unit="s",
                     baseline="plain", ratio=f"{m[k] / med['plain'][k]:.3f}" if med["plain"][k] else "")
                for v, m in med.items() for k in ("wall_s", "gc_s", "exit_s")]
        rows.append(dict(bench="command", case=case, variant="tuned", metric="wall_ratio_paired",
                         value=f"{ratio:.3f}", spread=f"{(max(ratios) - min(ratios)) / 2:.3f}", unit="x",
                         baseline="plain", ratio=f"{ratio:.3f}"))
        append_results(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
