"""What a run computes, as plain data: the model and data settings, the one config hash, and the checkpoint rule.

A model's settings are of two kinds, declared once per method (``trained_structure`` on each module class):

* **trained structure**: what the trained parameters mean (variant, backbone, widths, rounds, gates, prompts,
  captions, and the training objective that produced the weights). A checkpoint loaded under a config that differs
  in one of them is refused, naming every differing key with both values;
* **evaluation**: everything else (protocol, ``eval_size``, ``gaussian_sigma``, fusion, thresholds ...). The
  config's values are applied on top of the checkpoint and the run reports which ones changed.

:func:`config_hash` is the one hash every artefact of a run carries (``run.json``, ``results.csv``, the
checkpoint, the export's ``metadata.json``, the logger config).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from fsad.errors import FsadError


class SettingsMismatchError(FsadError):
    """A checkpoint was trained with another model class or other trained-structure settings than the config."""


def qualified_name(cls: type) -> str:
    """``package.module.Class`` of a class, as configs and checkpoints name it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data: dataclasses and mappings become dicts, tuples lists (so a setting read back
    from a checkpoint or a YAML file compares equal to the one given in Python)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical(dataclasses.asdict(value))
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        return canonical(value.as_dict())
    if isinstance(value, Mapping):
        return {str(key): canonical(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def settings_of(component: Any) -> dict[str, Any]:
    """The settings of a model or datamodule: its class path and its init arguments (``hparams``, Lightning's
    private ``_class_path``/``_instantiator`` entries left out)."""
    hyper_parameters = getattr(component, "hparams", None) or {}
    arguments = {key: value for key, value in hyper_parameters.items() if not str(key).startswith("_")}
    return {"class_path": qualified_name(type(component)), "init_args": canonical(arguments)}


def config_hash(model: Mapping[str, Any], data: Mapping[str, Any], seed: int | None) -> str:
    """The run's config hash: the first 12 hex digits of the SHA-256 of the canonical JSON of the model settings,
    the data settings (both from :func:`settings_of`) and the global seed. Trainer, logger, callback and output-path
    options are not part of it: they do not change a score."""
    text = json.dumps({"model": canonical(model), "data": canonical(data), "seed": seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_config_hash(model: Any, datamodule: Any, seed: int | None) -> str:
    """:func:`config_hash` of an instantiated model and datamodule under the global ``seed``."""
    return config_hash(settings_of(model), settings_of(datamodule) if datamodule is not None else {}, seed)


def differing(checkpoint: Mapping[str, Any], requested: Mapping[str, Any], keys: set[str]) -> dict[str, tuple]:
    """``key -> (checkpoint value, requested value)`` for the ``keys`` both sides hold with different values."""
    return {
        key: (checkpoint[key], requested[key])
        for key in sorted(keys)
        if key in checkpoint and key in requested and canonical(checkpoint[key]) != canonical(requested[key])
    }


def shown(value: Any) -> str:
    """A setting's value as a config file writes it (``false``, ``null``, ``"honest"``, ``[2, 4]``)."""
    return json.dumps(canonical(value))


def describe_changes(changes: Mapping[str, tuple], first: str, second: str) -> str:
    """``key: <first> a, <second> b; ...`` for a one-line message."""
    return "; ".join(f"{key}: {first} {shown(old)}, {second} {shown(new)}" for key, (old, new) in changes.items())


def evaluation_change_line(changes: Mapping[str, tuple], source: str) -> str:
    """The one line a run prints when its evaluation settings differ from the checkpoint's."""
    listed = ", ".join(f"{key} {shown(old)} -> {shown(new)}" for key, (old, new) in changes.items())
    return f"evaluation settings changed relative to {source}: {listed}"
