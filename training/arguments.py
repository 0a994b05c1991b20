"""Training arguments of TPO: the Trainer's own plus the stage, tasks, loss weights, learning-rate
multipliers and freezing policy."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..modeling_tpo.configuration_tpo import PRESETS, TASK_NAMES

STAGES = ("assign", "task", "joint")
# Published learning rates (REFERENCE.md section 3): stage 1 LoRA 2e-5; stage 2 heads 1e-4 and task
# tokens 1e-4..2e-4; stage 3 2e-5. With learning_rate 2e-5 the multipliers below give them.
DEFAULT_HEAD_LR_MULTIPLIER = 5.0
DEFAULT_TASK_TOKEN_LR_MULTIPLIER = 5.0
# The stage schedule of each preset, for the arguments left unset (None); without a preset, the project's.
SCHEDULES = {
    None: {"task_stage_per_task": False, "joint_lr_multipliers": True, "task_stage_trains_llm": False},
    # the paper's appendix: stage 2 trains each task's head and token separately, with the LLM's LoRA; stage 3
    # runs everything at the base rate (2e-5)
    "release": {"task_stage_per_task": True, "joint_lr_multipliers": False, "task_stage_trains_llm": True},
}


@dataclass
class TPOTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus what a TPO stage needs.

    Stages decide what trains and which losses count:
    - `assign`: LoRA on the LLM (or the LLM, see `llm_training`) and the task router; losses LM + assign,
      so that the LM learns to emit the right begin token.
    - `task`: the heads and the task tokens; the task losses. With `task_stage_trains_llm` also LoRA (or the
      LLM) and the router, with the LM and assign losses, so that stage 1's routing does not go stale.
    - `joint`: everything but the frozen encoders and SAM2's image encoder, all losses, conversation
      data mixed in.
    """

    stage: str = field(default="joint", metadata={"help": f"Training stage, one of {list(STAGES)}."})
    tasks: list[str] | None = field(
        default=None, metadata={"help": "Tasks trained in this run (default: all tasks the model enables)."}
    )
    lm_loss_weight: float | None = field(default=None, metadata={"help": "Weight of L_mllm (default: model config)."})
    assign_loss_weight: float | None = field(default=None, metadata={"help": "Weight of L_assign (default: model config)."})
    temporal_loss_weight: float | None = field(
        default=None, metadata={"help": "Weight of the temporal head loss (default: model config, 0.05 as released)."}
    )
    region_loss_weight: float | None = field(default=None, metadata={"help": "Weight of the region head loss."})
    mask_loss_weight: float | None = field(default=None, metadata={"help": "Weight of the mask head loss."})
    head_lr_multiplier: float = field(
        default=DEFAULT_HEAD_LR_MULTIPLIER,
        metadata={"help": "Learning rate of the heads and router = learning_rate x this (published: 1e-4 = 5 x 2e-5)."},
    )
    task_token_lr_multiplier: float = field(
        default=DEFAULT_TASK_TOKEN_LR_MULTIPLIER,
        metadata={"help": "Learning rate of the task tokens = learning_rate x this (published: 1e-4..2e-4)."},
    )
    lora_lr_multiplier: float = field(default=1.0, metadata={"help": "Learning rate of LoRA weights = learning_rate x this."})
    other_lr_multiplier: float = field(
        default=1.0, metadata={"help": "Learning rate of every other trainable parameter = learning_rate x this."}
    )
    llm_training: str = field(
        default="lora",
        metadata={"help": "How the language model trains in the stages that train it: 'lora' (peft adapters), "
                          "'full' (all its weights; for small models trained from scratch) or 'frozen'."},
    )
    train_vision_tower: bool = field(default=False, metadata={"help": "Train the MLLM's vision encoder (frozen by default)."})
    train_projector: bool = field(default=True, metadata={"help": "Train the MLLM's vision-language projector in the joint stage."})
    train_sam2_image_encoder: bool = field(
        default=False, metadata={"help": "Train SAM2's image encoder (frozen by default, as in the release)."}
    )
    task_stage_trains_llm: bool | None = field(
        default=None, metadata={"help": "Also train the LLM (LoRA or full) in the `task` stage; the LM and assign "
                                        "losses then count and the router trains too, so that they follow the LLM "
                                        "(default: False; True under preset 'release')."}
    )
    preset: str | None = field(
        default=None, metadata={"help": f"A named set of settings, one of {sorted(PRESETS)}: 'release' builds the "
                                        "model with TPOConfig(preset='release') (examples/run_tpo.py) and trains with "
                                        "the paper's stage schedule (task_stage_per_task, no lr multipliers in the "
                                        "joint stage, LoRA in the task stage) unless those are given."}
    )
    task_stage_per_task: bool | None = field(
        default=None, metadata={"help": "Run the `task` stage once per task, each training only that task's head and "
                                        "task token on its samples, as the paper's stage 2 (examples/run_tpo.py; "
                                        "default: False; True under preset 'release')."}
    )
    joint_lr_multipliers: bool | None = field(
        default=None, metadata={"help": "Apply the head, task-token and LoRA learning-rate multipliers in the `joint` "
                                        "stage too (default: True; False under preset 'release', whose stage 3 runs "
                                        "everything at 2e-5)."}
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation computes losses and task metrics, not stacked logits."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every column: the TPO collator needs them all."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.preset not in SCHEDULES:
            raise ValueError(f"Unknown `preset` {self.preset!r}; valid presets are {sorted(PRESETS)} (or None).")
        for name, value in SCHEDULES[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.stage not in STAGES:
            raise ValueError(f"Unknown stage {self.stage!r}; choose one of {list(STAGES)}.")
        if self.tasks is not None:
            unknown = [t for t in self.tasks if t not in TASK_NAMES]
            if unknown:
                raise ValueError(f"Unknown task(s) {unknown}; valid tasks are {list(TASK_NAMES)}.")
        if self.llm_training not in ("lora", "full", "frozen"):
            raise ValueError(f"`llm_training` must be 'lora', 'full' or 'frozen', got {self.llm_training!r}.")

    def loss_weight_overrides(self) -> dict[str, float]:
        """{term: weight} for the weights given on the command line."""
        given = {
            "lm": self.lm_loss_weight, "assign": self.assign_loss_weight, "temporal": self.temporal_loss_weight,
            "region": self.region_loss_weight, "mask": self.mask_loss_weight,
        }
        return {name: float(value) for name, value in given.items() if value is not None}
