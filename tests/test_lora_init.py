"""--lora-init: how LoRALinear's A starts (kaiming, peft's default; gaussian, diffusers' train_dreambooth_lora.py),
checked against peft's own LoRA layer with the same init, and B = 0 so the wrapped layer equals its base."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from t2i_fast import TrainConfig
from t2i_fast.methods.lora import inject_lora
from t2i_fast.nn.lora import INITS, LoRALinear

IN, OUT, RANK = 4096, 64, 4  # 16384 values in A: its std is measured to about 1%


def _peft_a(init, seed=0) -> torch.Tensor:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(nn.Sequential(nn.Linear(IN, OUT)),
                           LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"], init_lora_weights=init))
    return model.base_model.model[0].lora_A["default"].weight.detach()


@pytest.mark.parametrize("init, peft_init", [("kaiming", True), ("gaussian", "gaussian")], ids=["kaiming", "gaussian"])
def test_a_statistics_match_peft(init, peft_init):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(IN, OUT), rank=RANK, init=init)
    a, ref = layer.lora_A.detach(), _peft_a(peft_init)
    assert a.shape == ref.shape == (RANK, IN)
    assert abs(a.mean().item()) < 0.05 * a.std().item()  # 6 standard errors of the mean
    assert a.std().item() == pytest.approx(ref.std().item(), rel=0.03)
    if init == "kaiming":  # uniform on ±1/sqrt(fan_in): std 1/sqrt(3 fan_in)
        assert a.abs().max().item() <= 1 / math.sqrt(IN)
        assert a.std().item() == pytest.approx(1 / math.sqrt(3 * IN), rel=0.03)
    else:  # normal, std 1/rank
        assert a.std().item() == pytest.approx(1 / RANK, rel=0.03)
        assert a.abs().max().item() > 2 / RANK  # a bounded (uniform) draw never gets here


@pytest.mark.parametrize("init", sorted(INITS))
def test_b_zero_and_output_unchanged_at_init(init):
    torch.manual_seed(1)
    base = nn.Linear(40, 24)
    layer = LoRALinear(base, rank=RANK, init=init)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(2, 7, 40)
    torch.testing.assert_close(layer(x), base(x))


def test_inject_passes_the_init_and_bad_names_fail():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(IN, OUT))
    layers = inject_lora(model, ("0",), RANK, None, "gaussian")
    assert layers["0"].lora_A.std().item() == pytest.approx(1 / RANK, rel=0.03)
    assert TrainConfig().lora_init == "kaiming"
    with pytest.raises(ValueError, match="gaussian"):
        LoRALinear(nn.Linear(8, 8), init="xavier")
