"""bench/train_step.py runs end to end without a GPU: `--cpu-smoke` goes through the same code paths as a real run
(token-budget batches, FineViT and the three timm baselines, the SigLIP loss, AdamW, timing, FLOPs and MFU, ratios,
targets, JSON, markdown, plot), and a plain run exits 0 saying there is nothing to benchmark. Both run as
subprocesses with CUDA hidden, so they behave the same on GPU hosts. In-process: the FLOP formula's per-token
weights are FineViT's, the eager SigLIP loss the baselines fall back to is open_clip's, and the bf16 optimizer
keeps its fp32 masters and the bf16 parameters in step.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "train_step.py"
PROVIDERS = {"finevit", "timm_padded", "timm_grouped", "timm_fixed"}


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("FINEVIT_KERNELS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports its siblings `_harness`, `attention`
    spec = importlib.util.spec_from_file_location("finevit_bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_step_bench_cpu_smoke_writes_json_markdown_and_plot(tmp_path):
    proc = run_bench("--cpu-smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    (json_path,) = tmp_path.glob("train_step_cpu_*.json")
    payload = json.loads(json_path.read_text())
    for key in ("gpu", "driver", "torch", "triton", "python", "commit", "date_utc"):
        assert key in payload["env"], key
    config = payload["config"]
    assert config["finevit.varlen_attention"] == "finevit.kernels.reference.varlen_attention"
    assert config["precision"] == "fp32" and config["torch_compile"] is False
    expected_loss = "open_clip" if importlib.util.find_spec("open_clip") else "eager_siglip_loss"
    assert config["baseline_loss"].startswith(expected_loss)

    cases = {c["case"]: c for c in payload["cases"]}
    assert {c["patch"] for c in cases.values()} == {16, 14}
    for c in cases.values():
        grids, sides = payload["batches"][c["case"]]["grids"], payload["batches"][c["case"]]["square_sides"]
        assert c["lengths"] == [r * k for r, k in grids] and c["tokens"] == sum(c["lengths"]) >= c["budget"]
        # Equal image content: each baseline image is the square grid nearest to its patch count.
        assert all(abs(s * s - n) <= s for s, n in zip(sides, c["lengths"]))
        assert c["padded_tokens"] == len(sides) * max(sides) ** 2 >= c["square_tokens"] == sum(s * s for s in sides)

    ok = [r for r in payload["results"] if r["status"] == "ok"]
    assert len(ok) == len(payload["results"]) == len(cases) * len(PROVIDERS), payload["results"]
    for r in ok:
        c = cases[r["case"]]
        assert r["ms"] > 0 and r["throughput"] > 0 and 0 < r["first_loss"] < 100
        assert r["images"] == c["images"]
        assert r["images_per_s"] == pytest.approx(r["images"] / (r["ms"] * 1e-3))
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["ms"] * 1e-3))
        assert r["mfu_datasheet"] == pytest.approx(r["flop"] / (r["ms"] * 1e-3) / 989e12)
        assert r["ceiling_share"] == pytest.approx(r["throughput"] / payload["ceilings"]["matmul"]["tflops"])
        expected_tokens = {"finevit": c["tokens"], "timm_padded": c["square_tokens"],
                           "timm_grouped": c["square_tokens"], "timm_fixed": c["fixed_tokens"]}[r["provider"]]
        assert r["tokens"] == expected_tokens
        assert r["computed_tokens"] == (c["padded_tokens"] if r["provider"] == "timm_padded" else r["tokens"])
        if r["provider"] == "finevit":
            d, f, k, layers = c["width"], c["mlp"], 3 * c["patch"] ** 2, c["depth"]
            t, b = c["tokens"], c["images"]
            assert r["flop"] == (6 * (layers * (4 * d * d + 2 * d * f) + k * d + 2 * d * d) * t - 2 * k * d * t
                                 + 6 * (d * d + 2 * d * f) * b + 12 * layers * d * c["sum_n2"] + 12 * d * t
                                 + 6 * b * b * d)
        else:
            assert r["ours_ratio"] > 0
    assert [c["met"] is not None for c in payload["checks"]] == [True, True]  # the target case: speedup, MFU

    markdown = json_path.with_suffix(".md").read_text()
    for heading in ("## Targets", "## Throughput", "## Training step", "| case |"):
        assert heading in markdown, heading
    if importlib.util.find_spec("matplotlib") is not None:
        assert json_path.with_suffix(".png").stat().st_size > 0
    assert "Targets" in proc.stdout


def test_train_step_bench_without_cuda_exits_zero_with_a_message(tmp_path):
    proc = run_bench("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device: nothing to benchmark" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_flop_formula_counts_the_weights_each_token_and_image_meets(bench):
    config = bench.FineViTConfig.from_name("tiny", depth=3, patch_size=14)
    model = bench.FineViT(config)
    per_token = (sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and n.endswith("weight")
                     and p.ndim == 2) + model.patch_embed.weight.numel() + model.head.kv.weight.numel())
    per_image = model.head.proj.weight.numel() + model.head.mlp.fc1.weight.numel() + model.head.mlp.fc2.weight.numel()
    d, k = config.width, config.patch_features
    lengths = [1, 17, 129]
    t, b = sum(lengths), len(lengths)
    attention = 12 * config.depth * d * sum(n * n for n in lengths) + 12 * d * t
    assert bench.step_flops(config, lengths) == (6 * per_token * t - 2 * k * d * t + 6 * per_image * b + attention
                                                 + 6 * b * b * d)


def test_eager_siglip_loss_is_open_clips_and_finevits(bench):
    from finevit.kernels import reference

    img = torch.nn.functional.normalize(torch.randn(7, 24, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(7, 24, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(12.0, dtype=torch.float64), torch.tensor(-9.0, dtype=torch.float64)
    loss = bench.eager_siglip_loss(img, txt, scale, bias)
    torch.testing.assert_close(loss, reference.siglip_loss(img, txt, scale, bias), rtol=1e-12, atol=0)
    if importlib.util.find_spec("open_clip") is not None:
        from open_clip.loss import SigLipLoss
        torch.testing.assert_close(loss, SigLipLoss()(img, txt, scale, bias), rtol=1e-12, atol=0)


def test_bf16_optimizer_updates_fp32_masters_and_casts_them_back(bench):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32)).to(torch.bfloat16)
    scale = torch.nn.Parameter(torch.tensor(1.0))
    optimizer = bench.AdamWWithMasters([*model.parameters(), scale], torch.device("cpu"))
    assert len(optimizer.low) == 4 and all(m.dtype == torch.float32 for m in optimizer.masters)
    for _ in range(3):
        (model(torch.randn(8, 16, dtype=torch.bfloat16)).float().square().mean() * scale).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(optimizer.low, optimizer.masters))
    assert scale.item() != 1.0 and all(p.grad is None for p in optimizer.params)
    # No weight decay on vectors (biases, norms, the scale).
    decay = {id(p): g["weight_decay"] for g in optimizer.optimizer.param_groups for p in g["params"]}
    assert [decay[id(m)] for m in optimizer.masters] == [bench.WEIGHT_DECAY, 0.0, 0.0, 0.0]
