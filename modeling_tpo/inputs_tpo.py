"""The TPO inputs of `TPOForConditionalGeneration.forward`, declared once: one dataclass per head
(`RegionInputs`, `TemporalInputs`, `MaskInputs`) plus the inputs every head may read (`SharedInputs`) and the
training targets of the MLLM and router (`LMTargets`). Each field says its shape and, in its metadata, what it
is: `rows` ("token", "sample", "query", "span", "sam2_image" or "other"), `head_only` (used by the heads' pass
of `generate`, never by decoding), `target` (training only), `fill` (padding of a per-token input) and
`box_prompt` (the mask head's box-prompt inputs). The key lists below are derived from these declarations.

Remote code: the standard library and torch only.
"""

import dataclasses
from dataclasses import dataclass, field

import torch

ROWS = ("token", "sample", "query", "span", "sam2_image", "other")


def _input(doc: str, rows: str, *, head_only: bool = False, target: bool = False, fill=None,
           box_prompt: bool = False, forward: bool = True):
    """A declared input (default None); `forward=False`: taken by `generate` only."""
    if rows not in ROWS:
        raise ValueError(f"Unknown rows {rows!r}; use one of {ROWS}.")
    return field(default=None, metadata={"doc": doc, "rows": rows, "head_only": head_only, "target": target,
                                         "fill": fill, "box_prompt": box_prompt, "forward": forward})


@dataclass
class SharedInputs:
    """Inputs any head may read (the processor's collator gives them)."""

    instruction_end_index: torch.LongTensor | None = _input(
        "(batch,) position of the last instruction token, whose hidden state the router reads", "sample",
        head_only=True)
    query_token_mask: torch.Tensor | None = _input(
        "(batch, seq) bool: the instruction's text tokens (the heads' query text)", "token", head_only=True,
        fill=False)
    frame_token_index: torch.LongTensor | None = _input(
        "(batch, seq) head-frame index of each visual token, -1 elsewhere", "token", head_only=True, fill=-1)
    frame_timestamps: torch.FloatTensor | None = _input(
        "(batch, frames) head-frame times in seconds, -1 where padded", "sample", head_only=True)
    video_durations: torch.FloatTensor | None = _input("(batch,) video durations in seconds", "sample",
                                                       head_only=True)
    visual_token_xy: torch.FloatTensor | None = _input(
        "(batch, seq, 2) each visual token's patch centre in its image, normalised, -1 elsewhere", "token",
        head_only=True, fill=-1.0)
    tpo_meta: dict | None = _input("per-sample metadata from the collator, ignored by the model", "other",
                                   head_only=True)


@dataclass
class LMTargets:
    """Training targets of the LM head and the task router."""

    labels: torch.LongTensor | None = _input("(batch, seq) next-token targets, -100 on prompt and padding", "token",
                                             target=True)
    task_labels: torch.LongTensor | None = _input("(batch,) router targets, indices into ROUTER_CLASSES or -100",
                                                  "sample", target=True)


@dataclass
class RegionInputs:
    """The region head's targets."""

    region_boxes: torch.FloatTensor | None = _input(
        "(num_region_queries, 4) normalised (x0, y0, x1, y1), one per region slot, in (sample, position) order",
        "query", target=True)
    region_batch_index: torch.LongTensor | None = _input("(num_region_queries,) the sample of each target box",
                                                         "query", target=True)


@dataclass
class TemporalInputs:
    """The temporal head's targets."""

    temporal_spans: torch.FloatTensor | None = _input("(num_spans, 2) GT windows, normalised (start, end)", "span",
                                                      target=True)
    temporal_span_query_index: torch.LongTensor | None = _input("(num_spans,) the temporal query of each window",
                                                                "span", target=True)
    temporal_saliency: torch.FloatTensor | None = _input(
        "(num_temporal_queries, frames) per-frame saliency targets >= 0", "query", target=True)


@dataclass
class MaskInputs:
    """The mask head's inputs and targets, one row per SAM2 image (m)."""

    sam2_pixel_values: torch.FloatTensor | None = _input("(m, 3, S, S) SAM2 inputs of the mask queries' images",
                                                         "sam2_image", head_only=True)
    mask_query_index: torch.LongTensor | None = _input("(m,) the mask query of each SAM2 image", "sam2_image",
                                                       head_only=True)
    sam2_batch_index: torch.LongTensor | None = _input(
        "(m,) the sample of each SAM2 image (`generate` only; default: the collator's convention)", "sam2_image",
        head_only=True, forward=False)
    mask_targets: torch.FloatTensor | None = _input("(m, S, S) binary masks", "sam2_image", target=True)
    mask_frame_index: torch.LongTensor | None = _input(
        "(m,) the head frame whose visual tokens show each SAM2 image, -1 for all the sample's visual tokens",
        "sam2_image", head_only=True, box_prompt=True)
    mask_view_to_sam2: torch.FloatTensor | None = _input(
        "(m, 4) (a_x, b_x, a_y, b_y) from the visual tokens' normalised coordinates to SAM2's", "sam2_image",
        head_only=True, box_prompt=True)


HEAD_INPUTS = {"region": RegionInputs, "temporal": TemporalInputs, "mask": MaskInputs}
DECLARED_INPUTS = (SharedInputs, LMTargets, *HEAD_INPUTS.values())
DENSE_PREFIX = "dense_"  # inputs of the temporal head's dense clips: head-only, per clip (never per token)


def declared_fields(*classes) -> list[dataclasses.Field]:
    """The declared input fields of `classes` (default: every declaration), in declaration order."""
    return [f for cls in classes or DECLARED_INPUTS for f in dataclasses.fields(cls)]


def _names(predicate) -> tuple[str, ...]:
    return tuple(f.name for f in declared_fields() if predicate(f.metadata))


# Inputs used only by the heads' pass of `generate` (not by the MLLM's decoding).
HEAD_ONLY_INPUTS = _names(lambda m: m["head_only"])
TRAINING_TARGETS = _names(lambda m: m["target"])
# the box prompt's inputs: per SAM2 image (m, ...), never per token, whatever their shapes
MASK_IMAGE_KEYS = _names(lambda m: m["box_prompt"])
# every input with one row per SAM2 image (m, ...): slice them together when SAM2 images are dropped
SAM2_IMAGE_INPUTS = _names(lambda m: m["rows"] == "sam2_image")
# declared inputs never laid out per token, whatever their shapes
NOT_PER_TOKEN = _names(lambda m: m["rows"] != "token")
# padding of per-token inputs (the MLLM's `mm_token_type_ids` included: 0 is text)
PER_TOKEN_FILL = {**{f.name: f.metadata["fill"] for f in declared_fields() if f.metadata["fill"] is not None},
                  "mm_token_type_ids": 0}
