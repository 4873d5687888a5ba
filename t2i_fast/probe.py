"""The fixed-batch loss probe L_det that DVAR (stopping.py) watches, and how it is made nearly free.

The batch is fixed once, before training, from the caches: the first 4 dataset items (image i mod n,
template i mod n; with aspect-ratio buckets, over the images of the largest bucket only, so that the latents
stack), their augmentation variant drawn once, one latent sample each, one noise tensor and 4 distinct
timesteps (the first 4 of a random permutation of the scheduler's steps). Everything is drawn
from the probe's own generator (seed + PROBE_SEED_OFFSET), never the training one, and the probe runs in
inference mode with every module in eval mode, so it consumes no random numbers at all: training with the
probe on and off gives bit-identical parameters on the CPU (tests/test_probe.py).

The value is the ordinary training loss (the trainer's `loss`) on that batch. Because the batch holds
cached latents (and cached text features where the text encoder is frozen), the probe never runs the VAE,
nor a frozen text encoder; methods that train the text encoder encode the 4 fixed prompts each time.

Cost, cheapest first:
  * every k steps (probe_every), with the DVAR window scaled to N/k (stopping.py);
  * on CUDA, the forward is captured once as a CUDA graph and replayed: the batch tensors are the graph's
    static inputs, the optimizer updates the parameters in place so every replay reads the current ones,
    and the scalar is copied out without a host sync; it is read (`.item()`) only when the criterion needs
    it, after the training step has been queued behind it (the host prepares and launches the next step
    while the device runs the probe);
  * eager where capture is impossible: on the CPU, or when capture or its check against an eager run
    fails (dynamic shapes, unsupported or host-syncing ops). `select_path` is that decision.
"""
from __future__ import annotations

import contextlib
import time

import torch

PROBE_SIZE = 4
PROBE_SEED_OFFSET = 7919  # any constant: the probe's stream is independent of the training stream


def probe_items(num_images: int, num_prompts: int, num_variants: int, generator: torch.Generator,
                size: int = PROBE_SIZE) -> list[tuple[int, int, int]]:
    """[(image i mod n, variant drawn once, template i mod n)] for i < size."""
    variants = torch.randint(num_variants, (size,), generator=generator).tolist()
    return [(i % num_images, variants[i], i % num_prompts) for i in range(size)]


def probe_timesteps(num_train_timesteps: int, generator: torch.Generator, size: int = PROBE_SIZE) -> torch.Tensor:
    """`size` distinct timesteps: the first of a random permutation of the scheduler's steps. (size,) long."""
    return torch.randperm(num_train_timesteps, generator=generator)[:size]


def probe_images(images) -> list[int]:
    """The images the fixed batch cycles over: all of them; with buckets (its latents must stack), those of
    the bucket holding the most images, the one of the earliest image on a tie."""
    if not images.bucketed:
        return list(range(len(images)))
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, bucket in enumerate(images.sizes):
        by_bucket.setdefault(bucket, []).append(i)
    return max(by_bucket.values(), key=len)  # max keeps the first of equals, in order of first image


def build_probe_batch(batches, seed: int, size: int = PROBE_SIZE):
    """The fixed batch, from a BatchSource (through its caches); draws only from its own generator."""
    g = torch.Generator().manual_seed(int(seed) + PROBE_SEED_OFFSET)
    pool = probe_images(batches.images)
    items = probe_items(len(pool), len(batches.prompts), batches.images.num_variants, g, size)
    items = [(pool[i], v, t) for i, v, t in items]
    timesteps = probe_timesteps(batches.num_train_timesteps, g, size)
    return batches.make(items, g, timesteps)


def select_path(requested: str, device_type: str, cuda_graphs_available: bool) -> tuple[str, str]:
    """Which probe implementation to use: ("graph" | "eager", reason).

    requested: "auto" (graph where possible), "graph" (same, but the reason says it was asked for), or
    "eager". Capture itself can still fail later; `LossProbe` then falls back to eager.
    """
    if requested not in ("auto", "graph", "eager"):
        raise ValueError(f"probe path {requested!r} is not one of auto, graph, eager")
    if requested == "eager":
        return "eager", "eager requested"
    if device_type != "cuda":
        return "eager", f"CUDA graphs need a CUDA device (running on {device_type})"
    if not cuda_graphs_available:
        return "eager", "this torch build has no CUDA graph support"
    return "graph", "captured once, replayed every probe"


@contextlib.contextmanager
def eval_mode(modules):
    """Every submodule in eval mode (no dropout: the probe must not touch the global RNG), restored after."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


class LossProbe:
    """L_det on one fixed batch. `launch()` starts it (asynchronously on CUDA); `read()` returns the float.

    loss_fn(batch) -> 0-d float32 tensor: the trainer's training loss. modules: the models it runs (set
    to eval mode for the probe). path: "auto" | "graph" | "eager".
    """

    def __init__(self, loss_fn, batch, modules, device: torch.device, path: str = "auto"):
        self.loss_fn = loss_fn
        self.batch = batch
        self.modules = list(modules)
        self.device = device
        graphs = device.type == "cuda" and hasattr(torch.cuda, "CUDAGraph")
        self.path, self.reason = select_path(path, device.type, graphs)
        self.graph = None
        self._out = None          # the graph's static output
        self._value = None        # the launched probe's value (a device tensor until read)
        self.seconds = 0.0        # host time spent in the probe (CPU: all of it; CUDA: launch + wait)
        self.device_seconds = 0.0  # CUDA: device time from events, read lazily
        self._events: list[tuple] = []
        self.calls = 0
        self._captured = False

    # --- the eager probe, the plainly correct twin of the graph
    def eager(self) -> torch.Tensor:
        with torch.inference_mode(), eval_mode(self.modules):
            return self.loss_fn(self.batch).detach().float().reshape(())

    def _capture(self) -> None:
        """Warm up on a side stream, capture, and check one replay against the eager value."""
        self._captured = True
        try:
            ref = self.eager().item()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.eager()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            cache = torch.is_autocast_cache_enabled()
            torch.set_autocast_cache_enabled(False)  # cached casts would freeze the weights into the graph
            try:
                with torch.inference_mode(), eval_mode(self.modules), torch.cuda.graph(graph):
                    out = self.loss_fn(self.batch).detach().float().reshape(())
            finally:
                torch.set_autocast_cache_enabled(cache)
            graph.replay()
            got = out.item()
            if not (abs(got - ref) <= 1e-3 * abs(ref) + 1e-6):
                raise RuntimeError(f"graph replay gave {got}, eager {ref}")
            self.graph, self._out = graph, out
        except Exception as e:  # noqa: BLE001 - any capture failure means: run it eagerly
            self.graph, self._out = None, None
            self.path, self.reason = "eager", f"CUDA graph capture failed ({type(e).__name__}: {e}); eager"

    def launch(self) -> None:
        t0 = time.perf_counter()
        if self.path == "graph" and not self._captured:
            self._capture()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        if self.graph is not None:
            self.graph.replay()
            self._value = self._out.clone()  # the next replay overwrites _out
        else:
            self._value = self.eager()
        if self.device.type == "cuda":
            end.record()
            self._events.append((start, end))
        self.calls += 1
        self.seconds += time.perf_counter() - t0

    def read(self) -> float:
        """The launched value as a float (syncs with the device on CUDA)."""
        t0 = time.perf_counter()
        value = float(self._value.item())
        self._value = None
        if self.device.type != "cuda":
            self.seconds += time.perf_counter() - t0
        return value

    def __call__(self) -> float:
        self.launch()
        return self.read()

    def device_time(self) -> float:
        """Total device seconds of the probes so far (CUDA events; the host time on the CPU)."""
        if self.device.type != "cuda":
            return self.seconds
        if self._events:
            self._events[-1][1].synchronize()
            self.device_seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1000
            self._events.clear()
        return self.device_seconds
