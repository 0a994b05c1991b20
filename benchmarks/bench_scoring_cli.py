"""Whole-process wall time of `examples/evaluate_tpo.py qvhighlights` (start-up, reading, scoring, writing),
against the official moment_detr `standalone_eval/eval.py` on the same files when a checkout of it is given.

The scoring subcommands import only what they use (numpy and the metric modules; no torch, no
transformers), so the process costs about what the metric does. Target: at most a tenth of the official
evaluator's wall time.

    python benchmarks/bench_scoring_cli.py [--repeats 5]            # 1,550 synthetic queries
    python benchmarks/bench_scoring_cli.py --official-root moment_detr --official-python /path/to/python
        # the checkout's data/highlight_val_release.jsonl and standalone_eval/sample_val_preds.jsonl, both
        # evaluators; the official one needs numpy and scikit-learn in --official-python's environment

Each side runs `--repeats` times as a fresh process, alternating, on one core (OMP_NUM_THREADS=1); the
median wall times and their ratio are printed, and the two outputs' metrics are compared.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "evaluate_tpo.py"


def _timed(command: list[str], cwd: str | None = None, env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _synthetic_files(folder: Path, queries: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_qvhighlights_eval import make_data

    submission, ground_truth = make_data(queries, seed=0)
    paths = folder / "submission.jsonl", folder / "ground_truth.jsonl"
    for path, rows in zip(paths, (submission, ground_truth)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--queries", type=int, default=1550, help="synthetic queries (without --official-root)")
    parser.add_argument("--official-root", help="a moment_detr checkout (data/ and standalone_eval/)")
    parser.add_argument("--official-python", default=sys.executable, help="the interpreter that runs the official one")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if args.official_root:
            root = Path(args.official_root).resolve()
            submission, ground_truth = root / "standalone_eval" / "sample_val_preds.jsonl", root / "data" / "highlight_val_release.jsonl"
        else:
            submission, ground_truth = _synthetic_files(folder, args.queries)
        ours_command = [sys.executable, str(SCRIPT), "qvhighlights", "--predictions", str(submission),
                        "--ground-truth", str(ground_truth), "--output", str(folder / "ours.json")]
        official_command = None
        if args.official_root:
            official_command = [args.official_python, "standalone_eval/eval.py", "--submission_path", str(submission),
                                "--gt_path", str(ground_truth), "--save_path", str(folder / "official.json"),
                                "--not_verbose"]
        ours, official = [], []
        for _ in range(args.repeats):
            ours.append(_timed(ours_command, env=env))
            if official_command:
                official.append(_timed(official_command, cwd=str(root), env={**env, "PYTHONPATH": str(root)}))
        queries = sum(1 for line in Path(ground_truth).read_text().splitlines() if line.strip())
        print(f"queries: {queries}; repeats: {args.repeats} fresh processes each, one thread")
        print(f"evaluate_tpo.py qvhighlights: median {statistics.median(ours):.3f} s (min {min(ours):.3f} s)")
        if official:
            ratio = statistics.median(ours) / statistics.median(official)
            print(f"official standalone_eval/eval.py: median {statistics.median(official):.3f} s (min {min(official):.3f} s)")
            print(f"ours / official wall time: {ratio:.3f} (target <= 0.1)")
            mine = json.loads((folder / "ours.json").read_text())["brief"]
            theirs = json.loads((folder / "official.json").read_text())["brief"]
            differing = {k: (mine.get(k), v) for k, v in theirs.items() if mine.get(k) != v}
            print(f"brief metrics equal: {not differing} ({len(theirs)} metrics){'' if not differing else differing}")


if __name__ == "__main__":
    main()
