"""Shared benchmark helpers: timing with warm-up, peak memory, and rows appended to bench/results.csv.

Every benchmark measures its baseline in the same run and reports ratios, never absolute targets alone.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).with_name("results.csv")
FIELDS = ["date", "commit", "machine", "device", "torch", "bench", "case", "variant", "metric", "value",
          "spread", "unit", "baseline", "ratio"]


def machine_info() -> dict[str, str]:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "commit": commit,
            "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
            "device": device, "torch": torch.__version__}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], warmup: int = 2, reps: int = 5, min_time: float = 0.0) -> tuple[float, float]:
    """Run fn warmup times, then at least `reps` times (and at least `min_time` seconds).

    Returns (median seconds, spread) where spread is (max - min) / 2 of the timed runs.
    """
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (max(times) - min(times)) / 2


def alternated_medians(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Seconds per call of each fn, median over rounds; in each round every fn makes `calls` calls in turn, so
    that a slow spell of a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# the date and commit of the run, taken when it starts (at import), not when its rows are appended minutes later
RUN_INFO = machine_info()


def append_results(rows: list[dict], path: Path = RESULTS) -> None:
    """Append rows (dicts with keys from FIELDS; machine fields filled in) to results.csv."""
    info = RUN_INFO
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**info, **row})


def add_kernel_args(p, rounds: int, reps: int) -> None:
    """The options every kernel microbenchmark takes: device, dtype, interleaved rounds, reps, threads, csv."""
    import torch

    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds; each times every variant")
    p.add_argument("--reps", type=int, default=reps, help="timed runs per variant per round")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--no-csv", action="store_true", help="do not append to bench/results.csv")


def apply_kernel_args(args):
    """Set the thread count; return the torch dtype that --dtype (or the device's default) names."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def run_ranks(fn, ranks: int, work: Path, *args):
    """fn(rank, *args) in `ranks` fresh processes joined in one gloo process group (what torchrun starts on a
    CPU machine); fn may use torch.distributed, which is set up and torn down here. Returns what fn returned
    on rank 0 (through a file in `work`). fn must be a module-level function of the calling script (the
    processes import it)."""
    import itertools

    import torch
    import torch.multiprocessing as mp

    for n in itertools.count():  # a fresh rendezvous file and result file per call
        store, result = work / f"ranks-{n}.store", work / f"ranks-{n}.pt"
        if not store.exists() and not result.exists():
            break
    mp.spawn(_rank_main, args=(ranks, str(store), str(result), fn, args), nprocs=ranks, join=True)
    return torch.load(result)


def _rank_main(rank: int, ranks: int, store: str, result: str, fn, args) -> None:
    from t2i_fast.models import set_offline

    set_offline()  # before diffusers is imported, as the command line does
    import torch
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    try:
        out = fn(rank, *args)
        if rank == 0:
            torch.save(out, result)
        td.barrier()  # no rank tears its connections down while another is still in a collective
    finally:
        td.destroy_process_group()


def alternate_sides(rounds: int, sides: tuple[str, str], run, equal, describe) -> list[dict] | None:
    """Each round runs both sides (run(side) -> a dict of results), the first side first in even rounds and
    last in odd ones, so that neither always runs on a machine warmed (or loaded) by the other. equal(a, b):
    whether the two sides' results agree, checked every round; describe(a, b): the round's line, printed as
    it ends. Returns the rounds' {side: result}, or None (after saying so) at the first round where the
    sides do not agree."""
    out = []
    for r in range(rounds):
        results = {side: run(side) for side in (sides if r % 2 == 0 else sides[::-1])}
        a, b = results[sides[0]], results[sides[1]]
        if not equal(a, b):
            print(f"round {r}: {sides[0]} and {sides[1]} give different results", file=sys.stderr)
            return None
        print(f"round {r}: {describe(a, b)}", flush=True)
        out.append(results)
    return out


def side_medians(rounds: list[dict], key: str) -> dict[str, float]:
    """{side: median over the rounds of result[key]} for alternate_sides' rounds."""
    return {side: statistics.median(r[side][key] for r in rounds) for side in rounds[0]}


def ratio_row(bench: str, case: str, variant: str, metric: str, value: float, baseline: float, unit: str) -> dict:
    """A results.csv row of a value measured against a baseline in the same run."""
    return {"bench": bench, "case": case, "variant": variant, "metric": metric, "value": round(value, 4),
            "unit": unit, "baseline": round(baseline, 4), "ratio": round(value / baseline, 3)}

