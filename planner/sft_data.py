"""The encoded SFT data on disk: compact (token ids as uint16/uint32, masks as bits), LZMA-compressed,
and keyed by the recipe that built it, so a run (or its resume, or a run on another machine) skips
the trace synthesis when the data would come out the same.

1,000 WideGeo tasks with three renamed copies each (~20 M tokens) take ~5 MB; synthesising them takes
minutes even on 16 cores, so a GPU run can be handed the file instead (`planner.sft --data-file`).
"""

from __future__ import annotations

import hashlib
import lzma
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from planner.traces import EncodedExample

FORMAT = 1


def tokenizer_fingerprint(spec: str) -> str:
    """What identifies a tokenizer in a key: a directory's files by content (the same vocabulary at
    another path is the same), any other spec ("byte:512", "bpe:3000") by itself."""
    root = Path(spec)
    if not root.is_dir():
        return spec
    h = hashlib.sha256()
    for f in sorted(p for p in root.iterdir() if p.name in ("tiktoken.model", "tokenizer_config.json")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return "sha256:" + h.hexdigest()


def _pack(examples: list[EncodedExample]) -> dict[str, Any]:
    ids = [i for e in examples for i in e.ids]
    dtype = np.uint16 if not ids or max(ids) < 2**16 else np.uint32
    return {"kinds": [e.kind for e in examples], "task_ids": [e.task_id for e in examples],
            "lengths": np.array([len(e) for e in examples], dtype=np.int64),
            "ids": np.array(ids, dtype=dtype),
            "mask": np.packbits(np.array([m for e in examples for m in e.mask], dtype=np.uint8))}


def _unpack(packed: dict[str, Any]) -> list[EncodedExample]:
    lengths = packed["lengths"]
    total = int(lengths.sum())
    ids = packed["ids"].astype(np.int64).tolist()
    mask = np.unpackbits(packed["mask"])[:total].tolist()
    out, at = [], 0
    for kind, task_id, n in zip(packed["kinds"], packed["task_ids"], lengths.tolist()):
        out.append(EncodedExample(kind, task_id, ids[at:at + n], mask[at:at + n]))
        at += n
    return out


def save_data(path: str | Path, key: dict[str, Any], splits: dict[str, list[EncodedExample]],
              report: dict[str, Any]) -> None:
    """Writes the splits (name -> examples) and the data report under `key`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "key": key, "report": report, "splits": {k: _pack(v) for k, v in splits.items()}}
    tmp = path.with_name(path.name + ".tmp")
    with lzma.open(tmp, "wb", preset=6) as f:
        pickle.dump(blob, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)


def load_data(path: str | Path, key: dict[str, Any]) -> tuple[dict[str, list[EncodedExample]], dict[str, Any]] | None:
    """(splits, report) stored at `path` under the same key; None when there is no such file or it was
    built by another recipe. A file that is not such data at all is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with lzma.open(path, "rb") as f:
            blob = pickle.load(f)
    except (lzma.LZMAError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not an SFT data file ({e})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not an SFT data file of format {FORMAT}")
    if blob["key"] != key:
        return None
    return {k: _unpack(v) for k, v in blob["splits"].items()}, blob["report"]
