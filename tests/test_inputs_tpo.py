"""The TPO inputs are declared once (modeling_tpo/inputs_tpo.py): the forward's signature, the key lists that
`generate` uses and the collator's batches agree with the declarations."""

import dataclasses
import inspect

from tpo import TPOForConditionalGeneration
from tpo.modeling_tpo import inputs_tpo
from tpo.modeling_tpo.inputs_tpo import HEAD_INPUTS, declared_fields

# the forward's own arguments that are not TPO inputs: the MLLM's and the call's controls
NOT_DECLARED = {"input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds", "use_cache",
                "logits_to_keep", "backbone_hidden_states", "kwargs"}


def test_forward_takes_every_declared_input_as_a_keyword():
    parameters = set(inspect.signature(TPOForConditionalGeneration.forward).parameters) - {"self"}
    declared = {f.name for f in declared_fields() if f.metadata["forward"]}
    assert declared <= parameters
    assert parameters - declared == NOT_DECLARED


def test_every_field_states_its_rows_and_shape():
    for f in declared_fields():
        assert f.metadata["rows"] in inputs_tpo.ROWS and f.metadata["doc"], f.name
        assert f.default is None, f.name
        assert not (f.metadata["fill"] is not None and f.metadata["rows"] != "token"), f.name


def test_key_lists_follow_the_declarations():
    mask_fields = {f.name for f in dataclasses.fields(HEAD_INPUTS["mask"])}
    assert set(inputs_tpo.SAM2_IMAGE_INPUTS) == mask_fields
    assert set(inputs_tpo.MASK_IMAGE_KEYS) == {"mask_frame_index", "mask_view_to_sam2"}
    assert set(inputs_tpo.TRAINING_TARGETS) == {
        "labels", "task_labels", "region_boxes", "region_batch_index", "temporal_spans", "temporal_span_query_index",
        "temporal_saliency", "mask_targets"}
    assert not set(inputs_tpo.HEAD_ONLY_INPUTS) & set(inputs_tpo.TRAINING_TARGETS)
    assert inputs_tpo.PER_TOKEN_FILL == {"frame_token_index": -1, "query_token_mask": False, "mm_token_type_ids": 0,
                                         "visual_token_xy": -1.0}
    per_token = {f.name for f in declared_fields() if f.metadata["rows"] == "token"}
    assert not per_token & set(inputs_tpo.NOT_PER_TOKEN)


def test_the_collator_gives_only_declared_inputs_and_the_mllm_s():
    from tiny_inputs import MASK_IMAGE, MASK_VIDEO, MEDIA, REGION, TEMPORAL, TEXT, build_model_and_processor

    from tpo.processing.collator_tpo import collate_encoded

    model, processor = build_model_and_processor("llava")
    samples = [REGION, TEMPORAL, MASK_IMAGE, MASK_VIDEO, TEXT]
    batch = collate_encoded(processor, [processor.encode(s, mode="train") for s in samples],
                            [MEDIA[s["id"]] for s in samples])
    declared = {f.name for f in declared_fields()}
    mllm_inputs = set(inspect.signature(model.mllm.forward).parameters)
    undeclared = {k for k in batch if k not in declared and k not in mllm_inputs
                  and not k.startswith(inputs_tpo.DENSE_PREFIX)}
    assert not undeclared
    # every head's declared inputs that a batch with that task carries
    for cls in HEAD_INPUTS.values():
        forward_fields = {f.name for f in dataclasses.fields(cls) if f.metadata["forward"]}
        assert forward_fields <= set(batch), cls.__name__


def test_past_key_values_is_taken_as_cache_and_outputs_answer_to_both_names(monkeypatch):
    """The one KV-cache shim (generation_tpo.py): `forward(past_key_values=...)` reaches the backbone as `cache`,
    and `outputs.past_key_values` reads `outputs.cache`."""
    from tiny_inputs import SampleSpec, build_model, make_batch
    from transformers import DynamicCache

    model, tokenizer = build_model("llava")
    batch = make_batch(tokenizer, model.config, [SampleSpec(task=None, visual="none")])
    seen = {}
    run_backbone = model._run_backbone

    def spy(input_ids, cache=None, **inputs):
        seen["cache"] = cache
        return run_backbone(input_ids, cache=cache, **inputs)

    monkeypatch.setattr(model, "_run_backbone", spy)
    given = DynamicCache(config=model.config.get_text_config())
    batch.pop("labels", None)
    out = model(**batch, past_key_values=given, use_cache=True)
    assert seen["cache"] is given
    assert out.cache is given and out.past_key_values is out.cache
