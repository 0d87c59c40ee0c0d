"""Native-resolution data pipeline (docs/design.md's data contract).

    image.py    decode (EXIF, mode rule) -> smart_resize -> antialiased resize -> patchify; boxes on the grid
    packing.py  best-fit packing under a token budget; collation into the packed image and text batches
    sample.py   validation of webdataset samples (every bad case has a named skip reason)
    shards.py   shard specs, node/worker split, tar reading with positions
    loader.py   PackedLoader: the resumable, fault-tolerant training loader
    text.py     tokenizers: training, loading, the BOS/EOS/truncation rule
    synth.py    the embedded dataset: `python -m finevit.data.synth --out DIR`

Names are imported lazily (PEP 562), so `python -m finevit.data.synth` does not pay for torch and the kernels.
"""

import importlib

_EXPORTS = {
    "image": ("ImageConfig", "BadImageError", "boxes_to_grid", "decode_image", "load_resized", "patchify",
              "preprocess_image", "smart_resize"),
    "packing": ("Sample", "collate", "collate_images", "pack", "pack_texts"),
    "sample": ("BadSampleError", "decode_raw", "make_sample", "parse_annotation"),
    "shards": ("expand_shards",),
    "loader": ("LoaderConfig", "PackedLoader"),
    "text": ("TextTokenizer", "save_tokenizer", "train_tokenizer"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


def __dir__():
    return __all__
