"""One frozen, validated configuration object.

Precedence (highest first): command-line overrides > environment > TOML file > defaults.
Environment variables are named ``CXR_NODE_<SECTION>__<KEY>``, e.g.
``CXR_NODE_DESTINATION__PORT=4242``. Nothing here runs at import time.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from node.core.errors import ConfigError

ENV_PREFIX = "CXR_NODE_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash
_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")
DEFAULT_WEIGHTS: Final = "densenet121-res224-all"
# how torch's OpenMP threads wait between parallel regions (node.analysis.threads applies it)
WaitPolicy = Literal["passive", "active", "default"]


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable ASCII characters, no '\\'")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScpConfig(_Section):
    ae_title: AETitle = "CXR_NODE"
    bind_address: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    max_pdu: int = Field(default=131072, ge=4096, le=16 * 2**20)
    network_timeout: float = Field(default=60.0, gt=0)
    # ARTIM (PS3.8 9.1.5): a connection must complete its A-ASSOCIATE-RQ (and TLS) in this
    association_request_timeout: float = Field(default=10.0, gt=0)
    max_associations: int = Field(default=10, ge=1)
    # connections without an association yet (a flood of idle sockets is bounded by these)
    max_pending_connections: int = Field(default=32, ge=1)
    max_pending_per_host: int = Field(default=8, ge=1)
    # who may talk to us
    allowed_calling_aets: tuple[AETitle, ...] = ("ORTHANC",)
    accept_any_calling_aet: bool = False
    allowed_hosts: tuple[str, ...] = ()  # source IPs / CIDR networks; empty = any
    # what we accept
    max_dataset_mb: int = Field(default=512, ge=1)

    @model_validator(mode="after")
    def _peers(self) -> ScpConfig:
        if not self.allowed_calling_aets and not self.accept_any_calling_aet:
            raise ValueError(
                "scp.allowed_calling_aets is empty: list the peers' AE titles, or set "
                "scp.accept_any_calling_aet = true to accept any peer"
            )
        return self

    @field_validator("allowed_hosts")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # raises ValueError with the reason
        return value


class TlsConfig(_Section):
    """DICOM TLS for the SCP (server side)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None  # CA that signs allowed client certificates
    require_client_cert: bool = True

    @model_validator(mode="after")
    def _files(self) -> TlsConfig:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file")
        if self.enabled and self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.ca_file")
        return self


_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(value: object) -> float:
    """A duration in seconds: a number (seconds) or a string with a unit, "72h", "30m",
    "45s", "3d" (a bare string number is seconds, as environment variables come)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m[1]) * _UNIT_SECONDS[m[2]]
    else:
        raise ValueError(
            f'invalid duration {value!r}: seconds, or a number with a unit s, m, h or d ("72h")'
        )
    if seconds <= 0:
        raise ValueError(f"invalid duration {value!r}: must be more than 0")
    return seconds


Duration = Annotated[float, BeforeValidator(_duration)]


class DestinationConfig(_Section):
    ae_title: AETitle = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = Field(default=4242, ge=1, le=65535)
    calling_ae_title: AETitle = "CXR_NODE"
    timeout: float = Field(default=30.0, gt=0)
    tls: bool = False
    tls_ca_file: Path | None = None  # CA to verify the destination's certificate
    tls_cert_file: Path | None = None  # our client certificate, if the PACS asks for one
    tls_key_file: Path | None = None
    # SRs refused with a C-STORE failure status are dead-lettered only after failing for this
    # long (and worker.max_attempts times); an unreachable destination never dead-letters
    retry_for: Duration = Field(default=72 * 3600.0, description='seconds, or "72h", "30m"')
    probe_interval: float = Field(default=5.0, gt=0, description="C-ECHO while unreachable")


_UMASK_RE = re.compile(r"^0?[0-7]{3}$")


def _octal_umask(value: object) -> int:
    """``spool.umask`` is written as an octal string, "0077": a TOML or environment integer
    (``77`` is decimal 77, octal 0115) would be misread. The owner's bits must stay clear."""
    if not isinstance(value, str) or not _UMASK_RE.match(value):
        raise ValueError(
            f'invalid umask {value!r}: an octal string of 3 or 4 digits, e.g. "0077" '
            "(files 0600, folders 0700)"
        )
    mask = int(value, 8)
    if mask & 0o700:
        raise ValueError(f"umask {value!r} takes the node's own access to its files away")
    return mask


Umask = Annotated[int, BeforeValidator(_octal_umask)]


class SpoolConfig(_Section):
    directory: Path = Path("var/spool")
    keep_delivered: bool = False
    fsync: bool = True
    min_free_mb: int = Field(default=256, ge=0, description="refuse C-STOREs below this")
    umask: Umask = Field(default=0o077, description='the process umask, e.g. "0077"')


class ModelConfig(_Section):
    weights: Literal["densenet121-res224-all"] = DEFAULT_WEIGHTS
    cache_dir: Path = Path("~/.torchxrayvision/models_data")
    weights_file: Path | None = None
    allow_download: bool = True
    allow_untrained: bool = False
    # full (code-running) unpickle of a file that is not the published one; needs allow_untrained
    unsafe_unpickle_unverified_weights: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=0, ge=0, description="0 = torch default")
    omp_wait_policy: WaitPolicy = "passive"
    batch_size: int = Field(default=4, ge=1, le=256)
    trace: bool = Field(
        default=True,
        description="run the layers as a TorchScript graph, checked against the module (CPU)",
    )
    channels_last: bool = Field(
        default=True,
        description="trace the graph with its weights channels-last (faster CPU convolutions)",
    )
    streams: int = Field(
        default=2,
        ge=1,
        le=16,
        description="parts of a batch run through the traced graph at once, torch's threads "
        "shared out among them (1: the whole batch on all of torch's threads)",
    )

    @property
    def batch_streams(self) -> int:
        """The streams a batch is cut into: ``streams``, at most one per image of it."""
        return min(self.streams, self.batch_size)

    @model_validator(mode="after")
    def _unsafe_needs_untrained(self) -> ModelConfig:
        if self.unsafe_unpickle_unverified_weights and not self.allow_untrained:
            raise ValueError(
                "model.unsafe_unpickle_unverified_weights needs model.allow_untrained = true "
                "(an unverified weights file is otherwise refused)"
            )
        return self


CHEST_NAMES = (
    "CHEST",
    "THORAX",
    "TORAX",
    "THORAKS",
    "TORACE",
    "LUNG",
    "LUNGS",
    "PORT CHEST",
    "CHEST PA",
    "CHEST AP",
    "CXR",
    "POUMON",
    "POUMONS",
    "PULMON",
    "THORAX PA",
)
OTHER_BODY_PARTS = (
    "ABDOMEN",
    "ANKLE",
    "ARM",
    "BREAST",
    "CSPINE",
    "C SPINE",
    "CERVICAL",
    "CLAVICLE",
    "ELBOW",
    "EXTREMITY",
    "FEMUR",
    "FINGER",
    "FOOT",
    "HAND",
    "HEAD",
    "HIP",
    "HUMERUS",
    "KNEE",
    "LEG",
    "LSPINE",
    "L SPINE",
    "LUMBAR",
    "PELVIS",
    "RIBS",
    "SHOULDER",
    "SKULL",
    "SPINE",
    "TSPINE",
    "T SPINE",
    "WRIST",
)


class FilterConfig(_Section):
    modalities: tuple[str, ...] = ("CR", "DX")
    # names of the chest as sites write BodyPartExamined, compared upper-case, accent-free
    body_parts: tuple[str, ...] = CHEST_NAMES
    # where BodyPartExamined is absent: descriptions naming one of these are not chests
    other_body_parts: tuple[str, ...] = OTHER_BODY_PARTS
    allow_missing_body_part: bool = True
    # frontal views: the model was trained on PA/AP radiographs; absent ViewPosition passes
    view_positions: tuple[str, ...] = ("PA", "AP")
    max_pixels: int = Field(default=100_000_000, ge=1, description="Rows x Columns x frames")


class WorkerConfig(_Section):
    poll_interval: float = Field(default=0.2, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    backoff_base: float = Field(default=2.0, gt=0)
    backoff_max: float = Field(default=300.0, gt=0)
    shutdown_timeout: float = Field(default=30.0, gt=0)
    max_crash_attempts: int = Field(
        default=3, ge=1, description="starts on a job that never finish, then quarantine"
    )
    image_timeout: float = Field(
        default=120.0, gt=0, description="seconds per image in flight before the node exits"
    )
    overlap: bool = Field(
        default=True,
        description="build a batch's summary images and SRs while the model runs on the next",
    )


class ReportConfig(_Section):
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    manufacturer: str = "cxr-node"
    institution_name: str | None = None
    json_dir: Path | None = None
    sr_dir: Path | None = None
    not_analyzed_notice: bool = True
    summary_image: bool = True
    summary_compression: Literal["jpeg", "none"] = "jpeg"
    fast_encoder: bool = True  # false: every SR built by highdicom (node.sr.srtemplate)

    @field_validator("uid_root")
    @classmethod
    def _root(cls, value: str) -> str:
        if not _UID_ROOT_RE.match(value) or len(value) > 40:
            raise ValueError(
                f"invalid uid_root {value!r}: dotted digits ending in '.', at most 40 characters"
            )
        return value


class MetricsConfig(_Section):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)


class CatchupConfig(_Section):
    """Catch-up over DICOM query/retrieve: what the PACS holds and the node never received
    (routed while the node was down, refused for lack of space) is fetched with C-MOVE."""

    enabled: bool = True
    interval: float = Field(default=60.0, gt=0, description="seconds between rounds")
    window_hours: float = Field(
        default=24.0, gt=0, description="studies whose StudyDate falls within this many hours"
    )
    grace: float = Field(
        default=120.0, ge=0, description="seconds an instance is seen missing before a fetch"
    )
    max_per_round: int = Field(default=200, ge=1)
    # the query/retrieve peer: the [destination] PACS unless set here
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    ae_title: AETitle | None = None
    calling_ae_title: AETitle | None = None


class NetworkConfig(_Section):
    """How the SCP and the SCUs drive pynetdicom."""

    # the workarounds of pynetdicom 3.0 internals (node.netopts); off: stock pynetdicom
    fast_paths: bool = True


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False


class NodeConfig(_Section):
    scp: ScpConfig = ScpConfig()
    tls: TlsConfig = TlsConfig()
    destination: DestinationConfig = DestinationConfig()
    spool: SpoolConfig = SpoolConfig()
    model: ModelConfig = ModelConfig()
    filter: FilterConfig = FilterConfig()
    worker: WorkerConfig = WorkerConfig()
    report: ReportConfig = ReportConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    network: NetworkConfig = NetworkConfig()
    catchup: CatchupConfig = CatchupConfig()

    def with_fast_paths(self, on: bool) -> NodeConfig:
        """This configuration with ``network.fast_paths`` set to ``on``."""
        if on == self.network.fast_paths:
            return self
        network = self.network.model_copy(update={"fast_paths": on})
        return self.model_copy(update={"network": network})


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Build the configuration: defaults < file < environment < overrides.

    Relative paths in the file are taken from the file's folder; those of the environment
    and the command line from the current directory. An invalid value is a
    :class:`ConfigError` of one line per problem, naming the key and where it came from."""
    return _load(path, environ, overrides or {}, None)


def load_destination(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> DestinationConfig:
    """Only ``[destination]`` (defaults < file < environment), as :func:`load_config` reads
    it, for ``echo`` and ``push``: the other sections are the node's business."""
    return _load(path, environ, {}, "destination").destination


def load_network(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> NetworkConfig:
    """Only ``[network]``, as :func:`load_destination` reads ``[destination]``."""
    return _load(path, environ, {}, "network").network


def _load(
    path: Path | None,
    environ: Mapping[str, str] | None,
    overrides: Mapping[str, Any],
    section: str | None,
) -> NodeConfig:
    """The layers as pydantic-settings merges them; ``section``: that section's values
    only (the others keep their defaults, so they cannot fail)."""
    environ = os.environ if environ is None else environ
    settings = _layered(_file_values(path, section), _variables(environ, section))
    cli: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is not None:
            name, _, key = dotted.partition(".")
            cli.setdefault(name, {})[key] = value
    try:
        return NodeConfig.model_validate(dict(settings(**cli)))
    except ValidationError as exc:
        raise _config_error(exc, _Sources(path, environ, overrides)) from None


def _file_values(path: Path | None, section: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    data = anchor_paths(read_toml(path), path.absolute().parent)  # `--config etc/x.toml` too
    return data if section is None else {k: v for k, v in data.items() if k == section}


def _variables(environ: Mapping[str, str], section: str | None) -> dict[str, str]:
    """The ``CXR_NODE_<SECTION>__<KEY>`` variables (``section``'s only, when named), their
    names lower-cased after the prefix; others (``CXR_NODE_X`` too) are not the node's."""
    out: dict[str, str] = {}
    for name, value in environ.items():
        rest = name[len(ENV_PREFIX) :].lower()
        if name.startswith(ENV_PREFIX) and "__" in name and section in (None, rest.split("__")[0]):
            out[ENV_PREFIX + rest] = value
    return out


class _Environment(EnvSettingsSource):
    """pydantic-settings' reading of ``variables`` (a list's value as JSON), with an empty
    section for each unknown one named, which ``extra="forbid"`` then refuses."""

    def __init__(self, settings_cls: type[BaseSettings], variables: dict[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = variables

    def __call__(self) -> dict[str, Any]:
        named = {name[self.env_prefix_len :].split("__")[0] for name in self.env_vars}
        return {**{section: {} for section in named}, **super().__call__()}

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        """A list that is not JSON stays a string, which validation refuses by its name."""
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


def _layered(file: dict[str, Any], variables: dict[str, str]) -> type[NodeConfig]:
    """NodeConfig as pydantic-settings reads it: its keyword arguments (the command line's)
    over ``variables`` over ``file`` over the defaults."""

    class Layered(BaseSettings, NodeConfig):
        model_config = SettingsConfigDict(  # frozen, extra="forbid": NodeConfig's
            case_sensitive=True,  # the prefix; _variables lower-cases the rest
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            env_nested_max_split=1,  # CXR_NODE_SCP__PORT__X names the key port__x
        )

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            environment = _Environment(settings_cls, variables)
            return init_settings, environment, InitSettingsSource(settings_cls, file)

    return Layered


def _config_error(exc: ValidationError, where: _Sources) -> ConfigError:
    """One line per problem (the same problem once), each naming its key and source."""
    lines = [where.explain(e) for e in exc.errors(include_url=False)]
    return ConfigError("\n".join(dict.fromkeys(lines)))


def _path_fields() -> set[tuple[str, str]]:
    """(section, key) of every path setting."""
    out: set[tuple[str, str]] = set()
    for section, info in NodeConfig.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for key, field in model.model_fields.items():
                if "Path" in str(field.annotation):
                    out.add((section, key))
    return out


def anchor_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``data`` (a config file's) with its relative path settings made relative to
    ``folder`` (the file's): ``spool.directory = "var/spool"`` means the same spool from
    any current directory. ``~`` paths are left for their users to expand."""
    out = dict(data)
    for section, key in _path_fields():
        values = out.get(section)
        if not isinstance(values, dict) or not isinstance(values.get(key), str):
            continue
        value = values[key]
        if value and not value.startswith("~") and not Path(value).is_absolute():
            out[section] = {**values, key: str(folder / value)}
    return out


_PLAIN: Final = {
    "int_parsing": "not an integer",
    "int_type": "not an integer",
    "int_from_float": "not an integer",
    "float_parsing": "not a number",
    "float_type": "not a number",
    "bool_parsing": "not true or false",
    "bool_type": "not true or false",
    "string_type": "not a string",
    "path_type": "not a path",
    "tuple_type": "not a list",
    "list_type": "not a list",
    "missing": "missing",
    "extra_forbidden": "unknown key (config/node.toml lists them all)",
    "model_type": "not a section (a table of keys)",
}
_BOUNDS: Final = {
    "greater_than_equal": ("ge", "at least"),
    "greater_than": ("gt", "more than"),
    "less_than_equal": ("le", "at most"),
    "less_than": ("lt", "less than"),
}


def _plain(err: Any) -> str:
    """A pydantic error's message without the library's phrasing."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _PLAIN:
        return _PLAIN[kind]
    if kind in _BOUNDS:
        name, words = _BOUNDS[kind]
        return f"must be {words} {ctx.get(name)}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    return str(err["msg"]).removeprefix("Value error, ")


class _Sources:
    """Where each setting came from: a command-line option, an environment variable, the
    file, or nowhere (a default, or a check across several keys)."""

    def __init__(
        self, path: Path | None, environ: Mapping[str, str], overrides: Mapping[str, Any]
    ) -> None:
        self.path = path
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        self.env = {
            tuple(name[len(ENV_PREFIX) :].lower().partition("__")[::2]): name
            for name in environ
            if name.startswith(ENV_PREFIX) and "__" in name
        }
        self.environ = environ

    def explain(self, err: Any) -> str:
        loc = [str(part) for part in err["loc"]]
        key = ".".join(loc)
        value, why = err.get("input"), _plain(err)
        if len(loc) == 1 and err["type"] == "extra_forbidden":
            why = "unknown section (config/node.toml lists them all)"
        if len(loc) >= 2:
            dotted, pair = f"{loc[0]}.{loc[1]}", (loc[0], loc[1])
            if dotted in self.overrides:
                return f"command line: {key} = {self.overrides[dotted]!r}: {why}"
            if pair in self.env:
                name = self.env[pair]
                why = 'not a JSON list, e.g. ["A","B"]' if err["type"] == "tuple_type" else why
                return f"{name}={self.environ[name]!r}: {key}: {why}"
        elif loc:
            names = sorted(n for (section, _), n in self.env.items() if section == loc[0])
            if err["type"] == "extra_forbidden" and names:
                return f"{', '.join(names)}: {key}: {why}"
        if self.path is not None and err["type"] != "missing" and value is not None:
            if len(loc) >= 2 and not isinstance(value, dict):
                return f"{self.path}: {key} = {value!r}: {why}"
            return f"{self.path}: {key}: {why}"
        return f"invalid configuration: {key}: {why}"
