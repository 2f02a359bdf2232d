"""Metrics that score a generated answer against a record's reference answer, and their registry.

A metric is one function ``(answer, reference) -> float in [0, 1]`` plus one registration line,
the ``@metric("name")`` decorator (or ``register("name", function)`` for a function made
elsewhere, e.g. a ``functools.partial`` with another tolerance). A reference that a metric cannot
score at all (an IoU reference without a box) raises ``Unscorable``, so a preflight can name the
record before a run; an answer it cannot read (no number, no letter, no box) scores 0.

Users add their own from a Python file that uses the same decorator: ``load_user_metrics(path)``.
"""

import importlib.util
import inspect
import math
import re
import string
import unicodedata
from collections import Counter
from pathlib import Path

from usage import UsageError

METRICS = {}  # name -> function(answer, reference) -> float in [0, 1]


class Unscorable(ValueError):
    """The reference answer gives this metric nothing to compare with (no number, no letter, no box)."""


class RegistrationError(ValueError):
    """A metric that cannot be registered: its name is taken or unusable, or it takes other arguments."""


def register(name, function):
    """Registers ``function`` as the metric ``name``; a name is registered once."""
    if not re.fullmatch(r"[\w.-]+", name):
        raise RegistrationError(f"a metric name is letters, digits, '_', '.' or '-' (it goes in a "
                                f"comma-separated list), not {name!r}")
    if name in METRICS:
        raise RegistrationError(f"a metric named {name!r} is already registered ({METRICS[name].__module__})")
    try:
        inspect.signature(function).bind("answer", "reference")
    except TypeError as e:
        raise RegistrationError(f"metric {name!r} must take (answer, reference): {e}") from e
    METRICS[name] = function
    return function


def metric(name):
    """Decorator: ``@metric("em")`` above ``def exact_match(answer, reference)`` registers it as ``em``."""
    return lambda function: register(name, function)


def get_metrics(names, flag="--eval_metrics"):
    """``{name: function}`` for ``names`` (a list, or a comma-separated string as on the command
    line), in their order; an unknown name is a UsageError naming ``flag`` and listing the known ones."""
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    if not names:
        raise UsageError(f"{flag} names no metric; the known ones are {', '.join(sorted(METRICS))}")
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise UsageError(f"{flag}: no metric named {', '.join(map(repr, unknown))}; "
                         f"the known ones are {', '.join(sorted(METRICS))}")
    return {name: METRICS[name] for name in names}


def load_user_metrics(path, flag="--eval_metrics_file"):
    """Runs the Python file ``path``, whose ``@metric(...)`` lines register its metrics; returns
    their names. A missing file, or one that registers none, is a UsageError naming ``flag`` and it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    before = set(METRICS)
    # Not put in sys.modules: nothing imports it by name, and two users' files named alike both load.
    spec = importlib.util.spec_from_file_location(f"user_metrics_{path.stem}", path)
    if spec is None:
        raise UsageError(f"{flag} {path}: not a Python file (its name ends in .py)")
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except RegistrationError as e:  # the user's own mistakes in their code keep their traceback
        raise UsageError(f"{flag} {path}: {e}") from e
    added = [name for name in METRICS if name not in before]
    if not added:
        raise UsageError(f"{flag} {path} registers no metric: decorate each function with "
                         "@metric('name') (from evaluation import metric)")
    return added


# -- text: SQuAD's normalisation, with Unicode punctuation and CJK characters as tokens ------------

ARTICLES = re.compile(r"\b(a|an|the)\b")
# CJK ideographs, kana and hangul are written without spaces: each character is a token.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
TOKEN = re.compile(f"[{CJK}]|[^\\s{CJK}]+")


def normalize(text):
    """Lower case, punctuation removed (ASCII as SQuAD, and Unicode's: "。", "，"), the English
    articles a/an/the removed, white space folded."""
    text = "".join(c for c in text.lower()
                   if not (c in string.punctuation or unicodedata.category(c).startswith("P")))
    return " ".join(ARTICLES.sub(" ", text).split())


def tokens(text):
    return TOKEN.findall(normalize(text))


def require_reference(reference):
    if not reference.strip():
        raise Unscorable("the reference answer is empty")


@metric("em")
def exact_match(answer, reference):
    """1 if the answer equals the reference after normalize(), else 0."""
    require_reference(reference)
    return float(tokens(answer) == tokens(reference))


@metric("f1")
def token_f1(answer, reference):
    """SQuAD's token F1 of the normalised answer against the reference (1 when both normalise to
    nothing, as SQuAD scores an empty pair)."""
    require_reference(reference)
    got, expected = tokens(answer), tokens(reference)
    if not got or not expected:
        return float(got == expected)
    common = sum((Counter(got) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(expected)
    return 2 * precision * recall / (precision + recall)


# -- numbers -----------------------------------------------------------------------------------------

# "3,000" (thousands groups), "-2.5", ".5", "1.5e3", "42%"; not inside a word ("v2", "x86").
NUMBER = re.compile(
    r"(?<![\w.])(?P<mantissa>[-+]?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?|[-+]?\.\d+)"
    r"(?P<exponent>[eE][-+]?\d+)?(?P<percent>\s*%)?"
)
RELATIVE_TOLERANCE = 1e-4  # 2023 and 2024 differ by 5e-4: years stay apart
ABSOLUTE_TOLERANCE = 1e-6  # for answers near 0


def last_number(text):
    """``(value, is_percent)`` of the last number written in ``text``, else None. The last one,
    as GSM8K's scorers take it: a reasoning answer ends with its result."""
    found = list(NUMBER.finditer(text))
    if not found:
        return None
    last = found[-1]
    value = float(last["mantissa"].replace(",", "") + (last["exponent"] or ""))
    return value, last["percent"] is not None


@metric("numeric")
def numeric(answer, reference, *, rel_tol=RELATIVE_TOLERANCE, abs_tol=ABSOLUTE_TOLERANCE):
    """1 if the answer's last number equals the reference's within ``rel_tol`` or ``abs_tol``, else 0.
    A percentage on one side only also matches as a fraction: "42%" and "0.42"."""
    expected = last_number(reference)
    if expected is None:
        raise Unscorable(f"the reference answer {reference!r} has no number")
    got = last_number(answer)
    if got is None:
        return 0.0
    (value, value_percent), (target, target_percent) = got, expected
    candidates = {(value, target)}
    if value_percent != target_percent:
        candidates.add((value / 100, target) if value_percent else (value, target / 100))
    return float(any(math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol) for a, b in candidates))



# -- multiple choice -----------------------------------------------------------------------------

# In order, the first rule that finds letters decides; several different letters: no answer.
CHOICE_RULES = [
    re.compile(r"^\s*\(?([A-Z])\)?\s*[.:)]?\s*$"),  # "B", "(B)", "B.", "B)"
    re.compile(r"\b(?i:answer)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])\b"),  # "The answer is (B)", "Answer: B"
    re.compile(r"^\s*\(?([A-Z])(?:\)|\.|:)\s+(?!(?:or|and)\b)"),  # "B. Paris", "(B) Paris"; not "(A) or (B)"
    re.compile(r"\(([A-Z])\)"),  # "... (B) ..."
    re.compile(r"\b(?i:option|choice)\s+\(?([A-Z])\b"),  # "option B"
    # Any lone capital: "It is B because", "A or B"; but not the word "A" or "I" before a lowercase
    # word other than or/and ("A cat", "I think").
    re.compile(r"(?<![\w'])([B-HJ-Z]|[AI](?!\s+(?!(?:or|and)\b)[a-z]))(?![\w'])"),
]


def choice_letter(text):
    """The option letter ``text`` picks, or None (no letter, or several different ones)."""
    for rule in CHOICE_RULES:
        letters = {found.upper() for found in rule.findall(text)}
        if letters:
            return letters.pop() if len(letters) == 1 else None
    return None


@metric("choice")
def multiple_choice(answer, reference):
    """1 if the answer picks the reference's option letter ("B", "(B)", "B.", "The answer is B"), else 0."""
    expected = choice_letter(reference)
    if expected is None:
        raise Unscorable(f"the reference answer {reference!r} names no single option letter")
    return float(choice_letter(answer) == expected)


# -- grounding: MiniCPM-V's <ref>name</ref><box>x1 y1 x2 y2</box>, integers on a 0-1000 scale ---------

BOX = re.compile(r"<box>(.*?)</box>", re.DOTALL)
BOX_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def boxes(text):
    """The ``(x1, y1, x2, y2)`` of every <box> in ``text`` holding four numbers (top-left, then
    bottom-right corner); a box with another count of numbers is not a box. Corners given in the
    other order are put in order."""
    found = []
    for inside in BOX.findall(text):
        numbers = [float(n) for n in BOX_NUMBER.findall(inside)]
        if len(numbers) == 4:
            x1, y1, x2, y2 = numbers
            found.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return found


def box_iou(a, b):
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    overlap = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    return overlap / union if union > 0 else float(a == b)


@metric("iou")
def grounding_iou(answer, reference):
    """IoU of the answer's boxes with the reference's. Several boxes: pairs are matched greedily,
    the highest IoU first, each box at most once; the score is the sum of the matched IoUs over
    the larger of the two counts, so a missed box and an extra box both count as 0. One box
    each: their IoU. No box in the answer: 0."""
    expected = boxes(reference)
    if not expected:
        raise Unscorable(f"the reference answer {reference!r} has no <box>x1 y1 x2 y2</box>")
    got = boxes(answer)
    pairs = sorted(((box_iou(g, e), i, j) for i, g in enumerate(got) for j, e in enumerate(expected)), reverse=True)
    used_got, used_expected, total = set(), set(), 0.0
    for iou, i, j in pairs:
        if i not in used_got and j not in used_expected:
            used_got.add(i)
            used_expected.add(j)
            total += iou
    return total / max(len(got), len(expected))
