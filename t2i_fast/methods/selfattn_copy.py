"""Self-attention copy (after Li & Sun 2024, "Parameter efficient finetuning of text-to-image models with
trainable self-attention layer"): the model stays frozen; a trainable copy of it reads a reference image of
the concept, and the copy's self-attention keys and values are injected into the frozen model's
self-attention. LoRA on the copy's self-attention and a new identifier token are what train.

Mechanism. The copy is not a second UNet: it is the same frozen UNet run a second time, with LoRA (rank r)
on the to_q / to_k / to_v / to_out.0 of every self-attention (attn1) and the reference latent(s) as input.
A forward pre-hook on the UNet runs that copy pass before each ordinary ("main") call, so the trainer's
loop, the DVAR probe and diffusers' pipelines drive the method unchanged:

    copy pass   x_ref at the main call's timestep t, the empty prompt; each attn1 keeps its K_c, V_c
    main pass   frozen weights; each attn1 attends over its own keys and the copy's:
                O = O_self + tanh(g_l) · m_b · (attn(q, [K; K_c], [V; V_c]) − O_self),  O_self = attn(q, K, V)

g_l is a learned gate per layer, 0 at the start, so training starts exactly at the base model's output;
m_b is 1 for the rows of the batch whose prompt holds the identifier token and 0 for the others, so a
prompt without the token gets the base model, bit for bit apart from kernel rounding (classifier-free
guidance's empty prompt included). Which rows hold it is read where the token ids are seen: a forward hook
on the text encoder records a fingerprint (last position and mean over positions) of the features of each
prompt it encodes; the UNet's hook matches its encoder_hidden_states rows against them. Prompt features
that are not the text encoder's output (prompt_embeds made or reweighted by other code, a clip-skip layer)
match nothing and get the base model, with a warning once.

Choices, and why:
  - Reference: the first `references` training image(s), center-cropped at the training resolution, VAE mean
    (no sampling noise). `reference = "noised"` feeds it noised to the main call's t with a fixed noise
    tensor (stored, so sampling sees what training saw; the probe stays deterministic and draws no random
    numbers); `"clean"` feeds the clean latent at t = 0, which is in the frozen UNet's distribution and
    independent of t, so sampling runs the copy pass once per pipeline instead of once per step.
  - The copy sees the empty prompt: its job is the reference's appearance; the identifier works in the
    main pass, through cross-attention. The copy's features then depend on (reference, t) only, which is
    what makes them cacheable at sampling time (per t when noised, once when clean).
  - One pass over [K; K_c] plus one over K (to have O_self for the gate): no kernel change. A kernel that
    returns its log-sum-exp would give both from two calls over N keys each (O_joint is their LSE-weighted
    mix), saving the second pass over K; `gate = False` (the ablation) needs only the joint pass.
  - No prior preservation: rows without the token are the frozen model exactly, so a class loss has no
    gradient here.
  - Only the self-attentions below the UNet's full resolution take the copy's keys (`full_resolution =
    True`, the ablation, injects into every one). bench/bench_selfattn_copy.py measured it: the copy pass
    then stops before the full-resolution up block, and no joint attention runs over the longest sequences,
    so a step costs 1.63x LoRA's instead of 2.93x on the mid model at 256 px (1.37x vs 1.71x on the toy),
    and the subject-fidelity gain on the toy was no lower (README).
  - The copy pass stops right after the last injected attn1 has given its K/V: nothing after it is used (that
    layer's own attention included, so its to_q / to_out.0 LoRA never train; they are kept for a uniform
    layout).
  - The gates learn at gate_lr_scale × --lr: Adam moves a scalar by about lr per step, so at LoRA's rate
    a gate would stay near 0 (closed) for hundreds of steps. The token learns at --token-lr (LoRA's 5e-3).
  - Class constants below switch the ablations (reference, gate, references); a file records the ones it
    was trained with, and sampling follows the file.

File `selfattn_copy.safetensors` (one per run, config in the metadata):
    <attn1 path>.<proj>.lora_A   (r, in)      proj in to_q, to_k, to_v, to_out.0; e.g.
    <attn1 path>.<proj>.lora_B   (out, r)     down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A;
                                              the scale alpha/r is folded into lora_B (loads at scale 1)
    <attn1 path>.gate            (1,)         g_l (absent when trained with gate = False)
    token_embedding              (n, D)       the identifier's n vectors (token in the metadata)
    reference.latents            (R, C, h, w) scaled VAE latents of the reference image(s)
    reference.noise              (R, C, h, w) the fixed noise of the noised reference (absent when clean)
  metadata: t2i_fast.kind = "selfattn_copy", t2i_fast.config (the TrainConfig), and JSON values
  t2i_fast.token, t2i_fast.num_vectors, t2i_fast.reference ("noised" | "clean"), t2i_fast.gate, t2i_fast.rank.

Limits: SD 1.x / 2.x UNets (no SDXL added conditioning); one concept per run; no gradient checkpointing
(a recomputed block would not know which pass it belongs to). The processor lives here rather than in nn/
so that the method stays one file.
"""
from __future__ import annotations

import warnings
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import formats
from ..adapter_files import OTHER_BASE, check_width
from ..data import ConceptImages, encode_distribution, tokenize
from ..errors import UserError
from ..kernels import lora_linear
from ..nn.attention import attend, heads, tokens_in, tokens_out
from ..nn.lora import INITS
from ..stopping import StopPreset
from .base import Method, refuse_template_without_token
from .tokens import add_tokens, expand_token, token_names

FILE = "selfattn_copy.safetensors"
KIND = "selfattn_copy"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
REFERENCE_NOISE_SEED = 104729  # any constant: the reference's noise is independent of the training stream
CACHE_BYTES = 512 << 20  # sampling: copy-pass K/V kept per timestep up to this size


def self_attention_layers(unet) -> dict[str, nn.Module]:
    """{path: module} of every diffusers Attention named attn1 that attends over its own input."""
    return {name: m for name, m in unet.named_modules()
            if name.rpartition(".")[2] == "attn1" and hasattr(m, "to_q") and not getattr(m, "is_cross_attention", True)}


def resolution_level(path: str, unet) -> int:
    """0 for a layer at the UNet's full resolution, 1 at half of it, ...: down_blocks.i is level i,
    up_blocks.j level (number of up blocks - 1 - j), the mid block the lowest."""
    kind, _, rest = path.partition(".")
    n = len(unet.config.block_out_channels)
    if kind == "mid_block":
        return n - 1
    index = int(rest.partition(".")[0])
    return index if kind == "down_blocks" else n - 1 - index


def check_unet(unet, where: str, full_resolution: bool = True) -> dict[str, nn.Module]:
    """The UNet's self-attention layers that take the copy's keys (all of them, or those below the full
    resolution); a UserError where the method cannot work on it."""
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise UserError(f"{where}: selfattn_copy supports SD 1.x / 2.x UNets, not one with added conditioning "
                        f"({unet.config.addition_embed_type}, e.g. SDXL); use --method lora")
    layers = self_attention_layers(unet)
    if not layers:
        raise UserError(f"{where}: the UNet has no self-attention layers (attn1), which selfattn_copy injects "
                        f"into; use --method lora")
    if not full_resolution:
        layers = {p: m for p, m in layers.items() if resolution_level(p, unet) > 0}
        if not layers:
            raise UserError(f"{where}: the UNet has self-attention only at its full resolution, where "
                            f"selfattn_copy does not inject; use --method lora, or from Python set "
                            f"SelfAttnCopy.full_resolution = True")
    return layers


class _CopyDone(Exception):
    """Raised by the last self-attention of the copy pass: the rest of the UNet is not needed."""


class LowRank(nn.Module):
    """The copy pass's update of one frozen projection: y = x Wᵀ + b + s (x Aᵀ) Bᵀ (kernels.lora_linear).
    lora_A (r, in), lora_B (out, r), fp32."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float, init: str | None = "kaiming"):
        super().__init__()
        device = linear.weight.device
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=device))
        if init is not None:
            INITS[init](self.lora_A, rank)

    def forward(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        return lora_linear(x, linear.weight, linear.bias, self.lora_A, self.lora_B, self.scale)


class CopyAttnProcessor(nn.Module):
    """The processor of one attn1. Its mode comes from the shared ReferenceInjector:
    off   the processor it replaced (the base model, exactly)
    copy  LoRA'd q/k/v/out; keeps (K, V) as (B_c, H, N_c, D) in injector.kv[path]
    main  frozen q/k/v/out; queries attend over [K; K_c], mixed in by the gate (module docstring)."""

    def __init__(self, injector: "ReferenceInjector", path: str, attn: nn.Module, previous, rank: int,
                 scale: float, init: str | None, gate: bool):
        super().__init__()
        self.path = path
        self.__dict__["injector"] = injector  # shared state, not a submodule
        self.__dict__["previous"] = previous
        self.to_q = LowRank(attn.to_q, rank, scale, init)
        self.to_k = LowRank(attn.to_k, rank, scale, init)
        self.to_v = LowRank(attn.to_v, rank, scale, init)
        self.to_out = LowRank(attn.to_out[0], rank, scale, init)
        self.gate = nn.Parameter(torch.zeros(1, device=attn.to_q.weight.device)) if gate else None
        self.last = False  # the last attn1 the copy pass reaches

    def lowrank(self, proj: str) -> LowRank:
        return getattr(self, "to_out" if proj == "to_out.0" else proj)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        mode = self.injector.mode
        if mode == "off" or encoder_hidden_states is not None:
            extra = {"temb": temb} if temb is not None else {}
            return self.previous(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra, **kwargs)
        copy = mode == "copy"
        residual = hidden_states
        hidden_states, attention_mask, image_shape = tokens_in(attn, hidden_states, temb, attention_mask)

        if copy:
            key, value = self.to_k(hidden_states, attn.to_k), self.to_v(hidden_states, attn.to_v)
        else:
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        key, value = heads(key, attn.heads), heads(value, attn.heads)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if copy:
            self.injector.kv[self.path] = (key, value)
            if self.last:
                raise _CopyDone
        query = heads(self.to_q(hidden_states, attn.to_q) if copy else attn.to_q(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)

        out = attend(query, key, value, attention_mask)
        if not copy:
            out = self._inject(query, key, value, attention_mask, out)
        out = self.to_out(out, attn.to_out[0]) if copy else attn.to_out[0](out)
        return tokens_out(attn, out, residual, image_shape)

    def _inject(self, q, k, v, mask, out_self) -> torch.Tensor:
        """out_self (B, N, C) mixed with attention over [K; K_c] on the rows whose prompt holds the token."""
        B = q.shape[0]
        kc, vc = (self.injector.copy_features(t, B, q.dtype) for t in self.injector.kv[self.path])
        if mask is not None:
            mask = F.pad(mask, (0, kc.shape[2]))  # the copy's keys are never masked
        joint = attend(q, torch.cat([k, kc], 2), torch.cat([v, vc], 2), mask)
        weight = self.injector.flags.to(out_self.dtype)                                   # (B,)
        if self.gate is not None:
            weight = weight * torch.tanh(self.gate).to(out_self.dtype)
        return out_self + weight.view(B, 1, 1) * (joint - out_self)


class ReferenceInjector:
    """Runs the copy pass before each UNet call whose prompts hold the identifier, and hands its keys and
    values to the CopyAttnProcessors of the main call (see the module docstring)."""

    def __init__(self, unet, reference: torch.Tensor, noise: torch.Tensor | None, alphas_cumprod: torch.Tensor,
                 null_text: torch.Tensor, token_ids: list[int], rank: int, scale: float, init: str | None,
                 gate: bool, cache: bool, full_resolution: bool = True):
        """reference, noise: (R, C, h, w) scaled latents and their fixed noise (None: clean reference);
        alphas_cumprod: (T,) of the training scheduler; null_text: (1, L, D) features of the empty prompt;
        token_ids: the identifier's ids; cache: keep copy-pass features per timestep (sampling only)."""
        self.reference, self.noise = reference, noise
        self.alphas_cumprod, self.null_text = alphas_cumprod, null_text
        self.token_ids = torch.tensor(token_ids)
        self.cache_enabled = cache
        self.mode, self.busy, self.warned = "off", False, False
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.flags: torch.Tensor | None = None
        self.prompts: deque = deque(maxlen=8)  # (fingerprints (n, 2D) fp32, holds-token (n,)) of encoded prompts
        self._on_device: dict = {}
        self._cache: dict = {}
        self.copy_batch = 1
        self.processors: dict[str, CopyAttnProcessor] = {}
        for path, attn in check_unet(unet, "the model", full_resolution).items():
            proc = CopyAttnProcessor(self, path, attn, attn.processor, rank, scale, init, gate)
            attn.set_processor(proc)
            self.processors[path] = proc
        self.last_known = False  # set after the first copy pass: which attn1 the UNet calls last
        self._handles = [unet.register_forward_pre_hook(self._before_unet, with_kwargs=True),
                         unet.register_forward_hook(self._after_unet, with_kwargs=True, always_call=True)]

    def watch(self, text_encoder) -> None:
        """Record which prompts the text encoder sees hold the identifier."""
        self._handles.append(text_encoder.register_forward_hook(self._after_text, with_kwargs=True))

    # --- which rows hold the identifier
    @staticmethod
    def fingerprint(features: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, 2D) fp32: the last position (it has seen the whole prompt) and the mean."""
        f = features.detach().float()
        return torch.cat([f[:, -1], f.mean(1)], -1)

    def _after_text(self, module, args, kwargs, output):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return
        holds = torch.isin(ids, self._local("token_ids", ids)).any(-1).float()
        self.prompts.append((self.fingerprint(output[0]), holds.to(output[0].device)))

    def flags_for(self, text: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flags, matched), each (B,): flags (fp32) is 1 where row b of the UNet's encoder_hidden_states
        (B, L, D) is an encoded prompt that holds the identifier; matched (bool) where it is any encoded prompt.
        No host sync (the probe may be captured as a CUDA graph)."""
        if text is None:
            return torch.zeros(batch), torch.zeros(batch, dtype=torch.bool)
        fp = self.fingerprint(text)                                                 # (B, 2D)
        tol = 1e-4 if text.dtype == torch.float32 else 1e-2
        flags = torch.zeros(len(fp), device=fp.device)
        matched = torch.zeros(len(fp), dtype=torch.bool, device=fp.device)
        for seen, holds in self.prompts:
            seen, holds = seen.to(fp.device), holds.to(fp.device)
            close = (fp[:, None] - seen[None]).abs().amax(-1) <= tol * seen.abs().amax(-1)[None]  # (B, n)
            flags = torch.maximum(flags, (close.float() * holds[None]).amax(1))
            matched |= close.any(1)
        return flags, matched

    # --- the copy pass
    def _local(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A stored tensor on like's device (copied once per device and dtype)."""
        dtype = {"alphas_cumprod": torch.float32, "token_ids": torch.long}.get(name, like.dtype)
        key = (name, like.device, dtype)
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(like.device, key[2])
        return self._on_device[key]

    def _copy_input(self, sample: torch.Tensor, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """The copy pass's latents (B_c·R, C, h, w) and timesteps (B_c·R,): B_c = 1 where the main call has
        one timestep (sampling) or the reference is clean, else one per row of the main batch."""
        ref = self._local("reference", sample)                                      # (R, C, h, w)
        R = len(ref)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if self.noise is None:
            self.copy_batch = 1
            return ref, torch.zeros(R, dtype=torch.long, device=sample.device)
        if len(t) not in (1, len(sample)):
            raise ValueError(f"selfattn_copy: {len(t)} timesteps for a batch of {len(sample)}")
        self.copy_batch = len(t)
        ab = self._local("alphas_cumprod", sample)[t.round().long().clamp(0, len(self.alphas_cumprod) - 1)]
        ab = ab.view(-1, 1, 1, 1, 1)                                                # (B_c, 1, 1, 1, 1)
        x = ab.sqrt() * ref[None].float() + (1 - ab).sqrt() * self._local("noise", sample)[None].float()
        return x.to(sample.dtype).flatten(0, 1), t.repeat_interleave(R)

    def _run_copy(self, unet, sample: torch.Tensor, timestep) -> dict:
        x, t = self._copy_input(sample, timestep)
        text = self._local("null_text", sample).expand(len(x), -1, -1)
        self.busy, self.mode, self.kv = True, "copy", {}
        try:
            unet(x, t, encoder_hidden_states=text, return_dict=False)
        except _CopyDone:
            pass
        finally:
            self.busy, self.mode = False, "off"
        if len(self.kv) != len(self.processors):
            missing = sorted(set(self.processors) - set(self.kv))
            raise RuntimeError(f"selfattn_copy: the copy pass never reached {missing[0]}")
        if not self.last_known:  # module order is not call order (diffusers registers up_blocks before mid_block)
            self.processors[list(self.kv)[-1]].last = self.last_known = True
        return self.kv

    def _copy_kv(self, unet, sample: torch.Tensor, timestep) -> dict:
        """The copy pass's {path: (K, V)}, from the sampling cache where it has them."""
        t = torch.as_tensor(timestep).reshape(-1)
        if not (self.cache_enabled and not torch.is_grad_enabled() and len(t) == 1):
            return self._run_copy(unet, sample, timestep)
        key = (float(t[0]) if self.noise is not None else None, sample.device, sample.dtype)
        if key not in self._cache:
            size = lambda kv: sum(x.numel() * x.element_size() for pair in kv.values() for x in pair)  # noqa: E731
            kv = self._run_copy(unet, sample, timestep)
            while self._cache and sum(size(v[0]) for v in self._cache.values()) + size(kv) > CACHE_BYTES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (kv, self.copy_batch)
        self.kv, self.copy_batch = dict(self._cache[key][0]), self._cache[key][1]
        return self.kv

    def copy_features(self, t: torch.Tensor, batch: int, dtype) -> torch.Tensor:
        """A copy-pass K or V (B_c·R, H, N_c, D) as (batch, H, R·N_c, D): the R references side by side."""
        Bc = self.copy_batch
        _, H, Nc, D = t.shape
        t = t.to(dtype).view(Bc, -1, H, Nc, D).transpose(1, 2).reshape(Bc, H, -1, D)
        return t.expand(batch, -1, -1, -1) if Bc == 1 else t

    def _before_unet(self, unet, args, kwargs):
        if self.busy or self.mode != "off":
            return
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        flags, matched = self.flags_for(text, len(sample))
        # no host sync while a CUDA graph is captured, nor on the meta device (the memory planner's trace)
        capturing = sample.device.type == "meta" or (sample.is_cuda and torch.cuda.is_current_stream_capturing())
        if not torch.is_grad_enabled() and not capturing and not bool(flags.any()):
            if not bool(matched.all()) and any(bool(holds.any()) for _, holds in self.prompts) and not self.warned:
                self.warned = True
                warnings.warn("selfattn_copy: the UNet's prompt features are none of those the text encoder "
                              "produced (prompt_embeds passed in, or clip_skip), so the reference is not injected; "
                              "pass the prompt as text", stacklevel=2)
            return  # no prompt holds the identifier: the base model, and no copy pass
        self._copy_kv(unet, sample, timestep)
        self.flags, self.mode = flags.to(sample.device), "main"

    def _after_unet(self, unet, args, kwargs, output):
        if not self.busy:
            self.mode, self.kv, self.flags = "off", {}, None


class SelfAttnCopy(Method):
    name = "selfattn_copy"
    trains_text_encoder = True  # the identifier's embedding trains, so prompts are encoded every step
    uses_prior = False  # rows without the token are the frozen model exactly: a class loss has no gradient
    defaults = dict(lr=1e-4, max_steps=1000, weight_decay=1e-2, token_lr=5e-3)
    stop = StopPreset(440, 0.4, 1000, 200)  # LoRA's (the DVAR paper's DreamBooth-LoRA setting)
    saves = "a reference-attention adapter (copy-pass LoRA, gates, token, reference latents)"

    #: ablation switches (recorded in the saved file, which is what sampling follows)
    reference = "noised"   # "noised": the reference noised to the main call's t; "clean": clean, at t = 0
    gate = True            # learned per-layer gate from 0 (False: the copy's keys are fully open from step 0)
    references = 1         # training images used as references (the copy pass's batch grows with it)
    full_resolution = False  # True: inject into the full-resolution layers too (module docstring)
    gate_lr_scale = 100.0  # the gates' lr over --lr (module docstring)

    @classmethod
    def check(cls, cfg):
        if cfg.lora_init not in INITS:
            raise UserError(f"--lora-init {cfg.lora_init!r} is not one of {', '.join(INITS)}")
        refused = [("--concepts", cfg.concepts, "it learns one token and one reference per run; train one "
                    "concept per run"),
                   ("--train-text-encoder", cfg.train_text_encoder, "only the identifier's embedding trains in "
                    "the text encoder"),
                   ("--init-embeddings", cfg.init_embeddings, "it learns its own identifier token"),
                   ("--gradient-checkpointing", cfg.gradient_checkpointing, "a recomputed block would not know "
                    "which of the copy and main passes it belongs to")]
        for flag, value, why in refused:
            if value:
                raise UserError(f"{flag} is not supported by selfattn_copy ({why}); leave it out or use "
                                f"--method lora")
        refuse_template_without_token(cfg, "selfattn_copy injects the reference only into prompts that hold the "
                                           "token")
        if cls.reference not in ("noised", "clean"):
            raise UserError(f"{cls.__name__}.reference must be 'noised' or 'clean', not {cls.reference!r}")

    def prompt(self, text):
        return expand_token(text, self.cfg.token, self.cfg.num_vectors)

    def setup(self, comps):
        super().setup(comps)
        cfg = self.cfg
        unet, te = comps.unet, comps.text_encoder
        check_unet(unet, cfg.model, self.full_resolution)
        self.embedding = add_tokens(comps.tokenizer, te, cfg.token, cfg.num_vectors,
                                    cfg.initializer or cfg.class_word or None)
        device = unet.device
        reference = self._reference_latents(comps).to(device)
        noise = None
        if self.reference == "noised":
            g = torch.Generator().manual_seed(cfg.seed + REFERENCE_NOISE_SEED)
            noise = torch.randn(reference.shape, generator=g).to(device)
        with torch.no_grad():  # the empty prompt holds no new token: its features are fixed
            null_text = te(tokenize(comps.tokenizer, [""]).to(te.device))[0].detach().to(device)
        first = self.embedding.first_id
        self.injector = ReferenceInjector(unet, reference, noise, comps.scheduler.alphas_cumprod.to(device),
                                          null_text, list(range(first, first + cfg.num_vectors)), cfg.lora_rank,
                                          (cfg.lora_alpha or cfg.lora_rank) / cfg.lora_rank, cfg.lora_init,
                                          self.gate, cache=False, full_resolution=self.full_resolution)
        self.injector.watch(te)

    def _reference_latents(self, comps) -> torch.Tensor:
        """(R, C, h, w) scaled VAE means of the first `references` concept images, center-cropped, unflipped."""
        cfg = self.cfg
        resolution = cfg.resolution or comps.native_resolution
        images = ConceptImages(self.training_concepts[0].images, resolution, center_crop=True, random_flip=False)
        pixels = torch.stack([images.pixels(i, 0) for i in range(min(self.references, len(images)))])
        mean, _ = encode_distribution(comps.vae, pixels)
        vae_cfg = comps.vae.config
        return (mean - (getattr(vae_cfg, "shift_factor", None) or 0.0)) * vae_cfg.scaling_factor

    def _gates(self) -> list[nn.Parameter]:
        return [p.gate for p in self.injector.processors.values() if p.gate is not None]

    def param_groups(self):
        lora = [t for p in self.injector.processors.values() for proj in PROJECTIONS
                for t in (p.lowrank(proj).lora_A, p.lowrank(proj).lora_B)]
        groups = [{"params": lora},
                  {"params": [self.embedding.new], "lr": self.cfg.token_lr or self.cfg.lr, "weight_decay": 0.0}]
        if self._gates():
            groups.append({"params": self._gates(), "lr": self.cfg.lr * self.gate_lr_scale, "weight_decay": 0.0})
        return groups

    def trainable_state(self):
        state = {}
        for path, proc in self.injector.processors.items():
            for proj in PROJECTIONS:
                state[f"{path}.{proj}.lora_A"] = proc.lowrank(proj).lora_A
                state[f"{path}.{proj}.lora_B"] = proc.lowrank(proj).lora_B
            if proc.gate is not None:
                state[f"{path}.gate"] = proc.gate
        state["token_embedding"] = self.embedding.new
        return state

    def save(self, out: Path):
        cfg = self.cfg
        scale = (cfg.lora_alpha or cfg.lora_rank) / cfg.lora_rank
        tensors = {name: t.detach().float() * (scale if name.endswith(".lora_B") else 1.0)
                   for name, t in self.trainable_state().items()}
        tensors["reference.latents"] = self.injector.reference.float()
        if self.injector.noise is not None:
            tensors["reference.noise"] = self.injector.noise.float()
        extra = {"token": cfg.token, "num_vectors": cfg.num_vectors, "reference": self.reference,
                 "gate": bool(self.gate), "rank": cfg.lora_rank,
                 "full_resolution": bool(self.full_resolution)}
        formats.atomic_save(tensors, out / FILE, formats.adapter_metadata(cfg, KIND, extra))
        return [FILE]

    @classmethod
    def load(cls, pipe, folder, names):
        if FILE not in names:
            return super().load(pipe, folder, names)
        path = Path(folder) / FILE
        tensors, info = formats.read_adapter(path, KIND, "reference.latents")
        # files written before the switch existed injected into every level
        info.setdefault("full_resolution", True)
        layers = check_unet(pipe.unet, str(path), info["full_resolution"])
        if any(isinstance(attn.processor, CopyAttnProcessor) for attn in layers.values()):
            raise UserError(f"{path}: this pipeline holds a selfattn_copy adapter already; load each into a fresh "
                            f"pipeline")
        fit_checks(tensors, layers, path, info["gate"], info["rank"], info["reference"])
        alphas = getattr(pipe.scheduler, "alphas_cumprod", None)  # the noise levels of the noised reference
        if alphas is None:
            raise UserError(f"{path}: the pipeline's scheduler {type(pipe.scheduler).__name__} has no "
                            f"alphas_cumprod; use a DDPM, DDIM, DPM-Solver or Euler scheduler")
        vectors = tensors["token_embedding"]
        check_width(pipe, path, info["token"], vectors)
        names_of_token = token_names(info["token"], len(vectors))
        if info["token"] not in pipe.tokenizer.get_vocab():
            pipe.load_textual_inversion({info["token"]: vectors}, token=info["token"])
        device = pipe.unet.device
        with torch.no_grad():
            te = pipe.text_encoder
            null_text = te(tokenize(pipe.tokenizer, [""]).to(te.device))[0].detach().to(device)
            noise = tensors["reference.noise"] if info["reference"] == "noised" else None
            injector = ReferenceInjector(pipe.unet, tensors["reference.latents"].to(device), noise,
                                         alphas.float().to(device), null_text,
                                         pipe.tokenizer.convert_tokens_to_ids(names_of_token), info["rank"], 1.0,
                                         None, info["gate"], cache=True,
                                         full_resolution=info["full_resolution"])
            for layer_path, proc in injector.processors.items():
                for proj in PROJECTIONS:
                    low = proc.lowrank(proj)
                    low.lora_A.copy_(tensors[f"{layer_path}.{proj}.lora_A"])
                    low.lora_B.copy_(tensors[f"{layer_path}.{proj}.lora_B"])
                if proc.gate is not None:
                    proc.gate.copy_(tensors[f"{layer_path}.gate"])
                proc.requires_grad_(False)
        injector.watch(pipe.text_encoder)
        return [FILE]


def fit_checks(tensors: dict[str, torch.Tensor], layers: dict[str, nn.Module], path: Path, gate: bool,
               rank: int, reference: str) -> None:
    """Every self-attention layer of the pipeline has its tensors in the file, in its shapes, and the file has
    no layer the pipeline lacks: a UserError naming the first mismatch otherwise."""
    known = {f"{p}.{proj}.{ab}" for p in layers for proj in PROJECTIONS for ab in ("lora_A", "lora_B")}
    known |= {f"{p}.gate" for p in layers} if gate else set()
    known |= {"token_embedding", "reference.latents"} | ({"reference.noise"} if reference == "noised" else set())
    extra = sorted(k for k in tensors if k not in known)
    missing = sorted(known - set(tensors))
    if missing and ".attn1." not in missing[0]:
        raise UserError(f"{path} lacks {missing[0]}: the file is incomplete; train it again")
    if extra or missing:
        what = f"has {extra[0]}, which this model lacks" if extra else f"lacks {missing[0]}"
        raise UserError(f"{path} {what}; {OTHER_BASE}")
    for p, attn in layers.items():
        for proj in PROJECTIONS:
            linear = attn.get_submodule(proj)
            a, b = tensors[f"{p}.{proj}.lora_A"], tensors[f"{p}.{proj}.lora_B"]
            if (a.dim() != 2 or b.dim() != 2 or a.shape[1] != linear.in_features or b.shape[0] != linear.out_features
                    or a.shape[0] != rank or b.shape[1] != rank):
                raise UserError(f"{path}: {p}.{proj} has shapes {tuple(a.shape)}, {tuple(b.shape)}, which do not fit "
                                f"this model's layer of shape {tuple(linear.weight.shape)}; {OTHER_BASE}")
    latents = tensors["reference.latents"]
    if latents.dim() != 4:
        raise UserError(f"{path}: reference.latents has shape {tuple(latents.shape)}, not (R, C, h, w); train it again")
