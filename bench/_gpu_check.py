"""bench/gpu_check.sh's summary lines: what each stage's log or JSON says, in one line plus indented details.

    python bench/_gpu_check.py header --mode gpu|cpu
    python bench/_gpu_check.py environment ENV.json
    python bench/_gpu_check.py warmup WARMUP_DIR
    python bench/_gpu_check.py pytest PYTEST.log
    python bench/_gpu_check.py repro REPRO.json
    python bench/_gpu_check.py sanitizer SANITIZER.log [REPRO.json]
    python bench/_gpu_check.py bench NAME RESULTS_DIR BENCH.log

Every command except `header` prints the stage's key result on its first line and detail lines after it, and
copes with missing or truncated files (a stage cut at its time limit leaves them so): it never fails on them.
No torch import, so each call takes a fraction of a second.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

MAX_NAMES = 25  # failing test names listed in the summary


def _run(command: list[str], timeout: float = 10.0) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _load(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------


def header(mode: str) -> list[str]:
    """GPU, driver, torch, triton, commit, date: the first lines of summary.txt (no torch import)."""
    gpu, driver = "none (CPU mode)", "–"
    if mode != "cpu":
        found = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]) \
            if shutil.which("nvidia-smi") else None
        if found:
            rows = [line.split(",") for line in found.splitlines()]
            gpu = " + ".join(r[0].strip() for r in rows)
            driver = rows[0][1].strip() if len(rows[0]) > 1 else "unknown"
        else:
            gpu, driver = "unknown (nvidia-smi not found or failed)", "unknown"
    commit = os.environ.get("GIT_COMMIT")
    if not commit:
        commit = _run(["git", "rev-parse", "HEAD"]) or "unknown (no git checkout; set GIT_COMMIT)"
        status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        if status:
            commit += " (dirty)"
    return [
        f"GPU: {gpu}",
        f"driver: {driver}",
        f"torch: {_version('torch')}",
        f"triton: {_version('triton')}",
        f"commit: {commit}",
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"python: {platform.python_version()} · host: {platform.node()} · {os.cpu_count()} CPU cores",
    ]


def environment(path: str) -> list[str]:
    record = _load(path)
    if not record:
        return ["no environment.json"]
    env, ceilings = record.get("env", {}), record.get("ceilings", {})
    matmul = (ceilings.get("matmul") or {}).get("tflops")
    copy = (ceilings.get("copy") or {}).get("gbps")
    return [f"{env.get('gpu')} · driver {env.get('driver')} · torch {env.get('torch')} · triton {env.get('triton')} · "
            f"matmul {_fmt(matmul, 4)} TFLOP/s · copy {_fmt(copy, 4)} GB/s"]


def warmup(directory: str) -> list[str]:
    """status.txt holds 'name exit-status' per finished warm-up process (124/137: stopped at the time box)."""
    lines = _read(Path(directory) / "status.txt").split()
    statuses = dict(zip(lines[0::2], lines[1::2]))
    started = _read(Path(directory) / "started.txt").split()
    boxed = [n for n, s in statuses.items() if s in ("124", "137")]
    failed = [n for n, s in statuses.items() if s not in ("0", "124", "137")]
    unfinished = [n for n in started if n not in statuses]
    box = _read(Path(directory) / "box.txt").strip() or "?"
    key = (f"{len(started)} processes: {sum(s == '0' for s in statuses.values())} finished, {len(boxed)} stopped at "
           f"the {box} s time box (what they compiled stays cached), {len(failed)} failed")
    if unfinished:
        key += f", {len(unfinished)} never reported"
    details = []
    for name in failed:
        last = [line for line in _read(Path(directory) / f"{name}.log").splitlines() if line.strip()]
        details.append(f"warm-up {name} exit {statuses[name]}: {last[-1][:200] if last else '(empty log)'}")
    return [key, *details]


_VERBOSE = re.compile(r"^(?P<id>\S+::\S+) (?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_XDIST = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (?P<id>\S+)")
_SHORT = re.compile(r"^(?P<outcome>FAILED|ERROR) (?P<id>\S+)(?: - (?P<reason>.*))?$")
_STARTED = re.compile(r"^\S+::\S+\s*$")
_FINAL = re.compile(r"^=+ (?P<text>.*\b(?:passed|failed|error|errors|skipped|deselected|no tests ran)\b.*?) =+$")


def pytest_summary(path: str) -> list[str]:
    """Key: pytest's final counts, or (cut) the counts of the per-test lines seen; details: failing test ids."""
    text = _read(path)
    outcomes: dict[str, str] = {}
    reasons: dict[str, str] = {}
    final = running = None
    for line in text.splitlines():
        if _STARTED.match(line):  # `-v` without xdist prints the id when a test starts, its outcome when it ends
            running = line.strip()
        line = line.rstrip()
        for pattern in (_VERBOSE, _XDIST):
            match = pattern.match(line)
            if match:
                outcomes[match["id"]] = match["outcome"]
        match = _SHORT.match(line)
        if match:
            outcomes.setdefault(match["id"], match["outcome"])
            if match["reason"]:
                reasons[match["id"]] = match["reason"][:160]
        match = _FINAL.match(line)
        if match:
            final = match["text"]
    failing = sorted(i for i, o in outcomes.items() if o in ("FAILED", "ERROR"))
    interrupted = "KeyboardInterrupt" in text
    if final:
        key = ("interrupted at the limit: " if interrupted else "") + final
    elif outcomes:
        counts = {o: sum(v == o for v in outcomes.values()) for o in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        key = ("no final pytest line (cut?); seen so far: "
               + ", ".join(f"{n} {o.lower()}" for o, n in counts.items() if n))
    else:
        tail = [line for line in text.splitlines() if line.strip()]
        key = f"no test results in the log; last line: {tail[-1][:200] if tail else '(empty log)'}"
    if failing:
        key += f" · failing: {len(failing)}"
    if running and running not in outcomes:
        key += f" · running when stopped: {running}"
    details = [f"{outcomes[i]} {i}" + (f" - {reasons[i]}" if i in reasons else "") for i in failing[:MAX_NAMES]]
    if len(failing) > MAX_NAMES:
        details.append(f"... and {len(failing) - MAX_NAMES} more (pytest.log / pytest.xml in the tarball)")
    return [key, *details]


def repro(path: str) -> list[str]:
    """Key: cases ok and the worst case; details: a small table of our errors / PyTorch's per tensor."""
    payload = _load(path)
    if not payload or "rows" not in payload:
        return ["no attention_repro JSON (see its log)"]
    rows = payload["rows"]
    ok = sum(bool(r.get("ok")) for r in rows)
    key = f"{ok} of {len(rows)} cases ok"
    shares = [(max(v if v is not None else math.inf for v in r["share_of_limit"].values()), r)
              for r in rows if r.get("share_of_limit")]
    if shares:
        worst, row = max(shares, key=lambda s: s[0])
        key += f"; worst {_repro_label(row)} at {_fmt(worst, 2)} of its limit"
    details = [f"{'case':<21} " + " ".join(f"{t:>19}" for t in ("out", "dq", "dk", "dv"))
               + "  status   (max rel error: ours / PyTorch same dtype)"]
    for r in rows:
        label = _repro_label(r)
        if "ours" in r:
            cells = " ".join(f"{_fmt(r['ours'][t], 2) + ' / ' + _fmt(r['torch'][t], 2):>19}"
                             for t in ("out", "dq", "dk", "dv"))
            details.append(f"{label:<21} {cells}  {r['status']}")
        else:
            details.append(f"{label:<21} {r.get('status')}: {r.get('error', '')[:160]}")
    return [key, *details]


def _repro_label(row: dict) -> str:
    """e.g. "d72 rope bf16 ato": head dim, RoPE, dtype, backward (det: deterministic, ato: atomic)."""
    return (f"d{row['head_dim']} {'rope' if row['rope'] else 'plain'} {row['dtype']} "
            f"{row.get('backward', 'deterministic')[:3]}")


def sanitizer(path: str, repro_json: str | None = None) -> list[str]:
    text = _read(path)
    lines = text.splitlines()
    summary = [line.strip("= ").strip() for line in lines if "ERROR SUMMARY" in line]
    key = summary[-1] if summary else "no ERROR SUMMARY line (cut, or compute-sanitizer did not finish)"
    cases = [line for line in lines if re.match(r"^\d+ of \d+ cases ok", line)]
    if cases:
        key += f" · repro under memcheck: {cases[-1]}"
    elif repro_json and _load(repro_json):
        key += f" · repro under memcheck: {repro(repro_json)[0]}"
    errors = [line.strip("= ").strip() for line in lines
              if re.match(r"^=+ (Invalid|Out-of-range|Misaligned|Program hit|Address|Malloc|Leaked|Race)", line)]
    details = list(dict.fromkeys(errors))[:10]
    return [key, *details]


def bench(name: str, results_dir: str, log_path: str) -> list[str]:
    """Key: the targets' tally from the bench's newest JSON; details: its Targets block, and for train_step the
    host syncs per step of every (case, provider)."""
    found = sorted(Path(results_dir).glob(f"{name}_*.json"), key=lambda p: p.stat().st_mtime)
    payload = _load(found[-1]) if found else None
    log = _read(log_path)
    if payload is None:
        tail = [line for line in log.splitlines() if line.strip()]
        key = f"no results JSON; last log line: {tail[-1][:200] if tail else '(empty log)'}"
    else:
        results = payload.get("results", [])
        status = {s: sum(r.get("status") == s for r in results) for s in ("ok", "skipped", "failed", "oom")}
        checks = payload.get("checks", [])
        met = sum(c.get("met") is True for c in checks)
        not_met = sum(c.get("met") is False for c in checks)
        key = (f"{found[-1].name}: {status['ok']} results ok"
               + "".join(f", {n} {s}" for s, n in status.items() if s != "ok" and n)
               + f" · targets: {met} met, {not_met} not met, {len(checks) - met - not_met} not measured")
    details = []
    block = re.search(r"^Targets.*?(?:\n[ \t]*\n|\Z)", log, flags=re.M | re.S)
    if block:
        details += [line for line in block.group(0).splitlines() if line.strip()]
    if name == "train_step" and payload is not None:
        syncs = [f"{r['case']} {r['provider']}: "
                 + (str(r["host_syncs_per_step"]) if r.get("host_syncs_per_step") is not None else
                    ("– (not counted on CPU)" if r.get("status") == "ok" else r.get("status", "?")))
                 for r in payload.get("results", [])]
        if syncs:
            details.append("host syncs per step: " + "; ".join(syncs))
    return [key, *details]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    command, args = argv[0], argv[1:]
    try:
        if command == "header":
            lines = header(args[1] if args[:1] == ["--mode"] and len(args) > 1 else "gpu")
        elif command == "environment":
            lines = environment(args[0])
        elif command == "warmup":
            lines = warmup(args[0])
        elif command == "pytest":
            lines = pytest_summary(args[0])
        elif command == "repro":
            lines = repro(args[0])
        elif command == "sanitizer":
            lines = sanitizer(args[0], args[1] if len(args) > 1 else None)
        elif command == "bench":
            lines = bench(args[0], args[1], args[2])
        else:
            print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
            return 2
    except Exception as error:  # noqa: BLE001 - a summary line must always come out
        lines = [f"(no summary: {type(error).__name__}: {error})"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
