"""Multiple-choice benchmark readers on fixtures written here in each benchmark's published layout (MVBench's
per-task json + video table + TVQA frame folders, Video-MME's parquet, MLVU's numbered json files, a generic
jsonl), the prompts of each convention, the answer readers on hand-made answers, the accuracy breakdowns, and
bad input."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tpo.processing.benchmark_readers import (
    MVBENCH_TASKS,
    read_mlvu,
    read_multiple_choice,
    read_mvbench,
    read_videomme,
)
from tpo.processing.readers import read_spec
from tpo.processing.schema import empty_sample, validate_sample
from tpo.training.multiple_choice import EXTRACTORS, ChoiceAnswer, score_choices

MVBENCH_SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
                  "movement of objects, and the action and pose of persons. Based on your observations, select the "
                  "best option that accurately addresses the question.\n")


def _json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


@pytest.fixture
def mvbench(tmp_path):
    root = tmp_path / "MVBench"
    _json(root / "json" / "action_sequence.json", [
        {"video": "ZS9XR.mp4", "question": "What happened after the person took the food?",
         "candidates": ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle."],
         "answer": "Tidied up the blanket.", "start": 11.1, "end": 17.6},
    ])
    _json(root / "json" / "object_shuffle.json", [
        {"video": "video_10084.mp4", "question": "Where is the ball?", "candidates": ["left", "middle", "right"],
         "answer": "right"},
    ])
    _json(root / "json" / "episodic_reasoning.json", [
        {"video": "castle_s01e01_seg02_clip_00", "question": "Who speaks first?", "candidates": ["Castle", "Beckett"],
         "answer": "Beckett", "start": 1.0, "end": 2.4},
    ])
    frames = root / "video" / "tvqa" / "frames_fps3_hq" / "castle_s01e01_seg02_clip_00"
    frames.mkdir(parents=True)
    for index in range(1, 13):  # 4 s at 3 fps
        Image.fromarray(np.full((8, 8, 3), index, np.uint8)).save(frames / f"{index:05d}.jpg")
    later = root / "video" / "data0613" / "perception" / "videos"  # a file the release added later
    later.mkdir(parents=True)
    (later / "video_10084.mp4").write_bytes(b"")
    return root


def test_mvbench_rows_prompts_bounds_and_frames(mvbench):
    rows = {r["id"]: r for r in read_mvbench(str(mvbench), tasks=["action_sequence", "object_shuffle",
                                                                   "episodic_reasoning"])}
    sequence = rows["mvbench-action_sequence-0"]
    assert sequence["task"] == "text" and sequence["answer"] == "B" and sequence["media_type"] == "video"
    assert sequence["options"] == ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle."]
    assert sequence["media_path"] == str(mvbench / "video" / "star" / "Charades_v1_480" / "ZS9XR.mp4")
    assert sequence["clip_seconds"] == pytest.approx([11.1, 17.6])
    assert sequence["conversations"] == [{"role": "user", "content": (
        MVBENCH_SYSTEM + "Question: What happened after the person took the food?\nOptions:\n(A) Ate the medicine.\n"
        "(B) Tidied up the blanket.\n(C) Put down the cup/glass/bottle.\nOnly give the best option.")}]
    meta = json.loads(sequence["meta"])
    assert meta == {"benchmark": "mvbench", "convention": "official", "task_type": "action_sequence",
                    "question_id": "action_sequence-0", "video": "ZS9XR.mp4"}
    shuffle = rows["mvbench-object_shuffle-0"]
    assert shuffle["answer"] == "C" and shuffle["clip_seconds"] == []  # unbounded task
    assert shuffle["media_path"] == str(mvbench / "video" / "data0613" / "perception" / "videos" / "video_10084.mp4")
    episodic = rows["mvbench-episodic_reasoning-0"]
    assert episodic["media_type"] == "frames" and episodic["fps"] == 3.0
    # bound 1.0-2.4 s at 3 fps: frames round(3.0)=3 .. round(7.2)=7, numbered from 1
    assert [p.rsplit("/", 1)[1] for p in episodic["frame_paths"]] == [f"{i:05d}.jpg" for i in range(3, 8)]
    unbounded = read_mvbench(str(mvbench), tasks=["action_sequence"], use_bounds=False)[0]
    assert unbounded["clip_seconds"] == []


def test_mvbench_table_and_lmms_eval_prompt(mvbench):
    assert len(MVBENCH_TASKS) == 20 and sum(t.bounded for t in MVBENCH_TASKS.values()) == 5
    row = read_spec({"format": "mvbench", "root": str(mvbench), "tasks": ["object_shuffle"],
                     "convention": "lmms_eval"})[0]
    assert row["conversations"][0]["content"] == (
        "Question:Where is the ball?\nOption:\n(A) left\n(B) middle\n(C) right\n"
        "Answer with the option's letter from the given choices directly.")
    assert json.loads(row["meta"])["convention"] == "lmms_eval"


def _videomme_records():
    return [
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
         "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "When demonstrating the Germany modern Christmas tree is "
         "initially decorated with apples, candles and berries, which kind of the decoration has the largest number?",
         "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."],
         "answer": "C"},
        {"video_id": "301", "duration": "medium", "domain": "Sports Competition", "sub_category": "Football",
         "url": "u", "videoID": "Xq0Wq3zHx4E", "question_id": "301-2", "task_type": "Action Recognition",
         "question": "What does the player do?", "options": ["A. Kicks.", "B. Runs.", "C. Falls.", "D. Waves."],
         "answer": "A"},
    ]


def test_videomme_parquet(tmp_path):
    path = tmp_path / "videomme" / "test-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(_videomme_records()), path)
    rows = {r["id"]: r for r in read_videomme(str(path), str(tmp_path / "data"))}
    first = rows["videomme-001-1"]
    assert first["options"] == ["Apples.", "Candles.", "Berries.", "The three kinds are of the same number."]
    assert first["answer"] == "C" and first["media_path"] == str(tmp_path / "data" / "fFjv93ACGo8.mp4")
    assert first["conversations"][0]["content"] == (
        "Select the best answer to the following multiple-choice question based on the video. Respond with only the "
        "letter (A, B, C, or D) of the correct option.\n" + _videomme_records()[0]["question"] +
        "\nA. Apples.\nB. Candles.\nC. Berries.\nD. The three kinds are of the same number.\nThe best answer is:")
    meta = json.loads(first["meta"])
    assert (meta["task_type"], meta["category"], meta["duration_class"]) == ("Counting Problem", "Knowledge", "short")
    assert [r["id"] for r in read_videomme(str(path), str(tmp_path), durations=["medium"])] == ["videomme-301-2"]
    jsonl = tmp_path / "videomme.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _videomme_records()))
    assert [r["answer"] for r in read_spec({"format": "videomme", "annotations": str(jsonl),
                                            "video_dir": str(tmp_path)})] == ["C", "A"]


def test_mlvu_numbered_files(tmp_path):
    root = tmp_path / "MLVU"
    _json(root / "json" / "1_plotQA.json", [
        {"video": "movie101_66.mp4", "duration": 246, "question": "What color is the main male character in the video?",
         "candidates": ["Yellow", "Red", "Green", "Blue"], "answer": "Yellow", "question_type": "plotQA"}])
    _json(root / "json" / "4_count.json", [
        {"video": "count_1.mp4", "duration": 600.5, "question": "How many times?", "candidates": ["1", "2", "3"],
         "answer": "3", "question_type": "count"}])
    rows = {r["id"]: r for r in read_mlvu(str(root), tasks=["plotQA", "count"])}
    plot = rows["mlvu-plotQA-0"]
    assert plot["answer"] == "A" and plot["duration_seconds"] == 246.0
    assert plot["media_path"] == str(root / "video" / "1_plotQA" / "movie101_66.mp4")
    assert plot["conversations"][0]["content"].startswith(
        "Carefully watch this video and pay attention to every detail.")
    assert plot["conversations"][0]["content"].endswith("(D) Blue\nOnly give the best option.")
    assert rows["mlvu-count-0"]["answer"] == "C" and json.loads(rows["mlvu-count-0"]["meta"])["task_type"] == "count"


def test_generic_jsonl_with_field_names(tmp_path):
    path = tmp_path / "questions.jsonl"
    records = [{"qid": "q1", "q": "Which colour?", "choices": ["(A) red", "(B) blue"], "gt": 1, "clip": "a.mp4",
                "kind": "colour", "t0": 1.0, "t1": 3.0},
               {"qid": "q2", "q": "Which shape?", "choices": ["circle", "square", "star"], "gt": "star", "clip": "b.mp4",
                "kind": "shape"},
               {"qid": "q3", "q": "Moving?", "choices": ["yes", "no"], "gt": "A", "clip": "c.mp4", "kind": "motion"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    fields = {"id": "qid", "question": "q", "options": "choices", "answer": "gt", "media": "clip", "task_type": "kind",
              "start": "t0", "end": "t1"}
    rows = read_spec({"format": "multiple_choice", "json": str(path), "media_dir": str(tmp_path), "fields": fields,
                      "dataset_name": "shapes"})
    assert [r["id"] for r in rows] == ["shapes-q1", "shapes-q2", "shapes-q3"]
    assert [r["answer"] for r in rows] == ["B", "C", "A"]
    assert rows[0]["options"] == ["red", "blue"] and rows[0]["clip_seconds"] == pytest.approx([1.0, 3.0])
    assert rows[1]["conversations"][0]["content"] == (
        "Which shape?\n(A) circle\n(B) square\n(C) star\nAnswer with the option's letter from the given choices "
        "directly.")
    assert json.loads(rows[2]["meta"])["task_type"] == "motion"


def _bad(tmp_path, reader, record, **kwargs):
    if reader == "mvbench":
        _json(tmp_path / "json" / "object_shuffle.json", [record])
        return read_mvbench(str(tmp_path), tasks=["object_shuffle"], **kwargs)
    if reader == "videomme":
        path = _json(tmp_path / "videomme.json", [record])
        return read_videomme(str(path), str(tmp_path), **kwargs)
    path = _json(tmp_path / "q.json", [record])
    return read_multiple_choice(str(path), str(tmp_path), **kwargs)


MV = {"video": "v.mp4", "question": "q?", "candidates": ["x", "y"], "answer": "y"}
VM = {"videoID": "v", "question": "q?", "options": ["A. x", "B. y", "C. z", "D. w"], "answer": "B"}
GEN = {"question": "q?", "options": ["x", "y"], "answer": "A", "video": "v.mp4"}


@pytest.mark.parametrize("reader, record, message", [
    ("mvbench", {k: v for k, v in MV.items() if k != "candidates"}, r"object_shuffle.json record 0: missing field\(s\) "
                                                                    r"\['candidates'\]"),
    ("mvbench", {**MV, "answer": "z"}, r"record 0: the answer 'z' is not one of the options \['x', 'y'\]"),
    ("mvbench", {**MV, "candidates": "x"}, r"record 0: options must be a list"),
    ("videomme", {**VM, "options": ["A. x", "y", "C. z", "D. w"]}, r"record 0: option 2 'y' is not lettered; expected "
                                                                   r"it to start with 'B. '"),
    ("videomme", {**VM, "answer": "E"}, r"record 0: the answer letter 'E' is outside the options \(A, B, C, D\)"),
    ("videomme", {**VM, "duration": "huge"}, r"duration 'huge' is not one of"),
    ("videomme", {k: v for k, v in VM.items() if k != "videoID"}, r"missing field\(s\) \['videoID'\]"),
    ("generic", {**GEN, "answer": "C"}, r"q.json record 0: the answer letter 'C' is outside the options \(A, B\)"),
    ("generic", {**GEN, "answer": "zebra"}, r"the answer 'zebra' is neither an option letter \(AB\)"),
    ("generic", {**GEN, "answer": 5}, r"the answer index 5 is outside the 2 options"),
    ("generic", {k: v for k, v in GEN.items() if k != "video"}, r"missing field\(s\) \['video'\]"),
    ("generic", 7, r"record 0: expected an object"),
])
def test_bad_question_files_name_the_file_and_record(tmp_path, reader, record, message):
    with pytest.raises(ValueError, match=message):
        _bad(tmp_path, reader, record)


def test_bad_reader_arguments(tmp_path, mvbench):
    with pytest.raises(ValueError, match=r"Unknown MVBench task\(s\) \['shuffle'\]"):
        read_mvbench(str(mvbench), tasks=["shuffle"])
    with pytest.raises(FileNotFoundError, match=r"action_antonym.json"):
        read_mvbench(str(mvbench))
    with pytest.raises(ValueError, match=r"\['summary'\] are generation tasks"):
        read_mlvu(str(tmp_path), tasks=["summary"])
    with pytest.raises(ValueError, match=r"Unknown convention 'vlmeval'"):
        read_mvbench(str(mvbench), tasks=["object_shuffle"], convention="vlmeval")
    with pytest.raises(ValueError, match=r"Unknown field key\(s\) \['video'\]"):
        read_multiple_choice(str(tmp_path / "q.json"), fields={"video": "clip"})


# ---------------------------------------------------------------------------------------------------
# Answer reading and scoring
# ---------------------------------------------------------------------------------------------------
OPTIONS4 = ["w", "x", "y", "z"]


@pytest.mark.parametrize("extractor, response, letter", [
    ("mvbench", "B) Tidied up the blanket.", "B"),  # after "Best option:(": "(B)" is the option
    ("mvbench", "B", "B"),
    ("mvbench", "b). because", "B"),
    ("mvbench", "", None),  # MVBench's own check would accept this for any option (documented)
    ("mvbench", "The answer is B", None),
    ("mvbench", "E) other", None),  # not an option
    ("mlvu", "C) Berries", "C"),
    ("mlvu", "c) berries", None),  # exact, case-sensitive
    ("mlvu", "C", "C"),
    ("videomme", "The best answer is: D", "D"),
    ("videomme", "A person kicks the ball", "A"),  # the first capital A-D anywhere
    ("videomme", "the player kicks", None),
    ("videomme", "The best option is C", "C"),
    ("lmms_eval_mcq", "a", "A"),  # lowercase read as the letter
    ("lmms_eval_mcq", "C. Berries", "C"),
    ("lmms_eval_mcq", "I think (d) is right", "D"),
    ("lmms_eval_mcq", "none of them", None),
    ("lenient", "Answer: (C)", "C"),
    ("lenient", "y", "C"),  # an option's text
])
def test_answer_readers(extractor, response, letter):
    assert EXTRACTORS[extractor](response, OPTIONS4) == letter


def _answer(i, letter, answer, task, drops=False, response=None, **groups):
    return ChoiceAnswer(id=str(i), response=response if response is not None else (letter or "?"), letter=letter,
                        answer=answer, options=OPTIONS4, drops_empty=drops, groups={"task_type": task, **groups})


def test_scores_count_unanswered_as_wrong_with_breakdowns():
    answers = [_answer(0, "A", "A", "count", duration_class="short"),
               _answer(1, "B", "A", "count", duration_class="short"),
               _answer(2, None, "C", "count", duration_class="long"),
               _answer(3, "D", "D", "order", duration_class="long")]
    scores = score_choices(answers)
    assert scores["questions"] == 4 and scores["unanswered"] == 1 and scores["dropped_empty"] == 0
    assert scores["accuracy"] == pytest.approx(50.0)  # 2 of 4: the unread answer is wrong
    assert scores["accuracy_of_answered"] == pytest.approx(200 / 3)  # 2 of the 3 read
    assert scores["task_type/count"] == pytest.approx(100 / 3) and scores["task_type/order"] == pytest.approx(100.0)
    assert scores["mean_task_type_accuracy"] == pytest.approx((100 / 3 + 100) / 2)  # MVBench "Avg", MLVU M-Avg
    assert scores["duration_class/short"] == pytest.approx(50.0) and scores["duration_class/long"] == pytest.approx(50.0)
    assert "category/None" not in scores and "mean_category_accuracy" not in scores


def test_lmms_eval_convention_drops_empty_answers():
    answers = [_answer(0, "A", "A", "t", drops=True), _answer(1, None, "B", "t", drops=True, response=""),
               _answer(2, None, "B", "t", drops=True, response="no idea")]
    scores = score_choices(answers)
    assert scores["dropped_empty"] == 1 and scores["questions"] == 2 and scores["unanswered"] == 1
    assert scores["accuracy"] == pytest.approx(50.0)
    assert score_choices([_answer(0, "A", "A", "t"), _answer(1, None, "B", "t", response="")])["accuracy"] == 50.0


# ---------------------------------------------------------------------------------------------------
# Clips: frames sampled inside a question's bound
# ---------------------------------------------------------------------------------------------------
def test_clip_seconds_samples_frames_inside_the_bound(tiny_tokenizer):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from tpo.processing.processing_tpo import TPOProcessor

    processor = TPOProcessor(SiglipImageProcessorPil(size={"height": 32, "width": 32}), tiny_tokenizer,
                             image_seq_length=16, num_frames=4)
    sample = {"id": "q", "task": "text", "media_type": "video", "media_path": "v.mp4", "image_size": [32, 32],
              "duration_seconds": 10.0, "clip_seconds": [2.0, 6.0],
              "conversations": [{"role": "user", "content": "What happens?"}]}
    # the middle of 4 equal segments of [2, 6] s
    assert processor.encode(sample, mode="generate").media["timestamps"] == pytest.approx([2.5, 3.5, 4.5, 5.5])
    # an end past the video is cut at its end: [8, 10] s
    clipped = processor.encode({**sample, "clip_seconds": [8.0, 30.0]}, mode="generate").media["timestamps"]
    assert clipped == pytest.approx([8.25, 8.75, 9.25, 9.75])
    with pytest.raises(ValueError, match=r"clip_seconds \[12.0, 14.0\] holds no part of the 10.000 s video"):
        processor.encode({**sample, "clip_seconds": [12.0, 14.0]}, mode="generate")
    with pytest.raises(ValueError, match=r"clip_seconds \[3.0, 1.0\] must be \[start, end\]"):
        validate_sample(empty_sample(id="q", clip_seconds=[3.0, 1.0]))
    grounding = {**sample, "task": "temporal", "query": "a dog", "spans_seconds": [[2.0, 3.0]]}
    with pytest.raises(ValueError, match="`clip_seconds` is supported for text samples only"):
        processor.encode(grounding, mode="train")
