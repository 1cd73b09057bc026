"""Settings, read once from the environment (TUNERY_*) and passed down."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where tunery keeps its files and how it reaches them."""

    model_config = SettingsConfigDict(env_prefix="TUNERY_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".tunery",
        description="Data directory: model cache, runs, database, artifacts (TUNERY_HOME).",
    )
    model_cache_dir: Path | None = Field(
        None, description="Where converted base models are cached (TUNERY_MODEL_CACHE_DIR; default HOME/models)."
    )

    database_url: str | None = Field(
        None, description="SQLAlchemy URL (TUNERY_DATABASE_URL): sqlite:///... or postgresql+psycopg://...; "
        "default: a SQLite file under HOME."
    )
    host: str = Field("127.0.0.1", description="Address `tunery serve` listens on (TUNERY_HOST).")
    port: int = Field(8000, description="Port `tunery serve` listens on (TUNERY_PORT).")
    public_url: str | None = Field(
        None, description="Base URL clients reach the server at, for urls in responses (default: from the request)."
    )
    allow_local_paths: bool = Field(
        False, description="Let train_data name a path on the server's disk (TUNERY_ALLOW_LOCAL_PATHS)."
    )
    admin_owners: str = Field(
        "", description="Comma-separated owner names allowed to register and remove base models through "
        "the API (TUNERY_ADMIN_OWNERS); default none: only `tunery bases` on the server's machine can."
    )
    max_upload_bytes: int = Field(1024**3, description="Largest accepted file upload / download, in bytes.")
    lease_seconds: float = Field(
        30.0, description="A worker's claim on a training, and a server's on a prediction, lapse this long after "
        "their last renewal; then another worker or server takes the job over."
    )
    embedded_workers: int = Field(1, description="Training workers `tunery serve` runs itself (0: none).")
    engine: Literal["embedded", "vllm"] = Field(
        "embedded", description="Serving engine for predictions: embedded (transformers in this process, "
        "continuous batching) or vllm (a vLLM OpenAI-compatible server per base model; see vllm_url)."
    )
    max_batch: int = Field(16, ge=1, description="Predictions generated together per base model (the running batch).")
    max_queue: int = Field(
        64, ge=1, description="Predictions waiting per base model beyond the running batch; more are refused "
        "with HTTP 429 and Retry-After."
    )
    vllm_url: str | None = Field(
        None, description="The vLLM server(s): one URL (http://host:8000) for every base, or a JSON object "
        "mapping base names to URLs."
    )
    vllm_command: str | None = Field(
        None, description="With no vllm_url for a model, start vLLM with this command ({model} and {port} "
        "are filled in), e.g. 'python -m vllm.entrypoints.openai.api_server --model {model} --port {port} "
        "--enable-lora'."
    )

    storage_url: str | None = Field(
        None, description="Where runs (checkpoints, weights, archives, exports), uploaded files and fetched "
        "training data live (TUNERY_STORAGE_URL): a local folder, or an fsspec URL such as s3://bucket/prefix "
        "(needs s3fs). Default: HOME/artifacts. Workers on other machines need only this and the database URL."
    )
    storage_options: dict = Field(
        default_factory=dict, description="fsspec options for the storage, as JSON (TUNERY_STORAGE_OPTIONS), "
        'e.g. {"endpoint_url": "http://127.0.0.1:9000"} for an S3-compatible server; credentials come from '
        "the usual AWS_* variables."
    )
    gpus: str | None = Field(
        None, description="CUDA devices a worker's trainings get, comma-separated (TUNERY_GPUS; `tunery worker "
        "--gpus 0,1`). The embedded workers of `tunery serve` split them between themselves. Default: what "
        "the process sees."
    )
    worker_labels: str = Field(
        "", description="Labels of this machine's training workers, KEY=VALUE comma-separated (TUNERY_WORKER_LABELS; "
        "`tunery worker --labels gpu=a100,mem=80g`). A training whose hardware (its destination model's, or "
        "the training's own) names a SKU (`hardware=gpu-a100-large`) or labels runs only on workers that match."
    )
    train_processes: int = Field(
        0, ge=0, description="Processes per service training (TUNERY_TRAIN_PROCESSES; 0: one per GPU in `gpus`, "
        "else 1). Several run under `accelerate launch`: DDP, or FSDP with the training input fsdp; on a CPU, "
        "over gloo."
    )
    checkpoint_minutes: float = Field(
        10.0, ge=0, description="Service trainings also save a checkpoint when this many minutes passed since "
        "the last one (0: only at the steps or epochs the inputs ask for)."
    )
    grader_seconds: float = Field(
        10.0, gt=0, le=600, description="Python graders: the CPU and wall-clock seconds one grade may take."
    )
    grader_memory_mb: int = Field(
        1024, ge=64, description="Python graders: the address space one grade may use, in MiB."
    )

    @property
    def devices(self) -> list[str]:
        """The CUDA device ids in `gpus`, in order (empty: none named)."""
        return [d.strip() for d in (self.gpus or "").split(",") if d.strip()]

    @property
    def storage(self) -> str:
        """The storage root as a URL or local path, without a trailing slash."""
        return (self.storage_url or str(self.artifacts_dir)).rstrip("/")

    def run(self, url: str | Path):
        """The run at `url` (artifacts.Run), cached under HOME/cache/runs when in object storage."""
        from tunery.artifacts.run import Run

        return Run(url, cache=self.home / "cache" / "runs", options=self.storage_options)

    @property
    def objects(self):
        """Uploaded files and fetched data in the storage (artifacts.Storage)."""
        from tunery.artifacts.run import Storage

        return Storage(self.storage, self.storage_options)

    def training_run(self, training_id: str):
        """The run folder of a service training, in the storage."""
        return self.run(f"{self.storage}/trainings/{training_id}")

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'tunery.db'}"

    @property
    def admins(self) -> frozenset[str]:
        """The owners named in admin_owners."""
        return frozenset(name.strip() for name in self.admin_owners.split(",") if name.strip())

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def files_dir(self) -> Path:
        """Where uploads are received (size-capped, hashed) before they move to the storage."""
        return self.home / "files"

    @property
    def model_cache(self) -> Path:
        return self.model_cache_dir or self.home / "models"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def download_dir(self) -> Path:
        return self.home / "downloads"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
