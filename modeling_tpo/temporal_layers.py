"""CG-DETR's query-aware parts of the temporal head (Moon et al., "Correlation-guided Query-Dependency
Calibration for Video Temporal Grounding"), each switchable from the head's settings:

- dummy tokens (`num_dummies`): learnable tokens encoded together with the query text (`dummy_layers`
  self-attention layers) and placed in front of the text as extra keys of the text-to-video attention. A frame
  that matches nothing in the text can put its attention on them; their values are left out of the output, so
  the attention mass on the real text tokens measures how relevant the frame is to the query (the frame's
  "text-to-video relevance", in [0, 1]), which the saliency loss supervises (contrastively, against the dummies).
- text-to-video encoder layers (`t2v_layers`): frames attend to the text (cross-attention, post-norm, FFN); the
  frames come out query-aware before the ordinary encoder mixes them.
- reference points (`reference_points`): every moment query carries an anchor (centre, width) whose sine
  embedding is its positional query; each decoder layer predicts a correction in logit space and the corrected
  span, detached, is the next layer's anchor (iterative refinement, as DAB-DETR and CG-DETR do).

Remote code: torch only.
"""

import torch
import torch.nn.functional as F
from torch import nn


def time_encoding(times: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding of normalised times: (..., ) in [0, 1] -> (..., dim)."""
    import math

    half = dim // 2
    frequencies = torch.exp(torch.arange(half, device=times.device, dtype=torch.float32) * (-math.log(1e4) / half))
    angles = times.float()[..., None] * 2 * math.pi * 100.0 * frequencies  # 100 cycles at the lowest wavelength
    encoding = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return nn.functional.pad(encoding, (0, dim - 2 * half))


class MLP(nn.Module):
    """`layers` linear layers with ReLU between them."""

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


class TextToVideoLayer(nn.Module):
    """Frames attend to [dummy tokens, text tokens]; softmax over both, output from the text values only.

    Post-norm (residual, LayerNorm, FFN, residual, LayerNorm) as CG-DETR's text-to-video layer.
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.feed_forward = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.ReLU(), nn.Dropout(dropout),
                                          nn.Linear(dim_feedforward, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, frames: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
                num_dummies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (n, F, d); keys (n, D + T, d) = dummies then text, key_mask (n, D + T) bool (True = real).
        Returns the updated frames (n, F, d) and the attention weights (n, F, D + T), averaged over heads."""
        n, num_frames, d = frames.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        q = self.query(frames).view(n, num_frames, heads, head_dim).transpose(1, 2)  # (n, h, F, hd)
        k = self.key(keys).view(n, -1, heads, head_dim).transpose(1, 2)  # (n, h, D + T, hd)
        v = self.value(keys[:, num_dummies:]).view(n, -1, heads, head_dim).transpose(1, 2)  # (n, h, T, hd)
        scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1)  # (n, h, F, D + T)
        attended = self.dropout(weights)[..., num_dummies:] @ v  # the dummies' values are left out
        attended = self.out(attended.transpose(1, 2).reshape(n, num_frames, d))
        frames = self.norm1(frames + self.dropout(attended))
        frames = self.norm2(frames + self.dropout(self.feed_forward(frames)))
        return frames, weights.mean(1)


class QueryAwareFrames(nn.Module):
    """Dummy tokens + text-to-video layers: query-aware frames and each frame's text-to-video relevance."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float, num_dummies: int,
                 dummy_layers: int, t2v_layers: int):
        super().__init__()
        if t2v_layers < 1:
            raise ValueError("CG-DETR's query-aware frames need t2v_layers >= 1.")
        self.num_dummies = num_dummies
        if num_dummies:
            self.dummy_tokens = nn.Parameter(torch.randn(num_dummies, d_model) * 0.02)
            self.dummy_positions = nn.Parameter(torch.randn(num_dummies, d_model) * 0.02)
            self.dummy_encoder = nn.ModuleList(
                nn.TransformerEncoderLayer(d_model, num_heads, dim_feedforward, dropout, batch_first=True)
                for _ in range(dummy_layers)
            )
        self.layers = nn.ModuleList(TextToVideoLayer(d_model, num_heads, dim_feedforward, dropout)
                                    for _ in range(t2v_layers))

    def dummies(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The dummy tokens encoded with the query text: (n, D, d) (CG-DETR's dummy encoder: they learn what the
        text is not about)."""
        n = text.shape[0]
        dummies = (self.dummy_tokens + self.dummy_positions).to(text.dtype)[None].expand(n, -1, -1)
        tokens = torch.cat([dummies, text], dim=1)
        mask = torch.cat([text_mask.new_ones(n, self.num_dummies), text_mask], dim=1)
        for layer in self.dummy_encoder:
            tokens = layer(tokens, src_key_padding_mask=~mask)
        return tokens[:, : self.num_dummies]

    def forward(self, frames: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """frames (n, F, d), text (n, T, d) with text_mask (n, T) bool -> query-aware frames (n, F, d) and, with
        dummy tokens, the relevance (n, F) in [0, 1]: the attention mass on the real text tokens, averaged over
        layers (None without dummy tokens: the softmax over the text alone is 1 everywhere)."""
        keys, mask = text, text_mask.bool()
        if self.num_dummies:
            keys = torch.cat([self.dummies(text, mask), text], dim=1)
            mask = torch.cat([mask.new_ones(mask.shape[0], self.num_dummies), mask], dim=1)
        relevance = 0.0
        for layer in self.layers:
            frames, weights = layer(frames, keys, mask, self.num_dummies)
            relevance = relevance + weights[..., self.num_dummies:].sum(-1)
        return frames, (relevance / len(self.layers) if self.num_dummies else None)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class AnchorDecoder(nn.Module):
    """DETR decoder whose moment queries carry reference points (centre, width) refined layer by layer.

    Per layer: positional query = MLP(sine encoding of the anchor's centre and width) (scaled, after the first
    layer, by an MLP of the content query), the decoder layer, then span = sigmoid(span_head(h) +
    inverse_sigmoid(anchor)); the span, detached, is the next anchor. The sine encoding is the frames' own
    `time_encoding`, so a query's position and the frames' times live in the same code.
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float, num_queries: int,
                 num_layers: int):
        super().__init__()
        self.anchors = nn.Embedding(num_queries, 2)  # (centre, width) before the sigmoid
        nn.init.uniform_(self.anchors.weight[:, 0], -2.0, 2.0)  # centres spread over the video
        nn.init.constant_(self.anchors.weight[:, 1], -1.0)  # widths about a quarter of it
        self.position_head = MLP(d_model, d_model, d_model, 2)
        # scales the positional query from the second layer on (with one layer it would never get a gradient)
        self.query_scale = MLP(d_model, d_model, d_model, 2) if num_layers > 1 else None
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(d_model, num_heads, dim_feedforward, dropout, batch_first=True, norm_first=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.d_model = d_model

    def positional_query(self, anchors: torch.Tensor) -> torch.Tensor:
        """(n, Q, 2) anchors in [0, 1] -> (n, Q, d) sine encodings of centre and width, concatenated."""
        half = self.d_model // 2
        return torch.cat([time_encoding(anchors[..., 0], half), time_encoding(anchors[..., 1], self.d_model - half)], -1)

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor, span_head: nn.Module,
                class_head: nn.Module) -> list[dict]:
        """memory (n, M, d) with memory_mask (n, M) bool (True = real) -> per layer {pred_spans (n, Q, 2)
        normalised (centre, width), pred_logits (n, Q, 2), reference_points (n, Q, 2) (that layer's anchors)}."""
        n = memory.shape[0]
        anchors = self.anchors.weight.sigmoid()[None].expand(n, -1, -1)
        hidden = memory.new_zeros(n, anchors.shape[1], self.d_model)
        outputs = []
        for index, layer in enumerate(self.layers):
            position = self.position_head(self.positional_query(anchors).to(memory.dtype))
            if index:
                position = position * self.query_scale(hidden)
            hidden = layer(hidden + position, memory, memory_key_padding_mask=~memory_mask)
            normed = self.norm(hidden)
            spans = (span_head(normed).float() + inverse_sigmoid(anchors.float())).sigmoid()
            outputs.append({"pred_spans": spans.to(normed.dtype), "pred_logits": class_head(normed),
                            "reference_points": anchors})
            anchors = spans.detach().to(anchors.dtype)
        return outputs


def input_dropout(x: torch.Tensor | None, p: float, training: bool) -> torch.Tensor | None:
    """CG-DETR's dropout on the head's inputs (frame, text and task features); nothing at p = 0 (no random
    numbers drawn, so runs without it keep their random streams)."""
    if x is None or not p or not training:
        return x
    return F.dropout(x, p, training=True)
