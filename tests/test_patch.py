"""t2i_fast.patch / unpatch on a tiny diffusers pipeline: peft LoRA layers and Custom Diffusion processors.

Images are identical before patching and after unpatching, and within tolerance while patched; LoRA
gradients agree; state_dict keys and parameter objects are untouched.
"""
from __future__ import annotations

import pytest
import torch

import t2i_fast

PROMPT = "a photo of a cat"


def _images(pipe):
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    return out.images


def _lora_pipe():
    peft = pytest.importorskip("peft")
    from t2i_fast.testing import build_pipeline

    pipe = build_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                          target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return pipe


def test_patch_unpatch_round_trip_lora(fused_torch, monkeypatch):
    from peft.tuners.lora.layer import Linear as PeftLinear

    import t2i_fast.kernels as K

    from t2i_fast.nn.attention import FastAttnProcessor

    pipe = _lora_pipe()
    keys = list(pipe.unet.state_dict())
    params = {n: p for n, p in pipe.unet.named_parameters()}
    before = _images(pipe)
    n_lora = sum(isinstance(m, PeftLinear) for m in pipe.unet.modules())
    n_attn = len(pipe.unet.attn_processors)
    assert n_lora > 0

    assert t2i_fast.patch(pipe) == n_lora + n_attn
    assert t2i_fast.patch(pipe) == 0                                     # idempotent
    assert all(isinstance(p, FastAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert list(pipe.unet.state_dict()) == keys
    assert all(p is params[n] for n, p in pipe.unet.named_parameters())
    calls = []
    fused = K.lora_linear
    monkeypatch.setattr(K, "lora_linear", lambda *a: calls.append(1) or fused(*a))
    patched = _images(pipe)
    assert len(calls) >= n_lora                                          # the fused path ran, no fallback
    torch.testing.assert_close(patched, before, rtol=0, atol=2e-4)

    assert t2i_fast.unpatch(pipe) == n_lora + n_attn
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())
    assert torch.equal(_images(pipe), before)


def test_patched_lora_gradients_match(fused_torch):
    pipe = _lora_pipe()
    unet = pipe.unet
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]

    def grads():
        unet.zero_grad(set_to_none=True)
        unet(latents, t, text).sample.square().mean().backward()
        return [p.grad.clone() for p in lora]

    ref = grads()
    t2i_fast.patch(unet)
    fused = grads()
    t2i_fast.unpatch(unet)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_patch_custom_diffusion_processors(fused_torch):
    from diffusers.models.attention_processor import AttnProcessor2_0, CustomDiffusionAttnProcessor

    from t2i_fast.nn.attention import FastCustomDiffusionAttnProcessor
    from t2i_fast.testing import build_pipeline

    pipe = build_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    torch.manual_seed(0)
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            procs[name] = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=unet.get_submodule(
                name.rsplit(".", 1)[0]).to_q.out_features, cross_attention_dim=32)
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(dict(procs))  # diffusers pops from the dict it is given
    before = _images(pipe)
    sd = {k: v.clone() for k, v in unet.state_dict().items()}

    t2i_fast.patch(pipe)
    now = unet.attn_processors
    cd_names = [n for n in now if n.endswith("attn2.processor")]
    assert cd_names and all(isinstance(now[n], FastCustomDiffusionAttnProcessor) for n in cd_names)
    assert all(now[n].to_k_custom_diffusion is procs[n].to_k_custom_diffusion for n in cd_names)  # shared
    assert list(unet.state_dict()) == list(sd)
    torch.testing.assert_close(_images(pipe), before, rtol=0, atol=2e-4)

    t2i_fast.unpatch(pipe)
    assert all(unet.attn_processors[n] is procs[n] for n in procs)
    assert torch.equal(_images(pipe), before)


def test_patch_rejects_other_objects():
    with pytest.raises(TypeError):
        t2i_fast.patch(object())
