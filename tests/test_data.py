"""Tests of dsjax.data: tokenizers, sources, packing layout, resume, sharding, seeds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dsjax.data import (
    ArrayRecordSource,
    ByteTokenizer,
    HFTokenizer,
    JsonlSource,
    TextFileSource,
    default_data_config,
    make_dataset,
    make_source,
    make_tokenizer,
    stdlib_source,
)

BYTE = ByteTokenizer()


# ----------------------------------------------------------------------------- helpers


def _docs(n: int, seed: int = 0) -> list[str]:
    """n distinct documents of varied length (some multi-byte characters)."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "γάμμα", "delta", "ε", "zeta", "日本", "theta"]
    out = []
    for i in range(n):
        k = int(rng.integers(1, 12))
        out.append(f"doc{i}: " + " ".join(rng.choice(words, size=k)))
    return out


def _write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": len(d)}, ensure_ascii=False) + "\n")
    return str(path)


def _config(**overrides):
    cfg = default_data_config()
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _segments(batch):
    """Yields (row, start, end) of every non-padding segment, in row-major order."""
    seg = batch["segment_ids"]
    for r in range(seg.shape[0]):
        row = seg[r]
        ids = np.unique(row[row > 0])
        for s in ids:
            where = np.flatnonzero(row == s)
            yield r, int(where[0]), int(where[-1]) + 1


def _check_layout(batch, *, batch_size, seq_len, tok):
    """Asserts every invariant of the batch layout; returns the number of segments per row."""
    assert set(batch) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
    for k, dtype in [("tokens", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                     ("positions", np.int32), ("loss_mask", np.float32)]:
        assert batch[k].shape == (batch_size, seq_len), k
        assert batch[k].dtype == dtype, k
    seg, tokens, targets = batch["segment_ids"], batch["tokens"], batch["targets"]
    pos, mask = batch["positions"], batch["loss_mask"]
    segs_per_row = []
    for r in range(batch_size):
        row = seg[r]
        n_real = int(np.count_nonzero(row))
        # real tokens first, then padding
        assert np.all(row[:n_real] > 0) and np.all(row[n_real:] == 0)
        # segment ids are 1, 2, 3, ... in order
        ids = row[:n_real]
        assert ids[0] == 1 if n_real else True
        assert np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        segs_per_row.append(int(ids.max()) if n_real else 0)
        # padding
        assert np.all(tokens[r, n_real:] == tok.pad_id)
        assert np.all(mask[r, n_real:] == 0)
        assert np.all(pos[r, n_real:] == 0)
    for r, a, b in _segments(batch):
        assert np.array_equal(pos[r, a:b], np.arange(b - a)), "positions restart per segment"
        assert np.array_equal(targets[r, a : b - 1], tokens[r, a + 1 : b]), "next token in segment"
        assert np.all(mask[r, a : b - 1] == 1)
        assert mask[r, b - 1] == 0 and targets[r, b - 1] == tok.pad_id, "segment end has no target"
    # mask is exactly "next position is in the same real segment"
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    assert np.array_equal(mask[:, :-1] == 1, same) and np.all(mask[:, -1] == 0)
    return segs_per_row


def _stream_segments(ds, n_batches=None):
    """Token arrays of all segments, in stream order."""
    out = []
    for i, batch in enumerate(ds):
        if n_batches is not None and i >= n_batches:
            break
        for r, a, b in _segments(batch):
            out.append(batch["tokens"][r, a:b])
    return out


def _reassemble(segments, tok):
    """Joins consecutive chunks into documents: a document starts with bos, ends with eos."""
    docs, cur = [], None
    for s in segments:
        if s[0] == tok.bos_id:
            assert cur is None, "a document started before the previous one ended"
            cur = [s]
        else:
            assert cur is not None, "a continuation chunk without its document"
            cur.append(s)
        if s[-1] == tok.eos_id:
            docs.append(np.concatenate(cur))
            cur = None
    return docs


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    text = "def f(x):\n    return 'héllo' + \"日本\"  # ✓\n"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert BYTE.decode(ids) == text
    assert BYTE.decode([BYTE.bos_id] + ids + [BYTE.eos_id, BYTE.pad_id]) == text
    assert np.array_equal(BYTE.encode_array(text), np.array(ids, np.int32))
    assert (BYTE.bos_id, BYTE.eos_id, BYTE.pad_id, BYTE.vocab_size) == (256, 257, 258, 259)
    assert BYTE.decode([0xFF, ord("a")]) == "\ufffda"  # invalid utf-8 replaced
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)


def _train_wordlevel(path, specials):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>"] + specials)
    tok.train_from_iterator(["hello world", "the quick brown fox", "hello fox again"], trainer)
    tok.save(str(path))
    return tok


def test_hf_tokenizer(tmp_path):
    raw = _train_wordlevel(tmp_path / "tokenizer.json", ["<s>", "</s>"])
    tok = make_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == raw.token_to_id("<s>") and tok.eos_id == raw.token_to_id("</s>")
    assert tok.pad_id == tok.eos_id
    assert tok.vocab_size == raw.get_vocab_size()
    ids = tok.encode("hello quick fox")
    assert ids == [raw.token_to_id(w) for w in ("hello", "quick", "fox")]
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "hello quick fox"
    # explicit ids win; a file path works too
    tok2 = make_tokenizer(str(tmp_path / "tokenizer.json"), pad_id=0)
    assert tok2.pad_id == 0


def test_hf_tokenizer_deepseek_names_preferred(tmp_path):
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    raw = _train_wordlevel(tmp_path / "tokenizer.json", ["<s>", "</s>", bos, eos])
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert tok.bos_id == raw.token_to_id(bos) != raw.token_to_id("<s>")
    assert tok.eos_id == raw.token_to_id(eos)


def test_tokenizer_errors(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        make_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        make_tokenizer(str(tmp_path))  # directory without tokenizer.json
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        make_tokenizer(str(bad))
    _train_wordlevel(tmp_path / "nospecial.json", [])
    with pytest.raises(ValueError, match="bos"):
        HFTokenizer(tmp_path / "nospecial.json")


# ----------------------------------------------------------------------------- sources


def test_jsonl_source(tmp_path):
    docs = _docs(5) + ["line\nbreak", ""]
    p1 = tmp_path / "a.jsonl"
    p2 = tmp_path / "b.jsonl"
    _write_jsonl(p1, docs[:3], field="content")
    _write_jsonl(p2, docs[3:], field="content")
    with open(p1, "a") as f:
        f.write("\n   \n")  # blank lines are skipped
    src = JsonlSource(str(tmp_path / "*.jsonl"), field="content")
    assert len(src) == len(docs)
    assert [src[i] for i in range(len(src))] == docs
    assert src[len(docs) - 2] == "line\nbreak"
    src_default = make_source(_config(source="jsonl", paths=str(p2), field="id"))
    with pytest.raises(ValueError, match="'id'"):
        src_default[0]  # the field holds an int
    with pytest.raises(KeyError, match="nofield"):
        JsonlSource(str(p1), field="nofield")[0]


def test_text_file_source(tmp_path):
    texts = {"b.txt": "second ✓", "a.txt": "first", "c.txt": "third"}
    for name, t in texts.items():
        (tmp_path / name).write_text(t, encoding="utf-8")
    (tmp_path / "d.txt").write_bytes(b"bad \xff byte")
    src = make_source(_config(source="text", paths=str(tmp_path / "*.txt")))
    assert isinstance(src, TextFileSource)
    assert [os.path.basename(p) for p in src.paths] == sorted(list(texts) + ["d.txt"])
    assert [src[i] for i in range(3)] == [texts[k] for k in sorted(texts)]
    assert src[3] == "bad \ufffd byte"
    # a list of paths works too (and is sorted)
    src2 = TextFileSource([str(tmp_path / "c.txt"), str(tmp_path / "a.txt")])
    assert [src2[0], src2[1]] == [texts["a.txt"], texts["c.txt"]]


def test_array_record_source(tmp_path):
    writer_mod = pytest.importorskip("array_record.python.array_record_module")
    docs = _docs(6)
    path = str(tmp_path / "data.array_record")
    w = writer_mod.ArrayRecordWriter(path, "group_size:1")
    for i, d in enumerate(docs):
        if i % 2:
            w.write(json.dumps({"text": d}).encode("utf-8"))  # JSON record
        else:
            w.write(d.encode("utf-8"))  # raw text record
    w.write(b"{not json, just text")
    w.close()
    src = make_source(_config(source="array_record", paths=str(tmp_path / "*.array_record")))
    assert isinstance(src, ArrayRecordSource)
    assert len(src) == len(docs) + 1
    assert [src[i] for i in range(len(docs))] == docs
    assert src[len(docs)] == "{not json, just text"


def test_make_source_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data_config\.source='parquet'"):
        make_source(_config(source="parquet"))
    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(FileNotFoundError, match=r"data_config\.paths.*\*\.nothing"):
        make_source(_config(source="jsonl", paths=pattern))
    with pytest.raises(ValueError, match=r"data_config\.paths"):
        make_source(_config(source="text", paths=""))


def test_stdlib_source():
    src = stdlib_source()
    assert len(src) > 100
    assert src.paths == sorted(src.paths)
    for p in src.paths:
        assert p.endswith(".py")
        parts = set(os.path.normpath(p).split(os.sep))
        assert not parts & {"site-packages", "test", "tests", "idlelib", "lib2to3"}, p
    text = src[len(src) // 2]
    assert isinstance(text, str) and text
    assert isinstance(make_source(default_data_config()), TextFileSource)


# ----------------------------------------------------------------------------- packing


def _packing_corpus(tmp_path, seq_len):
    short = _docs(30, seed=1)
    long_doc = " ".join(f"word{i}" for i in range(seq_len))  # several rows of bytes
    assert len(long_doc.encode()) + 2 > 3 * seq_len
    docs = short + [long_doc]
    return docs, _write_jsonl(tmp_path / "corpus.jsonl", docs)


def test_packing_layout_and_round_trip(tmp_path):
    seq_len, batch_size = 64, 3
    docs, path = _packing_corpus(tmp_path, seq_len)
    # one packing bin and no chunk shuffle: rows come in stream order, so chunks re-join.
    cfg = _config(source="jsonl", paths=path, shuffle_window=0, packing_bins=1)
    segs_per_row, segments, rejoined = [], [], []
    for i, batch in enumerate(make_dataset(cfg, seq_len=seq_len, batch_size=batch_size, seed=3)):
        segs_per_row += _check_layout(batch, batch_size=batch_size, seq_len=seq_len, tok=BYTE)
        segments += [batch["tokens"][r, a:b] for r, a, b in _segments(batch)]
        rejoined = _reassemble(segments, BYTE)
        if len(rejoined) >= len(docs) + 1 or i > 1000:
            break
    assert max(segs_per_row) >= 2, "short documents are packed together"
    assert any(s[0] != BYTE.bos_id for s in segments), "the long document was split"
    assert all(len(s) <= seq_len for s in segments)
    # the first len(docs) re-joined documents are one epoch: the corpus, each document once
    first_epoch = [BYTE.decode(d) for d in rejoined[: len(docs)]]
    assert sorted(first_epoch) == sorted(docs)
    long_chunks = [s for s in segments if len(s) == seq_len and s[0] != BYTE.bos_id]
    assert len(long_chunks) >= 2, "the long document spans several full rows"


def test_packing_all_chunks_present_default_bins(tmp_path):
    """Default first-fit bins + window shuffle: the multiset of segments is exactly the chunks."""
    seq_len = 48
    docs, path = _packing_corpus(tmp_path, seq_len)
    cfg = _config(source="jsonl", paths=path, num_epochs=1)
    ds = make_dataset(cfg, seq_len=seq_len, batch_size=1, seed=0)  # batch 1: nothing dropped
    got = []
    for batch in ds:
        _check_layout(batch, batch_size=1, seq_len=seq_len, tok=BYTE)
        got += [tuple(batch["tokens"][r, a:b]) for r, a, b in _segments(batch)]
    want = []
    for d in docs:
        ids = [BYTE.bos_id] + BYTE.encode(d) + [BYTE.eos_id]
        want += [tuple(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
    assert sorted(got) == sorted(want)


def test_hf_tokenizer_pipeline(tmp_path):
    _train_wordlevel(tmp_path / "tokenizer.json", ["<s>", "</s>"])
    words = ["hello", "world", "the", "quick", "brown", "fox", "again"]
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 6)))) for _ in range(20)]
    path = _write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = _config(source="jsonl", paths=path, tokenizer=str(tmp_path), num_epochs=1, packing_bins=1,
                  shuffle_window=0)
    tok = make_tokenizer(str(tmp_path))
    segments = []
    for batch in make_dataset(cfg, seq_len=16, batch_size=1, seed=0):
        _check_layout(batch, batch_size=1, seq_len=16, tok=tok)
        segments += [batch["tokens"][r, a:b] for r, a, b in _segments(batch)]
    assert sorted(tok.decode(d) for d in _reassemble(segments, tok)) == sorted(docs)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("stdlib", {}),
        ("jsonl", {}),  # a small corpus: the stream crosses several epochs
        ("jsonl", {"prefetch_batches": 2}),
    ],
)
def test_resume_is_exact(tmp_path, kind, overrides):
    if kind == "jsonl":
        cfg = _config(source="jsonl", paths=_write_jsonl(tmp_path / "d.jsonl", _docs(25)), **overrides)
    else:
        cfg = _config(**overrides)
    ds = make_dataset(cfg, seq_len=96, batch_size=4, seed=7)
    n, m = 5, 6
    it = iter(ds)
    first = [next(it) for _ in range(n)]
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON (Orbax saves it so)
    expected = [next(it) for _ in range(m)]
    it2 = iter(make_dataset(cfg, seq_len=96, batch_size=4, seed=7))
    it2.set_state(state)
    got = [next(it2) for _ in range(m)]
    for e, g in zip(expected, got):
        for k in e:
            assert np.array_equal(e[k], g[k]), k
    # the restored stream is not simply the start of the stream
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, expected))


# ----------------------------------------------------------------------------- sharding, seeds


def _docs_seen(cfg, *, seed, process_index=0, process_count=1, seq_len=128):
    ds = make_dataset(cfg, seq_len=seq_len, batch_size=1, seed=seed,
                      process_index=process_index, process_count=process_count)
    return [BYTE.decode(d) for d in _reassemble(_stream_segments(ds), BYTE)]


def test_process_sharding_is_disjoint_and_complete(tmp_path):
    docs = _docs(41)
    cfg = _config(source="jsonl", paths=_write_jsonl(tmp_path / "d.jsonl", docs), num_epochs=1,
                  packing_bins=1, shuffle_window=0)
    seen0 = _docs_seen(cfg, seed=0, process_index=0, process_count=2)
    seen1 = _docs_seen(cfg, seed=0, process_index=1, process_count=2)
    assert len(seen0) == len(set(seen0)) and len(seen1) == len(set(seen1))
    assert not set(seen0) & set(seen1)
    assert set(seen0) | set(seen1) == set(docs)
    assert abs(len(seen0) - len(seen1)) <= 1
    with pytest.raises(ValueError, match="process_index"):
        make_dataset(cfg, seq_len=32, batch_size=1, seed=0, process_index=2, process_count=2)


def test_seeds_change_the_order(tmp_path):
    docs = _docs(30)
    cfg = _config(source="jsonl", paths=_write_jsonl(tmp_path / "d.jsonl", docs), num_epochs=2,
                  packing_bins=1, shuffle_window=0)
    a = _docs_seen(cfg, seed=0)
    b = _docs_seen(cfg, seed=1)
    assert len(a) == len(b) == 2 * len(docs)
    assert a == _docs_seen(cfg, seed=0), "same seed, same order"
    assert a != b, "another seed, another order"
    epoch0, epoch1 = a[: len(docs)], a[len(docs) :]
    assert set(epoch0) == set(epoch1) == set(docs), "each epoch is the whole corpus"
    assert epoch0 != epoch1, "each epoch has its own order"
    cfg.shuffle = False
    assert _docs_seen(cfg, seed=0)[: len(docs)] == docs, "no shuffle: source order"
