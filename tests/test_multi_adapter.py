"""Many adapters in one batch (sampling.MultiAdapterPipeline) against each adapter loaded alone through
diffusers' own loaders (sampling.build_pipeline + the pipeline call sampling.generate makes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i_fast.cd_files import CD_FILE, cross_attention_modules, placeholders, token_file
from t2i_fast.errors import UserError
from t2i_fast.formats import LORA_FILE, TI_FILE, adapter_metadata, atomic_save
from t2i_fast.kernels import use_kernels
from t2i_fast.sampling import MultiAdapterPipeline, build_pipeline
from interpreter_runner import IN_INTERPRETER, run_interpreter_cases

STEPS, GUIDANCE = 3, 7.5
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_lora(folder, unet, rank, seed, token_width=None, text_encoder=None):
    """A LoRA run folder in the layout formats.save_lora writes, random non-zero A and B (training a few
    steps would leave B, zero-initialised, near zero); optionally a `<sks>` token and text-encoder LoRA."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, model, targets in (("unet", unet, TARGETS), ("text_encoder", text_encoder, ("q_proj", "v_proj"))):
        for name, m in (model.named_modules() if model is not None else ()):
            if isinstance(m, torch.nn.Linear) and name.endswith(targets):
                tensors[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / 4
                tensors[f"{prefix}.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) / 4
    folder.mkdir(parents=True)
    atomic_save(tensors, folder / LORA_FILE, adapter_metadata(None, "lora", {"rank": [rank]}))
    if token_width:
        atomic_save({"<sks>": torch.randn(1, token_width, generator=g)}, folder / TI_FILE,
                    adapter_metadata(None, "textual_inversion"))
    return folder


def write_custom_diffusion(folder, unet, seed, token_width):
    """A Custom Diffusion run folder: full to_k/to_v weights W0 + noise under diffusers' keys, and `<new1>`."""
    g = torch.Generator().manual_seed(seed)
    state = placeholders(unet)
    for key, attn in cross_attention_modules(unet).items():
        for proj in ("to_k", "to_v"):
            w0 = getattr(attn, proj).weight.detach()
            state[f"{key}.{proj}_custom_diffusion.weight"] = w0 + torch.randn(w0.shape, generator=g) / 4
    folder.mkdir(parents=True)
    atomic_save(state, folder / CD_FILE, adapter_metadata(None, "custom_diffusion", {"tokens": ["<new1>"]}))
    atomic_save({"<new1>": torch.randn(1, token_width, generator=g)}, folder / token_file("<new1>"),
                adapter_metadata(None, "textual_inversion"))
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    base = build_pipeline(tiny_model, progress=False)
    width = base.text_encoder.get_input_embeddings().embedding_dim
    root = tmp_path_factory.mktemp("adapters")
    return [write_lora(root / "lora4", base.unet, 4, 1, width),
            write_lora(root / "lora8", base.unet, 8, 2, width, base.text_encoder),
            write_custom_diffusion(root / "cd", base.unet, 3, width)]


PROMPTS = ["a photo of <sks> dog", "a photo of <sks> dog", "a <new1> dog on grass", "a photo of a dog"]
IDS, SEEDS = [0, 1, 2, -1], [5, 6, 7, 8]


def alone(model, adapter, prompt, seed):
    """What sampling.generate(build_pipeline(model, adapter), prompt, n=1, seed=seed) computes, as floats."""
    pipe = build_pipeline(model, adapter, progress=False)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=size, width=size,
                num_images_per_prompt=1, generator=[torch.Generator("cpu").manual_seed(seed)],
                output_type="np").images[0]


@pytest.fixture(scope="module")
def references(tiny_model, adapters):
    return [alone(tiny_model, adapters[a] if a >= 0 else None, p, s) for p, a, s in zip(PROMPTS, IDS, SEEDS)]


def test_mixed_batch_equals_each_adapter_alone(tiny_model, adapters, references, one_thread):
    multi = MultiAdapterPipeline(tiny_model, adapters)
    batches = []  # one UNet pass per step, for all samples and both guidance halves
    hook = multi.pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    images = multi.generate(PROMPTS, adapters=IDS, seeds=SEEDS, steps=STEPS, guidance=GUIDANCE, output_type="np")
    hook.remove()
    assert batches == [2 * len(PROMPTS)] * STEPS
    base = references[-1]
    for i, ref in enumerate(references):
        err = float(np.abs(images[i] - ref).max())
        assert err < 1e-4, f"sample {i} (adapter {IDS[i]}): max |diff| {err:.2e}"
        if IDS[i] >= 0:  # the adapter really changes the image (else the test proves nothing)
            assert float(np.abs(ref - base).max()) > 1e-2, f"adapter {IDS[i]} leaves the image unchanged"
    # a second call (another order, None for the base) reuses the loaded stacks
    again = multi.generate(PROMPTS[::-1], adapters=[None, 2, 1, 0], seeds=SEEDS[::-1], steps=STEPS,
                           guidance=GUIDANCE, output_type="np")
    assert max(float(np.abs(a - b).max()) for a, b in zip(again[::-1], images)) < 1e-4
    # ... and the text sides built by the first call: private token tables, every other weight shared
    text_sides = {aid: multi.text_pipeline(aid)[0] for aid in set(IDS) if aid >= 0}
    assert any(t is not multi.pipe for t in text_sides.values())
    for aid, text in text_sides.items():
        assert text is multi.text_pipeline(aid)[0]
        if text is multi.pipe:
            continue
        base_encoder = multi.pipe.text_encoder
        assert text.text_encoder.get_input_embeddings().weight is not base_encoder.get_input_embeddings().weight
        copied = {id(p) for p in text.text_encoder.parameters()}
        frozen = [p for p in base_encoder.parameters() if p is not base_encoder.get_input_embeddings().weight]
        assert frozen and all(id(p) in copied for p in frozen)


def test_twin_switch_gives_the_same_images(tiny_model, adapters, references, one_thread):
    multi = MultiAdapterPipeline(tiny_model, adapters)
    with use_kernels(False):
        images = multi.generate(PROMPTS, adapters=IDS, seeds=SEEDS, steps=STEPS, guidance=GUIDANCE,
                                output_type="np")
    assert max(float(np.abs(a - b).max()) for a, b in zip(images, references)) < 1e-4


def test_smaller_batches_give_the_same_images(tiny_model, adapters, references, one_thread):
    """batch=3 of 4 images: two rounds of UNet passes (3, then 1 image, each with both guidance halves), the
    same images as one round."""
    multi = MultiAdapterPipeline(tiny_model, adapters)
    batches = []
    hook = multi.pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    images = multi.generate(PROMPTS, adapters=IDS, seeds=SEEDS, steps=STEPS, guidance=GUIDANCE, output_type="np",
                            batch=3)
    hook.remove()
    assert batches == [6] * STEPS + [2] * STEPS
    assert images.shape[0] == len(PROMPTS)
    assert max(float(np.abs(a - b).max()) for a, b in zip(images, references)) < 1e-4
    with pytest.raises(UserError, match="--batch 0 must be at least 1"):
        multi.generate(PROMPTS, adapters=IDS, steps=1, batch=0)


def test_bad_index_and_folder_are_one_line_errors(tiny_model, adapters, tmp_path, one_thread):
    multi = MultiAdapterPipeline(tiny_model, adapters[:1])
    for bad in ([1], [-2], ["0"], [True]):
        with pytest.raises(UserError, match="out of range") as e:
            multi.generate("x", adapters=bad, steps=1)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="one index per prompt"):
        multi.generate(["a", "b"], adapters=[0], steps=1)
    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "missing", "not a folder"), (tmp_path / "empty", "holds no LoRA")):
        with pytest.raises(UserError, match=message) as e:
            MultiAdapterPipeline(tiny_model, [adapters[0], folder])
        assert "\n" not in str(e.value)


def test_cli_samples_several_adapters(tiny_model, adapters, tmp_path, capsys):
    from t2i_fast.cli import main

    out = tmp_path / "imgs"
    code = main(["sample", "--model", str(tiny_model), "--adapter", str(adapters[0]), "--adapter", str(adapters[2]),
                 "--prompt", "a photo of <sks> dog", "--prompt", "a <new1> dog", "--n", "2", "--steps", "1",
                 "--batch", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a0_000_seed0.png", "a0_001_seed1.png", "a1_000_seed0.png",
                                                     "a1_001_seed1.png", "grid.png"]


def test_trained_runs_mix_as_written_by_the_trainer(tiny_model, base_cfg, tmp_path, one_thread):
    """Folders written by the real trainer (report.json, token metadata, placeholders), not by hand."""
    from t2i_fast import train

    runs = [train(base_cfg.replace(method="lora", train_token=True, out=str(tmp_path / "lora"))).out,
            train(base_cfg.replace(method="custom_diffusion", out=str(tmp_path / "cd"))).out]
    prompts = ["a photo of <sks> dog", "a photo of <new1> dog"]
    multi = MultiAdapterPipeline(tiny_model, runs)
    images = multi.generate(prompts, adapters=[0, 1], seeds=[3, 4], steps=2, guidance=GUIDANCE, output_type="np")
    for i, run in enumerate(runs):
        pipe = build_pipeline(tiny_model, run, progress=False)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        ref = pipe(prompts[i], num_inference_steps=2, guidance_scale=GUIDANCE, height=size, width=size,
                   generator=[torch.Generator("cpu").manual_seed(3 + i)], output_type="np").images[0]
        assert float(np.abs(images[i] - ref).max()) < 1e-4


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the parent of the interpreter run")
def test_triton_interpreter():
    """The mixed batch once more with kv_delta's Triton kernel (per-sample index), under the interpreter."""
    run_interpreter_cases(__file__)


def test_interp_case_mixed_batch_through_the_triton_kv_delta(tiny_model, adapters, references, monkeypatch):
    import importlib

    op = importlib.import_module("t2i_fast.kernels.kv_delta")  # the module, not the function of that name
    launches = []
    real = op._gemm_triton
    monkeypatch.setattr(op, "_gemm_triton", lambda *a: launches.append(a[3].tolist()) or real(*a))
    multi = MultiAdapterPipeline(tiny_model, adapters)
    images = multi.generate(PROMPTS, adapters=IDS, seeds=SEEDS, steps=STEPS, guidance=GUIDANCE, output_type="np")
    assert launches, "the Custom Diffusion adapter's K/V never went through the Triton kernel"
    # the stacked deltas: the CD adapter's and a zero one for every other sample, in both guidance halves
    assert all(len(index) == 2 * len(PROMPTS) and len(set(index)) == 2 for index in launches)
    for i, ref in enumerate(references):
        err = float(np.abs(images[i] - ref).max())
        assert err < 1e-4, f"sample {i} (adapter {IDS[i]}): max |diff| {err:.2e}"


if not IN_INTERPRETER:  # collected only in test_triton_interpreter's TRITON_INTERPRET=1 subprocess
    del test_interp_case_mixed_batch_through_the_triton_kv_delta
