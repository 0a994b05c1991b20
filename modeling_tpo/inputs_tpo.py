"""The model's input names, grouped by what each is (per token, per SAM2 image, head-only, training target).

Remote code: no imports.
"""

HEAD_ONLY_INPUTS = (
    "instruction_end_index", "query_token_mask", "frame_token_index", "frame_timestamps", "video_durations",
    "visual_token_xy",
    "sam2_pixel_values", "mask_query_index", "sam2_batch_index", "mask_frame_index", "mask_view_to_sam2", "tpo_meta",
)
TRAINING_TARGETS = (
    "labels", "task_labels", "region_boxes", "region_batch_index", "temporal_spans", "temporal_span_query_index",
    "temporal_saliency", "mask_targets",
)
# per SAM2 image (m, ...), never per token, whatever their shapes
MASK_IMAGE_KEYS = ("mask_frame_index", "mask_view_to_sam2")
# every input with one row per SAM2 image (m, ...): slice them together when SAM2 images are dropped
SAM2_IMAGE_INPUTS = ("sam2_pixel_values", "mask_query_index", "sam2_batch_index", "mask_targets", *MASK_IMAGE_KEYS)
NOT_PER_TOKEN = ("sam2_pixel_values", "mask_query_index", "sam2_batch_index", "mask_targets", "region_boxes",
                  "region_batch_index", "temporal_spans", "temporal_span_query_index", *MASK_IMAGE_KEYS)
PER_TOKEN_FILL = {"frame_token_index": -1, "query_token_mask": False, "mm_token_type_ids": 0, "visual_token_xy": -1.0}
DENSE_PREFIX = "dense_"  # inputs of the temporal head's dense clips: head-only, per clip (never per token)
