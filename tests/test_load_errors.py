"""dsjax.load on broken HF checkpoint directories: errors that name the tensor and file."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import dsjax
from dsjax.hf.safetensors_io import CheckpointFormatError, write_safetensors
from hf_reference import HFReference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    HFReference(dsjax.make_config("tiny_v3", num_mtp_layers=0), str(directory), seed=0)
    return str(directory)


def _rewrite(directory, edit):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    os.remove(path)
    write_safetensors(path, tensors)


def _copy(checkpoint, tmp_path):
    for name in os.listdir(checkpoint):
        with open(os.path.join(checkpoint, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    return str(tmp_path)


def test_missing_tensor(checkpoint, tmp_path):
    d = _copy(checkpoint, tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointFormatError, match=r"missing .*model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        dsjax.load(d)


def test_unknown_tensor(checkpoint, tmp_path):
    d = _copy(checkpoint, tmp_path)
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.mystery.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointFormatError, match=r"model\.safetensors: unknown tensor 'model\.layers\.0\.mystery\.weight'"):
        dsjax.load(d)


def test_wrong_shape(checkpoint, tmp_path):
    d = _copy(checkpoint, tmp_path)
    _rewrite(d, lambda t: t.__setitem__("model.norm.weight", np.ones(7, np.float32)))
    with pytest.raises(CheckpointFormatError, match=r"'model\.norm\.weight' has shape \(7,\), but config\.json implies \(52,\)"):
        dsjax.load(d)


def test_truncated_shard(checkpoint, tmp_path):
    d = _copy(checkpoint, tmp_path)
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointFormatError, match="model.safetensors: truncated"):
        dsjax.load(d)


def test_unsupported_config(checkpoint, tmp_path):
    d = _copy(checkpoint, tmp_path)
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config["scoring_func"] = "softmax"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="config.json: scoring_func='softmax'"):
        dsjax.load(d)


def test_bad_tokens(checkpoint):
    lm = dsjax.load(checkpoint)
    with pytest.raises(ValueError, match="vocab_size=259"):
        lm(np.array([[1, 2, 400]]))
