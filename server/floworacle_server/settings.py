"""Server settings: one pydantic model read from command-line flags, ``FLOWORACLE_*`` environment
variables and an optional YAML file, in that order of precedence, in one place (:func:`load_settings`).

The ``floworacle serve`` flags are generated from the model (:func:`add_flags`): a setting's name,
type, choices, default and help are written once, in its field. Library code takes a
:class:`Settings` object and never reads the environment itself.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from floworacle.protocol import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_REQUEST_ROWS

__all__ = ["Settings", "load_settings", "add_flags", "ENV_PREFIX", "CONFIG_ENV"]

ENV_PREFIX = "FLOWORACLE_"
#: Environment variable naming the YAML settings file (same as ``--config``).
CONFIG_ENV = "FLOWORACLE_CONFIG"

#: The embedded data set's name (floworacle_server.data.DIGITS_NAME; not imported: loading the
#: data package loads torch, and the settings are read by every floworacle command).
_DIGITS = "digits"

_DEVICE_HELP = '"cpu", "cuda", "cuda:N" or "auto" (CUDA when available, else CPU)'


def _split_list(value: Any) -> Any:
    # Environment variables carry lists as "a,b" (a JSON list is accepted too); YAML and flags
    # already give lists.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything a Flow Oracle server is configured with.

    Construct it with :func:`load_settings` (flags > environment > YAML file > defaults) or
    directly with keyword arguments in tests; direct construction reads nothing from the
    environment.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_assignment=True)

    data: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='Data set to serve (repeatable), "NAME=PATH" or "PATH" (name from --name or the file stem): '
        "'digits', an index directory or a .npy/.npz/.safetensors/.pt file. None: the embedded digits data set.",
        json_schema_extra={"metavar": "[NAME=]PATH"},
    )
    labels: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='Labels file of a data set (repeatable), "NAME=PATH", or "PATH" when exactly one data set is given.',
        json_schema_extra={"metavar": "[NAME=]PATH"},
    )
    image_shape: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='Image shape C,H,W of a data set for the patch oracles (repeatable), "NAME=C,H,W", or "C,H,W" '
        "when exactly one data set is given (several in the environment: separated by ';'); default: the digits' "
        "1,8,8, an index's manifest, or a 3-D sample shape.",
        json_schema_extra={"metavar": "[NAME=]C,H,W"},
    )
    name: str | None = Field(default=None, description="Name of the data set given as a bare PATH.")
    host: str = Field(default="0.0.0.0", description="Address the gRPC server binds.")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    health_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of a second, open gRPC server that answers only grpc.health.v1 and reads no message "
        "over 4 KiB (probes; same host and TLS); 0 picks a free one. With auth_tokens_file, health on the "
        "gRPC port needs a token like every other method, so probes use this port.",
    )
    metrics_port: int = Field(
        default=9090, ge=-1, le=65535, description="Prometheus /metrics port; 0 picks a free one, -1 turns it off."
    )
    metrics_host: str | None = Field(
        default=None,
        description="Address the metrics HTTP server binds; none: the gRPC host (so --host 127.0.0.1 keeps "
        "metrics local too).",
    )
    metrics_tls: bool = Field(
        default=False,
        description="Serve /metrics over HTTPS with the gRPC port's certificate (tls_cert, tls_key), requiring "
        "client certificates signed by tls_client_ca when that is set.",
    )
    metrics_auth: bool = Field(
        default=False,
        description="Require 'Authorization: Bearer <token>' with a token of auth_tokens_file on /metrics.",
    )
    device: str = Field(default="auto", description=_DEVICE_HELP)
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="Storage dtype of the resident data (exactness is relative to it)."
    )
    chunk_rows: int | None = Field(default=None, ge=1, description="Engine chunk size in data rows; None = default.")
    screen: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description=(
            "Precision of the engine's screening GEMM. bfloat16 / float16 use a GPU's tensor cores; the "
            "exact mode stays exact (its error bound widens the candidate set), the fast mode's bound grows. "
            "CPUs always screen in float32."
        ),
    )
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES, ge=1, le=2**31 - 1, description="gRPC message size limit (both ways)."
    )
    max_batch_rows: int = Field(default=4096, ge=1, description="Most query rows merged into one engine call.")
    max_queue_delay_ms: float = Field(
        default=2.0, ge=0.0, description="Longest a request waits for others to merge with before it runs."
    )
    max_queue_requests: int = Field(
        default=1024, ge=1, description="Requests that may wait in the batcher queue; beyond: RESOURCE_EXHAUSTED."
    )
    max_request_rows: int = Field(
        default=DEFAULT_MAX_REQUEST_ROWS,
        ge=1,
        description="Most rows one request may carry; beyond: RESOURCE_EXHAUSTED (split it).",
    )
    max_stream_inflight: int = Field(
        default=16, ge=1, description="Requests of one OracleStream in flight at once (back-pressure beyond)."
    )
    max_inflight_rows: int = Field(
        default=65536,
        ge=1,
        description="Query rows admitted at once (queued + computing); beyond: RESOURCE_EXHAUSTED with a retry "
        "hint. A request arriving when nothing is in flight is always admitted.",
    )
    max_inflight_bytes: int = Field(
        default=128 << 20,
        ge=1,
        description="Bytes of requests in flight at once, server-wide (received and not yet answered, plus "
        "answers not yet handed to gRPC; streams included); beyond: unary calls get RESOURCE_EXHAUSTED with a "
        "retry hint, stream messages wait unread. A request arriving when nothing is in flight is always admitted.",
    )
    max_stream_inflight_bytes: int = Field(
        default=8 << 20,
        ge=1,
        description="The same bound for one OracleStream (its sender waits on flow control beyond it).",
    )
    reflection: bool = Field(
        default=True,
        description="Serve gRPC server reflection. When not given: on without authentication "
        "(auth_tokens_file unset), off with it.",
        json_schema_extra={"show_default": False},
    )
    tls_cert: str | None = Field(
        default=None,
        description="PEM server certificate chain file; turns on TLS.",
        json_schema_extra={"metavar": "PEM"},
    )
    tls_key: str | None = Field(
        default=None, description="PEM private key file of tls_cert.", json_schema_extra={"metavar": "PEM"}
    )
    tls_client_ca: str | None = Field(
        default=None,
        description="PEM CA bundle file; when set, clients must present a certificate it signed (mutual TLS).",
        json_schema_extra={"metavar": "PEM"},
    )
    auth_tokens_file: str | None = Field(
        default=None,
        description="File of accepted bearer tokens, one a line ('#' comments and blank lines ignored); when "
        "set, every RPC on the gRPC port, health checks included, needs 'authorization: Bearer <token>' (open "
        "health checks: health_port). Re-read on SIGHUP.",
        json_schema_extra={"metavar": "FILE"},
    )
    grace_period_s: float = Field(
        default=30.0, ge=0.0, description="On SIGTERM: how long in-flight requests may take to finish."
    )
    shutdown_delay_s: float = Field(
        default=0.0,
        ge=0.0,
        description="On SIGTERM: how long health reports NOT_SERVING while still accepting RPCs, so load "
        "balancers stop routing before the port closes.",
    )
    tune_allocator: bool = Field(
        default=True,
        description="Pin glibc's malloc mmap threshold (32 MiB) and trim threshold (256 MiB) at start-up so "
        "MB-sized request, response and engine buffers are reused instead of page-faulted in fresh on every call "
        "(floworacle.tune_allocator), and cap malloc's arenas at two so that memory returns after a burst; resident memory "
        "keeps up to 256 MiB of freed blocks.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Logging level.")
    gang_timeout_s: float = Field(
        default=60.0,
        gt=0.0,
        description="A gang's collective timeout: a rank that hangs this long turns the gang's answers into "
        "UNAVAILABLE and rank 0 exits (a rank that dies does at once).",
    )
    gang_backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="torch.distributed backend of a gang: auto is NCCL on CUDA devices, else gloo."
    )
    # Where this process sits in a gang: set by torchrun (or any launcher) through the standard
    # environment variables, not by flags.
    rank: int = Field(default=0, ge=0, description="Rank in the gang.", json_schema_extra={"env": "RANK"})
    world_size: int = Field(
        default=1,
        ge=1,
        description="Processes in the gang; more than 1 shards every data set over them.",
        json_schema_extra={"env": "WORLD_SIZE"},
    )
    local_rank: int = Field(
        default=0,
        ge=0,
        description="Rank on this node (picks cuda:LOCAL_RANK).",
        json_schema_extra={"env": "LOCAL_RANK"},
    )
    master_addr: str = Field(
        default="127.0.0.1",
        description="Rendezvous host of the gang (rank 0's).",
        json_schema_extra={"env": "MASTER_ADDR"},
    )
    master_port: int = Field(
        default=29500,
        ge=1,
        le=65535,
        description="Rendezvous port of the gang.",
        json_schema_extra={"env": "MASTER_PORT"},
    )

    @model_validator(mode="before")
    @classmethod
    def _reflection_default(cls, values: Any) -> Any:
        # Reflection describes the whole API to anyone who can connect: with authentication on,
        # it is off unless asked for explicitly.
        if isinstance(values, dict) and values.get("reflection") is None:
            values = {**values, "reflection": not values.get("auth_tokens_file")}
        return values

    @field_validator("data", "labels", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("image_shape", mode="before")
    @classmethod
    def _shape_list(cls, value: Any) -> Any:
        # a shape holds commas itself: the environment separates several with ";" or spaces
        if isinstance(value, str) and not value.strip().startswith("["):
            return value.replace(";", " ").split()
        return _split_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        v = value.strip().lower()
        if v in ("cpu", "cuda", "auto") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device {value!r} is not understood; use {_DEVICE_HELP}")

    @field_validator("data")
    @classmethod
    def _data_specs(cls, value: list[str]) -> list[str]:
        names: set[str] = set()
        for spec in value:
            name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
            if "=" in spec and (not name.strip() or not path.strip()):
                raise ValueError(f'data spec {spec!r} must be "NAME=PATH" or "PATH"')
            if name:
                if name in names:
                    raise ValueError(f"data set name {name!r} is given twice; names must be unique")
                names.add(name)
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (PEM files); give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs TLS: give tls_cert and tls_key too")
        return self

    @model_validator(mode="after")
    def _health_port(self) -> Settings:
        if self.health_port is not None and self.health_port != 0 and self.health_port == self.port:
            raise ValueError(
                f"health_port {self.health_port} is the gRPC port; give the health server a port of its own"
            )
        return self

    @model_validator(mode="after")
    def _metrics_security(self) -> Settings:
        if self.metrics_tls and self.tls_cert is None:
            raise ValueError("metrics_tls serves /metrics with the gRPC port's certificate: give tls_cert and tls_key")
        if self.metrics_auth and self.auth_tokens_file is None:
            raise ValueError("metrics_auth checks the bearer tokens of auth_tokens_file: give auth_tokens_file")
        return self

    @model_validator(mode="after")
    def _gang_place(self) -> Settings:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside a gang of WORLD_SIZE = {self.world_size}")
        return self

    @model_validator(mode="after")
    def _labels_match(self) -> Settings:
        bare = [s for s in self.labels if "=" not in s]
        if bare and (len(bare) > 1 or len(self.data) != 1):
            raise ValueError(
                'a bare labels PATH needs exactly one data set; otherwise give labels as "NAME=PATH" '
                f"(got labels {self.labels} for data {self.data})"
            )
        served = [name for name, _ in self.data_sets()]
        seen: set[str] = set()
        for spec in self.labels:
            if "=" not in spec:
                continue
            name = spec.partition("=")[0]
            if name not in served:
                # a misspelt name would otherwise serve that data set without classes, silently
                raise ValueError(
                    f"labels {spec!r} name the data set {name!r}, which no data argument gives; the data sets "
                    f'are {", ".join(repr(n) for n in served)} (labels are "NAME=PATH" with NAME as in --data)'
                )
            if name in seen:
                raise ValueError(f"labels are given twice for the data set {name!r}; give one labels file per data set")
            seen.add(name)
        return self

    @model_validator(mode="after")
    def _image_shapes_match(self) -> Settings:
        bare = [s for s in self.image_shape if "=" not in s]
        if bare and (len(bare) > 1 or len(self.data) > 1):
            raise ValueError(
                'a bare image shape C,H,W needs exactly one data set; otherwise give it as "NAME=C,H,W" '
                f"(got image shapes {self.image_shape} for data {self.data})"
            )
        for spec in self.image_shape:
            shape = spec.partition("=")[2] if "=" in spec else spec
            parts = [p.strip() for p in shape.split(",")]
            if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"image shape {spec!r}: write C,H,W (or NAME=C,H,W) with three positive integers")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only keyword arguments: the environment and the file are merged by load_settings, so
        # constructing Settings in library code or tests never picks up stray variables.
        return (init_settings,)

    def resolved_device(self) -> str:
        """The concrete torch device: "auto" becomes "cuda" when CUDA is available, else "cpu".

        Raises:
            ValueError: a CUDA device asked for that this torch cannot reach (the message says why).
        """
        if self.device == "cpu":
            return self.device
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if not torch.cuda.is_available():
            why = "is a build without CUDA" if torch.version.cuda is None else "sees no CUDA device"
            raise ValueError(
                f"device {self.device!r}: this torch ({torch.__version__}) {why}; use --device cpu or auto, "
                "or install a CUDA build (FLOWORACLE_TORCH=torch scripts/serve)"
            )
        index = int(self.device.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {self.device!r}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return self.device

    def data_sets(self) -> list[tuple[str, str]]:
        """(name, path) of every data set to serve, as ``build_store`` names them: "NAME=PATH" keeps
        NAME; a bare PATH is named ``name``, or "digits" for the embedded set, or its file stem. No
        data: the embedded digits set (named ``name`` when given)."""
        if not self.data:
            return [(self.name or _DIGITS, _DIGITS)]
        out = []
        for spec in self.data:
            if "=" in spec:
                name, _, path = spec.partition("=")
            else:
                path = spec
                name = self.name or (_DIGITS if path == _DIGITS else Path(path).stem)
            out.append((name, path))
        return out

    def labels_for(self, name: str) -> str | None:
        """The labels file given for data set ``name`` (a bare PATH applies to the only data set)."""
        return _given_for(self.labels, name)

    def image_shape_for(self, name: str) -> str | None:
        """The image shape "C,H,W" given for data set ``name`` (a bare one applies to the only data set)."""
        return _given_for(self.image_shape, name)


def _given_for(specs: list[str], name: str) -> str | None:
    """The value of the "NAME=VALUE" spec for data set ``name``, or of a bare "VALUE" (the only data set's)."""
    for spec in specs:
        if "=" not in spec:
            return spec
        key, _, value = spec.partition("=")
        if key == name:
            return value
    return None


def _env_name(name: str) -> str:
    """The environment variable of a setting: ``FLOWORACLE_<FIELD>``, or the launcher's own name
    (RANK, WORLD_SIZE, ...) for the gang's placement."""
    extra = Settings.model_fields[name].json_schema_extra
    own = extra.get("env") if isinstance(extra, dict) else None
    return str(own) if own else ENV_PREFIX + name.upper()


def _env_values(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings' environment variables in ``environ`` (case-insensitive), as strings: the
    model's validators parse them (lists from "a,b" or a JSON list, booleans from true/false/1/0)."""
    upper = {k.upper(): v for k, v in environ.items()}
    return {name: upper[_env_name(name)] for name in Settings.model_fields if _env_name(name) in upper}


def _flag_values(args: argparse.Namespace | Mapping[str, Any] | None) -> dict[str, Any]:
    if args is None:
        return {}
    raw = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    # argparse leaves flags that were not given at None; those must not hide env / file values.
    return {k: v for k, v in raw.items() if v is not None and (k in Settings.model_fields or k == "config")}


def load_settings(
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings: flags (``args``) over ``FLOWORACLE_*`` variables in ``env`` over the YAML
    file named by ``config`` (flag) or ``FLOWORACLE_CONFIG`` over the defaults.

    Args:
        args: parsed flags (an argparse namespace whose unset flags are None) or a dict of
            field values; keys that are not settings (e.g. ``func``) are ignored.
        env: the environment to read; ``os.environ`` when None (the only place it is read).

    Raises:
        ValueError: a missing config file, or invalid values (pydantic's ValidationError is a
            ValueError and names each bad field).
    """
    flags = _flag_values(args)
    environ = os.environ if env is None else env
    config = flags.pop("config", None) or environ.get(CONFIG_ENV) or None
    merged: dict[str, Any] = {}
    if config:
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"settings file {config!r} does not exist; fix --config / {CONFIG_ENV}")
        file_values = YamlConfigSettingsSource(Settings, yaml_file=path)()
        unknown = sorted(set(file_values) - set(Settings.model_fields))
        if unknown:
            raise ValueError(
                f"settings file {config!r} has unknown keys {unknown}; known: {sorted(Settings.model_fields)}"
            )
        merged.update(file_values)
    merged.update(_env_values(environ))
    merged.update(flags)
    return Settings(**merged)


# -- the command line, generated from the model --------------------------------------------------


def _flag_type(annotation: Any) -> tuple[str, Any]:
    """(kind, argparse type or choices) of a field annotation: "bool", "list", "choice" or "value"."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _flag_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(inner[0])
    if origin is Literal:
        return "choice", list(typing.get_args(annotation))
    if origin is list:
        return "list", str
    if annotation is bool:
        return "bool", None
    return "value", annotation


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting (``max_batch_rows`` -> ``--max-batch-rows``), with the field's
    type, choices, help and default; booleans get ``--x/--no-x``, lists may be repeated. Every
    flag defaults to None, so :func:`load_settings` can tell "not given" from a value."""
    for name, info in Settings.model_fields.items():
        kind, arg = _flag_type(info.annotation)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if "env" in extra:  # set by the launcher's environment, not by a flag
            continue
        default = info.get_default(call_default_factory=True)
        hidden = default in (None, [], "") or extra.get("show_default") is False
        shown = "" if hidden else f" (default: {default})"
        options: dict[str, Any] = {"dest": name, "default": None, "help": (info.description or "") + shown}
        if "metavar" in extra:
            options["metavar"] = extra["metavar"]
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif kind == "list":
            options["action"] = "append"
        elif kind == "choice":
            options["choices"] = arg
        else:
            options["type"] = arg
        parser.add_argument("--" + name.replace("_", "-"), **options)
    parser.add_argument("--config", metavar="FILE", default=None, help=f"YAML settings file (or {CONFIG_ENV})")


def settings_markdown() -> str:
    """The settings table of docs/server.md (field, flag, environment variable, default, meaning),
    generated from the model; a test holds the docs to it."""
    rows = ["| field / YAML key | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        kind, _ = _flag_type(info.annotation)
        flag = "--" + name.replace("_", "-")
        flag = f"`--[no-]{flag[2:]}`" if kind == "bool" else f"`{flag}`" + (" (repeatable)" if kind == "list" else "")
        if isinstance(info.json_schema_extra, dict) and "env" in info.json_schema_extra:
            flag = "(launcher)"
        default = info.get_default(call_default_factory=True)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        shown = (
            "see meaning"
            if extra.get("show_default") is False
            else ("none" if default in (None, [], "") else f"`{default}`")
        )
        meaning = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {flag} | `{_env_name(name)}` | {shown} | {meaning} |")
    return "\n".join(rows)
