"""A model's answers to records' first questions, laid out exactly as training lays them out.

The one piece infer.py (``--questions``) and scored evaluation during training
(evaluation/during_training.py) share: a record is cut to its first exchange and built by the
family's own dataset (remote code: dataset.py's placeholders, slices, image ids and chat layout;
native models: the checkpoint's processor and chat template), then cut before the first learned
token (``family.prompt_inputs``) and answered by ``family.generate_batch`` (several prompts per call
where the family batches them). A fine-tuned model thus sees when answering what it saw in training. No training module is imported here.
"""

from evaluation.report import Answered


def first_exchange(record):
    """The record cut to its first user message (after a leading system message, kept) and the
    answer to it (a stand-in if absent)."""
    conversations = record["conversations"]
    first = 1 if conversations and conversations[0].get("role") == "system" else 0
    answer = conversations[first + 1]["content"] if len(conversations) > first + 1 else "?"
    return {**record, "conversations": [*conversations[: first + 1], {"role": "assistant", "content": answer}]}


def question(record):
    """The record's first user message: what is asked."""
    return first_exchange(record)["conversations"][-2]["content"]


def reference(record):
    """The record's first assistant message, the answer the metrics compare with ("" if it has none)."""
    conversations = record["conversations"]
    first = 1 if conversations and conversations[0].get("role") == "system" else 0
    return conversations[first + 1]["content"] if len(conversations) > first + 1 else ""


def answered(record, index, answer):
    """The Answered (evaluation/report.py) of ``record``, number ``index`` of its file, and the model's
    ``answer`` to its first question: the id is the record's own, else its index."""
    return Answered(str(record.get("id", index)), question(record), answer, reference(record))


def question_dataset(family, records, processing, config, **settings):
    """The family's dataset of ``records`` cut to their first exchange; ``settings``: make_dataset's
    keywords (max_length, image_root, max_slice_nums, ...), as training passes them."""
    return family.make_dataset([first_exchange(record) for record in records], processing, config, **settings)


def generate_answers(family, model, processing, dataset, indices, device, max_new_tokens, batch_size=1):
    """The model's answers to samples ``indices`` of a question_dataset, in order, ``batch_size``
    prompts per generate call where the family batches them (family.generate_batch)."""
    answers = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        prompts = [family.prompt_inputs(dataset[i], device) for i in chunk]
        answers += family.generate_batch(model, processing, prompts, max_new_tokens)
    return answers


class Answerer:
    """Answers records' first questions with a model of ``family`` (see families.inference.load_for_inference)."""

    def __init__(self, model, processing, config, family, *, max_slice_nums=9, max_length=4096, batch_size=1):
        self.model, self.processing, self.config, self.family = model, processing, config, family
        self.max_slice_nums, self.max_length, self.batch_size = max_slice_nums, max_length, batch_size

    def answer(self, records, image_root, max_new_tokens=64):
        """Generated answers to the first question of each record, in order."""
        dataset = question_dataset(self.family, records, self.processing, self.config, max_length=self.max_length,
                                   image_root=image_root, max_slice_nums=self.max_slice_nums)
        return generate_answers(self.family, self.model, self.processing, dataset, range(len(dataset)),
                                self.model.device, max_new_tokens, self.batch_size)
