"""Rule-based rewards: math answers, format, overlong penalty, language consistency, code tests, registry."""

from __future__ import annotations

import pytest

from dsjax.rl import rewards
from dsjax.rl.rewards import (extract_code, extract_math_answer, format_reward, get_reward, language_consistency,
                              math_answer, overlong_penalty)


@pytest.mark.parametrize("completion, answer, expected", [
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("So \\boxed{\\frac{3}{4}}", "0.75", 1.0),
    ("So \\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.333", 0.0),                         # exact, not approximate
    ("\\boxed{{1,2}} or rather \\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0),  # the last box, nested braces
    ("\\boxed{x^{2}+1}", "x^{2} + 1", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{5\\text{ cm}}", "5 cm", 1.0),
    ("\\boxed 7", "7", 1.0),
    ("$\\boxed{1{,}000}$", "1000", 1.0),                             # LaTeX digit-group comma
    ("We get 12 apples, then 3 more, so 15.", "15", 1.0),             # last number
    ("Total: 1,234,567 dollars", "1234567", 1.0),
    ("It costs $2.50.", "2.5", 1.0),
    ("The ratio is 3/4", "\\frac{3}{4}", 1.0),
    ("The ratio is 3/4", "0.75", 1.0),
    ("We get -7", "-7", 1.0),
    ("We get 7", "-7", 0.0),
    ("50%", "50", 1.0),
    ("no number here", "3", 0.0),
    ("Wrong: \\boxed{41}", "42", 0.0),
    ("\\boxed{42", "42", 0.0),                                       # unclosed box: truncated, no fallback
    ("\\boxed{(B)}", "B", 1.0),
    ("\\boxed{B}", "C", 0.0),
    # Thinking mode: numbers in the reasoning do not count, the answer after </think> does.
    ("Maybe 41? Or \\boxed{40}... let me recheck.</think>The answer is 42.", "42", 1.0),
    ("I am sure it is 42.</think>The answer is 41.", "42", 0.0),
    ("The answer is 42.", "Natalia sold 24 clips... #### 42", 1.0),  # GSM8K-style reference
    ("\\boxed{42}", "so the total is \\boxed{42}", 1.0),              # boxed reference
])
def test_math_answer(completion, answer, expected):
    assert math_answer(["q"], [completion], answer=[answer]) == [expected]


def test_math_answer_takes_chat_messages_and_batches():
    completions = [[{"role": "assistant", "content": "\\boxed{2}"}], "it is 3", "4"]
    assert math_answer(["a", "b", "c"], completions, answer=["2", 3, "5"], extra_column=[1, 2, 3]) == [1.0, 1.0, 0.0]
    assert extract_math_answer("no digits") is None
    with pytest.raises(ValueError, match="answer"):
        math_answer(["a", "b"], ["1", "2"], answer=["1"])


@pytest.mark.parametrize("completion, thinking, expected", [
    ("Reason carefully.</think>The answer is 4.", True, 1.0),
    ("<think>Reason carefully.</think>The answer is 4.", True, 1.0),  # a leading <think> is tolerated
    ("The answer is 4.", True, 0.0),                                  # no </think>
    ("</think>The answer is 4.", True, 0.0),                          # empty reasoning
    ("Reason.</think>   ", True, 0.0),                                 # empty answer
    ("Reason.</think>More.</think>Answer", True, 0.0),                # two </think>
    ("Reason.</think>```python\nprint(1)\n", True, 0.0),             # unclosed code fence
    ("Reason.</think>```python\nprint(1)\n```", True, 1.0),
    ("Reason.</think>\\boxed{\\frac{1}{2}", True, 0.0),               # unclosed box
    ("Reason.</think>\\boxed{\\frac{1}{2}}<｜end▁of▁sentence｜>", True, 1.0),  # the EOS is ignored
    ("The answer is 4.", False, 1.0),
    ("Reason.</think>The answer is 4.", False, 0.0),                  # non-thinking rows do not think
    ("", False, 0.0),
    ("Reason.</think>Answer", None, 1.0),                             # unknown mode: judged as written
    ("Answer", None, 1.0),
])
def test_format_reward(completion, thinking, expected):
    assert format_reward(["q"], [completion], thinking=[thinking]) == [expected]


def test_format_reward_reads_the_mode_from_a_rendered_prompt():
    thinking_prompt = "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>"
    plain_prompt = "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜></think>"
    assert format_reward([thinking_prompt, plain_prompt], ["4", "4"]) == [0.0, 1.0]
    assert format_reward([thinking_prompt, plain_prompt], ["ok</think>4", "ok</think>4"]) == [1.0, 0.0]
    assert format_reward(["q", "q"], ["ok</think>4", "4"], thinking=True) == [1.0, 0.0]  # one bool for all


def test_overlong_penalty_follows_the_dapo_formula():
    max_length, buffer_length, penalty = 100, 20, 0.5
    reward = overlong_penalty(max_length, buffer_length, penalty)
    lengths = [10, 80, 81, 90, 99, 100, 101, 500]
    expected = []
    for length in lengths:
        value = min(-(length - (max_length - buffer_length)) / buffer_length, 0.0) * penalty
        expected.append(max(value, -penalty))
    got = reward(["q"] * len(lengths), ["x"] * len(lengths), completion_lengths=lengths)
    assert got == pytest.approx(expected)
    assert got[:2] == [0.0, 0.0] and got[3] == pytest.approx(-0.25) and got[5:] == [-0.5] * 3
    # Without a lengths column: TRL's completion_ids, else characters.
    assert reward(["q"], ["x"], completion_ids=[list(range(90))]) == pytest.approx([-0.25])
    assert reward(["q"], ["y" * 90]) == pytest.approx([-0.25])
    assert reward.__name__ == "overlong_penalty"
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(100, 0)


@pytest.mark.parametrize("prompt, completion, expected", [
    ("What is the capital of France?", "The capital is Paris.", 1.0),
    ("法国的首都是哪里？", "法国的首都是巴黎。", 1.0),
    ("Какая столица Франции?", "Столица Франции — Париж.", 1.0),
    ("法国的首都是哪里？", "The capital is Paris.", 0.0),
    ("What is the capital of France?", "Столица — Париж.", 0.0),
    ("法国的首都是哪里？", "首都是Paris", 3 / 8),                    # 3 Han letters, 5 Latin
    ("Какая столица Франции?", "Ответ: Paris", 5 / 10),
    ("法国的首都是哪里？", "思考</think>答案是 42", 1.0),               # only the answer counts
    ("法国的首都是哪里？", "嗯, let me think.</think>巴黎", 1.0),
    ("用Python写一个函数", "代码如下：```python\ndef f():\n    return 1\n```", 1.0),  # code is neutral
    ("求解方程", "解为 $x = 2$", 1.0),                                 # math is neutral
    ("What is 2+2?", "4", 1.0),                                       # no letters in the answer
    ("2+2?", "four", 1.0),                                            # no letters in the prompt
])
def test_language_consistency(prompt, completion, expected):
    assert language_consistency([prompt], [completion]) == [pytest.approx(expected)]


def test_language_consistency_uses_the_user_turn_of_a_rendered_or_chat_prompt():
    rendered = "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>法国的首都是哪里？<｜Assistant｜></think>"
    chat = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "法国的首都是哪里？"}]
    assert language_consistency([rendered, chat], ["巴黎", "Paris"]) == [1.0, 0.0]


def test_code_tests_reward():
    tests = [{"input": "2 3\n", "output": "5\n"}, {"input": "1 1\n", "output": "2\n"}]
    good = "Here:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    wrong = "```python\nprint(0)\n```"
    draft_then_final = "```python\nprint(0)\n```\nFixed:\n```python\nprint(sum(map(int, input().split())))\n```"
    reward = rewards.make_code_tests_reward(timeout_s=2.0, max_workers=2)
    assert reward(["q"] * 3, [good, wrong, draft_then_final], tests=[tests] * 3) == [1.0, 0.0, 1.0]
    apps_style = '{"inputs": ["2 3\\n"], "outputs": ["5\\n"]}'
    asserts = "assert add(2, 3) == 5"
    function = "```python\ndef add(a, b):\n    return a + b\n```"
    assert rewards.code_tests(["q", "q"], [good, function], tests=[apps_style, asserts]) == [1.0, 1.0]
    assert extract_code("plain code, no fence") == "plain code, no fence"
    assert extract_code("reasoning ```python\nx = 1\n```</think>```\ny = 2\n```") == "y = 2\n"


def test_registry():
    assert get_reward("math_answer") is math_answer
    assert get_reward("overlong_penalty", max_length=10, buffer_length=5)(["q"], ["x"], completion_lengths=[10]) \
        == [-1.0]
    assert callable(get_reward("code_tests", timeout_s=1.0))
    assert set(rewards.REWARDS) >= {"math_answer", "code_tests", "format_reward", "language_consistency"}
    with pytest.raises(ValueError) as error:
        get_reward("accuracy")
    message = str(error.value)
    assert "'accuracy'" in message and "math_answer" in message and "overlong_penalty" in message
    assert "\n" not in message
    with pytest.raises(TypeError, match="no options"):
        get_reward("math_answer", strict=True)
