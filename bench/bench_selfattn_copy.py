"""selfattn_copy against our LoRA at an equal trainable-parameter count, and its ablations.

quality  for each variant x concept x seed: a `t2i-fast train` run at the toy defaults (DVAR on, as a user
         runs it), scored by the toy evaluator (4 images per prompt, 12 steps). The summary gives per
         variant the mean over concepts of the per-concept mean over seeds, ± its standard error, of the
         subject-fidelity gain over the base model, prompt fidelity, preservation and steps, and checks the
         issue's quality targets against the `lora` variant.
step     seconds per training step and peak tensor memory of one step, lora vs selfattn_copy at the ranks
         given, on the toy model and a mid model. Time: the two alternate in one process, median of
         --rounds. Memory: the storages alive at the step's peak, counted by memtrack.TensorMemory over
         forward, backward and optimizer step (optimizer state included), plus the weights, adapter and
         text encoder resident before it.

Variants: lora (rank 4, our toy default) and copy (selfattn_copy as it ships, rank 11: the same trainable-
parameter count on the toy, the identifier token and gates included; the step part prints both counts), then
the ablations of copy: copy-nogate, copy-clean, copy-r1, copy-r4, copy-r16, and copy-full (injected into the
full-resolution self-attentions too, rank 8 for the same count).

    python bench/bench_selfattn_copy.py quality --variants lora copy --seeds 0 1 2 3 4 5 6 7 --out q.jsonl
    python bench/bench_selfattn_copy.py quality --variants copy-nogate copy-clean copy-r1 copy-r4 copy-r16 copy-full \\
        --seeds 0 1 --out q.jsonl
    python bench/bench_selfattn_copy.py summarize q.jsonl
    python bench/bench_selfattn_copy.py step
Split over cores with --concepts / --variants and `taskset -c N`, each with --out to the same file.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import statistics as st
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternated_medians, append_results  # noqa: E402

CONCEPTS = ["teal_ring", "pink_heart", "moon"]
METRICS = ("gain", "prompt_fidelity", "preservation", "steps")
ATTRIBUTES = ("prompt_fidelity_background", "prompt_fidelity_color")  # prompt fidelity's two halves
# name: (method, rank, switches of the SelfAttnCopy class: its ablation constants)
VARIANTS = {
    "lora": ("lora", 4, {}),
    # the default: injected below the full resolution; rank 11 makes the trainable-parameter count equal
    "copy": ("selfattn_copy", 11, {}),
    "copy-nogate": ("selfattn_copy", 11, {"gate": False}),
    "copy-clean": ("selfattn_copy", 11, {"reference": "clean"}),
    "copy-r1": ("selfattn_copy", 1, {}),
    "copy-r4": ("selfattn_copy", 4, {}),
    "copy-r16": ("selfattn_copy", 16, {}),
    # every self-attention, the full-resolution ones too; rank 8 for the equal count
    "copy-full": ("selfattn_copy", 8, {"full_resolution": True}),
}


@contextlib.contextmanager
def switched(switches: dict):
    """SelfAttnCopy's ablation constants set for the block (the saved file records them; sampling follows it)."""
    from t2i_fast.methods.selfattn_copy import SelfAttnCopy

    old = {k: getattr(SelfAttnCopy, k) for k in switches}
    for k, v in switches.items():
        setattr(SelfAttnCopy, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(SelfAttnCopy, k, v)


def quality(args, work: Path, write) -> None:
    from t2i_fast import TrainConfig, toy
    from t2i_fast.app import train
    from t2i_fast.toy.evaluator import evaluate_run

    for name in args.concepts:
        c = toy.concept(name)
        base = toy.evaluate(None, c.token, c.class_word, name, n_images=4, num_inference_steps=12)
        for variant in args.variants:
            method, rank, switches = VARIANTS[variant]
            for seed in args.seeds:
                out = work / f"{variant}-{name}-{seed}"
                cfg = TrainConfig(images=str(c.images_dir), method=method, lora_rank=rank, token=c.token,
                                  class_word=c.class_word, seed=seed, out=str(out), num_samples=0, evaluate=False,
                                  progress=False, overwrite=True)
                with switched(switches):
                    t0 = time.perf_counter()
                    r = train(cfg)
                    wall = time.perf_counter() - t0
                    s = evaluate_run(out, n_images=4, num_inference_steps=12)
                write({"variant": variant, "concept": name, "seed": seed, "steps": r.steps, "wall_s": round(wall, 2),
                       "gain": s["subject_fidelity"] - base["subject_fidelity"],
                       **{k: s[k] for k in ("subject_fidelity", "prompt_fidelity", "preservation")},
                       **{k: v for k, v in s.items() if k.startswith("prompt_fidelity_")}})
                shutil.rmtree(out, ignore_errors=True)


def mean_se(per_concept: dict[str, list[float]]) -> tuple[float, float]:
    """Mean over concepts of the per-concept mean over seeds, and its standard error (seed noise only)."""
    means = [st.mean(v) for v in per_concept.values()]
    var = sum(st.variance(v) / len(v) for v in per_concept.values() if len(v) > 1)
    return st.mean(means), var ** 0.5 / len(means)


def summarize(rows: list[dict]) -> None:
    groups = collections.defaultdict(lambda: collections.defaultdict(lambda: collections.defaultdict(list)))
    for r in rows:
        for m in (*METRICS, *ATTRIBUTES, "wall_s"):
            groups[r["variant"]][m][r["concept"]].append(r[m])
    print("| variant | method, rank | runs | concepts | subject-fidelity gain | prompt fidelity | (background / "
          "colour) | preservation | steps | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    stats = {}
    for variant in [v for v in VARIANTS if v in groups]:
        g = groups[variant]
        stats[variant] = {m: mean_se(g[m]) for m in (*METRICS, *ATTRIBUTES, "wall_s")}
        runs = sum(len(v) for v in g["gain"].values())
        method, rank, _ = VARIANTS[variant]
        cell = lambda m: f"{stats[variant][m][0]:.3f} ± {stats[variant][m][1]:.3f}"  # noqa: E731
        halves = " / ".join(f"{stats[variant][m][0]:.2f}" for m in ATTRIBUTES)
        cells = f"{cell('gain')} | {cell('prompt_fidelity')} | {halves} | {cell('preservation')}"
        print(f"| {variant} | {method}, r{rank} | {runs} | {len(g['gain'])} | {cells} | "
              f"{stats[variant]['steps'][0]:.0f} | {stats[variant]['wall_s'][0]:.1f} |")
    if "lora" in stats and "copy" in stats:
        lo, co = stats["lora"], stats["copy"]
        print(f"targets, copy vs lora: subject-fidelity gain {co['gain'][0]:.3f} vs {lo['gain'][0]:.3f} "
              f"({'met' if co['gain'][0] >= lo['gain'][0] else 'NOT met'}); preservation "
              f"{co['preservation'][0]:.3f} vs {lo['preservation'][0]:.3f} - 0.02 "
              f"({'met' if co['preservation'][0] >= lo['preservation'][0] - 0.02 else 'NOT met'}); prompt fidelity "
              f"{co['prompt_fidelity'][0]:.3f} vs {lo['prompt_fidelity'][0]:.3f} (no target)")


def step_setup(model: str, method: str, rank: int, resolution: int | None, images: str, out: Path, **changes):
    """A Trainer at its first step, its batches and optimizer: the loop's own step, taken apart (changes: other
    TrainConfig fields)."""
    import torch

    from t2i_fast import TrainConfig
    from t2i_fast.optim import build_optimizer
    from t2i_fast.trainer import Trainer

    cfg = TrainConfig(model=model, images=images, method=method, lora_rank=rank, class_word="shape",
                      resolution=resolution, out=str(out), num_samples=0, progress=False, overwrite=True,
                      early_stop="none", lr=1e-4, **changes)
    trainer = Trainer(cfg)
    batches = trainer._build_batches()
    cfg = trainer.cfg
    opt = build_optimizer(cfg.optimizer, trainer.method.param_groups(), lr=cfg.lr,
                          betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    trainer.comps.unet.train()
    trainer.method.train()
    gen = torch.Generator().manual_seed(0)

    def step():
        loss = trainer.loss(batches.draw(gen, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return trainer, step, opt


def concatenation_share(step) -> float:
    """Share of one copy step's CPU time spent concatenating [K; K_c] and [V; V_c] for the joint attention
    (the aten::cat calls inside CopyAttnProcessor._inject): what a kernel reading two K/V sources would save.
    Their backward is two narrow views, which copy nothing."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from t2i_fast.methods.selfattn_copy import CopyAttnProcessor

    inject = CopyAttnProcessor._inject

    def labelled(self, *args):
        with record_function("joint_attention"):
            return inject(self, *args)

    CopyAttnProcessor._inject = labelled
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        CopyAttnProcessor._inject = inject
    events = prof.events()

    def inside(e):
        while e is not None:
            if e.name == "joint_attention":
                return True
            e = e.cpu_parent
        return False

    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.name == "aten::cat" and inside(e)) / total


def step_bench(args) -> list[dict]:
    import gc

    import torch

    from t2i_fast import toy
    from t2i_fast.memtrack import TensorMemory, resident_bytes

    torch.set_num_threads(args.threads)
    rows = []
    for size in args.models:
        if size == "toy":
            model, resolution = str(toy.default_model_path()), None
        else:
            from bench_train import images_dir, model_dir

            model, resolution = str(model_dir(size)), args.resolution
        images = str(toy.concept(CONCEPTS[0]).images_dir if size == "toy" else images_dir(args.resolution))
        work = Path(tempfile.mkdtemp(prefix="bench-copy-step-"))
        _, copy_rank, switches = VARIANTS[args.copy_variant]
        sides = {"lora": ("lora", args.lora_rank, {}), "copy": ("selfattn_copy", args.copy_rank or copy_rank, switches)}
        setups, memory, params = {}, {}, {}
        for side, (method, rank, switches) in sides.items():
            with switched(switches):
                trainer, step, opt = step_setup(model, method, rank, resolution, images, work / side)
            trained = [p for g in trainer.method.param_groups() for p in g["params"]]
            params[side] = sum(p.numel() for p in trained)
            step()  # warm-up, and the optimizer's state exists from here on
            state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
            injector = getattr(trainer.method, "injector", None)  # the copy's reference latents and noise
            kept = [t for t in (injector.reference, injector.noise) if t is not None] if injector else []
            resident = resident_bytes([*trainer.comps.unet.state_dict().values(),
                                       *trainer.comps.text_encoder.state_dict().values(), *trained, *state, *kept])
            gc.collect()
            with TensorMemory() as mem:
                step()
            memory[side] = (resident, mem.peak)
            setups[side] = step
        med = alternated_medians(setups, args.rounds, args.steps)
        total = {s: sum(memory[s]) for s in sides}
        concat = concatenation_share(setups["copy"])
        print(f"{size}: trainable parameters lora r{args.lora_rank} {params['lora']}, {args.copy_variant} "
              f"r{sides['copy'][1]} {params['copy']}")
        for s in sides:
            print(f"  {s}: {med[s] * 1e3:.1f} ms/step (median of {args.rounds}), step peak "
                  f"{memory[s][1] / 2**20:.1f} MiB over {memory[s][0] / 2**20:.1f} MiB resident = "
                  f"{total[s] / 2**20:.1f} MiB")
        print(f"  copy / lora: time {med['copy'] / med['lora']:.2f}x (target <= 2.2x), memory "
              f"{total['copy'] / total['lora']:.2f}x (target <= 1.5x), step peak alone "
              f"{memory['copy'][1] / memory['lora'][1]:.2f}x")
        print(f"  the copy step's time in concatenating [K; K_c], [V; V_c] (aten::cat; its backward is views): "
              f"{concat:.1%}")
        case = f"{size}-{args.copy_variant}-r{sides['copy'][1]}-vs-lora-r{args.lora_rank}"
        rows += [{"bench": "selfattn_copy_step", "case": case, "variant": s, "metric": "s_per_step",
                  "value": f"{med[s]:.5f}", "unit": "s"} for s in sides]
        rows += [{"bench": "selfattn_copy_step", "case": case, "variant": s, "metric": "peak_tensor_mb",
                  "value": f"{total[s] / 2**20:.2f}", "unit": "MiB"} for s in sides]
        rows.append({"bench": "selfattn_copy_step", "case": case, "variant": "copy", "metric": "concat_share",
                     "value": f"{concat:.4f}", "unit": "fraction"})
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["quality", "step", "summarize"])
    p.add_argument("--variants", nargs="+", default=["lora", "copy"], choices=list(VARIANTS))
    p.add_argument("--concepts", nargs="+", default=CONCEPTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out", default=None, help="quality: append JSON lines here")
    p.add_argument("files", nargs="*", help="summarize: files written by --out")
    p.add_argument("--models", nargs="+", default=["toy", "mid"], help="step: toy and/or tiny / mid / sd15")
    p.add_argument("--resolution", type=int, default=256, help="step: resolution of the non-toy models")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--copy-variant", default="copy", choices=[v for v in VARIANTS if v.startswith("copy")],
                   help="step: the selfattn_copy variant")
    p.add_argument("--copy-rank", type=int, default=None, help="step: its rank (default: the variant's)")
    p.add_argument("--steps", type=int, default=10, help="step: timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if args.part == "step":
        rows = step_bench(args)
        if not args.no_csv:
            append_results(rows)
        return 0
    rows = [json.loads(line) for f in args.files for line in open(f)]

    def write(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    if args.part == "quality":
        import torch

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory(prefix="bench-copy-") as work:
            quality(args, Path(work), write)
    summarize(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
