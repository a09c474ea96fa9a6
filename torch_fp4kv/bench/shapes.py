"""The attention shapes the decode and extend rows run at: the Llama-3-8B grid shape, and the model
shapes that --decode-shapes names and an extend case's `@SHAPE` borrows."""

from __future__ import annotations

from typing import NamedTuple


class DecodeShape(NamedTuple):
    """The attention shape of a row: query heads, KV heads, head_dim, page size."""

    hq: int
    hkv: int
    d: int
    page: int

    def __str__(self) -> str:
        return f"{self.hq}/{self.hkv}/{self.d}/p{self.page}"


GRID_SHAPE = DecodeShape(32, 8, 128, 16)  # Llama-3-8B: the --decode-batches x --decode-contexts grid
# Model shapes of the --decode-shapes rows: name -> (shape, batch, context).
MODEL_SHAPES = {
    "llama3-8b": (GRID_SHAPE, 32, 8192),
    "llama3-70b": (DecodeShape(64, 8, 128, 16), 16, 8192),
    "llama2-7b-mha": (DecodeShape(32, 32, 128, 16), 8, 32768),
    "mha-page1": (DecodeShape(32, 32, 128, 1), 32, 8192),
    "qwen2.5-7b": (DecodeShape(28, 4, 128, 1), 32, 4096),  # 7 query heads per KV head; page 1 as SGLang's default
    "gemma3": (DecodeShape(4, 1, 256, 16), 32, 8192),
    "smollm2": (DecodeShape(9, 3, 64, 16), 32, 8192),
    "llama3-8b-128k": (GRID_SHAPE, 1, 131072),
}


def shape_label(name: str | None) -> str:
    """How a row names its shape: the MODEL_SHAPES name, or the grid shape's numbers (None)."""
    return name if name is not None else str(GRID_SHAPE)


def attention_shape(name: str | None) -> DecodeShape:
    """The heads and page size of a MODEL_SHAPES name; the grid shape for None."""
    return MODEL_SHAPES[name][0] if name is not None else GRID_SHAPE
