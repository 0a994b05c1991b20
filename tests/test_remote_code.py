"""save_pretrained -> Auto classes with trust_remote_code, in this process and in an environment where
the project is not installed: identical weights and identical outputs."""

import textwrap

import pytest
import torch
from clean_env import run_clean_python
from safetensors.torch import save_file
from test_model_core import build
from tiny_inputs import SampleSpec, make_batch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from tpo import TPOForConditionalGeneration

OUTPUT_KEYS = ("logits", "router_logits", "pred_boxes", "loss")


def _reference(model, batch) -> dict:
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return {f"out.{k}": getattr(out, k).detach().reshape(-1) if k == "loss" else getattr(out, k) for k in OUTPUT_KEYS}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_save_and_reload_in_process(tmp_path, family):
    model, tokenizer = build(family)
    batch = make_batch(tokenizer, model.config, [SampleSpec(visual="video"), SampleSpec(task=None)], family=family)
    expected = _reference(model, batch)
    model.save_pretrained(tmp_path)
    for auto_class in (AutoModel, AutoModelForImageTextToText, TPOForConditionalGeneration):
        loaded = auto_class.from_pretrained(tmp_path, trust_remote_code=True).eval()
        assert loaded.state_dict().keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        got = _reference(loaded, batch)
        for key, value in expected.items():
            assert torch.equal(got[key], value), key


CLEAN_SCRIPT = textwrap.dedent(
    """
    import importlib.util
    import sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    assert importlib.util.find_spec("tpo") is None, "the project must not be importable here"
    checkpoint, data = sys.argv[1], sys.argv[2]
    reference_state = load_file(data + "/state.safetensors")
    tensors = load_file(data + "/batch.safetensors")
    batch = {k[len("in."):]: v for k, v in tensors.items() if k.startswith("in.")}
    expected = {k[len("out."):]: v for k, v in tensors.items() if k.startswith("out.")}

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
    assert config.tasks == ["temporal", "region"], config.tasks
    for auto_class in (AutoModel, AutoModelForImageTextToText):
        model = auto_class.from_pretrained(checkpoint, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        state = model.state_dict()
        assert set(state) == set(reference_state), set(state) ^ set(reference_state)
        for key, value in reference_state.items():
            assert torch.equal(state[key], value), key
        with torch.no_grad():
            out = model(**batch)
        for key, value in expected.items():
            got = getattr(out, key)
            got = got.reshape(-1) if key == "loss" else got
            assert torch.equal(got, value), key
    print("REMOTE-CODE-OK", type(model).__name__)
    """
)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_reload_where_the_project_is_not_installed(tmp_path, family):
    model, tokenizer = build(family)
    batch = make_batch(tokenizer, model.config, [SampleSpec(visual="video"), SampleSpec(task=None)], family=family)
    expected = _reference(model, batch)
    checkpoint, data = tmp_path / "checkpoint", tmp_path / "data"
    data.mkdir()
    model.save_pretrained(checkpoint)
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, data / "state.safetensors")
    save_file({**{f"in.{k}": v.contiguous() for k, v in batch.items()}, **expected}, data / "batch.safetensors")
    script = CLEAN_SCRIPT.replace("sys.argv[1], sys.argv[2]", f"{str(checkpoint)!r}, {str(data)!r}")
    result = run_clean_python(script, tmp_path / "env")
    assert "REMOTE-CODE-OK TPOForConditionalGeneration" in result.stdout


def test_config_loads_with_auto_config(tmp_path):
    model, _ = build("llava")
    model.config.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    loaded, original = config.to_dict(), model.config.to_dict()
    loaded.pop("_name_or_path"), original.pop("_name_or_path")
    assert loaded == original
