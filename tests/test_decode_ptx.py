"""The decode kernel's inline PTX, run by a small model of the instructions it uses.

CI has no GPU, so this is where the PTX's bit logic is checked on every run: every byte value
in every position of the word must come out as its two E2M1 values times its own byte's scale,
with the sign of zero kept. (On the H100 the GPU tests compare the whole kernel with eager.)
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


def _halves(word: int, float_type) -> np.ndarray:
    bits = np.array([word & 0xFFFF, word >> 16], dtype=np.uint16)
    return bits.view(np.float16) if float_type is np.float16 else (bits.astype(np.uint32) << 16).view(np.float32)


def _word(values: np.ndarray, float_type) -> int:
    if float_type is np.float16:
        bits = values.astype(np.float16).view(np.uint16).astype(np.uint32)
    else:  # bf16: the top half of a float32 (the products here are exact)
        bits = values.astype(np.float32).view(np.uint32) >> 16
    return int(bits[0]) | (int(bits[1]) << 16)


def run_ptx(ptx: str, operands: dict[str, int], float_type) -> dict[str, int]:
    """Executes the PTX on 32-bit words; the packed multiplies run in numpy, per 16-bit half."""
    regs = dict(operands)
    for line in ptx.strip("{}\n").splitlines():
        line = line.strip().rstrip(";")
        if line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dest, *names = [a.strip() for a in rest.split(",")]
        args = [int(n, 0) if n[0].isdigit() else regs[n] for n in names]
        if op in ("mul.rn.f16x2", "fma.rn.bf16x2"):
            product = _halves(args[0], float_type) * _halves(args[1], float_type)
            if op.startswith("fma"):
                product = product + _halves(args[2], float_type)
            regs[dest] = _word(product, float_type)
            continue
        regs[dest] = {
            "and.b32": lambda x, y: x & y,
            "shr.u32": lambda x, y: x >> y,
            "shl.b32": lambda x, y: (x << y) & MASK,
            "mov.b32": lambda x: x,
            "prmt.b32": _prmt,
            "lop3.b32": _lop3,
        }[op](*args)
    return regs


def _e2m1(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1_VALUES[code & 7]


FORMATS = {
    "fp16 (nvfp4)": (triton_decode._NVFP4_DECODE_PTX.value, np.float16),
    "bf16 (E8M0 scales)": (triton_decode._E8M0_DECODE_PTX.value, np.float32),
}
# A different power of two per byte: each value must be multiplied by its own byte's scale.
SCALES = np.array([2.0, 0.25, 4.0, 0.5])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_byte_in_every_position_decodes_to_its_scaled_e2m1_pair(fmt):
    ptx, float_type = FORMATS[fmt]
    rng = np.random.default_rng(0)
    scale_words = {"$5": _word(SCALES[:2], float_type), "$6": _word(SCALES[2:], float_type)}
    for position in range(4):
        for byte in range(256):
            word = int(rng.integers(0, 2**32)) & ~(0xFF << (8 * position)) | (byte << (8 * position))
            regs = run_ptx(ptx, {"$4": word, **scale_words}, float_type)
            word_bytes = [(word >> (8 * i)) & 0xFF for i in range(4)]
            # $0/$1: low nibbles of bytes (0, 1)/(2, 3); $2/$3: their high nibbles.
            for out, (first, shift) in {"$0": (0, 0), "$1": (2, 0), "$2": (0, 4), "$3": (2, 4)}.items():
                got = _halves(regs[out], float_type)
                codes = [(word_bytes[first + k] >> shift) & 0xF for k in range(2)]
                want = [_e2m1(c) * SCALES[first + k] for k, c in enumerate(codes)]
                assert [float(g) for g in got] == want
                assert [bool(np.signbit(g)) for g in got] == [bool(c & 8) for c in codes]  # -0 kept
