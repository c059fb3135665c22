"""Where every dataset and state file lives under the data root: one object says it.

Kedro's data catalog and dagster's IO managers are the model: flows, tasks, status and
the CLI ask a :class:`DataLayout` for a path; no other module joins path strings under the
data root. A dataset's own adapter owns what is *inside* its folder (the model registry
inside ``models/``, the feature cache's namespaces inside ``features/``), because that
inner structure is part of how the adapter keeps its guarantees.

    <data_root>/
      features/<namespace>/              model-ready arrays, content-hash cache (tasks.features)
      scores/run_date=YYYY-MM-DD/        published scores, one partition per build date
      rejects/run_date=YYYY-MM-DD/       published rejects
      labels/gold.parquet                gold labels carried by the sources
      labels/annotations.parquet         labels resolved from Label Studio annotations
      labels/reviews.parquet             labels set by a review of a suspected error (win over the others)
      labels/flags.parquet               open flags: suspected label errors, held out of training
      annotators/part-p<project>-<mark>-<key>.parquet   per sync: each annotator's estimated accuracy,
                                         per-class recall, task count (add-only)
      models/<version>/, models/PRODUCTION   the registry (model.registry)
      reports/<version>/                 confusion matrices, learning curves
      runs/<run_id>/                     one build's scratch: manifest chunks, records, scores, selection
      state/labelstudio/                 local server, credentials (0600), push ledger, pending, watermark,
                                         review ledger and watermark (suspected label errors sent for review),
                                         annotators (0600), overlap_raises (extra annotators asked),
                                         media/ (the only folder Label Studio serves),
                                         ml_backend.json / .log, ml_backend_auth.json (0600)
      state/prefect/                     PREFECT_HOME of the local Prefect API the CLI starts
      state/retrain.json                 labels counted at the last retrain
      state/groups.parquet               record_id -> speaker, for the speaker-grouped holdout
      state/holdout.json                 groups pinned to the frozen holdout
      state/stopping_signal.json         active-learning stopping signal history
      .staging/                          partitions being written (swapped in whole)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """One build's scratch folder: what tasks hand each other as Parquet files."""

    root: Path

    @property
    def manifest_chunks(self) -> Path:
        return self.root / "manifest"

    @property
    def records(self) -> Path:
        return self.root / "records"

    def records_part(self, number: str) -> Path:
        return self.records / f"part-{number}.parquet"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects"

    def rejects_part(self, stage: str, name: str) -> Path:
        """One task's rejects (``stage``: ingest | preprocess), published together at the end of the run."""
        return self.rejects / f"{stage}-{name}.parquet"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    def scores_part(self, index: int) -> Path:
        return self.scores / f"part-{index:05d}.parquet"

    @property
    def selection(self) -> Path:
        return self.root / "selection.parquet"

    def shortlist(self, index: int) -> Path:
        return self.root / "shortlists" / f"part-{index:05d}.parquet"

    def records_parts(self) -> list[Path]:
        return sorted(self.records.glob("part-*.parquet"))

    def scores_parts(self) -> list[Path]:
        return sorted(self.scores.glob("part-*.parquet"))


@dataclass(frozen=True)
class LabelStudioLayout:
    """State of the Label Studio integration (owner-only: it holds credentials)."""

    root: Path

    @property
    def media_root(self) -> Path:
        """The local server's local-files document root: only validated media of pushed records.

        Filled at push time (one ``affectloop-project-<id>/`` folder per project, files named
        by content hash); nothing else ever lives here, so Label Studio can serve nothing else.
        """
        return self.root / "media"

    @property
    def annotators(self) -> Path:
        """Annotator accounts this project created (email, user id, password): 0600."""
        return self.root / "annotators.json"

    @property
    def server_data(self) -> Path:
        """Label Studio's own data folder (its SQLite database, uploads)."""
        return self.root / "server"

    @property
    def server_record(self) -> Path:
        return self.root / "server.json"

    @property
    def server_log(self) -> Path:
        return self.root / "server.log"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def ledger(self) -> Path:
        """Every record sent to Label Studio, with its task id (exactly-once push)."""
        return self.root / "ledger.parquet"

    @property
    def pending(self) -> Path:
        """Selected records not yet pushed (Label Studio was unreachable)."""
        return self.root / "pending.parquet"

    @property
    def review_ledger(self) -> Path:
        """Every suspected label error sent for review, with its task id: once per (record, label, flagged_at)."""
        return self.root / "review_ledger.parquet"

    @property
    def review_watermark(self) -> Path:
        """How far review sync has read the review project's annotations (its own file: the
        annotation sync may run at the same time, and each rewrites its watermark whole)."""
        return self.root / "review_watermark.json"

    @property
    def push_lock(self) -> Path:
        return self.root / "push.lock"

    @property
    def watermark(self) -> Path:
        return self.root / "watermark.json"

    @property
    def overlap_raises(self) -> Path:
        """Tasks whose overlap sync raised for one more annotator (once per task and reason)."""
        return self.root / "overlap_raises.parquet"

    @property
    def ml_backend_record(self) -> Path:
        """The local ML backend process (pid, port, url)."""
        return self.root / "ml_backend.json"

    @property
    def ml_backend_log(self) -> Path:
        return self.root / "ml_backend.log"

    @property
    def ml_backend_credentials(self) -> Path:
        """The ML backend's HTTP basic-auth user and password (0600)."""
        return self.root / "ml_backend_auth.json"


@dataclass(frozen=True)
class DataLayout:
    """Every path under one data root (see the module docstring for the picture)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def gold_labels(self) -> Path:
        return self.labels / "gold.parquet"

    @property
    def annotation_labels(self) -> Path:
        return self.labels / "annotations.parquet"

    @property
    def label_reviews(self) -> Path:
        """Labels set by reviewing a suspected error in Label Studio (issue #16): they win over gold and annotation."""
        return self.labels / "reviews.parquet"

    @property
    def label_flags(self) -> Path:
        """Open suspected label errors (``core.schemas.LABEL_FLAGS_SCHEMA``): held out of training until reviewed."""
        return self.labels / "flags.parquet"

    @property
    def annotators(self) -> Path:
        """Per-sync annotator estimates (``core.schemas.annotators_schema``): add-only Parquet parts."""
        return self.root / "annotators"

    def annotators_part(self, project_id: int, mark: str, key: str) -> Path:
        """One sync's part: named by the project, the annotation watermark and a hash of the
        annotations it was estimated from, so a rerun of the same sync finds it instead of adding one."""
        return self.annotators / f"part-p{int(project_id)}-{mark}-{key}.parquet"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def model_reports(self, version: str) -> Path:
        return self.reports / version

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run(self, run_id: str) -> RunLayout:
        return RunLayout(self.runs / run_id)

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def labelstudio(self) -> LabelStudioLayout:
        return LabelStudioLayout(self.state / "labelstudio")

    @property
    def prefect_home(self) -> Path:
        return self.state / "prefect"

    @property
    def retrain_state(self) -> Path:
        return self.state / "retrain.json"

    @property
    def group_index(self) -> Path:
        """record_id -> group (speaker) of every record whose source names one; the holdout is drawn by group."""
        return self.state / "groups.parquet"

    @property
    def holdout_state(self) -> Path:
        """Groups pinned to the frozen holdout (when the hash alone would leave it empty)."""
        return self.state / "holdout.json"

    @property
    def stopping_signal(self) -> Path:
        return self.state / "stopping_signal.json"


def date_partition(dataset_dir: str | os.PathLike, run_date: date) -> Path:
    """A Hive-style date partition of a published dataset (``scores/``, ``rejects/``)."""
    return Path(dataset_dir) / f"run_date={run_date.isoformat()}"
