"""KVCacheOptions: the one grammar that spells a cache's options after its recipe, and the object
every module passes around (methods, FP4KVPool, FP4Cache, the eval)."""

import pytest

from torch_fp4kv import KVCacheOptions

# Every cache string the eval, the README and the tests use.
EVAL_STRINGS = [
    "nvfp4", "blockfp4", "mxfp4", "nvfp4+rot", "nvfp4+smooth", "nvfp4+k8", "blockfp4+k8", "mxfp4+k8",
    "nvfp4+rot+smooth", "nvfp4+rot+k8", "nvfp4+smooth+k8", "nvfp4+rot+smooth+k8", "nvfp4+sink4", "mxfp4+recent8",
    "nvfp4+sink4+recent128", "nvfp4+sink2+recent24", "nvfp4+rot+sink4", "nvfp4+rot+smooth+sink4",
    "nvfp4+rot+smooth+recent128", "nvfp4+rot+smooth+sink2+recent5", "nvfp4+rot+smooth+sink4+recent128",
    "nvfp4+rot+smooth+sink4+recent188", "nvfp4+rot+smooth+k8+sink4+recent128", "nvfp4+smooth+chscale",
    "nvfp4_4over6+rot+smooth+chscale", "nvfp4+rot+smooth+chscale+k8+sink4+recent128",
]


@pytest.mark.parametrize("spelling", EVAL_STRINGS)
def test_every_eval_string_round_trips(spelling):
    method, options = KVCacheOptions.parse(spelling)
    assert options.spell(method) == spelling == method + str(options)
    assert KVCacheOptions.parse(options.spell(method)) == (method, options)


def test_parse_fills_every_field_and_any_order_spells_the_same():
    method, options = KVCacheOptions.parse("nvfp4+recent128+k8+sink4+smooth+rot")
    assert method == "nvfp4"
    assert options == KVCacheOptions(rotate=True, smooth_k=True, k_fp8=True, sink_tokens=4, recent_tokens=128)
    assert options.spell(method) == "nvfp4+rot+smooth+k8+sink4+recent128"
    assert KVCacheOptions.parse("mxfp4") == ("mxfp4", KVCacheOptions())
    assert str(KVCacheOptions()) == ""


@pytest.mark.parametrize("bad, message", [
    ("nvfp4+rotate", r"\+rotate is not an option"),
    ("nvfp4+rot+rot", r"spells \+rot twice"),
    ("nvfp4+sink4+sink2", r"spells \+sink2 twice \(sink_tokens\)"),
    ("nvfp4+sink0", r"\+sink0 is not an option"),
    ("nvfp4+sink", r"\+sink is not an option"),
    ("nvfp4+recentx", r"\+recentx is not an option"),
    ("nvfp4+", r"\+ is not an option"),
    ("+rot", "names no method"),
])
def test_parse_rejects_bad_spellings_naming_the_suffix(bad, message):
    with pytest.raises(ValueError, match=message):
        KVCacheOptions.parse(bad)


def test_fields_are_checked_and_frozen():
    with pytest.raises(TypeError, match="rotate must be a bool, got 'yes'"):
        KVCacheOptions(rotate="yes")
    with pytest.raises(ValueError, match="sink_tokens must be an int >= 0, got -1"):
        KVCacheOptions(sink_tokens=-1)
    with pytest.raises(ValueError, match="recent_tokens must be an int >= 0, got 2.0"):
        KVCacheOptions(recent_tokens=2.0)
    with pytest.raises(TypeError, match="recipe must be a str"):
        KVCacheOptions.parse(None)
    with pytest.raises(AttributeError):
        KVCacheOptions().rotate = True


def test_keywords_merge_with_the_spelling_and_contradictions_are_refused():
    assert KVCacheOptions.resolve("nvfp4+rot", smooth_k=True, rotate=None) == (
        "nvfp4", KVCacheOptions(rotate=True, smooth_k=True))
    assert KVCacheOptions.resolve("nvfp4+rot", rotate=True)[1] == KVCacheOptions(rotate=True)
    assert KVCacheOptions.resolve("nvfp4", rotate=False)[1] == KVCacheOptions()
    with pytest.raises(ValueError, match=r"rotate=False contradicts the recipe's \+rot"):
        KVCacheOptions.resolve("nvfp4+rot", rotate=False)
    with pytest.raises(ValueError, match=r"sink_tokens=2 contradicts the recipe's \+sink4"):
        KVCacheOptions.resolve("nvfp4+sink4", sink_tokens=2)
    with pytest.raises(TypeError, match="unexpected option 'rotation'"):
        KVCacheOptions().merged(rotation=True)


def test_derived_names_and_parts():
    options = KVCacheOptions(rotate=True, k_fp8=True, recent_tokens=8)
    assert options.kv_recipe("nvfp4") == "nvfp4+k8" and KVCacheOptions().kv_recipe("mxfp4") == "mxfp4"
    assert options.full_precision and not KVCacheOptions(rotate=True).full_precision
    assert options.method_options == KVCacheOptions(rotate=True, k_fp8=True)
