"""The V3.1 hybrid chat template, its parser, and tokenisation with a checkpoint's tokenizer.json."""

import json

import pytest

from dsjax.inference import chat
from dsjax.inference.chat import (ASSISTANT, BOS, END_THINK, EOS, THINK, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN,
                        TOOL_CALLS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_SEP, USER)
from dsjax.data import ByteTokenizer, HFTokenizer

SYSTEM = {"role": "system", "content": "You are terse."}


def test_single_turn_thinking_and_non_thinking():
    messages = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
    prefix = BOS + "You are terse." + USER + "What is 2+2?" + ASSISTANT
    assert chat.render(messages, thinking=False) == prefix + END_THINK
    assert chat.render(messages, thinking=True) == prefix + THINK
    assert chat.render(messages, add_generation_prompt=False) == BOS + "You are terse." + USER + "What is 2+2?"
    # No system prompt: the BOS is directly followed by the user marker.
    assert chat.render(messages[1:]) == BOS + USER + "What is 2+2?" + ASSISTANT + END_THINK


def test_multi_turn_drops_earlier_reasoning():
    messages = [
        SYSTEM,
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "let me think</think>a1"},  # reasoning inline
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "more thoughts"},  # reasoning in a field
        {"role": "user", "content": "q3"},
    ]
    for thinking in (False, True):
        text = chat.render(messages, thinking=thinking)
        context = (BOS + "You are terse." + USER + "q1" + ASSISTANT + END_THINK + "a1" + EOS
                   + USER + "q2" + ASSISTANT + END_THINK + "a2" + EOS + USER + "q3" + ASSISTANT)
        assert text == context + (THINK if thinking else END_THINK)
        assert "let me think" not in text and "more thoughts" not in text


def test_several_system_messages_are_joined():
    messages = [{"role": "system", "content": "A."}, {"role": "system", "content": "B."},
                {"role": "user", "content": "q"}]
    assert chat.render(messages).startswith(BOS + "A.\n\nB." + USER)


def test_tool_round_trip_render():
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [{"type": "function",
              "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": parameters}}]
    messages = [
        SYSTEM,
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}},
            {"name": "get_weather", "arguments": {"city": "Rome"}}]},
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "24C"},
    ]
    text = chat.render(messages, tools=tools)
    description = chat.tool_description(tools)
    assert description.startswith("## Tools\nYou have access to the following tools:\n\n### get_weather\n")
    assert 'Parameters: {"type": "object", "properties": {"city": {"type": "string"}}}' in description
    calls = (TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "get_weather" + TOOL_SEP + '{"city": "Paris"}' + TOOL_CALL_END
             + TOOL_CALL_BEGIN + "get_weather" + TOOL_SEP + '{"city": "Rome"}' + TOOL_CALL_END + TOOL_CALLS_END)
    assert text == (BOS + "You are terse.\n\n" + description + USER + "Weather in Paris and Rome?" + ASSISTANT
                    + END_THINK + calls + EOS + TOOL_OUTPUT_BEGIN + "18C" + TOOL_OUTPUT_END
                    + TOOL_OUTPUT_BEGIN + "24C" + TOOL_OUTPUT_END)
    # The assistant's answer after the tool outputs continues without a new Assistant marker.
    final = chat.render(messages + [{"role": "assistant", "content": "Paris 18C, Rome 24C."}], tools=tools)
    assert final == text + "Paris 18C, Rome 24C." + EOS


def test_render_rejects_malformed_conversations():
    with pytest.raises(ValueError, match="unknown role"):
        chat.render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="tool message"):
        chat.render([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


def test_parse_thinking_response():
    parsed = chat.parse("First, 2+2 is 4.</think>The answer is 4." + EOS, thinking=True)
    assert parsed == chat.Response("First, 2+2 is 4.", "The answer is 4.", [], True)
    cut = chat.parse("still thinking about", thinking=True)  # no </think> yet, no EOS
    assert cut.reasoning == "still thinking about" and cut.content == "" and not cut.finished


def test_parse_non_thinking_response_and_tool_calls():
    text = ("Let me check." + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "get_weather" + TOOL_SEP + '{"city": "Paris"}'
            + TOOL_CALL_END + TOOL_CALL_BEGIN + "search" + TOOL_SEP + "not json" + TOOL_CALL_END + TOOL_CALLS_END + EOS)
    parsed = chat.parse(text, thinking=False)
    assert parsed.reasoning is None and parsed.content == "Let me check." and parsed.finished
    assert parsed.tool_calls == [chat.ToolCall("get_weather", {"city": "Paris"}), chat.ToolCall("search", "not json")]
    # What render writes for a tool-calling turn parses back to the same calls.
    calls = [chat.ToolCall("f", {"x": [1, 2]}), chat.ToolCall("g", {})]
    rendered = chat.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"name": c.name, "arguments": c.arguments} for c in calls]}])
    answer = rendered.split(ASSISTANT + END_THINK, 1)[1]
    assert chat.parse(answer, thinking=False).tool_calls == calls


def _write_tokenizer_json(directory):
    """A small byte-level BPE tokenizer.json with DeepSeek's markers as added special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(chat.MARKERS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["What is the weather in Paris? It is sunny and warm.", "The answer is 4.", "Let me think step by step."]
    tokenizer.train_from_iterator(corpus * 20, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))


def test_checkpoint_tokenizer_encodes_markers_as_single_tokens(tmp_path):
    _write_tokenizer_json(tmp_path)
    tokenizer = chat.load_tokenizer(str(tmp_path))
    assert isinstance(tokenizer, HFTokenizer) and chat.has_chat_markers(tokenizer)
    assert tokenizer.bos_id == tokenizer._tok.token_to_id(BOS) and tokenizer.eos_id == tokenizer._tok.token_to_id(EOS)
    messages = [SYSTEM, {"role": "user", "content": "What is the weather in Paris?"}]
    ids = chat.encode_chat(tokenizer, messages, thinking=True)
    marker_ids = {tokenizer._tok.token_to_id(m): m for m in chat.MARKERS}
    assert ids[0] == tokenizer.bos_id
    assert [marker_ids[i] for i in ids if i in marker_ids] == [BOS, USER, ASSISTANT, THINK]
    assert chat.decode_with_markers(tokenizer, ids) == chat.render(messages, thinking=True)
    # A generated continuation decodes with its markers and parses.
    answer = tokenizer.encode("It is sunny.") + [tokenizer._tok.token_to_id(END_THINK)] + tokenizer.encode("Warm.")
    parsed = chat.parse(chat.decode_with_markers(tokenizer, answer + [tokenizer.eos_id]), thinking=True)
    assert (parsed.reasoning, parsed.content, parsed.finished) == ("It is sunny.", "Warm.", True)


def test_byte_tokenizer_fallback(tmp_path):
    tokenizer = chat.load_tokenizer(str(tmp_path))  # no tokenizer.json
    assert isinstance(tokenizer, ByteTokenizer) and not chat.has_chat_markers(tokenizer)
    ids = chat.encode_chat(tokenizer, [{"role": "user", "content": "hi"}])
    assert ids[0] == tokenizer.bos_id and bytes(ids[1:]).decode() == USER + "hi" + ASSISTANT + END_THINK
    assert chat.decode_with_markers(tokenizer, list(b"ok") + [tokenizer.eos_id, 65]) == "ok" + EOS


def test_cli_prompt_uses_the_template_when_the_tokenizer_has_markers(tmp_path):
    from experiments.generate import prompt_ids

    _write_tokenizer_json(tmp_path)
    tokenizer = chat.load_tokenizer(str(tmp_path))
    user = [{"role": "user", "content": "The answer?"}]
    assert prompt_ids(tokenizer, "The answer?", template="auto", thinking=True, system=None) == \
        chat.encode_chat(tokenizer, user, thinking=True)
    assert prompt_ids(tokenizer, "The answer?", template="auto", thinking=False, system="Be brief.") == \
        chat.encode_chat(tokenizer, [{"role": "system", "content": "Be brief."}] + user, thinking=False)
    assert prompt_ids(tokenizer, "The answer?", template="raw", thinking=True, system=None) == \
        [tokenizer.bos_id] + tokenizer.encode("The answer?")
    byte = ByteTokenizer()  # no markers: raw text after BOS, as in training documents
    assert prompt_ids(byte, "hi", template="auto", thinking=True, system=None) == [byte.bos_id] + list(b"hi")
