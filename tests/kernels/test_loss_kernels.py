"""Tiled Triton SigLIP / CLIP losses (single process) against float64 and open_clip in the same dtype.

On CPU the kernels run in Triton's interpreter (fp16, fp32); with CUDA the same tests run compiled, bf16
included. Rule: the kernel's error against float64 is at most 2× (gradients 3×) the error of open_clip's
loss computed in the same dtype (what users run today), plus a float32-rounding floor.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
import triton
from torch.utils._python_dispatch import TorchDispatchMode

import finevit.kernels as K
from finevit.kernels import reference

from .comparisons import assert_error_within

open_clip_loss = pytest.importorskip("open_clip.loss")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LN2 = 0.6931471805599453
pytestmark = pytest.mark.usefixtures("triton_path")  # tests/kernels/conftest.py
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def features(batch, dim, dtype, near=False):
    img = F.normalize(torch.randn(batch, dim, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.1 * torch.randn_like(img), dim=-1) if near else F.normalize(torch.randn_like(img), dim=-1)
    return img.to(dtype).to(DEVICE), txt.to(dtype).to(DEVICE)


def run(loss_fn, img, txt, scalars):
    """Loss and gradients w.r.t. img, txt and the scalars, on fresh leaves."""
    leaves = [img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()]
    leaves += [s.detach().clone().requires_grad_() for s in scalars]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss, [x.grad for x in leaves]


def compare(ours_fn, open_clip_fn, reference_fn, img, txt, scalars):
    ours, ours_grads = run(ours_fn, img, txt, scalars)
    ref, ref_grads = run(reference_fn, img.double(), txt.double(), [s.double() for s in scalars])
    lowp, lowp_grads = run(open_clip_fn, img, txt, [s.to(img.dtype) for s in scalars])
    # Floor: float32 rounding of the kernels' accumulators, amplified by the logit scale (open_clip's fp16
    # error can be exactly 0, e.g. at B = 1 where every gradient vanishes).
    floor = 1e-7 * max(1.0, scalars[0].item())
    assert_error_within(ours, ref, lowp, 2, "loss", floor=floor * max(1.0, ref.abs().item()))
    for name, got, want, theirs in zip(["d_img", "d_txt", "d_scale", "d_bias"], ours_grads, ref_grads, lowp_grads):
        assert_error_within(got, want, theirs, 3, name, floor=floor * max(1.0, want.abs().max().item()))


SHAPES = [(1, 16), (7, 64), (129, 96), (33, 768), (17, 1152)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, dim", SHAPES)
def test_siglip_kernel_matches_float64_and_open_clip(batch, dim, dtype):
    img, txt = features(batch, dim, dtype)
    scalars = [torch.tensor(10.0, device=DEVICE), torch.tensor(-10.0, device=DEVICE)]
    compare(K.siglip_loss, open_clip_loss.SigLipLoss(), reference.siglip_loss, img, txt, scalars)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, dim", SHAPES)
def test_clip_kernel_matches_float64_and_open_clip(batch, dim, dtype):
    img, txt = features(batch, dim, dtype)
    scalars = [torch.tensor(1 / 0.07, device=DEVICE)]
    theirs = open_clip_loss.ClipLoss(local_loss=True, gather_with_grad=True)
    compare(K.clip_loss, theirs, reference.clip_loss, img, txt, scalars)


def test_both_kernels_at_batch_1000():
    img, txt = features(1000, 16, torch.float32)
    compare(K.siglip_loss, open_clip_loss.SigLipLoss(), reference.siglip_loss, img, txt,
            [torch.tensor(10.0, device=DEVICE), torch.tensor(-10.0, device=DEVICE)])
    compare(K.clip_loss, open_clip_loss.ClipLoss(), reference.clip_loss, img, txt,
            [torch.tensor(1 / 0.07, device=DEVICE)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_losses_stay_finite_and_exact_at_the_scale_and_bias_training_reaches(dtype):
    img, txt = features(64, 32, dtype, near=True)  # confident positives: |z| up to ~146
    for ours, ref, scalars in (
        (K.siglip_loss, reference.siglip_loss, [torch.tensor(130.0), torch.tensor(-16.0)]),
        (K.clip_loss, reference.clip_loss, [torch.tensor(130.0)]),
    ):
        scalars = [s.to(DEVICE) for s in scalars]
        loss, grads = run(ours, img, txt, scalars)
        ref_loss, ref_grads = run(ref, img.double(), txt.double(), [s.double() for s in scalars])
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-4)
        for got, want in zip(grads[2:], ref_grads[2:]):  # the scalars' gradients: no feature rounding in them
            torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=1e-4)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("passes", [1, 2], ids=lambda n: f"{n}pass")
@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_no_batch_by_batch_tensor_exists_in_forward_or_backward(loss, passes, monkeypatch):
    # The gradient pass holds one chunk of the logit gradient at a time: with a budget of 64 rows (one pass;
    # 128, the least, with two), the largest tensor is a (chunk, B) chunk — at most a quarter of B².
    from finevit.kernels import _pairwise

    batch, dim = 512, 8 * 2  # B² = 262,144 elements, B·D = 8192
    monkeypatch.setattr(_pairwise, "CHUNK_BYTES", 64 * batch * 4)
    monkeypatch.setattr(_pairwise, "MIN_CHUNK_ROWS", 64)
    monkeypatch.setattr(_pairwise, "MAX_WORKING_BYTES", 0 if passes == 2 else 2**30)
    assert _pairwise.two_pass(batch, batch, dim, 4) == (passes == 2)
    chunk = 64 * passes
    img, txt = features(batch, dim, torch.float32)
    img.requires_grad_()
    txt.requires_grad_()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    with LargestTensor() as mode:
        out = K.siglip_loss(img, txt, scale, bias) if loss == "siglip" else K.clip_loss(img, txt, scale)
        out.backward()
    assert mode.largest <= chunk * batch, f"a tensor of {mode.largest} elements was created (B² = {batch * batch})"
    with LargestTensor() as mode:  # the check itself can fail: the reference does build the logits
        reference.siglip_loss(img, txt, scale, bias).backward()
    assert mode.largest >= batch * batch


@pytest.mark.parametrize("loss", ["siglip", "clip"])
@pytest.mark.parametrize("chunk, passes, splits", [(64, 1, 1), (128, 1, 1), (128, 2, 1), (128, 1, 3), (128, 2, 3)],
                         ids=lambda v: str(v))
def test_gradients_do_not_depend_on_the_chunking(loss, chunk, passes, splits, monkeypatch):
    """Several logit-gradient chunks, the last one partial (300 rows), d_txt accumulated over the chunks (one
    pass) or finished by a second pass over the texts, GEMMs split over K or not: the same loss and gradients
    as float64."""
    from finevit.kernels import _pairwise

    monkeypatch.setattr(_pairwise, "CHUNK_BYTES", chunk * 300 * 4)
    monkeypatch.setattr(_pairwise, "MIN_CHUNK_ROWS", chunk)
    monkeypatch.setattr(_pairwise, "MAX_WORKING_BYTES", 0 if passes == 2 else 2**30)
    monkeypatch.setattr(_pairwise, "SPLIT_K_MIN", 64)
    monkeypatch.setattr(_pairwise, "matmul_splits", lambda m, n, k, device: splits)
    assert _pairwise.chunk_rows(300, 300, 4, 128 if passes == 2 else chunk) == chunk
    img, txt = features(300, 40, torch.float32)
    scalars = [torch.tensor(10.0), torch.tensor(-5.0)][: 2 if loss == "siglip" else 1]
    fn = K.siglip_loss if loss == "siglip" else K.clip_loss
    ours, ours_grads = run(fn, img, txt, scalars)
    ref_fn = reference.siglip_loss if loss == "siglip" else reference.clip_loss
    want, want_grads = run(ref_fn, img.double(), txt.double(), [s.double() for s in scalars])
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(ours_grads, want_grads):  # float32 rounding of logits up to s = 10, over B = 300
        assert expected.abs().max() > 1e-3  # a chunk left out would show far above the tolerance
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5 * 10 / 300)


@pytest.mark.parametrize("groups", [1, 2, 16])
def test_both_log_sum_exps_of_one_pass_match_float64(groups, monkeypatch):
    """CLIP's one-process forward: the row and the column log-sum-exps from one pass, with programs covering
    1, 2 or 16 groups of rows per side (at B = 300: several row tiles per program read and update the
    column sums another tile wrote, and partials of several groups are merged)."""
    clip_loss = importlib.import_module("finevit.kernels.clip_loss")  # the package's clip_loss is the function
    monkeypatch.setattr(clip_loss, "LSE_GROUPS", groups)
    img, txt = features(300, 40, torch.float32)
    scale = torch.tensor(30.0, device=DEVICE)
    lse_img, lse_txt = clip_loss._both_lse(img, txt, scale)
    logits = 30.0 * img.double() @ txt.double().T / torch.log(torch.tensor(2.0, dtype=torch.float64))  # log2 units
    torch.testing.assert_close(lse_img.double(), torch.logsumexp(logits * LN2, 1) / LN2, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse_txt.double(), torch.logsumexp(logits * LN2, 0) / LN2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("splits", [1, 3], ids=lambda n: f"split{n}")
def test_the_gemm_matches_float64_with_and_without_split_k(dtype, accumulate, splits, monkeypatch):
    """contrastive_matmul on a transposed A (the d_txt product reads Gᵀ) and ragged M, N, K: c (+)= a @ b."""
    from finevit.kernels import _pairwise

    monkeypatch.setattr(_pairwise, "SPLIT_K_MIN", 64)  # K = 300 in ranges of 128, 128, 44 rows
    a = torch.randn(300, 100, dtype=torch.float64).to(dtype).to(DEVICE).T  # (100, 300), strides (1, 100)
    b = torch.randn(300, 70, dtype=torch.float64).to(dtype).to(DEVICE)
    c = torch.randn(100, 70, dtype=torch.float32, device=DEVICE)
    want = a.double() @ b.double() + (c.double() if accumulate else 0)
    if not accumulate:
        c = c.to(dtype)
    torch.ops.finevit.contrastive_matmul(a, b, c, accumulate, splits)
    torch.testing.assert_close(c.double(), want, rtol=2e-3 if dtype == torch.float16 else 1e-5, atol=1e-4)


def test_tuning_the_accumulating_gemm_adds_its_product_once(monkeypatch):
    """On a GPU the autotuner times each candidate by running it many times, and the accumulating GEMM adds
    into C: C must be restored after every timed run. The real autotuner over the real kernel (in the
    interpreter on CPU), each candidate timed by three runs."""
    from finevit.kernels import _pairwise

    def bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        return [1.0, 1.0, 1.0]

    tuner = _pairwise._matmul_tuned[False]
    monkeypatch.setattr(tuner, "_do_bench", bench, raising=False)
    monkeypatch.setattr(tuner, "do_bench", bench, raising=False)
    monkeypatch.setattr(tuner, "cache", {})
    a = torch.randn(48, 40, dtype=torch.float16, device=DEVICE)
    b = torch.randn(40, 24, dtype=torch.float16, device=DEVICE)
    c = torch.randn(48, 24, dtype=torch.float32, device=DEVICE)
    want = a.double() @ b.double() + c.double()

    def grid(meta):
        return (triton.cdiv(48, meta["BLOCK_M"]) * triton.cdiv(24, meta["BLOCK_N"]), 1)

    tuner[grid](a, b, c, 48, 24, 40, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), 40, 0,
                ACCUMULATE=True, GROUP_M=8)
    assert len(tuner.cache) == 1  # it did tune
    torch.testing.assert_close(c.double(), want, rtol=1e-5, atol=1e-4)


def test_gradients_are_computed_in_the_forward_only_when_wanted():
    """Single process: the SigLIP forward computes the gradients too, unless no gradient is wanted (no_grad,
    or no input requires grad), where it must cost one forward pass only."""
    calls = []
    original = torch.ops.finevit.siglip_logit_grad.default

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is original:
                calls.append(func)
            return func(*args, **(kwargs or {}))

    img, txt = features(40, 16, torch.float32)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    with Count(), torch.no_grad():
        K.siglip_loss(img, txt, scale, bias)
    with Count():
        K.siglip_loss(img, txt, scale.detach(), bias.detach())
    assert calls == []
    img.requires_grad_()

    class NewFeatureSized(TorchDispatchMode):  # img-sized results in new memory (not in place, not a view)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {t.untyped_storage().data_ptr() for t in [*args, *(kwargs or {}).values()]
                     if isinstance(t, torch.Tensor)}
            new.extend(t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)
                       and t.numel() == img.numel() and t.untyped_storage().data_ptr() not in given)
            return out

    with Count():
        loss = K.siglip_loss(img, txt, scale, bias)
    assert len(calls) == 1
    new = []
    with NewFeatureSized():  # the backward reuses the forward's gradients, times the incoming one, in place
        loss.backward(torch.tensor(3.0), retain_graph=True)
    assert len(calls) == 1 and new == []
    want_img, want_scale = torch.autograd.grad(reference.siglip_loss(img, txt, scale, bias), (img, scale))
    torch.testing.assert_close(scale.grad, 3 * want_scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(img.grad, 3 * want_img, rtol=1e-5, atol=1e-6)
    with Count():  # a second backward through the graph has no forward gradients left: it recomputes them
        loss.backward(torch.tensor(2.0))
    assert len(calls) == 2
    torch.testing.assert_close(scale.grad, 5 * want_scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(img.grad, 5 * want_img, rtol=1e-5, atol=1e-6)
    # fp16: G waits for the incoming gradient (a loss scaler's), so the gradients are computed in the backward.
    img16 = img.detach().half().requires_grad_()
    with Count():
        loss = K.siglip_loss(img16, txt.half(), scale, bias)
    assert len(calls) == 2
    with Count():
        loss.backward()
    assert len(calls) == 3


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_float64_runs_the_reference(loss):
    """float64 (a testing dtype; the kernels accumulate in fp32) takes the PyTorch reference: no kernel op."""
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.namespace)
            return func(*args, **(kwargs or {}))

    img, txt = features(20, 8, torch.float64)
    scalars = [torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)]
    fn, ref_fn = (K.siglip_loss, reference.siglip_loss) if loss == "siglip" else (K.clip_loss, reference.clip_loss)
    scalars = scalars[: 2 if loss == "siglip" else 1]
    with Ops():
        got, got_grads = run(fn, img, txt, scalars)
    assert ops and "finevit" not in ops
    want, want_grads = run(ref_fn, img, txt, scalars)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_loss_ops_have_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(8, 16)
        s = torch.empty(())
        rows = torch.empty(8)
        torch.ops.finevit.siglip_rows_loss(x, x, s, s, 0, rows)
        torch.ops.finevit.siglip_logit_grad(x, x, s, s, s, 0, torch.empty(8, 8), torch.empty(3, 1))
        torch.ops.finevit.lse_partials(x, x, s, 64, 128, True, torch.empty(1, 8, 2), torch.empty(1, 8, 2))
        torch.ops.finevit.clip_logit_grad(x, x, s, rows, rows, s, 0, True, torch.empty(8, 8), torch.empty(1))
        torch.ops.finevit.contrastive_matmul(torch.empty(8, 8), x, torch.empty(8, 16), True, 2)


@pytest.mark.gpu
def test_losses_compile_with_fullgraph(monkeypatch):
    monkeypatch.setenv("FINEVIT_KERNELS", "triton")
    img, txt = features(300, 64, torch.bfloat16)
    scale, bias = torch.tensor(10.0, device=DEVICE), torch.tensor(-10.0, device=DEVICE)
    compiled = torch.compile(lambda a, b: K.siglip_loss(a, b, scale, bias) + K.clip_loss(a, b, scale), fullgraph=True)
    eager = K.siglip_loss(img, txt, scale, bias) + K.clip_loss(img, txt, scale)
    torch.testing.assert_close(compiled(img, txt), eager)
