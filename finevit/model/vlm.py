"""Stage 2's model: FineViT -> patch merger -> a causal LLM from `transformers`, image embeddings inserted at
placeholder tokens.

    vision   FineViT.forward_features on the packed patches          (N, D_vision), images packed, raster order
    merger   2×2 spatial neighbours gathered by (row, col) position  (M, 4·D_vision) -> LayerNorm -> MLP
             -> (M, D_llm), M = Σ ceil(h/2)·ceil(w/2): odd grids get a zero-padded last row/column
    llm      token embeddings of the text, with row j of the merged image embeddings written at the j-th
             placeholder token (`image_token_id`) in reading order (batch row, then position), so image i's
             ceil(h_i/2)·ceil(w_i/2) tokens land at the placeholders its prompt reserved; the count is checked

The merger follows Qwen2-VL's (`PatchMerger`: LayerNorm on each patch, concatenate the 2×2 group, Linear -
GELU - Linear), but groups patches by their (row, col) position instead of by their order in the sequence,
so any packed order works, raster order included, and an odd height or width is padded, never dropped.

`VisionLanguageModel.forward` returns the per-token cross-entropy of every supervised position (labels not
-100, shifted by one), computed inside the module so that under FSDP2 the LM head's gathered weights are live.
What it needs from the inputs' values rather than their shapes (where each patch goes in the merger, which
positions hold placeholders and which are supervised, whether the padding is on the right) is a `ForwardPlan`:
built from the data loader's CPU tensors and moved to the device with the batch, it lets the forward run without
reading anything back from the device, transformers' decoder included (stage 2's trainer passes one; without it
the forward builds it from device tensors, which waits for the device several times per call). No
torch.distributed here (docs/design.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .vit import FineViT

IGNORE_INDEX = -100


def merged_grid(grid_hw: torch.Tensor, merge_size: int = 2) -> torch.Tensor:
    """(num_images, 2) patch grids -> their merged grids, ceil(h / m), ceil(w / m)."""
    return (grid_hw.long() + merge_size - 1) // merge_size


def merged_token_counts(grid_hw: torch.Tensor, merge_size: int = 2) -> torch.Tensor:
    """Image tokens each image contributes to the LLM: ceil(h / m) · ceil(w / m)."""
    merged = merged_grid(grid_hw, merge_size)
    return merged[:, 0] * merged[:, 1]


def merge_index(positions: torch.Tensor, cu_seqlens: torch.Tensor, grid_hw: torch.Tensor, merge_size: int = 2
                ) -> tuple[torch.Tensor, int]:
    """For each patch, its slot in the (M · m²) merged layout: merged token index · m² + offset in the group.

    positions (N, 2) = (row, col) within its image; cu_seqlens (B + 1,); grid_hw (B, 2). Returns (slots (N,),
    M). Merged tokens are numbered image by image, raster order within the merged grid; the group offset is
    (row % m) · m + col % m, Qwen2-VL's order within a 2×2 group.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if int(lengths.sum()) != positions.shape[0]:
        raise ValueError(f"merge_index: cu_seqlens covers {int(lengths.sum())} patches, positions has "
                         f"{positions.shape[0]}")
    if not torch.equal(lengths, (grid_hw[:, 0] * grid_hw[:, 1]).long().to(lengths.device)):
        raise ValueError("merge_index: every image must have grid_hw[i, 0] · grid_hw[i, 1] patches")
    merged = merged_grid(grid_hw, merge_size).to(positions.device)
    counts = merged[:, 0] * merged[:, 1]
    first = torch.cumsum(counts, 0) - counts  # the first merged token of each image
    image = torch.repeat_interleave(torch.arange(len(lengths), device=positions.device), lengths.to(positions.device))
    row, col = positions[:, 0].long(), positions[:, 1].long()
    token = first[image] + (row // merge_size) * merged[image, 1] + col // merge_size
    slot = token * merge_size ** 2 + (row % merge_size) * merge_size + col % merge_size
    return slot, int(counts.sum())


def placeholder_index(input_ids: torch.Tensor, image_token_id: int, image_tokens: int) -> torch.Tensor:
    """Flat indices into input_ids (B, L) of its `image_token_id` placeholders, in reading order.

    Raises ValueError when there are not `image_tokens` of them (the usual cause: a prompt built for another
    resize or merge size)."""
    index = torch.nonzero((input_ids == image_token_id).flatten()).squeeze(1)
    if index.numel() != image_tokens:
        raise ValueError(f"input_ids hold {index.numel()} image placeholder tokens (id {image_token_id}) but the "
                         f"images give {image_tokens} image tokens; build each prompt with "
                         f"merged_token_counts(grid_hw) placeholders per image")
    return index


@dataclass
class ForwardPlan:
    """What one `VisionLanguageModel.forward` call needs to know about its inputs' values (module doc): index
    tensors and whether the batch is right-padded, from `forward_plan`."""

    merge_slots: torch.Tensor  # (N,) int64: each patch's slot in the merged layout (`merge_index`)
    merged_tokens: int  # M, the image tokens the merger makes
    placeholders: torch.Tensor  # (M,) int64: flat (B · L) indices of the image placeholders, reading order
    supervised: torch.Tensor  # (S,) int64: flat (B · L) indices t of the positions whose logits predict labels[t + 1]
    targets: torch.Tensor  # (S,) int64: those labels
    # Every attention-mask row is ones, then zeros (the loader pads on the right). Under the decoder's causal
    # mask a token then never sees padding, so the decoder gets no mask: the supervised outputs are the same, and
    # transformers does not read the mask back from the device to decide whether it may skip it.
    right_padded: bool

    def to(self, device: torch.device, non_blocking: bool = False) -> ForwardPlan:
        return ForwardPlan(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                              if torch.is_tensor(getattr(self, f.name)) else getattr(self, f.name)
                              for f in fields(self)})


def forward_plan(image: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 image_token_id: int, merge_size: int = 2) -> ForwardPlan:
    """The `ForwardPlan` of a batch, computed on its tensors' device (build it from CPU tensors; module doc).
    Raises ValueError when the prompts' placeholders do not match the images' merged token counts."""
    slots, tokens = merge_index(image["positions"], image["cu_seqlens"], image["grid_hw"], merge_size)
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE_INDEX).unbind(1)
    mask = attention_mask.long()
    right_padded = bool(((mask == 0) | (mask == 1)).all() and (mask[:, 1:] <= mask[:, :-1]).all())
    return ForwardPlan(merge_slots=slots, merged_tokens=tokens,
                       placeholders=placeholder_index(input_ids, image_token_id, tokens),
                       supervised=rows * labels.shape[1] + cols, targets=labels[rows, cols + 1],
                       right_padded=right_padded)


class PatchMerger(nn.Module):
    """LayerNorm each patch, gather m × m neighbours by position (zero where an odd grid has none), MLP to the
    LLM's width."""

    def __init__(self, vision_width: int, llm_width: int, merge_size: int = 2, hidden: int = 0,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.merge_size = merge_size
        group = vision_width * merge_size ** 2
        self.norm = nn.LayerNorm(vision_width, eps=norm_eps)
        self.fc1 = nn.Linear(group, hidden or group)
        self.fc2 = nn.Linear(hidden or group, llm_width)

    def forward(self, features: torch.Tensor, slots: torch.Tensor, tokens: int) -> torch.Tensor:
        """features (N, D_vision) -> (tokens, D_llm); slots, tokens: `merge_index` of the patches' positions."""
        x = self.norm(features)
        grouped = x.new_zeros(tokens * self.merge_size ** 2, x.shape[-1]).index_copy(0, slots, x)
        grouped = grouped.view(tokens, -1)
        return self.fc2(F.gelu(self.fc1(grouped)))

    def init_weights(self) -> None:
        self.norm.reset_parameters()
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)


def insert_image_embeddings(text_embeds: torch.Tensor, image_embeds: torch.Tensor,
                            placeholders: torch.Tensor) -> torch.Tensor:
    """text_embeds (B, L, D) with row j of `image_embeds` (M, D) written at flat position placeholders[j]
    (`placeholder_index`); differentiable w.r.t. both."""
    flat = text_embeds.flatten(0, 1).index_copy(0, placeholders, image_embeds.to(text_embeds.dtype))
    return flat.view_as(text_embeds)


class VisionLanguageModel(nn.Module):
    """FineViT + PatchMerger + a `transformers` causal LM (module doc)."""

    def __init__(self, vision: FineViT, llm: nn.Module, image_token_id: int, merge_size: int = 2,
                 merger_hidden: int = 0):
        super().__init__()
        self.vision = vision
        self.llm = llm
        self.image_token_id = int(image_token_id)
        self.merger = PatchMerger(vision.config.width, llm.config.hidden_size, merge_size, merger_hidden,
                                  vision.config.norm_eps)

    @property
    def merge_size(self) -> int:
        return self.merger.merge_size

    def image_embeddings(self, image: dict, merge: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """Packed image batch (docs/design.md) -> merged image tokens (M, D_llm), image by image; `merge`:
        the patches' (slots, M) from `merge_index`, computed here when not given."""
        features = self.vision.forward_features(image["patches"], image["positions"], image["cu_seqlens"],
                                                image["max_seqlen"])
        if merge is None:
            merge = merge_index(image["positions"], image["cu_seqlens"], image["grid_hw"], self.merge_size)
        return self.merger(features, *merge)

    def input_embeddings(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                         placeholders: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of input_ids with the image tokens at its placeholders (`placeholder_index`,
        computed here when not given)."""
        if placeholders is None:
            placeholders = placeholder_index(input_ids, self.image_token_id, image_embeds.shape[0])
        return insert_image_embeddings(self.llm.get_input_embeddings()(input_ids), image_embeds, placeholders)

    def forward(self, image: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                plan: ForwardPlan | None = None) -> torch.Tensor:
        """Per-token cross-entropy (float32) of the supervised positions: logits at t predict labels[t + 1],
        in reading order of the positions where labels[:, 1:] != -100. `plan`: the batch's `forward_plan` on
        the device; given, nothing is read back from the device (module doc)."""
        if plan is None:
            plan = forward_plan(image, input_ids, attention_mask, labels, self.image_token_id, self.merge_size)
        image_embeds = self.image_embeddings(image, (plan.merge_slots, plan.merged_tokens))
        embeds = self.input_embeddings(image_embeds, input_ids, plan.placeholders)
        decoder_mask = None if plan.right_padded else attention_mask
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=decoder_mask).last_hidden_state
        # Logits only where a loss is taken.
        logits = self.llm.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, plan.supervised))
        return F.cross_entropy(logits.float(), plan.targets, reduction="none")

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, prompts: list[torch.Tensor], max_new_tokens: int,
                 eos_token_id: int, pad_token_id: int) -> list[list[int]]:
        """Greedy decoding of one answer per prompt (1-D id tensors with image placeholders); `image_embeds`
        (from `image_embeddings`) fills the placeholders in reading order, so an image may be repeated for
        several prompts. Left-padded batch, explicit positions, KV cache. Returns the answers' ids (no EOS)."""
        device = prompts[0].device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = p
            attention_mask[i, width - len(p):] = 1
        embeds = self.input_embeddings(image_embeds, input_ids)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True)
        answers = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        next_position = position_ids[:, -1:] + 1
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            for i in range(len(prompts)):
                if not done[i]:
                    if int(token[i]) == eos_token_id:
                        done[i] = True
                    else:
                        answers[i].append(int(token[i]))
            if bool(done.all()):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], dim=1)
            with warnings.catch_warnings():  # newer transformers rename past_key_values; 4.57 knows only it
                warnings.simplefilter("ignore", FutureWarning)
                out = self.llm(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                               past_key_values=out.past_key_values, use_cache=True)
            next_position = next_position + 1
        return answers


# The embedded default's LLM: Qwen2's architecture at a size two CPU cores train in minutes.
TINY_LLM = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 1024, "rope_theta": 10000.0,
            "tie_word_embeddings": True}


def build_llm(vocab_size: int, architecture: str = "qwen2", overrides: dict | None = None,
              eos_token_id: int | None = None, pad_token_id: int | None = None):
    """A randomly initialized `transformers` causal LM from a config: `architecture` is a model_type that
    AutoConfig knows (qwen2, llama, ...), sized by TINY_LLM updated with `overrides`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**TINY_LLM, **(overrides or {}), "vocab_size": vocab_size}
    config = AutoConfig.for_model(architecture, **fields, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_llm(path: str, vocab_size: int):
    """A local `transformers` causal-LM checkpoint directory, in float32 (FSDP casts for compute); its
    embeddings grown to `vocab_size` when the tokenizer gained tokens."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    if llm.get_input_embeddings().weight.shape[0] < vocab_size:
        llm.resize_token_embeddings(vocab_size)
    return llm
