"""The decode kernel's inline PTX, run by a small model of the instructions it uses.

CI has no GPU, so this is where the PTX's bit logic is checked on every run: every byte value
in every position of the word must come out as its two E2M1 values, each multiplied by the scale
operand of its own byte pair. (On the H100 the GPU tests compare the whole kernel with eager.)
"""

from __future__ import annotations

import numpy as np
import pytest

from torch_fp4kv.ops import triton_decode
from torch_fp4kv.ops.formats import E2M1_VALUES

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, selector: int) -> int:
    source = (b << 32) | a
    out = 0
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = (source >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:  # sign-replicate mode, which the PTX must not use
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    return sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i for i in range(32))


def run_ptx(ptx: str, operands: dict[str, int]) -> dict[str, tuple[int, str]]:
    """Integer instructions are executed; each multiply's output is (value word, scale operand)."""
    regs = dict(operands)
    products = {}
    for line in ptx.strip("{}\n").splitlines():
        line = line.strip().rstrip(";")
        if line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dest, *names = [a.strip() for a in rest.split(",")]
        if op in ("mul.rn.f16x2", "fma.rn.bf16x2"):
            products[dest] = (regs[names[0]], names[1])
            continue
        args = [int(n, 0) if n[0].isdigit() else regs[n] for n in names]
        regs[dest] = {
            "and.b32": lambda x, y: x & y,
            "shr.u32": lambda x, y: x >> y,
            "shl.b32": lambda x, y: (x << y) & MASK,
            "mov.b32": lambda x: x,
            "prmt.b32": _prmt,
            "lop3.b32": _lop3,
        }[op](*args)
    return products


def _e2m1(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1_VALUES[code & 7]


FORMATS = {
    "fp16 (nvfp4)": (triton_decode._NVFP4_DECODE_PTX.value, np.float16, lambda h: h),
    "bf16 (E8M0 scales)": (triton_decode._E8M0_DECODE_PTX.value, np.float32, lambda h: h << 16),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_byte_in_every_position_decodes_to_its_e2m1_pair(fmt):
    ptx, float_type, to_bits = FORMATS[fmt]
    bits_type = np.uint16 if float_type is np.float16 else np.uint32
    rng = np.random.default_rng(0)
    for position in range(4):
        for byte in range(256):
            word = int(rng.integers(0, 2**32)) & ~(0xFF << (8 * position)) | (byte << (8 * position))
            products = run_ptx(ptx, {"$4": word, "$5": 0, "$6": 0})
            word_bytes = [(word >> (8 * i)) & 0xFF for i in range(4)]
            # $0/$1: low nibbles of bytes (0, 1)/(2, 3); $2/$3: high nibbles; scale pairs $5 (bytes 0, 1), $6.
            for out, (first, shift, scale) in {"$0": (0, 0, "$5"), "$1": (2, 0, "$6"),
                                               "$2": (0, 4, "$5"), "$3": (2, 4, "$6")}.items():
                value, scale_operand = products[out]
                codes = [(word_bytes[first + k] >> shift) & 0xF for k in range(2)]
                halves = np.array([to_bits(value & 0xFFFF), to_bits(value >> 16)], dtype=bits_type).view(float_type)
                assert scale_operand == scale
                assert [float(h) for h in halves] == [_e2m1(c) for c in codes]
                assert [bool(np.signbit(h)) for h in halves] == [bool(c & 8) for c in codes]  # -0 kept
