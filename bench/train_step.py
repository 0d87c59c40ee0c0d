"""Benchmark of one vision-encoder training step: FineViT on finevit's kernels against a timm ViT on padded squares.

    python bench/train_step.py [--quick] [--out DIR] [--providers a,b,...] [--precision bf16|amp] [--seed N]
                               [--cpu-smoke]

Without a CUDA device it prints "no CUDA device: nothing to benchmark" and exits 0.

One step, the same for every provider: forward of the image tower to pooled features (B, D) -> L2-normalize in
fp32 -> SigLIP loss against a fixed matrix of random L2-normalized text features (B, D) with a learned logit scale
and bias -> backward -> AdamW step -> zero_grad. There is no text tower: its cost does not depend on the image
kernels under test, and a fixed text matrix keeps the step about the image tower plus the loss.

Cases (one token-budget batch each, drawn with --seed as bench/attention.py's mixed workload draws it: image side
√(h·w) log-uniform in 224..1024 px, aspect h/w log-uniform in 1/2..2, grid round(side·√aspect/P) ×
round(side/√aspect/P), drawn until the batch holds the budget; the last image may pass it)
    b16        ViT-B/16: width 768, depth 12, 12 heads of 64, MLP 3072, patch 16
    so400m14   SigLIP So400m/14: width 1152, depth 27, 16 heads of 72, MLP 4304, patch 14
    both with a MAP head (attention pooling), no class token, GELU (tanh), LayerNorm eps 1e-6.
`--quick`: b16 and so400m14 at 16k patch tokens per step, timed windows of >= 0.5 s and >= 3 steps. On an H100
with a cold Triton cache it took 74 s (2026-11-26), of which FineViT b16's first step (autotuning) 20 s, with
so400m14's FineViT failing at once (see bench/NOTES.md); a working head-dim-72 kernel adds its own autotuning, about
as long. The full run adds b16 at 64k and so400m14 at 32k, windows >= 2 s and >= 10 steps. An out-of-memory
provider is recorded as "oom" and the run goes on; a kernel fault that loses the CUDA context skips the rest,
keeps what was measured, and exits non-zero. Each case runs the baselines first, then finevit.

Providers
    finevit        FineViT on the packed batch at native resolution (each image its own size and aspect ratio):
                   varlen attention with fused 2D RoPE, patch_embed on uint8 pixels (normalization fused), MAP head;
                   loss finevit.kernels.siglip_loss
    finevit_nondet the same with the attention backward that adds dQ with atomics (deterministic=False: one pass
                   over the keys instead of two; not the default)
    timm_padded    timm VisionTransformer of the same width / depth / heads / MLP (class_token=False,
                   global_pool="map", act gelu_tanh, learned position embedding, dynamic_img_size, fused_attn, i.e.
                   F.scaled_dot_product_attention) on one padded square batch: image i resized to sᵢ × sᵢ
                   patches and pasted into the top-left corner of a black S × S canvas, S = max sᵢ; every canvas
                   token is computed (no mask, as a letterboxed batch is)
    timm_grouped   the same model, images grouped by sᵢ: one dense (bₛ, 3, s·P, s·P) forward per distinct side,
                   no padding; pooled features concatenated back in image order, one loss, one backward
    timm_fixed     the same model with every image resized to one square of s̄ = round(√(T/B)) patches: the same
                   images and about the same total tokens, but not the same content per image (small images
                   upsampled, large ones downsampled); the dense fixed-resolution reference, not a target baseline
    Equal image content: image i, a grid of hᵢ × wᵢ = nᵢ patches for finevit, is resized for the baselines to the
    square grid sᵢ = round(√nᵢ): the same pixel count within rounding (|sᵢ² − nᵢ| ≤ sᵢ), aspect squashed to
    1:1.
    The baselines take uint8 pixels on the GPU and normalize them inside the step (finevit's patch_embed does).
    Their SDPA backend: before timing, the flash and cuDNN backends are timed (fwd+bwd) on the provider's largest
    attention call, and the faster one is put first for the step (recorded as sdpa_backend). Their loss: open_clip's
    SigLipLoss when open_clip is installed, else `eager_siglip_loss` below, the same math (recorded as baseline_loss).

Precision (--precision; the same for every provider), optimizer
    bf16 (default)  parameters and activations in bf16 with fp32 master weights and AdamW states: what FSDP2's
                    MixedPrecisionPolicy(param_dtype=bf16) computes in the trainer. After backward the bf16 grads
                    are cast to the fp32 masters, fused AdamW updates them, and they are cast back to bf16.
    amp             fp32 parameters, torch.autocast(bfloat16) around the forward, fused AdamW on the parameters.
    AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.05 on matrices only, fused on CUDA. No torch.compile anywhere
    (compiling either model per block is an option a trainer has; it is not measured here).

FLOPs: model FLOPs of one step from the actual patch counts (2 per multiply-add forward, backward 2× forward)
    FLOP = 6·N_tok·T − 2·K·D·T + 6·N_img·B + 12·L·D·Σᵢ nᵢ² + 12·D·T + 6·B²·D
    T = Σᵢ nᵢ patch tokens of B images; L layers of width D, MLP width F; K = 3·P² pixel values per patch
    N_tok = L·(4D² + 2DF) + K·D + 2D²  the weights every token meets (qkv, proj, MLP; patch embedding; MAP k/v)
    −2·K·D·T                          uint8 pixels need no gradient: the patch embedding's backward is dW alone
    N_img = D² + 2DF                  the MAP head's output projection and MLP, once per image
    12·L·D·Σnᵢ²                       attention, 4·nᵢ²·D per layer forward (QKᵀ and PV over all heads), × 3
                                      for forward + backward (the backward's recompute of P is not model FLOPs)
    12·D·T, 6·B²·D                    MAP-head attention (one probe over nᵢ keys), the SigLIP logits
    The probe's own q projection (one vector per step) is left out. Each provider is charged the FLOPs of its own
    image content (finevit nᵢ, timm_padded / timm_grouped sᵢ², timm_fixed s̄²); padding is never model FLOPs
    (`computed_flop` in the JSON counts it). MFU = FLOP / step time / the measured bf16 matmul ceiling
    (bench/_harness.py), and / 989 TFLOP/s (H100 SXM dense bf16 datasheet) beside it.

Reported per (case, provider): step time (do_bench median, 20/80 % quantiles), images/s, patch tokens/s (image
content), model TFLOP/s and MFU, peak memory above the model and optimizer state, the first step's time (Triton
autotuning included), host synchronizations in one step (torch.cuda sync debug mode: should be 0), and finevit's
speedup over the provider (images/s ratio: every provider trains on the same images).
Targets (issue 18, which lowered issue 6's MFU target of 45%; H100/H200, b16, bf16): finevit's images/s ≥ 1.5× the
faster of timm_padded and timm_grouped (equal image content), and MFU ≥ 40% of the measured matmul ceiling; met only
when every b16 case meets them.
Files: bench/results/train_step_<gpu>_<date>.{json,md,png}; regenerate the .md/.png with
`python bench/_harness.py <file>.json`.

`--cpu-smoke` runs tiny fp32 towers (the tiny preset, 2 layers, patch 16 and 14, ~100 tokens per step) on the
CPU with FINEVIT_KERNELS=reference and a wall-clock timer, through the same code paths, to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import _harness as harness
import torch
import torch.nn.functional as F
from attention import mixed_workload
from torch import nn

from finevit import kernels
from finevit.model import FineViT, FineViTConfig, set_attention_deterministic

OURS = "finevit"
EQUAL_CONTENT_BASELINES = ("timm_padded", "timm_grouped")
DATASHEET_TFLOPS = 989.0  # H100 SXM, dense bf16
SPEEDUP_TARGET, MFU_TARGET = 1.5, 0.40
TARGET_PRESET = "b16"
LR, BETAS, WEIGHT_DECAY = 1e-4, (0.9, 0.95), 0.05
# do_bench's timed window per provider: at least `ms`, and at least `reps` steps of the provider's warm step time
TIMING = {"quick": {"ms": 500.0, "reps": 3}, "full": {"ms": 2000.0, "reps": 10}}


# ----------------------------------------------------------------------------------------------------
# Cases: a preset and one token-budget batch of image grids
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    preset: str
    config: FineViTConfig
    budget: int  # patch tokens per step the batch was drawn to
    grids: tuple[tuple[int, int], ...]  # (rows, cols) of patches of each image, as finevit sees it
    target: bool  # whether the targets apply to this case
    sides_px: tuple[float, float]  # range of the image sides √(h·w) the grids were drawn from, in pixels

    @property
    def name(self) -> str:
        budget = f"{self.budget // 1024}k" if self.budget % 1024 == 0 else str(self.budget)
        return f"{self.preset} {budget}"

    @property
    def lengths(self) -> list[int]:
        return [rows * cols for rows, cols in self.grids]

    @property
    def square_sides(self) -> list[int]:
        """The baselines' square grid of each image: sᵢ = round(√nᵢ) patches a side (equal image content)."""
        return [max(1, round(math.sqrt(n))) for n in self.lengths]

    @property
    def fixed_side(self) -> int:
        """timm_fixed's one square side: s̄ = round(√(T / B)) patches."""
        return max(1, round(math.sqrt(sum(self.lengths) / len(self.grids))))


def make_case(preset: str, config: FineViTConfig, budget: int, seed: int, target: bool,
              sides_px: tuple[float, float] = (224, 1024)) -> Case:
    workload = mixed_workload(budget, seed=seed, patch=config.patch_size, min_px=sides_px[0], max_px=sides_px[1])
    return Case(preset, config, budget, workload.grids, target, sides_px)


def describe_case(case: Case) -> dict:
    c, lengths, sides = case.config, case.lengths, case.square_sides
    return {"case": case.name, "preset": case.preset, "budget": case.budget, "target": case.target,
            "sides_px": list(case.sides_px), "patch": c.patch_size, "width": c.width, "depth": c.depth,
            "heads": c.num_heads, "mlp": c.mlp_dim,
            "images": len(lengths), "tokens": sum(lengths), "max_seqlen": max(lengths),
            "sum_n2": sum(n * n for n in lengths), "square_tokens": sum(s * s for s in sides),
            "padded_side": max(sides), "padded_tokens": len(sides) * max(sides) ** 2,
            "groups": len(set(sides)), "fixed_side": case.fixed_side,
            "fixed_tokens": len(sides) * case.fixed_side ** 2,
            "lengths": lengths}


def step_flops(config: FineViTConfig, lengths: Sequence[int]) -> float:
    """Model FLOPs of one training step over images of `lengths` patches (the module docstring's formula)."""
    d, layers, f, k = config.width, config.depth, config.mlp_dim, config.patch_features
    tokens, images = sum(lengths), len(lengths)
    per_token = layers * (4 * d * d + 2 * d * f) + k * d + 2 * d * d  # N_tok
    per_image = d * d + 2 * d * f  # N_img
    attention = 12 * layers * d * sum(n * n for n in lengths)
    return float(6 * per_token * tokens - 2 * k * d * tokens + 6 * per_image * images + attention
                 + 12 * d * tokens + 6 * images * images * d)


# ----------------------------------------------------------------------------------------------------
# Losses and the optimizer (shared by every provider)
# ----------------------------------------------------------------------------------------------------


def eager_siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: torch.Tensor) -> torch.Tensor:
    """open_clip's SigLipLoss (world_size 1), line for line: logits = s·img @ txtᵀ + b, labels 2·I − 1,
    loss = −Σ logsigmoid(labels · logits) / B. Used for the baselines where open_clip is not installed."""
    logits = logit_scale * img @ txt.T + logit_bias
    n = img.shape[0]
    ones = torch.ones(n, n, device=img.device, dtype=img.dtype)
    labels = 2 * torch.eye(n, device=img.device, dtype=img.dtype) - ones  # +1 on matching pairs, −1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / n


def baseline_loss() -> tuple[Callable, str]:
    """(loss function, its name): open_clip's SigLipLoss when installed, else the eager copy of its math."""
    if importlib.util.find_spec("open_clip") is None:
        return eager_siglip_loss, "eager_siglip_loss (open_clip's SigLipLoss math; open_clip not installed)"
    from open_clip.loss import SigLipLoss
    return SigLipLoss(), "open_clip.loss.SigLipLoss"


class AdamWWithMasters:
    """AdamW over fp32 master copies of the low-precision parameters, plain AdamW over the fp32 ones.

    bf16 policy: the model computes with bf16 parameters; step() casts their grads into the fp32 masters, runs
    fused AdamW on the masters and casts them back (FSDP2's MixedPrecisionPolicy on one device). Weight decay on
    matrices only.
    """

    def __init__(self, params: Sequence[nn.Parameter], device: torch.device):
        self.params = [p for p in params if p.requires_grad]
        self.low = [p for p in self.params if p.dtype != torch.float32]
        self.masters = [p.detach().float() for p in self.low]
        master_of = {id(p): m for p, m in zip(self.low, self.masters)}
        updated = [master_of.get(id(p), p) for p in self.params]
        groups = [{"params": [p for p in updated if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in updated if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=device.type == "cuda")

    def step(self) -> None:
        for p, master in zip(self.low, self.masters):
            master.grad = p.grad.float() if p.grad is not None else None
        self.optimizer.step()
        if self.low:
            with torch.no_grad():
                torch._foreach_copy_(self.low, self.masters)  # cast back to the compute dtype

    def zero_grad(self) -> None:
        for p in self.params + self.masters:
            p.grad = None


# ----------------------------------------------------------------------------------------------------
# Providers: build(case, device, dtype) -> the tower, its forward to pooled features, what it computes
# ----------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The provider cannot run here (missing package): recorded as skipped."""


@dataclass
class Tower:
    model: nn.Module
    forward: Callable[[], torch.Tensor]  # -> pooled features (B, D), images in the case's order
    lengths: list[int]  # patch tokens of each image's content as this provider sees it (FLOPs, tokens/s)
    computed_lengths: list[int]  # tokens the model computes per image, padding included
    attention_shape: tuple[int, int] | None  # (batch, sequence) of its largest dense attention call
    loss: Callable
    describe: dict


def _random_uint8(shape: tuple[int, ...], device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen)


def build_finevit(case: Case, device: torch.device, dtype: torch.dtype, gen: torch.Generator,
                  deterministic: bool = True) -> Tower:
    with torch.device(device):
        model = FineViT(case.config)
        model.init_weights()
    model.to(dtype).train()
    set_attention_deterministic(model, deterministic)
    lengths = case.lengths
    patches = _random_uint8((sum(lengths), case.config.patch_features), device, gen)  # (T, C·P·P)
    positions = torch.cat([
        torch.stack([torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)], dim=1)
        for rows, cols in case.grids
    ]).to(device=device, dtype=torch.int32)  # (T, 2) = (row, col)
    cu_seqlens = kernels.cu_seqlens_from_lengths(lengths).to(device)
    max_seqlen = max(lengths)

    def forward() -> torch.Tensor:
        return model(patches, positions, cu_seqlens, max_seqlen)[1]  # (B, D)

    return Tower(model, forward, lengths, lengths, None, kernels.siglip_loss,
                 {"layout": "packed, native resolution"})


def timm_vit(config: FineViTConfig, img_size: int) -> nn.Module:
    """timm's VisionTransformer with FineViT's width, depth, heads, MLP, norm and head (MAP, no class token)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as error:
        raise Unavailable("timm is not installed") from error
    if config.mlp != "gelu":
        raise Unavailable(f"the timm baseline has a GELU MLP, the preset has {config.mlp}")
    model = VisionTransformer(
        img_size=img_size, patch_size=config.patch_size, in_chans=config.in_channels, num_classes=0,
        global_pool="map", embed_dim=config.width, depth=config.depth, num_heads=config.num_heads,
        mlp_ratio=(config.mlp_dim + 0.5) / config.width,  # timm takes int(width · ratio) = mlp_dim
        qkv_bias=config.qkv_bias, class_token=False, dynamic_img_size=True, act_layer="gelu_tanh",
        norm_layer=partial(nn.LayerNorm, eps=config.norm_eps),
    )
    assert model.blocks[0].mlp.fc1.out_features == config.mlp_dim, model.blocks[0].mlp.fc1
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True  # F.scaled_dot_product_attention
    return model


def build_timm(layout: str, case: Case, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Tower:
    """layout: "padded" (one S × S canvas per image), "grouped" (one batch per square side), "fixed" (one side)."""
    c, sides, patch = case.config, case.square_sides, case.config.patch_size
    images = len(sides)
    mean = torch.tensor(c.image_mean, device=device)[:, None, None]  # (C, 1, 1)
    std = torch.tensor(c.image_std, device=device)[:, None, None]
    alpha, beta = (1 / (255 * std)).to(dtype), (-mean / std).to(dtype)  # (x / 255 − mean) / std = x·α + β

    def normalize(pixels: torch.Tensor) -> torch.Tensor:  # uint8 (b, C, H, W) -> dtype
        return pixels.to(dtype) * alpha + beta

    if layout == "padded":
        side = max(sides)
        canvas = torch.zeros(images, c.in_channels, side * patch, side * patch, dtype=torch.uint8, device=device)
        for i, s in enumerate(sides):
            canvas[i, :, : s * patch, : s * patch] = _random_uint8((c.in_channels, s * patch, s * patch), device, gen)
        groups = [(None, canvas)]
        lengths, computed, attention = [s * s for s in sides], [side * side] * images, (images, side * side)
        describe = {"layout": f"padded to {side}x{side} patches", "side": side}
    elif layout == "grouped":
        by_side: dict[int, list[int]] = {}
        for i, s in enumerate(sides):
            by_side.setdefault(s, []).append(i)
        groups = [(idx, _random_uint8((len(idx), c.in_channels, s * patch, s * patch), device, gen))
                  for s, idx in sorted(by_side.items())]
        order = torch.tensor([i for idx, _ in groups for i in idx], device=device)
        inverse = torch.argsort(order)  # row of image i in the concatenated pooled features
        lengths = computed = [s * s for s in sides]
        biggest = max(by_side.items(), key=lambda item: len(item[1]) * item[0] ** 4)
        attention = (len(biggest[1]), biggest[0] ** 2)
        describe = {"layout": f"{len(groups)} dense batches, one per square side",
                    "group_sizes": {str(s): len(idx) for s, idx in sorted(by_side.items())}}
    elif layout == "fixed":
        side = case.fixed_side
        groups = [(None, _random_uint8((images, c.in_channels, side * patch, side * patch), device, gen))]
        lengths = computed = [side * side] * images
        attention = (images, side * side)
        describe = {"layout": f"every image at {side}x{side} patches", "side": side}
    else:
        raise ValueError(layout)

    with torch.device(device):
        model = timm_vit(c, img_size=max(sides) * patch if layout != "fixed" else case.fixed_side * patch)
    model.to(dtype).train()

    def forward() -> torch.Tensor:
        pooled = [model(normalize(pixels)) for _, pixels in groups]  # (b, D) each
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled)[inverse]

    loss, loss_name = baseline_loss()
    describe["loss"] = loss_name
    return Tower(model, forward, lengths, computed, attention, loss, describe)


@dataclass(frozen=True)
class Provider:
    build: Callable[[Case, torch.device, torch.dtype, torch.Generator], Tower]
    description: str


PROVIDERS: dict[str, Provider] = {
    "finevit": Provider(build_finevit, "FineViT on the packed native-resolution batch: finevit varlen attention "
                        "(fused 2D RoPE), patch_embed (uint8, normalization fused), siglip_loss"),
    "finevit_nondet": Provider(partial(build_finevit, deterministic=False), "finevit with the attention backward "
                               "that adds dQ with atomics (varlen_attention(deterministic=False))"),
    "timm_padded": Provider(partial(build_timm, "padded"), "timm VisionTransformer (SDPA), image i resized to "
                            "s_i x s_i patches (s_i = round(sqrt(n_i))), padded to the batch's largest side"),
    "timm_grouped": Provider(partial(build_timm, "grouped"), "timm VisionTransformer (SDPA), the s_i x s_i images "
                             "grouped by side: one dense forward per distinct side, no padding"),
    "timm_fixed": Provider(partial(build_timm, "fixed"), "timm VisionTransformer (SDPA), every image at one side "
                           "round(sqrt(T/B)): same total tokens, not the same per-image content (reference)"),
}


# ----------------------------------------------------------------------------------------------------
# The training step and its measurements
# ----------------------------------------------------------------------------------------------------


def _sdpa_context(backends: list | None):
    """sdpa_kernel with `backends` in priority order (torch >= 2.6 takes set_priority), or nothing."""
    if not backends:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(backends, set_priority=True)
    return sdpa_kernel(backends)


def fastest_sdpa_backend(shape: tuple[int, int] | None, config: FineViTConfig,
                         device: torch.device) -> tuple[list | None, dict]:
    """Time SDPA's flash and cuDNN backends (fwd+bwd, bf16) on (batch, heads, seq, head_dim); the faster goes first.

    Returns the backend priority list for the step (the winner, then efficient and math for any call the winner
    cannot run, such as an odd shape) and the timings in ms (None where a backend cannot run the shape).
    """
    if device.type != "cuda" or shape is None:
        return None, {}
    from torch.nn.attention import SDPBackend
    batch, seq = shape
    q, k, v = (torch.randn(batch, config.num_heads, seq, config.head_dim, device=device, dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    timings: dict[str, float | None] = {}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
        def forward(backend=getattr(SDPBackend, name)):  # noqa: B008 (binds this iteration's backend)
            with _sdpa_context([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            timings[name] = harness.measure(forward, "fwd+bwd", device, (q, k, v))["ms"]
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:  # this backend cannot run the shape here
            timings[name] = None
    ran = [name for name, ms in timings.items() if ms is not None]
    if not ran:
        return None, timings
    best = min(ran, key=timings.__getitem__)
    return [getattr(SDPBackend, best), SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], timings


def training_step(tower: Tower, width: int, precision: str, device: torch.device, gen: torch.Generator,
                  sdpa_backends: list | None) -> tuple[Callable[[], torch.Tensor], AdamWWithMasters]:
    """The timed step: forward, SigLIP loss against fixed text features, backward, AdamW, zero_grad."""
    txt = F.normalize(torch.randn(len(tower.lengths), width, device=device, generator=gen), dim=-1)  # (B, D) fp32
    log_scale = nn.Parameter(torch.tensor(math.log(10.0), device=device))  # SigLIP's init
    bias = nn.Parameter(torch.tensor(-10.0, device=device))
    optimizer = AdamWWithMasters([*tower.model.parameters(), log_scale, bias], device)
    autocast = precision == "amp"

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), _sdpa_context(sdpa_backends):
            pooled = tower.forward()  # (B, D)
        img = F.normalize(pooled.float(), dim=-1)
        loss = tower.loss(img, txt, log_scale.exp(), bias)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()  # never read on the host inside the step

    return step, optimizer


def count_host_syncs(step: Callable[[], object], device: torch.device) -> int | None:
    """Synchronizing CUDA calls in one step, from torch.cuda's sync debug mode (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def _first_weight(model: nn.Module) -> torch.Tensor:
    return model.blocks[0].attn.qkv.weight  # the same layer in FineViT and timm's ViT


def run_provider(name: str, case: Case, device: torch.device, precision: str, dtype: torch.dtype,
                 ceiling: float, seed: int, timing_plan: dict) -> dict:
    """Build, check and time one provider's training step on one case -> its result record."""
    record = {"case": case.name, "mode": "step", "provider": name}
    gen = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)
    tower = step = optimizer = None
    try:
        tower = PROVIDERS[name].build(case, device, dtype, gen)
        sdpa_backends, sdpa_ms = fastest_sdpa_backend(tower.attention_shape, case.config, device)
        step, optimizer = training_step(tower, case.config.width, precision, device, gen, sdpa_backends)
        before = _first_weight(tower.model).detach().clone()
        start = time.perf_counter()
        loss = step()  # first call: Triton autotuning, cuDNN plans
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_call_s = time.perf_counter() - start
        loss = float(loss)
        if not math.isfinite(loss):
            raise RuntimeError(f"the first step's loss is {loss}")
        if torch.equal(before, _first_weight(tower.model)):
            raise RuntimeError("the first step left the first block's weights unchanged")
        live = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
        start = time.perf_counter()
        step()  # one warm step, to size the timed window
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rep_ms = max(timing_plan["ms"], timing_plan["reps"] * (time.perf_counter() - start) * 1e3)
        timing = harness.time_fn(step, device, rep_ms=rep_ms)
        peak = harness.peak_memory_mib(step, device)
        syncs = count_host_syncs(step, device)
        lengths, computed = tower.lengths, tower.computed_lengths
        record.update(tower.describe)
    except Exception as error:  # noqa: BLE001 - recorded, the run goes on
        status = ("oom" if isinstance(error, torch.cuda.OutOfMemoryError)
                  else "skipped" if isinstance(error, Unavailable) else "failed")
        return {**record, "status": status, "reason": harness.error_reason(error)}
    finally:
        del tower, step, optimizer
        with contextlib.suppress(Exception):  # a kernel fault leaves the CUDA context unusable: see context_lost
            harness.free_memory(device)
    seconds = timing["ms"] * 1e-3
    flop = step_flops(case.config, lengths)
    return {
        **record, "status": "ok", "reason": None, **timing, "peak_mem_mib": peak, "live_mem_mib": live,
        "first_call_s": first_call_s, "first_loss": loss, "rep_ms": rep_ms, "host_syncs_per_step": syncs,
        "sdpa_backend": sdpa_backends[0].name if sdpa_backends else None, "sdpa_ms": sdpa_ms,
        "images": len(lengths), "tokens": sum(lengths), "computed_tokens": sum(computed),
        "images_per_s": len(lengths) / seconds, "tokens_per_s": sum(lengths) / seconds,
        "flop": flop, "computed_flop": step_flops(case.config, computed),
        **harness.throughput(timing["ms"], flop, ceiling),
        "mfu_datasheet": flop / seconds / (DATASHEET_TFLOPS * 1e12),
    }


def context_lost(device: torch.device) -> str | None:
    """Why the CUDA context can run nothing more (a sticky error such as an illegal memory access), or None."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001
        return harness.error_reason(error)
    return None


def _progress_line(r: dict) -> str:
    head = f"{r['case']:<14} {r['provider']:<13}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    line = (f"{head} {r['ms']:8.2f} ms ({r['ms_q20']:.2f}-{r['ms_q80']:.2f}) {r['images_per_s']:8.1f} img/s "
            f"{r['tokens_per_s'] / 1e3:8.1f}k tok/s {r['throughput']:7.1f} TFLOP/s")
    if r.get("ceiling_share") is not None:
        line += f" MFU {100 * r['ceiling_share']:4.1f}%"
    if r.get("peak_mem_mib") is not None:
        line += f"  peak +{r['peak_mem_mib']:.0f} MiB"
    if r.get("host_syncs_per_step"):
        line += f"  {r['host_syncs_per_step']} host syncs/step"
    return line


# ----------------------------------------------------------------------------------------------------
# Targets of issue 18, and the step table
# ----------------------------------------------------------------------------------------------------


def check_targets(results: list[dict], cases: list[dict], gpu: str) -> list[dict]:
    ok = {(r["case"], r["provider"]): r for r in results if r["status"] == "ok"}
    checks = []
    for case in (c for c in cases if c["target"]):
        name = case["case"]
        ours = ok.get((name, OURS))
        bases = [ok[(name, p)] for p in EQUAL_CONTENT_BASELINES if (name, p) in ok]
        speedup = {"name": f"{name}: {OURS} images/s / best equal-content baseline", "threshold": SPEEDUP_TARGET,
                   "value": None, "met": None, "detail": "not measured"}
        mfu = {"name": f"{name}: {OURS} MFU (measured bf16 matmul ceiling)", "threshold": MFU_TARGET,
               "value": None, "met": None, "detail": "not measured"}
        if ours is not None and bases:
            fastest = min(bases, key=lambda r: r["ms"])
            ratio = ours["images_per_s"] / fastest["images_per_s"]
            detail = f"vs {fastest['provider']} ({fastest['images_per_s']:.0f} img/s); H100 target, ran on {gpu}"
            fixed = ok.get((name, "timm_fixed"))
            if fixed is not None:
                detail += f"; vs timm_fixed (same total tokens) {ours['images_per_s'] / fixed['images_per_s']:.2f}x"
            speedup.update(value=ratio, met=ratio >= SPEEDUP_TARGET, detail=detail)
        if ours is not None and ours.get("ceiling_share") is not None:
            mfu.update(value=ours["ceiling_share"], met=ours["ceiling_share"] >= MFU_TARGET,
                       detail=f"{ours['throughput']:.0f} TFLOP/s; {100 * ours['mfu_datasheet']:.1f}% of the "
                              f"{DATASHEET_TFLOPS:.0f} TFLOP/s datasheet")
        checks += [speedup, mfu]
    return checks


def _print_checks(checks: list[dict]) -> None:
    print(f"\nTargets (issue 18; H100/H200, {TARGET_PRESET}, bf16):")
    for c in checks:
        if c["value"] is None:
            print(f"  {c['name']:<62} {'-':>7}  (>= {c['threshold']:<4g})  not measured")
            continue
        status = "met" if c["met"] else "NOT MET"
        print(f"  {c['name']:<62} {c['value']:7.2f}  (>= {c['threshold']:<4g})  {status:<8} {c['detail']}")


def step_table(results: list[dict]) -> dict:
    ok = {(r["case"], r["provider"]): r for r in results if r["status"] == "ok"}
    cases, providers = list(dict.fromkeys(r["case"] for r in results)), list(PROVIDERS)
    rows = []
    for r in sorted(results, key=lambda r: (cases.index(r["case"]), providers.index(r["provider"]))):
        if r["status"] != "ok":
            rows.append([r["case"], r["provider"], r["status"]] + [""] * 10)
            continue
        ours = ok.get((r["case"], OURS))
        speedup = ours["images_per_s"] / r["images_per_s"] if ours and r["provider"] != OURS else None
        rows.append([
            r["case"], r["provider"], str(r["images"]), f"{r['tokens']} / {r['computed_tokens']}",
            f"{r['ms']:.4g} ({r['ms_q20']:.4g}–{r['ms_q80']:.4g})", f"{r['images_per_s']:.4g}",
            f"{r['tokens_per_s'] / 1e3:.4g}k",
            f"{100 * r['ceiling_share']:.1f}%" if r.get("ceiling_share") is not None else "–",
            f"{100 * r['mfu_datasheet']:.1f}%",
            f"{r['peak_mem_mib']:.0f}" if r.get("peak_mem_mib") is not None else "–",
            str(r["host_syncs_per_step"]) if r.get("host_syncs_per_step") is not None else "–",
            r.get("sdpa_backend") or "–",
            f"{speedup:.2f}×" if speedup else "",
        ])
    return {
        "title": "Training step",
        "note": ("images/s and patch tokens/s count each provider's image content (padding excluded); tokens: "
                 "content / computed (padding included). MFU: model FLOPs of the content over the measured bf16 "
                 f"matmul ceiling, and over the {DATASHEET_TFLOPS:.0f} TFLOP/s datasheet. Peak: MiB above the model "
                 "and optimizer state. Syncs: synchronizing CUDA calls in one step. Last column: finevit's "
                 "images/s over this provider's."),
        "header": ["case", "provider", "images", "tokens", "step ms (q20–q80)", "images/s", "patch tok/s",
                   "MFU", "MFU (989)", "peak MiB", "syncs", "SDPA", f"{OURS} speedup"],
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def plan(args) -> tuple[list[Case], list[str], str, torch.dtype]:
    """(cases, providers, precision, parameter dtype) for the chosen run."""
    providers = list(PROVIDERS)
    if args.cpu_smoke:
        tiny = FineViTConfig.from_name("tiny", depth=2)
        tiny14 = FineViTConfig.from_name("tiny", depth=2, patch_size=14)
        cases = [make_case("tiny", tiny, 96, args.seed, target=True, sides_px=(32, 112)),
                 make_case("tiny14", tiny14, 96, args.seed, target=False, sides_px=(28, 98))]
        return cases, providers, "fp32", torch.float32
    b16, so400m = FineViTConfig.from_name("b16"), FineViTConfig.from_name("so400m14")
    budgets = [("b16", b16, 16384), ("so400m14", so400m, 16384)]
    if not args.quick:
        budgets = [("b16", b16, 16384), ("b16", b16, 65536), ("so400m14", so400m, 16384), ("so400m14", so400m, 32768)]
    cases = [make_case(preset, config, budget, args.seed, target=preset == TARGET_PRESET)
             for preset, config, budget in budgets]
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    return cases, providers, args.precision, dtype


def library_versions() -> dict:
    """The baselines' library versions and which SigLIP loss they run."""
    info = {}
    for package in ("timm", "open_clip"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    info["baseline_loss"] = baseline_loss()[1]
    return info


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=("bf16", "amp"), default="bf16",
                        help="bf16: bf16 params + fp32 masters (default); amp: fp32 params + autocast")


def main(argv: list[str] | None = None) -> None:
    run = harness.start(__doc__, PROVIDERS, argv, ops=("varlen_attention", "patch_embed", "siglip_loss"),
                        libraries=library_versions, quick_help="b16 and so400m14 at 16k tokens per step",
                        seed_help="seed of the image sizes, pixels, weights and texts", modes_help=None,
                        options=add_options)
    device = run.device
    if not run.smoke:
        torch.set_float32_matmul_precision("high")  # amp: fp32 patch embedding and heads on TF32, as usual
        torch.backends.cudnn.benchmark = True  # the baselines' patch-embedding convolution
    cases, providers, precision, dtype = plan(run.args)
    cases = harness.warmup_cases(cases)
    providers = run.providers(providers)
    timing_plan = TIMING["quick" if run.args.quick else "full"]  # CUDA only: the CPU loop times a few steps
    payload = run.payload(
        "train_step", providers=providers, modes=["step"], layout={"panel": "preset", "x": "budget"}, batches={},
        tables=[],
        config={"precision": precision,
                "optimizer": f"AdamW lr {LR}, betas {BETAS}, weight decay {WEIGHT_DECAY} (matrices), "
                             f"fused on CUDA" + (", fp32 masters of bf16 params" if precision == "bf16" else ""),
                "text": "fixed random L2-normalized features (B, D), no text tower", "torch_compile": False,
                "equal_image_content": "image i (n_i = h_i*w_i patches) -> square s_i = round(sqrt(n_i)) "
                                       "patches for the baselines",
                "timing": timing_plan if device.type == "cuda" else "wall clock, >= 5 steps and >= 50 ms",
                "datasheet_tflops": DATASHEET_TFLOPS,
                "images": "side sqrt(h*w) log-uniform in each case's sides_px, aspect h/w log-uniform in "
                          "1/2..2, drawn with the seed until the budget is reached"})
    results = payload["results"]
    # The baselines run first in each case, so their numbers survive a fault in our kernels.
    run_order = sorted(providers, key=lambda p: p == OURS)
    lost = None
    for case in cases:
        payload["cases"].append(describe_case(case))
        payload["batches"][case.name] = {"grids": [list(g) for g in case.grids], "square_sides": case.square_sides}
        for name in run_order:
            if lost:
                record = {"case": case.name, "mode": "step", "provider": name, "status": "skipped",
                          "reason": f"CUDA context lost earlier ({lost})"}
            else:
                record = run_provider(name, case, device, precision, dtype, run.ceilings["matmul"]["tflops"],
                                      run.args.seed, timing_plan)
                if record["status"] == "failed" and (lost := context_lost(device)):
                    lost = f"{record['provider']} on {record['case']}: {lost}"
            print(_progress_line(record), flush=True)
            results.append(record)
        harness.add_ratios(results, OURS)
        run.save(payload)

    if harness.warmup_shard() is not None:
        return
    payload["checks"] = check_targets(results, payload["cases"], run.env["gpu"])
    payload["tables"] = [step_table(results)]
    run.finish(payload, lambda: _print_checks(payload["checks"]))
    if lost:
        sys.exit(f"the CUDA context was lost ({lost}): later providers were not run")


if __name__ == "__main__":
    main()
