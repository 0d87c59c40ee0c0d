"""Region-level evaluations: the encoder's local perception (a linear probe on box-pooled patch features) and
a stage-2 model's region captioning and grounding.

Local perception probe. Every region box of an image is pooled from the encoder's per-patch features (mean
over the patch cells the box touches, `finevit.data.image.boxes_to_grid`), and one linear classifier per
attribute is fitted on the train regions and scored on the val regions. With the embedded dataset the
attributes are those of the region captions "a {size} {pattern} {color} {shape}"; any dataset can pass its
own `attributes` (attribute -> values; a value is found in a caption as a whole word or phrase).
The classifier: features standardized with the train statistics, multinomial logistic regression with a
small L2 penalty, fitted to convergence with L-BFGS (deterministic). `majority` is the accuracy of always
answering the most frequent train value: the level a probe reaches with no information.

Region captioning and grounding (`region_tasks`): for each val region (at most `limit`), greedy decoding of
"Describe the region <box>." scored by the attributes named in the answer, and of "Locate: <caption>." scored
by the IoU of the parsed box with the true one (accuracy at IoU >= 0.5, as in RefCOCO).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from finevit.data.conversations import SequenceBuilder, box_iou, grounding_turn, parse_box, region_caption_turn
from finevit.data.image import ImageConfig, boxes_to_grid

from .encode import iter_image_batches


def synth_attributes() -> dict[str, list[str]]:
    """The embedded dataset's region attributes (finevit.data.synth)."""
    from finevit.data import synth

    return {"size": list(synth.SIZES), "pattern": list(synth.PATTERNS), "color": list(synth.COLORS),
            "shape": list(synth.SHAPES)}


def parse_attributes(text: str, attributes: dict[str, Sequence[str]]) -> dict[str, str | None]:
    """The value of each attribute named in `text` (the longest one when several match), else None."""
    words = f" {re.sub(r'[^a-z0-9-]+', ' ', text.lower())} "
    found = {}
    for name, values in attributes.items():
        hits = [v for v in values if f" {v.lower()} " in words]
        found[name] = max(hits, key=len) if hits else None
    return found


@torch.no_grad()
def region_features(vision, shards: str, image_config: ImageConfig, limit: int | None, device: torch.device,
                    token_budget: int = 16384) -> tuple[torch.Tensor, list[str]]:
    """(float32 (R, D) box-pooled patch features, R region captions) of the regions of `shards`' images."""
    pooled, captions = [], []
    for _, _, notes, batch in iter_image_batches(shards, image_config, max(token_budget,
                                                                                image_config.max_patches), limit):
        features = vision.forward_features(batch["patches"].to(device), batch["positions"].to(device),
                                           batch["cu_seqlens"].to(device), batch["max_seqlen"]).float().cpu()
        starts = batch["cu_seqlens"].tolist()
        for i, annotation in enumerate(notes):
            regions = annotation.get("regions") or []
            if not regions:
                continue
            gh, gw = batch["grid_hw"][i].tolist()
            grid = features[starts[i]:starts[i + 1]].view(gh, gw, -1)
            _, cells = boxes_to_grid(np.asarray([r["bbox"] for r in regions]), (gh, gw))
            for (r0, c0, r1, c1), region in zip(cells.tolist(), regions):
                pooled.append(grid[r0:r1, c0:c1].reshape(-1, grid.shape[-1]).mean(0))
                captions.append(region["caption"])
    if not pooled:
        raise ValueError(f"region_features: no region boxes in the first {limit} images of {shards!r}")
    return torch.stack(pooled), captions


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, l2: float = 1e-3, iterations: int = 200) -> float:
    """Val accuracy of a multinomial logistic regression fitted on (train_x, train_y) (module doc)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xt = ((train_x - mean) / std).double()
    xv = ((val_x - mean) / std).double()
    weight = torch.zeros(xt.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, tolerance_grad=1e-7,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(((xv @ weight + bias).argmax(1) == val_y).double().mean())


def local_perception_probe(vision, train_shards: str, val_shards: str, image_config: ImageConfig,
                           device: torch.device, train_images: int = 1000, val_images: int = 500,
                           attributes: dict[str, Sequence[str]] | None = None) -> dict[str, float]:
    """Linear-probe accuracy per attribute (and its majority baseline) on box-pooled features (module doc)."""
    attributes = attributes or synth_attributes()
    vision = vision.eval()
    train_x, train_captions = region_features(vision, train_shards, image_config, train_images, device)
    val_x, val_captions = region_features(vision, val_shards, image_config, val_images, device)
    results: dict[str, float] = {"train_regions": len(train_captions), "val_regions": len(val_captions)}
    accuracies = []
    for name, values in attributes.items():
        index = {v: i for i, v in enumerate(values)}

        def labels(captions, name=name, values=values, index=index):
            found = [parse_attributes(c, {name: values})[name] for c in captions]
            keep = [i for i, v in enumerate(found) if v is not None]
            return keep, torch.tensor([index[found[i]] for i in keep], dtype=torch.long)

        train_keep, train_y = labels(train_captions)
        val_keep, val_y = labels(val_captions)
        if len(train_keep) == 0 or len(val_keep) == 0:
            continue
        acc = linear_probe(train_x[train_keep], train_y, val_x[val_keep], val_y, len(values))
        majority = float((val_y == torch.bincount(train_y, minlength=len(values)).argmax()).double().mean())
        results[f"{name}/accuracy"] = acc
        results[f"{name}/majority"] = majority
        accuracies.append(acc)
    results["mean_accuracy"] = float(np.mean(accuracies)) if accuracies else float("nan")
    return results


@torch.no_grad()
def region_tasks(model, builder: SequenceBuilder, val_shards: str, image_config: ImageConfig,
                 device: torch.device, limit: int = 200, max_new_tokens: int = 24, batch_images: int = 32,
                 attributes: dict[str, Sequence[str]] | None = None) -> dict[str, float]:
    """Region captioning attribute accuracy and grounding accuracy (IoU >= 0.5) of a VisionLanguageModel on
    the first `limit` regions of `val_shards` (module doc)."""
    from finevit.model.vlm import merged_token_counts

    attributes = attributes or synth_attributes()
    model = model.eval()
    tokenizer = builder.tokenizer
    correct = {name: 0 for name in attributes}
    exact = iou_hits = seen = 0
    ious = []
    budget = max(16384, image_config.max_patches)
    for _, _, notes, batch in iter_image_batches(val_shards, image_config, budget):
        if seen >= limit:
            break
        image = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        embeds = model.image_embeddings(image)
        counts = merged_token_counts(batch["grid_hw"], model.merge_size).tolist()
        chunks = torch.split(embeds, counts)
        jobs = []  # (image index, region) for the regions still to score
        for i, annotation in enumerate(notes):
            for region in annotation.get("regions") or []:
                if seen + len(jobs) < limit:
                    jobs.append((i, region))
        seen += len(jobs)
        for start in range(0, len(jobs), batch_images):
            part = jobs[start:start + batch_images]
            caption_prompts = [builder.prompt(counts[i], region_caption_turn(r["bbox"], r["caption"]).prompt)
                               for i, r in part]
            ground_prompts = [builder.prompt(counts[i], grounding_turn(r["bbox"], r["caption"]).prompt)
                              for i, r in part]
            prompts = [torch.tensor(p, device=device) for p in caption_prompts + ground_prompts]
            image_rows = torch.cat([chunks[i] for i, _ in part] * 2)
            answers = model.generate(image_rows, prompts, max_new_tokens, builder.eos_token_id,
                                     builder.pad_token_id)
            texts = tokenizer.batch_decode(answers, skip_special_tokens=False)
            for (_, region), caption, located in zip(part, texts[:len(part)], texts[len(part):]):
                truth = parse_attributes(region["caption"], attributes)
                said = parse_attributes(caption, attributes)
                hits = [said[n] == truth[n] and truth[n] is not None for n in attributes]
                for n, hit in zip(attributes, hits):
                    correct[n] += hit
                exact += all(hits)
                box = parse_box(located)
                iou = box_iou(box, region["bbox"]) if box is not None else 0.0
                ious.append(iou)
                iou_hits += iou >= 0.5
    n = max(1, len(ious))
    out = {f"caption/{name}_accuracy": correct[name] / n for name in attributes}
    out["caption/all_attributes_accuracy"] = exact / n
    out["caption/mean_attribute_accuracy"] = float(np.mean([correct[a] / n for a in attributes]))
    out["grounding/accuracy_iou50"] = iou_hits / n
    out["grounding/mean_iou"] = float(np.mean(ious)) if ious else 0.0
    out["regions"] = len(ious)
    return out

