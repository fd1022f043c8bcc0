"""Generate text from a checkpoint, streaming tokens to the terminal as they are sampled.

    python -m experiments.generate --checkpoint DIR --prompt "Why is the sky blue?" [--thinking]
        [--max_new_tokens 256] [--temperature 0.6] [--top_p 0.95] [--top_k 0] [--seed 0]
        [--system "You are a helpful assistant."] [--template auto|chat|raw] [--tokenizer byte|PATH]

DIR is anything `dsjax.load` reads (an HF checkpoint directory today). The tokenizer is DIR's
`tokenizer.json` when it has one, else the byte tokenizer (quickstart checkpoints are byte-level).
With a tokenizer that knows DeepSeek's chat markers the prompt goes through the V3.1 chat template
(`--thinking` opens the turn with `<think>`, otherwise `</think>`); otherwise the raw prompt is
used, after a BOS token, as in training documents. Generation stops at the tokenizer's EOS.
Tokens are printed from a host callback inside the jitted decode loop, one step at a time.

A bad argument or checkpoint is one `error: ...` line on stderr and exit status 2 (`--verbose`: the
traceback instead); anything else is a bug and raises with its traceback. See dsjax/cli.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Make the repository root importable however this module was started.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import numpy as np  # noqa: E402

from dsjax import cli  # noqa: E402


def load_model(path: str, **overrides):
    """The checkpoint as a `dsjax.LanguageModel`.

    Hook: every checkpoint format goes through `dsjax.load` (HF directories; Orbax checkpoints and
    training workdirs where that loader supports them), so new formats need no change here.
    """
    import dsjax

    return dsjax.load(path, **overrides)


def load_tokenizer(spec: str | None, checkpoint: str):
    from dsjax.inference import chat
    from dsjax.data import make_tokenizer

    return make_tokenizer(spec) if spec else chat.load_tokenizer(checkpoint)


def prompt_ids(tokenizer, prompt: str, *, template: str, thinking: bool, system: str | None) -> list[int]:
    from dsjax.inference import chat

    if template == "auto":
        template = "chat" if chat.has_chat_markers(tokenizer) else "raw"
    if template == "raw":
        return [tokenizer.bos_id] + list(tokenizer.encode(prompt))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return chat.encode_chat(tokenizer, messages, thinking=thinking)


class StreamPrinter:
    """Host callback: decode the tokens so far and print what is new (whole characters only)."""

    def __init__(self, tokenizer, out=None):
        from dsjax.inference.chat import EOS

        self.tokenizer, self.out, self.eos_text = tokenizer, out or sys.stdout, EOS
        self.ids: list[int] = []
        self.printed = ""
        self.first_token_time = None

    def __call__(self, step, tokens, done):
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if bool(np.asarray(done)[0]):
            return
        self.ids.append(int(np.asarray(tokens)[0]))
        self.flush(final=False)

    def flush(self, final: bool):
        from dsjax.inference.chat import decode_with_markers

        text = decode_with_markers(self.tokenizer, self.ids)
        text = text.split(self.eos_text, 1)[0]
        if not final and text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for its other bytes
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        else:  # a tokenizer merged across the boundary: reprint the line
            self.out.write("\n" + text)
        self.out.flush()
        self.printed = text


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (anything dsjax.load reads)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--system", default=None, help="system prompt (chat template only)")
    parser.add_argument("--thinking", action="store_true", help="thinking mode: the turn opens with <think>")
    parser.add_argument("--template", choices=("auto", "chat", "raw"), default="auto",
                        help="auto: the chat template when the tokenizer has DeepSeek's markers, else raw")
    parser.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json path (default: the checkpoint's)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--top_k", type=int, default=0, help="0: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
    parser.add_argument("--verbose", action="store_true",
                        help="on an error, print the full traceback instead of one 'error: ...' line")
    return parser.parse_args(argv)


def run(args: argparse.Namespace):
    """Load, stream the continuation to stdout; returns (GenerateOutput, the prompt ids)."""
    overrides = {"dtype": args.dtype} if args.dtype else {}
    lm = load_model(args.checkpoint, **overrides)
    tokenizer = load_tokenizer(args.tokenizer, args.checkpoint)
    ids = prompt_ids(tokenizer, args.prompt, template=args.template, thinking=args.thinking, system=args.system)
    if max(ids) >= lm.config.vocab_size:
        raise ValueError(f"the tokenizer produced id {max(ids)} >= the model's vocab_size {lm.config.vocab_size}")
    printer = StreamPrinter(tokenizer)
    start = time.perf_counter()
    out = lm.generate(np.asarray([ids], np.int32), args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop_tokens=(tokenizer.eos_id,),
                      callback=printer)
    count = int(np.asarray(out.lengths)[0])  # waits for the loop to finish
    end = time.perf_counter()
    printer.flush(final=True)
    print(file=sys.stdout, flush=True)
    decode_time = end - (printer.first_token_time or end)
    rate = f", {(count - 1) / decode_time:.1f} tokens/s after the first" if count > 1 and decode_time > 0 else ""
    print(f"[{len(ids)} prompt tokens, {count} generated; {end - start:.1f}s including compilation{rate}]",
          file=sys.stderr)
    return out, ids


def main(argv=None) -> int:
    args = parse_args(argv)

    def generate():
        run(args)

    return cli.run_main(generate, verbose=args.verbose, where=args.checkpoint)


if __name__ == "__main__":
    sys.exit(main())
