"""``make viewer-check``: the node's DICOM SEG and SR shown in the OHIF viewer, in a real browser.

Steps, all on loopback:

1. the prebuilt OHIF viewer (``@ohif/app``, version and sha512 pinned in ``package.json`` under
   ``ohifApp``) is fetched with ``npm pack`` and its ``dist/`` unpacked into ``.ohif/`` (once);
   ``puppeteer-core`` is installed with ``npm ci`` (once; no browser download);
2. a phantom knee study and the node's SEG and SR of it are written (:mod:`make_outputs`);
3. Orthanc (Debian package, DICOMweb plug-in) starts with a temporary configuration and
   storage, HTTP for local clients only and its DICOM server off, and gets the source images,
   the SEG and the SR through its REST API (``POST /instances``);
4. a small proxy serves OHIF's ``dist/`` (with this folder's ``app-config.js`` and SPA fallback
   to ``index.html``) and forwards ``/dicom-web`` to Orthanc, from one origin: no CORS;
5. ``check.mjs`` drives headless Chromium (``/usr/bin/chromium``, software WebGL) through
   OHIF and asserts what it shows (see that file); any console error fails the check.

Screenshots, the browser's console, the proxy's request log and Orthanc's log are written to
the artefacts folder (``--artifacts``, else ``$VIEWER_ARTIFACTS``, else ``viewer-artifacts/``).
``--serve`` stops after step 4 and keeps the servers up, to look at the study in a browser.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import http.server
import json
import mimetypes
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from dicom_node.orthanc import OrthancServer  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
#: the whole browser part (about 75 s on 2 cores; software WebGL can be much slower on a busy machine)
BROWSER_TIMEOUT_S = int(os.environ.get("VIEWER_BROWSER_TIMEOUT", "300"))
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length",
}


def log(message: str) -> None:
    print(f"[viewer-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- tools


def npm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PUPPETEER_SKIP_DOWNLOAD": "1", "npm_config_audit": "false", "npm_config_fund": "false",
                "npm_config_update_notifier": "false"})
    return env


def ensure_ohif() -> Path:
    """The ``dist/`` folder of the pinned ``@ohif/app``, fetched and checked once."""
    pin = json.loads((HERE / "package.json").read_text(encoding="utf-8"))["ohifApp"]
    target = HERE / ".ohif" / pin["version"]
    dist = target / "dist"
    if (dist / "index.html").is_file() and (target / "integrity").read_text().strip() == pin["integrity"]:
        return dist
    log(f"fetching {pin['package']}@{pin['version']} with npm pack")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", f"{pin['package']}@{pin['version']}", "--pack-destination", tmp, "--silent"],
            check=True, cwd=tmp, env=npm_env(), stdout=subprocess.DEVNULL,
        )
        (tarball,) = Path(tmp).glob("*.tgz")
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        if digest != pin["integrity"]:
            raise SystemExit(f"{tarball.name}: integrity {digest} is not the pinned {pin['integrity']}")
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        with tarfile.open(tarball) as tar:
            # plain files and folders under package/dist/ only, never outside the target
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/") and (m.isfile() or m.isdir())
                       and ".." not in Path(m.name).parts]
            for member in members:
                member.name = member.name[len("package/"):]
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12
                tar.extractall(target, members=members, filter="data")
            else:
                tar.extractall(target, members=members)
    (target / "integrity").write_text(pin["integrity"] + "\n")
    return dist


def ensure_node_modules() -> None:
    """``npm ci`` when ``node_modules`` is missing or older than the lock file."""
    stamp = HERE / "node_modules" / ".package-lock.json"
    lock = HERE / "package-lock.json"
    if stamp.is_file() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return
    log("npm ci (puppeteer-core, no browser download)")
    subprocess.run(["npm", "ci", "--ignore-scripts", "--silent"], check=True, cwd=HERE, env=npm_env())


# --------------------------------------------------------------------------- Orthanc


class LoopbackOrthanc(OrthancServer):
    """The project's throw-away Orthanc without its DICOM listener: only HTTP, for local clients.

    (Orthanc has no setting for the address it binds to; ``RemoteAccessAllowed: false`` makes
    its HTTP server refuse every client that is not on this machine.)
    """

    def write_config(self) -> Path:
        path = super().write_config()
        config = json.loads(path.read_text(encoding="utf-8"))
        config.update({"Name": "orthonode-viewer-check", "DicomServerEnabled": False})
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return path


def upload(orthanc: OrthancServer, files: list[Path]) -> None:
    for path in files:
        answer = orthanc.upload(path)
        if not isinstance(answer, dict) or answer.get("Status") not in ("Success", "AlreadyStored"):
            raise SystemExit(f"Orthanc did not store {path}: {answer}")


# --------------------------------------------------------------------------- the proxy


def fix_query(query: str) -> str:
    """``includefield=a%2Cb`` -> ``includefield=a,b``: Orthanc's DICOMweb plug-in 1.7 does not
    decode the comma OHIF encodes, and then ignores the whole list."""
    parts = []
    for part in query.split("&") if query else []:
        key, sep, value = part.partition("=")
        if unquote(key).lower() == "includefield":
            value = value.replace("%2C", ",").replace("%2c", ",")
        parts.append(key + sep + value)
    return "&".join(parts)


def make_proxy(dist: Path, app_config: Path, orthanc_port: int, access_log: Path) -> http.server.ThreadingHTTPServer:
    """One origin for OHIF's static files and Orthanc's ``/dicom-web``."""
    dist = dist.resolve()
    log_lock = threading.Lock()
    log_file = open(access_log, "a", encoding="utf-8")  # closed with the server (see stop_proxy)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "viewer-check-proxy"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
            with log_lock:
                if not log_file.closed:  # a request still in flight while the check ends
                    log_file.write(f"{time.strftime('%H:%M:%S')} {format % args}\n")
                    log_file.flush()

        def do_GET(self) -> None:
            self.handle_any()

        do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

        def handle_any(self) -> None:
            path = urlsplit(self.path).path
            if path == "/dicom-web" or path.startswith("/dicom-web/"):
                self.forward()
            elif self.command in ("GET", "HEAD"):
                self.static(unquote(path))
            else:
                self.reply(405, b"method not allowed", "text/plain")

        def reply(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            # what OHIF's own deployments send: SharedArrayBuffer for cornerstone's volumes
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cache-Control", "no-cache")
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def static(self, path: str) -> None:
            if path == "/app-config.js":
                file = app_config
            else:
                file = (dist / path.lstrip("/")).resolve()
                if not file.is_relative_to(dist):
                    self.reply(404, b"not found", "text/plain")
                    return
            if not file.is_file():
                wants_page = "." not in path.rsplit("/", 1)[-1] or "text/html" in self.headers.get("Accept", "")
                if not wants_page:
                    self.reply(404, b"not found", "text/plain")
                    return
                file = dist / "index.html"  # SPA fallback: /viewer, /segmentation, ...
            kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            if file.suffix == ".wasm":
                kind = "application/wasm"
            elif file.suffix in (".js", ".mjs"):
                kind = "application/javascript"
            self.reply(200, file.read_bytes(), kind)

        def forward(self) -> None:
            split = urlsplit(self.path)
            target = split.path + ("?" + fix_query(split.query) if split.query else "")
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            # Host is kept: Orthanc writes it into BulkDataURIs, which must point back here
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            connection = http.client.HTTPConnection("127.0.0.1", orthanc_port, timeout=120)
            try:
                connection.request(self.command, target, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except OSError as exc:
                self.reply(502, f"Orthanc: {exc}".encode(), "text/plain")
                return
            finally:
                connection.close()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.log_file = log_file  # type: ignore[attr-defined]
    return server


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description="show the node's SEG and SR in OHIF (headless Chromium) and check them")
    parser.add_argument("--artifacts", type=Path, default=Path(os.environ.get("VIEWER_ARTIFACTS", "viewer-artifacts")))
    parser.add_argument("--matrix", type=int, default=128, help="phantom in-plane matrix (default 128)")
    parser.add_argument("--serve", action="store_true", help="only start Orthanc and the proxy, print the URL, wait")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    args = parser.parse_args()

    started = time.monotonic()
    # a terminated check still stops Orthanc and removes its work folder (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    artifacts = args.artifacts.resolve()
    if artifacts.exists():
        shutil.rmtree(artifacts)
    artifacts.mkdir(parents=True)
    if not Path(CHROMIUM).is_file() and not args.serve:
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install chromium (scripts/ensure-system-deps)")
    dist = ensure_ohif()
    ensure_node_modules()

    work = Path(tempfile.mkdtemp(prefix="viewer-check-"))
    orthanc = LoopbackOrthanc(work / "orthanc")
    proxy = None
    try:
        from make_outputs import build

        log(f"phantom knee (matrix {args.matrix}) and the node's SEG and SR")
        expected = build(work / "outputs", args.matrix, seed=5)
        log("starting Orthanc (loopback HTTP, DICOMweb plug-in)")
        orthanc.start()
        files = [Path(p) for p in expected["sources"]] + [work / "outputs" / "seg.dcm", work / "outputs" / "sr.dcm"]
        upload(orthanc, files)
        log(f"stored {len(files)} instances: {orthanc.modality_counts(expected['study_instance_uid'])}")
        proxy = make_proxy(dist, HERE / "app-config.js", orthanc.http_port, artifacts / "proxy-requests.log")
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        log(f"OHIF at {url}/viewer?StudyInstanceUIDs={expected['study_instance_uid']}")
        if args.serve:
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0
        env = dict(os.environ, VIEWER_URL=url, VIEWER_EXPECTED=str(work / "outputs" / "expected.json"),
                   VIEWER_ARTIFACTS=str(artifacts), CHROMIUM=CHROMIUM)
        log("browser check (headless Chromium, software WebGL: slow on few cores)")
        # its own process group: on a timeout node and the Chromium it started go together
        browser = subprocess.Popen(["node", str(HERE / "check.mjs")], env=env, cwd=HERE, start_new_session=True)
        try:
            code = browser.wait(timeout=BROWSER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log(f"FAILED: the browser check did not finish within {BROWSER_TIMEOUT_S} s")
            # SIGTERM first: puppeteer then closes the Chromium it started (in a process group of its own)
            os.killpg(browser.pid, signal.SIGTERM)
            try:
                browser.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.wait()
            code = 1
    finally:
        if proxy is not None:
            proxy.shutdown()
            proxy.server_close()
            proxy.log_file.close()  # type: ignore[attr-defined]
        orthanc.stop()
        if orthanc.log_path.is_file():
            shutil.copy(orthanc.log_path, artifacts / "orthanc.log")
        if args.keep:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"{'passed' if code == 0 else 'FAILED'} in {time.monotonic() - started:.0f} s; artefacts in {artifacts}")
    return code


if __name__ == "__main__":
    sys.exit(main())
