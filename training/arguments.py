"""Training arguments of TPO: the Trainer's own plus the stage, tasks, loss weights, learning-rate
multipliers and freezing policy."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

STAGES = ("assign", "task", "joint")
TASKS = ("temporal", "region", "mask")
# Published learning rates (REFERENCE.md section 3): stage 1 LoRA 2e-5; stage 2 heads 1e-4 and task
# tokens 1e-4..2e-4; stage 3 2e-5. With learning_rate 2e-5 the multipliers below give them.
DEFAULT_HEAD_LR_MULTIPLIER = 5.0
DEFAULT_TASK_TOKEN_LR_MULTIPLIER = 5.0


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
    task_stage_trains_llm: bool = field(
        default=False, metadata={"help": "Also train the LLM (LoRA or full) in the `task` stage; the LM and assign "
                                         "losses then count and the router trains too, so that they follow the LLM."}
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation computes losses and task metrics, not stacked logits."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every column: the TPO collator needs them all."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"Unknown stage {self.stage!r}; choose one of {list(STAGES)}.")
        if self.tasks is not None:
            unknown = [t for t in self.tasks if t not in TASKS]
            if unknown:
                raise ValueError(f"Unknown task(s) {unknown}; valid tasks are {list(TASKS)}.")
        if self.llm_training not in ("lora", "full", "frozen"):
            raise ValueError(f"`llm_training` must be 'lora', 'full' or 'frozen', got {self.llm_training!r}.")

    def loss_weight_overrides(self) -> dict[str, float]:
        """{term: weight} for the weights given on the command line."""
        given = {
            "lm": self.lm_loss_weight, "assign": self.assign_loss_weight, "temporal": self.temporal_loss_weight,
            "region": self.region_loss_weight, "mask": self.mask_loss_weight,
        }
        return {name: float(value) for name, value in given.items() if value is not None}
