"""The configs shipped inside the package: model presets, training recipes and data mixes, DeepSpeed files.

``model/*.yaml`` are presets (:mod:`llava_stf.model.presets`), ``train/*.yaml`` are ``--config`` files for
``llava_stf.train.run`` and ``deepspeed/*.json`` are ZeRO settings. They live in the package so that a plain
``pip install`` carries them (``[tool.setuptools.package-data]``); the repository's top-level ``configs`` is a
symlink to this folder, so the documented ``configs/...`` paths work in a checkout.

:func:`resolve` takes what a user typed: an existing file wins; otherwise a bare shipped name (``finetune``,
``zero2``, ``llava-stf-7b.yaml``) or a documented ``configs/<kind>/<file>`` path names the packaged file, from any
working directory.
"""

from __future__ import annotations

from pathlib import Path

# A real folder, not an importlib.resources Traversable: DeepSpeed and the YAML readers take file paths, and the
# package is never imported from a zip (torch is not zip-safe either).
CONFIG_ROOT = Path(__file__).resolve().parent
SUFFIXES = {"model": ".yaml", "train": ".yaml", "deepspeed": ".json"}


def config_dir(kind: str) -> Path:
    """The packaged folder of one kind: ``model``, ``train`` or ``deepspeed``."""
    if kind not in SUFFIXES:
        raise KeyError(f"unknown config kind {kind!r}; valid: {sorted(SUFFIXES)}")
    folder = CONFIG_ROOT / kind
    if not folder.is_dir():  # an install built without [tool.setuptools.package-data]: say so, never list nothing
        raise FileNotFoundError(f"{folder} is missing: this llava_stf was installed without its shipped configs")
    return folder


def names(kind: str) -> list[str]:
    """The shipped configs of one kind, by name (file stem)."""
    return sorted(p.stem for p in config_dir(kind).glob(f"*{SUFFIXES[kind]}"))


def resolve(kind: str, name_or_path: str | Path) -> Path:
    """``name_or_path`` if it is a file, else the shipped config it names.

    Raises:
        FileNotFoundError: neither a file nor a shipped name; the message lists the shipped names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    suffix = SUFFIXES[kind]
    if len(path.parts) == 1:
        candidate = config_dir(kind) / (path.name if path.name.endswith(suffix) else path.name + suffix)
    elif path.parts[:2] == ("configs", kind):  # the documented checkout path, run from another folder
        candidate = CONFIG_ROOT.joinpath(*path.parts[1:])
    else:
        candidate = None
    if candidate is not None and candidate.is_file():
        return candidate
    raise FileNotFoundError(f"no {kind} config {str(name_or_path)!r}: not a file, nor one of the shipped {names(kind)}")


__all__ = ["CONFIG_ROOT", "SUFFIXES", "config_dir", "names", "resolve"]
