"""The standalone Triton RoPE kernel (`finevit.kernels.rope`) against the float64 reference.

The reference is `finevit.kernels.reference.apply_rope`, Qwen2-VL's `apply_rotary_pos_emb_vision`
(rotate-half) with the duplicated cos/sin halves removed; it is run on float64 inputs as the oracle and
in the test's low precision as the yardstick: the kernel's max error against float64 must be at most 2×
(gradients 3×) the error of that low-precision PyTorch run.

Without CUDA the kernel runs in Triton's interpreter on CPU. Triton chooses between compiler and
interpreter when a kernel is *decorated*: `@triton.jit` reads TRITON_INTERPRET (through `triton.knobs`)
as `finevit.kernels.rope` is imported, and never again; importing `triton` itself earlier does not
matter. tests/conftest.py sets the variable before collection; this module also sets it around its own
import of the kernel (restoring the previous value, so that nothing leaks if it runs without that
conftest), and its autouse fixture sets it per test (the public dispatch reads it at every call) and,
should the kernel module have been imported earlier without it, swaps in an interpreted copy.
"""

import os

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

if not ON_GPU:
    _previous_interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import finevit.kernels as K  # noqa: E402
from finevit.kernels import _dispatch, reference, rope  # noqa: E402

from .comparisons import assert_error_within  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_path")  # tests/kernels/conftest.py

if not ON_GPU:
    if _previous_interpret is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous_interpret


@pytest.fixture(autouse=True)
def _triton_interpreter_on_cpu(monkeypatch):
    if ON_GPU:
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(rope._rope_kernel, InterpretedFunction):  # imported before the flag was set
        monkeypatch.setattr(rope, "_rope_kernel", InterpretedFunction(rope._rope_kernel.fn))


LOW_PRECISION = [torch.float16, torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
FLOOR = 1e-12  # lets an exact kernel pass where PyTorch is exact too; far below any fp32 rounding error

# (tokens, heads, head_dim, rotary_dim): odd token counts, ViT head dims, partial rotary dims whose half
# (24, 20, 12, 1) is not a power of two.
SHAPES = [
    (1, 1, 32, 32),
    (17, 2, 72, 72),
    (129, 3, 80, 80),
    (17, 3, 88, 88),
    (129, 2, 128, 128),
    (17, 1, 128, 64),
    (129, 3, 80, 48),
    (17, 2, 88, 40),
    (1, 3, 72, 24),
    (17, 2, 32, 2),
]


def shape_id(shape):
    t, h, d, r = shape
    return f"T{t}-H{h}-D{d}-r{r}"


def random_tables(num_tokens: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos, sin (T, r/2) of random angles (any r/2, unlike the 2D builder's multiples of 2)."""
    angles = (torch.rand(num_tokens, rotary_dim // 2, device=DEVICE) - 0.5) * 200.0
    return angles.cos(), angles.sin()


def reference_grad(x, cos, sin, grad_out, dtype):
    """d(reference apply_rope)/dx for grad_out, with x cast to `dtype` (float64: the oracle)."""
    x = x.detach().to(dtype).requires_grad_()
    (grad,) = torch.autograd.grad(reference.apply_rope(x, cos, sin), x, grad_out.to(dtype))
    return grad


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_matches_float64_reference_on_odd_shapes(shape, dtype):
    tokens, heads, head_dim, rotary_dim = shape
    x = torch.randn(tokens, heads, head_dim, device=DEVICE, dtype=dtype)
    cos, sin = random_tables(tokens, rotary_dim)
    x_before = x.clone()

    out = rope.apply_rope(x, cos, sin)

    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(x, x_before), "the input was modified"
    exact = reference.apply_rope(x.double(), cos, sin)
    assert_error_within(out, exact, reference.apply_rope(x, cos, sin), 2, floor=FLOOR)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:]), "pass-through channels changed"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_strided_views_of_a_fused_qkv_projection_are_read_in_place(dtype):
    tokens, heads, head_dim, rotary_dim = 17, 3, 80, 48
    qkv = torch.randn(tokens, 3 * heads * head_dim, device=DEVICE, dtype=dtype)
    q, k, _ = qkv.view(tokens, 3, heads, head_dim).unbind(1)  # strides (3·H·D, D, 1)
    heads_first = torch.randn(heads, tokens, head_dim, device=DEVICE, dtype=dtype).transpose(0, 1)
    # cos and sin as the two halves of one (T, 2, r/2) table: views with row stride r, not r/2.
    cos, sin = random_tables(tokens, rotary_dim)
    cos_view, sin_view = torch.stack([cos, sin], dim=1).unbind(1)
    qkv_before = qkv.clone()

    for x in (q, k, heads_first):
        assert not x.is_contiguous()
        out = rope.apply_rope(x, cos_view, sin_view)
        exact = reference.apply_rope(x.double(), cos, sin)
        assert_error_within(out, exact, reference.apply_rope(x, cos, sin), 2, floor=FLOOR)
        assert torch.equal(out, rope.apply_rope(x.contiguous(), cos, sin)), "strided and dense inputs differ"
    assert torch.equal(qkv, qkv_before), "the fused projection was modified"


@pytest.mark.parametrize("conjugate", [False, True])
def test_every_output_element_is_written_and_nothing_else(conjugate):
    tokens, heads, head_dim, rotary_dim = 17, 3, 88, 40
    x = torch.randn(tokens, heads, head_dim, device=DEVICE)
    cos, sin = random_tables(tokens, rotary_dim)
    # A strided destination inside a NaN-poisoned buffer: the gaps must stay NaN, the view must not.
    buffer = torch.full((tokens, heads + 1, head_dim + 8), float("nan"), device=DEVICE)
    out = buffer[:, 1:, 4 : 4 + head_dim]

    rope.rope_fwd(x, cos, sin, conjugate=conjugate, out=out)

    assert not out.isnan().any(), "unwritten output elements"
    untouched = buffer.clone()
    untouched[:, 1:, 4 : 4 + head_dim] = float("nan")
    assert untouched.isnan().all(), "the kernel wrote outside its output"
    angle_sign = -1.0 if conjugate else 1.0
    expected = reference.apply_rope(x.double(), cos, angle_sign * sin)
    assert_error_within(out, expected, reference.apply_rope(x, cos, angle_sign * sin), 2, floor=FLOOR)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


def test_conjugate_rotation_undoes_the_forward_in_float64():
    x = torch.randn(17, 2, 72, device=DEVICE, dtype=torch.float64)
    cos, sin = random_tables(17, 56)
    rotated = rope.rope_fwd(x, cos, sin)
    # R(−θ)·R(θ) = (cos² + sin²)·I, and float32 tables make cos² + sin² = 1 only to ~1e-7.
    norm = (cos.double() ** 2 + sin.double() ** 2).repeat(1, 2)[:, None, :]  # (T, 1, r)
    expected = torch.cat([x[..., :56] * norm, x[..., 56:]], dim=-1)
    torch.testing.assert_close(rope.rope_fwd(rotated, cos, sin, conjugate=True), expected, rtol=0, atol=1e-12)


def test_zero_tokens_give_an_empty_output():
    x = torch.randn(0, 2, 32, device=DEVICE)
    cos, sin = random_tables(0, 32)
    assert rope.apply_rope(x, cos, sin).shape == (0, 2, 32)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [(129, 3, 80, 80), (17, 2, 88, 40), (1, 1, 72, 24)], ids=shape_id)
def test_backward_matches_float64_reference_for_a_random_gradient(shape, dtype):
    tokens, heads, head_dim, rotary_dim = shape
    x = torch.randn(tokens, heads, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    cos, sin = random_tables(tokens, rotary_dim)
    grad_out = torch.randn_like(x)

    (grad,) = torch.autograd.grad(rope.apply_rope(x, cos, sin), x, grad_out)

    assert grad.dtype == dtype
    exact = reference_grad(x, cos, sin, grad_out, torch.float64)
    assert_error_within(grad, exact, reference_grad(x, cos, sin, grad_out, dtype), 3, "grad", floor=FLOOR)
    assert torch.equal(grad[..., rotary_dim:], grad_out[..., rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_backward_of_sum_reads_the_expanded_stride_zero_gradient(dtype):
    x = torch.randn(17, 3, 72, device=DEVICE, dtype=dtype, requires_grad=True)
    cos, sin = random_tables(17, 48)
    out = rope.apply_rope(x, cos, sin)
    seen = []
    out.register_hook(lambda g: seen.append(g.stride()))

    out.sum().backward()

    assert seen == [(0, 0, 0)], f"the test meant an expanded gradient, autograd gave strides {seen}"
    ones = torch.ones_like(x)
    exact = reference_grad(x, cos, sin, ones, torch.float64)
    assert_error_within(x.grad, exact, reference_grad(x, cos, sin, ones, dtype), 3, "grad", floor=FLOOR)


@pytest.mark.parametrize("layout", ["heads_first", "token_slice", "channel_stride_2"])
def test_backward_honours_non_contiguous_gradients(layout):
    tokens, heads, head_dim, rotary_dim = 17, 3, 80, 48
    x = torch.randn(tokens, heads, head_dim, device=DEVICE, requires_grad=True)
    cos, sin = random_tables(tokens, rotary_dim)
    if layout == "heads_first":
        grad_out = torch.randn(heads, tokens, head_dim, device=DEVICE).transpose(0, 1)
    elif layout == "token_slice":
        grad_out = torch.randn(2 * tokens, heads, head_dim + 16, device=DEVICE)[::2, :, 8 : 8 + head_dim]
    else:
        grad_out = torch.randn(tokens, heads, 2 * head_dim, device=DEVICE)[..., ::2]
    assert not grad_out.is_contiguous()

    (grad,) = torch.autograd.grad(rope.apply_rope(x, cos, sin), x, grad_out)

    exact = reference_grad(x, cos, sin, grad_out, torch.float64)
    low = reference_grad(x, cos, sin, grad_out, torch.float32)
    assert_error_within(grad, exact, low, 3, "grad", floor=FLOOR)


@pytest.mark.parametrize("conjugate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gradients_of_cos_and_sin_match_reference(dtype, conjugate):
    tokens, heads, head_dim, rotary_dim = 17, 3, 72, 40
    x = torch.randn(tokens, heads, head_dim, device=DEVICE, dtype=dtype)
    angles = torch.rand(tokens, rotary_dim // 2, device=DEVICE) * 100.0
    grad_out = torch.randn_like(x)
    sign = -1.0 if conjugate else 1.0

    def ours(x, cos, sin):
        return torch.ops.finevit.apply_rope(x, cos, sin, conjugate)

    def ref(x, cos, sin):
        return reference.apply_rope(x, cos, sign * sin)

    def table_grads(fn, x_dtype):
        # float64 (the oracle): the same table values as float64 leaves, so the grads stay float64
        table_dtype = torch.float64 if x_dtype == torch.float64 else torch.float32
        cos, sin = (t.to(table_dtype).requires_grad_() for t in (angles.cos(), angles.sin()))
        out = fn(x.to(x_dtype), cos, sin)
        return torch.autograd.grad(out, (cos, sin), grad_out.to(out.dtype))

    exact, low = table_grads(ref, torch.float64), table_grads(ref, dtype)
    for name, o, e, lo in zip(("cos", "sin"), table_grads(ours, dtype), exact, low):
        assert_error_within(o, e, lo, 3, f"grad of {name}", floor=FLOOR)


def test_gradcheck_and_double_backward_in_float64():
    x = torch.randn(3, 2, 12, device=DEVICE, dtype=torch.float64, requires_grad=True)
    angles = torch.rand(3, 4, device=DEVICE, dtype=torch.float64) * 10.0
    cos, sin = angles.cos().float(), angles.sin().float()

    assert torch.autograd.gradcheck(lambda x: rope.apply_rope(x, cos, sin), (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda x: rope.apply_rope(x, cos, sin), (x,), fast_mode=True)


# ----------------------------------------------------------------------------------------------------
# Registration and dispatch
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts launches of the kernel's launcher (the op body looks it up at every call)."""
    calls = []
    launcher = rope.rope_fwd

    def counting(*args, **kwargs):
        calls.append(kwargs.get("conjugate", False))
        return launcher(*args, **kwargs)

    monkeypatch.setattr(rope, "rope_fwd", counting)
    return calls


@pytest.mark.parametrize("mode", ["triton", "auto"])
def test_public_apply_rope_runs_this_kernel(monkeypatch, kernel_launches, mode):
    monkeypatch.setenv("FINEVIT_KERNELS", mode)
    positions = torch.randint(0, 24, (17, 2), device=DEVICE)
    cos, sin = K.rope_2d_cos_sin(positions, 80)
    x = torch.randn(17, 2, 80, device=DEVICE, dtype=torch.float16, requires_grad=True)

    assert _dispatch.use_triton("apply_rope", DEVICE)
    out = K.apply_rope(x, cos, sin)
    out.backward(torch.randn_like(out))

    assert kernel_launches == [False, True], "forward then conjugate backward launches expected"
    exact = reference.apply_rope(x.double(), cos, sin)
    assert_error_within(out, exact, reference.apply_rope(x, cos, sin), 2, floor=FLOOR)


def test_fake_tensor_mode_gives_the_output_shape_and_dtype():
    with FakeTensorMode():
        qkv = torch.empty(17, 3, 2, 72, dtype=torch.float16, device=DEVICE)
        cos = sin = torch.empty(17, 20, device=DEVICE)
        out = rope.apply_rope(qkv[:, 0], cos, sin)
        back = torch.ops.finevit.apply_rope(qkv[:, 1], cos, sin, True)
    for t in (out, back):
        assert t.shape == (17, 2, 72) and t.dtype == torch.float16 and t.device.type == DEVICE.type


def test_custom_op_registration_passes_opcheck():
    x = torch.randn(17, 2, 40, device=DEVICE, requires_grad=True)
    cos, sin = random_tables(17, 24)
    # aot_dispatch_dynamic traces with fake tensors, which the interpreter cannot run: GPU test below.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.finevit.apply_rope.default, (x, cos, sin, False), test_utils=checks)


@pytest.mark.gpu
def test_custom_op_traces_under_aot_dispatch_and_compile():
    x = torch.randn(17, 2, 80, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = random_tables(17, 48)
    torch.library.opcheck(torch.ops.finevit.apply_rope.default, (x, cos, sin, False))

    compiled = torch.compile(rope.apply_rope, fullgraph=True, dynamic=True)
    for tokens in (17, 129):
        x = torch.randn(tokens, 2, 80, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        cos, sin = random_tables(tokens, 48)
        out = compiled(x, cos, sin)
        exact = reference.apply_rope(x.double(), cos, sin)
        assert_error_within(out, exact, reference.apply_rope(x, cos, sin), 2, floor=FLOOR)
        out.sum().backward()
        ones = torch.ones_like(x)
        exact = reference_grad(x, cos, sin, ones, torch.float64)
        low = reference_grad(x, cos, sin, ones, torch.bfloat16)
        assert_error_within(x.grad, exact, low, 3, "grad", floor=FLOOR)
