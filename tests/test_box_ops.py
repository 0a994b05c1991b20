import torch

from tpo.modeling_tpo.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
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
