"""The memory planner: its estimate, traced on the meta device, against the same run measured on the CPU
(real weights, a real step, memtrack.TensorMemory), over methods x switches x model sizes; --vram's choice of
switches; `t2i-fast plan`; and bad budgets refused in one line before anything is written."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from t2i_fast import cli
from t2i_fast.errors import UserError
from t2i_fast.memplan import SWITCHES, estimate, fit, measure, parse_size

CASES = {
    "lora": dict(method="lora"),
    "lora-checkpointing": dict(method="lora", gradient_checkpointing=True),
    "lora-no-caches": dict(method="lora", cache_latents=False, cache_text=False),
    "lora-no-kernels": dict(method="lora", kernels=False),
    "lora-text-encoder": dict(method="lora", train_text_encoder=True),
    "lora-batch-2-no-probe": dict(method="lora", batch_size=2, early_stop="none"),
    "textual-inversion": dict(method="textual_inversion"),
    "custom-diffusion": dict(method="custom_diffusion"),
    "custom-diffusion-crossattn-checkpointing": dict(method="custom_diffusion", freeze_model="crossattn",
                                                     gradient_checkpointing=True),
    "dreambooth": dict(method="dreambooth"),
    "dreambooth-8bit-checkpointing": dict(method="dreambooth", optimizer="adamw8bit", gradient_checkpointing=True),
    "dreambooth-prior": dict(method="dreambooth", class_images="CONCEPT"),
    "selfattn-copy": dict(method="selfattn_copy"),
    "mid-lora-8bit": dict(method="lora", optimizer="adamw8bit", model="MID", resolution=64),
    "mid-lora-checkpointing-sgd": dict(method="lora", optimizer="sgd", gradient_checkpointing=True, model="MID",
                                       resolution=64),
}


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    from t2i_fast.testing import save_pipeline

    return save_pipeline("mid", tmp_path_factory.mktemp("models") / "mid")


@pytest.mark.parametrize("case", list(CASES))
def test_the_estimate_is_within_10_percent_of_the_measured_run(case, base_cfg, concept_dir, mid_model, one_thread):
    changes = dict(CASES[case])
    if changes.get("model") == "MID":
        changes["model"] = str(mid_model)
    if changes.get("class_images") == "CONCEPT":
        changes["class_images"] = str(concept_dir)
    cfg = base_cfg.replace(mixed_precision="no", **changes)
    planned, measured = estimate(cfg, target="cpu"), measure(cfg)
    assert [r.name for r in planned.rows] == [r.name for r in measured.rows]
    assert abs(planned.total / measured.total - 1) <= 0.10, (planned.table(), measured.table())
    # the traced step alone, the part no formula gives: activations, gradients, temporaries
    assert abs(planned.get("step") / measured.get("step") - 1) <= 0.10, (planned.table(), measured.table())
    assert planned.get("optimizer state") == measured.get("optimizer state")


def test_cuda_plans_round_to_allocator_blocks_and_keep_the_probe_graph(base_cfg, one_thread):
    cfg = base_cfg.replace(mixed_precision="no")
    cpu, cuda = estimate(cfg, target="cpu"), estimate(cfg, target="cuda")
    assert cuda.get("weights") > cpu.get("weights")  # every tensor rounded up to 512 bytes
    assert cuda.get("probe pass") > 0 and cuda.get("margin") > 0


def test_fit_switches_on_the_cheapest_first_and_names_the_smallest_budget(base_cfg, one_thread):
    cfg = base_cfg.replace(dvar_window=None, cache_text=False, gradient_checkpointing=False)
    said = []
    as_given = estimate(cfg, target="cpu")
    fitted, plan = fit(cfg, as_given.total, target="cpu", say=said.append)
    assert fitted == cfg and plan.total == as_given.total and "as configured" in said[-1]
    cheapest = estimate(cfg.replace(**dict(SWITCHES)), target="cpu")
    assert cheapest.total < as_given.total
    fitted, plan = fit(cfg, cheapest.total, target="cpu", say=said.append)
    # the first of the switch sets, each adding the next switch in SWITCHES' order, that fits
    first = next(cfg.replace(**dict(SWITCHES[:i])) for i in range(len(SWITCHES) + 1)
                 if estimate(cfg.replace(**dict(SWITCHES[:i])), target="cpu").total <= cheapest.total)
    assert fitted == first and fitted.cache_text and plan.total <= cheapest.total  # the caches come first
    assert "--cache-text" in said[-1] and "without" in said[-1]
    with pytest.raises(UserError, match="give --vram") as e:
        fit(cfg, cheapest.total - 1, target="cpu", say=said.append)
    assert "\n" not in str(e.value) and "--gradient-checkpointing" in str(e.value)


def test_a_staged_method_is_refused_in_one_line(base_cfg):
    with pytest.raises(UserError, match="plan each with its own method") as e:
        estimate(base_cfg.replace(method="two_stage"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, bytes_", [("8GB", 8 << 30), ("6.5g", int(6.5 * (1 << 30))), ("6144MB", 6 << 30),
                                          ("2", 2 << 30), (" 512 MiB ", 512 << 20)])
def test_parse_size(text, bytes_):
    assert parse_size(text) == bytes_


@pytest.mark.parametrize("text", ["banana", "8TB", "", "-1GB", "8 GB RAM"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(UserError, match="is not a memory size") as e:
        parse_size(text)
    assert "\n" not in str(e.value)


def test_plan_prints_one_row_per_component(base_cfg, capsys, one_thread):
    code = cli.main(["plan", "--model", base_cfg.model, "--images", base_cfg.images, "--class-word", "dog",
                     "--resolution", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    for row in ("weights", "trained tensors", "optimizer state", "training batch", "probe batch", "step",
                "probe pass", "total"):
        assert f"\n{row} " in out
    assert not (base_cfg.out and __import__("pathlib").Path(base_cfg.out).exists())


@pytest.mark.parametrize("vram, needle", [("banana", "is not a memory size"), ("0.5MB", "give --vram"),
                                          ("1KB", "is not a memory size")])
def test_train_with_a_budget_it_cannot_meet_is_one_line_and_writes_nothing(base_cfg, capsys, vram, needle,
                                                                          one_thread):
    code = cli.main(["train", "--model", base_cfg.model, "--images", base_cfg.images, "--class-word", "dog",
                     "--resolution", "32", "--device", "cpu", "--max-steps", "2", "--out", base_cfg.out,
                     "--vram", vram])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and needle in err[-1]
    assert not __import__("pathlib").Path(base_cfg.out).exists()


def test_train_with_a_budget_switches_what_fits_and_records_it(base_cfg, one_thread):
    import json

    import t2i_fast

    cfg = base_cfg.replace(device="cpu", gradient_checkpointing=False)
    needed = estimate(cfg.replace(**dict(SWITCHES)), target="cpu").total
    result = t2i_fast.train(cfg.replace(vram=f"{needed / 2**20 + 0.001:.3f}MB"))  # rounded up
    config = json.loads((result.out / "report.json").read_text())["config"]
    assert config["optimizer"] == "adamw8bit" or config["gradient_checkpointing"]
    assert result.steps == 3


# --- mixed precision: the run as the trainer makes it on CUDA (frozen modules in the half dtype, trained tensors
# fp32, the UNet under autocast), built on the CPU with bf16 and the CPU's autocast, against the planner's
# emulation of autocast on the meta device
BF16_CASES = {
    "lora": dict(method="lora"),
    "lora-checkpointing-8bit": dict(method="lora", gradient_checkpointing=True, optimizer="adamw8bit"),
    "lora-no-caches": dict(method="lora", cache_latents=False, cache_text=False),
    "textual-inversion": dict(method="textual_inversion"),
    "custom-diffusion": dict(method="custom_diffusion"),
    "dreambooth": dict(method="dreambooth"),  # fp32 master weights, cast by autocast (and its cache) each pass
    "dreambooth-checkpointing": dict(method="dreambooth", gradient_checkpointing=True),  # and in the recompute
    "mid-lora-checkpointing": dict(method="lora", gradient_checkpointing=True, model="MID", resolution=64),
    "sdxl-tiny-lora-no-caches": dict(method="lora", cache_latents=False, cache_text=False, model="SDXL", resolution=64),
}


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from t2i_fast.testing import save_pipeline

    return save_pipeline("sdxl-tiny", tmp_path_factory.mktemp("models") / "sdxl-tiny")


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_the_bf16_estimate_is_within_10_percent_of_the_measured_bf16_run(case, base_cfg, mid_model, sdxl_model,
                                                                         one_thread):
    changes = dict(BF16_CASES[case])
    changes["model"] = str({"MID": mid_model, "SDXL": sdxl_model}.get(changes.get("model"), base_cfg.model))
    cfg = base_cfg.replace(mixed_precision="no", **changes)
    planned, measured = estimate(cfg, target="cpu", precision="bf16"), measure(cfg, precision="bf16")
    assert [r.name for r in planned.rows] == [r.name for r in measured.rows]
    assert abs(planned.total / measured.total - 1) <= 0.10, (planned.table(), measured.table())
    assert abs(planned.get("step") / measured.get("step") - 1) <= 0.10, (planned.table(), measured.table())
    assert planned.get("weights") == measured.get("weights")  # the frozen modules placed as the trainer does
    # and it is not the fp32 plan: that one's step is more than 10% off the bf16 run's
    assert abs(estimate(cfg, target="cpu").get("step") / measured.get("step") - 1) > 0.10


def _autocast_dtypes(device, fn, tensors, dtype=torch.bfloat16):
    """The dtype of each output of fn(*tensors) under torch.autocast on the CPU, and under the planner's
    emulation on meta copies of the tensors."""
    from t2i_fast.meta_autocast import MetaAutocast

    with torch.autocast("cpu", dtype=dtype):
        real = fn(*tensors)
    meta = [t.to("meta") for t in tensors]
    with MetaAutocast(device, dtype), torch.autocast("cpu", dtype=dtype):
        emulated = fn(*meta)
    return real.dtype, emulated.dtype


F = torch.nn.functional
OPS = {  # the ops of the SD / SDXL modules, listed or not, and a few listed ones of each kind; mixed dtypes
    "linear": (lambda x, w: F.linear(x, w), ((4, 8), (6, 8))),
    "linear-bf16-input": (lambda x, w: F.linear(x.bfloat16(), w), ((4, 8), (6, 8))),
    "conv2d": (lambda x, w: F.conv2d(x, w, padding=1), ((1, 4, 8, 8), (4, 4, 3, 3))),
    "matmul-operator": (lambda a, b: a @ b, ((3, 4, 5), (3, 5, 2))),
    "baddbmm": (lambda c, a, b: torch.baddbmm(c, a, b), ((3, 4, 2), (3, 4, 5), (3, 5, 2))),
    "bmm": (lambda a, b: torch.bmm(a, b), ((3, 4, 5), (3, 5, 2))),
    "einsum": (lambda a, b: torch.einsum("bij,bjk->bik", a, b), ((3, 4, 5), (3, 5, 2))),
    "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), ((1, 2, 7, 8),) * 3),
    "group_norm": (lambda x: F.group_norm(x.bfloat16(), 2), ((1, 4, 8, 8),)),
    "layer_norm": (lambda x: F.layer_norm(x.bfloat16(), (8,)), ((2, 8),)),
    "softmax": (lambda x: x.bfloat16().softmax(-1), ((2, 8),)),
    "exp": (lambda x: torch.exp(x.bfloat16()), ((8,),)),
    "silu": (lambda x: F.silu(x.bfloat16()), ((8,),)),
    "interpolate": (lambda x: F.interpolate(x.bfloat16(), scale_factor=2.0, mode="nearest"), ((1, 2, 4, 4),)),
    "mse_loss": (lambda a, b: F.mse_loss(a.bfloat16(), b), ((4, 4), (4, 4))),
    "l1_loss": (lambda a, b: F.l1_loss(a.bfloat16(), b.bfloat16()), ((4, 4), (4, 4))),
    "cat": (lambda a, b: torch.cat([a.bfloat16(), b]), ((2, 3), (2, 3))),
    "stack": (lambda a, b: torch.stack([a, b.bfloat16()]), ((2, 3), (2, 3))),
    "add": (lambda a, b: a.bfloat16() + b, ((2, 3), (2, 3))),
}


@pytest.mark.parametrize("op", list(OPS))
def test_the_emulated_cpu_autocast_casts_as_the_real_one(op):
    fn, shapes = OPS[op]
    tensors = [torch.randn(s) for s in shapes]
    real, emulated = _autocast_dtypes("cpu", fn, tensors)
    assert emulated == real


def test_the_emulated_autocast_acts_only_inside_the_region_and_casts_a_trained_leaf_once():
    from t2i_fast.meta_autocast import MetaAutocast

    x, w = torch.empty(4, 8, device="meta"), torch.empty(6, 8, device="meta", requires_grad=True)
    mode = MetaAutocast("cuda", torch.float16)
    mode.caching = True  # as in autocast_region's forward
    with mode:
        assert F.linear(x, w).dtype == torch.float32  # CPU autocast off: no region
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert F.linear(x, w).dtype == torch.float16  # the mode's dtype, the target's lists
            assert F.group_norm(x.half().view(1, 4, 8), 2).dtype == torch.float32  # fp32 on CUDA, not on the CPU
            assert len(mode.cache) == 1 and F.linear(x, w) is not None and len(mode.cache) == 1


def _cuda_test_lists() -> dict[str, set[str]]:
    """The op names of PyTorch's own CUDA autocast test lists (torch/testing/_internal/autocast_test_lists.py,
    read as text: importing it needs test-only packages), by list."""
    import ast
    import inspect
    from pathlib import Path

    path = Path(inspect.getfile(torch)).parent / "testing" / "_internal" / "autocast_test_lists.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AutocastTestLists")
    lists: dict[str, set[str]] = {}
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute) and \
                isinstance(node.value, ast.List):
            lists[node.targets[0].attr] = {e.elts[0].value for e in node.value.elts
                                           if isinstance(e, ast.Tuple) and isinstance(e.elts[0], ast.Constant)}
    return lists


def test_the_cuda_lists_agree_with_pytorchs_autocast_test_lists():
    from t2i_fast.meta_autocast import autocast_kind

    lists = _cuda_test_lists()
    expected = {"torch_fp16": {"low"}, "nn_fp16": {"low"}, "methods_fp16": {"low"},
                "torch_fp32": {"fp32", "fp32out"}, "nn_fp32": {"fp32", "fp32out"},
                "methods_fp32": {"fp32", "fp32out"}, "torch_need_autocast_promote": {"promote"}}
    checked = 0
    for name, kinds in expected.items():
        for op in lists[name]:
            func = SimpleNamespace(__name__=op)  # named as the torch function is
            assert autocast_kind("cuda", func, {}) in kinds, (name, op)
            checked += 1
    assert checked > 80  # the lists were found and read


def test_cuda_mixed_precision_is_planned_in_the_half_dtype(base_cfg, one_thread):
    auto = estimate(base_cfg, target="cuda")  # mixed precision auto: bf16 assumed
    fp32 = estimate(base_cfg.replace(mixed_precision="no"), target="cuda")
    fp16 = estimate(base_cfg.replace(mixed_precision="fp16"), target="cuda")
    assert auto.precision == torch.bfloat16 and fp16.precision == torch.float16 and fp32.precision == torch.float32
    assert "bf16 mixed precision" in auto.table() and "bf16" in auto.rows[0].how
    # the frozen UNet in half: half the bytes (each tensor rounded up to 512 bytes, so not exactly)
    assert 0.45 < auto.get("weights") / fp32.get("weights") < 0.6
    assert auto.get("trained tensors") == fp32.get("trained tensors")  # trained tensors stay fp32
    assert auto.get("step") < fp32.get("step")
    # fp16 and bf16 differ in autocast's cast cache? no: same sizes, the same lists
    assert fp16.total == auto.total


def test_allreduce_buffers_hold_at_most_the_buckets_in_flight(monkeypatch):
    """Under data parallelism the plan adds the all-reduce's flat gradient copies: all of the gradients where
    they are few, else the buckets held at once (overlapped), or the plain twin's one bucket."""
    from t2i_fast import distributed as dist
    from t2i_fast.memplan import allreduce_buffers

    small, large = [torch.empty(1000, device="meta")], [torch.empty(10**8, device="meta")]
    assert allreduce_buffers(small, 1).bytes == 4000 and allreduce_buffers(small, 512).bytes == 4096
    assert allreduce_buffers(large, 1).bytes == 4 * dist.IN_FLIGHT * dist.OVERLAP_BUCKET < 4 * 10**8
    monkeypatch.setenv("T2I_FAST_OVERLAP_ALLREDUCE", "0")
    assert allreduce_buffers(large, 1).bytes == 4 * dist.BUCKET


def test_plan_for_several_processes_plans_one_device(base_cfg, capsys, one_thread):
    """`t2i-fast plan --processes 2`: what one device of a 2-process data-parallel run holds, its half of
    --batch-size plus the all-reduce's buffers, without a launcher; a batch that does not split is refused."""
    common = ["plan", "--model", base_cfg.model, "--images", base_cfg.images, "--class-word", "dog",
              "--resolution", "32", "--device", "cpu"]
    assert cli.main(common + ["--batch-size", "1"]) == 0
    alone = capsys.readouterr().out
    assert cli.main(common + ["--batch-size", "2", "--processes", "2"]) == 0
    split = capsys.readouterr().out
    assert "batch 2 (1 per process, 2 processes):" in split and "\nall-reduce buffers " in split
    assert "all-reduce buffers" not in alone

    def mib(out, row):  # the MiB column of the row
        line = next(line for line in out.splitlines() if line.startswith(row + " "))
        return float(line[len(row):].split()[0])

    for row in ("weights", "training batch", "step"):
        assert mib(split, row) == mib(alone, row)  # the same device share as a batch-1 run
    assert mib(split, "total") == pytest.approx(mib(alone, "total") + mib(split, "all-reduce buffers"), abs=0.15)
    assert cli.main(common + ["--batch-size", "3", "--processes", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --batch-size 3 (the global batch) does not split over 2 processes")
    assert cli.main(common + ["--processes", "0"]) == 2
    assert "--processes 0 must be at least 1" in capsys.readouterr().err


def test_a_unet_trained_whole_is_not_called_frozen(base_cfg, one_thread):
    """DreamBooth trains the UNet whole, and with latents and prompts cached nothing frozen stays on the device:
    the weights row says so instead of naming a frozen UNet of 0 bytes; with the VAE kept, the row names it."""
    cached = estimate(base_cfg.replace(method="dreambooth"), target="cpu")
    assert cached.rows[0].name == "weights" and cached.rows[0].bytes == 0
    assert cached.rows[0].how == "nothing frozen on the device"
    kept = estimate(base_cfg.replace(method="dreambooth", cache_latents=False), target="cpu")
    assert kept.rows[0].bytes > 0 and kept.rows[0].how.startswith("frozen VAE, ")
