"""On-disk cache of frozen-backbone outputs of test images, shared by every cell of a benchmark sweep.

A sweep of k shots × seeds tests the same images with the same frozen backbone in every cell, so the backbone pass
of a test image is computed once and read back afterwards (README.md, budget P6). An entry is keyed by

* the backbone: its spec (architecture, weights source, taps, V-V path, precision) and a digest of its weights,
  so two random initialisations never share entries;
* the image file's content hash (a renamed copy hits, an edited file misses);
* the input image size;
* the preprocessing variant (``data.resize``, the normalisation, and any per-method input change such as the
  authors' BGR test-image quirk);
* the storage dtype (a float32 sweep never reads the rounded entries of a float16 one);
* the part stored: the backbone outputs, or something derived from them and the backbone only (WinCLIP's window
  embeddings, one part per window scale).

Nothing in the key names the method, so every method whose backbone (spec and weights) and preprocessing match reads
the entries another wrote: ``fsad compare`` gives all its methods' sweeps one folder.

Entries are stored as ``float16`` by default (``float32`` keeps them exact); with float16 a freshly computed
output is rounded the same way before use, so the first cell (miss) and later cells (hit) see identical features.
The folder holds at most ``max_bytes``; the least recently used entries are evicted first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fsad.checkpoints import read_checkpoint
from fsad.errors import CheckpointError
from fsad.lightning_modules.components.clip import BackboneOutput, ClipBackbone

CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
BACKBONE_PART = "backbone"
"""The part name of the backbone outputs themselves (other parts are derived from them and the backbone)."""


def file_content_hash(path: str | Path, memo: dict[tuple[str, int, int], str] | None = None) -> str:
    """SHA-256 of a file's bytes; ``memo`` (keyed by path, size and mtime) skips re-reading an unchanged file."""
    stat = os.stat(path)
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo is not None and memo_key in memo:
        return memo[memo_key]
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if memo is not None:
        memo[memo_key] = digest
    return digest


def backbone_fingerprint(backbone: ClipBackbone, stride: int = 4099) -> str:
    """Digest of the backbone spec and a strided sample of every weight tensor (cheap; differs between inits)."""
    digest = hashlib.sha256(repr(dataclasses.asdict(backbone.spec)).encode())
    for name, tensor in backbone.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(flat[::stride].float().cpu().numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Backbone outputs of single images on disk, ``<folder>/<key[:2]>/<key>.pt``, with LRU eviction by size.

    Args:
        folder: where entries live (the sweep puts it under its output folder).
        preprocessing: the data side of the key (resize variant and normalisation), set by whoever builds the
            test transform.
        max_bytes: size limit of the folder; the least recently used entries go first.
        dtype: ``float16`` (half the disk) or ``float32`` (exact).

    ``hits`` and ``misses`` count image entries of every part; ``counts`` holds them per part.
    """

    def __init__(
        self, folder: str | Path, preprocessing: str, max_bytes: int = 4 << 30, dtype: str = "float16"
    ) -> None:
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"feature cache dtype: {dtype!r} is not one of {sorted(CACHE_DTYPES)}")
        self.folder = Path(folder)
        self.preprocessing = preprocessing
        self.max_bytes = max_bytes
        self.dtype_name = dtype
        self.dtype = CACHE_DTYPES[dtype]
        self.counts: dict[str, Counter[str]] = {}
        self._content_hashes: dict[tuple[str, int, int], str] = {}
        self._fingerprints: weakref.WeakKeyDictionary[ClipBackbone, str] = weakref.WeakKeyDictionary()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._size = sum(p.stat().st_size for p in self.folder.glob("*/*.pt"))

    @property
    def hits(self) -> int:
        return sum(count["hits"] for count in self.counts.values())

    @property
    def misses(self) -> int:
        return sum(count["misses"] for count in self.counts.values())

    def summary(self) -> str:
        """One line: hits and misses per part since this cache object was made, and the folder."""
        parts = ", ".join(
            f"{part} {count['hits']} hits / {count['misses']} misses" for part, count in sorted(self.counts.items())
        )
        return f"feature cache {self.folder} ({self.dtype_name}): {parts or 'not used'}"

    def key(
        self, fingerprint: str, image_path: str, image_size: tuple[int, int], variant: str = "",
        part: str = BACKBONE_PART,
    ) -> str:  # fmt: skip
        """The entry name of one image: (backbone, file content, image size, preprocessing + method variant, storage
        dtype, part stored)."""
        content = file_content_hash(image_path, self._content_hashes)
        size = f"{image_size[0]}x{image_size[1]}"
        parts = (fingerprint, content, size, self.preprocessing, variant, self.dtype_name, part)
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """One cached image (``cls``, ``vv_tokens``, ``tap<n>``, ``grid``), or ``None``; a hit refreshes its age."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = read_checkpoint(path, field="feature cache entry")
        except CheckpointError:  # a truncated or foreign file is a miss, and is replaced
            path.unlink(missing_ok=True)
            return None
        os.utime(path)
        return entry

    def store(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        """Write one image's entry atomically, then evict the oldest entries while over the size limit."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(entry, tmp)
        old = path.stat().st_size if path.is_file() else 0
        tmp.replace(path)
        self._size += path.stat().st_size - old
        if self._size > self.max_bytes:
            self.evict()

    def evict(self) -> None:
        """Delete least recently used entries until the folder is within ``max_bytes``."""
        entries = sorted((p.stat().st_mtime_ns, p.stat().st_size, p) for p in self.folder.glob("*/*.pt"))
        self._size = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if self._size <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            self._size -= size

    def fingerprint(self, backbone: ClipBackbone) -> str:
        """The backbone part of the key, computed once per live backbone (weakly held: a later backbone that
        reuses a freed object's memory never inherits its fingerprint)."""
        if backbone not in self._fingerprints:
            self._fingerprints[backbone] = backbone_fingerprint(backbone)
        return self._fingerprints[backbone]

    def encode(
        self,
        backbone: ClipBackbone,
        images: torch.Tensor,
        image_paths: Sequence[str],
        variant: str = "",
    ) -> BackboneOutput:
        """Backbone outputs of a batch: cached rows are read back, the others computed by ``backbone`` and stored.
        Every row is returned rounded through the cache dtype."""
        entries = self.rows(
            backbone, image_paths, variant, BACKBONE_PART,
            lambda missing: self._entries(backbone(images[missing])),
        )  # fmt: skip
        return self._output(entries, images.device)

    def rows(
        self,
        backbone: ClipBackbone,
        image_paths: Sequence[str],
        variant: str,
        part: str,
        compute: Callable[[list[int]], list[dict[str, torch.Tensor]]],
    ) -> list[dict[str, torch.Tensor]]:
        """One entry per image of ``part``: read back, or computed by ``compute(missing row indices)`` (one dict of
        tensors per missing row, in that order), rounded through the cache dtype and stored. Returns CPU tensors in
        the cache dtype, the same whether read or computed."""
        fingerprint = self.fingerprint(backbone)
        keys = [self.key(fingerprint, p, backbone.image_size, variant, part) for p in image_paths]
        entries = [self.load(k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        count = self.counts.setdefault(part, Counter())
        count["hits"] += len(keys) - len(missing)
        count["misses"] += len(missing)
        if missing:
            for i, computed in zip(missing, compute(missing), strict=True):
                entries[i] = {name: self._stored(name, t) for name, t in computed.items()}
                self.store(keys[i], entries[i])
        return entries

    def _stored(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor as the cache holds it: detached on the CPU in the cache dtype (the grid shape stays integer)."""
        return tensor if name == "grid" else tensor.detach().to("cpu", self.dtype).clone()

    @staticmethod
    def _entries(output: BackboneOutput) -> list[dict[str, torch.Tensor]]:
        """One dict per row of a backbone output (``cls``, ``grid``, ``vv_tokens``, ``tap<n>``)."""
        entries = []
        for row in range(output.cls.shape[0]):
            entry = {"cls": output.cls[row], "grid": torch.tensor(output.grid)}
            if output.vv_tokens is not None:
                entry["vv_tokens"] = output.vv_tokens[row]
            entries.append(entry | {f"tap{block}": tokens[row] for block, tokens in output.taps.items()})
        return entries

    @staticmethod
    def _output(entries: list[dict[str, torch.Tensor]], device: torch.device) -> BackboneOutput:
        """Stack entries into one float32 output, as :meth:`ClipBackbone.forward` returns whatever the precision."""
        first = entries[0]

        def stack(name: str) -> torch.Tensor:
            return torch.stack([e[name] for e in entries]).to(device, torch.float32)

        taps = sorted(int(name[3:]) for name in first if name.startswith("tap"))
        return BackboneOutput(
            cls=stack("cls"),
            vv_tokens=stack("vv_tokens") if "vv_tokens" in first else None,
            taps={block: stack(f"tap{block}") for block in taps},
            grid=tuple(int(v) for v in first["grid"].tolist()),
        )
