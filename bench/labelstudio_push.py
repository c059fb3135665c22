"""Seconds to push 1,000 tasks with predictions to a fresh Label Studio project.

    python bench/labelstudio_push.py [--n 1000] [--batch-size 500] [--data-root DIR] [--port P]

Starts a local Label Studio in a temporary data root (or reuses the one of ``--data-root``),
creates a fresh project (a label set of its own), pushes ``n`` tasks with a prediction each
through ``push_selection`` (server check, bulk import, ledger writes) and times it; then
times a second push of the same selection (everything skipped: the idempotency check), and
a bare SDK import of the same task payloads into another fresh project (the floor no push
can beat). ``--repeats`` pairs (default 5), alternated; medians with the interquartile range.
The last line of output is one JSON object: ``{"push_1000_s": ..., "push_1000_s_iqr": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.labelstudio.client import LabelStudioClient  # noqa: E402
from tasks.labelstudio.project import ensure_project  # noqa: E402
from tasks.labelstudio.push import push_selection, task_payload  # noqa: E402
from core.layout import LabelStudioLayout  # noqa: E402
from core.processes import free_port  # noqa: E402
from tasks.labelstudio.server import LocalLabelStudio  # noqa: E402

BASE_LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")


def selection(n: int, labels: tuple[str, ...], seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(labels)), size=n)
    return pa.table({
        "record_id": [f"bench-{i:06d}" for i in range(n)],
        "text": [f"benchmark utterance number {i}, said with some feeling" for i in range(n)],
        # Push publishes real, validated files (tasks.labelstudio.media): a few shared ones.
        "image": [f"images/{i % 10:02d}.png" for i in range(n)],
        "audio": [f"audio/{i % 10:02d}.wav" if i % 3 else None for i in range(n)],
        "predicted_label": [labels[j] for j in probs.argmax(axis=1)],
        "confidence": probs.max(axis=1),
        "model_version": ["bench-model"] * n,
    })


def write_media(source: Path) -> None:
    """Ten small faces and clips the selection's records share."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    (source / "images").mkdir(parents=True, exist_ok=True)
    (source / "audio").mkdir(parents=True, exist_ok=True)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(source / "images" / f"{i:02d}.png")
        sf.write(source / "audio" / f"{i:02d}.wav", (0.1 * np.sin(np.arange(8000) / (3 + i))).astype(np.float32), 16000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--data-root", type=Path, default=None, help="reuse this data root's local server")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5, help="paired repetitions (push, bare SDK import)")
    args = parser.parse_args(argv)

    temporary = args.data_root is None
    root = Path(tempfile.mkdtemp(prefix="affectloop-lsbench-")) if temporary else args.data_root
    source = root / "bench-source"
    write_media(source)
    server = LocalLabelStudio(root, port=args.port or free_port())
    pushes, floors, reruns, ratios = [], [], [], []
    try:
        t0 = time.perf_counter()
        client = LabelStudioClient(server.start())
        start_s = time.perf_counter() - t0
        # Paired repetitions, the two sides alternated: the product's push (server check, bulk
        # import, ledger), then a bare SDK import of the same task payloads (the floor), each
        # into a fresh project.
        for rep in range(args.repeats):
            labels = (f"anger-{uuid.uuid4().hex[:6]}",) + BASE_LABELS[1:]  # a fresh project every time
            project = ensure_project(client, labels, source, server.document_root)
            table = selection(args.n, labels, seed=rep)
            state_dir = LabelStudioLayout(root / "state" / f"lsbench-{project.project_id}")
            t0 = time.perf_counter()
            first = push_selection(client, project, table, state_dir, batch_size=args.batch_size)
            pushes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            second = push_selection(client, project, table, state_dir, batch_size=args.batch_size)
            reruns.append(time.perf_counter() - t0)
            n_on_server = sum(1 for _ in client.iter_tasks(project.project_id))
            assert first.n_pushed == args.n and second.n_pushed == 0 and n_on_server == args.n, \
                (first, second, n_on_server)
            payloads = [task_payload(row, project) for row in table.to_pylist()]
            # Another fresh project for the floor (the same payloads; Label Studio does not check a
            # prediction's choice against the labeling config on import).
            floor_project = ensure_project(client, (f"anger-{uuid.uuid4().hex[:6]}",) + BASE_LABELS[1:], source,
                                           server.document_root)
            t0 = time.perf_counter()
            for start in range(0, len(payloads), args.batch_size):
                client.sdk.projects.import_tasks(id=floor_project.project_id,
                                                 request=payloads[start:start + args.batch_size],
                                                 return_task_ids=True)
            floors.append(time.perf_counter() - t0)
            ratios.append(pushes[-1] / floors[-1])
            client.delete_project(project.project_id)
            client.delete_project(floor_project.project_id)
    finally:
        if temporary:
            server.stop()
            shutil.rmtree(root, ignore_errors=True)

    def iqr(values: list[float]) -> float:
        if len(values) < 2:
            return 0.0
        q = statistics.quantiles(values, n=4, method="inclusive")
        return q[2] - q[0]

    push_s, floor_s = statistics.median(pushes), statistics.median(floors)
    rows = [
        ("server start (fresh database)" if temporary else "server start (reused)", f"{start_s:8.2f} s"),
        (f"push {args.n} tasks + predictions (batches of {args.batch_size}), median of {len(pushes)}",
         f"{push_s:8.2f} s"),
        ("  each repetition", " ".join(f"{t:.2f}" for t in pushes)),
        (f"bare SDK import of the same {args.n} tasks (the floor), median", f"{floor_s:8.2f} s"),
        ("  each repetition", " ".join(f"{t:.2f}" for t in floors)),
        ("push / bare import, median of pairs", f"{statistics.median(ratios):8.2f}"),
        (f"rerun push (all skipped), median", f"{statistics.median(reruns):8.2f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps({f"push_{args.n}_s": round(push_s, 3), f"push_{args.n}_s_iqr": round(iqr(pushes), 3),
                      f"sdk_import_{args.n}_s": round(floor_s, 3), "push_vs_sdk": round(statistics.median(ratios), 3),
                      "rerun_noop_s": round(statistics.median(reruns), 3), "repeats": len(pushes),
                      "batch_size": args.batch_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
