from pathlib import Path

import pytest
import yaml

from dicom_node.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_node_yaml_is_valid_and_matches_documented_defaults():
    cfg = load_config(REPO / "node.yaml")
    assert cfg.listener.ae_titles == ("ORTHONODE",)
    assert (cfg.listener.bind_address, cfg.listener.port) == ("127.0.0.1", 11112)
    pacs = cfg.export.destinations["pacs"]
    assert (pacs.type, pacs.ae_title, pacs.host, pacs.port) == ("dimse", "ORTHANC", "127.0.0.1", 4242)
    assert cfg.export.routes[0].destinations == ("pacs",)
    assert cfg.database_url.startswith("sqlite:///") and cfg.database_url.endswith("orthonode.sqlite")
    assert cfg.checkpoint is None and cfg.checkpoints == {
        joint: (REPO / "models" / f"demo-{joint}.pt").resolve() for joint in ("knee", "ankle", "shoulder")}
    assert cfg.http.bind_address == "127.0.0.1"
    assert cfg.logging.log_phi is False


def test_every_key_of_the_shipped_file_equals_the_code_default():
    """node.yaml documents the defaults: an empty file must configure the same node."""
    shipped = load_config(REPO / "node.yaml")
    empty = parse_config({}, base_dir=REPO)
    assert shipped.model_dump(exclude={"base_dir"}) == empty.model_dump(exclude={"base_dir"})


def _write(tmp_path, data) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_an_error_naming_the_key_and_file(tmp_path):
    path = _write(tmp_path, {"listener": {"prot": 104}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "listener.prot" in str(err.value)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"listener": {"port": 70000}}, "listener.port"),
        ({"listener": {"ae_titles": ["A_TITLE_FAR_TOO_LONG"]}}, "listener.ae_titles"),
        ({"listener": {"accept_sop_classes": ["NotASopClass"]}}, "listener.accept_sop_classes"),
        ({"listener": {"duplicate_policy": "delete"}}, "listener.duplicate_policy"),
        ({"export": {"destinations": {"x": {"type": "dimse", "host": "h"}}}}, "export.destinations.x"),
        ({"export": {"routes": [{"destinations": ["nowhere"]}]}}, "export"),
        ({"study_assembly": {"study_quiet_seconds": 100, "forced_after_seconds": 10}}, "study_assembly"),
        ({"listener": {"tls": {"enabled": True}}}, "listener.tls"),
        ({"export": {"destinations": {"x": {"type": "dimse", "ae_title": "P", "host": "h", "port": 104,
                                           "query": {"ae_title": "Q", "host": "h", "port": 0}}}}},
         "export.destinations.x.query.port"),
    ],
)
def test_invalid_values_name_their_key(tmp_path, data, key):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert key in str(err.value)


_PACS = {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
_WEB = {"type": "stowrs", "url": "http://127.0.0.1:8042/dicom-web"}


def test_verify_before_resend_defaults_on_and_takes_a_query_ae_or_qido_url(tmp_path):
    cfg = load_config(_write(tmp_path, {"export": {"destinations": {
        "pacs": {**_PACS, "query": {"ae_title": "PACS_QR", "host": "10.0.0.2", "port": 4243}},
        "web": {**_WEB, "qido_url": "http://127.0.0.1:8042/qido"},
        "plain": dict(_PACS)}, "routes": [{"destinations": ["pacs"]}]}}))
    pacs, web, plain = (cfg.export.destinations[k] for k in ("pacs", "web", "plain"))
    assert pacs.verify_before_resend and web.verify_before_resend and plain.verify_before_resend
    assert (pacs.query.ae_title, pacs.query.host, pacs.query.port) == ("PACS_QR", "10.0.0.2", 4243)
    assert web.qido_url == "http://127.0.0.1:8042/qido" and plain.query is None


@pytest.mark.parametrize(
    "destination, message",
    [
        ({**_PACS, "qido_url": "http://h/q"}, "qido_url is for stowrs destinations"),
        ({**_WEB, "query": {"ae_title": "Q", "host": "h", "port": 104}}, "query (a C-FIND AE) is for dimse"),
        ({**_PACS, "verify_before_resend": False, "query": {"ae_title": "Q", "host": "h", "port": 104}},
         "query is set but verify_before_resend is false"),
        ({**_WEB, "verify_before_resend": "sometimes"}, "verify_before_resend"),
    ],
)
def test_verification_options_that_cannot_apply_are_errors(tmp_path, destination, message):
    path = _write(tmp_path, {"export": {"destinations": {"x": destination}, "routes": [{"destinations": ["x"]}]}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "export.destinations.x" in str(err.value) and message in str(err.value)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    cfg = load_config(_write(tmp_path, {"node": {"data_dir": "state"}, "model": {"checkpoint": "m/x.pt"}}))
    assert cfg.data_dir == (tmp_path / "state").resolve()
    assert cfg.checkpoint == (tmp_path / "m" / "x.pt").resolve()
    assert cfg.database_url == f"sqlite:///{(tmp_path / 'state' / 'orthonode.sqlite').resolve()}"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listener: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_objects_are_frozen():
    cfg = parse_config({})
    with pytest.raises(Exception):
        cfg.listener.port = 1  # type: ignore[misc]


def test_partial_selection_rules_override_only_the_named_keys(tmp_path):
    from inference.selection import DEFAULT_RULES

    cfg = load_config(_write(tmp_path, {"series_selection": {"sagittal": {"prefer": ["t1"], "min_slices": 12}}}))
    assert cfg.series_selection.sagittal.prefer[0] == "t1"
    assert cfg.series_selection.sagittal.min_slices == 12
    assert cfg.series_selection.sagittal.avoid == DEFAULT_RULES.sagittal.avoid
    assert cfg.series_selection.coronal == DEFAULT_RULES.coronal


def test_bad_selection_regex_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, {"series_selection": {"axial": {"prefer": ["(unclosed"]}}}))
    assert "series_selection.axial" in str(err.value)


def test_check_config_command(tmp_path, capsys):
    from dicom_node.check_config import configure, run
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    # the shipped node.yaml, in a folder without the demo models its relative paths name
    shipped = tmp_path / "shipped" / "node.yaml"
    shipped.parent.mkdir()
    shipped.write_text((REPO / "node.yaml").read_text())
    assert run(parser.parse_args([str(shipped), "--show-rules"])) == 2
    captured = capsys.readouterr()
    assert "ORTHONODE on 127.0.0.1:11112" in captured.out and "series_selection:" in captured.out
    for joint in ("knee", "ankle", "shoulder"):
        assert f"model.checkpoints.{joint}: {shipped.parent / 'models' / f'demo-{joint}.pt'} does not exist" in captured.err
    bad = _write(tmp_path, {"listener": {"port": "x"}})
    assert run(parser.parse_args([str(bad)])) == 2
    assert "listener.port" in capsys.readouterr().err


def test_jobs_torch_threads_must_be_positive(tmp_path) -> None:
    from dicom_node.config import load_config as _load

    path = tmp_path / "node.yaml"
    path.write_text("jobs:\n  torch_threads: 0\n")
    with pytest.raises(Exception, match="torch_threads"):
        _load(path)
    path.write_text("jobs:\n  torch_threads: 2\n  preload_model: false\n")
    jobs = _load(path).jobs
    assert jobs.torch_threads == 2 and jobs.preload_model is False
