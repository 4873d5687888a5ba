"""train-many: one separate training per concept of a file, here (the model loaded once) or on Ray (a task per
concept, a killed one retried and resumed). Tiny model, 6 steps, no sample grid."""
from __future__ import annotations

import json
import os

import pytest

from t2i_fast import models, sampling, trainer
from t2i_fast.errors import UserError
from t2i_fast.testing import write_concept_images
from t2i_fast.train_many import TEST_EXIT_AFTER_CHECKPOINT, main, train_many
from worker_spy import read_calls, write_spy

FAST = dict(resolution=32, max_steps=6, num_samples=0, progress=False, lora_rank=4, early_stop="none")


@pytest.fixture(scope="module")
def concepts(tmp_path_factory):
    """Four concept folders: dog, cat, cup, toy."""
    root = tmp_path_factory.mktemp("many")
    return {name: write_concept_images(root / name, n=2, size=64, seed=i)
            for i, name in enumerate(("dog", "cat", "cup", "toy"))}


def write_file(path, entries, defaults=None):
    data = {"concepts": entries, **({"defaults": defaults} if defaults else {})}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def load_counter(monkeypatch):
    """Counts model loads from disk, through models.load_components wherever it was imported."""
    calls = []
    real = models.load_components

    def counted(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(models, "load_components", counted)
    monkeypatch.setattr(trainer, "load_components", counted)
    return calls


def test_three_concepts_one_model_load_and_a_rerun_redoes_nothing(tiny_model, concepts, tmp_path, load_counter,
                                                                  one_thread):
    file = write_file(tmp_path / "many.json", [
        {"images": str(concepts["dog"]), "token": "<dog>", "class_word": "dog"},
        {"images": str(concepts["cat"]), "token": "<cat>", "method": "textual_inversion", "lr": 5e-3},
        {"images": str(concepts["cup"]), "token": "<cup>", "name": "mug", "train_token": True},
    ], defaults={"method": "lora"})
    out = tmp_path / "runs"
    outcomes = train_many(file, model=str(tiny_model), out=str(out), **FAST)
    assert [o.status for o in outcomes] == ["trained"] * 3
    assert len(load_counter) == 1  # one load, three trainings: each on a copy of the pristine model
    for name in ("dog", "cat", "mug"):
        assert (out / name / "report.json").is_file()
        pipe = sampling.build_pipeline(tiny_model, progress=False)
        assert sampling.load_adapter(pipe, out / name)
    # the TI run's token did not leak into the LoRA runs: each started from the pristine tokenizer
    assert json.loads((out / "dog" / "report.json").read_text())["method"] == "lora"

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = train_many(file, model=str(tiny_model), out=str(out), **FAST)
    assert [o.status for o in again] == ["done"] * 3 and [o.steps for o in again] == [6] * 3
    assert len(load_counter) == 1  # nothing loaded, nothing written
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_a_staged_method_trains_each_stage_on_a_copy_of_the_loaded_model(tiny_model, concepts, tmp_path,
                                                                          load_counter, one_thread):
    """two_stage's two trainings, and a LoRA concept after them: still one load from disk for all three."""
    file = write_file(tmp_path / "many.json", [
        {"images": str(concepts["dog"]), "token": "<dog>", "method": "two_stage", "stage1_steps": 2,
         "stage2_steps": 2},
        {"images": str(concepts["cat"]), "token": "<cat>"},
    ])
    out = tmp_path / "runs"
    outcomes = train_many(file, model=str(tiny_model), out=str(out), **FAST)
    assert [o.status for o in outcomes] == ["trained"] * 2
    assert len(load_counter) == 1
    assert [o.steps for o in outcomes] == [4, 6]
    for name in ("dog", "cat"):  # stage 1's token and stage 2's LoRA, combined at the top of the folder
        pipe = sampling.build_pipeline(tiny_model, progress=False)
        assert sampling.load_adapter(pipe, out / name)
    assert "<dog>" in sampling.build_pipeline(tiny_model, out / "dog", progress=False).tokenizer.get_vocab()


@pytest.mark.parametrize("bad, message", [
    ({"images": "missing-folder", "token": "<b>"}, "does not exist"),
    ({"images": "cat", "token": "<b>", "imgs": "x"}, "unknown key(s) imgs"),
    ({"images": "cat", "token": "<b>", "name": "dog"}, "also entry 1"),
    ({"images": "cat", "token": "<b>", "max_steps": "ten"}, "max_steps"),
    ({"images": "cat", "token": "<b>", "resume": True}, "decides it per concept"),
    ({"images": "cat", "token": "<b>", "domain": "d"}, "is an option of --method e4t, which --method lora does not"),
], ids=["missing-folder", "unknown-key", "duplicate-output", "wrong-type", "resume-key", "other-method-option"])
def test_a_bad_entry_is_refused_before_anything_trains(tiny_model, concepts, tmp_path, bad, message):
    bad = {**bad, "images": str(concepts["cat"]) if bad["images"] == "cat" else str(tmp_path / bad["images"])}
    file = write_file(tmp_path / "many.json", [{"images": str(concepts["dog"]), "token": "<dog>"}, bad])
    with pytest.raises(UserError, match="entry 2") as info:
        train_many(file, model=str(tiny_model), out=str(tmp_path / "runs"), **FAST)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "runs").exists()  # the good entry was not trained either


def test_one_failing_concept_is_reported_and_the_others_finish(tiny_model, concepts, tmp_path, capsys, one_thread):
    # "a" is already a token of the byte-level vocabulary: textual inversion refuses it when it sets up
    file = write_file(tmp_path / "many.toml", [])
    file.write_text(f"""
[defaults]
method = "textual_inversion"
lr = 5e-3

[[concepts]]
images = "{concepts['dog']}"
token = "a"

[[concepts]]
images = "{concepts['cat']}"
token = "<cat>"
""")
    argv = ["--concepts", str(file), "--model", str(tiny_model), "--out", str(tmp_path / "runs")]
    argv += ["--resolution", "32", "--max-steps", "6", "--num-samples", "0", "--no-progress", "--early-stop", "none"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "dog failed:" in printed and "vocabulary" in printed
    table = printed[printed.index("concept  "):]
    assert "cat" in table and "trained" in table
    assert (tmp_path / "runs" / "cat" / "report.json").is_file()
    assert not (tmp_path / "runs" / "dog" / "report.json").exists()


def test_ray_trains_four_concepts_and_a_killed_task_resumes(tiny_model, concepts, tmp_path, one_thread):
    ray = pytest.importorskip("ray")
    marker = tmp_path / "killed-once"
    file = write_file(tmp_path / "many.json",
                      [{"images": str(folder), "token": f"<{name}>"} for name, folder in concepts.items()])
    out = tmp_path / "runs"
    # each Ray worker process logs each task it takes and each model load
    spy, worker_log = write_spy(tmp_path, {"load": "t2i_fast.models.load_components",
                                           "task": "t2i_fast.train_many.pristine_components"})
    path = os.pathsep.join(filter(None, [str(spy), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {TEST_EXIT_AFTER_CHECKPOINT: f"cat={marker}", "OMP_NUM_THREADS": "1",
                                       "PYTHONPATH": path, "T2I_FAST_TEST_SPY": str(worker_log)}})
    try:
        outcomes = train_many(file, ray="auto", model=str(tiny_model), out=str(out), checkpoint_every=2, **FAST)
    finally:
        ray.shutdown()
    assert marker.is_file()  # the cat task's first worker died after its first checkpoint
    by_name = {o.name: o for o in outcomes}
    assert {n: o.status for n, o in by_name.items()} == {"dog": "trained", "cat": "resumed", "cup": "trained",
                                                         "toy": "trained"}
    assert by_name["cat"].resumed_from == 2 and by_name["cat"].steps == 6
    for name in concepts:
        pipe = sampling.build_pipeline(tiny_model, progress=False)
        assert sampling.load_adapter(pipe, out / name)
    steps = [json.loads(line)["step"] for line in (out / "cat" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the killed attempt's steps after the checkpoint were not kept twice
    assert os.environ.get(TEST_EXIT_AFTER_CHECKPOINT) is None  # the hook lives in the workers only
    # each worker process loaded the model once, at its first task, and kept it for the tasks after
    events = read_calls(worker_log)
    tasks = [pid for what, _, pid, _ in events if what == "task"]
    loads = [pid for what, _, pid, _ in events if what == "load"]
    print(f"{len(tasks)} tasks on {len(set(tasks))} worker processes, {len(loads)} model loads")
    assert len(tasks) == 5  # 4 concepts and the killed one's retry
    assert sorted(loads) == sorted(set(tasks))  # one load per worker process
    assert len(loads) < len(tasks)  # so some worker reused its model


def test_concepts_of_one_class_share_class_images_made_by_the_loaded_model(tiny_model, concepts, tmp_path,
                                                                          monkeypatch, load_counter, one_thread):
    from t2i_fast import class_images

    monkeypatch.setenv("T2I_FAST_CACHE", str(tmp_path / "cache"))
    made = []
    real = class_images.generate_class_images
    monkeypatch.setattr(class_images, "generate_class_images", lambda *a, **kw: made.append(a) or real(*a, **kw))
    monkeypatch.setattr(class_images, "build_pipeline", lambda *a, **kw: pytest.fail("reloaded the model"))
    file = write_file(tmp_path / "many.json", [
        {"images": str(concepts["dog"]), "token": "<dog>"}, {"images": str(concepts["toy"]), "token": "<toy>"}],
        defaults={"class_word": "dog", "class_prompt": "a photo of a dog", "num_class_images": 2})
    outcomes = train_many(file, model=str(tiny_model), out=str(tmp_path / "runs"), **FAST)
    assert [o.status for o in outcomes] == ["trained"] * 2
    assert len(made) == 1 and len(load_counter) == 1  # once for both concepts, from the model in memory


def test_ray_missing_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UserError, match=r"pip install t2i-fast\[ray\]"):
        train_many(tmp_path / "many.json", ray="auto")


def test_a_concept_with_a_checkpoint_and_no_report_resumes(tiny_model, concepts, tmp_path, one_thread):
    file = write_file(tmp_path / "many.json", [{"images": str(concepts["dog"]), "token": "<dog>"}])
    out = tmp_path / "runs"
    train_many(file, model=str(tiny_model), out=str(out), **{**FAST, "max_steps": 2})
    (out / "dog" / "report.json").unlink()  # as if killed after its last checkpoint
    (outcome,) = train_many(file, model=str(tiny_model), out=str(out), **FAST)
    assert (outcome.status, outcome.resumed_from, outcome.steps) == ("resumed", 2, 6)
