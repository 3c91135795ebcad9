"""Settings: API keys, the SSH key, defaults and guards.

Sources, highest priority first: arguments passed to :class:`Settings`, environment variables,
a ``.env`` file in the working directory (``BROKER_ENV_FILE`` names another), then the TOML
config file (``broker init`` writes one in the platform config dir; ``BROKER_CONFIG`` points
elsewhere). Keys are :class:`SecretStr`: they print as
``**********`` in reprs, logs and errors.
"""

from __future__ import annotations

import difflib
import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any

import platformdirs
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from broker.errors import ConfigError

APP_NAME = "broker"


def config_dir() -> Path:
    """The platform config dir (``~/.config/broker`` on Linux)."""
    return Path(platformdirs.user_config_dir(APP_NAME))


def default_config_path() -> Path:
    """Where the config file is read from: ``$BROKER_CONFIG`` or ``<config dir>/config.toml``."""
    env = os.environ.get("BROKER_CONFIG")
    return Path(env).expanduser() if env else config_dir() / "config.toml"


def default_state_dir() -> Path:
    """Where the journal and other state live: ``$BROKER_STATE_DIR`` or the platform state dir."""
    env = os.environ.get("BROKER_STATE_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_state_dir(APP_NAME))


def _default_ssh_key() -> Path | None:
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        p = Path.home() / ".ssh" / name
        if p.exists():
            return p
    return None


def _alias(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Everything the broker reads from the environment and the config file."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        hide_input_in_errors=True,
    )

    runpod_api_key: SecretStr | None = Field(
        default=None, validation_alias=_alias("RUNPOD_API_KEY", "runpod_api_key")
    )
    prime_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=_alias("PRIME_API_KEY", "PRIME_INTELLECT_API_KEY", "prime_api_key"),
    )
    lambda_api_key: SecretStr | None = Field(
        default=None, validation_alias=_alias("LAMBDA_API_KEY", "lambda_api_key")
    )
    vast_api_key: SecretStr | None = Field(
        default=None, validation_alias=_alias("VAST_API_KEY", "vast_api_key")
    )
    runpod_api_url: str = Field(
        default="https://api.runpod.io",
        validation_alias=_alias("RUNPOD_API_URL", "runpod_api_url"),
        description="RunPod API base URL (point it at broker.testing's simulator to test offline).",
    )
    ssh_key_path: Path | None = Field(
        default_factory=_default_ssh_key,
        validation_alias=_alias("SSH_KEY_PATH", "BROKER_SSH_KEY_PATH", "ssh_key_path"),
        description="Private key used to log in; its .pub is given to providers.",
    )
    providers: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        validation_alias=_alias("BROKER_PROVIDERS", "providers"),
        description="Providers to use; default: every configured one.",
    )
    max_price_per_hour: float | None = Field(
        default=None,
        ge=0,
        validation_alias=_alias("BROKER_MAX_PRICE_PER_HOUR", "max_price_per_hour"),
    )
    budget_total: float | None = Field(
        default=None,
        ge=0,
        validation_alias=_alias("BROKER_BUDGET", "budget_total"),
        description="US$ ceiling on the summed estimated spend of instances this journal knows.",
    )
    capacity_cooldown_s: float = Field(
        default=300.0,
        ge=0,
        validation_alias=_alias("BROKER_CAPACITY_COOLDOWN", "capacity_cooldown_s"),
        description="Seconds an offer that just failed for capacity is skipped.",
    )
    ready_timeout_s: float = Field(
        default=900.0,
        gt=0,
        validation_alias=_alias("BROKER_READY_TIMEOUT", "ready_timeout_s"),
        description="Deadline for a new instance to become usable (running, SSH, GPU probe).",
    )
    default_ttl: str | None = Field(
        default=None,
        validation_alias=_alias("BROKER_DEFAULT_TTL", "default_ttl"),
        description="TTL given to instances created without one (e.g. '6h'); none by default.",
    )
    search_timeout_s: float = Field(
        default=20.0, gt=0, validation_alias=_alias("BROKER_SEARCH_TIMEOUT", "search_timeout_s")
    )
    ssh_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=_alias("BROKER_SSH_HOSTS", "ssh_hosts"),
        description="Your own machines for the `ssh` provider, as user@host:port.",
    )
    state_dir: Path = Field(
        default_factory=default_state_dir, validation_alias=_alias("BROKER_STATE_DIR", "state_dir")
    )
    default_image: str = Field(
        default="runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04",
        validation_alias=_alias("BROKER_DEFAULT_IMAGE", "default_image"),
    )

    @field_validator("providers", "ssh_hosts", mode="before")
    @classmethod
    def _split_csv(cls, v: Any) -> Any:
        # Environment values are "a,b" or a JSON list; config files give real lists.
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise ValueError(
                        f'not a JSON list: {text!r}; write a,b,c or ["a", "b"]'
                    ) from None
            return [p.strip() for p in text.split(",") if p.strip()]
        return v

    @field_validator("default_ttl", mode="before")
    @classmethod
    def _check_ttl(cls, v: Any) -> Any:
        # Checked here, so a bad BROKER_DEFAULT_TTL is reported naming the setting when settings
        # load, not as a bare "cannot read ttl" from the first create that falls back on it.
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int | float):
            v = f"{v:g}"
        if isinstance(v, str):
            from broker.lifecycle import parse_ttl

            try:
                parse_ttl(v)
            except ConfigError as e:
                raise ValueError(e.message) from None
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = default_config_path()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        if path.exists():
            _check_config_file(path)
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def api_key(self, provider: str) -> SecretStr | None:
        """The key for a provider by registry name, or None."""
        field = API_KEY_FIELDS.get(provider)
        value = getattr(self, field) if field else None
        return value if isinstance(value, SecretStr) else None

    def ssh_public_key(self) -> str | None:
        """The public half of the configured SSH key (``<key>.pub``), if it exists."""
        if self.ssh_key_path is None:
            return None
        pub = Path(str(self.ssh_key_path) + ".pub")
        if not pub.exists():
            return None
        return pub.read_text().strip()


# Registry name of each cloud -> the settings field holding its API key.
API_KEY_FIELDS = {
    "runpod": "runpod_api_key",
    "primeintellect": "prime_api_key",
    "lambdalabs": "lambda_api_key",
    "vast": "vast_api_key",
}


def setting_names(field: str) -> list[str]:
    """Every name a setting is read under: its aliases (environment names first), then the field.

    >>> setting_names("budget_total")
    ['BROKER_BUDGET', 'budget_total']
    """
    alias = Settings.model_fields[field].validation_alias
    names = [str(a) for a in alias.choices] if isinstance(alias, AliasChoices) else []
    return names if field in names else [*names, field]


def api_key_hint(provider: str) -> str | None:
    """How to configure a cloud's API key, e.g. for "runpod is not configured" messages."""
    field = API_KEY_FIELDS.get(provider)
    if field is None:
        return None
    env = setting_names(field)[0]
    return (
        f"set {env} in the environment, or {field} in {default_config_path()} "
        "(`broker init` writes one)"
    )


def _known_keys() -> dict[str, str]:
    """Lower-cased config-file key -> the field it sets (the TOML source, like the environment,
    matches names case-insensitively)."""
    return {n.lower(): f for f in Settings.model_fields for n in setting_names(f)}


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _check_config_file(path: Path) -> None:
    """Refuse a config file that is not TOML or sets a key no setting has.

    The settings themselves ignore unknown names (a .env file holds other programs' variables),
    so without this check a misspelt key (``max_price = 4``) would silently guard nothing.
    """
    known = _known_keys()
    for key in _read_config_file(path):
        if key.lower() in known:
            continue
        fields = list(Settings.model_fields)
        close = difflib.get_close_matches(key.lower(), list(known), n=1, cutoff=0.6)
        # Suggest the file's own spelling of the setting (the field), also for an env-style name.
        guess = (
            known[close[0]]
            if close
            else next((f for f in fields if f.startswith(key.lower())), None)
        )
        hint = f"did you mean {guess!r}?" if guess else f"settings are: {', '.join(fields)}"
        raise ConfigError(f"config file {path}: unknown setting {key!r}; {hint}")


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings`, turning validation failures into a readable :class:`ConfigError`.

    Each problem names where the bad value came from (the argument, the environment variable,
    the .env file or the config file, by the priority that made it win) and the setting.
    Values are never echoed: they may be keys.
    """
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    overrides.setdefault("_env_file", os.environ.get("BROKER_ENV_FILE", ".env"))
    try:
        return Settings(**overrides)
    except SettingsError as e:
        raise ConfigError(f"invalid settings: {e}") from None
    except ValidationError as e:
        problems = []
        for error in e.errors():
            field = _field_name(str(error["loc"][0])) if error["loc"] else "settings"
            message = str(error["msg"]).removeprefix("Value error, ")
            where = _source_of(field, overrides) if field in Settings.model_fields else field
            problems.append(f"{where}: {message}")
        raise ConfigError(f"invalid setting: {'; '.join(problems)}") from None


def _source_of(field: str, overrides: dict[str, Any]) -> str:
    """Where the value of ``field`` that failed came from, in the order the sources win."""
    names = {n.lower() for n in setting_names(field)}

    def named(key: str) -> str:
        return "" if key.lower() == field else f" (setting {field})"

    for key in overrides:
        if not key.startswith("_") and key.lower() in names:
            return f"argument {key}"
    for key in os.environ:
        if key.lower() in names:
            return f"environment variable {key}{named(key)}"
    env_file = overrides.get("_env_file")
    if env_file and Path(env_file).is_file():
        from dotenv import dotenv_values

        for key in dotenv_values(env_file):
            if key.lower() in names:
                return f"{key} in {env_file}{named(key)}"
    path = default_config_path()
    if path.is_file():
        for key in _read_config_file(path):
            if key.lower() in names:
                return f"{key} in config file {path}{named(key)}"
    return field


def _field_name(loc: str) -> str:
    """The settings field an alias (``BROKER_BUDGET``) belongs to, for error messages."""
    for name, f in Settings.model_fields.items():
        alias = f.validation_alias
        if loc == name or (isinstance(alias, AliasChoices) and loc in alias.choices):
            return name
    return loc


CONFIG_TEMPLATE = """\
# broker configuration. Environment variables and a .env file override these values.
# Keys are secrets: this file is created with mode 0600; keep it that way.

# runpod_api_key = ""
# prime_api_key = ""
# lambda_api_key = ""
# vast_api_key = ""

# Private key used to log in to instances; its .pub is handed to providers.
# ssh_key_path = "~/.ssh/id_ed25519"

# Only use these providers (default: every configured one).
# providers = ["runpod", "lambdalabs"]

# Guards: refuse any instance above this price, and stop creating once the estimated
# spend of the instances in the journal reaches the budget.
# max_price_per_hour = 6.0
# budget_total = 100.0

# Your own machines for the `ssh` provider.
# ssh_hosts = ["ubuntu@gpu-box.example.org:22"]
"""


def write_config_template(path: Path | None = None) -> Path:
    """Create the config file with mode 0600. Never overwrites an existing file."""
    path = path or default_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; edit it instead (not overwritten)") from None
    with os.fdopen(fd, "w") as f:
        f.write(CONFIG_TEMPLATE)
    return path
