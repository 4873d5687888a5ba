"""The memory planner: its estimate, traced on the meta device, against the same run measured on the CPU
(real weights, a real step, memtrack.TensorMemory), over methods x switches x model sizes; --vram's choice of
switches; `t2i-fast plan`; and bad budgets refused in one line before anything is written."""
from __future__ import annotations

import pytest

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
    cpu, cuda = estimate(base_cfg, target="cpu"), estimate(base_cfg, target="cuda")
    assert cuda.get("weights") > cpu.get("weights")  # every tensor rounded up to 512 bytes
    assert cuda.get("probe pass") > 0 and cuda.get("margin") > 0
    assert cuda.upper_bound and "upper bound" in cuda.table()  # mixed precision auto: traced in fp32
    assert not estimate(base_cfg.replace(mixed_precision="no"), target="cuda").upper_bound


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
