"""Region head: the released MLP and the heatmap variant (soft-argmax over visual tokens, per-token
offsets and sizes, heatmap KL term), against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

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


def _colour_scene(n: int, colours: int = 6):
    """Images of 16 tokens, each with a colour (one-hot in the first `colours` dims); a question of 5 text tokens
    whose 3rd names the asked colour (one-hot in dims colours..2*colours, the others are noise words); the asked
    colour is on exactly one token, whose centre is the target. Returns text, its mask, features, xy, boxes."""
    grid = torch.stack(torch.meshgrid(torch.linspace(0.125, 0.875, 4), torch.linspace(0.125, 0.875, 4),
                                      indexing="xy"), -1).reshape(1, 16, 2)
    where = torch.randint(0, 16, (n,))
    asked = torch.randint(0, colours, (n,))
    token_colour = (asked[:, None] + torch.randint(1, colours, (n, 16))) % colours  # never the asked colour...
    token_colour[torch.arange(n), where] = asked  # ...but at the target
    features = F.one_hot(token_colour, HIDDEN).float() * 3 + torch.randn(n, 16, HIDDEN) * 0.1
    text = torch.randn(n, 5, HIDDEN) * 0.1
    text[:, :, 2 * colours:] += torch.randn(n, 5, HIDDEN - 2 * colours)  # noise words
    text[:, 2] = F.one_hot(asked + colours, HIDDEN).float() * 3
    centre = grid[0, where]
    return text, torch.ones(n, 5, dtype=torch.bool), features, grid.expand(n, -1, -1), torch.cat([centre - 0.1,
                                                                                                  centre + 0.1], -1)


def _train_on_colour_scenes(head, steps: int = 200) -> float:
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    task = torch.zeros(16, 1, HIDDEN)  # the task token knows nothing of the question: only the text does
    for _ in range(steps):
        text, text_mask, features, xy, target = _colour_scene(16)
        boxes, scores = head.forward_with_heatmap(task, features, xy, query_features=text, query_mask=text_mask)
        loss = head.loss(boxes, target, scores, xy)["region"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    text, text_mask, features, xy, target = _colour_scene(256)
    with torch.no_grad():
        boxes, _ = head.forward_with_heatmap(torch.zeros(256, 1, HIDDEN), features, xy, query_features=text,
                                             query_mask=text_mask)
    centre_error = (boxes[:, :2] - (target[:, :2] + target[:, 2:]) / 2).abs().max(-1).values
    return (centre_error < 0.06).float().mean().item()


@pytest.mark.slow
def test_query_text_lets_the_question_words_pick_the_token():
    """With `query_text` the instruction's words reach the token scores: the head finds the token of the asked
    colour although the task embedding carries nothing; without it the head can only guess (1 token in 16)."""
    torch.manual_seed(0)
    reading = RegionHead(HIDDEN, mode="heatmap", heatmap_dim=16, heatmap_weight=2.0, heatmap_score="additive_dot",
                         query_text=True)
    torch.manual_seed(0)
    blind = RegionHead(HIDDEN, mode="heatmap", heatmap_dim=16, heatmap_weight=2.0, heatmap_score="additive_dot")
    assert _train_on_colour_scenes(reading) > 0.9
    assert _train_on_colour_scenes(blind) < 0.3


def test_query_text_without_text_tokens_is_the_task_embedding_alone():
    torch.manual_seed(0)
    head = RegionHead(HIDDEN, mode="heatmap", heatmap_dim=8, query_text=True)
    task, features, xy = torch.randn(2, 1, HIDDEN), torch.randn(2, 5, HIDDEN), torch.rand(2, 5, 2)
    alone, scores_alone = head.forward_with_heatmap(task, features, xy)
    text = torch.randn(2, 3, HIDDEN)
    masked, scores_masked = head.forward_with_heatmap(task, features, xy, query_features=text,
                                                      query_mask=torch.zeros(2, 3, dtype=torch.bool))
    torch.testing.assert_close(scores_masked, scores_alone)
    torch.testing.assert_close(masked, alone)
    head.loss(masked, torch.tensor([[0.1, 0.2, 0.5, 0.6]] * 2), scores_masked, xy)["region"].backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    # no valid text token: nothing flows to the text projection, the token scoring trains
    assert all(p.grad is None or not bool(p.grad.any()) for p in head.text_query.parameters())
    assert all(p.grad is not None and bool(p.grad.any()) for p in (*head.key.parameters(), *head.query.parameters()))
    _, scores_text = head.forward_with_heatmap(task, features, xy, query_features=text,
                                               query_mask=torch.tensor([[True, False, False], [True, True, True]]))
    assert not torch.allclose(scores_text, scores_alone)
    # one valid text token: its projection is added to the query (the pooling's weight on it is 1)
    keys = head.key(features)
    query = head.query(task.mean(1)) + head.text_query(text[:, 0])
    expected_first = head.score(keys[0] + query[0]).squeeze(-1)
    torch.testing.assert_close(scores_text[0], expected_first, rtol=1e-5, atol=1e-5)


def test_mlp_mode_is_the_released_head():
    head = RegionHead(HIDDEN, mode="mlp")
    assert [tuple(p.shape) for p in head.parameters()] == [(8, HIDDEN), (8,), (4, 8), (4,)]
    boxes, scores = head.forward_with_heatmap(torch.randn(3, 1, HIDDEN))
    assert boxes.shape == (3, 4) and scores is None and bool(((boxes > 0) & (boxes < 1)).all())
    with pytest.raises(ValueError, match="Unknown region head mode"):
        RegionHead(HIDDEN, mode="detr")
