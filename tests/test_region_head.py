"""Region head: the released MLP and the heatmap variant (soft-argmax over visual tokens, per-token
offsets and sizes, heatmap KL term), against hand-computed values."""

import math

import pytest
import torch

from tpo.modeling_tpo.region_head import TOKEN_OFFSET_RANGE, RegionHead, heatmap_kl_divergence

HIDDEN = 16


def _gaussian(xy, centre, sigma):
    weights = [math.exp(-0.5 * (((x - centre[0]) / sigma[0]) ** 2 + ((y - centre[1]) / sigma[1]) ** 2)) for x, y in xy]
    total = sum(weights)
    return [w / total for w in weights]


def test_heatmap_kl_hand_computed_and_zero_at_the_target():
    xy = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75)]
    box = torch.tensor([[0.1, 0.1, 0.5, 0.5]])  # centre (0.3, 0.3), sigma (0.1, 0.1)
    target = _gaussian(xy, (0.3, 0.3), (0.1, 0.1))
    scores = torch.tensor([[2.0, 0.0, -1.0]])
    predicted = torch.softmax(scores, -1)[0].tolist()
    expected = sum(t * (math.log(t) - math.log(p)) for t, p in zip(target, predicted))
    got = heatmap_kl_divergence(scores, torch.tensor([xy]), box)
    assert got.item() == pytest.approx(expected, rel=1e-4)
    at_target = heatmap_kl_divergence(torch.tensor([target]).log(), torch.tensor([xy]), box)
    assert at_target.item() == pytest.approx(0.0, abs=1e-6)


def test_heatmap_kl_gives_masked_tokens_no_mass():
    xy = torch.tensor([[(0.25, 0.25), (0.3, 0.3), (0.75, 0.75)]])
    box = torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    minimum = torch.finfo(torch.float32).min
    masked = heatmap_kl_divergence(torch.tensor([[1.0, minimum, 0.0]]), xy, box)
    alone = heatmap_kl_divergence(torch.tensor([[1.0, 0.0]]), xy[:, [0, 2]], box)
    assert torch.isfinite(masked) and masked.item() == pytest.approx(alone.item(), rel=1e-5)


def _heatmap_head():
    torch.manual_seed(0)
    return RegionHead(HIDDEN, mode="heatmap", heatmap_dim=8, heatmap_weight=2.0)


def test_one_hot_scores_put_the_box_at_that_token():
    """With the per-token box layer at zero, a token that takes all the weight gives its own centre and a
    size of sigmoid(0) = 0.5; an offset output moves the centre by at most TOKEN_OFFSET_RANGE."""
    head = _heatmap_head()
    with torch.no_grad():
        head.token_box[1].weight.zero_()
        head.token_box[1].bias.zero_()
        head.score[1].weight.zero_()
        head.score[1].bias.zero_()
    xy = torch.tensor([[[0.2, 0.3], [0.6, 0.7], [0.9, 0.1]]])
    features = torch.randn(1, 3, HIDDEN)
    mask = torch.tensor([[False, True, False]])  # only token 1 may be chosen
    boxes, scores = head.forward_with_heatmap(torch.randn(1, 1, HIDDEN), features, xy, mask)
    torch.testing.assert_close(boxes, torch.tensor([[0.6, 0.7, 0.5, 0.5]]))
    assert scores.shape == (1, 3) and scores[0, 0] == torch.finfo(scores.dtype).min
    with torch.no_grad():
        head.token_box[1].bias.copy_(torch.tensor([100.0, -100.0, 0.0, 0.0]))  # offsets saturate the tanh
    boxes, _ = head.forward_with_heatmap(torch.randn(1, 1, HIDDEN), features, xy, mask)
    torch.testing.assert_close(boxes[0, :2], torch.tensor([0.6 + TOKEN_OFFSET_RANGE, 0.7 - TOKEN_OFFSET_RANGE]))


def test_loss_is_the_weighted_sum_and_gradients_reach_every_part():
    head = _heatmap_head()
    xy = torch.rand(2, 5, 2)
    boxes, scores = head.forward_with_heatmap(torch.randn(2, 1, HIDDEN), torch.randn(2, 5, HIDDEN), xy)
    target = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.4, 0.4, 0.9, 0.8]])
    terms = head.loss(boxes, target, scores, xy)
    assert set(terms) == {"region", "region_l1", "region_giou", "region_heatmap"}
    expected = 2.0 * terms["region_l1"] + 0.2 * terms["region_giou"] + 2.0 * terms["region_heatmap"]
    torch.testing.assert_close(terms["region"], expected)
    terms["region"].backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    without_scores = head.loss(boxes.detach(), target)
    assert "region_heatmap" not in without_scores


def test_heatmap_head_learns_to_find_the_marked_token():
    """Tokens carry a marker feature where the object is: the head learns to put the box there."""
    torch.manual_seed(0)
    head = _heatmap_head()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    grid = torch.stack(torch.meshgrid(torch.linspace(0.125, 0.875, 4), torch.linspace(0.125, 0.875, 4),
                                      indexing="xy"), -1).reshape(1, 16, 2)

    def batch(n=16):
        where = torch.randint(0, 16, (n,))
        features = torch.randn(n, 16, HIDDEN) * 0.1
        features[torch.arange(n), where, 0] += 3.0
        centre = grid[0, where]
        target = torch.cat([centre - 0.1, centre + 0.1], -1)
        return features, grid.expand(n, -1, -1), target

    for _ in range(150):
        features, xy, target = batch()
        boxes, scores = head.forward_with_heatmap(torch.zeros(16, 1, HIDDEN), features, xy)
        loss = head.loss(boxes, target, scores, xy)["region"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    features, xy, target = batch(64)
    with torch.no_grad():
        boxes, _ = head.forward_with_heatmap(torch.zeros(64, 1, HIDDEN), features, xy)
    centre_error = (boxes[:, :2] - (target[:, :2] + target[:, 2:]) / 2).abs().max(-1).values
    assert (centre_error < 0.06).float().mean() > 0.9


def test_additive_dot_adds_the_scaled_dot_product_of_the_same_projections():
    """heatmap_score="additive_dot" scores a token as the additive score plus key . query / sqrt(heatmap_dim),
    with no parameter of its own (an "additive" head's weights load into it)."""
    torch.manual_seed(0)
    additive = RegionHead(HIDDEN, mode="heatmap", heatmap_dim=8, heatmap_score="additive")
    dot = RegionHead(HIDDEN, mode="heatmap", heatmap_dim=8, heatmap_score="additive_dot")
    dot.load_state_dict(additive.state_dict())
    task, features, xy = torch.randn(2, 1, HIDDEN), torch.randn(2, 5, HIDDEN), torch.rand(2, 5, 2)
    _, scores_additive = additive.forward_with_heatmap(task, features, xy)
    boxes, scores_dot = dot.forward_with_heatmap(task, features, xy)
    keys, query = additive.key(features), additive.query(task.mean(1))  # (2, 5, 8), (2, 8)
    expected = torch.stack([torch.stack([keys[i, v] @ query[i] for v in range(5)]) for i in range(2)]) / math.sqrt(8)
    torch.testing.assert_close(scores_dot - scores_additive, expected, rtol=1e-5, atol=1e-5)
    dot.loss(boxes, torch.tensor([[0.1, 0.2, 0.5, 0.6]] * 2), scores_dot, xy)["region"].backward()
    assert dot.query[1].weight.grad.abs().sum() > 0 and dot.key[1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="heatmap_score"):
        RegionHead(HIDDEN, mode="heatmap", heatmap_score="cosine")


def test_mlp_mode_is_the_released_head():
    head = RegionHead(HIDDEN, mode="mlp")
    assert [tuple(p.shape) for p in head.parameters()] == [(8, HIDDEN), (8,), (4, 8), (4,)]
    boxes, scores = head.forward_with_heatmap(torch.randn(3, 1, HIDDEN))
    assert boxes.shape == (3, 4) and scores is None and bool(((boxes > 0) & (boxes < 1)).all())
    with pytest.raises(ValueError, match="Unknown region head mode"):
        RegionHead(HIDDEN, mode="detr")
