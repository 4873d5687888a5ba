"""Data parallel training on 2 CPU processes (gloo), launched the way users launch it:
`python -m torch.distributed.run --nproc_per_node 2 -m t2i_fast.cli train ...` (and `accelerate launch`
where accelerate is installed), against a single-process run at the same global batch.

Tolerance. The two runs do the same arithmetic in a different order (one batch-2 forward / backward against
two batch-1 ones whose gradients gloo sums), so the trained tensors differ by float rounding that Adam then
amplifies. Measured here (LoRA rank 8, lr 5e-3, batch 2, DVAR stop at step 16): max over the tensors of
max |a - b| / max |a| = 2.25e-4 for 2 ranks against 1 process (`python -m pytest -s tests/test_distributed.py
-k two_ranks_match` prints it), where the single process against itself at 2 instead of 1 intra-op threads
(the same math, another summation order: PyTorch's own error) gave 9.6e-5 in a one-off script that is
not in the repository. (Earlier stops measured 4.9e-5 and 3.5e-5; what moved both was not traced.) We
allow 5e-4, still far below one wrong or missing step (a step moves the weights by ~lr / max |a|, several
percent). Logged losses agree to ~1e-7.
The stop step and the number of steps must be equal.

At lr 1e-2 (tests/test_early_stop.py) the two runs, and equally the single process against itself at another
thread count, drift apart to ~1e-3 from step ~25 on (rounding amplified by training at that rate), enough to
move a stop step near step 45 by one: hence the lower lr and the shorter window here.

`accelerate launch --cpu` starts ONE process (accelerate's simple launcher); `--multi_gpu --num_processes 2`
starts two through torchrun, on the CPU too when no CUDA device is visible (gloo).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i_fast import train
from t2i_fast.formats import LORA_FILE
from worker_spy import read_calls, spy_on_workers

pytestmark = [pytest.mark.usefixtures("one_thread"),  # torchrun's workers run one thread each too
              pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                 reason="this torch build has no gloo backend")]

TOL = 5e-4
SETTINGS = dict(method="lora", resolution=32, num_samples=0, progress=False, lora_rank=8, lr=5e-3,
                batch_size=2, class_word="dog", early_stop="dvar", dvar_window=10, dvar_threshold=0.2,
                probe_every=1, max_steps=80)


def flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(name if v else "--no-" + k.replace("_", "-"))
        else:
            out += [name, str(v)]
    return out


def launch(launcher: list[str], model, images, out, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = flags(**{**SETTINGS, "model": model, "images": images, "out": out, **kw})
    return subprocess.run(launcher + ["-m", "t2i_fast.cli", "train", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def torchrun(*a, **kw):
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], *a, **kw)


def single(model, images, out, **kw):
    torch.manual_seed(0)
    return train(**{**SETTINGS, "model": str(model), "images": str(images), "out": str(out), **kw})


def max_rel_diff(a_dir, b_dir) -> float:
    a, b = load_file(a_dir / LORA_FILE), load_file(b_dir / LORA_FILE)
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a)


def log_losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tiny_model, concept_dir, tmp_path_factory):
    return single(tiny_model, concept_dir, tmp_path_factory.mktemp("single") / "run")


def check_same_run(one, out):
    rep = json.loads((out / "report.json").read_text())
    assert rep["processes"] == 2 and "processes" not in one.report
    assert rep["steps"] == one.steps
    assert rep["early_stop"]["stop_step"] == one.report["early_stop"]["stop_step"] is not None
    diff = max_rel_diff(one.out, out)
    print(f"{out.name}: {rep['steps']} steps, stop step {rep['early_stop']['stop_step']}, max rel diff {diff:.2e}")
    assert diff < TOL
    assert log_losses(out) == pytest.approx(log_losses(one.out), rel=TOL)
    # only rank 0 wrote: the same files as the single process, no rank-numbered or temporary extras
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.out.iterdir())
    assert len(log_losses(out)) == one.steps  # one log line per step, not one per rank


def test_torchrun_two_ranks_match_one_process(one_process, tiny_model, concept_dir, tmp_path, monkeypatch):
    from t2i_fast.data import ConceptImages

    encodes = spy_on_workers(monkeypatch, tmp_path, {"encode": "t2i_fast.data.encode_distribution"})
    out = tmp_path / "dp"
    proc = torchrun(tiny_model, concept_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 10 <= one_process.steps < SETTINGS["max_steps"]  # DVAR stopped it, after its window filled
    check_same_run(one_process, out)
    # the latent cache: each rank encoded half of the image x variant pairs, and both trained on all of them
    images = ConceptImages(concept_dir, 32, center_crop=True, random_flip=True)
    pairs = len(images) * images.num_variants
    ranks = [rank for _, rank, _, _ in read_calls(encodes)]
    assert pairs >= 2 and sorted(ranks) == ["0"] * (pairs - pairs // 2) + ["1"] * (pairs // 2)
    # the adapter loads in diffusers
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(out, weight_name=LORA_FILE)


def test_resume_under_two_ranks_continues_to_the_same_result(one_process, tiny_model, concept_dir, tmp_path):
    out = tmp_path / "dp"
    half = min(one_process.steps // 2, SETTINGS["dvar_window"] - 1)  # DVAR cannot stop the first part
    first = torchrun(tiny_model, concept_dir, out, max_steps=half)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["steps"] == half
    rest = torchrun(tiny_model, concept_dir, out, resume=True)  # every rank loads rank 0's checkpoint
    assert rest.returncode == 0, rest.stderr[-3000:]
    check_same_run(one_process, out)


def test_batch_that_does_not_split_is_refused_before_anything_is_written(tiny_model, concept_dir, tmp_path):
    out = tmp_path / "dp"
    proc = torchrun(tiny_model, concept_dir, out, batch_size=3)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert lines and set(lines) == {"error: --batch-size 3 (the global batch) does not split over 2 processes; "
                                    "pass --batch-size 2 or 4, or launch a number of processes that divides 3"}
    assert not out.exists()


def test_accelerate_launch(one_process, tiny_model, concept_dir, tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "acc"
    proc = launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
                  tiny_model, concept_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_same_run(one_process, out)


def test_slices_average_to_the_global_gradient_with_prior_and_min_snr(base_cfg, tmp_path, monkeypatch):
    """In one process: the gradients of the 2 ranks' slices of a prior-preservation batch (B instance then B
    class examples, the class ones weighted 0.5, min-SNR weighting on), averaged as average_gradients does,
    equal the gradient of the whole batch: the normaliser of each slice is the global one (share)."""
    from t2i_fast import distributed
    from t2i_fast.testing import write_concept_images
    from t2i_fast.trainer import Trainer

    classes = write_concept_images(tmp_path / "class", n=3, size=64, seed=5)
    trainer = Trainer(base_cfg.replace(class_images=str(classes), prior_loss_weight=0.5, snr_gamma=5.0,
                                       batch_size=2, lr=1e-2))
    batches = trainer._build_batches()
    batch = batches.draw(torch.Generator().manual_seed(0), 4)
    assert batch.num_instance == 4 and len(batch.latents) == 8
    params = trainer.method.parameters()
    with torch.no_grad():  # B = 0 makes A's gradient vanish: give the LoRA a state where every tensor learns
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)

    def grads(b):
        for p in params:
            p.grad = None
        loss = trainer.loss(b)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    whole_loss, whole = grads(batch)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    parts = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        part = distributed.share(batch)
        assert len(part.latents) == 4 and part.num_instance == 2
        parts.append(grads(part))
    assert (parts[0][0] + parts[1][0]) / 2 == pytest.approx(whole_loss, rel=1e-6)
    worst = max(((g0 + g1) / 2 - g).abs().max().item() / g.abs().max().item()
                for g, g0, g1 in zip(whole, parts[0][1], parts[1][1]))
    print(f"max |mean of slices - whole| / max |whole| over the gradients: {worst:.1e}")
    assert worst < 2e-5  # measured 2.2e-6 (float32 rounding, batch 8 against 2 x 4); a wrong normaliser: 0.5


def test_without_a_latent_cache_each_rank_encodes_only_its_slice(base_cfg, tmp_path, monkeypatch):
    """--no-cache-latents runs the VAE every step: each rank runs it on its own rows alone, and its slice of
    the batch is exactly the slice of the whole batch drawn in one process (the generator draws every row)."""
    from t2i_fast import batches as batches_module, distributed
    from t2i_fast.testing import write_concept_images
    from t2i_fast.trainer import Trainer

    classes = write_concept_images(tmp_path / "class", n=3, size=64, seed=5)
    trainer = Trainer(base_cfg.replace(class_images=str(classes), cache_latents=False, batch_size=2))
    source = trainer._build_batches()
    encoded = []
    real_encode = batches_module.encode_distribution
    monkeypatch.setattr(batches_module, "encode_distribution",
                        lambda vae, pixels: encoded.append(len(pixels)) or real_encode(vae, pixels))

    whole = source.draw(torch.Generator().manual_seed(0), 2, rows=distributed.rows)  # one process: every row
    assert len(whole.latents) == 4 and sum(encoded) == 4
    monkeypatch.setattr(distributed, "world", lambda: 2)
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        encoded.clear()
        part = distributed.share(source.draw(torch.Generator().manual_seed(0), 2, rows=distributed.rows))
        assert sum(encoded) == 2  # half of the 2 instance + 2 class examples
        expected = distributed.share(whole)
        for name in ("latents", "noise", "timesteps", "weights"):
            assert torch.equal(getattr(part, name), getattr(expected, name)), name
        assert part.num_instance == expected.num_instance


# each rank a machine of its own: its own host name, its own cache folder, the first process of its machine
AS_TWO_MACHINES = '''
if "RANK" in os.environ:  # the workers, not torchrun's agent
    import socket
    _rank = os.environ["RANK"]
    os.environ["LOCAL_RANK"] = "0"
    os.environ["T2I_FAST_CACHE"] = os.path.join(os.environ["T2I_FAST_CACHE"], "machine" + _rank)
    socket.gethostname = lambda: "machine" + _rank
'''


@pytest.mark.parametrize("two_machines", [False, True], ids=["one_machine", "two_machines"])
def test_class_images_resume_split_over_the_ranks(tiny_model, concept_dir, tmp_path, monkeypatch, two_machines):
    """Class images to generate under torchrun, resumed: an interrupted generation left images 0 and 2 in its
    work folder (its process is gone). The ranks split the images no machine holds (image i from seed + i, as
    one process draws it) and each draws its share once; the cache ends whole and equal to a single process's
    generation. two_machines: each rank is a machine with its own disk (AS_TWO_MACHINES), the first holding 0
    and 2, the second nothing; the first sends the second its two, and both caches end whole. A
    sitecustomize.py on the workers' path records which rank drew which seed."""
    import shutil
    import socket

    import numpy as np
    from PIL import Image

    from t2i_fast.class_images import cached_folder, generate_class_images

    alone = tmp_path / "alone"
    generate_class_images(str(tiny_model), "a photo of a dog", 5, 32, alone, 0, device="cpu", progress=False)
    caches = [tmp_path / "cache" / m for m in ("machine0", "machine1")] if two_machines else [tmp_path / "cache"]
    monkeypatch.setenv("T2I_FAST_CACHE", str(caches[0]))
    key = cached_folder(str(tiny_model), "a photo of a dog", 32, 5, 0).relative_to(caches[0])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = "machine0" if two_machines else socket.gethostname()
    left = caches[0] / key.parent / f"{key.name}.tmp-{host}-{dead}"
    left.mkdir(parents=True)
    for i in (0, 2):
        for ext in ("png", "txt"):
            shutil.copy(alone / f"class_{i:04d}.{ext}", left)

    monkeypatch.setenv("T2I_FAST_CACHE", str(tmp_path / "cache"))  # torchrun's workers inherit it
    log = spy_on_workers(monkeypatch, tmp_path, {"draw": "t2i_fast.class_images.generate"},
                         prelude=AS_TWO_MACHINES if two_machines else "")
    proc = torchrun(tiny_model, concept_dir, tmp_path / "run", class_prompt="a photo of a dog",
                    num_class_images=5, max_steps=2, early_stop="none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn = sorted((int(rank), int(seed)) for _, rank, _, seed in read_calls(log))
    assert drawn == [(0, 1), (0, 4), (1, 3)]  # (rank, seed): the missing 1, 3, 4, each once, split

    for cache in caches:
        folder = cache / key
        assert sorted(p.name for p in folder.parent.iterdir()) == [key.name]  # the work folder became the cache
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in alone.iterdir())
        for i in range(5):
            a, b = (np.asarray(Image.open(f / f"class_{i:04d}.png"), dtype=int) for f in (folder, alone))
            assert np.abs(a - b).max() <= 1  # the same image, up to a rounding step between processes


def test_vram_plans_each_process_share_under_two_ranks(tiny_model, concept_dir, tmp_path):
    """--vram under torchrun: the planner's trace of a step runs on the meta device without joining the process
    group, and plans one process's slice of the global batch (batch 2 over 2 ranks: the plan of batch 1, with
    the all-reduce's buffers); rank 0 alone says what it chose."""
    from t2i_fast import TrainConfig
    from t2i_fast.memplan import estimate, human, target_of

    out = tmp_path / "run"
    proc = torchrun(tiny_model, concept_dir, out, vram="4GB", max_steps=2, early_stop="none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "memory plan:" in line]
    cfg = TrainConfig(**{**SETTINGS, "model": str(tiny_model), "images": str(concept_dir),
                         "out": str(tmp_path / "plan"), "batch_size": 1, "max_steps": 2, "early_stop": "none"})
    plan, alone = estimate(cfg, target_of(cfg), processes=2), estimate(cfg, target_of(cfg))
    assert plan.total == alone.total + plan.get("all-reduce buffers")
    # on the CPU (no allocator rounding): the fp32 gradients of all the trained tensors, as few as a LoRA has
    cpu_buffers = estimate(cfg, "cpu", processes=2).get("all-reduce buffers")
    assert cpu_buffers == estimate(cfg, "cpu").get("trained tensors") > 0
    one = human(plan.total)
    assert lines == [f"memory plan: {one} of --vram 4.00 GiB on {target_of(cfg)}, as configured (per process, 2 "
                     f"processes)"]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["batch_size"] == 2 and report["processes"] == 2 and report["steps"] == 2


@pytest.mark.parametrize("method,file", [("textual_inversion", "learned_embeds.safetensors"),
                                         ("custom_diffusion", "pytorch_custom_diffusion_weights.safetensors")])
def test_other_methods_under_two_ranks_match_one_process(tiny_model, concept_dir, tmp_path, method, file):
    """The trained tensors of other kinds (a token embedding; Custom Diffusion's K/V weights) average over the
    ranks as LoRA's do. Measured: 4.2e-7 (textual inversion) and 7.5e-5 (Custom Diffusion) after 12 steps."""
    kw = dict(method=method, max_steps=12, early_stop="none")
    one = single(tiny_model, concept_dir, tmp_path / "one", **kw)
    proc = torchrun(tiny_model, concept_dir, tmp_path / "two", **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single(tiny_model, concept_dir, tmp_path / "half", **{**kw, "max_steps": 6})

    def rel_diff(x, y):
        a, b = load_file(tmp_path / x / file), load_file(tmp_path / y / file)
        assert a.keys() == b.keys()
        return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a if a[k].numel())

    diff = rel_diff("one", "two")
    print(f"{method}: max rel diff {diff:.2e}; 6 steps against 12: {rel_diff('one', 'half'):.2e}")
    assert diff < TOL
    assert rel_diff("one", "half") > 10 * TOL  # the tolerance would catch half the training missing
    assert log_losses(tmp_path / "two") == pytest.approx(log_losses(one.out), rel=TOL)


# small buckets, at most 2 held at once, so that a tiny UNet makes many; each bucket's start logged as made
# during the backward pass (by a gradient's hook, while the averager is armed) or after it (by finish)
SMALL_BUCKETS = '''
import t2i_fast.distributed as _dist

_dist.OVERLAP_BUCKET, _dist.IN_FLIGHT = 20000, 2
_start = _dist.GradientAverager._start


def _logged_start(self):
    with open(os.environ["T2I_FAST_TEST_SPY"], "a") as f:
        f.write(f"{'backward' if self.armed else 'after'} {os.environ.get('RANK', '-')} {os.getpid()} -\\n")
    return _start(self)


_dist.GradientAverager._start = _logged_start
'''


def test_overlapped_allreduce_equals_its_plain_twin(tiny_model, concept_dir, tmp_path, monkeypatch):
    """DreamBooth (the whole UNet: many buckets) with gradient accumulation and gradient checkpointing under 2
    ranks: the gradients all-reduced during the backward pass give the same weights, bit for bit, as its
    plain twin (T2I_FAST_OVERLAP_ALLREDUCE=0), which all-reduces after it. For two ranks every sum is a + b
    in either order, so nothing may differ. The spy shows buckets started during the backward pass."""
    from worker_spy import read_calls, write_spy

    kw = dict(method="dreambooth", max_steps=3, early_stop="none", grad_accum=2, lr=1e-4,
              gradient_checkpointing=True)
    folder, log = write_spy(tmp_path, {}, prelude=SMALL_BUCKETS)
    monkeypatch.setenv("T2I_FAST_TEST_SPY", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    overlapped = torchrun(tiny_model, concept_dir, tmp_path / "overlapped", **kw)
    assert overlapped.returncode == 0, overlapped.stderr[-3000:]
    starts = read_calls(log)
    monkeypatch.setenv("T2I_FAST_OVERLAP_ALLREDUCE", "0")
    plain = torchrun(tiny_model, concept_dir, tmp_path / "plain", **kw)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert read_calls(log) == starts  # the plain twin started no bucket

    per_rank = {rank: [when for when, r, _, _ in starts if r == rank] for rank in ("0", "1")}
    print({rank: {w: whens.count(w) for w in ("backward", "after")} for rank, whens in per_rank.items()})
    for whens in per_rank.values():
        assert len(whens) % 3 == 0 and len(whens) // 3 > 4  # the same buckets each of the 3 steps, many
        assert whens.count("backward") >= len(whens) // 2  # most started while backward still ran
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "overlapped" / weights), load_file(tmp_path / "plain" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(Path(tiny_model) / weights)
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    assert log_losses(tmp_path / "overlapped") == log_losses(tmp_path / "plain")


@pytest.mark.parametrize("command", [["sample", "--prompt", "x"], ["train-many", "--concepts", "many.toml"],
                                     ["pretrain-e4t", "--help"], ["plan"]], ids=lambda c: c[0])
def test_other_commands_under_a_launcher_are_refused(command, tmp_path, monkeypatch, capsys):
    """Only train runs data parallel; any other command under torchrun would run once per process, each copy
    writing the same files. Rank 0 says so in one line; the other ranks exit as quietly."""
    from t2i_fast.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = (f"error: `t2i-fast {command[0]}` runs in one process; start it without torchrun or accelerate (only "
            f"`t2i-fast train` runs data parallel; `train-many --ray` spreads concepts over GPUs)")
    for rank, expected in (("0", [line]), ("1", [])):
        monkeypatch.setenv("RANK", rank)
        assert main([*command, "--out", "x"] if command[0] == "sample" else command) == 2
        assert capsys.readouterr().err.strip().splitlines() == expected
    assert list(tmp_path.iterdir()) == []


def _average_in_rank(rank: int, store: str, overlapped: bool, result: str) -> None:
    """One of 2 gloo ranks: parameters a (used by both ranks), b (by rank 0 only) and c (by neither), cut
    into buckets of one parameter each, then averaged by GradientAverager."""
    os.environ["T2I_FAST_OVERLAP_ALLREDUCE"] = "1" if overlapped else "0"
    import torch.distributed as td

    from t2i_fast import distributed as dist

    td.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        dist.OVERLAP_BUCKET = 1  # a bucket per parameter: b's waits on a rank that never gives it a gradient
        a, b, c = (torch.nn.Parameter(torch.full((3,), float(i + 1))) for i in range(3))
        averager = dist.GradientAverager([c, b, a])  # buckets in reverse: a (both ranks), b, c (neither)
        losses = []
        for step in range(2):
            averager.arm()
            loss = (a * (rank + 1)).sum() + ((b * b).sum() if rank == 0 else 0.0)
            loss.backward()
            losses.append(averager.finish(loss.item()))
            if step == 0:
                grads = [None if p.grad is None else p.grad.clone() for p in (a, b, c)]
                for p in (a, b, c):
                    p.grad = None
        averager.close()
        if rank == 1:
            torch.save({"grads": grads, "losses": losses}, result)
        td.barrier()
    finally:
        td.destroy_process_group()


@pytest.mark.parametrize("overlapped", [True, False], ids=["overlapped", "plain"])
def test_a_parameter_without_a_gradient_on_one_rank_is_averaged_with_zeros(tmp_path, overlapped):
    """Rank 1 never gives b a gradient and no rank gives c one. Overlapped, a's bucket starts during backward
    on both ranks, b's during backward on rank 0 but at finish on rank 1 (with zeros), c's at finish on both:
    the same order everywhere, so nothing waits forever. b gets the mean of 2b and 0, and c keeps no gradient,
    as in one process; the plain path gives the same."""
    import torch.multiprocessing as mp

    result = tmp_path / "rank1.pt"
    mp.spawn(_average_in_rank, args=(str(tmp_path / "store"), overlapped, str(result)), nprocs=2, join=True)
    out = torch.load(result)
    a, b, c = out["grads"]
    assert torch.equal(a, torch.full((3,), 1.5))  # the mean of 1 and 2
    assert torch.equal(b, torch.full((3,), 2.0))  # the mean of 2 * b = 4 and 0 (rank 1 has none)
    assert c is None
    assert out["losses"][0] == pytest.approx((1 * 3 + 2 * 3 + 12) / 2)  # (a + b.b on rank 0, 2a on rank 1) / 2


@pytest.mark.parametrize("script, args, needles", [
    # the shared latent cache and its plain twin (T2I_FAST_SHARED_CACHE=0) equal, and the count of each rank's
    # encodes shows the switch at work
    ("bench_latent_cache.py", ["--images", "2", "--variants", "2", "--resolution", "32", "--rounds", "1"],
     ["(4 pairs, caches equal; encodes per rank: shared [2, 2], plain [4, 4])", "shared / plain"]),
    # the gradients all-reduced during the backward pass and by the plain twin after it equal
    ("bench_allreduce.py", ["--latent", "8", "--steps", "2", "--rounds", "1"],
     ["(gradients equal)", "overlapped / plain"]),
    # torchrun's 2 processes and one process log the same loss at every step (the tiny model)
    ("bench_data_parallel.py", ["--size", "tiny", "--steps", "3", "--warmup", "1", "--batch", "2", "--resolution",
                                "32", "--rounds", "1"], ["losses agree", "2 processes / 1 process"]),
], ids=["latent_cache", "allreduce", "data_parallel"])
def test_data_parallel_benches_run_both_sides_to_the_same_result(script, args, needles):
    """The data-parallel benches at their smallest: each checks that its two sides reach the same result (and
    exits 1 otherwise) before it reports their ratio."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for needle in needles:
        assert needle in run.stdout
