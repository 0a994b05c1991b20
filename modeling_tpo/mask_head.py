"""Mask head: the task embedding prompts SAM2 (transformers' `Sam2VideoModel`).
Losses and the optional box prompt: `MaskHead`; README.md, "The model".

Remote code: torch and transformers only.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Sam2VideoModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

from .box_ops import masks_to_boxes
from .configuration_tpo import BoxPromptConfig, MaskHeadConfig
from .region_head import RegionHead


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over masks of 1 - (2 |P.T| + s) / (|P| + |T| + s), P = sigmoid(logits); (m, H, W) inputs."""
    probabilities = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (probabilities * targets).sum(-1) + smooth
    denominator = probabilities.sum(-1) + targets.sum(-1) + smooth
    return (1 - numerator / denominator).mean()



OUTSIDE_BOX_LOGIT = -16.0  # a pixel outside a bounding box prompt: background (sigmoid 1e-7), with no gradient


def tie_prompt_positional_encoding(sam2: nn.Module) -> None:
    """Give SAM2's prompt encoder the image's positional encoding (in place).

    SAM2 has one random-Fourier positional encoding: the image tokens' positions in the mask decoder and the
    coordinates of point and box prompts are encoded with the same matrix, which is how the decoder finds a prompt's
    place in the image. transformers' `Sam2VideoModel` holds two copies (`shared_image_embedding`,
    `prompt_encoder.shared_embedding`); a checkpoint fills both with the same values, but a model built from a config
    draws two different random matrices, and its box prompts then point nowhere. Loading a checkpoint afterwards
    (`load_sam2`, `from_pretrained`) overwrites both with the checkpoint's."""
    with torch.no_grad():
        sam2.prompt_encoder.shared_embedding.positional_embedding.copy_(
            sam2.shared_image_embedding.positional_embedding)


def bound_to_boxes(logits: torch.Tensor, boxes_xyxy: torch.Tensor, image_size: int, margin: float) -> torch.Tensor:
    """Mask logits (m, h, w) over a square SAM2 input of `image_size` pixels with every cell whose centre lies
    outside its box (m, 4) (x0, y0, x1, y1 in input pixels), grown by `margin` x its width / height on each side,
    set to `OUTSIDE_BOX_LOGIT` (background); the cells inside keep their logits and gradients."""
    height, width = logits.shape[-2:]
    boxes = boxes_xyxy.to(device=logits.device, dtype=torch.float32)
    grow = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0) * margin  # (m, 2)
    low, high = boxes[:, :2] - grow, boxes[:, 2:] + grow
    ys = (torch.arange(height, device=logits.device, dtype=torch.float32) + 0.5) * (image_size / height)
    xs = (torch.arange(width, device=logits.device, dtype=torch.float32) + 0.5) * (image_size / width)
    inside_x = (xs[None] >= low[:, :1]) & (xs[None] <= high[:, :1])  # (m, w)
    inside_y = (ys[None] >= low[:, 1:]) & (ys[None] <= high[:, 1:])  # (m, h)
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    return torch.where(inside, logits, logits.new_tensor(OUTSIDE_BOX_LOGIT))


@dataclass
class MaskHeadOutput(ModelOutput):
    r"""
    The mask head's outputs per SAM2 image (m) (see `MaskHead.forward`); in `TPOOutput.mask_outputs` also the
    mask queries' `query_index`, `batch_index`, `task_embeddings` and, with the box prompt, `prompt_boxes_xyxy_sam2`.

    pred_mask_logits (`(m, h, w)`): low-resolution logits (h = S / 4); iou_scores (`(m,)`); object_score_logits
        (`(m,)`); prompt_embeddings (`(m, k * K, prompt_dim)`); pred_boxes_xyxy (`(m, 4)`): with the box regressor,
        raw (x0, y0, x1, y1) normalised to SAM2's input.
    query_index (`(m,)`): the mask query of each SAM2 image; batch_index (`(q,)`): the sample of each mask query;
    task_embeddings (`(q, k, hidden)`): the mask queries' task embeddings (for `track_masks`);
    prompt_boxes_xyxy_sam2 (`(m, 4)`): the box prompts in SAM2 input pixels (box prompt only).
    """

    pred_mask_logits: torch.FloatTensor | None = None
    iou_scores: torch.FloatTensor | None = None
    object_score_logits: torch.FloatTensor | None = None
    prompt_embeddings: torch.FloatTensor | None = None
    pred_boxes_xyxy: torch.FloatTensor | None = None
    query_index: torch.LongTensor | None = None
    batch_index: torch.LongTensor | None = None
    task_embeddings: torch.FloatTensor | None = None
    prompt_boxes_xyxy_sam2: torch.FloatTensor | None = None


class MaskHead(nn.Module):
    """Task embedding -> SAM2 sparse prompts -> SAM2 masks.

    An MLP turns each task embedding into K sparse prompt embeddings in SAM2's prompt space (the
    release's hidden -> hidden -> 3 x 256); SAM2's mask decoder reads them with SAM2's own image
    embeddings of the frame. For videos, the first frame's predicted mask (or a user-given box) prompts
    SAM2's video memory, which propagates through the remaining frames (tracking).

    Losses: sigmoid BCE + Dice on the masks (the release defines but never calls a mask loss; it trains
    only an L1 between the predicted prompt embedding and SAM2's prompt embedding of the GT box, kept
    here as `prompt_l1_weight`, and an L1 on a box regressed from the task embedding, `box_l1_weight`: an MLP
    hidden -> hidden -> 4 giving raw (x0, y0, x1, y1) normalised to SAM2's input, as the release's region head
    regresses boxes; both 0 by default, both on in the release preset). The GT box of each image is the box of
    its GT mask; images whose mask is empty take no part in these two L1s.

    Box prompt (`box_prompt=True`, off by default; not in the release): a localiser (the region head's
    "heatmap" mode) reads the MLLM's visual tokens of the frame with the task embedding and predicts the
    object's box, which SAM2's own prompt encoder embeds as a box prompt next to the task-embedding
    prompts. The release's L1 asks the MLP to *produce* SAM2's box embedding; here the box itself is
    predicted (L1 + GIoU + heatmap KL against the GT mask's box, `box_loss_weight`) and embedded exactly,
    which grounds the mask where the MLLM looks. The box enters SAM2 detached: the mask loss trains the
    decoder to use it, the box loss trains the localiser. With `box_bounds_mask`, the mask stays inside its
    box prompt (grown by `box_bound_margin` per side): pixels outside it are background (`bound_to_boxes`).

    Args:
        hidden_size: the LLM's hidden size.
        sam2_config: a `Sam2VideoConfig`.
        config: the settings (`MaskHeadConfig`, or a dict of its fields; None: the defaults), kept as `settings`:
            loss weights (a box regressor exists only with `box_l1_weight` > 0), frozen SAM2 parts
            (`requires_grad=False`), `multimask_output`, `stability_fallback`, and the box prompt (`box_prompt`,
            the localiser's `box_prompt_config` (`BoxPromptConfig`'s keys) and its loss weight `box_loss_weight`).
        **settings: `MaskHeadConfig` fields set over `config` (`MaskHead(64, sam2_config, bce_weight=1.0)`).
    """

    def __init__(self, hidden_size: int, sam2_config, config: MaskHeadConfig | dict | None = None, **settings):
        super().__init__()
        s = self.settings = MaskHeadConfig.build(config, **settings)
        if s.box_bound_margin < 0:
            raise ValueError(f"`box_bound_margin` must be >= 0 (a share of the box's size per side), got "
                             f"{s.box_bound_margin}.")
        self.sam2 = Sam2VideoModel(sam2_config)
        tie_prompt_positional_encoding(self.sam2)
        self.prompt_dim = sam2_config.prompt_encoder_config.hidden_size
        self.num_prompt_tokens = s.num_prompt_tokens
        self.prompt_mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                        nn.Linear(hidden_size, s.num_prompt_tokens * self.prompt_dim))
        self.weights = {"bce": s.bce_weight, "dice": s.dice_weight, "prompt_l1": s.prompt_l1_weight,
                        "box": s.box_loss_weight, "box_l1": s.box_l1_weight}
        self.localiser = None
        if s.box_prompt:
            box_settings = BoxPromptConfig.build(s.box_prompt_config, name="box_prompt_config")
            self.localiser = RegionHead(hidden_size, mode="heatmap", **box_settings.to_dict())
        self.freeze_image_encoder = s.freeze_image_encoder
        self.multimask_output = s.multimask_output
        self.image_size = int(sam2_config.image_size)
        self.sam2.vision_encoder.requires_grad_(not s.freeze_image_encoder)
        for module in (self.sam2.prompt_encoder, self.sam2.shared_image_embedding):
            module.requires_grad_(not s.freeze_prompt_encoder)
        self.sam2.mask_decoder.requires_grad_(not s.freeze_mask_decoder)
        self.stability_fallback = (s.freeze_mask_decoder if s.stability_fallback is None
                                   else bool(s.stability_fallback))
        self.sam2.mask_decoder.dynamic_multimask_via_stability = (
            self.stability_fallback and bool(sam2_config.mask_decoder_config.dynamic_multimask_via_stability))
        for name, module in self.sam2.named_children():  # video memory: used at inference only
            if name not in ("vision_encoder", "prompt_encoder", "shared_image_embedding", "mask_decoder"):
                module.requires_grad_(False)
        for name, parameter in self.sam2.named_parameters(recurse=False):
            parameter.requires_grad_(name == "no_memory_embedding" and not s.freeze_image_encoder)
        self.box_regressor = None
        if s.box_l1_weight:
            self.box_regressor = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 4))

    def load_sam2(self, sam2_model_or_path) -> None:
        """Replace SAM2's weights by a pretrained `Sam2VideoModel` (instance or folder / hub id)."""
        source = sam2_model_or_path
        if not isinstance(source, nn.Module):
            source = Sam2VideoModel.from_pretrained(source)
        mine, theirs = self.sam2.state_dict(), source.state_dict()
        mismatched = sorted(k for k in mine if k in theirs and mine[k].shape != theirs[k].shape)
        missing = sorted(set(mine) - set(theirs))
        if mismatched or missing:
            raise ValueError(
                f"The SAM2 checkpoint does not match this mask head's sam2_config: {len(mismatched)} shape "
                f"mismatch(es) (e.g. {mismatched[:3]}) and {len(missing)} missing key(s) (e.g. {missing[:3]}). "
                "Build the TPO config with that checkpoint's config (TPOConfig(sam2_config=...))."
            )
        requires_grad = {k: p.requires_grad for k, p in self.sam2.named_parameters()}
        self.sam2.load_state_dict(theirs, strict=False)
        for name, parameter in self.sam2.named_parameters():
            parameter.requires_grad_(requires_grad[name])

    # ---- features and prompts ------------------------------------------------------------------
    def image_embeddings(self, sam2_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(m, 3, S, S) -> SAM2 feature maps, high resolution first, each (m, C_l, h_l, w_l)."""
        dtype = next(self.sam2.vision_encoder.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_image_encoder):
            vision = self.sam2.vision_encoder(sam2_pixel_values.to(dtype), return_dict=True)
        feature_maps = list(vision.fpn_hidden_states)
        feature_maps[0] = self.sam2.mask_decoder.conv_s0(feature_maps[0])
        feature_maps[1] = self.sam2.mask_decoder.conv_s1(feature_maps[1])
        batch = sam2_pixel_values.shape[0]
        feature_maps[-1] = feature_maps[-1] + self.sam2.no_memory_embedding.view(1, -1, 1, 1)
        sizes = self.sam2.backbone_feature_sizes
        return [f.reshape(batch, -1, *size) for f, size in zip(feature_maps, sizes)]

    def prompts(self, task_embeddings: torch.Tensor) -> torch.Tensor:
        """(n, k, hidden) -> (n, k * K, prompt_dim) sparse prompt embeddings (from a detached task embedding when
        `prompt_gradient` is off)."""
        if not self.settings.prompt_gradient:
            task_embeddings = task_embeddings.detach()
        dtype = next(self.prompt_mlp.parameters()).dtype  # (peft may wrap the MLP)
        out = self.prompt_mlp(task_embeddings.to(dtype))
        return out.reshape(task_embeddings.shape[0], -1, self.prompt_dim)

    def forward(self, task_embeddings: torch.Tensor, sam2_pixel_values: torch.Tensor | None = None,
                image_embeddings: list[torch.Tensor] | None = None, query_index: torch.Tensor | None = None,
                input_boxes: torch.Tensor | None = None, input_masks: torch.Tensor | None = None) -> MaskHeadOutput:
        """
        Args:
            task_embeddings: (n, k, hidden).
            sam2_pixel_values: (m, 3, S, S), or `image_embeddings` from `image_embeddings()`.
            query_index: (m,) the query of each image (default: arange(n), m == n).
            input_boxes: (m, 4) optional user boxes, (x0, y0, x1, y1) in SAM2 input pixels.
            input_masks: (m, S, S) optional mask prompts (dense), e.g. a previous frame's mask.
        Returns:
            pred_mask_logits (m, h, w) low-resolution logits (h = S / 4), iou_scores (m,),
            object_score_logits (m,), prompt_embeddings (m, k * K, prompt_dim); with the box regressor
            pred_boxes_xyxy (m, 4), raw (x0, y0, x1, y1) normalised to SAM2's input.
        """
        if image_embeddings is None:
            if sam2_pixel_values is None:
                raise ValueError("The mask head needs `sam2_pixel_values` (or precomputed `image_embeddings`).")
            image_embeddings = self.image_embeddings(sam2_pixel_values)
        m = image_embeddings[-1].shape[0]
        if query_index is None:
            if task_embeddings.shape[0] != m:
                raise ValueError(f"{m} images for {task_embeddings.shape[0]} mask queries: pass `query_index`.")
            query_index = torch.arange(m, device=task_embeddings.device)
        prompts = self.prompts(task_embeddings)[query_index.to(task_embeddings.device)]  # (m, kK, C)
        sparse = prompts[:, None]  # (m, 1 object, tokens, C)
        encoder = self.sam2.prompt_encoder
        if input_boxes is not None:
            box_tokens = encoder._embed_boxes(input_boxes.to(sparse.dtype)[:, None])  # (m, 1, 3, C)
            sparse = torch.cat([sparse, box_tokens.to(sparse.dtype)], dim=2)
        if input_masks is not None:
            masks = F.interpolate(input_masks[:, None].float(), size=encoder.mask_input_size, mode="bilinear",
                                  align_corners=False)
            dense = encoder.mask_embed(masks.to(sparse.dtype))
        else:
            size = encoder.image_embedding_size
            dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(m, -1, size[0], size[1])
        positional = self.sam2.get_image_wide_positional_embeddings().repeat(m, 1, 1, 1)
        low_res, iou_scores, _, object_scores = self.sam2.mask_decoder(
            image_embeddings=image_embeddings[-1],
            image_positional_embeddings=positional.to(image_embeddings[-1].dtype),
            sparse_prompt_embeddings=sparse.to(image_embeddings[-1].dtype),
            dense_prompt_embeddings=dense.to(image_embeddings[-1].dtype),
            multimask_output=self.multimask_output,
            high_resolution_features=image_embeddings[:-1],
        )
        low_res, iou_scores = low_res[:, 0], iou_scores[:, 0]  # one object per image
        if self.multimask_output:
            best = iou_scores.argmax(-1)
            rows = torch.arange(m, device=low_res.device)
            logits, iou = low_res[rows, best], iou_scores[rows, best]
        else:
            logits, iou = low_res[:, 0], iou_scores[:, 0]
        if self.settings.box_bounds_mask and input_boxes is not None:
            logits = bound_to_boxes(logits, input_boxes, self.image_size, self.settings.box_bound_margin)
        boxes = None
        if self.box_regressor is not None:
            query = task_embeddings.mean(1).to(next(self.box_regressor.parameters()).dtype)
            boxes = self.box_regressor(query)[query_index.to(task_embeddings.device)]
        return MaskHeadOutput(pred_mask_logits=logits, iou_scores=iou, object_score_logits=object_scores.reshape(m),
                              prompt_embeddings=prompts, pred_boxes_xyxy=boxes)

    # ---- loss -------------------------------------------------------------------------------------
    def loss(self, outputs: dict, target_masks: torch.Tensor, target_boxes: torch.Tensor | None = None,
             localisation: dict | None = None) -> dict:
        """`mask_bce`, `mask_dice`, optionally `mask_prompt_l1` and the box prompt's `mask_box` (with its
        `mask_box_l1`, `mask_box_giou`, `mask_box_heatmap`), and `mask` (weighted sum), float32.

        target_masks: (m, H, W) in {0, 1} at any size (logits are upsampled bilinearly to it);
        target_boxes: (m, 4) GT boxes in SAM2 input pixels, for the prompt and box L1s (default: the boxes of
            `target_masks`, scaled to SAM2's input);
        localisation: from `localise` with `target_boxes_xyxy` (m, 4), the GT boxes normalised to the
            localiser's frame, and `has_object` (m,) bool (frames without the object give no box loss).
        """
        logits = outputs["pred_mask_logits"].float()
        targets = target_masks.to(logits.device).float()
        if logits.shape[-2:] != targets.shape[-2:]:
            logits = F.interpolate(logits[:, None], size=targets.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        terms = {
            "mask_bce": F.binary_cross_entropy_with_logits(logits, targets),
            "mask_dice": dice_loss(logits, targets),
        }
        total = self.weights["bce"] * terms["mask_bce"] + self.weights["dice"] * terms["mask_dice"]
        if self.weights["prompt_l1"] or self.weights["box_l1"]:
            box_terms = self._box_l1_terms(outputs, targets, target_boxes)
            terms.update(box_terms)
            for name, value in box_terms.items():
                total = total + self.weights[name.removeprefix("mask_")] * value
        if localisation is not None and self.localiser is not None:
            rows = localisation["has_object"].to(logits.device)
            if bool(rows.any()):
                box_terms = self.localiser.loss(localisation["pred_boxes_cxcywh"][rows],
                                                localisation["target_boxes_xyxy"][rows],
                                                localisation["token_scores"][rows], localisation["visual_xy"][rows])
            else:  # no frame shows its object: 0, with a gradient path for every localiser parameter
                box_terms = {"region": localisation["pred_boxes_cxcywh"].float().sum() * 0.0}
            for name, value in box_terms.items():
                terms["mask_box" if name == "region" else name.replace("region", "mask_box")] = value
            total = total + self.weights["box"] * terms["mask_box"]
        terms["mask"] = total
        return terms

    def _box_l1_terms(self, outputs: dict, target_masks: torch.Tensor, target_boxes: torch.Tensor | None) -> dict:
        """The release's L1s over the images whose GT mask is not empty: `mask_prompt_l1` (mean over tokens x
        channels of |predicted prompt - SAM2's prompt embedding of the GT box|) and, with the box regressor,
        `mask_box_l1` (mean over images x 4 of |predicted - GT box|, normalised to SAM2's input)."""
        size = float(self.image_size)
        if target_boxes is None:
            height, width = target_masks.shape[-2:]
            scale = torch.tensor([size / width, size / height] * 2, device=target_masks.device)
            target_boxes = masks_to_boxes(target_masks > 0.5) * scale
        target_boxes = target_boxes.to(target_masks.device).float()
        rows = (target_boxes[:, 2] > target_boxes[:, 0]) & (target_boxes[:, 3] > target_boxes[:, 1])
        predicted = outputs["prompt_embeddings"].float()
        terms = {}
        if self.weights["prompt_l1"]:
            with torch.no_grad():
                reference = self.sam2.prompt_encoder._embed_boxes(target_boxes[:, None].to(predicted.dtype))[:, 0]
            tokens = min(predicted.shape[1], reference.shape[1])
            difference = (predicted[:, :tokens] - reference[:, :tokens].float()).abs().mean((1, 2))
            terms["mask_prompt_l1"] = (difference * rows).sum() / rows.sum().clamp(min=1)
        if self.weights["box_l1"] and "pred_boxes_xyxy" in outputs:
            difference = (outputs["pred_boxes_xyxy"].float() - target_boxes / size).abs().mean(1)
            terms["mask_box_l1"] = (difference * rows).sum() / rows.sum().clamp(min=1)
        return terms

    def localise(self, task_embeddings: torch.Tensor, visual_features: torch.Tensor, visual_xy: torch.Tensor,
                 visual_mask: torch.Tensor, query_features: torch.Tensor | None = None,
                 query_mask: torch.Tensor | None = None) -> dict:
        """The box prompt's prediction per SAM2 image, in the localiser's (the visual tokens') frame.

        Args: task_embeddings (m, k, hidden) of each image's query; visual_features (m, V, hidden), their
            patch centres visual_xy (m, V, 2) and visual_mask (m, V): the visual tokens of that image;
            query_features (m, Q, hidden) and query_mask (m, Q): the instruction's text tokens (read with the
            localiser's `query_text`).
        Returns: pred_boxes_cxcywh (m, 4) normalised, token_scores (m, V), visual_xy (m, V, 2).
        """
        if self.localiser is None:
            raise ValueError("This mask head has no box prompt (mask_head_config box_prompt=False).")
        boxes, scores = self.localiser.forward_with_heatmap(task_embeddings, visual_features, visual_xy, visual_mask,
                                                            query_features, query_mask)
        return {"pred_boxes_cxcywh": boxes, "token_scores": scores, "visual_xy": visual_xy}

    # ---- video inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def track(self, task_embedding: torch.Tensor | None, frames: torch.Tensor, initial_box: torch.Tensor | None = None,
              initial_mask_logits: torch.Tensor | None = None, threshold: float = 0.0) -> dict:
        """Segment and track through a video.

        Frame 0's mask comes from `initial_box` (SAM2's box prompt alone), else `initial_mask_logits`,
        else the head prompted by `task_embedding`; SAM2's video memory propagates it to the other frames.

        Args:
            task_embedding: (k, hidden) one query's task embedding (unused with a box or initial mask).
            frames: (T, 3, S, S) SAM2 inputs, in time order.
            initial_box: optional (4,) user box on frame 0, (x0, y0, x1, y1) in SAM2 input pixels.
            initial_mask_logits: optional (h, w) mask logits for frame 0, any size (skips the head).
        Returns:
            mask_logits (T, S, S), boxes_xyxy (T, 4) in SAM2 input pixels, visible (T,) bool.
        """
        if initial_box is None and initial_mask_logits is None:
            if task_embedding is None:
                raise ValueError("Tracking needs a frame-0 prompt: a task embedding, initial mask logits or a box.")
            first = self.forward(task_embedding[None], sam2_pixel_values=frames[:1])
            initial_mask_logits = first["pred_mask_logits"][0]
        steps = list(self.track_stream(iter(frames), initial_box=initial_box, initial_mask_logits=initial_mask_logits,
                                       threshold=threshold, num_frames=frames.shape[0]))
        return {key: torch.stack([step[key] for step in steps]) for key in ("mask_logits", "boxes_xyxy", "visible")}

    @torch.no_grad()
    def track_stream(self, frames, initial_box: torch.Tensor | None = None,
                     initial_mask_logits: torch.Tensor | None = None, threshold: float = 0.0,
                     num_frames: int | None = None):
        """Track through frames that arrive one at a time, holding only SAM2's memory window: the frames and
        per-frame states older than the memory (`num_maskmem`) and object-pointer
        (`max_object_pointers_in_encoder`) windows are dropped, so memory does not grow with the video's length.

        Args:
            frames: an iterable of (3, S, S) SAM2 inputs in time order (e.g. a generator reading files).
            initial_box: (4,) box on frame 0, (x0, y0, x1, y1) in SAM2 input pixels (SAM2's box prompt), or
            initial_mask_logits: (h, w) frame-0 mask logits at any size (e.g. the mask head's first-frame mask).
            num_frames: the video's length when known: SAM2 then uses it as its offline propagation does (object
                pointers of at most min(num_frames, max_object_pointers_in_encoder) frames, the same masks as
                `track`); None: streaming (as `Sam2VideoModel(frame=...)`).
        Yields:
            per frame: mask_logits (S, S), boxes_xyxy (4,) SAM2 input pixels of the thresholded mask (zeros when
            empty), visible () bool.
        """
        if (initial_box is None) == (initial_mask_logits is None):
            raise ValueError("track_stream needs exactly one frame-0 prompt: `initial_box` or `initial_mask_logits`.")
        size = self.image_size
        dtype = next(self.sam2.parameters()).dtype
        session, obj_idx = None, 0
        keep = max(self.sam2.num_maskmem - 1, self.sam2.config.max_object_pointers_in_encoder - 1)
        was_training = self.sam2.training
        self.sam2.eval()  # SAM2's video path keeps object scores only in eval mode
        try:
            for index, frame in enumerate(frames):
                if session is None:
                    device = frame.device
                    session = _KnownLengthSession(num_frames, video_height=size, video_width=size, dtype=dtype,
                                                  inference_device=device, inference_state_device=device,
                                                  video_storage_device=device)
                    obj_idx = session.obj_id_to_idx(1)
                    session.add_new_frame(frame.to(dtype), 0)
                    self._prompt_first_frame(session, obj_idx, frame.device, dtype, initial_box, initial_mask_logits,
                                             threshold)
                else:
                    session.add_new_frame(frame.to(dtype), index)
                output = self.sam2(session, frame_idx=index)
                logits = output.pred_masks.reshape(-1, *output.pred_masks.shape[-2:])[0].float()
                if logits.shape[-1] != size:
                    logits = F.interpolate(logits[None, None], size=(size, size), mode="bilinear",
                                           align_corners=False)[0, 0]
                session.forget_before(index + 1 - keep, obj_idx)
                binary = logits > threshold
                yield {"mask_logits": logits, "boxes_xyxy": masks_to_boxes(binary[None])[0], "visible": binary.any()}
        finally:
            self.sam2.train(was_training)

    @staticmethod
    def _prompt_first_frame(session, obj_idx: int, device, dtype, initial_box, initial_mask_logits, threshold: float):
        size = session.video_height
        if initial_box is not None:
            corners = initial_box.reshape(1, 1, 2, 2).to(device=device, dtype=torch.float32)
            labels = torch.tensor([[[2, 3]]], dtype=torch.int32, device=device)
            session.add_point_inputs(obj_idx, 0, {"point_coords": corners, "point_labels": labels})
        else:
            mask = F.interpolate(initial_mask_logits[None, None].float(), size=(size, size), mode="bilinear",
                                 align_corners=False)
            session.add_mask_inputs(obj_idx, 0, (mask > threshold).to(dtype))
        session.obj_with_new_inputs = [1]


class _KnownLengthSession(Sam2VideoInferenceSession):
    """A SAM2 inference session that receives its frames one at a time and forgets them (and the per-frame states
    past the memory window), while answering `num_frames` with the video's length (or a huge number, which makes
    SAM2 behave as in streaming)."""

    def __init__(self, total_frames: int | None, **kwargs):
        super().__init__(**kwargs)
        self.total_frames = total_frames if total_frames is not None else 2**62

    @property
    def num_frames(self) -> int:
        return self.total_frames

    def forget_before(self, frame_idx: int, obj_idx: int) -> None:
        """Drop the pixels of every processed frame and the tracked states of frames before `frame_idx` (the
        conditioning frame's state, the prompt, stays)."""
        self.processed_frames = {}
        outputs = self.output_dict_per_obj[obj_idx]["non_cond_frame_outputs"]
        tracked = self.frames_tracked_per_obj[obj_idx]
        for old in [i for i in outputs if i < frame_idx]:
            del outputs[old]
        for old in [i for i in tracked if i < frame_idx]:
            del tracked[old]
