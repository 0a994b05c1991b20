import torch

from tpo.modeling_tpo.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    l1_and_giou_losses,
    pairwise_generalized_temporal_iou,
    pairwise_temporal_iou,
    span_cw_to_se,
    span_se_to_cw,
)


def test_generalized_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]])
    # pair 0: inter 1, union 7, enclosing 9 -> 1/7 - 2/9; pair 1: identical -> 1;
    # pair 2: disjoint, union 2, enclosing 3 -> 0 - 1/3
    expected = torch.tensor([1 / 7 - 2 / 9, 1.0, -1 / 3])
    torch.testing.assert_close(generalized_box_iou(a, b), expected)


def test_box_conversions_round_trip():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes)
    torch.testing.assert_close(box_xyxy_to_cxcywh(boxes), torch.tensor([[0.3, 0.55, 0.4, 0.7]]))


def test_temporal_iou_and_giou_hand_computed():
    a = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 3.0], [2.0, 3.0]])
    iou, _ = pairwise_temporal_iou(a, b)
    # [0,2]v[1,3]: 1/3; [0,2]v[2,3]: touching -> 0; [0,1]v[1,3]: 0; [0,1]v[2,3]: 0
    torch.testing.assert_close(iou, torch.tensor([[1 / 3, 0.0], [0.0, 0.0]]))
    giou = pairwise_generalized_temporal_iou(a, b)
    # [0,1]v[2,3]: union 2, enclosing 3 -> -1/3; touching spans: enclosing = union -> 0
    torch.testing.assert_close(giou, torch.tensor([[1 / 3, 0.0], [0.0, -1 / 3]]))
    spans = torch.tensor([[0.2, 0.6]])
    torch.testing.assert_close(span_cw_to_se(span_se_to_cw(spans)), spans)


def _composed_l1_giou(pred, target):
    l1 = (pred - box_xyxy_to_cxcywh(target)).abs().sum(-1).mean()
    return l1, (1 - generalized_box_iou(box_cxcywh_to_xyxy(pred), target)).mean()


def _random_case(generator, q):
    pred = torch.rand(q, 4, dtype=torch.float64, generator=generator)
    pred[:, 2:] *= 0.6
    low = torch.rand(q, 2, dtype=torch.float64, generator=generator)
    target = torch.cat([low, low + 0.5 * torch.rand(q, 2, dtype=torch.float64, generator=generator)], -1)
    return pred, target


def test_fused_l1_giou_equals_composed_values_and_gradients():
    generator = torch.Generator().manual_seed(0)
    cases = [_random_case(generator, q) for q in (1, 2, 5, 16) for _ in range(10)]
    # hand-made edge cases: identical boxes (ties in every min / max), a zero-width prediction, disjoint and
    # touching boxes, a box inside the other, a zero-area target
    pred = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.0, 0.3], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0],
                         [0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4]], dtype=torch.float64)
    target = torch.tensor([[0.2, 0.2, 0.4, 0.4], [0.4, 0.4, 0.6, 0.6], [0.5, 0.5, 0.9, 0.9], [0.5, 0.0, 1.0, 1.0],
                           [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    cases.append((pred, target))
    for pred, target in cases:
        weights = torch.randn(2, dtype=torch.float64, generator=generator)
        fused_input = pred.clone().requires_grad_()
        l1, giou = l1_and_giou_losses(fused_input, target)
        (weights[0] * l1 + weights[1] * giou).backward()
        reference_input = pred.clone().requires_grad_()
        l1_ref, giou_ref = _composed_l1_giou(reference_input, target)
        (weights[0] * l1_ref + weights[1] * giou_ref).backward()
        torch.testing.assert_close(l1, l1_ref)
        torch.testing.assert_close(giou, giou_ref)
        torch.testing.assert_close(fused_input.grad, reference_input.grad)


def test_fused_l1_giou_hand_computed_and_gradcheck():
    # prediction (0, 0)-(2, 2) as cxcywh (1, 1, 2, 2) against target (1, 1)-(3, 3): GIoU = 1/7 - 2/9,
    # L1 = |1 - 2| * 2 (centre) + 0 (size) = 2
    pred = torch.tensor([[1.0, 1.0, 2.0, 2.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    l1, giou = l1_and_giou_losses(pred, target)
    torch.testing.assert_close(l1, torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(giou, torch.tensor(1 - (1 / 7 - 2 / 9), dtype=torch.float64))
    generator = torch.Generator().manual_seed(1)
    pred, target = _random_case(generator, 6)
    assert torch.autograd.gradcheck(lambda p: l1_and_giou_losses(p, target), (pred.requires_grad_(),))
