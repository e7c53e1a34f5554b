"""``orthonode train demo`` at toy scale: a knee bundle, then ankle and shoulder classifiers on
the knee classifier's frozen backbones, each evaluated on its joint's held-out site."""
from __future__ import annotations

from pathlib import Path

from training.demo import demo_model_paths, run_demo


def test_the_demo_trains_a_model_per_joint_the_transfers_on_the_knee_backbones(tmp_path: Path) -> None:
    from inference.checkpoint import ModelBundle
    from inference.labels import label_keys
    from inference.model_set import ModelSet

    out = tmp_path / "models" / "demo-knee.pt"
    paths = demo_model_paths(out)
    assert paths == {"knee": out, "ankle": out.with_name("demo-ankle.pt"), "shoulder": out.with_name("demo-shoulder.pt")}
    summary = run_demo(out=out, work=tmp_path / "work", config="tiny", progress=False, train_cases=4,
                       held_out_cases=3, matrix=32, workers=1, transfer_cases=4)
    assert all(path.is_file() for path in paths.values())
    bundles = {joint: ModelBundle.load(path) for joint, path in paths.items()}
    for joint, bundle in bundles.items():
        assert bundle.card.joint == joint and bundle.card.labels == list(label_keys(joint))
        held = bundle.card.metrics["held_out_site"]
        assert held["exams"] == 3 and set(held["labels"]) == set(label_keys(joint))
    assert bundles["ankle"].segmenter is None and bundles["shoulder"].segmenter is None
    # frozen transfer: the three classifiers hold one set of backbone weights
    knee_prints = {k: v for k, v in bundles["knee"].card.backbones.items() if k.startswith("classifier.")}
    assert bundles["ankle"].card.backbones == knee_prints == bundles["shoulder"].card.backbones
    assert len(ModelSet.load(paths).shared) == 6
    assert "knee classifier" in str(bundles["ankle"].card.training_data)
    text = summary.text()
    assert "demo ankle model written to" in text and "demo shoulder model written to" in text
