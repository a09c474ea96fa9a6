"""What the Gluon attention kernels (gluon_decode, gluon_prefill) read from the paged FP4 cache and how.

- Packed K/V tiles and their scale bytes are copied into shared memory with cp.async (stage_tile),
  positions past the split's end and pages outside the cache zero-filled by masked copies;
- a staged tile decodes to exact 16-bit values (decode_tile): NVFP4 codes through FP8 (a code's
  bits placed in an E4M3 byte give its value / 2^6 exactly, the subnormal 0.5 too; SM89's cvt
  turns two of them into fp16 and one packed multiply by scale * 2^6 applies the block scale),
  E8M0 recipes through the Triton kernels' bf16 decode (triton_codes);
- row_bytes_layout: a register layout for packed rows whose decoded values are stored row by row.

Triton 3.6 and 3.9 both compile these; 3.9's Gluon renamed two builtins (the aliases below).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import async_copy

from .attention_shared import paged_rows
from .paged_kv import PagedKV
from .triton_codes import E8M0_DECODE_PTX, block_scales

async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
barrier = getattr(gl, "barrier", None) or gl.thread_barrier

# Operands $4: four packed bytes (eight codes); $5, $6: the block scales * 2^6 of bytes 0-1 and 2-3
# as fp16 pairs. Results as in triton_codes._decode_ptx: $0 $1 the even codes of bytes 0-1, 2-3,
# $2 $3 the odd ones. A code s,e1,e0,m goes to E4M3 bits s......e1e0m.. (sign to bit 7, the rest
# to bits 4..2): E4M3's exponent bias 7 against E2M1's 1 makes it value / 2^6, and code 1 (0.5) a
# subnormal E4M3 of the same ratio. Scaled values have at most 6 significant bits and lie in
# [2^-10, 2688]: every step is exact in fp16.
NVFP4_E4M3_DECODE_PTX = gl.constexpr("""{
.reg .b32 a, b, even, odd;
.reg .b16 even01, even23, odd01, odd23;
shl.b32 a, $4, 2;
and.b32 a, a, 0x1C1C1C1C;
shl.b32 b, $4, 4;
and.b32 b, b, 0x80808080;
or.b32 even, a, b;
shr.b32 a, $4, 2;
and.b32 a, a, 0x1C1C1C1C;
and.b32 b, $4, 0x80808080;
or.b32 odd, a, b;
mov.b32 {even01, even23}, even;
mov.b32 {odd01, odd23}, odd;
cvt.rn.f16x2.e4m3x2 $0, even01;
cvt.rn.f16x2.e4m3x2 $1, even23;
cvt.rn.f16x2.e4m3x2 $2, odd01;
cvt.rn.f16x2.e4m3x2 $3, odd23;
mul.rn.f16x2 $0, $0, $5;
mul.rn.f16x2 $1, $1, $6;
mul.rn.f16x2 $2, $2, $5;
mul.rn.f16x2 $3, $3, $6;
}""")
_E8M0_DECODE_PTX_GL = gl.constexpr(E8M0_DECODE_PTX.value)  # the Triton kernels' E8M0 decode


@gluon.constexpr_function
def log2_int(x):
    """log2 of a power of two."""
    return x.bit_length() - 1


@gluon.constexpr_function
def byte_basis(byte, HB):
    """Coordinates in a [rows, blocks, bytes of a block] tile of the row's byte `byte` (a power of two)."""
    return [0, byte // HB, 0] if byte >= HB else [0, 0, byte]


@gluon.constexpr_function
def row_bytes_layout(N, D, HB, WARPS):
    """Packed rows [N, D/(2 HB), HB] over WARPS warps: 16 adjacent bytes per thread, a row's
    threads adjacent, then rows over lanes, warps and registers (lanes and warps past N repeat rows)."""
    regs = [byte_basis(1 << b, HB) for b in range(4)]
    lanes = [byte_basis(16 << b, HB) for b in range(log2_int(D // 32))]
    rows = 1
    while len(lanes) < 5:
        lanes.append([rows if rows < N else 0, 0, 0])
        rows *= 2
    warps = []
    while len(warps) < log2_int(WARPS):
        warps.append([rows if rows < N else 0, 0, 0])
        rows *= 2
    while rows < N:
        regs.append([rows, 0, 0])
        rows *= 2
    return gl.DistributedLinearLayout(regs, lanes, warps, [], [N, D // (2 * HB), HB])


@gluon.jit
def _scale_operand(byte, E4M3_SCALES: gl.constexpr):
    """Scale bytes -> the operand the decode multiplies by: E4M3 * 2^6 as fp16 (the codes decode to
    value / 2^6), E8M0 as bf16; NaN bytes give NaN."""
    scale = block_scales(byte, E4M3_SCALES, False, True)
    if E4M3_SCALES:
        scale = scale * 64.0
    return scale


@gluon.jit
def decode_tile(data_smem, scales_smem, layout: gl.constexpr, D: gl.constexpr, BS: gl.constexpr,
                E4M3_SCALES: gl.constexpr, ZERO_NAN_BLOCKS: gl.constexpr = False):
    """A staged tile (bytes [N, D/2] and scale bytes [N, D/BS] in shared memory) -> its even and
    odd elements, [N, D/BS, BS/2] each in `layout`, exact in 16 bits. A block whose scale is NaN
    decodes to NaN, or with ZERO_NAN_BLOCKS to zeros (for a caller that tracks the NaN itself)."""
    N: gl.constexpr = data_smem.shape[0]
    return decode_blocks(data_smem.reshape([N, D // BS, BS // 2]), scales_smem, layout, E4M3_SCALES, ZERO_NAN_BLOCKS)


@gluon.jit
def decode_blocks(blocks_smem, scales_smem, layout: gl.constexpr, E4M3_SCALES: gl.constexpr,
                  ZERO_NAN_BLOCKS: gl.constexpr = False):
    """decode_tile of bytes viewed [N, blocks, bytes of a block] (a view that can be sliced by rows)."""
    packed = blocks_smem.load(layout)
    scale = _scale_operand(scales_smem.load(gl.SliceLayout(2, layout)), E4M3_SCALES)
    if ZERO_NAN_BLOCKS:
        scale = gl.where(scale == scale, scale, 0.0)
    scale = gl.broadcast(gl.expand_dims(scale, 2), packed)[0]
    if E4M3_SCALES:
        even, odd = gl.inline_asm_elementwise(NVFP4_E4M3_DECODE_PTX, "=r,=r,=r,=r,r,r,r", [packed, scale],
                                              dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
    else:
        even, odd = gl.inline_asm_elementwise(_E8M0_DECODE_PTX_GL, "=r,=r,=r,=r,r,r,r", [packed, scale],
                                              dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)
    return even, odd


def caches_aligned(kv: PagedKV, scale_alignment: int) -> bool:
    """Whether the copies below can read this cache: packed bytes starting 16-byte aligned, scale
    bytes at `scale_alignment` (16 where a kernel relies on the alignment Triton sees in the
    pointers, a scale row's size where the copies state it), as torch allocates them."""
    return all(x.data_ptr() % 16 == 0 for x in (kv.k_data, kv.v_data)) and \
        all(x.data_ptr() % scale_alignment == 0 for x in (kv.k_scales, kv.v_scales))


@gluon.constexpr_function
def _bytes_copy_layout(D, WARPS):
    """Packed rows [N, D/2] for cp.async: 16 bytes a thread, a row's threads adjacent."""
    CHUNKS = D // 32  # 16-byte copies per row
    return gl.BlockedLayout([1, 16], [32 // CHUNKS, CHUNKS], [WARPS, 1], [1, 0])


@gluon.constexpr_function
def _scales_copy_layout(NB, WARPS):
    """Scale bytes [N, NB] for cp.async: a row a thread."""
    return gl.BlockedLayout([1, NB], [32, 1], [WARPS, 1], [1, 0])


@gluon.jit
def staged_rows(n0, end, b, kv_head, block_table_ptr, max_pages, num_pages, HKV: gl.constexpr, D: gl.constexpr,
                BS: gl.constexpr, PAGE: gl.constexpr, N: gl.constexpr):
    """Cache rows of positions [n0, n0 + N) as stage_rows copies them (the bytes' rows, the scales'
    rows; -1 from `end` on and for pages outside the cache). The block-table load is issued here and
    waited for only by the copies, so a caller can look the rows up a step before it copies them."""
    WARPS: gl.constexpr = gl.num_warps()
    bytes_rows = _paged_cache_rows(n0, end, b, kv_head, block_table_ptr, max_pages, num_pages, HKV, PAGE,
                                   gl.SliceLayout(1, _bytes_copy_layout(D, WARPS)), N)
    scale_rows = _paged_cache_rows(n0, end, b, kv_head, block_table_ptr, max_pages, num_pages, HKV, PAGE,
                                   gl.SliceLayout(1, _scales_copy_layout(D // BS, WARPS)), N)
    return bytes_rows, scale_rows


@gluon.jit
def stage_rows(bytes_rows, scale_rows, data_ptr, scales_ptr, data_smem, scales_smem, D: gl.constexpr,
               BS: gl.constexpr):
    """Start copying the packed bytes and scale bytes of staged_rows' rows into data_smem [N, D/2]
    and scales_smem [N, D/BS] (rows -1 read as zeros: masked copies zero-fill); the caller commits.
    The copies state the rows' alignment: a warp-specialised partition's arguments lose the launch's
    alignment facts, which cp.async needs."""
    _copy_bytes(bytes_rows, data_ptr, data_smem, D, True)
    _copy_scales(scale_rows, scales_ptr, scales_smem, D // BS, True)


@gluon.jit
def stage_tile(n0, end, b, kv_head, block_table_ptr, max_pages, num_pages, k_data_ptr, k_scales_ptr, v_data_ptr,
               v_scales_ptr, stage, kd_smem, ks_smem, vd_smem, vs_smem,
               HKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, PAGE: gl.constexpr, N: gl.constexpr):
    """Start copying the K and V bytes and scales of positions [n0, n0 + N) into buffer `stage`
    (positions from `end` on, and pages outside the cache, read as zeros), as one commit group."""
    WARPS: gl.constexpr = gl.num_warps()
    rows = _paged_cache_rows(n0, end, b, kv_head, block_table_ptr, max_pages, num_pages, HKV, PAGE,
                             gl.SliceLayout(1, _bytes_copy_layout(D, WARPS)), N)
    _copy_bytes(rows, k_data_ptr, kd_smem.index(stage), D)
    _copy_bytes(rows, v_data_ptr, vd_smem.index(stage), D)
    scale_rows = _paged_cache_rows(n0, end, b, kv_head, block_table_ptr, max_pages, num_pages, HKV, PAGE,
                                   gl.SliceLayout(1, _scales_copy_layout(D // BS, WARPS)), N)
    _copy_scales(scale_rows, k_scales_ptr, ks_smem.index(stage), D // BS)
    _copy_scales(scale_rows, v_scales_ptr, vs_smem.index(stage), D // BS)
    async_copy.commit_group()


@gluon.jit
def _copy_bytes(rows, data_ptr, data_smem, D: gl.constexpr, STATE_ALIGNMENT: gl.constexpr = False):
    cols = gl.arange(0, D // 2, layout=gl.SliceLayout(0, _bytes_copy_layout(D, gl.num_warps())))
    ptrs = data_ptr + (gl.expand_dims(rows, 1) * (D // 2) + gl.expand_dims(cols, 0))
    if STATE_ALIGNMENT:  # rows start 16-byte aligned (D/2 >= 32 bytes a row, 16-byte aligned caches)
        ptrs = gl.multiple_of(ptrs, [1, 16])
    async_load(data_smem, ptrs, mask=gl.expand_dims(rows >= 0, 1))


@gluon.jit
def _copy_scales(rows, scales_ptr, scales_smem, NB: gl.constexpr, STATE_ALIGNMENT: gl.constexpr = False):
    cols = gl.arange(0, NB, layout=gl.SliceLayout(0, _scales_copy_layout(NB, gl.num_warps())))
    ptrs = scales_ptr + (gl.expand_dims(rows, 1) * NB + gl.expand_dims(cols, 0))
    if STATE_ALIGNMENT:  # rows start NB-byte aligned
        ptrs = gl.multiple_of(ptrs, [1, NB])
    async_load(scales_smem, ptrs, mask=gl.expand_dims(rows >= 0, 1))


@gluon.jit
def _paged_cache_rows(n0, end, b, kv_head, block_table_ptr, max_pages, num_pages, HKV: gl.constexpr,
                      PAGE: gl.constexpr, layout: gl.constexpr, N: gl.constexpr):
    """Cache row (slot * HKV + kv_head) of positions n0 .. n0 + N - 1 (paged_rows); -1 from `end`
    on and where the page id is outside the cache (masked copies read those as zeros)."""
    pos = n0 + gl.arange(0, N, layout=layout)
    in_cache, rows = paged_rows(block_table_ptr, b, max_pages, num_pages, pos, pos < end, PAGE, HKV, kv_head)
    return gl.where(in_cache, rows, -1)
