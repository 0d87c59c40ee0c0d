"""Shared checks of the integration tests: a patched model against its unpatched twin, and a spy on the kernels."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

import finevit.kernels
from finevit.integrations import apply_finevit_kernels

# Errors are max |Δ| / max |float64 reference| (floored at 1% of the largest reference of the same kind,
# outputs or gradients: some gradients are exactly zero, e.g. of the key bias, which softmax ignores). float32
# follows the kernel tests' rule (the patched model's error against the float64 model at most 2x, 3x for
# gradients, the unpatched float32 model's error) and the brief's bound; float64 compares the two models directly.
FP32_FACTOR = {"output": 2.0, "gradient": 3.0}
FP32_MAX_ERROR = 1e-5
FP64_MAX_ERROR = 1e-10


def _leaves(inputs: dict) -> dict:
    return {name: t for name, t in inputs.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}


def _outputs_and_grads(model: torch.nn.Module, inputs: dict, dtype: torch.dtype, run: Callable) -> dict:
    """{name: tensor} of the outputs of run(model, inputs in dtype), then every parameter and input gradient."""
    leaves = _leaves(inputs)
    m_inputs = {name: t.detach().to(dtype).requires_grad_() if name in leaves else t for name, t in inputs.items()}
    outputs = run(model, m_inputs)
    weights = torch.Generator().manual_seed(1)
    loss = sum((out * torch.randn(out.shape, generator=weights, dtype=torch.float64).to(out.device, dtype)).sum()
               for out in outputs.values())
    loss.backward()
    result = {f"output {name}": out.detach() for name, out in outputs.items()}
    result.update({f"gradient of {name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    result.update({f"gradient of input {name}": m_inputs[name].grad for name in leaves})
    return result


def _error(t: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    return ((t.double() - ref).abs().max() / ref.abs().max().clamp_min(floor)).item()


def _floors(reference: dict) -> dict:
    """{name: 1% of the largest |value| among the references of its kind (output / gradient)}."""
    largest: dict[str, float] = {}
    for name, ref in reference.items():
        kind = name.split()[0]
        largest[kind] = max(largest.get(kind, 1e-30), ref.abs().max().item())
    return {name: 0.01 * largest[name.split()[0]] for name in reference}


def assert_patched_matches(
    model: torch.nn.Module,
    make_inputs: Callable[[], dict],
    run: Callable[[torch.nn.Module, dict], dict],
    dtype: torch.dtype,
    *,
    fp64_max_error: float = FP64_MAX_ERROR,
    device: str = "cpu",
    **options,
) -> torch.nn.Module:
    """A patched copy of `model` gives the unpatched outputs, parameter gradients and input gradients.

    make_inputs() -> the model's inputs in float32 (float tensors are cast to `dtype` and become leaves
    that receive gradients); run(model, inputs) -> {name: tensor} of the outputs to compare (valid
    positions only, for padded batches). The loss is Σ output · w with fixed random w, so every output
    element gets its own gradient. `options` go to apply_finevit_kernels. Returns the patched model.
    """
    inputs = make_inputs()
    reference = _outputs_and_grads(copy.deepcopy(model).double(), inputs, torch.float64, run)
    patched = apply_finevit_kernels(copy.deepcopy(model).to(device, dtype), **options)
    on_device = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}
    ours = {name: t.cpu() for name, t in _outputs_and_grads(patched, on_device, dtype, run).items()}
    assert ours.keys() == reference.keys(), f"different outputs/gradients: {ours.keys() ^ reference.keys()}"
    floors = _floors(reference)
    if dtype == torch.float64:
        errors = {name: _error(ours[name], reference[name], floors[name]) for name in reference}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= fp64_max_error, f"{worst}: error {errors[worst]:.2e} > {fp64_max_error:.0e} in float64"
        return patched
    unpatched = _outputs_and_grads(copy.deepcopy(model).to(dtype), inputs, dtype, run)
    for name, ref in reference.items():
        ours_error, torch_error = _error(ours[name], ref, floors[name]), _error(unpatched[name], ref, floors[name])
        factor = FP32_FACTOR[name.split()[0]]
        assert ours_error <= factor * torch_error + 1e-7 and ours_error <= FP32_MAX_ERROR, (
            f"{name}: patched error {ours_error:.2e} vs the unpatched model's {torch_error:.2e} in {dtype} "
            f"(allowed {factor}x, and at most {FP32_MAX_ERROR:.0e})")
    return patched


class KernelSpy:
    """Records the calls of `finevit.kernels.<op>` (and still runs it): `calls` holds (args, kwargs)."""

    def __init__(self, monkeypatch, op: str = "varlen_attention"):
        self.calls: list[tuple[tuple, dict]] = []
        original = getattr(finevit.kernels, op)

        def spy(*args, **kwargs):
            self.calls.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(finevit.kernels, op, spy)
