"""Data parallel training: one process per device, started by `torchrun` or `accelerate launch`.

The launcher describes the run in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); a
process without WORLD_SIZE > 1 is a single-process run, and then every function here is the identity and
no process group is created: such a run is bit for bit what it was before.

Under data parallelism every rank runs the same trainer on the same seed, so the model, the text cache and
the batch generator agree on every rank without any exchange; the latent cache is encoded a share per rank
and exchanged (data.LatentCache, `gather`). Each step every rank draws the same GLOBAL batch
(--batch-size) from that generator and keeps its contiguous slice (`share`); the gradients of the trained
parameters are then averaged (`GradientAverager`), which equals the single-process gradient of the global
batch because each rank's loss is scaled to be the global loss's estimate from its slice (see `share`).
Rank 0 alone probes L_det, takes the early-stopping and Ctrl-C decisions (`agree` sends them to the
others) and writes the run's files; the others return rank 0's result (`from_main`).

Without a latent cache each rank runs the VAE on its own slice alone (`rows`), and the latents of the other
rows are drawn from the generator all the same, so that every rank's stream stays the global one. Class
images to generate are split over the ranks too, and resume as they do alone
(class_images.generate_class_images).

The gradients are all-reduced while the backward pass still runs (`GradientAverager`, as DDP's buckets are):
a bucket of parameters starts its all-reduce once backward has produced all of its gradients. Its plain
twin, T2I_FAST_OVERLAP_ALLREDUCE=0, all-reduces everything after the backward pass (`average_gradients`);
both give the same sums, and bench/bench_allreduce.py times one against the other.

Limits: ops drawing from torch's global RNG inside the models (dropout) draw per rank, so they differ from
the single process.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import os

import torch
import torch.distributed as td

from .errors import UserError
from .launcher import launched_main, launched_world, local_main  # noqa: F401 - dist.launched_world() etc.

# rank 0 draws the sample grid (and the app may score the run) while the others wait for its result
TIMEOUT = datetime.timedelta(minutes=60)
BUCKET = 2**25  # gradient elements per all-reduce (128 MB of fp32): a full UNet need not be copied at once
# overlapped: smaller buckets (16 MB of fp32, DDP uses 25 MB) start sooner; at most IN_FLIGHT of them are held
# at once, so the copies take no more memory than one plain bucket
OVERLAP_BUCKET = 2**22
IN_FLIGHT = 8

_device: torch.device | None = None  # where this rank's collectives run (CUDA tensors for NCCL)


def world() -> int:
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if world() > 1 else 0


def is_main() -> bool:
    """True in a single-process run and on rank 0: the process that probes, decides and writes files."""
    return rank() == 0


def check_batch(batch_size: int, processes: int | None = None) -> None:
    """Before anything is written: the global batch must split evenly over the processes (default: the
    launched ones)."""
    n = launched_world() if processes is None else processes
    if n > 1 and batch_size % n:
        lower, upper = batch_size // n * n, (batch_size // n + 1) * n
        fits = f"{lower} or {upper}" if lower else f"{upper}"
        raise UserError(f"--batch-size {batch_size} (the global batch) does not split over {n} processes; pass "
                        f"--batch-size {fits}, or launch a number of processes that divides {batch_size}")


def init(device: str) -> str:
    """Join the launcher's process group (once per process) and return the device this rank trains on: the
    `device` asked for in a single-process run; cuda:LOCAL_RANK (NCCL) or the CPU (gloo) under a launcher."""
    global _device
    n = launched_world()
    if n == 1 or device == "meta":  # the memory planner's trace of a step (--vram) runs no collective
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if device not in ("auto", "cuda"):
            raise UserError(f"--device {device}: under torchrun or accelerate each process takes cuda:LOCAL_RANK; "
                            f"pass --device cuda (choose the cards with CUDA_VISIBLE_DEVICES)")
        if local >= torch.cuda.device_count():
            raise UserError(f"process {local} of this machine has no CUDA device ({torch.cuda.device_count()} "
                            f"visible); launch at most {torch.cuda.device_count()} processes per machine")
        torch.cuda.set_device(local)
        name = f"cuda:{local}"
    else:
        name = "cpu"
    _device = torch.device(name)
    if not td.is_initialized():  # a group made by the caller (e.g. accelerate's Accelerator) is reused
        td.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(_leave)  # after an error too (no barrier then: the other ranks may never reach it)
    return name


def shutdown() -> None:
    """After a run that finished on every rank: leave the process group together. A rank that tore its
    connections down while another was still in the last collective (rank 0 sending its result) could abort
    that one; the barrier lets every rank finish first."""
    if td.is_available() and td.is_initialized():
        td.barrier()
        _leave()


def _leave() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def _collective_device() -> torch.device:
    if _device is not None:
        return _device
    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


def shares_cache_work() -> bool:
    """Whether the ranks split the latent cache's encoding between them (the default). T2I_FAST_SHARED_CACHE=0
    is its plain twin: every rank encodes every pair itself and nothing is exchanged (the same cache;
    bench/bench_latent_cache.py times one against the other). Read at call time."""
    return os.environ.get("T2I_FAST_SHARED_CACHE", "1").strip() != "0"


def share(batch):
    """This rank's contiguous slice of the global batches.Batch. Every tensor field is cut along dim 0; the
    loss normaliser num_instance becomes the global count / world, so this rank's loss
        sum_{i in slice} w_i l_i / (N / W)
    has the global loss sum_i w_i l_i / N as the mean over ranks (diffusion_loss divides by num_instance
    whenever the batch has weights, which BatchSource.make always gives). Masks and min-SNR weights are per
    example, so they slice with it. With prior preservation the batch is B instance then B class examples;
    the cut may put them on different ranks, which the global normaliser makes harmless."""
    w = world()
    if w == 1:
        return batch
    n = batch.latents.shape[0]
    kept = rows(n)
    cut = {f.name: getattr(batch, f.name)[kept] for f in dataclasses.fields(batch)
           if isinstance(getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, **cut, num_instance=(batch.num_instance or n) / w)


def rows(n: int) -> slice:
    """The contiguous rows of a global batch of n examples that this rank keeps (all of them in a single
    process): what `share` cuts, and what BatchSource.draw runs the VAE on without a latent cache."""
    w, r = world(), rank()
    return slice(r * n // w, (r + 1) * n // w)


def _buckets(params, limit: int = BUCKET):
    bucket, size = [], 0
    for p in params:
        if bucket and (size + p.numel() > limit or p.dtype != bucket[0].dtype or p.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


def average_gradients(params, loss: float) -> float:
    """Average the gradients of `params` over the ranks; return the step's loss averaged likewise (the
    global loss, which every rank then logs and checks alike). A parameter that has no gradient on any rank
    keeps none (AdamW skips it, as in a single process); one that has it somewhere gets zeros elsewhere."""
    w = world()
    if w == 1:
        return loss
    dev = _collective_device()
    stats = torch.tensor([loss] + [float(p.grad is not None) for p in params], dtype=torch.float64, device=dev)
    td.all_reduce(stats)
    counts = stats[1:].tolist()
    live = [p for p, c in zip(params, counts) if c > 0]
    for bucket in _buckets(live):
        flat = _flat_gradients(bucket, dev)
        td.all_reduce(flat)
        _unflatten_average(bucket, flat, w)
    return stats[0].item() / w


def overlaps_allreduce() -> bool:
    """Whether the gradients are all-reduced during the backward pass (the default); T2I_FAST_OVERLAP_ALLREDUCE=0
    is the plain twin, after it. Read when a GradientAverager is made."""
    return os.environ.get("T2I_FAST_OVERLAP_ALLREDUCE", "1").strip() != "0"


def _flat_gradients(bucket, dev) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]).to(dev)


def _unflatten_average(bucket, flat: torch.Tensor, w: int) -> None:
    flat /= w
    offset = 0
    for p in bucket:
        g = flat[offset:offset + p.numel()].view_as(p).to(p.device)
        p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
        offset += p.numel()


class GradientAverager:
    """average_gradients, overlapped with the backward pass. The parameters are cut into buckets in reverse
    order (backward produces the last layers' gradients first); a hook on each parameter counts the gradients
    of the step's last backward pass (`arm`), and once a bucket has all of them its all-reduce starts in the
    background, while backward goes on with the layers before it. Every rank starts the buckets in the same
    order (a bucket waits for those before it), so the collectives pair up even where a parameter gets no
    gradient on some rank: its bucket then starts in `finish`, with zeros for it. `finish` starts what is
    left, waits, and averages; the sums are the plain path's. One process, or T2I_FAST_OVERLAP_ALLREDUCE=0:
    `finish` is average_gradients. `close` removes the hooks."""

    def __init__(self, params):
        self.params = list({id(p): p for p in params}.values())  # once each: a hook fires once per pass
        self.overlap = world() > 1 and overlaps_allreduce()
        self.armed = False
        self.hooks = []
        if not self.overlap:
            return
        self.buckets = list(_buckets(self.params[::-1], OVERLAP_BUCKET))
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        # a parameter without requires_grad gets no gradient, so no hook: its bucket starts in finish
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params if p.requires_grad]

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def arm(self) -> None:
        """Called before the backward pass after which this step's gradients are final (the last one of
        gradient accumulation): the buckets start during that pass."""
        if self.overlap:
            self.armed, self.next, self.running, self.had = True, 0, [], {}
            self.waiting = [len(bucket) for bucket in self.buckets]

    def _ready(self, p) -> None:
        if not self.armed:
            return
        self.waiting[self.bucket_of[id(p)]] -= 1
        while self.next < len(self.buckets) and self.waiting[self.next] == 0:
            self._start()

    def _start(self) -> None:
        if len(self.running) >= IN_FLIGHT:  # bound the copies held: wait for the oldest and put it back
            self._collect(self.running.pop(0))
        bucket = self.buckets[self.next]
        self.had.update((id(p), p.grad is not None) for p in bucket)  # before _unflatten_average gives it one
        flat = _flat_gradients(bucket, _collective_device())
        self.running.append((bucket, flat, td.all_reduce(flat, async_op=True)))
        self.next += 1

    def _collect(self, running) -> None:
        bucket, flat, work = running
        work.wait()
        _unflatten_average(bucket, flat, world())

    def finish(self, loss: float) -> float:
        """The gradients averaged over the ranks, and the step's loss averaged likewise (average_gradients)."""
        if not self.overlap:
            return average_gradients(self.params, loss)
        if not self.armed:
            raise RuntimeError("GradientAverager.finish without arm() before the step's last backward pass")
        self.armed = False
        while self.next < len(self.buckets):
            self._start()
        has = [float(self.had[id(p)]) for p in self.params]
        stats = torch.tensor([loss] + has, dtype=torch.float64, device=_collective_device())
        td.all_reduce(stats)
        for running in self.running:
            self._collect(running)
        self.running = []
        for p, count in zip(self.params, stats[1:].tolist()):
            if count == 0:  # no rank has a gradient for it: it keeps none (AdamW skips it)
                p.grad = None
        return stats[0].item() / world()


def agree(flag: bool) -> bool:
    """Rank 0's `flag` on every rank: the early-stopping and Ctrl-C decisions are taken there alone."""
    if world() == 1:
        return flag
    t = torch.tensor([int(bool(flag))], device=_collective_device())
    td.broadcast(t, 0)
    return bool(t.item())


def barrier() -> None:
    if world() > 1:
        td.barrier()


def gather(obj) -> list:
    """Every rank's `obj` (any picklable value), in rank order, on every rank."""
    if world() == 1:
        return [obj]
    objs = [None] * world()
    td.all_gather_object(objs, obj)
    return objs


def from_main(obj):
    """Rank 0's `obj` (any picklable value) on every rank; the others wait here until rank 0 has it."""
    if world() == 1:
        return obj
    box = [obj if is_main() else None]
    td.broadcast_object_list(box, 0, device=_collective_device())
    return box[0]
