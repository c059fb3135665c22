"""Screenshot one pushed task's labeling page, as an annotator sees it (not part of make test).

    python bench/labelstudio_screenshot.py --data-root data [--out data/reports/labelstudio_task.png]

Generates a one-speaker demo source (a drawn face, a synthetic utterance, a sentence) with
``affectloop.demo``, starts (or reuses) the local Label Studio, bootstraps the project,
pushes one task with a model guess, signs an annotator up, and drives headless Chromium
through the DevTools protocol: sets the annotator's session cookie, opens the task's
labeling page, waits until the face, the waveform and the choices have rendered, and saves
a PNG. Needs Debian's ``chromium`` (``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from affectloop.demo import generate_demo  # noqa: E402
from core.settings import get_settings  # noqa: E402
from tasks.labelstudio.annotator import enlist  # noqa: E402
from tasks.labelstudio.client import LabelStudioClient  # noqa: E402
from tasks.labelstudio.project import ensure_project  # noqa: E402
from core.layout import LabelStudioLayout  # noqa: E402
from tasks.labelstudio.push import push_selection, read_ledger  # noqa: E402
from tasks.labelstudio.server import LocalLabelStudio  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0", "--remote-allow-origins=*"]

# Ready when this task's face has loaded, the waveform is drawn, the choices are on the
# page and the labeling editor's Submit button is there (the editor, not only the table).
READY_JS = """((imageName) => {
  const img = [...document.querySelectorAll('img')].find(i => (i.src || '').includes(imageName) && i.naturalWidth > 0);
  // The waveform is decoded when the player knows the clip's length (and no longer says "Loading file").
  const text = document.body.innerText + ' ' + [...document.querySelectorAll('input')].map(i => i.value).join(' ');
  const durations = text.match(/\\d\\d:\\d\\d:\\d\\d:\\d{3}/g) || [];
  const wave = !text.includes('Loading file') && durations.some(d => d !== '00:00:00:000')
    && [...document.querySelectorAll('canvas')].some(c => c.width > 100 && c.height > 20);
  const choices = document.querySelectorAll('input[type=radio], .ant-radio-wrapper, [class*=choice]').length >= 7;
  const editor = [...document.querySelectorAll('button')].some(b => /Submit|Update/.test(b.innerText));
  // The per-modality line (the prediction's read-only TextArea result).
  const modalities = text.includes('face:') && text.includes('voice:');
  return JSON.stringify({img: !!img, wave, choices, editor, modalities});
})"""


class DevTools:
    """The few DevTools protocol calls this script needs, over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        self.ws = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=30)
        self.ids = itertools.count(1)

    def send(self, method: str, **params):
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def start_chromium(profile: Path) -> tuple[subprocess.Popen, str]:
    """Start headless Chromium; return it and its first page's DevTools websocket URL."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1600,1000",
                                "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("chromium did not start its DevTools endpoint")
        time.sleep(0.2)
    port = int(port_file.read_text().split()[0])
    import requests

    for _ in range(50):
        try:
            pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                     if t.get("type") == "page"]
            if pages:
                return process, pages[0]["webSocketDebuggerUrl"]
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit("no page target in chromium")


def prepare_task(data_root: Path, port: int) -> tuple[str, int, int, dict[str, str], dict]:
    """Source, server, project, one pushed task, a logged-in annotator: (url, project, task, cookies, record)."""
    settings = get_settings(data_root=data_root)
    doc_root = data_root.resolve() / "screenshot-source-root"
    source = doc_root / "source"
    if not (source / "manifest.jsonl").exists():
        generate_demo(source, n=12, seed=3, audio_fraction=1.0, image_fraction=1.0, text_fraction=1.0,
                      image_size=192, broken=False)
    rows = [json.loads(line) for line in (source / "manifest.jsonl").read_text().splitlines() if line.strip()]
    record = next((r for r in rows if r.get("true_label") == "joy"), rows[0])

    server = LocalLabelStudio(data_root, port=port)
    creds = server.start()
    client = LabelStudioClient(creds)
    project = ensure_project(client, settings.labels, source, server.document_root)
    state_dir = data_root / "state" / "labelstudio-screenshot"
    selection = [{"record_id": record["record_id"], "text": record["text"], "image": record["image"],
                  "audio": record["audio"], "predicted_label": record["true_label"], "confidence": 0.62,
                  "model_version": "fusion-demo",
                  # What each modality alone says, as the nightly push sends it (model.modality_view).
                  "modalities": "modalities disagree — face: joy 0.71 · voice: anger 0.52 · text: neutral 0.40"}]
    import pyarrow as pa

    push_selection(client, project, pa.Table.from_pylist(selection), LabelStudioLayout(state_dir))
    ledger = read_ledger(LabelStudioLayout(state_dir)).to_pylist()
    task_id = next(r["task_id"] for r in ledger if r["record_id"] == record["record_id"]
                   and r["project_id"] == project.project_id)
    annotator = enlist(client, LabelStudioLayout(state_dir), "screenshot@annotators.affectloop.local",
                       settings.labels, {})
    return creds.url, project.project_id, task_id, annotator.session_cookies(), record


def screenshot(url: str, cookies: dict[str, str], page_url: str, out: Path, image_name: str,
               wait_s: float = 90.0) -> dict:
    profile = Path(tempfile.mkdtemp(prefix="affectloop-chromium-"))
    process, ws_url = start_chromium(profile)
    try:
        tools = DevTools(ws_url)
        tools.send("Network.enable")
        for name, value in cookies.items():
            tools.send("Network.setCookie", name=name, value=value, url=url + "/", httpOnly=name == "sessionid")
        tools.send("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
        tools.send("Page.enable")
        tools.send("Page.navigate", url=page_url)
        deadline = time.monotonic() + wait_s
        state: dict = {}
        while time.monotonic() < deadline:
            raw = tools.evaluate(f"{READY_JS}({json.dumps(image_name)})")
            state = json.loads(raw) if raw else {}
            if state and all(state.values()):
                break
            time.sleep(1.0)
        time.sleep(2.0)  # let the waveform finish drawing and fonts settle
        png = base64.b64decode(tools.send("Page.captureScreenshot", format="png")["data"])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_bytes(png)
        tmp.replace(out)  # atomic: a reader never sees half a PNG
        state["title"] = tools.evaluate("document.title")
        tools.ws.close()
        return state
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--port", type=int, default=None, help="local Label Studio port (settings default)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stop", action="store_true", help="stop the local Label Studio afterwards")
    args = parser.parse_args(argv)
    port = args.port or get_settings().label_studio_port
    url, project_id, task_id, cookies, record = prepare_task(args.data_root, port)
    page_url = f"{url}/projects/{project_id}/data?task={task_id}"
    out = args.out or args.data_root / "reports" / "labelstudio_task.png"
    state = screenshot(url, cookies, page_url, out, image_name=Path(record["image"]).name)
    if args.stop:
        LocalLabelStudio(args.data_root, port=port).stop()
    print(f"task {task_id} of project {project_id}: {page_url}")
    print(f"record {record['record_id']} (true label {record['true_label']}), rendered: {state}")
    rendered = {k: v for k, v in state.items() if k != "title"}
    print(json.dumps({"screenshot": str(out), "task_id": task_id, "project_id": project_id, "rendered": rendered}))
    return 0 if rendered and all(rendered.values()) else 1  # saved either way, for a look at what went wrong


if __name__ == "__main__":
    sys.exit(main())
