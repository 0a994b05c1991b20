"""save_pretrained -> Auto classes with trust_remote_code, in this process and in an environment where
the project is not installed: identical weights and identical outputs.

Why outputs are compared twice: safetensors loads each tensor at its offset in the file (8-byte aligned),
while torch allocates at 64-byte boundaries, and the CPU GEMM kernels pick their vector path by the
operand's alignment. A reloaded model can therefore round the last bit differently (seen: 6e-8 in the
temporal head's `task_proj`, 1e-7 in the loss) although its weights are identical. So the model as loaded
is compared with a tolerance (float32 rounding of a few ulps), and the same model with every parameter and
buffer copied to freshly allocated memory must give bit-identical outputs and loss: that proves the
weights, buffers and code are the same and the only difference was where the weights lay.
"""

import textwrap
from pathlib import Path

import pytest
import torch
from clean_env import run_clean_python
from safetensors.torch import save_file
from tiny_inputs import (
    MASK_IMAGE,
    MASK_VIDEO,
    MEDIA,
    REGION,
    TEMPORAL,
    TEXT,
    SampleSpec,
    build_model,
    build_model_and_processor,
    make_batch,
)
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from tpo import TPOForConditionalGeneration

OUTPUT_KEYS = ("logits", "router_logits", "pred_boxes", "loss")
# A few float32 ulps of an O(10) value: the rounding a different GEMM vector path can give (see above).
LOADED_RTOL, LOADED_ATOL = 1e-5, 1e-6


def realign(model):
    """The model with every parameter and buffer copied to freshly allocated (64-byte aligned) memory."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.clone()
    return model


def _reference(model, batch) -> dict:
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return {f"out.{k}": getattr(out, k).detach().reshape(-1) if k == "loss" else getattr(out, k) for k in OUTPUT_KEYS}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_save_and_reload_in_process(tmp_path, family):
    model, tokenizer = build_model(family)
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
            torch.testing.assert_close(got[key], value, rtol=LOADED_RTOL, atol=LOADED_ATOL, msg=key)
        got = _reference(realign(loaded), batch)
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
    assert config.tasks == TASKS, config.tasks
    for auto_class in (AutoModel, AutoModelForImageTextToText):
        model = auto_class.from_pretrained(checkpoint, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        state = model.state_dict()
        assert set(state) == set(reference_state), set(state) ^ set(reference_state)
        for key, value in reference_state.items():
            assert torch.equal(state[key], value), key
        # As loaded (weights at their file offsets): equal up to float32 rounding (see the module docstring);
        # in freshly allocated memory: bit-identical.
        for exact in (False, True):
            if exact:
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.data = parameter.data.clone()
                    for module in model.modules():
                        for name, buffer in module._buffers.items():
                            if buffer is not None:
                                module._buffers[name] = buffer.clone()
            with torch.no_grad():
                out = model(**batch)
            for key, value in expected.items():
                field, _, entry = key.partition(".")  # "mask_outputs.pred_mask_logits": a head's output dict
                got = getattr(out, field)[entry] if entry else getattr(out, field)
                got = got.reshape(-1) if key == "loss" else got
                if exact:
                    assert torch.equal(got, value), key
                else:
                    torch.testing.assert_close(got, value, rtol=RTOL, atol=ATOL, msg=key)
    print("REMOTE-CODE-OK", type(model).__name__)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_reload_where_the_project_is_not_installed(tmp_path, family):
    model, tokenizer = build_model(family)
    batch = make_batch(tokenizer, model.config, [SampleSpec(visual="video"), SampleSpec(task=None)], family=family)
    expected = _reference(model, batch)
    checkpoint, data = tmp_path / "checkpoint", tmp_path / "data"
    data.mkdir()
    model.save_pretrained(checkpoint)
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, data / "state.safetensors")
    save_file({**{f"in.{k}": v.contiguous() for k, v in batch.items()}, **expected}, data / "batch.safetensors")
    _run_clean(checkpoint, data, ["temporal", "region"], tmp_path)


def _run_clean(checkpoint, data, tasks, tmp_path) -> None:
    script = CLEAN_SCRIPT.replace("sys.argv[1], sys.argv[2]", f"{str(checkpoint)!r}, {str(data)!r}")
    script = script.replace("TASKS", repr(tasks)).replace("RTOL", repr(LOADED_RTOL)).replace("ATOL", repr(LOADED_ATOL))
    result = run_clean_python(script, tmp_path / "env")
    assert "REMOTE-CODE-OK TPOForConditionalGeneration" in result.stdout


HEAD_OUTPUTS = ("temporal_outputs.pred_spans", "temporal_outputs.pred_logits", "temporal_outputs.pred_saliency",
                "mask_outputs.pred_mask_logits", "mask_outputs.iou_scores")


@pytest.mark.slow
def test_every_head_with_a_tiny_sam2_reloads_where_the_project_is_not_installed(tmp_path):
    """All three heads (SAM2 inside the mask head), a processor-built batch with a region, a temporal, an image
    mask, a video mask and a text sample, and every head's outputs and the loss compared after reloading."""

    from tpo.processing.collator_tpo import collate_encoded

    model, processor = build_model_and_processor("llava")
    samples = [REGION, TEMPORAL, MASK_IMAGE, MASK_VIDEO, TEXT]
    encoded = [processor.encode(sample, mode="train") for sample in samples]
    batch = collate_encoded(processor, encoded, [MEDIA[sample["id"]] for sample in samples])
    batch.pop("tpo_meta")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the clean interpreter runs: SAM2's convolutions round differently per thread count
    try:
        expected = _reference(model, batch)
        with torch.no_grad():
            out = model(**batch)
    finally:
        torch.set_num_threads(threads)
    for key in HEAD_OUTPUTS:
        field, _, entry = key.partition(".")
        expected[f"out.{key}"] = getattr(out, field)[entry].contiguous()
    assert {"temporal", "region", "mask"} <= set(out.loss_dict)  # every head computed its loss
    checkpoint, data = tmp_path / "checkpoint", tmp_path / "data"
    data.mkdir()
    model.save_pretrained(checkpoint)
    assert (checkpoint / "mask_head.py").exists() and (checkpoint / "temporal_head.py").exists()
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, data / "state.safetensors")
    save_file({**{f"in.{k}": v.contiguous() for k, v in batch.items()}, **expected}, data / "batch.safetensors")
    _run_clean(checkpoint, data, ["temporal", "region", "mask"], tmp_path)


def test_config_loads_with_auto_config(tmp_path):
    model, _ = build_model("llava")
    model.config.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    loaded, original = config.to_dict(), model.config.to_dict()
    loaded.pop("_name_or_path"), original.pop("_name_or_path")
    assert loaded == original


# What the remote code imports, as README.md states it: module level / only where used (lazily).
REMOTE_CODE_IMPORTS = {
    "modeling_tpo": ({"torch", "transformers"}, {"scipy"}),
    "processing": ({"torch", "transformers", "numpy", "PIL"}, {"pycocotools"}),
}
README_REMOTE_CODE_SENTENCE = (
    "`modeling_tpo/` imports torch and transformers (and the standard library) at module level and scipy only "
    "where the Hungarian matcher runs (training the temporal head); `processing_tpo.py`, `collator_tpo.py` and `rle.py` "
    "add numpy and Pillow at module level (transformers' image processors need them too) and pycocotools "
    "only where masks are encoded or decoded"
)


def _third_party_imports(path: Path) -> tuple[set, set]:
    import ast
    import sys

    tree = ast.parse(path.read_text(encoding="utf-8"))
    top, lazy = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            continue  # relative: copied with the file
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            roots = {name.split(".")[0] for name in names} - set(sys.stdlib_module_names)
            (top if node in tree.body else lazy).update(roots)
    return top, lazy - top


def test_remote_code_imports_what_the_readme_says():
    root = Path(__file__).resolve().parents[1]
    files = {"modeling_tpo": sorted((root / "modeling_tpo").glob("*.py")),
             "processing": [root / "processing" / name for name in ("processing_tpo.py", "collator_tpo.py", "rle.py")]}
    for part, paths in files.items():
        top = set().union(*(_third_party_imports(p)[0] for p in paths))
        lazy = set().union(*(_third_party_imports(p)[1] for p in paths)) - top
        allowed_top, allowed_lazy = REMOTE_CODE_IMPORTS[part]
        assert top <= allowed_top and lazy <= allowed_lazy, (part, top, lazy)
    readme = " ".join((root / "README.md").read_text(encoding="utf-8").split())
    assert README_REMOTE_CODE_SENTENCE in readme
