"""Does TPO do what the paper says? The paper's three claims, tested in miniature on the synthetic benchmark.

Arms, trained from the same backbone configuration on the same data with the same schedule (the embedded
default run's stages, learning rates, heads and region warm-up), over several seeds, and scored by the same
evaluation:

    tpo                  task tokens + heads, the three stages (assign -> task -> joint)
    tpo_released         the same with the released heads: the MLP region head, the DETR temporal decoder
    text_coords          temporal and region samples answered in text coordinates ("[x0, y0, x1, y1]" pixels,
                         "from 2.5 to 6.0 seconds"), LM loss only, no heads; scored by generating and parsing
                         (an unparseable answer is a miss). Masks have no text format: no mask samples.
    single_task/<task>   one task (temporal, region or mask) and the conversations, as many epochs as tpo
                         (so the same samples of that task, in fewer steps)
    conversation_only    the conversations alone
    conversation_matched the conversations alone, as many conversation samples as tpo sees (fewer steps)
    text_prior           the conversations alone with blank media: what the question text alone allows

Every arm but single_task/<task> takes exactly the optimiser steps that tpo takes in each stage and warm-up run
(its stage data cycles as needed; an arm without region samples warms up on its task-stage data). The claims
and the arms that test them: (a) heads beat text coordinates (tpo, tpo_released vs text_coords); (b) joint
training beats training each task alone (tpo vs single_task/*); (c) dense task supervision does not hurt
general understanding (tpo vs conversation_only on multiple-choice accuracy and open-ended exact match, beside
chance, the majority letter and text_prior).

    # the full study (3 seeds, half of the training data): outputs/study/full/
    python examples/study_tpo.py
    # one seed, a quarter of the training data: outputs/study/quick/
    python examples/study_tpo.py --quick
    # study_default.yaml runs two processes (--workers 2) sharing the cores: each takes the next run that no
    # other holds, all write one results folder; --workers 1 runs everything in this process
    # some arms, other seeds, any run setting (YAML first, then flags, as run_tpo.py)
    python examples/study_tpo.py --arms tpo text_coords --seeds 0 1 --task_epochs 2

Writes `study_results.json` (every arm and seed; per arm mean and standard deviation of each metric of
eval_results.json under `arms.<arm>.mean.<metric>` / `.std.<metric>`, optimiser steps and wall time),
`study_report.md` (the claims beside the paper's numbers, every metric, multiple choice per category) and
`study_chart.png`, after every finished run; a rerun skips the runs already in `study_results.json`.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from transformers import HfArgumentParser, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_tpo.py, beside this script

import run_tpo  # noqa: E402
from run_tpo import ModelArguments, ScriptArguments  # noqa: E402

from tpo.processing.data_collator import TPODataCollator  # noqa: E402
from tpo.processing.pipeline import encode_dataset, load_media  # noqa: E402
from tpo.processing.synthetic import load_controls, load_split  # noqa: E402
from tpo.training.arguments import STAGES, TPOTrainingArguments  # noqa: E402
from tpo.training.evaluation import TaskEvaluator  # noqa: E402
from tpo.training.trainer import TPOTrainer, unwrap_tpo  # noqa: E402

logger = logging.getLogger("study_tpo")
STUDY_CONFIG = Path(__file__).parent / "configs" / "study_default.yaml"
RESULTS_FILE, REPORT_FILE, CHART_FILE = "study_results.json", "study_report.md", "study_chart.png"
GROUNDING_PARTS = {"temporal": ("temporal",), "region": ("region",), "mask": ("mask_image", "mask_video")}


# ------------------------------------------------------------------------------------------------------
# Arms
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArmSpec:
    """What one arm trains on and how.

    Attributes:
        tasks: grounding tasks whose samples the arm trains on (and is evaluated on).
        text_coordinate_tasks: those of `tasks` answered in text coordinates (no head); the others get heads.
        model_overrides: ModelArguments fields changed for this arm (e.g. the released heads).
        blank_media: every image and frame replaced by a uniform grey one (train and test).
        matched_steps: take tpo's optimiser steps in every stage; False: tpo's epochs over the arm's own data.
        conversation_exposure: (conversations alone) take, in every run, the share of tpo's steps that tpo
            spends on conversations: as many conversation samples as tpo sees, not as many steps.
    """

    tasks: tuple[str, ...] = ()
    text_coordinate_tasks: tuple[str, ...] = ()
    model_overrides: tuple[tuple[str, str], ...] = ()
    blank_media: bool = False
    matched_steps: bool = True
    conversation_exposure: bool = False

    @property
    def head_tasks(self) -> list[str]:
        return [task for task in self.tasks if task not in self.text_coordinate_tasks]


RELEASED_HEADS = (("region_head_config", '{"mode": "mlp"}'), ("temporal_head_config", '{"decoder": "detr"}'))
ARMS = {
    "tpo": ArmSpec(tasks=("temporal", "region", "mask")),
    "tpo_released": ArmSpec(tasks=("temporal", "region", "mask"), model_overrides=RELEASED_HEADS),
    "text_coords": ArmSpec(tasks=("temporal", "region"), text_coordinate_tasks=("temporal", "region")),
    **{f"single_task/{task}": ArmSpec(tasks=(task,), matched_steps=False) for task in ("temporal", "region", "mask")},
    "conversation_only": ArmSpec(),
    "conversation_matched": ArmSpec(conversation_exposure=True),
    "text_prior": ArmSpec(blank_media=True),
}


def arm_model_arguments(base: ModelArguments, arm: ArmSpec) -> ModelArguments:
    """The base model arguments with the arm's tasks and head settings (JSON head configs are merged key by key)."""
    changes = {"enabled_tasks": arm.head_tasks, "text_coordinate_tasks": list(arm.text_coordinate_tasks)}
    for name, value in arm.model_overrides:
        if name.endswith("_head_config"):
            merged = {**json.loads(getattr(base, name) or "{}"), **json.loads(value)}
            if name == "region_head_config" and merged.get("mode") == "mlp":  # heatmap settings do not apply
                merged = {k: v for k, v in merged.items() if not k.startswith("heatmap")}
            value = json.dumps(merged)
        changes[name] = value
    return dataclasses.replace(base, **changes)


def blank_media(plan: dict, targets: dict | None = None) -> dict:
    """`load_media`'s output with every image and frame a uniform grey (nothing decoded): what a model trained and
    tested on it learns is the prior of the text alone. For conversations (mask samples need their frames)."""
    if (targets or {}).get("mask_frames"):
        raise ValueError(f"Blank media serve text-only priors; the mask sample of {plan.get('path')!r} needs its frames.")
    if plan.get("kind") == "image":
        return {"image": np.full((plan["height"], plan["width"], 3), 128, np.uint8)}
    if plan.get("kind") == "video":
        return {"frames": np.full((len(plan["timestamps"]), plan["height"], plan["width"], 3), 128, np.uint8),
                "timestamps": list(plan["timestamps"])}
    return {}


# ------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------
@dataclass
class StudyArguments:
    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={
        "help": f"Arms to run, of {list(ARMS)}."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds of every arm."})
    quick: bool = field(default=False, metadata={
        "help": "One seed (the first of --seeds), --quick_train_fraction of the training data and "
                "--quick_test_per_task test samples per task; results in <output_dir>/quick."})
    train_fraction: float = field(default=1.0, metadata={
        "help": "Fraction of every training part used (the same samples for every arm and seed)."})
    test_per_task: int = field(default=300, metadata={
        "help": "Test samples per grounding part (temporal, region, mask images, mask videos) and per query-swap "
                "control, the same for every arm and seed; every test conversation is evaluated."})
    quick_train_fraction: float = field(default=0.25, metadata={"help": "--train_fraction of --quick."})
    quick_test_per_task: int = field(default=100, metadata={"help": "--test_per_task of --quick."})
    workers: int = field(default=1, metadata={
        "help": "Study processes sharing the machine's threads: this one and workers - 1 more started with the same "
                "arguments; each takes the next run that no other process holds, and all merge their results into "
                "one folder (logs of the others: <folder>/worker-<i>.log)."})


def parse_study_arguments(argv: list[str]):
    """(study, script, model, training) arguments: the embedded default run (`synthetic_default.yaml`: backbone,
    heads, stages, learning rates), then the study's YAML (a YAML file given first, else `study_default.yaml`),
    then the flags."""
    parser = HfArgumentParser((StudyArguments, ScriptArguments, ModelArguments, TPOTrainingArguments))
    study_config = STUDY_CONFIG
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        study_config, argv = Path(argv[0]), argv[1:]
    known = {action.dest for action in parser._actions}
    defaults = {}
    for path in (run_tpo.DEFAULT_CONFIG, study_config):
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}.")
        defaults.update(values)
    parser.set_defaults(**defaults)
    study, script, model, training = parser.parse_args_into_dataclasses(argv)
    unknown_arms = [arm for arm in study.arms if arm not in ARMS]
    if study.workers < 1:
        raise ValueError(f"--workers {study.workers}: give 1 (this process alone) or more.")
    if unknown_arms or not study.arms or not study.seeds:
        raise ValueError(f"--arms {study.arms} --seeds {study.seeds}: choose arms from {list(ARMS)} and at least one "
                         "seed.")
    if script.data_config or model.model_name_or_path:
        raise ValueError("The study runs on the synthetic benchmark with the tiny backbone; drop --data_config and "
                         "--model_name_or_path (run_tpo.py trains real backbones on real data).")
    run_tpo.check_stages(script.stages)
    if study.quick:
        study.seeds, study.train_fraction, study.test_per_task = (study.seeds[:1], study.quick_train_fraction,
                                                                  study.quick_test_per_task)
    return study, script, model, training


def settings_fingerprint(study: StudyArguments, script, model, training) -> str:
    """A hash of everything that changes a run's numbers but the arm and the seed (which runs are comparable)."""
    skipped_training = {"output_dir", "logging_dir", "run_name", "seed", "data_seed", "disable_tqdm", "report_to",
                        "dataloader_num_workers", "logging_steps"}
    settings = {
        "study": {k: v for k, v in dataclasses.asdict(study).items() if k not in ("arms", "seeds", "workers")},
        "script": {k: v for k, v in dataclasses.asdict(script).items() if k not in ("overwrite_output_dir", "num_proc")},
        "model": dataclasses.asdict(model),
        "training": {k: v for k, v in json.loads(training.to_json_string()).items() if k not in skipped_training},
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------
# Data and schedule
# ------------------------------------------------------------------------------------------------------
def _subset(dataset, count: int):
    """The first `count` rows after a fixed shuffle: the same rows for every arm and seed."""
    count = min(count, len(dataset))
    return dataset.shuffle(seed=0).select(range(count)) if count < len(dataset) else dataset


def load_study_data(script, study: StudyArguments) -> dict:
    """{"train": {part: dataset}, "test": {part: dataset}, "controls": {name: dataset}} of the synthetic
    benchmark, training parts cut to `train_fraction`, test grounding parts and controls to `test_per_task`."""
    manifest = run_tpo.synthetic_manifest(script)
    train = {part: _subset(rows, math.ceil(study.train_fraction * len(rows)))
             for part, rows in load_split(manifest, "train").items()}
    test = {part: rows if part == "conversation" else _subset(rows, study.test_per_task)
            for part, rows in load_split(manifest, "test").items()}
    controls = {name: _subset(rows, study.test_per_task) for name, rows in load_controls(manifest, "test").items()}
    return {"train": train, "test": test, "controls": controls}


def grounding_parts(arm: ArmSpec) -> list[str]:
    return [part for task in arm.tasks for part in GROUNDING_PARTS[task]]


def stage_sizes(grounding: int, conversations: int, task_stage_conversations: float) -> dict[str, int]:
    """Training samples of each stage: assign and joint every sample; task the grounding samples plus that
    fraction of conversations (`run_tpo.task_stage_samples`), or the conversations when there is no grounding."""
    task = grounding + min(conversations, int(round(task_stage_conversations * grounding))) if grounding else conversations
    return {"assign": grounding + conversations, "task": task, "joint": grounding + conversations}


def epoch_steps(samples: int, epochs: float, training) -> int:
    """Optimiser steps of `epochs` over `samples`, as Trainer counts them (one process)."""
    per_epoch = max(1, math.ceil(samples / training.per_device_train_batch_size) // training.gradient_accumulation_steps)
    return max(1, math.ceil(epochs * per_epoch))


def training_runs(arm: ArmSpec, script) -> list[tuple[str, str, str | None]]:
    """(run name, stage, warm-up task or None) of every training run in order, as `run_tpo.training_runs`: the
    stages, with one warm-up run per `script.task_warmup_tasks` entry right before the task stage (the default's
    half epoch of region samples). Matched arms run every warm-up (on that task's samples, in text coordinates or
    with a head, or on their task-stage data when they have none of it, so that their steps stay tpo's); a
    single_task arm runs only the warm-ups of its own task."""
    warmups = [task for task in script.task_warmup_tasks if arm.matched_steps or task in arm.tasks]
    runs = []
    for stage in script.stages:
        if stage == "task":
            runs += [(f"task-warmup-{task}", "task", task) for task in warmups]
        runs.append((stage, stage, None))
    return runs


def warmup_size(task: str, arm: ArmSpec, data: dict, script) -> int:
    """Training samples of the warm-up run of `task`: its samples plus `task_stage_conversations` times as many
    conversations (as `run_tpo.task_stage_samples`)."""
    grounding = sum(len(data["train"][part]) for part in GROUNDING_PARTS[task]) if task in arm.tasks else 0
    return stage_sizes(grounding, len(data["train"]["conversation"]), script.task_stage_conversations)["task"]


def arm_steps(arm: ArmSpec, data: dict, script, training) -> dict[str, int]:
    """Optimiser steps per training run (`training_runs`): tpo's (its data, the stages' epochs) for matched arms,
    else the stages' epochs over the arm's own data."""
    reference = ARMS["tpo"] if arm.matched_steps else arm
    grounding = sum(len(data["train"][part]) for part in grounding_parts(reference))
    sizes = stage_sizes(grounding, len(data["train"]["conversation"]), script.task_stage_conversations)
    steps = {}
    for name, stage, warmup in training_runs(arm, script):
        size = warmup_size(warmup, reference, data, script) if warmup else sizes[stage]
        steps[name] = epoch_steps(size, script.task_warmup_epochs if warmup else getattr(script, f"{stage}_epochs"),
                                  training)
        if arm.conversation_exposure:  # the conversations in tpo's data of this run, as a share of it
            run_grounding = sum(len(data["train"][part]) for part in GROUNDING_PARTS[warmup]) if warmup else grounding
            steps[name] = max(1, round(steps[name] * (size - run_grounding) / size))
    return steps


def stage_datasets(arm: ArmSpec, data: dict, processor, script, seed: int) -> dict:
    """Encoded training data of each training run (see `stage_sizes`, `training_runs`)."""
    from datasets import concatenate_datasets

    conversations = encode_dataset(data["train"]["conversation"], processor, num_proc=script.num_proc)

    def with_conversations(grounding):
        count = min(len(conversations), int(round(script.task_stage_conversations * len(grounding))))
        return concatenate_datasets([grounding, conversations.shuffle(seed=seed).select(range(count))]) if count else grounding

    encoded = {task: concatenate_datasets([encode_dataset(data["train"][part], processor, num_proc=script.num_proc)
                                           for part in GROUNDING_PARTS[task]]) for task in arm.tasks}
    if not encoded:
        datasets = {stage: conversations for stage in STAGES}
    else:
        grounding = concatenate_datasets(list(encoded.values()))
        everything = concatenate_datasets([grounding, conversations])
        datasets = {"assign": everything, "task": with_conversations(grounding), "joint": everything}
    for name, _, warmup in training_runs(arm, script):
        if warmup:  # the task's samples, or the task stage's data for an arm without them
            datasets[name] = with_conversations(encoded[warmup]) if warmup in encoded else datasets["task"]
    return datasets


def evaluation_samples(arm: ArmSpec, data: dict) -> tuple:
    """(test rows, controls) the arm is scored on: its grounding tasks and every conversation."""
    from datasets import concatenate_datasets

    rows = concatenate_datasets([data["test"][part] for part in (*grounding_parts(arm), "conversation")])
    controls = {name: dataset for name, dataset in data["controls"].items() if name.split("_")[0] in arm.tasks}
    return rows, controls


# ------------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------------
def run_arm(name: str, seed: int, data: dict, script, base_model: ModelArguments, base_training, run_dir: Path) -> dict:
    """Train arm `name` with `seed` and evaluate it; returns {"metrics", "steps", "train_seconds",
    "eval_seconds", "wall_seconds"}."""
    arm = ARMS[name]
    started = time.perf_counter()
    set_seed(seed)
    model_args = arm_model_arguments(base_model, arm)
    # The same tokenizer for every arm: trained on every training part.
    model, processor = run_tpo.build_model(model_args, list(data["train"].values()))
    steps = arm_steps(arm, data, script, base_training)
    stages = stage_datasets(arm, data, processor, script, seed)
    media_loader = blank_media if arm.blank_media else load_media
    collator = TPODataCollator(processor, media_loader=media_loader)
    peft_config = run_tpo.lora_config(model_args, model) if base_training.llm_training == "lora" else None
    trained = model
    for run_name, stage, warmup in training_runs(arm, script):
        overrides = {"stage": stage, "output_dir": str(run_dir / f"stage-{run_name}"), "max_steps": steps[run_name],
                     "seed": seed, "data_seed": seed, "save_strategy": "no", "eval_strategy": "no"}
        if warmup in arm.head_tasks:  # a warm-up trains that head alone, as run_tpo's
            overrides["tasks"] = [warmup]
        if getattr(script, f"{stage}_learning_rate") is not None:
            overrides["learning_rate"] = getattr(script, f"{stage}_learning_rate")
        stage_args = dataclasses.replace(base_training, **overrides)
        logger.info("%s seed %d, %s: %d steps over %d samples", name, seed, run_name, steps[run_name],
                    len(stages[run_name]))
        trainer = TPOTrainer(model=trained, args=stage_args, peft_config=peft_config, train_dataset=stages[run_name],
                             data_collator=collator, processing_class=processor)
        trainer.train()
        trained, peft_config = trainer.model, None
    final = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") else trained
    trained_at = time.perf_counter()
    rows, controls = evaluation_samples(arm, data)
    evaluator = TaskEvaluator(processor, rows, batch_size=base_training.per_device_eval_batch_size,
                              mask_video_mode=script.mask_video_mode, controls=controls, media_loader=media_loader,
                              output_dir=str(run_dir / "predictions"))
    metrics = evaluator(unwrap_tpo(final))
    done = time.perf_counter()
    return {"metrics": metrics, "steps": steps, "total_steps": sum(steps.values()),
            "train_seconds": trained_at - started, "eval_seconds": done - trained_at, "wall_seconds": done - started}


# ------------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------------
def load_results(path: Path, fingerprint: str) -> dict:
    """The results file, or an empty one; refuses one written with other settings (its runs are not comparable)."""
    if not path.exists():
        return {"settings_fingerprint": fingerprint, "arms": {}}
    results = json.loads(path.read_text(encoding="utf-8"))
    if results.get("settings_fingerprint") != fingerprint:
        raise ValueError(f"{path} holds runs with other settings (fingerprint {results.get('settings_fingerprint')}, "
                         f"now {fingerprint}); choose another --output_dir or move that file away.")
    order = [name for name in ARMS if name in results["arms"]] + sorted(set(results["arms"]) - set(ARMS))
    results["arms"] = {name: results["arms"][name] for name in order}
    return results


def summarise_arm(runs: dict) -> dict:
    """Mean and (population) standard deviation over seeds of every numeric metric, steps and wall time."""
    metrics = sorted({k for run in runs.values() for k, v in run["metrics"].items() if isinstance(v, (int, float))})
    values = {k: [run["metrics"][k] for run in runs.values() if k in run["metrics"]] for k in metrics}
    seconds = [run["wall_seconds"] for run in runs.values()]
    return {"seeds": sorted(int(s) for s in runs), "mean": {k: float(np.mean(v)) for k, v in values.items()},
            "std": {k: float(np.std(v)) for k, v in values.items()},
            "steps": next(iter(runs.values()))["total_steps"], "steps_per_stage": next(iter(runs.values()))["steps"],
            "wall_seconds_mean": float(np.mean(seconds)), "wall_seconds_total": float(np.sum(seconds))}


def record_run(results: dict, arm: str, seed: int, run: dict) -> None:
    entry = results["arms"].setdefault(arm, {"runs": {}})
    entry["runs"][str(seed)] = run
    entry.update(summarise_arm(entry["runs"]))


def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (a temporary file renamed), so an interrupted study keeps its last results."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    partial.replace(path)


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------
# (claim, metric, TPO arm, comparison arm, the paper's figure for TPO and for the comparison; REFERENCE.md §4)
CLAIMS = [
    ("(a) heads beat text coordinates", "temporal/r1@0.5", "tpo", "text_coords",
     "moment retrieval R@0.5: heads 40.2, text 18.6"),
    ("(a) heads beat text coordinates", "temporal/r1@0.5", "tpo_released", "text_coords", "as above"),
    ("(a) heads beat text coordinates", "region/acc@0.5", "tpo", "text_coords", "not in the paper's ablation"),
    ("(a) heads beat text coordinates", "region/acc@0.5", "tpo_released", "text_coords", "as above"),
    ("(b) joint beats single-task", "temporal/r1@0.5", "tpo", "single_task/temporal",
     "R@0.5: T+R+M 36.7 (40.2 with conversations), T only 30.2"),
    ("(b) joint beats single-task", "region/acc@0.5", "tpo", "single_task/region", "not reported"),
    ("(b) joint beats single-task", "mask/j&f", "tpo", "single_task/mask", "not reported"),
    ("(c) task data keeps/helps conversation", "mcqa/accuracy", "tpo", "conversation_only",
     "MVBench: TPO 66.8, conversation-only baseline (VideoChat2) 60.4"),
    ("(c) task data keeps/helps conversation", "mcqa/ranked_accuracy", "tpo", "conversation_only",
     "as above (the paper generates the letter)"),
    ("(c) task data keeps/helps conversation", "text/exact_match", "tpo", "conversation_only", "not reported"),
    ("(c) task data keeps/helps conversation", "mcqa/ranked_accuracy", "tpo", "conversation_matched",
     "(the same conversation samples as tpo)"),
    ("(c) task data keeps/helps conversation", "text/exact_match", "tpo", "conversation_matched",
     "(the same conversation samples as tpo)"),
]
# Metrics of the full table, each with the floor printed beside it (eval_results.json names).
TABLE_METRICS = [
    ("temporal/r1@0.5", "floor/temporal_query_blind_r1@0.5"), ("temporal/miou", None), ("temporal/mAP", None),
    ("control/temporal_query_swap_r1@0.5", "floor/temporal_query_blind_r1@0.5"),
    ("region/acc@0.5", "floor/region_query_blind_acc@0.5"),
    ("control/region_query_swap_acc@0.5", "floor/region_query_blind_acc@0.5"),
    ("mask/miou", "floor/mask_query_blind_miou"), ("mask/j&f", "floor/mask_query_blind_j&f"),
    ("mcqa/accuracy", "floor/mcqa_majority_letter"), ("mcqa/ranked_accuracy", "floor/mcqa_chance"),
    ("text/exact_match", None),
    ("router/end_to_end_accuracy", None), ("temporal/unparseable_answers", None), ("region/unparseable_answers", None),
]
CHART_METRICS = ["temporal/r1@0.5", "region/acc@0.5", "mask/j&f", "mcqa/accuracy", "mcqa/ranked_accuracy",
                 "text/exact_match"]


def _cell(arm: dict | None, metric: str) -> str:
    if not arm or metric not in arm.get("mean", {}):
        return "-"
    mean, std = arm["mean"][metric], arm["std"][metric]
    return f"{mean:.3f} ± {std:.3f}" if len(arm["seeds"]) > 1 else f"{mean:.3f}"


def _verdict(tpo: dict | None, other: dict | None, metric: str) -> str:
    """The difference and whether it exceeds the seeds' spread (one seed: no spread to judge by); when both arms
    are at or below the metric's floor neither used what the floor leaves out, so the difference is no evidence."""
    if not tpo or not other or metric not in tpo["mean"] or metric not in other["mean"]:
        return "not run"
    difference = tpo["mean"][metric] - other["mean"][metric]
    floor_key = dict(TABLE_METRICS).get(metric)
    floor = tpo["mean"].get(floor_key) if floor_key else None
    if floor is not None and max(tpo["mean"][metric], other["mean"][metric]) <= floor:
        return f"{difference:+.3f}: both at or below the floor, no evidence"
    if min(len(tpo["seeds"]), len(other["seeds"])) < 2:
        return f"{difference:+.3f} (one seed: no spread)"
    spread = math.hypot(tpo["std"][metric], other["std"][metric])
    word = "holds" if difference > spread else ("reversed" if difference < -spread else "within the seed spread")
    return f"{difference:+.3f} (spread {spread:.3f}): {word}"


def _floor(arms: dict, metric: str) -> str:
    floor = dict(TABLE_METRICS).get(metric)
    values = [arm["mean"][floor] for arm in arms.values() if floor and floor in arm.get("mean", {})]
    return f"{values[0]:.3f}" if values else "-"


def write_report(results: dict, path: Path, title: str = "TPO study") -> None:
    """`study_report.md` from a results dict (see `summarise_arm`)."""
    arms = results["arms"]
    names = [name for name in ARMS if name in arms] + sorted(set(arms) - set(ARMS))
    lines = [f"# {title}", "", results.get("description", ""), "",
             "## The paper's claims (REFERENCE.md §4) and ours", "",
             "| claim | metric | TPO arm | ours | comparison arm | ours | TPO - comparison | floor | paper |",
             "|---|---|---|---|---|---|---|---|---|"]
    for claim, metric, tpo, other, paper in CLAIMS:
        lines.append(f"| {claim} | `{metric}` | {tpo} | {_cell(arms.get(tpo), metric)} | {other} | "
                     f"{_cell(arms.get(other), metric)} | {_verdict(arms.get(tpo), arms.get(other), metric)} | "
                     f"{_floor(arms, metric)} | {paper} |")
    mcq = {name: arms[name]["mean"] for name in names if "mcqa/accuracy" in arms[name].get("mean", {})}
    if mcq:
        chance = next(iter(mcq.values())).get("floor/mcqa_chance")
        majority = next(iter(mcq.values())).get("floor/mcqa_majority_letter")
        prior = _cell(arms.get("text_prior"), "mcqa/accuracy")
        ranked_prior = _cell(arms.get("text_prior"), "mcqa/ranked_accuracy")
        lines += ["", f"Multiple-choice floors: chance {chance:.3f}, always the majority letter {majority:.3f}, "
                      f"text-only prior (text_prior: trained on blank media) {prior} (generated letter), "
                      f"{ranked_prior} (ranked options)."]
    lines += ["", "## Every arm", "", "Mean ± standard deviation over seeds (population); floor: the question-blind "
              "oracle of the grounding metrics; for multiple choice the majority letter (generated letter) and "
              "chance (ranked options).", "",
              "| metric | floor | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for metric, _ in TABLE_METRICS:
        if any(metric in arms[name].get("mean", {}) for name in names):
            lines.append(f"| `{metric}` | {_floor(arms, metric)} | " + " | ".join(_cell(arms[n], metric) for n in names) + " |")
    categories = sorted({k.split("mcqa/accuracy_", 1)[1] for name in names for k in arms[name].get("mean", {})
                         if k.startswith("mcqa/accuracy_")})
    if categories:
        lines += ["", "## Conversations by category and subject", "",
                  "`held_out`: the subject is a colour-shape pair no training conversation shows; `seen`: the others.", "",
                  "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for category in categories:
            for prefix in ("mcqa/accuracy_", "mcqa/ranked_accuracy_", "text/exact_match_"):
                metric = prefix + category
                if any(metric in arms[n].get("mean", {}) for n in names):
                    lines.append(f"| `{metric}` | " + " | ".join(_cell(arms[n], metric) for n in names) + " |")
    claim_metrics = list(dict.fromkeys(metric for _, metric, _, _, _ in CLAIMS))
    lines += ["", "## Per seed", "", "The claims' metrics of every run: a mean over seeds can hide that one seed never "
              "learnt to use the question (its grounding metrics below their floors).", "",
              "| arm | seed | " + " | ".join(f"`{m}`" for m in claim_metrics) + " |",
              "|---|---|" + "---|" * len(claim_metrics)]
    for name in names:
        for seed, run in sorted(arms[name].get("runs", {}).items(), key=lambda item: int(item[0])):
            values = [f"{run['metrics'][m]:.3f}" if m in run["metrics"] else "-" for m in claim_metrics]
            lines.append(f"| {name} | {seed} | " + " | ".join(values) + " |")
    lines += ["", "## Steps and time", "", "| arm | seeds | optimiser steps (per stage) | wall time per run (s) |",
              "|---|---|---|---|"]
    for name in names:
        arm = arms[name]
        per_stage = ", ".join(f"{stage} {count}" for stage, count in arm["steps_per_stage"].items())
        lines.append(f"| {name} | {', '.join(map(str, arm['seeds']))} | {arm['steps']} ({per_stage}) | "
                     f"{arm['wall_seconds_mean']:.0f} |")
    lines += ["", f"![chart]({CHART_FILE})", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def draw_chart(results: dict, path: Path) -> None:
    """A grouped bar chart (PIL): per metric of `CHART_METRICS`, one bar per arm at its mean, error bars of one
    standard deviation, the floor as a dashed line."""
    from PIL import Image, ImageDraw, ImageFont

    arms = results["arms"]
    names = [name for name in ARMS if name in arms] + sorted(set(arms) - set(ARMS))
    metrics = [m for m in CHART_METRICS if any(m in arms[n].get("mean", {}) for n in names)]
    palette = [(31, 119, 180), (174, 199, 232), (255, 127, 14), (44, 160, 44), (152, 223, 138), (214, 39, 40),
               (148, 103, 189), (140, 86, 75), (127, 127, 127), (188, 189, 34)]
    group, bar, left, top, height = 40 + 22 * len(names), 20, 60, 30, 300
    width = left + group * max(len(metrics), 1) + 20
    image = Image.new("RGB", (width, top + height + 60 + 16 * ((len(names) + 2) // 3)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    y_of = lambda value: top + height - value * height  # noqa: E731 (values are fractions in [0, 1])
    for tick in np.linspace(0, 1, 6):
        draw.line([(left - 4, y_of(tick)), (width - 10, y_of(tick))], fill=(225, 225, 225))
        draw.text((8, y_of(tick) - 6), f"{tick:.1f}", fill="black", font=font)
    for g, metric in enumerate(metrics):
        x0 = left + g * group + 20
        for i, name in enumerate(names):
            mean, std = arms[name].get("mean", {}).get(metric), arms[name].get("std", {}).get(metric, 0.0)
            if mean is None:
                continue
            x = x0 + i * 22
            draw.rectangle([x, y_of(mean), x + bar, y_of(0)], fill=palette[i % len(palette)])
            centre = x + bar / 2
            draw.line([(centre, y_of(min(1, mean + std))), (centre, y_of(max(0, mean - std)))], fill="black", width=1)
            for end in (min(1, mean + std), max(0, mean - std)):
                draw.line([(centre - 4, y_of(end)), (centre + 4, y_of(end))], fill="black")
        floor_key = dict(TABLE_METRICS).get(metric)
        floors = [arms[n]["mean"][floor_key] for n in names if floor_key and floor_key in arms[n].get("mean", {})]
        if floors:
            for x in range(int(x0 - 6), int(x0 + 22 * len(names)), 8):
                draw.line([(x, y_of(floors[0])), (x + 4, y_of(floors[0]))], fill=(200, 0, 0), width=2)
        draw.text((x0, top + height + 6), metric, fill="black", font=font)
    for i, name in enumerate(names):
        x, y = left + (i % 3) * 220, top + height + 30 + 16 * (i // 3)
        draw.rectangle([x, y, x + 10, y + 10], fill=palette[i % len(palette)])
        draw.text((x + 14, y - 1), name, fill="black", font=font)
    draw.text((left, 8), "mean over seeds, error bars: one standard deviation, red dashes: floor", fill="black", font=font)
    image.save(path)


def write_outputs(results: dict, folder: Path) -> None:
    write_json(folder / RESULTS_FILE, results)
    write_report(results, folder / REPORT_FILE)
    draw_chart(results, folder / CHART_FILE)


# ------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------
@contextmanager
def results_lock(folder: Path, wait_seconds: float = 600.0):
    """Hold `<folder>/.results/.tpo_run.lock` while the results file is read, merged and rewritten, so that
    several study processes can share one folder (e.g. one per seed); waits while another live process holds it."""
    deadline = time.monotonic() + wait_seconds
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(run_tpo.output_dir_lock(folder / ".results", take_over=False))
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield


def recorded(folder: Path, fingerprint: str) -> dict:
    with results_lock(folder):
        return load_results(folder / RESULTS_FILE, fingerprint)


def start_workers(study: StudyArguments, argv: list[str], folder: Path) -> list[tuple[subprocess.Popen, Path]]:
    """`study.workers - 1` more study processes with the same arguments, the threads split evenly between all."""
    import torch

    threads = max(1, torch.get_num_threads() // study.workers)
    torch.set_num_threads(threads)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    workers = []
    for index in range(1, study.workers):
        log = folder / f"worker-{index}.log"
        with log.open("w", encoding="utf-8") as handle:
            process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--workers", "1"],
                                       stdout=handle, stderr=subprocess.STDOUT, env=environment)
        workers.append((process, log))
    logger.info("Started %d more study processes (%d threads each): %s", len(workers), threads,
                [str(log) for _, log in workers])
    return workers


def wait_for_workers(workers: list[tuple[subprocess.Popen, Path]]) -> None:
    failed = [str(log) for process, log in workers if process.wait() != 0]
    if failed:
        raise RuntimeError(f"Study processes failed; see {failed}. Rerun the same command: finished runs are kept.")


def run_all(study: StudyArguments, script, model_args, training, folder: Path, fingerprint: str) -> None:
    """Every (arm, seed) not recorded yet and not held by another study process, each recorded when done."""
    data = load_study_data(script, study)
    logger.info("Training parts: %s", {part: len(rows) for part, rows in data["train"].items()})
    for name in study.arms:
        for seed in study.seeds:
            run_dir = folder / name.replace("/", "-") / f"seed-{seed}"
            with ExitStack() as stack:
                try:  # held until the run is recorded, so that no other process starts it again
                    stack.enter_context(run_tpo.output_dir_lock(run_dir, take_over=False))
                except RuntimeError:  # a live process holds the run's folder
                    logger.info("%s seed %d: another study process is running it (lock in %s), skipped", name, seed,
                                run_dir)
                    continue
                if str(seed) in recorded(folder, fingerprint)["arms"].get(name, {}).get("runs", {}):
                    logger.info("%s seed %d: already in %s, skipped", name, seed, folder / RESULTS_FILE)
                    continue
                run = run_arm(name, seed, data, script, model_args, training, run_dir)
                with results_lock(folder):  # merged into what other processes recorded meanwhile
                    results = load_results(folder / RESULTS_FILE, fingerprint)
                    results["description"] = describe(study)
                    record_run(results, name, seed, run)
                    write_outputs(results, folder)
            logger.info("%s seed %d done in %.0f s: %s", name, seed, run["wall_seconds"],
                        {k: round(v, 3) for k, v in run["metrics"].items() if k in dict(TABLE_METRICS)})


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    study, script, model_args, training = parse_study_arguments(argv)
    folder = Path(training.output_dir) / ("quick" if study.quick else "full")
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = settings_fingerprint(study, script, model_args, training)
    recorded(folder, fingerprint)  # refuses a results file of other settings before any work
    workers = start_workers(study, argv, folder) if study.workers > 1 else []
    try:
        run_all(study, script, model_args, training, folder, fingerprint)
    except BaseException:  # an error or an interrupt here stops the other processes too
        for process, _ in workers:
            process.terminate()
            process.wait()
        raise
    wait_for_workers(workers)
    with results_lock(folder):
        results = load_results(folder / RESULTS_FILE, fingerprint)
        results["description"] = describe(study)
        write_outputs(results, folder)
    print((folder / REPORT_FILE).read_text(encoding="utf-8"))
    print(f"\nresults: {folder / RESULTS_FILE}   report: {folder / REPORT_FILE}   chart: {folder / CHART_FILE}")
    return results


def describe(study: StudyArguments) -> str:
    return (f"{'Quick' if study.quick else 'Full'} study: {study.train_fraction:g} of the training data, "
            f"{study.test_per_task} test samples per grounding part and control, every test conversation; the "
            "seeds of each arm are in the tables.")


if __name__ == "__main__":
    main()
