"""Tokenizers for the data pipeline.

Two implementations share one small interface:

* `encode(text) -> list[int]`: token ids of `text`, no special tokens added;
* `decode(ids) -> str`: text of `ids`, special tokens (bos/eos/pad) skipped;
* `encode_array(text) -> np.ndarray[int32]`: `encode` as an int32 array (the pipeline's fast path);
* attributes `bos_id`, `eos_id`, `pad_id`, `vocab_size`.

`ByteTokenizer` needs no files (UTF-8 bytes plus three special ids); `HFTokenizer` wraps a
`tokenizer.json` (e.g. the one shipped with a DeepSeek-V3 checkpoint) through the `tokenizers`
package. `make_tokenizer(spec)` builds either from a string.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["ByteTokenizer", "HFTokenizer", "make_tokenizer"]

# Special tokens looked up in a tokenizer.json when the ids are not given: DeepSeek's first,
# then the common sentencepiece-style names.
_BOS_CANDIDATES = ("<｜begin▁of▁sentence｜>", "<s>")
_EOS_CANDIDATES = ("<｜end▁of▁sentence｜>", "</s>")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus bos=256, eos=257, pad=258 (vocab_size=259)."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        arr = arr[(arr >= 0) & (arr < 256)]  # drop the special ids
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A HuggingFace `tokenizer.json` loaded with the `tokenizers` package.

    Args:
        path: the `tokenizer.json` file.
        bos_id, eos_id: special ids; when None they are looked up from the tokens
            `<｜begin▁of▁sentence｜>` / `<｜end▁of▁sentence｜>`, falling back to `<s>` / `</s>`.
        pad_id: padding id; defaults to `eos_id`.
    """

    def __init__(
            self,
            path: str | os.PathLike,
            *,
            bos_id: int | None = None,
            eos_id: int | None = None,
            pad_id: int | None = None,
    ):
        import tokenizers  # local import: the byte tokenizer does not need the package

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"tokenizer file not found: {self.path!r}")
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise ValueError(f"could not load tokenizer from {self.path!r}: {e}") from e
        self.bos_id = self._lookup(bos_id, _BOS_CANDIDATES, "bos")
        self.eos_id = self._lookup(eos_id, _EOS_CANDIDATES, "eos")
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self._special = np.array(sorted({self.bos_id, self.eos_id, self.pad_id}), dtype=np.int64)

    def _lookup(self, given: int | None, candidates: Sequence[str], what: str) -> int:
        if given is not None:
            return int(given)
        for token in candidates:
            tid = self._tok.token_to_id(token)
            if tid is not None:
                return int(tid)
        raise ValueError(
                f"tokenizer {self.path!r} has none of the {what} tokens {list(candidates)}; "
                f"pass {what}_id explicitly"
        )

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        arr = arr[~np.isin(arr, self._special)]
        return self._tok.decode([int(i) for i in arr], skip_special_tokens=True)

    def __repr__(self) -> str:
        return (
                f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


def make_tokenizer(
        spec: str,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
) -> ByteTokenizer | HFTokenizer:
    """Builds a tokenizer from a string.

    `"byte"` gives a `ByteTokenizer`; anything else is a path to a `tokenizer.json` file or to a
    directory holding one (e.g. a HF checkpoint directory), loaded as an `HFTokenizer` with the
    optional special-id overrides.
    """
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec).strip():
        raise ValueError(f"tokenizer spec must be 'byte' or a path to a tokenizer.json, got {spec!r}")
    spec = os.fspath(spec).strip()
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"directory {path!r} has no tokenizer.json (tokenizer spec {spec!r})")
        path = candidate
    elif not os.path.exists(path):
        raise FileNotFoundError(
                f"tokenizer spec {spec!r} is neither 'byte' nor an existing tokenizer.json file or directory"
        )
    return HFTokenizer(path, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
