"""FP4 KV cache for Hugging Face transformers models (needs `pip install -e ".[models]"`).

Importing this package registers the "fp4kv" attention implementation. Then:

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fp4kv")
    cache = FP4Cache(model.config, max_cache_len=1024, recipe="nvfp4")  # or "nvfp4+rot+smooth+sink4", ...
    out = model.generate(**inputs, cache=cache, max_new_tokens=64)  # past_key_values= before 5.24

Modules: cache.py (FP4Cache, FP4CacheLayer), attention.py (the "fp4kv" attention),
calibration.py (`calibrate`), simulate.py (`roundtrip_attention`, the eval's cache-free
simulation), positional.py (attention by position).
"""

from ..calibration import layer_calibration
from .attention import fp4kv_attention, register
from .cache import ATTENTION_NAME, FP4Cache, FP4CacheLayer, FP4KVChunk, cache_argument, kv_cache_bytes
from .calibration import calibrate
from .simulate import roundtrip_attention

register()

__all__ = [
    "ATTENTION_NAME",
    "cache_argument",
    "calibrate",
    "FP4Cache",
    "FP4CacheLayer",
    "FP4KVChunk",
    "fp4kv_attention",
    "kv_cache_bytes",
    "layer_calibration",
    "register",
    "roundtrip_attention",
]
