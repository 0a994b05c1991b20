"""Each head's settings have one definition: configuration_tpo's typed configs (`RegionHeadConfig`, ...), from which
the DEFAULT_*_HEAD dicts, the heads and TPOConfig's plain-dict head configs take their defaults."""

import dataclasses
import inspect
import json

import pytest

from tpo.modeling_tpo.configuration_tpo import (
    DEFAULT_BOX_PROMPT,
    DEFAULT_MASK_HEAD,
    DEFAULT_REGION_HEAD,
    DEFAULT_TEMPORAL_HEAD,
    BoxPromptConfig,
    MaskHeadConfig,
    RegionHeadConfig,
    TemporalHeadConfig,
    TPOConfig,
)
from tpo.modeling_tpo.mask_head import MaskHead
from tpo.modeling_tpo.region_head import RegionHead
from tpo.modeling_tpo.temporal_head import TemporalHead
from tpo.tiny import tiny_sam2_config

HEADS = [(RegionHead, RegionHeadConfig, DEFAULT_REGION_HEAD), (TemporalHead, TemporalHeadConfig, DEFAULT_TEMPORAL_HEAD),
         (MaskHead, MaskHeadConfig, DEFAULT_MASK_HEAD)]


@pytest.mark.parametrize("settings_class, defaults", [(RegionHeadConfig, DEFAULT_REGION_HEAD),
                                                      (TemporalHeadConfig, DEFAULT_TEMPORAL_HEAD),
                                                      (MaskHeadConfig, DEFAULT_MASK_HEAD),
                                                      (BoxPromptConfig, DEFAULT_BOX_PROMPT)])
def test_default_dicts_are_the_typed_configs(settings_class, defaults):
    assert defaults == dataclasses.asdict(settings_class())
    assert list(defaults) == [f.name for f in dataclasses.fields(settings_class)]


@pytest.mark.parametrize("head, settings_class, defaults", HEADS)
def test_constructors_repeat_no_default(head, settings_class, defaults):
    parameters = inspect.signature(head.__init__).parameters
    assert not set(defaults) & set(parameters)  # settings come only through the typed config
    assert parameters["config"].default is None


def _build(head, *args, **kwargs):
    return head(8, tiny_sam2_config(), *args, **kwargs) if head is MaskHead else head(8, *args, **kwargs)


@pytest.mark.parametrize("head, settings_class, defaults", HEADS)
def test_heads_keep_their_typed_settings(head, settings_class, defaults):
    assert _build(head).settings == settings_class()
    field = "num_prompt_tokens" if head is MaskHead else "heatmap_dim" if head is RegionHead else "d_model"
    given = settings_class(**{field: 16})
    assert _build(head, given).settings == given
    assert _build(head, {field: 16}).settings == given  # a dict of settings, as TPOConfig keeps them
    assert _build(head, **{field: 16}).settings == given  # keyword overrides
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['not_a_setting'\].*valid keys are \["):
        _build(head, not_a_setting=1)


def test_box_prompt_settings_reach_the_localiser():
    head = MaskHead(8, tiny_sam2_config(), box_prompt=True, box_prompt_config={"heatmap_dim": 16})
    assert head.localiser.settings == RegionHeadConfig(mode="heatmap", heatmap_dim=16)


def test_typed_head_config_round_trips_through_tpo_config(tmp_path):
    region = RegionHeadConfig(mode="heatmap", heatmap_dim=16, query_text=True)
    config = TPOConfig(tasks=["temporal", "region"], region_head_config=region,
                       temporal_head_config={"d_model": 32, "num_heads": 2})
    assert isinstance(config.region_head_config, dict) and config.region_head_config == dataclasses.asdict(region)
    assert config.head_settings("region") == region
    assert config.head_settings("temporal") == TemporalHeadConfig(d_model=32, num_heads=2)
    saved = json.loads(config.to_json_string())
    assert saved["region_head_config"] == dataclasses.asdict(region)  # config.json keeps plain dicts
    restored = TPOConfig.from_dict(saved)
    assert restored.to_dict() == config.to_dict()
    assert restored.head_settings("region") == region
    config.save_pretrained(tmp_path)
    assert TPOConfig.from_pretrained(tmp_path).head_settings("temporal") == config.head_settings("temporal")


@pytest.mark.parametrize("name", ["region_head_config", "temporal_head_config", "mask_head_config"])
def test_unknown_head_setting_is_refused_by_name(name):
    with pytest.raises(ValueError, match=rf"Unknown key\(s\) \['typo_weight'\] in `{name}`; valid keys are \["):
        TPOConfig(**{name: {"typo_weight": 1.0}})
