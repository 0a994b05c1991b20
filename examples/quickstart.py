"""Quick start: build a tiny TPO model from configurations, run a forward pass with labels, save it
and reload it with `AutoModel.from_pretrained(..., trust_remote_code=True)`.

    python examples/quickstart.py [--output-dir tpo-tiny]
"""

import argparse
import logging

import torch
from transformers import AutoModel, LlavaForConditionalGeneration

from tpo import ROUTER_CLASSES, TPOForConditionalGeneration
from tpo.modeling_tpo import IGNORE_INDEX
from tpo.tiny import build_tiny_tokenizer, tiny_llava_config

logger = logging.getLogger("quickstart")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="outputs/tpo-tiny")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    tokenizer = build_tiny_tokenizer()
    mllm = LlavaForConditionalGeneration(tiny_llava_config(tokenizer))
    model = TPOForConditionalGeneration.from_mllm(mllm, tasks=["temporal", "region"], tokenizer=tokenizer)

    prompt = "<|user|>" + "<image>" * 16 + "where is the red circle<|end|><|assistant|>"
    answer = "it is here <box_begin><boxes><|end|>"
    input_ids = tokenizer(prompt + answer, return_tensors="pt").input_ids
    labels = input_ids.clone()
    labels[:, : len(tokenizer(prompt).input_ids)] = IGNORE_INDEX
    out = model(
        input_ids=input_ids,
        pixel_values=torch.randn(1, 3, 32, 32),
        labels=labels,
        task_labels=torch.tensor([ROUTER_CLASSES.index("region")]),
        region_boxes=torch.tensor([[0.1, 0.2, 0.5, 0.6]]),
        region_batch_index=torch.tensor([0]),
    )
    logger.info("loss %.4f, terms %s", out.loss.item(), {k: round(v.item(), 4) for k, v in out.loss_dict.items()})
    logger.info("predicted box (normalised xyxy): %s", out.pred_boxes.tolist())

    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    reloaded = AutoModel.from_pretrained(args.output_dir, trust_remote_code=True)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    logger.info("saved to %s and reloaded with AutoModel: identical weights = %s", args.output_dir, same)


if __name__ == "__main__":
    main()
