"""What each TPO stage trains and which losses it counts, as data; and the parameter groups.

A parameter belongs to exactly one group, decided from its name (`parameter_group`, first match wins):
    lora (peft adapters), task_tokens, router, sam2_image_encoder, sam2_prompt_encoder (with SAM2's shared
    image embedding), sam2_mask_decoder, sam2_memory (SAM2's other parts), task_heads (region, temporal and
    mask heads), projector (the MLLM's vision-language connector), vision (the MLLM's vision encoder),
    llm (the language model), other; and frozen_copy for peft's frozen `original_module` copies.
"""

import logging
import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)

ALL_LOSSES = ("lm", "assign", "temporal", "region", "mask")


@dataclass(frozen=True)
class StageSpec:
    """Which losses count and which parameter groups train in a stage."""

    losses: tuple[str, ...]
    groups: tuple[str, ...]
    trains_llm: bool


STAGE_SPECS = {
    "assign": StageSpec(losses=("lm", "assign"), groups=("router",), trains_llm=True),
    "task": StageSpec(losses=("temporal", "region", "mask"), groups=("task_heads", "task_tokens"), trains_llm=False),
    "joint": StageSpec(losses=ALL_LOSSES, groups=("router", "task_heads", "task_tokens", "projector"), trains_llm=True),
}

_GROUP_PATTERNS = [  # first match wins
    ("lora", re.compile(r"lora_")),
    ("task_tokens", re.compile(r"(^|\.)task_tokens\.")),
    ("router", re.compile(r"(^|\.)router\.")),
    ("sam2_image_encoder", re.compile(r"(^|\.)mask_head\.sam2\.vision_encoder\.")),
    ("sam2_prompt_encoder", re.compile(r"(^|\.)mask_head\.sam2\.(prompt_encoder|shared_image_embedding)\.")),
    ("sam2_mask_decoder", re.compile(r"(^|\.)mask_head\.sam2\.mask_decoder\.")),
    ("sam2_memory", re.compile(r"(^|\.)mask_head\.sam2\.")),
    ("task_heads", re.compile(r"(^|\.)(region_head|temporal_head|mask_head)\.")),
    ("projector", re.compile(r"(multi_modal_projector|\.merger\.|mm_projector)")),
    ("vision", re.compile(r"(vision_tower|\.visual\.|vision_model|image_encoder)")),
]


def parameter_group(name: str) -> str:
    """The group of a parameter name (see the module docstring); "llm" for the language model,
    "other" for anything else. peft's frozen `original_module` copies are "frozen_copy"."""
    if ".original_module." in name:
        return "frozen_copy"
    for group, pattern in _GROUP_PATTERNS:
        if pattern.search(name):
            return group
    if re.search(r"(language_model|lm_head|embed_tokens|\.layers\.\d+\.|\.norm\.)", name):
        return "llm"
    return "other"


def trainable_groups(stage: str, args, mask_head_config: dict | None = None) -> set[str]:
    """The parameter groups that train in `stage` under the freezing policy of `args`."""
    spec = STAGE_SPECS[stage]
    groups = set(spec.groups)
    trains_llm = spec.trains_llm or (stage == "task" and args.task_stage_trains_llm)
    if trains_llm and args.llm_training == "lora":
        groups.add("lora")
    if trains_llm and args.llm_training == "full":
        groups.update({"llm", "lora"})
    if llm_drift_guard(stage, args):
        groups.add("router")
    if trains_llm and args.train_projector and stage != "assign":
        groups.add("projector")
    elif stage == "joint" and not args.train_projector:
        groups.discard("projector")
    if args.train_vision_tower:
        groups.add("vision")
    if "task_heads" in groups:
        mask_head_config = mask_head_config or {}
        if args.train_sam2_image_encoder or not mask_head_config.get("freeze_image_encoder", True):
            groups.add("sam2_image_encoder")
        if not mask_head_config.get("freeze_prompt_encoder", True):
            groups.add("sam2_prompt_encoder")
        if not mask_head_config.get("freeze_mask_decoder", False):
            groups.add("sam2_mask_decoder")
    return groups


_TASK_PATTERN = re.compile(
    r"(?:^|\.)(?:(region|temporal|mask)_head|task_tokens\.(?:[\w.]*\.)?embeddings\.(region|temporal|mask))(?:\.|$)"
)


def parameter_task(name: str) -> str | None:
    """The task whose head or task token a parameter belongs to (None for the others, the router included)."""
    match = _TASK_PATTERN.search(name)
    return (match.group(1) or match.group(2)) if match else None


def apply_stage(model: nn.Module, stage: str, args, mask_head_config: dict | None = None,
                loss_weights: dict[str, float] | None = None) -> Counter:
    """Set `requires_grad` for `stage`; returns the number of trainable parameters per group.

    With `args.tasks` given, the heads and task tokens of the other tasks stay frozen (a per-task `task` stage
    trains one task's head and token); with `loss_weights` (the stage's) whose `assign` weight is 0, the router
    stays frozen (nothing would train it, and data-parallel training needs a gradient for every trainable
    parameter)."""
    groups = trainable_groups(stage, args, mask_head_config)
    if loss_weights is not None and not loss_weights.get("assign", 0.0):
        groups.discard("router")
    tasks = getattr(args, "tasks", None)
    counts: Counter = Counter()
    for name, parameter in model.named_parameters():
        group = parameter_group(name)
        task = parameter_task(name)
        train = group in groups and (tasks is None or task is None or task in tasks)
        parameter.requires_grad_(train)
        if train:
            counts[group] += parameter.numel()
    if not counts:
        raise ValueError(
            f"Stage {stage!r} leaves no parameter trainable (groups {sorted(groups)}); check `llm_training` and "
            "that the model enables the tasks of this stage."
        )
    logger.info("Stage %s trains: %s", stage, ", ".join(f"{g} {n / 1e6:.2f}M" for g, n in sorted(counts.items())))
    return counts


def llm_drift_guard(stage: str, args) -> bool:
    """True when the `task` stage trains the LLM (`task_stage_trains_llm`): the LM and assign terms then
    count too and the router trains, so that what the `assign` stage taught (emit the right begin token,
    route the instruction) follows the LLM as it changes instead of going stale."""
    return stage == "task" and bool(getattr(args, "task_stage_trains_llm", False)) and args.llm_training != "frozen"


def stage_loss_weights(stage: str, base_weights: dict[str, float], overrides: dict[str, float], tasks: list[str],
                       args=None) -> dict[str, float]:
    """Loss weights of `stage`: the model's (or overridden) weights for the counted terms, 0 otherwise
    (with `args`, see `llm_drift_guard`)."""
    counted = set(STAGE_SPECS[stage].losses)
    if args is not None and llm_drift_guard(stage, args):
        counted |= {"lm", "assign"}
    weights = {**base_weights, **overrides}
    return {name: (weights[name] if name in counted and (name in ("lm", "assign") or name in tasks) else 0.0)
            for name in ALL_LOSSES}


def lr_multipliers(args) -> dict[str, float]:
    """Learning-rate multiplier of every parameter group; all 1 in the `joint` stage without
    `joint_lr_multipliers` (the paper's stage 3 runs everything at one rate)."""
    if getattr(args, "stage", None) == "joint" and getattr(args, "joint_lr_multipliers", True) is False:
        return {group: 1.0 for group in ("task_tokens", "router", "task_heads", "sam2_mask_decoder",
                                         "sam2_prompt_encoder", "lora")}
    return {
        "task_tokens": args.task_token_lr_multiplier,
        "router": args.head_lr_multiplier,
        "task_heads": args.head_lr_multiplier,
        "sam2_mask_decoder": args.head_lr_multiplier,
        "sam2_prompt_encoder": args.head_lr_multiplier,
        "lora": args.lora_lr_multiplier,
    }


def stage_runs(stages: list[str], args, tasks: list[str]) -> list[tuple[str, str | None]]:
    """The training runs of a multi-stage run, in order: (stage, None), or, for the `task` stage with
    `args.task_stage_per_task`, one ("task", task) per task of `tasks` (each trains that task's head and token on
    its samples)."""
    runs = []
    for stage in stages:
        if stage == "task" and getattr(args, "task_stage_per_task", False):
            runs += [(stage, task) for task in tasks]
        else:
            runs.append((stage, None))
    return runs
