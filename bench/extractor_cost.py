"""Cost of the feature extractors: milliseconds per record per extractor, and the plain
single-process feature loop's records/s with and without them, on generated demo records.

    python bench/extractor_cost.py [--n 1000]

"without" is the preprocessing the seed model needs (face crop, tokens, log-mel, prosody);
"with" adds the face features (``face_descriptor`` and ``face_geometry``, timed apart),
``text_features`` and ``audio_functionals`` (the audio functionals reuse the log-mel, so they
are timed on their own). One process, one thread.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> dict:
    import numpy as np
    from threadpoolctl import threadpool_limits

    from affectloop.demo import generate_demo
    from core.schemas import FeatureSpec
    from tasks.preprocess import preprocess_audio, preprocess_image, preprocess_text
    from tasks.preprocess.audio import audio_functionals
    from tasks.preprocess.face_mesh import face_geometry
    from tasks.preprocess.image import face_descriptor
    from tasks.preprocess.text import e5_model, text_features

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args(argv)
    spec = FeatureSpec()
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo(tmp, n=args.n, seed=0, broken=False)
        rows = [json.loads(line) for line in (Path(tmp) / "manifest.jsonl").read_text().splitlines()]
        media = [((Path(tmp) / r["image"]).read_bytes() if r.get("image") else None, r.get("text"),
                  (Path(tmp) / r["audio"]).read_bytes() if r.get("audio") else None) for r in rows]
    e5_model()  # loading is once per worker process, not per record
    face_geometry(np.zeros((spec.image_size, spec.image_size), np.float32))  # likewise the face network
    t = {"preprocess": 0.0, "face_descriptor": 0.0, "face_geometry": 0.0, "text_features": 0.0,
         "audio_functionals": 0.0}
    n = {"image": 0, "text": 0, "audio": 0}
    with threadpool_limits(limits=1, user_api="blas"):
        for image, text, audio in media:
            t0 = time.perf_counter()
            img = preprocess_image(image, spec.image_size) if image else None
            if text:
                preprocess_text(text, spec.max_tokens)
            aud = preprocess_audio(audio, spec) if audio else None
            t1 = time.perf_counter()
            t["preprocess"] += t1 - t0
            if img is not None:
                face_descriptor(img.pixels); n["image"] += 1
            t1b = time.perf_counter()
            if img is not None:
                face_geometry(img.pixels)
            t2 = time.perf_counter()
            if text:
                text_features(text); n["text"] += 1
            t3 = time.perf_counter()
            if aud is not None:
                audio_functionals(aud.logmel, spec.n_frames, aud.prosody); n["audio"] += 1
            t4 = time.perf_counter()
            t["face_descriptor"] += t1b - t1
            t["face_geometry"] += t2 - t1b
            t["text_features"] += t3 - t2
            t["audio_functionals"] += t4 - t3
    records = len(media)
    out = {
        "records": records, "with_modality": n,
        "ms_per_record": {"face_descriptor": 1000 * t["face_descriptor"] / max(n["image"], 1),
                          "face_geometry": 1000 * t["face_geometry"] / max(n["image"], 1),
                          "text_features": 1000 * t["text_features"] / max(n["text"], 1),
                          "audio_functionals": 1000 * t["audio_functionals"] / max(n["audio"], 1)},
        "loop_records_per_s_without": records / t["preprocess"],
        "loop_records_per_s_with": records / sum(t.values()),
    }
    out["ms_per_record"] = {k: round(v, 2) for k, v in out["ms_per_record"].items()}
    for k in ("loop_records_per_s_without", "loop_records_per_s_with"):
        out[k] = round(out[k], 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
