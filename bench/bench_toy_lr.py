"""How the toy defaults (app.TOY_DEFAULTS) were chosen: learning curves of a method (--method, default our
LoRA) on the bundled toy model.

curves   for each (lr, flip, concept, seed): one training without early stopping, continued with --resume
         to each step count in --points (resume is exact), scored at each by the toy evaluator (4 images per
         prompt, 12 steps, as bench_peer.py); printed per (lr, flip, steps): the subject-fidelity gain over
         the base model, prompt fidelity and preservation, mean over concepts of the mean over seeds ± se.
traces   every-step L_det traces (DVAR never stopping) at one lr, and the stop step DVAR would take at each
         window and threshold (stopping.replay), over concepts and seeds.

    python bench/bench_toy_lr.py curves --lrs 1e-3 2e-3 4e-3 8e-3 --flips 1 0 --points 100 150 200 250 300
    python bench/bench_toy_lr.py traces --lr 4e-3 --steps 400 --flip 1
    python bench/bench_toy_lr.py curves --method selfattn_copy --rank 8 --lrs 1e-3 4e-3 1e-2 --flips 1
Split over cores with --concepts / --lrs and `taskset -c N`; --out appends JSON lines, --summarize reads them.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import shutil
import statistics as st
import tempfile
from pathlib import Path

CONCEPTS = ["teal_ring", "pink_heart", "moon"]


def toy_cfg(c, seed: int, lr: float, flip: bool, out: Path, method: str = "lora", rank: int = 4, **kw):
    from t2i_fast.app import with_bundled_defaults
    from t2i_fast.config import TrainConfig

    return with_bundled_defaults(TrainConfig(images=str(c.images_dir), token=c.token, class_word=c.class_word,
                                             seed=seed, lr=lr, random_flip=flip, out=str(out), num_samples=0,
                                             method=method, lora_rank=rank,
                                             evaluate=False, progress=False, **kw))


def curves(args, work: Path, write) -> None:
    import t2i_fast
    from t2i_fast import toy

    for name in args.concepts:
        c = toy.concept(name)
        base = toy.evaluate(None, c.token, c.class_word, name, n_images=4, num_inference_steps=12)
        write({"concept": name, "base": base["subject_fidelity"]})
        for lr, flip, batch, seed in itertools.product(args.lrs, args.flips, args.batch_sizes, args.seeds):
            out = work / f"{name}-{lr}-{flip}-{batch}-{seed}"
            for i, steps in enumerate(args.points):
                cfg = toy_cfg(c, seed, lr, bool(flip), out, args.method, args.rank, early_stop="none",
                              max_steps=steps, resume=i > 0, batch_size=batch)
                r = t2i_fast.train(cfg)
                s = toy.evaluate(None, c.token, c.class_word, name, adapter_dir=out, n_images=4,
                                 num_inference_steps=12)
                write({"method": args.method, "rank": args.rank, "concept": name, "lr": lr, "flip": flip, "seed": seed,
                       "batch": batch, "steps": r.steps,
                       **{k: s[k] for k in ("subject_fidelity", "prompt_fidelity", "preservation")},
                       "gain": s["subject_fidelity"] - base["subject_fidelity"]})
            shutil.rmtree(out, ignore_errors=True)


def traces(args, work: Path, write) -> None:
    import t2i_fast
    from t2i_fast import toy

    for name in args.concepts:
        c = toy.concept(name)
        for seed in args.seeds:
            out = work / f"{name}-{seed}"
            cfg = toy_cfg(c, seed, args.lr, bool(args.flip), out, args.method, args.rank, early_stop="dvar",
                          dvar_threshold=0.0, probe_every=1, max_steps=args.steps, batch_size=args.batch_size)
            write({"method": args.method, "rank": args.rank, "concept": name, "seed": seed, "lr": args.lr,
                   "flip": args.flip, "batch": args.batch_size,
                   "l_det": t2i_fast.train(cfg).report["early_stop"]["l_det"]})
            shutil.rmtree(out, ignore_errors=True)


def summarize(rows: list[dict], windows=(100, 150, 200, 250)) -> None:
    from t2i_fast.stopping import auto_probe_every, replay

    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        if "gain" in r:
            key = (r.get("method", "lora"), r.get("rank", 4), r["lr"], r["flip"], r.get("batch", 1), r["steps"])  # older rows: lora r4, batch 1
            groups[key][r["concept"]].append(r)
    for key in sorted(groups):
        per_c = groups[key]
        mean = lambda k: st.mean(st.mean(x[k] for x in v) for v in per_c.values())  # noqa: E731
        se = sum(st.variance([x["gain"] for x in v]) / len(v) for v in per_c.values() if len(v) > 1) ** 0.5 / len(per_c)
        n = sum(len(v) for v in per_c.values())
        print(f"{key[0]} r{key[1]} lr {key[2]:g} flip {key[3]} batch {key[4]} steps {key[5]}: {len(per_c)} concepts, {n} runs; gain {mean('gain'):.3f} "
              f"± {se:.3f}, prompt fidelity {mean('prompt_fidelity'):.3f}, preservation {mean('preservation'):.3f}")
    traced = [r for r in rows if "l_det" in r]
    if len({(r.get("method", "lora"), r.get("rank", 4), r["lr"], r.get("batch", 1)) for r in traced}) > 1:
        print("traces of more than one method / rank / lr / batch: summarize them one file at a time")
    for window in windows:
        for threshold in (0.3, 0.4, 0.5):
            stops = []
            for r in traced:
                trace = [v for _, v in r["l_det"]]
                stop, _ = replay(trace, window, threshold, auto_probe_every(window))
                stops.append(len(trace) if stop is None else stop)
            if stops:
                print(f"DVAR window {window} threshold {threshold}: stop step mean {st.mean(stops):.0f}, "
                      f"range {min(stops)}-{max(stops)} over {len(stops)} traces")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["curves", "traces", "summarize"])
    p.add_argument("--method", default="lora", help="the method whose curves or traces are measured")
    p.add_argument("--rank", type=int, default=4, help="--lora-rank of the runs (lora, selfattn_copy)")
    p.add_argument("--concepts", nargs="+", default=CONCEPTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 2e-3, 4e-3])
    p.add_argument("--flips", nargs="+", type=int, default=[1, 0])
    p.add_argument("--points", nargs="+", type=int, default=[100, 200, 300])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1], help="curves: --batch-size of the runs")
    p.add_argument("--batch-size", type=int, default=1, help="traces: --batch-size of the runs")
    p.add_argument("--windows", nargs="+", type=int, default=[100, 150, 200, 250],
                   help="summarize: the DVAR windows replayed over the traces")
    p.add_argument("--lr", type=float, default=4e-3, help="traces: the learning rate")
    p.add_argument("--flip", type=int, default=1, help="traces: random flips on (1) or off (0)")
    p.add_argument("--steps", type=int, default=400, help="traces: steps per trace")
    p.add_argument("--out", default=None, help="append JSON lines here (default: print only)")
    p.add_argument("--summarize", nargs="+", default=[], metavar="JSONL", help="summarize: files written by --out")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = [json.loads(line) for f in args.summarize for line in open(f)]

    def write(row):
        rows.append(row)
        print(json.dumps(row)[:200], flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    if args.part != "summarize":
        with tempfile.TemporaryDirectory(prefix="bench-toy-lr-") as work:
            (curves if args.part == "curves" else traces)(args, Path(work), write)
    summarize(rows, args.windows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
