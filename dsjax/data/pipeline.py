"""The training data pipeline: documents -> tokens -> packed rows -> batches, on grain.

`make_dataset(data_config, seq_len=..., batch_size=..., seed=...)` returns a `grain.IterDataset`;
its iterator yields dicts of numpy arrays, each `[batch_size, seq_len]`:

  tokens       int32    model inputs
  targets      int32    next token of the same segment (`pad_id` where there is none)
  segment_ids  int32    1, 2, 3, ... per document segment within a row; 0 = padding
  positions    int32    position inside its segment, restarting at 0 at each segment
  loss_mask    float32  1 where `targets` is a real next token of the same segment; 0 at padding
                        and at each segment's last token

Steps (all grain building blocks):

  MapDataset.source(source)            documents (str), random access
    [process_index::process_count]     disjoint share of the documents for this process
    .shuffle(seed)                     new order each epoch (grain reseeds per epoch)
    .repeat(num_epochs or forever)
    .map(_Tokenize)                    [bos] + encode(text) + [eos], int32
    .to_iter_dataset(ReadOptions)      reader threads, order preserved
  FlatMapIterDataset(_Chunk)           documents longer than seq_len -> chunks of <= seq_len
                                       (each chunk becomes its own segment)
  [WindowShuffleIterDataset]           shuffle chunks within a window (`shuffle_window`)
  FirstFitPackIterDataset              several documents per row, first fit, pad with pad_id;
                                       makes `tokens_segment_ids` / `tokens_positions`
    .map(_MakeTargets)                 targets / loss_mask, final names
    .batch(batch_size, drop_remainder=True)
  [ThreadPrefetchIterDataset]          optional background prefetch of batches

Every stage checkpoints by position (no data in the state), so `iterator.get_state()` is a small
JSON-serialisable dict and `set_state` resumes exactly: the restored iterator yields exactly the
batches the original would have yielded next.
"""

from __future__ import annotations

import sys
from typing import Any

import grain
import ml_collections
import numpy as np

from dsjax.data import sources as sources_lib
from dsjax.data import tokenizers as tokenizers_lib

__all__ = ["default_data_config", "make_dataset", "BATCH_KEYS"]

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def default_data_config() -> ml_collections.ConfigDict:
    """Default data settings (the `data` part of a training config).

    Fields:
      source: "stdlib" (default corpus: the Python standard library's .py files, no download),
        "text" (one document per file), "jsonl" (one per line) or "array_record" (one per record).
      paths: files for text/jsonl/array_record: a glob pattern (`**` allowed) or several
        comma-separated ones; ignored for "stdlib".
      field: JSON field holding the text (jsonl; array_record records that are JSON objects).
      tokenizer: "byte" (UTF-8 bytes, vocab 259) or a path to a tokenizer.json / a directory
        holding one (e.g. a HF DeepSeek checkpoint).
      shuffle: shuffle documents (a different order every epoch, from the `seed` argument).
      shuffle_window: when shuffling, document chunks (pieces of <= seq_len tokens) are also
        shuffled within windows of this many chunks, so that the rows of a batch do not all come
        from one long document; 0 or 1 turns it off.
      num_epochs: passes over the documents; 0 repeats forever.
      packing_bins: rows packed at once by first-fit packing (more bins, less padding; more
        buffering). 0 picks max(batch_size, 16).
      read_threads: grain reader threads that read and tokenise documents.
      read_buffer_size: documents those threads read ahead.
      prefetch_batches: batches built ahead in a background thread; 0 turns it off.
    """
    return ml_collections.ConfigDict(
        dict(
            source="stdlib",
            paths="",
            field="text",
            tokenizer="byte",
            shuffle=True,
            shuffle_window=1024,
            num_epochs=0,
            packing_bins=0,
            read_threads=4,
            read_buffer_size=128,
            prefetch_batches=0,
        )
    )


def _cfg(config: Any, key: str, default: Any) -> Any:
    try:
        value = config[key]
    except (KeyError, AttributeError, TypeError):
        value = getattr(config, key, default)
    return default if value is None else value


def _derive_seed(seed: int, stream: int) -> int:
    """A 32-bit seed for one use (`stream`) of the user's seed; unrelated across streams/seeds.

    grain's shuffle reseeds epoch e with `seed + e`, so the raw user seed would make epoch 1 of
    seed s equal epoch 0 of seed s + 1; hashing the seed first avoids that.
    """
    entropy = int(seed) & (2**64 - 1)
    return int(np.random.SeedSequence([entropy, stream]).generate_state(1, dtype=np.uint32)[0])


class _Tokenize:
    """document text -> int32 `[bos] + encode(text) + [eos]`."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def __call__(self, text: str) -> np.ndarray:
        encode = getattr(self._tok, "encode_array", None)
        ids = encode(text) if encode is not None else np.asarray(self._tok.encode(text), np.int32)
        out = np.empty(ids.shape[0] + 2, dtype=np.int32)
        out[0] = self._tok.bos_id
        out[1:-1] = ids
        out[-1] = self._tok.eos_id
        return out


class _Chunk(grain.experimental.FlatMapTransform):
    """Token array -> `[{"tokens": chunk}, ...]`, chunks of at most `seq_len` tokens."""

    max_fan_out = sys.maxsize  # only FlatMapMapDataset uses it; documents may be any length

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def flat_map(self, ids: np.ndarray):
        return [{"tokens": ids[i : i + self._seq_len]} for i in range(0, len(ids), self._seq_len)]


class _MakeTargets(grain.transforms.Map):
    """Packed row (grain's names) -> the batch layout of this module, one row at a time."""

    def __init__(self, pad_id: int):
        self._pad_id = pad_id

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = np.asarray(row["tokens"], dtype=np.int32)
        segment_ids = np.asarray(row["tokens_segment_ids"], dtype=np.int32)
        positions = np.asarray(row["tokens_positions"], dtype=np.int32)
        # i has a target iff token i+1 is in the same (non-padding) segment.
        has_next = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[:-1] != 0)
        targets = np.full_like(tokens, self._pad_id)
        targets[:-1] = np.where(has_next, tokens[1:], self._pad_id)
        loss_mask = np.zeros(tokens.shape, dtype=np.float32)
        loss_mask[:-1] = has_next
        return dict(
            tokens=tokens,
            targets=targets,
            segment_ids=segment_ids,
            positions=positions,
            loss_mask=loss_mask,
        )


def make_dataset(
    data_config: Any,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer: Any = None,
    source: Any = None,
) -> grain.IterDataset:
    """Builds the packed, batched training dataset (see the module docstring for the layout).

    Args:
      data_config: a `ConfigDict` like `default_data_config()`.
      seq_len: tokens per row.
      batch_size: rows per batch (per process).
      seed: shuffling seed (documents and packed rows).
      process_index, process_count: this process sees documents
        `process_index, process_index + process_count, ...` of the source (before shuffling), so
        processes see disjoint documents whose union is the corpus.
      tokenizer: overrides `data_config.tokenizer` (an object with encode/bos_id/eos_id/pad_id).
      source: overrides `data_config.source` (any random-access source of str documents).
    """
    seq_len, batch_size = int(seq_len), int(batch_size)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if tokenizer is None:
        tokenizer = tokenizers_lib.make_tokenizer(_cfg(data_config, "tokenizer", "byte"))
    if source is None:
        source = sources_lib.make_source(data_config)
    if len(source) == 0:
        raise ValueError(f"the data source {source!r} holds no documents")

    num_epochs = int(_cfg(data_config, "num_epochs", 0))
    if num_epochs < 0:
        raise ValueError(f"data_config.num_epochs={num_epochs} must be >= 0 (0 = forever)")
    bins = int(_cfg(data_config, "packing_bins", 0)) or max(batch_size, 16)
    read_options = grain.ReadOptions(
        num_threads=max(1, int(_cfg(data_config, "read_threads", 4))),
        prefetch_buffer_size=max(1, int(_cfg(data_config, "read_buffer_size", 128))),
    )

    docs = grain.MapDataset.source(source)
    if process_count > 1:
        docs = docs[process_index::process_count]
        if len(docs) == 0:
            raise ValueError(
                f"process {process_index} of {process_count} gets no documents "
                f"(the source has only {len(source)})"
            )
    shuffle = bool(_cfg(data_config, "shuffle", True))
    if shuffle:
        docs = docs.shuffle(seed=_derive_seed(seed, 0))
    docs = docs.repeat(num_epochs if num_epochs > 0 else None)
    docs = docs.map(_Tokenize(tokenizer))

    ds = docs.to_iter_dataset(read_options)
    ds = grain.experimental.FlatMapIterDataset(ds, _Chunk(seq_len))
    window = int(_cfg(data_config, "shuffle_window", 0))
    if shuffle and window > 1:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=window, seed=_derive_seed(seed, 2))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={"tokens": seq_len},
        num_packing_bins=bins,
        seed=_derive_seed(seed, 1),
        shuffle_bins=True,
        padding_struct={"tokens": int(tokenizer.pad_id)},
    )
    ds = ds.map(_MakeTargets(int(tokenizer.pad_id)))
    ds = ds.batch(batch_size, drop_remainder=True)
    prefetch = int(_cfg(data_config, "prefetch_batches", 0))
    if prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds
