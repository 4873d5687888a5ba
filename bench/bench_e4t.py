"""E4T on held-out toy concepts, from ONE image in a few steps, against our default LoRA run on all 5 images.

Part `compare` (the targets): for each bundled example concept (none of them in the E4T pre-training domain)
and seed, the two commands a user types run back to back in their own processes, the order alternating:

    t2i-fast train --images DIR --token T --class-word C --seed S                 # LoRA, our defaults
    t2i-fast train --method e4t --images DIR --token T --class-word C --seed S    # the shipped toy domain

Each writes its own sample grid and scores itself with the toy evaluator (both defaults), so each wall time
is start to exit of a whole default command. Reported, mean over concepts of the mean over seeds ± the
standard error over (concept, seed) pairs:
- the subject-fidelity gain over the base model (the untrained model's score on the same prompts), and
  E4T's gain as a fraction of LoRA's (target >= 90%);
- prompt fidelity (target E4T >= 0.9) and preservation (target E4T >= LoRA - 0.03);
- tuning time, E4T's first step to its file written (report.json first_step_to_files_s), over LoRA's
  training time (train_time_s: caching, probe and steps) (target <= 1/10);
- the whole command's wall time, E4T over LoRA (target <= 1/2).

Part `ablate`: E4T variants trained in this process (scores only): no weight offsets, no encoder (v* a free
vector from the class word), and 1 / 5 / 15 tuning steps.

  python bench/bench_e4t.py compare [--seeds 0 1 ... 7] [--concepts ...] [--threads 1] [--log pairs.jsonl]
  python bench/bench_e4t.py compare --bare ...   # the same pairs with --num-samples 0 --no-evaluate: walls only
  python bench/bench_e4t.py summarize pairs-a.jsonl pairs-b.jsonl   # the runs on two cores, merged
  python bench/bench_e4t.py ablate --seeds 0 1 2 3 [--lr 1e-3] [--domain D]
  python bench/bench_e4t.py encoder --concepts teal_ring ...   # how far the encoder moves v*
  python bench/bench_e4t.py identity [--generated 40] [--domain D]   # does v* carry the identity (the loss)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

HELD_OUT = ("teal_ring", "pink_heart", "checker_square", "blue_tee", "split_diamond", "moon", "bee_ball",
            "orange_arrow", "target")
METRICS = ("subject_fidelity", "prompt_fidelity", "preservation")


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return m, se


HELD_OUT_SEED = 8  # generator identities drawn with a seed the pre-training domain (seed 7) did not use


def held_out_concepts(names: list[str], generated: int, work: Path) -> list:
    """The bundled concepts `names`, then `generated` identities of the toy generator drawn with HELD_OUT_SEED
    (5 views each, like the bundled ones; class word "shape"), written under `work`."""
    from t2i_fast import toy
    from t2i_fast.toy.concept_specs import Concept
    from t2i_fast.toy.e4t_domain import write_domain

    concepts = [toy.concept(n) for n in names]
    if generated:
        folder = write_domain(work / "held-out", generated, 5, HELD_OUT_SEED)
        concepts += [Concept(f"generated-{d.name}", d, "shape", "<sks>") for d in sorted(folder.iterdir())]
    return concepts


def base_subject_fidelity(concepts: list) -> dict[str, float]:
    """The untrained base model's subject fidelity on each concept's prompts: the zero of every gain."""
    from t2i_fast import toy

    return {c.name: toy.evaluate(None, c.token, c.class_word, str(c.images_dir), n_images=4, num_inference_steps=12,
                                 preservation=False)["subject_fidelity"] for c in concepts}


def run_command(args: list[str], threads: int) -> tuple[float, dict]:
    """Wall time (start to exit) of `t2i-fast train ARGS` in its own process, and its report.json."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = Path(args[args.index("--out") + 1])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "t2i_fast.cli", "train", *args, "--overwrite"], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"t2i-fast train {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return wall, json.loads((out / "report.json").read_text())


def compare(concepts: list, seeds: list[int], threads: int, work: Path, log: Path | None, bare: bool = False) -> dict:
    """Run the pairs; each pair's two rows go to `log` (JSONL) as they finish. Returns {side: [row, ...]}.
    bare: both commands with `--num-samples 0 --no-evaluate` (no sample grid, no self-scoring): walls only."""
    base = {} if bare else base_subject_fidelity(concepts)
    rows: dict[str, list[dict]] = {"lora": [], "e4t": []}
    for c in concepts:
        name = c.name
        for seed in seeds:
            common = ["--images", str(c.images_dir), "--token", c.token, "--class-word", c.class_word,
                      "--seed", str(seed), *(["--num-samples", "0", "--no-evaluate"] if bare else [])]
            sides = [("lora", []), ("e4t", ["--method", "e4t"])]
            for side, extra in sides if seed % 2 == 0 else sides[::-1]:
                wall, report = run_command(common + extra + ["--out", str(work / side)], threads)
                row = {"concept": name, "seed": seed, "wall": wall, "train": report["train_time_s"],
                       "tune": report["first_step_to_files_s"], "steps": report["steps"]}
                if not bare:
                    ev = report["eval"]
                    row.update(gain=ev["subject_fidelity"] - base[name], **{m: ev[m] for m in METRICS})
                rows[side].append(row)
            lo, e4 = rows["lora"][-1], rows["e4t"][-1]
            gains = "" if bare else f"gain lora {lo['gain']:.3f} e4t {e4['gain']:.3f}; "
            print(f"{name} seed {seed}: {gains}wall {lo['wall']:.1f} / {e4['wall']:.1f} s", flush=True)
            if log is not None:
                with open(log, "a") as f:
                    f.write(json.dumps({"lora": lo, "e4t": e4}) + "\n")
    return rows


def read_logs(paths: list[Path]) -> dict:
    rows: dict[str, list[dict]] = {"lora": [], "e4t": []}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            pair = json.loads(line)
            for side in rows:
                rows[side].append(pair[side])
    return rows


def summarize(rows: dict, csv: bool) -> None:
    """The targets' numbers over every pair in `rows`."""
    names = sorted({r["concept"] for r in rows["lora"]})
    seeds = len(rows["lora"]) // len(names)
    if "gain" not in rows["lora"][0]:  # `compare --bare`: walls only
        summarize_walls(rows, f"{len(names)}c-{seeds}s", csv)
        return
    summary = {}
    for side, rs in rows.items():
        summary[side] = {k: mean_se([r[k] for r in rs]) for k in ("gain", *METRICS, "wall", "train", "tune")}
    lo, e4 = summary["lora"], summary["e4t"]
    gain_ratio = e4["gain"][0] / lo["gain"][0]
    tune_ratio = e4["tune"][0] / lo["train"][0]
    wall_ratio = mean_se([a["wall"] / b["wall"] for a, b in zip(rows["e4t"], rows["lora"])])
    # paired by (concept, seed): E4T's gain less 90% of LoRA's; the target holds where this is above 0
    margin = mean_se([a["gain"] - 0.9 * b["gain"] for a, b in zip(rows["e4t"], rows["lora"])])
    print(f"\n{len(names)} held-out concepts x {seeds} seeds (mean ± se over pairs)")
    for side in ("lora", "e4t"):
        s = summary[side]
        print(f"{side:5s} gain {s['gain'][0]:.3f} ± {s['gain'][1]:.3f}  SF {s['subject_fidelity'][0]:.3f}  PF "
              f"{s['prompt_fidelity'][0]:.3f} ± {s['prompt_fidelity'][1]:.3f}  pres {s['preservation'][0]:.3f} ± "
              f"{s['preservation'][1]:.3f}  wall {s['wall'][0]:.2f} s  train {s['train'][0]:.2f} s  first step to "
              f"files {s['tune'][0]:.3f} s")
    print(f"E4T gain / LoRA gain {gain_ratio:.2f} (target >= 0.90; paired E4T gain - 0.9 LoRA gain {margin[0]:+.3f} "
          f"± {margin[1]:.3f}); PF {e4['prompt_fidelity'][0]:.3f} (>= 0.9); "
          f"preservation {e4['preservation'][0] - lo['preservation'][0]:+.3f} vs LoRA (>= -0.03); tuning / LoRA "
          f"training {tune_ratio:.3f} (<= 0.10); wall {wall_ratio[0]:.3f} ± {wall_ratio[1]:.3f} (<= 0.50)")
    if csv:
        case = f"{len(names)}c-{seeds}s"
        out = [dict(bench="e4t", case=case, variant=side, metric=k, value=round(v[0], 4), spread=round(v[1], 4),
                    unit="s" if k in ("wall", "train", "tune") else "score", baseline="", ratio="")
               for side, s in summary.items() for k, v in s.items()]
        out += [dict(bench="e4t", case=case, variant="e4t", metric=m, value=round(v, 4), spread="", unit="ratio",
                     baseline="lora", ratio=round(v, 4))
                for m, v in (("gain_ratio", gain_ratio), ("tune_over_train", tune_ratio), ("wall_ratio", wall_ratio[0]))]
        append_results(out)


def summarize_walls(rows: dict, case: str, csv: bool) -> None:
    """The wall and tuning ratios of `compare --bare` pairs (no scores)."""
    walls = {side: mean_se([r["wall"] for r in rs]) for side, rs in rows.items()}
    wall_ratio = mean_se([a["wall"] / b["wall"] for a, b in zip(rows["e4t"], rows["lora"])])
    tune_ratio = mean_se([r["tune"] for r in rows["e4t"]])[0] / mean_se([r["train"] for r in rows["lora"]])[0]
    print(f"\nbare commands (--num-samples 0 --no-evaluate), {case}: lora {walls['lora'][0]:.2f} ± "
          f"{walls['lora'][1]:.2f} s, e4t {walls['e4t'][0]:.2f} ± {walls['e4t'][1]:.2f} s; wall e4t / lora "
          f"{wall_ratio[0]:.3f} ± {wall_ratio[1]:.3f}; tuning / LoRA training {tune_ratio:.3f}")
    if csv:
        append_results([dict(bench="e4t", case=case + "-bare", variant=side, metric="wall", value=round(v[0], 4),
                             spread=round(v[1], 4), unit="s", baseline="", ratio="") for side, v in walls.items()]
                       + [dict(bench="e4t", case=case + "-bare", variant="e4t", metric="wall_ratio",
                               value=round(wall_ratio[0], 4), spread=round(wall_ratio[1], 4), unit="ratio",
                               baseline="lora", ratio=round(wall_ratio[0], 4))])


ABLATIONS = {  # variant: (class attributes of the E4T method, max_steps)
    "e4t-15": ({}, 15), "e4t-10": ({}, 10), "e4t-5": ({}, 5), "e4t-1": ({}, 1),
    "no-offsets": ({"offsets": False}, 15), "no-encoder": ({"encoder": False}, 15),
    "no-encoder-1": ({"encoder": False}, 1),  # with e4t-1: what the encoder alone carries before any tuning
}


def ablate(concepts: list, seeds: list[int], variants: list[str], work: Path, csv: bool, lr: float | None = None,
           domain: str | None = None) -> None:
    """Each variant over concepts x seeds; lr and domain, where given, replace the toy default lr (1e-2) and the
    shipped toy domain (for sweeps and for domains pre-trained otherwise)."""
    from t2i_fast import TrainConfig
    from t2i_fast.app import train
    from t2i_fast.methods.e4t import E4T

    base = base_subject_fidelity(concepts)
    results = {}
    for variant in variants:
        attrs, steps = ABLATIONS[variant]
        saved = {k: getattr(E4T, k) for k in attrs}
        for k, v in attrs.items():
            setattr(E4T, k, v)
        try:
            scores = []
            for c in concepts:
                for seed in seeds:
                    cfg = TrainConfig(method="e4t", images=str(c.images_dir), token=c.token, class_word=c.class_word,
                                      seed=seed, max_steps=steps, out=str(work / variant), overwrite=True,
                                      num_samples=0, progress=False, lr=lr, domain=domain)
                    ev = train(cfg).report["eval"]
                    scores.append({"gain": ev["subject_fidelity"] - base[c.name], **{m: ev[m] for m in METRICS}})
        finally:
            for k, v in saved.items():
                setattr(E4T, k, v)
        results[variant] = {k: mean_se([s[k] for s in scores]) for k in ("gain", *METRICS)}
        r = results[variant]
        print(f"{variant:11s} gain {r['gain'][0]:.3f} ± {r['gain'][1]:.3f}  subject fidelity "
              f"{r['subject_fidelity'][0]:.3f}  PF {r['prompt_fidelity'][0]:.3f}  pres {r['preservation'][0]:.3f}",
              flush=True)
    if csv:
        case = f"{len(concepts)}c-{len(seeds)}s"
        append_results([dict(bench="e4t_ablation", case=case, variant=v, metric=k, value=round(m, 4),
                             spread=round(se, 4), unit="score", baseline="", ratio="")
                        for v, r in results.items() for k, (m, se) in r.items()])


def load_toy_domain(domain: str | None) -> tuple:
    """The bundled model's components (frozen) and a domain made for it (the shipped one by default): (comps,
    encoder head state, offsets, info). A domain pre-trained with a CLIP image encoder has it loaded, from the
    folder it records, as info["encoder_module"]."""
    from t2i_fast.e4t_domain import read_domain
    from t2i_fast.e4t_image_encoder import encoder_for_domain
    from t2i_fast.models import load_components
    from t2i_fast.toy.e4t_domain import SHIPPED
    from t2i_fast.toy.world import default_model_path

    comps = load_components(default_model_path())
    for module in (comps.unet, comps.vae, comps.text_encoder):
        module.requires_grad_(False)
    head_state, offsets, info = read_domain(domain or SHIPPED, comps, "the bundled model")
    info = {**info, "encoder_module": encoder_for_domain(info, None, str(domain or SHIPPED), comps.unet.device)}
    return comps, head_state, offsets, info


def encode_words(comps, head_state: dict, info: dict, pixels) -> tuple:
    """For (N, 3, R, R) pixels: scale δ (N, D), how far the domain's encoder moves each image's word from the
    class word; the VAE latent means; e_class."""
    import torch

    from t2i_fast.e4t_domain import SCALE, EncoderHead, class_embedding, image_features

    features, means = image_features(comps, pixels, image_encoder=info.get("encoder_module"))
    e_class = class_embedding(comps.tokenizer, comps.text_encoder, info["class_word"])
    head = EncoderHead(features.shape[1], e_class.shape[0], info["hidden"])
    head.load_state_dict(head_state)
    with torch.no_grad():
        return info.get("scale", SCALE) * head(features), means, e_class


def encoder_reach(concepts: list, domain: str | None) -> None:
    """How far the pre-trained encoder moves v* from the class word (|scale δ| on each concept's first image),
    against how far apart the model's words lie (mean pairwise distance of the toy vocabulary's embeddings)."""
    import torch

    from t2i_fast.data import ConceptImages
    from t2i_fast.e4t_domain import class_embedding
    from t2i_fast.toy.world import VOCABULARY

    comps, head_state, _, info = load_toy_domain(domain)
    pixels = torch.stack([ConceptImages(c.images_dir, comps.native_resolution, True, False).pixels(0, 0)
                          for c in concepts])
    delta, _, e_class = encode_words(comps, head_state, info, pixels)
    reach = delta.norm(dim=1)
    with torch.no_grad():
        words = torch.stack([class_embedding(comps.tokenizer, comps.text_encoder, w) for w in VOCABULARY])
        spread = torch.pdist(words).mean()
    print(f"|e_class| {e_class.norm():.3f}; |v* - e_class| per concept {[round(float(r), 3) for r in reach]} "
          f"(min {reach.min():.3f}, max {reach.max():.3f}); mean distance between the vocabulary's words {spread:.3f}")


def identity_gap(folder: Path, domain: str | None, repeats: int = 6) -> None:
    """Does the encoder's word carry the concept? The denoising loss of every view of held-out identities (the
    concept folders in `folder`) under "a photo of <token> shape", with the domain's offsets in the UNet and v*
    made from: another view of the same identity, a view of another identity, or the class word alone (δ = 0).
    `repeats` draws of noise and timestep (uniform), the same for the three; other - same > 0 means identity."""
    import torch

    from t2i_fast.data import ConceptImages, format_prompt, tokenize
    from t2i_fast.diffusion import diffusion_loss
    from t2i_fast.e4t_domain import add_encoded_token, install_offsets, offset_state

    comps, head_state, offsets, info = load_toy_domain(domain)
    pixels, owner = [], []
    for n, d in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        images = ConceptImages(d, comps.native_resolution, center_crop=True, random_flip=False)
        pixels += [images.pixels(i, 0) for i in range(len(images.files))]
        owner += [n] * len(images.files)
    delta, means, e_class = encode_words(comps, head_state, info, torch.stack(pixels))
    latents = means * comps.vae.config.scaling_factor
    with torch.no_grad():
        for name, tensor in offset_state(install_offsets(comps.unet, info["rank"])).items():
            tensor.copy_(offsets[name])
    current = {}
    add_encoded_token(comps.tokenizer, comps.text_encoder, "<e4t-probe>", lambda: current["v"])
    ids = tokenize(comps.tokenizer, [format_prompt("a photo of {token} {cls}", "<e4t-probe>", info["class_word"])])
    n = len(owner)
    same_views = [[k for k in range(n) if owner[k] == owner[i] and k != i] for i in range(n)]
    others = [[k for k in range(n) if owner[k] != owner[i]] for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    losses = {"same": [], "other": [], "class": []}
    with torch.no_grad():
        for r in range(repeats):
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(len(comps.scheduler.alphas_cumprod), (n,), generator=gen)
            sources = {"same": [same_views[i][r % len(same_views[i])] for i in range(n)],
                       "other": [others[i][(7 * i + 13 * r) % len(others[i])] for i in range(n)], "class": None}
            for side, source in sources.items():
                current["v"] = e_class[None] + (delta[source] if source is not None else 0)
                text = comps.text_encoder(ids.expand(n, -1))[0]
                losses[side].append(diffusion_loss(comps.unet, comps.scheduler, comps.prediction_type, latents, noise,
                                                   t, text, reduce=False))
    mean = {side: torch.stack(v).mean(0) for side, v in losses.items()}  # per view, over the repeats
    gap = mean["other"] - mean["same"]
    print(f"{len(set(owner))} held-out identities, {n} views, {repeats} noise draws; |v* - e_class| mean "
          f"{delta.norm(dim=1).mean():.3f}; loss with v* of the same identity {mean['same'].mean():.5f}, of another "
          f"{mean['other'].mean():.5f}, the class word {mean['class'].mean():.5f}; other - same "
          f"{gap.mean():+.5f} ± {gap.std() / len(gap) ** 0.5:.5f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["compare", "ablate", "summarize", "encoder", "identity"])
    p.add_argument("logs", nargs="*", type=Path, help="summarize: the --log files of compare runs")
    p.add_argument("--concepts", nargs="*", default=list(HELD_OUT[:5]), help="bundled concept names")
    p.add_argument("--generated", type=int, default=0,
                   help="also this many generator identities drawn with a seed outside pre-training")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="seeds (default 0..7)")
    p.add_argument("--log", type=Path, default=None, help="compare: append each pair's rows to this JSONL file")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--variants", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--lr", type=float, default=None, help="ablate: the tuning lr (default: the toy default)")
    p.add_argument("--domain", default=None,
                   help="ablate, encoder, identity: a domain folder (default: the shipped toy one)")
    p.add_argument("--bare", action="store_true",
                   help="compare: both commands without the sample grid and self-scoring (walls only)")
    p.add_argument("--no-csv", action="store_true")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.part == "summarize":
        summarize(read_logs(a.logs), not a.no_csv)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        concepts = held_out_concepts(a.concepts, a.generated, Path(tmp))
        if a.part == "compare":
            summarize(compare(concepts, a.seeds, a.threads, Path(tmp), a.log, a.bare), not a.no_csv)
        elif a.part == "encoder":
            encoder_reach(concepts, a.domain)
        elif a.part == "identity":
            from t2i_fast.toy.e4t_domain import write_domain

            identity_gap(write_domain(Path(tmp) / "identities", a.generated or 40, 4, HELD_OUT_SEED), a.domain)
        else:
            ablate(concepts, a.seeds, a.variants, Path(tmp), not a.no_csv, a.lr, a.domain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
