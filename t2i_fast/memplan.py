"""Peak device memory of a training run, estimated before it starts, from the real modules and the real step.

    plan = estimate(cfg)           # cfg: a TrainConfig, as `t2i-fast train` would run it
    print(plan.table())            # one row per component
    plan.total                     # bytes the run needs on its device

No weights are read and nothing runs on a GPU: the model's UNet, VAE and text encoder are built from their
configs on the meta device (models.load_components(weights=False)), the method patches them as in training,
and one training step (loss and backward) and one DVAR probe (a forward without gradients) are traced there
under memtrack.TensorMemory, which counts every storage from the operator that makes it until it is freed.
On CUDA every tensor is counted rounded up to the caching allocator's 512-byte blocks. Rows:
  weights            frozen modules on the device in training (the VAE leaves it when latents are cached, the
                     text encoder when prompts are cached)
  trained tensors    what the method trains, fp32
  optimizer state    exactly as optim.state_bytes counts it for --optimizer
  training batch     one batch (latents, noise, timesteps, text features or token ids, masks)
  probe batch        DVAR's fixed batch of 4 items, kept for the whole run
  step               the traced step's peak: activations saved for backward, gradients, temporaries
  probe pass         the traced probe's peak; on CUDA its graph's private pool keeps it for the whole run, so it
                     adds to the step; on the CPU the two never overlap and the larger counts
  margin             a stated fragmentation margin of MARGIN x the transient rows (cuda only)
  CUDA context       a stated CUDA_CONTEXT for the context and cuBLAS / cuDNN workspaces (cuda only), which
                     torch.cuda.max_memory_allocated does not see but the card must hold
  all-reduce buffers under data parallelism (processes > 1): the flat gradient copies the all-reduce holds at
                     once (distributed.py: IN_FLIGHT buckets overlapped, one BUCKET plain), or all the
                     gradients where they are fewer; counted as if they coincided with the step's peak

Traced as the device would run it: attention takes the flash kernel's path (what SDPA picks on the CPU and
for these shapes on CUDA), the fused LoRA linear its PyTorch path (the autograd Function of its Triton path,
saving the same tensors). A mixed-precision run is traced as the trainer runs it on CUDA: frozen modules in
the half dtype (the trainer's own placement; what a method trains whole stays fp32), trained tensors, their
gradients and the optimizer's state fp32, the UNet under autocast, which the meta device lacks and
MetaAutocast emulates with CUDA's op lists (--mixed-precision auto is planned as bf16; fp16 is the same size).
The optimizer's own step is not traced (it makes no tensor that outlives it beyond its state).
Limits: prior-preservation class images must exist already (the planner does not generate them); the CUDA
op lists are checked against PyTorch's own autocast test lists, the emulation itself against the CPU's real
autocast (bf16, its own lists), not against a GPU.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import UserError
from .memtrack import TensorMemory, resident_bytes
from .meta_autocast import MetaAutocast, autocast_region

CUDA_BLOCK = 512  # the CUDA caching allocator's rounding of every allocation
MARGIN = 0.10     # fragmentation margin on the transient rows (cuda), stated, not measured here
CUDA_CONTEXT = 512 << 20  # the CUDA context, cuBLAS / cuDNN workspaces: outside torch's allocator (stated)
GiB = 1 << 30


@dataclass
class Row:
    name: str
    bytes: int
    how: str


@dataclass
class MemoryPlan:
    rows: list[Row] = field(default_factory=list)
    target: str = "cuda"
    precision: torch.dtype = torch.float32  # what the step computes in (autocast's dtype, or fp32)

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.rows)

    def get(self, name: str) -> int:
        return sum(r.bytes for r in self.rows if r.name == name)

    def table(self) -> str:
        width = max(len(r.name) for r in self.rows)
        lines = [f"{'component':<{width}}  {'MiB':>10}  how"]
        lines += [f"{r.name:<{width}}  {r.bytes / 2**20:>10.1f}  {r.how}" for r in self.rows]
        mixed = f", {_name(self.precision)} mixed precision" if self.precision != torch.float32 else ", fp32"
        lines.append(f"{'total':<{width}}  {self.total / 2**20:>10.1f}  on {self.target} ({human(self.total)}{mixed})")
        return "\n".join(lines)


class _FlashAttention(TorchFunctionMode):
    """scaled_dot_product_attention as the flash kernel runs it (output and log-sum-exp saved for backward):
    on the meta device SDPA would otherwise take its math path, which materialises the attention matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            extra = dict(zip(("attn_mask", "dropout_p", "is_causal"), args[3:])) | kwargs
            if q.device.type == "meta" and extra.get("attn_mask") is None and not extra.get("dropout_p"):
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, is_causal=bool(extra.get("is_causal", False)), scale=extra.get("scale"))[0]
        return func(*args, **kwargs)


def run_dtype(cfg, target: str, precision: str | None = None) -> torch.dtype:
    """The dtype the run computes in: precision (no, fp16, bf16) where given, else cfg.mixed_precision as the
    trainer resolves it on `target`, with "auto" assumed bf16 on CUDA (what cards since Ampere get; a card
    without bf16 gets fp16, of the same size). The trainer computes in fp32 on the CPU."""
    name = precision or ("no" if target == "cpu" else cfg.mixed_precision)
    dtypes = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "auto": torch.bfloat16}
    if name not in dtypes:
        raise UserError(f"--mixed-precision {name!r} is not one of auto, no, fp16, bf16")
    return dtypes[name]


def placed_trainer(cfg, dtype: torch.dtype, components=None):
    """A Trainer of cfg whose frozen modules are placed in `dtype` as the trainer places them on CUDA (its
    _place_models, methods' full_precision_modules kept fp32), on cfg's device, whatever that is. Its own
    autocast is left off: the caller runs the step under autocast_region."""
    from diffusers.utils import logging as diffusers_logging

    from .trainer import Trainer

    class Placed(Trainer):
        def _place_models(self):
            self.dtype = dtype
            super()._place_models()

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warning on ModelMixin.to(dtype) names no module here: []
    try:
        trainer = Placed(cfg, components=components)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    trainer.dtype = torch.float32
    return trainer


def _meta_batch(trainer, batch_size: int, instance_only: bool = False):
    """A training batch of the run's composition (instance and class items, masks, cached text features or
    token ids) with meta tensors: the shapes the run's BatchSource would draw."""
    from .batches import Batch, BatchSource
    from .data import tokenize

    source = BatchSource(trainer.streams, trainer.comps, torch.device("meta"), trainer.prior,
                         cache_latents=False, cache_text=False)
    items = source.draw_items(torch.Generator().manual_seed(0), batch_size)
    if instance_only:
        items = [it for it in items if it[0] < source.num_instance_streams]
    comps, n = trainer.comps, len(items)
    size = trainer.resolution // comps.vae_scale_factor
    latents = torch.empty(n, comps.unet.config.in_channels, size, size, device="meta")
    cfg = trainer.cfg
    text = ids = None
    width = sum(te.config.hidden_size for te in comps.text_encoders)  # SDXL: both encoders' features
    if cfg.cache_text and not trainer.method.trains_text_encoder:
        text = torch.empty(n, comps.tokenizer.model_max_length, width, device="meta")
    else:
        ids = tokenize(comps.tokenizer, source.prompts_for(items)).to("meta")
    extra = {}
    if comps.family == "sdxl":  # the pooled embedding (or the second tokenizer's ids) and the time ids
        extra["time_ids"] = torch.empty(n, 6, device="meta")
        if text is not None:
            extra["pooled"] = torch.empty(n, comps.text_encoder_2.config.projection_dim, device="meta")
        else:
            extra["input_ids_2"] = torch.empty_like(ids)
    masked = any(source.streams[s].masked for s, *_ in items)
    mask = torch.empty(n, 1, size, size, device="meta") if masked else None
    num_instance = sum(1 for s, *_ in items if s < source.num_instance_streams)
    # the probe keeps its timesteps as a view of a permutation of all of them (probe.probe_timesteps)
    steps = comps.scheduler.config.num_train_timesteps if instance_only else n
    timesteps = torch.zeros(steps, dtype=torch.long, device="meta")[:n]
    return Batch(latents, torch.empty_like(latents), timesteps, text, ids,
                 torch.ones(n, device="meta"), max(1, num_instance), mask, **extra)


def _tensors(batch) -> list[torch.Tensor]:
    return [t for t in vars(batch).values() if isinstance(t, torch.Tensor)]


def kept_on_device(trainer) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """(frozen weights, trained tensors, which modules) that a run keeps on its device while it trains: the
    UNet; the text encoder unless its prompts are cached; the VAE unless latents are (trainer._build_batches
    moves what is cached off the device)."""
    cfg, comps, method = trainer.cfg, trainer.comps, trainer.method
    trained = list(method.parameters())
    trained_ids = {p.untyped_storage()._cdata for p in trained}
    modules = {"UNet": comps.unet}
    if not (cfg.cache_text and not method.trains_text_encoder):
        modules["text encoder"] = comps.text_encoder
        if comps.text_encoder_2 is not None:
            modules["text encoder 2"] = comps.text_encoder_2
    if not cfg.cache_latents:
        modules["VAE"] = comps.vae
    held = {name: [t for t in (*m.parameters(), *m.buffers()) if t.untyped_storage()._cdata not in trained_ids]
            for name, m in modules.items()}
    frozen = [t for tensors in held.values() for t in tensors]
    # a module trained whole (DreamBooth's UNet) holds nothing frozen: not named
    return frozen, trained, ", ".join(name for name, tensors in held.items() if tensors)


def estimate(cfg, target: str = "cuda", precision: str | None = None, processes: int = 1) -> MemoryPlan:
    """The plan of cfg's run on `target` ("cuda": with the allocator's rounding, the probe's graph pool and the
    margin; "cpu": the tensors alone, which is what the CPU run's own TensorMemory measures). precision (no,
    fp16, bf16): plan the run in that precision instead of cfg's (run_dtype), e.g. a bf16 run on the CPU as
    measure(cfg, "bf16") runs it. processes: the data-parallel processes the run is one of (cfg's batch is
    then that process's share), which adds the all-reduce's buffers."""
    from .models import load_components
    from .optim import state_bytes
    from .trainer import fill_defaults

    from .methods import get_method
    from .methods.base import StagedMethod

    if target not in ("cuda", "cpu"):
        raise ValueError(f"target must be cuda or cpu, not {target!r}")
    if issubclass(get_method(cfg.method), StagedMethod):  # a later stage needs files an earlier one writes
        raise UserError(f"{cfg.method} runs several trainings in a row; plan each with its own method "
                        f"(e.g. --method textual_inversion, then --method lora)")
    cfg = fill_defaults(cfg)
    dtype = run_dtype(cfg, target, precision)
    with tempfile.TemporaryDirectory() as tmp:  # the run's folder is only checked, never written
        run = cfg.replace(device="meta", out=str(Path(tmp) / "plan"), progress=False, mixed_precision="no")
        trainer = placed_trainer(run, dtype, components=load_components(cfg.model, weights=False))
    comps, method = trainer.comps, trainer.method
    block = CUDA_BLOCK if target == "cuda" else 1
    frozen, trained, names = kept_on_device(trainer)

    plan = MemoryPlan(target=target, precision=dtype)
    plan.rows.append(Row("weights", resident_bytes(frozen, block),
                         f"frozen {names}, {_dtypes(frozen)}" if frozen else "nothing frozen on the device"))
    plan.rows.append(Row("trained tensors", resident_bytes(trained, block),
                         f"{sum(p.numel() for p in trained):,} values, {_dtypes(trained)}"))
    batch = _meta_batch(trainer, cfg.batch_size)
    plan.rows.append(Row("training batch", resident_bytes(_tensors(batch), block),
                         f"{len(batch.latents)} item{'s' if len(batch.latents) != 1 else ''}"))
    probing = cfg.early_stop == "dvar"
    if probing:
        from .probe import PROBE_SIZE

        probe = _meta_batch(trainer, PROBE_SIZE, instance_only=True)
        plan.rows.append(Row("probe batch", resident_bytes(_tensors(probe), block),
                             f"DVAR's fixed {len(probe.latents)} items"))

    half = dtype != torch.float32
    autocast = MetaAutocast(target, dtype) if half else contextlib.nullcontext()

    def region():  # a fresh context each time: the step's and the probe's
        return autocast_region(comps.unet, dtype, autocast) if half else contextlib.nullcontext()

    comps.unet.train()
    method.train()
    with trainer.kernels_switch(), _FlashAttention(), autocast, region(), TensorMemory(block) as step:
        _backward(trainer.loss(batch))
    stepped = [p for p in trained if p.grad is not None]  # the optimizer keeps state only for these
    for p in trained:
        p.grad = None
    plan.rows.insert(2, Row("optimizer state", state_bytes(cfg.optimizer, stepped, block), cfg.optimizer))
    how = f" under {_name(dtype)} autocast as on {target}" if half else ""
    if half and precision is None and cfg.mixed_precision == "auto":
        how += " (--mixed-precision auto: bf16 assumed; a card without bf16 gets fp16, of the same size)"
    plan.rows.append(Row("step", step.peak, f"traced{how}: activations saved for backward, gradients, temporaries"))
    transient = step.peak
    if probing:
        comps.unet.eval()
        # the CUDA graph is captured with autocast's cast cache off (probe.py); the CPU probe runs eagerly
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(target != "cuda")
        try:
            with trainer.kernels_switch(), _FlashAttention(), autocast, region(), TensorMemory(block) as pass_, \
                    torch.no_grad():
                trainer.loss(probe)
        finally:
            torch.set_autocast_cache_enabled(cache)
        if target == "cuda":
            plan.rows.append(Row("probe pass", pass_.peak, "traced forward; its CUDA graph's pool stays allocated"))
            transient += pass_.peak
        else:
            extra = max(0, pass_.peak - step.peak)
            plan.rows.append(Row("probe pass", extra, f"traced forward ({pass_.peak / 2**20:.1f} MiB): what it "
                                                      f"needs beyond the step, which it never overlaps"))
    if processes > 1:
        plan.rows.append(allreduce_buffers(trained, block))
    if target == "cuda":
        plan.rows.append(Row("margin", int(MARGIN * transient), f"{MARGIN:.0%} of the transient rows, for "
                                                                f"fragmentation (stated)"))
        plan.rows.append(Row("CUDA context", CUDA_CONTEXT, "context and library workspaces, outside torch's "
                                                          "allocator (stated)"))
    return plan


def _backward(loss: torch.Tensor) -> None:
    """loss.backward() without passing through the torch-function modes: a mode handles a call with itself off
    the stack, so backward, and gradient checkpointing's recomputation inside it, would run without them (the
    recomputed forward would lose the flash path and autocast's casts)."""
    try:
        from torch.autograd.graph import _engine_run_backward  # what Tensor.backward runs, less the dispatch
    except ImportError:  # a private name of torch 2.x: without it, checkpointed blocks are traced less exactly
        loss.backward()
        return
    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _dtypes(tensors) -> str:
    """The floating dtypes among tensors: "bf16/fp32" (integer buffers such as position ids left out)."""
    return "/".join(sorted({_name(t.dtype) for t in tensors if t.is_floating_point()})) or "-"


# What --vram may switch on, cheapest in speed first, each on top of those before it. The caches cost nothing
# per step (the run encodes once); `python bench/bench_memplan.py switch-cost` (mid model, 256 px, LoRA r4, 1
# thread, median of 3 alternated rounds): the 8-bit optimizer 0.99x the step time, gradient checkpointing 1.50x.
SWITCHES = (("cache_latents", True), ("cache_text", True), ("optimizer", "adamw8bit"),
            ("gradient_checkpointing", True))
_UNITS = {"": GiB, "g": GiB, "gb": GiB, "gib": GiB, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}


def human(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


def as_flag(nbytes: int) -> str:
    """The smallest --vram value, rounded up, that holds nbytes: 6.03GB, 8MB."""
    return f"{math.ceil(nbytes / GiB * 100) / 100:.2f}GB" if nbytes >= GiB else f"{math.ceil(nbytes / 2**20)}MB"


def parse_size(text: str) -> int:
    """Bytes of a memory size written like 8GB, 6.5G, 6144MB or 8 (GiB): a UserError for anything else."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--vram {text!r} is not a memory size; write it like 8GB, 6.5GB or 6144MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def target_of(cfg) -> str:
    """The device a plan is for: the CPU only where the run says so; auto and cuda plan for a GPU."""
    return "cpu" if str(cfg.device).startswith("cpu") else "cuda"


def fit(cfg, budget: int, target: str | None = None, say=print, processes: int = 1):
    """cfg with the fewest, cheapest switches of SWITCHES turned on so that its plan fits `budget` bytes, and
    that plan; says what it chose and why. A UserError naming the smallest budget that would fit when none does.
    processes: as estimate's (cfg's batch is one process's share)."""
    target = target or target_of(cfg)
    tried, plan = [], None
    for i in range(len(SWITCHES) + 1):
        changes = {k: v for k, v in SWITCHES[:i] if getattr(cfg, k) != v}
        if i and not changes and plan is not None:
            continue  # already so: the plan is the previous one
        candidate = cfg.replace(**changes)
        plan = estimate(candidate, target, processes=processes)
        tried.append((changes, plan))
        if plan.total <= budget:
            say(f"memory plan: {human(plan.total)} of --vram {human(budget)} on {target}" +
                (f" with {_flags(changes)} (without: {human(tried[0][1].total)})" if changes else ", as configured"))
            return candidate, plan
    smallest = min(p.total for _, p in tried)
    raise UserError(f"the run needs at least {human(smallest)} on {target} even with {_flags(dict(SWITCHES))}, more "
                    f"than --vram {human(budget)}; give --vram {as_flag(smallest)} or more, or lower --resolution or "
                    f"--batch-size")


def allreduce_buffers(trained: list[torch.Tensor], block: int) -> Row:
    """The flat fp32 gradient copies that distributed.py's all-reduce holds at once."""
    from . import distributed as dist

    overlapped = dist.overlaps_allreduce()
    held = dist.IN_FLIGHT * dist.OVERLAP_BUCKET if overlapped else dist.BUCKET
    values = min(sum(p.numel() for p in trained), held)
    how = f"at most {dist.IN_FLIGHT} buckets of {dist.OVERLAP_BUCKET:,} values" if overlapped else \
        f"one bucket of at most {dist.BUCKET:,} values"
    return Row("all-reduce buffers", -(-values * 4 // block) * block, f"{how}, fp32 (stated)")


def _flags(changes: dict) -> str:
    """The train flags that make these changes: --gradient-checkpointing, --optimizer adamw8bit, ..."""
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in changes.items())


def measure(cfg, precision: str | None = None) -> MemoryPlan:
    """The same rows measured on a real run of cfg on the CPU (the planner's validation): the tensors the run
    keeps, the optimizer's state after a real step, and TensorMemory over a real step and a real probe pass.
    precision "bf16" (or "fp16"): the run as the trainer makes it on CUDA, built here on the CPU (the trainer
    itself trains in fp32 there): frozen modules in that dtype, the UNet under the CPU's torch.autocast."""
    from .optim import build_optimizer
    from .probe import PROBE_SIZE, build_probe_batch

    dtype = run_dtype(cfg, "cpu", precision)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = placed_trainer(cfg.replace(device="cpu", out=str(Path(tmp) / "run"), progress=False,
                                             mixed_precision="no"), dtype)
        batches = trainer._build_batches()
    cfg, comps, method = trainer.cfg, trainer.comps, trainer.method

    def region():  # a fresh context for each pass
        return autocast_region(comps.unet, dtype) if dtype != torch.float32 else contextlib.nullcontext()

    frozen, trained, _ = kept_on_device(trainer)
    opt = build_optimizer(cfg.optimizer, method.param_groups(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    comps.unet.train()
    method.train()
    with region():
        trainer.loss(batches.draw(generator, cfg.batch_size)).backward()  # a first step makes the optimizer's state
    opt.step()
    opt.zero_grad(set_to_none=True)
    state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    batch = batches.draw(generator, cfg.batch_size)
    plan = MemoryPlan(target="cpu (measured)", precision=dtype)
    plan.rows += [Row("weights", resident_bytes(frozen), "real"), Row("trained tensors", resident_bytes(trained), "real"),
                  Row("optimizer state", resident_bytes(state), "real, after one step"),
                  Row("training batch", resident_bytes(_tensors(batch)), "real")]
    with trainer.kernels_switch(), region(), TensorMemory() as step:
        trainer.loss(batch).backward()
    opt.zero_grad(set_to_none=True)
    if cfg.early_stop == "dvar":
        probe = build_probe_batch(batches, cfg.seed, PROBE_SIZE)
        plan.rows.append(Row("probe batch", resident_bytes(_tensors(probe)), "real"))
    plan.rows.append(Row("step", step.peak, "measured by TensorMemory"))
    if cfg.early_stop == "dvar":
        comps.unet.eval()
        with trainer.kernels_switch(), region(), TensorMemory() as pass_, torch.no_grad():
            trainer.loss(probe)
        plan.rows.append(Row("probe pass", max(0, pass_.peak - step.peak), f"measured ({pass_.peak / 2**20:.1f} MiB)"))
    return plan
