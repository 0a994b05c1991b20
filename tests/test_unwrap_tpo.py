"""`unwrap_tpo` finds the TPO model inside distributed and peft wrappers (accelerate's and peft's own unwrapping)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_inputs import build_model

from tpo.training.trainer import unwrap_tpo


def test_unwrap_tpo_through_data_parallel_and_peft():
    model, _ = build_model("llava")
    assert unwrap_tpo(model) is model
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=model.lora_target_regex()))
    assert unwrap_tpo(peft_model) is model
    assert unwrap_tpo(torch.nn.DataParallel(peft_model)) is model
    assert unwrap_tpo(torch.nn.DataParallel(model)) is model


def test_unwrap_tpo_refuses_a_model_without_tpo():
    with pytest.raises(TypeError, match="Linear does not wrap a TPOForConditionalGeneration"):
        unwrap_tpo(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="DataParallel does not wrap"):
        unwrap_tpo(torch.nn.DataParallel(torch.nn.Linear(2, 2)))
