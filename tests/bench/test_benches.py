"""The GPU benches (bench/attention.py, patch_embed.py, rope.py, loss.py, integrations.py, train_step.py) run
without a GPU.

`--cpu-smoke` goes through the same code paths as a real run (bench/_harness.py's `start`, providers, timing,
ratios, targets, JSON, markdown, plot): one parametrized test checks what every bench records, then the bench's
`expect_<bench>` function what only it records. The smoke runs are subprocesses with CUDA hidden, so they behave
the same on GPU hosts. A plain run without CUDA exits 0 with a message before any work (in-process, with CUDA made
unavailable). In-process too: the dispatch targets `start` records, the loss bench's out-of-memory bookkeeping, naive
bf16 baseline and issue-17 targets, and train_step's FLOP formula, eager SigLIP loss and bf16 optimizer.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "bench"
ENV_KEYS = ("gpu", "driver", "torch", "triton", "python", "commit", "date_utc")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def load_bench(name: str, monkeypatch) -> object:
    """bench/<name>.py as a module (it imports its siblings `_harness` and, for train_step, `attention`)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"finevit_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------
# What only one bench records
# ----------------------------------------------------------------------------------------------------


def expect_attention(payload: dict, markdown: str, stdout: str) -> None:
    assert all(c["lengths"] and c["sum_n2"] == sum(n * n for n in c["lengths"]) for c in payload["cases"])
    assert {c["workload"] for c in payload["cases"]} == {"uniform", "mixed"}
    helpers = [r for r in payload["results"] if r["provider"] == "torch_rope" and r["status"] == "ok"]
    assert helpers and all(r["throughput"] is None and "rel_diff_vs_ours" not in r for r in helpers)


def expect_patch_embed(payload: dict, markdown: str, stdout: str) -> None:
    assert {(c["patch"], c["dim"]) for c in payload["cases"]} == {(16, 16), (16, 32), (14, 16), (14, 32)}
    assert all(c["features"] == 3 * c["patch"] ** 2 and c["patches"] == 2 * 16 for c in payload["cases"])
    cases = {c["case"]: c for c in payload["cases"]}
    for r in (r for r in payload["results"] if r["status"] == "ok"):
        n, k, d = (cases[r["case"]][key] for key in ("patches", "features", "dim"))
        assert r["flop"] == {"fwd": 2, "bwd": 2, "fwd+bwd": 4}[r["mode"]] * n * k * d
        assert r["bytes"] > n * k and r["tflops"] > 0
        assert r["throughput"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9, rel=1e-6)  # GB/s
    assert {c["name"] for c in payload["checks"]} == {
        "fwd: finevit time / bare GEMM time", "fwd+bwd: speedup of finevit over the PyTorch path (torch)",
        "fwd+bwd: speedup of finevit over torch.compile of it (torch_compiled)"}
    assert "Bytes each provider" in markdown


def expect_rope(payload: dict, markdown: str, stdout: str) -> None:
    cases = {c["case"]: c for c in payload["cases"]}
    assert list(cases) == ["packed 2x16", "packed 2x20", "qwen2_vl 2x20"]
    assert all(c["tokens"] == 256 and c["rotary_dim"] == c["head_dim"] and c["element_size"] == 4
               for c in cases.values())
    # The layouts timed: packed x and tables contiguous; qwen2_vl's x a view of a fused qkv (token stride 3·H·D)
    # and its tables (T, D/2) views of the tower's (T, D) [c, c] tables (row stride D).
    assert cases["packed 2x20"]["x_strides"] == [40, 20, 1] and cases["packed 2x20"]["cos_row_stride"] == 10
    assert cases["qwen2_vl 2x20"]["x_strides"] == [120, 20, 1] and cases["qwen2_vl 2x20"]["cos_row_stride"] == 20
    ok = [r for r in payload["results"] if r["status"] == "ok"]
    # qwen2_vl_hf runs on its layout only: no record at all on the packed cases
    assert not [r for r in payload["results"] if r["provider"] == "qwen2_vl_hf" and r["case"] != "qwen2_vl 2x20"]
    copy_gbps = {(r["case"], r["mode"]): r["throughput"] for r in ok if r["provider"] == "copy"}
    for r in ok:
        c = cases[r["case"]]
        x_bytes = c["tokens"] * c["heads"] * c["head_dim"] * c["element_size"]
        tables = 2 * c["tokens"] * (c["rotary_dim"] // 2) * 4  # float32 cos and sin
        assert r["bytes"] == (2 * x_bytes if r["provider"] == "copy" else 2 * x_bytes + tables)  # read x, write out
        assert r["throughput"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9, rel=1e-6)  # GB/s
        assert r["ceiling_share"] == pytest.approx(r["throughput"] / payload["ceilings"]["copy"]["gbps"], rel=1e-6)
        assert r["vs_copy"] == pytest.approx(r["throughput"] / copy_gbps[(r["case"], r["mode"])], rel=1e-6)
    assert [(c["name"], c["op"], c["threshold"]) for c in payload["checks"]] == [
        (f"{mode}: finevit GB/s / measured copy ceiling", "≥", 0.8) for mode in ("fwd", "bwd")]
    assert all("worst of 3 case(s)" in c["detail"] for c in payload["checks"])
    for heading in ("## finevit per case", "## fwd: time · GB/s · share of the copy", "## bwd: time · GB/s"):
        assert heading in markdown, heading
    assert "Targets (issue 19" in stdout


def expect_loss(payload: dict, markdown: str, stdout: str) -> None:
    assert {c["loss"] for c in payload["cases"]} == {"siglip", "clip"}
    assert all(c["pairs"] == c["batch"] ** 2 for c in payload["cases"])
    ok = [r for r in payload["results"] if r["status"] == "ok"]
    expected = {"finevit", "naive_bf16", "naive", *OPEN_CLIP}
    for loss in ("siglip", "clip"):
        for mode in ("fwd", "fwd+bwd"):
            assert {r["provider"] for r in ok if r["loss"] == loss and r["mode"] == mode} == expected, (loss, mode)
    for r in ok:  # issue 17's count: fwd 2·B²·D, fwd+bwd 8·B²·D
        assert r["flop"] == {"fwd": 2, "fwd+bwd": 8}[r["mode"]] * r["batch"] ** 2 * r["dim"]
        assert r["pairs_per_s"] == pytest.approx(r["batch"] ** 2 / (r["ms"] * 1e-3), rel=1e-6)
        assert r["throughput"] == pytest.approx(r["flop"] / (r["ms"] * 1e-3) / 1e12, rel=1e-6)
    # The smoke run's features are fp32: naive_bf16 (and open_clip, under CPU autocast) still compute bf16 logits,
    # so they agree with the fp32 loss to bf16 rounding, and not exactly; the fp32 reference agrees exactly.
    for r in ok:
        if r["provider"] in BF16_PROVIDERS:
            assert 0 < r["rel_diff_vs_ours"] < BF16_RTOL, r
        elif r["provider"] == "naive":
            assert r["rel_diff_vs_ours"] == 0, r
    # The eager losses materialize B×B logits: their measured training-step peaks hold at least one B×B fp32 matrix.
    naive_steps = [r for r in ok if r["provider"] in ("naive", "naive_bf16") and r["mode"] == "fwd+bwd"
                   and r["batch"] == 256]
    assert len(naive_steps) == 8
    if naive_steps[0].get("peak_mem_gb") is not None:  # None where this torch's profiler hides allocations
        assert all(r["peak_in_fp32_bxb"] >= 1 for r in naive_steps)
    # The probe: finevit alone at the smoke's stand-in for B = 1,048,576, D = 768, a warm-up and a timed step.
    assert [(p["loss"], p["batch"], p["dim"], p["status"]) for p in payload["probe"]] == [
        ("siglip", 1024, 64, "ok"), ("clip", 1024, 64, "ok")]
    assert all(p["seconds"] > 0 and p["warmup_s"] > 0 and p["flop"] == 8 * 1024**2 * 64 for p in payload["probe"])
    assert {(m["batch"], m["dim"]) for m in payload["memory_model"]} >= {(65536, 1152), (2**20, 1152)}
    # Issue 17's four targets: 1 (SigLIP time and memory), then 2-4 per loss.
    checks = payload["checks"]
    assert [(c["target"], c["name"].split(":")[0]) for c in checks] == [
        (1, "siglip"), (1, "siglip"), (2, "siglip"), (2, "clip"), (3, "siglip"), (3, "clip"), (4, "siglip"),
        (4, "clip")]
    assert [(c["op"], c["threshold"]) for c in checks] == [
        ("≤", 45.0), ("≤", 0.8), ("≥", 450.0), ("≥", 450.0), ("≥", 2.5), ("≥", 2.5), ("≤", 2.0), ("≤", 2.0)]
    assert "B=256, D=64" in checks[0]["name"] and "naive_bf16" in checks[4]["name"]
    assert "B=1,024, D=64" in checks[6]["name"] and checks[6]["met"] is True
    for heading in ("## Throughput", "fwd+bwd: time · pairs/s · extra peak memory", "## 1M-pair probe",
                    "## Memory model (computed, not measured)"):
        assert heading in markdown, heading
    assert "Memory model (computed, not measured" in stdout
    assert "Targets (issue 17" in stdout and "not met" in stdout  # the smoke sizes miss the TFLOP/s target


def expect_integrations(payload: dict, markdown: str, stdout: str) -> None:
    assert {c["family"] for c in payload["cases"]} == {"qwen2_vl", "qwen2_5_vl", "siglip", "siglip2", "timm"}
    assert all(c["forward_flop"] > 0 for c in payload["cases"])
    assert len(payload["checks"]) == 5
    assert any("qwen2_vl" in c["name"] and c["threshold"] == 1.3 for c in payload["checks"])


def expect_train_step(payload: dict, markdown: str, stdout: str) -> None:
    config = payload["config"]
    assert config["precision"] == "fp32" and config["torch_compile"] is False
    assert config["baseline_loss"].startswith("open_clip" if installed("open_clip") else "eager_siglip_loss")
    cases = {c["case"]: c for c in payload["cases"]}
    assert {c["patch"] for c in cases.values()} == {16, 14}
    for c in cases.values():
        grids, sides = payload["batches"][c["case"]]["grids"], payload["batches"][c["case"]]["square_sides"]
        assert c["lengths"] == [r * k for r, k in grids] and c["tokens"] == sum(c["lengths"]) >= c["budget"]
        # Equal image content: each baseline image is the square grid nearest to its patch count.
        assert all(abs(s * s - n) <= s for s, n in zip(sides, c["lengths"]))
        assert c["padded_tokens"] == len(sides) * max(sides) ** 2 >= c["square_tokens"] == sum(s * s for s in sides)
    assert len(payload["results"]) == len(cases) * 5
    for r in payload["results"]:
        c = cases[r["case"]]
        assert 0 < r["first_loss"] < 100 and r["images"] == c["images"]
        assert r["images_per_s"] == pytest.approx(r["images"] / (r["ms"] * 1e-3))
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["ms"] * 1e-3))
        assert r["mfu_datasheet"] == pytest.approx(r["flop"] / (r["ms"] * 1e-3) / 989e12)
        assert r["ceiling_share"] == pytest.approx(r["throughput"] / payload["ceilings"]["matmul"]["tflops"])
        expected_tokens = {"finevit": c["tokens"], "finevit_nondet": c["tokens"], "timm_padded": c["square_tokens"],
                           "timm_grouped": c["square_tokens"], "timm_fixed": c["fixed_tokens"]}[r["provider"]]
        assert r["tokens"] == expected_tokens
        assert r["computed_tokens"] == (c["padded_tokens"] if r["provider"] == "timm_padded" else r["tokens"])
        if r["provider"] in ("finevit", "finevit_nondet"):
            d, f, k, layers = c["width"], c["mlp"], 3 * c["patch"] ** 2, c["depth"]
            t, b = c["tokens"], c["images"]
            assert r["flop"] == (6 * (layers * (4 * d * d + 2 * d * f) + k * d + 2 * d * d) * t - 2 * k * d * t
                                 + 6 * (d * d + 2 * d * f) * b + 12 * layers * d * c["sum_n2"] + 12 * d * t
                                 + 6 * b * b * d)
    assert len(payload["checks"]) == 2  # the target case: speedup and MFU
    assert "## Training step" in markdown


# ----------------------------------------------------------------------------------------------------
# What every bench records
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Smoke:
    """What a bench's --cpu-smoke run must record."""
    ops: tuple[str, ...]  # the finevit ops whose dispatch path it records (all "reference" in a smoke run)
    ok: set[str]  # providers that run (status ok)
    skipped: set[str]  # providers skipped, each with a reason (CUDA-only, or a package missing)
    modes: set[str]
    expect: Callable[[dict, str, str], None]  # the bench's own checks: (payload, markdown, stdout)
    helpers: set[str] = field(default_factory=set)  # providers timed in ms only, without throughput or ratio
    compares_outputs: bool = True  # every baseline's output is compared with ours (rel_diff_vs_ours)
    uncompared: set[str] = field(default_factory=set)  # baselines that compute something else (rope's copy)
    output_rtol: dict[str, float] = field(default_factory=dict)  # a baseline's tolerance there, if not 1e-4
    all_targets_evaluated: bool = True  # else: at least one (the others need CUDA-only baselines)
    needs: tuple[str, ...] = ()  # packages without which the bench cannot run
    timeout_s: int = 120


ALL_MODES = {"fwd", "bwd", "fwd+bwd"}
OPEN_CLIP = {"open_clip"} if installed("open_clip") else set()  # the loss bench's baseline, when it imports
QWEN2_VL_HF = {"qwen2_vl_hf"} if installed("transformers") else set()  # the rope bench's, when transformers imports
BF16_PROVIDERS = {"naive_bf16", "open_clip"}  # the loss bench's bf16-logits baselines (bf16 on the CPU smoke too)
BF16_RTOL = 1e-2
SMOKES = {
    "attention": Smoke(("varlen_attention", "apply_rope"),
                       ok={"finevit", "finevit_nondet", "finevit+rope", "sdpa_math", "torch_rope"},
                       skipped={"torch_varlen", "flex"}, modes=ALL_MODES, expect=expect_attention,
                       helpers={"torch_rope"}, all_targets_evaluated=False),
    "patch_embed": Smoke(("patch_embed",), ok={"finevit", "finevit_fused", "finevit_two_pass", "torch", "conv2d",
                                              "bare_gemm"}, skipped={"torch_compiled"},
                         modes=ALL_MODES, expect=expect_patch_embed, all_targets_evaluated=False),
    "rope": Smoke(("apply_rope",), ok={"finevit", "torch_eager", "copy", *QWEN2_VL_HF},
                  skipped={"torch_compiled", *({"qwen2_vl_hf"} - QWEN2_VL_HF)}, modes={"fwd", "bwd"},
                  expect=expect_rope, uncompared={"copy"}),
    "loss": Smoke(("siglip_loss", "clip_loss"), ok={"finevit", "naive_bf16", "naive", *OPEN_CLIP},
                  skipped={"open_clip"} - OPEN_CLIP, modes={"fwd", "fwd+bwd"}, expect=expect_loss,
                  output_rtol=dict.fromkeys(BF16_PROVIDERS, BF16_RTOL)),
    "integrations": Smoke(("varlen_attention", "patch_embed"), ok={"finevit", "finevit_attn", "sdpa", "eager"},
                          skipped={"flash_attention_2"}, modes=ALL_MODES, expect=expect_integrations,
                          needs=("timm", "transformers"), timeout_s=180),
    "train_step": Smoke(("varlen_attention", "patch_embed", "siglip_loss"),
                        ok={"finevit", "finevit_nondet", "timm_padded", "timm_grouped", "timm_fixed"}, skipped=set(),
                        modes={"step"},
                        expect=expect_train_step, compares_outputs=False, needs=("timm",), timeout_s=180),
}


def benches() -> list:
    return [pytest.param(name, id=name, marks=pytest.mark.skipif(
        not all(map(installed, smoke.needs)), reason=f"needs {', '.join(smoke.needs)}"))
        for name, smoke in SMOKES.items()]


def run_smoke(name: str, out: Path, timeout_s: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("FINEVIT_KERNELS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(BENCH_DIR / f"{name}.py"), "--cpu-smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.parametrize("name", benches())
def test_cpu_smoke_writes_json_markdown_and_plot(name, tmp_path):
    smoke = SMOKES[name]
    proc = run_smoke(name, tmp_path, smoke.timeout_s)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    (json_path,) = tmp_path.glob(f"{name}_cpu_*.json")
    payload = json.loads(json_path.read_text())
    assert payload["bench"] == name and payload["env"]["device"] == "cpu"
    assert all(key in payload["env"] for key in ENV_KEYS), payload["env"]
    assert payload["ceilings"]["matmul"]["tflops"] > 0 and payload["ceilings"]["copy"]["gbps"] > 0
    config = payload["config"]
    assert config["cpu_smoke"] is True and config["quick"] is False and config["seed"] == 0
    assert config["argv"] == ["--cpu-smoke", "--out", str(tmp_path)]
    assert config["FINEVIT_KERNELS"] == "reference"
    assert {key: value for key, value in config.items() if key.startswith("finevit.")} == {
        f"finevit.{op}": "reference" for op in smoke.ops}

    results = payload["results"]
    ok = [r for r in results if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == smoke.ok
    assert {r["mode"] for r in ok} == smoke.modes == set(payload["modes"])
    skipped = [r for r in results if r["status"] == "skipped"]
    assert {r["provider"] for r in skipped} == smoke.skipped and all(r["reason"] for r in skipped)
    assert not [r for r in results if r["status"] not in ("ok", "skipped")]
    assert set(payload["providers"]) == smoke.ok | smoke.skipped
    for r in ok:
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert r["provider"] in smoke.helpers or (math.isfinite(r["throughput"]) and r["throughput"] > 0)
    # Every baseline carries finevit's speedup over it and (most benches) computes what finevit computes.
    baselines = [r for r in ok if r["provider"] not in smoke.helpers | {"finevit"}]
    assert baselines and all(r["ours_ratio"] > 0 for r in baselines)
    if smoke.compares_outputs:
        assert all(r["rel_diff_vs_ours"] < smoke.output_rtol.get(r["provider"], 1e-4) for r in baselines
                   if r["provider"] not in smoke.uncompared)
        assert not [r for r in baselines if r["provider"] in smoke.uncompared and "rel_diff_vs_ours" in r]
    evaluated = [c["met"] is not None for c in payload["checks"]]
    assert evaluated and (all(evaluated) if smoke.all_targets_evaluated else any(evaluated)), payload["checks"]

    markdown = json_path.with_suffix(".md").read_text()
    assert "| case |" in markdown and "finevit" in markdown and "## Targets" in markdown
    if installed("matplotlib"):
        assert json_path.with_suffix(".png").stat().st_size > 0
    assert "Targets" in proc.stdout
    smoke.expect(payload, markdown, proc.stdout)


@pytest.mark.parametrize("name", benches())
def test_without_cuda_a_plain_run_exits_zero_with_a_message_before_any_work(name, monkeypatch, capsys, tmp_path):
    bench = load_bench(name, monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        bench.main(["--quick", "--out", str(tmp_path)])
    assert exited.value.code == 0
    assert capsys.readouterr().out == "no CUDA device: nothing to benchmark\n"
    assert not list(tmp_path.iterdir())


def test_an_unknown_provider_or_mode_is_a_usage_error_before_any_work(monkeypatch, capsys):
    harness = load_bench("_harness", monkeypatch)
    monkeypatch.setattr(harness, "require_cuda", lambda cpu_smoke: pytest.fail("got past the options"))
    for argv in (["--providers", "finevit,nope"], ["--modes", "fwd,nope"]):
        with pytest.raises(SystemExit) as exited:
            harness.start("doc", {"finevit": None, "torch": None}, argv, ops=(), quick_help="", seed_help="")
        assert exited.value.code == 2 and "unknown ['nope']" in capsys.readouterr().err


def test_dispatch_targets_record_the_path_each_op_takes(monkeypatch):
    harness = load_bench("_harness", monkeypatch)
    cpu = torch.device("cpu")
    monkeypatch.setenv("FINEVIT_KERNELS", "reference")
    assert harness.dispatch_targets(("varlen_attention", "siglip_loss"), cpu) == {
        "finevit.varlen_attention": "reference", "finevit.siglip_loss": "reference"}
    monkeypatch.setenv("FINEVIT_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's interpreter runs the kernels on CPU
    assert harness.dispatch_targets(("patch_embed",), cpu) == {"finevit.patch_embed": "triton"}
    monkeypatch.delenv("TRITON_INTERPRET")
    assert harness.dispatch_targets(("patch_embed",), cpu) == {"finevit.patch_embed": "reference"}


# ----------------------------------------------------------------------------------------------------
# loss: out-of-memory bookkeeping
# ----------------------------------------------------------------------------------------------------


class _OomInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sum()

    @staticmethod
    def backward(ctx, grad):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


def test_loss_bench_records_an_oom_once_and_skips_the_cases_it_implies(monkeypatch):
    bench = load_bench("loss", monkeypatch)
    calls: list[tuple[int, int]] = []

    def build(loss, x):  # forward OOMs from B = 128, backward from B = 64
        batch, dim = x.img.shape

        def forward():
            calls.append((batch, dim))
            if batch >= 128:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return _OomInBackward.apply(x.img) if batch >= 64 else x.img.sum()
        return forward

    monkeypatch.setitem(bench.PROVIDERS, "fake", bench.Provider(build, "raises OOM on cue"))
    device, points, status = torch.device("cpu"), [], {}
    for dim in (16, 32):
        for batch in (32, 64, 128):
            case = bench.describe_case("siglip", batch, dim, torch.float32)
            inputs = bench.make_inputs(batch, dim, torch.float32, device)
            records, _ = bench.run_provider("fake", case, inputs, ["fwd", "fwd+bwd"], device, 1.0, points, None)
            status.update({(batch, dim, r["mode"]): r["status"] for r in records})

    assert status == {
        (32, 16, "fwd"): "ok", (32, 16, "fwd+bwd"): "ok",
        (64, 16, "fwd"): "ok", (64, 16, "fwd+bwd"): "oom",
        (128, 16, "fwd"): "oom", (128, 16, "fwd+bwd"): "skipped",  # implied by the forward's OOM
        (32, 32, "fwd"): "ok", (32, 32, "fwd+bwd"): "ok",
        (64, 32, "fwd"): "ok", (64, 32, "fwd+bwd"): "skipped",  # implied by (64, 16, fwd+bwd)
        (128, 32, "fwd"): "skipped", (128, 32, "fwd+bwd"): "skipped",
    }
    assert (128, 32) not in calls  # a case known to fail is never run
    assert [(p.batch, p.dim, p.mode) for p in points] == [(64, 16, "fwd+bwd"), (128, 16, "fwd")]


# ----------------------------------------------------------------------------------------------------
# loss: the naive bf16 baseline, issue 17's targets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_loss_bench_naive_bf16_is_the_reference_loss_to_bf16_rounding(loss, monkeypatch):
    bench = load_bench("loss", monkeypatch)
    from finevit.kernels import reference

    x = bench.make_inputs(96, 32, torch.bfloat16, torch.device("cpu"), seed=3)
    naive = bench.naive_bf16_siglip_loss if loss == "siglip" else bench.naive_bf16_clip_loss
    oracle = reference.siglip_loss if loss == "siglip" else reference.clip_loss
    args = x.leaves if loss == "siglip" else x.leaves[:3]
    value = naive(*args)
    grads = torch.autograd.grad(value, args)
    expected = oracle(*args)  # fp32 features and logits
    expected_grads = torch.autograd.grad(expected, args)
    assert value.dtype == torch.float32 and expected.dtype == torch.float32
    assert 0 < abs(value.item() - expected.item()) < BF16_RTOL * abs(expected.item())  # bf16 logits, not fp32
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=BF16_RTOL, atol=BF16_RTOL * want.abs().max().item())
    # fp32 features (the CPU smoke run's) are rounded to bf16 first: the same loss as on the rounded features.
    fp32 = [t.detach().float() for t in args[:2]] + list(args[2:])
    assert torch.equal(naive(*fp32), value)


def test_loss_bench_targets_are_issue_17s_at_its_sizes(monkeypatch):
    bench = load_bench("loss", monkeypatch)
    cases = [bench.describe_case(loss, b, d, torch.bfloat16) for loss in ("siglip", "clip") for d in (768, 1152)
             for b in (4096, 16384, 65536)]
    results = []
    for c in cases:
        flop = bench.loss_flops(c["batch"], c["dim"], "fwd+bwd")
        assert flop == 8 * c["batch"] ** 2 * c["dim"]
        ours_ms = flop / 500e12 * 1e3  # 500 TFLOP/s everywhere...
        if c["case"] == "clip D1152 B16k":
            ours_ms = flop / 400e12 * 1e3  # ...but here
        if c["case"] == "siglip D768 B64k":
            ours_ms = 44.0
        base = {"case": c["case"], "loss": c["loss"], "batch": c["batch"], "dim": c["dim"], "mode": "fwd+bwd",
                "reason": None}
        results.append({**base, "provider": "finevit", "status": "ok", "ms": ours_ms, "peak_mem_gb": 0.5,
                        "throughput": flop / (ours_ms * 1e-3) / 1e12})
        if c["batch"] < 65536:  # naive_bf16 runs out of memory at B = 65,536: 3× slower at 16k, 2× for clip D1152
            slower = 2.0 if c["case"] == "clip D1152 B16k" else 3.0
            results.append({**base, "provider": "naive_bf16", "status": "ok", "ms": slower * ours_ms,
                            "peak_mem_gb": 20.0, "throughput": 1.0})
        else:
            results.append({**base, "provider": "naive_bf16", "status": "oom", "reason": "CUDA out of memory"})
    probes = [{"loss": "siglip", "batch": 2**20, "dim": 768, "status": "ok", "reason": None, "seconds": 14.0,
               "warmup_s": 20.0, "tflops": 480.0, "peak_mem_gb": 4.7, "grad_gb": 3.2,
               "working_mem_gb": 1.5},
              {"loss": "clip", "batch": 2**20, "dim": 768, "status": "oom", "reason": "CUDA out of memory"}]
    checks = bench.check_targets(results, cases, probes)
    by = {(c["target"], c["name"].split(":")[0], c["op"]): c for c in checks}
    assert len(checks) == 8
    time_check, memory_check = checks[0], checks[1]
    assert "B=65,536, D=768" in time_check["name"] and time_check["value"] == 44.0 and time_check["met"] is True
    assert memory_check["value"] == 0.5 and memory_check["met"] is True and memory_check["threshold"] == 0.8
    assert by[(2, "siglip", "≥")]["met"] is True and by[(2, "siglip", "≥")]["value"] == pytest.approx(500.0)
    assert "B ≥ 16,384" in by[(2, "siglip", "≥")]["name"] and "of 4 cases" in by[(2, "siglip", "≥")]["detail"]
    assert by[(2, "clip", "≥")]["met"] is False and by[(2, "clip", "≥")]["value"] == pytest.approx(400.0)
    assert "clip D1152 B16k" in by[(2, "clip", "≥")]["detail"]
    assert by[(3, "siglip", "≥")]["value"] == pytest.approx(3.0) and by[(3, "siglip", "≥")]["met"] is True
    assert "B=16,384" in by[(3, "siglip", "≥")]["detail"] and "oom" in by[(3, "siglip", "≥")]["detail"]
    assert by[(3, "clip", "≥")]["value"] == pytest.approx(2.0) and by[(3, "clip", "≥")]["met"] is False
    assert by[(4, "siglip", "≤")]["value"] == 1.5 and by[(4, "siglip", "≤")]["met"] is True
    assert "14 s" in by[(4, "siglip", "≤")]["detail"] and "B=1,048,576, D=768" in by[(4, "siglip", "≤")]["name"]
    assert "extra peak 4.7 GB of which 3.2 GB are the gradients" in by[(4, "siglip", "≤")]["detail"]
    assert by[(4, "clip", "≤")]["value"] is None and by[(4, "clip", "≤")]["met"] is False
    # finevit out of memory on a case target 2 covers: not met, whatever the others ran at.
    results[[r["case"] for r in results].index("siglip D1152 B64k")].update(status="oom", reason="out of memory")
    siglip_flops = next(c for c in bench.check_targets(results, cases, probes) if c["target"] == 2)
    assert siglip_flops["met"] is False and "siglip D1152 B64k: oom" in siglip_flops["detail"]


# ----------------------------------------------------------------------------------------------------
# train_step: FLOP formula, the baselines' eager loss, the bf16 optimizer
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def train_step(monkeypatch):
    pytest.importorskip("timm")
    return load_bench("train_step", monkeypatch)


def test_flop_formula_counts_the_weights_each_token_and_image_meets(train_step):
    config = train_step.FineViTConfig.from_name("tiny", depth=3, patch_size=14)
    model = train_step.FineViT(config)
    per_token = (sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and n.endswith("weight")
                     and p.ndim == 2) + model.patch_embed.weight.numel() + model.head.kv.weight.numel())
    per_image = model.head.proj.weight.numel() + model.head.mlp.fc1.weight.numel() + model.head.mlp.fc2.weight.numel()
    d, k = config.width, config.patch_features
    lengths = [1, 17, 129]
    t, b = sum(lengths), len(lengths)
    attention = 12 * config.depth * d * sum(n * n for n in lengths) + 12 * d * t
    assert train_step.step_flops(config, lengths) == (6 * per_token * t - 2 * k * d * t + 6 * per_image * b
                                                      + attention + 6 * b * b * d)


def test_eager_siglip_loss_is_open_clips_and_finevits(train_step):
    from finevit.kernels import reference

    img = torch.nn.functional.normalize(torch.randn(7, 24, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(7, 24, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(12.0, dtype=torch.float64), torch.tensor(-9.0, dtype=torch.float64)
    loss = train_step.eager_siglip_loss(img, txt, scale, bias)
    torch.testing.assert_close(loss, reference.siglip_loss(img, txt, scale, bias), rtol=1e-12, atol=0)
    if installed("open_clip"):
        from open_clip.loss import SigLipLoss
        torch.testing.assert_close(loss, SigLipLoss()(img, txt, scale, bias), rtol=1e-12, atol=0)


def test_bf16_optimizer_updates_fp32_masters_and_casts_them_back(train_step):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32)).to(torch.bfloat16)
    scale = torch.nn.Parameter(torch.tensor(1.0))
    optimizer = train_step.AdamWWithMasters([*model.parameters(), scale], torch.device("cpu"))
    assert len(optimizer.low) == 4 and all(m.dtype == torch.float32 for m in optimizer.masters)
    for _ in range(3):
        (model(torch.randn(8, 16, dtype=torch.bfloat16)).float().square().mean() * scale).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(optimizer.low, optimizer.masters))
    assert scale.item() != 1.0 and all(p.grad is None for p in optimizer.params)
    # No weight decay on vectors (biases, norms, the scale).
    decay = {id(p): g["weight_decay"] for g in optimizer.optimizer.param_groups for p in g["params"]}
    assert [decay[id(m)] for m in optimizer.masters] == [train_step.WEIGHT_DECAY, 0.0, 0.0, 0.0]


def test_schedule_model_prefers_the_kernels_longest_first_order_on_ragged_batches(monkeypatch):
    """bench/schedule.py, the cost model of the work order: its order is the one `_cu_blocks_kernel` writes (run
    here in the interpreter), a greedy list schedule of equal programs takes ceil(n / slots) rounds, and a long
    image packed after short ones ends later in packing order than longest first, while a uniform batch is the same."""
    from finevit.kernels import attention

    schedule = load_bench("schedule", monkeypatch)
    lengths = [196, 4096, 0, 1024, 300, 256, 4000, 17]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    assert attention._cu_blocks(cu)[attention.ORDER_ROW.value, :-1].tolist() == schedule.dispatch_order(lengths)
    # The --measure ablation's table: the kernel's, but in packing order (equal when packing order is longest first).
    ordered = [lengths[i] for i in schedule.dispatch_order(lengths)]
    cu = torch.tensor([0, *torch.tensor(ordered).cumsum(0).tolist()], dtype=torch.int32)
    assert torch.equal(schedule.packing_order_table(cu), attention._cu_blocks(cu))

    assert schedule.makespan([2.0] * 10, slots=4) == 6.0
    tile = ("test", 64, 64, 1)
    ragged = [256] * 40 + [1088]  # 17 long programs on 16 slots: packed last, the 17th runs alone at the end
    packing, longest = (schedule.over_ideal(ragged, 2, tile, 16, 3.0, order) for order in ("packing", "longest"))
    assert longest < packing - 0.05
    uniform = [1024] * 8
    assert schedule.over_ideal(uniform, 4, tile, 16, 3.0, "packing") == schedule.over_ideal(uniform, 4, tile, 16, 3.0,
                                                                                            "longest")
