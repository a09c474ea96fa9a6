"""torch_fp4kv.checkpoint_scales: a checkpoint's per-layer KV scales read as a recipe's calibration
(from safetensors files made byte by byte here, and from models), written from hf.calibrate's, and
checked against compressed-tensors' own scale math and config writer where it is installed."""

import json
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_fp4kv
from torch_fp4kv.checkpoint_scales import SCALES_FILE, load_kv_scales, save_kv_scales
from torch_fp4kv.sglang import NVFP4KVMethod

NVFP4_BOUND, FP8_BOUND = 448.0 * 6, 448.0
FP8_SCHEME = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False, "symmetric": True}
NVFP4_SCHEME = {**FP8_SCHEME, "num_bits": 4}
CT_NVFP4_SCHEME = {**NVFP4_SCHEME, "strategy": "tensor_group", "group_size": 16, "dynamic": "local"}
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int32: "I32"}


# ---- checkpoints made byte by byte -----------------------------------------------------------------


def write_safetensors(path, tensors):
    """A safetensors file written from the format's definition (8-byte little-endian header size,
    JSON header with dtype, shape and data offsets, padded to 8 bytes; then the raw data), not with
    the safetensors package, so the reader is checked against the format itself."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, tensor in tensors.items():
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def make_checkpoint(folder, scales, quantization_config=None, layers=2, files=None):
    """A model folder: config.json (`layers` decoder layers, the quantization config) and one
    safetensors file holding each layer's k_proj weight and the given scale tensors."""
    folder.mkdir(exist_ok=True)
    config = {"model_type": "llama", "num_hidden_layers": layers}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    weights = {f"model.layers.{i}.self_attn.k_proj.weight": torch.ones(2, 2) for i in range(layers)}
    write_safetensors(folder / "model.safetensors", {**weights, **scales})
    return folder


def ct_config(scheme):
    return {"quant_method": "compressed-tensors", "config_groups": {}, "kv_cache_scheme": scheme}


def as_float32(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64).float()


# Exactly representable in each dtype, so the expected values are exact.
FP8_SCALES = {
    "model.layers.0.self_attn.k_scale": torch.tensor([2.0 ** -7], dtype=torch.bfloat16),
    "model.layers.0.self_attn.v_scale": torch.tensor([0.375]),
    "model.layers.1.self_attn.k_scale": torch.tensor(0.5, dtype=torch.float16),  # 0-d, as some writers store it
    "model.layers.1.self_attn.v_scale": torch.tensor([3.0], dtype=torch.bfloat16),
}


def test_an_fp8_checkpoint_loads_as_each_recipe(tmp_path):
    """compressed-tensors' FP8 KV scales (amax / 448) are +k8's K scales as they are; NVFP4's global
    scales carry the same amax over (/ 6); blockfp4 has no V scale to set."""
    folder = make_checkpoint(tmp_path / "ckpt", FP8_SCALES, ct_config(FP8_SCHEME))
    k, v = [2.0 ** -7, 0.5], [0.375, 3.0]
    k8 = load_kv_scales(folder, "nvfp4+k8")
    assert set(k8) == {f"layers.{i}.{t}_scale" for i in range(2) for t in "kv"}
    for i in range(2):
        assert torch.equal(k8[f"layers.{i}.k_scale"], as_float32(k[i]))
        assert torch.equal(k8[f"layers.{i}.v_scale"], as_float32(v[i] * FP8_BOUND / NVFP4_BOUND))
    nvfp4 = load_kv_scales(folder, "nvfp4")
    assert all(torch.equal(nvfp4[f"layers.{i}.k_scale"], as_float32(k[i] / 6)) for i in range(2))
    assert load_kv_scales(folder, "blockfp4+k8") == {f"layers.{i}.k_scale": as_float32(k[i]) for i in range(2)}
    assert all(t.dtype == torch.float32 and t.shape == (1,) for t in k8.values())


def test_a_modelopt_nvfp4_checkpoint_with_projection_names(tmp_path):
    """ModelOpt names its NVFP4 KV scales on k_proj / v_proj and its format in hf_quant_config.json;
    its scales (amax / (448 * 6)) are NVFP4's global scales as they are, and * 6 for FP8 keys."""
    scales = {f"model.layers.{i}.self_attn.{p}_proj.{p}_scale": torch.tensor([0.01 * (i + 1) + (p == "v")])
              for i in range(2) for p in "kv"}
    folder = make_checkpoint(tmp_path / "ckpt", scales, {"quant_method": "modelopt"})
    (folder / "hf_quant_config.json").write_text(json.dumps({"quantization": {"kv_cache_quant_algo": "NVFP4"}}))
    nvfp4 = load_kv_scales(folder, "nvfp4")
    for i in range(2):
        assert torch.equal(nvfp4[f"layers.{i}.k_scale"], torch.tensor([0.01 * (i + 1)]))
        assert torch.equal(nvfp4[f"layers.{i}.v_scale"], torch.tensor([0.01 * (i + 1) + 1]))
    k8 = load_kv_scales(folder, "nvfp4+k8")
    torch.testing.assert_close(k8["layers.1.k_scale"], torch.tensor([0.02 * 6]), rtol=1e-7, atol=0)


def test_compressed_tensors_nvfp4_global_scales_are_the_reciprocal(tmp_path):
    """compressed-tensors' own NVFP4 (tensor_group) keeps k_global_scale = 448 * 6 / amax."""
    amax = {"k": 3.5, "v": 120.0}
    scales = {f"model.layers.{i}.self_attn.{t}_global_scale": torch.tensor([NVFP4_BOUND / amax[t]])
              for i in range(2) for t in "kv"}
    folder = make_checkpoint(tmp_path / "ckpt", scales, ct_config(CT_NVFP4_SCHEME))
    state = load_kv_scales(folder, "nvfp4")
    for i in range(2):
        for t in "kv":
            expected = 1 / float(torch.tensor(NVFP4_BOUND / amax[t]))  # the stored float32, inverted
            assert torch.equal(state[f"layers.{i}.{t}_scale"], as_float32(expected))


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(min_value=2.0 ** -100, max_value=2.0 ** 100, width=32), fp8=st.booleans(),
       recipe=st.sampled_from(["nvfp4", "nvfp4+k8", "mxfp4+k8"]))
def test_any_positive_scale_keeps_its_amax(tmp_path_factory, scale, fp8, recipe):
    folder = tmp_path_factory.mktemp("ckpt")
    stored = {f"model.layers.0.self_attn.{t}_scale": torch.tensor([scale]) for t in "kv"}
    make_checkpoint(folder, stored, ct_config(FP8_SCHEME if fp8 else NVFP4_SCHEME), layers=1)
    bound = FP8_BOUND if fp8 else NVFP4_BOUND
    state = load_kv_scales(folder, recipe)
    recipe_bounds = {"k": FP8_BOUND if recipe.endswith("+k8") else NVFP4_BOUND, "v": NVFP4_BOUND}
    for t, value in state.items():
        expected = as_float32(float(torch.tensor(scale)) * bound / recipe_bounds[t.split(".")[-1][0]])
        assert torch.equal(value, expected), (t, value, expected)


def test_layers_chooses_which_must_have_scales(tmp_path):
    scales = {f"model.layers.{i}.self_attn.{t}_scale": torch.tensor([0.5 + i]) for i in range(3) for t in "kv"}
    folder = make_checkpoint(tmp_path / "ckpt", scales, ct_config(NVFP4_SCHEME), layers=2)  # layer 2: a draft head
    assert sorted(load_kv_scales(folder, "nvfp4")) == [f"layers.{i}.{t}_scale" for i in range(2) for t in "kv"]
    assert load_kv_scales(folder, "nvfp4", layers=[2]) == {"layers.2.k_scale": torch.tensor([2.5]),
                                                          "layers.2.v_scale": torch.tensor([2.5])}
    with pytest.raises(TypeError, match="layers must hold ints >= 0"):
        load_kv_scales(folder, "nvfp4", layers=[-1])


def _with(**changes):
    scales = dict(FP8_SCALES)
    scales.update(changes)
    return {name: value for name, value in scales.items() if value is not None}


# (case id, the checkpoint's scale tensors, its quantization config, recipe, error, message)
BAD_CHECKPOINTS = [
    ("missing v_scale", _with(**{"model.layers.1.self_attn.v_scale": None}), ct_config(FP8_SCHEME), "nvfp4",
     ValueError, r"no v_scale for layer 1 \(its v_scale tensors cover layers \[0\]\)"),
    ("nan", _with(**{"model.layers.1.self_attn.k_scale": torch.tensor([math.nan])}), ct_config(FP8_SCHEME), "nvfp4",
     ValueError, r"model\.layers\.1\.self_attn\.k_scale is nan: a scale must be finite and > 0"),
    ("inf", _with(**{"model.layers.0.self_attn.v_scale": torch.tensor([math.inf])}), ct_config(FP8_SCHEME), "nvfp4",
     ValueError, r"v_scale is inf"),
    ("zero", _with(**{"model.layers.0.self_attn.k_scale": torch.zeros(1)}), ct_config(FP8_SCHEME), "nvfp4+k8",
     ValueError, r"layers\.0\.self_attn\.k_scale is 0\.0"),
    ("negative", _with(**{"model.layers.0.self_attn.k_scale": -torch.ones(1)}), ct_config(FP8_SCHEME), "nvfp4",
     ValueError, r"k_scale is -1\.0"),
    ("per head", _with(**{"model.layers.1.self_attn.v_scale": torch.ones(2, 1, 1)}), ct_config(FP8_SCHEME), "nvfp4",
     ValueError, r"model\.layers\.1\.self_attn\.v_scale has shape \(2, 1, 1\): one scale per head"),
    ("integer", _with(**{"model.layers.0.self_attn.k_scale": torch.ones(1, dtype=torch.int32)}), ct_config(FP8_SCHEME),
     "nvfp4", ValueError, r"k_scale must be a floating-point scale, got dtype torch\.int32"),
    ("two towers", _with(**{"model.vision.layers.0.self_attn.k_scale": torch.ones(1)}), ct_config(FP8_SCHEME),
     "nvfp4", ValueError, r"two k_scale tensors for layer 0"),
    ("per-head scheme", FP8_SCALES, ct_config({**FP8_SCHEME, "strategy": "attn_head"}), "nvfp4", ValueError,
     r"is not supported: \(type, num_bits, strategy, dynamic\)"),
    ("dynamic scheme", FP8_SCALES, ct_config({**FP8_SCHEME, "dynamic": True}), "nvfp4", ValueError, "not supported"),
    ("int8 scheme", FP8_SCALES, ct_config({**FP8_SCHEME, "type": "int"}), "nvfp4", ValueError, "not supported"),
    ("asymmetric", FP8_SCALES, ct_config({**FP8_SCHEME, "symmetric": False}), "nvfp4", ValueError, "asymmetric"),
    ("group 32", FP8_SCALES, ct_config({**CT_NVFP4_SCHEME, "group_size": 32}), "nvfp4", ValueError,
     "NVFP4 groups are 16 elements"),
    ("modelopt affine", FP8_SCALES, {"quant_method": "modelopt", "kv_cache_quant_algo": "NVFP4_AFFINE"}, "nvfp4",
     ValueError, r"kv_cache_quant_algo 'NVFP4_AFFINE' is not one of \['FP8', 'NVFP4'\]"),
    ("no format", FP8_SCALES, None, "nvfp4", ValueError, "names no KV cache format .*; pass scales_format"),
    ("blockfp4", FP8_SCALES, ct_config(FP8_SCHEME), "blockfp4", ValueError, "'blockfp4' has no global scale"),
    ("mxfp4+sink4", FP8_SCALES, ct_config(FP8_SCHEME), "mxfp4+sink4", ValueError, "has no global scale"),
    ("rotated", FP8_SCALES, ct_config(FP8_SCHEME), "nvfp4+rot", ValueError, r"\+rot / \+smooth store transformed"),
    ("smoothed", FP8_SCALES, ct_config(FP8_SCHEME), "nvfp4+smooth+k8", ValueError, r"\+rot / \+smooth"),
]


@pytest.mark.parametrize("scales, quant_config, recipe, error, message", [c[1:] for c in BAD_CHECKPOINTS],
                         ids=[c[0] for c in BAD_CHECKPOINTS])
def test_a_checkpoint_that_does_not_fit_is_an_error_naming_it(tmp_path, scales, quant_config, recipe, error, message):
    folder = make_checkpoint(tmp_path / "ckpt", scales, quant_config)
    with pytest.raises(error, match=message):
        load_kv_scales(folder, recipe)


def test_bad_sources_and_formats(tmp_path):
    with pytest.raises(TypeError, match="source must be a checkpoint folder or an nn.Module, got int"):
        load_kv_scales(3)
    with pytest.raises(ValueError, match="config.json does not exist"):
        load_kv_scales(tmp_path)
    folder = make_checkpoint(tmp_path / "ckpt", FP8_SCALES)
    with pytest.raises(ValueError, match=r"scales_format must be one of \['fp8_e4m3', 'nvfp4'\], got 'mxfp4'"):
        load_kv_scales(folder, scales_format="mxfp4")
    assert torch.equal(load_kv_scales(folder, "nvfp4+k8", scales_format="fp8_e4m3")["layers.1.k_scale"],
                       torch.tensor([0.5]))


# ---- a loaded model's modules ----------------------------------------------------------------------


class _Attention(torch.nn.Module):
    def __init__(self, k_scale, v_scale):
        super().__init__()
        self.k_proj = torch.nn.Linear(2, 2)
        self.register_buffer("k_scale", torch.tensor([k_scale]))
        self.v_scale = v_scale  # engines keep some as Python floats


def _model(layers=2, config=None):
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(layers))
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = _Attention(0.25 * (i + 1), 0.5 * (i + 1))
    if config is not None:
        model.config = config
    return model


def test_a_models_modules_hold_the_scales():
    model = _model(config={"num_hidden_layers": 2, "quantization_config": ct_config(FP8_SCHEME)})
    state = load_kv_scales(model, "nvfp4+k8")
    assert state == {"layers.0.k_scale": torch.tensor([0.25]), "layers.0.v_scale": as_float32(0.5 / 6),
                     "layers.1.k_scale": torch.tensor([0.5]), "layers.1.v_scale": as_float32(1.0 / 6)}
    bare = _model()
    with pytest.raises(ValueError, match="names no KV cache format"):
        load_kv_scales(bare, "nvfp4")
    with pytest.raises(ValueError, match="names no num_hidden_layers; pass layers"):
        load_kv_scales(bare, "nvfp4", scales_format="nvfp4")
    assert load_kv_scales(bare, "nvfp4", scales_format="nvfp4", layers=range(2))["layers.1.v_scale"].item() == 1.0
    bare.model.layers[1].self_attn.v_scale = None  # SGLang's attention keeps None where the checkpoint had none
    with pytest.raises(ValueError, match=r"no v_scale for layer 1"):
        load_kv_scales(bare, "nvfp4", scales_format="nvfp4", layers=range(2))


# ---- hf.calibrate -> a checkpoint -> every consumer --------------------------------------------------


@pytest.fixture
def tiny_model():
    pytest.importorskip("transformers")
    from torch_fp4kv import models

    return models.random_model(models.tiny_config("smollm2"))


def _calib_ids():
    return torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("sharded", [False, True], ids=["one file", "sharded with index"])
def test_calibrate_save_load_round_trip_reaches_every_consumer(tiny_model, tmp_path, sharded):
    from torch_fp4kv.hf import FP4Cache, cache_argument, calibrate

    tiny_model.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    state = calibrate(tiny_model, _calib_ids(), "nvfp4")
    path = save_kv_scales(state, "nvfp4", tmp_path)
    assert path == tmp_path / SCALES_FILE
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"] == NVFP4_SCHEME
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    if sharded:
        weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
        assert weight_map["model.layers.1.self_attn.v_scale"] == SCALES_FILE
    loaded = load_kv_scales(tmp_path, "nvfp4")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[key], state[key]) for key in state)

    method = torch_fp4kv.get_fp4_kv_cache_quant_method("nvfp4")
    method.create_buffers(8, 1, 64, 2, "cpu")
    assert method.load_scales_from_model(loaded) == 2
    assert torch.equal(method.global_scales(1)[1], state["layers.1.v_scale"])
    port = NVFP4KVMethod(num_layers=2, device="cpu")
    port.load_scales_from_model(loaded)
    assert torch.equal(port.k_scales_gpu, torch.cat([state["layers.0.k_scale"], state["layers.1.k_scale"]]))
    tiny_model.set_attn_implementation("fp4kv")
    cache = FP4Cache(tiny_model.config, max_cache_len=16, recipe="nvfp4", calibration=loaded)
    tiny_model(torch.tensor([[5, 6, 7]]), **{cache_argument(tiny_model): cache})
    assert torch.equal(cache.layers[0].fp4.k_global_scale, state["layers.0.k_scale"])
    save_kv_scales(state, "nvfp4", tmp_path)  # a second save replaces the first
    assert all(torch.equal(a, b) for a, b in zip(load_kv_scales(tmp_path, "nvfp4").values(), loaded.values()))


_GOOD = {f"layers.{i}.{t}_scale": torch.tensor([0.01 * (i + 1)]) for i in range(2) for t in "kv"}


@pytest.mark.parametrize("recipe, calibration, message", [
    ("nvfp4", {k: v for k, v in _GOOD.items() if k.startswith("layers.0.")},
     r"k_scale found for layers \[0\] but not for layer 1"),
    ("nvfp4", {**_GOOD, "layers.2.k_scale": 1.0, "layers.2.v_scale": 1.0}, r"k_scale found for layer 2, but the cache"),
    ("nvfp4", {**_GOOD, "layers.1.v_scale": float("nan")}, "layer 1's v_scale is nan"),
    ("nvfp4", {**_GOOD, "layers.1.k_scale": 0.0}, "layer 1's k_scale is 0.0"),
    ("nvfp4", {**_GOOD, "layers.1.v_scale": torch.ones(2)}, "layer 1's v_scale must have one element"),
    ("nvfp4+smooth", {**_GOOD, "layers.0.k_mean": torch.zeros(3, 64)}, r"k_mean found for layers \[0\] but not for layer 1"),
], ids=["a layer missing", "a layer too many", "nan", "zero", "per-head", "a K mean missing"])
def test_fp4cache_checks_its_calibration_when_created(tiny_model, recipe, calibration, message):
    """A calibration that does not fit the model is an error naming the layer when the cache is
    made, before the first generate() allocates and loads it; never a silent default."""
    from torch_fp4kv.hf import FP4Cache

    assert tiny_model.config.num_hidden_layers == 2
    tiny_model.set_attn_implementation("fp4kv")
    with pytest.raises(ValueError, match=message):
        FP4Cache(tiny_model.config, max_cache_len=16, recipe=recipe, calibration=calibration)
    FP4Cache(tiny_model.config, max_cache_len=16, recipe="blockfp4", calibration=calibration)  # it keeps none of them


def test_fp4cache_names_the_layer_whose_k_mean_does_not_fit(tiny_model):
    from torch_fp4kv.hf import FP4Cache, cache_argument

    tiny_model.set_attn_implementation("fp4kv")
    heads, dim = tiny_model.config.num_key_value_heads, tiny_model.config.head_dim
    state = {**_GOOD, "layers.0.k_mean": torch.zeros(heads, dim), "layers.1.k_mean": torch.zeros(heads + 1, dim)}
    cache = FP4Cache(tiny_model.config, max_cache_len=16, recipe="nvfp4+smooth", calibration=state)
    with pytest.raises(ValueError, match=r"layer 1's k_mean must have shape"):
        tiny_model(torch.tensor([[5, 6, 7]]), **{cache_argument(tiny_model): cache})


def test_k8_calibration_saves_in_the_format_chosen(tiny_model, tmp_path):
    from torch_fp4kv.hf import calibrate

    tiny_model.save_pretrained(tmp_path)
    state = calibrate(tiny_model, _calib_ids(), "nvfp4+k8")
    with pytest.raises(ValueError, match="keeps K in fp8_e4m3 and V in nvfp4; pass scales_format"):
        save_kv_scales(state, "nvfp4+k8", tmp_path)
    assert not (tmp_path / SCALES_FILE).exists()
    save_kv_scales(state, "nvfp4+k8", tmp_path, scales_format="fp8_e4m3")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"] == FP8_SCHEME
    loaded = load_kv_scales(tmp_path, "nvfp4+k8")
    for key, value in state.items():
        if key.endswith("k_scale"):
            assert torch.equal(loaded[key], value)  # FP8 keys: the checkpoint's own format
        else:
            torch.testing.assert_close(loaded[key], value, rtol=2e-7, atol=0)  # * 6 then / 6, rounded to float32


def _snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", ["blockfp4", "mxfp4+k8", "missing layer", "extra layer", "nan", "other quant method",
                                  "no attention names", "scales already there", "bad format"])
def test_save_checks_everything_before_writing(tiny_model, tmp_path, case):
    from torch_fp4kv.hf import calibrate

    tiny_model.save_pretrained(tmp_path)
    recipe, state, kwargs = "nvfp4", calibrate(tiny_model, _calib_ids(), "nvfp4"), {}
    expected = {"blockfp4": "'blockfp4' has no global scale", "mxfp4+k8": "keeps V in mxfp4, which has no global scale",
                "missing layer": r"v_scale for layers \[0\]; the model's config has layers \[0, 1\]",
                "extra layer": r"k_scale for layers \[0, 1, 2\]", "nan": r"layers\.1\.k_scale is nan",
                "other quant method": "quantization_config is 'gptq'", "no attention names": "no k_proj / qkv_proj tensor",
                "scales already there": "model.safetensors already holds KV scales",
                "bad format": "scales_format must be one of"}[case]
    if case in ("blockfp4", "mxfp4+k8"):
        recipe = case
    elif case == "missing layer":
        del state["layers.1.v_scale"]
    elif case == "extra layer":
        state["layers.2.k_scale"] = torch.ones(1)
    elif case == "nan":
        state["layers.1.k_scale"] = torch.tensor([math.nan])
    elif case == "other quant method":
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    elif case == "no attention names":
        write_safetensors(tmp_path / "model.safetensors", {"lm_head.weight": torch.ones(2)})
    elif case == "scales already there":
        write_safetensors(tmp_path / "model.safetensors", {"model.layers.0.self_attn.k_scale": torch.ones(1)})
    else:
        kwargs = {"scales_format": "blockfp4"}
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=expected):
        save_kv_scales(state, recipe, tmp_path, **kwargs)
    assert _snapshot(tmp_path) == before


# ---- compressed-tensors itself -------------------------------------------------------------------


@pytest.fixture
def compressed_tensors():
    return pytest.importorskip("compressed_tensors")


def _ct_checkpoint(model, folder, args, base_name_values):
    """Register KV qparams on every attention module with compressed-tensors' own
    initialize_qparams, set them, save the model (transformers writes the safetensors) and let
    compressed-tensors' ModelCompressor write config.json's quantization_config, as llm-compressor
    does. (Its attention hook cannot calibrate transformers >= 5.24 models, whose attention
    forward names the cache `cache`, so the values are set here with its own scale math.)"""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams

    text = model.config.get_text_config(decoder=True)
    for i, layer in enumerate(model.model.layers):
        for base_name, value in base_name_values(i).items():
            initialize_qparams(layer.self_attn, base_name, args, observed_shape=(text.num_key_value_heads, None,
                                                                                 text.head_dim),
                               observed_dtype=torch.float32, force_zero_point=False)
            for suffix in ("scale", "global_scale"):
                param = getattr(layer.self_attn, f"{base_name}_{suffix}", None)
                if param is not None:
                    param.data.copy_(value[suffix])
    model.save_pretrained(folder)
    config = QuantizationConfig(config_groups={}, kv_cache_scheme=args, quantization_status="compressed")
    ModelCompressor(quantization_config=config).update_config(str(folder))


def _amax(layer, tensor):
    return torch.tensor([1.5 + layer + 10 * (tensor == "v")])


def test_compressed_tensors_fp8_checkpoint(compressed_tensors, tiny_model, tmp_path):
    """compressed-tensors' FP8 KV scale of amax a is a / 448, this library's FP8 calibration of the
    same amax (formats' calibration_amax): it loads as +k8's K scale bit for bit, and / 6 for NVFP4."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)

    def values(layer):
        return {t: {"scale": calculate_qparams(-_amax(layer, t), _amax(layer, t), args)[0]} for t in "kv"}

    assert torch.equal(values(0)["k"]["scale"], _amax(0, "k") / torch_fp4kv.ops.FP8_E4M3.calibration_amax)
    _ct_checkpoint(tiny_model, tmp_path, args, values)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"]["num_bits"] == 8 and config["quant_method"] == "compressed-tensors"
    k8, nvfp4 = load_kv_scales(tmp_path, "nvfp4+k8"), load_kv_scales(tmp_path, "nvfp4")
    for i in range(2):
        assert torch.equal(k8[f"layers.{i}.k_scale"], values(i)["k"]["scale"])
        for t in "kv":
            torch.testing.assert_close(nvfp4[f"layers.{i}.{t}_scale"], _amax(i, t) / NVFP4_BOUND, rtol=2e-7, atol=0)
    # the model itself: compressed-tensors registered the scales on its attention modules
    tiny_model.config.quantization_config = config
    from_model = load_kv_scales(tiny_model, "nvfp4+k8")
    assert from_model.keys() == k8.keys() and all(torch.equal(from_model[key], k8[key]) for key in k8)


def test_compressed_tensors_nvfp4_checkpoint(compressed_tensors, tiny_model, tmp_path):
    """compressed-tensors' NVFP4 KV (tensor_group, group 16) keeps a global scale 448 * 6 / amax
    (generate_gparam); it loads as this library's NVFP4 global scale amax / (448 * 6)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import generate_gparam

    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, dynamic="local",
                            symmetric=True)

    def values(layer):
        return {t: {"global_scale": generate_gparam(-_amax(layer, t), _amax(layer, t))} for t in "kv"}

    _ct_checkpoint(tiny_model, tmp_path, args, values)
    state = load_kv_scales(tmp_path, "nvfp4")
    for i in range(2):
        for t in "kv":
            torch.testing.assert_close(state[f"layers.{i}.{t}_scale"], _amax(i, t) / NVFP4_BOUND, rtol=2e-7, atol=0)


def test_an_exported_checkpoint_is_one_compressed_tensors_and_transformers_read(compressed_tensors, tiny_model,
                                                                                tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    from torch_fp4kv.hf import calibrate

    tiny_model.save_pretrained(tmp_path)
    save_kv_scales(calibrate(tiny_model, _calib_ids(), "nvfp4"), "nvfp4", tmp_path)
    parsed = QuantizationConfig.model_validate(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
    assert (parsed.kv_cache_scheme.num_bits, parsed.kv_cache_scheme.type, parsed.kv_cache_scheme.strategy) == (
        4, "float", "tensor")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = _calib_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, tiny_model(ids).logits)
