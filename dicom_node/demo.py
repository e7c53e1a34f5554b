"""``orthonode demo`` (what ``make demo`` runs): the whole node on phantom knee, ankle and
shoulder studies with a real PACS.

1. Make sure the demo models exist, one per joint (``orthonode train demo`` builds them if one
   is missing).
2. Start Orthanc (the Debian package) with a generated configuration in the work folder:
   AE ``ORTHANC``, DICOM port 4242 (or a free one), REST on loopback, the node registered as a
   modality and a Lua ``OnStableStudy`` hook that forwards stable MR studies to it.
3. Start the node (``orthonode serve`` in a subprocess) with a node.yaml generated in the work
   folder: one model per joint (``model.checkpoints``), short quiet periods, results sent back
   to that Orthanc, preview PNGs on.
4. Generate phantom studies of each joint and send them to Orthanc with dcmtk's ``storescu``,
   as a scanner would.
5. Wait until every study's results are in Orthanc (a knee: SEGs, one per plane, and the SR;
   an ankle or shoulder: the SR of its template), then read them back through
   Orthanc's REST API and print, per study, the findings of the SR next to the phantom's true
   labels, the objects stored next to the source series, and where the preview PNGs are.

Every process started here is stopped on the way out, also after Ctrl-C or a failure; a
timeout ends the demo with a message that says what was missing and exit code 1.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dicom_node.layout import DataLayout

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path("models/demo-knee.pt")
NODE_AE = "ORTHONODE"
SCANNER_AE = "DEMO-SCANNER"
#: SEGs the node sends per phantom study: one on each plane's series (sagittal, coronal, axial)
SEGS_PER_STUDY = 3


class DemoError(RuntimeError):
    """The demo could not finish; the message says what was missing."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=Path("demo-output"),
                        help="work folder: Orthanc, the node's data, phantoms, logs (default demo-output; "
                             "emptied at the start)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"model bundle; built with `orthonode train demo` if missing (default {DEFAULT_MODEL})")
    parser.add_argument("--cases", type=int, default=1, help="phantom studies to send per joint (default 1)")
    parser.add_argument("--joints", default="knee,ankle,shoulder",
                        help="comma-separated joints to send studies of (default knee,ankle,shoulder)")
    parser.add_argument("--matrix", type=int, default=128, help="phantom in-plane matrix (default 128)")
    parser.add_argument("--seed", type=int, default=2026, help="phantom seed (default 2026: not the training cases)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for all results after sending (default 600)")


# --------------------------------------------------------------------------- helpers


def _port(preferred: int) -> int:
    from dicom_node.orthanc import free_port, port_is_free

    return preferred if port_is_free(preferred) else free_port()


def ensure_models(knee: Path) -> dict[str, Path]:
    """The demo bundles, one per joint (the knee's at ``knee``, the others beside it); trained
    with ``orthonode train demo`` when one is missing."""
    from training.demo import demo_model_paths

    paths = demo_model_paths(knee)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if not missing:
        print("models: " + ", ".join(f"{joint} {path}" for joint, path in paths.items()) + " (exist)")
        return paths
    print(f"models: {', '.join(missing)} missing; training the demo models now (`orthonode train demo`, "
          "minutes)", flush=True)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "demo", "--out", str(knee)])
    if result.returncode != 0 or not all(p.is_file() for p in paths.values()):
        raise DemoError(f"`orthonode train demo --out {knee}` failed with exit code {result.returncode}")
    print(f"models: trained in {time.monotonic() - started:.0f} s")
    return paths


def node_yaml(work: Path, models: dict[str, Path], node_port: int, http_port: int, orthanc_port: int) -> Path:
    """The demo node's configuration: short timers, results back to the demo Orthanc."""
    data = {
        "node": {"name": "orthonode-demo", "data_dir": "./node-data"},
        "listener": {
            "ae_titles": [NODE_AE], "bind_address": "127.0.0.1", "port": node_port,
            "allowed_callers": [{"ae_title": "ORTHANC", "hosts": ["127.0.0.1"]},
                                {"ae_title": "STORESCU", "hosts": ["127.0.0.1"]}],
        },
        "storage": {"min_free_mb": 256},
        "study_assembly": {"series_quiet_seconds": 3, "study_quiet_seconds": 5, "forced_after_seconds": 120},
        "jobs": {"device": "auto", "workers": 1},
        "model": {"checkpoints": {joint: str(path.resolve()) for joint, path in models.items()}},
        "export": {
            "destinations": {
                "pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port},
            },
            "routes": [{"match": {}, "destinations": ["pacs"]}],
            "retry": {"max_attempts": 5, "initial_delay_seconds": 2, "max_delay_seconds": 30},
        },
        "http": {"bind_address": "127.0.0.1", "port": http_port, "enabled": True},
        "logging": {"level": "INFO", "log_phi": False},
    }
    path = work / "node.yaml"
    path.write_text("# generated by orthonode demo\n" + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


class NodeProcess:
    """``orthonode serve`` as a child process with its log in the work folder."""

    def __init__(self, config: Path, log_path: Path, http_port: int) -> None:
        self.config, self.log_path, self.http_port = config, log_path, http_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        from dicom_node.health import answers_healthy

        handle = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config), "--preview"],
                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            handle.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            if answers_healthy(self.http_port):
                return
            time.sleep(0.3)
        raise DemoError(f"the node did not become healthy within {timeout:.0f} s; see {self.log_path}:\n{self.tail()}")

    def check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(f"the node exited with code {self.proc.returncode}; end of {self.log_path}:\n{self.tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@dataclass
class PhantomStudy:
    joint: str
    case_id: str
    folder: Path
    study_instance_uid: str
    truth: dict[str, int]
    site: str
    laterality: str


def make_phantoms(folder: Path, cases: int, seed: int, matrix: int,
                  joints: tuple[str, ...] = ("knee",)) -> list[PhantomStudy]:
    from pydicom import dcmread

    from inference.labels import label_keys
    from training.phantoms.generate import generate_dataset

    started = time.monotonic()
    studies = []
    for joint in joints:
        generate_dataset(folder / joint, joint, cases, seed=seed, matrix=matrix, preview=True)
        keys = label_keys(joint)
        with open(folder / joint / "cases.csv", newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                case_dir = folder / joint / row["case_id"] / "dicom"
                first = next(iter(sorted(case_dir.rglob("*.dcm"))))
                studies.append(PhantomStudy(
                    joint, row["case_id"], case_dir, str(dcmread(first, stop_before_pixels=True).StudyInstanceUID),
                    {key: int(row[key]) for key in keys}, row["site"], row["laterality"],
                ))
    print(f"phantoms: {len(studies)} studies ({', '.join(joints)}; {matrix}x{matrix}) in {folder} "
          f"({time.monotonic() - started:.0f} s)")
    return studies


def send_with_storescu(folder: Path, port: int, called_ae: str = "ORTHANC") -> None:
    if shutil.which("storescu") is None:
        raise DemoError("dcmtk's storescu is not installed (apt-get install dcmtk)")
    result = subprocess.run(
        ["storescu", "-aet", SCANNER_AE, "-aec", called_ae, "-nh", "+sd", "+r", "127.0.0.1", str(port), str(folder)],
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        raise DemoError(f"storescu to {called_ae} on port {port} failed ({result.returncode}): {result.stderr[-1000:]}")


def findings_from_sr(data: bytes) -> list[dict[str, Any]]:
    """Findings of a TID 1500 SR written by the node, in label order.

    Every label is coded in the Qualitative Evaluations container (TID 1500 row 13), with one
    TEXT line per finding, ``<name>: present|absent (probability p, threshold t)``; findings
    placed on the images also carry the probability as a number in their measurement group,
    which is used where present (it is not rounded).
    """
    import re

    from pydicom import dcmread

    from inference.labels import JOINT_LABELS

    ds = dcmread(io.BytesIO(data))
    by_name = {label.name: label.key for labels in JOINT_LABELS.values() for label in labels}
    line = re.compile(r"^(?P<name>.+): (?P<state>present|absent) \(probability (?P<p>[0-9.]+), "
                      r"threshold (?P<t>[0-9.]+)\)$")
    out: list[dict[str, Any]] = []
    exact: dict[str, float] = {}

    def meaning(item: Any) -> str:
        return str(item.ConceptNameCodeSequence[0].CodeMeaning) if "ConceptNameCodeSequence" in item else ""

    def walk(items: Any) -> None:
        for item in items:
            name = meaning(item)
            if name == "Qualitative Evaluations":
                for child in getattr(item, "ContentSequence", []):
                    match = line.match(str(getattr(child, "TextValue", "")))
                    if meaning(child) == "Finding" and match and match["name"] in by_name:
                        out.append({"key": by_name[match["name"]], "name": match["name"],
                                    "probability": float(match["p"]), "threshold": float(match["t"]),
                                    "present": match["state"] == "present"})
            elif name == "Measurement Group":
                finding = probability = None
                for child in getattr(item, "ContentSequence", []):
                    if meaning(child) == "Finding" and "ConceptCodeSequence" in child:
                        finding = str(child.ConceptCodeSequence[0].CodeMeaning)
                    elif meaning(child) == "Probability" and "MeasuredValueSequence" in child:
                        probability = float(child.MeasuredValueSequence[0].NumericValue)
                if finding is not None and probability is not None:
                    exact[finding] = probability
            if "ContentSequence" in item and name != "Qualitative Evaluations":
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    for finding in out:
        finding["probability"] = exact.get(finding["name"], finding["probability"])
    return out


def _short(path: Path) -> str:
    """``path`` relative to the current folder when it lies below it (shorter lines)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def model_judgement(model: Path, decisions: list[tuple[str, bool, bool]], joint: str = "knee") -> str:
    """How good the model is: its AUC per finding on the held-out phantom site (from its card),
    and per finding how the sent studies' decisions matched their truth.

    Most findings are absent in most studies, so one total of agreements would reward a model
    that says "absent" everywhere; the AUC per finding on the held-out set does not.
    """
    from inference.checkpoint import ModelBundle
    from training.demo import held_out_lines

    lines = []
    held = ModelBundle.load(model).card.metrics.get("held_out_site") or {}
    if held:
        auc, dice = held.get("macro_auc"), held.get("mean_dice")
        lines.append(f"the {joint} model on {held.get('exams', '?')} phantoms of the held-out site {held.get('site', '?')} "
                     f"(never seen in training): macro AUC {'n/a' if auc is None else f'{auc:.2f}'}, "
                     f"mean Dice {'n/a' if dice is None else f'{dice:.2f}'}")
        lines += held_out_lines(held, indent="  ")
    if decisions:
        keys = list(dict.fromkeys(k for k, _, _ in decisions))
        parts = []
        for key in keys:
            rows = [(t, p) for k, t, p in decisions if k == key]
            hits = sum(t == p for t, p in rows)
            positives = sum(t for t, _ in rows)
            parts.append(f"{key} {hits}/{len(rows)} ({positives} present)")
        lines.append("these studies, decisions matching the phantom truth per finding: " + ", ".join(parts))
    return "\n".join(lines)


def report_study(orthanc: Any, study: PhantomStudy, results_dir: Path) -> tuple[str, list[tuple[str, bool, bool]]]:
    """Text block for one study, and ``(finding key, truth, node's decision)`` per finding with a truth."""
    series = orthanc.series_of_study(study.study_instance_uid)
    lines = [f"study {study.case_id}  ({study.site}, {'left' if study.laterality == 'L' else 'right'} {study.joint})",
             f"  Study Instance UID {study.study_instance_uid}", "  in Orthanc:"]
    sr_data: bytes | None = None
    def order(s: dict[str, Any]) -> tuple[str, int]:
        tags = s["MainDicomTags"]
        number = str(tags.get("SeriesNumber", "")).strip()
        return tags.get("Modality", ""), int(number) if number.isdigit() else 0

    for s in sorted(series, key=order):
        tags = s["MainDicomTags"]
        lines.append(f"    {tags.get('Modality', '?'):<4} series {tags.get('SeriesNumber', '?'):>5}  "
                     f"{tags.get('SeriesDescription', ''):<32} {len(s['Instances']):>4} object(s)")
        if tags.get("Modality") == "SR" and s["Instances"]:
            sr_data = orthanc.instance_file(s["Instances"][0])
    decisions: list[tuple[str, bool, bool]] = []
    if sr_data is not None:
        lines.append(f"  {'finding':<38} {'phantom truth':<14} node (probability, decision threshold)")
        for f in findings_from_sr(sr_data):
            truth = study.truth.get(f["key"])
            said = "present" if f["present"] else "absent"
            truth_text = "?" if truth is None else ("present" if truth else "absent")
            mark = ""
            if truth is not None:
                decisions.append((f["key"], bool(truth), bool(f["present"])))
                if bool(truth) != f["present"]:
                    mark = "  <- differs"
            odds = f"p {f['probability']:.2f}" + (f", threshold {f['threshold']:.2f}" if "threshold" in f else "")
            lines.append(f"  {f.get('name', f['key']):<38} {truth_text:<14} {said:<8} ({odds}){mark}")
    previews = sorted((results_dir / study.study_instance_uid).glob("job-*/**/*.png"))
    phantom_preview = study.folder.parent / "preview.png"
    if previews:
        folders = sorted({p.parent for p in previews})
        for folder in folders:
            names = ", ".join(p.name for p in previews if p.parent == folder)
            lines.append(f"  node previews: {_short(folder)}/ ({names})")
    if phantom_preview.exists():
        lines.append(f"  phantom preview (ground truth): {_short(phantom_preview)}")
    return "\n".join(lines), decisions


# --------------------------------------------------------------------------- run


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    from dicom_node.orthanc import OrthancError, OrthancServer, orthanc_available, remove_tree

    if args.cases < 1:
        print("orthonode demo: --cases must be at least 1", file=sys.stderr)
        return 2
    if not orthanc_available():
        print("orthonode demo: Orthanc is not installed (/usr/sbin/Orthanc); apt-get install orthanc", file=sys.stderr)
        return 2
    # `make demo` runs with -v; keep third-party debug chatter (fonts, HTTP) out of the demo's output
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "numba", "pylibjpeg", "openjpeg", "libjpeg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work: Path = args.work.resolve()
    if work.exists():
        remove_tree(work)
    work.mkdir(parents=True)
    started = time.monotonic()
    orthanc: OrthancServer | None = None
    node: NodeProcess | None = None
    # SIGTERM (e.g. a CI timeout) and SIGINT take the same way out: through the finally below.
    # SIGINT is set explicitly because a shell starts background jobs with it ignored.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        joints = tuple(j.strip() for j in args.joints.split(",") if j.strip())
        unknown = [j for j in joints if j not in ("knee", "ankle", "shoulder")]
        if unknown or not joints:
            raise DemoError(f"--joints: unknown or no joint(s) {unknown}; joints are knee, ankle, shoulder")
        models = ensure_models(args.model)
        node_port, http_port = _port(11112), _port(8090)
        orthanc = OrthancServer(work / "orthanc", ae_title="ORTHANC", dicom_port=_port(4242),
                                node=(NODE_AE, "127.0.0.1", node_port), stable_age_seconds=5)
        orthanc.start()
        print(f"orthanc: AE ORTHANC on DICOM port {orthanc.dicom_port}, REST {orthanc.http_url} "
              f"(log {orthanc.log_path})")
        config = node_yaml(work, models, node_port, http_port, orthanc.dicom_port)
        node = NodeProcess(config, work / "node.log", http_port)
        node.start()
        print(f"node:    AE {NODE_AE} on DICOM port {node_port}, http://127.0.0.1:{http_port}/healthz and /metrics "
              f"(config {config}, log {node.log_path})")
        studies = make_phantoms(work / "phantoms", args.cases, args.seed, args.matrix, joints)
        for study in studies:
            send_with_storescu(study.folder, orthanc.dicom_port)
        print(f"sent:    {len(studies)} studies to Orthanc with storescu; Orthanc forwards each once it is stable "
              f"(5 s), the node processes it after its quiet period with the model of its joint and sends the "
              f"results back (a knee: SEG + SR; an ankle or shoulder: SR)", flush=True)

        deadline = time.monotonic() + args.timeout
        waiting = {s.study_instance_uid: s for s in studies}
        while waiting:
            node.check_running()
            for uid in list(waiting):
                counts = orthanc.modality_counts(uid)
                segs = SEGS_PER_STUDY if waiting[uid].joint == "knee" else 0
                if counts.get("SEG", 0) >= segs and counts.get("SR", 0) >= 1:
                    done = waiting.pop(uid)
                    print(f"results: {done.case_id}: {'SEGs and SR are' if segs else 'the SR is'} in Orthanc "
                          f"({time.monotonic() - started:.0f} s since start)", flush=True)
            if not waiting:
                break
            if time.monotonic() > deadline:
                missing = ", ".join(f"{s.case_id} ({orthanc.modality_counts(uid)})" for uid, s in waiting.items())
                raise DemoError(f"timed out after {args.timeout:.0f} s waiting for the results of: {missing}; "
                                f"see `orthonode status --config {config}` and the end of "
                                f"{node.log_path}:\n{node.tail()}")
            time.sleep(1.0)

        print()
        decisions: dict[str, list[tuple[str, bool, bool]]] = {joint: [] for joint in joints}
        for study in studies:
            text, said = report_study(orthanc, study, DataLayout(work / "node-data").results)
            print(text + "\n")
            decisions[study.joint] += said
        print(f"all {len(studies)} studies: results returned to Orthanc under their own studies "
              f"({time.monotonic() - started:.0f} s in all).")
        for joint in joints:
            print(model_judgement(models[joint], decisions[joint], joint))
        print("The demo models were trained on synthetic phantoms only: research use, not for clinical use.")
        return 0
    except DemoError as exc:
        print(f"orthonode demo: FAILED: {exc}", file=sys.stderr)
        return 1
    except OrthancError as exc:
        print(f"orthonode demo: FAILED: Orthanc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("orthonode demo: interrupted; stopping the node and Orthanc", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if node is not None:
            node.stop()
        if orthanc is not None:
            orthanc.stop()
