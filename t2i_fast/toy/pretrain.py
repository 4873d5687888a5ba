"""Pretrain the bundled toy text-to-image model on the toy world, on the CPU.

    python -m t2i_fast.toy.pretrain [--work DIR] [--out t2i_fast/toy/model] [--resume]

Stages, each checkpointed in the work folder (``--resume`` continues from the last checkpoint and skips
finished stages):
  data     N captioned world images (world.generate, seeded)
  vae      AutoencoderKL 32x32x3 -> 8x8x4 (L1 + L2 + small KL), then a warm restart (vae_refine);
           scaling_factor set so latents have unit std
  latents  posterior mean / logvar of every image, cached
  unet     UNet2DConditionModel + CLIPTextModel trained jointly with the DDPM epsilon objective on the
           cached latents (10% caption dropout, so classifier-free guidance works), then two warm restarts
           (unet_refine 400 steps, unet_refine2 3000 steps; the second took shape-following from chance,
           0.19, to 0.59 of prompts, against 0.63 that the VAE's own round trip allows)
  encoder  the evaluator's image encoder (encoder.py; our DINO analogue)
  export   StableDiffusionPipeline.save_pretrained(out, safe_serialization=True) + encoder.safetensors

About 55 minutes on one core of a 2-core CPU; a fresh run reproduces the shipped weights bit for bit.
Deterministic: every random draw comes from a generator seeded by (seed, stage, step), models are built
under a fixed seed, torch runs with deterministic algorithms and one thread (set --threads for speed at
the cost of bit-exactness across thread counts).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import encoder as enc
from . import world
from .encoder import step_generator, to_tensor

HERE = Path(__file__).resolve().parent
MAX_LENGTH = 77

# ------------------------------------------------------------------------------------------- configs
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", projection_dim=64)
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
    norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    sample_size=world.IMAGE_SIZE,
)
SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        num_train_timesteps=1000, clip_sample=False,
                        steps_offset=1, prediction_type="epsilon")

DEFAULTS = dict(seed=0, n_images=40000, vae_steps=500, vae_batch=32, vae_lr=1e-3, vae_refine_steps=300,
                vae_refine_lr=3e-4, unet_steps=650, unet_batch=64, unet_lr=1e-3,
                unet_refine_steps=400, unet_refine_lr=5e-4, unet_refine2_steps=3000, warmup=100, caption_dropout=0.1,
                encoder_steps=300, ckpt_every=100)


# ----------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(words=world.VOCABULARY, max_length: int = MAX_LENGTH):
    """A CLIPTokenizer whose vocabulary holds every world word as one token.

    Base: the 256 byte symbols and their word-final "</w>" forms (so any text tokenizes and new tokens
    such as "<sks>" can be added), then BPE merges that assemble each word.  Merges are appended per word
    after running the merges so far, so earlier words keep their single-token segmentation.
    """
    from transformers import CLIPTokenizer

    from ..testing import byte_vocab

    vocab = byte_vocab()
    merges: list[tuple[str, str]] = []

    def segment(word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = {m: i for i, m in enumerate(merges)}
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            r, i = min(pairs)
            if r == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    for word in words:
        parts = segment(word)
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = segment(word)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    bad = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1]
    if bad:
        raise RuntimeError(f"toy tokenizer: words not single tokens: {bad}")
    return tok


def build_models(vocab_size: int, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 1)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2,
                                        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **TEXT_CONFIG))
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return vae, text, unet


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


# ------------------------------------------------------------------------------------------- helpers
def lr_at(step: int, total: int, peak: float, warmup: int, decay: float = 1.0) -> float:
    """Linear warmup, then the peak, then a cosine to 0.1 x peak over the last `decay` fraction of the steps.

    decay=1.0 is plain warmup + cosine (the VAE and encoder stages).  The UNet uses decay=0.3 (warmup-stable-
    decay): before its decay starts the rate does not depend on `total`, so a run can be lengthened or
    shortened there and still equal a fresh run with the new total."""
    if step < warmup and warmup > 0:
        return peak * (step + 1) / warmup
    start = max(int(total * (1 - decay)), warmup)
    if step < start:
        return peak
    p = (step - start) / max(total - start, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_loop(name: str, work: Path, modules: dict, params: list, steps: int, lr: float, warmup: int,
             step_fn, ckpt_every: int, resume: bool, log, decay: float = 1.0) -> None:
    """A resumable AdamW loop: step_fn(step) -> loss tensor; checkpoints modules + optimizer."""
    from tqdm import tqdm

    ckpt = work / f"{name}.ckpt"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0 if name != "encoder" else 1e-4)
    start = 0
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    for m in modules.values():
        m.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, file=sys.stderr,
               mininterval=5, dynamic_ncols=True)
    ema = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup, decay)
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
        if step % 20 == 0:
            log(dict(stage=name, step=step, loss=loss.item(), ema=ema, t=time.time()))
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            _atomic_save(dict(step=step + 1, modules={k: m.state_dict() for k, m in modules.items()},
                              opt=opt.state_dict()), ckpt)
    for m in modules.values():
        m.eval()


# ---------------------------------------------------------------------------------------------- main
def pretrain(work: Path, out: Path, resume: bool = False, **overrides) -> Path:
    """Run (or with resume=True, continue) every stage; returns the pipeline folder `out`."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _pretrain(work, out, resume, **overrides)
    finally:  # a library call must not leave the process in deterministic mode
        torch.use_deterministic_algorithms(was_deterministic)


def _pretrain(work: Path, out: Path, resume: bool, **overrides) -> Path:
    cfg = dict(DEFAULTS, **{k: v for k, v in overrides.items() if v is not None})
    work.mkdir(parents=True, exist_ok=True)
    seed = cfg["seed"]
    logf = open(work / "log.jsonl", "a")

    def log(rec):
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    log(dict(event="start", cfg=cfg, resume=resume, t=time.time()))
    t0 = time.time()

    # data ------------------------------------------------------------------------------------------
    data_path = work / "data.npz"
    if resume and data_path.exists():
        d = np.load(data_path)
        images, captions = d["images"], list(d["captions"])
    else:
        print(f"[pretrain] generating {cfg['n_images']} world images", file=sys.stderr)
        images, scenes = world.generate(cfg["n_images"], seed=seed)
        captions = [s.caption for s in scenes]
        np.savez(data_path.with_suffix(".tmp.npz"), images=images, captions=np.array(captions))
        os.replace(data_path.with_suffix(".tmp.npz"), data_path)
    n = len(images)
    tokenizer = build_tokenizer()
    vae, text_encoder, unet = build_models(len(tokenizer), seed)
    pixels = to_tensor(images)

    # vae -------------------------------------------------------------------------------------------
    def vae_step(step):
        g = step_generator(seed, 1, step)
        idx = torch.randint(0, n, (cfg["vae_batch"],), generator=g)
        x = pixels[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        return (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-3 * kl

    if not (work / "vae.done").exists():
        run_loop("vae", work, {"vae": vae}, list(vae.parameters()), cfg["vae_steps"], cfg["vae_lr"],
                 cfg["warmup"], vae_step, cfg["ckpt_every"], resume, log)
        (work / "vae.done").touch()
    vae.load_state_dict(torch.load(work / "vae.ckpt", weights_only=True)["modules"]["vae"])
    # a warm restart at a lower learning rate (SGDR-style): colours and small shapes sharpen
    if cfg["vae_refine_steps"] > 0:
        if not (work / "vae_refine.done").exists():
            run_loop("vae_refine", work, {"vae": vae}, list(vae.parameters()), cfg["vae_refine_steps"],
                     cfg["vae_refine_lr"], 0, lambda step: vae_step(100_000 + step), cfg["ckpt_every"], resume, log)
            (work / "vae_refine.done").touch()
        vae.load_state_dict(torch.load(work / "vae_refine.ckpt", weights_only=True)["modules"]["vae"])
    vae.eval()

    # latents ---------------------------------------------------------------------------------------
    lat_path = work / "latents.pt"
    if lat_path.exists():
        lat = torch.load(lat_path, weights_only=True)
    else:
        means, logvars = [], []
        with torch.no_grad():
            for i in range(0, n, 500):
                post = vae.encode(pixels[i:i + 500]).latent_dist
                means.append(post.mean)
                logvars.append(post.logvar)
        mean, logvar = torch.cat(means), torch.cat(logvars)
        g = step_generator(seed, 2, 0)
        sample = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        lat = dict(mean=mean, logvar=logvar, scaling_factor=float(1.0 / sample.std()))
        with torch.no_grad():
            rec = vae.decode(mean[:256]).sample
        lat["recon_l1"] = float((rec - pixels[:256]).abs().mean())
        _atomic_save(lat, lat_path)
        log(dict(stage="latents", scaling_factor=lat["scaling_factor"], recon_l1=lat["recon_l1"]))
    vae.register_to_config(scaling_factor=lat["scaling_factor"])
    mean, std, sf = lat["mean"], (0.5 * lat["logvar"]).exp(), lat["scaling_factor"]

    # unet + text encoder ---------------------------------------------------------------------------
    scheduler = build_scheduler()
    ids_all = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids[0]
    alphas = scheduler.alphas_cumprod

    def unet_step(step):
        g = step_generator(seed, 3, step)
        b = cfg["unet_batch"]
        idx = torch.randint(0, n, (b,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
        drop = torch.rand(b, generator=g) < cfg["caption_dropout"]
        ids = torch.where(drop[:, None], empty_ids[None], ids_all[idx])
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, t, hidden).sample
        return torch.nn.functional.mse_loss(pred, noise)

    if not (work / "unet.done").exists():
        params = list(unet.parameters()) + list(text_encoder.parameters())
        run_loop("unet", work, {"unet": unet, "text_encoder": text_encoder}, params, cfg["unet_steps"],
                 cfg["unet_lr"], cfg["warmup"], unet_step, cfg["ckpt_every"], resume, log, decay=0.3)
        (work / "unet.done").touch()
    state = torch.load(work / "unet.ckpt", weights_only=True)["modules"]
    unet.load_state_dict(state["unet"])
    text_encoder.load_state_dict(state["text_encoder"])
    # more cosine cycles (warm restarts), as for the VAE
    for i, name in enumerate(("unet_refine", "unet_refine2")):
        if cfg[name + "_steps"] <= 0:
            continue
        if not (work / f"{name}.done").exists():
            params = list(unet.parameters()) + list(text_encoder.parameters())
            run_loop(name, work, {"unet": unet, "text_encoder": text_encoder}, params, cfg[name + "_steps"],
                     cfg["unet_refine_lr"], 0, lambda step, i=i: unet_step((i + 1) * 100_000 + step),
                     cfg["ckpt_every"], resume, log)
            (work / f"{name}.done").touch()
        state = torch.load(work / f"{name}.ckpt", weights_only=True)["modules"]
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])

    # image encoder ---------------------------------------------------------------------------------
    if not (work / "encoder.done").exists():
        enc.train_encoder(work, steps=cfg["encoder_steps"], seed=seed, resume=resume, log=log,
                          ckpt_every=cfg["ckpt_every"], run_loop=run_loop)
        (work / "encoder.done").touch()

    # export ----------------------------------------------------------------------------------------
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    enc.export_encoder(work, out.parent)
    log(dict(event="done", wall_s=time.time() - t0))
    logf.close()
    print(f"[pretrain] wrote {out} in {time.time() - t0:.0f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2i_fast.toy.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--work", default="toy_pretrain_work", help="checkpoint folder")
    p.add_argument("--out", default=str(HERE / "model"), help="where the pipeline folder is written")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    over = {k: getattr(a, k) for k in DEFAULTS}
    pretrain(Path(a.work), Path(a.out), resume=a.resume, **over)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
