"""Each head default has one definition: configuration_tpo's DEFAULT_*_HEAD, which the heads' constructors read."""

import inspect

import pytest

from tpo.modeling_tpo.configuration_tpo import DEFAULT_MASK_HEAD, DEFAULT_REGION_HEAD, DEFAULT_TEMPORAL_HEAD
from tpo.modeling_tpo.mask_head import MaskHead
from tpo.modeling_tpo.region_head import RegionHead
from tpo.modeling_tpo.temporal_head import TemporalHead


@pytest.mark.parametrize("head, defaults", [(RegionHead, DEFAULT_REGION_HEAD), (TemporalHead, DEFAULT_TEMPORAL_HEAD),
                                            (MaskHead, DEFAULT_MASK_HEAD)])
def test_constructor_defaults_are_the_config_defaults(head, defaults):
    parameters = inspect.signature(head.__init__).parameters
    with_default = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    assert with_default == defaults
