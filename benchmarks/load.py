"""Load test of ``orthonode serve``: many concurrent senders, thousands of instances, many studies.

``--senders`` threads (pynetdicom, one association per study, data sets sent byte for byte) send
``--studies`` phantom knee studies (three generated knees copied with fresh UIDs, about 80
instances each at matrix 64) to one node that also assembles, processes (the tiny preset with seeded random weights)
and exports the studies to an in-process PACS while the load goes on.  Measured: instances
acknowledged / refused / lost (acknowledged but not in the database), association failures and
timeouts, the time to receive everything and to settle (every study processed and exported),
and the peak resident memory of the node process (VmHWM, sampled every 0.5 s and at the end).

The PACS also answers C-FIND at IMAGE level (Study Root) over what it received, so the node's
``verify_before_resend`` can ask it whether a result whose C-STORE answer was lost arrived
after all.  The report counts what the node did about unknown outcomes (from its log), the
results that were partial (a plane missing), and for every sender association that ended early
whether the node had stored the instance whose answer the sender never got (then the answer was
lost on the sending side, not refused or dropped by the node).

    .venv/bin/python benchmarks/load.py --senders 8 --studies 28 --checkpoint /path/to/model.pt \\
        --out benchmarks/results/load.md
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from crash_consistency import Pacs, Serve, Study, delivery_report, free_port, make_studies, settle, write_report  # noqa: E402


class QueryablePacs(Pacs):
    """The benchmark PACS plus a Study Root C-FIND SCP (IMAGE level) over the objects it holds,
    as Orthanc offers: what the node's verification before a resend asks.

    With ``lose_every`` > 0, every ``lose_every``-th C-STORE is stored and then the association
    is aborted instead of answering: a lost response, made to happen rather than waited for.
    """

    def __init__(self, port: int, lose_every: int = 0) -> None:
        super().__init__(port)
        self.queries = 0
        self.lose_every = lose_every
        self.stores = 0
        self.lost_answers = 0

    def _store(self, event: Any) -> int:
        status = super()._store(event)
        with self._lock:
            self.stores += 1
            lose = self.lose_every > 0 and self.stores % self.lose_every == 0
            if lose:
                self.lost_answers += 1
        if lose:
            event.assoc.abort()
        return status

    def _find(self, event: Any) -> Any:
        identifier = event.identifier
        self.queries += 1
        if identifier.QueryRetrieveLevel != "IMAGE":
            yield 0xA900, None  # only what the node asks is supported
            return
        sop = str(identifier.SOPInstanceUID)
        with self._lock:
            held = any(received_sop == sop for _, _, received_sop in self.received)
        if held:
            match = type(identifier)()
            match.QueryRetrieveLevel = "IMAGE"
            match.StudyInstanceUID = identifier.StudyInstanceUID
            match.SeriesInstanceUID = identifier.SeriesInstanceUID
            match.SOPInstanceUID = sop
            yield 0xFF00, match

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)])


class LoadSender:
    """Sends whole studies, one association each; never retries, so every refusal or failure counts."""

    def __init__(self, port: int, studies: list[Study]) -> None:
        self.port = port
        self.studies = studies
        self.statuses: Counter[int] = Counter()
        self.acknowledged: list[str] = []
        self.association_failures = 0
        self.aborted = 0
        self.incidents: list[str] = []
        #: SOP Instance UID of each file whose C-STORE got no answer (the association then ended)
        self.unanswered: list[str] = []
        self.seconds = 0.0

    def run(self) -> None:
        from pydicom.filereader import read_file_meta_info
        from pynetdicom import AE
        from pynetdicom import _config as pynetdicom_config

        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
        started = time.perf_counter()
        for study in self.studies:
            metas = [read_file_meta_info(f) for f in study.files]
            ae = AE(ae_title="SENDER")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
            for abstract, syntax in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
                ae.add_requested_context(abstract, syntax)
            assoc = ae.associate("127.0.0.1", self.port, ae_title="ORTHONODE")
            if not assoc.is_established:
                self.association_failures += 1
                continue
            try:
                for path, meta in zip(study.files, metas):
                    response = assoc.send_c_store(path)
                    status = response.get("Status") if response is not None else None
                    if status is None:  # DIMSE timeout or the association went away
                        self.aborted += 1
                        self.unanswered.append(str(meta.MediaStorageSOPInstanceUID))
                        self.incidents.append(
                            f"{time.strftime('%H:%M:%S')} study {study.uid}: no response to file {path.name} "
                            f"(established={assoc.is_established}, aborted={assoc.is_aborted}, "
                            f"released={assoc.is_released})")
                        break
                    self.statuses[int(status)] += 1
                    if int(status) == 0:
                        self.acknowledged.append(str(meta.MediaStorageSOPInstanceUID))
            finally:
                if assoc.is_established:
                    assoc.release()
        self.seconds = time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--studies", type=int, default=28, help="about 80 instances each")
    parser.add_argument("--quiet", type=float, default=5.0, help="series/study quiet seconds of the node")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--checkpoint", type=Path, default=None, help="model bundle (default: the tiny preset with seeded random weights)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the result to this markdown file")
    parser.add_argument("--lose-every", type=int, default=0,
                        help="the PACS stores every N-th result and aborts instead of answering (0: never)")
    parser.add_argument("--no-verify", action="store_true",
                        help="the node resends without asking the PACS first (verify_before_resend: false)")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="orthonode-load-"))
    work.mkdir(parents=True, exist_ok=True)
    # the senders' pynetdicom warnings and errors (aborts, timeouts) go to a file for diagnosis
    handler = logging.FileHandler(work / "senders.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(levelname)s %(name)s: %(message)s"))
    sender_log = logging.getLogger("pynetdicom")
    sender_log.setLevel(logging.WARNING)
    sender_log.addHandler(handler)
    checkpoint = args.checkpoint
    if checkpoint is None:
        # the node's plumbing is measured, not what the model says: seeded random weights
        from benchmarks.predict import build_bundle

        checkpoint = work / "model.pt"
        build_bundle("tiny").save(checkpoint)
    studies = make_studies(work, args.studies)
    instances = sum(len(s.files) for s in studies)
    pacs = QueryablePacs(free_port(), lose_every=args.lose_every)
    pacs.start()
    serve = Serve(work / "node", checkpoint, pacs.port, quiet=args.quiet)
    if args.no_verify:
        import yaml

        node_yaml = yaml.safe_load(serve.config_path.read_text(encoding="utf-8"))
        node_yaml["export"]["destinations"]["pacs"]["verify_before_resend"] = False
        serve.config_path.write_text(yaml.safe_dump(node_yaml), encoding="utf-8")
    serve.start()
    senders = [LoadSender(serve.port, studies[k :: args.senders]) for k in range(args.senders)]
    threads = [threading.Thread(target=s.run, daemon=True) for s in senders]
    load_before = os.getloadavg()
    started = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        serve.sample_rss()
        time.sleep(0.5)
    received_s = time.monotonic() - started
    settle(serve, studies, args.timeout)
    settled_s = time.monotonic() - started
    peak_mib = serve.sample_rss() / 1024
    serve.terminate()
    pacs.stop()

    acknowledged = [sop for s in senders for sop in s.acknowledged]
    with sqlite3.connect(f"file:{serve.data / 'orthonode.sqlite'}?mode=ro", uri=True) as conn:
        recorded = {row[0] for row in conn.execute("SELECT sop_instance_uid FROM instances")}
        partial = sum(1 for (summary,) in conn.execute("SELECT result_summary FROM jobs WHERE state = 'done'")
                      if summary and json.loads(summary).get("missing_planes"))
    unanswered = [sop for s in senders for sop in s.unanswered]
    node_log = (serve.work / "serve.log").read_text(encoding="utf-8", errors="replace")
    senders_log = (work / "senders.log").read_text(encoding="utf-8", errors="replace")
    statuses = sum((s.statuses for s in senders), Counter())
    report: dict[str, Any] = {
        "senders": args.senders,
        "studies": len(studies),
        "instances sent": instances,
        "acknowledged (0x0000)": statuses.get(0, 0),
        "refused (other statuses)": {f"0x{k:04X}": v for k, v in statuses.items() if k} or 0,
        "lost (acknowledged, not recorded)": len(set(acknowledged) - recorded),
        "association failures": sum(s.association_failures for s in senders),
        "associations aborted or timed out": sum(s.aborted for s in senders),
        "seconds to receive all": round(received_s, 1),
        "instances/s while receiving": round(instances / received_s, 1),
        "seconds until every study processed and exported": round(settled_s, 1),
        "peak RSS of the node (MiB)": round(peak_mib),
        "sender files without an answer that the node had stored": f"{sum(1 for sop in unanswered if sop in recorded)}"
                                                                   f" of {len(unanswered)}",
        "sender side: 'Received unexpected ... service message' (pynetdicom)":
            senders_log.count("Received unexpected"),
        "node: results done jobs report as partial (a plane missing)": partial,
        "node: exports without a C-STORE answer (outcome unknown)": node_log.count("no C-STORE response"),
        "node: found at the PACS by C-FIND, not resent": node_log.count("the last attempt arrived after all"),
        "node: resent after C-FIND said not held": node_log.count("sending it again"),
        "node: resent without an answer to C-FIND (may duplicate)": node_log.count("may now hold it twice"),
        "node: resent without asking (verify_before_resend false)": node_log.count("may be delivered twice"),
        "node: 'Received unexpected ... service message' (pynetdicom)": node_log.count("Received unexpected"),
        "PACS: answers lost on purpose (stored, then aborted)": pacs.lost_answers,
        "PACS: C-FIND queries answered": pacs.queries,
        "load average before / after": f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f}",
    }
    report.update(delivery_report(serve, pacs, studies))
    for sender in senders:
        for incident in sender.incidents:
            print("INCIDENT", incident)
    write_report("load.py", argv, report, args.out)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
