"""Temporal head: a DETR-style moment localiser over the MLLM's own per-frame features.

Inputs are what the MLLM already computed: the task embedding(s) (the last hidden states at the task
slot tokens), per-frame features (the last hidden states of each frame's visual tokens, averaged),
and the instruction's text-token features. A transformer encoder mixes frames with the query tokens
and the task embedding (which enters as extra text tokens, as in the release); learned moment
queries decode (center, width) spans and foreground logits; per-frame saliency is the similarity of
each encoded frame with the encoded task embedding.

Remote code: torch only.
"""

import math

import torch
from torch import nn

from .box_ops import span_cw_to_se
from .matcher import SpanHungarianMatcher
from .temporal_loss import DenseTemporalCriterion, TemporalCriterion

NO_SALIENCY = -1e4  # saliency given to padded frames


def time_encoding(times: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding of normalised times: (..., ) in [0, 1] -> (..., dim)."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, device=times.device, dtype=torch.float32) * (-math.log(1e4) / half))
    angles = times.float()[..., None] * 2 * math.pi * 100.0 * frequencies  # 100 cycles at the lowest wavelength
    encoding = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return nn.functional.pad(encoding, (0, dim - 2 * half))


class _MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class TemporalHead(nn.Module):
    """Moment retrieval and highlight detection from an MLLM's hidden states.

    Args:
        hidden_size: the LLM's hidden size. The other arguments are `DEFAULT_TEMPORAL_HEAD`'s keys.
    """

    def __init__(self, hidden_size: int, d_model: int = 256, num_heads: int = 8, num_encoder_layers: int = 2,
                 num_decoder_layers: int = 2, dim_feedforward: int = 1024, dropout: float = 0.1, num_queries: int = 10,
                 max_frames: int = 512, use_query_tokens: bool = True, aux_loss: bool = True,
                 span_l1_weight: float = 10.0, span_giou_weight: float = 1.0, label_weight: float = 4.0,
                 saliency_weight: float = 4.0, eos_coef: float = 0.1, saliency_margin: float = 0.2,
                 saliency_loss: str = "ranking", match_cost_span: float = 10.0, match_cost_giou: float = 1.0,
                 match_cost_class: float = 4.0, frame_pooling: str = "mean_max", decoder: str = "detr",
                 nms_iou: float = 0.7):
        super().__init__()
        if frame_pooling not in ("mean", "mean_max"):
            raise ValueError(f"frame_pooling must be 'mean' or 'mean_max', got {frame_pooling!r}.")
        if decoder not in ("detr", "dense"):
            raise ValueError(f"decoder must be 'detr' or 'dense', got {decoder!r}.")
        self.frame_pooling = frame_pooling
        self.decoder_type = decoder
        self.nms_iou = nms_iou
        self.d_model = d_model
        self.max_frames = max_frames
        self.use_query_tokens = use_query_tokens
        self.aux_loss = aux_loss
        frame_size = hidden_size * (2 if frame_pooling == "mean_max" else 1)
        self.frame_proj = nn.Sequential(nn.LayerNorm(frame_size), nn.Linear(frame_size, d_model))
        self.text_proj = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d_model))
        self.task_proj = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d_model))
        self.type_embedding = nn.Embedding(3, d_model)  # 0 frame, 1 query text, 2 task embedding
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, num_heads, dim_feedforward, dropout, batch_first=True, norm_first=True)
            for _ in range(num_encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(d_model)
        if decoder == "detr":
            self.query_embedding = nn.Embedding(num_queries, d_model)
            self.decoder = nn.ModuleList(
                nn.TransformerDecoderLayer(d_model, num_heads, dim_feedforward, dropout, batch_first=True,
                                           norm_first=True)
                for _ in range(num_decoder_layers)
            )
            self.decoder_norm = nn.LayerNorm(d_model)
            self.span_head = _MLP(d_model, d_model, 2, 3)
            self.class_head = nn.Linear(d_model, 2)
        else:  # dense: every frame predicts whether it lies in a moment and the distances to its ends
            self.frame_class = nn.Linear(d_model, 1)
            self.frame_offsets = _MLP(d_model, d_model, 2, 2)
        self.saliency_frame = nn.Linear(d_model, d_model)
        self.saliency_task = nn.Linear(d_model, d_model)
        weights = dict(span_l1_weight=span_l1_weight, span_giou_weight=span_giou_weight, label_weight=label_weight,
                       saliency_weight=saliency_weight, saliency_margin=saliency_margin, saliency_loss=saliency_loss)
        if decoder == "detr":
            self.criterion = TemporalCriterion(SpanHungarianMatcher(match_cost_span, match_cost_giou, match_cost_class),
                                               eos_coef=eos_coef, **weights)
        else:
            self.criterion = DenseTemporalCriterion(**weights)

    def forward(self, task_embeddings: torch.Tensor, frame_features: torch.Tensor, frame_mask: torch.Tensor,
                frame_times: torch.Tensor, query_features: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None) -> dict:
        """
        Args:
            task_embeddings: (n, k, hidden), hidden states at the k task slot tokens.
            frame_features: (n, F, hidden) per-frame pooled hidden states ((n, F, 2 * hidden) with
                `frame_pooling="mean_max"`, see `pool_frame_features`); frame_mask (n, F) bool.
            frame_times: (n, F), frame times normalised to [0, 1] by the video duration.
            query_features: (n, Q, hidden), instruction text-token hidden states; query_mask (n, Q) bool.
        Returns:
            pred_spans (n, num_queries, 2) normalised (center, width); pred_logits (n, num_queries, 2)
            (0 foreground, 1 no object); pred_saliency (n, F) (padded frames -1e4); frame_mask (n, F);
            frame_times (n, F); aux_outputs: a list of {pred_spans, pred_logits} per decoder layer but
            the last (when aux_loss). With `decoder="dense"`, num_queries = F (one moment per frame),
            plus pred_offsets (n, F, 2) and no aux_outputs.
        """
        n, num_frames = frame_mask.shape
        valid_frames = frame_mask.sum(-1)
        if num_frames < 2 or bool((valid_frames < 2).any()):
            bad = (valid_frames < 2).nonzero().flatten().tolist() if num_frames >= 2 else list(range(n))
            raise ValueError(
                f"Temporal query/queries {bad}: fewer frames than the head needs (at least 2 frames per video); "
                f"valid frames per query: {valid_frames.tolist()}. Sample more frames from the video."
            )
        if num_frames > self.max_frames:
            raise ValueError(f"{num_frames} frames exceed the temporal head's max_frames={self.max_frames}.")
        dtype = next(self.frame_proj.parameters()).dtype
        frames = self.frame_proj(frame_features.to(dtype)) + self.type_embedding.weight[0]
        frames = frames + time_encoding(frame_times, self.d_model).to(dtype)
        task = self.task_proj(task_embeddings.to(dtype)) + self.type_embedding.weight[2]  # (n, k, d)
        parts, masks = [frames, task], [frame_mask, torch.ones(task.shape[:2], dtype=torch.bool, device=task.device)]
        if self.use_query_tokens and query_features is not None:
            parts.insert(1, self.text_proj(query_features.to(dtype)) + self.type_embedding.weight[1])
            masks.insert(1, query_mask.bool() if query_mask is not None else torch.ones(query_features.shape[:2],
                                                                                         dtype=torch.bool, device=task.device))
        tokens = torch.cat(parts, dim=1)
        valid = torch.cat(masks, dim=1)
        for layer in self.encoder:
            tokens = layer(tokens, src_key_padding_mask=~valid)
        tokens = self.encoder_norm(tokens)
        encoded_frames = tokens[:, :num_frames]
        encoded_task = tokens[:, -task.shape[1]:].mean(1)  # (n, d)

        saliency = (self.saliency_frame(encoded_frames) * self.saliency_task(encoded_task)[:, None]).sum(-1)
        saliency = saliency / math.sqrt(self.d_model)
        saliency = saliency.masked_fill(~frame_mask, NO_SALIENCY)
        common = {"pred_saliency": saliency, "frame_mask": frame_mask, "frame_times": frame_times}
        if self.decoder_type == "dense":
            return {**self._predict_dense(encoded_frames, frame_times, frame_mask), **common}
        queries = self.query_embedding.weight[None].expand(n, -1, -1)
        hidden = queries
        per_layer = []
        for layer in self.decoder:
            hidden = layer(hidden + queries, tokens, memory_key_padding_mask=~valid)
            per_layer.append(self.decoder_norm(hidden))
        outputs = [self._predict(h) for h in per_layer]
        result = {**outputs[-1], **common}
        if self.aux_loss:
            result["aux_outputs"] = outputs[:-1]
        return result

    def _predict_dense(self, encoded_frames: torch.Tensor, frame_times: torch.Tensor, frame_mask: torch.Tensor) -> dict:
        """Per frame: a moment [t - d_start, t + d_end] (distances in units of the video duration) and a
        foreground logit; as (center, width) spans and (foreground, 0) logits like the DETR decoder's."""
        logit = self.frame_class(encoded_frames).squeeze(-1)  # (n, F)
        logit = logit.masked_fill(~frame_mask, NO_SALIENCY)
        offsets = self.frame_offsets(encoded_frames).sigmoid()  # (n, F, 2)
        times = frame_times.to(offsets.dtype)
        start = (times - offsets[..., 0]).clamp(0, 1)
        end = (times + offsets[..., 1]).clamp(0, 1)
        spans = torch.stack([(start + end) / 2, end - start], dim=-1)
        return {"pred_spans": spans, "pred_logits": torch.stack([logit, torch.zeros_like(logit)], dim=-1),
                "pred_offsets": offsets}

    def _predict(self, hidden: torch.Tensor) -> dict:
        return {"pred_spans": self.span_head(hidden).sigmoid(), "pred_logits": self.class_head(hidden)}

    def loss(self, outputs: dict, targets: list[dict], num_spans: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
        """Named terms (`temporal_span_l1`, `temporal_span_giou`, `temporal_label`,
        `temporal_saliency`, aux terms suffixed `_{i}`) and `temporal`, their weighted sum.
        `num_spans`: the span-loss normaliser (default: the number of target spans, averaged over
        processes under torch.distributed). Computed in float32 whatever the outputs' dtype.

        targets: one dict per query: `spans` (m, 2) normalised (start, end), m >= 1, and `saliency`
        (F,) >= 0 per frame or None.
        """
        num_frames = outputs["pred_saliency"].shape[1]
        if not _targets_pass_quick_check(targets, num_frames):
            message = _first_target_error(targets, num_frames)
            if message is not None:
                raise ValueError(message)
        return self.criterion(outputs, targets, num_spans)

    @torch.no_grad()
    def predict_windows(self, outputs: dict, top_k: int | None = None) -> list[list[tuple[float, float, float]]]:
        """Per query, (start, end, score) windows normalised to [0, 1], best first.

        DETR decoder: the moment queries' spans, score = foreground probability. Dense decoder: first the
        runs of consecutive frames whose foreground probability exceeds 0.5, each spanning its frames'
        segments (bounds halfway to the neighbouring frames, 0 and 1 at the ends), score = the run's mean
        probability; then the per-frame regressed windows, after non-maximum suppression against
        everything before them, scored below every run. Runs tie the window's extent to the per-frame
        decisions, which a model trained from scratch learns far sooner than the regressed offsets.
        """
        scores = outputs["pred_logits"].float().softmax(-1)[..., 0]
        spans = span_cw_to_se(outputs["pred_spans"].float()).clamp(0, 1)
        result = []
        for i, (query_scores, query_spans) in enumerate(zip(scores, spans)):
            if self.decoder_type == "dense":
                valid = outputs["frame_mask"][i]
                windows = _dense_windows(query_scores[valid], query_spans[valid],
                                         outputs["frame_times"][i][valid].float(), self.nms_iou)
            else:
                order = query_scores.argsort(descending=True)
                windows = [(float(query_spans[j, 0]), float(query_spans[j, 1]), float(query_scores[j])) for j in order]
            result.append(windows[:top_k])
        return result


def _targets_pass_quick_check(targets: list[dict], num_frames: int) -> bool:
    """Whether every target passes `_first_target_error`'s checks, looked at all at once: shapes on the
    host, values with a single read from the targets' device. False may be a false alarm (targets of
    different dtypes, compared after promotion); `_first_target_error` then decides."""
    saliency = [t["saliency"] for t in targets if t.get("saliency") is not None]
    if any(t["spans"].numel() == 0 for t in targets) or any(s.dim() != 1 or s.shape[0] > num_frames for s in saliency):
        return False
    if not targets:
        return True
    device = targets[0]["spans"].device
    spans = torch.cat([t["spans"].to(device) for t in targets])  # (total spans, 2), none empty
    bad = (spans[:, 0] >= spans[:, 1]).any() | ((spans < -1e-4) | (spans > 1 + 1e-4) | spans.isnan()).any()
    scores = torch.cat([s.to(device) for s in saliency]) if saliency else spans.new_zeros(0)
    if scores.numel():
        lowest, highest = scores.aminmax()
        bad = bad | ~((lowest >= 0) & (highest < float("inf")))  # NaN fails both
    return not bool(bad)


def _first_target_error(targets: list[dict], num_frames: int) -> str | None:
    """The error of the first invalid temporal target (which query, what is wrong, how to fix it), or None."""
    for i, target in enumerate(targets):
        spans = target["spans"]
        if spans.numel() == 0:
            return f"Temporal query {i} has no target span; every temporal sample needs one."
        bad = (spans[:, 0] >= spans[:, 1]) | (spans < -1e-4).any(-1) | (spans > 1 + 1e-4).any(-1) | spans.isnan().any(-1)
        if bool(bad.any()):
            return (f"Temporal query {i}: span {spans[bad][0].tolist()} must satisfy "
                    "0 <= start < end <= 1 (normalised by the video duration).")
        saliency = target.get("saliency")
        if saliency is not None:
            if saliency.dim() != 1 or saliency.shape[0] > num_frames:
                return (f"Temporal query {i}: saliency has shape {tuple(saliency.shape)}; expected "
                        f"(frames,) with at most {num_frames} frames (one score per head frame).")
            if not bool(torch.isfinite(saliency).all()) or bool((saliency < 0).any()):
                return (f"Temporal query {i}: saliency scores must be finite and >= 0 "
                        "(0 = not relevant); got negative or non-finite values.")
    return None


def frame_runs(probabilities: torch.Tensor, threshold: float = 0.5) -> list[tuple[int, int]]:
    """(first, last) frame indices of each run of consecutive frames with probability > threshold."""
    above = (probabilities > threshold).tolist()
    runs, start = [], None
    for index, on in enumerate(above + [False]):
        if on and start is None:
            start = index
        elif not on and start is not None:
            runs.append((start, index - 1))
            start = None
    return runs


def _dense_windows(probabilities: torch.Tensor, regressed_se: torch.Tensor, times: torch.Tensor,
                   nms_iou: float) -> list[tuple[float, float, float]]:
    """Windows of the dense decoder for one query, best first: (F,) frame probabilities, (F, 2)
    regressed (start, end) and (F,) frame times, all normalised (see `TemporalHead.predict_windows`)."""
    from .box_ops import pairwise_temporal_iou

    midpoints = ((times[1:] + times[:-1]) / 2).tolist()
    bounds_before, bounds_after = [0.0] + midpoints, midpoints + [1.0]
    runs = [(bounds_before[a], bounds_after[b], float(probabilities[a : b + 1].mean()))
            for a, b in frame_runs(probabilities)]
    runs.sort(key=lambda window: -window[2])
    order = probabilities.argsort(descending=True)
    candidates = regressed_se[order]
    if runs:  # a regressed window overlapping a run too much adds nothing
        taken = torch.tensor([w[:2] for w in runs], dtype=candidates.dtype, device=candidates.device)
        overlap, _ = pairwise_temporal_iou(candidates, taken)
        keep = (overlap <= nms_iou).all(-1)
        order, candidates = order[keep], candidates[keep]
    floor = runs[-1][2] if runs else 1.0  # regressed windows rank below every run
    kept = _nms(regressed_se, order, nms_iou) if order.numel() else order
    regressed = [(float(regressed_se[j, 0]), float(regressed_se[j, 1]), float(probabilities[j]) * floor) for j in kept]
    return runs + regressed


def _nms(spans_se: torch.Tensor, order: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of `order` (best first) kept by 1-D non-maximum suppression."""
    from .box_ops import pairwise_temporal_iou

    iou, _ = pairwise_temporal_iou(spans_se[order], spans_se[order])
    keep = []
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    for position in range(len(order)):
        if suppressed[position]:
            continue
        keep.append(position)
        suppressed |= iou[position].cpu() > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)] if keep else order[:0]
