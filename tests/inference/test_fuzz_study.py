"""Seeded, time-bounded fuzzing of the inference pipeline with damaged studies.

A phantom knee study has one to four of its files damaged with the C-STORE fuzzer's mutations
(attributes deleted or given junk values, bytes flipped, files cut short or extended), then
goes through :func:`inference.pipeline.run_study`, as ``orthonode predict`` runs it on a
folder and the node's jobs on a received study.  Whatever the damage, the pipeline must answer
with an outcome and its reason, never an exception; the files it skipped are named in its log,
and what it wrote is readable DICOM.
"""
from __future__ import annotations

import os
import random
import shutil
import time
import warnings
from pathlib import Path

import pydicom
import pytest

from inference.checkpoint import ModelBundle
from inference.pipeline import Outcome, run_study
from tests.hostile.corpus import body_of, mutated_body

#: seconds of fuzzing (ORTHONODE_STUDY_FUZZ_SECONDS for a longer run) and the seed
FUZZ_SECONDS = float(os.environ.get("ORTHONODE_STUDY_FUZZ_SECONDS", "20"))
FUZZ_SEED = int(os.environ.get("ORTHONODE_STUDY_FUZZ_SEED", "20261128"))


def _damage(path: Path, rng: random.Random) -> None:
    data = path.read_bytes()
    body = body_of(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        path.write_bytes(data[: len(data) - len(body)] + mutated_body(ds, body, rng))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_damaged_studies_get_an_outcome_never_an_exception(
    tiny_checkpoint: Path, knee_studies: Path, tmp_path: Path
) -> None:
    bundle = ModelBundle.load(tiny_checkpoint)
    source = sorted(knee_studies.glob("knee_*"))[0] / "dicom"
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    rng = random.Random(FUZZ_SEED)
    outcomes: dict[Outcome, int] = {}
    trials = 0
    deadline = time.monotonic() + FUZZ_SECONDS
    while time.monotonic() < deadline:
        study = tmp_path / f"study_{trials:03d}"
        shutil.copytree(source, study)
        damaged = rng.sample(files, rng.randint(1, 4))
        for name in damaged:
            _damage(study / name, rng)
        out = tmp_path / f"out_{trials:03d}"
        result = run_study(study, bundle, out, device="cpu")  # an exception fails the test
        trials += 1
        assert result.outcome in (Outcome.COMPLETE, Outcome.PARTIAL, Outcome.UNSUPPORTED)
        assert result.reason, f"trial {trials}: no reason given for {result.outcome}"
        for path in [*result.segmentations.values(), *([result.report] if result.report else [])]:
            written = pydicom.dcmread(path)
            assert written.StudyInstanceUID == result.study_instance_uid
        log = "\n".join(result.log)
        for line in log.splitlines():
            if ": skipped: " in line:
                assert line.split(":", 1)[0].removeprefix("file ") in {p.name for p in damaged}, line
        outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
        shutil.rmtree(study)
        shutil.rmtree(out, ignore_errors=True)
    assert trials >= 3, f"only {trials} damaged studies in {FUZZ_SECONDS} s"
    # most damage leaves a plane usable: complete or partial results occur, not only refusals
    assert outcomes.get(Outcome.COMPLETE, 0) + outcomes.get(Outcome.PARTIAL, 0) > 0, outcomes
    print(f"study fuzz seed {FUZZ_SEED}, {FUZZ_SECONDS:g} s: {trials} damaged studies, "
          + ", ".join(f"{o.value}: {n}" for o, n in sorted(outcomes.items(), key=lambda kv: kv[0].value)))
