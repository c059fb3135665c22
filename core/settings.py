"""One typed settings object for the whole project.

Every field can be set from the environment with the ``AFFECTLOOP_`` prefix, e.g.
``AFFECTLOOP_DATA_ROOT=/srv/affect``, ``AFFECTLOOP_DASK_ADDRESS=tcp://10.0.0.5:8786``.
Nested limits use a double underscore: ``AFFECTLOOP_LIMITS__MAX_CLIP_SECONDS=30``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.layout import DataLayout
from core.schemas import DEFAULT_LABELS



class Limits(BaseModel):
    """Input limits; a record past any of them is rejected with a reason, never crashes a run."""

    max_file_bytes: int = Field(50 * 1024 * 1024, gt=0, description="largest media file accepted")
    max_image_pixels: int = Field(16_000_000, gt=0, description="width x height; guards decompression bombs")
    min_image_side: int = Field(8, gt=0, description="smaller images carry no usable face")
    max_clip_seconds: float = Field(60.0, gt=0, description="longest audio clip accepted")
    min_clip_seconds: float = Field(0.1, gt=0, description="shorter clips carry no usable speech")
    max_text_chars: int = Field(5_000, gt=0, description="longest text accepted")
    max_audio_channels: int = Field(8, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AFFECTLOOP_", env_nested_delimiter="__", extra="ignore")

    data_root: Path = Field(Path("data"), description="root of features/, scores/, rejects/, labels/, models/, state/, reports/")
    source: str = Field("data/demo-source", description="raw source folder holding a manifest and media")
    partition_size: int = Field(1000, gt=0, description="records per partition (one Prefect task each)")
    # NoDecode: "anger,joy,..." from the environment reaches the validator instead of a JSON parser.
    labels: Annotated[tuple[str, ...], NoDecode] = DEFAULT_LABELS
    limits: Limits = Limits()

    dask_address: str | None = Field(None, description="existing Dask scheduler; None starts a loopback LocalCluster")
    dask_workers: int | None = Field(None, description="LocalCluster workers; None means one per core")
    # Dask's TLS (distributed.Security): all three together, with a tls:// dask_address.
    dask_tls_ca_file: Path | None = Field(None, description="CA certificate that signed the scheduler's and workers' certificates")
    dask_tls_cert: Path | None = Field(None, description="this client's certificate (PEM)")
    dask_tls_key: Path | None = Field(None, description="this client's private key (PEM); may be inside dask_tls_cert")

    label_studio_url: str | None = Field(None, description="your own Label Studio; None uses the local one make installs")
    label_studio_token: SecretStr | None = Field(None, description="API token for label_studio_url")
    label_studio_port: int = Field(8089, description="port of the local Label Studio")
    label_studio_document_root: Path | None = Field(
        None, description="your server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (a folder for affectloop's served media "
                          "only); the local server's is state/labelstudio/media")
    # NoDecode: "a@x,b@y" from the environment reaches the validator instead of a JSON parser.
    label_studio_annotators: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="emails of annotators (besides the admin and the ones affectloop created) whose annotations "
                        "sync accepts")
    label_studio_allow_insecure_http: bool = Field(
        False, description="allow sending the token over plain http:// to a host that is not loopback")

    ml_backend: bool = Field(True, description="connect the local Label Studio's project to a local ML backend "
                                                 "serving the production model (started on demand)")
    ml_backend_port: int | None = Field(None, description="port of the local ML backend; None: a free one")
    ml_backend_url: str | None = Field(None, description="where Label Studio reaches the ML backend "
                                                         "(`affectloop ml-backend connect`); default the local one")
    ml_backend_user: str | None = Field(None, description="the ML backend's basic-auth user; None: the 0600 file")
    ml_backend_password: SecretStr | None = Field(None, description="the ML backend's basic-auth password")
    ml_backend_debounce_s: float = Field(5.0, ge=0.0, description="annotation events within this many seconds "
                                                                  "start one sync")

    consensus_min_confidence: float = Field(
        0.7, ge=0.0, le=1.0, description="an annotated task whose consensus posterior stays below this gets one more "
                                         "annotator (its Label Studio overlap raised by one, once)")
    extra_annotator_budget: int = Field(20, ge=0, description="tasks whose overlap one sync may raise "
                                                             "(most uncertain first); 0 turns it off")
    annotation_budget: int = Field(100, ge=0, description="records sent to Label Studio per nightly build")
    review_budget: int = Field(25, ge=0, description="suspected label errors sent to Label Studio for review per run, "
                                                     "lowest self-confidence first (the rest wait for the next run)")
    selection_strategy: str = Field("diverse_modality_entropy",
                                    description="model.selection strategy for the nightly build (the most "
                                    "label-efficient on realmix validation folds: bench/active_learning.py)")
    promotion_margin: float = Field(0.0, ge=0.0, description="promote when holdout macro-F1 >= production - margin")
    group_field: str = Field("speaker", description="manifest field naming a record's speaker; the holdout keeps each "
                                                      "speaker on one side")
    seed: int = 13

    @field_validator("labels", "label_studio_annotators", mode="before")
    @classmethod
    def _split_labels(cls, value):
        # Accept "anger,joy,..." from the environment as well as a list.
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) < 2:
            raise ValueError("the label set needs at least two labels")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate labels in {value}")
        return tuple(value)

    @field_validator("label_studio_annotators")
    @classmethod
    def _lower_emails(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(email.strip().lower() for email in value if email.strip()))

    @property
    def layout(self) -> DataLayout:
        """Where every dataset and state file lives under ``data_root`` (core.layout)."""
        return DataLayout(self.data_root)


def get_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides (flow parameters) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
