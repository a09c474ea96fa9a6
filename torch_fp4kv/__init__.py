"""torch_fp4kv."""
from . import ops
