"""Rule-based rewards with the TRL / Tunix convention `reward(prompts, completions, **columns) -> list[float]`.

prompts and completions hold one entry per row: a string, or a chat-format list of messages
({"role", "content"}) whose relevant content is used. Dataset columns arrive as keyword
arguments, one value per row; each reward takes the columns it needs and ignores the rest.

    math_answer           1 if the final answer equals the `answer` column (numbers compare exactly as fractions)
    code_tests            share of the `tests` column that the last ```python block passes, in the sandbox
    format_reward         1 if the thinking structure and the answer are well formed (rule in its docstring)
    language_consistency  share of the answer's letters written in the prompt's dominant script
    overlong_penalty(...) a factory: the DAPO soft penalty for lengths inside the last buffer_length tokens

`get_reward(name, **options)` looks names up in REWARDS (ready functions) and REWARD_FACTORIES.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from dsjax.rl.sandbox import check_code

THINK = "<think>"
END_THINK = "</think>"
# DeepSeek special tokens look like <｜User｜> or <｜end▁of▁sentence｜> (full-width bars).
SPECIAL_TOKEN = re.compile(r"<｜[^｜]*｜>")
USER_MARKER = "<｜User｜>"
ASSISTANT_MARKER = "<｜Assistant｜>"

RewardFunction = Callable[..., list[float]]


# ---------------------------------------------------------------- text helpers

def _text(entry: Any, *, role: str | None = None) -> str:
    """The text of a prompt or completion: a string, or a message list (last `role` message, else all)."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        return str(entry.get("content", ""))
    messages = [m for m in entry if isinstance(m, dict)]
    if role is not None:
        picked = [m for m in messages if m.get("role") == role]
        if picked:
            return str(picked[-1].get("content", ""))
    return "\n".join(str(m.get("content", "")) for m in messages)


def _completion_text(completion: Any) -> str:
    return SPECIAL_TOKEN.sub("", _text(completion, role="assistant"))


def _prompt_text(prompt: Any) -> str:
    """The user's request: the last user message, or the last user turn of a rendered prompt."""
    text = _text(prompt, role="user")
    if USER_MARKER in text:
        text = text.rsplit(USER_MARKER, 1)[1].split(ASSISTANT_MARKER, 1)[0]
    return SPECIAL_TOKEN.sub("", text).replace(THINK, "").replace(END_THINK, "")


def final_answer(text: str) -> str:
    """The part of a completion after its reasoning: the text after the last </think>, if any."""
    return text.rsplit(END_THINK, 1)[1] if END_THINK in text else text


def _per_row(value: Any, count: int, name: str) -> list[Any]:
    """A column as a list of `count` values; a scalar is broadcast to every row."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Sequence):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"column {name!r} has {len(value)} values for {count} completions")
    return list(value)


# ---------------------------------------------------------------- math

_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
LAST_NUMBER = re.compile(rf"-?{_NUMBER}(?:/{_NUMBER})?|-?\.\d+")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The contents of the brace group opening at text[start] ('{') and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def extract_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}), nested braces included.

    None when there is no box; "" when the last box is never closed (a truncated answer must not
    fall back to some other number).
    """
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)", text)]
    if not starts:
        return None
    rest = starts[-1].end()
    while rest < len(text) and text[rest] == " ":
        rest += 1
    if rest < len(text) and text[rest] == "{":
        group = _braced(text, rest)
        return "" if group is None else group[0]
    token = re.match(r"[^\s$]+", text[rest:])  # \boxed 5
    return token.group(0) if token else ""


def extract_math_answer(completion: str) -> str | None:
    """The answer a completion commits to: after </think>, the last box, else the last number."""
    answer = final_answer(completion)
    boxed = extract_boxed(answer)
    if boxed is not None:
        return boxed
    numbers = LAST_NUMBER.findall(answer)
    return numbers[-1] if numbers else None


def _strip_latex_wrappers(text: str) -> str:
    for command in ("text", "textbf", "mathrm", "mathbf", "mbox", "operatorname"):
        text = re.sub(rf"\\{command}\{{([^{{}}]*)\}}", r"\1", text)
    return text


def normalise_answer(answer: str) -> str:
    """A canonical string form: no spaces, $, thin LaTeX spacing, trailing period, digit-group commas."""
    text = str(answer).strip()
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""),
                     ("\\!", ""), ("{,}", ","), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", "")):
        text = text.replace(old, new)
    text = _strip_latex_wrappers(text)
    text = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", text)
    text = re.sub(r"\\frac(\d)(\d)", r"\1/\2", text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    # "x = 5" -> "5": a single assignment to a variable name.
    assignment = re.fullmatch(r"[A-Za-z]\w*=([^=]+)", text)
    if assignment:
        text = assignment.group(1)
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    choice = re.fullmatch(r"\(([A-Za-z])\)", text)  # "(B)" -> "B"
    return choice.group(1) if choice else text


def as_number(text: str) -> Fraction | None:
    """An exact value for a normalised answer: integers, decimals, a/b, (a)/(b); else None."""
    negative = text.startswith("-")
    parts = (text[1:] if negative else text).split("/")
    if len(parts) > 2:
        return None
    try:
        values = [Fraction(part[1:-1] if part.startswith("(") and part.endswith(")") else part) for part in parts]
    except (ValueError, ZeroDivisionError):
        return None
    if len(values) == 2:
        if values[1] == 0:
            return None
        value = values[0] / values[1]
    else:
        value = values[0]
    return -value if negative else value


def answers_match(predicted: str, reference: str) -> bool:
    """Exact rational equality when both sides are numbers, else string equality after normalising."""
    predicted, reference = normalise_answer(predicted), normalise_answer(reference)
    predicted_value, reference_value = as_number(predicted), as_number(reference)
    if predicted_value is not None and reference_value is not None:
        return predicted_value == reference_value
    return predicted != "" and predicted == reference


def _reference_answer(answer: Any) -> str:
    """The gold answer of a row; GSM8K's '#### 42' and boxed solutions are reduced to the answer."""
    text = str(answer)
    if "####" in text:
        return text.rsplit("####", 1)[1]
    boxed = extract_boxed(text)
    return text if boxed is None else boxed


def math_answer(prompts: Sequence[Any], completions: Sequence[Any], answer: Any, **_: Any) -> list[float]:
    """1.0 where the completion's final answer (see `extract_math_answer`) matches the `answer` column."""
    references = _per_row(answer, len(completions), "answer")
    rewards = []
    for completion, reference in zip(completions, references):
        predicted = extract_math_answer(_completion_text(completion))
        correct = predicted is not None and answers_match(predicted, _reference_answer(reference))
        rewards.append(1.0 if correct else 0.0)
    return rewards


# ---------------------------------------------------------------- code

FENCED_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
PYTHON_TAGS = ("python", "py", "python3")


def extract_code(completion: str) -> str:
    """The last ```python block of the answer, else the last untagged block, else the whole answer."""
    answer = final_answer(completion)
    blocks = FENCED_BLOCK.findall(answer)
    for wanted in (lambda tag: tag.lower() in PYTHON_TAGS, lambda tag: tag == ""):
        picked = [code for tag, code in blocks if wanted(tag)]
        if picked:
            return picked[-1]
    return answer


def _as_tests(tests: Any) -> list[dict[str, Any]] | str:
    """A row's tests as check_code takes them: a list of {input, output}, or assert code.

    Accepts that list, a JSON string of it, APPS-style {"inputs": [...], "outputs": [...]}, or
    a string of assert statements.
    """
    if isinstance(tests, str):
        stripped = tests.strip()
        if not stripped.startswith(("[", "{")):
            return tests
        try:
            tests = json.loads(stripped)
        except json.JSONDecodeError:
            return tests
    if isinstance(tests, dict) and "inputs" in tests:
        return [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    return list(tests)


def make_code_tests_reward(*, timeout_s: float = 5.0, max_workers: int = 1, stop_on_failure: bool = False,
                           **sandbox_options: Any) -> RewardFunction:
    """A `code_tests` reward with its sandbox settings (run_python's keywords, e.g. memory_mb).

    max_workers > 1 scores rows in parallel threads, each row in its own sandboxed processes.
    """

    def score(completion: Any, tests: Any) -> float:
        return check_code(extract_code(_completion_text(completion)), _as_tests(tests), timeout_s=timeout_s,
                          stop_on_failure=stop_on_failure, **sandbox_options)

    def code_tests(prompts: Sequence[Any], completions: Sequence[Any], tests: Any, **_: Any) -> list[float]:
        """Share of the row's `tests` passed by the completion's last ```python block, in the sandbox."""
        rows = _per_row(tests, len(completions), "tests")
        if max_workers <= 1:
            return [score(c, t) for c, t in zip(completions, rows)]
        with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
            return list(pool.map(score, completions, rows))

    return code_tests


code_tests = make_code_tests_reward()


# ---------------------------------------------------------------- format

def answer_is_closed(answer: str) -> bool:
    """No open ``` fence, no unclosed \\boxed{ and no stray <think> / </think> in the answer."""
    if answer.count("```") % 2 or THINK in answer or END_THINK in answer:
        return False
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", answer):
        if _braced(answer, match.end() - 1) is None:
            return False
    return True


def _thinking_from_prompt(prompt: str) -> bool | None:
    stripped = prompt.rstrip()
    if stripped.endswith(THINK):
        return True
    if stripped.endswith(END_THINK):
        return False
    return None


def format_ok(completion: str, thinking: bool | None) -> bool:
    """The format rule; see `format_reward`."""
    text = completion.strip()
    if thinking is None:
        thinking = END_THINK in text
    if thinking:
        if text.startswith(THINK):
            text = text[len(THINK):]
        if text.count(END_THINK) != 1:
            return False
        reasoning, answer = text.split(END_THINK)
        if not reasoning.strip() or THINK in reasoning:
            return False
    else:
        answer = text
    return bool(answer.strip()) and answer_is_closed(answer)


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], thinking: Any = None, **_: Any) -> list[float]:
    """1.0 for a well-formed completion, else 0.0.

    Thinking-mode rows need exactly one </think> (a leading <think> is tolerated), non-blank
    reasoning before it and a non-blank answer after it; non-thinking rows need a non-blank answer
    without <think> or </think>. Either way the answer must be closed (`answer_is_closed`). The
    mode comes from the `thinking` column (bools, or one bool for all rows); where it is None, a
    rendered prompt ending with <think> or </think> decides it, and otherwise the completion's own
    structure is judged (thinking if it has a </think>). Special tokens such as the EOS are ignored.
    """
    modes = _per_row(thinking, len(completions), "thinking")
    rewards = []
    for prompt, completion, mode in zip(_per_row(prompts, len(completions), "prompts"), completions, modes):
        if mode is None and isinstance(prompt, str):
            mode = _thinking_from_prompt(prompt)
        rewards.append(1.0 if format_ok(_completion_text(completion), mode) else 0.0)
    return rewards


# ---------------------------------------------------------------- length

def overlong_penalty(max_length: int, buffer_length: int, penalty: float = 1.0) -> RewardFunction:
    """DAPO's soft overlong penalty: min(-(L - (max_length - buffer_length)) / buffer_length, 0) * penalty.

    0 up to max_length - buffer_length, then linear down to -penalty at max_length, and -penalty
    beyond. L is the `completion_lengths` column (tokens) if given, else the length of TRL's
    `completion_ids` column, else the completion's length in characters.
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"need 0 < buffer_length <= max_length, got {buffer_length} and {max_length}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    expected_length = max_length - buffer_length

    def overlong_penalty_reward(prompts: Sequence[Any], completions: Sequence[Any], completion_lengths: Any = None,
                                completion_ids: Any = None, **_: Any) -> list[float]:
        if completion_lengths is not None:
            lengths = _per_row(completion_lengths, len(completions), "completion_lengths")
        elif completion_ids is not None:
            lengths = [len(ids) for ids in completion_ids]
        else:
            lengths = [len(_completion_text(c)) for c in completions]
        return [max(min(-(float(length) - expected_length) / buffer_length, 0.0) * penalty, -penalty)
                for length in lengths]

    overlong_penalty_reward.__name__ = "overlong_penalty"
    return overlong_penalty_reward


# ---------------------------------------------------------------- language

# Code, inline code and LaTeX math are language-neutral: their letters are not counted.
NEUTRAL_SPANS = re.compile(r"```.*?```|`[^`]*`|\$\$.*?\$\$|\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]", re.DOTALL)


def script_of(char: str) -> str | None:
    """The writing system of a letter ("LATIN", "CJK", "CYRILLIC", ...); None for non-letters.

    Han ideographs, hiragana and katakana share "CJK" (Japanese mixes them); Hangul is "HANGUL".
    Other scripts are named by the first word of the Unicode character name.
    """
    if not char.isalpha():
        return None
    name = unicodedata.name(char, "")
    if not name or name.startswith("MATHEMATICAL"):
        return None
    if name.startswith(("CJK", "HIRAGANA", "KATAKANA", "IDEOGRAPHIC", "HALFWIDTH KATAKANA")):
        return "CJK"
    if "LATIN" in name.split(" ")[:2]:
        return "LATIN"  # includes FULLWIDTH LATIN
    return name.split(" ")[0]


def script_counts(text: str) -> Counter[str]:
    """Letters per script in text outside code and math."""
    return Counter(s for s in map(script_of, NEUTRAL_SPANS.sub(" ", text)) if s is not None)


def language_consistency(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """Share of the answer's letters (after </think>, outside code and math) in the prompt's dominant script.

    1.0 when the answer has no letters, or when the prompt has none (nothing to be consistent with).
    """
    rewards = []
    for prompt, completion in zip(_per_row(prompts, len(completions), "prompts"), completions):
        answer_counts = script_counts(final_answer(_completion_text(completion)))
        prompt_counts = script_counts(_prompt_text(prompt))
        total = sum(answer_counts.values())
        if total == 0 or not prompt_counts:
            rewards.append(1.0)
            continue
        dominant = prompt_counts.most_common(1)[0][0]
        rewards.append(answer_counts[dominant] / total)
    return rewards


# ---------------------------------------------------------------- registry

REWARDS: dict[str, RewardFunction] = {
    "math_answer": math_answer,
    "code_tests": code_tests,
    "format_reward": format_reward,
    "language_consistency": language_consistency,
}
REWARD_FACTORIES: dict[str, Callable[..., RewardFunction]] = {
    "code_tests": make_code_tests_reward,
    "overlong_penalty": overlong_penalty,
}


def get_reward(name: str, **options: Any) -> RewardFunction:
    """A reward function by name; options (if any) go to the name's factory."""
    if name in REWARD_FACTORIES and (options or name not in REWARDS):
        return REWARD_FACTORIES[name](**options)
    if name in REWARDS:
        if options:
            raise TypeError(f"reward {name!r} takes no options, got {sorted(options)}")
        return REWARDS[name]
    valid = ", ".join(sorted(set(REWARDS) | set(REWARD_FACTORIES)))
    raise ValueError(f"unknown reward {name!r}; valid names: {valid}")
