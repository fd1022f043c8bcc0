"""Tokenizer and chat template of DeepSeek-V3.1's hybrid thinking mode, and a response parser.

Rendered forms (from the V3.1 model card; `render` produces them):

    non-thinking:  <｜begin▁of▁sentence｜>{system}<｜User｜>{query}<｜Assistant｜></think>
    thinking:      <｜begin▁of▁sentence｜>{system}<｜User｜>{query}<｜Assistant｜><think>
    multi-turn:    ...<｜User｜>{q1}<｜Assistant｜></think>{answer1}<｜end▁of▁sentence｜><｜User｜>{q2}<｜Assistant｜>...

Earlier assistant turns keep only their final answer: their reasoning is dropped and they carry the
non-thinking `</think>` prefix, in both modes. Tool calls (non-thinking mode in V3.1) are
described in the system prompt (`tool_description`) and written by the model as

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{json arguments}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

and tool results follow as `<｜tool▁output▁begin｜>{result}<｜tool▁output▁end｜>`, after which the
assistant continues without a new `<｜Assistant｜>` marker.

A thinking-mode response is `{reasoning}</think>{answer}<｜end▁of▁sentence｜>` (the `<think>` is
already in the prompt); `parse` splits it into reasoning, answer and tool calls.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from dsjax.data.tokenizers import ByteTokenizer, HFTokenizer, make_tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"

MARKERS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN,
           TOOL_CALL_END, TOOL_SEP, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END)


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: Any  # the decoded JSON value, or the raw text when it is not valid JSON


@dataclasses.dataclass
class Response:
    reasoning: str | None  # thinking mode: the text before `</think>` (None in non-thinking mode)
    content: str  # the answer (without tool calls)
    tool_calls: list[ToolCall]
    finished: bool  # True when the text reached <｜end▁of▁sentence｜> (else it was cut off)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def tool_description(tools: Sequence[dict]) -> str:
    """The system-prompt section that declares tools (V3.1 model card format).

    Each tool: {"name", "description", "parameters"} or OpenAI's {"type": "function", "function": {...}}.
    """
    lines = ["## Tools", "You have access to the following tools:"]
    for tool in tools:
        spec = tool.get("function", tool)
        lines += ["", f"### {spec['name']}", f"Description: {spec.get('description', '')}", "",
                  f"Parameters: {json.dumps(spec.get('parameters', {}), ensure_ascii=False)}"]
    lines += [
        "",
        "IMPORTANT: ALWAYS adhere to this exact format for tool use:",
        f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}tool_call_name{TOOL_SEP}tool_call_arguments{TOOL_CALL_END}"
        f"{{additional_tool_calls}}{TOOL_CALLS_END}",
        "",
        "Where:",
        "- `tool_call_name` must be an exact match to one of the available tools",
        "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema",
        "- For multiple tool calls, chain them directly without separators or spaces",
    ]
    return "\n".join(lines)


def _tool_call_text(calls: Iterable[dict | ToolCall]) -> str:
    parts = []
    for call in calls:
        if isinstance(call, ToolCall):
            name, arguments = call.name, call.arguments
        else:
            spec = call.get("function", call)
            name, arguments = spec["name"], spec.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        parts.append(f"{TOOL_CALL_BEGIN}{name}{TOOL_SEP}{arguments}{TOOL_CALL_END}")
    return TOOL_CALLS_BEGIN + "".join(parts) + TOOL_CALLS_END if parts else ""


def _answer_only(content: str | None) -> str:
    """An earlier assistant turn as it stays in the context: reasoning dropped."""
    content = content or ""
    return content.split(END_THINK, 1)[1] if END_THINK in content else content


def render(messages: Sequence[dict], *, thinking: bool = False, tools: Sequence[dict] | None = None,
           add_generation_prompt: bool = True) -> str:
    """Messages -> prompt text in the V3.1 hybrid template.

    messages: dicts with `role` in system/user/assistant/tool and `content`; assistant messages may
    carry `tool_calls` ([{"name", "arguments"}] or OpenAI's {"function": {...}}) and reasoning
    (a `reasoning_content` field, or text before `</think>` in `content`), which is dropped.
    thinking: end the generation prompt with `<think>` (thinking) or `</think>` (non-thinking).
    add_generation_prompt: after a final user turn, open the assistant turn.
    """
    systems = [m.get("content") or "" for m in messages if m["role"] == "system"]
    system = "\n\n".join(systems)
    if tools:
        system = system + "\n\n" + tool_description(tools) if system else tool_description(tools)
    out = [BOS, system]
    previous = None
    for message in messages:
        role = message["role"]
        if role == "system":
            continue
        if role == "user":
            out.append(USER + (message.get("content") or ""))
        elif role == "assistant":
            if previous == "user":
                out.append(ASSISTANT + END_THINK)
            elif previous != "tool":
                raise ValueError("an assistant message must follow a user or tool message")
            out.append(_answer_only(message.get("content")) + _tool_call_text(message.get("tool_calls") or ()) + EOS)
        elif role == "tool":
            if previous not in ("assistant", "tool"):
                raise ValueError("a tool message must follow an assistant message (with tool calls) or a tool message")
            out.append(TOOL_OUTPUT_BEGIN + (message.get("content") or "") + TOOL_OUTPUT_END)
        else:
            raise ValueError(f"unknown role {role!r} (system, user, assistant or tool)")
        previous = role
    if add_generation_prompt and previous == "user":
        out.append(ASSISTANT + (THINK if thinking else END_THINK))
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def _parse_arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse(text: str, *, thinking: bool) -> Response:
    """Split generated text (what follows the generation prompt) into reasoning, answer, tool calls.

    Thinking mode: everything before the first `</think>` is reasoning; with no `</think>` yet the
    whole text is (unfinished) reasoning. Non-thinking mode: no reasoning (None).
    """
    finished = EOS in text
    if finished:
        text = text.split(EOS, 1)[0]
    reasoning = None
    if thinking:
        if text.startswith(THINK):
            text = text[len(THINK):]
        if END_THINK in text:
            reasoning, text = text.split(END_THINK, 1)
        else:
            reasoning, text = text, ""
    elif text.startswith(END_THINK):
        text = text[len(END_THINK):]
    calls = []
    if TOOL_CALLS_BEGIN in text:
        text, section = text.split(TOOL_CALLS_BEGIN, 1)
        section = section.split(TOOL_CALLS_END, 1)[0]
        for chunk in section.split(TOOL_CALL_BEGIN)[1:]:
            chunk = chunk.split(TOOL_CALL_END, 1)[0]
            name, _, arguments = chunk.partition(TOOL_SEP)
            calls.append(ToolCall(name.strip(), _parse_arguments(arguments.strip())))
    return Response(reasoning, text, calls, finished)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def load_tokenizer(checkpoint_dir: str) -> HFTokenizer | ByteTokenizer:
    """The checkpoint's `tokenizer.json` (via `dsjax.data.make_tokenizer`), or the byte tokenizer
    when it has none (checkpoints trained by the quickstart use `ByteTokenizer`)."""
    if os.path.isfile(os.path.join(checkpoint_dir, "tokenizer.json")):
        return make_tokenizer(checkpoint_dir)
    return ByteTokenizer()


def has_chat_markers(tokenizer) -> bool:
    """True when the tokenizer has DeepSeek's role markers as single tokens."""
    inner = getattr(tokenizer, "_tok", None)
    return inner is not None and all(inner.token_to_id(m) is not None for m in (USER, ASSISTANT))


def encode_chat(tokenizer, messages: Sequence[dict], *, thinking: bool = False, tools=None,
                add_generation_prompt: bool = True) -> list[int]:
    """Render and tokenise a conversation (the markers become their special tokens)."""
    text = render(messages, thinking=thinking, tools=tools, add_generation_prompt=add_generation_prompt)
    if isinstance(tokenizer, ByteTokenizer):  # markers stay text; only the BOS has an id
        return [tokenizer.bos_id] + tokenizer.encode(text[len(BOS):])
    return tokenizer.encode(text)


def decode_with_markers(tokenizer, ids: Iterable[int]) -> str:
    """Text of `ids` keeping the chat markers (`</think>`, tool markers, EOS), for `parse`."""
    ids = [int(i) for i in ids]
    inner = getattr(tokenizer, "_tok", None)
    if inner is not None:
        return inner.decode(ids, skip_special_tokens=False)
    eos = getattr(tokenizer, "eos_id", None)
    if eos in ids:  # the byte tokenizer drops special ids: keep the end of the answer visible
        cut = ids.index(eos)
        return tokenizer.decode(ids[:cut]) + EOS
    return tokenizer.decode(ids)
