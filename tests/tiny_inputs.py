"""Hand-built model inputs for tiny LLaVA and Qwen2-VL backbones (no processor involved), so that
the model core is tested independently of the processing code."""

from dataclasses import dataclass, field

import torch

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
