"""What every run tells its user: stage timings and counts, outputs, Prefect artifacts,
and a summary table printed at the end."""

from __future__ import annotations

import base64
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table

_MAX_INLINE_IMAGE_BYTES = 400_000


@dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    note: str = ""


@dataclass
class RunReport:
    """Collects what a flow run did; the flow publishes it as artifacts and prints it."""

    title: str
    run_id: str
    stages: list[StageRecord] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)
    _progress_id: Any = None

    @contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        record = StageRecord(name)
        self.stages.append(record)
        start = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds = time.perf_counter() - start
            self._update_progress()

    def progress(self, fraction: float, description: str = "") -> None:
        """A Prefect progress artifact for long stages (no-op outside a flow run)."""
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            value = max(0.0, min(100.0, 100.0 * fraction))
            if self._progress_id is None:
                self._progress_id = create_progress_artifact(value, key=_key(f"{self.title}-progress"),
                                                             description=description or self.title)
            else:
                update_progress_artifact(self._progress_id, value, description=description or None)
        except Exception:  # no flow context (plain function call) or no API: progress is optional
            pass

    def _update_progress(self) -> None:
        if self._progress_id is not None or self.stages:
            planned = self.facts.get("planned_stages")
            if planned:
                self.progress(len(self.stages) / planned, f"{self.stages[-1].name} done")

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def table_rows(self) -> list[dict[str, Any]]:
        return [
            {"stage": s.name, "seconds": round(s.seconds, 2),
             "counts": ", ".join(f"{k}={v}" for k, v in s.counts.items()), "note": s.note}
            for s in self.stages
        ]

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", f"run `{self.run_id}`, {self.total_seconds:.1f} s", ""]
        lines += ["| stage | seconds | counts | note |", "|---|---:|---|---|"]
        for row in self.table_rows():
            lines.append(f"| {row['stage']} | {row['seconds']} | {row['counts']} | {row['note']} |")
        if self.facts:
            lines += ["", "## Facts", ""]
            for key, value in self.facts.items():
                if key != "planned_stages":
                    lines.append(f"- **{key}**: {value}")
        if self.outputs:
            lines += ["", "## Outputs", ""]
            for name, where in self.outputs.items():
                lines.append(f"- {name}: `{where}`")
        return "\n".join(lines) + "\n"

    def publish(self) -> None:
        """Markdown summary, stage table, output links and images as Prefect artifacts."""
        try:
            from prefect.artifacts import (create_image_artifact, create_link_artifact,
                                           create_markdown_artifact, create_table_artifact)
        except Exception:
            return
        try:
            create_markdown_artifact(self.markdown(), key=_key(f"{self.title}-summary"), description=self.title)
            create_table_artifact(self.table_rows(), key=_key(f"{self.title}-stages"),
                                  description="counts and timings per stage")
            for name, where in self.outputs.items():
                create_link_artifact(Path(where).resolve().as_uri() if not str(where).startswith("http") else where,
                                     link_text=name, key=_key(f"{self.title}-{name}"))
            for name, path in self.images.items():
                create_image_artifact(_image_url(path), key=_key(f"{self.title}-{name}"), description=name)
            if self._progress_id is not None:
                self.progress(1.0, "done")
        except Exception as exc:  # artifacts must never fail a run that produced its data
            Console(stderr=True).print(f"[yellow]could not publish Prefect artifacts: {type(exc).__name__}[/]")

    def finish(self) -> None:
        """Publish the artifacts and print the summary: the end of every flow run."""
        self.publish()
        self.print()

    def add_retrain(self, result: Any, models_dir: Path) -> None:
        """A retrain's facts, model folder and plots (``tasks.training.RetrainResult``)."""
        self.facts["candidate"] = result.version
        self.facts["promoted"] = result.promoted
        self.facts["holdout macro-F1"] = f"{result.metrics.get('macro_f1', float('nan')):.3f}"
        if result.production_metrics:
            self.facts["production macro-F1"] = f"{result.production_metrics['macro_f1']:.3f}"
        self.outputs["model"] = str(Path(models_dir) / result.version)
        for name, path in (("confusion matrix", result.confusion_png), ("learning curve", result.learning_curve_png)):
            if path is not None:
                self.images[name] = Path(path)
                self.outputs[name] = str(path)

    def print(self, console: Console | None = None) -> None:
        console = console or Console()
        table = Table(title=f"{self.title} — run {self.run_id}", title_justify="left")
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        table.add_column("counts")
        table.add_column("note")
        for row in self.table_rows():
            table.add_row(row["stage"], f"{row['seconds']:.1f}", row["counts"], row["note"])
        table.add_row("[b]total[/b]", f"[b]{self.total_seconds:.1f}[/b]", "", "")
        console.print(table)
        for key, value in self.facts.items():
            if key != "planned_stages":
                console.print(f"  {key}: {value}")
        for name, where in self.outputs.items():
            console.print(f"  {name} → {where}")


def _key(text: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:100]


def _image_url(path: Path) -> str:
    """A data: URI for small PNGs, so the image shows in Prefect's UI without a file server."""
    data = Path(path).read_bytes()
    if len(data) <= _MAX_INLINE_IMAGE_BYTES:
        return "data:image/png;base64," + base64.b64encode(data).decode()
    return Path(path).resolve().as_uri()


def print_rounds(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """The loop's per-round table: labels used, candidate, promoted, holdout macro-F1, stopping kappa."""
    def fmt(value: float | None) -> str:
        return f"{value:.3f}" if value is not None else "—"

    table = Table(title="macro-F1 on the frozen holdout, per round", title_justify="left")
    for column in ("round", "labels", "model", "promoted", "macro-F1", "production before", "stopping kappa"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["round"]), str(row.get("n_train", "—")), str(row.get("version")),
                      "yes" if row.get("promoted") else "no", fmt(row.get("macro_f1")),
                      fmt(row.get("production_macro_f1")), fmt(row.get("stopping_kappa")))
    (console or Console()).print(table)
