"""CG-DETR's query-aware parts of the temporal head: dummy tokens with the text-to-video relevance they give,
text-to-video layers, reference-point refinement, input dropout, negative pairs; each switchable. Shapes,
hand-computed attention, gradients and a tiny overfit."""

import pytest
import torch

from tpo.modeling_tpo.configuration_tpo import PRESETS, TPOConfig
from tpo.modeling_tpo.temporal_head import TemporalHead
from tpo.modeling_tpo.temporal_layers import TextToVideoLayer, input_dropout

HIDDEN = 32
SMALL = dict(d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
             num_queries=5, frame_pooling="mean")
CGDETR = dict(num_dummies=4, dummy_layers=1, t2v_layers=2, reference_points=True, negative_pairs=True)


def head_inputs(n=3, frames=8, text=5):
    generator = torch.Generator().manual_seed(0)
    return dict(task_embeddings=torch.randn(n, 1, HIDDEN, generator=generator),
                frame_features=torch.randn(n, frames, HIDDEN, generator=generator),
                frame_mask=torch.ones(n, frames, dtype=torch.bool),
                frame_times=(torch.arange(frames).float()[None].expand(n, -1) + 0.5) / frames,
                query_features=torch.randn(n, text, HIDDEN, generator=generator),
                query_mask=torch.ones(n, text, dtype=torch.bool))


def targets(n=3, frames=8):
    saliency = torch.zeros(frames)
    saliency[2:5] = torch.tensor([0.25, 1.0, 0.5])
    return [{"spans": torch.tensor([[0.25, 0.625]]), "saliency": saliency.clone()} for _ in range(n)]


@pytest.mark.parametrize("parts", [
    {},
    {"t2v_layers": 1},
    {"num_dummies": 3, "t2v_layers": 1},
    {"reference_points": True},
    {"input_dropout": 0.5},
    CGDETR,
])
def test_each_part_switches_on_alone_with_the_right_outputs(parts):
    head = TemporalHead(HIDDEN, **SMALL, **parts).train()
    out = head(**head_inputs())
    assert out["pred_spans"].shape == (3, 5, 2) and out["pred_logits"].shape == (3, 5, 2)
    assert out["pred_saliency"].shape == (3, 8) and len(out["aux_outputs"]) == 1
    assert ("pred_t2v_relevance" in out) == bool(parts.get("num_dummies"))
    assert ("pred_saliency_neg" in out) == bool(parts.get("negative_pairs"))
    assert ("reference_points" in out) == bool(parts.get("reference_points"))
    if "pred_t2v_relevance" in out:
        relevance = out["pred_t2v_relevance"]
        assert relevance.shape == (3, 8) and bool(((relevance > 0) & (relevance < 1)).all())
    assert (head.query_aware is not None) == bool(parts.get("t2v_layers"))


def test_release_preset_builds_cgdetr_at_the_release_depth():
    config = TPOConfig(tasks=["temporal"], preset="release")
    settings = {**config.temporal_head_config, "dense_clip_seconds": 0.0}
    head = TemporalHead(HIDDEN, **settings)
    assert len(head.encoder) == 3 and len(head.anchor_decoder.layers) == 3
    assert head.query_aware.dummy_tokens.shape == (45, 256) and len(head.query_aware.layers) == 2
    assert len(head.query_aware.dummy_encoder) == 2 and head.input_dropout == 0.5 and head.negative_pairs
    assert PRESETS["release"]["temporal_head_config"]["num_encoder_layers"] == 3


def test_text_to_video_attention_with_uniform_scores_is_hand_computable():
    """With zero query/key projections every key gets 1 / (D + T): the relevance is T / (D + T) and the output
    takes the text values only, each with that weight (the dummies' values are left out)."""
    torch.manual_seed(0)
    layer = TextToVideoLayer(d_model=8, num_heads=2, dim_feedforward=16, dropout=0.0)
    for linear in (layer.query, layer.key):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    frames, keys = torch.randn(1, 3, 8), torch.randn(1, 6, 8)  # 2 dummies + 4 text tokens
    mask = torch.ones(1, 6, dtype=torch.bool)
    _, weights = layer(frames, keys, mask, num_dummies=2)
    torch.testing.assert_close(weights, torch.full((1, 3, 6), 1 / 6))
    expected_attended = layer.out(layer.value(keys[:, 2:]).sum(1, keepdim=True) / 6).expand(1, 3, 8)
    expected = layer.norm1(frames + expected_attended)
    expected = layer.norm2(expected + layer.feed_forward(expected))
    out, _ = layer(frames, keys, mask, num_dummies=2)
    torch.testing.assert_close(out, expected)
    masked = mask.clone()
    masked[0, 5] = False  # a padded text token takes no attention
    _, weights = layer(frames, keys, masked, num_dummies=2)
    torch.testing.assert_close(weights[0, :, :5], torch.full((3, 5), 1 / 5))
    assert float(weights[0, :, 5].detach().max()) == 0.0


def test_relevance_is_the_text_mass_and_padded_text_gets_none():
    head = TemporalHead(HIDDEN, **SMALL, num_dummies=3, t2v_layers=1).eval()
    batch = head_inputs(n=2)
    full = head(**batch)["pred_t2v_relevance"]
    batch["query_mask"][1, 2:] = False  # fewer real text tokens: less mass on the text
    fewer = head(**batch)["pred_t2v_relevance"]
    torch.testing.assert_close(fewer[0], full[0])  # the other query is untouched
    assert bool((fewer[1] < full[1]).all())


def test_reference_points_are_refined_layer_by_layer():
    head = TemporalHead(HIDDEN, **{**SMALL, "num_decoder_layers": 3}, reference_points=True).eval()
    out = head(**head_inputs())
    layers = [*out["aux_outputs"], out]
    first = head.anchor_decoder.anchors.weight.sigmoid()
    torch.testing.assert_close(layers[0]["reference_points"], first[None].expand(3, -1, -1))
    for before, after in zip(layers[:-1], layers[1:]):  # each layer starts from the previous layer's spans
        torch.testing.assert_close(after["reference_points"], before["pred_spans"].detach())
    assert not torch.equal(layers[0]["pred_spans"], layers[-1]["pred_spans"])
    for layer in layers:  # every layer's spans are (centre, width) pairs inside the video
        assert layer["pred_spans"].shape == (3, 5, 2) and bool(((layer["pred_spans"] > 0) & (layer["pred_spans"] < 1)).all())


def test_input_dropout_is_random_in_training_only_and_free_when_off():
    x = torch.randn(4, 8)
    assert input_dropout(x, 0.0, True) is x and input_dropout(x, 0.5, False) is x
    dropped = input_dropout(x, 0.5, True)  # inverted dropout: each value zeroed or scaled by 1 / (1 - p)
    assert bool(((dropped == 0) | (dropped == 2 * x)).all()) and 0 < int((dropped == 0).sum()) < x.numel()
    head = TemporalHead(HIDDEN, **SMALL, input_dropout=0.5)
    batch = head_inputs()
    head.train()
    assert not torch.equal(head(**batch)["pred_saliency"], head(**batch)["pred_saliency"])
    runs = []
    for _ in range(2):  # the only randomness is the random stream: the same seed, the same outputs
        torch.manual_seed(3)
        runs.append(head(**batch)["pred_saliency"])
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    head.eval()
    torch.testing.assert_close(head(**batch)["pred_saliency"], head(**batch)["pred_saliency"], rtol=0, atol=0)


def test_negative_pairs_pair_each_video_with_the_next_query_of_another_video():
    head = TemporalHead(HIDDEN, **SMALL, **CGDETR).train()  # no dropout anywhere: deterministic
    batch = head_inputs(n=3)
    out = head(**batch, query_groups=torch.tensor([0, 0, 1]))
    assert out["negative_mask"].tolist() == [True, False, True]  # query 1's partner is query 0, same video
    rolled = {**batch, **{key: batch[key].roll(1, 0) for key in ("task_embeddings", "query_features", "query_mask")}}
    mismatched = head.eval()(**rolled)
    torch.testing.assert_close(out["pred_saliency_neg"], mismatched["pred_saliency"])
    torch.testing.assert_close(out["pred_t2v_relevance_neg"], mismatched["pred_t2v_relevance"])
    assert "pred_saliency_neg" not in head.eval()(**batch)  # inference: no negative pass


def test_every_parameter_gets_a_finite_gradient():
    head = TemporalHead(HIDDEN, **SMALL, **CGDETR, input_dropout=0.5, saliency_loss="release").train()
    terms = head.loss(head(**head_inputs()), targets())
    assert {"temporal_saliency", "temporal_t2v_saliency"} <= set(terms)
    terms["temporal"].backward()
    missing = [name for name, p in head.named_parameters() if p.grad is None or not bool(torch.isfinite(p.grad).all())]
    assert not missing
    zero = [name for name, p in head.named_parameters() if not bool(p.grad.any())]
    assert not zero  # and every gradient carries signal


def test_cgdetr_head_overfits_two_queries():
    torch.manual_seed(0)
    head = TemporalHead(HIDDEN, **SMALL, **CGDETR, saliency_loss="release", span_l1_reduction="mean",
                        label_reduction="mean")
    batch = head_inputs(n=2)
    goal = [{"spans": torch.tensor([[0.25, 0.625]]), "saliency": targets(1)[0]["saliency"]},
            {"spans": torch.tensor([[0.5, 1.0]]), "saliency": torch.tensor([0, 0, 0, 0, 0.5, 1.0, 1.0, 0.75])}]
    optimiser = torch.optim.Adam(head.parameters(), lr=2e-3)
    for _ in range(80):
        optimiser.zero_grad()
        head.loss(head.train()(**batch), goal)["temporal"].backward()
        optimiser.step()
    out = head.eval()(**batch)
    for q, target in enumerate(goal):
        start, end, _ = head.predict_windows(out, top_k=1)[q][0]
        s, e = target["spans"][0].tolist()
        iou = max(0.0, min(e, end) - max(s, start)) / (max(e, end) - min(s, start))
        assert iou > 0.8, (q, start, end)
        relevant = target["saliency"] > 0
        assert float(out["pred_saliency"][q][relevant].min()) > float(out["pred_saliency"][q][~relevant].max())
        relevance = out["pred_t2v_relevance"][q]
        assert float(relevance[relevant].mean()) > float(relevance[~relevant].mean())
