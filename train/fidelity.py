"""Fine-grained fidelity in miniature: does each ingredient of the FineViT recipe buy fine-grained perception?

    python -m train.fidelity --out results/fidelity                  # the CPU experiment (2 processes)
    python -m train.fidelity --out /tmp/fidelity --smoke             # tiny arms: checks that the command runs

Matched arms, trained with the project's own trainers (`train/stage1.py`, `train/stage2.py`) on the embedded
synthetic dataset and evaluated with its own suite, each with every seed of `--seeds`:

    dense    stage 1 as the embedded default: dense captions, native resolution (aspect kept, up to
             --max-pixels), the `cpu` preset
    short    (a) the same with the short caption of every image (data.short_caption_prob = 1): equal steps,
             equal patches per step, so equal compute
    square   (b) the same images squashed to --square-side × --square-side px (data.square_side), as a
             fixed-resolution encoder sees them, at equal patches per step (data.token_budget unchanged)
    stage2   (c) dense's encoder after stage 2 (region captioning + grounding with a tiny LLM); its baseline
             ("dense_before_stage2") is dense's encoder scored by the same probe and suite in the same run,
             before stage 2 trains it

Reported per arm as the mean and spread (population std) over seeds, in `results.json`, `summary.md` and
`fidelity.png` under --out:
- hard negatives: pairwise accuracy of the true caption against one negative, per change type (colour,
  shape, size, pattern, position, relation, ...) and overall;
- the stage-1 suite's retrieval R@1 and zero-shot classification of the dominant object's attributes;
- the local-perception probe (linear, box-pooled patch features) per attribute, for (c).
The comparisons' deltas are printed against the issue's targets: (a) dense − short ≥ +15 points of pairwise
hard-negative accuracy; (b) native − square ≥ +10 points on the size and pattern negatives; (c) stage 2 ≥ +5
points on the probe, with no retrieval loss beyond the spread.

Every run keeps its directory (`--out/runs/<arm>-s<seed>`), its log (`.log` beside it) and resumes when the
command is run again, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = ("dense", "short", "square", "stage2")
COMPARISONS = {"a": ("dense", "short"), "b": ("dense", "square"), "c": ("stage2", "dense")}
BEFORE_STAGE2 = "dense_before_stage2"  # dense's encoder scored by the stage-2 run's own evaluation, before training
STAGE1_ARMS = {"dense": [], "short": ["--data.short_caption_prob=1.0"]}  # "square" adds --data.square_side

# Sizes small enough that the whole experiment checks the plumbing in about a minute on 2 CPU cores.
SMOKE_STAGE1 = [
    "--model.vision.width=64", "--model.vision.depth=1", "--model.vision.num_heads=2", "--model.vision.mlp_dim=128",
    "--model.text.width=64", "--model.text.depth=1", "--model.text.num_heads=2", "--model.text.mlp_dim=128",
    "--data.synth_train=64", "--data.synth_val=32", "--data.token_budget=128", "--data.num_workers=0",
    "--data.shuffle_buffer=16", "--data.pack_buffer=16", "--lr_scheduler.warmup_steps=1",
    "--metrics.tensorboard=false", "--metrics.plot=false", "--eval.token_budget=4096",
]
SMOKE_STAGE2 = [
    "--data.token_budget=256", "--data.max_images=8", "--data.num_workers=0", "--data.shuffle_buffer=16",
    "--data.pack_buffer=16", "--llm.config.hidden_size=64", "--llm.config.intermediate_size=128",
    "--llm.config.num_hidden_layers=1", "--llm.config.num_attention_heads=2", "--llm.config.num_key_value_heads=1",
    "--llm.pretrain_steps=2", "--tasks.max_length=128", "--lr_scheduler.warmup_steps=1",
    "--metrics.tensorboard=false", "--metrics.plot=false", "--eval.regions=4", "--eval.max_new_tokens=4",
    "--eval.probe_train_images=16", "--eval.probe_val_images=8", "--eval.limit=8",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results folder (runs/, results.json, summary.md, fidelity.png)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds, each arm trained once per seed")
    parser.add_argument("--comparisons", default="a,b,c", help="which of a (captions), b (resolution), c (stage 2)")
    parser.add_argument("--steps", type=int, default=200, help="stage-1 optimizer steps of every stage-1 arm")
    parser.add_argument("--stage2-steps", type=int, default=120, help="stage-2 optimizer steps of arm stage2")
    parser.add_argument("--max-pixels", type=int, default=96 * 96, help="native arms: largest resized H·W")
    parser.add_argument("--square-side", type=int, default=48, help="arm square: the side every image is squashed to")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun --nproc_per_node)")
    parser.add_argument("--data-root", default="", help="the synthetic dataset, generated when missing; default: "
                        "data/synth (the embedded default's), with --smoke a small one under --out")
    parser.add_argument("--stage1-args", default="", help="extra stage-1 arguments for every arm (space-separated)")
    parser.add_argument("--stage2-args", default="", help="extra stage-2 arguments (space-separated)")
    parser.add_argument("--smoke", action="store_true", help="tiny arms, one seed: checks that the command runs")
    parser.add_argument("--readme", default="", help="also rewrite this README's fidelity block from the results")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.comparisons = [c for c in args.comparisons.split(",") if c]
    unknown = set(args.comparisons) - set(COMPARISONS)
    if unknown or not args.comparisons:
        given = ",".join(sorted(unknown)) or "nothing"
        parser.error(f"--comparisons: choose from {','.join(COMPARISONS)}, got {given}")
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    if args.smoke:
        args.seeds, args.steps, args.stage2_steps = args.seeds[:1], 4, 2
        args.max_pixels, args.square_side = 64 * 64, 32
    args.data_root = args.data_root or (str(Path(args.out) / "synth") if args.smoke else "data/synth")
    return args


def arms_needed(comparisons: list[str]) -> list[str]:
    return [arm for arm in ARMS if any(arm in COMPARISONS[c] for c in comparisons)]


# ----------------------------------------------------------------------------------------------------
# Running the arms
# ----------------------------------------------------------------------------------------------------


def torchrun(script: str, arguments: list[str], log: Path, nproc: int) -> float:
    """Run `script` under torchrun, its output appended to `log`; returns the wall time in seconds.

    `--max-restarts=1`: a rank that dies restarts the group once, and the trainer resumes from its last checkpoint
    (a run that had finished evaluates and exports again). A transient failure then costs minutes, not the
    experiment; a real bug fails twice, and the log keeps both attempts. (CI saw one once: a rank of a smoke
    run died of SIGABRT, cause not logged; the trainers now print every thread's stack on such a signal.)"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--max-restarts=1", str(REPO / "train" / script), *arguments]
    started = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        done = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed ({done.returncode}); from {log}:\n{failure_excerpt(log.read_text())}")
    return time.perf_counter() - started


FAILURE_MARKERS = ("Traceback", "Error", "error:", "terminate called", "what():", "Fatal Python error",
                   "Current thread", "Thread 0x")


def failure_excerpt(text: str, context: int = 12, tail: int = 30) -> str:
    """What a failed torchrun run's log says about its cause: the lines around the first line a rank wrote
    about a failure (a traceback, a C++ abort, faulthandler's stacks), then the end (torchrun's report, which
    names only the signal)."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if any(m in line for m in FAILURE_MARKERS)), len(lines))
    head = lines[max(0, first - 2):first + context] if first < len(lines) - tail else []
    return "\n".join([*head, *(["..."] if head else []), *lines[-tail:]])


def stage1_arguments(arm: str, seed: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    arguments = [f"--job.run_dir={run_dir}", f"--job.seed={seed}", f"--training.steps={args.steps}",
                 f"--data.root={args.data_root}", f"--data.max_pixels={args.max_pixels}",
                 f"--checkpoint.interval={max(1, args.steps // 2)}"]
    arguments += STAGE1_ARMS.get(arm, [f"--data.square_side={args.square_side}"] if arm == "square" else [])
    return arguments + (SMOKE_STAGE1 if args.smoke else []) + args.stage1_args.split()


def last_eval(run_dir: Path) -> dict:
    """The last evaluation record of a stage-1 run (its metrics.jsonl); {} when it has none."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if r.get("kind") == "eval"]
    return evals[-1] if evals else {}


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict:
    """Train (or resume, or reuse) one arm for one seed; returns its metrics and wall time."""
    runs = Path(args.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    name = f"{arm}-s{seed}"
    log = runs / f"{name}.log"
    if arm != "stage2":
        run_dir = runs / name
        finished = (run_dir / "metrics.jsonl").is_file() and last_eval(run_dir).get("step") == args.steps
        seconds = 0.0 if finished else torchrun("stage1.py", stage1_arguments(arm, seed, run_dir, args), log,
                                                  args.nproc)
        return {"metrics": stage1_metrics(last_eval(run_dir)), "seconds": seconds, "reused": finished}
    dense_dir, run_dir = runs / f"dense-s{seed}", runs / name
    arguments = [f"--job.run_dir={run_dir}", f"--job.seed={seed}", f"--training.steps={args.stage2_steps}",
                 f"--data.root={args.data_root}", "--encoder.init=stage1", f"--encoder.stage1_run={dense_dir}",
                 f"--llm.pretrain_dir={runs / 'llm'}", f"--checkpoint.interval={max(1, args.stage2_steps // 2)}"]
    arguments += (SMOKE_STAGE2 if args.smoke else []) + args.stage2_args.split()
    final_path = run_dir / "eval" / f"step-{args.stage2_steps}.json"
    finished = final_path.is_file()
    seconds = 0.0 if finished else torchrun("stage2.py", arguments, log, args.nproc)
    final = json.loads(final_path.read_text())
    initial = json.loads((run_dir / "eval" / "initial.json").read_text())
    before = {**suite_metrics(initial.get("retrieval", {})), **probe_metrics(initial.get("probe", {}))}
    return {"metrics": stage2_metrics(final), "before": before, "seconds": seconds, "reused": finished}


# ----------------------------------------------------------------------------------------------------
# Metrics: one flat namespace for every arm
# ----------------------------------------------------------------------------------------------------


def suite_metrics(record: dict) -> dict:
    """Hard negatives, retrieval R@1 and zero-shot classification from a "<dataset>/<task>/<metric>" record."""
    out = {}
    for key, value in record.items():
        if not isinstance(value, (int, float)) or key.count("/") < 2:
            continue
        dataset, task, metric = key.rsplit("/", 2)
        if task == "hard_negatives" and metric.startswith("pairwise_accuracy"):
            out["hard_negatives/" + (metric.removeprefix("pairwise_accuracy_") or "all")] = value
        elif task == "hard_negatives" and metric == "accuracy":
            out["hard_negatives/accuracy"] = value
        elif task == "zeroshot_retrieval" and metric == "image_retrieval_recall@1" and "_long" not in dataset:
            out["retrieval/image_r@1"] = value
        elif task == "zeroshot_classification" and metric == "acc1":
            out[f"classification/{dataset.rsplit('_', 1)[-1]}"] = value
    if "hard_negatives/pairwise_accuracy" in out:
        out["hard_negatives/all"] = out.pop("hard_negatives/pairwise_accuracy")
    return out


def probe_metrics(probe: dict) -> dict:
    return {f"probe/{key.removesuffix('/accuracy')}": value for key, value in probe.items()
            if key.endswith("/accuracy") or key == "mean_accuracy"}


def stage1_metrics(record: dict) -> dict:
    return suite_metrics(record)


def stage2_metrics(final: dict) -> dict:
    probe = {k.removeprefix("probe/"): v for k, v in final.items() if k.startswith("probe/")}
    retrieval = {k.removeprefix("retrieval/"): v for k, v in final.items() if k.startswith("retrieval/")}
    regions = {f"regions/{k.removeprefix('regions/')}": v for k, v in final.items()
               if k.startswith("regions/") and isinstance(v, float)}
    return {**suite_metrics(retrieval), **probe_metrics(probe), **regions}


def summarize(per_seed: dict[str, list[dict]]) -> dict:
    """{arm: {metric: {"mean", "std", "values"}}} over the seeds that ran."""
    summary = {}
    for arm, runs in per_seed.items():
        keys = sorted({k for run in runs for k in run})
        summary[arm] = {}
        for key in keys:
            values = [run[key] for run in runs if key in run]
            summary[arm][key] = {"mean": statistics.fmean(values),
                                 "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "values": values}
    return summary


def delta(summary: dict, arm: str, base: str, key: str) -> dict | None:
    if key not in summary.get(arm, {}) or key not in summary.get(base, {}):
        return None
    a, b = summary[arm][key], summary[base][key]
    return {"points": 100 * (a["mean"] - b["mean"]), "spread_points": 100 * max(a["std"], b["std"])}


def comparisons(summary: dict, wanted: list[str]) -> list[dict]:
    """The issue's three claims, each with its measured delta(s) and target."""
    rows = []
    if "a" in wanted:
        rows.append({"comparison": "a", "claim": "dense captions − short captions, hard-negative pairwise accuracy",
                     "delta": delta(summary, "dense", "short", "hard_negatives/all"), "target_points": 15.0})
    if "b" in wanted:
        for kind in ("size", "pattern"):
            rows.append({"comparison": "b", "claim": f"native resolution − fixed square, {kind} negatives",
                         "delta": delta(summary, "dense", "square", f"hard_negatives/{kind}"), "target_points": 10.0})
    if "c" in wanted:
        rows.append({"comparison": "c", "claim": "stage 2 − no stage 2, local-perception probe (mean)",
                     "delta": delta(summary, "stage2", BEFORE_STAGE2, "probe/mean_accuracy"), "target_points": 5.0})
        rows.append({"comparison": "c", "claim": "stage 2 − no stage 2, hard-negative pairwise accuracy",
                     "delta": delta(summary, "stage2", BEFORE_STAGE2, "hard_negatives/all"), "target_points": 0.0})
        retrieval = delta(summary, "stage2", BEFORE_STAGE2, "retrieval/image_r@1")
        rows.append({"comparison": "c", "claim": "stage 2 − no stage 2, retrieval R@1 (no loss beyond the spread)",
                     "delta": retrieval, "target_points": -(retrieval or {}).get("spread_points", 0.0)})
    for row in rows:
        row["met"] = None if row["delta"] is None else row["delta"]["points"] >= row["target_points"]
    return rows


# ----------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------


def comparison_cells(row: dict) -> list[str]:
    """A comparison's Δ, spread, target and whether it is met, as table cells."""
    d = row["delta"]
    measured = ["–", "–"] if d is None else [f"{d['points']:+.1f}", f"±{d['spread_points']:.1f}"]
    return measured + [f"≥ {row['target_points']:+.1f}", {True: "yes", False: "**no**", None: "not run"}[row["met"]]]


def summary_markdown(result: dict) -> str:
    arms = list(result["summary"])
    keys = sorted({k for arm in arms for k in result["summary"][arm]})
    lines = [f"# Fine-grained fidelity, {len(result['seeds'])} seed(s) {result['seeds']}",
             "", f"`{result['command']}` · commit `{result['commit'][:10]}` · {result['date']} · "
             f"training {result['train_seconds'] / 60:.1f} min (this invocation "
             f"{result['wall_seconds'] / 60:.1f} min)", "",
             "| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for key in keys:
        cells = []
        for arm in arms:
            s = result["summary"][arm].get(key)
            cells.append("–" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "| comparison | claim | Δ (points) | spread | target | met |", "|---|---|---|---|---|---|"]
    for row in result["comparisons"]:
        lines.append(f"| ({row['comparison']}) | {row['claim']} | " + " | ".join(comparison_cells(row)) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Bar charts with the seeds' spread: hard negatives per change type per stage-1 arm; probe per attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    panels = [("hard_negatives/", "hard-negative pairwise accuracy by change type",
               [a for a in ("dense", "short", "square") if a in summary]),
              ("probe/", "local-perception probe accuracy by attribute", [a for a in (BEFORE_STAGE2, "stage2")
                                                                         if a in summary])]
    panels = [p for p in panels if any(k.startswith(p[0]) for a in p[2] for k in summary[a])]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(7 * max(1, len(panels)), 4), squeeze=False)
    for ax, (prefix, title, arms) in zip(axes[0], panels):
        keys = sorted({k for a in arms for k in summary[a] if k.startswith(prefix) and k != "hard_negatives/accuracy"})
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            means = [100 * summary[arm].get(k, {"mean": float("nan")})["mean"] for k in keys]
            stds = [100 * summary[arm].get(k, {"std": 0.0})["std"] for k in keys]
            label = "before stage 2" if arm == BEFORE_STAGE2 else arm
            ax.bar([x + i * width for x in range(len(keys))], means, width, yerr=stds, capsize=2, label=label)
        ax.set_xticks([x + width * (len(arms) - 1) / 2 for x in range(len(keys))])
        ax.set_xticklabels([k[len(prefix):] for k in keys], rotation=30, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"FineViT fidelity in miniature · seeds {result['seeds']} · commit {result['commit'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


README_START = ("<!-- fidelity: generated by `python -m train.fidelity --out results/fidelity --readme README.md` "
                "from results/fidelity/results.json; do not edit by hand -->")
README_END = "<!-- end of fidelity -->"


def readme_block(result: dict) -> str:
    """The README's claims table: each claim of the FineViT recipe, what this experiment measured, and how."""
    settings = result["settings"]
    lines = [README_START,
             f"Measured by `{result['command']}` at commit `{result['commit'][:10]}` on {result['date']}: seeds "
             f"{result['seeds']}, stage-1 arms {settings['steps']} steps, stage 2 {settings['stage2_steps']} steps, "
             f"native resolution up to {settings['max_pixels']} pixels vs a {settings['square_side']}² px square; "
             f"{result['train_seconds'] / 60:.0f} min of training on {result.get('machine', 'this machine')}. "
             "Δ is the difference of the arms' means over the seeds, spread the larger of their standard "
             "deviations, in points of accuracy.", "",
             "| claim (FineViT recipe) | measured here | Δ (points) | spread | target | met |",
             "|---|---|---|---|---|---|"]
    for row in result["comparisons"]:
        lines.append(f"| {CLAIMS[row['comparison']]} | ({row['comparison']}) {row['claim']} | "
                     + " | ".join(comparison_cells(row)) + " |")
    return "\n".join(lines + ["", README_END])


CLAIMS = {"a": "dense, detail-rich captions teach fine-grained perception that alt-text does not",
          "b": "native resolution keeps the detail a fixed low-resolution square destroys",
          "c": "region alignment with an LLM (stage 2) sharpens local perception"}


def write_readme(readme: Path, result: dict) -> None:
    """Replace the block between README_START and README_END in `readme` with `readme_block(result)`."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"--readme: {readme} has no fidelity block ({README_START!r} ... {README_END!r})")
    readme.write_text(text[:start] + readme_block(result) + text[end + len(README_END):])


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    arms = arms_needed(args.comparisons)
    if "stage2" in arms and "dense" not in arms:
        arms.insert(0, "dense")
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    trained_seconds = {(r["arm"], r["seed"]): r["seconds"] for r in previous.get("runs", []) if r["seconds"] > 0}
    per_seed: dict[str, list[dict]] = {arm: [] for arm in arms}
    runs = []
    total = len(arms) * len(args.seeds)
    for seed in args.seeds:
        for arm in arms:
            print(f"[fidelity] {len(runs) + 1}/{total}: arm {arm}, seed {seed} "
                  f"(log: {out / 'runs' / f'{arm}-s{seed}.log'})", flush=True)
            run = run_arm(arm, seed, args)
            if run["reused"]:  # the training time it took when it ran, when an earlier results.json knows it
                run["seconds"] = trained_seconds.get((arm, seed), 0.0)
            per_seed[arm].append(run["metrics"])
            if "before" in run:  # dense's encoder, scored by the stage-2 run before it trains
                per_seed.setdefault(BEFORE_STAGE2, []).append(run["before"])
            runs.append({"arm": arm, "seed": seed, **run})
            done = "reused (finished before)" if run["reused"] else f"done in {run['seconds'] / 60:.1f} min"
            print(f"[fidelity]   {done}; elapsed "
                  f"{(time.perf_counter() - started) / 60:.1f} min", flush=True)
    summary = summarize(per_seed)
    result = {"command": "python -m train.fidelity " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "seeds": args.seeds, "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
              "wall_seconds": time.perf_counter() - started, "train_seconds": sum(r["seconds"] for r in runs),
              "machine": f"{os.cpu_count()} CPU cores", "runs": runs, "summary": summary,
              "comparisons": comparisons(summary, args.comparisons)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(result))
    plot(result, out / "fidelity.png")
    if args.readme:
        write_readme(Path(args.readme), result)
    print(summary_markdown(result))
    print(f"[fidelity] wrote {out / 'results.json'}, {out / 'summary.md'}, {out / 'fidelity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
