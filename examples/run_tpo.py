"""Train and evaluate TPO: the three stages (task assignment, task heads, joint) in sequence, then the
task metrics on the test split.

    # The embedded default (no arguments): the synthetic benchmark (generated once, cached), a tiny
    # LLaVA and a tiny SAM2 built from configurations, three stages on CPU, metrics table and
    # eval_results.json. Equivalent to: python examples/run_tpo.py examples/configs/synthetic_default.yaml
    python examples/run_tpo.py

    # A real backbone on real data (see the template's comments), on 8 GPUs:
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/run_tpo.py \\
        examples/configs/real_backbone_template.yaml

    # Any argument on the command line instead of a YAML file:
    python examples/run_tpo.py --output_dir outputs/x --stages task joint --per_device_train_batch_size 8 ...
"""

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, HfArgumentParser, set_seed

from tpo import TPOForConditionalGeneration
from tpo.modeling_tpo.configuration_tpo import ROUTER_CLASSES
from tpo.processing.data_collator import TPODataCollator
from tpo.processing.pipeline import encode_dataset
from tpo.processing.processing_tpo import DEFAULT_PROMPT_TEMPLATES, TPOProcessor
from tpo.processing.readers import read_spec, read_specs
from tpo.processing.synthetic import generate_synthetic_benchmark
from tpo.training.arguments import STAGES, TPOTrainingArguments
from tpo.training.evaluation import REQUIRED_KEYS, TaskEvaluator, format_table
from tpo.training.stages import stage_runs
from tpo.training.script_inputs import check_model_source, parse_json_flag, read_yaml_file
from tpo.tiny import build_tiny_tokenizer, tiny_llava_config, tiny_sam2_config
from tpo.training.trainer import TPOTrainer, last_complete_checkpoint, unwrap_tpo

logger = logging.getLogger("run_tpo")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "synthetic_default.yaml"
REAL_RUN_FLAGS = ("__model_name_or_path", "__data_config")  # flags (dashes as underscores) of a non-synthetic run


# ------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------
@dataclass
class ScriptArguments:
    data_config: str | None = field(
        default=None, metadata={"help": "YAML with `train`, `eval` and `test` lists of dataset specs (see "
                                        "examples/configs/real_backbone_template.yaml). None: the synthetic benchmark."})
    synthetic_dir: str = field(default=".cache/tpo/synthetic", metadata={"help": "Where the synthetic benchmark is cached."})
    synthetic_size: str = field(default="default", metadata={"help": "Synthetic benchmark size: small or default."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark."})
    synthetic_share: list[str] = field(default_factory=lambda: ["shape"], metadata={
        "help": "What the synthetic distractors share with the target: shape (the colour word decides), or colour "
                "shape (both words needed; the tiny from-scratch model does not learn shapes in minutes)."})
    stages: list[str] = field(default_factory=lambda: list(STAGES), metadata={"help": "Stages to run, in order."})
    assign_epochs: float = field(default=1.0, metadata={"help": "Epochs of the assign stage."})
    task_epochs: float = field(default=1.0, metadata={"help": "Epochs of the task stage."})
    joint_epochs: float = field(default=1.0, metadata={"help": "Epochs of the joint stage."})
    assign_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the assign stage "
                                                                               "(default: --learning_rate)."})
    task_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the task stage."})
    joint_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the joint stage."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on test samples evaluated."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes of the Dataset.map preprocessing."})
    results_file: str = field(default="eval_results.json", metadata={"help": "Metrics file in --output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Take over --output_dir even while another run holds its lock (`.tpo_run.lock`); without it a "
                "second run writing the same folder is refused."})
    task_stage_conversations: float = field(default=0.0, metadata={
        "help": "Conversation samples mixed into the task stage, as a fraction of its grounding samples (drawn once "
                "with the run's seed): with task_stage_trains_llm they keep the LM answering in text while it learns "
                "for the heads. 0: none (the paper's stage 2)."})
    task_warmup_tasks: list[str] = field(default_factory=list, metadata={
        "help": "Tasks trained alone, one short run each (--task_warmup_epochs, the task stage's settings), right "
                "before the task stage: a from-scratch model learns to bind the question to the image sooner on one "
                "task than on all at once. Empty: none."})
    task_warmup_epochs: float = field(default=0.5, metadata={"help": "Epochs of each --task_warmup_tasks run."})
    mask_video_mode: str = field(default="propagate", metadata={
        "help": "How evaluation segments video mask samples: 'propagate' (first frame by the mask head, then "
                "SAM2's video memory) or 'per_frame' (for a SAM2 whose memory is untrained, e.g. a random tiny one)."})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A transformers vision-language model (folder or hub id). None: a tiny LLaVA "
                                        "built from configurations (the embedded default)."})
    sam2_name_or_path: str | None = field(default=None, metadata={"help": "A SAM2 checkpoint (Sam2VideoModel) for the "
                                                                          "mask head. None: a tiny SAM2 from configs."})
    enabled_tasks: list[str] = field(default_factory=lambda: ["temporal", "region", "mask"],
                                     metadata={"help": "Tasks the model enables (heads exist only for these)."})
    text_coordinate_tasks: list[str] = field(default_factory=list, metadata={
        "help": "Grounding tasks answered in text coordinates instead of task tokens (temporal: 'from 2.5 to 6.0 "
                "seconds', region: '[x0, y0, x1, y1]' pixels), trained with the LM loss and scored by parsing the "
                "generated text; they need no head (leave them out of --enabled_tasks)."})
    num_task_tokens: int = field(default=1, metadata={"help": "Learnable task tokens per task."})
    num_frames: int = field(default=8, metadata={"help": "Video frames the MLLM sees."})
    mask_frames_per_video: int = field(default=4, metadata={"help": "Annotated frames per video mask sample for SAM2."})
    question_before_media: bool = field(default=False, metadata={
        "help": "Grounding questions before the image/video (for an MLLM trained from scratch: visual tokens "
                "then read the question); pretrained MLLMs expect the media first (the default)."})
    tiny_hidden_size: int = field(default=128, metadata={"help": "Tiny LLaVA: hidden size."})
    tiny_num_layers: int = field(default=4, metadata={"help": "Tiny LLaVA: layers of the vision tower and the LM."})
    tiny_image_size: int = field(default=64, metadata={"help": "Tiny LLaVA: vision tower input size."})
    tiny_patch_size: int = field(default=16, metadata={"help": "Tiny LLaVA: patch size."})
    tiny_sam2_image_size: int = field(default=128, metadata={"help": "Tiny SAM2: input size."})
    freeze_sam2_image_encoder: bool = field(default=True, metadata={"help": "Keep SAM2's image encoder frozen."})
    temporal_head_config: str | None = field(default=None, metadata={"help": "JSON of temporal head settings "
                                                                             "(fields of TemporalHeadConfig)."})
    region_head_config: str | None = field(default=None, metadata={"help": "JSON of region head settings (fields of RegionHeadConfig)."})
    mask_head_config: str | None = field(default=None, metadata={"help": "JSON of mask head settings (fields of MaskHeadConfig)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (llm_training=lora), as released: 16."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha, as released: 32."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    merge_lora: bool = field(default=True, metadata={"help": "Merge LoRA into the final saved model."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype of a pretrained MLLM (auto, bfloat16, float32)."})

    def __post_init__(self):  # bad JSON fails at parse time, naming the flag, before any data is generated
        for name in ("temporal_head_config", "region_head_config", "mask_head_config"):
            parse_json_flag(getattr(self, name), f"--{name}")


def parse_arguments(argv: list[str]):
    """No arguments: the embedded default config. A YAML file first: its values, which any following
    `--name value` overrides. Flags alone: the embedded default with those flags changed, unless they
    name a model or data (`--model_name_or_path`, `--data_config`), which start from the fields'
    own defaults instead (the synthetic run's from-scratch settings do not suit a real backbone)."""
    parser = HfArgumentParser((ScriptArguments, ModelArguments, TPOTrainingArguments))
    if not argv:
        logger.info("No arguments: running the embedded default, %s", DEFAULT_CONFIG)
        return parser.parse_yaml_file(str(DEFAULT_CONFIG))
    config_file = None
    if not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        config_file, argv = Path(argv[0]), argv[1:]
    elif not any(arg.split("=")[0].replace("-", "_") in REAL_RUN_FLAGS for arg in argv):
        logger.info("Flags without a config file: the embedded default (%s) with them applied.", DEFAULT_CONFIG)
        config_file = DEFAULT_CONFIG
    if config_file is not None:
        defaults = read_yaml_file(config_file)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"{config_file}: unknown key(s) {unknown}.")
        parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(argv)


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------
DATA_CONFIG_KEYS = ("train", *(f"train_{stage}" for stage in STAGES), "eval", "test", "controls")


def load_data(script: ScriptArguments) -> tuple[dict, dict]:
    """({"train", "train_<stage>" (where given), "eval", "test"} datasets of the common schema,
    {control name: dataset} evaluated beside the test split).

    A data config lists reader specs under `train` (every stage), `train_assign` / `train_task` /
    `train_joint` (one stage's own data, replacing `train` for it), `eval` and `test`, and under `controls`
    a mapping {name: [specs]} of control sets scored like the test split (`control/<name>_<metric>`, e.g.
    `region_query_swap`: the test images asked about other objects). The synthetic benchmark brings its own.
    """
    if script.data_config:
        config = read_yaml_file(script.data_config, "data config")
        unknown = sorted(set(config) - set(DATA_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"{script.data_config}: unknown key(s) {unknown}; expected some of {list(DATA_CONFIG_KEYS)}.")
        if not any(key.startswith("train") for key in config):
            raise ValueError(f"{script.data_config}: no training data (`train` or `train_<stage>` lists).")
        controls = config.pop("controls", None) or {}
        if not isinstance(controls, dict):
            raise ValueError(f"{script.data_config}: `controls` must map control names to lists of specs.")
        data = {key: read_specs(specs or []) for key, specs in config.items()} | {
            split: read_specs(config.get(split) or []) for split in ("train", "eval", "test")}
        return data, {name: read_specs(specs or []) for name, specs in controls.items()}
    manifest = synthetic_manifest(script)
    specs = {split: list(manifest["splits"][split].values()) for split in ("train", "val", "test")}
    data = {"train": read_specs(specs["train"]), "eval": read_specs(specs["val"]), "test": read_specs(specs["test"])}
    return data, {name: read_spec(spec) for name, spec in manifest.get("controls", {}).get("test", {}).items()}


def synthetic_manifest(script: ScriptArguments) -> dict:
    """The synthetic benchmark of the script's settings (generated once, then reused), its manifest."""
    return generate_synthetic_benchmark(script.synthetic_dir, size=script.synthetic_size, seed=script.synthetic_seed,
                                        share=script.synthetic_share)


def tokenizer_corpus(datasets: list) -> list[str]:
    """Texts the tiny tokenizer is trained on: the prompt templates, queries and conversations."""
    texts = [template for templates in DEFAULT_PROMPT_TEMPLATES.values() for template in templates]
    for row in (row for dataset in datasets for row in dataset):
        texts.append(row["query"])
        texts.extend(turn["content"] for turn in row["conversations"])
    return texts


# ------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------
def load_tokenizer_and_image_processor(name_or_path: str):
    """The checkpoint's tokenizer (with its chat template) and image processor.

    Not `AutoProcessor`: for Qwen2-VL and LLaVA-OneVision it also builds transformers' video processor, which
    needs torchvision; TPO decodes video with PyAV and resizes frames with the image processor, so the
    tokenizer and the (PIL) image processor are all it needs.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    if tokenizer.chat_template is None:
        logger.warning("%s has no chat template; TPOProcessor needs one (pass chat_template or add "
                       "chat_template.jinja to the checkpoint).", name_or_path)
    return tokenizer, image_processor


def build_model(model_args: ModelArguments, train_data, preset: str | None = None):
    """(model, processor): a pretrained MLLM wrapped with `from_mllm`, or the tiny default; `preset` names a
    `TPOConfig` preset (its head settings, under those given in `model_args`)."""
    head_config = {
        "preset": preset,
        "temporal_head_config": json.loads(model_args.temporal_head_config or "{}"),
        "region_head_config": json.loads(model_args.region_head_config or "{}"),
        "mask_head_config": {"freeze_image_encoder": model_args.freeze_sam2_image_encoder,
                             **json.loads(model_args.mask_head_config or "{}")},
    }
    if model_args.model_name_or_path is None:
        from transformers import LlavaForConditionalGeneration
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        tokenizer = build_tiny_tokenizer(tokenizer_corpus(train_data), vocab_size=1000)
        mllm_config = tiny_llava_config(tokenizer, image_size=model_args.tiny_image_size,
                                        patch_size=model_args.tiny_patch_size, hidden_size=model_args.tiny_hidden_size,
                                        num_layers=model_args.tiny_num_layers)
        mllm_config.vision_config.vision_use_head = False  # LLaVA reads hidden states, never SigLIP's pooling head
        mllm = LlavaForConditionalGeneration(mllm_config)
        image_processor = SiglipImageProcessorPil(size={"height": model_args.tiny_image_size,
                                                        "width": model_args.tiny_image_size})
        sam2_config = tiny_sam2_config(model_args.tiny_sam2_image_size)
    else:
        tokenizer, image_processor = load_tokenizer_and_image_processor(model_args.model_name_or_path)
        dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
        mllm = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, dtype=dtype)
        sam2_config = None
        if "mask" in model_args.enabled_tasks:
            from transformers import Sam2VideoConfig

            if model_args.sam2_name_or_path is None:
                raise ValueError("With a pretrained MLLM and the mask task, give --sam2_name_or_path (a SAM2 checkpoint).")
            sam2_config = Sam2VideoConfig.from_pretrained(model_args.sam2_name_or_path)
    model = TPOForConditionalGeneration.from_mllm(
        mllm, tasks=model_args.enabled_tasks, tokenizer=tokenizer, num_task_tokens=model_args.num_task_tokens,
        sam2_config=sam2_config if "mask" in model_args.enabled_tasks else None, **head_config,
    )
    if model.mask_head is not None and model_args.sam2_name_or_path:
        model.mask_head.load_sam2(model_args.sam2_name_or_path)
    processor = TPOProcessor.from_model_config(model.config, image_processor, tokenizer, num_frames=model_args.num_frames,
                                               mask_frames_per_video=model_args.mask_frames_per_video,
                                               question_before_media=model_args.question_before_media,
                                               text_coordinate_tasks=model_args.text_coordinate_tasks)
    return model, processor


def stage_resume_point(resume: str | None, stage_dir: str) -> str | None:
    """The checkpoint a stage resumes from. `--resume_from_checkpoint true`: every stage resumes from the
    newest complete checkpoint in its own folder (`<output_dir>/stage-<stage>/checkpoint-*`; one cut short by a
    kill or a full disk is passed over with a warning), so finished stages restore their final weights and the
    interrupted one goes on; a checkpoint path: only the stage whose folder holds it resumes from it."""
    if not resume or str(resume).lower() == "false":
        return None
    if str(resume).lower() == "true":
        return last_complete_checkpoint(stage_dir)
    return str(resume) if Path(resume).resolve().parent == Path(stage_dir).resolve() else None


def save_final(model, processor, final_dir: Path) -> Path:
    """Save model and processor to `final_dir` as a whole or not at all: they are written to
    `<final_dir>.partial` and renamed when complete, so a full disk or a kill never leaves a `final/` that
    looks loadable but holds only part of the files (a previous `final/` is replaced only then)."""
    partial = final_dir.with_name(final_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    if final_dir.exists():
        previous = final_dir.with_name(final_dir.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        final_dir.rename(previous)
        partial.rename(final_dir)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        partial.rename(final_dir)
    return final_dir


def task_stage_samples(encoded, conversation_fraction: float, seed: int, task: str | None = None):
    """The task stage's samples: every grounding sample (of `task` only, for the paper's per-task stage 2),
    plus `conversation_fraction` times as many conversation samples (task label 0) drawn with `seed` (all of
    them when there are fewer)."""
    labels = {ROUTER_CLASSES.index(task)} if task else set(range(1, len(ROUTER_CLASSES)))
    grounding = encoded.filter(lambda row: row["task_label"] in labels, desc=f"{task or 'grounding'} samples")
    if conversation_fraction <= 0:
        return grounding
    from datasets import concatenate_datasets

    text = encoded.filter(lambda row: row["task_label"] == 0, desc="conversation samples")
    count = min(len(text), int(round(conversation_fraction * len(grounding))))
    if not count:
        return grounding
    return concatenate_datasets([grounding, text.shuffle(seed=seed).select(range(count))])


def training_runs(script: ScriptArguments, training_args, tasks: list[str]) -> list[tuple[str, str | None, bool]]:
    """(stage, task or None, is_warmup) of every training run in order: the stages' runs, with one warm-up run per
    `script.task_warmup_tasks` entry (the task stage on that task alone) right before the task stage."""
    runs = [(stage, task, False) for stage, task in stage_runs(script.stages, training_args, tasks)]
    if script.task_warmup_tasks and "task" in script.stages:
        first = next(i for i, run in enumerate(runs) if run[0] == "task")
        runs[first:first] = [("task", task, True) for task in script.task_warmup_tasks]
    return runs


def select_warmup_tasks(script: ScriptArguments, enabled_tasks: list[str], preset: str | None = None) -> None:
    """Keep the warm-up tasks that can run (the embedded default warms up region, and flags such as
    `--enabled_tasks temporal` or `--stages joint` must still work on it): a task the model does not enable, or a
    warm-up without a task stage, is dropped with a warning before any work; the release preset runs the paper's
    schedule, without a warm-up."""
    if script.task_warmup_tasks and preset == "release":
        logger.warning("--preset release runs the paper's stage schedule: no --task_warmup_tasks warm-up.")
        script.task_warmup_tasks = []
    dropped = [task for task in script.task_warmup_tasks if task not in enabled_tasks]
    if dropped:
        logger.warning("--task_warmup_tasks %s: not among the enabled tasks %s; no warm-up for them.", dropped,
                       list(enabled_tasks))
    script.task_warmup_tasks = [task for task in script.task_warmup_tasks if task in enabled_tasks]
    if script.task_warmup_tasks and "task" not in script.stages:
        logger.warning("--task_warmup_tasks %s warm up the task stage, which --stages leaves out: no warm-up.",
                       script.task_warmup_tasks)
        script.task_warmup_tasks = []


def lora_config(model_args: ModelArguments, model):
    from peft import LoraConfig

    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=model.lora_target_regex(), modules_to_save=model.task_module_names())


# ------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------
def check_stages(stages: list[str]) -> None:
    """Refuse unknown or repeated stage names before any work is done."""
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages or len(set(stages)) != len(stages):
        raise ValueError(f"--stages {' '.join(stages)}: {'unknown stage(s) ' + str(unknown) if unknown else 'each stage once'};"
                         f" choose from {list(STAGES)}, in order, each at most once.")


@contextlib.contextmanager
def output_dir_lock(output_dir: Path, take_over: bool, is_main_process: bool = True):
    """Hold `<output_dir>/.tpo_run.lock` (this process's id and host) while the run writes there. A lock held
    by a live process is refused unless `take_over`; a lock left by a process that is gone is taken over with a
    warning. Only the main process of a distributed run locks."""
    if not is_main_process:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / ".tpo_run.lock"
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            holder = json.loads(lock.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            holder = {}
        alive = holder.get("host") == socket.gethostname() and _process_alive(int(holder.get("pid", -1)))
        if alive and not take_over:
            raise RuntimeError(f"{output_dir} is in use by another run (process {holder.get('pid')}, lock {lock}); "
                               "choose another --output_dir, wait for that run, or pass --overwrite_output_dir true.")
        logger.warning("Taking over %s from %s (%s).", lock, holder or "an unreadable lock",
                       "--overwrite_output_dir" if alive else "that process is gone")
        lock.write_text(mine, encoding="utf-8")
    else:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(mine)
    try:
        yield
    finally:
        try:
            if json.loads(lock.read_text(encoding="utf-8")) == json.loads(mine):
                lock.unlink()
        except (OSError, ValueError):
            pass


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    script, model_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    check_model_source(model_args.model_name_or_path, "--model_name_or_path")  # before reading any data
    check_model_source(model_args.sam2_name_or_path, "--sam2_name_or_path")
    check_stages(script.stages)
    select_warmup_tasks(script, model_args.enabled_tasks, training_args.preset)
    with output_dir_lock(Path(training_args.output_dir), script.overwrite_output_dir,
                         training_args.process_index == 0):
        return run(script, model_args, training_args)


def run(script: ScriptArguments, model_args: ModelArguments, training_args: TPOTrainingArguments) -> dict[str, float]:
    """Train the stages, save the final model, evaluate the test split; returns the metrics."""
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)

    # Dataset
    data, controls = load_data(script)
    logger.info("Samples: %s", ", ".join(f"{key} {len(value)}" for key, value in data.items()))

    # Samples of tasks the model neither enables nor answers in text are left out (conversations always stay).
    keep = set(model_args.enabled_tasks) | set(model_args.text_coordinate_tasks) | {"text"}
    for key in list(data):
        before = len(data[key])
        data[key] = data[key].filter(lambda row: row["task"] in keep, desc=f"enabled tasks ({key})")
        if len(data[key]) < before:
            logger.info("%s: left out %d samples of tasks not enabled", key, before - len(data[key]))
    controls = {name: rows.filter(lambda row: row["task"] in keep) for name, rows in controls.items()}

    # Model
    training_keys = [key for key in data if key.startswith("train") and len(data[key])]
    model, processor = build_model(model_args, [data[key] for key in training_keys], training_args.preset)
    logger.info("TPO model: %.2fM parameters, tasks %s", sum(p.numel() for p in model.parameters()) / 1e6,
                model.config.tasks)
    encoded = {}

    def encoded_split(key: str):
        if key not in encoded:
            encoded[key] = encode_dataset(data[key], processor, mode="train", num_proc=script.num_proc)
        return encoded[key]

    evaluation = encoded_split("eval") if len(data["eval"]) else None
    collator = TPODataCollator(processor)
    task_evaluator = None
    if training_args.eval_strategy != "no" and len(data["eval"]):
        eval_rows = data["eval"]
        if script.max_eval_samples is not None and len(eval_rows) > script.max_eval_samples:
            eval_rows = eval_rows.shuffle(seed=training_args.seed).select(range(script.max_eval_samples))
        task_evaluator = TaskEvaluator(processor, eval_rows, batch_size=training_args.per_device_eval_batch_size,
                                       mask_video_mode=script.mask_video_mode)

    # Training
    peft_config = lora_config(model_args, model) if training_args.llm_training == "lora" else None
    trained = model
    for stage, task, warmup in training_runs(script, training_args, model.config.tasks):
        # the paper's stage 2: one run per task, that task's head + token; a warm-up run: one task alone
        name = f"task-warmup-{task}" if warmup else f"{stage}-{task}" if task else stage
        epochs = script.task_warmup_epochs if warmup else getattr(script, f"{stage}_epochs")
        overrides = {"stage": stage, "output_dir": str(output_dir / f"stage-{name}"),
                     "num_train_epochs": epochs, **({"tasks": [task]} if task else {})}
        if getattr(script, f"{stage}_learning_rate") is not None:
            overrides["learning_rate"] = getattr(script, f"{stage}_learning_rate")
        stage_args = dataclasses.replace(training_args, **overrides)
        stage_key = f"train_{stage}" if len(data.get(f"train_{stage}", [])) else "train"
        stage_train = encoded_split(stage_key)
        if stage == "task":  # the heads' stage: grounding samples (of its task, per task), conversations if asked
            stage_train = task_stage_samples(stage_train, script.task_stage_conversations, training_args.seed, task)
        if not len(stage_train):
            raise ValueError(f"Stage {stage!r} has no training samples (data {stage_key!r}); give it data or leave the "
                             "stage out of --stages.")
        logger.info("Stage %s: %d training samples from %r", stage, len(stage_train), stage_key)
        trainer = TPOTrainer(model=trained, args=stage_args, peft_config=peft_config, train_dataset=stage_train,
                             eval_dataset=evaluation if stage_args.eval_strategy != "no" else None,
                             data_collator=collator, processing_class=processor, task_evaluator=task_evaluator)
        trainer.train(resume_from_checkpoint=stage_resume_point(training_args.resume_from_checkpoint, stage_args.output_dir))
        trained = trainer.model
        peft_config = None  # the adapters exist from the first stage on

    if training_args.process_index != 0:  # one process saves and evaluates; the others are done
        logger.info("Process %d: training done; the main process saves and evaluates.", training_args.process_index)
        return {}
    # The final model first: a problem in evaluation must not lose the training.
    final = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") and model_args.merge_lora else trained
    final_dir = save_final(final, processor, output_dir / "final")

    # Evaluation
    test = data["test"]
    if script.max_eval_samples is not None and len(test) > script.max_eval_samples:
        test = test.shuffle(seed=training_args.seed).select(range(script.max_eval_samples))
    evaluator = TaskEvaluator(processor, test, batch_size=training_args.per_device_eval_batch_size,
                              mask_video_mode=script.mask_video_mode, controls=controls,
                              output_dir=str(output_dir / "predictions"))
    metrics = evaluator(unwrap_tpo(final))
    results = {**metrics, "mask/j&f_mode": script.mask_video_mode} if "mask/j&f" in metrics else metrics
    (output_dir / script.results_file).write_text(json.dumps(results, indent=2, sort_keys=True), encoding="utf-8")
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    if missing:
        logger.warning("Metrics without data in this test set: %s", missing)
    print(format_table(metrics, evaluator.notes))
    print(f"\nmetrics: {output_dir / script.results_file}   model and processor: {final_dir}")
    return metrics


if __name__ == "__main__":
    main()
