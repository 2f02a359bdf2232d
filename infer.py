"""Ask a MiniCPM-V model, optionally with a LoRA adapter, about images (and videos: native models).

    python infer.py --model BASE [--adapter DIR] --image cat.jpg --question "What is this?"
    python infer.py --model BASE [--adapter DIR] --questions data.json

``--questions`` takes a file in the training format: each record's first user message is
asked and its first assistant message is printed as the expected answer. Prompts are laid out
by the training dataset exactly as in training (remote code: dataset.py's placeholders, slices,
image ids and chat layout; native models: the checkpoint's processor and chat template), so a
fine-tuned model sees at inference what it saw in training.
"""

import argparse
import logging
import os

import torch

import backends
from dataset import BadLine, DataError, load_records, validate_record

logger = logging.getLogger(__name__)


def first_exchange(record):
    """The record cut to its first user message (after a leading system message, kept) and the
    answer to it (a stand-in if absent)."""
    conversations = record["conversations"]
    first = 1 if conversations and conversations[0].get("role") == "system" else 0
    answer = conversations[first + 1]["content"] if len(conversations) > first + 1 else "?"
    return {**record, "conversations": [*conversations[: first + 1], {"role": "assistant", "content": answer}]}


class Answerer:
    """Answers records' first questions with a model of ``backend`` (see backends.load_for_inference)."""

    def __init__(self, model, processing, config, backend, *, max_slice_nums=9, max_length=4096):
        self.model, self.processing, self.config, self.backend = model, processing, config, backend
        self.max_slice_nums, self.max_length = max_slice_nums, max_length

    def answer(self, records, image_root, max_new_tokens=64):
        """Generated answers to the first question of each record, in order."""
        dataset = self.backend.make_dataset(
            [first_exchange(record) for record in records], self.processing, self.config,
            max_length=self.max_length, image_root=image_root, max_slice_nums=self.max_slice_nums,
        )
        return [
            self.backend.generate(
                self.model, self.processing, self.backend.prompt_inputs(dataset[i], self.model.device), max_new_tokens
            )
            for i in range(len(dataset))
        ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base model: hub id or folder")
    parser.add_argument("--adapter", help="LoRA adapter folder saved by finetune_lora.sh")
    parser.add_argument("--llm_type", choices=backends.ALL_LLM_TYPES,
                        help="chat layout (default: the checkpoint's; any other is refused)")
    parser.add_argument("--image", help="one image to ask about")
    parser.add_argument("--video", help="one video to ask about (native models)")
    parser.add_argument("--question", help="the question about --image")
    parser.add_argument("--questions", help="a .json/.jsonl file of records in the training format")
    parser.add_argument("--max_slice_nums", type=int, default=9)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if bool(args.questions) == bool(args.question):
        parser.error("give either --image/--video/--question or --questions")
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
        if args.video:
            records[0]["video"] = os.path.abspath(args.video)
        root = os.getcwd()

    # The questions are read and checked above, before any weights load.
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    try:
        loaded = backends.load_for_inference(args.model, args.adapter, dtype, args.device, args.llm_type)
    except ValueError as e:  # --llm_type contradicting the checkpoint, or a transformers too old for it
        parser.error(str(e))
    answerer = Answerer(*loaded, max_slice_nums=args.max_slice_nums)
    try:
        answers = answerer.answer(records, root, args.max_new_tokens)
    except DataError as e:
        parser.error(str(e))
    for record, answer in zip(records, answers, strict=True):
        asked = first_exchange(record)["conversations"]
        question = asked[-2]["content"].replace("\n", " ")
        expected = asked[-1]["content"] if len(record["conversations"]) > len(asked) - 1 else ""
        print(f"[{record.get('id', '')}] Q: {question}")
        if expected:
            print(f"    expected:  {expected}")
        print(f"    generated: {answer}")


if __name__ == "__main__":
    main()
