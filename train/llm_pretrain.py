"""The embedded default's LLM: a tiny `transformers` causal LM (Qwen2 architecture, built from a config),
pretrained on the dataset's text so that stage 2 aligns the encoder with a *language model*, as it would with
a downloaded Qwen2.5, and not with random weights.

    python train/llm_pretrain.py --out runs/llm_tiny [--data data/synth] [--steps 300]

The text is stage 2's own conversation format without the image (`finevit.data.conversations`: the vision
markers with no image tokens between them, then turns of region captioning, grounding and the dense caption
drawn from the train annotations), with the loss on every token. The LM learns the prompts, the caption
grammar, the attribute vocabulary and the box format; what a region or box holds it can only learn from the
image, in stage 2. One process, all the CPU threads (or one GPU); a few minutes on 2 CPU cores, done once:
the directory holds the LLM (save_pretrained) and `pretrain.json` with the settings (the tokenizer is the
dataset's, prepared with `prepare_tokenizer`), and is rebuilt when they change.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from finevit.data.conversations import SequenceBuilder, prepare_tokenizer, sample_turns  # noqa: E402
from finevit.data.sample import BadSampleError, parse_annotation  # noqa: E402
from finevit.data.shards import expand_shards, read_shard  # noqa: E402
from finevit.model.vlm import build_llm  # noqa: E402

SETTINGS_NAME = "pretrain.json"


def read_annotations(shards: str, limit: int) -> list[dict]:
    """The first `limit` valid annotations of `shards` (JSON members only; images are not decoded)."""
    out = []
    for url in expand_shards(shards):
        for _, raw in read_shard(url, lambda u, exc: None):
            try:
                out.append(parse_annotation(raw.get("json")))
            except BadSampleError:
                continue
            if len(out) >= limit:
                return out
    return out


def text_sequences(builder: SequenceBuilder, annotations: list[dict], mix: dict, turns: int, seed: int,
                   epochs: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(epochs):
        for a in annotations:
            regions = a.get("regions") or []
            boxes = np.asarray([r["bbox"] for r in regions], dtype=np.float32).reshape(-1, 4)
            chosen = sample_turns(a["caption"], boxes, [r["caption"] for r in regions], mix, turns, rng)
            sequences.append(builder.build(0, chosen)[0])
    return sequences


def pretrain(out: Path, tokenizer_dir: Path, train_shards: str, *, architecture: str = "qwen2",
             overrides: dict | None = None, mix: dict | None = None, turns: int = 4, max_length: int = 384,
             steps: int = 300, batch_size: int = 32, lr: float = 3e-3, samples: int = 5000, seed: int = 0,
             device: str = "cpu", log_every: int = 50) -> Path:
    """Train the tiny LLM and save it (save_pretrained + tokenizer + pretrain.json) into `out`, atomically."""
    from transformers import AutoTokenizer

    mix = mix or {"region_caption": 1.0, "grounding": 1.0, "global_caption": 1.0}
    settings = {"architecture": architecture, "overrides": overrides or {}, "mix": mix, "turns": turns,
                "max_length": max_length, "steps": steps, "batch_size": batch_size, "lr": lr, "samples": samples,
                "seed": seed, "tokenizer": str(Path(tokenizer_dir).resolve()), "train_shards": train_shards}
    if (out / SETTINGS_NAME).is_file() and json.loads((out / SETTINGS_NAME).read_text()).get("settings") == settings:
        return out
    started = time.perf_counter()
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    builder = SequenceBuilder(tokenizer, max_length)
    annotations = read_annotations(train_shards, samples)
    if not annotations:
        raise ValueError(f"llm_pretrain: no readable annotation in {train_shards!r}")
    epochs = max(1, math.ceil(steps * batch_size / len(annotations)))
    sequences = text_sequences(builder, annotations, mix, turns, seed, epochs)
    torch.manual_seed(seed)
    model = build_llm(len(tokenizer), architecture, overrides, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id).to(device)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    def lr_factor(s: int) -> float:  # linear warmup, then cosine decay to 0
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order = np.random.default_rng(seed + 1).permutation(len(sequences))
    print(f"[llm_pretrain] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter {architecture} on "
          f"{len(annotations)} annotations' text, {steps} steps of {batch_size} sequences -> {out}", flush=True)
    for step in range(steps):
        chosen = [sequences[i] for i in order[(step * batch_size) % len(order):][:batch_size]]
        width = max(len(s) for s in chosen)
        ids = torch.full((len(chosen), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chosen):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
            print(f"[llm_pretrain] step {step + 1}/{steps} | loss {loss.item():.4f} | "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.cpu().save_pretrained(tmp)  # the tokenizer stays the dataset's (`tokenizer` in pretrain.json)
    (tmp / SETTINGS_NAME).write_text(json.dumps({"settings": settings, "final_loss": loss.item(),
                                                 "seconds": time.perf_counter() - started}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python train/llm_pretrain.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/llm_tiny")
    parser.add_argument("--data", default="data/synth", help="a finevit.data.synth dataset (shards + tokenizer)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    root = Path(args.data)
    meta = json.loads((root / "meta.json").read_text())
    pretrain(Path(args.out), root / meta.get("tokenizer", "tokenizer"), str(root / meta["splits"]["train"]["shards"]),
             steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
