"""Evaluate predictions against benchmark ground truth with the official metrics; prints the metrics JSON
and writes it with `--output`. `predict` runs a TPO checkpoint over a dataset and writes the predictions in
the formats these subcommands read.

    python examples/evaluate_tpo.py predict --model outputs/tpo-default/final --data data.yaml --split test --output-dir preds/ --evaluate
    python examples/evaluate_tpo.py qvhighlights --predictions preds.jsonl --ground-truth highlight_val_release.jsonl --output metrics.json
    python examples/evaluate_tpo.py charades --predictions preds.jsonl --ground-truth charades_sta_test.txt
    python examples/evaluate_tpo.py refcoco --predictions boxes.json --ground-truth refcoco_val.jsonl
    python examples/evaluate_tpo.py refcoco --predictions boxes.json --instances instances.json --refs refs.json --split val
    python examples/evaluate_tpo.py refcoco --predictions boxes.json --instances instances.json --refs "refs(unc).p" --allow-pickle --split val
    python examples/evaluate_tpo.py reasonseg --predictions masks.json --ground-truth ReasonSeg/val
    python examples/evaluate_tpo.py mevis --predictions masks.json --meta meta_expressions.json --mask-dict mask_dict.json
    python examples/evaluate_tpo.py tracking --predictions results/ --ground-truth LaSOT/ --protocol lasot
    python examples/evaluate_tpo.py mcqa --predictions answers.json --ground-truth questions.json

`<subcommand> --help` gives each file format; the README's evaluation section has the details. The scoring lives in
`tpo.training.benchmark_scoring`, predicting in `tpo.training.predict`; this script parses the arguments, calls
them and prints the result.
"""

import argparse
import inspect
import json
import logging
import sys
from pathlib import Path

from tpo.training.benchmark_scoring import (
    json_ready,
    score_charades,
    score_mcqa,
    score_mevis,
    score_qvhighlights,
    score_reasonseg,
    score_refcoco,
    score_tracking,
)
from tpo.training.metrics.mcqa import ANSWER_CONVENTIONS
from tpo.training.predict import DTYPES, predict_dataset

logger = logging.getLogger("evaluate_tpo")

PREDICT_HELP = """\
Runs a TPO checkpoint (a folder saved by `save_pretrained`, e.g. `examples/run_tpo.py`'s
`<output_dir>/final`, with its processor; `--processor` when the processor is saved elsewhere) over
samples read by `tpo.processing.readers` and writes one prediction file per dataset and task in
`--output-dir`. Model and processor load with `AutoModel` / `AutoProcessor` (`trust_remote_code=True`);
a folder that is not a TPO model, or a processor whose task-token ids differ from the model's, is refused.
`--data`: a YAML or JSON file with the reader specs of `tpo.processing.readers.read_spec`
(`{"format": "qvhighlights", "jsonl": ..., "video_dir": ...}`; formats qvhighlights, charades_sta,
activitynet_captions, refcoco, mevis, reasonseg, llava), as a list of specs, or a mapping from split
names to lists of specs (`examples/run_tpo.py --data_config`, pick with `--split`, default test), or the
synthetic benchmark's `manifest.json`. Paths in the specs are used as written (relative to the working
directory), except a manifest's, which are relative to the manifest's folder. `--max-samples N` reads at most N samples per spec. Samples of tasks the model lacks are
left out; samples without annotations (test splits) are predicted and left out of `--evaluate`.
Benchmarks with their own protocol (`tpo.training.benchmark_predict`): multiple choice, formats mvbench,
videomme, mlvu, multiple_choice (`*_answers.json` with the letter read from each answer as the benchmark
reads it, `*_accuracy.json` overall / per task type, category, duration class; scored again by mcqa), and
tracking, formats lasot and got10k (`<source>_<split>_tracking/` in the toolkit's layout, from each first box,
`--tracking-first-frame`; scored by tracking).
Files, named `<source>_<split>_<kind>` (source: the spec's dataset name or format):
  QVHighlights     `*_submission.jsonl`  the official submission (qid, pred_relevant_windows sorted by
                   score, pred_saliency_scores per 2-second clip) -> qvhighlights
  Charades-STA     `*_windows.jsonl`     `{"qid": "charades-<VIDEOID>-<line>", "pred_relevant_windows"}`
                   -> charades (ActivityNet Captions: the same records, no subcommand)
  RefCOCO boxes    `*_boxes.json`        `{"id", "bbox": [x, y, w, h], "bbox_xyxy", "image_id"}` -> refcoco
  RefCOCO masks    `*_masks.json` + `*_masks_ground_truth.json` `{"id", "mask": RLE}` -> reasonseg
  ReasonSeg        `*_masks.json`        `{"id", "mask": RLE}` -> reasonseg (its folder as ground truth)
  MeViS            `*_masks.json`        `{"id", "video_id", "exp_id", "masks": [RLE or null per frame]}`
                   -> mevis; every annotated frame (every frame of an unannotated video) is
                   segmented, SAM2 tracking from the first; `--mask-frames-per-video N` segments N evenly
                   spaced ones instead (faster), the others are null (empty for the benchmark)
  conversations    `*_answers.json`      `{"id": the LLaVA record id, "prediction"}` -> mcqa
`predict_summary.json` lists each file with its record count and the evaluate command line that reads it
(`evaluate`: the arguments of this script; null where no subcommand applies). `--evaluate` adds the task
metrics (`task/metric`, fractions in [0, 1], on the annotated samples predicted) to the summary and
`metrics.json`. `--visualize K` writes K PNGs per task under `visualizations/<task>/` (with the JSON
record each was drawn from, re-drawable with `python -m tpo.visualization`)."""


def score(args: argparse.Namespace) -> dict:
    """The metrics of a scoring subcommand (%): its `score_<benchmark>` function called with the parsed flags,
    which are named like its parameters (`--ground-truth` -> ground_truth)."""
    return args.scorer(**{name: getattr(args, name) for name in inspect.signature(args.scorer).parameters})


def _score_arguments(arguments: list[str]) -> dict:
    """The metrics of this script's scoring arguments (a prediction file's `evaluate` list)."""
    return score(build_parser().parse_args(arguments))


def predict(args: argparse.Namespace) -> dict:
    """`predict`: the summary of `tpo.training.predict.predict_dataset` (also in predict_summary.json)."""
    return predict_dataset(
        args.model, args.data, args.output_dir, split=args.split, processor=args.processor, batch_size=args.batch_size,
        max_samples=args.max_samples, max_new_tokens=args.max_new_tokens,
        mask_frames_per_video=args.mask_frames_per_video, mask_video_mode=args.mask_video_mode,
        tracking_first_frame=args.tracking_first_frame, tracking_lost_target=args.tracking_lost_target,
        device=args.device, dtype=args.dtype, evaluate=args.evaluate, visualize=args.visualize,
        command_prefix=[Path(sys.executable).name, str(Path(__file__))], score_arguments=_score_arguments)


def _add_common(parser: argparse.ArgumentParser, ground_truth_required: bool = True) -> None:
    parser.add_argument("--predictions", required=True, help="predictions file (or folder, where documented)")
    parser.add_argument("--ground-truth", required=ground_truth_required, help="ground-truth file or folder")
    parser.add_argument("--output", help="write the metrics JSON here as well")


def _formats(function) -> str:
    """A scoring function's docstring without its summary line: the file formats, for its subcommand's --help."""
    return inspect.getdoc(function).split("\n\n", 1)[1]


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per benchmark (`handler=score`, `scorer=score_<benchmark>`) and `predict`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="benchmark", required=True)

    def add(name: str, scorer, ground_truth_required: bool = True) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, description=_formats(scorer), formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(sub, ground_truth_required)
        sub.set_defaults(handler=score, scorer=scorer)
        return sub

    add("qvhighlights", score_qvhighlights).add_argument(
        "--on-missing", choices=("error", "wrong", "drop"), default="error",
        help="qids on one side only: error (official), wrong (count as no prediction), drop (shared qids only)")
    add("charades", score_charades)
    refcoco = add("refcoco", score_refcoco, ground_truth_required=False)
    refcoco.add_argument("--instances", help="COCO instances json (with --refs)")
    refcoco.add_argument("--refs", help="refs as JSON (list or jsonl) or parquet (the hub's exports need no "
                                        "--instances), or a REFER pickle with --allow-pickle")
    refcoco.add_argument("--allow-pickle", action="store_true",
                         help="read a REFER refs(unc).p pickle with a restricted unpickler (plain data only)")
    refcoco.add_argument("--split", help="refs split to evaluate (val, testA, ...)")
    refcoco.add_argument("--dataset-name", default="refcoco", help="id prefix, as given to the RefCOCO reader")
    add("reasonseg", score_reasonseg).add_argument(
        "--all-texts", action="store_true", help="evaluate every text of an image (LISA evaluates text 0 only)")
    mevis = add("mevis", score_mevis, ground_truth_required=False)
    mevis.add_argument("--meta", help="meta_expressions.json (with --mask-dict)")
    mevis.add_argument("--mask-dict", help="mask_dict.json")
    mevis.add_argument("--dataset-name", default="mevis", help="id prefix, as given to the MeViS reader")
    add("tracking", score_tracking).add_argument("--protocol", choices=("lasot", "got10k", "both"), default="both")
    add("mcqa", score_mcqa).add_argument(
        "--convention", choices=tuple(ANSWER_CONVENTIONS), default="tpo",
        help="how answers are read: tpo (default) or lmms-eval (its MVBench reading: lowercase letters and lone "
             "letters in sentences count, empty answers leave the denominator; see tpo.training.metrics.mcqa)")

    run = subparsers.add_parser("predict", description=PREDICT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--model", required=True, help="TPO checkpoint folder (save_pretrained), e.g. <run_tpo output_dir>/final")
    run.add_argument("--processor", help="folder of the saved TPOProcessor (default: --model)")
    run.add_argument("--data", required=True, help="YAML/JSON file of reader specs: a list, {split: [specs]}, or a synthetic manifest.json")
    run.add_argument("--split", default="test", help="split of a {split: [specs]} file or manifest (default: test)")
    run.add_argument("--output-dir", required=True, help="folder for the prediction files, predict_summary.json, metrics.json")
    run.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default: 8)")
    run.add_argument("--max-samples", type=int, help="at most this many samples per spec")
    run.add_argument("--max-new-tokens", type=int, default=16, help="answer length for conversation samples (default: 16)")
    run.add_argument("--mask-frames-per-video", type=int, default=0, metavar="N",
                     help="video mask samples: segment N evenly spaced annotated frames (default 0: all of them)")
    run.add_argument("--mask-video-mode", choices=("propagate", "per_frame"), default="propagate",
                     help="video masks: first frame by the mask head, then SAM2's video memory (propagate, default), "
                          "or every frame prompted alone (per_frame: for a SAM2 whose memory is untrained)")
    run.add_argument("--tracking-first-frame", choices=("mask_head", "sam2_box"), default="mask_head",
                     help="tracking specs: frame 0 segmented by the mask head (MLLM task embedding + the first box as "
                          "its box prompt, default) or by SAM2's box prompt alone")
    run.add_argument("--tracking-lost-target", choices=("previous", "zeros"), default="previous",
                     help="tracking specs: box written for a frame whose mask is empty (default: the previous box)")
    run.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32)")
    run.add_argument("--evaluate", action="store_true", help="also compute the task metrics on the annotated samples")
    run.add_argument("--visualize", type=int, default=0, metavar="K", help="write K PNGs per task under visualizations/")
    run.set_defaults(handler=predict)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run the subcommand of `argv`, print its result as JSON (and write it to `--output`); returns it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    metrics = json_ready(args.handler(args))
    text = json.dumps(metrics, indent=2)
    print(text)
    if getattr(args, "output", None):
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        sys.exit(1)
