"""Scale rehearsal: TPO on the real published shapes of three 7 B backbones and SAM2.1-hiera-tiny.

    python benchmarks/bench_scale.py --backbones qwen2.5-vl-7b --steps 1 --threads 1     # a 16-frame 448 px video
    python benchmarks/bench_scale.py --backbones llava-onevision-7b --num-frames 8 --image-size 384 --threads 1
    python benchmarks/bench_scale.py --device cuda --llm-layers 8 --vision-layers 0 --steps 3 --peak-tflops 989 \
        --scaling-frames                                                        # on a GPU: full vision depth

What is built
-------------
Each backbone's published `config.json` and `preprocessor_config.json` (Qwen/Qwen2.5-VL-7B-Instruct,
llava-hf/llava-onevision-qwen2-7b-ov-hf, llava-hf/llava-1.5-7b-hf; `PUBLISHED` below, facts from those files)
is written to a folder and read back by `AutoConfig` / `AutoImageProcessor`, as a downloaded checkpoint would be,
with the language model cut to `--llm-layers` layers and the vision tower to `--vision-layers` (0: its published
depth) and random weights. Everything else keeps the published widths: hidden sizes, heads, key-value heads,
intermediate sizes, vocabularies (152,064 / 152,128 / 32,064 rows), rope settings, vision towers and image
processors. The tokenizer is a stand-in with the checkpoint's vocabulary size and its special tokens at their
real ids (`PUBLISHED[...]["tokenizer"]`), rendering the checkpoint's chat format. The mask head carries
SAM2.1-hiera-tiny (`SAM2_1_HIERA_TINY`) at its 1024 px input.

`TPOForConditionalGeneration.from_mllm(..., tasks=every task)` wraps the MLLM; peft LoRA (r16/alpha32 on every
linear layer of the LLM, the TPO modules as `modules_to_save`, as `examples/run_tpo.py` does), the joint stage's
trainable set (`apply_stage("joint")`), gradient checkpointing, bf16 where the CPU supports it,
`labelled_logits_only`. One batch is built through `TPOProcessor` and its collator: a video temporal sample
(`--num-frames` frames, a span and per-clip saliency), a region image and a mask image (`--image-size` px).

What is measured (one run)
--------------------------
- `step`: forward, backward and AdamW step of the bare MLLM (the same LoRA-wrapped MLLM: its backbone on input
  ids, attention mask and pixels, its LM head and loss on the labelled positions; TPO's task-token hook detached)
  and of TPO on the same batch: one profiled round, then `--steps` unprofiled ones; ratio TPO / bare.
- `components`: per component (vision tower, projector, embeddings, LLM layers, rest of the LLM, LM head, LM loss,
  router, heads, SAM2 image encoder, temporal loss, losses and glue outside any module), from the profiled TPO step:
  parameters, forward and backward time (its ops' time, attributed by `torch.distributed._tools.ModTracker` in both
  passes), bytes kept for backward, its peak working memory (live tensors above the level at its entry) and its
  largest tensor (op, shape); the ratio with the LLM layers' and vision tower's op time scaled to the published
  depth, and TPO's own ops against the bare step.
- `memory model`: bytes per sample and fixed bytes at the published depth, from those figures (`memory_model`), and
  the samples that fit on 24 / 40 / 80 / 141 GB.
- `scaling`: TPO's own parts (router, heads, losses, frame pooling, task-token gathers) at 4..32 frames on the
  MLLM's hidden states (`backbone_hidden_states`, no backbone): their largest intermediate tensor against
  batch x sequence x hidden, to show that nothing grows with frames x tokens x hidden.

Times are this process's CPU seconds on a CPU (`step_clock`: a shared machine's other processes do not count),
synchronised wall seconds on an accelerator. Memory is tensor bytes created during the measured call (a dispatch
mode that counts every storage an op allocates until it dies), not the process RSS: weights are listed separately.
"""

import argparse
import contextlib
import copy
import functools
import inspect
import json
import sys
import tempfile
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
QWEN_SPECIAL_TOKENS = [  # ids 151643 .. 151664 of the Qwen2 / Qwen2.5 tokenizers
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
ONEVISION_PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]

# Published configurations: config.json and preprocessor_config.json of each checkpoint (their keys, as the hub
# files write them), and its tokenizer's size and special tokens. The LLaVA-1.5 text config writes out the Llama
# defaults that its file leaves implicit (Vicuna-7B v1.5 = Llama-2-7B shapes).
PUBLISHED = {
    "qwen2.5-vl-7b": {
        "checkpoint": "Qwen/Qwen2.5-VL-7B-Instruct",
        "config": {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-06, "vocab_size": 152064,
            "max_position_embeddings": 128000, "max_window_layers": 28, "sliding_window": 32768,
            "use_sliding_window": False, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
            "video_token_id": 151656, "torch_dtype": "bfloat16",
            "vision_config": {
                "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
                "in_chans": 3, "patch_size": 14, "spatial_patch_size": 14, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                "out_hidden_size": 3584, "tokens_per_second": 2,
            },
        },
        "preprocessor": {
            "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD, "resample": 3,
        },
        "tokenizer": {"base_vocab": 151643, "leading": [], "added": QWEN_SPECIAL_TOKENS, "pad": "<|endoftext|>",
                      "eos": "<|im_end|>"},
        "chat": {"style": "chatml", "system": "You are a helpful assistant.",
                 "image": "<|vision_start|><|image_pad|><|vision_end|>",
                 "video": "<|vision_start|><|video_pad|><|vision_end|>"},
    },
    "llava-onevision-7b": {
        "checkpoint": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "config": {
            "architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
            "image_token_index": 151646, "video_token_index": 151647, "projector_hidden_act": "gelu",
            "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": ONEVISION_PINPOINTS,
            "tie_word_embeddings": False, "use_image_newline_parameter": True, "torch_dtype": "float16",
            "text_config": {  # Qwen2-7B-Instruct, embeddings grown by the image/video tokens and padded to 64
                "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "vocab_size": 152128,
                "max_position_embeddings": 32768, "max_window_layers": 28, "rope_theta": 1000000.0,
                "sliding_window": 131072, "use_sliding_window": False, "bos_token_id": 151643,
                "eos_token_id": 151645, "torch_dtype": "bfloat16",
            },
            "vision_config": {  # SigLIP so400m-patch14-384 without its last layer and head
                "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                "num_hidden_layers": 26, "num_attention_heads": 16, "patch_size": 14, "image_size": 384,
                "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06, "vision_use_head": False,
            },
        },
        "preprocessor": {
            "image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": 384, "width": 384},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3, "do_pad": True,
            "do_convert_rgb": True, "image_grid_pinpoints": ONEVISION_PINPOINTS,
        },
        "tokenizer": {"base_vocab": 151643, "leading": [], "pad": "<|endoftext|>", "eos": "<|im_end|>",
                      "added": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]},
        "chat": {"style": "chatml", "system": None, "image": "<image>", "video": "<video>"},
    },
    "llava-1.5-7b": {
        "checkpoint": "llava-hf/llava-1.5-7b-hf",
        "config": {
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
            "pad_token_id": 32001, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "image_seq_length": 576, "tie_word_embeddings": False,
            "vocab_size": 32064, "torch_dtype": "float16",
            "text_config": {  # Vicuna-7B v1.5
                "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-05,
                "vocab_size": 32064, "max_position_embeddings": 4096, "rope_theta": 10000.0, "pad_token_id": 0,
                "torch_dtype": "float16",
            },
            "vision_config": {  # CLIP ViT-L/14 at 336 px
                "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14, "image_size": 336,
                "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
            },
        },
        "preprocessor": {
            "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_resize": True,
            "do_normalize": True, "do_rescale": True, "do_convert_rgb": True, "rescale_factor": 1 / 255,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3,
        },
        "tokenizer": {"base_vocab": 32000, "leading": ["<unk>", "<s>", "</s>"], "added": ["<image>", "<pad>"],
                      "pad": "<pad>", "eos": "</s>"},
        "chat": {"style": "vicuna", "image": "<image>", "video": "<image>"},
    },
}
BACKBONES = tuple(PUBLISHED)

# SAM2.1-hiera-tiny (facebook/sam2.1-hiera-tiny): Hiera-T backbone, 1024 px input, 256-wide prompt/mask decoder.
SAM2_1_HIERA_TINY = {
    "image_size": 1024,
    "vision_config": {
        "backbone_config": {
            "model_type": "sam2_hiera_det_model", "hidden_size": 96, "num_attention_heads": 1,
            "image_size": [1024, 1024], "blocks_per_stage": [1, 2, 7, 2], "embed_dim_per_stage": [96, 192, 384, 768],
            "num_attention_heads_per_stage": [1, 2, 4, 8], "window_size_per_stage": [8, 4, 14, 7],
            "global_attention_blocks": [5, 7, 9], "window_positional_embedding_background_size": [7, 7],
        },
        "backbone_channel_list": [768, 384, 192, 96], "backbone_feature_sizes": [[256, 256], [128, 128], [64, 64]],
        "fpn_hidden_size": 256,
    },
    "prompt_encoder_config": {"hidden_size": 256, "image_size": 1024, "patch_size": 16, "mask_input_channels": 16},
    "mask_decoder_config": {"hidden_size": 256, "mlp_dim": 2048, "num_hidden_layers": 2, "num_attention_heads": 8,
                            "iou_head_hidden_dim": 256},
    "memory_attention_num_layers": 4, "memory_attention_hidden_size": 256, "memory_encoder_output_channels": 64,
}
SAM2_1_HIERA_TINY_PARAMS_M = 38.9  # published size of the checkpoint (million parameters)

# The words of the prompts, so that they tokenize to words rather than to the unknown token.
_WORDS = ("where is the in image when visible video segment which part of shows a an red circle blue square green "
          "triangle object you are helpful assistant user system yes no . , ? ! :").split()


# --------------------------------------------------------------------------------------------------
# Building the published backbones (cut in depth, random weights)
# --------------------------------------------------------------------------------------------------
def cut_config(name: str, llm_layers: int, vision_layers: int = 0) -> dict:
    """The published config.json of `name` with the LLM cut to `llm_layers` layers and the vision tower to
    `vision_layers` (0: its published depth)."""
    config = copy.deepcopy(PUBLISHED[name]["config"])
    text = config.get("text_config", config)  # Qwen2.5-VL writes its text settings at the top level
    text["num_hidden_layers"] = llm_layers
    if "max_window_layers" in text:
        text["max_window_layers"] = llm_layers
    vision = config["vision_config"]
    depth_key = "depth" if "depth" in vision else "num_hidden_layers"
    if vision_layers:
        vision[depth_key] = vision_layers
        if "fullatt_block_indexes" in vision:  # keep one full-attention block, as the published tower ends on one
            vision["fullatt_block_indexes"] = [vision_layers - 1]
    return config


def write_checkpoint_files(name: str, folder: Path, llm_layers: int, vision_layers: int = 0) -> Path:
    """config.json and preprocessor_config.json of `name` (cut, see `cut_config`) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cut_config(name, llm_layers, vision_layers), indent=1))
    (folder / "preprocessor_config.json").write_text(json.dumps(PUBLISHED[name]["preprocessor"], indent=1))
    return folder


def chat_template(chat: dict) -> str:
    """A Jinja chat template rendering typed content parts in the checkpoint's format ("chatml": Qwen's
    <|im_start|>role ... <|im_end|> turns, with a default system turn where the checkpoint has one; "vicuna":
    LLaVA-1.5's "USER: ... ASSISTANT: ...</s>")."""
    parts = ("{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
             "{% elif part['type'] == 'image' %}{{ '" + chat["image"] + "' }}"
             "{% elif part['type'] == 'video' %}{{ '" + chat["video"] + "' }}{% endif %}{% endfor %}")
    if chat["style"] == "chatml":
        system = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + chat["system"]
                  + "<|im_end|>\\n' }}{% endif %}") if chat.get("system") else ""
        return (system + "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}" + parts
                + "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")
    return ("{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' }}" + parts + "{{ ' ' }}"
            "{% else %}{{ 'ASSISTANT: ' }}" + parts + "{{ '</s>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def stand_in_tokenizer(name: str):
    """A word-level tokenizer with the vocabulary size of `name`'s tokenizer and its special tokens at their real
    ids (e.g. Qwen2.5-VL: 151,665 tokens, <|image_pad|> = 151655), rendering its chat format."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = PUBLISHED[name]["tokenizer"]
    vocab = {token: i for i, token in enumerate(spec["leading"])}
    for word in ("<unk_word>", *_WORDS):
        vocab.setdefault(word, len(vocab))
    for i in range(len(vocab), spec["base_vocab"]):
        vocab[f"w{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk_word>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk_word>")
    # special tokens already in the vocabulary (Llama's <s>, </s>) keep their ids; the others follow it
    tokenizer.add_special_tokens({"extra_special_tokens": spec["leading"] + spec["added"]})
    tokenizer.pad_token, tokenizer.eos_token = spec["pad"], spec["eos"]
    tokenizer.chat_template = chat_template(PUBLISHED[name]["chat"])
    return tokenizer


def sam2_config():
    """SAM2.1-hiera-tiny's configuration (`Sam2VideoConfig`)."""
    from transformers import Sam2VideoConfig

    return Sam2VideoConfig(**copy.deepcopy(SAM2_1_HIERA_TINY))


def build_mllm(name: str, folder: Path, llm_layers: int, vision_layers: int, dtype: torch.dtype, seed: int = 0):
    """(mllm, image_processor) of `name` from its published files (cut, random weights: `fill_weights`), as
    `AutoModelForImageTextToText` / `AutoImageProcessor` load a downloaded checkpoint's."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    write_checkpoint_files(name, folder, llm_layers, vision_layers)
    config = AutoConfig.from_pretrained(folder)
    with no_init_weights():
        mllm = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return fill_weights(mllm, seed), AutoImageProcessor.from_pretrained(folder)


@torch.no_grad()
def fill_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Random weights in O(parameters) copies instead of a normal draw per element (8 s for a 152k x 3584
    embedding on one core): each matrix is a tiled random pattern of std `std` (period 65,521, a prime, so that
    rows differ), 1-D weights (norm scales) 1 and biases 0. Parameters are marked initialised, as loaded
    weights are, so that wrapping models (`from_mllm`) do not draw them again."""
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.randn(65521, generator=generator) * std
    for name, parameter in model.named_parameters():
        if parameter.dim() == 1 and name.endswith("weight"):
            parameter.fill_(1.0)
        elif parameter.dim() == 1 and name.endswith("bias"):
            parameter.zero_()
        else:
            flat, filled = parameter.view(-1), min(parameter.numel(), pattern.numel())
            flat[:filled].copy_(pattern[:filled])
            while filled < flat.numel():  # double the filled prefix: O(numel) in log2(numel / 65,521) copies
                step = min(filled, flat.numel() - filled)
                flat[filled:filled + step].copy_(flat[:step])
                filled += step
        parameter._is_hf_initialized = True
    return model


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 / AMX), without which bf16 is emulated
    and slower than float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def build_scale_model(name: str, folder: Path, llm_layers: int = 1, vision_layers: int = 0, num_frames: int = 16,
                      dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", lora: bool = True,
                      gradient_checkpointing: bool = True, seed: int = 0):
    """(model, processor): `name` cut to `llm_layers` / `vision_layers` with every TPO task and SAM2.1-hiera-tiny,
    LoRA as `examples/run_tpo.py` applies it (peft, r16 / alpha 32 on the LLM's linear layers, the TPO modules as
    `modules_to_save`) with the joint stage's trainable set, gradient checkpointing, in train mode; and a
    `TPOProcessor` for `num_frames`-frame videos built from the checkpoint's image processor and tokenizer."""
    from peft import LoraConfig, get_peft_model

    from tpo import TPOForConditionalGeneration
    from tpo.processing.processing_tpo import TPOProcessor
    from tpo.training.arguments import TPOTrainingArguments
    from tpo.training.stages import apply_stage

    mllm, image_processor = build_mllm(name, folder / "mllm", llm_layers, vision_layers, dtype, seed)
    tokenizer = stand_in_tokenizer(name)
    torch.manual_seed(seed)
    model = TPOForConditionalGeneration.from_mllm(mllm, tokenizer=tokenizer, sam2_config=sam2_config())
    model.to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    processor = TPOProcessor.from_model_config(model.config, image_processor, tokenizer, num_frames=num_frames)
    if lora:
        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=model.lora_target_regex(),
                            modules_to_save=model.task_module_names())
        model = get_peft_model(model, config)
    on_cpu = torch.device(device).type == "cpu"
    args = TPOTrainingArguments(output_dir=str(folder / "run"), report_to=[], use_cpu=on_cpu)
    apply_stage(model, "joint", args, unwrap(model).config.mask_head_config)
    return model.train(), processor


def unwrap(model):
    """The TPOForConditionalGeneration inside a peft wrapper (peft forwards attribute reads to it, but attributes
    set on the wrapper stay there)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def scale_batch(processor, image_size: int = 448, device="cpu", dtype=torch.bfloat16,
                kinds: tuple[str, ...] = ("temporal", "region", "mask")) -> dict:
    """One sample per kind: a video temporal sample (`processor.num_frames` frames of `image_size` px, a span and
    per-clip saliency), a region image, a mask image (`image_size` px), encoded by `TPOProcessor` and collated
    with random pixels (`bench_model_overhead.build_batch`)."""
    from bench_model_overhead import build_batch, make_sample

    return build_batch(processor, [make_sample(kind, i, image_size) for i, kind in enumerate(kinds)], device, dtype)


# --------------------------------------------------------------------------------------------------
# Profiling: op time, live tensor memory and largest tensor per component and pass
# --------------------------------------------------------------------------------------------------
@dataclass
class ComponentStats:
    """One component in one pass: op wall time, peak working memory (live tensor bytes above the level at its
    latest entry), the largest tensor its ops created (bytes, shape, op), and (forward) the bytes of its
    tensors still alive when the forward pass ends (what backward keeps)."""

    seconds: float = 0.0
    ops: int = 0
    peak_working_bytes: int = 0
    largest_bytes: int = 0
    largest: str = ""
    retained_bytes: int = 0


class LabelledModule(torch.nn.Module):
    """A function as a module, so that `ModTracker` attributes its ops (the LM loss) to a component."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *args, **kwargs):
        return self.function(*args, **kwargs)


def step_clock(device: str | torch.device):
    """Seconds to time steps and ops with: on a CPU, this process's CPU time (the other processes of a shared
    machine do not count; with several threads, their CPU-seconds add up), on an accelerator the wall time after
    synchronising it (per op in the profiled round, so that each op's time is its own)."""
    device = torch.device(device)
    if device.type == "cpu":
        return time.process_time

    def wall() -> float:
        torch.accelerator.synchronize(device)
        return time.perf_counter()

    return wall


class StepProfiler(TorchDispatchMode):
    """Attributes every op of a forward/backward to the deepest running component (`components`: name -> modules,
    via `ModTracker`, which also follows modules through backward) and counts the bytes of every storage an op
    allocates until the storage dies. Ops outside every component go to `outside`."""

    def __init__(self, components: dict[str, list[torch.nn.Module]], outside: str = "losses & glue",
                 clock=time.process_time):
        super().__init__()
        self.components, self.outside, self.clock = components, outside, clock
        self.tracker = ModTracker()
        self.stats: dict[tuple[str, str], ComponentStats] = defaultdict(ComponentStats)
        self.live_bytes = self.peak_bytes = 0
        self._owners: dict[int, tuple[int, str]] = {}  # storage key -> (bytes, component)
        self._current, self._entry_bytes = None, 0

    def __enter__(self):
        self.tracker.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.tracker.__exit__(*exc)

    def component(self) -> str:
        best, depth = self.outside, -1
        for name, modules in self.components.items():
            for module in modules:
                fqn = self.tracker.get_known_fqn(module)
                if fqn is not None and fqn in self.tracker.parents and fqn.count(".") > depth:
                    best, depth = name, fqn.count(".")
        return best

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = (self.component(), "backward" if self.tracker.is_bw else "forward")
        if key != self._current:
            self._current, self._entry_bytes = key, self.live_bytes
        start = self.clock()
        out = func(*args, **(kwargs or {}))
        stats = self.stats[key]
        stats.seconds += self.clock() - start
        stats.ops += 1
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:  # views and in-place results share an input's storage: not new memory
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self._track(tensor, key[0], stats, func)
        stats.peak_working_bytes = max(stats.peak_working_bytes, self.live_bytes - self._entry_bytes)
        return out

    def _track(self, tensor: torch.Tensor, component: str, stats: ComponentStats, func) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self._owners or size == 0:
            return
        self._owners[key] = (size, component)
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._free, key)
        if size > stats.largest_bytes:
            stats.largest_bytes, stats.largest = size, f"{func.__name__} {tuple(tensor.shape)} {tensor.dtype}"

    def _free(self, key: int) -> None:
        size, _ = self._owners.pop(key, (0, None))
        self.live_bytes -= size

    def snapshot_retained(self) -> int:
        """Record, per component, the bytes of the tensors it created that are still alive (call it when the
        forward pass ends: what backward keeps); returns their total."""
        for size, component in self._owners.values():
            self.stats[(component, "forward")].retained_bytes += size
        return sum(size for size, _ in self._owners.values())


def vision_modules(mllm) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(vision tower, projector) of a LLaVA-family (`vision_tower`, `multi_modal_projector`) or Qwen-VL
    (`visual`, `visual.merger`) model."""
    base = mllm.model
    tower = getattr(base, "visual", None) or base.vision_tower
    projector = getattr(tower, "merger", None) or base.multi_modal_projector
    return tower, projector


def _own(module):
    """The trained copy inside peft's `modules_to_save` wrapper (or the module itself)."""
    return module.modules_to_save["default"] if hasattr(module, "modules_to_save") else module


def components_of(model) -> dict[str, list[torch.nn.Module]]:
    """The components whose cost is reported: name -> modules. The LLM's decoder layers are their own component
    ("LLM layers": per-layer figures scale to the published depth), "LLM decoder" is the rest of it (final norm,
    rotary embeddings). Labels the TPO model's LM loss as a module (`LabelledModule`) so that its ops are attributed
    to it."""
    tpo = unwrap(model)
    if not isinstance(tpo.loss_function, LabelledModule):
        object.__setattr__(tpo, "_loss_function", LabelledModule(tpo.loss_function))  # not a submodule: not saved
    tower, projector = vision_modules(tpo.mllm)
    decoder = tpo.mllm.get_decoder()
    found = {"vision tower": tower, "projector": projector, "embeddings": tpo.mllm.get_input_embeddings(),
             "LLM decoder": decoder, "LLM layers": list(decoder.layers),
             "LM head": tpo.mllm.get_output_embeddings(), "LM loss": tpo.loss_function, "router": tpo.router,
             "region head": tpo.region_head, "temporal head": tpo.temporal_head,
             "temporal loss": _own(tpo.temporal_head).criterion if tpo.temporal_head is not None else None,
             "mask head": tpo.mask_head,
             "SAM2 image encoder": tpo.mask_head.sam2.vision_encoder if tpo.mask_head is not None else None}
    return {name: module if isinstance(module, list) else [module] for name, module in found.items()
            if module is not None}


@contextlib.contextmanager
def without_task_token_hook(tpo):
    """The MLLM as it was before TPO: the task-token hook detached from its input embeddings."""
    hook = tpo._task_token_hook
    hook["handle"].remove()
    hook.update(module=None, handle=None)
    try:
        yield
    finally:
        tpo._attach_task_token_hook()


def bare_mllm_loss(model, batch: dict) -> torch.Tensor:
    """The bare MLLM's training loss on `batch`: its backbone on what TPO passes it (ids, mask, pixels, grids,
    mm_token_type_ids), then the LM head and loss on the labelled positions, as TPO computes them with
    `labelled_logits_only` (no task-token hook, router, heads or their losses)."""
    from tpo import TPOForConditionalGeneration
    from tpo.modeling_tpo.modeling_tpo import _labelled_positions

    tpo = unwrap(model)
    tpo_only = set(inspect.signature(TPOForConditionalGeneration.forward).parameters) - {"input_ids", "attention_mask"}
    inputs = {key: value for key, value in batch.items() if key not in tpo_only}
    with without_task_token_hook(tpo):
        hidden = tpo.mllm.model(**inputs).last_hidden_state
    states, targets = _labelled_positions(hidden, batch["labels"])
    logits = tpo.mllm.get_output_embeddings()(states)
    return tpo.loss_function(logits=logits, labels=None, shift_labels=targets,
                             vocab_size=tpo.config.get_text_config().vocab_size)


def training_step(loss_fn, optimizer, profiler: StepProfiler | None = None, clock=time.process_time) -> dict:
    """One training step (forward, backward, optimizer step); seconds of each (`clock`, see `step_clock`), and with a
    profiler the bytes retained for backward and the peak of live tensor bytes created during the step."""
    optimizer.zero_grad(set_to_none=True)
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is not None and accelerator.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with profiler if profiler is not None else contextlib.nullcontext():
        start = clock()
        loss = loss_fn()
        forward_end = clock()
        retained = profiler.snapshot_retained() if profiler is not None else None
        forward_peak = profiler.peak_bytes if profiler is not None else None
        loss.backward()
        backward_end = clock()
    optimizer.step()
    result = {"forward_s": forward_end - start, "backward_s": backward_end - forward_end,
              "optimizer_s": clock() - backward_end, "loss": float(loss.detach())}
    if profiler is not None:
        result.update(retained_bytes=retained, forward_peak_bytes=forward_peak, peak_bytes=profiler.peak_bytes)
    if accelerator is not None and accelerator.type == "cuda":
        result["allocator_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def model_flops(result: dict) -> float:
    """FLOPs of one training step counted the usual way: 6 x LLM parameters x positions (forward 2, backward 4; the
    checkpointed recomputation is not counted, as MFU conventions do not) + 2 x vision-tower parameters x visual
    patches (frozen: forward only)."""
    parameters = result["parameters"]
    llm = sum(parameters.get(c, (0, 0, 0))[0] for c in ("LLM layers", "LLM decoder", "LM head"))
    vision = parameters.get("vision tower", (0, 0, 0))[0]
    batch = result["batch"]
    return 6.0 * llm * batch["input_ids"].numel() + 2.0 * vision * vision_patches(result)


def vision_patches(result: dict) -> int:
    """Patches the vision tower encodes: Qwen-VL's rows of flattened patches, or for (..., 3, H, W) pixels every
    image / tile / frame x (image_size / patch_size)^2 (padded tiles included, as the tower encodes them)."""
    vision_config = unwrap(result["model"]).config.mllm_config.vision_config
    total = 0
    for key in ("pixel_values", "pixel_values_videos"):
        pixels = result["batch"].get(key)
        if pixels is None:
            continue
        if pixels.dim() == 2:
            total += pixels.shape[0]
        else:
            total += pixels.shape[:-3].numel() * (vision_config.image_size // vision_config.patch_size) ** 2
    return total


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------
MIB = 2**20


def parameter_counts(components: dict[str, torch.nn.Module]) -> dict[str, tuple[int, int, int]]:
    """(parameters, trainable parameters, bytes of the trainable ones: their gradients') per component, each
    parameter counted in its deepest component (peft's frozen `original_module` copies left out)."""
    def size(modules):
        return sum(len(list(m.modules())) for m in modules)

    owner = {}
    for name, modules in sorted(components.items(), key=lambda item: -size(item[1])):  # deepest last: it wins
        for module in modules:
            for parameter in module.parameters():
                owner[id(parameter)] = name
    counts = defaultdict(lambda: [0, 0, 0])
    for name, modules in components.items():
        for module in modules:
            for pname, parameter in module.named_parameters():
                if owner[id(parameter)] == name and "original_module" not in pname:
                    counts[name][0] += parameter.numel()
                    if parameter.requires_grad:
                        counts[name][1] += parameter.numel()
                        counts[name][2] += parameter.numel() * parameter.element_size()
    return {name: tuple(value) for name, value in counts.items()}


def measure_backbone(name: str, folder: Path, llm_layers: int = 1, vision_layers: int = 0, num_frames: int = 16,
                     image_size: int = 448, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                     steps: int = 1) -> dict:
    """Build `name` (see `build_scale_model`), then on one `scale_batch`: a profiled bare-MLLM step and a profiled
    TPO step (per-component figures), then `steps` unprofiled rounds (bare, TPO) for the ratio."""
    model, processor = build_scale_model(name, folder, llm_layers, vision_layers, num_frames, dtype, device)
    tpo = unwrap(model)
    tpo.config.labelled_logits_only = True
    batch = scale_batch(processor, image_size, device, dtype)
    components = components_of(model)
    optimizers = {"bare": torch.optim.AdamW([p for p in tpo.mllm.parameters() if p.requires_grad], lr=1e-6),
                  "tpo": torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)}
    losses = {"bare": lambda: bare_mllm_loss(model, batch), "tpo": lambda: model(**batch).loss}
    clock = step_clock(device)
    profiled, profilers = {}, {}
    for side in ("bare", "tpo"):
        profilers[side] = StepProfiler(components, clock=clock)
        with checkpointed_inputs(components["LLM layers"]) as layer_inputs:
            profiled[side] = training_step(losses[side], optimizers[side], profilers[side], clock)
    timed = {side: [] for side in losses}
    for _ in range(steps):
        for side in ("bare", "tpo"):
            timed[side].append(training_step(losses[side], optimizers[side], clock=clock))
    return {"name": name, "batch": batch, "processor": processor, "model": model, "components": components,
            "parameters": parameter_counts(components), "profiled": profiled, "profilers": profilers, "timed": timed,
            "layer_input_bytes": sum(layer_inputs) / len(layer_inputs),
            "optimizer_bytes": {side: optimizer_bytes(opt) for side, opt in optimizers.items()}}


@contextlib.contextmanager
def checkpointed_inputs(layers: list[torch.nn.Module]):
    """Yields a list that receives, per layer, the bytes of the hidden states it is first called with: what gradient
    checkpointing keeps of each layer until backward (its recomputation starts from them)."""
    sizes, handles = {}, []

    def record(index, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        sizes.setdefault(index, hidden.untyped_storage().nbytes())

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(functools.partial(record, index), with_kwargs=True))
    found = []
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
        found.extend(sizes.values())


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


def scaling_probe(model, processor, frame_counts=(4, 8, 16, 32), image_size: int = 448) -> list[dict]:
    """TPO's own parts (task-token gathers, router, frame pooling, region and temporal heads, their losses) on the
    MLLM's hidden states: forward and backward of a temporal video sample + a region image with random
    `backbone_hidden_states` (the backbone is not run; LM loss off, one logit row). Per frame count: sequence
    length and the largest tensor those parts create, against one (sequence x hidden) bf16 hidden state."""
    from tpo.processing.processing_tpo import TPOProcessor

    tpo = unwrap(model)
    hidden_size = tpo.config.get_text_config().hidden_size
    dtype = tpo.mllm.get_input_embeddings().weight.dtype
    rows = []
    for frames in frame_counts:
        probe = TPOProcessor.from_model_config(tpo.config, processor.image_processor, processor.tokenizer,
                                               num_frames=frames)
        batch = scale_batch(probe, image_size, tpo.device, dtype, kinds=("temporal", "region"))
        batch, (batch_rows, seq) = {k: v for k, v in batch.items() if "pixel" not in k}, batch["input_ids"].shape
        hidden = torch.randn(batch_rows, seq, hidden_size, dtype=dtype, device=tpo.device, requires_grad=True)
        profiler = StepProfiler(components_of(model))
        with profiler, tpo.loss_weights_as({"lm": 0.0}):
            model(**batch, backbone_hidden_states=hidden, logits_to_keep=1).loss.backward()
        component, stats = max(((c, st) for (c, _), st in profiler.stats.items() if c != "LM head"),
                               key=lambda item: item[1].largest_bytes)
        rows.append({"frames": frames, "seq": seq, "largest_bytes": stats.largest_bytes, "largest": stats.largest,
                     "component": component, "hidden_state_bytes": batch_rows * seq * hidden_size * 2})
    return rows


# --------------------------------------------------------------------------------------------------
# Report: components, steps, projection to the published depth, memory model
# --------------------------------------------------------------------------------------------------
COMPONENT_ORDER = ("vision tower", "projector", "embeddings", "LLM layers", "LLM decoder", "LM head", "LM loss",
                   "router", "region head", "temporal head", "temporal loss", "mask head", "SAM2 image encoder",
                   "losses & glue")
HEADS_OF = {"temporal": ("temporal head", "temporal loss"), "region": ("region head",),
            "mask": ("mask head", "SAM2 image encoder")}
GIB = 2**30


def published_depths(name: str) -> tuple[int, int]:
    """(LLM layers, vision layers) of the published checkpoint."""
    config = PUBLISHED[name]["config"]
    vision = config["vision_config"]
    return config.get("text_config", config)["num_hidden_layers"], vision.get("depth", vision.get("num_hidden_layers"))


def published_parameter_count(name: str) -> int:
    """Parameters of the published MLLM at full depth (built on the meta device: no memory, no init)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint_files(name, Path(folder), *published_depths(name))
        config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        mllm = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in mllm.parameters())


def sample_shapes(batch: dict) -> list[dict]:
    """Per batch row: tokens, visual tokens and labelled positions (rows: temporal, region, mask)."""
    visual = batch["visual_token_xy"][..., 0] >= 0
    labelled = batch["labels"][:, 1:] != -100
    return [{"tokens": int(batch["attention_mask"][i].sum()), "visual": int(visual[i].sum()),
             "labelled": int(labelled[i].sum())} for i in range(batch["input_ids"].shape[0])]


def encoded_shapes(config, processor, num_frames: int, image_size: int) -> dict[str, dict]:
    """`sample_shapes` of the benchmark's temporal, region and mask samples with `num_frames`-frame videos, from the
    processor's encoding alone (no pixels, no model): the token counts the memory model scales to."""
    from bench_model_overhead import make_sample

    from tpo.processing.processing_tpo import TPOProcessor

    probe = TPOProcessor.from_model_config(config, processor.image_processor, processor.tokenizer,
                                           num_frames=num_frames)
    shapes = {}
    for i, kind in enumerate(("temporal", "region", "mask")):
        encoded = probe.encode(make_sample(kind, i, image_size))
        shapes[kind] = {"tokens": len(encoded.input_ids), "visual": sum(xy[0] >= 0 for xy in encoded.visual_token_xy),
                        "labelled": sum(label != -100 for label in encoded.labels[1:])}
    return shapes


def step_seconds(step: dict) -> float:
    return step["forward_s"] + step["backward_s"] + step["optimizer_s"]


TPO_ONLY = ("router", "region head", "temporal head", "temporal loss", "mask head", "SAM2 image encoder")


def tpo_own_seconds(profilers: dict[str, StepProfiler]) -> float:
    """Op seconds of TPO's own components in its step, plus the glue ops it has beyond the bare step's."""
    def seconds(side, components):
        return sum(st.seconds for (c, _), st in profilers[side].stats.items() if c in components)

    glue = ("losses & glue",)
    return seconds("tpo", TPO_ONLY) + seconds("tpo", glue) - seconds("bare", glue)


def projected_seconds(profiler: StepProfiler, step: dict, scale: dict[str, float]) -> float:
    """A step's seconds with each component's op time multiplied by `scale[component]` (1 if absent); the time
    outside ops (Python, the optimizer) unscaled."""
    ops = sum(st.seconds for st in profiler.stats.values())
    scaled = sum(st.seconds * scale.get(component, 1.0) for (component, _), st in profiler.stats.items())
    return step_seconds(step) - ops + scaled


def memory_model(result: dict, llm_layers: int, frames: int = 16, image_size: int = 448) -> dict:
    """Bytes per sample and fixed bytes of a training step at the published depth, from the profiled TPO step.

    Per token: every LLM layer's kept activations (checkpointed: its input hidden states, measured by
    `checkpointed_inputs`); the working set of the one layer recomputed and back-propagated at a time; the other
    components' kept + working bytes (embeddings, final norm, LM head and loss on the labelled positions, router,
    glue). Per sample of a task: its head's kept + working bytes (the mask head's with SAM2's 1024 px encoder); per
    visual token: the projector's. Token counts: the processor's encoding of the benchmark's samples with
    `frames`-frame videos and `image_size` px images, whatever the measured batch had. Fixed: bf16 weights at the
    published depth (+ SAM2, heads, peft's copies of the trained modules), and per trainable parameter its gradient
    and two AdamW states (LoRA scaled to every layer).
    """
    name, stats, batch = result["name"], result["profilers"]["tpo"].stats, result["batch"]
    model = result["model"]
    positions = batch["input_ids"].numel()
    full_layers, _ = published_depths(name)

    def total(component: str, which: str = "both") -> int:
        """Kept and / or working bytes of a component's activations: its working peak less its own weight
        gradients (they are in the fixed part)."""
        forward, backward = stats.get((component, "forward")), stats.get((component, "backward"))
        kept = forward.retained_bytes if forward else 0
        work = max(st.peak_working_bytes for st in (forward, backward) if st) if (forward or backward) else 0
        work = max(work - result["parameters"].get(component, (0, 0, 0))[2], 0)
        return {"retained": kept, "working": work, "both": kept + work}[which]

    per_layer_token = result["layer_input_bytes"] / positions
    layer_working_token = total("LLM layers", "working") / positions
    shared = ("embeddings", "LLM decoder", "LM head", "LM loss", "router", "losses & glue")
    other_token = sum(total(c) for c in shared) / positions
    # the projector's output (its visual tokens' features) is kept for backward; its working set is its weights'
    projector_visual = total("projector", "retained") / max(int((batch["visual_token_xy"][..., 0] >= 0).sum()), 1)
    token_bytes = full_layers * per_layer_token + layer_working_token + other_token
    vocab = unwrap(model).config.get_text_config().vocab_size
    rows = encoded_shapes(unwrap(model).config, result["processor"], frames, image_size)
    per_sample = {task: shape["tokens"] * token_bytes + shape["visual"] * projector_visual
                  + sum(total(c) for c in HEADS_OF[task]) for task, shape in rows.items()}
    full_logits = {task: shape["tokens"] * vocab * 12 for task, shape in rows.items()}  # bf16 + fp32 copy + grads

    layer_scale = full_layers / llm_layers
    mllm = dict(unwrap(model).mllm.named_parameters())
    base_bytes = sum(p.numel() * p.element_size() for n, p in mllm.items() if "lora_" not in n)
    lora_bytes = sum(p.numel() * p.element_size() for n, p in mllm.items() if "lora_" in n)
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = (everything - base_bytes - lora_bytes + 2 * published_parameter_count(name)  # bf16 at full depth
               + lora_bytes * layer_scale)
    trained = sum(p.numel() * p.element_size() * (layer_scale if "lora_" in n else 1.0) * 3
                  for n, p in model.named_parameters() if p.requires_grad)  # gradient + two AdamW states
    return {"per_sample": per_sample, "full_logits": full_logits, "rows": rows, "weights": weights,
            "trained_state": trained, "per_layer_token": per_layer_token, "layer_working_token": layer_working_token,
            "other_token": other_token, "full_layers": full_layers}


def batch_sizes(model_bytes: dict, capacities_gb=(24, 40, 80, 141), usable: float = 0.9) -> dict:
    """Samples of each task (and 1:1:1 mixes) that fit per device: (usable x capacity - fixed) / per sample."""
    fixed = model_bytes["weights"] + model_bytes["trained_state"]
    mixed = sum(model_bytes["per_sample"].values())
    out = {}
    for capacity in capacities_gb:
        free = usable * capacity * 1e9 - fixed
        out[capacity] = {task: max(int(free // size), 0) for task, size in model_bytes["per_sample"].items()}
        out[capacity]["mixed x3"] = max(int(free // mixed), 0)
    return out


def _mib(value: float) -> str:
    return f"{value / MIB:9.1f}"


def print_report(result: dict, llm_layers: int, vision_layers: int, num_frames: int, image_size: int,
                 device: str, dtype: torch.dtype, peak_tflops: float | None = None, memory_frames: int = 16,
                 memory_image_size: int = 448) -> None:
    name, batch = result["name"], result["batch"]
    full_llm, full_vision = published_depths(name)
    cut_vision = vision_layers or full_vision
    rows = dict(zip(("temporal", "region", "mask"), sample_shapes(batch)))
    print(f"\n== {name} ({PUBLISHED[name]['checkpoint']}): LLM {llm_layers}/{full_llm} layers, vision tower "
          f"{cut_vision}/{full_vision} layers{' (cut to fit this machine)' if cut_vision < full_vision else ''}, "
          f"published widths, SAM2.1-hiera-tiny at 1024 px; {str(dtype).removeprefix('torch.')} on {device}, LoRA r16, "
          f"gradient checkpointing, logits on labelled positions")
    print(f"batch {tuple(batch['input_ids'].shape)}: " + "; ".join(
        f"{task} {shape['tokens']} tokens ({shape['visual']} visual, {shape['labelled']} labelled)"
        for task, shape in rows.items())
        + f" -- video {num_frames} frames, images and frames {image_size} px")
    print("times: " + ("CPU seconds of this process (other processes on the machine do not count)"
                       if torch.device(device).type == "cpu" else f"wall seconds on {device}, synchronised"))
    print(f"{'component':20s} {'params M':>9s} {'trained M':>9s} {'fwd s':>7s} {'bwd s':>7s} {'kept MiB':>9s} "
          f"{'work MiB':>9s}  largest tensor")
    stats, params = result["profilers"]["tpo"].stats, result["parameters"]
    for component in COMPONENT_ORDER:
        forward, backward = stats.get((component, "forward")), stats.get((component, "backward"))
        if not (forward or backward or component in params):
            continue
        total, trained, _ = params.get(component, (0, 0, 0))
        passes = [st for st in (forward, backward) if st]
        largest = max(passes, key=lambda st: st.largest_bytes) if passes else ComponentStats()
        print(f"{component:20s} {total / 1e6:9.1f} {trained / 1e6:9.2f} "
              f"{forward.seconds if forward else 0:7.2f} {backward.seconds if backward else 0:7.2f} "
              f"{_mib(forward.retained_bytes if forward else 0)} "
              f"{_mib(max((st.peak_working_bytes for st in passes), default=0))}  "
              f"{largest.largest_bytes / MIB:.1f} MiB {largest.largest}")
    sides = {}
    for side, label in (("bare", "bare MLLM"), ("tpo", "TPO")):
        step = result["profiled"][side]
        sides[side] = step_seconds(step)
        print(f"step {label:9s}: forward {step['forward_s']:6.2f} s, backward {step['backward_s']:6.2f} s, optimizer "
              f"{step['optimizer_s']:5.2f} s = {sides[side]:6.2f} s; tensors created: peak "
              f"{step['peak_bytes'] / MIB:.0f} MiB (forward {step['forward_peak_bytes'] / MIB:.0f}), kept for backward "
              f"{step['retained_bytes'] / MIB:.0f} MiB; AdamW states {result['optimizer_bytes'][side] / MIB:.0f} MiB")
    timed = result["timed"]
    if timed["tpo"]:
        ratios = [step_seconds(t) / step_seconds(b) for b, t in zip(timed["bare"], timed["tpo"])]
        seconds = sorted(step_seconds(t) for t in timed["tpo"])[len(timed["tpo"]) // 2]
        flops = model_flops(result)
        line = (f"unprofiled rounds: ratio TPO / bare {', '.join(f'{r:.3f}' for r in ratios)}; TPO step "
                f"{seconds:.3f} s, {batch['input_ids'].numel() / seconds:.0f} tokens/s, "
                f"{flops / seconds / 1e12:.1f} model TFLOP/s")
        if peak_tflops:
            line += f", MFU {flops / seconds / (peak_tflops * 1e12):.1%} of {peak_tflops:g} TFLOP/s"
        if "allocator_peak_bytes" in timed["tpo"][-1]:
            line += (f"; allocator peak bare {timed['bare'][-1]['allocator_peak_bytes'] / GIB:.2f} GiB, "
                     f"TPO {timed['tpo'][-1]['allocator_peak_bytes'] / GIB:.2f} GiB")
        print(line)
    scale = {"LLM layers": full_llm / llm_layers, "vision tower": full_vision / cut_vision}
    projected = {side: projected_seconds(result["profilers"][side], result["profiled"][side], scale)
                 for side in sides}
    own = tpo_own_seconds(result["profilers"])
    print(f"ratio TPO / bare: {sides['tpo'] / sides['bare']:.3f} as measured (profiled round); "
          f"{projected['tpo'] / projected['bare']:.3f} with the LLM layers' and vision tower's op time scaled to "
          f"the published depth ({projected['bare']:.0f} s vs {projected['tpo']:.0f} s on this device)")
    print(f"TPO's own ops (router, heads, their losses, SAM2, extra glue): {own:.2f} s = "
          f"{own / sides['bare']:.1%} of the bare step as cut, {own / projected['bare']:.1%} at the published depth "
          f"(ratio {1 + own / projected['bare']:.3f} from the components, free of step-to-step noise)")
    memory = memory_model(result, llm_layers, memory_frames, memory_image_size)
    print(f"memory model at the published depth ({memory['full_layers']} LLM layers; 90% of the device usable): "
          f"weights {memory['weights'] / GIB:.1f} GiB, gradients + AdamW states {memory['trained_state'] / GIB:.2f} "
          f"GiB; per token {memory['per_layer_token'] / 1024:.1f} KiB per layer kept + "
          f"{memory['layer_working_token'] / 1024:.0f} KiB one layer's backward + {memory['other_token'] / 1024:.0f}"
          f" KiB other")
    for task, size in memory["per_sample"].items():
        frames = f"{memory_frames} frames, " if task == "temporal" else f"{memory_image_size} px, "
        print(f"  per {task} sample ({frames}{memory['rows'][task]['tokens']} tokens): {size / GIB:.2f} GiB "
              f"(+{memory['full_logits'][task] / GIB:.2f} GiB with the logits of every position)")
    for capacity, fits in batch_sizes(memory).items():
        print(f"  {capacity:3d} GB: " + ", ".join(f"{task} {count}" for task, count in fits.items()))


def print_scaling(name: str, rows: list[dict]) -> None:
    print(f"scaling ({name}): TPO's own parts on the MLLM's hidden states (router, task tokens, frame pooling, "
          f"region and temporal heads, their losses), forward + backward")
    for row in rows:
        print(f"  {row['frames']:3d} frames, sequence {row['seq']:6d}: largest tensor "
              f"{row['largest_bytes'] / MIB:8.1f} MiB = {row['largest_bytes'] / row['hidden_state_bytes']:.2f} x "
              "(batch x sequence x hidden) "
              f"[{row['component']}: {row['largest']}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--llm-layers", type=int, default=1, help="LLM layers kept (published: 28 / 28 / 32)")
    parser.add_argument("--vision-layers", type=int, default=1,
                        help="vision tower layers kept, 0 for the published depth (32 / 26 / 24)")
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=448, help="side of the images and video frames, px")
    parser.add_argument("--memory-frames", type=int, default=16,
                        help="frames per video in the memory model's samples (their tokens come from the processor)")
    parser.add_argument("--memory-image-size", type=int, default=448, help="image and frame side of those samples, px")
    parser.add_argument("--steps", type=int, default=0, help="unprofiled (bare, TPO) rounds after the profiled one")
    parser.add_argument("--scaling-frames", type=int, nargs="*", default=[4, 8, 16, 32],
                        help="frame counts of the scaling probe (none: skip it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for MFU (e.g. 989 for an H100 / H200 SXM)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 where the device supports it, else float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    elif torch.device(args.device).type == "cpu":
        dtype = torch.bfloat16 if cpu_supports_bf16() else torch.float32
        print(f"CPU bf16 support: {cpu_supports_bf16()} -> {dtype}")
    else:
        dtype = torch.bfloat16
    for name in args.backbones:
        with tempfile.TemporaryDirectory() as folder:
            result = measure_backbone(name, Path(folder), args.llm_layers, args.vision_layers, args.num_frames,
                                      args.image_size, dtype, args.device, args.steps)
            print_report(result, args.llm_layers, args.vision_layers, args.num_frames, args.image_size, args.device,
                         dtype, args.peak_tflops, args.memory_frames, args.memory_image_size)
            if args.scaling_frames:
                print_scaling(name, scaling_probe(result["model"], result["processor"], args.scaling_frames,
                                                  args.image_size))
        del result


if __name__ == "__main__":
    main()
