"""ML backend throughput: predictions per second for batches of 1, 8 and 64 tasks against the
running server (``affectloop ml-backend`` on 127.0.0.1, basic auth, real HTTP), beside an
in-process call of the same preprocessing and ``predict`` on the same records.

    python bench/ml_backend.py [--repeats 5] [--n 64]

Demo records (face, text and voice each), their media published into a served folder, the
product's default model trained briefly on the demo source and promoted in a scratch
registry. Each repeat measures the server and the in-process call back to back (paired);
medians over the repeats. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from affectloop.demo import generate_demo  # noqa: E402
from core.schemas import DEFAULT_LABELS  # noqa: E402
from core.settings import get_settings  # noqa: E402
from tasks.labelstudio.media import publish_media, served_url  # noqa: E402
from tasks.labelstudio.ml_backend import Predictor  # noqa: E402
from tasks.labelstudio.ml_connect import LocalMLBackend, auth_from_settings, settings_env  # noqa: E402
from tasks.labelstudio.project import labeling_config  # noqa: E402
from bench.scoring import setup as train_on_demo_source  # noqa: E402
from model.registry import ModelRegistry  # noqa: E402

BATCHES = (1, 8, 64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="affectloop-mlb-bench-"))
    settings = get_settings(data_root=root / "data", source=str(root / "source"))
    n_source = max(args.n * 2, 80)
    generate_demo(root / "source", n=n_source, seed=5, broken=False)
    rows = [json.loads(line) for line in (root / "source" / "manifest.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("image") and r.get("audio") and r.get("text")][: args.n]
    media = settings.layout.labelstudio.media_root / "affectloop-project-1"
    media.mkdir(parents=True, exist_ok=True)
    tasks = []
    for i, r in enumerate(rows):
        data = {"record_id": r["record_id"], "text": r["text"]}
        for role in ("image", "audio"):
            data[role] = served_url(1, publish_media(root / "source", r[role], media))
        tasks.append({"id": i + 1, "data": data})
    # The product's default model, trained briefly on this demo source (bench/scoring.py's set-up): only speed is measured.
    _, models_dir, version = train_on_demo_source(n_source, 1000, root)
    assert models_dir == settings.layout.models
    ModelRegistry(models_dir).promote(version)
    config = labeling_config(DEFAULT_LABELS)
    auth = auth_from_settings(settings)
    backend = LocalMLBackend(settings.data_root)
    url = backend.start(env=settings_env(settings))
    http = requests.Session()
    http.auth = auth.pair()
    local = Predictor(settings.layout.models, settings.layout.labelstudio.media_root)
    version, model = local.model.current()

    def server(batch: list[dict]) -> float:
        start = time.perf_counter()
        response = http.post(f"{url}/predict", json={"tasks": batch, "label_config": config}, timeout=600)
        response.raise_for_status()
        assert len(response.json()["results"]) == len(batch)
        return time.perf_counter() - start

    def in_process(batch: list[dict]) -> float:
        start = time.perf_counter()
        rows_, feats = local.featurize_tasks(batch)
        local.predict_features(rows_, feats, model)
        return time.perf_counter() - start

    try:
        for size in BATCHES:  # warm both: the model's first call, e5's first text
            server(tasks[:size]), in_process(tasks[:size])
        rps: dict[str, float] = {}
        local_rps: dict[str, float] = {}
        ratios: list[float] = []
        print(f"{'batch':>5} {'server tasks/s':>15} {'in-process tasks/s':>19} {'ratio':>6}")
        for size in BATCHES:
            batch = (tasks * ((size // len(tasks)) + 1))[:size]
            s_times, l_times = [], []
            for _ in range(args.repeats):
                s_times.append(server(batch))
                l_times.append(in_process(batch))
            rps[str(size)] = round(size / statistics.median(s_times), 1)
            local_rps[str(size)] = round(size / statistics.median(l_times), 1)
            pair = [lt / st for st, lt in zip(s_times, l_times)]
            if size == 64:
                ratios = pair
            print(f"{size:>5} {rps[str(size)]:>15} {local_rps[str(size)]:>19} {statistics.median(pair):>6.2f}")
    finally:
        backend.stop()
    print(json.dumps({"predict_rps": rps, "in_process_rps": local_rps,
                      "vs_in_process_64": round(statistics.median(ratios), 3) if ratios else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
