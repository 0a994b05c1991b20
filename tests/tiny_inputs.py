"""Shared builders of the test suite; tests import them from here, never from another test file.

- Hand-built model inputs for tiny LLaVA and Qwen2-VL backbones (`SampleSpec`, `make_batch`: no processor
  involved), so that the model core is tested independently of the processing code.
- Tiny models: `build_model` (model and tokenizer) and `build_model_and_processor` (model in eval mode and its
  processor, SAM2 included when masks are a task); `weighted_loss`, the total loss recomputed from its terms.
- Sample records with their decoded media (`REGION`, `TEMPORAL`, `MASK_VIDEO`, `MASK_IMAGE`, `TEXT`,
  `TEXT_LONG`, `MEDIA` by id) and `generation_batch`, the processor's left-padded generation batch of them.
- Training records (`training_samples`) and their media loader (`fake_media`).
- Files in datasets' layouts: `write_tiny_video`, `write_lasot`, `write_got10k`.
"""

from dataclasses import dataclass, field

import av
import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tpo import TPOForConditionalGeneration
from tpo.processing.collator_tpo import collate_encoded
from tpo.processing.pipeline import MediaError
from tpo.processing.processing_tpo import TPOProcessor, encode_rle
from tpo.tiny import (
    build_tiny_tokenizer,
    random_media,
    tiny_llava_config,
    tiny_qwen2_vl_config,
    tiny_sam2_config,
)

QWEN_PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch * patch * patch
QWEN_GRID = (4, 4)  # 56 x 56 px images -> 4 x 4 patches -> 2 x 2 merged tokens


@dataclass
class SampleSpec:
    """One synthetic sample: its visual input and what its answer asks for."""

    visual: str = "image"  # "image", "video" or "none"
    num_frames: int = 4
    task: str | None = "region"  # begin+slot tokens appended to the answer; None: text answer
    num_queries: int = 1
    words: list[str] = field(default_factory=lambda: ["where", "is", "the", "red", "circle"])


def _visual_tokens(tokenizer, family: str, spec: SampleSpec, image_seq_length: int) -> list[int]:
    image = tokenizer.convert_tokens_to_ids("<image>")
    video = tokenizer.convert_tokens_to_ids("<video>")
    start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    end = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    merged = QWEN_GRID[0] * QWEN_GRID[1] // 4
    if spec.visual == "none":
        return []
    if family == "llava":
        frames = 1 if spec.visual == "image" else spec.num_frames
        return [image] * (image_seq_length * frames)
    if spec.visual == "image":
        return [start] + [image] * merged + [end]
    return [start] + [video] * (merged * spec.num_frames // 2) + [end]


def make_batch(tokenizer, config, specs: list[SampleSpec], family: str = "llava") -> dict:
    """Right-padded batch with labels on the answer, task labels, and one region box per region slot.

    Returns the model's keyword arguments.
    """
    token_ids = config.task_token_ids
    user, assistant, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>"))
    mllm = config.mllm_config
    image_seq_length = getattr(mllm, "image_seq_length", 0)
    rows, label_rows, task_labels = [], [], []
    boxes, box_batch = [], []
    pixel_values, pixel_values_videos, image_grids, video_grids = [], [], [], []
    for index, spec in enumerate(specs):
        words = tokenizer(" " + " ".join(spec.words), add_special_tokens=False).input_ids
        prompt = [user] + _visual_tokens(tokenizer, family, spec, image_seq_length) + words + [end, assistant]
        answer = tokenizer(" it is here", add_special_tokens=False).input_ids
        if spec.task is not None:
            for _ in range(spec.num_queries):
                answer += [token_ids[spec.task]["begin"], *token_ids[spec.task]["slots"]]
                if spec.task == "region":
                    boxes.append([0.1 + 0.1 * index, 0.2, 0.6, 0.7 + 0.05 * index])
                    box_batch.append(index)
        answer += [end]
        rows.append(prompt + answer)
        label_rows.append([-100] * len(prompt) + answer)
        task_labels.append({None: 0, "temporal": 1, "region": 2, "mask": 3}[spec.task])
        if spec.visual == "none":
            continue
        if family == "llava":
            size = mllm.vision_config.image_size
            frames = 1 if spec.visual == "image" else spec.num_frames
            pixel_values.append(torch.randn(frames, 3, size, size))
        elif spec.visual == "image":
            pixel_values.append(torch.randn(QWEN_GRID[0] * QWEN_GRID[1], QWEN_PATCH_DIM))
            image_grids.append([1, *QWEN_GRID])
        else:
            grid_t = spec.num_frames // 2
            pixel_values_videos.append(torch.randn(grid_t * QWEN_GRID[0] * QWEN_GRID[1], QWEN_PATCH_DIM))
            video_grids.append([grid_t, *QWEN_GRID])

    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (length - len(r)) for r in label_rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "task_labels": torch.tensor(task_labels),
    }
    if boxes:
        batch["region_boxes"] = torch.tensor(boxes)
        batch["region_batch_index"] = torch.tensor(box_batch)
    if pixel_values:
        batch["pixel_values"] = torch.cat(pixel_values)
    if family == "qwen2_vl":
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        video_id = tokenizer.convert_tokens_to_ids("<video>")
        batch["mm_token_type_ids"] = (input_ids == image_id).long() + 2 * (input_ids == video_id).long()
        if image_grids:
            batch["image_grid_thw"] = torch.tensor(image_grids)
        if pixel_values_videos:
            batch["pixel_values_videos"] = torch.cat(pixel_values_videos)
            batch["video_grid_thw"] = torch.tensor(video_grids)
    return batch


# ---------------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------------
FAMILIES = {
    "llava": (tiny_llava_config, LlavaForConditionalGeneration),
    "qwen2_vl": (tiny_qwen2_vl_config, Qwen2VLForConditionalGeneration),
}
SAM2_SIZE = 64


def build_model(family: str, tasks=("temporal", "region")):
    """A tiny `family` backbone wrapped with `tasks` (no SAM2); returns (model, tokenizer). Not seeded."""
    tokenizer = build_tiny_tokenizer()
    make_config, mllm_class = FAMILIES[family]
    mllm = mllm_class(make_config(tokenizer))
    model = TPOForConditionalGeneration.from_mllm(mllm, tasks=list(tasks), tokenizer=tokenizer)
    return model, tokenizer


def build_model_and_processor(family: str, tasks=("temporal", "region", "mask"), mask_head_config: dict | None = None):
    """Seeded tiny model (eval mode; SAM2 at `SAM2_SIZE` when "mask" is a task) and its processor (4 frames)."""
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    make_config, mllm_class = FAMILIES[family]
    mllm = mllm_class(make_config(tokenizer))
    if family == "llava":
        image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    else:
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2)
    sam2 = tiny_sam2_config(SAM2_SIZE) if "mask" in tasks else None
    model = TPOForConditionalGeneration.from_mllm(mllm, tasks=list(tasks), tokenizer=tokenizer, sam2_config=sam2,
                                                  **({"mask_head_config": mask_head_config} if mask_head_config else {}))
    processor = TPOProcessor.from_model_config(model.config, image_processor, tokenizer, num_frames=4,
                                               sam2_image_size=SAM2_SIZE if sam2 else None)
    return model.eval(), processor


LOSS_TERMS = ("lm", "assign", "temporal", "region", "mask")  # the terms the total loss sums


def weighted_loss(model, out) -> torch.Tensor:
    """The total loss by its definition: each top-level term of `out.loss_dict` times the model's weight for it."""
    weights = model.loss_weights
    return sum(weights[name] * out.loss_dict[name] for name in LOSS_TERMS if name in out.loss_dict)


# ---------------------------------------------------------------------------------------------------
# Sample records, their media, and the generation batch of them
# ---------------------------------------------------------------------------------------------------
FRAME_H, FRAME_W = 48, 64
_RNG = np.random.default_rng(0)

REGION = dict(id="r1", task="region", media_type="image", media_path="x.png", query="red circle",
              image_size=[128, 96], boxes_xyxy_pixels=[[12.0, 32.0, 48.0, 96.0]])
TEMPORAL = dict(id="t1", task="temporal", media_type="video", media_path="v.mp4", query="blue square",
                image_size=[56, 56], duration_seconds=8.0, spans_seconds=[[2.0, 5.0]],
                saliency_clip_ids=[1, 2], saliency_scores=[[4, 4, 3], [2, 2, 2]])


def _rect_rle(y0, y1, x0, x1):
    mask = np.zeros((FRAME_H, FRAME_W), bool)
    mask[y0:y1, x0:x1] = True
    return encode_rle(mask)


MASK_VIDEO = dict(id="mv1", task="mask", media_type="video", media_path="m.mp4", query="green triangle",
                  image_size=[FRAME_H, FRAME_W], duration_seconds=4.0, mask_frame_indices=[0, 4, 8],
                  masks_rle=[_rect_rle(10, 30, 10, 30), _rect_rle(12, 32, 14, 34), _rect_rle(14, 34, 18, 38)])
MASK_IMAGE = dict(id="mi1", task="mask", media_type="image", media_path="y.png", query="red circle",
                  image_size=[FRAME_H, FRAME_W], masks_rle=[_rect_rle(5, 25, 20, 50)])


def _text(sample_id: str, question: str) -> dict:
    return dict(id=sample_id, task="text", media_type="image", media_path="x.png", image_size=[64, 64],
                conversations=[{"role": "user", "content": "<image>\n" + question}])


TEXT = _text("c1", "What colour is it?")
TEXT_LONG = _text("c2", "What colour is the shape that moves up first, answer with the option letter?")
MEDIA = {
    "r1": {"image": _RNG.integers(0, 255, (128, 96, 3), dtype=np.uint8)},
    "t1": {"frames": _RNG.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8), "timestamps": [1.0, 3.0, 5.0, 7.0]},
    "mv1": {"frames": _RNG.integers(0, 255, (4, FRAME_H, FRAME_W, 3), dtype=np.uint8),
            "timestamps": [0.5, 1.5, 2.5, 3.5],
            "sam2_frames": _RNG.integers(0, 255, (3, FRAME_H, FRAME_W, 3), dtype=np.uint8)},
    "mi1": {"image": _RNG.integers(0, 255, (FRAME_H, FRAME_W, 3), dtype=np.uint8)},
    "c1": {"image": _RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8)},
    "c2": {"image": _RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8)},
}


def generation_batch(processor, samples, modes=None) -> dict:
    """Left-padded generation batch of `samples` with their `MEDIA` (the processor's layout), `tpo_meta` removed."""
    modes = modes or ["generate"] * len(samples)
    encoded = [processor.encode(s, mode=m) for s, m in zip(samples, modes)]
    batch = collate_encoded(processor, encoded, [MEDIA[s["id"]] for s in samples], padding_side="left")
    batch.pop("tpo_meta")
    return batch


# ---------------------------------------------------------------------------------------------------
# Training records and their media
# ---------------------------------------------------------------------------------------------------
def fake_media(plan: dict, targets: dict) -> dict:
    """Deterministic random pixels per media path; a path containing 'broken' fails like a corrupt file."""
    if "broken" in plan.get("path", ""):
        raise MediaError(f"Cannot read {plan['path']!r}")
    return random_media(plan)


def training_samples(n: int = 24) -> list[dict]:
    """`n` records cycling region (image), temporal (video) and text samples, 32 x 32 px."""
    rows = []
    for i in range(n):
        kind = i % 3
        base = dict(id=f"s{i}", source="test", split="train", media_path=f"img{i}.png", query="red circle",
                    image_size=[32, 32], conversations=[], boxes_xyxy_pixels=[], spans_seconds=[],
                    duration_seconds=0.0, media_type="image", task="region", saliency_clip_ids=[], saliency_scores=[])
        if kind == 0:
            rows.append({**base, "boxes_xyxy_pixels": [[4.0 + i % 5, 6.0, 20.0, 28.0]]})
        elif kind == 1:
            rows.append({**base, "task": "temporal", "media_type": "video", "media_path": f"vid{i}.mp4",
                         "duration_seconds": 8.0, "spans_seconds": [[2.0, 6.0]]})
        else:
            rows.append({**base, "task": "text", "conversations": [
                {"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "red"}]})
    return rows


# ---------------------------------------------------------------------------------------------------
# Files in datasets' layouts
# ---------------------------------------------------------------------------------------------------
def write_tiny_video(path, seconds: float, fps: int = 10):
    """A black 32 x 32 px MPEG-4 video of `seconds` at `fps`."""
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for _ in range(int(seconds * fps)):
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


TRACK_HEIGHT, TRACK_WIDTH = 48, 64  # frames of the tracking fixtures


def _frames(folder, boxes_xywh, extension=".jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    for index, (x, y, w, h) in enumerate(boxes_xywh):
        image = np.zeros((TRACK_HEIGHT, TRACK_WIDTH, 3), np.uint8)
        image[int(y): int(y + h), int(x): int(x + w)] = 255
        Image.fromarray(image).save(folder / f"{index + 1:08d}{extension}")


def _boxes(count, start=4):
    return [[start + i, 10, 16, 20] for i in range(count)]


def write_lasot(root, name="airplane-1", count=8, occluded=(), out_of_view=()):
    """A LaSOT sequence: a white box moving right one pixel a frame, with its annotation files."""
    folder = root / name.rsplit("-", 1)[0] / name
    boxes = _boxes(count)
    _frames(folder / "img", boxes)
    (folder / "groundtruth.txt").write_text("".join(",".join(str(v) for v in b) + "\n" for b in boxes))
    (folder / "full_occlusion.txt").write_text(",".join("1" if i in occluded else "0" for i in range(count)))
    (folder / "out_of_view.txt").write_text(",".join("1" if i in out_of_view else "0" for i in range(count)))
    (folder / "nlp.txt").write_text("white rectangle moving right\n")
    return folder


def write_got10k(root, name="GOT-10k_Val_000001", count=10, first_only=False):
    """A GOT-10k sequence (val layout; `first_only`: test layout, first box only), listed in `root`/list.txt."""
    folder = root / name
    boxes = _boxes(count)
    _frames(folder, boxes)
    rows = boxes[:1] if first_only else boxes
    (folder / "groundtruth.txt").write_text("".join(",".join(f"{v:.4f}" for v in b) + "\n" for b in rows))
    if not first_only:
        (folder / "absence.label").write_text("".join("1\n" if i == 3 else "0\n" for i in range(count)))
        (folder / "cover.label").write_text("".join("0\n" if i == 3 else "8\n" for i in range(count)))
    (folder / "meta_info.ini").write_text(f"[METAINFO]\nurl: https://youtu.be/x\nobject_class: ant\n"
                                          f"motion_class: walking\nresolution: ({TRACK_WIDTH}, {TRACK_HEIGHT})\n")
    with open(root / "list.txt", "a") as listing:
        listing.write(name + "\n")
    return folder
