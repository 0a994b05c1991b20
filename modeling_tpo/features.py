"""Features the heads read from the MLLM's last hidden states: per-frame pooling and token gathering.

Remote code: torch only.
"""

import torch


def pool_frame_features(
    hidden_states: torch.Tensor, frame_token_index: torch.LongTensor, num_frames: int, pooling: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the hidden states of each frame's visual tokens.

    Args:
        hidden_states: (n, seq, hidden).
        frame_token_index: (n, seq), the frame of each visual token, -1 for other tokens.
        num_frames: F, the number of frame slots to return.
        pooling: "mean", or "mean_max" (mean and max concatenated: the max keeps a small object that
            the mean over a frame's tokens dilutes).
    Returns:
        frame_features (n, F, hidden) or (n, F, 2 * hidden) (zeros for frames without tokens) and
        frame_mask (n, F) bool.

    Scatter reductions over the sequence: O(seq * hidden) time and memory, whatever the number of frames (a
    (frames, seq) membership product or mask would be O(frames * seq * hidden): gigabytes for a long video in
    a 7 B MLLM). The max's gradient goes to a frame's maximal token, split evenly between tied tokens.
    """
    if pooling not in ("mean", "mean_max"):
        raise ValueError(f"Unknown frame pooling {pooling!r}; use 'mean' or 'mean_max'.")
    n, _, hidden = hidden_states.shape
    index = frame_token_index.to(hidden_states.device).long()
    index = torch.where((index >= 0) & (index < num_frames), index, num_frames)  # other tokens -> slot F, dropped
    counts = torch.zeros(n, num_frames + 1, dtype=torch.long, device=index.device)
    counts = counts.scatter_add(1, index, torch.ones_like(index))[:, :num_frames]  # (n, F)
    present = counts > 0
    spread = index[..., None].expand(-1, -1, hidden)  # (n, seq, hidden)
    sums = hidden_states.new_zeros(n, num_frames + 1, hidden).scatter_add(1, spread, hidden_states)[:, :num_frames]
    mean = sums / counts.clamp(min=1)[..., None].to(hidden_states.dtype)
    if pooling == "mean":
        return mean, present
    lowest = hidden_states.new_full((n, num_frames + 1, hidden), torch.finfo(hidden_states.dtype).min)
    maximum = lowest.scatter_reduce(1, spread, hidden_states, reduce="amax", include_self=True)[:, :num_frames]
    return torch.cat([mean, maximum.masked_fill(~present[..., None], 0.0)], dim=-1), present


def gather_token_features(hidden_states: torch.Tensor, token_mask: torch.Tensor, return_order: bool = False):
    """The hidden states of the marked tokens of each row, left-aligned and padded.

    Args:
        hidden_states: (n, seq, hidden); token_mask: (n, seq) bool.
    Returns:
        features (n, Q, hidden) with Q the largest count (at least 1) and mask (n, Q) bool (and, with
        `return_order`, the (n, Q) sequence positions gathered, to gather aligned tensors).
    """
    token_mask = token_mask.to(hidden_states.device).bool()
    counts = token_mask.sum(-1)
    width = max(int(counts.max().item()) if counts.numel() else 0, 1)
    # Stable sort puts the marked positions first, in their original order.
    order = torch.argsort((~token_mask).to(torch.int8), dim=-1, stable=True)[:, :width]
    features = torch.gather(hidden_states, 1, order[..., None].expand(-1, -1, hidden_states.shape[-1]))
    mask = torch.arange(width, device=hidden_states.device)[None, :] < counts[:, None]
    if return_order:
        return features * mask[..., None].to(features.dtype), mask, order
    return features * mask[..., None].to(features.dtype), mask


def normalised_frame_times(
    frame_mask: torch.Tensor, frame_timestamps: torch.Tensor | None, video_durations: torch.Tensor | None
) -> torch.Tensor:
    """(n, F) frame times in [0, 1]: timestamp / duration when given, else the middle of F equal
    segments (frames sampled uniformly)."""
    n, num_frames = frame_mask.shape
    if frame_timestamps is not None and video_durations is not None:
        times = frame_timestamps[:, :num_frames].to(frame_mask.device).float()
        durations = video_durations.to(frame_mask.device).float().clamp(min=1e-6)[:, None]
        return (times / durations).clamp(0.0, 1.0)
    positions = (torch.arange(num_frames, device=frame_mask.device).float() + 0.5) / num_frames
    return positions[None, :].expand(n, -1)


DENSE_SETTING = "temporal_head_config['dense_clip_seconds']"  # named in the errors of dense temporal features
DENSE_CHUNK_IMAGES = 32  # clip frames per vision-tower call: bounds the activation memory of long videos


@torch.no_grad()
def vision_clip_features(mllm, dense_inputs: dict, pooling: str = "mean") -> torch.Tensor:
    """Per-clip features from the MLLM's own vision tower (and projector), frozen: computed without gradient.

    Args:
        mllm: the wrapped vision-language model; its base model's `get_image_features` gives each image's visual
            tokens in the LLM's hidden size (LLaVA, Qwen2-VL, Qwen2.5-VL).
        dense_inputs: the collator's `dense_*` vision inputs of every clip frame, sample by sample
            (`dense_pixel_values` (K, ...), and `dense_image_grid_thw` (K, 3) for Qwen2-VL).
        pooling: "mean" or "mean_max" over each clip's tokens (the temporal head's `frame_pooling`).
    Returns:
        (K, hidden) or (K, 2 * hidden) clip features. Clips go through the tower `DENSE_CHUNK_IMAGES` at a time
        and are pooled at once, so memory holds one chunk's tokens, not the whole video's.
    """
    base = mllm.base_model
    get_features = getattr(base, "get_image_features", None)
    if get_features is None:
        raise ValueError(f"{DENSE_SETTING} > 0 needs per-frame features from the MLLM's vision tower, but "
                         f"{type(base).__name__} has no `get_image_features`; set it to 0 for this MLLM.")
    inputs = {key.removeprefix("dense_"): value for key, value in dense_inputs.items() if key != "dense_clip_timestamps"}
    pixels = inputs.pop("pixel_values")
    grid = inputs.pop("image_grid_thw", None)
    if inputs:
        raise ValueError(f"{DENSE_SETTING}: unexpected dense vision inputs {sorted('dense_' + k for k in inputs)}.")
    count = grid.shape[0] if grid is not None else pixels.shape[0]
    patches = grid.prod(-1).tolist() if grid is not None else [1] * count  # rows of `pixels` per clip
    starts = [sum(patches[:i]) for i in range(count + 1)]
    pooled = []
    for first in range(0, count, DENSE_CHUNK_IMAGES):
        last = min(first + DENSE_CHUNK_IMAGES, count)
        chunk = {"pixel_values": pixels[starts[first]:starts[last]]}
        if grid is not None:
            chunk["image_grid_thw"] = grid[first:last]
        try:
            output = get_features(**chunk)
        except (TypeError, ValueError, AttributeError) as error:  # the call does not fit this tower
            raise ValueError(f"{DENSE_SETTING} > 0: {type(base).__name__}.get_image_features cannot give per-frame "
                             f"features of the dense clips ({error}); set it to 0 for this MLLM.") from error
        features = getattr(output, "pooler_output", output)
        if torch.is_tensor(features) and features.dim() == 3:
            features = list(features)
        if not isinstance(features, (list, tuple)) or len(features) != last - first:
            raise ValueError(f"{DENSE_SETTING} > 0: {type(base).__name__}.get_image_features gave no per-image "
                             f"features for {last - first} clip frames; set it to 0 for this MLLM.")
        for tokens in features:  # (tokens, hidden)
            tokens = tokens.reshape(-1, tokens.shape[-1])
            mean = tokens.mean(0)
            pooled.append(torch.cat([mean, tokens.amax(0)]) if pooling == "mean_max" else mean)
    return torch.stack(pooled)


def nearest_frame_index(clip_times: torch.Tensor, frame_times: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """(n, K) clip times and (n, F) frame times (same units) with (n, F) validity -> (n, K) index of the valid frame
    nearest each clip (the earlier one on ties)."""
    distance = (clip_times[:, :, None] - frame_times[:, None, :]).abs()
    return distance.masked_fill(~frame_mask[:, None, :], float("inf")).argmin(-1)


def dense_clip_frames(mllm, dense_inputs: dict | None, sample: torch.Tensor, durations: torch.Tensor | None,
                      frame_features: torch.Tensor, frame_mask: torch.Tensor, frame_times: torch.Tensor,
                      pooling: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The temporal head's frames when they are dense clips, for the temporal queries of samples `sample` (q,).

    Args:
        dense_inputs: the batch's `dense_*` inputs: `dense_clip_timestamps` (batch, K) seconds (-1 padded) and the
            clips' vision inputs, sample by sample (see `vision_clip_features`).
        durations: (batch,) video durations in seconds.
        frame_features, frame_mask, frame_times: the queries' LLM frames (q, F, D), (q, F), (q, F) normalised.
    Returns:
        the LLM frame features nearest each clip (q, K, D), the clips' vision features (q, K, D), the clip mask
        (q, K) and the clip times (q, K) normalised by the duration.
    """
    samples = sorted(set(sample.tolist()))
    if not dense_inputs or dense_inputs.get("dense_clip_timestamps") is None or durations is None:
        raise ValueError(f"Sample(s) {samples}: {DENSE_SETTING} > 0 but the batch has no dense clips "
                         "(`dense_clip_timestamps`, `dense_pixel_values`, `video_durations`): build the processor with "
                         "TPOProcessor.from_model_config, whose plans and collator provide them.")
    device = frame_features.device
    timestamps = dense_inputs["dense_clip_timestamps"].to(device).float()
    present = timestamps >= 0  # (batch, K)
    vision = {k: v.to(device) for k, v in dense_inputs.items() if k != "dense_clip_timestamps" and torch.is_tensor(v)}
    features = vision_clip_features(mllm, vision, pooling)  # (clips of the batch, D)
    if features.shape[0] != int(present.sum()):
        raise ValueError(f"{DENSE_SETTING}: {features.shape[0]} clip features for {int(present.sum())} clip times "
                         "(`dense_clip_timestamps` >= 0); give one vision input per clip, sample by sample.")
    per_sample = features.new_zeros(*present.shape, features.shape[-1])
    per_sample[present] = features  # row-major: sample by sample, clip by clip
    clip_mask = present[sample]
    short = sample[clip_mask.sum(-1) < 2]
    if short.numel():
        raise ValueError(f"Sample(s) {sorted(set(short.tolist()))}: fewer than 2 dense clips; the temporal head needs "
                         f"at least 2 per video (lower {DENSE_SETTING} or drop the video).")
    clip_times = (timestamps[sample] / durations.to(device).float()[sample].clamp(min=1e-6)[:, None]).clamp(0.0, 1.0)
    nearest = nearest_frame_index(clip_times, frame_times.float(), frame_mask)
    aligned = frame_features.gather(1, nearest[..., None].expand(-1, -1, frame_features.shape[-1]))
    return aligned, per_sample[sample].to(aligned.dtype), clip_mask, clip_times.masked_fill(~clip_mask, 0.0)
