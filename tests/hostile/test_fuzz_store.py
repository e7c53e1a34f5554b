"""Seeded, time-bounded fuzzing of the C-STORE path of a running listener.

Valid small MR data sets are mutated (attributes deleted, values replaced with junk or with
another VR, bytes flipped, the data set cut short or extended with garbage) and sent byte for
byte; now and then the mutated file reuses the UIDs of an instance already stored (a changed or
damaged duplicate).  Whatever arrives, the node must answer with one of its documented statuses, keep
serving (C-ECHO afterwards), and leave storage consistent: every file under the storage root
has its database row with the same checksum and vice versa, no temporary file stays visible,
and every instance answered with success is there.
"""
from __future__ import annotations

import hashlib
import os
import random
import time
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node import db
from dicom_node.ingest import StoreStatus
from tests.hostile.corpus import (
    mutated_body,
    VALID_STATUSES,
    body_of,
    echo,
    encode,
    file_bytes,
    mr_dataset,
    send_files,
)
from tests.support.hostile import hostile_config, start_listener

#: seconds of fuzzing (ORTHONODE_FUZZ_SECONDS for a longer run) and the seed (ORTHONODE_FUZZ_SEED)
FUZZ_SECONDS = float(os.environ.get("ORTHONODE_FUZZ_SECONDS", "15"))
FUZZ_SEED = int(os.environ.get("ORTHONODE_FUZZ_SEED", "20261128"))
#: files per association: several, so a damaged file is followed by more on the same association
BATCH = 8



def fuzz_file(rng: random.Random, again: tuple[str, str, str] | None = None) -> bytes:
    """One mutated file: the file meta of the original (so the sender can address it), the data
    set mutated in one of three ways.  ``again``: the (study, series, SOP instance) UIDs of an
    instance already stored, so that the file is a damaged or changed duplicate of it."""
    if again is None:
        ds = mr_dataset(seed=rng.randrange(1000))
    else:
        study, series, sop = again
        ds = mr_dataset(seed=rng.randrange(1000), study=study, series=series, sop=sop)
    meta = ds.file_meta
    body = mutated_body(ds, body_of(encode(ds)), rng)
    if rng.random() < 0.2:  # sometimes the command and the data set disagree on the instance
        meta.MediaStorageSOPInstanceUID = generate_uid()
    return file_bytes(meta, body)


def _uids_of(path: Path) -> list[tuple[str, str, str]]:
    """The (study, series, SOP instance) UIDs of an acknowledged file, when they can be read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
            return [(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))]
        except Exception:  # noqa: BLE001 - acknowledged files are readable; this only picks duplicates
            return []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzz_c_store(tmp_path: Path) -> None:
    node = start_listener(hostile_config(tmp_path))
    config, listener, storage, factory, engine = node.config, node.listener, node.storage, node.factory, node.engine
    rng = random.Random(FUZZ_SEED)
    sent = successes = 0
    seen: dict[int, int] = {}
    acknowledged: list[Path] = []
    stored_uids: list[tuple[str, str, str]] = []
    duplicates: dict[Path, tuple[str, str, str] | None] = {}
    acknowledged_again: list[str] = []
    try:
        deadline = time.monotonic() + FUZZ_SECONDS
        batch_no = 0
        while time.monotonic() < deadline:
            paths = []
            for i in range(BATCH):
                path = tmp_path / "send" / f"{batch_no:04d}_{i}.dcm"
                path.parent.mkdir(exist_ok=True)
                # now and then a changed copy of an instance already stored: the duplicate path
                again = rng.choice(stored_uids) if stored_uids and rng.random() < 0.15 else None
                path.write_bytes(fuzz_file(rng, again))
                paths.append(path)
                duplicates[path] = again
            batch_no += 1
            result = send_files(config.listener.port, paths)
            assert not result.aborted, f"batch {batch_no}: the node ended the association ({result.statuses})"
            for path, status in zip(paths, result.statuses, strict=True):
                sent += 1
                assert status is not None, f"{path.name}: no presentation context for an MR file"
                assert status in VALID_STATUSES, f"{path.name}: 0x{status:04X} is not a documented status"
                assert status != StoreStatus.PROCESSING_FAILURE, f"{path.name}: an unexpected error in the node (log)"
                seen[status] = seen.get(status, 0) + 1
                if status == 0:
                    successes += 1
                    if duplicates[path] is None:
                        acknowledged.append(path)
                        stored_uids.extend(_uids_of(path))
                    else:  # kept as first stored (the same header and pixels, or the same bytes)
                        acknowledged_again.append(duplicates[path][2])
            for path in paths:
                if path not in acknowledged:
                    path.unlink()
        assert echo(config.listener.port), "no C-ECHO answer after fuzzing"
    finally:
        listener.stop(timeout=2)

    try:
        with db.session_scope(factory) as s:
            rows = {r.path: (r.sha256, r.sop_instance_uid) for r in s.execute(select(db.Instance)).scalars()}
    finally:
        engine.dispose()
    files = {p.relative_to(storage.root).as_posix(): p for p in storage.root.rglob("*") if p.is_file()}
    assert [name for name in files if Path(name).name.startswith(".")] == [], "temporary files left visible"
    assert set(files) == set(rows), "files without rows or rows without files"
    for rel, path in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == rows[rel][0], rel
    # every acknowledged file is stored: its data set bytes are among the stored files'
    stored_bodies = {hashlib.sha256(body_of(p.read_bytes())).hexdigest() for p in files.values()}
    for path in acknowledged:
        assert hashlib.sha256(body_of(path.read_bytes())).hexdigest() in stored_bodies, path
    stored_sops = {sop for _, sop in rows.values()}
    assert [sop for sop in acknowledged_again if sop not in stored_sops] == [], "an acknowledged duplicate is missing"
    assert sent >= 40, f"only {sent} files in {FUZZ_SECONDS} s"
    # the mutations reach more than one outcome: refusals and successes both occur
    assert successes and len(seen) >= 3, seen
    # the run's figures (shown with -s; benchmarks/results/fuzzing.md records longer runs)
    print(
        f"fuzz seed {FUZZ_SEED}, {FUZZ_SECONDS:g} s: {sent} files, {len(acknowledged)} stored, "
        f"{len(acknowledged_again)} duplicates acknowledged, statuses "
        + ", ".join(f"{status:04X}: {count}" for status, count in sorted(seen.items()))
    )

