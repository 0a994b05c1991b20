"""The model's and the processor's remote-code bundles each carry their own copy of the shared facts
(neither may import the other); these tests keep the copies equal. RLE coding has one implementation
(`rle.py`), which the processor imports and ships with its code."""

import numpy as np
import pytest

from tpo.modeling_tpo import configuration_tpo as model_facts
from tpo.processing import collator_tpo, rle
from tpo.processing import processing_tpo as processor_facts



def test_task_list_agrees():
    assert tuple(processor_facts.TASK_LABELS) == model_facts.ROUTER_CLASSES
    assert list(processor_facts.TASK_LABELS.values()) == list(range(len(model_facts.ROUTER_CLASSES)))
    assert model_facts.TASK_NAMES == model_facts.ROUTER_CLASSES[1:]


def test_ignore_index_agrees():
    assert processor_facts.IGNORE_INDEX == model_facts.IGNORE_INDEX == collator_tpo.IGNORE_INDEX


def test_task_token_strings_agree():
    assert tuple(processor_facts.DEFAULT_TASK_TOKENS) == model_facts.TASK_NAMES
    for task in model_facts.TASK_NAMES:
        assert processor_facts.DEFAULT_TASK_TOKENS[task] == {
            "begin": model_facts.DEFAULT_BEGIN_TOKENS[task], "slots": [model_facts.DEFAULT_SLOT_TOKENS[task]]}


def test_the_processor_codes_rle_with_rle_py():
    assert processor_facts.decode_rle is rle.mask_from_rle
    assert processor_facts.encode_rle is rle.rle_from_mask


def test_processor_decoder_refuses_runs_that_do_not_cover_the_mask():
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 2:4] = True
    encoded = processor_facts.encode_rle(mask)
    assert np.array_equal(processor_facts.decode_rle(encoded), mask)
    assert np.array_equal(processor_facts.decode_rle({"size": [4, 5], "counts": [9, 2, 2, 2, 5]}), mask)
    with pytest.raises(ValueError, match="sum to 19 pixels but its size 4x5 has 20"):
        processor_facts.decode_rle({"size": [4, 5], "counts": [9, 2, 2, 2, 4]})
    with pytest.raises(ValueError, match="sum to 21 pixels"):
        processor_facts.decode_rle({"size": [4, 5], "counts": [9, 2, 2, 2, 6]})
    with pytest.raises(ValueError, match="negative run"):
        processor_facts.decode_rle({"size": [4, 5], "counts": [9, -2, 2, 2, 9]})
