"""``affectloop``: the command line for people who don't live in Prefect's UI.

Every command prints a summary table at the end and exits with a code that means something:

    0  done
    1  the run failed (see the message)
    2  bad usage (unknown option, bad value)
    3  the source is unusable (no manifest, empty, wrong format, missing record_id column)
    4  Label Studio refused the credentials or cannot be started
    5  the model registry is broken (corrupt model file, missing version)
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Iterator, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from core.quiet import apply as quiet_logs
from core.settings import Settings, get_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SOURCE, EXIT_LABEL_STUDIO, EXIT_MODEL = 0, 1, 2, 3, 4, 5

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
labelstudio_app = typer.Typer(help="Run the local Label Studio (installed by make into .venv-labelstudio).",
                              no_args_is_help=True)
app.add_typer(labelstudio_app, name="labelstudio")
ml_backend_app = typer.Typer(help="The Label Studio ML backend serving the PRODUCTION model (127.0.0.1, basic auth). "
                                  "Without a subcommand it serves in the foreground (for any process manager); "
                                  "it never starts a Prefect API.", invoke_without_command=True)
app.add_typer(ml_backend_app, name="ml-backend")
console = Console()
err = Console(stderr=True)


@app.callback()
def _quiet() -> None:
    """Quiet TensorFlow, Prefect and Dask before any command imports them."""
    quiet_logs()


DataRoot = typer.Option(None, "--data-root", help="data root (default ./data, or AFFECTLOOP_DATA_ROOT)")
Source = typer.Option(None, "--source", help="raw source folder with a manifest (or AFFECTLOOP_SOURCE)")


def _settings(builds: bool = False, **overrides) -> Settings:
    """Settings for a command; a value it cannot run with is a usage error (exit 2), before any work.
    ``builds``: the command runs a nightly build, so its selection strategy must be runnable."""
    try:
        settings = get_settings(**overrides)
        if builds:
            from tasks.select import check_strategy

            check_strategy(settings.selection_strategy)
    except (ValueError, ValidationError) as exc:
        err.print(f"[red]bad setting:[/] {_one_line(exc)}")
        raise typer.Exit(EXIT_USAGE)
    return settings


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return str(exc)


@contextmanager
def _exit_codes() -> Iterator[None]:
    """Map the errors a user can act on to exit codes and one clear line each."""
    from rich.markup import escape

    from tasks.ingest import ManifestError

    try:
        yield
    except ManifestError as exc:
        err.print(f"[red]source unusable:[/] {escape(str(exc))}", soft_wrap=True)  # one line; file text is not markup
        raise typer.Exit(EXIT_SOURCE)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001  (classified below, everything else is exit 1)
        from model.registry import ModelLoadError
        from tasks.labelstudio.server import LabelStudioError

        if isinstance(exc, LabelStudioError):
            err.print(f"[red]Label Studio:[/] {exc}")
            raise typer.Exit(EXIT_LABEL_STUDIO)
        if isinstance(exc, ModelLoadError):
            err.print(f"[red]model registry:[/] {exc}")
            raise typer.Exit(EXIT_MODEL)
        err.print(f"[red]failed:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(EXIT_FAILED)


@contextmanager
def _prefect_after_preflight(settings: Settings) -> Iterator[None]:
    """Check the source first (a bad manifest fails in a second, not after a cluster start)."""
    from tasks.ingest import preflight_source

    preflight_source(settings.source)
    with _prefect(settings):
        yield


@contextmanager
def _prefect(settings: Settings) -> Iterator[None]:
    """A real Prefect API for the run: the configured one, or a local server for its duration."""
    from affectloop.services import prefect_api
    from core.io import ensure_private_dir

    ensure_private_dir(settings.layout.state)  # owner-only: credentials, ledger, the Prefect API's database
    with console.status("starting a local Prefect API…", spinner="dots"):
        cm = prefect_api(settings.layout.prefect_home)
        cm.__enter__()
    try:
        yield
    finally:
        cm.__exit__(*sys.exc_info())


def _with_runner(flow_obj, settings: Settings):  # noqa: ANN001, ANN202 (Prefect Flow in and out)
    from flows.runner import with_runner

    return with_runner(flow_obj, settings)


@app.command()
def demo(out: Path = typer.Option(Path("data/demo-source"), "--out", help="folder to (re)create"),
         n: int = typer.Option(2000, "-n", help="records"), seed: int = typer.Option(0, help="random seed"),
         gold_fraction: float = typer.Option(0.10, help="share of records carrying a gold label"),
         audio_fraction: float = typer.Option(0.67, help="share of records with audio"),
         image_size: int = typer.Option(64, help="side of the drawn face images (pixels)"),
         broken: bool = typer.Option(True, help="include the deliberately broken records"),
         workers: int = typer.Option(1, help="processes (same output for any number)")) -> None:
    """Generate a demo source: drawn faces, synthetic speech, template texts, a few broken records."""
    from affectloop.demo import generate_demo

    with _exit_codes(), console.status(f"generating {n} demo records…"):
        summary = generate_demo(out, n=n, seed=seed, gold_fraction=gold_fraction, audio_fraction=audio_fraction,
                                image_size=image_size, broken=broken, workers=workers)
    table = Table(title=f"demo source → {out}", title_justify="left")
    for column in ("records", "image", "text", "audio", "gold", "broken on purpose"):
        table.add_column(column, justify="right")
    table.add_row(str(summary.n_records), str(summary.n_image), str(summary.n_text), str(summary.n_audio),
                  str(summary.n_gold), str(len(summary.defects)))
    console.print(table)


@app.command()
def build(source: Optional[str] = Source, data_root: Optional[Path] = DataRoot,
          run_date: Optional[str] = typer.Option(None, help="YYYY-MM-DD partition to (re)write; default today (UTC)"),
          budget: Optional[int] = typer.Option(None, help="records to send to annotators"),
          strategy: Optional[str] = typer.Option(None, help="selection strategy (model.selection.STRATEGIES)"),
          push: bool = typer.Option(True, help="push the selection to Label Studio"),
          dask_address: Optional[str] = typer.Option(None, help="existing Dask scheduler, e.g. tcp://host:8786")
          ) -> None:
    """Nightly build: ingest, features (Dask), score, select, write scores/ and rejects/, push."""
    settings = _settings(builds=True, source=source, data_root=data_root, annotation_budget=budget,
                         selection_strategy=strategy, dask_address=dask_address)
    with _exit_codes(), _prefect_after_preflight(settings):
        from flows.nightly_build import nightly_build

        _with_runner(nightly_build, settings)(
            source=settings.source, data_root=str(settings.data_root),
            run_date=date.fromisoformat(run_date) if run_date else None,
            annotation_budget=settings.annotation_budget, selection_strategy=settings.selection_strategy,
            push_to_label_studio=push)


@app.command()
def sync(source: Optional[str] = Source, data_root: Optional[Path] = DataRoot) -> None:
    """Pull finished annotations from Label Studio into labels/ (consensus + agreement)."""
    settings = _settings(source=source, data_root=data_root)
    with _exit_codes(), _prefect(settings):
        from flows.sync import annotation_sync

        annotation_sync(source=settings.source, data_root=str(settings.data_root))


@app.command()
def retrain(data_root: Optional[Path] = DataRoot,
            min_new_labels: int = typer.Option(0, help="skip unless this many labels arrived since the last retrain"),
            epochs: Optional[int] = typer.Option(None, help="maximum epochs (default: the model's own, model.training.DEFAULT_CONFIG)"),
            fusion: Optional[str] = typer.Option(None, help="late | concat | weighted | gated (default: late, model.training.DEFAULT_CONFIG)"),
            margin: Optional[float] = typer.Option(None, help="promotion margin on holdout macro-F1")) -> None:
    """Retrain on gold + annotated labels; promote only if not worse on the frozen holdout."""
    settings = _settings(data_root=data_root)
    with _exit_codes(), _prefect(settings):
        from flows.retrain import retrain_flow

        retrain_flow(data_root=str(settings.data_root), fusion=fusion, epochs=epochs,
                     min_new_labels=min_new_labels, promotion_margin=margin)


@app.command()
def loop(source: Optional[str] = Source, data_root: Optional[Path] = DataRoot,
         demo_mode: bool = typer.Option(False, "--demo", help="generate demo data if missing and simulate annotators"),
         n: int = typer.Option(2000, "-n", help="demo records (with --demo)"),
         rounds: int = typer.Option(2, help="annotate → sync → retrain → rescore rounds"),
         annotators: int = typer.Option(1, help="simulated annotators per task (with --demo)"),
         error_rate: float = typer.Option(0.1, help="simulated annotators' error rate"),
         budget: Optional[int] = typer.Option(None, help="records sent to annotators per build"),
         epochs: Optional[int] = typer.Option(None, help="maximum epochs (default: the model's own)")) -> None:
    """The whole loop once: build, push, annotate (demo), sync, retrain, rescore."""
    settings = _settings(builds=True, source=source, data_root=data_root, annotation_budget=budget)
    with _exit_codes():
        if demo_mode and not (Path(settings.source) / "manifest.jsonl").exists():
            from affectloop.demo import generate_demo

            with console.status(f"generating {n} demo records in {settings.source}…"):
                generate_demo(settings.source, n=n, seed=settings.seed)
        with _prefect_after_preflight(settings):
            from flows.loop import loop as loop_flow

            loop_flow(
                source=settings.source, data_root=str(settings.data_root), rounds=rounds, demo=demo_mode,
                annotators=annotators, error_rate=error_rate, epochs=epochs,
                annotation_budget=settings.annotation_budget)
        _print_labelstudio_hint(settings)


def _print_labelstudio_hint(settings: Settings) -> None:
    from tasks.labelstudio.server import LocalLabelStudio

    if settings.label_studio_url is None:
        server = LocalLabelStudio(settings.data_root, settings.label_studio_port)
        if server.status().get("running"):
            console.print(f"Label Studio is still running at {server.url} for you to annotate "
                          f"(login in {settings.layout.labelstudio.credentials}); "
                          "stop it with [b]affectloop labelstudio stop[/b].")


@labelstudio_app.command("start")
def labelstudio_start(data_root: Optional[Path] = DataRoot, source: Optional[str] = Source) -> None:
    """Start (or reuse) the local Label Studio on 127.0.0.1 and print where it is."""
    from tasks.labelstudio.server import LocalLabelStudio

    settings = _settings(data_root=data_root, source=source)
    with _exit_codes():
        server = LocalLabelStudio(settings.data_root, settings.label_studio_port)
        with console.status("starting Label Studio (first start runs migrations, ~30 s)…"):
            creds = server.start()
        console.print(f"Label Studio at {creds.url}; admin login in {settings.layout.labelstudio.credentials}")


@labelstudio_app.command("stop")
def labelstudio_stop(data_root: Optional[Path] = DataRoot) -> None:
    """Stop the local Label Studio this project started."""
    from tasks.labelstudio.server import LocalLabelStudio

    settings = _settings(data_root=data_root)
    with _exit_codes():
        stopped = LocalLabelStudio(settings.data_root, settings.label_studio_port).stop()
    console.print("stopped" if stopped else "not running")


@labelstudio_app.command("status")
def labelstudio_status(data_root: Optional[Path] = DataRoot) -> None:
    """Is the local Label Studio running, where, with which process id."""
    from tasks.labelstudio.server import LocalLabelStudio

    settings = _settings(data_root=data_root)
    with _exit_codes():
        status = LocalLabelStudio(settings.data_root, settings.label_studio_port).status()
    console.print_json(json.dumps(status, default=str))


@ml_backend_app.callback()
def ml_backend(ctx: typer.Context, data_root: Optional[Path] = DataRoot, source: Optional[str] = Source,
               port: Optional[int] = typer.Option(None, "--port", help="port on 127.0.0.1 (or AFFECTLOOP_ML_BACKEND_PORT; "
                                                                       "default 9090)")) -> None:
    """Serve /health, /setup, /predict and /webhook until stopped (SIGTERM or Ctrl-C)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings(data_root=data_root, source=source)
    with _exit_codes():
        from core.io import ensure_private_dir
        from tasks.labelstudio.ml_backend import Predictor, SyncScheduler, create_app, serve
        from tasks.labelstudio.ml_connect import auth_from_settings
        from tasks.labelstudio.resource import document_root_for, sync_from_labelstudio

        ensure_private_dir(settings.layout.state)
        auth = auth_from_settings(settings)
        predictor = Predictor(settings.layout.models, document_root_for(settings))
        # The webhook's sync: the same code path as `affectloop sync`, without a Prefect API.
        scheduler = SyncScheduler(lambda: sync_from_labelstudio(settings, publish=False, start_local=False),
                                  debounce_s=settings.ml_backend_debounce_s)
        app_ = create_app(predictor, *auth.pair(), scheduler=scheduler)
        import threading

        # Load the model beside the server: /health answers at once, the first predict is not slowed.
        threading.Thread(target=_warm, args=(predictor,), daemon=True).start()
        serve(app_, port or settings.ml_backend_port or 9090)


def _warm(predictor) -> None:  # noqa: ANN001
    try:
        predictor.version()
    except Exception as exc:  # noqa: BLE001 - reported again on the first request that needs the model
        err.print(f"[yellow]model not loaded yet:[/] {type(exc).__name__}: {exc}")


@ml_backend_app.command("start")
def ml_backend_start(data_root: Optional[Path] = DataRoot) -> None:
    """Start (or reuse) the local ML backend in the background, by process id."""
    from tasks.labelstudio.ml_connect import LocalMLBackend

    settings = _settings(data_root=data_root)
    with _exit_codes(), console.status("starting the ML backend…"):
        url = LocalMLBackend(settings.data_root, settings.ml_backend_port).start()
    console.print(f"ML backend at {url}; basic-auth login in {settings.layout.labelstudio.ml_backend_credentials}")


@ml_backend_app.command("stop")
def ml_backend_stop(data_root: Optional[Path] = DataRoot) -> None:
    """Stop the local ML backend this project started."""
    from tasks.labelstudio.ml_connect import LocalMLBackend

    settings = _settings(data_root=data_root)
    with _exit_codes():
        stopped = LocalMLBackend(settings.data_root).stop()
    console.print("stopped" if stopped else "not running")


@ml_backend_app.command("status")
def ml_backend_status(data_root: Optional[Path] = DataRoot) -> None:
    """Is the local ML backend running, where, with which process id."""
    from tasks.labelstudio.ml_connect import LocalMLBackend

    settings = _settings(data_root=data_root)
    with _exit_codes():
        info = LocalMLBackend(settings.data_root).status()
    console.print_json(json.dumps(info, default=str))


@ml_backend_app.command("connect")
def ml_backend_connect(data_root: Optional[Path] = DataRoot, source: Optional[str] = Source,
                       url: Optional[str] = typer.Option(None, "--url", help="where Label Studio reaches the backend "
                                                                             "(or AFFECTLOOP_ML_BACKEND_URL; default: "
                                                                             "the local one, started if needed)")) -> None:
    """Connect the project of your (or the local) Label Studio to the ML backend, idempotently."""
    settings = _settings(data_root=data_root, source=source)
    with _exit_codes():
        from tasks.labelstudio.ml_connect import LocalMLBackend, auth_from_settings, connect_ml_backend
        from tasks.labelstudio.resource import connect, source_root_of

        settings = settings.model_copy(update={"ml_backend": False})  # connected below, to the URL asked for
        session = connect(settings, source_root_of(settings))
        from tasks.labelstudio.ml_connect import settings_env

        target = url or settings.ml_backend_url or \
            LocalMLBackend(settings.data_root, settings.ml_backend_port).start(env=settings_env(settings))
        backend_id = connect_ml_backend(session.client, session.project.project_id, target, auth_from_settings(settings))
    console.print(f"project {session.project.project_id} connected to the ML backend at {target} (id {backend_id})")


@app.command()
def status(data_root: Optional[Path] = DataRoot) -> None:
    """Production model, last runs, labels and pending annotations."""
    settings = _settings(data_root=data_root)
    with _exit_codes():
        from affectloop.status import collect_status

        info = collect_status(settings)
    table = Table(title=f"affectloop status — {settings.data_root}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
