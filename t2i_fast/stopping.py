"""When to stop training: the DVAR criterion (Voronov et al. 2023, "Is This Loss Informative?"), and the
baselines it is compared with (no early stopping, a fixed "few iterations" budget).

DVAR watches L_det, the training loss on one fixed batch (see probe.py). With H its history and N the window:

    r = var(H[-N:]) / var(H)          (population variances; the denominator spans the whole history)

is checked once len(H) >= N, and training stops when r < alpha. While the concept is being learned, H
still falls and the recent window varies about as much as the whole history; once it has plateaued the
recent window is flat against the large early drop and r collapses.

Cost: O(1) per value. The whole-history variance is a float64 Welford accumulator; the window variance is
a sliding Welford update (add the new value, remove the oldest) that is recomputed exactly from the window
once every N updates, so rounding cannot drift on long runs (amortised O(1)).

Sparse probing (every k steps): the history then holds one value per k steps, the window shrinks to
ceil(N / k) values (it still spans about N steps) and the decision is taken only at probe steps.
`replay` applies that rule to a recorded every-step trace, which is how the stop step at k is compared
with the stop step at k = 1 on the same run.

A history that never moved (var(H) at float32 noise level or below) carries no evidence that anything
was learned: r is reported as 1.0 there, so it never stops a run (and never divides by zero).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

STOP_MODES = ("dvar", "none", "few")


@dataclass(frozen=True)
class StopPreset:
    """window N (steps), threshold alpha, step cap, and the "few iterations" baseline budget (steps).

    Each method declares its own on its class (methods/*.py, `stop`): the paper's settings for textual
    inversion, Custom Diffusion and DreamBooth-LoRA (SD 1.5, 48 concepts), ours for the others. few_steps
    (the fixed-budget baseline) is our choice, not the paper's: about a sixth of each cap."""

    window: int
    threshold: float
    cap: int
    few_steps: int


def _ratio(var_window: float, var_all: float, mean_all: float) -> float:
    # float32 losses carry ~6e-8 relative rounding; a spread below ~1e-6 relative is "never moved"
    if not var_all > 1e-12 * mean_all * mean_all + 1e-300:
        return 1.0
    return var_window / var_all


def dvar_ratio_ref(history: Sequence[float], window: int) -> float | None:
    """The plainly correct twin: r for the whole `history` (None while it is shorter than the window)."""
    h = np.asarray(history, dtype=np.float64)
    if len(h) < window:
        return None
    return _ratio(float(np.var(h[-window:])), float(np.var(h)), float(np.mean(h)))


class DVAR:
    """Streaming DVAR over the values passed to `update` (one per probe, i.e. every `every` steps).

    window, threshold: N and alpha in *steps*, as the paper gives them; with every = k > 1 the window
    holds ceil(N / k) values.
    """

    def __init__(self, window: int, threshold: float, every: int = 1):
        if window < 2:
            raise ValueError(f"DVAR window must be at least 2 steps, got {window}")
        if every < 1:
            raise ValueError(f"probe interval must be at least 1, got {every}")
        self.window_steps = window
        self.every = every
        self.window = max(2, math.ceil(window / every))
        self.threshold = threshold
        self.n = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._win: deque[float] = deque()
        self._wmean = 0.0
        self._wm2 = 0.0
        self._since_exact = 0
        self.ratio: float | None = None  # r after the last update (None before the window is full)

    # --- the streaming statistics
    def _push_all(self, x: float) -> None:
        self.n += 1
        d = x - self._mean
        self._mean += d / self.n
        self._m2 += d * (x - self._mean)

    def _push_window(self, x: float) -> None:
        self._win.append(x)
        if len(self._win) <= self.window:  # filling: plain Welford
            k = len(self._win)
            d = x - self._wmean
            self._wmean += d / k
            self._wm2 += d * (x - self._wmean)
            return
        y = self._win.popleft()
        old = self._wmean
        self._wmean += (x - y) / self.window
        self._wm2 += (x - y) * (x - self._wmean + y - old)
        self._since_exact += 1
        if self._since_exact >= self.window:  # amortised O(1): no drift on long runs
            w = np.fromiter(self._win, dtype=np.float64, count=len(self._win))
            self._wmean = float(w.mean())
            self._wm2 = float(((w - self._wmean) ** 2).sum())
            self._since_exact = 0

    @property
    def var_all(self) -> float:
        return max(self._m2, 0.0) / self.n if self.n else 0.0

    @property
    def var_window(self) -> float:
        return max(self._wm2, 0.0) / len(self._win) if self._win else 0.0

    def update(self, value: float) -> float | None:
        """Add one L_det value; return r (None while fewer than `window` values were seen).

        A non-finite value (a diverged run) is not added: it would poison both variances for good.
        """
        x = float(value)
        if not math.isfinite(x):
            return self.ratio
        self._push_all(x)
        self._push_window(x)
        if self.n >= self.window:
            self.ratio = _ratio(self.var_window, self.var_all, self._mean)
        return self.ratio

    def should_stop(self) -> bool:
        return self.ratio is not None and self.ratio < self.threshold


def replay(trace: Sequence[float], window: int, threshold: float, every: int = 1) -> tuple[int | None, list]:
    """Run DVAR on a recorded every-step trace (trace[s] = L_det after s updates) as a probe every `every`
    steps would see it. Returns (stop step or None, [(step, r), ...] at every probe step)."""
    crit = DVAR(window, threshold, every)
    ratios = []
    for step in range(0, len(trace), every):
        r = crit.update(trace[step])
        ratios.append((step, r))
        if crit.should_stop():
            return step, ratios
    return None, ratios


@dataclass
class StopSettings:
    """What the trainer does: mode, cap (max_steps), and for DVAR its window, threshold and probe interval."""

    mode: str
    cap: int
    window: int
    threshold: float
    every: int
    few_steps: int

    @property
    def probing(self) -> bool:
        return self.mode == "dvar"

    @property
    def last_step(self) -> int:
        """The step count at which training ends at the latest."""
        return min(self.cap, self.few_steps) if self.mode == "few" else self.cap

    def criterion(self) -> DVAR:
        return DVAR(self.window, self.threshold, self.every)


# Values per window when probe_every is automatic: k = N // 12. Measured (bench/bench_probe.py, CPU, mid
# model at 256 px, eager, 1 thread): one probe costs 1.14 (LoRA), 1.22 (TI) and 1.37 (Custom Diffusion)
# batch-1 training steps, so the probe takes cost / k of the run: 3.1% for LoRA (k = 36), 4.7% for TI
# (k = 25), 8.4% for CD (k = 15). Replaying recorded every-step traces (bench/traces/), the stop step at
# k = N // 12 stayed within 2.8% of k = 1, while larger k moved it by up to 13% (k = 60): the traces stop
# soon after the window first fills, so a coarser grid of decision points shows directly in the stop step.
AUTO_WINDOW_VALUES = 12


def auto_probe_every(window: int) -> int:
    return max(1, window // AUTO_WINDOW_VALUES)


def settings_from_config(cfg, preset: StopPreset) -> StopSettings:
    """Resolve the early-stopping fields of a TrainConfig (None means: the method's `preset`)."""
    from .errors import UserError

    mode = getattr(cfg, "early_stop", "none") or "none"
    if mode not in STOP_MODES:
        raise UserError(f"--early-stop {mode!r} is not one of {', '.join(STOP_MODES)}")
    p = preset
    window = getattr(cfg, "dvar_window", None)
    window = p.window if window is None else window
    threshold = getattr(cfg, "dvar_threshold", None)
    threshold = p.threshold if threshold is None else threshold
    every = getattr(cfg, "probe_every", 0)
    every = auto_probe_every(window) if every == 0 else every
    few = getattr(cfg, "few_steps", None)
    few = p.few_steps if few is None else few
    if window < 2:
        raise UserError(f"--dvar-window must be at least 2, got {window}")
    if not 0 <= threshold <= 1:
        raise UserError(f"--dvar-threshold must lie in [0, 1], got {threshold}")
    if every < 1:
        raise UserError(f"--probe-every must be at least 1, got {every}")
    if few < 1:
        raise UserError(f"--few-steps must be at least 1, got {few}")
    return StopSettings(mode, cfg.max_steps, window, threshold, every, few)


class EarlyStopper:
    """The trainer's side of early stopping: probe, criterion, history, timing, best adapter, report, plot.

    In the loop (`step` = optimizer updates done so far):
        stopper.launch(step)              # top of the step: starts the probe on probe steps
        ... forward / backward of the step ...
        if stopper.should_stop(step): break   # before the update: reads the probe, updates r
    so the probe sees the parameters from before the step's update, and on CUDA the host prepares and
    launches the step while the device runs the probe. Stopping leaves the parameters probed at `step`.
    """

    def __init__(self, cfg, preset, batches, loss_fn, models, device, trainable_state, watch: bool = True):
        """preset: the method's StopPreset, for the settings cfg leaves None; loss_fn(batch): the training
        loss; models: (unet, text encoder, ...: SDXL has two), of which the probe runs what its batch needs
        (the text encoders only where the text is not cached); trainable_state():
        the trained tensors by name, copied when L_det is at its lowest (--save-best); watch: False on the
        ranks other than 0 of a data-parallel run, which build no probe and never stop by themselves (rank 0
        decides for all: trainer.py, distributed.agree). The stopper knows nothing else of the training."""
        self.settings = s = settings_from_config(cfg, preset)
        probing = s.probing and watch
        self.trainable_state = trainable_state
        self.title = cfg.method
        self.criterion = s.criterion() if probing else None
        self.probe = None
        self.l_det: list[tuple[int, float]] = []
        self.ratios: list[tuple[int, float | None]] = []
        self.stop_step: int | None = None
        self.best: tuple[int, float] | None = None
        self.best_state = None
        self._save_best = bool(getattr(cfg, "save_best", False)) and probing
        self._launched: int | None = None
        if probing:
            from .probe import LossProbe, build_probe_batch

            t0 = time.perf_counter()
            batch = build_probe_batch(batches, cfg.seed)
            unet, *text_encoders = models
            modules = [unet] + (text_encoders if batch.text is None else [])
            self.probe = LossProbe(loss_fn, batch, modules, device,
                                   "auto" if getattr(cfg, "probe_graph", True) else "eager")
            self.build_seconds = time.perf_counter() - t0

    @property
    def last_step(self) -> int:
        return self.settings.last_step

    def launch(self, step: int) -> None:
        if self.probe is not None and step % self.settings.every == 0:
            self.probe.launch()
            self._launched = step

    def should_stop(self, step: int) -> bool:
        if self._launched != step:
            return False
        self._launched = None
        value = self.probe.read()
        self.l_det.append((step, value))
        r = self.criterion.update(value)
        self.ratios.append((step, r))
        if self._save_best and (self.best is None or value < self.best[1]):
            self.best = (step, value)
            self.best_state = {k: v.detach().clone() for k, v in self.trainable_state().items()}
        if self.criterion.should_stop():
            self.stop_step = step
            return True
        return False

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue the criterion exactly: the L_det history and the best."""
        return {"l_det": [[st, v] for st, v in self.l_det], "best": list(self.best) if self.best else None}

    def load_state_dict(self, state: dict) -> None:
        """Replay the saved history through a fresh criterion (O(history) once, at resume)."""
        if self.criterion is None:
            return
        for st, v in state.get("l_det", []):
            self.l_det.append((int(st), float(v)))
            self.ratios.append((int(st), self.criterion.update(v)))
        if state.get("best"):
            self.best = (int(state["best"][0]), float(state["best"][1]))

    def postfix(self) -> dict:
        r = self.criterion.ratio if self.criterion is not None else None
        return {} if r is None else {"r": f"{r:.3f}"}

    def finish(self, out, losses: list[float]) -> list[str]:
        """Write the plot; return the file names written (the trainer writes the best adapter, best_state)."""
        if self.probe is None:
            return []
        from .plots import PLOT, plot_early_stop

        plot_early_stop(out / PLOT, losses, self.l_det, self.ratios, self.settings.threshold, self.stop_step,
                        title=self.title)
        return [PLOT]

    def report(self, train_time: float) -> dict:
        s = self.settings
        rep = {"mode": s.mode, "cap": s.cap, "stop_step": self.stop_step, "stopped_early": self.stop_step is not None}
        if s.mode == "few":
            rep.update(few_steps=s.few_steps, stop_step=s.last_step, stopped_early=s.last_step < s.cap)
        if self.probe is None:
            return rep
        probe_s = self.probe.device_time()
        rep.update({
            "window_steps": s.window, "window_values": self.criterion.window, "threshold": s.threshold,
            "probe_every": s.every, "r_at_stop": self.ratios[-1][1] if self.stop_step is not None else None,
            "r_last": self.criterion.ratio, "probe_path": self.probe.path, "probe_path_reason": self.probe.reason,
            "probe_calls": self.probe.calls, "probe_time_s": round(probe_s, 4),
            "probe_fraction": round(probe_s / train_time, 5) if train_time > 0 else None,
            "probe_build_s": round(self.build_seconds, 4),
            "best_step": self.best[0] if self.best else None, "best_l_det": self.best[1] if self.best else None,
            "l_det": [[st, v] for st, v in self.l_det],
            "r": [[st, r] for st, r in self.ratios if r is not None],
        })
        return rep
