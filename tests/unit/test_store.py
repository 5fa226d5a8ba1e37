"""adapters.store and adapters.host_cache: atomic persistence, reconcile, versions, tiers, usage tracking."""

from __future__ import annotations

import errno
import gc
import json
import sqlite3
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from adapters.archive import AdapterFiles
from adapters.errors import (
    AdapterError,
    AdapterExists,
    InvalidAdapterId,
    StoreFull,
    StoreNotReady,
    UnknownAdapter,
)
from adapters.host_cache import HostCache, adapter_nbytes
from adapters.peft_format import VALUE_CHECKS, LoraAdapter, LoraConfigSpec, LoraLayerWeights
from adapters.store import AdapterStore, DataDirLocked, check_adapter_id, derive_adapter_id, sha256_hex
from tests.adapter_files import linear_shapes, make_adapter

SUMMARY_FIELDS = [
    "id", "rank", "lora_alpha", "use_rslora", "target_modules", "layers", "parameters", "bytes", "sha256",
    "created_at",
]  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tiny_base):
    return linear_shapes(tiny_base)


@pytest.fixture
def files(tiny_base):
    def make(seed: int = 0, **kwargs) -> AdapterFiles:
        config, weights = make_adapter(tiny_base, seed=seed, **kwargs)
        return AdapterFiles(config, weights)

    return make


@pytest.fixture
def open_store(tmp_path, shapes):
    opened: list[AdapterStore] = []

    def open_(data_dir: Path = tmp_path / "data", **kwargs) -> AdapterStore:
        store = AdapterStore(data_dir, **kwargs)
        store.bind_base(shapes, max_rank=64)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def folders(store: AdapterStore) -> list[str]:
    return sorted(p.name for p in store.blobs.versions_dir.iterdir())


class Owner:
    """Stands in for a GenerationRequest: something weak-referenceable that lives while it runs."""


def wait_for(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        gc.collect()
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_put_get_and_summary(open_store, files) -> None:
    store = open_store()
    upload = files(seed=1)
    record = store.put("a", upload)
    summary = record.summary()
    assert list(summary) == SUMMARY_FIELDS
    assert summary["id"] == "a" and summary["rank"] == 8 and summary["lora_alpha"] == 16.0
    assert summary["use_rslora"] is False and summary["target_modules"] == ["q_proj", "v_proj"]
    assert summary["layers"] == 4 and summary["bytes"] == upload.size
    assert summary["parameters"] == sum(8 * (s.in_features + s.out_features) for s in _qv(store))
    assert len(summary["sha256"]) == 64 and summary["created_at"].endswith("Z")
    assert datetime.fromisoformat(summary["created_at"].replace("Z", "+00:00")).tzinfo is not None
    adapter = store.get("a")
    assert (
        isinstance(adapter, LoraAdapter) and adapter.version == record.version and adapter.key == record.key
    )
    assert store.ids() == ["a"] and "a" in store and store.get("b") is None
    assert folders(store) == [record.folder] and not list(store.blobs.tmp_dir.iterdir())
    stored = store.blobs.versions_dir / record.folder
    assert (stored / "adapter_config.json").read_bytes() == upload.config
    assert (stored / "adapter_model.safetensors").read_bytes() == upload.weights


def _qv(store: AdapterStore):
    return [s for name, s in store.base_shapes.items() if name.endswith(("q_proj", "v_proj"))]


def test_existing_id_needs_replace_and_replace_changes_the_version(open_store, files) -> None:
    store = open_store()
    first = store.put("a", files(seed=1))
    old = store.get("a")
    with pytest.raises(AdapterExists, match=r"replace=true"):
        store.put("a", files(seed=2))
    second = store.put("a", files(seed=2), replace=True)
    assert second.version != first.version and second.sha256 != first.sha256
    new = store.get("a")
    assert new.key != old.key
    assert not torch.equal(next(iter(new.layers.values())).A, next(iter(old.layers.values())).A)
    assert folders(store) == [second.folder]  # nothing ran on the old version: its files went at once
    again = store.put("a", files(seed=2), replace=True)  # same bytes, still a new version
    assert again.version != second.version


def test_bad_ids(open_store, files) -> None:
    store = open_store()
    for bad in ["", "../x", "a/b", ".hidden", "-x", "x" * 65, "a b", "é"]:
        with pytest.raises(InvalidAdapterId):
            store.put(bad, files())
    assert check_adapter_id("A1._-z") == "A1._-z" and check_adapter_id("x" * 64)
    assert folders(store) == [] and store.ids() == []


def test_derive_adapter_id() -> None:
    sha = "ab" * 32
    assert derive_adapter_id("my-adapter", sha) == "my-adapter"
    assert derive_adapter_id("My Adapter (v2)", sha) == "My-Adapter-v2"
    assert derive_adapter_id("../../etc", sha) == "etc"
    assert derive_adapter_id("...", sha) == f"adapter-{sha[:12]}"
    assert derive_adapter_id(None, sha) == f"adapter-{sha[:12]}"
    assert len(derive_adapter_id("x" * 200, sha)) == 64


def test_invalid_adapter_stores_nothing(open_store, files) -> None:
    store = open_store()  # max_rank=64
    with pytest.raises(AdapterError, match="rank 128"):
        store.put("a", files(r=128))
    assert store.ids() == [] and folders(store) == [] and not list(store.blobs.tmp_dir.iterdir())


def test_validation_needs_the_base(tmp_path, files) -> None:
    store = AdapterStore(tmp_path / "d")
    try:
        with pytest.raises(StoreNotReady, match="loading"):
            store.put("a", files())
    finally:
        store.close()


def test_persists_across_reopen(open_store, files, tmp_path) -> None:
    store = open_store()
    records = [store.put(f"a{i}", files(seed=i)) for i in range(3)]
    before = store.get("a1")
    store.delete("a2")
    store.close()
    store = open_store()
    assert store.records() == records[:2]
    after = store.get("a1")
    assert after.key == before.key
    for name in after.layers:
        assert torch.equal(after.layers[name].A, before.layers[name].A)
    assert store.put("a3", files(seed=3)).version not in {r.version for r in records}  # seq never repeats


def test_reconcile_after_a_crash(open_store, files, tmp_path) -> None:
    store = open_store()
    keep = store.put("keep", files(seed=1))
    gone = store.put("gone", files(seed=2))
    short = store.put("short", files(seed=3))
    store.close()
    data = tmp_path / "data"
    (data / "tmp" / "half-written").mkdir()  # killed while staging
    (data / "tmp" / "half-written" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    orphan = data / "adapters" / "orphan@v99-00000000"  # renamed, transaction never committed
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text("{}")
    for path in (data / "adapters" / gone.folder).iterdir():  # a row whose files are gone
        path.unlink()
    (data / "adapters" / gone.folder).rmdir()
    weights = data / "adapters" / short.folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])  # a row whose files are the wrong size

    stray = data / "adapters" / "notes.safetensors"  # a file no index row refers to
    stray.write_bytes(b"copied in by hand")

    store = open_store()
    assert store.ids() == ["keep"]
    assert folders(store) == [keep.folder] and not list(store.blobs.tmp_dir.iterdir())
    assert store.get("keep") is not None
    rows = sqlite3.connect(data / "index.sqlite3").execute("SELECT id FROM adapters").fetchall()
    assert rows == [("keep",)]
    # what is bad was set aside, not deleted, and each is listed with its reason
    assert sorted(r["key"] for r in store.repairs) == sorted(
        [gone.key, short.key, "orphan@v99-00000000", "notes.safetensors"]
    )
    quarantined = {p.name.split("-", 1)[1]: p for p in (data / "quarantine").iterdir()}
    assert sorted(quarantined) == sorted([gone.folder, short.folder, orphan.name, stray.name])
    assert (quarantined[short.folder] / short.folder / "adapter_model.safetensors").stat().st_size > 0
    reason = (quarantined[short.folder] / "REASON.txt").read_text()
    assert f"its files hold {short.bytes - 4} bytes, not {short.bytes}" in reason
    assert "files are missing" in (quarantined[gone.folder] / "REASON.txt").read_text()
    assert (quarantined[stray.name] / stray.name).read_bytes() == b"copied in by hand"
    assert "no index row" in (quarantined[stray.name] / "REASON.txt").read_text()


def test_files_left_by_an_interrupted_commit_or_removal_are_removed_not_quarantined(
    open_store, files, tmp_path, monkeypatch
) -> None:
    store = open_store()
    old = store.put("a", files(seed=1))
    # killed between the commit's rename and its row: the key is pending, the row never came
    monkeypatch.setattr(store.index, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(store.blobs, "delete", lambda key: None)  # (the process died: no clean-up)
    with pytest.raises(KeyboardInterrupt):
        store.put("b", files(seed=2))
    monkeypatch.undo()
    # killed between a delete's transaction and the removal of its files: its key stays pending
    monkeypatch.setattr(store, "_remove_files", lambda key, locked=False: None)
    store.delete("a")
    monkeypatch.undo()
    assert len(folders(store)) == 2 and len(store.index.pending()) == 2
    store.close()

    store = open_store()
    assert store.ids() == [] and folders(store) == [] and store.repairs == []
    assert not (tmp_path / "data" / "quarantine").exists()
    assert store.index.pending() == set()
    assert old.key not in store.cache


def test_a_full_disk_while_writing_an_upload_keeps_nothing_and_the_store_goes_on(
    open_store, files, monkeypatch
) -> None:
    import adapters.blobs

    store = open_store()
    store.put("a", files(seed=1))
    real_open = open

    class HalfWrite:
        """A file whose writes stop halfway with ENOSPC, as on a full disk."""

        def __init__(self, path, mode):
            self.f = real_open(path, mode)

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(adapters.blobs, "open", HalfWrite, raising=False)
    with pytest.raises(StoreFull, match=r"disk is full: adapter 'b' .* nothing of it was kept"):
        store.put("b", files(seed=2))
    with pytest.raises(StoreFull):
        store.put("a", files(seed=3), replace=True)
    monkeypatch.undo()

    def index_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store.index, "save", index_full)
    with pytest.raises(StoreFull):
        store.put("b", files(seed=2))
    monkeypatch.undo()

    assert store.ids() == ["a"] and len(folders(store)) == 1 and not list(store.blobs.tmp_dir.iterdir())
    assert store.get("a") is not None
    assert store.put("b", files(seed=2)).adapter_id == "b"
    store.close()
    assert open_store().ids() == ["a", "b"]


def test_a_failed_commit_leaves_nothing(open_store, files, monkeypatch) -> None:
    store = open_store()
    store.put("a", files(seed=1))

    def broken_transaction():
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store.index, "_transaction", broken_transaction)
    with pytest.raises(sqlite3.OperationalError):
        store.put("b", files(seed=2))
    with pytest.raises(sqlite3.OperationalError):
        store.put("a", files(seed=3), replace=True)
    assert store.ids() == ["a"] and len(folders(store)) == 1 and not list(store.blobs.tmp_dir.iterdir())
    monkeypatch.undo()
    assert store.put("b", files(seed=2)).adapter_id == "b"


def test_delete(open_store, files) -> None:
    store = open_store()
    record = store.put("a", files())
    with pytest.raises(UnknownAdapter, match="'zz'"):
        store.delete("zz")
    assert store.delete("a") == record
    assert store.ids() == [] and folders(store) == [] and store.get("a") is None


def test_files_stay_while_a_request_uses_the_version(open_store, files) -> None:
    store = open_store()
    v1 = store.put("a", files(seed=1))
    owner = Owner()
    store.track(owner, store.get("a"))
    v2 = store.put("a", files(seed=2), replace=True)
    assert folders(store) == sorted([v1.folder, v2.folder])
    owner2 = Owner()
    store.track(owner2, store.get("a"))
    store.delete("a")
    assert store.ids() == [] and folders(store) == sorted([v1.folder, v2.folder])
    del owner
    assert wait_for(lambda: folders(store) == [v2.folder])
    del owner2
    assert wait_for(lambda: folders(store) == [])


def test_keep_identical(open_store, files, tiny_base) -> None:
    store = open_store()
    first = store.put("a", files(seed=1))
    assert store.put("a", files(seed=1), replace=True, keep_identical=True) == first
    config, weights = make_adapter(tiny_base, seed=1, alpha=32)  # same weights, another config
    changed = store.put("a", AdapterFiles(config, weights), replace=True, keep_identical=True)
    assert changed.version != first.version and changed.sha256 == first.sha256 and changed.lora_alpha == 32


def test_one_server_per_data_dir(open_store, tmp_path) -> None:
    store = open_store()
    with pytest.raises(DataDirLocked, match="another loraplex server"):
        AdapterStore(tmp_path / "data")
    store.close()
    open_store()  # released on close


def test_concurrent_puts(open_store, files) -> None:
    store = open_store()
    uploads = [files(seed=i) for i in range(6)]
    errors: list[Exception] = []

    def put(i: int) -> None:
        try:
            store.put("same", uploads[i])
        except AdapterExists as exc:
            errors.append(exc)
        store.put(f"own{i}", uploads[i])

    threads = [threading.Thread(target=put, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 5  # exactly one upload took the id
    assert store.ids() == ["own0", "own1", "own2", "own3", "own4", "own5", "same"]
    assert len(folders(store)) == 7 and not list(store.blobs.tmp_dir.iterdir())


def test_corrupt_files_are_reported(open_store, files) -> None:
    store = open_store(host_cache_bytes=0)
    record = store.put("a", files())
    store.put("b", files(seed=1))  # pushes 'a' out of the (empty) host cache
    weights = (store.blobs.versions_dir / record.folder) / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(AdapterError, match="corrupt") as info:
        store.get("a")
    assert info.value.error_type == "store_corrupt"


def test_host_tier_reads_disk_only_on_a_miss(open_store, files) -> None:
    store = open_store()
    store.put("probe", files(seed=0))
    size = adapter_nbytes(store.get("probe"))
    store.close()
    store = open_store(host_cache_bytes=2 * size)  # room for two adapters
    store.put("x", files(seed=1))
    store.put("y", files(seed=2))
    y_held = store.get("y")  # a hit; from now on something (this test) holds y, as a running request would
    misses = store.cache.misses
    first = store.get("probe")  # read from disk; evicts x, the least recently used
    assert store.cache.misses == misses + 1 and store.record("x").key not in store.cache
    assert store.get("probe") is first and store.cache.misses == misses + 1
    x = store.get("x")  # read from disk again; evicts y
    assert store.cache.misses == misses + 2 and store.record("y").key not in store.cache
    assert store.get("y") is y_held and store.cache.misses == misses + 2  # held elsewhere: no disk read
    assert x.version == store.record("x").version


async def test_aget_loads_in_a_worker_thread(open_store, files) -> None:
    store = open_store(host_cache_bytes=0)
    store.put("a", files())
    store.put("b", files(seed=1))
    seen: list[str] = []
    original = store._load

    def spy(record):
        seen.append(threading.current_thread().name)
        return original(record)

    store._load = spy  # type: ignore[method-assign]
    adapter = await store.aget("a")
    assert adapter is not None and seen and seen[0] != threading.main_thread().name
    assert await store.aget("missing") is None


def _toy(key: str, numel: int) -> LoraAdapter:
    config = LoraConfigSpec(r=1, lora_alpha=1.0, target_modules=["q"])
    layer = LoraLayerWeights(A=torch.zeros(1, numel), B=torch.zeros(1, 1), scale=1.0)
    adapter_id, _, version = key.partition("@")
    return LoraAdapter(adapter_id=adapter_id, config=config, layers={"q": layer}, version=version)


def test_host_cache_lru_by_bytes() -> None:
    a, b, c = _toy("a@1", 255), _toy("b@1", 255), _toy("c@1", 255)  # 1 KiB each
    cache = HostCache(max_bytes=2048)
    cache.put(a)
    cache.put(b)
    assert cache.get("a@1") is a  # a is now the most recent
    cache.put(c)
    assert cache.keys() == ["a@1", "c@1"] and cache.nbytes == 2048
    assert cache.get("b@1") is b  # evicted from the LRU but still alive here: found again
    del b
    gc.collect()
    cache.put(_toy("d@1", 255))
    cache.put(_toy("e@1", 255))
    assert cache.get("b@1") is None
    cache.drop("e@1")
    assert "e@1" not in cache
    big = _toy("big@1", 10_000)
    cache.put(big)
    assert cache.keys() == ["big@1"]  # the last one put stays, even over budget


def test_index_holds_the_summary(open_store, files, tmp_path) -> None:
    store = open_store()
    record = store.put("a", files(r=4, targets=("q_proj",)))
    row = (
        sqlite3.connect(tmp_path / "data" / "index.sqlite3")
        .execute("SELECT rank, layers, target_modules, folder FROM adapters")
        .fetchone()
    )
    assert row == (4, 2, json.dumps(["q_proj"]), record.folder)


# --------------------------------------------------------------------------- cold reads (issue 29)


def _cold(store: AdapterStore, adapter_id: str) -> LoraAdapter:
    """``adapter_id`` read back from disk (the host cache forgets it first)."""
    store.cache.drop(store.record(adapter_id).key)
    adapter = store.get(adapter_id)
    assert adapter is not None
    return adapter


def _assert_same_tensors(a: LoraAdapter, b: LoraAdapter) -> None:
    assert a.layers.keys() == b.layers.keys()
    for name, layer in a.layers.items():
        other = b.layers[name]
        assert layer.scale == other.scale and layer.A.dtype == other.A.dtype == torch.float32
        assert torch.equal(layer.A, other.A) and torch.equal(layer.B, other.B)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_stored_version_is_read_the_short_way_with_the_uploads_tensors(
    open_store, tiny_base, dtype, monkeypatch
) -> None:
    """A version stored under the current value rules is read in place, cast once and not scanned
    again, and gives exactly the tensors the upload's full parse gave."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    import adapters.store as store_module

    config, weights = make_adapter(tiny_base, seed=3, r=4)
    weights = st_save({k: t.to(dtype) for k, t in st_load(weights).items()})
    store = open_store()
    record = store.put("a", AdapterFiles(config, weights))
    assert record.checks == VALUE_CHECKS
    uploaded = store.get("a")  # what the upload's parse put in the host cache
    flags: list[bool] = []
    real = store_module.build_adapter

    def spy(*args, **kwargs):
        flags.append(kwargs.get("check_values", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "build_adapter", spy)
    _assert_same_tensors(_cold(store, "a"), uploaded)
    assert flags == [False]


def test_corrupt_weights_or_config_are_refused_on_the_short_read(open_store, files) -> None:
    """The short read still compares both files with their recorded sha256: a flipped bit inside a
    tensor (which the parse alone would accept) or a changed config is never served."""
    store = open_store()
    record = store.put("a", files())
    folder = store.blobs.versions_dir / record.folder
    weights = folder / "adapter_model.safetensors"
    good = weights.read_bytes()
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2] ^= 0x01  # inside the tensors' bytes: still parses
    weights.write_bytes(bytes(corrupt))
    with pytest.raises(AdapterError, match="corrupt") as info:
        _cold(store, "a")
    assert info.value.error_type == "store_corrupt"
    weights.write_bytes(good)
    config = folder / "adapter_config.json"
    good_config = config.read_bytes()
    config.write_bytes(good_config.replace(b'"lora_alpha": 16', b'"lora_alpha": 17'))
    with pytest.raises(AdapterError, match="corrupt"):
        _cold(store, "a")
    config.write_bytes(good_config[:-1] + b"!")  # no longer JSON: reported as corrupt, not invalid
    with pytest.raises(AdapterError, match="corrupt") as info:
        _cold(store, "a")
    assert info.value.error_type == "store_corrupt"
    config.write_bytes(good_config)
    assert _cold(store, "a").version == record.version


def test_an_index_written_before_the_checks_column_rechecks_values_on_read(
    open_store, files, tiny_base, tmp_path
) -> None:
    """Rows of a schema-1 index get ``checks`` 0: their reads run every check of an upload, so a
    version whose recorded sha256 matches but whose values were never checked is refused."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    store = open_store()
    record = store.put("a", files())
    store.close()
    weights = tmp_path / "data" / "adapters" / record.folder / "adapter_model.safetensors"
    tensors = st_load(weights.read_bytes())
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    poisoned = st_save(tensors)
    weights.write_bytes(poisoned)
    db = sqlite3.connect(tmp_path / "data" / "index.sqlite3")
    with db:  # back to schema 1: no checks column, the poisoned file's digest recorded
        db.execute("ALTER TABLE adapters DROP COLUMN checks")
        db.execute("UPDATE adapters SET sha256 = ?, bytes = ?", (sha256_hex(poisoned), record.bytes))
        db.execute("PRAGMA user_version=1")
    db.close()
    store = open_store()
    assert store.record("a").checks == 0
    with pytest.raises(AdapterError, match="NaN") as info:
        store.get("a")
    assert info.value.error_type == "invalid_weights"


# --------------------------------------------------------------------------- stamps (issue 29)


@pytest.fixture
def settle_at_once(monkeypatch):
    """Files count as settled as soon as they are written (the margin is a test's clock tick)."""
    import adapters.stamps as stamps

    monkeypatch.setattr(stamps, "STAMP_MARGIN_SECONDS", 0.0)
    return stamps


def _hashes(monkeypatch) -> list[int]:
    """Counts the sha256 the store computes from now on."""
    import adapters.store as store_module

    calls: list[int] = []
    real = store_module.sha256_hex

    def counting(data: bytes) -> str:
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(store_module, "sha256_hex", counting)
    return calls


def _stamped(store: AdapterStore, adapter_id: str) -> bool:
    assert store.checks.wait_idle(10)
    return store._stamps.get(store.record(adapter_id).folder) is not None


def _tick() -> None:
    """Let the file system's clock move on (its timestamps are coarse: a jiffy), so that the next
    write gives a new mtime and ctime, as any write after the stamp was recorded does."""
    time.sleep(0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_stamped_version_is_read_without_hashing_and_gives_the_uploads_tensors(
    open_store, tiny_base, dtype, settle_at_once, monkeypatch
) -> None:
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    config, weights = make_adapter(tiny_base, seed=5, r=4)
    weights = st_save({k: t.to(dtype) for k, t in st_load(weights).items()}, metadata={"x": "odd" * 3})
    store = open_store()
    store.put("a", AdapterFiles(config, weights))
    uploaded = store.get("a")  # the upload's full parse, in the host cache
    assert _stamped(store, "a")  # hashed in the background once the files settled, and stamped
    hashes = _hashes(monkeypatch)
    _assert_same_tensors(_cold(store, "a"), uploaded)
    assert hashes == [] and store.trusted_loads == 1 and store.disk_loads == 1


def test_read_stored_safetensors_equals_the_in_memory_read(tiny_base, tmp_path) -> None:
    import concurrent.futures
    import os

    from adapters.peft_format import load_stored_safetensors, read_stored_safetensors

    _, weights = make_adapter(tiny_base, seed=6, r=8)
    path = tmp_path / "w.safetensors"
    path.write_bytes(weights)
    expected = load_stored_safetensors(weights)
    fd = os.open(path, os.O_RDONLY)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as helper:
            reads = [read_stored_safetensors(fd, len(weights), helper=h) for h in (None, helper)]
            for got in reads:
                assert got.keys() == expected.keys()
                assert all(torch.equal(got[k], expected[k]) and got[k].dtype == torch.float32 for k in got)
    finally:
        os.close(fd)
    path.write_bytes(weights[:-100])  # cut short after its size was taken: the read refuses it
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(AdapterError, match="truncated"):
            read_stored_safetensors(fd, len(weights))
    finally:
        os.close(fd)


def test_a_file_changed_behind_the_stores_back_is_never_served_unchecked(
    open_store, files, settle_at_once, monkeypatch
) -> None:
    """Whatever changes a stamped file (in place, with its mtime put back, by renaming another file
    of the same size into its place, its config), the read sees a stamp other than the recorded one,
    hashes, and refuses it; good files again are served, hashed once, then stamped anew."""
    import os

    store = open_store()
    record = store.put("a", files())
    folder = store.blobs.versions_dir / record.folder
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    good, good_config = weights.read_bytes(), config.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01  # inside a tensor: still parses, same size

    def in_place() -> None:
        with open(weights, "r+b") as f:
            f.seek(len(bad) // 2)
            f.write(bad[len(bad) // 2 : len(bad) // 2 + 1])

    def mtime_put_back() -> None:
        before = os.stat(weights)
        in_place()
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))

    def renamed_into_place() -> None:
        before = os.stat(weights)
        other = folder / "other"
        other.write_bytes(bytes(bad))
        os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.rename(other, weights)

    def config_changed() -> None:
        config.write_bytes(good_config.replace(b'"lora_alpha": 16', b'"lora_alpha": 17'))

    for change in (in_place, mtime_put_back, renamed_into_place, config_changed):
        assert _stamped(store, "a")
        trusted = store.trusted_loads
        assert _cold(store, "a").version == record.version and store.trusted_loads == trusted + 1
        _tick()
        change()
        with pytest.raises(AdapterError, match="corrupt") as info:
            _cold(store, "a")
        assert info.value.error_type == "store_corrupt", change.__name__
        assert store.trusted_loads == trusted + 1, change.__name__
        _tick()
        weights.write_bytes(good)
        config.write_bytes(good_config)
        hashes = _hashes(monkeypatch)
        assert _cold(store, "a").version == record.version and len(hashes) == 2  # hashed, served
        monkeypatch.undo()
        settle_at_once.STAMP_MARGIN_SECONDS = 0.0  # undo() restored the module's margin too


def test_young_files_are_hashed_until_they_settle(open_store, files, monkeypatch) -> None:
    """A file written within the margin could hide a same-tick write from its mtime: it is not
    stamped, and reads hash it."""
    import adapters.stamps as stamps

    monkeypatch.setattr(stamps, "STAMP_MARGIN_SECONDS", 3600.0)
    store = open_store()
    record = store.put("a", files())
    hashes = _hashes(monkeypatch)
    assert _cold(store, "a").version == record.version and len(hashes) == 2
    assert store._stamps[record.folder] is None and store.trusted_loads == 0


def test_stamps_survive_a_restart_and_an_old_index_gets_them(
    open_store, files, settle_at_once, tmp_path, monkeypatch
) -> None:
    store = open_store()
    record = store.put("a", files())
    assert _stamped(store, "a")
    store.close()
    store = open_store()
    hashes = _hashes(monkeypatch)
    assert _cold(store, "a").version == record.version and hashes == [] and store.trusted_loads == 1
    store.close()
    db = sqlite3.connect(tmp_path / "data" / "index.sqlite3")
    with db:  # back to schema 2: no stamps
        db.execute("DROP TABLE stamps")
        db.execute("PRAGMA user_version=2")
    db.close()
    store = open_store()
    assert _cold(store, "a").version == record.version and len(hashes) == 2  # hashed: no stamp yet
    assert _stamped(store, "a")  # stamped from that read (no second hash) ...
    assert len(hashes) == 2
    assert _cold(store, "a").version == record.version and len(hashes) == 2  # ... and trusted next time


def test_the_background_recheck_catches_what_the_stamp_cannot_see(
    open_store, files, settle_at_once, monkeypatch
) -> None:
    """Bits that change under an unchanged stamp (a failing disk) are served once by a trusted read,
    found by its background re-hash, and the version leaves memory: the next read refuses it."""
    import os

    import adapters.stamps as stamps

    monkeypatch.setattr(stamps, "RECHECK_DELAY_SECONDS", 0.0)
    store = open_store()
    retired: list[str] = []
    store.on_retire(retired.append)
    record = store.put("a", files())
    assert _stamped(store, "a")
    weights = store.blobs.versions_dir / record.folder / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    _tick()
    weights.write_bytes(bytes(blob))
    store._stamps[record.folder] = stamps.encode(store.blobs.stamp(record.folder))  # the rot's stamp
    store._checked_at.clear()  # never re-hashed in this process: the trusted read queues a re-check
    assert _cold(store, "a").version == record.version and store.trusted_loads == 1
    assert store.checks.wait_idle(10)
    assert retired == [record.key] and record.key not in store.cache
    assert store._stamps[record.folder] is None
    with pytest.raises(AdapterError, match="corrupt"):
        _cold(store, "a")
    assert os.path.exists(weights)  # kept as it is: nothing is deleted


def test_replaced_and_deleted_versions_lose_their_stamps(open_store, files, settle_at_once, tmp_path) -> None:
    store = open_store()
    first = store.put("a", files())
    assert _stamped(store, "a")
    second = store.put("a", files(seed=1), replace=True)
    assert _stamped(store, "a")
    store.put("b", files(seed=2))
    assert _stamped(store, "b")
    store.delete("b")
    rows = dict(
        sqlite3.connect(tmp_path / "data" / "index.sqlite3").execute("SELECT folder, stamp FROM stamps")
    )
    assert list(rows) == [second.folder] and first.folder not in store._stamps
