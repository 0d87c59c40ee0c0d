"""Run the evaluation suite on a checkpoint saved with `FineCLIP.save_pretrained`.

    python -m finevit.eval --checkpoint CKPT --data data/synth [--split val] [--out results/]
    python -m finevit.eval --checkpoint CKPT --shards "coco/val-{0000..0004}.tar" --tokenizer TOK --tasks retrieval

`--data DIR` is a dataset made by `python -m finevit.data.synth` (its meta.json names the split's shards,
classes.json the classification label keys with their class names and prompt templates, tokenizer/ its
tokenizer); `--shards` and `--classes FILE` describe any other webdataset in docs/design.md's format.
The tokenizer is the first of --tokenizer, CKPT/tokenizer, DIR/tokenizer. Images are preprocessed with
CKPT/preprocess.json when the trainer saved one (ImageConfig.save), else with the model's patch size and
the --min-pixels/--max-pixels/--merge-size given here. Texts are truncated to the text tower's context.

Writes one CLIP_benchmark-style JSON per (dataset, task) into --out and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from finevit.data.image import PREPROCESS_CONFIG_NAME, ImageConfig
from finevit.data.text import TextTokenizer

from . import tasks as T
from .encode import embed_images

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_data(args) -> tuple[str, dict, str, Path | None]:
    """(shard spec, classes dict, dataset name, dataset-provided tokenizer dir or None)."""
    classes: dict = {}
    tokenizer_dir = None
    if args.data:
        root = Path(args.data)
        meta = json.loads((root / "meta.json").read_text())
        if args.split not in meta["splits"]:
            raise SystemExit(f"--split {args.split!r} is not in {root / 'meta.json'} (splits: {list(meta['splits'])})")
        shards = str(root / meta["splits"][args.split]["shards"])
        if meta.get("classes") and (root / meta["classes"]).exists():
            classes = json.loads((root / meta["classes"]).read_text())
        if meta.get("tokenizer") and (root / meta["tokenizer"]).is_dir():
            tokenizer_dir = root / meta["tokenizer"]
        name = args.dataset_name or f"{meta.get('name', root.name)}_{args.split}"
    elif args.shards:
        shards, name = args.shards, args.dataset_name or "webdataset"
    else:
        raise SystemExit("give --data DIR (a finevit.data.synth dataset) or --shards SPEC")
    if args.classes:
        classes = json.loads(Path(args.classes).read_text())
    return shards, classes, name, tokenizer_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finevit.eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", required=True, help="directory written by FineCLIP.save_pretrained")
    parser.add_argument("--data", help="a dataset directory made by finevit.data.synth")
    parser.add_argument("--split", default="val", help="split of --data (default: val)")
    parser.add_argument("--shards", help="webdataset shard spec (braces, '::'), instead of --data")
    parser.add_argument("--classes", help="JSON {label_key: {classnames: [...], templates: ['a {c}.', ...]}}")
    parser.add_argument("--tokenizer", help="a transformers tokenizer directory")
    parser.add_argument("--tasks", default=",".join(T.TASKS), help=f"comma-separated, of {', '.join(T.TASKS)}")
    parser.add_argument("--out", default="eval_results", help="output directory for the JSON files")
    parser.add_argument("--dataset-name", help="the JSON's dataset name (default from --data / 'webdataset')")
    parser.add_argument("--model-name", default="FineCLIP", help="the JSON's model name")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="autocast dtype")
    parser.add_argument("--token-budget", type=int, default=16384, help="patches (or text tokens) per batch")
    parser.add_argument("--min-pixels", type=int, default=None)
    parser.add_argument("--max-pixels", type=int, default=None)
    parser.add_argument("--merge-size", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from finevit.model import FineCLIP

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(T.TASKS))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; tasks: {', '.join(T.TASKS)}")
    shards, classes, dataset, data_tokenizer = _resolve_data(args)
    checkpoint = Path(args.checkpoint)
    model = FineCLIP.from_pretrained(checkpoint, device=args.device).eval()

    tokenizer_dir = args.tokenizer or (checkpoint / "tokenizer" if (checkpoint / "tokenizer").is_dir()
                                       else data_tokenizer)
    if tokenizer_dir is None:
        raise SystemExit("no tokenizer: pass --tokenizer DIR (or save one as CHECKPOINT/tokenizer)")
    tokenizer = TextTokenizer.from_pretrained(tokenizer_dir, model.config.text.context_length)
    tokenizer.check_vocab(model.config.text.vocab_size)

    if (checkpoint / PREPROCESS_CONFIG_NAME).exists():
        image_config = ImageConfig.load(checkpoint)
    else:
        overrides = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels),
                                       ("merge_size", args.merge_size)) if v is not None}
        image_config = ImageConfig.for_model(model.config.vision, **overrides)
    budget = max(args.token_budget, image_config.max_patches)  # one largest image always fits a batch
    encode = {"token_budget": args.token_budget, "device": args.device, "dtype": DTYPES[args.dtype],
              "progress": not args.no_progress}

    images = embed_images(model, shards, image_config, budget, args.device, DTYPES[args.dtype], args.limit,
                          progress=not args.no_progress)
    if "classification" in tasks and not classes:
        print("classification: no class definitions (--classes or the dataset's classes.json); skipped")
    results = T.run_suite(model, tokenizer, images, dataset, tasks, classes, ks=args.recall_k, **encode)

    for result in results:
        path = T.write_result(result, args.out, args.model_name, str(checkpoint.resolve()))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if "rank" not in k)
        print(f"{result.dataset:>24} {result.task:<24} {shown}")
        print(f"{'':>24} -> {path}")
    if images.skipped:
        print(f"skipped samples: {images.skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
