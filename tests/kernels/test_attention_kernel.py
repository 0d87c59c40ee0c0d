"""Triton varlen attention (forward and backward, with and without fused RoPE) against the float64 reference.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): fp16 and fp32 only,
since the interpreter cannot multiply bf16. With CUDA the same tests run compiled, bf16 included.
The rule (flash-attention's): the kernel's error against float64 is at most 2x (gradients 3x) the error
of the PyTorch reference run in the same dtype. Outputs are allocated NaN-poisoned, so an element the
kernel forgets to write fails the test.
"""

import random

import pytest
import torch

import finevit.kernels as K
from finevit.kernels import attention, reference

from .comparisons import assert_error_within

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("triton_path", "poisoned_outputs")  # tests/kernels/conftest.py
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def make_inputs(lengths, heads, head_dim, rotary_dim, dtype, layout="contiguous"):
    """float64 masters and low-precision leaves (same rounded values), cu_seqlens, cos/sin."""
    total = sum(lengths)
    if layout == "qkv_view":  # q, k, v as strided views of a fused (T, 3, H, D) projection
        fused = torch.randn(total, 3, heads, head_dim, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
        low = list(fused.unbind(1))  # non-contiguous views with strides (3·H·D, D, 1)
        for x in low:
            x.retain_grad()
    elif layout == "odd_strides":  # rows 3 elements longer than H·D: token strides odd, so the kernels get ALIGN 1
        low = []
        for _ in range(3):
            rows = torch.randn(total, heads * head_dim + 3, dtype=torch.float64).to(dtype).to(DEVICE)
            low.append(rows[:, :heads * head_dim].view(total, heads, head_dim).requires_grad_())
    else:
        low = [torch.randn(total, heads, head_dim, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
               for _ in range(3)]
    masters = [x.detach().double().requires_grad_() for x in low]
    lowp_torch = [x.detach().clone().requires_grad_() for x in low]
    cu = K.cu_seqlens_from_lengths(lengths).to(DEVICE)
    cos = sin = None
    if rotary_dim:
        positions = torch.randint(0, 64, (total, 2), device=DEVICE)
        cos, sin = K.rope_2d_cos_sin(positions, head_dim, rotary_dim=rotary_dim)
    return low, masters, lowp_torch, cu, cos, sin


def check_against_reference(lengths, heads, head_dim, rotary_dim, dtype, softmax_scale=None, layout="contiguous",
                            deterministic=True):
    low, masters, lowp_torch, cu, cos, sin = make_inputs(lengths, heads, head_dim, rotary_dim, dtype, layout)
    max_seqlen = max(lengths)
    kwargs = dict(cos=cos, sin=sin, softmax_scale=softmax_scale)

    out = attention.varlen_attention(*low, cu, max_seqlen, **kwargs, deterministic=deterministic)
    ref64 = reference.varlen_attention(*masters, cu, max_seqlen, **kwargs)
    ref_lowp = reference.varlen_attention(*lowp_torch, cu, max_seqlen, **kwargs)
    assert out.dtype == dtype and out.shape == low[0].shape
    assert_error_within(out, ref64, ref_lowp, 2, "out")

    grad = torch.randn_like(ref64)
    out.backward(grad.to(dtype))
    ref64.backward(grad)
    ref_lowp.backward(grad.to(dtype))
    for name, x, x64, xt in zip("qkv", low, masters, lowp_torch):
        assert_error_within(x.grad, x64.grad, xt.grad, 3, f"d{name}")


HEAD_DIMS = [32, 64, 72, 80, 88, 96, 128]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention_matches_reference_for_every_head_dim(head_dim, rope, dtype):
    check_against_reference([1, 2, 17, 40], 2, head_dim, head_dim if rope else 0, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_attention_matches_reference_on_sequences_of_129_tokens(head_dim, dtype):
    check_against_reference([129, 1], 1, head_dim, head_dim, dtype)


@pytest.mark.parametrize(
    "head_dim, rotary_dim", [(64, 32), (80, 40), (88, 44), (128, 64), (72, 24), (96, 8)],
)
def test_attention_with_partial_rotary_dims(head_dim, rotary_dim):
    check_against_reference([9, 23], 2, head_dim, rotary_dim, torch.float32)


@pytest.mark.parametrize("seed", range(4))
def test_attention_on_random_ragged_batches(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 2, 3, 15, 16, 17, 31, 33, 64, 65]) for _ in range(rng.randint(1, 6))]
    lengths[rng.randrange(len(lengths))] += 1  # at least one token
    heads = rng.randint(1, 3)
    head_dim = rng.choice([32, 72, 80])
    dtype = rng.choice([torch.float16, torch.float32])
    check_against_reference(lengths, heads, head_dim, rng.choice([0, head_dim]), dtype)


def test_attention_with_a_custom_softmax_scale_and_three_heads():
    check_against_reference([7, 20], 3, 64, 64, torch.float32, softmax_scale=0.37)


def test_attention_on_strided_views_of_a_fused_qkv_projection():
    check_against_reference([5, 19], 2, 72, 72, torch.float16, layout="qkv_view")


def test_attention_on_views_with_odd_token_strides():
    check_against_reference([5, 19], 2, 88, 88, torch.float16, layout="odd_strides")


def test_attention_takes_cos_and_sin_with_different_row_strides():
    low, masters, _, cu, cos, sin = make_inputs([6, 11], 2, 72, 72, torch.float32)
    # cos a view with row stride 2·36 + 4, sin contiguous (36): the kernels take one table stride.
    table = torch.zeros(cos.shape[0], 2 * cos.shape[1] + 4, device=cos.device)
    table[:, :cos.shape[1]] = cos
    cos_view = table[:, :cos.shape[1]]
    out = attention.varlen_attention(*low, cu, 11, cos=cos_view, sin=sin)
    ref = reference.varlen_attention(*masters, cu, 11, cos=cos, sin=sin)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=1e-5)
    for x, x64 in zip(low, masters):
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=1e-5)


def test_attention_backward_takes_an_expanded_stride0_gradient():
    low, masters, _, cu, cos, sin = make_inputs([6, 11], 2, 80, 80, torch.float32)
    attention.varlen_attention(*low, cu, 11, cos=cos, sin=sin).sum().backward()  # grad: expanded ones
    reference.varlen_attention(*masters, cu, 11, cos=cos, sin=sin).sum().backward()
    for x, x64 in zip(low, masters):
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=1e-5)


def test_attention_is_deterministic():
    low, _, _, cu, cos, sin = make_inputs([3, 40], 2, 72, 72, torch.float16)
    results = []
    for _ in range(2):
        for x in low:
            x.grad = None
        out = attention.varlen_attention(*low, cu, 40, cos=cos, sin=sin)
        out.backward(torch.ones_like(out))
        results.append([out.detach().clone()] + [x.grad.clone() for x in low])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(32, 32), (64, 0), (72, 72), (88, 88), (128, 64)])
def test_non_deterministic_backward_matches_reference(head_dim, rotary_dim, dtype):
    # dQ added by the dK/dV kernel with atomics into a float32 buffer, stored (rotated back) by its own pass.
    check_against_reference([1, 17, 70, 33], 2, head_dim, rotary_dim, dtype, deterministic=False)


def test_non_deterministic_backward_runs_one_kernel_over_the_keys_unless_torch_asks_for_determinism(monkeypatch):
    launched = []
    launch = attention._dispatch.launch
    monkeypatch.setattr(attention._dispatch, "launch", lambda tuned, plain, *a, **kw: (
        launched.append(plain.__name__), launch(tuned, plain, *a, **kw))[1])
    low, _, _, cu, cos, sin = make_inputs([6, 11], 2, 72, 72, torch.float32)

    def backward_kernels(deterministic):
        launched.clear()
        attention.varlen_attention(*low, cu, 11, cos=cos, sin=sin, deterministic=deterministic).sum().backward()
        return launched[1:]  # after the forward

    assert backward_kernels(True) == ["_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]
    assert backward_kernels(False) == ["_attn_bwd_dkdv_kernel"]  # then _attn_bwd_dq_store_kernel (not tuned)
    deterministic_algorithms = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert backward_kernels(False) == ["_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]
    finally:
        torch.use_deterministic_algorithms(deterministic_algorithms)


def test_non_deterministic_backward_refuses_more_tokens_than_its_int32_buffer_offsets_reach():
    tokens = 2**31 // 64  # head dim 64 without RoPE: 64 channels of dQ per token
    q = torch.zeros(1, 1, 64, dtype=torch.float16, device=DEVICE).expand(tokens, 1, 64)  # no memory behind it
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"deterministic=False .* at most 33554431 tokens at head dim 64"):
        attention.varlen_attention(q, q, q, cu, tokens, deterministic=False)


def test_attention_does_not_attend_across_sequences():
    low, _, _, cu, _, _ = make_inputs([4, 9], 1, 32, 0, torch.float32)
    q, k, v = (x.detach() for x in low)
    out = attention.varlen_attention(q, k, v, cu, 9)
    v2 = v.clone()
    v2[4:] += 50.0
    out2 = attention.varlen_attention(q, k, v2, cu, 9)
    assert torch.equal(out[:4], out2[:4])


def test_public_function_runs_the_triton_kernel_when_asked(autotuned_launches):
    launches = autotuned_launches
    low, masters, _, cu, cos, sin = make_inputs([5, 8], 2, 32, 32, torch.float32)
    out = K.varlen_attention(*low, cu, 8, cos=cos, sin=sin)
    assert launches == ["_attn_fwd_kernel"]
    expected = reference.varlen_attention(*masters, cu, 8, cos=cos, sin=sin)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cu_seqlens must end at total_tokens"):
        K.varlen_attention(*low, torch.tensor([0, 5, 12], dtype=torch.int32), 8)  # validated before any kernel


def test_attention_ops_have_fake_implementations_for_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(10, 2, 72, dtype=torch.float16)
        cu = torch.tensor([0, 4, 10], dtype=torch.int32)
        o, lse, q_rot, k_rot = torch.ops.finevit.varlen_attention_fwd(q, q, q, cu, 6, None, None, 0.1)
        dq, dk, dv = torch.ops.finevit.varlen_attention_bwd(o, q, q, q, o, lse, cu, 6, None, None, 0.1)
        dq_atomic = torch.ops.finevit.varlen_attention_bwd(o, q, q, q, o, lse, cu, 6, None, None, 0.1, False)[0]
        cos = torch.empty(10, 36)
        rotated = torch.ops.finevit.varlen_attention_fwd(q, q, q, cu, 6, cos, cos, 0.1)[2:]
    assert o.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == (2, 10) and lse.dtype == torch.float32
    assert q_rot.numel() == k_rot.numel() == 0  # no RoPE: nothing rotated to keep
    assert all(x.shape == q.shape and x.dtype == q.dtype for x in rotated)  # RoPE: q̃, k̃ kept for the backward
    assert dq.shape == dk.shape == dv.shape == dq_atomic.shape == q.shape


@pytest.mark.parametrize(
    "head_dim, expected", [(32, 32), (64, 64), (72, 80), (80, 80), (88, 96), (96, 96), (128, 128), (256, 256)]
)
def test_split_head_dim_wastes_less_than_rounding_to_a_multiple_of_32(head_dim, expected):
    assert attention.matmul_channels(head_dim, head_dim) == expected
    assert attention.matmul_channels(head_dim, 0) == expected


def test_every_head_dim_and_rotary_dim_has_a_valid_chunk_plan():
    for head_dim in range(32, 257, 8):
        for rotary_dim in {0, head_dim, head_dim // 2 // 2 * 2, 8}:
            plan = attention._chunk_plan(head_dim, rotary_dim)
            covered = {}
            for i in range(attention.NUM_QK_CHUNKS):
                real, width = plan[f"QK{i}_REAL"], plan[f"QK{i}_WIDTH"]
                assert width >= 16 and width & (width - 1) == 0
                if plan[f"QK{i}_ROT"]:
                    assert 2 * real <= width
                    for j in range(real):
                        pair = plan[f"QK{i}_START"] + j
                        covered[pair] = covered.get(pair, 0) + 1
                        covered[plan["ROT_HALF"] + pair] = covered.get(plan["ROT_HALF"] + pair, 0) + 1
                else:
                    assert real <= width
                    for j in range(real):
                        covered[plan[f"QK{i}_START"] + j] = covered.get(plan[f"QK{i}_START"] + j, 0) + 1
            assert covered == {c: 1 for c in range(head_dim)}, (head_dim, rotary_dim)
            assert attention.matmul_channels(head_dim, rotary_dim) <= -(-head_dim // 32) * 32 + 16


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_attention_compiles_with_fullgraph_and_matches_eager(monkeypatch, deterministic):
    monkeypatch.setenv("FINEVIT_KERNELS", "triton")
    low, _, _, cu, cos, sin = make_inputs([5, 19, 64], 2, 72, 72, torch.bfloat16)
    compiled = torch.compile(lambda q, k, v: K.varlen_attention(q, k, v, cu, 64, cos=cos, sin=sin,
                                                                deterministic=deterministic), fullgraph=True)
    out = compiled(*low)
    out.float().square().sum().backward()
    grads = [x.grad.clone() for x in low]
    for x in low:
        x.grad = None
    eager = attention.varlen_attention(*low, cu, 64, cos=cos, sin=sin, deterministic=deterministic)
    eager.float().square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    # The atomic backward adds dQ in a different order on each run: equal up to bf16 rounding of that sum.
    tolerance = {"rtol": 0, "atol": 0} if deterministic else {}
    for got, want in zip(grads, (x.grad for x in low)):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.gpu
def test_attention_forward_and_backward_never_wait_for_the_host():
    # A host sync per call (e.g. torch.tensor(list, device="cuda") in the launcher) cost a ViT-B training
    # step 17% on an H100; the sync debug mode turns any into an error.
    low, _, _, cu, cos, sin = make_inputs([5, 19, 64], 2, 64, 64, torch.bfloat16)
    attention.varlen_attention(*low, cu, 64, cos=cos, sin=sin).sum().backward()  # compiles and autotunes first
    for x in low:
        x.grad = None
    attention.varlen_attention(*low, cu, 64, cos=cos, sin=sin, deterministic=False).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for deterministic in (True, False):
            attention.varlen_attention(*low, cu, 64, cos=cos, sin=sin, deterministic=deterministic).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _work_list(lengths: list[int]) -> list[list[int]]:
    """The `_cu_blocks` table in Python: the sequences sorted by octave (bit length) of their length, longest
    first and stable, then per block size 0 and the running block counts in that order; the order as last row."""
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]).bit_length())
    rows = [[0] + torch.tensor([-(-lengths[i] // size) for i in order], dtype=torch.int64).cumsum(0).tolist()
            for size in attention.CU_BLOCK_SIZES]
    return rows + [order + [0]]


@pytest.mark.parametrize("lengths", [[0], [1], [0, 17, 0, 129, 1, 300], [5] * 300, [1, 2, 3, 4, 4096, 8, 2**20],
                                     "random 600"])
def test_cu_blocks_kernel_orders_sequences_longest_first_and_counts_their_blocks(lengths):
    """The work list (`_cu_blocks_kernel`, also launched by the C export): sequences by descending octave of length,
    ties in packing order, and per block size the running sum of cdiv(seqlen, size) in that order. With empty
    sequences, powers of two at octave edges, and more sequences than one scan step (300, 600 > 256)."""
    if lengths == "random 600":
        lengths = torch.randint(0, 3000, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    cu = K.cu_seqlens_from_lengths(lengths).to(DEVICE)
    assert attention._cu_blocks(cu).tolist() == _work_list(lengths)


