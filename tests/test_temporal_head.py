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
    zero = criterion.saliency_term(torch.randn(1, 4), mask, [{"spans": None, "saliency": torch.zeros(4)}])
    assert zero.item() == 0.0
    target = torch.tensor([0.0, 1.0, 0.5, 0.0])
    good = criterion.saliency_term(torch.tensor([[-3.0, 3.0, 1.0, -3.0]]), mask, [{"saliency": target}])
    bad = criterion.saliency_term(torch.tensor([[3.0, -3.0, 1.0, 3.0]]), mask, [{"saliency": target}])
    assert bad.item() > good.item() > 0
    # a ranking that satisfies every margin leaves only the contrastive term
    scores = torch.tensor([[-3.0, 3.0, 1.0, -3.0]])
    log_probs = F.log_softmax(scores[0] / 0.5, dim=0)
    contrastive = (-torch.logsumexp(log_probs[target >= 0.5], 0) - torch.logsumexp(log_probs[target >= 1.0], 0)) / 2
    assert good.item() == pytest.approx(contrastive.item(), rel=1e-5)
    bce = _criterion(saliency_loss="bce").saliency_term(torch.zeros(1, 4), mask, [{"saliency": target}])
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
