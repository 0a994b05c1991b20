"""Tiny models built from configurations, for tests, the quick start and the embedded default run.

Nothing here downloads anything: the tokenizer is trained in-process with `tokenizers`, the
vision-language models and SAM2 are built from configurations with random weights.
"""

import logging
from collections.abc import Iterable

from transformers import (
    LlavaConfig,
    LlavaOnevisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2VLConfig,
    SiglipVisionConfig,
)

logger = logging.getLogger(__name__)

# Tokens of the chat format used by the tiny tokenizer (any MLLM's own template works the same).
TINY_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>", "<|end|>", "<image>", "<video>",
                       "<|vision_start|>", "<|vision_end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
_DEFAULT_CORPUS = [
    "where is the red circle in the image",
    "when does the blue square appear in the video",
    "segment the green triangle moving to the left",
    "what colour is the shape that moves up first answer with the option letter",
    "how many shapes are visible it is at the top left corner",
    "the yellow star moves right then disappears at the end of the clip",
    "answer a b c d yes no one two three four five left right up down",
]


def build_tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus` (any text still tokenizes), with the
    special tokens of `TINY_SPECIAL_TOKENS` and the chat template `TINY_CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus or _DEFAULT_CORPUS) * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        extra_special_tokens=TINY_SPECIAL_TOKENS[3:],
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    wrapped.padding_side = "right"
    return wrapped


def _end_of_turn(tokenizer) -> int:
    """Generation stops at the chat template's end of turn (as chat models' generation configs do)."""
    return tokenizer.convert_tokens_to_ids("<|end|>")


def _tiny_towers(tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int, hidden_size: int,
                 num_layers: int) -> dict:
    """`vision_config` (SigLIP) and `text_config` (Qwen2, the tokenizer's vocabulary and special ids) of the tiny
    LLaVA-family configurations."""
    return {
        "vision_config": SiglipVisionConfig(
            hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
            num_attention_heads=4, image_size=image_size, patch_size=patch_size,
        ),
        "text_config": Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 3,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=_end_of_turn(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
        ),
    }


def tiny_llava_config(tokenizer: PreTrainedTokenizerFast, image_size: int = 32, patch_size: int = 8,
                      hidden_size: int = 64, num_layers: int = 2) -> LlavaConfig:
    """A LLaVA configuration of a few hundred thousand parameters (SigLIP vision tower, Qwen2 LM)."""
    num_patches = (image_size // patch_size) ** 2
    return LlavaConfig(
        **_tiny_towers(tokenizer, image_size, patch_size, hidden_size, num_layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=num_patches,
        tie_word_embeddings=True,
    )


# Tile resolutions (height, width) of the tiny LLaVA-OneVision: 1 x 1 to 2 x 2 tiles, and 1 x 3 / 3 x 1 strips.
TINY_ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def tiny_llava_onevision_config(tokenizer: PreTrainedTokenizerFast, image_size: int = 32, patch_size: int = 8,
                                hidden_size: int = 64, num_layers: int = 2,
                                image_grid_pinpoints: list[list[int]] | None = None,
                                vision_aspect_ratio: str = "anyres_max_9") -> LlavaOnevisionConfig:
    """A LLaVA-OneVision configuration of a few hundred thousand parameters (SigLIP vision tower, Qwen2 LM):
    32 px tiles of 4 x 4 tokens, any-resolution tiling over `image_grid_pinpoints` (default
    `TINY_ONEVISION_PINPOINTS`, multiples of `image_size`). Pair it with
    `LlavaOnevisionImageProcessor(size={"height": image_size, "width": image_size}, image_grid_pinpoints=...)`."""
    return LlavaOnevisionConfig(
        **_tiny_towers(tokenizer, image_size, patch_size, hidden_size, num_layers),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[list(p) for p in (image_grid_pinpoints or TINY_ONEVISION_PINPOINTS)],
        vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=True,
    )


def tiny_qwen2_vl_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2,
                         patch_size: int = 14) -> Qwen2VLConfig:
    """A Qwen2-VL configuration of a few hundred thousand parameters (M-RoPE, 2x2 patch merge)."""
    head_dim = hidden_size // 4
    quarter = head_dim // 4
    mrope_section = [head_dim // 2 - 2 * quarter, quarter, quarter]
    return Qwen2VLConfig(
        vision_config={
            "depth": num_layers, "embed_dim": hidden_size, "hidden_size": hidden_size, "num_heads": 4,
            "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden_size, "intermediate_size": hidden_size * 3,
            "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope_section},
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": _end_of_turn(tokenizer),
            "bos_token_id": tokenizer.bos_token_id, "tie_word_embeddings": True,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def tiny_sam2_config(image_size: int = 128, hidden_size: int = 128):
    """A SAM2 (video) configuration of a few million parameters; masks come out at image_size / 4.

    SAM2's video memory hard-codes 64 memory channels and needs them below `hidden_size` (the
    object pointers are split into hidden / 64 memory tokens), hence hidden_size >= 128.
    """
    from transformers import Sam2VideoConfig

    stride_sizes = [image_size // 4, image_size // 8, image_size // 16]
    return Sam2VideoConfig(
        vision_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 32, "num_attention_heads": 1, "image_size": [image_size, image_size],
                "blocks_per_stage": [1, 2, 2, 1], "embed_dim_per_stage": [32, 64, 128, 256],
                "num_attention_heads_per_stage": [1, 2, 4, 8], "window_size_per_stage": [8, 4, 4, 4],
                "global_attention_blocks": [4], "window_positional_embedding_background_size": [4, 4],
            },
            "backbone_channel_list": [256, 128, 64, 32],
            "backbone_feature_sizes": [[s, s] for s in stride_sizes],
            "fpn_hidden_size": hidden_size,
        },
        prompt_encoder_config={"hidden_size": hidden_size, "image_size": image_size, "patch_size": 16,
                               "mask_input_channels": 16},
        mask_decoder_config={"hidden_size": hidden_size, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "mlp_dim": 2 * hidden_size, "iou_head_hidden_dim": 64},
        image_size=image_size,
        memory_attention_hidden_size=hidden_size,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=2 * hidden_size,
        memory_attention_rope_feat_sizes=[image_size // 16, image_size // 16],
        memory_encoder_hidden_size=hidden_size,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=hidden_size,
        memory_fuser_embed_dim=hidden_size,
        memory_fuser_intermediate_dim=2 * hidden_size,
    )


def random_media(plan: dict) -> dict:
    """Deterministic random uint8 pixels for a media plan (seeded by its path), in the shapes
    `load_media` returns: {"image": (h, w, 3)} or {"frames": (T, h, w, 3), "timestamps": [T]} (+ "dense_frames"
    for dense clips); {} otherwise.
    Stands in for decoding in tests and benchmarks."""
    import hashlib

    import numpy as np

    seed = int(hashlib.md5(plan.get("path", "").encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    if plan["kind"] == "image":
        return {"image": rng.integers(0, 255, (plan["height"], plan["width"], 3), dtype=np.uint8)}
    if plan["kind"] == "video":
        count, dense = len(plan["timestamps"]), list(plan.get("dense_timestamps") or [])
        media = {"frames": rng.integers(0, 255, (count, plan["height"], plan["width"], 3), dtype=np.uint8),
                 "timestamps": list(plan["timestamps"])}
        if dense:  # dense temporal clips, as `load_media` gives them
            media["dense_frames"] = rng.integers(0, 255, (len(dense), plan["height"], plan["width"], 3), dtype=np.uint8)
            media["dense_frame_timestamps"] = dense
        return media
    return {}
