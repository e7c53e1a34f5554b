"""Durable, path-safe storage of received bytes and the duplicate policies."""
from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import pytest

from dicom_node.storage import (
    DIR_MODE,
    FILE_MODE,
    DuplicateConflictError,
    InsufficientStorageError,
    InvalidUIDError,
    Outcome,
    Storage,
    validate_uid,
)

STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*") if p.is_file())


def test_store_writes_bytes_as_given_with_checksum_and_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0o000)  # a permissive umask must not make patient data world-readable
    try:
        storage = Storage(tmp_path / "store", min_free_mb=0)
        data = os.urandom(3 * 1024 * 1024 + 17)  # several write chunks
        stored = storage.store(data, STUDY, SERIES, SOP, "reject_if_different")
    finally:
        os.umask(old_umask)
    stored.finalize()
    assert stored.outcome is Outcome.CREATED and stored.changed
    assert stored.path == tmp_path / "store" / STUDY / SERIES / f"{SOP}.dcm"
    assert stored.relative_path == f"{STUDY}/{SERIES}/{SOP}.dcm"
    assert stored.path.read_bytes() == data
    assert stored.sha256 == stored.received_sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size_bytes == len(data)
    assert stat.S_IMODE(stored.path.stat().st_mode) == FILE_MODE
    assert stat.S_IMODE(stored.path.parent.stat().st_mode) == DIR_MODE
    assert stat.S_IMODE(stored.path.parent.parent.stat().st_mode) == DIR_MODE
    assert _leftovers(tmp_path) == []


def test_store_accepts_file_objects_and_chunk_iterables(tmp_path: Path) -> None:
    storage = Storage(tmp_path, min_free_mb=0)
    a = storage.store(io.BytesIO(b"abc" * 1000), STUDY, SERIES, "1.2.3.1", "overwrite")
    b = storage.store([b"x" * 10, memoryview(b"y" * 5)], STUDY, SERIES, "1.2.3.2", "overwrite")
    assert a.path.read_bytes() == b"abc" * 1000
    assert b.path.read_bytes() == b"x" * 10 + b"y" * 5 and b.size_bytes == 15


@pytest.mark.parametrize(
    "study, series, sop, bad",
    [
        ("../etc", SERIES, SOP, "StudyInstanceUID"),
        (STUDY, "1.2/../../x", SOP, "SeriesInstanceUID"),
        (STUDY, SERIES, "1.2.3/4", "SOPInstanceUID"),
        (STUDY, SERIES, "..", "SOPInstanceUID"),
        (STUDY, SERIES, "", "SOPInstanceUID"),
        (STUDY, SERIES, "1." + "2" * 63, "SOPInstanceUID"),  # 65 characters
        (STUDY, SERIES, "1.2.", "SOPInstanceUID"),
        (STUDY, SERIES, "/abs/path", "SOPInstanceUID"),
    ],
)
def test_unsafe_uids_never_reach_the_filesystem(tmp_path: Path, study: str, series: str, sop: str, bad: str) -> None:
    root = tmp_path / "store"
    storage = Storage(root, min_free_mb=0)
    with pytest.raises(InvalidUIDError, match=bad):
        storage.store(b"data", study, series, sop, "overwrite")
    assert list(root.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_validate_uid_accepts_64_characters() -> None:
    uid = "1." + "2" * 62
    assert len(uid) == 64 and validate_uid("x", uid) == uid
    with pytest.raises(InvalidUIDError, match="SOPInstanceUID None"):
        validate_uid("SOPInstanceUID", None)


def test_resolve_refuses_paths_outside_the_root(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "store", min_free_mb=0)
    with pytest.raises(ValueError, match="outside the storage root"):
        storage.resolve("../other/file.dcm")


def test_reserve_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    storage = Storage(root, min_free_mb=10**9)  # a petabyte reserve: never satisfied
    with pytest.raises(InsufficientStorageError, match="storage.min_free_mb") as info:
        storage.store(b"x" * 100, STUDY, SERIES, SOP, "overwrite")
    assert info.value.needed_bytes == 100
    assert list(root.iterdir()) == []


def test_reserve_counts_the_incoming_size(tmp_path: Path) -> None:
    storage = Storage(tmp_path, min_free_mb=0)
    free = storage.free_bytes()
    storage.check_free_space(0)
    with pytest.raises(InsufficientStorageError):
        storage.check_free_space(free + 1024 * 1024 * 1024)


@pytest.mark.parametrize("policy", ["keep_first", "overwrite", "reject_if_different"])
def test_identical_duplicate_is_acknowledged_under_every_policy(tmp_path: Path, policy: str) -> None:
    storage = Storage(tmp_path, min_free_mb=0)
    storage.store(b"same", STUDY, SERIES, SOP, policy).finalize()  # type: ignore[arg-type]
    again = storage.store(b"same", STUDY, SERIES, SOP, policy)  # type: ignore[arg-type]
    assert again.outcome is Outcome.IDENTICAL and not again.changed
    assert again.path.read_bytes() == b"same"
    assert _leftovers(tmp_path) == []


def test_keep_first_keeps_the_old_file(tmp_path: Path) -> None:
    storage = Storage(tmp_path, min_free_mb=0)
    storage.store(b"first", STUDY, SERIES, SOP, "keep_first").finalize()
    second = storage.store(b"second", STUDY, SERIES, SOP, "keep_first")
    assert second.outcome is Outcome.KEPT_EXISTING
    assert second.path.read_bytes() == b"first"
    assert second.sha256 == hashlib.sha256(b"first").hexdigest() != second.received_sha256
    assert second.size_bytes == 5
    assert _leftovers(tmp_path) == []


def test_reject_if_different_refuses_and_keeps_the_old_file(tmp_path: Path) -> None:
    storage = Storage(tmp_path, min_free_mb=0)
    first = storage.store(b"first", STUDY, SERIES, SOP, "reject_if_different")
    with pytest.raises(DuplicateConflictError, match="reject_if_different"):
        storage.store(b"second", STUDY, SERIES, SOP, "reject_if_different")
    assert first.path.read_bytes() == b"first"
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_and_undo_restores(tmp_path: Path) -> None:
    storage = Storage(tmp_path, min_free_mb=0)
    storage.store(b"first", STUDY, SERIES, SOP, "overwrite").finalize()
    second = storage.store(b"second", STUDY, SERIES, SOP, "overwrite")
    assert second.outcome is Outcome.OVERWRITTEN and second.path.read_bytes() == b"second"
    second.undo()  # the database refused: the old file is back, no backup left over
    assert second.path.read_bytes() == b"first"
    assert _leftovers(tmp_path) == []

    third = storage.store(b"third", STUDY, SERIES, SOP, "overwrite")
    third.finalize()
    assert third.path.read_bytes() == b"third"
    assert _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError, match="undo"):
        third.undo()


def test_undo_of_a_new_file_removes_it(tmp_path: Path) -> None:
    storage = Storage(tmp_path, min_free_mb=0)
    stored = storage.store(b"new", STUDY, SERIES, SOP, "keep_first")
    stored.undo()
    assert not stored.path.exists()


def test_unknown_policy_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'newest'"):
        Storage(tmp_path, 0).store(b"x", STUDY, SERIES, SOP, "newest")  # type: ignore[arg-type]


def test_failed_write_leaves_no_temporary(tmp_path: Path) -> None:
    storage = Storage(tmp_path, min_free_mb=0)

    def chunks():
        yield b"part"
        raise OSError("connection lost mid-transfer")

    with pytest.raises(OSError, match="mid-transfer"):
        storage.store(chunks(), STUDY, SERIES, SOP, "overwrite")
    assert not storage.path_for(STUDY, SERIES, SOP).exists()
    assert _leftovers(tmp_path) == []


def test_remove_stale_temporaries(tmp_path: Path) -> None:
    storage = Storage(tmp_path, min_free_mb=0)
    storage.store(b"kept", STUDY, SERIES, SOP, "overwrite")
    folder = storage.path_for(STUDY, SERIES, SOP).parent
    stale = folder / ".incoming-1.2.3.99.1.2"
    stale.write_bytes(b"half")
    fresh = folder / ".incoming-1.2.3.98.1.2"
    fresh.write_bytes(b"being written")
    old = os.stat(stale).st_mtime - 7200
    os.utime(stale, (old, old))
    assert storage.remove_stale_temporaries(older_than_seconds=3600) == 1
    assert not stale.exists() and fresh.exists()
    assert storage.path_for(STUDY, SERIES, SOP).read_bytes() == b"kept"


def test_negative_reserve_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_free_mb"):
        Storage(tmp_path, -1)


def test_folder_fsync_left_to_the_caller_is_done_once_per_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sync_directory=False``: the file is in place but its folder entry waits for
    ``sync_directories``, which fsyncs each folder once for all instances stored in it."""
    from dicom_node import storage as storage_module

    storage = Storage(tmp_path / "store", min_free_mb=0)
    other_series = SERIES + ".1"
    stored = [
        storage.store(b"one", STUDY, SERIES, SOP + ".1", "keep_first", sync_directory=False),
        storage.store(b"two", STUDY, SERIES, SOP + ".2", "keep_first", sync_directory=False),
        storage.store(b"three", STUDY, other_series, SOP + ".3", "keep_first", sync_directory=False),
        storage.store(b"one", STUDY, SERIES, SOP + ".1", "keep_first", sync_directory=False),  # identical: no entry
    ]
    assert [s.directory_pending for s in stored] == [True, True, True, False]
    assert all(s.path.read_bytes() for s in stored)
    synced: list[Path] = []
    real = storage_module.fsync_directory
    monkeypatch.setattr(storage_module, "fsync_directory", lambda path: (synced.append(path), real(path)))
    storage_module.sync_directories(stored)
    assert synced == [stored[0].path.parent, stored[2].path.parent]
    assert not any(s.directory_pending for s in stored)
    storage_module.sync_directories(stored)  # nothing left to do
    assert len(synced) == 2


def test_known_folder_removed_behind_the_process_is_made_again(tmp_path: Path) -> None:
    import shutil

    storage = Storage(tmp_path / "store", min_free_mb=0)
    storage.store(b"one", STUDY, SERIES, SOP, "keep_first").finalize()
    shutil.rmtree(tmp_path / "store" / STUDY)
    stored = storage.store(b"two", STUDY, SERIES, SOP + ".2", "keep_first")
    assert stored.outcome is Outcome.CREATED and stored.path.read_bytes() == b"two"
    assert stat.S_IMODE(stored.path.parent.stat().st_mode) == DIR_MODE
