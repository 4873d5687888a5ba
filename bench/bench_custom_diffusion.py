"""Ablation: our Custom Diffusion training step vs our own emulation of the diffusers script's step, same run.
Not the script itself: bench_peer.py --methods custom_diffusion runs the real train_custom_diffusion.py.

(a) ours: t2i_fast's trainer with --method custom_diffusion: latents of every rescale variant cached, the
    modifier row in its own parameter, fused attention processors (--no-kernels: plain twins);
(b) the emulated script step (examples/custom_diffusion/train_custom_diffusion.py's work, reduced to a step):
    the VAE encodes the instance and class pixels every step, CustomDiffusionAttnProcessor2_0 on every
    attention layer (K/V trained on attn2), the whole token-embedding matrix trains and every row but the
    modifier's has its gradient zeroed, masked instance loss + prior loss, clip 1.0, torch AdamW.
Both: batch 1 instance + 1 class image, --freeze-model crossattn_kv, same model and images. Each variant runs
in its own process so its peak memory is its own. Rows go to bench/results.csv (bench "train_step", case
"<model>-<res>px-custom_diffusion-b1+prior"). Reuses bench_train.py's model/image helpers.

  python bench/bench_custom_diffusion.py --model mid --resolution 256 --steps 3
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import (images_dir, model_dir, run_step_bench, step_bench_parser, time_loop,  # noqa: E402
                         time_trainer)


def class_dir(resolution: int) -> Path:
    from t2i_fast.runtime import cache_dir
    from t2i_fast.testing import write_concept_images

    path = cache_dir() / "bench-class-images" / str(resolution)
    if not path.is_dir():
        write_concept_images(path, n=4, size=resolution, seed=11)
        for p in path.glob("*.png"):
            p.with_suffix(".txt").write_text("a photo of a dog")
    return path


def run_ours(args) -> dict:
    import tempfile

    from t2i_fast import TrainConfig

    cfg = TrainConfig(model=str(model_dir(args.model)), images=str(images_dir(args.resolution)),
                      method="custom_diffusion", token="<new1>", class_word="dog",
                      class_images=str(class_dir(args.resolution)), out=tempfile.mkdtemp(prefix="bench-cd-ours-"),
                      resolution=args.resolution, kernels=not args.no_kernels)
    return time_trainer(cfg, args.warmup, args.steps)


def run_diffusers(args) -> dict:
    """The step of diffusers' train_custom_diffusion.py (with prior preservation), reduced to a step."""
    import torch
    import torch.nn.functional as F
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    from t2i_fast.data import ConceptImages, tokenize
    from t2i_fast.models import load_components

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    comps = load_components(model_dir(args.model))
    unet, vae, te, tok = comps.unet.to(device), comps.vae.to(device), comps.text_encoder.to(device), comps.tokenizer
    tok.add_tokens(["<new1>"])
    te.resize_token_embeddings(len(tok))
    modifier = tok.convert_tokens_to_ids("<new1>")
    emb = te.get_input_embeddings()
    with torch.no_grad():
        emb.weight[modifier] = emb.weight[tok("ktn", add_special_tokens=False).input_ids].mean(0)
    for m in (unet, vae, te):
        m.requires_grad_(False)
    emb.weight.requires_grad_(True)
    procs, weights = {}, unet.state_dict()
    for name in unet.attn_processors:
        layer = name[: -len(".processor")]
        if name.endswith("attn1.processor"):
            procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
        else:
            w = weights[layer + ".to_k.weight"]
            procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=w.shape[0],
                                                          cross_attention_dim=w.shape[1]).to(device)
            procs[name].load_state_dict({"to_k_custom_diffusion.weight": w,
                                         "to_v_custom_diffusion.weight": weights[layer + ".to_v.weight"]})
    unet.set_attn_processor(procs)
    params = [p for p in unet.parameters() if p.requires_grad] + [emb.weight]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    inst = ConceptImages(images_dir(args.resolution), args.resolution, rescale_variants=4)
    cls = ConceptImages(class_dir(args.resolution), args.resolution)
    ids = tokenize(tok, ["a photo of <new1> dog", "a photo of a dog"]).to(device)
    sched = comps.scheduler
    gen = torch.Generator().manual_seed(0)
    unet.train()

    def step(i):
        v = 2 + i % 4  # a rescaled variant
        pixels = torch.stack([inst.pixels(i % len(inst), v), cls.pixels(i % len(cls), 0)]).to(device)
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        latent = latents.shape[-1]
        mask = torch.stack([inst.mask(i % len(inst), v, latent), torch.ones(1, latent, latent)]).to(device)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(sched.config.num_train_timesteps, (2,), generator=gen).to(device)
        text = te(ids)[0]
        pred = unet(sched.add_noise(latents, noise, t), t, text).sample
        err = F.mse_loss(pred.float(), noise.float(), reduction="none")
        loss = ((err[:1] * mask[:1]).sum() / mask[:1].expand_as(err[:1]).sum()) + err[1:].mean()
        loss.backward()
        keep = torch.arange(len(tok), device=device) == modifier
        emb.weight.grad[~keep] = 0
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return time_loop(step, args.warmup, args.steps, device)


def main(argv=None) -> int:
    args = step_bench_parser(__doc__, steps=3, warmup=1).parse_args(argv)
    kernels = "-nokernels" if args.no_kernels else ""
    return run_step_bench(
        args, __file__, run_ours, run_diffusers,
        prepare=lambda size: (model_dir(size), images_dir(args.resolution), class_dir(args.resolution)),
        flags=[], label="custom_diffusion",
        case=lambda size: f"{size}-{args.resolution}px-custom_diffusion-b1+prior{kernels}")


if __name__ == "__main__":
    sys.exit(main())
