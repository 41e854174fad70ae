"""The sweep's test-feature cache: cached and uncached results agree (WinCLIP's window embeddings too), and every
key part makes its own entry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fsad.batch import Batch
from fsad.datamodules.synthetic import SyntheticDataModule
from fsad.lightning_modules.components.clip import BackboneSpec
from fsad.lightning_modules.components.feature_cache import FeatureCache, file_content_hash
from fsad.lightning_modules.membank.module import MemoryBankAD
from fsad.lightning_modules.winclip.module import WinCLIP

pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")


def tiny_membank(seed: int = 0, image_size: int = 64) -> MemoryBankAD:
    torch.manual_seed(seed)
    return MemoryBankAD(
        BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]), image_size=image_size, eval_size=64
    )


@pytest.fixture
def data(tmp_path: Path) -> SyntheticDataModule:
    datamodule = SyntheticDataModule(root=str(tmp_path / "synthetic"), category="disc", k_shot=2, image_size=64,
                                     eval_size=64, batch_size=5)  # fmt: skip
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def predictions(module: MemoryBankAD, data: SyntheticDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and scores of the whole test set, with the support bank fitted from the uncached support pass."""
    module.eval()
    with torch.no_grad():
        module.fit_support(module.encode_support(data.support_dataloader()))
        batches: list[Batch] = [module.predict_batch(b) for b in data.test_dataloader()]
    return torch.cat([b.anomaly_map for b in batches]), torch.cat([b.pred_score for b in batches])


@pytest.mark.slow
def test_float32_cache_gives_exactly_the_uncached_results_and_hits_the_second_time(tmp_path: Path, data) -> None:
    module = tiny_membank()
    maps, scores = predictions(module, data)
    module.feature_cache = FeatureCache(tmp_path / "cache", preprocessing="antialias", dtype="float32")
    first_maps, first_scores = predictions(module, data)  # every image a miss, computed and stored
    assert module.feature_cache.misses == len(data.test_samples) and module.feature_cache.hits == 0
    second_maps, second_scores = predictions(module, data)  # every image read back
    assert module.feature_cache.hits == len(data.test_samples)
    for got_maps, got_scores in ((first_maps, first_scores), (second_maps, second_scores)):
        assert torch.equal(got_maps, maps) and torch.equal(got_scores, scores)


@pytest.mark.slow
def test_float16_cache_hit_equals_miss_and_stays_within_half_precision_of_uncached(tmp_path: Path, data) -> None:
    module = tiny_membank()
    maps, scores = predictions(module, data)
    module.feature_cache = FeatureCache(tmp_path / "cache", preprocessing="antialias")
    miss_maps, miss_scores = predictions(module, data)
    hit_maps, hit_scores = predictions(module, data)
    assert module.feature_cache.hits == module.feature_cache.misses == len(data.test_samples)
    assert torch.equal(hit_maps, miss_maps) and torch.equal(hit_scores, miss_scores)
    torch.testing.assert_close(hit_maps, maps, atol=2e-3, rtol=0)
    torch.testing.assert_close(hit_scores, scores, atol=2e-3, rtol=0)
    stored = torch.load(next((tmp_path / "cache").glob("*/*.pt")), weights_only=True)
    assert stored["cls"].dtype == torch.float16


@pytest.mark.slow
def test_changing_any_key_part_misses(tmp_path: Path, data) -> None:
    images = next(iter(data.test_dataloader()))
    paths = list(images.image_path)

    def misses_of(module: MemoryBankAD, cache: FeatureCache, image_paths: list[str], variant: str = "") -> int:
        before = cache.misses
        cache.encode(module.backbone, images.image if module.backbone.image_size[0] == 64 else
                     torch.nn.functional.interpolate(images.image, size=module.backbone.image_size),
                     image_paths, variant)  # fmt: skip
        return cache.misses - before

    base = tiny_membank(seed=0)
    cache = FeatureCache(tmp_path / "cache", preprocessing="antialias")
    assert misses_of(base, cache, paths) == len(paths)
    assert misses_of(base, cache, paths) == 0  # same key: all hits
    assert misses_of(tiny_membank(seed=1), cache, paths) == len(paths)  # other backbone weights
    assert misses_of(tiny_membank(seed=0, image_size=96), cache, paths) == len(paths)  # other image size
    other_resize = FeatureCache(tmp_path / "cache", preprocessing="authors")
    assert misses_of(base, other_resize, paths) == len(paths)  # other preprocessing variant
    assert misses_of(base, cache, paths, variant="bgr") == len(paths)  # the method's own input change
    edited = tmp_path / "edited.png"
    shutil.copy(paths[0], edited)
    assert misses_of(base, cache, [str(edited), *paths[1:]]) == 0  # same content under another name: a hit
    edited.write_bytes(Path(paths[1]).read_bytes())  # other content under the same name
    assert file_content_hash(edited) == file_content_hash(paths[1]) != file_content_hash(paths[0])
    assert misses_of(base, cache, [str(edited), *paths[1:]]) == 0  # ... hits paths[1]'s entry


def test_size_limit_evicts_least_recently_used_entries(tmp_path: Path, data) -> None:
    module = tiny_membank()
    batch = next(iter(data.test_dataloader()))
    cache = FeatureCache(tmp_path / "cache", preprocessing="antialias")
    cache.encode(module.backbone, batch.image[:1], batch.image_path[:1])
    entry_bytes = next((tmp_path / "cache").glob("*/*.pt")).stat().st_size
    cache.max_bytes = 3 * entry_bytes
    cache.encode(module.backbone, batch.image[1:3], batch.image_path[1:3])
    cache.encode(module.backbone, batch.image[:1], batch.image_path[:1])  # refresh image 0: now the newest
    cache.encode(module.backbone, batch.image[3:4], batch.image_path[3:4])  # a fourth entry: one must go
    assert len(list((tmp_path / "cache").glob("*/*.pt"))) == 3
    before = cache.misses
    cache.encode(module.backbone, batch.image[:1], batch.image_path[:1])
    cache.encode(module.backbone, batch.image[2:4], batch.image_path[2:4])
    assert cache.misses == before  # 0, 2 and 3 kept
    cache.encode(module.backbone, batch.image[1:2], batch.image_path[1:2])
    assert cache.misses == before + 1  # 1 was the least recently used


def test_a_backbone_spec_or_storage_dtype_of_its_own_never_reads_another_s_entries(tmp_path: Path, data) -> None:
    """Same seed, so the same weights: only the spec (V-V path off) or the cache dtype differs, and each misses."""
    batch = next(iter(data.test_dataloader()))
    paths = list(batch.image_path)
    with_vv = tiny_membank(seed=0)
    torch.manual_seed(0)
    without_vv = MemoryBankAD(
        BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4], vv_attention=False), image_size=64, eval_size=64
    )
    weights, other_weights = with_vv.backbone.state_dict(), without_vv.backbone.state_dict()
    assert weights.keys() == other_weights.keys() and all(torch.equal(weights[k], other_weights[k]) for k in weights)
    cache = FeatureCache(tmp_path / "cache", preprocessing="antialias")
    cache.encode(with_vv.backbone, batch.image, paths)
    assert (cache.hits, cache.misses) == (0, len(paths))
    cache.encode(without_vv.backbone, batch.image, paths)
    assert (cache.hits, cache.misses) == (0, 2 * len(paths))  # another spec: its own entries
    exact = FeatureCache(tmp_path / "cache", preprocessing="antialias", dtype="float32")
    exact.encode(with_vv.backbone, batch.image, paths)
    assert (exact.hits, exact.misses) == (0, len(paths))  # the float16 entries of the same backbone are not read
    cache.encode(with_vv.backbone, batch.image, paths)
    assert cache.counts["backbone"] == {"hits": len(paths), "misses": 2 * len(paths)}


def tiny_winclip() -> WinCLIP:
    torch.manual_seed(0)
    spec = BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[0, 4], vv_attention=False)
    return WinCLIP(spec, image_size=64, eval_size=64, gaussian_sigma=0.0)


def winclip_predictions(module: WinCLIP, data: SyntheticDataModule, shots: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and scores of the test set: zero-shot WinCLIP, or WinCLIP+ on the (uncached) support pass."""
    module.eval()
    module.prepare_for_data(data)
    with torch.no_grad():
        if shots:
            module.fit_support(module.encode_support(data.support_dataloader()))
        else:
            module.model.clear_support()
        batches = [module.predict_batch(b) for b in data.test_dataloader()]
    return torch.cat([b.anomaly_map for b in batches]), torch.cat([b.pred_score for b in batches])


def count_window_passes(module: WinCLIP, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Images whose window embeddings the transformer computes, one entry per call."""
    calls: list[int] = []
    original = module.model.window_embedding

    def counted(tokens: torch.Tensor, backbone, scale: int) -> torch.Tensor:  # noqa: ANN001
        calls.append(tokens.shape[0])
        return original(tokens, backbone, scale)

    monkeypatch.setattr(module.model, "window_embedding", counted)
    return calls


@pytest.mark.slow
def test_winclip_window_embeddings_are_computed_once_per_image_for_zero_and_few_shot(
    tmp_path: Path, data, monkeypatch
) -> None:
    """float32: WinCLIP's and WinCLIP+'s cached results are bit-identical to the uncached ones, and WinCLIP+ reads
    the windows WinCLIP stored (no transformer pass over test windows); float16: the hit equals the miss."""
    module = tiny_winclip()
    expected = {shots: winclip_predictions(module, data, shots) for shots in (False, True)}
    images = len(data.test_samples)
    passes = count_window_passes(module, monkeypatch)
    module.feature_cache = FeatureCache(tmp_path / "exact", preprocessing="antialias", dtype="float32")
    for shots in (False, True):  # WinCLIP fills the cache, WinCLIP+ reads it
        maps, scores = winclip_predictions(module, data, shots)
        assert torch.equal(maps, expected[shots][0]) and torch.equal(scores, expected[shots][1])
    counts = module.feature_cache.counts
    assert counts.keys() == {"backbone", "winclip-windows-2x2", "winclip-windows-3x3"}
    assert all(count == {"hits": images, "misses": images} for count in counts.values())
    support = 2 * len(module.model.scales)  # WinCLIP+'s support windows (2 shots, each scale) are not cached
    assert sum(passes) == images * len(module.model.scales) + support

    module.feature_cache = FeatureCache(tmp_path / "half", preprocessing="antialias")
    miss = winclip_predictions(module, data, True)
    hit = winclip_predictions(module, data, True)
    assert torch.equal(hit[0], miss[0]) and torch.equal(hit[1], miss[1])
    torch.testing.assert_close(hit[0], expected[True][0], atol=2e-3, rtol=0)
    stored = [torch.load(p, weights_only=True) for p in (tmp_path / "half").glob("*/*.pt")]
    assert {e["windows"].dtype for e in stored if "windows" in e} == {torch.float16}
