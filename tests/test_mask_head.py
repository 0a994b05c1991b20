"""Mask head on a tiny SAM2: shapes, gradients vs frozen parts, BCE + Dice by hand, prompts per query,
box prompts, tracking, overfitting, loading a pretrained SAM2."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Sam2VideoModel

from tpo.modeling_tpo.mask_head import OUTSIDE_BOX_LOGIT, MaskHead, bound_to_boxes, dice_loss, masks_to_boxes
from tpo.tiny import tiny_sam2_config

HIDDEN = 32


@pytest.fixture(scope="module")
def sam2_config():
    return tiny_sam2_config()


def test_shapes_and_gradients_reach_prompts_not_frozen_encoder(sam2_config):
    torch.manual_seed(0)
    head = MaskHead(HIDDEN, sam2_config)
    embeddings = torch.randn(2, 1, HIDDEN, requires_grad=True)
    out = head(embeddings, sam2_pixel_values=torch.randn(3, 3, 128, 128), query_index=torch.tensor([0, 1, 1]))
    assert out["pred_mask_logits"].shape == (3, 32, 32)
    assert out["iou_scores"].shape == (3,) and out["prompt_embeddings"].shape == (3, 3, 128)
    target = torch.zeros(3, 128, 128)
    target[:, 40:90, 20:70] = 1
    head.loss(out, target)["mask"].backward()
    assert embeddings.grad.abs().sum() > 0
    assert head.prompt_mlp[0].weight.grad.abs().sum() > 0
    assert head.sam2.mask_decoder.conv_s0.weight.grad is not None  # decoder trains by default
    encoder = list(head.sam2.vision_encoder.parameters())
    assert all(not p.requires_grad and p.grad is None for p in encoder)
    assert all(not p.requires_grad for p in head.sam2.memory_attention.parameters())


def test_frames_of_one_query_share_prompts(sam2_config):
    head = MaskHead(HIDDEN, sam2_config).eval()
    embeddings = torch.randn(2, 1, HIDDEN)
    frame = torch.randn(1, 3, 128, 128)
    out = head(embeddings, sam2_pixel_values=frame.repeat(3, 1, 1, 1), query_index=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(out["prompt_embeddings"][0], out["prompt_embeddings"][2])
    torch.testing.assert_close(out["pred_mask_logits"][0], out["pred_mask_logits"][2])
    assert not torch.allclose(out["prompt_embeddings"][0], out["prompt_embeddings"][1])
    for row, query in enumerate([1, 0, 1]):  # each frame gets its own query's prompts, as that query alone
        alone = head(embeddings[query:query + 1], sam2_pixel_values=frame)
        torch.testing.assert_close(out["prompt_embeddings"][row], alone["prompt_embeddings"][0])
        torch.testing.assert_close(out["pred_mask_logits"][row], alone["pred_mask_logits"][0])


def test_box_prompt_changes_the_mask(sam2_config):
    torch.manual_seed(0)
    head = MaskHead(HIDDEN, sam2_config).eval()
    embeddings, frame = torch.randn(1, 1, HIDDEN), torch.randn(1, 3, 128, 128)
    plain_out = head(embeddings, sam2_pixel_values=frame)
    plain = plain_out["pred_mask_logits"]
    boxed = head(embeddings, sam2_pixel_values=frame, input_boxes=torch.tensor([[10.0, 20.0, 60.0, 90.0]]))
    assert not torch.allclose(plain, boxed["pred_mask_logits"])
    # the box joins SAM2's prompts; the head's own prompts are those of the task embedding alone
    assert boxed["pred_mask_logits"].shape == plain.shape == (1, 32, 32)
    torch.testing.assert_close(boxed["prompt_embeddings"], plain_out["prompt_embeddings"], rtol=0, atol=0)


def test_evaluation_segments_as_training_does_unless_the_fallback_is_asked_for(sam2_config):
    """SAM2 switches, in eval mode only, from its single mask to its multimask outputs when the single mask is
    unstable; a decoder trained here never trains those outputs, so by default (decoder not frozen) the switch is
    off and eval mode gives training mode's masks; a frozen (pretrained) decoder keeps SAM2's behaviour."""
    torch.manual_seed(0)
    embeddings, frames = torch.randn(4, 1, HIDDEN), torch.randn(4, 3, 128, 128)
    head = MaskHead(HIDDEN, sam2_config)
    assert head.stability_fallback is False and not head.sam2.mask_decoder.dynamic_multimask_via_stability
    with torch.no_grad():
        trained = head.train()(embeddings, sam2_pixel_values=frames)["pred_mask_logits"]
        evaluated = head.eval()(embeddings, sam2_pixel_values=frames)["pred_mask_logits"]
    torch.testing.assert_close(evaluated, trained)

    fallback = MaskHead(HIDDEN, sam2_config, stability_fallback=True)
    fallback.load_state_dict(head.state_dict())
    with torch.no_grad():
        switched = fallback.eval()(embeddings, sam2_pixel_values=frames)["pred_mask_logits"]
    # a random decoder's single masks are unstable: some images take a multimask output instead
    assert not torch.allclose(switched, trained)
    assert MaskHead(HIDDEN, sam2_config, freeze_mask_decoder=True).sam2.mask_decoder.dynamic_multimask_via_stability


def test_bce_and_dice_hand_computed(sam2_config):
    logits = torch.tensor([[[0.0, 2.0], [-2.0, 0.0]]])
    target = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    p = torch.sigmoid(logits)
    expected_dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert dice_loss(logits, target).item() == pytest.approx(expected_dice.item(), rel=1e-6)
    head = MaskHead(HIDDEN, sam2_config, bce_weight=2.0, dice_weight=0.5)
    terms = head.loss({"pred_mask_logits": logits}, target)
    bce = sum(math.log(1 + math.exp(-x)) if t else math.log(1 + math.exp(x))
              for x, t in [(0.0, 0), (2.0, 1), (-2.0, 0), (0.0, 1)]) / 4
    assert terms["mask_bce"].item() == pytest.approx(bce, rel=1e-5)
    assert terms["mask"].item() == pytest.approx(2.0 * bce + 0.5 * expected_dice.item(), rel=1e-5)
    empty = head.loss({"pred_mask_logits": torch.randn(2, 8, 8)}, torch.zeros(2, 32, 32))
    assert all(torch.isfinite(v) for v in empty.values())
    # empty targets by hand: constant logits -1 upsample to -1 everywhere (32 x 32 = 1024 pixels per mask)
    empty = head.loss({"pred_mask_logits": torch.full((2, 8, 8), -1.0)}, torch.zeros(2, 32, 32))
    bce, dice = math.log(1 + math.exp(-1.0)), 1 - 1 / (1024 / (1 + math.e) + 1)
    assert empty["mask_bce"].item() == pytest.approx(bce, rel=1e-5)
    assert empty["mask_dice"].item() == pytest.approx(dice, rel=1e-5)
    assert empty["mask"].item() == pytest.approx(2.0 * bce + 0.5 * dice, rel=1e-5)


def test_prompt_l1_against_sam2_box_embedding(sam2_config):
    head = MaskHead(HIDDEN, sam2_config, prompt_l1_weight=1.0)
    out = head(torch.randn(1, 1, HIDDEN), sam2_pixel_values=torch.randn(1, 3, 128, 128))
    box = torch.tensor([[10.0, 20.0, 60.0, 90.0]])
    terms = head.loss(out, torch.zeros(1, 128, 128), target_boxes=box)
    reference = head.sam2.prompt_encoder._embed_boxes(box[:, None])[:, 0]
    expected = F.l1_loss(out["prompt_embeddings"].float(), reference)
    assert terms["mask_prompt_l1"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_masks_to_boxes():
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    assert masks_to_boxes(masks).tolist() == [[3.0, 2.0, 9.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


def test_track_returns_per_frame_masks_and_boxes(sam2_config):
    torch.manual_seed(0)
    head = MaskHead(HIDDEN, sam2_config)
    frames = torch.randn(4, 3, 128, 128)
    initial = torch.full((32, 32), -10.0)
    initial[4:12, 8:20] = 10.0  # a rectangle of rows 16..48, columns 32..80 at 128 px
    out = head.track(torch.randn(1, HIDDEN), frames, initial_mask_logits=initial)
    assert out["mask_logits"].shape == (4, 128, 128) and out["boxes_xyxy"].shape == (4, 4)
    assert out["visible"][0]
    # frame 0 is the given mask itself (SAM2 takes a mask prompt as the frame's output)
    torch.testing.assert_close(out["boxes_xyxy"][0], torch.tensor([32.0, 16.0, 80.0, 48.0]), atol=2.0, rtol=0)
    assert head.sam2.training  # mode restored
    boxed = head.track(torch.randn(1, HIDDEN), frames, initial_box=torch.tensor([10.0, 10.0, 60.0, 70.0]))
    assert boxed["mask_logits"].shape == (4, 128, 128)


def test_overfits_one_mask(sam2_config):
    torch.manual_seed(0)
    head = MaskHead(HIDDEN, sam2_config)
    embedding = torch.randn(1, 1, HIDDEN)
    image = torch.randn(1, 3, 128, 128)
    target = torch.zeros(1, 128, 128)
    target[0, 30:90, 40:100] = 1
    optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        terms = head.loss(head(embedding, sam2_pixel_values=image), target)
        optimizer.zero_grad()
        terms["mask"].backward()
        optimizer.step()
        losses.append(terms["mask"].item())
    assert losses[-1] < 0.5 * losses[0]


def test_load_pretrained_sam2_and_refuse_a_mismatch(tmp_path, sam2_config):
    torch.manual_seed(1)
    pretrained = Sam2VideoModel(sam2_config)
    pretrained.save_pretrained(tmp_path / "sam2")
    head = MaskHead(HIDDEN, sam2_config)
    head.load_sam2(tmp_path / "sam2")
    for key, value in Sam2VideoModel.from_pretrained(tmp_path / "sam2").state_dict().items():
        assert torch.equal(head.sam2.state_dict()[key], value), key
    assert not any(p.requires_grad for p in head.sam2.vision_encoder.parameters())  # freezing kept
    other = Sam2VideoModel(tiny_sam2_config(hidden_size=256))
    with pytest.raises(ValueError, match="does not match this mask head's sam2_config"):
        head.load_sam2(other)


def test_box_prompt_localiser_loss_and_frames_without_object(sam2_config):
    """With `box_prompt`, `localise` predicts a box from the visual tokens; the loss adds `mask_box`
    (the region-head terms on the rows whose mask shows the object) and it trains the localiser."""
    torch.manual_seed(0)
    head = MaskHead(HIDDEN, sam2_config, box_prompt=True, box_prompt_config={"heatmap_dim": 16}, box_loss_weight=0.5)
    assert head.localiser is not None and head.localiser.mode == "heatmap"
    embeddings = torch.randn(2, 1, HIDDEN)
    features = torch.randn(2, 4, HIDDEN)
    xy = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]).expand(2, 4, 2)
    localisation = head.localise(embeddings, features, xy, torch.ones(2, 4, dtype=torch.bool))
    assert localisation["pred_boxes_cxcywh"].shape == (2, 4) and localisation["token_scores"].shape == (2, 4)
    out = head(embeddings, sam2_pixel_values=torch.randn(2, 3, 128, 128),
               input_boxes=torch.tensor([[10.0, 10.0, 60.0, 60.0], [0.0, 0.0, 128.0, 128.0]]))
    target_boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 0.0, 0.0]])
    localisation.update(target_boxes_xyxy=target_boxes, has_object=torch.tensor([True, False]))
    masks = torch.zeros(2, 128, 128)
    terms = head.loss(out, masks, localisation=localisation)
    plain = head.loss(out, masks)
    expected = head.localiser.loss(localisation["pred_boxes_cxcywh"][:1], target_boxes[:1],
                                   localisation["token_scores"][:1], xy[:1])
    torch.testing.assert_close(terms["mask_box"], expected["region"])
    torch.testing.assert_close(terms["mask_box_heatmap"], expected["region_heatmap"])
    torch.testing.assert_close(terms["mask"], plain["mask"] + 0.5 * expected["region"])
    terms["mask"].backward()
    assert head.localiser.score[1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="box_prompt_config"):
        MaskHead(HIDDEN, sam2_config, box_prompt=True, box_prompt_config={"heatmap_dims": 8})


def test_prompts_and_image_share_one_positional_encoding(sam2_config, tmp_path):
    """SAM2 encodes a prompt's coordinates with the image tokens' positional encoding. A box corner on an image
    token's centre then carries exactly that token's positional embedding (plus the corner's label embedding), so
    the decoder can find it; a SAM2 built from a config draws the two copies at random unless they are tied. The tie
    survives a TPO model's construction and a save / load."""
    from tiny_inputs import build_model_and_processor

    head = MaskHead(HIDDEN, sam2_config)
    encoder = head.sam2.prompt_encoder
    image_pe = head.sam2.get_image_wide_positional_embeddings()[0]  # (C, h, w), cell centres of the 128-px input
    cells = image_pe.shape[-1]
    row, column = 2, 5
    centre = lambda index: (index + 0.5) * 128 / cells - 0.5  # _embed_boxes adds half a pixel
    box = torch.tensor([[[centre(column), centre(row), centre(column + 1), centre(row + 1)]]])
    with torch.no_grad():
        corners = encoder._embed_boxes(box)[0, 0]  # (3, C)
    torch.testing.assert_close(corners[0] - encoder.point_embed.weight[2], image_pe[:, row, column])
    torch.testing.assert_close(corners[1] - encoder.point_embed.weight[3], image_pe[:, row + 1, column + 1])
    untied = Sam2VideoModel(sam2_config)  # what transformers builds from a config alone
    assert not torch.equal(untied.shared_image_embedding.positional_embedding,
                           untied.prompt_encoder.shared_embedding.positional_embedding)

    model, processor = build_model_and_processor("llava")
    sam2 = model.mask_head.sam2
    assert torch.equal(sam2.shared_image_embedding.positional_embedding,
                       sam2.prompt_encoder.shared_embedding.positional_embedding)
    model.save_pretrained(tmp_path / "model")
    loaded = type(model).from_pretrained(tmp_path / "model").mask_head.sam2
    assert torch.equal(loaded.prompt_encoder.shared_embedding.positional_embedding,
                       sam2.prompt_encoder.shared_embedding.positional_embedding)


def test_box_bound_keeps_the_mask_inside_its_grown_box(sam2_config):
    """`box_bounds_mask`: a low-resolution cell (4 input pixels here) whose centre lies outside its box grown by
    `box_bound_margin` per side is background with no gradient; cells inside keep their logits. Without a box
    prompt nothing changes."""
    logits = torch.randn(2, 32, 32, requires_grad=True)
    boxes = torch.tensor([[8.0, 16.0, 48.0, 40.0], [0.0, 0.0, 128.0, 128.0]])
    bounded = bound_to_boxes(logits, boxes, 128, margin=0.1)  # box 0 grows by 4 x 2.4 px: x 4..52, y 13.6..42.4
    centres = torch.arange(32) * 4 + 2.0
    inside_x = (centres >= 4) & (centres <= 52)
    inside_y = (centres >= 13.6) & (centres <= 42.4)
    inside = inside_y[:, None] & inside_x[None]
    assert inside.sum() == 12 * 8  # x centres 6, 10, ..., 50; y centres 14, 18, ..., 42
    torch.testing.assert_close(bounded[0][inside], logits[0][inside])
    assert bool((bounded[0][~inside] == OUTSIDE_BOX_LOGIT).all())
    torch.testing.assert_close(bounded[1], logits[1])  # the whole image
    bounded.sum().backward()
    torch.testing.assert_close(logits.grad[0], inside.float())

    torch.manual_seed(0)
    head = MaskHead(HIDDEN, sam2_config, box_bounds_mask=True, box_bound_margin=0.0).eval()
    free = MaskHead(HIDDEN, sam2_config).eval()
    free.load_state_dict(head.state_dict())
    embeddings, frame = torch.randn(1, 1, HIDDEN), torch.randn(1, 3, 128, 128)
    box = torch.tensor([[20.0, 30.0, 60.0, 90.0]])
    with torch.no_grad():
        out, reference = head(embeddings, frame, input_boxes=box), free(embeddings, frame, input_boxes=box)
        torch.testing.assert_close(out["pred_mask_logits"], bound_to_boxes(reference["pred_mask_logits"], box, 128, 0.0))
        torch.testing.assert_close(head(embeddings, frame)["pred_mask_logits"], free(embeddings, frame)["pred_mask_logits"])
    with pytest.raises(ValueError, match="box_bound_margin"):
        MaskHead(HIDDEN, sam2_config, box_bound_margin=-0.1)


def test_prompt_gradient_off_keeps_the_mask_loss_out_of_the_task_embedding(sam2_config):
    """`prompt_gradient: False`: the same masks, the prompt MLP and SAM2 still train, the task embedding gets no
    gradient from the mask loss (it still does from the box prompt's localiser, which reads it directly)."""
    torch.manual_seed(0)
    head = MaskHead(HIDDEN, sam2_config)
    cut = MaskHead(HIDDEN, sam2_config, prompt_gradient=False)
    cut.load_state_dict(head.state_dict())
    image, target = torch.randn(1, 3, 128, 128), torch.zeros(1, 128, 128)
    target[0, 30:90, 40:100] = 1
    for model, reaches in ((head, True), (cut, False)):
        embeddings = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(3), requires_grad=True)
        out = model(embeddings, sam2_pixel_values=image)
        model.loss(out, target)["mask"].backward()
        assert (embeddings.grad is not None and embeddings.grad.abs().sum() > 0) == reaches
        assert model.prompt_mlp[0].weight.grad.abs().sum() > 0
        assert model.sam2.mask_decoder.conv_s0.weight.grad.abs().sum() > 0
    with torch.no_grad():
        embeddings = torch.randn(2, 1, HIDDEN)
        torch.testing.assert_close(cut(embeddings, sam2_pixel_values=image.repeat(2, 1, 1, 1))["pred_mask_logits"],
                                   head(embeddings, sam2_pixel_values=image.repeat(2, 1, 1, 1))["pred_mask_logits"])
