"""What the DVAR loss probe costs, and whether probing every k steps moves the stop step.

Per method, on one model (default: the mid model at 256 px):
  1. record: a real run with the probe every step and DVAR unable to stop (alpha = 0), to --steps; its L_det
     trace goes to bench/traces/<method>-<model><res>-s<seed>.json, its report gives the probe's fraction of
     training wall time at k = 1 (eager on the CPU);
  2. timing: a training step (batch 1) and one probe call timed in place with time_fn (median, spread); the
     steady-state probe fraction at k is (t_probe / k) / (t_step + t_probe / k), given for k = 1 and the
     default k (probe_every = 0: k = N // 12). On CUDA also the CUDA-graph probe against the eager one;
  3. replay: for every trace in bench/traces/, DVAR is replayed at k = 1 and at the default k (and a sweep)
     with the method's window and threshold (or the trace's own, when it was recorded with smaller ones):
     the stop step at the default k must lie within +-5% of the every-step one.

  python bench/bench_probe.py --size mid --resolution 256 --methods lora,textual_inversion,custom_diffusion
  python bench/bench_probe.py --replay-only
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import images_dir, model_dir  # noqa: E402
from common import append_results, peak_rss_mib, time_fn  # noqa: E402

TRACES = Path(__file__).with_name("traces")
SWEEP = (1, 2, 5, 10, 20, 40)


def config(args, method: str, out: str, **kw):
    from t2i_fast import TrainConfig

    lr = dict(x.split("=") for x in args.lr.split(",") if x).get(method) if args.lr else None
    base = dict(model=str(model_dir(args.size)), images=str(images_dir(args.resolution)), method=method,
                class_word="dog", out=out, resolution=args.resolution, num_samples=0, progress=False,
                overwrite=True, seed=args.seed, lora_rank=args.lora_rank)
    if lr:
        base["lr"] = float(lr)
    base.update(kw)
    return TrainConfig(**base)


def window_of(args, method: str) -> tuple[int, float]:
    from t2i_fast.methods import get_method

    p = get_method(method).stop
    return args.window or p.window, p.threshold if args.threshold is None else args.threshold


def record(args, method: str) -> dict:
    """A real run, probe every step, never stopping: the trace and the k = 1 probe fraction."""
    import torch

    from t2i_fast.trainer import Trainer

    window, threshold = window_of(args, method)
    torch.manual_seed(args.seed)
    cfg = config(args, method, tempfile.mkdtemp(prefix="bench-probe-"), max_steps=args.steps, probe_every=1,
                 dvar_window=window, dvar_threshold=0.0)
    result = Trainer(cfg).run()
    es = result.report["early_stop"]
    trace = {"method": method, "model": Path(args.size).name, "resolution": args.resolution,
             "lr": result.report["config"]["lr"],
             "seed": args.seed, "lora_rank": args.lora_rank, "window": window, "threshold": threshold,
             "cap": args.steps, "train_time_s": result.report["train_time_s"], "probe_time_s": es["probe_time_s"],
             "probe_fraction_k1": es["probe_fraction"], "l_det": [v for _, v in es["l_det"]],
             "loss": [round(x, 6) for x in result.losses]}
    name = f"{method}-{trace['model']}{args.resolution}-s{args.seed}.json"
    if args.steps >= window:  # shorter runs measure the cost only: no DVAR decision fits in them
        TRACES.mkdir(exist_ok=True)
        (TRACES / name).write_text(json.dumps(trace))
    print(f"[{method}] recorded {len(trace['l_det'])} L_det values -> traces/{name}; in-run probe fraction at "
          f"k=1: {es['probe_fraction']:.3f} ({es['probe_time_s']:.1f} s of {trace['train_time_s']:.1f} s)")
    return trace


def timing(args, method: str) -> list[dict]:
    """Training step and probe timed in place; steady-state fractions at k = 1 and the default k."""
    import torch

    from t2i_fast.optim import build_optimizer
    from t2i_fast.probe import LossProbe, build_probe_batch
    from t2i_fast.stopping import auto_probe_every
    from t2i_fast.trainer import Trainer

    torch.manual_seed(args.seed)
    tr = Trainer(config(args, method, tempfile.mkdtemp(prefix="bench-probe-t-"), max_steps=10))
    tr.out.mkdir(parents=True, exist_ok=True)
    batches = tr._build_batches()
    cfg = tr.cfg
    opt = build_optimizer(cfg.optimizer, tr.method.param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)
    tr.comps.unet.train()
    tr.method.train()

    def step():
        loss = tr.loss(batches.draw(gen, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    batch = build_probe_batch(batches, cfg.seed)
    modules = [tr.comps.unet] + ([tr.comps.text_encoder] if batch.text is None else [])
    eager = LossProbe(tr.loss, batch, modules, tr.device, "eager")
    t_step, s_step = time_fn(step, warmup=1, reps=args.reps)
    t_probe, s_probe = time_fn(eager, warmup=1, reps=args.reps)
    window, _ = window_of(args, method)
    k = args.every or auto_probe_every(window)
    case = f"{method}-{Path(args.size).name}{args.resolution}"
    frac = {kk: (t_probe / kk) / (t_step + t_probe / kk) for kk in (1, k)}
    print(f"[{method}] step {t_step:.3f} s (+-{s_step:.3f}), probe {t_probe:.3f} s (+-{s_probe:.3f}) = "
          f"{t_probe / t_step:.2f} steps; steady-state probe fraction k=1: {frac[1]:.3f}, k={k} (default, "
          f"N={window}): {frac[k]:.4f}")
    rows = [
        dict(bench="probe", case=case, variant="train-step-b1", metric="time", value=f"{t_step:.4f}",
             spread=f"{s_step:.4f}", unit="s"),
        dict(bench="probe", case=case, variant="probe-eager", metric="time", value=f"{t_probe:.4f}",
             spread=f"{s_probe:.4f}", unit="s", baseline="train-step-b1", ratio=f"{t_probe / t_step:.3f}"),
        dict(bench="probe", case=case, variant="k=1-eager", metric="probe_fraction", value=f"{frac[1]:.4f}",
             unit="fraction"),
        dict(bench="probe", case=case, variant=f"k={k}-eager(default)", metric="probe_fraction",
             value=f"{frac[k]:.4f}", unit="fraction", baseline="k=1-eager", ratio=f"{frac[k] / frac[1]:.3f}"),
        dict(bench="probe", case=case, variant="peak", metric="peak_rss", value=f"{peak_rss_mib():.0f}", unit="MiB"),
    ]
    if tr.device.type == "cuda":
        graph = LossProbe(tr.loss, batch, modules, tr.device, "auto")
        t_graph, s_graph = time_fn(graph, warmup=2, reps=args.reps)
        print(f"[{method}] CUDA graph probe {t_graph * 1e3:.2f} ms vs eager {t_probe * 1e3:.2f} ms "
              f"({graph.path}: {graph.reason})")
        rows.append(dict(bench="probe", case=case, variant=f"probe-{graph.path}", metric="time",
                         value=f"{t_graph:.5f}", spread=f"{s_graph:.5f}", unit="s", baseline="probe-eager",
                         ratio=f"{t_probe / t_graph:.3f}"))
    return rows


def replay_traces(args) -> list[dict]:
    from t2i_fast.stopping import auto_probe_every, replay

    rows, worst = [], 0.0
    for path in sorted(TRACES.glob("*.json")):
        t = json.loads(path.read_text())
        window, threshold = t["window"], t["threshold"]
        k = args.every or auto_probe_every(window)
        stops = {kk: replay(t["l_det"], window, threshold, kk)[0] for kk in sorted(set(SWEEP) | {k})}
        s1, sk = stops[1], stops[k]
        if s1 is None:
            print(f"{path.name}: N={window} alpha={threshold}: no stop within {len(t['l_det'])} steps at k=1 "
                  f"(k={k}: {sk})")
            continue
        dev = (sk - s1) / s1 if sk is not None else float("inf")
        worst = max(worst, abs(dev))
        sweep = ", ".join(f"k={kk}: {v}" for kk, v in stops.items())
        print(f"{path.name}: N={window} alpha={threshold} ({len(t['l_det'])} steps recorded): stop k=1 {s1}, "
              f"k={k} (default) {sk} ({dev:+.1%}); {sweep}")
        rows.append(dict(bench="probe", case=path.stem, variant=f"k={k}(default)", metric="stop_step",
                         value=str(sk), unit="step", baseline=f"k=1:{s1}", ratio=f"{(sk or 0) / s1:.4f}"))
    print(f"worst stop-step deviation at the default k: {worst:.1%} (target 5%)")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="mid", help="tiny | mid | sd15 | a diffusers folder")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--methods", default="lora,textual_inversion,custom_diffusion")
    p.add_argument("--steps", type=int, default=12, help="length of the recorded run (the cap)")
    p.add_argument("--lr", default="", help="per-method learning rates, e.g. lora=1e-3,custom_diffusion=1e-4")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--window", type=int, default=None, help="DVAR window (default: the method's preset)")
    p.add_argument("--threshold", type=float, default=None, help="DVAR alpha (default: the method's preset)")
    p.add_argument("--every", type=int, default=0, help="the sparse k (0: the default, N // 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--replay-only", action="store_true")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    import torch

    from t2i_fast.methods import REGISTRY

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if not args.replay_only:
        for method in args.methods.split(","):
            if method not in REGISTRY:
                print(f"[{method}] not implemented yet; skipped")
                continue
            if not args.no_record:
                record(args, method)
            if not args.no_timing:
                rows += timing(args, method)
    rows += replay_traces(args)
    if rows and not args.no_csv:
        append_results(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
