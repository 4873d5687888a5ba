"""Optimizer factory and the 8-bit AdamW.

`build_optimizer(name, ...)` with name in OPTIMIZERS:
  adamw            torch AdamW (fused where every tensor is a CPU/CUDA float tensor), fp32 state, 8 B/param
  adamw8bit        AdamW8bit below: blockwise 8-bit state, ~2 B/param
  paged_adamw8bit  the same; on CUDA its large state tensors live in bitsandbytes' paged (unified) memory
  sgd              SGD with momentum 0.9

AdamW8bit is one torch.optim.Optimizer whatever the device. Its state per parameter is bitsandbytes'
blockwise layout: `state1` / `state2` (uint8 codes of m and v into the signed / unsigned dynamic maps),
`absmax1` / `absmax2` (fp32, one per block of 256 values) and `step` (int). Tensors under `min_8bit_size`
elements (4096, as in bitsandbytes) keep fp32 `state1` / `state2` and no absmax. The update:
    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g²
    p = p * (1 - lr*wd) - (m / (sqrt(v) + eps*c2)) * (lr*c2/c1),  c1 = 1-b1^t, c2 = sqrt(1-b2^t)
(torch.optim.AdamW's update, rearranged so the bias corrections fold into two scalars),
then m and v are requantized with each block's new absmax (nearest map entry, found arithmetically; see
quantize_ref). Backends, chosen per
tensor device: CUDA -> bitsandbytes' fused kernel (same layout, so a checkpoint moves between devices);
CPU -> the native op t2i_fast::adamw8bit_step (csrc/adamw8bit.cpp), or its PyTorch twin
`adamw8bit_step_ref` when the extension is missing or the fast paths are switched off (the kernels' one
switch: `use_kernels(False)`, --no-kernels, T2I_FAST_KERNELS=0; see native.enabled()). An explicit
`backend=` beats the switch. The switch covers our own ops only: bitsandbytes on CUDA is not switched.

Non-finite gradients: `nonfinite="skip"` (default) skips the whole step (no weight or state changes,
`skipped_steps` counts it), `"raise"` raises FloatingPointError before anything is written, `"off"` checks
nothing (a NaN gradient then reaches the weights).
"""
from __future__ import annotations

import functools
import math
import types
import warnings

import torch

from .memtrack import round_up

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
NONFINITE = ("skip", "raise", "off")
BLOCK = 256
MIN_8BIT_SIZE = 4096  # tensors with fewer values keep fp32 moments, as in bitsandbytes


def build_optimizer(name: str, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 1e-2, nonfinite: str = "skip") -> torch.optim.Optimizer:
    """Build the optimizer called `name` over `params` (an iterable of tensors or param groups).

    nonfinite: what a step does when a gradient holds NaN/inf ("skip", "raise" or "off"); applies to
    every optimizer here.
    """
    params = list(params)
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                fused=_fused_ok(params))
        return _guard(opt, nonfinite)
    if name in ("adamw8bit", "paged_adamw8bit"):
        return AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, nonfinite=nonfinite,
                         paged=name == "paged_adamw8bit")
    if name == "sgd":
        return _guard(torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay), nonfinite)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def state_bytes(name: str, params, granularity: int = 1) -> int:
    """Bytes of state optimizer `name` keeps for these tensors once it has stepped, counted without making it
    (the memory planner; each state tensor rounded up to `granularity` bytes): AdamW two moments in the
    tensor's dtype and a step counter per tensor, AdamW8bit two uint8 codes per value and two fp32 absmax per
    block of BLOCK (fp32 moments below its min_8bit_size), SGD one momentum buffer."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    up = functools.partial(round_up, granularity=granularity)
    total = 0
    for p in params:
        n, size = p.numel(), p.element_size()
        if name == "adamw":
            total += 2 * up(n * size) + up(4)
        elif name == "sgd":
            total += up(n * size)
        elif n < MIN_8BIT_SIZE:
            total += 2 * up(n * 4)
        else:
            total += 2 * up(n) + 2 * up(4 * -(-n // BLOCK))
    return total


def _fused_ok(params) -> bool:
    """torch's fused AdamW handles float tensors on CPU and CUDA alike."""
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)


# ---------------------------------------------------------------------------------------------------------
# Quantization tables (shared by the twin and the native op)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes.functional.create_dynamic_map, reproduced exactly (sorted, 256 float32 entries)."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _quant_consts(q: torch.Tensor, signed: bool) -> torch.Tensor:
    """(5, 8) float32 constants of the arithmetic quantizer for the sorted map q (see quantize_ref).

    Row 0: thresholds U (the map's midpoints between 0 and the first entry, between decades, and between
    the last decade and 1.0). Rows 1-4, indexed by d = #(U[:7] < |x|): S = 10^(6-(d-1)), W = N/0.9, the
    code of the decade's first entry and the code of its last (N = entries in decade d-1). Row d = 0 is
    S = W = 0 with both codes on the map's zero.
    """
    base = 128 if signed else 1
    n = [2 ** d if signed else 2 ** (d + 1) for d in range(7)]
    off = [sum(n[:d]) for d in range(7)]
    bottom = [q[base + off[d]] for d in range(7)]
    top = [q[base + off[d] + n[d] - 1] for d in range(7)]
    u = [bottom[0] / 2] + [(top[k - 1] + bottom[k]) / 2 for k in range(1, 7)] + [(top[6] + q[255]) / 2]
    return torch.stack([
        torch.stack(u).float(),
        torch.tensor([0.0] + [10.0 ** (6 - d) for d in range(7)], dtype=torch.float32),
        torch.tensor([0.0] + [n[d] / 0.9 for d in range(7)], dtype=torch.float32),
        torch.tensor([base - 1] + [base + off[d] for d in range(7)], dtype=torch.float32),
        torch.tensor([base - 1] + [base + off[d] + n[d] - 1 for d in range(7)], dtype=torch.float32),
    ])


def quant_tables(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(qmaps (2, 256) f32, qconst (2, 5, 8) f32); index 0 is the signed map (m), 1 the unsigned (v)."""
    device = torch.device(device)
    if device not in _TABLES:
        if device.type != "cpu":
            _TABLES[device] = tuple(t.to(device) for t in quant_tables("cpu"))
        else:
            qmaps = torch.stack([create_dynamic_map(True), create_dynamic_map(False)]).contiguous()
            qconst = torch.stack([_quant_consts(qmaps[0], True), _quant_consts(qmaps[1], False)]).contiguous()
            _TABLES[device] = (qmaps, qconst)
    return _TABLES[device]


def quantize_ref(x: torch.Tensor, qconst: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 codes of x (float32 in [-1, 1]) into the signed or unsigned dynamic map (qconst: (5, 8)).

    The map is 7 decades of evenly spaced entries, so the nearest entry is found arithmetically: decade
    d from 7 threshold comparisons, then trunc((|x| S_d - 0.1) W_d) inside it (a value just under the
    decade's start gives a t in (-1, 0), which truncates to 0), plus the decade's first code, clamped to
    its last; an 8th threshold picks the top entry (1.0). This equals torch.searchsorted over the map's
    midpoints except within rounding of a midpoint (one code off there). Same fp32 operations, in the same
    order, as the kernel's quantize / quantize8, which compare |x| with the thresholds as int32 bit
    patterns (the same order as the floats for |x| >= 0, and the same answer for NaN) and take the sign
    from the sign bit.
    """
    c = qconst.to(x.device)
    a = x.abs().contiguous()
    ai, u = a.view(torch.int32), c[0].contiguous().view(torch.int32)
    d = (ai.unsqueeze(-1) > u[:7]).sum(-1)
    top = (ai > u[7]).to(torch.int32)
    t = (a * c[1][d] - 0.1) * c[2][d]
    k = torch.minimum(t.to(torch.int32) + c[3][d].to(torch.int32), c[4][d].to(torch.int32))
    idx = torch.where(torch.signbit(x), 254 - k, k + top) if signed else k + top
    return idx.to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# The PyTorch twin of t2i_fast::adamw8bit_step


def _scalars(lr, beta1, beta2, eps, weight_decay, step):
    c1 = 1.0 - math.pow(beta1, step)
    c2 = math.sqrt(1.0 - math.pow(beta2, step))
    return 1.0 - lr * weight_decay, eps * c2, lr * c2 / c1


def adamw8bit_step_ref(params, grads, state1, state2, absmax1, absmax2, qmaps, qconst, steps, lr: float,
                       beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """In place, one AdamW step for each param, in the same fp32 arithmetic as the native op.

    params/grads: float32/16/bf16 tensors; state1/state2: uint8 codes (with absmax1/absmax2 float32 of
    ceil(n/256) blocks) or float32 m/v (absmax unused); steps: the step number (>= 1) of each param.
    qmaps, qconst: quant_tables(); the same tables the kernel uses.
    """
    for p, g, s1, s2, a1, a2, step in zip(params, grads, state1, state2, absmax1, absmax2, steps):
        decay, eps_c2, step_size = _scalars(lr, beta1, beta2, eps, weight_decay, step)
        g32 = g.reshape(-1).float()
        if s1.dtype == torch.uint8:
            n = g32.numel()
            nb = a1.numel()
            pad = nb * BLOCK - n
            q1, q2 = qmaps[0].to(g32.device), qmaps[1].to(g32.device)
            m = (q1[s1.reshape(-1).long()].view(-1) if pad == 0 else
                 torch.nn.functional.pad(q1[s1.reshape(-1).long()], (0, pad)))
            v = (q2[s2.reshape(-1).long()].view(-1) if pad == 0 else
                 torch.nn.functional.pad(q2[s2.reshape(-1).long()], (0, pad)))
            m = (m.view(nb, BLOCK) * a1.view(nb, 1)).view(-1)[:n]
            v = (v.view(nb, BLOCK) * a2.view(nb, 1)).view(-1)[:n]
        else:
            m, v = s1.reshape(-1), s2.reshape(-1)
        m = m * beta1 + g32 * (1.0 - beta1)
        v = v * beta2 + (g32 * g32) * (1.0 - beta2)
        p32 = p.reshape(-1).float() * decay
        # torch's fp32 CPU sqrt is off by up to 1 ulp; sqrt in fp64 rounded once to fp32 is the correctly
        # rounded fp32 sqrt, which is what the kernel's sqrtf computes.
        upd = (m / (v.double().sqrt().float() + eps_c2)) * step_size
        p.copy_((p32 - upd).view_as(p))
        if s1.dtype == torch.uint8:
            for s, a, x, c, signed in ((s1, a1, m, qconst[0], True), (s2, a2, v, qconst[1], False)):
                xb = torch.nn.functional.pad(x, (0, pad)).view(nb, BLOCK)
                amax = xb.abs().amax(dim=1)
                inv = torch.where(amax > 0, 1.0 / amax, torch.zeros((), device=x.device))
                xn = xb * inv.view(nb, 1)
                s.copy_(quantize_ref(xn.view(-1)[:n], c, signed).view_as(s))
                a.copy_(amax)
        else:
            s1.copy_(m.view_as(s1))
            s2.copy_(v.view_as(s2))


def all_finite_ref(tensors) -> torch.Tensor:
    """0-dim bool tensor: True when no tensor holds NaN or inf."""
    if not tensors:
        return torch.tensor(True)
    norms = torch._foreach_norm([t for t in tensors], math.inf)
    return torch.stack([n.to(norms[0].device) for n in norms]).isfinite().all()


def _native() -> bool:
    """Whether to run the native ops now (switch on and extension loaded), asked at each call."""
    from t2i_fast import native

    return native.enabled()


def _native_built() -> bool:
    from t2i_fast import native

    return native.available()


# ---------------------------------------------------------------------------------------------------------
# The optimizer


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit state (~2 bytes per parameter), on CUDA and on the CPU.

    Args: params, lr, betas, eps, weight_decay as torch.optim.AdamW (weight decay is decoupled);
    min_8bit_size: tensors with fewer elements keep fp32 state; nonfinite: "skip" | "raise" | "off";
    paged: on CUDA, state tensors of 100k+ elements go to bitsandbytes' paged memory;
    backend: "auto" (CUDA: bitsandbytes; CPU: the native op, or its twin where the extension is missing or
    inside use_kernels(False) / under T2I_FAST_KERNELS=0, decided at each step), "native" (the native op
    whatever the switch; raises here when the extension is missing), "ref" (the twin), "bnb".
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, min_8bit_size: int = MIN_8BIT_SIZE, nonfinite: str = "skip",
                 paged: bool = False, backend: str = "auto"):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW8bit hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
        if backend not in ("auto", "native", "ref", "bnb"):
            raise ValueError(f"backend must be auto, native, ref or bnb, got {backend!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.min_8bit_size = int(min_8bit_size)
        self.nonfinite = nonfinite
        self.paged = paged
        self.backend = backend
        self.skipped_steps = 0
        if backend == "native" and not _native_built():
            raise RuntimeError("AdamW8bit(backend='native'): the extension t2i_fast._C is not available")

    # -- state ---------------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor) -> dict:
        n = p.numel()
        st: dict = {"step": 0}
        if n < self.min_8bit_size:
            st["state1"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            st["state2"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            return st
        nb = (n + BLOCK - 1) // BLOCK
        if self.paged and p.device.type == "cuda" and n >= 100_000:
            import bitsandbytes.functional as F

            for k in ("state1", "state2"):
                buf = F.get_paged(*p.shape, dtype=torch.uint8, device=p.device)
                F.fill(buf, 0)
                st[k] = buf
        else:
            st["state1"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
            st["state2"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
        st["absmax1"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        st["absmax2"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        return st

    def state_bytes(self) -> int:
        """Bytes held by the state tensors (what `state_dict()` saves, less the step counters)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict written on any device: codes stay uint8, absmax stays fp32 (torch's loader would
        cast them to the param dtype), tensors move to each param's device."""
        raw = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i not in raw:
                continue
            src = dict(raw[i])
            src.update(src.pop("__bnb_optimizer_quant_state__", {}))  # bitsandbytes nests its tensors
            st = {k: (v.detach().clone().to(p.device) if isinstance(v, torch.Tensor) else v)
                  for k, v in src.items()}
            st["step"] = int(st.get("step", 0))
            s1 = st.get("state1")
            if s1 is None or s1.numel() != p.numel():
                raise ValueError(f"optimizer state does not fit parameter {i} of shape {tuple(p.shape)}")
            if s1.dtype == torch.uint8 and st["absmax1"].numel() != (p.numel() + BLOCK - 1) // BLOCK:
                raise ValueError(f"optimizer state of parameter {i}: absmax has {st['absmax1'].numel()} "
                                 f"blocks, expected {(p.numel() + BLOCK - 1) // BLOCK}")
            for k in ("qmap1", "qmap2", "unorm_vec"):  # written by bitsandbytes' own optimizers
                st.pop(k, None)
            self.state[p] = st

    # -- step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in ps):
                raise RuntimeError("AdamW8bit does not support sparse gradients")
            groups.append((group, ps))
        if self.nonfinite != "off" and not all_finite([p.grad for _, ps in groups for p in ps]):
            if self.nonfinite == "raise":
                raise FloatingPointError("AdamW8bit: a gradient holds NaN or inf; the step was not taken "
                                         "(nonfinite='skip' skips such steps instead)")
            self.skipped_steps += 1
            if self.skipped_steps == 1:
                warnings.warn("AdamW8bit: skipped a step whose gradients hold NaN or inf (counted in "
                              "optimizer.skipped_steps; warned once)", RuntimeWarning, stacklevel=2)
            return loss
        for group, ps in groups:
            if ps:
                self._update_group(group, ps)
        if self.paged and torch.cuda.is_available():
            torch.cuda.synchronize()  # paged state is read asynchronously, as in bitsandbytes' paged optimizers
        return loss

    def _update_group(self, group: dict, ps: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        by_device: dict[torch.device, list] = {}
        for p in ps:
            st = self.state[p]
            if not st:
                st.update(self._init_state(p))
            st["step"] += 1
            by_device.setdefault(p.device, []).append(p)
        for device, dps in by_device.items():
            lists = self._lists(dps)
            tables = quant_tables(device)
            if device.type == "cuda" and self.backend in ("auto", "bnb"):
                self._step_bnb(dps, lists, tables, hyper)
            elif device.type == "cpu" and (self.backend == "native" or (self.backend == "auto" and _native())) \
                    and all(t.is_contiguous() for t in lists[0] + lists[1]):
                torch.ops.t2i_fast.adamw8bit_step(*lists, *tables, [self.state[p]["step"] for p in dps],
                                                  *hyper)
            else:
                adamw8bit_step_ref(*lists, *tables, [self.state[p]["step"] for p in dps], *hyper)

    def _lists(self, ps):
        empty = torch.empty(0)
        grads, s1, s2, a1, a2 = [], [], [], [], []
        for p in ps:
            st = self.state[p]
            grads.append(p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype))
            s1.append(st["state1"])
            s2.append(st["state2"])
            a1.append(st.get("absmax1", empty))
            a2.append(st.get("absmax2", empty))
        return [list(ps), grads, s1, s2, a1, a2]

    def _step_bnb(self, ps, lists, tables, hyper) -> None:
        """bitsandbytes' fused CUDA kernel for 8-bit state; fp32-state tensors take the twin."""
        try:
            import bitsandbytes.functional as F
        except ImportError:
            if self.backend == "bnb":
                raise
            adamw8bit_step_ref(*lists, *tables, [self.state[p]["step"] for p in ps], *hyper)
            return
        lr, beta1, beta2, eps, wd = hyper
        qmaps = tables[0]
        small = [i for i, s in enumerate(lists[2]) if s.dtype != torch.uint8]
        for i, (p, g, s1, s2, a1, a2) in enumerate(zip(*lists)):
            if s1.dtype == torch.uint8:
                F.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, beta1, beta2, 0.0, 0.0, eps,
                                                  self.state[p]["step"], lr, qmaps[0], qmaps[1], a1, a2,
                                                  weight_decay=wd, gnorm_scale=1.0, skip_zeros=False)
        if small:
            adamw8bit_step_ref(*[[lst[i] for i in small] for lst in lists], *tables,
                               [self.state[ps[i]]["step"] for i in small], *hyper)


def all_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every value of every tensor (gradients, or trained weights) is finite, in one pass: the native
    op where it takes them all (contiguous float CPU tensors, the common case, tried first because checking
    each tensor in Python costs more than the scan) and the switch is on (see native.enabled()), else
    torch._foreach_norm."""
    if not grads:
        return True
    if _native():
        try:
            return bool(torch.ops.t2i_fast.all_finite(grads))
        except RuntimeError:  # a CUDA, non-contiguous or non-float gradient: the twin below
            pass
    cpu = [g for g in grads if g.device.type == "cpu"]
    other = [g for g in grads if g.device.type != "cpu"]
    return all(bool(all_finite_ref(part)) for part in (cpu, other) if part)


def _guard(opt: torch.optim.Optimizer, nonfinite: str) -> torch.optim.Optimizer:
    """Wrap opt.step so that NaN/inf gradients skip or refuse the step (torch optimizers do neither)."""
    if nonfinite == "off":
        return opt
    inner = opt.step
    opt.skipped_steps = 0

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            closure = None
        else:
            loss = None
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not all_finite(grads):
            if nonfinite == "raise":
                raise FloatingPointError(f"{type(opt).__name__}: a gradient holds NaN or inf; the step was "
                                         "not taken")
            opt.skipped_steps += 1
            if opt.skipped_steps == 1:
                warnings.warn(f"{type(opt).__name__}: skipped a step whose gradients hold NaN or inf "
                              "(counted in optimizer.skipped_steps; warned once)", RuntimeWarning, stacklevel=2)
            return loss
        inner()
        return loss

    opt.step = types.MethodType(step, opt)  # a bound method, as LR schedulers expect
    return opt
