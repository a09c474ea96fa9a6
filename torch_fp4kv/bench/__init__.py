"""The benchmark behind `python -m torch_fp4kv.bench` (cli.py), one module per family: quantize.py
(quantize, dequantize, quantize_and_store, gather_dequantize), decode.py (decode_attention),
extend.py (extend_attention), e2e.py (whole model steps, on the cache kinds of step_caches.py),
mla.py (mla_decode_attention); shapes.py holds the attention shapes rows run at, common.py the
timer and what they share."""

from .cli import main
from .common import copy_bandwidth, timer
from .decode import DecodeRow, run_decode
from .e2e import E2ERow, run_e2e
from .extend import ExtendCase, ExtendRow, run_extend
from .mla import MLACase, MLARow, run_mla
from .quantize import Row, make_row, run
from .shapes import MODEL_SHAPES, DecodeShape

__all__ = ["MODEL_SHAPES", "DecodeRow", "DecodeShape", "E2ERow", "ExtendCase", "ExtendRow", "MLACase", "MLARow", "Row",
           "copy_bandwidth", "main", "make_row", "run", "run_decode", "run_e2e", "run_extend", "run_mla", "timer"]
