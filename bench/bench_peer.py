"""Ours against the real diffusers example trainers, each run in its own process, same inputs on both sides.

The peers are diffusers' own scripts, unmodified, from a folder the user gives (their diffusers checkout's
examples, or any folder holding the files): train_dreambooth_lora.py (lora), textual_inversion.py
(textual_inversion), train_custom_diffusion.py (custom_diffusion), and train_dreambooth_lora_sdxl.py (lora on an
SDXL model: the step part with --step-model sdxl-tiny | sdxl-mid or an SDXL model folder). They need torchvision,
which does not install next to every torch build, so they may run in another Python (--peer-python), e.g.

    python -m venv ~/peer-venv
    ~/peer-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 diffusers==0.42.1 transformers==5.25.0 \\
        peft==0.21.2 accelerate==1.16.0
    python bench/bench_peer.py --diffusers-examples ~/diffusers/examples --peer-python ~/peer-venv/bin/python

Two parts (--parts):

concept  time to concept and quality on the bundled toy model, per method, bundled concept and seed:
         script   the peer script's full run (SCRIPT_HP: steps, lr; rank 4, batch 1, constant lr, no checkpoints)
         ours     `t2i-fast train --images I --token T --class-word C [--method M] --seed S`: our defaults,
                  early stopping included (the run also draws its sample grid and scores itself: that counts)
         ours-bare           the same defaults with --num-samples 0 --no-evaluate: the script's deliverable (the
                             adapter file only), so the wall ratio without our sample grid and self-scoring
         ours-same           our trainer with the script's hyperparameters and prompt, no early stopping, no
                             flips (the script has none), no samples: quality at equal steps
         ours-same-gaussian  (lora) the same with --lora-init gaussian, the script's init
         Every run is scored by the toy evaluator (t2i_fast.toy.evaluator: subject fidelity, prompt fidelity,
         preservation; 4 images per prompt, 12 steps) in this process; the base model's subject fidelity is
         the zero of the fidelity gain. Reported per variant: the mean over concepts of the mean over seeds
         ± its standard error (from the spread over seeds within each concept).
         Seeds pair only our own variants (same trainer, same streams: their differences are paired by
         seed); the script draws its own streams, so it is compared unpaired. Time to concept: wall(ours) /
         wall(script), and the fidelity-gain ratio (SF(ours) - base) / (SF(script) - base), from the means,
         with a delta-method standard error (the wall ratio is the mean of the per-seed ratios: the two
         runs of a seed run back to back, under the same load).
step     per-step time and peak memory on a bigger model (--step-model, default the "mid" test model) at
         --resolution (256): LoRA rank 4 (or TI / Custom Diffusion), batch 1. Steady s/step is
         (wall(2N steps) - wall(N steps)) / N for both sides alike, so start-up, model loading, caching and
         saving cancel; N = --steps. Peak memory: the child's own peak RSS (os.wait4's ru_maxrss), its
         2N-step run. --rounds pairs, alternating which side goes first; medians are reported.
         SDXL: no method key of its own. The model decides the peer, as it decides our trainer's path: an
         SDXL --step-model (sdxl-tiny, sdxl-mid, or a folder with text_encoder_2/) runs
         train_dreambooth_lora_sdxl.py for --methods lora (the only SDXL peer here; TI and CD are refused),
         fp32 on the CPU, no --pretrained_vae_model_name_or_path (so no fp16-fix VAE is loaded), no text
         encoder training, and ours runs `t2i-fast train --model DIR --method lora ...` the same as for SD.

Each run is a fresh process with HF_HUB_OFFLINE=1 and OMP_NUM_THREADS=--threads on both sides; pin the whole
bench with `taskset -c 1` on a shared machine. Concept images are copied into a folder of images only (the
scripts read every file). Rows go to bench/results.csv (bench "peer").

Flag mapping, ours -> the script's (lora; TI and CD below in script_args()):
  --model M                 --pretrained_model_name_or_path M
  --images DIR              --instance_data_dir DIR   (TI: --train_data_dir)
  --token T --class-word C  --instance_prompt "a photo of T C"  (ours: --template "a photo of {token} {cls}")
  --resolution R            --resolution R
  --lora-rank 4             --rank 4
  --lora-init gaussian      (the script's init, always)
  --lr X                    --learning_rate X
  --batch-size 1            --train_batch_size 1
  --max-steps N             --max_train_steps N
  --early-stop none         (the script has no early stopping)
  --lr-schedule constant    --lr_scheduler constant
  --weight-decay 1e-2       --adam_weight_decay 1e-2 (the script's default; the SDXL script's is 1e-4, so
                            it is given 1e-2 explicitly: ours is the same on both models)
  --max-grad-norm 1.0       --max_grad_norm 1.0 (default)
  --no-random-flip          (train_dreambooth_lora.py has no flip; the SDXL script's --random_flip is off)
  (none: fp32)              (no --mixed_precision; SDXL: no --pretrained_vae_model_name_or_path, no
                            --train_text_encoder)
  --seed S                  --seed S
  --checkpoint-every 0      --checkpointing_steps 100000 (no mid-run checkpoints)

  python bench/bench_peer.py --diffusers-examples DIR --peer-python PY --quick        # smoke, every method
  taskset -c 1 python bench/bench_peer.py --diffusers-examples DIR --peer-python PY --parts concept \\
      --methods lora --concepts teal_ring pink_heart moon --seeds 8
  taskset -c 1 python bench/bench_peer.py --diffusers-examples DIR --peer-python PY --parts step --rounds 3
  python bench/bench_peer.py --diffusers-examples DIR --peer-python PY --quick --parts step \\
      --step-model sdxl-tiny --resolution 64                                       # smoke, SDXL LoRA
  taskset -c 1 python bench/bench_peer.py --diffusers-examples DIR --peer-python PY --parts step \\
      --methods lora --step-model sdxl-mid --resolution 256 --steps 2 --rounds 1   # SDXL LoRA, one core
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

SCRIPTS = {"lora": "train_dreambooth_lora.py", "textual_inversion": "textual_inversion.py",
           "custom_diffusion": "train_custom_diffusion.py"}
# the peers on an SDXL model (the step part's --step-model sdxl-*): LoRA only
SDXL_SCRIPTS = {"lora": "train_dreambooth_lora_sdxl.py"}
# the script's full run on the toy model: LoRA as in the issue that asked for this bench; TI and Custom
# Diffusion at our method defaults (the DVAR paper's caps), so that only the implementation differs
SCRIPT_HP = {"lora": dict(steps=1000, lr=1e-3), "textual_inversion": dict(steps=6100, lr=5e-3),
             "custom_diffusion": dict(steps=500, lr=1e-5)}
PROMPT = "a photo of {token} {cls}"
METRICS = ("subject_fidelity", "prompt_fidelity", "preservation")
HOW_TO_GET = """bench_peer.py needs the diffusers example scripts: pass --diffusers-examples DIR, a folder holding
train_dreambooth_lora.py, textual_inversion.py, train_custom_diffusion.py and, for an SDXL --step-model,
train_dreambooth_lora_sdxl.py (e.g. a diffusers checkout's examples/ folder: git clone
https://github.com/huggingface/diffusers), and --peer-python PY, a Python where they run (torch + torchvision +
diffusers + transformers + peft + accelerate; see this file's docstring)."""


# ------------------------------------------------------------------------------------------ inputs
def find_script(examples: Path, method: str, sdxl: bool = False) -> Path:
    """The peer script of `method` (on an SDXL model if `sdxl`) in `examples` itself or in its usual subfolder."""
    if sdxl and method not in SDXL_SCRIPTS:
        raise SystemExit(f"the step part has an SDXL peer for {', '.join(SDXL_SCRIPTS)} only, not {method}: pass "
                         f"--methods {' '.join(SDXL_SCRIPTS)} with an SDXL --step-model, or an SD one for {method}.")
    name = (SDXL_SCRIPTS if sdxl else SCRIPTS)[method]
    sub = {"lora": "dreambooth", "textual_inversion": "textual_inversion", "custom_diffusion": "custom_diffusion"}
    for p in (examples / name, examples / sub[method] / name):
        if p.is_file():
            return p
    raise SystemExit(f"{name} is not in {examples} (nor in {examples / sub[method]}).\n{HOW_TO_GET}")


def is_sdxl(model: str | Path) -> bool:
    """Whether a --step-model (a test model's name or a folder) is SDXL: our trainer's rule, text_encoder_2/."""
    return str(model).startswith("sdxl") if not Path(model).is_dir() else (Path(model) / "text_encoder_2").is_dir()


def image_folder(src: Path, dest: Path) -> Path:
    """A copy of src's images alone: the scripts train on every file of their folder (concept.json too)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            shutil.copyfile(p, dest / p.name)
    return dest


def script_args(method: str, model: Path, images: Path, token: str, cls: str, res: int, steps: int, lr: float,
                seed: int, out: Path, sdxl: bool = False) -> list[str]:
    """The peer script's command-line for our run with the same inputs (see the mapping in the docstring)."""
    common = ["--pretrained_model_name_or_path", str(model), "--resolution", str(res), "--train_batch_size", "1",
              "--max_train_steps", str(steps), "--learning_rate", str(lr), "--lr_scheduler", "constant",
              "--seed", str(seed), "--output_dir", str(out), "--checkpointing_steps", "100000"]
    if method == "lora":
        # SDXL: its weight decay defaults to 1e-4, ours and train_dreambooth_lora.py's to 1e-2
        return common + ["--instance_data_dir", str(images), "--instance_prompt", PROMPT.format(token=token, cls=cls),
                         "--rank", "4"] + (["--adam_weight_decay", "1e-2"] if sdxl else [])
    if method == "textual_inversion":  # its own prompt templates ("a photo of a {}", ...), as ours has
        return common + ["--train_data_dir", str(images), "--placeholder_token", token, "--initializer_token", cls,
                         "--learnable_property", "object", "--adam_weight_decay", "0", "--save_steps", "1000000"]
    # custom_diffusion, without prior preservation (ours runs without class images by default too). --noaug: the
    # script's resize augmentation (2 in 3 steps) pastes the image at 1/3 to 1x its size and masks the loss to the
    # pasted region on the latent grid, less one cell at each edge; on the toy model's 8 x 8 latents that region
    # is empty for the smaller sizes, and at batch 1 the masked mean is then 0/0: the loss went NaN near step 125
    # (teal_ring, seed 0) and stayed NaN. Ours has no such augmentation either.
    return common + ["--instance_data_dir", str(images), "--instance_prompt", PROMPT.format(token=token, cls=cls),
                     "--modifier_token", token, "--initializer_token", cls, "--noaug"]


def ours_args(method: str, variant: str, model: Path | None, images: Path, token: str, cls: str, steps: int,
              lr: float, seed: int, out: Path, res: int | None = None) -> list[str]:
    """`t2i-fast train` for a variant: "ours" (defaults; `steps` caps a smoke run), "ours-same" / "ours-same-gaussian" (the script's
    hyperparameters), "ours-steps" (the script's hyperparameters, for per-step timing)."""
    args = ["--images", str(images), "--token", token, "--class-word", cls, "--seed", str(seed), "--out", str(out)]
    args += ["--method", method] if method != "lora" else []
    args += ["--model", str(model)] if model is not None else []
    args += ["--resolution", str(res)] if res is not None else []
    if variant in ("ours", "ours-bare"):  # steps given: a smoke run's cap (--quick); None: the method's default
        bare = ["--num-samples", "0", "--no-evaluate"] if variant == "ours-bare" else []
        return args + (["--max-steps", str(steps)] if steps else []) + bare
    # the script's batch of 1, also where our toy defaults would train a larger one (app.TOY_DEFAULTS)
    args += ["--max-steps", str(steps), "--lr", str(lr), "--batch-size", "1", "--early-stop", "none",
             "--num-samples", "0", "--no-evaluate"]
    if method == "lora":
        args += ["--template", PROMPT, "--lora-rank", "4", "--no-random-flip"]
        args += ["--lora-init", "gaussian"] if variant.endswith("gaussian") else []
    if method == "textual_inversion":
        args += ["--weight-decay", "0"]
    if method == "custom_diffusion":
        args += ["--template", PROMPT]
    return args


# -------------------------------------------------------------------------------------------- runs
def run_child(cmd: list[str], log: Path, threads: int) -> dict:
    """Run cmd to its end; wall seconds and the child's own peak RSS (MiB). Raises with the log's tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        t0 = time.perf_counter()
        # cwd: the log's folder, not the caller's; `python -m` puts the cwd first on sys.path, and a source
        # checkout there would shadow the t2i_fast the environment names (PYTHONPATH, installed package)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        # os.wait4, not Popen.wait: it returns this child's rusage alone (RUSAGE_CHILDREN keeps the max of all)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:2])} exited with {proc.returncode} (log {log}):\n{tail}")
    return {"wall_s": wall, "peak_mb": usage.ru_maxrss / 1024}


def run_variant(args, method: str, variant: str, concept, seed: int, images: Path, work: Path,
                model: Path | None = None, res: int | None = None, steps: int | None = None) -> dict:
    hp = dict(SCRIPT_HP[method], **({"steps": steps} if steps else {}))
    out = work / f"{method}-{variant}-{concept.name}-{seed}-{hp['steps']}"
    shutil.rmtree(out, ignore_errors=True)
    if variant == "script":
        sdxl = model is not None and is_sdxl(model)
        script = find_script(Path(args.diffusers_examples), method, sdxl)
        cmd = [args.peer_python, str(script), *script_args(method, model or toy_model(), images, concept.token,
                                                           concept.class_word, res or 32, hp["steps"], hp["lr"],
                                                           seed, out, sdxl)]
    else:
        cmd = [sys.executable, "-m", "t2i_fast.cli", "train",
               *ours_args(method, variant, model, images, concept.token, concept.class_word,
                          steps if variant in ("ours", "ours-bare") else hp["steps"], hp["lr"], seed, out, res)]
    res_ = run_child(cmd, work / f"{out.name}.log", args.threads)
    res_["out"] = out
    return res_


def toy_model() -> Path:
    from t2i_fast.toy.evaluator import default_model_path

    return default_model_path()


def loadable(out: Path) -> Path:
    """`out`, or for train_custom_diffusion.py's output a copy diffusers can load back. The script saves
    safetensors with the trained attn2 processors only; diffusers 0.42's load_attn_procs then refuses the file
    (7 processors for 14 attention layers). Ours writes an empty entry for every other layer (see
    methods/custom_diffusion.placeholders): the same is added here, the weights untouched."""
    from safetensors.torch import load_file, save_file

    from t2i_fast.methods.custom_diffusion import CD_FILE, placeholders

    if not (out / CD_FILE).is_file():
        return out
    state = load_file(str(out / CD_FILE))
    if any(k.endswith(".processor") for k in state):  # already has them (ours)
        return out
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(toy_model(), subfolder="unet")
    dest = out / "loadable"
    dest.mkdir(exist_ok=True)
    save_file({**state, **placeholders(unet)}, str(dest / CD_FILE))
    for p in out.glob("<*>.safetensors"):
        shutil.copyfile(p, dest / p.name)
    return dest


def score(out: Path, concept, n_images: int, steps: int) -> dict:
    """The toy evaluator's scores of the adapter files in `out` (ours or the script's: same loaders)."""
    from t2i_fast.toy.evaluator import evaluate

    out = loadable(out)
    r = evaluate(None, concept.token, concept.class_word, concept.name, adapter_dir=out, n_images=n_images,
                 num_inference_steps=steps)
    return {m: r[m] for m in METRICS}


# ---------------------------------------------------------------------------------------- statistics
def mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def strat_mean_se(runs: list[dict], key: str) -> tuple[float, float]:
    """Mean over concepts of each concept's mean over seeds; its se from the within-concept spreads only (the
    concepts are fixed, not sampled: their differences are no noise). A concept with one run adds no se."""
    per = {}
    for r in runs:
        per.setdefault(r["concept"], []).append(r[key])
    stats = [mean_se(xs) for xs in per.values()]
    return (statistics.fmean(m for m, _ in stats),
            math.sqrt(sum(se ** 2 for _, se in stats if se == se)) / len(stats))


def ratio_se(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """a/b of two independent means with standard errors, the ratio's se by the delta method."""
    r = a[0] / b[0]
    return r, abs(r) * math.hypot(a[1] / a[0], b[1] / b[0])


# ------------------------------------------------------------------------------------------- concept
def run_line(method: str, r: dict) -> str:
    """One run's printed line; parse_runs reads these back (--summarize)."""
    return (f"{method} {r['concept']} seed {r['seed']} {r['variant']}: wall {r['wall_s']:.1f} s, peak "
            f"{r['peak_mb']:.0f} MB, " + ", ".join(f"{m} {r[m]:.3f}" for m in METRICS))


RUN_LINE = re.compile(r"^(\S+) (\S+) seed (\d+) (\S+): wall ([\d.]+) s, peak ([\d.]+) MB, subject_fidelity "
                      r"(-?[\d.]+), prompt_fidelity (-?[\d.]+), preservation (-?[\d.]+)$")


def parse_runs(paths: list[str]) -> dict[str, list[dict]]:
    """{method: [run]} from the run lines of earlier bench logs (e.g. runs split over cores or cut short)."""
    runs: dict[str, list[dict]] = {}
    for path in paths:
        for line in Path(path).read_text(errors="replace").splitlines():
            m = RUN_LINE.match(line.strip())
            if m:
                vals = m.groups()
                runs.setdefault(vals[0], []).append(
                    dict(concept=vals[1], seed=int(vals[2]), variant=vals[3], wall_s=float(vals[4]),
                         peak_mb=float(vals[5]), **{k: float(v) for k, v in zip(METRICS, vals[6:])}))
    return runs


def report(method: str, runs: list[dict], bases: dict[str, dict]) -> tuple[list[str], list[dict]]:
    """The table, the time-to-concept ratios and the init comparison of one method's runs; results.csv rows."""
    for r in runs:
        r["gain"] = r["subject_fidelity"] - bases[r["concept"]]["subject_fidelity"]
    concepts = sorted({r["concept"] for r in runs})
    seeds = max(len({r["seed"] for r in runs if r["concept"] == c}) for c in concepts)
    case = f"{method}-toy-{'+'.join(concepts)}-x{seeds}"
    variants = [v for v in ("script", "ours", "ours-bare", "ours-same", "ours-same-gaussian")
                if any(r["variant"] == v for r in runs)]
    by = {v: sorted((r for r in runs if r["variant"] == v), key=lambda r: (r["concept"], r["seed"])) for v in variants}
    base_sf = statistics.fmean(bases[c]["subject_fidelity"] for c in concepts)
    lines = [f"\n{method}: {len(concepts)} concepts ({', '.join(concepts)}), up to {seeds} seeds each; base subject "
             f"fidelity {base_sf:.3f}; mean over concepts of the mean over seeds ± its se",
             "| variant | runs | wall s | peak MB | subject fid. | gain over base | prompt fid. | preservation |",
             "|---|---|---|---|---|---|---|---|"]
    keys = ("wall_s", "peak_mb", "subject_fidelity", "gain", "prompt_fidelity", "preservation")
    stats = {v: {k: strat_mean_se(rs, k) for k in keys} for v, rs in by.items()}
    rows = []
    for v, st in stats.items():
        digits = {"wall_s": 1, "peak_mb": 0}
        lines.append(f"| {v} | {len(by[v])} | " + " | ".join(
            f"{st[k][0]:.{digits.get(k, 3)}f} ± {st[k][1]:.{digits.get(k, 3)}f}" for k in keys) + " |")
        rows += [{"bench": "peer", "case": case, "variant": v, "metric": k, "value": f"{st[k][0]:.4f}",
                  "spread": f"{st[k][1]:.4f}", "unit": {"wall_s": "s", "peak_mb": "MB"}.get(k, "score")} for k in keys]
    for ours in [v for v in ("ours", "ours-bare") if v in stats and "script" in stats]:
        sc, o = stats["script"], stats[ours]
        # wall: the two runs of a (concept, seed) ran back to back, so their ratio is paired in time (a shared
        # machine's load drifts over an hour); fidelity: the sides draw different streams, so means are compared
        script_wall = {(r["concept"], r["seed"]): r["wall_s"] for r in by["script"]}
        wall = mean_se([r["wall_s"] / script_wall[(r["concept"], r["seed"])] for r in by[ours]
                        if (r["concept"], r["seed"]) in script_wall])
        gain = ratio_se(o["gain"], sc["gain"])
        dp, dq = (o[k][0] - sc[k][0] for k in ("prompt_fidelity", "preservation"))
        ok = gain[0] >= 0.95 and wall[0] <= 0.25 and dp >= -0.03 and dq >= -0.03
        lines.append(f"time to concept, {ours} (defaults) / script ({SCRIPT_HP[method]['steps']} steps, lr "
                     f"{SCRIPT_HP[method]['lr']:g}): wall {wall[0]:.3f} ± {wall[1]:.3f} ({1 / wall[0]:.2f}x sooner); "
                     f"fidelity gain {gain[0]:.2f} ± {gain[1]:.2f}; prompt fid. {dp:+.3f}, preservation {dq:+.3f} "
                     f"-> target (gain >= 0.95, wall <= 0.25, others >= -0.03) {'met' if ok else 'NOT met'}")
        rows += [{"bench": "peer", "case": case, "variant": ours, "metric": metric, "value": f"{val[0]:.4f}",
                  "spread": f"{val[1]:.4f}", "baseline": "script", "ratio": f"{val[0]:.4f}"}
                 for metric, val in (("wall_ratio", wall), ("gain_ratio", gain))]
    if "ours-same" in by and "ours-same-gaussian" in by:
        # same trainer, same seed, same streams: paired differences over the (concept, seed) both have
        kaiming = {(r["concept"], r["seed"]): r for r in by["ours-same"]}
        pairs = [(g, kaiming[(g["concept"], g["seed"])]) for g in by["ours-same-gaussian"]
                 if (g["concept"], g["seed"]) in kaiming]
        for m in METRICS:
            d = mean_se([g[m] - k[m] for g, k in pairs])
            lines.append(f"init, gaussian - kaiming at equal steps ({len(pairs)} runs paired by concept and seed): "
                         f"{m} {d[0]:+.3f} ± {d[1]:.3f}")
            rows.append({"bench": "peer", "case": case, "variant": "gaussian-minus-kaiming", "metric": m,
                         "value": f"{d[0]:.4f}", "spread": f"{d[1]:.4f}", "unit": "score"})
    return lines, rows


def concept_part(args, work: Path) -> list[dict]:
    from bench_quality import base_scores
    from t2i_fast import toy

    rows, lines = [], []
    for method in args.methods:
        variants = [v for v in args.variants if v != "ours-same-gaussian" or method == "lora"]
        runs, bases = [], {}
        for name in args.concepts:
            c = toy.concept(name)
            images = image_folder(c.images_dir, work / "images" / name)
            bases[name] = base_scores(name, args.n_images, args.eval_steps)
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                # alternate which side goes first, so that drifting load hits both
                for v in (variants if seed % 2 == 0 else variants[::-1]):
                    r = run_variant(args, method, v, c, seed, images, work,
                                    steps=args.quick_steps if args.quick else None)
                    r.update(score(r["out"], c, args.n_images, args.eval_steps), concept=name, seed=seed, variant=v)
                    shutil.rmtree(r.pop("out"), ignore_errors=True)
                    runs.append(r)
                    print(run_line(method, r), flush=True)
        found, found_rows = report(method, runs, bases)
        print("\n".join(found), flush=True)
        lines += found
        rows += found_rows
    print("\n".join(lines))
    return rows


def summarize(args) -> list[dict]:
    """--summarize LOG...: the concept part's report from the run lines of earlier logs."""
    from bench_quality import base_scores

    rows = []
    for method, runs in parse_runs(args.summarize).items():
        bases = {c: base_scores(c, args.n_images, args.eval_steps) for c in sorted({r["concept"] for r in runs})}
        lines, found = report(method, runs, bases)
        print("\n".join(lines))
        rows += found
    return rows


# ---------------------------------------------------------------------------------------------- step
def step_part(args, work: Path) -> list[dict]:
    from types import SimpleNamespace

    from bench_train import images_dir, model_dir

    model = model_dir(args.step_model)
    images = image_folder(images_dir(args.resolution), work / "step-images")
    # "x": the test models' byte-level tokenizers make "dog" three tokens, and the TI and CD scripts take a
    # single-token initializer only (it plays no part in a step's cost)
    c = SimpleNamespace(name=args.step_model, token="<sks>", class_word="x")
    n = args.steps
    rows = []
    for method in args.step_methods:
        runs: dict[str, list[dict]] = {"script": [], "ours-steps": []}
        for rnd in range(args.rounds):
            for v in (["script", "ours-steps"] if rnd % 2 == 0 else ["ours-steps", "script"]):
                short = run_variant(args, method, v, c, 0, images, work, model, args.resolution, n)
                long = run_variant(args, method, v, c, 0, images, work, model, args.resolution, 2 * n)
                for r in (short, long):
                    shutil.rmtree(r.pop("out"), ignore_errors=True)
                runs[v].append({"s_per_step": (long["wall_s"] - short["wall_s"]) / n, "peak_mb": long["peak_mb"],
                                "wall_2n": long["wall_s"]})
                print(f"{method} round {rnd} {v}: {runs[v][-1]['s_per_step']:.3f} s/step, peak "
                      f"{long['peak_mb']:.0f} MB, wall {long['wall_s']:.1f} s for {2 * n} steps", flush=True)
        med = {v: {k: statistics.median(r[k] for r in rs) for k in ("s_per_step", "peak_mb")} for v, rs in runs.items()}
        per_round = [s["s_per_step"] / o["s_per_step"] for s, o in zip(runs["script"], runs["ours-steps"])]
        speedup, mem = statistics.median(per_round), med["ours-steps"]["peak_mb"] / med["script"]["peak_mb"]
        case = f"{args.step_model}-{args.resolution}px-{method}-b1-r4-t{args.threads}"
        print(f"{case}: ours {med['ours-steps']['s_per_step']:.3f} s/step vs script {med['script']['s_per_step']:.3f} "
              f"(medians of {args.rounds}, (wall(2N) - wall(N)) / N, N = {n}) -> {speedup:.2f}x (per round "
              f"{min(per_round):.2f}-{max(per_round):.2f}x); peak RSS ours {med['ours-steps']['peak_mb']:.0f} MB vs "
              f"{med['script']['peak_mb']:.0f} MB ({mem:.2f}x)", flush=True)
        spread = (max(per_round) - min(per_round)) / 2
        rows += [{"bench": "peer", "case": case, "variant": "ours", "metric": "s_per_step",
                  "value": f"{med['ours-steps']['s_per_step']:.4f}", "spread": f"{spread:.3f}", "unit": "s",
                  "baseline": "script", "ratio": f"{speedup:.3f}"},
                 {"bench": "peer", "case": case, "variant": "script", "metric": "s_per_step",
                  "value": f"{med['script']['s_per_step']:.4f}", "unit": "s"},
                 {"bench": "peer", "case": case, "variant": "ours", "metric": "peak_mb",
                  "value": f"{med['ours-steps']['peak_mb']:.0f}", "unit": "MB", "baseline": "script",
                  "ratio": f"{mem:.3f}"},
                 {"bench": "peer", "case": case, "variant": "script", "metric": "peak_mb",
                  "value": f"{med['script']['peak_mb']:.0f}", "unit": "MB"}]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-examples", help="folder with diffusers' example scripts (see below)")
    p.add_argument("--peer-python", default=sys.executable, help="Python that runs the scripts (default: this one)")
    p.add_argument("--parts", nargs="+", choices=["concept", "step"], default=["concept", "step"])
    p.add_argument("--methods", nargs="+", choices=list(SCRIPTS), default=["lora"])
    p.add_argument("--variants", nargs="+", default=["script", "ours", "ours-same", "ours-same-gaussian"],
                   choices=["script", "ours", "ours-bare", "ours-same", "ours-same-gaussian"],
                   help="concept part's runs")
    p.add_argument("--concepts", nargs="+", default=["teal_ring", "pink_heart", "moon"], help="bundled concepts")
    p.add_argument("--seeds", type=int, default=8, help="training seeds per concept and variant")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds run from here (more seeds later, merged with --summarize)")
    p.add_argument("--rounds", type=int, default=3, help="step part: alternated script/ours pairs")
    p.add_argument("--steps", type=int, default=30, help="step part: N (runs of N and 2N steps)")
    p.add_argument("--step-model", default="mid",
                   help="step part: tiny | mid | sd15 | sdxl-tiny | sdxl-mid test model, or a model folder; an SDXL "
                        "one runs train_dreambooth_lora_sdxl.py against ours, for --methods lora only")
    p.add_argument("--resolution", type=int, default=256, help="step part: training resolution")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run, both sides")
    p.add_argument("--n-images", type=int, default=4, help="evaluator: images per prompt")
    p.add_argument("--eval-steps", type=int, default=12, help="evaluator: denoising steps")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: every method, 1 concept x 1 seed, 20-step runs, step part N = 2, 1 round "
                        "(lora alone in the step part when --step-model is SDXL)")
    p.add_argument("--keep", action="store_true", help="keep the runs' folder (its path is printed)")
    p.add_argument("--no-csv", action="store_true", help="do not append to bench/results.csv")
    p.add_argument("--summarize", nargs="+", metavar="LOG",
                   help="run nothing: report the concept part from the run lines of these earlier logs")
    args = p.parse_args(argv)
    if args.summarize:
        rows = summarize(args)
        if rows and not args.no_csv:
            append_results(rows)
        return 0
    if not args.diffusers_examples or not Path(args.diffusers_examples).is_dir():
        print(HOW_TO_GET, file=sys.stderr)
        return 2
    args.diffusers_examples = str(Path(args.diffusers_examples).resolve())  # the runs' working folder is elsewhere
    args.quick_steps = 20
    if args.quick:
        args.methods, args.concepts, args.seeds = list(SCRIPTS), args.concepts[:1], 1
        args.steps, args.rounds = 2, 1
    # the step part's methods: on an SDXL model, lora alone (--quick drops the others; asked for, they are refused)
    sdxl = is_sdxl(args.step_model)
    args.step_methods = [m for m in args.methods if m in SDXL_SCRIPTS or not (sdxl and args.quick)]
    for part, methods, on_sdxl in (("concept", args.methods, False), ("step", args.step_methods, sdxl)):
        for m in methods if part in args.parts else []:
            find_script(Path(args.diffusers_examples), m, on_sdxl)
    work = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    print(f"runs and logs in {work}", flush=True)
    rows = []
    try:
        if "concept" in args.parts:
            rows += concept_part(args, work)
        if "step" in args.parts:
            rows += step_part(args, work)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        if rows and not args.no_csv and not args.quick:
            append_results(rows)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
