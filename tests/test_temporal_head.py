"""Temporal head: matcher invariants, criterion on hand-computed cases, saliency, shapes, gradients,
errors, and a small overfit."""

import math

import pytest
import torch
import torch.nn.functional as F

from tpo.modeling_tpo.box_ops import pairwise_temporal_iou, span_cw_to_se
from tpo.modeling_tpo.features import gather_token_features, normalised_frame_times, pool_frame_features
from tpo.modeling_tpo.matcher import SpanHungarianMatcher
from tpo.modeling_tpo.temporal_head import TemporalHead
from tpo.modeling_tpo.temporal_loss import TemporalCriterion

HIDDEN = 32


def small_head(**overrides) -> TemporalHead:
    settings = dict(d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64,
                    dropout=0.0, num_queries=5, frame_pooling="mean")
    settings.update(overrides)
    return TemporalHead(HIDDEN, **settings)


def inputs(n=2, frames=6, queries=3, k=1):
    torch.manual_seed(0)
    return dict(
        task_embeddings=torch.randn(n, k, HIDDEN, requires_grad=True),
        frame_features=torch.randn(n, frames, HIDDEN, requires_grad=True),
        frame_mask=torch.ones(n, frames, dtype=torch.bool),
        frame_times=(torch.arange(frames).float()[None].expand(n, -1) + 0.5) / frames,
        query_features=torch.randn(n, queries, HIDDEN, requires_grad=True),
        query_mask=torch.ones(n, queries, dtype=torch.bool),
    )


# ------------------------------------------------------------------------------------------------
# Matcher
# ------------------------------------------------------------------------------------------------
def test_matcher_batched_equals_per_sample_and_empty_targets():
    torch.manual_seed(1)
    matcher = SpanHungarianMatcher()
    spans, logits = torch.rand(3, 6, 2) * 0.5 + 0.1, torch.randn(3, 6, 2)
    targets = [torch.tensor([[0.1, 0.3], [0.5, 0.9]]), torch.zeros(0, 2), torch.tensor([[0.2, 0.4]])]
    batched = matcher(spans, logits, targets)
    for i, target in enumerate(targets):
        single = matcher(spans[i : i + 1], logits[i : i + 1], [target])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
    assert batched[1][0].numel() == 0 and batched[1][1].numel() == 0
    assert [len(src) for src, _ in batched] == [2, 0, 1]
    empty = matcher(spans, logits, [torch.zeros(0, 2)] * 3)
    assert all(src.numel() == 0 for src, _ in empty)


def test_matcher_picks_the_obvious_assignment():
    matcher = SpanHungarianMatcher(cost_span=1.0, cost_giou=1.0, cost_class=0.0)
    # predictions (cw): query 0 covers [0.6, 0.8], query 1 covers [0.1, 0.3], query 2 far away
    spans = torch.tensor([[[0.7, 0.2], [0.2, 0.2], [0.95, 0.02]]])
    targets = [torch.tensor([[0.1, 0.3], [0.6, 0.8]])]
    src, tgt = matcher(spans, torch.zeros(1, 3, 2), targets)[0]
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 1, 1: 0}


# ------------------------------------------------------------------------------------------------
# Criterion
# ------------------------------------------------------------------------------------------------
def _criterion(**weights) -> TemporalCriterion:
    return TemporalCriterion(SpanHungarianMatcher(), **weights)


def test_perfect_prediction_gives_zero_span_losses_and_known_ce():
    criterion = _criterion(eos_coef=0.1)
    target = torch.tensor([[0.2, 0.6]])
    spans = torch.tensor([[[0.4, 0.4], [0.9, 0.1]]])  # query 0 equals the target
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    terms = criterion.span_terms({"pred_spans": spans, "pred_logits": logits}, [{"spans": target}], torch.tensor(1.0))
    assert terms["span_l1"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["span_giou"].item() == pytest.approx(0.0, abs=1e-6)
    # CE: query 0 class 0 weight 1, query 1 class 1 weight 0.1; weighted mean
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    ce1 = -math.log(math.e / (math.e + 1))
    assert terms["label"].item() == pytest.approx((ce0 + 0.1 * ce1) / 1.1, rel=1e-5)


def test_known_offset_gives_known_l1_and_giou():
    criterion = _criterion()
    target = torch.tensor([[0.2, 0.6]])  # cw (0.4, 0.4)
    spans = torch.tensor([[[0.5, 0.4]]])  # shifted by 0.1: se (0.3, 0.7)
    terms = criterion.span_terms({"pred_spans": spans, "pred_logits": torch.zeros(1, 1, 2)}, [{"spans": target}],
                                 torch.tensor(1.0))
    assert terms["span_l1"].item() == pytest.approx(0.1, abs=1e-6)
    # overlap 0.3, union 0.5, enclosing 0.5 -> gIoU 0.6 -> loss 0.4
    assert terms["span_giou"].item() == pytest.approx(0.4, abs=1e-6)


def test_saliency_all_zero_is_zero_and_misranking_costs():
    criterion = _criterion(saliency_margin=0.2)
    mask = torch.ones(1, 4, dtype=torch.bool)
    zero = criterion.saliency.term(torch.randn(1, 4), mask, [{"spans": None, "saliency": torch.zeros(4)}])
    assert zero.item() == 0.0
    target = torch.tensor([0.0, 1.0, 0.5, 0.0])
    good = criterion.saliency.term(torch.tensor([[-3.0, 3.0, 1.0, -3.0]]), mask, [{"saliency": target}])
    bad = criterion.saliency.term(torch.tensor([[3.0, -3.0, 1.0, 3.0]]), mask, [{"saliency": target}])
    assert bad.item() > good.item() > 0
    # a ranking that satisfies every margin leaves only the contrastive term
    scores = torch.tensor([[-3.0, 3.0, 1.0, -3.0]])
    log_probs = F.log_softmax(scores[0] / 0.5, dim=0)
    contrastive = (-torch.logsumexp(log_probs[target >= 0.5], 0) - torch.logsumexp(log_probs[target >= 1.0], 0)) / 2
    assert good.item() == pytest.approx(contrastive.item(), rel=1e-5)
    bce = _criterion(saliency_loss="bce").saliency.term(torch.zeros(1, 4), mask, [{"saliency": target}])
    assert bce.item() == pytest.approx(math.log(2), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Head
# ------------------------------------------------------------------------------------------------
def test_shapes_gradients_and_loss_terms():
    head = small_head()
    batch = inputs()
    out = head(**batch)
    assert out["pred_spans"].shape == (2, 5, 2) and out["pred_logits"].shape == (2, 5, 2)
    assert out["pred_saliency"].shape == (2, 6) and len(out["aux_outputs"]) == 1
    assert ((out["pred_spans"] > 0) & (out["pred_spans"] < 1)).all()
    targets = [{"spans": torch.tensor([[0.1, 0.4], [0.6, 0.9]]), "saliency": torch.tensor([0, 1, 1, 0, 1, 0.0])},
               {"spans": torch.tensor([[0.3, 0.5]]), "saliency": None}]
    terms = head.loss(out, targets)
    expected = {"temporal", "temporal_span_l1", "temporal_span_giou", "temporal_label", "temporal_saliency",
                "temporal_span_l1_0", "temporal_span_giou_0", "temporal_label_0"}
    assert set(terms) == expected
    manual = sum(w * terms[f"temporal_{k}"] for k, w in [("span_l1", 10), ("span_giou", 1), ("label", 4), ("saliency", 4)])
    manual = manual + 10 * terms["temporal_span_l1_0"] + terms["temporal_span_giou_0"] + 4 * terms["temporal_label_0"]
    torch.testing.assert_close(terms["temporal"], manual)
    terms["temporal"].backward()
    for name in ("task_embeddings", "frame_features", "query_features"):
        assert batch[name].grad is not None and batch[name].grad.abs().sum() > 0, name


def test_padded_frames_get_no_saliency():
    head = small_head()
    batch = inputs()
    batch["frame_mask"][1, 4:] = False
    out = head(**batch)
    assert (out["pred_saliency"][1, 4:] <= -1e3).all()


def test_errors_for_too_few_frames_and_bad_spans():
    head = small_head()
    batch = inputs(frames=3)
    batch["frame_mask"][0, 1:] = False
    with pytest.raises(ValueError, match=r"queries \[0\]: fewer frames than the head needs"):
        head(**batch)
    with pytest.raises(ValueError, match="fewer frames than the head needs"):
        head(**inputs(n=1, frames=1))
    out = head(**inputs())
    with pytest.raises(ValueError, match=r"query 1: span \[0.5, 0.5\] must satisfy 0 <= start < end <= 1"):
        head.loss(out, [{"spans": torch.tensor([[0.1, 0.2]])}, {"spans": torch.tensor([[0.5, 0.5]])}])
    with pytest.raises(ValueError, match="no target span"):
        head.loss(out, [{"spans": torch.tensor([[0.1, 0.2]])}, {"spans": torch.zeros(0, 2)}])
    with pytest.raises(ValueError, match=r"query 0: span \[0.5, 1.2000"):
        head.loss(out, [{"spans": torch.tensor([[0.5, 1.2]])}, {"spans": torch.tensor([[0.1, 0.2]])}])
    good = {"spans": torch.tensor([[0.1, 0.2]])}
    with pytest.raises(ValueError, match="query 1: saliency scores must be finite and >= 0"):
        head.loss(out, [good, {**good, "saliency": torch.tensor([0, -1.0, 0, 0, 0, 0])}])
    with pytest.raises(ValueError, match="query 0: saliency has shape"):
        head.loss(out, [{**good, "saliency": torch.zeros(7)}, good])


def test_overfits_one_example():
    torch.manual_seed(0)
    head = small_head()
    batch = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in inputs(n=1, frames=8).items()}
    target = torch.tensor([[0.25, 0.625]])
    saliency = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0.0])
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(80):
        terms = head.loss(head(**batch), [{"spans": target, "saliency": saliency}])
        first = first if first is not None else terms["temporal"].item()
        optimizer.zero_grad()
        terms["temporal"].backward()
        optimizer.step()
    assert terms["temporal"].item() < 0.2 * first
    best = head.predict_windows(head(**batch), top_k=1)[0][0]
    iou, _ = pairwise_temporal_iou(torch.tensor([best[:2]]), target)
    assert iou.item() > 0.5
    assert span_cw_to_se(head(**batch)["pred_spans"]).shape == (1, 5, 2)


def test_frame_pooling_and_token_gathering_hand_computed():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, -4.0], [7.0, 1.0]]])  # (1, 4 tokens, 2)
    frame_index = torch.tensor([[0, 0, -1, 1]])
    mean, mask = pool_frame_features(hidden, frame_index, num_frames=3)
    torch.testing.assert_close(mean, torch.tensor([[[2.0, 1.0], [7.0, 1.0], [0.0, 0.0]]]))
    assert mask.tolist() == [[True, True, False]]
    both, _ = pool_frame_features(hidden, frame_index, num_frames=3, pooling="mean_max")
    torch.testing.assert_close(both[0, 0], torch.tensor([2.0, 1.0, 3.0, 2.0]))  # mean, then max
    torch.testing.assert_close(both[0, 2], torch.zeros(4))
    features, token_mask = gather_token_features(hidden, torch.tensor([[False, True, False, True]]))
    torch.testing.assert_close(features, torch.tensor([[[3.0, 2.0], [7.0, 1.0]]]))
    assert token_mask.tolist() == [[True, True]]
    times = normalised_frame_times(mask, torch.tensor([[1.0, 3.0, -1.0]]), torch.tensor([4.0]))
    torch.testing.assert_close(times, torch.tensor([[0.25, 0.75, 0.0]]))


def _membership_pooling(hidden_states, frame_token_index, num_frames):
    """Mean + max per frame through an explicit (n, frames, seq) membership: the definition, to compare with."""
    membership = frame_token_index[:, None, :] == torch.arange(num_frames)[None, :, None]
    counts = membership.sum(-1)
    mean = (membership.to(hidden_states.dtype) / counts.clamp(min=1)[..., None]) @ hidden_states
    masked = torch.where(membership[..., None], hidden_states[:, None], torch.finfo(hidden_states.dtype).min)
    return torch.cat([mean, masked.amax(2).masked_fill(~(counts > 0)[..., None], 0.0)], -1), counts > 0


def test_frame_pooling_equals_the_membership_definition_with_gradients_and_ties():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        hidden = torch.randn(3, 40, 8, dtype=torch.float64, generator=generator)
        if trial % 2:
            hidden = hidden.round()  # tied maxima: the gradient splits evenly, as amax's does
        frame_index = torch.randint(-1, 5, (3, 40), generator=generator)  # frame 5 of 6 has no token
        pooled_input, reference_input = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        pooled, mask = pool_frame_features(pooled_input, frame_index, 6, pooling="mean_max")
        reference, reference_mask = _membership_pooling(reference_input, frame_index, 6)
        weights = torch.randn(pooled.shape, dtype=torch.float64, generator=generator)
        (pooled * weights).sum().backward()
        (reference * weights).sum().backward()
        assert torch.equal(mask, reference_mask)
        torch.testing.assert_close(pooled, reference)
        torch.testing.assert_close(pooled_input.grad, reference_input.grad)


def test_frame_pooling_memory_does_not_grow_with_frames_times_tokens():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestIntermediate(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(tensor):
                    self.largest = max(self.largest, tensor.numel())
            return out

    seq, hidden, frames = 2048, 16, 64  # a (frames, seq, hidden) intermediate would be 2 M elements
    states = torch.randn(1, seq, hidden, requires_grad=True)
    frame_index = (torch.arange(seq) // (seq // frames))[None]
    with LargestIntermediate() as mode:
        pooled, _ = pool_frame_features(states, frame_index, frames, pooling="mean_max")
        pooled.sum().backward()
    assert mode.largest <= 2 * seq * hidden


def test_dense_frame_targets_hand_computed():
    from tpo.modeling_tpo.temporal_loss import DenseTemporalCriterion

    times = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    valid = torch.tensor([True, True, True, True, False])
    spans = torch.tensor([[0.2, 0.6], [0.25, 0.35], [0.78, 0.8]])
    positive, windows = DenseTemporalCriterion.frame_targets(times, valid, spans)
    # 0.3 is in both windows and takes the shorter; 0.5 the first; [0.78, 0.8] holds no frame: nearest valid is 0.7
    assert positive.tolist() == [False, True, True, True, False]
    torch.testing.assert_close(windows[1:4], torch.tensor([[0.25, 0.35], [0.2, 0.6], [0.78, 0.8]]))


def test_dense_decoder_shapes_and_overfit():
    torch.manual_seed(0)
    head = small_head(decoder="dense")
    batch = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in inputs(n=1, frames=8).items()}
    out = head(**batch)
    assert out["pred_spans"].shape == (1, 8, 2) and "aux_outputs" not in out
    target = torch.tensor([[0.25, 0.625]])
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(80):
        terms = head.loss(head(**batch), [{"spans": target, "saliency": None}])
        first = first if first is not None else terms["temporal"].item()
        optimizer.zero_grad()
        terms["temporal"].backward()
        optimizer.step()
    assert set(terms) == {"temporal", "temporal_span_l1", "temporal_span_giou", "temporal_label", "temporal_saliency"}
    assert terms["temporal"].item() < 0.2 * first
    windows = head.predict_windows(head(**batch), top_k=3)[0]
    iou, _ = pairwise_temporal_iou(torch.tensor([windows[0][:2]]), target)
    assert iou.item() > 0.5
    # non-maximum suppression: no two kept windows overlap by more than the threshold
    if len(windows) > 1:
        pair, _ = pairwise_temporal_iou(torch.tensor([w[:2] for w in windows]), torch.tensor([w[:2] for w in windows]))
        assert (pair.fill_diagonal_(0) <= head.nms_iou + 1e-6).all()


def test_two_frames_single_query_and_aux_shapes():
    head = small_head(num_decoder_layers=3)
    out = head(**inputs(n=1, frames=2))
    assert out["pred_spans"].shape == (1, 5, 2) and out["pred_saliency"].shape == (1, 2)
    assert len(out["aux_outputs"]) == 2
    for aux in out["aux_outputs"]:
        assert aux["pred_spans"].shape == (1, 5, 2) and aux["pred_logits"].shape == (1, 5, 2)
    terms = head.loss(out, [{"spans": torch.tensor([[0.0, 0.5]]), "saliency": torch.tensor([1.0, 0.0])}])
    assert {"temporal_label_1", "temporal_span_l1_1"} <= set(terms) and torch.isfinite(terms["temporal"])
    # the total: each span term weighted, summed over the last and the 2 auxiliary layers, plus saliency
    weights, names = head.criterion.weights, {k[len("temporal_"):-2] for k in terms if k.endswith("_0")}
    assert names == {"label", "span_l1", "span_giou"}
    expected = sum(weights[n] * (terms[f"temporal_{n}"] + terms[f"temporal_{n}_0"] + terms[f"temporal_{n}_1"])
                   for n in names) + head.criterion.saliency.weight * terms["temporal_saliency"]
    torch.testing.assert_close(terms["temporal"], expected)
    windows = head.predict_windows(out, top_k=3)[0]
    assert len(windows) == 3 and [w[2] for w in windows] == sorted((w[2] for w in windows), reverse=True)
    assert all(0 <= start <= end <= 1 for start, end, _ in windows)


def test_bfloat16_inputs_give_float32_losses():
    head = small_head()
    batch = {k: (v.detach().bfloat16() if torch.is_floating_point(v) else v) for k, v in inputs().items()}
    batch["frame_times"] = batch["frame_times"].float()
    out = head(**batch)
    bf16 = {"pred_spans": out["pred_spans"].bfloat16(), "pred_logits": out["pred_logits"].bfloat16(),
            "pred_saliency": out["pred_saliency"].bfloat16(), "frame_mask": out["frame_mask"]}
    targets = [{"spans": torch.tensor([[0.1, 0.4]]), "saliency": torch.tensor([0, 1, 1, 0, 0, 0.0])},
               {"spans": torch.tensor([[0.3, 0.5]]), "saliency": None}]
    terms = head.loss(bf16, targets)
    assert all(v.dtype == torch.float32 for v in terms.values())


def test_span_normaliser_is_averaged_over_processes(monkeypatch):
    """Under torch.distributed the default normaliser is the mean number of spans per process: a fake
    2-process all-reduce adds another rank's 3 spans to this rank's 1 -> (1 + 3) / 2 = 2."""
    criterion = _criterion()
    outputs = {"pred_spans": torch.tensor([[[0.5, 0.4]]]), "pred_logits": torch.zeros(1, 1, 2),
               "pred_saliency": torch.zeros(1, 4), "frame_mask": torch.ones(1, 4, dtype=torch.bool)}
    targets = [{"spans": torch.tensor([[0.2, 0.6]]), "saliency": None}]
    local = criterion(outputs, targets)["temporal_span_l1"]
    assert local.item() == pytest.approx(0.1, abs=1e-6)  # one span, offset 0.1

    def fake_all_reduce(tensor):
        tensor.add_(3.0)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    averaged = criterion(outputs, targets)["temporal_span_l1"]
    assert averaged.item() == pytest.approx(0.1 / 2, abs=1e-6)
    # a process whose partners have no spans either still divides by at least 1
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: None)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    assert criterion(outputs, targets)["temporal_span_l1"].item() == pytest.approx(0.1, abs=1e-6)


def test_dense_windows_from_runs_hand_computed():
    from tpo.modeling_tpo.temporal_head import _dense_windows, frame_runs

    probabilities = torch.tensor([0.1, 0.8, 0.9, 0.2, 0.6, 0.05, 0.3, 0.55])
    assert frame_runs(probabilities) == [(1, 2), (4, 4), (7, 7)]
    times = (torch.arange(8) + 0.5) / 8  # segment middles
    regressed = torch.tensor([[0.0, 0.1], [0.1, 0.4], [0.2, 0.35], [0.3, 0.4], [0.5, 0.6], [0.6, 0.7], [0.7, 0.8],
                              [0.9, 1.0]])
    windows = _dense_windows(probabilities, regressed, times, nms_iou=0.5)
    runs = windows[:3]
    # runs span their frames' segments, bounds halfway to the neighbours (1 at the end), best mean first
    for (start, end, score), expected in zip(runs, [(0.125, 0.375, 0.85), (0.5, 0.625, 0.6), (0.875, 1.0, 0.55)]):
        assert (start, end, score) == pytest.approx(expected)
    # regressed windows: those overlapping a run by IoU > 0.5 are left out, the rest rank below every run
    rest = windows[3:]
    assert [w[:2] for w in rest] == [pytest.approx(w) for w in ([0.7, 0.8], [0.3, 0.4], [0.0, 0.1], [0.6, 0.7])]
    assert all(w[2] < runs[-1][2] for w in rest)
    assert [w[2] for w in windows] == sorted((w[2] for w in windows), reverse=True)
    none_above = _dense_windows(torch.full((4,), 0.2), regressed[:4], times[:4] * 2, nms_iou=0.5)
    assert none_above[0][:2] == pytest.approx([0.0, 0.1])  # no run: the regressed windows alone


# ------------------------------------------------------------------------------------------------
# Frozen reference: the per-query, per-layer implementation the batched criterion replaced. Kept
# verbatim in behaviour (a Python loop per query, per saliency level, per decoder layer) so that the
# batched code can be checked against it on randomized cases.
# ------------------------------------------------------------------------------------------------
def _reference_cw_to_se(spans):
    return torch.stack([spans[..., 0] - 0.5 * spans[..., 1], spans[..., 0] + 0.5 * spans[..., 1]], -1)


def _reference_se_to_cw(spans):
    return torch.stack([(spans[..., 0] + spans[..., 1]) / 2, spans[..., 1] - spans[..., 0]], -1)


def _reference_pairwise_giou(spans_a, spans_b):
    """(N, 2), (M, 2) `se` spans -> (N, M) generalised IoU (as box_ops computed it when frozen)."""
    length_a = (spans_a[:, 1] - spans_a[:, 0]).clamp(min=0)
    length_b = (spans_b[:, 1] - spans_b[:, 0]).clamp(min=0)
    inter = (torch.minimum(spans_a[:, None, 1], spans_b[None, :, 1])
             - torch.maximum(spans_a[:, None, 0], spans_b[None, :, 0])).clamp(min=0)
    union = length_a[:, None] + length_b[None, :] - inter
    tiny = torch.finfo(union.dtype).tiny
    iou = torch.where(union > 0, inter / union.clamp(min=tiny), torch.zeros_like(union))
    enclosing = (torch.maximum(spans_a[:, None, 1], spans_b[None, :, 1])
                 - torch.minimum(spans_a[:, None, 0], spans_b[None, :, 0])).clamp(min=0)
    penalty = torch.where(enclosing > 0, (enclosing - union) / enclosing.clamp(min=tiny), torch.zeros_like(enclosing))
    return iou - penalty


def _reference_match(pred_spans, pred_logits, target_spans, cost_span=10.0, cost_giou=1.0, cost_class=4.0):
    """Hungarian matching, one sample at a time: `batch` (pred_index, target_index) pairs."""
    from scipy.optimize import linear_sum_assignment

    indices = []
    for spans, logits, targets in zip(pred_spans.detach().float(), pred_logits.detach().float(), target_spans):
        if targets.shape[0] == 0:
            indices.append((torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)))
            continue
        targets_cw = torch.stack([(targets[:, 0] + targets[:, 1]) / 2, targets[:, 1] - targets[:, 0]], -1)
        cost = (cost_span * torch.cdist(spans, targets_cw, p=1)
                - cost_giou * _reference_pairwise_giou(_reference_cw_to_se(spans), targets)
                - cost_class * logits.softmax(-1)[:, 0:1])
        rows, cols = linear_sum_assignment(cost.numpy())
        indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return indices


def _reference_span_terms(layer, target_spans, num_spans, eos_coef):
    """Matched span L1, gIoU and weighted label CE of one decoder layer, sample by sample."""
    pred_spans, pred_logits = layer["pred_spans"].float(), layer["pred_logits"].float()
    indices = _reference_match(pred_spans, pred_logits, target_spans)
    l1 = giou_loss = pred_spans.sum() * 0.0
    classes = torch.ones(pred_logits.shape[:2], dtype=torch.long)
    for i, (src, tgt) in enumerate(indices):
        if src.numel() == 0:
            continue
        matched, target = pred_spans[i, src], target_spans[i][tgt]
        l1 = l1 + (matched - _reference_se_to_cw(target)).abs().sum() / num_spans
        giou = torch.diag(_reference_pairwise_giou(_reference_cw_to_se(matched), target))
        giou_loss = giou_loss + (1 - giou).sum() / num_spans
        classes[i, src] = 0
    label = F.cross_entropy(pred_logits.transpose(1, 2), classes, weight=torch.tensor([1.0, eos_coef]))
    return {"span_l1": l1, "span_giou": giou_loss, "label": label}


def _reference_saliency(scores, frame_mask, targets, saliency_loss, margin):
    """Mean over queries with a non-constant saliency row of ranking + rank-contrastive (or BCE)."""
    scores = scores.float()
    losses = []
    for i, target in enumerate(targets):
        if target.get("saliency") is None:
            continue
        n = min(scores.shape[1], target["saliency"].shape[0])
        valid = frame_mask[i, :n] & torch.isfinite(scores[i, :n])
        s, y = scores[i, :n][valid], target["saliency"].float()[:n][valid]
        if y.numel() < 2 or (y.max() - y.min()).item() <= 0:
            continue
        if saliency_loss == "bce":
            losses.append(F.binary_cross_entropy_with_logits(s, y.clamp(0, 1)))
            continue
        higher = y[:, None] > y[None, :]
        ranking = (margin - (s[:, None] - s[None, :])).clamp(min=0)[higher].mean()
        log_probs = F.log_softmax(s / 0.5, dim=0)
        levels = torch.unique(y[y > y.min()])
        contrastive = torch.stack([-torch.logsumexp(log_probs[y >= level], 0) for level in levels]).mean()
        losses.append(ranking + contrastive)
    return torch.stack(losses).mean() if losses else scores.sum() * 0.0


def _reference_dense_terms(outputs, targets):
    """Dense decoder: frame-level foreground BCE and the positives' offset L1 and gIoU."""
    times, frame_mask = outputs["frame_times"].float(), outputs["frame_mask"]
    positives, windows = [], []
    for i, target in enumerate(targets):
        spans, valid = target["spans"].float(), frame_mask[i]
        inside = (times[i][:, None] >= spans[None, :, 0]) & (times[i][:, None] <= spans[None, :, 1]) & valid[:, None]
        lengths = (spans[:, 1] - spans[:, 0])[None, :].expand_as(inside)
        choice = torch.where(inside, lengths, torch.full_like(lengths, float("inf"))).argmin(1)
        positive = inside.any(1)
        for j in range(spans.shape[0]):  # a window between frames takes the valid frame nearest its centre
            if not inside[:, j].any():
                nearest = int((times[i] - spans[j].mean()).abs().masked_fill(~valid, float("inf")).argmin())
                positive[nearest], choice[nearest] = True, j
        positives.append(positive)
        windows.append(spans[choice])
    positive, windows = torch.stack(positives), torch.stack(windows)
    normaliser = positive.sum().float().clamp(min=1.0)
    logits = outputs["pred_logits"][..., 0].float()
    label = F.binary_cross_entropy_with_logits(logits[frame_mask], positive[frame_mask].float())
    target_offsets = torch.stack([times - windows[..., 0], windows[..., 1] - times], -1).clamp(min=0)
    l1 = ((outputs["pred_offsets"].float() - target_offsets).abs().sum(-1) * positive).sum() / normaliser
    pred_se = _reference_cw_to_se(outputs["pred_spans"].float())[positive]
    giou = torch.diag(_reference_pairwise_giou(pred_se, windows[positive]))
    return {"span_l1": l1, "span_giou": (1 - giou).sum() / normaliser, "label": label}


def _reference_temporal_losses(outputs, targets, num_spans=None, *, decoder="detr", saliency_loss="ranking",
                               margin=0.2, eos_coef=0.1, weights=(10.0, 1.0, 4.0, 4.0)):
    """Every named term and `temporal` as the per-query implementation computed them (CPU, no
    torch.distributed)."""
    weight = dict(zip(("span_l1", "span_giou", "label", "saliency"), weights))
    saliency = _reference_saliency(outputs["pred_saliency"], outputs["frame_mask"], targets, saliency_loss, margin)
    if decoder == "dense":
        terms = {f"temporal_{k}": v for k, v in _reference_dense_terms(outputs, targets).items()}
        terms["temporal_saliency"] = saliency
        terms["temporal"] = sum(weight[k.removeprefix("temporal_")] * v for k, v in terms.items())
        return terms
    if num_spans is None:
        num_spans = float(sum(t["spans"].shape[0] for t in targets))
    num_spans = torch.as_tensor(num_spans, dtype=torch.float32).clamp(min=1.0)
    target_spans = [t["spans"].float() for t in targets]
    terms = {f"temporal_{k}": v for k, v in _reference_span_terms(outputs, target_spans, num_spans, eos_coef).items()}
    terms["temporal_saliency"] = saliency
    total = sum(weight[k.removeprefix("temporal_")] * v for k, v in terms.items())
    for i, aux in enumerate(outputs.get("aux_outputs") or []):
        for name, value in _reference_span_terms(aux, target_spans, num_spans, eos_coef).items():
            terms[f"temporal_{name}_{i}"] = value
            total = total + weight[name] * value
    terms["temporal"] = total
    return terms


def _reference_target_error(targets, num_frames):
    """The message `TemporalHead.loss` raises for the first invalid target, or None (the per-query checks as
    first written, plus NaN spans, which they let through to fail inside scipy's matcher)."""
    for i, target in enumerate(targets):
        spans = target["spans"]
        if spans.numel() == 0:
            return f"Temporal query {i} has no target span; every temporal sample needs one."
        bad = (spans[:, 0] >= spans[:, 1]) | (spans < -1e-4).any(-1) | (spans > 1 + 1e-4).any(-1)
        bad |= spans.isnan().any(-1)
        if bad.any():
            return (f"Temporal query {i}: span {spans[bad][0].tolist()} must satisfy "
                    "0 <= start < end <= 1 (normalised by the video duration).")
        saliency = target.get("saliency")
        if saliency is not None:
            if saliency.dim() != 1 or saliency.shape[0] > num_frames:
                return (f"Temporal query {i}: saliency has shape {tuple(saliency.shape)}; expected "
                        f"(frames,) with at most {num_frames} frames (one score per head frame).")
            if not torch.isfinite(saliency).all() or (saliency < 0).any():
                return (f"Temporal query {i}: saliency scores must be finite and >= 0 "
                        "(0 = not relevant); got negative or non-finite values.")
    return None


def _random_case(seed: int) -> dict:
    """Random outputs and targets covering: several decoder layers, padded frames, 1-3 windows per query
    (some between frames), saliency missing / constant / tied levels / shorter than the frames, and a
    span normaliser given or not."""
    g = torch.Generator().manual_seed(seed)

    def randint(low, high):  # inclusive
        return int(torch.randint(low, high + 1, (1,), generator=g))

    decoder = ("detr", "dense")[seed % 2]
    n, frames = randint(1, 6), randint(2, 10)
    num_queries = frames if decoder == "dense" else randint(1, 6)
    frame_mask = torch.ones(n, frames, dtype=torch.bool)
    for i in range(n):
        frame_mask[i, randint(2, frames):] = False
    frame_times = (torch.arange(frames).float() + torch.rand(frames, generator=g)) / frames
    frame_times = frame_times[None].expand(n, -1).clone()

    def layer():
        return {"pred_spans": torch.rand(n, num_queries, 2, generator=g) * 0.9 + 0.05,
                "pred_logits": torch.randn(n, num_queries, 2, generator=g) * 2}

    outputs = {**layer(), "pred_saliency": torch.randn(n, frames, generator=g).masked_fill(~frame_mask, -1e4),
               "frame_mask": frame_mask, "frame_times": frame_times}
    if decoder == "dense":
        outputs["pred_logits"][..., 1] = 0.0
        outputs["pred_logits"][..., 0] = outputs["pred_logits"][..., 0].masked_fill(~frame_mask, -1e4)
        outputs["pred_offsets"] = torch.rand(n, frames, 2, generator=g) * 0.5
    else:
        outputs["aux_outputs"] = [layer() for _ in range(randint(0, 2))]
    targets = []
    for _ in range(n):
        m = randint(1, 3)
        start = torch.rand(m, generator=g) * 0.9
        width = torch.where(torch.rand(m, generator=g) < 0.3, torch.full((m,), 0.01), torch.rand(m, generator=g) * 0.5)
        spans = torch.stack([start, (start + width).clamp(max=1.0)], -1)
        kind = randint(0, 4)
        length = frames if kind != 4 else randint(0, frames)
        saliency = [None, torch.randint(0, 5, (length,), generator=g).float(),
                    torch.full((length,), float(randint(0, 2))),  # constant: no ranking signal
                    torch.rand(length, generator=g), torch.randint(0, 3, (length,), generator=g).float()][kind]
        targets.append({"spans": spans, "saliency": saliency})
    if seed % 7 == 3:  # bf16 outputs: the losses are computed in float32 all the same
        for values in [outputs, *outputs.get("aux_outputs", [])]:
            values.update({k: v.bfloat16() for k, v in values.items() if k.startswith("pred_")})
    num_spans = [None, 0.5, 2.5, torch.tensor(3.0)][randint(0, 3)]
    settings = dict(decoder=decoder, saliency_loss=("ranking", "bce")[randint(0, 1)],
                    saliency_margin=0.1 * randint(1, 3), eos_coef=0.1 * randint(1, 5),
                    span_l1_weight=float(randint(1, 10)), span_giou_weight=1.0, label_weight=float(randint(1, 4)),
                    saliency_weight=float(randint(1, 4)))
    return {"outputs": outputs, "targets": targets, "num_spans": num_spans, "settings": settings}


def _leaves(outputs: dict) -> dict:
    """A copy of `outputs` whose float tensors are fresh leaves that require grad."""
    def leaf(value):
        if torch.is_tensor(value) and value.is_floating_point():
            return value.detach().clone().requires_grad_()
        return value

    copy = {k: leaf(v) for k, v in outputs.items() if k != "aux_outputs"}
    if "aux_outputs" in outputs:
        copy["aux_outputs"] = [{k: leaf(v) for k, v in aux.items()} for aux in outputs["aux_outputs"]]
    return copy


def _leaf_grads(outputs: dict) -> dict:
    grads = {k: v.grad for k, v in outputs.items() if torch.is_tensor(v) and v.requires_grad}
    for i, aux in enumerate(outputs.get("aux_outputs") or []):
        grads.update({f"{k}_{i}": v.grad for k, v in aux.items()})
    return grads


def _assert_close_grads(actual: dict, expected: dict):
    """Equal gradients (float32 rounding; one bf16 rounding step for bf16 leaves), None where the reference has None."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if value is None:
            assert actual[name] is None or not actual[name].any(), name
            continue
        assert actual[name] is not None, name
        bf16 = value.dtype == torch.bfloat16
        scale = max(float(value.abs().max()), 1.0)
        torch.testing.assert_close(actual[name], value, rtol=1e-2 if bf16 else 1e-6,
                                   atol=1e-2 * scale if bf16 else 1e-6 * scale, msg=name)


@pytest.mark.parametrize("seed", range(120))
def test_batched_losses_equal_the_per_query_reference(seed):
    """Every term and every gradient of `TemporalHead.loss` equals the frozen per-query implementation."""
    case = _random_case(seed)
    settings = case["settings"]
    head = TemporalHead(8, d_model=8, num_heads=1, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=8,
                        frame_pooling="mean", **settings)
    new_outputs, reference_outputs = _leaves(case["outputs"]), _leaves(case["outputs"])
    terms = head.loss(new_outputs, case["targets"], case["num_spans"])
    expected = _reference_temporal_losses(
        reference_outputs, case["targets"], case["num_spans"], decoder=settings["decoder"],
        saliency_loss=settings["saliency_loss"], margin=settings["saliency_margin"], eos_coef=settings["eos_coef"],
        weights=tuple(settings[k] for k in ("span_l1_weight", "span_giou_weight", "label_weight", "saliency_weight")))
    assert list(terms) == list(expected)
    for name, value in expected.items():
        assert terms[name].dtype == torch.float32 and terms[name].shape == ()
        torch.testing.assert_close(terms[name], value, rtol=1e-6, atol=1e-7, msg=name)
    terms["temporal"].backward()
    expected["temporal"].backward()
    _assert_close_grads(_leaf_grads(new_outputs), _leaf_grads(reference_outputs))
    # the criterion called directly cuts saliency rows longer than the head's frames
    longer = [{**t, "saliency": None if t["saliency"] is None else F.pad(t["saliency"], (0, 2), value=4.0)}
              for t in case["targets"]]
    scores, frame_mask = case["outputs"]["pred_saliency"], case["outputs"]["frame_mask"]
    torch.testing.assert_close(head.criterion.saliency.term(scores, frame_mask, longer),
                               _reference_saliency(scores, frame_mask, longer, settings["saliency_loss"],
                                                   settings["saliency_margin"]), rtol=1e-6, atol=1e-7)


def _outcome(call) -> tuple:
    try:
        call()
    except Exception as error:  # compared, not swallowed
        return type(error), str(error)
    return None, None


@pytest.mark.parametrize("seed", range(60))
def test_target_errors_equal_the_per_query_reference(seed):
    """With random defects (empty spans, reversed or out-of-range windows, saliency too long, 2-D, negative
    or non-finite), `TemporalHead.loss` raises exactly the reference's message for the first bad query."""
    case = _random_case(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    targets = [dict(t) for t in case["targets"]]
    frames = case["outputs"]["pred_saliency"].shape[1]
    defects = [
        lambda t: {**t, "spans": torch.zeros(0, 2)},
        lambda t: {**t, "spans": t["spans"].flip(-1)},
        lambda t: {**t, "spans": t["spans"] + 1.0},
        lambda t: {**t, "spans": t["spans"] - 0.5},
        lambda t: {**t, "saliency": torch.zeros(frames + 1)},
        lambda t: {**t, "saliency": torch.zeros(1, frames)},
        lambda t: {**t, "saliency": -torch.ones(frames)},
        lambda t: {**t, "saliency": torch.full((frames,), float("nan"))},
        lambda t: {**t, "spans": torch.full_like(t["spans"], float("nan"))},
    ]
    for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
        query = int(torch.randint(0, len(targets), (1,), generator=g))
        targets[query] = defects[int(torch.randint(0, len(defects), (1,), generator=g))](targets[query])
    head = TemporalHead(8, d_model=8, num_heads=1, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=8,
                        frame_pooling="mean", decoder=case["settings"]["decoder"])
    expected = _reference_target_error(targets, frames)
    if expected is None:  # accepted: then the loss behaves as the reference's
        settings = {k: case["settings"][k] for k in ("decoder",)}
        assert _outcome(lambda: head.loss(_leaves(case["outputs"]), targets)) == _outcome(
            lambda: _reference_temporal_losses(_leaves(case["outputs"]), targets, **settings))
    else:
        with pytest.raises(ValueError) as error:
            head.loss(_leaves(case["outputs"]), targets)
        assert str(error.value) == expected


def _composed_pairwise_giou(spans_a, spans_b):
    """The pairwise gIoU as first written: box_ops' pairwise IoU and union, then the enclosing penalty."""
    iou, union = pairwise_temporal_iou(spans_a, spans_b)
    enclosing = (torch.maximum(spans_a[:, None, 1], spans_b[None, :, 1])
                 - torch.minimum(spans_a[:, None, 0], spans_b[None, :, 0])).clamp(min=0)
    penalty = torch.where(enclosing > 0, (enclosing - union) / enclosing.clamp(min=torch.finfo(enclosing.dtype).tiny),
                          torch.zeros_like(enclosing))
    return iou - penalty


def test_generalized_temporal_iou_is_the_pairwise_arithmetic():
    """Broadcast to all pairs, it equals the composed pairwise gIoU bit for bit (so the matcher's costs, and
    its assignments, are unchanged), with the same gradients, ties and empty spans included."""
    from tpo.modeling_tpo.box_ops import generalized_temporal_iou

    pairwise_generalized_temporal_iou = _composed_pairwise_giou

    torch.manual_seed(0)
    a = torch.sort(torch.rand(7, 2), -1).values
    b = torch.cat([torch.sort(torch.rand(4, 2), -1).values, a[:2], torch.tensor([[0.3, 0.3], [0.0, 1.0]])])
    a[3] = torch.tensor([0.5, 0.5])  # an empty span
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    fast, reference = generalized_temporal_iou(a1[:, None], b[None]), pairwise_generalized_temporal_iou(a2, b)
    assert torch.equal(fast, reference)
    weights = torch.rand_like(reference)
    (fast * weights).sum().backward()
    (reference * weights).sum().backward()
    # float32 rounding only: the pairs' gradients are summed in another order
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-6, atol=1e-6 * float(a2.grad.abs().max()))
    assert torch.equal(generalized_temporal_iou(a, a), torch.diag(pairwise_generalized_temporal_iou(a, a)))


class _DispatchedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch ops run inside it, and those that would wait for a GPU: reading a value
    (`.item()`, `bool()`), ops whose output size depends on values, and boolean-mask indexing."""

    WAITING = ("aten._local_scalar_dense", "aten.nonzero", "aten.unique", "aten._unique", "aten.masked_select",
               "aten.repeat_interleave")

    def __init__(self):
        super().__init__()
        self.ops, self.waits = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("aten.lift_fresh"):  # host index lists wrapped as tensors (one per matcher row)
            return func(*args, **(kwargs or {}))
        self.ops += 1
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) if i is not None)
        if name.startswith(self.WAITING) or bool_index:
            self.waits.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("decoder", ["detr", "dense"])
@pytest.mark.parametrize("saliency_loss", ["ranking", "bce"])
def test_loss_op_count_does_not_grow_with_queries_and_waits_once(decoder, saliency_loss):
    """`TemporalHead.loss` runs the same number of torch ops for 2 and 8 queries (no loop over queries,
    saliency levels or decoder layers) and reads one value back (its validity check), forward and backward."""
    head = small_head(decoder=decoder, saliency_loss=saliency_loss, num_decoder_layers=3)

    def run(n):
        batch = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in inputs(n=n, frames=8).items()}
        outputs = {k: (v.detach().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v)
                   for k, v in head(**batch).items() if k != "aux_outputs"}
        outputs["aux_outputs"] = [{k: v.detach().requires_grad_() for k, v in aux.items()}
                                  for aux in head(**batch).get("aux_outputs", [])]
        targets = [{"spans": torch.tensor([[0.1, 0.3], [0.5, 0.52]])[: 1 + i % 2],
                    "saliency": None if i == 1 else torch.tensor([0, 1, 1, 2, 0, 4, 4, 0.0]) * (i != 2)}
                   for i in range(n)]
        with _DispatchedOps() as forward:
            terms = head.loss(outputs, targets)
        with _DispatchedOps() as backward:
            terms["temporal"].backward()
        return forward, backward

    (forward_2, backward_2), (forward_8, backward_8) = run(2), run(8)
    assert forward_2.ops == forward_8.ops and backward_2.ops == backward_8.ops
    assert forward_8.waits == ["aten._local_scalar_dense.default"] and backward_8.waits == []


def test_a_nan_span_is_refused_and_does_not_hide_another_queries_bad_span():
    """NaN compares false with every bound, so it needs its own test: refused with the query named (not left to
    fail inside scipy's matcher), and never masking a later query's out-of-range span."""
    head = small_head()
    out = head(**inputs())
    good = {"spans": torch.tensor([[0.1, 0.3]])}
    with pytest.raises(ValueError, match=r"query 1: span \[0.1000.*, nan\] must satisfy"):
        head.loss(out, [good, {"spans": torch.tensor([[0.1, float("nan")]])}])
    with pytest.raises(ValueError, match=r"query 1: span \[0.5, 1.2000"):
        head.loss(out, [good, {"spans": torch.tensor([[0.5, 1.2]])}])


@pytest.mark.parametrize("span", [[0.6, 0.2], [0.2, 1.5], [float("nan"), 0.4]])
def test_model_refuses_an_invalid_temporal_target_naming_the_sample(span):
    from tiny_inputs import MEDIA, REGION, TEMPORAL, build_model_and_processor, weighted_loss

    from tpo.processing.collator_tpo import collate_encoded

    model, processor = build_model_and_processor("llava", tasks=("temporal", "region"))
    samples = [REGION, TEMPORAL]
    encoded = [processor.encode(sample, mode="train") for sample in samples]
    batch = collate_encoded(processor, encoded, [MEDIA[sample["id"]] for sample in samples])
    batch.pop("tpo_meta")
    out = model(**batch)  # the batch as the collator made it is fine
    assert torch.isfinite(out.loss) and {"lm", "region", "temporal"} <= set(out.loss_dict)
    torch.testing.assert_close(out.loss, weighted_loss(model, out))
    batch["temporal_spans"] = torch.tensor([span])
    with pytest.raises(ValueError, match=r"Temporal span \[.*\] of sample 1 is invalid"):
        model(**batch)
