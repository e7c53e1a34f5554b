"""Report templates and structure descriptions: loading, validation, error messages."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from inference.labels import JOINT_LABELS, JOINTS, KNEE_STRUCTURES, label_keys
from sr_templates import (
    TEMPLATE_DIR,
    TemplateError,
    load_structure_set,
    load_structures,
    load_template,
    load_template_file,
)


def _write_variant(tmp_path: Path, source: str, edit) -> Path:
    data = yaml.safe_load((TEMPLATE_DIR / source).read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / source
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("joint", JOINTS)
def test_packaged_templates_cover_every_label(joint):
    template = load_template(joint)
    assert template.joint == joint
    assert [label.key for label in template.labels] == list(label_keys(joint))
    assert [label.name for label in template.labels] == [label.name for label in JOINT_LABELS[joint]]
    assert template.coding_scheme.designator.startswith("99")
    for label in template.labels:
        assert label.concept.code().scheme_designator in {"SCT", "DCM", template.coding_scheme.designator}


def test_standard_codes_where_they_exist():
    knee = load_template("knee")
    effusion = knee.label("effusion")
    assert (effusion.concept.scheme, effusion.concept.value) == ("SCT", "41699000")
    assert (knee.finding_site.scheme, knee.finding_site.value) == ("SCT", "49076000")
    assert knee.label("mm").finding_site.modifier.value == "255561001"
    with pytest.raises(KeyError, match="no label 'xyz'"):
        knee.label("xyz")


def test_structures_follow_the_label_table():
    structures = load_structures()
    assert [(s.index, s.key) for s in structures] == [(s.index, s.key) for s in KNEE_STRUCTURES]
    codes = {s.key: (s.type.scheme, s.type.value) for s in structures}
    assert codes["femur"] == ("SCT", "71341001")
    assert codes["tibia"] == ("SCT", "12611008")
    assert codes["fibula"] == ("SCT", "87342007")
    assert codes["patella"] == ("SCT", "64234005")
    assert codes["acl"][0] == codes["pcl"][0] == load_structure_set().coding_scheme.designator


def test_missing_label_names_key_and_file(tmp_path):
    path = _write_variant(
        tmp_path, "knee.yaml", lambda d: d.__setitem__("labels", [x for x in d["labels"] if x["key"] != "acl"])
    )
    with pytest.raises(TemplateError) as err:
        load_template_file(path)
    assert str(path) in str(err.value)
    assert "'acl'" in str(err.value)


def test_unknown_label_is_rejected(tmp_path):
    def add(data):
        extra = dict(data["labels"][0], key="meniscal_cyst")
        data["labels"].append(extra)

    with pytest.raises(TemplateError, match="'meniscal_cyst' are not labels of joint 'knee'"):
        load_template_file(_write_variant(tmp_path, "knee.yaml", add))


def test_invented_snomed_code_is_rejected(tmp_path):
    def invent(data):
        for label in data["labels"]:
            if label["key"] == "acl":
                label["concept"] = {"scheme": "SCT", "value": "123456789", "meaning": "Anterior cruciate ligament tear"}

    path = _write_variant(tmp_path, "knee.yaml", invent)
    with pytest.raises(TemplateError, match=r"label 'acl' concept: SCT code '123456789'.*not in the DICOM PS3.16"):
        load_template_file(path)


def test_wrong_meaning_and_undeclared_scheme(tmp_path):
    def wrong_meaning(data):
        data["finding_site"] = {"scheme": "SCT", "value": "49076000", "meaning": "Elbow joint"}

    with pytest.raises(TemplateError, match="finding_site: SCT code '49076000' means"):
        load_template_file(_write_variant(tmp_path, "ankle.yaml", wrong_meaning))

    def other_scheme(data):
        data["labels"][0]["concept"]["scheme"] = "99OTHER"

    with pytest.raises(TemplateError, match="label 'ssp' concept: coding scheme '99OTHER'"):
        load_template_file(_write_variant(tmp_path, "shoulder.yaml", other_scheme))


def test_schema_errors_name_the_label(tmp_path):
    def drop_wording(data):
        del data["labels"][2]["impression_present"]

    with pytest.raises(TemplateError, match=r"labels\[mm\]\.impression_present: Field required"):
        load_template_file(_write_variant(tmp_path, "knee.yaml", drop_wording))

    def bad_designator(data):
        data["coding_scheme"]["designator"] = "ORTHO"

    with pytest.raises(TemplateError, match="coding_scheme.designator"):
        load_template_file(_write_variant(tmp_path, "knee.yaml", bad_designator))


def test_missing_structure_names_key_and_file(tmp_path):
    path = _write_variant(tmp_path, "structures.yaml", lambda d: d["structures"].pop("lateral_meniscus"))
    with pytest.raises(TemplateError) as err:
        load_structure_set(path)
    assert str(path) in str(err.value) and "'lateral_meniscus'" in str(err.value)


def test_unreadable_template(tmp_path):
    path = tmp_path / "knee.yaml"
    path.write_text("joint: knee\nlabels: [unclosed\n", encoding="utf-8")
    with pytest.raises(TemplateError, match="not valid YAML"):
        load_template_file(path)
    with pytest.raises(TemplateError, match="cannot read"):
        load_template_file(tmp_path / "absent.yaml")
    with pytest.raises(ValueError, match="joint must be one of"):
        load_template("elbow")


def test_display_names_are_not_duplicated_in_yaml(tmp_path):
    def add_name(data):
        data["labels"][0]["name"] = "ACL tear"

    with pytest.raises(TemplateError, match=r"labels\[atfl\]\.name: display names come from inference.labels"):
        load_template_file(_write_variant(tmp_path, "ankle.yaml", add_name))
