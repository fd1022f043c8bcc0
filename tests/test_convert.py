"""dsjax.convert: HF (FP8 or not) <-> Orbax checkpoints, training checkpoints -> HF, and bad inputs.

The FP8 checkpoints are made here from an `HFReference` directory by block-wise quantising exactly
the Linears that reference section 6 lists (own quantiser and name pattern, independent of
dsjax.convert), with hidden size 160 so that blocks at the matrix edges are partial. The reference
logits come from HF transformers loading the *dequantised* weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

import dsjax
from dsjax.convert import hf_to_orbax, orbax_to_hf, parse_mesh
from dsjax.convert.__main__ import main as convert_main
from dsjax.hf.checkpoint import CheckpointFormatError
from dsjax.hf.safetensors_io import CheckpointReader, write_safetensors
from hf_reference import HFReference, hf_classes, topk_boundary_ties

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
BLOCK = 128
# Reference section 6: the Linears the official checkpoints store as FP8.
OFFICIAL_FP8 = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|indexer\.wq_b"
    r"|indexer\.wk)|mlp\.(gate_proj|up_proj|down_proj|shared_experts\.(gate|up|down)_proj"
    r"|experts\.\d+\.(gate|up|down)_proj))\.weight$")


# ----------------------------------------------------------------------------- building checkpoints

def _config(v32: bool):
    # hidden 160 and dense MLP 200: matrices of 2x2 blocks whose second row/column of blocks is partial.
    return dsjax.make_config("tiny_v32" if v32 else "tiny_v3", hidden_size=160, dense_intermediate_size=200,
                             **({"index_num_heads": 8} if v32 else {}))


def _expand(scale, shape):
    return np.kron(scale, np.ones((BLOCK, BLOCK), np.float32))[:shape[0], :shape[1]]


def _quantize(w, scale_fmt=None):
    rows, cols = w.shape
    padded = np.zeros((-(-rows // BLOCK) * BLOCK, -(-cols // BLOCK) * BLOCK), np.float32)
    padded[:rows, :cols] = np.abs(w)
    amax = padded.reshape(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK).max(axis=(1, 3))
    scale = amax / 448.0
    if scale_fmt == "ue8m0":
        scale = 2.0 ** np.ceil(np.log2(scale))
    scale = scale.astype(np.float32)
    return (w / _expand(scale, w.shape)).astype(E4M3), scale


def _dequantize(q, scale):
    return q.astype(np.float32) * _expand(scale.astype(np.float32), q.shape)


def _write_dir(directory, tensors, hf_config, shards=1):
    """An official-layout directory: `shards` safetensors files, an index, a config.json."""
    os.makedirs(directory, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        write_safetensors(os.path.join(directory, shard), part, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f)


def make_fp8_checkpoint(src, fp8_dir, deq_dir, scale_fmt=None, unquantized_dtype=np.float32):
    """Quantise `src` (an HFReference dir) into `fp8_dir` (3 shards) and write its dequantised values,
    which are what the FP8 checkpoint means, into `deq_dir`."""
    reader = CheckpointReader(src)
    fp8, deq = {}, {}
    for name in reader.names():
        value = np.array(reader.get(name), np.float32)
        if OFFICIAL_FP8.match(name):
            q, scale = _quantize(value, scale_fmt)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            deq[name] = _dequantize(q, scale)
        else:
            keep = np.float32 if name.endswith("e_score_correction_bias") else unquantized_dtype
            fp8[name] = value.astype(keep)
            deq[name] = fp8[name].astype(np.float32)
    with open(os.path.join(src, "config.json")) as f:
        hf_config = json.load(f)
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    if scale_fmt:
        quant["scale_fmt"] = scale_fmt
    _write_dir(fp8_dir, fp8, dict(hf_config, quantization_config=quant), shards=3)
    _write_dir(deq_dir, deq, hf_config)
    return fp8


def _load_mtp_modules(reference, reader):
    """Set the reference's MTP modules to the tensors of `reader` (the inverse of HFReference's writer)."""
    renames = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
               "head_norm.weight": "shared_head.norm.weight"}
    for k, module in enumerate(reference.mtp):
        prefix = f"model.layers.{reference.config.num_layers + k}."
        state = {}
        for key, value in module.state_dict().items():
            if key == "layer.mlp.experts.gate_up_proj":
                new = np.stack([np.concatenate([reader.get(f"{prefix}mlp.experts.{e}.gate_proj.weight"),
                                                reader.get(f"{prefix}mlp.experts.{e}.up_proj.weight")])
                                for e in range(value.shape[0])])
            elif key == "layer.mlp.experts.down_proj":
                new = np.stack([reader.get(f"{prefix}mlp.experts.{e}.down_proj.weight") for e in range(value.shape[0])])
            elif key.startswith("layer."):
                new = reader.get(prefix + key[len("layer."):])
            else:
                new = reader.get(prefix + renames[key])
            assert tuple(new.shape) == tuple(value.shape), key
            state[key] = torch.from_numpy(np.array(new, np.float32))
        module.load_state_dict(state)


def hf_model_from(directory, config):
    """HF transformers' model loaded from a directory (its own config.json), eager kernels, float32."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(directory)
    hf_config._experts_implementation = "eager"
    hf_config._attn_implementation = "eager"
    _, Model = hf_classes(config.use_indexer)
    return Model.from_pretrained(directory, config=hf_config, dtype=torch.float32).eval()


def _tolerance(reference):
    return 1e-4 * float(np.abs(reference).max())


def _no_leftovers(out):
    parent, name = os.path.split(os.path.abspath(out))
    assert not os.path.exists(out), f"{out} exists after a failed conversion"
    left = [p for p in os.listdir(parent) if p.startswith(f".{name}")]
    assert not left, f"temporary directories left behind: {left}"


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    """A V3.2 (indexer + MTP) FP8 checkpoint, its dequantised twin, and HF's logits for the latter."""
    root = tmp_path_factory.mktemp("v32")
    config = _config(v32=True)
    reference = HFReference(config, str(root / "src"), seed=11)
    fp8 = make_fp8_checkpoint(str(root / "src"), str(root / "fp8"), str(root / "deq"))
    reference.model = hf_model_from(str(root / "deq"), config)  # HF ignores the MTP tensors
    _load_mtp_modules(reference, CheckpointReader(str(root / "deq")))
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 19))
    assert config.index_topk < tokens.shape[1]
    assert topk_boundary_ties(reference.index_scores(tokens), config.index_topk) == 0
    want, want_mtp = reference.logits(tokens)
    # The quantisation is real: the FP8 model's logits differ from the unquantised one's.
    original = hf_model_from(str(root / "src"), config)
    with torch.no_grad():
        unquantized = original(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(unquantized - want).max() > 10 * _tolerance(want)
    return dict(root=root, config=config, reference=reference, fp8=fp8, tokens=tokens, want=want,
                want_mtp=want_mtp, fp8_dir=str(root / "fp8"), deq_dir=str(root / "deq"))


@pytest.fixture(scope="module")
def v32_orbax(v32):
    """The FP8 checkpoint converted to float32 Orbax through the real command line (a subprocess)."""
    out = str(v32["root"] / "orbax_f32")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "dsjax.convert", "hf-to-orbax", "--hf_dir", v32["fp8_dir"],
                             "--out", out, "--dtype", "float32"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    for field in ("tensors", "MB", "GB/s", "ETA", "verify:"):
        assert field in result.stderr, result.stderr
    return out


def _tree_paths(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _tree_paths(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _assert_same_params(a, b):
    pa, pb = dict(_tree_paths(a)), dict(_tree_paths(b))
    assert pa.keys() == pb.keys()
    for path in pa:
        np.testing.assert_array_equal(np.asarray(pa[path]), np.asarray(pb[path]), err_msg="/".join(path))


def _assert_same_tensors(dir_a, dir_b, names=None):
    a, b = CheckpointReader(dir_a), CheckpointReader(dir_b)
    assert set(a.names()) == set(b.names())
    for name in names or a.names():
        assert a.dtype(name) == b.dtype(name), name
        np.testing.assert_array_equal(np.asarray(a.get(name)).view(np.uint8), np.asarray(b.get(name)).view(np.uint8),
                                      err_msg=name)


# ----------------------------------------------------------------------------- HF -> Orbax

def test_fp8_hf_to_orbax_gives_hf_logits(v32, v32_orbax):
    import orbax.checkpoint as ocp

    config = v32["config"]
    assert sorted(os.listdir(v32_orbax)) == ["config.json", "dsjax_checkpoint.json", "dsjax_model_config.json",
                                             "params"]
    # Standard Orbax restores the dsjax param tree (shapes and dtypes of abstract_params).
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(v32_orbax, "params"))
    want = dict(_tree_paths(dsjax.abstract_params(config)))
    got = dict(_tree_paths(restored))
    assert got.keys() == want.keys()
    for path, leaf in want.items():
        assert got[path].shape == leaf.shape and got[path].dtype == np.float32, path
    lm = dsjax.load(v32_orbax)
    assert lm.config.num_mtp_layers == 1 and lm.config.use_indexer
    out = lm.forward(v32["tokens"])
    np.testing.assert_allclose(np.asarray(out.logits), v32["want"], rtol=0, atol=_tolerance(v32["want"]))
    np.testing.assert_allclose(np.asarray(out.mtp_logits), v32["want_mtp"], rtol=0, atol=_tolerance(v32["want_mtp"]))
    # dsjax.load on the FP8 HF directory itself dequantises to the very same params.
    _assert_same_params(dsjax.load(v32["fp8_dir"]).params, lm.params)


def test_keep_fp8_stores_fp8_and_scales_and_loads_the_same(v32, v32_orbax):
    import orbax.checkpoint as ocp

    out = str(v32["root"] / "orbax_fp8")
    hf_to_orbax(v32["fp8_dir"], out, dtype="float32", keep_fp8=True, stream=None)
    assert os.path.isdir(os.path.join(out, "fp8_scales"))
    with ocp.PyTreeCheckpointer() as checkpointer:
        params = checkpointer.restore(os.path.join(out, "params"))
        scales = checkpointer.restore(os.path.join(out, "fp8_scales"))
    fp8_leaves = {p for p, v in _tree_paths(params) if v.dtype == E4M3}
    assert fp8_leaves == {p for p, _ in _tree_paths(scales)}
    assert ("moe_layers", "mlp", "experts", "gate_proj", "kernel") in fp8_leaves
    assert ("moe_layers", "mlp", "router", "kernel") not in fp8_leaves
    assert ("mtp_0", "eh_proj", "kernel") not in fp8_leaves and ("mtp_0", "layer", "attention", "o_proj", "kernel") in fp8_leaves
    # The stored bytes are the checkpoint's own: expert 4 of layer 2, and its scale, transposed.
    name = "model.layers.2.mlp.experts.4.down_proj.weight"
    kernel = params["moe_layers"]["mlp"]["experts"]["down_proj"]["kernel"][1, 4]
    np.testing.assert_array_equal(kernel.T.view(np.uint8), v32["fp8"][name].view(np.uint8))
    np.testing.assert_array_equal(scales["moe_layers"]["mlp"]["experts"]["down_proj"]["kernel"][1, 4].T,
                                  v32["fp8"][name + "_scale_inv"])
    # Dequantised on load: exactly the float32 conversion's params (hence its logits).
    _assert_same_params(dsjax.load(out).params, dsjax.load(v32_orbax).params)


# ----------------------------------------------------------------------------- Orbax -> HF

def test_orbax_to_hf_float32_round_trip_is_exact_and_loads_in_transformers(v32, v32_orbax):
    out = str(v32["root"] / "hf_f32")
    assert convert_main(["orbax-to-hf", "--ckpt", v32_orbax, "--out", out, "--dtype", "float32",
                         "--max_shard_size", "300KB", "--quiet"]) == 0
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1  # sharded
    # Every tensor (MTP layer and its embed_tokens / shared_head.head copies included) bit-exact.
    _assert_same_tensors(out, v32["deq_dir"])
    assert "model.layers.3.shared_head.head.weight" in index["weight_map"]
    model = hf_model_from(out, v32["config"])
    with torch.no_grad():
        logits = model(torch.as_tensor(v32["tokens"])).logits.numpy()
    np.testing.assert_allclose(logits, v32["want"], rtol=0, atol=_tolerance(v32["want"]))
    # And a plain (unquantised) HF checkpoint converts back to the same Orbax params.
    again = str(v32["root"] / "orbax_again")
    hf_to_orbax(out, again, dtype="float32", verify="quick", stream=None)
    _assert_same_params(dsjax.load(again).params, dsjax.load(v32_orbax).params)


def test_fp8_round_trips(v32, v32_orbax, tmp_path):
    # FP8-kept Orbax -> FP8 HF: the original bytes and scales, and the official config entry.
    kept = str(tmp_path / "kept")
    hf_to_orbax(v32["fp8_dir"], kept, keep_fp8=True, stream=None)
    back = str(tmp_path / "back")
    orbax_to_hf(kept, back, fp8=True, stream=None)
    quantized = [n for n in v32["fp8"] if OFFICIAL_FP8.match(n)]
    _assert_same_tensors(back, v32["fp8_dir"], names=quantized + [n + "_scale_inv" for n in quantized])
    hf_config = json.load(open(os.path.join(back, "config.json")))
    assert hf_config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                "weight_block_size": [128, 128]}
    # float32 Orbax -> re-quantised FP8 HF: exactly the tensors of reference section 6, and (the
    # values being FP8 values already) the same codes and scales up to float32 rounding.
    requant = str(tmp_path / "requant")
    orbax_to_hf(v32_orbax, requant, fp8=True, stream=None)
    reader = CheckpointReader(requant)
    assert {n for n in reader.names() if reader.dtype(n) == E4M3} == set(quantized)
    assert {n for n in reader.names() if n.endswith("_scale_inv")} == {n + "_scale_inv" for n in quantized}
    for name in quantized:
        q, scale = reader.get(name), reader.get(name + "_scale_inv")
        np.testing.assert_allclose(scale, v32["fp8"][name + "_scale_inv"], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(_dequantize(q, scale), _dequantize(v32["fp8"][name], v32["fp8"][name + "_scale_inv"]),
                                   rtol=1e-6, atol=0, err_msg=name)


def test_ue8m0_bf16_v3_checkpoint_and_requantised_export(tmp_path):
    """V3 (no indexer) with power-of-two scales and bf16 unquantised tensors, as V3.1 ships; then a
    bf16 Orbax checkpoint re-quantised to FP8 HF gives HF's logits within FP8 + bf16 rounding."""
    config = _config(v32=False)
    reference = HFReference(config, str(tmp_path / "src"), seed=5)
    fp8 = make_fp8_checkpoint(str(tmp_path / "src"), str(tmp_path / "fp8"), str(tmp_path / "deq"), scale_fmt="ue8m0",
                              unquantized_dtype=ml_dtypes.bfloat16)
    scale = fp8["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"]
    assert np.all(np.frexp(scale)[0] == 0.5)
    reference.model = hf_model_from(str(tmp_path / "deq"), config)
    _load_mtp_modules(reference, CheckpointReader(str(tmp_path / "deq")))
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 13))
    want, want_mtp = reference.logits(tokens)
    kept = str(tmp_path / "kept")
    hf_to_orbax(str(tmp_path / "fp8"), kept, dtype="float32", keep_fp8=True, stream=None)
    info = json.load(open(os.path.join(kept, "dsjax_checkpoint.json")))
    assert info["fp8"]["scale_fmt"] == "ue8m0" and info["fp8"]["block_size"] == [128, 128]
    lm = dsjax.load(kept)
    got = lm.forward(tokens)
    np.testing.assert_allclose(np.asarray(got.logits), want, rtol=0, atol=_tolerance(want))
    np.testing.assert_allclose(np.asarray(got.mtp_logits), want_mtp, rtol=0, atol=_tolerance(want_mtp))
    # Back to HF with --scale_fmt ue8m0: the kept power-of-two scales pass through unchanged.
    back = str(tmp_path / "back")
    orbax_to_hf(kept, back, fp8=True, scale_fmt="ue8m0", stream=None)
    assert json.load(open(os.path.join(back, "config.json")))["quantization_config"]["scale_fmt"] == "ue8m0"
    np.testing.assert_array_equal(CheckpointReader(back).get("model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"),
                                  scale)
    # bf16 Orbax (the default dtype) -> re-quantised FP8 HF (float32 scales).
    bf16 = str(tmp_path / "bf16")
    hf_to_orbax(str(tmp_path / "fp8"), bf16, stream=None)
    requant = str(tmp_path / "requant")
    orbax_to_hf(bf16, requant, fp8=True, stream=None)
    reader = CheckpointReader(requant)
    assert {n for n in reader.names() if reader.dtype(n) == E4M3} == {n for n in reader.names() if OFFICIAL_FP8.match(n)}
    # Power-of-two-scaled FP8 values are exact in bf16, so the export re-quantises the checkpoint's own
    # values: the codes and scales the test's quantiser (amax / 448 scales) gives them.
    deq_reader = CheckpointReader(str(tmp_path / "deq"))
    for name in (n for n in reader.names() if OFFICIAL_FP8.match(n)):
        q, scale = _quantize(np.asarray(deq_reader.get(name)))
        np.testing.assert_array_equal(reader.get(name).view(np.uint8), q.view(np.uint8), err_msg=name)
        np.testing.assert_array_equal(reader.get(name + "_scale_inv"), scale, err_msg=name)
    # Re-quantising moves weights by up to half an FP8 step (~3%), enough to flip near-tied expert
    # choices of this random model; replaying the reference's routing isolates the numeric error.
    routing = {name: aux["expert_indices"] for name, aux in got.aux.items()}
    # config.json says bf16: load as float32 to keep the FP8 values exact. (Swapping the params into
    # the already compiled model `lm` saves a compilation: same config, shapes and dtypes.)
    lm.params = dsjax.load(requant, param_dtype="float32").params
    low = lm.forward(tokens, forced_routing=routing)
    top = np.abs(want).max()
    for got_logits, ref in ((np.asarray(low.logits), want), (np.asarray(low.mtp_logits), want_mtp)):
        error = np.abs(got_logits - ref)
        assert error.max() < 0.1 * top and error.mean() < 0.01 * top, (error.max() / top, error.mean() / top)
        assert error.max() > 10 * _tolerance(ref)  # it was re-quantised, not passed through
    # HF transformers reads the FP8 export: dequantised here by the test's own code (transformers
    # loads FP8 itself only with `accelerate` installed; then that is checked too).
    hf_config = json.load(open(os.path.join(requant, "config.json")))
    deq = {}
    for name in reader.names():
        if not name.endswith("_scale_inv"):
            value = reader.get(name)
            deq[name] = (_dequantize(value, reader.get(name + "_scale_inv")) if value.dtype == E4M3
                         else np.asarray(value, np.float32))
    plain = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    _write_dir(str(tmp_path / "requant_deq"), deq, dict(plain, dtype="float32"))
    with torch.no_grad():
        hf_logits = hf_model_from(str(tmp_path / "requant_deq"), config)(torch.as_tensor(tokens)).logits.numpy()
    free = lm(tokens)  # HF picks its own experts: compare with dsjax's free choice
    np.testing.assert_allclose(hf_logits, np.asarray(free), rtol=0, atol=_tolerance(hf_logits))
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return
    with torch.no_grad():
        direct = hf_model_from(requant, config)(torch.as_tensor(tokens)).logits.float().numpy()
    assert np.abs(direct - hf_logits).max() < 0.05 * top


# ----------------------------------------------------------------------------- training checkpoints

def test_training_checkpoint_exports_to_hf_and_loads(v32, v32_orbax, tmp_path):
    import jax
    import jax.numpy as jnp
    import optax

    from dsjax.checkpoint import Checkpointer

    config = v32["config"]
    # Saved as a 2-device run would: leaves with an even leading dim split over the devices, so
    # their checkpoint arrays have several chunks.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))

    def place(x):
        spec = jax.sharding.PartitionSpec("x") if x.ndim and x.shape[0] % 2 == 0 else jax.sharding.PartitionSpec()
        return jax.device_put(jnp.asarray(x), jax.sharding.NamedSharding(mesh, spec))

    params = jax.tree_util.tree_map(place, dsjax.load(v32_orbax).params)
    assert len(params["moe_layers"]["mlp"]["experts"]["up_proj"]["kernel"].addressable_shards) == 2
    optimizer = optax.adamw(1e-3)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.asarray(7, jnp.int32)}
    workdir = tmp_path / "run"
    with Checkpointer(workdir, async_save=False) as checkpointer:
        checkpointer.save(7, state, config={"model": config.to_dict(), "optimizer": {"lr": 1e-3}})
    for ckpt in (str(workdir), str(workdir / "checkpoints" / "7")):
        out = str(tmp_path / f"hf_{os.path.basename(ckpt)}")
        orbax_to_hf(ckpt, out, dtype="float32", stream=None)
        _assert_same_tensors(out, v32["deq_dir"])
    _assert_same_params(dsjax.load(str(workdir)).params, params)
    # Without a saved run config the model config must be given; the error says how.
    bare = tmp_path / "bare"
    with Checkpointer(bare, async_save=False) as checkpointer:
        checkpointer.save(1, state)
    with pytest.raises(CheckpointFormatError, match="no saved run config.*--model_config"):
        orbax_to_hf(str(bare), str(tmp_path / "bare_hf"), stream=None)
    _no_leftovers(str(tmp_path / "bare_hf"))
    model_config = tmp_path / "model.json"
    model_config.write_text(json.dumps(config.to_dict()))
    orbax_to_hf(str(bare), str(tmp_path / "bare_hf"), dtype="float32", model_config=str(model_config), stream=None)
    _assert_same_tensors(str(tmp_path / "bare_hf"), v32["deq_dir"])
    # A model config that disagrees with the saved params is refused.
    wrong = _write_json(tmp_path / "wrong.json", dict(config.to_dict(), moe_intermediate_size=30))
    with pytest.raises(CheckpointFormatError, match="has shape"):
        orbax_to_hf(str(bare), str(tmp_path / "wrong"), model_config=wrong, stream=None)
    _no_leftovers(str(tmp_path / "wrong"))


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


# ----------------------------------------------------------------------------- bad inputs

def _shard_of(directory, name):
    return json.load(open(os.path.join(directory, "model.safetensors.index.json")))["weight_map"][name]


def _rewrite_shard(directory, shard, change):
    path = os.path.join(directory, shard)
    reader = CheckpointReader(directory)
    tensors = {n: np.array(reader.get(n)) for n in reader.names() if _shard_of(directory, n) == shard}
    change(tensors)
    os.remove(path)
    write_safetensors(path, tensors)


def _edit_json(path, change):
    data = json.load(open(path))
    change(data)
    json.dump(data, open(path, "w"))


def _missing_shard(d):
    os.remove(os.path.join(d, "model-00002-of-00003.safetensors"))


def _truncated_shard(d):
    path = os.path.join(d, "model-00003-of-00003.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)


def _not_in_index(d):
    _edit_json(os.path.join(d, "model.safetensors.index.json"),
               lambda index: index["weight_map"].pop("model.layers.1.self_attn.o_proj.weight"))


def _not_in_shard(d):
    name = "model.layers.1.mlp.shared_experts.up_proj.weight"
    _rewrite_shard(d, _shard_of(d, name), lambda tensors: tensors.pop(name))


def _wrong_shape(d):
    _edit_json(os.path.join(d, "config.json"), lambda c: c.update(moe_intermediate_size=30))


def _fp8_without_quant_config(d):
    _edit_json(os.path.join(d, "config.json"), lambda c: c.pop("quantization_config"))


def _fp8_format_mismatch(d):
    _edit_json(os.path.join(d, "config.json"), lambda c: c["quantization_config"].update(fmt="e5m2"))


def _int_tensor(d):
    name = "model.layers.0.input_layernorm.weight"
    _rewrite_shard(d, _shard_of(d, name), lambda t: t.update({name: t[name].astype(np.int32)}))


def _unknown_tensor(d):
    name = "model.layers.0.mlp.gate_proj.weight"
    shard = _shard_of(d, name)
    _rewrite_shard(d, shard, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": np.ones((3, 3), np.float32)}))
    _edit_json(os.path.join(d, "model.safetensors.index.json"),
               lambda index: index["weight_map"].update({"model.layers.0.mlp.extra_proj.weight": shard}))


def _awq(d):
    _edit_json(os.path.join(d, "config.json"),
               lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4}))


def _missing_scale(d):
    name = "model.layers.2.self_attn.kv_b_proj.weight_scale_inv"
    _rewrite_shard(d, _shard_of(d, name), lambda t: t.pop(name))
    _edit_json(os.path.join(d, "model.safetensors.index.json"), lambda index: index["weight_map"].pop(name))


def _nan_late(d):
    # The last tensor of the last shard: the Orbax write is well under way when it is reached.
    shard = "model-00003-of-00003.safetensors"
    reader = CheckpointReader(d)
    copies = ("embed_tokens.weight", "shared_head.head.weight")  # the MTP layer's copies are not read
    names = sorted((n for n in reader.names() if _shard_of(d, n) == shard and reader.dtype(n) == np.float32
                    and reader.get(n).ndim == 2 and not n.endswith(copies)), key=lambda n: reader.offset(n)[1])

    def poison(tensors):
        tensors[names[-1]] = tensors[names[-1]].copy()
        tensors[names[-1]][0, 0] = np.nan

    _rewrite_shard(d, shard, poison)


BAD_INPUTS = {
    "missing_shard": (_missing_shard, r"shard 'model-00002-of-00003.safetensors' is missing"),
    "truncated_shard": (_truncated_shard, r"model-00003-of-00003.safetensors: truncated"),
    "tensor_not_in_index": (_not_in_index, r"'model.layers.1.self_attn.o_proj.weight' is missing from the index"),
    "tensor_not_in_shard": (_not_in_shard, r"'model.layers.1.mlp.shared_experts.up_proj.weight' is not in its shard"),
    "shape_vs_config": (_wrong_shape, r"down_proj.weight' has shape \(160, 26\), but .*config.json implies \(160, 30\)"),
    "fp8_without_quantization_config": (_fp8_without_quant_config, r"is float8_e4m3fn, but .*declares no quantization_config"),
    "fp8_format_vs_config": (_fp8_format_mismatch, r"is float8_e4m3fn, but .*declares fmt='e5m2'"),
    "int_tensor": (_int_tensor, r"'model.layers.0.input_layernorm.weight' has dtype int32"),
    "unknown_tensor": (_unknown_tensor, r"unknown tensor 'model.layers.0.mlp.extra_proj.weight'"),
    "unsupported_quant_method": (_awq, r"unsupported quantization_config.quant_method='awq'"),
    "missing_scale": (_missing_scale, r"has no 'model.layers.2.self_attn.kv_b_proj.weight_scale_inv'"),
    "nan_during_write": (_nan_late, r"has NaN/inf values"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_message_and_leaves_nothing(v32, tmp_path, case):
    mutate, message = BAD_INPUTS[case]
    source = str(tmp_path / "hf")
    shutil.copytree(v32["fp8_dir"], source)
    mutate(source)
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointFormatError, match=message):
        hf_to_orbax(source, out, stream=None)
    _no_leftovers(out)


def test_cli_reports_errors_without_output(v32, tmp_path, capsys):
    source = str(tmp_path / "hf")
    shutil.copytree(v32["fp8_dir"], source)
    _awq(source)
    out = str(tmp_path / "out")
    assert convert_main(["hf-to-orbax", "--hf_dir", source, "--out", out]) == 2  # bad input: one line, status 2
    err = capsys.readouterr().err
    assert "unsupported quantization_config.quant_method='awq'" in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    _no_leftovers(out)
    # dsjax.load refuses the same checkpoint with the same message.
    with pytest.raises(CheckpointFormatError, match="quant_method='awq'"):
        dsjax.load(source)
    # An existing --out is never touched.
    os.makedirs(out)
    assert convert_main(["hf-to-orbax", "--hf_dir", v32["fp8_dir"], "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err and os.listdir(out) == []
    # A multi-device mesh is refused (single-host default only), a trivial one accepted.
    assert convert_main(["hf-to-orbax", "--hf_dir", v32["fp8_dir"], "--out", str(tmp_path / "m"),
                         "--mesh", "expert=4,data=2"]) == 2
    assert "not implemented yet" in capsys.readouterr().err
    _no_leftovers(str(tmp_path / "m"))
    assert parse_mesh("expert=1,data=1") == {"expert": 1, "data": 1}
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        parse_mesh("expert:4")
