"""The shortcuts the Triton quantize kernel takes to E2M1 codes and scale bytes, checked over every
input they can meet: the float adder's rounding in _e2m1_magnitude (eager's rule, comparing with
the thresholds, is the reference), the Newton reciprocal in _reciprocal, and one correction of
a * (1 / d) in _rounding_quotient (correct rounding is the reference)."""

import numpy as np
import pytest
import torch

from conftest import TRITON_DEVICE
from torch_fp4kv.ops import FORMATS, eager

triton = pytest.importorskip("triton")
tl = triton.language
from torch_fp4kv.ops import triton_kernels  # noqa: E402


@triton.jit
def _reciprocal_kernel(d_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, triton_kernels._reciprocal(tl.load(d_ptr + offsets)))


@triton.jit
def _magnitude_kernel(y_ptr, out_ptr, TIES_AWAY: tl.constexpr, AT_MOST_6: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, triton_kernels._e2m1_magnitude(tl.load(y_ptr + offsets), TIES_AWAY, AT_MOST_6))


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
    _magnitude_kernel[(len(y) // _BLOCK,)](y.to(TRITON_DEVICE), out, fmt.ties_away, at_most_6, BLOCK=_BLOCK)
    expected = eager._e2m1_magnitude(y.nan_to_num(nan=6.0), fmt).to(torch.int32)
    mismatch = (out.cpu() != expected).nonzero().flatten()
    assert len(mismatch) == 0, f"{len(mismatch)} codes differ, first at y={y[mismatch[:4]].tolist()}"


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


def _newton_reciprocal(d: np.ndarray, start: np.ndarray, set_exception: bool = True) -> np.ndarray:
    """_reciprocal's arithmetic, from a given first approximation."""
    r = start
    for _ in range(2):
        r = _fma32(r, _fma32(-d, r, np.float32(1)), r)
    if set_exception:
        r = np.where(d == np.float32(2 - 2**-23), np.float32(0.5 + 2**-24), r)
    return r


# ---- _reciprocal -----------------------------------------------------------------------------------


def test_newton_reciprocal_rounds_correctly_from_any_start_within_3_ulp():
    """Triton's 1.0 / d is within 2 ulp on a GPU (div.full.f32), correctly rounded in the
    interpreter."""
    correct = _correct_reciprocal(_UNIT_DIVISORS)
    for ulps in range(-3, 4):
        start = (correct.view(np.int32) + ulps).view(np.float32)
        wrong = np.nonzero(_newton_reciprocal(_UNIT_DIVISORS, start) != correct)[0]
        assert len(wrong) == 0, (ulps, _UNIT_DIVISORS[wrong[:4]])


def test_newton_reciprocal_needs_its_one_exception():
    """The check above can fail: without the set value, d = 2 - 2^-23 comes out one ulp low."""
    d = _UNIT_DIVISORS
    correct = _correct_reciprocal(d)
    start = (correct.view(np.int32) + 1).view(np.float32)
    wrong = d[_newton_reciprocal(d, start, set_exception=False) != correct]
    assert wrong.tolist() == [np.float32(2 - 2**-23)]


def test_reciprocal_kernel_equals_correct_rounding():
    """The Triton function itself over every d in [1, 2): on a GPU from the hardware's approximate
    division, under the interpreter from a correctly rounded one."""
    d = torch.from_numpy(_UNIT_DIVISORS.copy())
    out = torch.empty_like(d, device=TRITON_DEVICE)
    _reciprocal_kernel[(len(d) // _BLOCK,)](d.to(TRITON_DEVICE), out, BLOCK=_BLOCK)
    assert torch.equal(out.cpu(), torch.from_numpy(_correct_reciprocal(_UNIT_DIVISORS)))


# ---- _rounding_quotient: one Markstein correction ------------------------------------------------

# The rounding boundaries of the codes the quotients feed lie next to values of at most 3
# significant bits: E2M1 thresholds (0.25 ... 5) and powers of two (blockfp4's ceil rule). The
# targets are every significand of at most 5 bits (k / 16), a superset. Scaling a by a power of
# two scales the kernel's arithmetic exactly, so one binade of each suffices.
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
                    q = _fma32(_fma32(-q, d, a), inverse, q)
                wrong += int((((q >= t) if inclusive else (q > t)) != above).sum())
    return wrong


def test_one_correction_decides_every_boundary_as_correct_rounding():
    """Every float32 divisor in [1, 2): the kernel scales every normal d there (and a with it)."""
    assert _wrong_sides(corrections=1) == 0


def test_the_boundary_check_catches_an_uncorrected_quotient():
    """The check above can fail: without the correction, quotients land on the wrong side."""
    assert _wrong_sides(corrections=0, stride=64) > 0
