"""The benchmark behind `python -m torch_fp4kv.bench` (cli.py), one module per op family:
quantize.py (quantize, dequantize, quantize_and_store, gather_dequantize), decode.py
(decode_attention), extend.py (extend_attention); common.py holds the timer and what they share."""

from .cli import main
from .common import copy_bandwidth, timer
from .decode import MODEL_SHAPES, DecodeRow, DecodeShape, run_decode
from .extend import ExtendRow, run_extend
from .quantize import Row, make_row, run

__all__ = ["MODEL_SHAPES", "DecodeRow", "DecodeShape", "ExtendRow", "Row", "copy_bandwidth", "main", "make_row", "run",
           "run_decode", "run_extend", "timer"]
