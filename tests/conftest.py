"""Shared pytest fixtures. Keep them generic and cheap; add new ones in their own section.

- ``limits`` / ``labels``: the default Limits and label set.
- ``media``: writes small, real media files (PNG, JPEG, BMP, WebP, GIF, WAV, FLAC, OGG).
- ``write_manifest``: writes rows as a manifest in .jsonl, .csv or .parquet.
- ``demo_source``: one generated demo source for the whole session (read-only: copy it
  before changing anything in it).
- ``realmix_dir``: the real-data folder (../shared/data/realmix, or $AFFECTLOOP_REALMIX);
  tests using it are skipped where it is missing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from core.processes import free_port, stop_process  # noqa: E402
from core.settings import DEFAULT_LABELS, Limits  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
REALMIX_DIR = Path(os.environ.get("AFFECTLOOP_REALMIX", REPO_ROOT.parent / "shared" / "data" / "realmix"))
DEMO_SOURCE_N = 400  # big enough for the demo's learnability check, small enough for the unit tier


# ---------------------------------------------------------------------------------- settings


@pytest.fixture
def limits() -> Limits:
    return Limits()


@pytest.fixture
def labels() -> tuple[str, ...]:
    return DEFAULT_LABELS


# ---------------------------------------------------------------------------------- media files


class MediaFactory:
    """Writers for small, valid media files; every method returns the path it wrote."""

    @staticmethod
    def image_array(width: int = 32, height: int = 32, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)

    def image_bytes(self, fmt: str = "PNG", width: int = 32, height: int = 32, seed: int = 0) -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.image_array(width, height, seed), mode="L").save(buffer, format=fmt)
        return buffer.getvalue()

    def image(self, path: Path, fmt: str | None = None, width: int = 32, height: int = 32, seed: int = 0) -> Path:
        """An image of noise (so it compresses poorly); format from the extension unless given."""
        fmt = fmt or {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP",
                      ".gif": "GIF"}[path.suffix.lower()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.image_bytes(fmt, width, height, seed))
        return path

    @staticmethod
    def tone(seconds: float = 0.5, sample_rate: int = 8000, channels: int = 1, freq: float = 220.0) -> np.ndarray:
        t = np.arange(int(seconds * sample_rate)) / sample_rate
        mono = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        return np.repeat(mono[:, None], channels, axis=1) if channels > 1 else mono

    def audio_bytes(self, fmt: str = "WAV", seconds: float = 0.5, sample_rate: int = 8000, channels: int = 1,
                    subtype: str | None = None, samples: np.ndarray | None = None) -> bytes:
        import soundfile as sf

        data = self.tone(seconds, sample_rate, channels) if samples is None else samples
        buffer = io.BytesIO()
        sf.write(buffer, data, sample_rate, format=fmt, subtype=subtype)
        return buffer.getvalue()

    def audio(self, path: Path, fmt: str | None = None, **kwargs: Any) -> Path:
        """A sine tone; format from the extension unless given. kwargs go to audio_bytes."""
        fmt = fmt or {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}[path.suffix.lower()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.audio_bytes(fmt, **kwargs))
        return path


@pytest.fixture
def media() -> MediaFactory:
    return MediaFactory()


# ---------------------------------------------------------------------------------- manifests


def _write_manifest(folder: Path, rows: Iterable[dict[str, Any] | str], fmt: str = "jsonl") -> Path:
    """Write ``rows`` as ``folder/manifest.<fmt>``. A str row is written verbatim (JSONL only)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    path = folder / f"manifest.{fmt}"
    if fmt == "jsonl":
        lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    elif fmt == "csv":
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(dict.fromkeys(key for row in rows for key in row))  # from_pylist keeps only row 0's keys
        pq.write_table(pa.table({name: [row.get(name) for row in rows] for name in columns}), path)
    else:
        raise ValueError(fmt)
    return path


@pytest.fixture
def write_manifest():
    return _write_manifest


# ---------------------------------------------------------------------------------- data sources


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory) -> Path:
    """A generated demo source (DEMO_SOURCE_N rows, seed 0, with its deliberately broken records)."""
    from affectloop.demo import generate_demo

    out = tmp_path_factory.mktemp("demo") / "source"
    generate_demo(out, n=DEMO_SOURCE_N, seed=0)
    return out


@pytest.fixture(scope="session")
def realmix_dir() -> Path:
    if not (REALMIX_DIR / "manifest.jsonl").is_file():
        pytest.skip(f"real data not available at {REALMIX_DIR}")
    return REALMIX_DIR


# ---------------------------------------------------------------------------------- a real Prefect API


@pytest.fixture(scope="session")
def prefect_api_url():
    """One real Prefect API (``prefect_test_harness``, a temporary server) for the whole test session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
        # Its "stopping temporary server" INFO line would be written after pytest closed the
        # captured streams (a logging traceback at the end of the run).
        logging.getLogger("prefect").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------- a real Dask cluster


def _start_dask(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, DASK_LOGGING__DISTRIBUTED="warning", PYTHONPATH=str(REPO_ROOT))
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "dask", *args], cwd=REPO_ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A real ``dask scheduler`` + two ``dask worker`` processes (each under a nanny) on loopback;
    yields the scheduler address and stops them by process id."""
    from distributed import Client

    scratch = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [_start_dask(["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                     "--no-dashboard"], scratch / "scheduler.log")]
    try:
        for i in range(2):
            procs.append(_start_dask(["worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                                 "--no-dashboard", "--local-directory", str(scratch / f"w{i}")],
                                scratch / f"worker{i}.log"))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            stop_process(proc)
