"""herd's data path: webdataset shards -> early-fusion tokens -> packed, resumable batches.

data/ imports nothing else of herd's: it knows token ids and patch geometry, not the model.
The names below load on first use, so `import data.text` stays free of Pillow, PyAV and
webdataset.
"""

from importlib import import_module

_EXPORTS = {
    "DataArgs": "data.args",
    "Source": "data.args",
    "MultimodalLoader": "data.loader",
    "Tokenizer": "data.tokenizer",
    "ensure_sample": "data.sample",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
