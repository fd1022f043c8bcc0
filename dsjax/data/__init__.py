"""Data pipeline: document sources, tokenizers and the packed grain dataset.

    ds = make_dataset(default_data_config(), seq_len=256, batch_size=8, seed=0)
    it = iter(ds)
    batch = next(it)          # tokens/targets/segment_ids/positions/loss_mask, [8, 256] each
    state = it.get_state()    # JSON-serialisable; it.set_state(state) resumes exactly
"""

from dsjax.data.pipeline import BATCH_KEYS, default_data_config, make_dataset
from dsjax.data.sources import (
    SOURCES,
    ArrayRecordSource,
    JsonlSource,
    TextFileSource,
    expand_paths,
    make_source,
    stdlib_source,
)
from dsjax.data.tokenizers import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = [
    "BATCH_KEYS",
    "SOURCES",
    "ArrayRecordSource",
    "ByteTokenizer",
    "HFTokenizer",
    "JsonlSource",
    "TextFileSource",
    "default_data_config",
    "expand_paths",
    "make_dataset",
    "make_source",
    "make_tokenizer",
    "stdlib_source",
]
