"""The C library builds with CMake on a CPU-only machine: export (small scope) -> configure -> build -> ctest ->
install -> a consumer project that finds it with find_package(FineViTKernels).

The exporter runs as CMake's custom command (the default path), with `--quick` (head dim 64, fp16, patch size 16)
for both targets, so this module stays near a minute on 2 busy cores (most of it compiling the 14 cubins, once,
into Triton's cache). ctest runs the ABI and symbol checks; its GPU tests skip (exit 77) without a device and
run on one. Subprocesses run without TRITON_INTERPRET, which tests/conftest.py sets for the kernel tests.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from finevit.kernels import compile_check, export

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = {name: shutil.which(name) for name in ("cmake", "ctest", "cc", "c++")}

pytestmark = [
    pytest.mark.skipif(not all(TOOLS.values()),
                       reason=f"needs cmake, ctest and a C/C++ compiler; missing: "
                              f"{[name for name, path in TOOLS.items() if not path]}"),
    pytest.mark.skipif(not compile_check.tools_available(),
                       reason="needs triton's NVIDIA backend (ptxas, cuobjdump) to export the cubins"),
]


def run(*command, cwd=ROOT, env=None, timeout=600, check=True):
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    done = subprocess.run(list(command), cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """A configured and built tree (exporter run by CMake), and its install prefix."""
    base = tmp_path_factory.mktemp("cmake")
    build_dir, prefix = base / "build", base / "prefix"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run("cmake", "-S", ROOT, "-B", str(build_dir), *generator, "-DFINEVIT_EXPORT_ARGS=--quick",
        f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release")
    run("cmake", "--build", str(build_dir), "--parallel", "2", timeout=900)
    run("cmake", "--install", str(build_dir), "--prefix", str(prefix))
    return build_dir, prefix


def test_cmake_exports_and_builds_the_library_for_sm80_and_sm90(build):
    build_dir, _ = build
    manifest = json.loads((build_dir / "aot" / "manifest.json").read_text())
    assert manifest["targets"] == [80, 90]
    exported = {(e["kernel"], e["target"], e["dtype"], e["dim"]) for e in manifest["entries"]}
    for target in (80, 90):
        assert ("_attn_fwd_kernel", target, "fp16", 64) in exported
        assert ("_rope_kernel", target, "fp16", 64) in exported
        assert ("_patch_embed_fwd_kernel", target, "fp16", 16) in exported
        assert ("_cu_blocks_kernel", target, "", 0) in exported
    assert all(e["spill"] == 0 for e in manifest["entries"]), "an exported config spills registers"
    for name in ("libfinevit_kernels.so", "libfinevit_kernels.a"):
        assert (build_dir / name).exists(), name
    # The generated C embeds the cubins: an sm_90 cubin is ELF (0x7f 'E' 'L' 'F') as escaped bytes.
    assert '"\\x7f\\x45\\x4c\\x46' in (build_dir / "aot" / "finevit_aot_sm90.c").read_text()


def test_ctest_passes_the_abi_and_symbol_checks_and_skips_the_gpu_part_without_a_gpu(build):
    build_dir, _ = build
    done = run("ctest", "--test-dir", str(build_dir), "--output-on-failure", check=False, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    results = {match.group(1): match.group(2) for match in re.finditer(r"Test +#\d+: (\S+) [ .*]+(\w+)", done.stdout)}
    assert {name: results.get(name) for name in ("abi_finevit_kernels", "abi_finevit_kernels_static",
                                                 "exported_symbols")} == dict.fromkeys(
        ("abi_finevit_kernels", "abi_finevit_kernels_static", "exported_symbols"), "Passed"), done.stdout
    assert results.get("gpu_kernels") == ("Passed" if torch.cuda.is_available() else "Skipped"), done.stdout


def test_the_abi_test_fails_when_the_table_does_not_match_the_targets(build):
    """The ABI test can fail: told that only sm_80 was exported, it finds sm_90 kernels in the table."""
    build_dir, _ = build
    done = run(str(build_dir / "test_abi_finevit_kernels"), "80", check=False,
               env={"FINEVIT_CUDA_LIBRARY": "/nonexistent/libcuda.so.1"})
    assert done.returncode == 1 and "FAILED" in done.stdout, done.stdout


CONSUMER = textwrap.dedent("""\
    cmake_minimum_required(VERSION 3.18)
    project(consumer C)
    find_package(FineViTKernels 0.1 REQUIRED)
    add_executable(consumer main.c)
    target_link_libraries(consumer PRIVATE FineViTKernels::finevit_kernels)
    add_executable(consumer_static main.c)
    target_link_libraries(consumer_static PRIVATE FineViTKernels::finevit_kernels_static)
    """)

CONSUMER_MAIN = textwrap.dedent("""\
    #include <finevit_kernels.h>
    #include <stdio.h>
    int main(void) {
      finevit_view q = {(void *)0x1000, 64, 64};
      size_t bytes = finevit_varlen_attention_workspace_size(10, 1, 64, 1, FINEVIT_BFLOAT16, 1);
      finevit_status status = finevit_varlen_attention(q, q, q, (finevit_view){(void *)0x2000, 64, 64},
          (const int *)0x3000, 1, 10, 1, 64, FINEVIT_BFLOAT16, 0.0f, NULL, NULL, (void *)0x4000, bytes, NULL);
      printf("version %d exported %d status %s\\n", finevit_version(),
             finevit_is_exported("varlen_attention", 64, FINEVIT_FLOAT16, 90), finevit_error_string(status));
      return status == FINEVIT_ERROR_NO_DRIVER ? 0 : 1;
    }
    """)


def test_the_installed_package_is_found_and_linked_by_a_consumer_project(build, tmp_path):
    _, prefix = build
    assert (prefix / "include" / "finevit_kernels.h").exists()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "CMakeLists.txt").write_text(CONSUMER)
    (tmp_path / "src" / "main.c").write_text(CONSUMER_MAIN)
    run("cmake", "-S", str(tmp_path / "src"), "-B", str(tmp_path / "build"), f"-DCMAKE_PREFIX_PATH={prefix}")
    run("cmake", "--build", str(tmp_path / "build"))
    for program in ("consumer", "consumer_static"):
        done = run(str(tmp_path / "build" / program), check=False,
                   env={"FINEVIT_CUDA_LIBRARY": "/nonexistent/libcuda.so.1"})
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("version 100 exported 1 status FINEVIT_ERROR_NO_DRIVER"), done.stdout


def test_the_exporter_rejects_an_unknown_target_naming_the_option():
    done = run(sys.executable, "-m", "finevit.kernels.export", "--out", os.devnull, "--targets", "75", check=False,
               env={"PYTHONPATH": ROOT}, timeout=120)
    assert done.returncode == 2 and "--targets: 75 is not one of (80, 90)" in done.stderr, done.stderr




# ----------------------------------------------------------------------------------------------------
# The C runtime's launches against the Python launchers', without a GPU
# ----------------------------------------------------------------------------------------------------

WORKSPACE = 0x60000000  # kernels/tests/launch_calls.cpp's fake addresses


def c_launches(build_dir, log, sm, *arguments) -> list[dict]:
    """kernels/tests/launch_calls.cpp's launches, written down by the fake driver (kernels/tests/fake_cuda.c)."""
    kinds = {"*": "p", "i32": "i", "fp32": "f"}
    signatures = ";".join(f"{name}:{''.join(kinds[kind] for _, kind in params)}"
                          for name, params in export.PARAMS.items())
    done = run(str(build_dir / "launch_calls"), *map(str, arguments), check=False, env={
        "FINEVIT_CUDA_LIBRARY": str(build_dir / "libfake_cuda.so"), "FAKE_CUDA_LOG": str(log),
        "FAKE_CUDA_SM": str(sm), "FAKE_CUDA_SIGNATURES": signatures})
    assert done.returncode == 0, done.stdout + done.stderr
    launches = []
    for line in log.read_text().splitlines():
        name, cubin, grid_x, grid_y, grid_z, block, shared, *values = line.split()
        kinds_of = dict(export.PARAMS[name])
        params = {n: float(v) if kinds_of[n] == "fp32" else int(v)
                  for (n, _), v in zip(export.PARAMS[name], values)}
        launches.append({"name": name, "cubin_bytes": int(cubin), "grid": [int(grid_x), int(grid_y), int(grid_z)],
                         "block": int(block), "shared": int(shared), "params": params})
    return launches


ATTENTION_CASES = [(sm, ("attention", 0, 403, 3, 64, 4, rope, pad))  # 403 tokens in 4 sequences, 3 heads of 64
                   for sm in (90, 86) for rope in (0, 1) for pad in (0, 8, 4)]  # pad 4: generic variants
OTHER_CASES = [(90, ("rope", 0, 1000, 5, 64)), (90, ("patch_embed", 0, 1000, 3, 16, 256, 1)),
               (80, ("patch_embed", 0, 77, 3, 16, 512, 0))]


@pytest.fixture(scope="module")
def python_launches(build):
    """{case: the Python launchers' launches}, from one process (tests/aot/python_launches.py)."""
    build_dir, _ = build
    cases = ATTENTION_CASES + OTHER_CASES
    request = [[90 if sm == 90 else 80, *arguments] for sm, arguments in cases]
    done = run(sys.executable, os.path.join(ROOT, "tests", "aot", "python_launches.py"),
               str(build_dir / "aot" / "manifest.json"), json.dumps(request), env={"PYTHONPATH": ROOT}, timeout=300)
    return dict(zip(cases, json.loads(done.stdout)))


def assert_same_launches(c: list[dict], python: list[dict]):
    """Same kernels, cubins (size), blocks, shared memory, grids and arguments; "workspace" arguments lie in the
    workspace, "rotated:i" ones are the output of the i-th RoPE launch."""
    assert [x["name"] for x in c] == [x["name"] for x in python]
    rope_outputs = [x["params"]["OUT"] for x in c if x["name"] == "_rope_kernel"]
    for got, expected in zip(c, python):
        for key in ("cubin_bytes", "block", "shared", "grid"):
            assert got[key] == expected[key], (got["name"], key, got[key], expected[key])
        assert set(got["params"]) - set(expected["params"]) <= {"max_seqlen_bucket", "rows_bucket"}
        for name, value in expected["params"].items():
            actual = got["params"][name]
            if value == "workspace":
                assert WORKSPACE <= actual < WORKSPACE + 2**28 and actual % 256 == 0, (got["name"], name, hex(actual))
            elif isinstance(value, str) and value.startswith("rotated:"):
                assert actual == rope_outputs[int(value.split(":")[1])], (got["name"], name)
            elif isinstance(value, float):
                assert actual == pytest.approx(value, rel=1e-6), (got["name"], name)
            else:
                assert actual == value, (got["name"], name, actual, value)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"sm{c[0]}-rope{c[1][6]}-pad{c[1][7]}")
def test_c_attention_launches_what_the_python_launcher_launches(build, python_launches, tmp_path, case):
    """Kernel order, cubin (variant and target), grid and every argument of finevit_varlen_attention equal
    attention_fwd's on the same shapes, with q, k, v views of a qkv buffer; sm 8.6 runs the sm_80 cubins."""
    build_dir, _ = build
    sm, arguments = case
    assert_same_launches(c_launches(build_dir, tmp_path / "log", sm, *arguments), python_launches[case])


@pytest.mark.parametrize("case", OTHER_CASES, ids=lambda c: "-".join(map(str, c[1])))
def test_c_rope_and_patch_embed_launch_what_the_python_launchers_launch(build, python_launches, tmp_path, case):
    build_dir, _ = build
    sm, arguments = case
    assert_same_launches(c_launches(build_dir, tmp_path / "log", sm, *arguments), python_launches[case])


def test_the_gpu_test_reads_the_python_inputs_and_fails_on_outputs_no_kernel_wrote(build, tmp_path):
    """The GPU test's own flow without a GPU: make_inputs.py writes its cases from CPU tensors, and test_gpu runs
    them on the fake driver, whose memory is host memory and whose launches do nothing. Every output stays
    NaN-poisoned, so every case must fail; finevit.kernels' outputs, read back through the same fp16 decoding,
    must be within their bound of the float64 reference (the file formats and conversions agree)."""
    build_dir, _ = build
    inputs = tmp_path / "inputs"
    run(sys.executable, os.path.join(ROOT, "tests", "aot", "make_inputs.py"), "--out", str(inputs), "--manifest",
        str(build_dir / "aot" / "manifest.json"), "--device", "cpu", "--target", "90", env={"PYTHONPATH": ROOT})
    kinds = {"*": "p", "i32": "i", "fp32": "f"}
    done = run(str(build_dir / "test_gpu"), str(inputs), check=False, env={
        "FINEVIT_CUDA_LIBRARY": str(build_dir / "libfake_cuda.so"), "FAKE_CUDA_LOG": str(tmp_path / "log"),
        "FAKE_CUDA_SM": "90", "FAKE_CUDA_SIGNATURES": ";".join(
            f"{name}:{''.join(kinds[kind] for _, kind in params)}" for name, params in export.PARAMS.items())})
    lines = [line for line in done.stdout.splitlines() if " vs float64 " in line]
    assert done.returncode == 1 and len(lines) == 5 and "0 of 5 cases passed" in done.stdout, done.stdout
    for line in lines:
        match = re.search(r"^FAILED (\S+): max error nan vs float64 \(finevit.kernels ([\d.e+-]+), bound ([\d.e+-]+)\)",
                          line)
        assert match and 0 < float(match.group(2)) <= float(match.group(3)), line
