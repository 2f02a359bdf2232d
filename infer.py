"""Ask a MiniCPM-V model, optionally with a LoRA adapter, about images.

    python infer.py --model BASE [--adapter DIR] --llm_type qwen --image cat.jpg --question "What is this?"
    python infer.py --model BASE [--adapter DIR] --llm_type qwen --questions data.json

``--questions`` takes a file in the training format: each record's first user message is
asked and its first assistant message is printed as the expected answer. Prompts are laid out
by dataset.py exactly as in training (placeholders, slices, image ids, chat template), so a
fine-tuned model sees at inference what it saw in training.
"""

import argparse
import logging
import os

import torch

import loading
from dataset import IGNORE_INDEX, LLM_TYPES, BadLine, DataError, data_settings, load_records, make_dataset, validate_record

logger = logging.getLogger(__name__)


def first_exchange(record):
    """The record cut to its first user message and the answer to it (a stand-in if absent)."""
    conversations = record["conversations"]
    answer = conversations[1]["content"] if len(conversations) > 1 else "?"
    return {**record, "conversations": [conversations[0], {"role": "assistant", "content": answer}]}


def prompt_inputs(sample, device="cpu"):
    """Cut a training sample just before the first learned token: the prompt the model answers."""
    learned = (sample["labels"] != IGNORE_INDEX).nonzero()
    cut = int(learned[0]) + 1  # labels are shifted: labels[i] is the token at i + 1
    bounds = sample["image_bound"]
    return dict(
        input_ids=sample["input_ids"][:cut].unsqueeze(0).to(device),
        pixel_values=[[image.to(device) for image in sample["pixel_values"]]],
        tgt_sizes=[sample["tgt_sizes"].to(device)],
        image_bound=[bounds[bounds[:, 1] <= cut] if len(bounds) else bounds],
    )


class Answerer:
    def __init__(self, model, tokenizer, config, *, llm_type, max_slice_nums=9, max_length=4096):
        self.model, self.tokenizer = model, tokenizer
        self.settings = data_settings(config, max_slice_nums)
        self.llm_type, self.max_length = llm_type, max_length

    def answer(self, records, image_root, max_new_tokens=64):
        """Generated answers to the first question of each record, in order."""
        dataset = make_dataset(
            [first_exchange(record) for record in records], self.tokenizer, self.settings,
            llm_type=self.llm_type, max_length=self.max_length, image_root=image_root,
        )
        answers = []
        for i in range(len(dataset)):
            inputs = prompt_inputs(dataset[i], self.model.device)
            text = self.model.generate(
                **inputs, tokenizer=self.tokenizer, max_new_tokens=max_new_tokens, decode_text=True
            )
            answers.append(text[0].strip())
        return answers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base model: hub id or folder")
    parser.add_argument("--adapter", help="LoRA adapter folder saved by finetune_lora.sh")
    parser.add_argument("--llm_type", default="qwen", choices=LLM_TYPES, help="chat template, as in training")
    parser.add_argument("--image", help="one image to ask about")
    parser.add_argument("--question", help="the question about --image")
    parser.add_argument("--questions", help="a .json/.jsonl file of records in the training format")
    parser.add_argument("--max_slice_nums", type=int, default=9)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if bool(args.questions) == bool(args.question):
        parser.error("give either --image/--question or --questions")
    logging.basicConfig(level=logging.WARNING)

    if args.questions:
        try:
            records = load_records(args.questions)
            for index, record in enumerate(records):
                if isinstance(record, BadLine) or not isinstance(record, dict):
                    validate_record(record, index, data_path=args.questions)  # raises, naming the record
        except DataError as e:
            parser.error(str(e))
        root = os.path.dirname(os.path.abspath(args.questions))
    else:
        content = args.question if args.image is None else f"<image>\n{args.question}"
        records = [{"id": "question", "conversations": [{"role": "user", "content": content}]}]
        if args.image:
            records[0]["image"] = os.path.abspath(args.image)
        root = os.getcwd()

    # The questions are read and checked above, before any weights load.
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model, tokenizer, config = loading.load_for_inference(args.model, args.adapter, dtype, args.device)
    answerer = Answerer(model, tokenizer, config, llm_type=args.llm_type, max_slice_nums=args.max_slice_nums)
    try:
        answers = answerer.answer(records, root, args.max_new_tokens)
    except DataError as e:
        parser.error(str(e))
    for record, answer in zip(records, answers, strict=True):
        question = record["conversations"][0]["content"].replace("\n", " ")
        expected = record["conversations"][1]["content"] if len(record["conversations"]) > 1 else ""
        print(f"[{record.get('id', '')}] Q: {question}")
        if expected:
            print(f"    expected:  {expected}")
        print(f"    generated: {answer}")


if __name__ == "__main__":
    main()
