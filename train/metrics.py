"""Training metrics: FLOPs of the actual packed batches, MFU, throughput, memory, GPU state, and where
they go (metrics.jsonl, TensorBoard when installed, a progress line on rank 0, a PNG of the curves).

FLOPs (model FLOPs, PaLM appendix B convention: a matmul of (m, k) by (k, n) costs 2·m·k·n; training =
3 × forward, i.e. the backward is twice the forward; activation-checkpoint recomputation is not counted).
They are counted from the real sequence lengths of each micro-batch, never from a nominal sequence length:

    transformer block, one sequence of n tokens, width D, MLP hidden M (fc1 width M·g, g = 2 for SwiGLU else 1):
        2·n·(4·D² + (g + 1)·D·M)            qkv, out projection, MLP
      + 4·n²·D                              q·kᵀ and attention·v (within the sequence only: packed attention
                                            is block-diagonal, so a batch costs Σ nᵢ², not (Σ nᵢ)²)
    vision tower:  Σ_images [ depth · block(nᵢ) + 2·nᵢ·(C·P²)·D  (patch embedding)
                              + 2·nᵢ·2D² + 4·nᵢ·D + 2·D² + 2·(g + 1)·D·M  (MAP head: k/v, attention, out, MLP) ]
    text tower:    Σ_texts depth · block(tᵢ)          (the embedding lookup costs no FLOPs)
    projections:   2·B·(D_img + D_txt)·E
    loss:          2·B_local·B_global·E               (the logits of this rank's rows against every text)
    MFU = training FLOPs per second per process / peak FLOPs of the device

Peak FLOPs: dense bf16 tensor-core peaks of known GPUs (torchtitan's table); an unknown GPU reports no MFU.
On CPU the peak is measured at start: float32 matmul throughput with the process's threads (a measured
peak, not a datasheet one, so CPU MFU reads "share of what this core does on a large matmul").
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("finevit.train")

# Dense bf16 peak FLOP/s (torchtitan/tools/utils.py get_peak_flops, NVIDIA datasheets).
GPU_PEAK_FLOPS = {
    "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12,
    "GH200": 989e12, "B200": 2.25e15, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12,
    "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
}


# ----------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------


def _block_flops(lengths: torch.Tensor, width: int, mlp_dim: int, gated: bool) -> float:
    n = lengths.double()
    g = 2 if gated else 1
    return float((2 * n * (4 * width**2 + (g + 1) * width * mlp_dim) + 4 * n * n * width).sum())


def forward_flops(model_config, image_lengths: torch.Tensor, text_lengths: torch.Tensor,
                  global_batch: int | torch.Tensor) -> dict[str, float | torch.Tensor]:
    """Forward FLOPs of one micro-batch on this rank, per part (formulas in the module doc). The lengths are
    CPU tensors; `global_batch` (the images of the micro-batch over every rank) may be a device scalar, which
    the trainer passes so that counting never waits for the device: the loss part is then a device scalar."""
    v, t = model_config.vision, model_config.text
    vg, tg = v.mlp == "swiglu", t.mlp == "swiglu"
    n = image_lengths.double()
    num_images, num_texts = len(image_lengths), len(text_lengths)
    vision = v.depth * _block_flops(image_lengths, v.width, v.mlp_dim, vg)
    vision += float((2 * n * v.patch_features * v.width).sum())
    head_mlp = 2 * ((2 if vg else 1) + 1) * v.width * v.mlp_dim
    vision += float((2 * n * 2 * v.width**2 + 4 * n * v.width).sum()) + num_images * (2 * v.width**2 + head_mlp)
    text = t.depth * _block_flops(text_lengths, t.width, t.mlp_dim, tg)
    proj = 2 * model_config.embed_dim * (num_images * v.width + num_texts * t.width)
    loss = 2 * num_images * global_batch * model_config.embed_dim
    return {"vision": vision, "text": text, "proj": proj, "loss": loss}


def training_flops(model_config, image_lengths, text_lengths, global_batch: int | torch.Tensor) -> float | torch.Tensor:
    """Model FLOPs of forward + backward (3 × forward) for one micro-batch on this rank."""
    return 3.0 * sum(forward_flops(model_config, image_lengths, text_lengths, global_batch).values())


def vision_features_flops(v, image_lengths: torch.Tensor) -> float:
    """Forward FLOPs of FineViT.forward_features (patch embedding + blocks; no pooling head)."""
    n = image_lengths.double()
    return v.depth * _block_flops(image_lengths, v.width, v.mlp_dim, v.mlp == "swiglu") + float(
        (2 * n * v.patch_features * v.width).sum())


def llm_forward_flops(llm_config, lengths: torch.Tensor, supervised: int) -> float:
    """Forward FLOPs of a Qwen2/Llama-style decoder over sequences of `lengths` real tokens (padding not
    counted), plus the LM head on the `supervised` positions only (VisionLanguageModel.forward)."""
    h, layers = llm_config.hidden_size, llm_config.num_hidden_layers
    heads = llm_config.num_attention_heads
    head_dim = getattr(llm_config, "head_dim", None) or h // heads
    kv = getattr(llm_config, "num_key_value_heads", None) or heads
    per_token = 2 * (h * heads * head_dim * 2 + 2 * h * kv * head_dim + 3 * h * llm_config.intermediate_size)
    n = lengths.double()
    attention = 4 * n * n * heads * head_dim  # QK^T and AV, causal work counted in full (as FA's FLOP counts)
    return float(layers * (per_token * n + attention).sum()) + 2.0 * h * llm_config.vocab_size * supervised


def vlm_training_flops(vision_config, llm_config, merger_params: int, image_lengths: torch.Tensor,
                       llm_lengths: torch.Tensor, supervised: int, freeze: str) -> float:
    """Model FLOPs of one stage-2 micro-batch, forward + backward: 3 × forward for trained parts; 2 × for the
    frozen LLM that the backward crosses (input gradients, no weight gradients); 1 × for a frozen encoder,
    which the backward does not reach."""
    merged = float(image_lengths.double().sum()) / 4
    vision = vision_features_flops(vision_config, image_lengths)
    merger = 2.0 * merger_params * merged
    llm = llm_forward_flops(llm_config, llm_lengths, supervised)
    return (1 if freeze == "projector" else 3) * vision + 3 * merger + (3 if freeze == "none" else 2) * llm


def sequence_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64).cpu()


# ----------------------------------------------------------------------------------------------------
# Peak FLOPs, memory, GPU state
# ----------------------------------------------------------------------------------------------------


def gpu_peak_flops(device: torch.device) -> tuple[float | None, str]:
    name = torch.cuda.get_device_name(device)
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):  # "H100 NVL" before "H100"
        if key in name:
            return GPU_PEAK_FLOPS[key], f"{name}: {GPU_PEAK_FLOPS[key] / 1e12:.0f} TFLOP/s bf16 dense"
    return None, f"{name}: unknown peak, no MFU"


def measure_cpu_peak_flops(seconds: float = 0.3, size: int = 512) -> float:
    """float32 matmul FLOP/s with the current torch threads (the best of short timed runs)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return gpu_peak_flops(device)
    peak = measure_cpu_peak_flops()
    return peak, f"CPU, measured float32 matmul peak {peak / 1e9:.0f} GFLOP/s with {torch.get_num_threads()} thread(s)"


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the last reset: CUDA allocated bytes, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return maxrss / (2**30 if sys.platform == "darwin" else 2**20)


class GPUMonitor:
    """GPU utilization and memory through nvidia-ml-py (pynvml); inert without CUDA or NVML."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            self.pynvml = pynvml
        except Exception as exc:  # no NVML, MIG slices, old drivers: metrics without GPU utilization
            logger.warning("GPU utilization unavailable (nvidia-ml-py): %s", exc)
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        try:
            util = self.pynvml.nvmlDeviceGetUtilizationRates(self.handle)
            memory = self.pynvml.nvmlDeviceGetMemoryInfo(self.handle)
            return {"gpu_util_pct": float(util.gpu), "gpu_mem_used_gib": memory.used / 2**30,
                    "gpu_mem_total_gib": memory.total / 2**30}
        except Exception:
            return {}


# ----------------------------------------------------------------------------------------------------
# Accumulating and writing
# ----------------------------------------------------------------------------------------------------


class Meter:
    """Counts between two log steps on this rank: images, patches, text tokens, FLOPs, data-wait time."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.images = self.patches = self.text_tokens = 0
        self.flops = 0.0
        self.data_seconds = 0.0
        self.steps = 0
        self.started = time.perf_counter()

    def as_tensor(self, device: torch.device) -> torch.Tensor:
        """The counts on `device`, for an all-reduce; `flops` may be a device scalar (`training_flops`)."""
        counts = torch.tensor([self.images, self.patches, self.text_tokens, 0.0, self.data_seconds],
                              dtype=torch.float64, device=device)
        counts[3] += self.flops
        return counts


class MetricsWriter:
    """Rank 0's sinks: metrics.jsonl (one JSON object per log step or evaluation), TensorBoard, console."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), max_queue=1000)
            except ImportError:
                logger.info("TensorBoard not installed (pip install tensorboard): metrics go to %s only", self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_progress(record: dict, total_steps: int, eta_s: float | None) -> str:
    """One console line per log step (rank 0)."""
    parts = [f"step {record['step']:>{len(str(total_steps))}}/{total_steps}",
             f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    parts += [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in record.items() if k.startswith("loss/")]
    if "logit_scale" in record:
        parts.append(f"scale {record['logit_scale']:.1f}")
    if "logit_bias" in record:
        parts.append(f"bias {record['logit_bias']:.2f}")
    parts += [f"gnorm {record['grad_norm']:.2f}", f"{record['images_per_s']:.1f} img/s",
              f"{record['patch_tokens_per_s'] / 1e3:.1f}k patch/s"]
    if "text_tokens_per_s" in record:
        parts.append(f"{record['text_tokens_per_s'] / 1e3:.1f}k txt/s")
    if "llm_tokens_per_s" in record:
        parts.append(f"{record['llm_tokens_per_s'] / 1e3:.1f}k llm tok/s")
    if record.get("mfu_pct") is not None:
        parts.append(f"mfu {record['mfu_pct']:.1f}%")
    parts += [f"data {record['data_wait_pct']:.0f}%", f"mem {record['peak_mem_gib']:.2f} GiB"]
    if "gpu_util_pct" in record:
        parts.append(f"gpu {record['gpu_util_pct']:.0f}%")
    if record.get("skipped"):
        parts.append(f"skipped {sum(record['skipped'].values())}")
    if eta_s is not None:
        parts.append(f"eta {format_seconds(eta_s)}")
    return " | ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """PNG of loss, learning rate, logit scale/bias, throughput and the evaluations over steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed: no training-curve plot")
        return None
    records = read_metrics(metrics_path)
    train = {}
    for r in records:  # a resumed run re-logs steps: the last record of a step wins
        if r.get("kind") == "train":
            train[r["step"]] = r
    train = [train[s] for s in sorted(train)]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    steps = [r["step"] for r in train]
    task_losses = sorted({k for r in train for k in r if k.startswith("loss/")})
    panels = [("loss", ["loss", *task_losses]), ("learning rate", ["lr"]),
              ("logit scale / bias", ["logit_scale", "logit_bias"]), ("gradient norm", ["grad_norm"]),
              ("images/s", ["images_per_s"]), ("MFU %", ["mfu_pct"])]
    panels = [(title, keys) for title, keys in panels if any(k in r for r in train for k in keys)]
    eval_keys = sorted({k for r in evals for k in r if k.endswith("recall@1") or k.endswith("accuracy")
                        or k.endswith("acc1")})
    common = os.path.commonprefix([k.split("/", 1)[0] for k in eval_keys]) if eval_keys else ""  # the dataset name
    if eval_keys:
        panels.append(("evaluation", eval_keys))
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        source = evals if title == "evaluation" else train
        for key in keys:
            xs = [r["step"] for r in source if r.get(key) is not None]
            ys = [r[key] for r in source if r.get(key) is not None]
            if xs:
                label = key[len(common):].lstrip("_/") if title == "evaluation" else key
                ax.plot(xs, ys, marker="o" if title == "evaluation" else None, ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{metrics_path.parent.name}: steps {steps[0]}..{steps[-1]}")
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
