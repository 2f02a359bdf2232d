"""Merge a LoRA adapter into its base model: a standalone folder that loads without peft.

    python merge.py --model BASE --adapter output/output_lora --out merged/ [--dtype bfloat16]

The folder holds the merged weights (modules_to_save included), the config and the tokenizer (native
models: the processor) the adapter was trained with. For remote-code models also the model's remote
code and processor files, and the repairs that published remote code needs on current transformers
(``loading.write_repaired_classes``), so that plain ``AutoModel.from_pretrained(out,
trust_remote_code=True)`` loads it on its own, without this project, and gives the logits this
project's loader gives; a native model's folder loads with ``AutoModelForImageTextToText`` and
``AutoProcessor``.
"""

import argparse
import logging
from pathlib import Path

import torch

import families
import loading
from families.inference import load_for_inference

logger = logging.getLogger(__name__)


def merge(model_path, adapter, out_dir, dtype=torch.float32):
    model, processing, _, family = load_for_inference(model_path, adapter, dtype)
    merged = model.merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir)
    processing.save_pretrained(out_dir)
    family.save_extras(loading.model_source_dir(model_path), out_dir)
    logger.info("Merged %s into %s", adapter, out_dir)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base model: hub id or folder")
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(merge(args.model, args.adapter, args.out, getattr(torch, args.dtype)))
    except families.TransformersTooOld as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
