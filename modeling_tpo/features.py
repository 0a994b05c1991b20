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
