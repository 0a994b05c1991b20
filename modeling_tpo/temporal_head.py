"""Temporal head: a DETR-style moment localiser over the MLLM's own per-frame features.
Optional parts: `TemporalHead`; README.md, "The model" and "Dense temporal features".

Remote code: torch only.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from .box_ops import invalid_span_rows, span_cw_to_se
from .configuration_tpo import TemporalHeadConfig
from .matcher import SpanHungarianMatcher
from .temporal_layers import MLP, AnchorDecoder, QueryAwareFrames, input_dropout, time_encoding
from .temporal_loss import DenseTemporalCriterion, TemporalCriterion

NO_SALIENCY = -1e4  # saliency given to padded frames



@dataclass
class TemporalHeadOutput(ModelOutput):
    r"""
    The temporal head's outputs (see `TemporalHead.forward`); in `TPOOutput.temporal_outputs` also `batch_index`.

    pred_spans (`(n, num_queries, 2)`): normalised (center, width); pred_logits (`(n, num_queries, 2)`): 0
        foreground, 1 no object; pred_saliency (`(n, F)`): padded frames NO_SALIENCY.
    frame_mask (`(n, F)` bool), frame_times (`(n, F)` normalised): the head's frames.
    aux_outputs (`list[dict]`): `pred_spans`, `pred_logits` of every decoder layer but the last (`aux_loss`).
    pred_offsets (`(n, F, 2)`): the dense decoder's distances to each frame's moment start and end.
    pred_t2v_relevance (`(n, F)` in [0, 1]): with dummy tokens; pred_saliency_neg, pred_t2v_relevance_neg (`(n, F)`)
        and negative_mask (`(n,)` bool): negative pairs, in training.
    reference_points (`(n, num_queries, 2)`): the last decoder layer's anchors (reference points).
    batch_index (`(n,)`): the sample of each temporal query (set by the model).
    """

    pred_spans: torch.FloatTensor | None = None
    pred_logits: torch.FloatTensor | None = None
    pred_saliency: torch.FloatTensor | None = None
    frame_mask: torch.BoolTensor | None = None
    frame_times: torch.FloatTensor | None = None
    aux_outputs: list | None = None
    pred_offsets: torch.FloatTensor | None = None
    pred_t2v_relevance: torch.FloatTensor | None = None
    pred_saliency_neg: torch.FloatTensor | None = None
    pred_t2v_relevance_neg: torch.FloatTensor | None = None
    negative_mask: torch.BoolTensor | None = None
    reference_points: torch.FloatTensor | None = None
    batch_index: torch.LongTensor | None = None


class TemporalHead(nn.Module):
    """Moment retrieval and highlight detection from an MLLM's hidden states.

    Inputs are what the MLLM already computed: the task embedding(s) (the last hidden states at the task
    slot tokens), per-frame features (the last hidden states of each frame's visual tokens, pooled),
    and the instruction's text-token features. A transformer encoder mixes frames with the query tokens
    and the task embedding (which enters as extra text tokens, as in the release); learned moment
    queries decode (center, width) spans and foreground logits; per-frame saliency is the similarity of
    each encoded frame with the encoded task embedding.

    Optional parts, each a setting (`TemporalHeadConfig`):
    - CG-DETR's query-aware parts (see `temporal_layers.py`): dummy tokens and text-to-video layers before the
      encoder (the text then reaches the frames through them: the encoder mixes the query-aware frames with the task
      embedding), reference-point refinement in the decoder, dropout on the inputs; with dummy tokens the head also
      returns each frame's text-to-video relevance and, in training with `negative_pairs`, the saliency and
      relevance of each video paired with another sample's query (rolled within the batch).
    - dense clip features (`dense_clip_seconds` > 0): the head's frames are clips of the video sampled at that
      rate, each the MLLM's vision-tower features of its frame (`clip_features`, computed without gradient by the
      model) plus the LLM's hidden states of the LLM frame nearest in time, so saliency and spans come per clip.

    Args:
        hidden_size: the LLM's hidden size.
        config: the settings (`TemporalHeadConfig`, or a dict of its fields; None: the defaults), kept as `settings`.
        **settings: `TemporalHeadConfig` fields set over `config` (`TemporalHead(64, d_model=32, num_heads=2)`).
    """

    def __init__(self, hidden_size: int, config: TemporalHeadConfig | dict | None = None, **settings):
        super().__init__()
        s = self.settings = TemporalHeadConfig.build(config, **settings)
        if s.frame_pooling not in ("mean", "mean_max"):
            raise ValueError(f"frame_pooling must be 'mean' or 'mean_max', got {s.frame_pooling!r}.")
        if s.decoder not in ("detr", "dense"):
            raise ValueError(f"decoder must be 'detr' or 'dense', got {s.decoder!r}.")
        if s.num_dummies < 0 or s.t2v_layers < 0 or (s.num_dummies and not s.t2v_layers):
            raise ValueError(f"temporal head num_dummies={s.num_dummies}, t2v_layers={s.t2v_layers}: dummy tokens are "
                             "keys of the text-to-video layers; set t2v_layers >= 1 with num_dummies > 0.")
        if s.negative_pairs and not s.t2v_layers:
            raise ValueError("temporal head negative_pairs needs the text-to-video layers (t2v_layers >= 1): a video "
                             "meets another sample's query there.")
        if s.reference_points and s.decoder != "detr":
            raise ValueError("temporal head reference_points refine the DETR decoder's anchors; use decoder='detr'.")
        if not 0.0 <= s.input_dropout < 1.0:
            raise ValueError(f"temporal head input_dropout must be in [0, 1), got {s.input_dropout}.")
        if s.dense_clip_seconds < 0 or s.dense_max_clips < 2:
            raise ValueError(f"temporal head dense_clip_seconds must be >= 0 (0: off) and dense_max_clips >= 2, got "
                             f"{s.dense_clip_seconds} and {s.dense_max_clips}.")
        self.frame_pooling = s.frame_pooling
        self.decoder_type = s.decoder
        self.nms_iou = s.nms_iou
        self.d_model = s.d_model
        self.max_frames = s.max_frames
        self.use_query_tokens = s.use_query_tokens
        self.aux_loss = s.aux_loss
        self.input_dropout = s.input_dropout
        self.negative_pairs = s.negative_pairs
        self.dense_clip_seconds = s.dense_clip_seconds
        frame_size = hidden_size * (2 if s.frame_pooling == "mean_max" else 1)
        self.frame_proj = nn.Sequential(nn.LayerNorm(frame_size), nn.Linear(frame_size, s.d_model))
        self.text_proj = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, s.d_model))
        self.task_proj = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, s.d_model))
        self.type_embedding = nn.Embedding(3, s.d_model)  # 0 frame, 1 query text, 2 task embedding
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(s.d_model, s.num_heads, s.dim_feedforward, s.dropout, batch_first=True,
                                       norm_first=True)
            for _ in range(s.num_encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(s.d_model)
        if s.decoder == "detr":
            if not s.reference_points:  # (with reference points, the anchor decoder below)
                self.query_embedding = nn.Embedding(s.num_queries, s.d_model)
                self.decoder = nn.ModuleList(
                    nn.TransformerDecoderLayer(s.d_model, s.num_heads, s.dim_feedforward, s.dropout, batch_first=True,
                                               norm_first=True)
                    for _ in range(s.num_decoder_layers)
                )
                self.decoder_norm = nn.LayerNorm(s.d_model)
            self.span_head = MLP(s.d_model, s.d_model, 2, 3)
            self.class_head = nn.Linear(s.d_model, 2)
        else:  # dense: every frame predicts whether it lies in a moment and the distances to its ends
            self.frame_class = nn.Linear(s.d_model, 1)
            self.frame_offsets = MLP(s.d_model, s.d_model, 2, 2)
        self.saliency_frame = nn.Linear(s.d_model, s.d_model)
        self.saliency_task = nn.Linear(s.d_model, s.d_model)
        # optional parts, created after the others so that the default head initialises as before
        self.query_aware = None
        if s.t2v_layers:
            self.query_aware = QueryAwareFrames(s.d_model, s.num_heads, s.dim_feedforward, s.dropout, s.num_dummies,
                                                s.dummy_layers, s.t2v_layers)
        self.anchor_decoder = None
        if s.reference_points:
            self.anchor_decoder = AnchorDecoder(s.d_model, s.num_heads, s.dim_feedforward, s.dropout, s.num_queries,
                                                s.num_decoder_layers)
        self.clip_proj = None
        if s.dense_clip_seconds:
            self.clip_proj = nn.Sequential(nn.LayerNorm(frame_size), nn.Linear(frame_size, s.d_model))
        weights = dict(span_l1_weight=s.span_l1_weight, span_giou_weight=s.span_giou_weight,
                       label_weight=s.label_weight, saliency_weight=s.saliency_weight,
                       saliency_margin=s.saliency_margin, saliency_loss=s.saliency_loss,
                       t2v_saliency_weight=s.t2v_saliency_weight)
        if s.decoder == "detr":
            matcher = SpanHungarianMatcher(s.match_cost_span, s.match_cost_giou, s.match_cost_class)
            self.criterion = TemporalCriterion(matcher, eos_coef=s.eos_coef, span_l1_reduction=s.span_l1_reduction,
                                               label_reduction=s.label_reduction, **weights)
        else:
            self.criterion = DenseTemporalCriterion(**weights)

    @property
    def uses_dense_clips(self) -> bool:
        return self.clip_proj is not None

    def forward(self, task_embeddings: torch.Tensor, frame_features: torch.Tensor, frame_mask: torch.Tensor,
                frame_times: torch.Tensor, query_features: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None, clip_features: torch.Tensor | None = None,
                query_groups: torch.Tensor | None = None) -> TemporalHeadOutput:
        """
        Args:
            task_embeddings: (n, k, hidden), hidden states at the k task slot tokens.
            frame_features: (n, F, hidden) per-frame pooled hidden states ((n, F, 2 * hidden) with
                `frame_pooling="mean_max"`, see `pool_frame_features`); frame_mask (n, F) bool.
            frame_times: (n, F), frame times normalised to [0, 1] by the video duration.
            query_features: (n, Q, hidden), instruction text-token hidden states; query_mask (n, Q) bool.
            clip_features: (n, F, hidden or 2 * hidden) the vision tower's pooled features of each frame (dense clips;
                the head must have `dense_clip_seconds` > 0); `frame_features` are then the LLM's features of the
                LLM frame nearest each clip.
            query_groups: (n,) which video each query belongs to (the sample index): negative pairs are formed only
                between queries of different groups (default: all different).
        Returns:
            pred_spans (n, num_queries, 2) normalised (center, width); pred_logits (n, num_queries, 2)
            (0 foreground, 1 no object); pred_saliency (n, F) (padded frames -1e4); frame_mask (n, F);
            frame_times (n, F); aux_outputs: a list of {pred_spans, pred_logits} per decoder layer but
            the last (when aux_loss). With `decoder="dense"`, num_queries = F (one moment per frame),
            plus pred_offsets (n, F, 2) and no aux_outputs. With dummy tokens: pred_t2v_relevance (n, F) in
            [0, 1]; in training with negative pairs: pred_saliency_neg and pred_t2v_relevance_neg (n, F) and
            negative_mask (n,) bool (the queries that got a partner). With reference points: reference_points
            (n, num_queries, 2) per layer output.
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
        if (clip_features is not None) != self.uses_dense_clips:
            raise ValueError("The temporal head's dense_clip_seconds and `clip_features` go together: give clip "
                             "features exactly when dense_clip_seconds > 0.")
        dtype = next(self.frame_proj.parameters()).dtype
        frames = self._project(self.frame_proj, frame_features.to(dtype)) + self.type_embedding.weight[0]
        if clip_features is not None:
            frames = frames + self._project(self.clip_proj, clip_features.to(dtype))
        frames = frames + time_encoding(frame_times, self.d_model).to(dtype)
        task = self._project(self.task_proj, task_embeddings.to(dtype)) + self.type_embedding.weight[2]
        task_mask = torch.ones(task.shape[:2], dtype=torch.bool, device=task.device)
        text = text_mask = None
        if self.use_query_tokens and query_features is not None:
            text = self._project(self.text_proj, query_features.to(dtype)) + self.type_embedding.weight[1]
            text_mask = query_mask.bool() if query_mask is not None else torch.ones(text.shape[:2], dtype=torch.bool,
                                                                                    device=task.device)
        tokens, valid, encoded_task, relevance = self._encode(frames, frame_mask, text, text_mask, task, task_mask)
        common = {"pred_saliency": self._saliency(tokens[:, :num_frames], encoded_task, frame_mask),
                  "frame_mask": frame_mask, "frame_times": frame_times}
        if relevance is not None:
            common["pred_t2v_relevance"] = relevance
        if self.negative_pairs and self.training and n >= 2:
            common.update(self._negative_pairs(frames, frame_mask, text, text_mask, task, task_mask, query_groups))
        if self.decoder_type == "dense":
            return TemporalHeadOutput(**self._predict_dense(tokens[:, :num_frames], frame_times, frame_mask), **common)
        if self.anchor_decoder is not None:
            outputs = self.anchor_decoder(tokens, valid, self.span_head, self.class_head)
        else:
            queries = self.query_embedding.weight[None].expand(n, -1, -1)
            hidden = queries
            outputs = []
            for layer in self.decoder:
                hidden = layer(hidden + queries, tokens, memory_key_padding_mask=~valid)
                outputs.append(self._predict(self.decoder_norm(hidden)))
        result = {**outputs[-1], **common}
        if self.aux_loss:
            result["aux_outputs"] = outputs[:-1]
        return TemporalHeadOutput(**result)

    def _project(self, projection: nn.Sequential, features: torch.Tensor) -> torch.Tensor:
        """LayerNorm, input dropout (CG-DETR's, `input_dropout`), linear: one input projection."""
        norm, linear = projection
        return linear(input_dropout(norm(features), self.input_dropout, self.training))

    def _encode(self, frames, frame_mask, text, text_mask, task, task_mask):
        """The encoder over [frames, text, task] (or, with the text-to-video layers, [query-aware frames, task]):
        encoded tokens (n, M, d), their mask (n, M), the encoded task embedding (n, d) and the frames' text-to-video
        relevance (n, F) or None."""
        relevance = None
        parts, masks = [frames], [frame_mask]
        if self.query_aware is not None:
            keys = task if text is None else torch.cat([text, task], 1)
            key_mask = task_mask if text is None else torch.cat([text_mask, task_mask], 1)
            frames, relevance = self.query_aware(frames, keys, key_mask)
            parts = [frames]
        elif text is not None:
            parts, masks = [frames, text], [frame_mask, text_mask]
        tokens = torch.cat([*parts, task], dim=1)
        valid = torch.cat([*masks, task_mask], dim=1)
        for layer in self.encoder:
            tokens = layer(tokens, src_key_padding_mask=~valid)
        tokens = self.encoder_norm(tokens)
        return tokens, valid, tokens[:, -task.shape[1]:].mean(1), relevance

    def _saliency(self, encoded_frames: torch.Tensor, encoded_task: torch.Tensor, frame_mask: torch.Tensor):
        """(n, F) similarity of each encoded frame with the encoded task embedding (padded frames -1e4)."""
        saliency = (self.saliency_frame(encoded_frames) * self.saliency_task(encoded_task)[:, None]).sum(-1)
        return (saliency / math.sqrt(self.d_model)).masked_fill(~frame_mask, NO_SALIENCY)

    def _negative_pairs(self, frames, frame_mask, text, text_mask, task, task_mask, query_groups) -> dict:
        """Each video with the next query's text and task embedding (rolled by one within the batch): saliency
        and relevance of the mismatched pairs, which the saliency loss pushes down (CG-DETR's negative pairs).
        Pairs of one group (the same video) are left out (`negative_mask`)."""
        n = frames.shape[0]
        groups = query_groups if query_groups is not None else torch.arange(n, device=frames.device)
        negative_mask = groups.to(frames.device) != groups.to(frames.device).roll(1)
        rolled = [None if x is None else x.roll(1, 0) for x in (text, text_mask, task, task_mask)]
        tokens, _, encoded_task, relevance = self._encode(frames, frame_mask, *rolled)
        return {"pred_saliency_neg": self._saliency(tokens[:, : frames.shape[1]], encoded_task, frame_mask),
                "pred_t2v_relevance_neg": relevance, "negative_mask": negative_mask}

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
    bad = invalid_span_rows(spans).any()
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
        bad = invalid_span_rows(spans)
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
