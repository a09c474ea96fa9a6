"""The shortcuts the Triton quantize kernel takes to E2M1 codes and scale bytes, checked over every
input they can meet: the float adder's rounding in _e2m1_round (eager's rule, comparing with
the thresholds, is the reference), one correction of a * (1 / d) in _rounding_quotient, and
blockfp4's amax * RN(1/6) for amax / 6 (correct rounding is the reference for both)."""

import numpy as np
import pytest
import torch

from conftest import TRITON_DEVICE
from torch_fp4kv.ops import FORMATS, eager
from torch_fp4kv.ops.formats import BLOCKFP4_MIN_SCALE, E2M1_VALUES

triton = pytest.importorskip("triton")
tl = triton.language
from torch_fp4kv.ops import triton_kernels  # noqa: E402


@triton.jit
def _magnitude_kernel(y_ptr, out_ptr, value_ptr, TIES_AWAY: tl.constexpr, AT_MOST_6: tl.constexpr,
                      BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    code, value = triton_kernels._e2m1_round(tl.load(y_ptr + offsets), TIES_AWAY, AT_MOST_6)
    tl.store(out_ptr + offsets, code)
    tl.store(value_ptr + offsets, value)


_BLOCK = 1024 if TRITON_DEVICE == "cuda" else 1 << 20  # the interpreter pays per program
_UNIT_DIVISORS = ((np.arange(1 << 23, dtype=np.int64) + 0x3F800000).astype(np.int32).view(np.float32))  # [1, 2)


def _every_float32(lo: float, hi: float) -> torch.Tensor:
    """Every float32 in [lo, hi), both >= 0."""
    first, last = (int(np.float32(v).view(np.int32)) for v in (lo, hi))
    return torch.arange(first, last, dtype=torch.int32).view(torch.float32)


# The kernel's two uses: ties to even with the clamp (nvfp4, mxfp4), ties away without (blockfp4).
@pytest.mark.parametrize("recipe, at_most_6", [("nvfp4", False), ("blockfp4", True)])
def test_adder_rounding_gives_every_code_of_the_thresholds(recipe, at_most_6):
    """Every float32 from 2^-3 (below, all codes are 0) to 7 (8 without the clamp: MX quotients
    reach just under 8), plus zero, a sample of smaller values and the clamp's NaN and inf."""
    fmt = FORMATS[recipe]
    top = 7.0 if at_most_6 else 8.0
    small = _every_float32(0.0, 0.125)[::4099]
    specials = torch.tensor([] if at_most_6 else [float("inf"), float("nan")])
    y = torch.cat([_every_float32(0.125, top), small, specials])
    y = torch.cat([y, y.new_zeros(-len(y) % _BLOCK)])
    out = torch.empty(y.shape, dtype=torch.int32, device=TRITON_DEVICE)
    value = torch.empty(y.shape, dtype=torch.float32, device=TRITON_DEVICE)
    _magnitude_kernel[(len(y) // _BLOCK,)](y.to(TRITON_DEVICE), out, value, fmt.ties_away, at_most_6, BLOCK=_BLOCK)
    expected = eager._e2m1_magnitude(y.nan_to_num(nan=6.0), fmt).to(torch.int32)
    mismatch = (out.cpu() != expected).nonzero().flatten()
    assert len(mismatch) == 0, f"{len(mismatch)} codes differ, first at y={y[mismatch[:4]].tolist()}"
    # The value beside each code is that code's E2M1 magnitude (what 4/6 compares errors with).
    assert torch.equal(value.cpu(), torch.tensor(E2M1_VALUES)[expected.long()])


# ---- exact numpy models of float32 FMA arithmetic -----------------------------------------------


def _float32_midpoint(s: np.ndarray):
    """For float64 s in float32's normal range: whether it lies halfway between two float32, and
    the float32 just below."""
    bits = s.view(np.int64)
    low = bits & ((1 << 29) - 1)
    return low == (1 << 28), (bits - low).view(np.float64).astype(np.float32)


def _round_to_float32(s: np.ndarray, err: np.ndarray) -> np.ndarray:
    """float32 RN of s + err, where s is a float64 sum and err its exact remainder (TwoSum)."""
    f = s.astype(np.float32)
    midpoint, below = _float32_midpoint(s)
    above = np.nextafter(below, np.float32(np.inf))
    return np.where(midpoint & (err > 0), above, np.where(midpoint & (err < 0), below, f))


def _fma32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """float32 fma(x, y, z) = RN(x*y + z): x*y is exact in float64 (48 bits) and TwoSum gives the
    remainder of adding z."""
    p = x.astype(np.float64) * y.astype(np.float64)
    z = np.broadcast_to(z, p.shape).astype(np.float64)
    s = p + z
    t = s - p
    err = (p - (s - t)) + (z - t)
    return _round_to_float32(s, err)


def _correct_reciprocal(d: np.ndarray) -> np.ndarray:
    """float32 RN(1 / d), deciding the (rare) float64 results that sit on a float32 midpoint."""
    inv = 1.0 / d.astype(np.float64)
    midpoint, below = _float32_midpoint(inv)
    exact_above = (inv * d.astype(np.float64)) < 1.0  # 1/d > midpoint; the product is exact
    return np.where(midpoint, np.where(exact_above, np.nextafter(below, np.float32(np.inf)), below), inv.astype(np.float32))


# ---- _rounding_quotient: one Markstein correction ------------------------------------------------

# The rounding boundaries of the codes the quotients feed (NVFP4's) lie next to values of at most
# 3 significant bits: the E2M1 thresholds 0.25 ... 5. The targets are every significand of at most
# 5 bits (k / 16), a superset. Scaling a by a power of two scales the kernel's arithmetic exactly,
# so one binade of each suffices.
_TARGETS = [np.float32(k / 16) for k in range(16, 32)]


def _rounding_boundaries():
    """(target, boundary, inclusive): the correctly rounded quotient is >= t (inclusive) or > t
    exactly when a / d > boundary, the float32 midpoint below or above t. a / d never equals it:
    a midpoint has 25 significant bits, so boundary * d would need more than float32's 24."""
    for t in _TARGETS:
        below, above = np.nextafter(t, np.float32(0)), np.nextafter(t, np.float32(np.inf))
        yield t, (np.float64(below) + np.float64(t)) / 2, True
        yield t, (np.float64(above) + np.float64(t)) / 2, False


def _wrong_sides(corrections: int, stride: int = 1) -> int:
    """Quotients on the wrong side of a boundary, over every `stride`-th float32 d in [1, 2) and,
    for each boundary, the three float32 a nearest boundary * d (farther ones are a float32 step,
    2^-24 relative, away: far beyond the correction's reach)."""
    wrong = 0
    chunk = 1 << 20
    for start in range(0, 1 << 23, chunk):
        d = _UNIT_DIVISORS[start:start + chunk:stride]
        inverse = _correct_reciprocal(d)
        for t, boundary, inclusive in _rounding_boundaries():
            exact = boundary * d.astype(np.float64)  # 25 x 24 bits: exact
            nearest = exact.astype(np.float32)
            for a in (np.nextafter(nearest, np.float32(0)), nearest, np.nextafter(nearest, np.float32(np.inf))):
                above = a.astype(np.float64) > exact
                q = a * inverse
                for _ in range(corrections):
                    q = _fma32(_fma32(q, -d, a), inverse, q)
                wrong += int((((q >= t) if inclusive else (q > t)) != above).sum())
    return wrong


def test_one_correction_decides_every_boundary_as_correct_rounding():
    """Every float32 divisor in [1, 2): the kernel scales every normal d there (and a with it)."""
    assert _wrong_sides(corrections=1) == 0


def test_the_boundary_check_catches_an_uncorrected_quotient():
    """The check above can fail: without the correction, quotients land on the wrong side."""
    assert _wrong_sides(corrections=0, stride=64) > 0


# ---- blockfp4's scale: amax * RN(1/6) for amax / 6 ---------------------------------------------


def _ceil_rule_byte(v: np.ndarray) -> np.ndarray:
    """eager's E8M0 byte of the ceil rule from the quotient v (float32)."""
    bits = np.maximum(v, np.float32(BLOCKFP4_MIN_SCALE)).view(np.int32)
    return (bits >> 23) + ((bits & 0x7FFFFF) != 0)


def _ceil_rule_mismatches(one_sixth: np.float32) -> int:
    """Bytes from amax * one_sixth that differ from eager's, over every float32 amax in [1, 2) and
    in the binade where amax / 6 crosses the 1e-10 floor. Scaling amax by a power of two scales
    both quotients exactly, so these cover every amax but those whose quotient is subnormal, which
    the floor maps to the same byte anyway, and overflow, which float32 amax / 6 cannot reach."""
    wrong = 0
    for low in (np.float32(1), np.float32(2.0**-31)):
        amax = _every_float32(float(low), float(low) * 2).numpy()
        expected = _ceil_rule_byte(amax / np.float32(6))
        wrong += int((_ceil_rule_byte(amax * one_sixth) != expected).sum())
    return wrong


def test_one_sixth_gives_the_ceil_rule_byte_of_amax_over_6():
    assert _ceil_rule_mismatches(np.float32(1 / 6)) == 0
    assert np.float32(1 / 6) == np.float32(triton_kernels._ONE_SIXTH.value)


def test_the_ceil_rule_check_catches_a_reciprocal_one_ulp_high():
    """The check above can fail: one ulp above RN(1/6), amax = 6 * 2^e gives 2^e plus an ulp."""
    assert _ceil_rule_mismatches(np.nextafter(np.float32(1 / 6), np.float32(1))) > 0
