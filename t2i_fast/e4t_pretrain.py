"""`t2i-fast pretrain-e4t`: E4T's domain pre-training, once per domain and base model.

    t2i-fast pretrain-e4t --model M --domain DIR --class-word W --out D [--steps 2000] [--resume]
                          [--image-encoder CLIP_VISION_DIR]

DIR is a folder of concept folders (each holds the images of one concept), or a flat folder of images, each
image its own concept, with an optional caption NAME.txt beside NAME.png: the caption is the prompt, the
first occurrence of the class word in it becoming "<token> W" (without a caption, or without the word in
it: "a photo of <token> W").

Each step takes a batch of concepts; for each, one of its images goes through the encoder and another
(or the same) is the denoising target, so the encoder learns the concept rather than the picture. The
encoder head and the weight offsets train (e4t_domain.py); the UNet, VAE and text encoder stay frozen.
Features and latents of every image are computed once, before the loop. D/e4t_domain.safetensors is the
result (written whole or not at all); a checkpoint every --checkpoint-every steps lets --resume continue
an interrupted run exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .data import ConceptImages, format_prompt, list_images, tokenize
from .diffusion import diffusion_loss
from .e4t_domain import (DOMAIN_FILE, FEATURE_T, HIDDEN, SCALE, EncoderHead, add_encoded_token, class_embedding,
                         image_features, install_offsets, model_info, offset_state, penalty, save_domain)
from .e4t_image_encoder import load_image_encoder, record as record_image_encoder
from .errors import UserError

CHECKPOINT = "e4t_pretrain_checkpoint.pt"
REPORT = "pretrain_report.json"
TOKEN = "<e4t-concept>"  # the placeholder the pre-training prompts use (never saved)
TEMPLATE = "a photo of {token} {cls}"


def domain_concepts(folder: Path, class_word: str) -> list[tuple[Path, list[Path], str]]:
    """[(folder, image files, prompt template)] of each concept in DIR (see the module docstring)."""
    if not folder.is_dir():
        raise UserError(f"--domain {folder} is not a folder; pass a folder of concept folders or of images")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    concepts = []
    if subfolders:
        for sub in subfolders:
            files = list_images(sub)
            concepts.append((sub, files, TEMPLATE))
    else:
        for f in list_images(folder):
            caption = f.with_suffix(".txt").read_text().strip() if f.with_suffix(".txt").is_file() else ""
            words = caption.split()
            if class_word in words:
                i = words.index(class_word)
                template = " ".join(words[:i] + ["{token}", "{cls}"] + words[i + 1:])
            else:
                template = TEMPLATE
            concepts.append((folder, [f], template))
    if len(concepts) < 2:
        raise UserError(f"--domain {folder} holds {len(concepts)} concept(s); pre-training needs many concepts of "
                        f"the domain (a folder per concept, or a folder of images)")
    return concepts


def pretrain(model: str, domain: str, class_word: str, out: str, steps: int = 2000, batch_size: int = 8,
             lr: float = 1e-3, rank: int = 4, seed: int = 0, resolution: int | None = None,
             checkpoint_every: int = 500, overwrite: bool = False, resume: bool = False,
             progress: bool = True, device: str = "auto", scale: float = SCALE,
             image_encoder: str | None = None) -> dict:
    """Pre-train the E4T encoder and offsets of `model` on the concepts in `domain`; write OUT/e4t_domain.safetensors
    and OUT/pretrain_report.json; return the report. `image_encoder`: an optional local CLIP vision folder whose
    image embedding the encoder also reads (e4t_image_encoder.py)."""
    from tqdm.auto import tqdm

    from .models import load_components, peek_family, refuse_family
    from .runtime import resolve_device

    refuse_family(peek_family(model), ("sd1", "sd2"), "t2i-fast pretrain-e4t", model)
    for name, value, low in (("--steps", steps, 1), ("--batch-size", batch_size, 1), ("--rank", rank, 1),
                             ("--checkpoint-every", checkpoint_every, 0)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if not lr > 0:
        raise UserError(f"--lr must be positive, got {lr}")
    if not scale > 0:
        raise UserError(f"--scale must be positive, got {scale}")
    if not class_word.strip():
        raise UserError("--class-word is empty; pass the domain's class noun, e.g. 'shape' or 'face'")
    out_dir = Path(out).expanduser()
    target = out_dir / DOMAIN_FILE
    if target.exists() and not (overwrite or resume):
        raise UserError(f"{target} exists; pass --overwrite to replace it (or --resume to continue its checkpoint)")
    if resume and not (out_dir / CHECKPOINT).is_file():
        raise UserError(f"--resume: no {CHECKPOINT} in {out_dir}; run without --resume first")
    domain_dir = Path(domain).expanduser()
    if out_dir.resolve().is_relative_to(domain_dir.resolve()):
        raise UserError(f"--out {out_dir} lies inside --domain {domain_dir}; a later run would read it as a concept: "
                        f"pass an --out outside the domain folder")
    concepts = domain_concepts(domain_dir, class_word)

    device_ = resolve_device(device)
    clip = load_image_encoder(image_encoder, device_) if image_encoder else None  # its bad folder: before the model
    comps = load_components(model)
    for module in (comps.unet, comps.vae, comps.text_encoder):
        module.to(device_).requires_grad_(False)
    res = resolution or comps.native_resolution
    # what a checkpoint must match to be continued (the encoder only where one is used: older checkpoints resume)
    run_settings = settings(model, domain, class_word, batch_size, lr, rank, seed, res, scale,
                            *([str(Path(image_encoder).expanduser().resolve())] if image_encoder else []))
    pixels, owner = [], []
    for folder in dict.fromkeys(folder for folder, _, _ in concepts):  # once each: a flat folder holds every concept
        images = ConceptImages(folder, res, center_crop=True, random_flip=False)
        index = {f.name: i for i, f in enumerate(images.files)}
        for n, (of, files, _) in enumerate(concepts):
            if of == folder:
                pixels += [images.pixels(index[f.name], 0) for f in files]
                owner += [n] * len(files)
    start = time.perf_counter()
    features, means = image_features(comps, torch.stack(pixels), image_encoder=clip)
    clip_info = record_image_encoder(clip, image_encoder) if clip is not None else {}
    del clip  # read once: the features are fixed
    shift = getattr(comps.vae.config, "shift_factor", None) or 0.0
    latents = ((means - shift) * comps.vae.config.scaling_factor).to(device_)
    members = [[i for i, o in enumerate(owner) if o == n] for n in range(len(concepts))]
    e_class = class_embedding(comps.tokenizer, comps.text_encoder, class_word).to(device_)

    torch.manual_seed(seed)
    head = EncoderHead(features.shape[1], e_class.shape[0], HIDDEN).to(device_)
    current: dict[str, torch.Tensor] = {}
    add_encoded_token(comps.tokenizer, comps.text_encoder, TOKEN, lambda: current["v"])
    ids = tokenize(comps.tokenizer, [format_prompt(t, TOKEN, class_word) for _, _, t in concepts]).to(device_)
    layers = install_offsets(comps.unet, rank, seed)
    params = list(head.parameters()) + list(offset_state(layers).values())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    step, losses = 0, []
    if resume:
        state = torch.load(out_dir / CHECKPOINT, map_location="cpu", weights_only=True)
        if state["settings"] != run_settings:
            raise UserError(f"--resume: {out_dir / CHECKPOINT} was made with other settings; start again with "
                            f"--overwrite")
        head.load_state_dict(state["head"])
        with torch.no_grad():
            for k, v in offset_state(layers).items():
                v.copy_(state["offsets"][k])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, losses = state["step"], state["losses"]
    out_dir.mkdir(parents=True, exist_ok=True)
    features = features.to(device_)
    bar = tqdm(total=steps, initial=step, desc="pretrain-e4t", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    alphas = len(comps.scheduler.alphas_cumprod)
    while step < steps:
        concept = torch.randint(len(concepts), (batch_size,), generator=generator).tolist()
        pick = lambda n: members[n][int(torch.randint(len(members[n]), (1,), generator=generator))]  # noqa: E731
        source = [pick(n) for n in concept]   # the image the encoder sees
        targets = [pick(n) for n in concept]  # the image to denoise: another view of the same concept
        noise = torch.randn(latents[targets].shape, generator=generator).to(device_)
        t = torch.randint(alphas, (batch_size,), generator=generator).to(device_)
        delta = head(features[source])
        current["v"] = e_class + scale * delta
        text = comps.text_encoder(ids[concept])[0]
        loss = diffusion_loss(comps.unet, comps.scheduler, comps.prediction_type, latents[targets], noise, t, text)
        total = loss + penalty(delta, layers)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        bar.update(1)
        if checkpoint_every and step % checkpoint_every == 0 and step < steps:
            tmp = out_dir / (CHECKPOINT + ".tmp")
            torch.save({"step": step, "losses": losses, "head": head.state_dict(),
                        "offsets": {k: v.detach() for k, v in offset_state(layers).items()},
                        "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                        "settings": run_settings}, tmp)
            tmp.replace(out_dir / CHECKPOINT)
    bar.close()
    wall = time.perf_counter() - start
    info = {**model_info(comps, model), "class_word": class_word, "rank": rank, "hidden": HIDDEN, "scale": scale,
            "feature_t": FEATURE_T, "resolution": res, "steps": steps, "batch_size": batch_size, "lr": lr,
            "seed": seed, "concepts": len(concepts), "images": len(owner), **clip_info}
    save_domain(target, head, layers, info)
    report = {k: v for k, v in info.items() if not k.endswith("fingerprint")}
    report.update(wall_time_s=round(wall, 1), loss_first_100=mean(losses[:100]), loss_last_100=mean(losses[-100:]),
                  file_bytes=target.stat().st_size)
    (out_dir / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    return report


def mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 5) if values else None


def settings(*values) -> str:
    """What a checkpoint must match to be continued (--resume)."""
    return json.dumps([str(v) for v in values])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="t2i-fast pretrain-e4t",
                                description="Pre-train E4T's encoder and weight offsets on many concepts of one "
                                            "domain, once per base model (then `t2i-fast train --method e4t "
                                            "--domain OUT` tunes a new concept from one image in a few steps).")
    p.add_argument("--model", required=True, help="local diffusers folder or single-file checkpoint")
    p.add_argument("--domain", required=True, help="folder of concept folders, or of images (+ NAME.txt captions)")
    p.add_argument("--class-word", required=True, help="the domain's class noun, e.g. 'face' or 'shape'")
    p.add_argument("--out", required=True, help=f"output folder (gets {DOMAIN_FILE} and {REPORT})")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps [default: 2000]")
    p.add_argument("--batch-size", type=int, default=8, help="concepts per step [default: 8]")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate [default: 1e-3]")
    p.add_argument("--rank", type=int, default=4, help="rank of the weight offsets [default: 4]")
    p.add_argument("--seed", type=int, default=0, help="random seed [default: 0]")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0: none) [default: 500]")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda [default: auto]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing domain file in --out")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--scale", type=float, default=SCALE,
                   help=f"v* = e_class + SCALE * encoder output [default: {SCALE}, the paper's; the shipped toy "
                        f"domain uses 0.5: at 0.1 its encoder learned no identity (README)]")
    p.add_argument("--image-encoder", default=None,
                   help="a local CLIP vision folder whose image embedding the encoder also reads (optional; "
                        "tuning then needs the same encoder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    report = pretrain(a.model, a.domain, a.class_word, a.out, a.steps, a.batch_size, a.lr, a.rank, a.seed,
                      a.resolution, a.checkpoint_every, a.overwrite, a.resume, not a.no_progress, a.device,
                      a.scale, a.image_encoder)
    print(f"pre-trained on {report['concepts']} concepts ({report['images']} images), {report['steps']} steps in "
          f"{report['wall_time_s']} s; loss {report['loss_first_100']} -> {report['loss_last_100']}; wrote "
          f"{Path(a.out) / DOMAIN_FILE} ({report['file_bytes'] / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
