"""examples/evaluate_tpo.py: every subcommand on small files in the benchmarks' formats."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tpo.training.benchmark_scoring import read_records
from tpo.training.metrics import lasot_metrics, mask_to_rle, qvhighlights_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "evaluate_tpo.py"


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _json(path: Path, value) -> str:
    path.write_text(json.dumps(value), encoding="utf-8")
    return str(path)


QVH_PRED = [{"qid": 1, "pred_relevant_windows": [[0, 10, 0.9], [20, 30, 0.5]], "pred_saliency_scores": [0.1, 0.5, 0.2, 0, 0]},
            {"qid": 2, "pred_relevant_windows": [[5, 8, 0.3]], "pred_saliency_scores": [1, 1, 1]}]
QVH_GT = [{"qid": 1, "query": "q", "vid": "v1", "duration": 10, "relevant_windows": [[0, 10], [20, 40]],
           "relevant_clip_ids": [0, 1], "saliency_scores": [[4, 4, 2], [1, 3, 4]]},
          {"qid": 2, "query": "q", "vid": "v2", "duration": 8, "relevant_windows": [[4, 8]], "relevant_clip_ids": [2],
           "saliency_scores": [[4, 4, 4]]}]


def test_qvhighlights_prints_and_writes_official_json(cli, tmp_path, capsys):
    output = tmp_path / "out" / "metrics.json"
    metrics = cli.main(["qvhighlights", "--predictions", _jsonl(tmp_path / "p.jsonl", QVH_PRED),
                        "--ground-truth", _jsonl(tmp_path / "g.jsonl", QVH_GT), "--output", str(output)])
    written = json.loads(output.read_text())
    assert written == metrics == json.loads(capsys.readouterr().out)
    expected = qvhighlights_metrics(QVH_PRED, QVH_GT)
    assert written["brief"]["MR-full-mAP"] == expected["MR-full-mAP"] == 57.5
    assert written["brief"]["MR-long-mAP"] is None  # NaN (no long window) is written as null
    assert written["full"]["MR-R1"]["0.7"] == 100.0


def test_qvhighlights_missing_qid_policy(cli, tmp_path):
    args = ["qvhighlights", "--predictions", _jsonl(tmp_path / "p.jsonl", QVH_PRED[:1]),
            "--ground-truth", _jsonl(tmp_path / "g.jsonl", QVH_GT)]
    with pytest.raises(ValueError, match=r"GT qid\(s\) without prediction \(e.g. \[2\]\)"):
        cli.main(args)
    assert cli.main(args + ["--on-missing", "wrong"])["brief"]["MR-full-R1@0.5"] == 50.0


def test_charades_by_id_and_by_line(cli, tmp_path):
    gt = tmp_path / "charades_sta_test.txt"
    gt.write_text("VID1 0.0 10.0##a person opens a door.\n\nVID2 4.0 10.0##someone sits.\nVID3 0 5##x\n")
    predictions = [{"qid": "charades-VID1-1", "pred_relevant_windows": [[0, 10, 0.9], [50, 60, 0.1]]},
                   {"line": 3, "pred_span": [0, 10]}]  # IoU 0.6; VID3 (line 4) has no prediction: IoU 0
    metrics = cli.main(["charades", "--predictions", _jsonl(tmp_path / "p.jsonl", predictions), "--ground-truth", str(gt)])
    assert metrics == pytest.approx({"R1@0.3": 200 / 3, "R1@0.5": 200 / 3, "R1@0.7": 100 / 3, "mIoU": 160 / 3})
    with pytest.raises(ValueError, match="not in the ground truth"):
        cli.main(["charades", "--predictions", _jsonl(tmp_path / "q.jsonl", [{"qid": "charades-VID9-1", "pred_span": [0, 1]}]),
                  "--ground-truth", str(gt)])


def test_refcoco_records_and_coco_files(cli, tmp_path):
    gt = [{"id": "a", "bbox": [0, 0, 10, 10]}, {"id": "b", "bbox": [0, 0, 10, 10]}, {"id": "c", "bbox": [0, 0, 10, 10]}]
    predictions = [{"id": "a", "bbox": [0, 0, 10, 10]}, {"id": "b", "bbox_xyxy": [0, 0, 10, 5]}]  # IoU 1, 0.5, c missing
    metrics = cli.main(["refcoco", "--predictions", _json(tmp_path / "p.json", predictions),
                        "--ground-truth", _jsonl(tmp_path / "g.jsonl", gt)])
    assert metrics == pytest.approx({"Acc@0.5": 200 / 3, "mIoU": 50.0})
    instances = {"images": [{"id": 1}], "annotations": [{"id": 7, "image_id": 1, "bbox": [2, 2, 4, 4]}]}
    refs = [{"ref_id": 3, "ann_id": 7, "split": "val", "sentences": [{"sent": "left"}, {"sent": "the left one"}]},
            {"ref_id": 4, "ann_id": 7, "split": "train", "sentences": [{"sent": "x"}]}]
    predictions = [{"id": "refcoco-3-0-box", "bbox": [2, 2, 4, 4]}]  # sentence 1 missing
    metrics = cli.main(["refcoco", "--predictions", _json(tmp_path / "p2.json", predictions), "--instances",
                        _json(tmp_path / "instances.json", instances), "--refs", _json(tmp_path / "refs.json", refs),
                        "--split", "val"])
    assert metrics["Acc@0.5"] == pytest.approx(50.0)


def _polygon(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def test_reasonseg_folder_with_ignore_region(cli, tmp_path):
    folder = tmp_path / "ReasonSeg" / "val"
    folder.mkdir(parents=True)
    for name in ("img1", "img2"):
        Image.new("RGB", (20, 16)).save(folder / f"{name}.jpg")
        _json(folder / f"{name}.json", {"text": ["what can hold water?", "second text"], "is_sentence": True, "shapes": [
            {"label": "target", "points": _polygon(2, 2, 10, 10)}, {"label": "IGNORE", "points": _polygon(12, 2, 18, 8)}]})
    target = np.zeros((16, 20), bool)
    target[2:11, 2:11] = True  # LISA: outline + fill, both ends included
    ignored = np.zeros((16, 20), bool)
    ignored[2:9, 12:19] = True
    # img1: the target plus the ignored region -> IoU 1 (ignored pixels leave I and U); img2: no prediction -> 0.
    predictions = [{"id": "reasonseg-img1-0", "mask": mask_to_rle(target | ignored)}]
    path = _json(tmp_path / "p.json", predictions)
    metrics = cli.main(["reasonseg", "--predictions", path, "--ground-truth", str(folder)])
    assert metrics == pytest.approx({"gIoU": 50.0, "cIoU": 100 * target.sum() / (2 * target.sum())})
    all_texts = cli.main(["reasonseg", "--predictions", path, "--ground-truth", str(folder), "--all-texts"])
    assert all_texts["gIoU"] == pytest.approx(25.0)  # 4 samples, one right


def test_reasonseg_prediction_equal_to_lisa_ground_truth_scores_100(cli, tmp_path):
    # The square 10.7-20.3: LISA's GT is the 121-pixel square 10..20; predicting exactly it scores
    # gIoU 100 (the float-polygon GT of 81 pixels scored it 98.88 per image on the audit's files).
    folder = tmp_path / "val"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.jpg")
    _json(folder / "a.json", {"text": ["q"], "shapes": [{"label": "target", "points": _polygon(10.7, 10.7, 20.3, 20.3)}]})
    square = np.zeros((32, 32), bool)
    square[10:21, 10:21] = True
    metrics = cli.main(["reasonseg", "--predictions", _json(tmp_path / "p.json", [{"id": "reasonseg-a-0",
                        "mask": mask_to_rle(square)}]), "--ground-truth", str(folder)])
    assert metrics == pytest.approx({"gIoU": 100.0, "cIoU": 100.0})


def _mevis_files(tmp_path: Path):
    square = np.zeros((12, 12), bool)
    square[2:6, 2:6] = True
    other = np.zeros((12, 12), bool)
    other[8:11, 7:11] = True
    meta = {"videos": {"v1": {"frames": ["00000", "00001"], "expressions": {
        "0": {"exp": "the two cats", "anno_id": [10, 11]}, "1": {"exp": "the first cat", "anno_id": [10]}}}}}
    mask_dict = {"10": [mask_to_rle(square), None], "11": [mask_to_rle(other), None]}
    return _json(tmp_path / "meta.json", meta), _json(tmp_path / "mask_dict.json", mask_dict), square, other


def test_mevis_records_and_png_folder(cli, tmp_path):
    meta, mask_dict, square, other = _mevis_files(tmp_path)
    # Expression 0: both objects merged; frame 0 predicted right, frame 1 both empty -> J = F = 1.
    # Expression 1: frame 0 predicted with the merged mask (IoU 16/28), frame 1 missing but GT empty -> 1.
    predictions = [{"video_id": "v1", "exp_id": "0", "masks": [mask_to_rle(square | other), None]},
                   {"id": "mevis-v1-1", "masks": [mask_to_rle(square | other)]}]
    args = ["mevis", "--meta", meta, "--mask-dict", mask_dict, "--predictions"]
    metrics = cli.main(args + [_json(tmp_path / "p.json", predictions)])
    assert metrics["J"] == pytest.approx(100 * (1 + (16 / 28 + 1) / 2) / 2)
    png_root = tmp_path / "Annotations"
    for exp_id in ("0", "1"):
        (png_root / "v1" / exp_id).mkdir(parents=True)
        Image.fromarray(((square | other) * 255).astype(np.uint8)).save(png_root / "v1" / exp_id / "00000.png")
    assert cli.main(args + [str(png_root)]) == pytest.approx(metrics)


def test_mevis_missing_expression_scores_zero_and_duplicates_are_refused(cli, tmp_path):
    meta, mask_dict, square, other = _mevis_files(tmp_path)
    # Expression 0 predicted exactly (J = F = 1); expression 1 has no prediction at all: J = F = 0 (as the
    # official evaluation scores a video it does not find), although its frame 1 is empty in the GT.
    only_first = [{"id": "mevis-v1-0", "masks": [mask_to_rle(square | other), None]}]
    args = ["mevis", "--meta", meta, "--mask-dict", mask_dict, "--predictions"]
    assert cli.main(args + [_json(tmp_path / "p.json", only_first)]) == pytest.approx({"J": 50.0, "F": 50.0, "J&F": 50.0})
    png_root = tmp_path / "Annotations"
    (png_root / "v1" / "0").mkdir(parents=True)
    Image.fromarray(((square | other) * 255).astype(np.uint8)).save(png_root / "v1" / "0" / "00000.png")
    assert cli.main(args + [str(png_root)])["J"] == pytest.approx(50.0)  # folder 1 missing: 0 as well
    twice = [{"id": "mevis-v1-0", "masks": []}, {"video_id": "v1", "exp_id": "0", "masks": []}]
    with pytest.raises(ValueError, match="record 2: expression 'mevis-v1-0' appears twice"):
        cli.main(args + [_json(tmp_path / "twice.json", twice)])


def test_tracking_lasot_folder(cli, tmp_path):
    sequence = tmp_path / "LaSOT" / "cat" / "cat-1"
    sequence.mkdir(parents=True)
    (sequence / "groundtruth.txt").write_text("1,1,10,10\n" * 5)
    (sequence / "full_occlusion.txt").write_text("0,0,0,0,1")
    (sequence / "out_of_view.txt").write_text("0,0,0,0,0")
    results = tmp_path / "results"
    results.mkdir()
    (results / "cat-1.txt").write_text("50,50,5,5\n1,1,10,10\n6,1,10,10\nnan,nan,nan,nan\n90,90,3,3\n")
    (results / "dog-1.txt").write_text("1,1,10,10\n")  # no such GT sequence: reported, not scored
    metrics = cli.main(["tracking", "--predictions", str(results), "--ground-truth", str(tmp_path / "LaSOT"),
                        "--protocol", "lasot"])
    assert metrics["success_auc"] == pytest.approx(100 * (7 * 0.8 + 13 * 0.4) / 21)  # the absent frame fails
    assert metrics == pytest.approx(lasot_metrics([(np.loadtxt(results / "cat-1.txt", delimiter=","),
                                                    [[1, 1, 10, 10]] * 5, [1, 1, 1, 1, 0])]))
    (results / "cat-1.txt").unlink()
    with pytest.raises(ValueError, match=r"no prediction for 1 sequence\(s\) \(e.g. \['cat-1'\]\)"):
        cli.main(["tracking", "--predictions", str(results), "--ground-truth", str(tmp_path / "LaSOT")])


def test_tracking_got10k_folder_pools_runs_and_clips_to_meta_info(cli, tmp_path):
    sequence = tmp_path / "GOT-10k" / "val" / "GOT-10k_Val_000001"
    sequence.mkdir(parents=True)
    (sequence / "groundtruth.txt").write_text("1,1,10,10\n90,0,20,10\n1,1,10,10\n")
    (sequence / "cover.label").write_text("8\n8\n0\n")  # frame 2 invisible: left out
    (sequence / "absence.label").write_text("0\n0\n0\n")  # ignored: cover.label decides
    (sequence / "meta_info.ini").write_text("[METAINFO]\nurl: x\nresolution: (100, 100)\n")
    runs = tmp_path / "results" / "GOT-10k_Val_000001"
    runs.mkdir(parents=True)
    (runs / "GOT-10k_Val_000001_001.txt").write_text("1,1,10,10\n90,0,10,10\n0,0,1,1\n")  # IoU 1 after clipping
    (runs / "GOT-10k_Val_000001_002.txt").write_text("1,1,10,10\n0,0,5,5\n0,0,1,1\n")  # IoU 0
    (runs / "GOT-10k_Val_000001_time.txt").write_text("0.1\n0.1\n0.1\n")  # not a run
    metrics = cli.main(["tracking", "--predictions", str(tmp_path / "results"), "--ground-truth",
                        str(tmp_path / "GOT-10k"), "--protocol", "got10k"])
    assert metrics == pytest.approx({"AO": 50.0, "SR0.5": 50.0, "SR0.75": 50.0})


def test_tracking_records_refuse_duplicate_and_unknown_names(cli, tmp_path):
    gt = _json(tmp_path / "gt.json", [{"name": "a", "gt_xywh": [[1, 1, 4, 4]] * 2}])
    twice = _json(tmp_path / "p1.json", [{"name": "a", "pred_xywh": [[1, 1, 4, 4]] * 2}] * 2)
    with pytest.raises(ValueError, match="record 2: sequence 'a' appears twice"):
        cli.main(["tracking", "--predictions", twice, "--ground-truth", gt])
    unknown = _json(tmp_path / "p2.json", [{"name": "a", "pred_xywh": [[1, 1, 4, 4]] * 2},
                                           {"name": "b", "pred_xywh": [[1, 1, 4, 4]] * 2}])
    with pytest.raises(ValueError, match=r"1 prediction id\(s\) are not in the ground truth \(e.g. \['b'\]\)"):
        cli.main(["tracking", "--predictions", unknown, "--ground-truth", gt])
    gt_twice = _json(tmp_path / "gt2.json", [{"name": "a", "gt_xywh": [[1, 1, 4, 4]]}] * 2)
    with pytest.raises(ValueError, match="gt2.json record 2: sequence 'a' appears twice"):
        cli.main(["tracking", "--predictions", twice, "--ground-truth", gt_twice])


def test_mcqa_mvbench_rows(cli, tmp_path):
    gt = [{"question": "colour?", "candidates": ["red", "blue", "green"], "answer": "blue", "task_type": "attr"},
          {"question": "count?", "candidates": ["one", "two"], "answer": "one", "task_type": "count"},
          {"question": "where?", "candidates": ["left", "right"], "answer": "right", "task_type": "count"}]
    predictions = [{"prediction": "(B) blue"}, {"prediction": "two"}]  # right, wrong (text of B), third missing
    metrics = cli.main(["mcqa", "--predictions", _json(tmp_path / "p.json", predictions),
                        "--ground-truth", _json(tmp_path / "g.json", gt)])
    assert metrics == pytest.approx({"accuracy": 100 / 3, "unparsed": 100 / 3, "accuracy/attr": 100.0, "accuracy/count": 0.0,
                                     "mean_group_accuracy": 50.0})


def test_mcqa_lmms_eval_convention(cli, tmp_path):
    gt = [{"id": 1, "answer": "A"}, {"id": 2, "answer": "B"}, {"id": 3, "answer": "A"}]
    predictions = [{"id": 1, "prediction": "a"}, {"id": 2, "prediction": ""}, {"id": 3, "prediction": "A person runs"}]
    args = ["mcqa", "--predictions", _json(tmp_path / "p.json", predictions), "--ground-truth", _json(tmp_path / "g.json", gt)]
    assert cli.main(args)["accuracy"] == 0.0
    assert cli.main(args + ["--convention", "lmms-eval"]) == pytest.approx({"accuracy": 100.0, "unparsed": 0.0,
                                                                           "empty": 100 / 3})


def test_refcoco_pickled_refs_and_xywh_ties(cli, tmp_path):
    import pickle

    instances = {"images": [{"id": 1}], "annotations": [{"id": 7, "image_id": 1, "bbox": [318.48, 134.89, 13.25, 5.94]}]}
    refs = [{"ref_id": 3, "ann_id": 7, "split": "val", "sentences": [{"sent": "left"}]}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    # A half-width box: IoU 0.4999999999999997 in pycocotools' xywh arithmetic (a miss), 0.5000000000000001 in xyxy.
    predictions = [{"id": "refcoco-3-0-box", "bbox": [318.48, 134.89, 6.625, 5.94]}]
    args = ["refcoco", "--predictions", _json(tmp_path / "p.json", predictions), "--instances",
            _json(tmp_path / "instances.json", instances), "--refs", str(tmp_path / "refs(unc).p"), "--split", "val"]
    with pytest.raises(ValueError, match="read only with allow_pickle=True"):
        cli.main(args)
    assert cli.main(args + ["--allow-pickle"])["Acc@0.5"] == 0.0


def test_subcommand_help_documents_the_format(cli, capsys):
    with pytest.raises(SystemExit):
        cli.main(["tracking", "--help"])
    text = capsys.readouterr().out
    assert "groundtruth.txt" in text and "--protocol" in text


def test_bad_json_line_is_named(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"qid": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"p.jsonl line 2: not valid JSON"):
        read_records(str(bad))


@pytest.mark.slow
def test_script_end_to_end_and_error_exit(tmp_path):
    output = tmp_path / "m.json"
    ok = subprocess.run([sys.executable, str(SCRIPT), "qvhighlights", "--predictions", _jsonl(tmp_path / "p.jsonl", QVH_PRED),
                         "--ground-truth", _jsonl(tmp_path / "g.jsonl", QVH_GT), "--output", str(output)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(output.read_text())["brief"]["HL-min-VeryGood-Hit1"] == 50.0
    failed = subprocess.run([sys.executable, str(SCRIPT), "qvhighlights", "--predictions", str(tmp_path / "missing.jsonl"),
                             "--ground-truth", str(output)], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "missing.jsonl: no such file" in failed.stderr


@pytest.mark.slow
def test_scoring_subcommands_import_neither_torch_nor_transformers(tmp_path):
    # The whole process of a scoring subcommand pays only for numpy and the metrics;
    # benchmarks/bench_scoring_cli.py measures the wall time.
    runs = [
        ["qvhighlights", "--predictions", _jsonl(tmp_path / "p.jsonl", QVH_PRED),
         "--ground-truth", _jsonl(tmp_path / "g.jsonl", QVH_GT)],
        ["mcqa", "--predictions", _json(tmp_path / "a.json", [{"id": 1, "prediction": "A"}]),
         "--ground-truth", _json(tmp_path / "q.json", [{"id": 1, "answer": "A"}])],
        ["tracking", "--predictions", _json(tmp_path / "tp.json", [{"name": "a", "pred_xywh": [[1, 1, 4, 4]] * 2}]),
         "--ground-truth", _json(tmp_path / "t.json", [{"name": "a", "gt_xywh": [[1, 1, 4, 4]] * 2}])],
    ]
    code = (f"import runpy, sys\nfor argv in {runs!r}:\n    sys.argv = [{str(SCRIPT)!r}, *argv]\n"
            f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'datasets', 'scipy') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
