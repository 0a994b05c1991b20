"""Single-object tracking (LaSOT success AUC, precision@20, normalised precision; GOT-10k AO, SR0.5,
SR0.75) as a local `evaluate` module.

predictions / references: per sequence the per-frame boxes `[x, y, w, h]` in pixels (a GT box with
x, y, w or h <= 0 is an invalid frame for LaSOT: a miss for success, a hit for precision). Optional
`visible`: per sequence per-frame booleans (absent frames are failures for LaSOT and left out for GOT-10k).
`protocol`: "both" (default), "lasot" or "got10k". Numbers: `tpo.training.metrics.tracking`.
"""

import datasets
import evaluate

from tpo.training.metrics.tracking import got10k_metrics
from tpo.training.metrics.tracking import lasot_metrics
from tpo.training.metrics.tracking import tracking_metrics

_BOXES = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
_PROTOCOLS = {"both": tracking_metrics, "lasot": lasot_metrics, "got10k": got10k_metrics}


class Tracking(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="LaSOT and GOT-10k single-object tracking metrics.",
            citation="Fan et al., LaSOT, CVPR 2019; Huang et al., GOT-10k, TPAMI 2019.",
            inputs_description="predictions / references: per sequence a list of [x, y, w, h] boxes (pixels).",
            features=datasets.Features({"predictions": _BOXES, "references": _BOXES}),
        )

    def _compute(self, predictions, references, protocol: str = "both", visible=None):
        if protocol not in _PROTOCOLS:
            raise ValueError(f"protocol must be one of {list(_PROTOCOLS)}, got {protocol!r}.")
        flags = visible if visible is not None else [None] * len(references)
        return _PROTOCOLS[protocol]([(p, r, v) for p, r, v in zip(predictions, references, flags)])
