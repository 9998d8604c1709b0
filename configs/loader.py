"""Build a validated `Config` from YAML files and `key=value` overrides.

Files are merged in order, then the dotlist overrides; the result is resolved (interpolations),
converted to the dataclasses of `twotower.configs.schema` (which validate themselves in `__post_init__`)
and returned. Every failure becomes one `ConfigError` that names the key.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from twotower.configs.schema import Config


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type or impossible value."""


def _valid_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node.keys():
        full = f"{prefix}{key}"
        keys.append(full)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            keys.extend(_valid_keys(child, f"{full}."))
    return keys


def _unknown_key_message(exc: ConfigKeyError, source: str) -> str:
    full_key = exc.full_key or str(exc.key)
    valid = _valid_keys(OmegaConf.structured(Config))
    close = difflib.get_close_matches(full_key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ""
    return f"{source}: unknown config key {full_key!r}{hint}"


def _first_line(exc: OmegaConfBaseException) -> str:
    return str(getattr(exc, "msg", exc)).splitlines()[0]


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as exc:
        raise ConfigError(_unknown_key_message(exc, source)) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: bad value for {exc.full_key!r}: {_first_line(exc)}") from None


PACKAGED = Path(__file__).resolve().parent
"The YAML groups installed with twotower: data/, model/, trainer/, logger/, experiment/, sweep/."


def config_path(name: str | Path) -> Path:
    """A config file by path, else by its packaged group name: `trainer/ddp`, `trainer/ddp.yaml` or
    `configs/trainer/ddp.yaml` (the repository path, which works from any folder after an install).
    A file that exists at the given path wins over a packaged one of the same name."""
    path = Path(name)
    if path.is_file():
        return path
    group = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    packaged = PACKAGED / group.with_suffix(".yaml")
    if not path.is_absolute() and packaged.is_file():
        return packaged
    groups = sorted(str(p.relative_to(PACKAGED).with_suffix("")) for p in PACKAGED.glob("*/*.yaml"))
    close = difflib.get_close_matches(str(group.with_suffix("")), groups, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; packaged configs: {', '.join(groups)}"
    raise ConfigError(f"config file {str(path)!r} not found (neither a file nor a packaged group name){hint}")


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Merge `files` (paths or packaged group names, see `config_path`) then `overrides` over the
    defaults; return the validated dataclass tree."""
    cfg = OmegaConf.structured(Config)
    for file in files:
        path = config_path(file)
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come in several types
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        cfg = _merge(cfg, loaded, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command line")
    try:
        OmegaConf.resolve(cfg)
        return OmegaConf.to_object(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad value for {exc.full_key!r}: {_first_line(exc)}") from None


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what `config.yaml` of a run folder holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# A stored config (a checkpoint's hyper-parameters, an export's config.yaml) is complete, so a key
# it lacks did not exist when it was written: the code then behaved as the value here, which is not
# that key's current default.
BEFORE_KEY_EXISTED = {"model.item.text_adapter": "linear"}


def from_container(container: dict) -> Config:
    """A `Config` from its stored plain-dict form (a checkpoint's hyper-parameters, an export's
    config.yaml), keys added since it was written set to what the code did before they existed."""
    stored = OmegaConf.create(container)
    for key, before in BEFORE_KEY_EXISTED.items():
        if OmegaConf.select(stored, key, default=KeyError) is KeyError:
            OmegaConf.update(stored, key, before)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), stored))
