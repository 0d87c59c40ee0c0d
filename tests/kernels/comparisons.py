"""Comparison rules for kernel tests (STYLE.md): tolerance by comparison, not by a hand-picked atol."""

import torch


def assert_error_within(ours, ref64, torch_lowp, factor, name="output", floor=1e-6):
    """|ours − ref64|.max() <= factor · |torch_lowp − ref64|.max() (+ a tiny floor for exact cases).

    ref64: the computation in float64; torch_lowp: PyTorch's same computation in the kernel's dtype.
    NaN or inf anywhere in `ours` fails.
    """
    bad = torch.nonzero(~torch.isfinite(ours))[:5].tolist()
    assert not bad, f"{name}: non-finite values at {bad}"
    ours_err = (ours.double() - ref64).abs().max().item()
    torch_err = (torch_lowp.double() - ref64).abs().max().item()
    assert ours_err <= factor * torch_err + floor, (
        f"{name}: max error {ours_err:.3e} > {factor} x PyTorch's {torch_err:.3e} in {ours.dtype}"
    )
