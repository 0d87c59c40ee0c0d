"""Config (de)serialization and `save_pretrained` / `from_pretrained` for FineViT models.

A saved model is a directory with `config.json` ({"model_type": class name, "config": {...}}) and
`model.safetensors` (the full state dict). Each file is written to a temporary name and renamed into
place, so an interrupted save never leaves a half-written file where a complete one was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from finevit import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls, values: dict):
    """Build dataclass `cls` from a dict: nested dataclasses rebuilt, lists -> tuples, unknown keys rejected."""
    if not isinstance(values, dict):
        raise TypeError(f"{cls.__name__}: expected a dict of fields, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = config_from_dict(hint, value)
        elif typing.get_origin(hint) is tuple or (
            isinstance(hint, types.UnionType) and any(typing.get_origin(a) is tuple for a in typing.get_args(hint))
        ):
            value = tuple(value) if isinstance(value, list) else value
        kwargs[name] = value
    return cls(**kwargs)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Pretrained:
    """Mixin for an `nn.Module` with a dataclass `self.config` of type `config_class`."""

    config_class: type

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (plain, unsharded tensors) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        meta = {"format": "pt", "model_type": type(self).__name__}
        _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata=meta))
        document = {"model_type": type(self).__name__, "finevit_version": __version__,
                    "config": config_to_dict(self.config)}
        _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(document, indent=2) + "\n"))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu"):
        """Build the model on the meta device and assign the saved tensors (no double initialization)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{cls.__name__}.from_pretrained: {path} not found")
        document = json.loads(config_path.read_text())
        if document.get("model_type") != cls.__name__:
            raise ValueError(f"{cls.__name__}.from_pretrained: {directory} holds a "
                             f"{document.get('model_type')!r}, not a {cls.__name__}")
        config = config_from_dict(cls.config_class, document["config"])
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(load_file(str(weights_path), device=str(device)), strict=True, assign=True)
        return model
