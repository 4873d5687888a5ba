"""Does early stopping lose quality? For each method and bundled toy concept: steps, wall time, subject
fidelity, prompt fidelity and preservation of (a) the method's full step budget, (b) DVAR's stop, (c) the
untrained base model, scored by the toy evaluator (t2i_fast.toy.evaluator).

The DVAR run trains until the criterion stops it; the full-budget run is that run resumed with early
stopping off up to the cap (resume continues the same optimizer, schedule and RNG state), so both come
from one trajectory and the cap costs no more steps than a plain full run.

Target, per method averaged over concepts: DVAR reaches >= 95% of the full run's subject fidelity in
<= 1/3 of its steps, with prompt fidelity and preservation at most 0.05 below the full run.

  python bench/bench_quality.py --methods lora --concepts teal_ring pink_heart moon
  python bench/bench_quality.py --summary --methods lora custom_diffusion   # the README table, from results.csv

E4T is not run here: it tunes a fixed few steps from one image, and its targets compare the whole command
against our default LoRA command over seeds, which bench/bench_e4t.py (`compare`, `ablate`) measures.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

METRICS = ("subject_fidelity", "prompt_fidelity", "preservation")


def base_scores(name: str, n_images: int, steps: int) -> dict:
    """The untrained base model's scores on a bundled concept: the zero of every fidelity gain."""
    from t2i_fast import toy

    c = toy.concept(name)
    base = toy.evaluate(None, c.token, c.class_word, name, n_images=n_images, num_inference_steps=steps,
                        preservation=False)
    base["preservation"] = 1.0  # the base model against itself
    return base


def run_pair(method: str, name: str, work: Path, n_images: int, steps: int, dvar_opts: dict) -> dict:
    from t2i_fast import TrainConfig, toy
    from t2i_fast.app import train  # the bundled model with the toy defaults, as `t2i-fast train`
    from t2i_fast.toy.evaluator import evaluate_run

    c = toy.concept(name)
    cfg = TrainConfig(images=str(c.images_dir), method=method, token=c.token, class_word=c.class_word,
                      out=str(work / f"{method}-{name}-dvar"), num_samples=0, progress=False, evaluate=False,
                      overwrite=True, early_stop="dvar", **dvar_opts)
    t0 = time.perf_counter()
    dvar = train(cfg)
    dvar_time = time.perf_counter() - t0
    dvar_scores = evaluate_run(dvar.out, n_images=n_images, num_inference_steps=steps)
    full_dir = work / f"{method}-{name}-full"
    shutil.rmtree(full_dir, ignore_errors=True)
    shutil.copytree(dvar.out, full_dir)
    t0 = time.perf_counter()
    full = train(cfg.replace(out=str(full_dir), resume=True, overwrite=False, early_stop="none"))
    full_time = dvar_time + time.perf_counter() - t0
    full_scores = evaluate_run(full.out, n_images=n_images, num_inference_steps=steps)
    base = base_scores(name, n_images, steps)
    return {"dvar": dict(steps=dvar.steps, time=dvar_time, **{m: dvar_scores[m] for m in METRICS}),
            "full": dict(steps=full.steps, time=full_time, **{m: full_scores[m] for m in METRICS}),
            "base": dict(steps=0, time=0.0, **{m: base[m] for m in METRICS})}


def case_suffix(window=None, threshold=None) -> str:
    """How rows with a non-default DVAR window or threshold are told apart in results.csv: their case name."""
    return (f"-window{window}" if window is not None else "") + (f"-threshold{threshold}" if threshold is not None else "")


def summarize(methods: list[str], names: list[str], window=None, threshold=None) -> str:
    """The README's table: per method, the mean over concepts of the latest results.csv rows (wall time
    only where every concept has it). Concepts without rows are left out and the count says so."""
    import csv

    from common import RESULTS

    suffix = case_suffix(window, threshold)
    latest: dict[tuple, float] = {}
    with open(RESULTS, newline="") as f:
        for row in csv.DictReader(f):  # the file is in time order: later rows replace earlier ones
            if row["bench"] == "quality":
                latest[(row["case"], row["variant"], row["metric"])] = float(row["value"])
    out = ["| method | concepts | DVAR steps / full | subject fidelity DVAR / full (ratio) | base | "
           "prompt fidelity DVAR / full | preservation DVAR / full | wall s DVAR / full |",
           "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        have = [n for n in names if (f"{method}-{n}{suffix}", "dvar", "steps") in latest]
        if not have:
            continue

        def mean(kind, metric):
            vals = [latest.get((f"{method}-{n}{suffix}", kind, metric)) for n in have]
            return None if None in vals else sum(vals) / len(vals)

        d, f = ({m: mean(k, m) for m in ("steps", "wall_s", *METRICS)} for k in ("dvar", "full"))
        base = mean("base", "subject_fidelity")
        wall = f"{d['wall_s']:.0f} / {f['wall_s']:.0f}" if d["wall_s"] is not None else "-"
        out.append(f"| {method} | {len(have)} | {d['steps']:.0f} / {f['steps']:.0f} ({d['steps'] / f['steps']:.2f}) | "
                   f"{d['subject_fidelity']:.3f} / {f['subject_fidelity']:.3f} "
                   f"({d['subject_fidelity'] / f['subject_fidelity']:.2f}) | {base:.3f} | "
                   f"{d['prompt_fidelity']:.2f} / {f['prompt_fidelity']:.2f} | "
                   f"{d['preservation']:.3f} / {f['preservation']:.3f} | {wall} |")
    return "\n".join(out)


def main(argv=None) -> int:
    from t2i_fast import toy

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["lora", "textual_inversion"])
    p.add_argument("--concepts", nargs="+", default=None, help="bundled concept names (default: all)")
    p.add_argument("--n-images", type=int, default=4, help="images per evaluation prompt")
    p.add_argument("--eval-steps", type=int, default=12, help="denoising steps of the evaluation images")
    p.add_argument("--dvar-window", type=int, default=None, help="DVAR window N (default: the method's)")
    p.add_argument("--dvar-threshold", type=float, default=None, help="DVAR threshold alpha (default: the method's)")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--summary", action="store_true",
                   help="train nothing: average the latest results.csv rows of each method and concept")
    args = p.parse_args(argv)
    if "e4t" in args.methods:
        p.error("e4t's targets are measured by bench/bench_e4t.py: `python bench/bench_e4t.py compare` (against "
                "the LoRA command, over seeds) and `python bench/bench_e4t.py ablate`")
    names = args.concepts or toy.concepts()
    if args.summary:
        print(summarize(args.methods, names, args.dvar_window, args.dvar_threshold))
        return 0
    dvar_opts = {k: v for k, v in (("dvar_window", args.dvar_window), ("dvar_threshold", args.dvar_threshold))
                 if v is not None}
    suffix = case_suffix(args.dvar_window, args.dvar_threshold)
    tmp = tempfile.TemporaryDirectory(prefix="bench-quality-")  # the runs' folders, removed at exit
    work = Path(tmp.name)
    lines = ["| method | concept | run | steps | wall s | subject fid. | prompt fid. | preservation |",
             "|---|---|---|---|---|---|---|---|"]
    rows, summary = [], []
    for method in args.methods:
        per = [run_pair(method, n, work, args.n_images, args.eval_steps, dvar_opts) for n in names]
        for n, res in zip(names, per):
            for kind in ("full", "dvar", "base"):
                r = res[kind]
                lines.append(f"| {method} | {n} | {kind} | {r['steps']} | {r['time']:.0f} | "
                             f"{r['subject_fidelity']:.3f} | {r['prompt_fidelity']:.2f} | {r['preservation']:.3f} |")
                rows += [{"bench": "quality", "case": f"{method}-{n}{suffix}", "variant": kind, "metric": m,
                          "value": f"{r[m]:.4f}"} for m in ("steps", *METRICS)]
                rows.append({"bench": "quality", "case": f"{method}-{n}{suffix}", "variant": kind, "metric": "wall_s",
                             "value": f"{r['time']:.1f}", "unit": "s"})
        mean = {k: {m: sum(r[k][m] for r in per) / len(per) for m in ("steps", *METRICS)} for k in ("full", "dvar")}
        f, d = mean["full"], mean["dvar"]
        ok = (d["subject_fidelity"] >= 0.95 * f["subject_fidelity"] and d["steps"] <= f["steps"] / 3
              and d["prompt_fidelity"] >= f["prompt_fidelity"] - 0.05 and d["preservation"] >= f["preservation"] - 0.05)
        summary.append(f"{method}: DVAR {d['steps']:.0f} vs full {f['steps']:.0f} steps ({d['steps'] / f['steps']:.2f}); "
                       f"subject {d['subject_fidelity']:.3f} vs {f['subject_fidelity']:.3f}; prompt "
                       f"{d['prompt_fidelity']:.2f} vs {f['prompt_fidelity']:.2f}; preservation "
                       f"{d['preservation']:.3f} vs {f['preservation']:.3f} -> target {'met' if ok else 'NOT met'}")
    print("\n".join(lines))
    print("\n".join(summary))
    if not args.no_csv:
        append_results(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
