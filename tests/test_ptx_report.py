"""The PTX analysis of ``benchmarks.ptx_report`` on hand-written PTX, with counts worked out by hand.

No compiler is needed: these check the parser (basic blocks, back edges, natural
loops, the instruction classes) and the occupancy arithmetic. The compiled
kernels' figures are checked in tests/cuda/test_ptx.py from the same report run.
"""
from benchmarks.ptx_report import analyse_ptx, basic_blocks, natural_loops, occupancy

# Two nested loops. The inner one ($L__BB0_2) holds 2 FMAs, one vectorised and one
# scalar shared load and 3 other instructions (add, setp, bra): 2 FMA / 5 other.
# A division sits in the outer loop's header, a remainder in its latch; the
# float division after the loops is outside any loop.
NESTED = """
.version 8.8
.target sm_90
.address_size 64

.visible .entry k(
	.param .u64 k_param_0
)
.maxntid 128, 1, 1
{
	.reg .pred 	%p<3>;
	.reg .f32 	%f<8>;
	.reg .b64 	%rd<9>;

	ld.param.u64 	%rd1, [k_param_0];
	mov.u64 	%rd2, 0;
$L__BB0_1:
	div.s64 	%rd3, %rd1, 3;
	mov.u64 	%rd4, 0;
$L__BB0_2:
	ld.shared.v2.f32 	{%f1, %f2}, [%rd4];
	ld.shared.f32 	%f3, [%rd4+8];  // a comment: fma.rn.f32 is not counted here
	fma.rn.f32 	%f4, %f1, %f2, %f4;
	fma.rn.f32 	%f4, %f3, %f2, %f4;
	add.s64 	%rd4, %rd4, 1;
	setp.lt.s64 	%p1, %rd4, %rd3;
	@%p1 bra 	$L__BB0_2;

	rem.s64 	%rd5, %rd2, 7;
	add.s64 	%rd2, %rd2, 1;
	setp.lt.s64 	%p2, %rd2, %rd1;
	@%p2 bra 	$L__BB0_1;

	div.rn.f32 	%f5, %f4, %f1;
	st.global.f32 	[%rd1], %f5;
	ret;

}
"""

# NVVM often places a loop's body after the code that follows it: the entry jumps
# forward into the body, whose latch jumps back to a label *earlier* in the text
# than the body itself. Text order alone would misread this; the CFG does not.
ROTATED = """
.visible .entry r(
	.param .u64 r_param_0
)
{
	mov.u64 	%rd1, 0;
	bra.uni 	$L__BB1_3;
$L__BB1_2:
	st.global.f32 	[%rd2], %f1;
	ret;
$L__BB1_3:
	fma.rn.f64 	%fd1, %fd2, %fd3, %fd1;
	rem.u32 	%r1, %r2, %r3;
	add.s64 	%rd1, %rd1, 1;
	setp.lt.s64 	%p1, %rd1, 16;
	@%p1 bra 	$L__BB1_3;
	bra.uni 	$L__BB1_2;
}
"""


def test_blocks_and_loops_of_nested_loops():
    blocks = basic_blocks(NESTED)
    assert [b["label"] for b in blocks] == [None, "$L__BB0_1", "$L__BB0_2", None, None]
    assert [b["succ"] for b in blocks] == [[1], [2], [2, 3], [1, 4], []]
    loops = sorted(natural_loops(blocks), key=len)
    assert loops == [{2}, {1, 2, 3}]


def test_inner_loop_counts_of_nested_loops():
    result = analyse_ptx(NESTED)
    assert result == dict(
        loops=2,
        div_rem_in_loops=2,  # div.s64 and rem.s64; div.rn.f32 after the loops is not in one
        inner_loop=dict(fma=2, other=5, shared_loads=2, vector_shared_loads=1, div_rem=0),
        maxntid=128,
    )


def test_loop_placed_after_its_exit():
    blocks = basic_blocks(ROTATED)
    assert [b["succ"] for b in blocks] == [[2], [], [2, 3], [1]]
    result = analyse_ptx(ROTATED)
    assert result == dict(
        loops=1, div_rem_in_loops=1,
        inner_loop=dict(fma=1, other=4, shared_loads=0, vector_shared_loads=0, div_rem=1),
        maxntid=None,
    )


def test_occupancy_limits_on_h100():
    # 88 registers: 88*32 = 2816 per warp (a multiple of 256); 65536 // 2816 = 23 warps = 2 blocks of 8 warps.
    r = occupancy(88, 3072, 256, "90", shared_includes_reserved=True)
    assert r == dict(occupancy=16 / 64, block=256, blocks_per_sm=2, limited_by="registers")
    # 100000 bytes of shared memory + 1 KiB reserved, rounded to 128 B = 101120: 2 blocks in 228 KiB.
    r = occupancy(32, 100000, 256, "90", shared_includes_reserved=False)
    assert r == dict(occupancy=16 / 64, block=256, blocks_per_sm=2, limited_by="shared")
    # 16 registers, blocks of 32 threads: the 32-blocks-per-SM limit leaves 32 of 64 warps.
    r = occupancy(16, 0, 32, "90", shared_includes_reserved=True)
    assert r == dict(occupancy=0.5, block=32, blocks_per_sm=32, limited_by="blocks")
    # 255 registers (the most a thread can have): 255*32 rounds up to 8192 per warp, 8 warps = 1 block of 256.
    r = occupancy(255, 0, 256, "90", shared_includes_reserved=True)
    assert r == dict(occupancy=8 / 64, block=256, blocks_per_sm=1, limited_by="registers")
