"""Validate the toy evaluator's metrics before trusting them; writes t2i_fast/toy/VALIDATION.md.

    python -m t2i_fast.toy.validate [--concepts a,b,c] [--lora-steps N] [--out FILE]

1. encoder: each concept's references against themselves vs against every other concept's references;
2. the base model's own prompt fidelity: "a {colour} {shape} on a {bg} background" for every colour x
   shape x background, with shape, colour and background read back from the pixels;
3. trained vs untrained: a quick DreamBooth-LoRA (``quick_lora``; rank 4 on the UNet attention, the
   token a rare byte string) on some concepts, scored against the base model with the same prompts.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import concept_specs as C
from . import encoder as E
from . import evaluator as V
from . import world

HERE = Path(__file__).resolve().parent


def encoder_table() -> dict:
    names = C.concepts()
    embs = {n: E.embed(C.load_images(n)) for n in names}
    out = {}
    for a in names:
        s = embs[a] @ embs[a].T
        k = len(s)
        self_sim = float((s.sum() - s.diagonal().sum()) / (k * (k - 1)))
        other = {b: float((embs[a] @ embs[b].T).mean()) for b in names if b != a}
        out[a] = dict(self=self_sim, other_mean=float(np.mean(list(other.values()))),
                      other_max=max(other.values()), nearest=max(other, key=other.get))
    return out


def base_prompt_fidelity(pipe, seeds=(0,), steps: int = V.STEPS, guidance: float = V.GUIDANCE) -> dict:
    combos = list(itertools.product(world.SHAPES, world.COLORS, world.BACKGROUNDS))
    prompts = [f"a {c} {s} on a {b} background" for s, c, b in combos for _ in seeds]
    sd = [sd for _ in combos for sd in seeds]
    imgs = V.generate(pipe, prompts, sd, steps=steps, guidance=guidance)
    hits = {"shape": [], "color": [], "background": [], "all": []}
    for (s, c, b), im in zip([x for x in combos for _ in seeds], imgs):
        a = world.read_attributes(im)
        ok = dict(shape=a["shape"] == s, color=a["color"] == c, background=a["background"] == b)
        for k, v in ok.items():
            hits[k].append(v)
        hits["all"].append(all(ok.values()))
    # the reader's own accuracy on real world images, as the ceiling of these numbers
    ref_imgs, scenes = world.generate(300, seed=99)
    reader = {k: float(np.mean([world.read_attributes(im)[k] == getattr(sc, k) for im, sc in zip(ref_imgs, scenes)]))
              for k in ("shape", "color", "background")}
    # ... and through the VAE (encode + decode): what the model can draw at best
    with torch.no_grad():
        x = torch.from_numpy(ref_imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    vae_reader = {k: float(np.mean([world.read_attributes(im)[k] == getattr(sc, k) for im, sc in zip(rec, scenes)]))
                  for k in ("shape", "color", "background")}
    res = {k: float(np.mean(v)) for k, v in hits.items()}
    res.update(n=len(imgs), reader_accuracy_on_world_images=reader, reader_accuracy_after_vae=vae_reader)
    # chance levels
    res["chance"] = dict(shape=1 / len(world.SHAPES), color=1 / len(world.COLORS), background=1 / len(world.BACKGROUNDS))
    return res, imgs


def quick_lora(concept: str, out: Path, token: str, steps: int = 400, rank: int = 8, lr: float = 1e-3,
               seed: int = 0, model_dir=None) -> Path:
    """A minimal DreamBooth-LoRA on the toy model, saved in diffusers' load_lora_weights layout."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = V.load_pipeline(model_dir)
    spec = C.concept(concept)
    imgs = torch.from_numpy(C.load_images(concept)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        lat = pipe.vae.encode(imgs).latent_dist
        prompt = f"a photo of {token} {spec.class_word}"
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
    unet, sched = pipe.unet, pipe.scheduler
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(imgs)
    for step in range(steps):
        z = (lat.mean + lat.std * torch.randn(lat.mean.shape, generator=g)) * pipe.vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=g)
        pred = unet(sched.add_noise(z, noise, t), t, hidden.expand(n, -1, -1)).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.mkdir(parents=True, exist_ok=True)
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=sd, safe_serialization=True)
    return out


def _save_grid(imgs: np.ndarray, path: Path, cols: int = 18) -> None:
    from PIL import Image

    rows = [np.concatenate(list(imgs[i:i + cols]), 1) for i in range(0, len(imgs) - cols + 1, cols)]
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def trained_vs_base(names, steps: int, n_images: int, work: Path, model=None, sample_steps: int = V.STEPS) -> dict:
    res = {}
    for name in names:
        spec = C.concept(name)
        token = spec.token.strip("<>") + "zq"  # a rare byte string, as DreamBooth's "sks"
        t0 = time.time()
        adapter = quick_lora(name, work / name, token, steps=steps, model_dir=model)
        t_train = time.time() - t0
        kw = dict(n_images=n_images, num_inference_steps=sample_steps)
        base = V.evaluate(model, token, spec.class_word, name, preservation=False, **kw)
        trained = V.evaluate(model, token, spec.class_word, name, adapter_dir=adapter, **kw)
        res[name] = dict(base=base, trained=trained, train_seconds=round(t_train, 1), token=token)
        print(f"[validate] {name}: subject {base['subject_fidelity']:.3f} -> {trained['subject_fidelity']:.3f}",
              file=sys.stderr)
    return res


def write_markdown(path: Path, enc: dict, pf: dict, tvb: dict, cmd: str, seconds: float, steps: int,
                   lora_steps: int, n_images: int) -> None:
    L = ["# Toy evaluator: validation", "", f"Made by `{cmd}` ({seconds:.0f} s on a shared 2-core CPU). "
         f"Generation: DDIM, {steps} steps, guidance {V.GUIDANCE}, 32x32; trained-vs-base: quick_lora "
         f"{lora_steps} steps, {n_images} seeds per prompt.", "",
         "## 1. Encoder (subject-fidelity metric): references vs themselves and vs other concepts", "",
         "| concept | self (mean pairwise cos) | other concepts (mean) | nearest other (cos) |", "|---|---|---|---|"]
    for n, r in enc.items():
        L.append(f"| {n} | {r['self']:.3f} | {r['other_mean']:.3f} | {r['nearest']} ({r['other_max']:.3f}) |")
    wins = sum(r["self"] > r["other_max"] for r in enc.values())
    L += ["", f"Self similarity beats the most similar other concept for {wins}/{len(enc)} concepts.", "",
          "## 2. Base model prompt fidelity", "",
          f"Prompts `a {{colour}} {{shape}} on a {{bg}} background`, every combination ({pf['n']} images), "
          "attributes read back from pixels.", "",
          "| attribute | base model | chance | reader on world images | reader after VAE round trip |",
          "|---|---|---|---|---|"]
    for k in ("shape", "color", "background"):
        L.append(f"| {k} | {pf[k]:.3f} | {pf['chance'][k]:.3f} | {pf['reader_accuracy_on_world_images'][k]:.3f} | "
                 f"{pf['reader_accuracy_after_vae'][k]:.3f} |")
    L += [f"| all three | {pf['all']:.3f} | | |", "", "## 3. Trained (quick DreamBooth-LoRA) vs base model", ""]
    if tvb:
        L += ["| concept | LoRA train time | subject base | subject trained | margin | prompt fid. base | "
              "prompt fid. trained | preservation trained |", "|---|---|---|---|---|---|---|---|"]
        margins = []
        for n, r in tvb.items():
            b, t = r["base"], r["trained"]
            margins.append(t["subject_fidelity"] - b["subject_fidelity"])
            L.append(f"| {n} | {r['train_seconds']} s | {b['subject_fidelity']:.3f} | {t['subject_fidelity']:.3f} | "
                     f"{margins[-1]:+.3f} | {b['prompt_fidelity']:.2f} | {t['prompt_fidelity']:.2f} | "
                     f"{t['preservation']:.3f} |")
        L += ["", f"Mean subject-fidelity margin trained - base: {np.mean(margins):+.3f} "
              f"(min {np.min(margins):+.3f})."]
    path.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2i_fast.toy.validate")
    p.add_argument("--concepts", default="pink_heart,teal_ring,bee_ball")
    p.add_argument("--lora-steps", type=int, default=400)
    p.add_argument("--n-images", type=int, default=4)
    p.add_argument("--work", default="/tmp/t2i_fast_toy_validate")
    p.add_argument("--out", default=str(HERE / "VALIDATION.md"))
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--steps", type=int, default=V.STEPS, help="sampling steps")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    enc = encoder_table()
    pf, imgs = base_prompt_fidelity(V.load_pipeline(a.model), steps=a.steps)
    _save_grid(imgs, Path(a.out).with_name("validation_base_grid.png"))
    names = [n for n in a.concepts.split(",") if n]
    tvb = trained_vs_base(names, a.lora_steps, a.n_images, Path(a.work), a.model, a.steps) if names else {}
    cmd = "python -m t2i_fast.toy.validate " + " ".join(argv or sys.argv[1:])
    write_markdown(Path(a.out), enc, pf, tvb, cmd.strip(), time.time() - t0, a.steps, a.lora_steps, a.n_images)
    Path(a.out).with_suffix(".json").write_text(json.dumps(dict(encoder=enc, base_prompt_fidelity=pf, trained_vs_base={
        n: {k: ({kk: vv for kk, vv in v.items() if kk != "images"} if isinstance(v, dict) else v)
            for k, v in r.items()} for n, r in tvb.items()}), indent=1) + "\n")
    print(Path(a.out).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
