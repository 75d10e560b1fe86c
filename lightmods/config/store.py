"""Registering the schemas with Hydra's ConfigStore, and turning a composed config into checked objects."""

from __future__ import annotations

import dataclasses

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lightmods.config.schema import RunConfig
from lightmods.errors import ConfigError


def register_schemas() -> None:
    """``base_config`` types the whole run; ``schema/method/<name>`` types each method's YAML
    (each ``conf/method/<name>.yaml`` starts with ``/schema/method/<name>@_here_`` in its defaults)."""
    from lightmods.methods import METHODS
    from lightmods.sweep.jobs import register_resolvers

    register_resolvers()  # ${lightmods.sweep_group:} (conf/logger/wandb.yaml)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    for name, cls in METHODS.items():
        cs.store(group="schema/method", name=name, node=cls.Config)


def validate(cfg: DictConfig) -> RunConfig:
    """The composed config as schema objects; every range and choice check runs here, before any training.

    Raises :class:`ConfigError` naming the key, the value and what is accepted.
    """
    from lightmods.methods import METHODS

    method_name = OmegaConf.select(cfg, "method.name")
    if method_name not in METHODS:
        raise ConfigError(f"method.name={method_name!r} is not accepted; accepted: one of {', '.join(sorted(METHODS))}")
    try:
        # Re-merging into fresh schemas catches keys that `+key=value` slipped past composition.
        plain = OmegaConf.to_container(cfg, resolve=True)
        try:
            method = OmegaConf.merge(OmegaConf.structured(METHODS[method_name].Config), plain.pop("method"))
        except OmegaConfBaseException as e:
            raise ConfigError(_explain(e, prefix="method.")) from e
        typed = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
        typed.method = method
        obj = OmegaConf.to_object(typed)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from e
    except ValueError as e:  # raised by a schema's __post_init__ through OmegaConf
        raise ConfigError(str(e)) from e
    return obj


def _explain(e: OmegaConfBaseException, prefix: str = "") -> str:
    """One line naming the key, the value and what is accepted."""
    cause = e.__cause__ or e.__context__
    if isinstance(cause, ConfigError):
        return str(cause)
    key = prefix + (getattr(e, "full_key", None) or getattr(e, "key", None) or "")
    msg = str(e).splitlines()[0]
    obj = getattr(e, "object_type", None)
    if isinstance(e, ConfigKeyError) and dataclasses.is_dataclass(obj):
        accepted = ", ".join(f.name for f in dataclasses.fields(obj))
        return f"{key} is not a key of {obj.__name__}; accepted keys: {accepted}"
    return f"{key}: {msg}" if key else msg
