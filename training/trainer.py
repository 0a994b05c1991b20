"""TPOTrainer: transformers' Trainer with TPO's stages, per-term loss logging and task evaluation.

Why `Trainer` and not TRL's `SFTTrainer`: README.md, "Training".
"""

import json
import logging
import math
import re
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import Trainer, TrainerState
from transformers.trainer_utils import TrainOutput

from ..modeling_tpo.configuration_tpo import IGNORE_INDEX
from .arguments import TPOTrainingArguments
from .stages import apply_stage, lr_multipliers, parameter_group, stage_loss_weights

logger = logging.getLogger(__name__)


def unwrap_tpo(model):
    """The TPOForConditionalGeneration inside its distributed (DDP, FSDP, DeepSpeed) and peft wrappers."""
    from peft import PeftModel

    inner = extract_model_from_parallel(model)
    if isinstance(inner, PeftModel):
        inner = inner.get_base_model()
    if not hasattr(inner, "task_tokens"):
        raise TypeError(f"{type(model).__name__} does not wrap a TPOForConditionalGeneration.")
    return inner


def checkpoint_state(checkpoint: str | Path) -> dict | None:
    """The trainer state of a complete checkpoint folder, or None when it is incomplete.

    Complete: Trainer writes `trainer_state.json` last, so a folder whose state file is missing or cut short
    (a kill or a full disk while saving) is incomplete; so is one whose weights are missing or whose
    safetensors header does not parse."""
    folder = Path(checkpoint)
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or "global_step" not in state:
        return None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return None
    for path in weights:
        try:
            with path.open("rb") as handle:
                header_size = int.from_bytes(handle.read(8), "little")
                json.loads(handle.read(header_size))
        except (OSError, ValueError):
            return None
    return state


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest complete `checkpoint-<step>` in `folder` (see `checkpoint_state`); newer incomplete ones are
    named in a warning and passed over."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = sorted(((int(m.group(1)), path) for path in folder.iterdir()
                    if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name))), reverse=True)
    for step, path in steps:
        if checkpoint_state(path) is not None:
            return str(path)
        logger.warning("Checkpoint %s is incomplete (interrupted while saving?): resuming from an older one.", path)
    return None


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite."""


class TPOTrainer(Trainer):
    """Trainer for one TPO stage (`args.stage`).

    Args:
        model: a `TPOForConditionalGeneration` (or a peft model wrapping one).
        args: `TPOTrainingArguments`.
        peft_config: a peft `LoraConfig`; applied here when `args.llm_training == "lora"` and the model
            is not already a peft model. `modules_to_save` defaults to the TPO modules.
        task_evaluator: a callable `(model) -> dict[str, float]` computing task metrics (see
            `tpo.training.evaluation.TaskEvaluator`), run by `evaluate()` after the loss evaluation.
        Every other argument is `Trainer`'s.
    """

    def __init__(self, model=None, args: TPOTrainingArguments | None = None, peft_config=None, task_evaluator=None,
                 **kwargs):
        if args is None:
            raise ValueError("TPOTrainer needs TPOTrainingArguments (it decides the stage).")
        if not isinstance(args, TPOTrainingArguments):
            raise TypeError(f"`args` must be TPOTrainingArguments, got {type(args).__name__}.")
        if peft_config is not None and args.llm_training == "lora" and not hasattr(model, "peft_config"):
            from peft import get_peft_model

            tpo = unwrap_tpo(model)
            if getattr(peft_config, "modules_to_save", None) is None:
                peft_config.modules_to_save = tpo.task_module_names()
            if getattr(peft_config, "target_modules", None) is None:
                peft_config.target_modules = tpo.lora_target_regex()
            model = get_peft_model(model, peft_config)
        tpo = unwrap_tpo(model)
        self.tpo_tasks = list(args.tasks or tpo.config.tasks)
        missing = [t for t in self.tpo_tasks if t not in tpo.config.tasks]
        if missing:
            raise ValueError(f"`tasks` {missing} are not enabled in the model (it enables {tpo.config.tasks}).")
        # The stage's loss weights apply inside compute_loss only; the model's config keeps its own.
        self.stage_loss_weights = stage_loss_weights(
            args.stage, tpo.config.loss_weights, args.loss_weight_overrides(), self.tpo_tasks, args
        )
        self.trainable_per_group = apply_stage(model, args.stage, args, tpo.config.mask_head_config,
                                               self.stage_loss_weights)
        self.task_evaluator = task_evaluator
        self._term_sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._term_counts: dict[str, dict[str, int]] = {"train": defaultdict(int), "eval": defaultdict(int)}
        self.skipped_samples = 0
        super().__init__(model=model, args=args, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # Resume
    # ----------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, with two differences when resuming. `resume_from_checkpoint=True` takes the newest
        *complete* checkpoint of `output_dir` (`last_complete_checkpoint`). A checkpoint of a finished run (its
        `global_step` at its `max_steps`) is restored without training: Trainer would take one more optimiser
        step when `max_steps` does not end an epoch."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint in {self.args.output_dir} to resume from; start without "
                                 "`resume_from_checkpoint`.")
        state = checkpoint_state(resume_from_checkpoint) if resume_from_checkpoint else None
        if state is not None and state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"]:
            logger.info("%s ends a finished run (step %d of %d): restoring it without training.",
                        resume_from_checkpoint, state["global_step"], state["max_steps"])
            self._load_from_checkpoint(resume_from_checkpoint)
            self.state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / "trainer_state.json"))
            return TrainOutput(self.state.global_step, float("nan"), {"finished_before": 1.0})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Weighted TPO loss. With `num_items_in_batch` the LM term is normalised over the whole
        accumulated (and, with `average_tokens_across_devices`, distributed) batch, as transformers
        does; the other terms are per-batch means, so they are divided here by the accumulation steps
        and by the factor the Trainer multiplies the loss with across devices."""
        meta = inputs.pop("tpo_meta", None) or {}
        self.skipped_samples += int(meta.get("skipped", 0))
        mode = "train" if model.training else "eval"
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        tpo = unwrap_tpo(model)
        with tpo.loss_weights_as(self.stage_loss_weights):
            outputs = model(**inputs)
        terms = outputs.loss_dict or {}
        self._check_finite(outputs, terms, meta, inputs.get("labels"))
        loss = outputs.loss
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs and outputs.lm_loss is not None:
            weight = self.stage_loss_weights["lm"]
            lm_part = weight * outputs.lm_loss.float()
            scale = self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices:
                scale *= max(self.accelerator.num_processes // self.get_tp_size(), 1)
            loss = lm_part + (loss - lm_part) / scale
        for name, value in terms.items():
            self._term_sums[mode][name] += float(value)
            self._term_counts[mode][name] += 1
        return (loss, outputs) if return_outputs else loss

    def _check_finite(self, outputs, terms: dict, meta: dict, labels: torch.Tensor | None = None) -> None:
        if outputs.loss is None or bool(torch.isfinite(outputs.loss).all()):
            return
        bad = sorted(name for name, value in terms.items() if not bool(torch.isfinite(value).all()))
        if "lm" in bad and labels is not None and not bool((labels != IGNORE_INDEX).any()):
            # 0 / 0: a data problem, not an optimisation one
            advice = ("Every label of this batch is -100, so the LM loss has no token to average over: the answers "
                      "were cut off (max length) or masked by the chat template; check those samples' labels.")
        else:
            advice = "Lower the learning rate or check those samples' targets."
        raise NonFiniteLossError(
            f"Non-finite loss at step {self.state.global_step}: term(s) {bad or ['loss']} "
            f"({', '.join(f'{n}={float(terms[n])}' for n in bad)}) on samples {meta.get('sample_ids', '?')}. {advice}"
        )

    # ----------------------------------------------------------------------------------------------
    # Logging
    # ----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        averaged = self._averaged_terms(mode)
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}loss/{name}": value for name, value in averaged.items()})
        if mode == "train":
            logs["data/skipped_samples"] = float(self._sum_across_processes(self.skipped_samples))
        super().log(logs, start_time)

    def _averaged_terms(self, mode: str) -> dict[str, float]:
        """Mean of each loss term since the last log, over the steps that had it, across processes."""
        local = {name: (self._term_sums[mode][name], self._term_counts[mode][name]) for name in self._term_sums[mode]}
        self._term_sums[mode].clear()
        self._term_counts[mode].clear()
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            merged: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
            for part in gather_object([local]):
                for name, (total, count) in part.items():
                    merged[name][0] += total
                    merged[name][1] += count
            local = {name: (v[0], v[1]) for name, v in merged.items()}
        return {name: total / count for name, (total, count) in sorted(local.items()) if count}

    def _sum_across_processes(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device, dtype=torch.long)
        return int(self.accelerator.reduce(tensor, reduction="sum").item())

    # ----------------------------------------------------------------------------------------------
    # Optimiser: one group per (parameter group, decay), learning rate x the group's multiplier
    # ----------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        multipliers = lr_multipliers(self.args)
        buckets: dict[tuple[str, bool], list] = defaultdict(list)
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                buckets[(parameter_group(name), name in decay)].append(parameter)
        groups = []
        for (group, decays), params in sorted(buckets.items()):
            multiplier = multipliers.get(group, self.args.other_lr_multiplier)
            groups.append({"params": params, "weight_decay": self.args.weight_decay if decays else 0.0,
                           "lr": self.args.learning_rate * multiplier, "tpo_group": group})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # ----------------------------------------------------------------------------------------------
    # Evaluation
    # ----------------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = {}
        if eval_dataset is not None or self.eval_dataset is not None:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.task_evaluator is not None:
            task_metrics = self.task_evaluator(unwrap_tpo(self.model))
            prefixed = {f"{metric_key_prefix}_{k}": v for k, v in task_metrics.items()
                        if isinstance(v, (int, float)) and math.isfinite(v)}
            metrics.update(prefixed)
            self.log(prefixed)
        return metrics
