"""Preflight's findings: the reasons a record is refused, the console table and
``preflight_report.json`` (every problem, the counts, what was done)."""

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass

# The report is preflight's voice: its lines are logged under preflight's name.
logger = logging.getLogger("preflight")

# Stable reason codes (DataError.code) and what each means; the table and report use them.
REASONS = {
    "unreadable_file": "the data file cannot be read (missing, a folder, no permission)",
    "bad_encoding": "the data file is not UTF-8 text (with or without a byte-order mark)",
    "invalid_json": "the data file or a line of it is not valid JSON of the expected shape",
    "no_records": "the data file holds no records",
    "not_an_object": "the record is not a JSON object",
    "bad_id": "'id' is not a string or an integer, or holds a lone surrogate that UTF-8 cannot write",
    "duplicate_key": "a record, message or 'image' dict holds a key twice (JSON would keep only the last)",
    "unknown_key": "the record or a message has a key that is not read (named, with the mapping of a known "
    "foreign layout: ShareGPT/LLaVA 'from'/'value', OpenAI 'messages', 'images')",
    "bad_conversations": "'conversations' is missing, not a list, or has fewer than two messages",
    "bad_message": "a message is not an object with role 'user' or 'assistant' (or 'system' first)",
    "bad_content": "a message has no text 'content' (or a list of parts), or text UTF-8 cannot encode",
    "system_message": "a system message after the first message, or where the chat template has none (minicpm)",
    "empty_answer": "an assistant message is empty or white space only: nothing to learn",
    "first_not_user": "the first message does not come from 'user'",
    "roles_not_alternating": "two messages in a row come from the same role (roles must alternate)",
    "bad_image_field": "'image' is not a path or a dict of <image_NN> -> path",
    "reserved_token": "message text contains one of the tokenizer's image tokens",
    "special_token": "message text contains a special token of the tokenizer (chat control, bos, eos)",
    "image_tag_count": "<image> appears more often than the record has images",
    "image_in_assistant": "an image tag sits in an assistant (or system) message",
    "unknown_image_tag": "an image tag in the text has no image in the record",
    "unused_image": "an image of the record is never referenced in the text",
    "repeated_image_tag": "an <image_NN> tag is used more than once",
    "missing_image": "an image file does not exist",
    "image_is_folder": "an image path is a folder",
    "symlink_loop": "an image or video path is a loop of symbolic links",
    "not_a_file": "an image or video path is a FIFO, socket or device, not a regular file (never opened)",
    "empty_image": "an image file is empty (0 bytes)",
    "not_an_image": "an image file is not an image PIL can read",
    "truncated_image": "an image file is truncated or corrupt",
    "image_too_large": "an image has more pixels than the decompression-bomb limit",
    "image_mode": "a 16-bit, 32-bit or float image whose values are not whole numbers in 0..255: the model's "
    "processor would clip them to 8 bits",
    "video_unsupported": "the record has a video, which the model (remote code) cannot take",
    "bad_video_field": "'video' is not a path",
    "video_tag_count": "<video> appears more than once",
    "video_in_assistant": "the <video> tag sits in an assistant message",
    "unknown_video_tag": "<video> appears but the record has no video",
    "missing_video": "a video file does not exist",
    "video_is_folder": "a video path is a folder",
    "empty_video": "a video file is empty (0 bytes)",
    "unreadable_video": "a video file cannot be decoded (not a video, corrupt or truncated)",
    "no_video_frames": "a video has no video stream or no frames",
    "too_long": "model_max_length would cut through an image or video placeholder",
    "no_learnable_tokens": "no assistant token is left to learn (after truncation)",
    "prompt_not_user_last": "a preference record's conversation does not end with a user message",
    "missing_answer": "a preference record's 'chosen' or 'rejected' answer is missing, not a string, or empty",
    "identical_answers": "a preference record's 'chosen' and 'rejected' answers are the same",
    "pair_too_long": "a preference pair does not fit model_max_length with its answer intact",
    "prompts_differ": "a preference record's chosen and rejected answers lay out different prompts (native models: "
    "the chat template renders a thinking prompt for one answer only)",
    "video_preference": "a preference record has a video (--stage dpo takes images and text)",
    "unscorable_reference": "a metric cannot score the record's reference answer (--eval_generate: its first "
    "assistant message, by --eval_metrics; --stage grpo: its last, by --grpo_rewards): e.g. no number for numeric, "
    "no <box> for iou",
    "build_failed": "building the sample failed for another reason",
    "check_failed": "checking the record raised an error no other reason covers (its type and message are given)",
    "invalid_record": "the record is unusable",
}
EXAMPLES_PER_REASON = 3


@dataclass
class Problem:
    split: str
    file: str
    index: int
    record_id: object
    reason: str
    message: str
    path: str

    @classmethod
    def from_error(cls, split, error):
        return cls(split, error.data_path, error.index, error.record_id, error.code, str(error), error.path)

    def where(self):
        if self.index is None:
            return f"{self.split} file"
        return f"{self.split}#{self.index}" + ("" if self.record_id is None else f" ({self.record_id!r})")


def file_problem(split, error):
    """The ``(problems, stats, lengths)`` of a data file that could not be read at all (``error``: its
    DataError): its one problem, its stats, no lengths."""
    stats = dict(split=split, file=error.data_path, records=0, bad=0, truncated=[], longest_tokens=0,
                 max_length=None, seconds=0.0)
    return [Problem.from_error(split, error)], stats, []


def summary_table(problems, stats):
    """The console summary: one row per reason, with its count and first records."""
    total = sum(s["records"] for s in stats)
    files = "; ".join(f"{s['split']}: {s['bad']} of {s['records']} in {s['file']}" for s in stats)
    unusable = [p.file for p in problems if p.index is None]
    lines = [f"Preflight: {len(problems) - len(unusable)} of {total} records are unusable ({files})"]
    if unusable:
        lines[0] += f"; unusable data files: {', '.join(unusable)}"
    by_reason = {}
    for problem in problems:
        by_reason.setdefault(problem.reason, []).append(problem)
    if by_reason:
        width = max(len("reason"), *(len(reason) for reason in by_reason))
        lines.append(f"  {'reason':<{width}}  {'count':>6}  first records (split#index (id))")
        for reason, group in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
            first = ", ".join(p.where() for p in group[:EXAMPLES_PER_REASON])
            more = f", ... {len(group) - EXAMPLES_PER_REASON} more" if len(group) > EXAMPLES_PER_REASON else ""
            lines.append(f"  {reason:<{width}}  {len(group):>6}  {first}{more}")
            lines.append(f"  {'':<{width}}  {'':>6}  e.g. {group[0].message}")
    for s in stats:
        if s["truncated"]:
            lines.append(
                f"  note: {len(s['truncated'])} {s['split']} records are longer than model_max_length "
                f"{s['max_length']} and will be truncated (first: {s['truncated'][:EXAMPLES_PER_REASON]})"
            )
    return "\n".join(lines)


def write_report(path, problems, stats, action):
    records = sum(s["records"] for s in stats)
    seconds = sum(s["seconds"] for s in stats)
    report = dict(
        ok=not problems,
        action=action,
        records=records,
        bad_records=len(problems),
        seconds=round(seconds, 3),
        seconds_per_1000_records=round(1000 * seconds / max(records, 1), 3),
        reasons=dict(Counter(p.reason for p in problems).most_common()),
        files=stats,
        dropped=bad_indices(problems, [s["split"] for s in stats]) if action == "skipped" else {},
        problems=[asdict(p) for p in problems],
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(report, indent=1, ensure_ascii=False, default=str)
    # Written whole, then renamed: a failure cannot leave a truncated report. A lone surrogate (an id
    # or text with an unpaired \u escape, itself a reported problem) is written as that \u escape,
    # which is valid JSON, instead of failing UTF-8 encoding half-way.
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(text)
    os.replace(partial, path)
    return report


def bad_indices(problems, splits):
    """``{split: sorted bad record indices}``, or ``{split: None}`` where the file itself is unusable."""
    bad = {}
    for split in splits:
        found = [p.index for p in problems if p.split == split]
        bad[split] = None if None in found else sorted(found)
    return bad


def report(problems, stats, report_path, *, skip_bad, preflight_only):
    """Write the report to ``report_path`` and log the table of a finished check."""
    skippable = all(p.index is not None for p in problems)  # a whole unusable file cannot be skipped
    action = "passed" if not problems else ("skipped" if skip_bad and skippable and not preflight_only else "stopped")
    written = write_report(report_path, problems, stats, action)
    table = summary_table(problems, stats)
    records = written["records"]
    timing = f"{records} records in {written['seconds']:.1f} s ({written['seconds_per_1000_records']:.2f} s per 1,000)"
    if problems:
        (logger.warning if action == "skipped" else logger.error)("%s\nFull report: %s", table, report_path)
    else:
        logger.info("%s\nReport: %s", table, report_path)
    logger.info("Preflight checked %s", timing)
