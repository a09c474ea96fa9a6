"""The kernels' inline PTX, run by a small model of the instructions it uses.

CI has no GPU, so this is where the PTX's bit logic is checked on every run: every byte value
in every position of the word must come out as its two E2M1 values times its own byte's scale,
with the sign of zero kept, and the FP8 output pair must hold each input's E4M3 byte in its own
half. (On the H100 the GPU tests compare the whole kernels with eager.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_fp4kv.ops import triton_codes
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


def _e4m3x2_to_f16x2(pair: int) -> int:
    """cvt.rn.f16x2.e4m3x2: the two E4M3 bytes of a 16-bit value (low byte to the low half), by
    PyTorch's float8 conversion."""
    fp8 = torch.tensor([pair & 0xFF, pair >> 8], dtype=torch.uint8).view(torch.float8_e4m3fn)
    return _word(fp8.to(torch.float32).numpy(), np.float16)


def _f32x2_to_e4m3x2(a: int, b: int) -> int:
    """cvt.rn.satfinite.e4m3x2.f32: float32 bits a to the high byte, b to the low one, rounded to
    nearest even and saturated at +-448 by PyTorch's conversion; NaN to 0x7F (the H100's result)."""
    values = np.array([b, a], dtype=np.uint32).view(np.float32)
    fp8 = torch.from_numpy(np.clip(values, -448.0, 448.0)).to(torch.float8_e4m3fn).view(torch.uint8)
    low, high = torch.where(torch.from_numpy(np.isnan(values)), 0x7F, fp8).tolist()
    return low | (high << 8)


def run_ptx(ptx: str, operands: dict[str, int], float_type=np.float16) -> dict[str, int]:
    """Executes the PTX on 32-bit words; the packed multiplies run in numpy, per 16-bit half."""
    regs = dict(operands)
    for line in ptx.strip("{}\n").splitlines():
        line = line.strip().rstrip(";")
        if line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if rest.startswith("{"):  # mov.b32 {lo, hi}, word: a word's 16-bit halves
            halves, source = rest[1:].split("}")
            lo, hi = [name.strip() for name in halves.split(",")]
            word = regs[source.strip(", ")]
            regs[lo], regs[hi] = word & 0xFFFF, word >> 16
            continue
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
            "or.b32": lambda x, y: x | y,
            "shr.u32": lambda x, y: x >> y,
            "shr.b32": lambda x, y: x >> y,
            "shl.b32": lambda x, y: (x << y) & MASK,
            "cvt.rn.f16x2.e4m3x2": _e4m3x2_to_f16x2,
            "cvt.rn.satfinite.e4m3x2.f32": _f32x2_to_e4m3x2,
            "mov.b32": lambda x: x,
            "prmt.b32": _prmt,
            "lop3.b32": _lop3,
        }[op](*args)
    return regs


def _e2m1(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1_VALUES[code & 7]


def _gluon_nvfp4_ptx() -> str:
    return pytest.importorskip("torch_fp4kv.ops.gluon_tiles").NVFP4_E4M3_DECODE_PTX.value


# name -> (PTX, 16-bit type, what the kernel multiplies the scale by before passing it)
FORMATS = {
    "fp16 (nvfp4)": (lambda: triton_codes._NVFP4_TABLE_DECODE_PTX.value, np.float16, 1.0),
    "bf16 (E8M0 scales)": (lambda: triton_codes.E8M0_DECODE_PTX.value, np.float32, 1.0),
    "fp16 through E4M3 (nvfp4, Gluon)": (_gluon_nvfp4_ptx, np.float16, 64.0),  # the codes come out / 2^6
}
# A different power of two per byte: each value must be multiplied by its own byte's scale.
SCALES = np.array([2.0, 0.25, 4.0, 0.5])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_byte_in_every_position_decodes_to_its_scaled_e2m1_pair(fmt):
    ptx, float_type, scale_factor = FORMATS[fmt]
    ptx = ptx()
    rng = np.random.default_rng(0)
    scales = SCALES * scale_factor
    scale_words = {"$5": _word(scales[:2], float_type), "$6": _word(scales[2:], float_type)}
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


def test_fp8_output_pair_holds_each_input_in_its_own_byte():
    """_E4M3_PAIR_PTX, which writes dequantize's FP8 output: lo must land in the low byte and hi in
    the high one (the conversion itself is modelled by PyTorch's, so what this checks is the
    operand order; the GPU tests compare the bytes with eager)."""
    ptx = triton_codes._E4M3_PAIR_PTX.value
    values = np.array([0.0, -0.0, 1.0, -1.5, 2.0**-10, -(2.0**-9), 0.0703125, 240.0, -448.0, 1e6, np.nan],
                      dtype=np.float32)
    for lo, hi in [(a, b) for a in values for b in values]:
        word = run_ptx(ptx, {"$1": int(np.float32(lo).view(np.uint32)), "$2": int(np.float32(hi).view(np.uint32))})["$0"]
        for value, byte in ((lo, word & 0xFF), (hi, word >> 8)):
            want = torch.tensor([value]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).item()
            assert byte == (0x7F if np.isnan(value) else want), (value, hex(byte), hex(want))
