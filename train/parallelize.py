"""FSDP2 for FineCLIP: activation checkpointing -> per-block torch.compile -> fully_shard per block -> root,
then materialization (`to_empty` + initialization) of the sharded parameters.

The order is torchtitan's (`models/llama3/infra/parallelize.py`): checkpoint wrappers go innermost so the
compiled region sees them, compile wraps each block (the repeated structure compiles once), and
`fully_shard` goes on each transformer block of both towers before the root, whose group then holds the
rest (patch embedding, token embedding, norms, MAP head, projections, logit scale and bias).

Mixed precision is FSDP's: parameters are kept sharded in float32 (the optimizer's master weights) and
all-gathered in `param_dtype` for compute (bfloat16 on GPU), gradients are reduce-scattered in
`reduce_dtype` (float32). Gradient averaging is FSDP's default mean over the data-parallel ranks.

Initialization. On a GPU mesh, DTensor's offset-based RNG makes each shard draw exactly its part of a
full-tensor draw, so `init_weights()` runs on the sharded model. On a CPU mesh DTensor has no such RNG
(every rank would draw the same values into different shards: rows repeated across ranks), so rank 0
initializes a full copy on the CPU with the same seed and its tensors are scattered into the shards
(`set_model_state_dict(..., broadcast_from_rank0=True)`). Either way the result does not depend on the
number of ranks on CPU, which is what the single-process equivalence test checks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ContrastiveModel(nn.Module):
    """The FSDP root: FineCLIP's forward plus its logit scale (exponentiated) and bias.

    Under FSDP2 a parameter is a gathered tensor only inside the forward of its FSDP module; after the root's
    forward, `logit_scale` is a sharded DTensor again and the gathered storage is freed. So the scale and bias
    the loss needs are computed inside this forward (new tensors, never the gathered parameters themselves),
    where autograd links them to the gathered parameters like every other output.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, image_batch: dict, text_batch: dict):
        img, txt = self.clip(image_batch, text_batch)
        bias = self.clip.logit_bias
        return img, txt, self.clip.logit_scale.exp(), (bias.clone() if bias is not None else None)

    def init_weights(self) -> None:
        self.clip.init_weights()


def transformer_blocks(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every transformer block of both towers, in forward order."""
    clip = model.clip if isinstance(model, ContrastiveModel) else model
    return [(tower.blocks, i) for tower in (clip.vision, clip.text) for i in range(len(tower.blocks))]


def vlm_blocks(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every FineViT block and every LLM decoder layer of a VisionLanguageModel."""
    layers = model.llm.get_decoder().layers
    vision = model.vision.blocks
    return [(vision, i) for i in range(len(vision))] + [(layers, i) for i in range(len(layers))]


def apply_activation_checkpointing(model: nn.Module, blocks: list | None = None) -> None:
    """Full activation checkpointing: each block's activations are recomputed in the backward."""
    for container, i in (transformer_blocks(model) if blocks is None else blocks):
        container[i] = checkpoint_wrapper(container[i], preserve_rng_state=False)


def apply_compile(model: nn.Module, blocks: list | None = None, fullgraph: bool = True) -> None:
    """torch.compile each block: the blocks of a tower share one compiled graph."""
    for container, i in (transformer_blocks(model) if blocks is None else blocks):
        container[i] = torch.compile(container[i], fullgraph=fullgraph)


def mixed_precision(param_dtype: str, reduce_dtype: str, device: torch.device) -> MixedPrecisionPolicy:
    """"auto" is bfloat16 compute on GPU and float32 on CPU (the reference ops are run in float32 there)."""
    if param_dtype == "auto":
        param_dtype = "bfloat16" if device.type == "cuda" else "float32"
    param = DTYPES[param_dtype]
    reduce = DTYPES[reduce_dtype]
    return MixedPrecisionPolicy(param_dtype=None if param == torch.float32 else param, reduce_dtype=reduce)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
               reshard_after_forward: bool = True, blocks: list | None = None) -> None:
    """fully_shard every transformer block, then the root (which takes the remaining parameters)."""
    blocks = transformer_blocks(model) if blocks is None else blocks
    for n, (container, i) in enumerate(blocks):
        # The last block's parameters are needed first in the backward: keep them gathered (torchtitan).
        reshard = reshard_after_forward and n < len(blocks) - 1
        fully_shard(container[i], mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)


def parallelize(clip: nn.Module, mesh: DeviceMesh, *, activation_checkpoint: str = "none",
                compile: bool = False, param_dtype: str = "auto", reduce_dtype: str = "float32",
                reshard_after_forward: bool = True) -> ContrastiveModel:
    """Wrap a FineCLIP built on the meta device, in torchtitan's order (module doc); returns the FSDP root,
    a `ContrastiveModel` around it."""
    device = torch.device(mesh.device_type)
    model = ContrastiveModel(clip)
    if activation_checkpoint == "full":
        apply_activation_checkpointing(model)
    elif activation_checkpoint != "none":
        raise ValueError(f"activation_checkpoint must be 'none' or 'full', got {activation_checkpoint!r}")
    if compile:
        apply_compile(model)
    apply_fsdp(model, mesh, mixed_precision(param_dtype, reduce_dtype, device), reshard_after_forward)
    return model


def parallelize_vlm(model: nn.Module, mesh: DeviceMesh, *, activation_checkpoint: str = "none",
                    compile: bool = False, param_dtype: str = "auto", reduce_dtype: str = "float32",
                    reshard_after_forward: bool = True) -> nn.Module:
    """Stage 2: the same order over a VisionLanguageModel with its weights already loaded (the encoder from
    stage 1, the LLM from its checkpoint): blocks are the encoder's and the LLM's decoder layers; the root
    group holds the patch embedding, merger, token embeddings, final norms and LM head. Frozen parameters
    (requires_grad False, set before this call) are sharded like the others and get no gradient
    reduce-scatter. Compile is fullgraph for the encoder blocks, not for the LLM's (transformers layers)."""
    device = torch.device(mesh.device_type)
    blocks = vlm_blocks(model)
    if activation_checkpoint == "full":
        apply_activation_checkpointing(model, blocks)
    elif activation_checkpoint != "none":
        raise ValueError(f"activation_checkpoint must be 'none' or 'full', got {activation_checkpoint!r}")
    if compile:
        vision = len(model.vision.blocks)
        apply_compile(model, blocks[:vision])
        apply_compile(model, blocks[vision:], fullgraph=False)
    apply_fsdp(model, mesh, mixed_precision(param_dtype, reduce_dtype, device), reshard_after_forward, blocks)
    return model


def _rng_supported(mesh: DeviceMesh) -> bool:
    from torch.distributed.tensor._random import is_rng_supported_mesh

    return mesh.device_type != "cpu" and is_rng_supported_mesh(mesh)


def materialize(model: nn.Module, build_full, device: torch.device, mesh: DeviceMesh, seed: int) -> None:
    """Allocate the sharded parameters on `device` and initialize them (see the module doc).

    build_full: a callable returning an unsharded, uninitialized copy of the model (the same class as
    `model`) on the CPU (used on CPU meshes, on rank 0 only).
    """
    model.to_empty(device=device)
    if _rng_supported(mesh):
        torch.manual_seed(seed)
        with torch.no_grad():
            model.init_weights()
        return
    full_state = {}
    if dist.get_rank() == 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            full = build_full()
            full.init_weights()
        full_state = full.state_dict()
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
