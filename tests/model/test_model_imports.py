"""Import lint: ``llava_stf.model`` is pure model code and never imports training, evaluation, serving or data code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import llava_stf.model

MODEL_DIR = Path(llava_stf.model.__file__).resolve().parent
PACKAGE_ROOT = MODEL_DIR.parent.parent  # the folder that holds the ``llava_stf`` package
FORBIDDEN_PREFIXES = ("llava_stf.train", "llava_stf.eval", "llava_stf.serve", "llava_stf.data", "deepspeed")
FORBIDDEN_TRANSFORMERS_NAMES = {"Trainer", "Seq2SeqTrainer", "TrainingArguments", "Seq2SeqTrainingArguments"}


def module_name(path: Path) -> str:
    parts = list(path.resolve().relative_to(PACKAGE_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve_from(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """Absolute module of ``from <node.module> import ...`` written in module ``current``."""
    if node.level == 0:
        return node.module or ""
    package = current.split(".") if is_package else current.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        raise ImportError(f"relative import beyond the top-level package in {current}")
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(source: str, current: str, is_package: bool = False) -> list[tuple[str, int]]:
    """Every absolute module (and ``module.name`` for ``from module import name``) a source file imports."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(node, current, is_package)
            found.append((base, node.lineno))
            found.extend((f"{base}.{alias.name}" if base else alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, node.lineno))
    return found


def violations(source: str, current: str, is_package: bool = False) -> list[str]:
    bad = []
    for name, line in imported_modules(source, current, is_package):
        parts = name.split(".")
        if any(name == p or name.startswith(p + ".") for p in FORBIDDEN_PREFIXES):
            bad.append(f"line {line}: {name}")
        elif parts[0] == "transformers" and (
            "trainer" in parts[1:] or any(p.startswith("trainer") or p in FORBIDDEN_TRANSFORMERS_NAMES for p in parts)
        ):
            bad.append(f"line {line}: {name}")
    # ``transformers.Trainer`` used as an attribute without a from-import
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in FORBIDDEN_TRANSFORMERS_NAMES
            and isinstance(node.value, ast.Name)
            and node.value.id == "transformers"
        ):
            bad.append(f"line {node.lineno}: transformers.{node.attr}")
    return bad


MODEL_FILES = sorted(MODEL_DIR.rglob("*.py"))


def test_the_lint_sees_the_model_files():
    names = {p.relative_to(MODEL_DIR).as_posix() for p in MODEL_FILES}
    assert {"configuration_llava_stf.py", "modeling_llava_stf.py", "processing_llava_stf.py"} <= names
    assert any(n.startswith("projectors/") for n in names)


@pytest.mark.parametrize("path", MODEL_FILES, ids=[p.relative_to(MODEL_DIR).as_posix() for p in MODEL_FILES])
def test_model_file_imports_no_training_or_app_code(path):
    current = module_name(path)
    assert current.startswith("llava_stf.model")
    bad = violations(path.read_text(encoding="utf-8"), current, is_package=path.name == "__init__.py")
    assert not bad, f"{path}: forbidden imports {bad}"


# The checker itself must be able to fail: each snippet, placed in llava_stf/model/projectors/stf.py, is forbidden.
BAD_SNIPPETS = [
    "import deepspeed",
    "import deepspeed.comm as dist",
    "from deepspeed import zero",
    "from llava_stf.train import trainer",
    "import llava_stf.eval.scoring",
    "from llava_stf import serve",
    "from ...data import dataset",
    "from ... import train",
    "from ...train.loop import run",
    "from ...eval import scoring",
    "from transformers import Trainer",
    "from transformers import AutoModel, Seq2SeqTrainer",
    "from transformers.trainer import Trainer",
    "import transformers.trainer_utils",
    "import transformers\nx = transformers.Trainer",
    "import importlib\nimportlib.import_module('llava_stf.train')",
]
GOOD_SNIPPETS = [
    "import torch",
    "from transformers import AutoModel, LlavaConfig",
    "from transformers.models.llava.modeling_llava import LlavaModel",
    "from .base import Projector",
    "from ..configuration_llava_stf import LlavaStfConfig",
    "from ... import testing",
    "from llava_stf.model import PROJECTORS",
    "import dataclasses",  # not llava_stf.data
    "from llava_stf.database import x",  # prefix match is on dotted parts
]


@pytest.mark.parametrize("snippet", BAD_SNIPPETS)
def test_checker_flags_forbidden_imports(snippet):
    assert violations(snippet, "llava_stf.model.projectors.stf"), snippet


@pytest.mark.parametrize("snippet", GOOD_SNIPPETS)
def test_checker_allows_model_imports(snippet):
    assert not violations(snippet, "llava_stf.model.projectors.stf"), snippet


def test_relative_imports_resolve():
    assert imported_modules("from ..configuration_llava_stf import X", "llava_stf.model.projectors.stf")[0][0] == (
        "llava_stf.model.configuration_llava_stf"
    )
    assert imported_modules("from .base import X", "llava_stf.model.projectors", is_package=True)[0][0] == (
        "llava_stf.model.projectors.base"
    )
    assert imported_modules("from .. import train", "llava_stf.model", is_package=True)[1][0] == "llava_stf.train"


def test_importing_the_model_package_loads_no_training_code():
    """At run time too: a fresh interpreter importing ``llava_stf.model`` has none of the forbidden modules loaded."""
    code = (
        "import sys, llava_stf.model\n"
        f"prefixes = {FORBIDDEN_PREFIXES[:4]!r}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'deepspeed' or m.startswith(prefixes)]\n"
        "bad += [m for m in sys.modules if m in ('transformers.trainer', 'transformers.training_args')]\n"
        "print(repr(sorted(bad)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
