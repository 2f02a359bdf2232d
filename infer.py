"""Ask a MiniCPM-V model, optionally with a LoRA adapter, about images (and videos: native models).

    python infer.py --model BASE [--adapter DIR] --image cat.jpg --question "What is this?"
    python infer.py --model BASE [--adapter DIR] --questions data.json [--metrics em,f1] [--report out.jsonl]
    python infer.py --model BASE --adapter RUN --questions data.json --compare BASE [--plot scores.png]
    python infer.py --plot scores.png --run RUN

``--questions`` takes a file in the training format: each record's first user message is
asked and its first assistant message is printed as the expected answer; the answers are scored
against it (evaluation/metrics.py) and the scores printed as a table. ``--compare BASE`` answers
the same questions with another model (the one before fine-tuning) and shows both side by side.
``--plot`` draws the scores a run logged at its evaluations (``finetune.py --eval_generate``). Prompts are laid out
by the training dataset exactly as in training (remote code: dataset.py's placeholders, slices,
image ids and chat layout; native models: the checkpoint's processor and chat template), so a
fine-tuned model sees at inference what it saw in training.
"""

import argparse
import logging
import os

import torch

import data.sources
import families
from data.errors import BadLine, DataError
from data.schema import validate_record
from evaluation.answers import Answerer, answered, first_exchange, reference
from evaluation.metrics import get_metrics, load_user_metrics
from evaluation.plot import find_state, plot_scores
from evaluation.report import comparison, score, table, unscorable, write_jsonl
from families.inference import load_for_inference

logger = logging.getLogger(__name__)


DEFAULT_METRICS = "em,f1"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model: hub id or folder (needed unless only --plot is asked)")
    parser.add_argument("--adapter", help="LoRA adapter folder saved by finetune_lora.sh")
    parser.add_argument("--llm_type", choices=families.llm_types(),
                        help="chat layout (default: the checkpoint's; any other is refused)")
    parser.add_argument("--image", help="one image to ask about")
    parser.add_argument("--video", help="one video to ask about (native models)")
    parser.add_argument("--question", help="the question about --image")
    parser.add_argument("--questions", help="a .json/.jsonl file of records in the training format")
    parser.add_argument("--metrics", help="--questions: comma-separated metrics scoring each answer against the "
                        f"record's first assistant message (default: {DEFAULT_METRICS}, where every record has one)")
    parser.add_argument("--metrics_file",
                        help="a Python file of your own metrics (@metric('name')); name them in --metrics")
    parser.add_argument("--report", help="--questions: write the scored answers here, one JSON line per record")
    parser.add_argument("--compare", metavar="BASE", help="--questions: also answer with BASE (a model folder or hub "
                        "id, e.g. the model before fine-tuning) and show its answers and scores beside --model's")
    parser.add_argument("--plot", metavar="PNG", help="draw the eval_<metric> scores of a run over its training "
                        "steps (from its trainer_state.json, see --run) into this PNG")
    parser.add_argument("--run", help="--plot: the run's output folder (default: --adapter, or --model, where it "
                        "holds trainer_state.json)")
    parser.add_argument("--max_slice_nums", type=int, default=9)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=1,
                        help="prompts per generate call, where the model's generate batches them (remote-code 2.6, "
                        "o-2.6, 4.x; left-padded); the others answer one at a time")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    given = [f"--{name}" for name in ("metrics", "metrics_file", "report", "compare") if getattr(args, name)]
    if given and not args.questions:
        parser.error(f"{', '.join(given)} score the answers to --questions: give --questions FILE")
    plot_only = args.plot and not (args.question or args.questions)
    if not plot_only and bool(args.questions) == bool(args.question):
        parser.error("give either --image/--video/--question or --questions")
    if not plot_only and not args.model:
        parser.error("--model is required to answer questions")
    return parser, args


def read_questions(parser, args):
    """The records to ask and the folder their paths resolve against, checked before any weights load."""
    if args.questions:
        try:
            records = data.sources.load(args.questions)
            for index, record in enumerate(records):
                if isinstance(record, BadLine) or not isinstance(record, dict):
                    validate_record(record, index, data_path=args.questions)  # raises, naming the record
        except DataError as e:
            parser.error(str(e))
        return records, os.path.dirname(os.path.abspath(args.questions))
    content = args.question if args.image is None else f"<image>\n{args.question}"
    records = [{"id": "question", "conversations": [{"role": "user", "content": content}]}]
    if args.image:
        records[0]["image"] = os.path.abspath(args.image)
    if args.video:
        records[0]["video"] = os.path.abspath(args.video)
    return records, os.getcwd()


def metric_names(parser, args, records):
    """The metrics scoring --questions' answers, or None (no scores: no metric asked and a record
    without an answer). A reference a metric cannot score is refused here, naming the record."""
    try:
        if args.metrics_file:
            load_user_metrics(args.metrics_file, flag="--metrics_file")
        names = list(get_metrics(args.metrics or DEFAULT_METRICS, flag="--metrics"))
    except ValueError as e:  # usage.UsageError, a ValueError: infer.py imports no training module
        parser.error(str(e))
    references = [(record.get("id", index), reference(record)) for index, record in enumerate(records)]
    if not (args.metrics or args.compare or args.report) and not all(answer.strip() for _, answer in references):
        return None  # questions asked without answers to compare with: answers only, as before
    problems = unscorable(references, names)
    if problems:
        parser.error("; ".join(f"record {record_id!r}: metric {name!r} cannot score it: {reason}"
                               for record_id, name, reason in problems))
    return names


def answer_with(parser, args, model_path, adapter, records, root):
    """The answers of ``model_path`` (with ``adapter``) to ``records``, one per record; the model is
    released after."""
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    try:
        loaded = load_for_inference(model_path, adapter, dtype, args.device, args.llm_type)
    except ValueError as e:  # --llm_type contradicting the checkpoint, or a transformers too old for it
        parser.error(str(e))
    if loaded[3].refusal("generate"):
        parser.error(loaded[3].refusal("generate"))
    answerer = Answerer(*loaded, max_slice_nums=args.max_slice_nums, batch_size=args.batch_size)
    try:
        return answerer.answer(records, root, args.max_new_tokens)
    except DataError as e:
        parser.error(str(e))


def scored(records, answers, names):
    pairs = enumerate(zip(records, answers, strict=True))
    return score([answered(record, index, answer) for index, (record, answer) in pairs], names)


def plot(parser, args):
    state = find_state(args.run) if args.run else find_state(args.adapter, args.model)
    if state is None:
        where = args.run or " or ".join(filter(None, (args.adapter, args.model))) or "(no folder given)"
        parser.error(f"--plot: no trainer_state.json in {where}; name the run's output folder with --run")
    try:
        path = plot_scores(state, args.plot)
    except ValueError as e:
        parser.error(f"--plot: {e}")
    print(f"Scores over training steps ({state}): {path}")


def main(argv=None):
    parser, args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.plot:  # before any weights load: it reads the run's logs only
        plot(parser, args)
        if not (args.question or args.questions):
            return
    records, root = read_questions(parser, args)
    names = metric_names(parser, args, records) if args.questions else None
    answers = answer_with(parser, args, args.model, args.adapter, records, root)
    if args.compare:
        base_answers = answer_with(parser, args, args.compare, None, records, root)
        tuned = scored(records, answers, names)
        print(comparison(scored(records, base_answers, names), tuned))
    else:
        for record, answer in zip(records, answers, strict=True):
            asked = first_exchange(record)["conversations"]
            question = asked[-2]["content"].replace("\n", " ")
            expected = asked[-1]["content"] if len(record["conversations"]) > len(asked) - 1 else ""
            print(f"[{record.get('id', '')}] Q: {question}")
            if expected:
                print(f"    expected:  {expected}")
            print(f"    generated: {answer}")
        tuned = scored(records, answers, names) if names else None
        if tuned:
            print(table(tuned))
    if args.report and tuned:
        write_jsonl(tuned, args.report)
        print(f"Report: {args.report}")


if __name__ == "__main__":
    main()
