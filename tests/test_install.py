"""A plain (non-editable) install carries everything the package reads at run time.

The shipped configs resolve by name (or by their documented ``configs/...`` path) from any working directory. The
slow tests check a real install: the checkout's sources are copied to a clean folder, built into a wheel offline (no
build isolation: the running environment's setuptools, which the ``test`` extra pins), installed with ``pip install
--target``, and run from an unrelated working directory with only that folder on ``PYTHONPATH``. The clean copy
matters: a build inside the checkout reuses ``build/lib`` from earlier builds, which would hide a file that
``package-data`` no longer ships.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_stf import configs
from llava_stf.model.presets import list_presets
from llava_stf.train.arguments import parse_config

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.py", "setup.cfg")


def run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    """Run a command; its stdout, or a failure that shows the command and the tail of its output."""
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The folder the wheel of the checkout was installed into."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "llava_stf", src / "llava_stf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("llava_stf-*.whl")
    run(*pip, "install", "--no-deps", "--no-index", "--target", tmp / "site", wheel, cwd=tmp)
    return tmp / "site"


@pytest.fixture
def env(site) -> dict[str, str]:
    """The environment of a user of the installed wheel: offline, and nothing of the checkout on the path."""
    return {
        **os.environ,
        "PYTHONPATH": str(site),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }


def test_shipped_names_and_documented_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = configs.CONFIG_ROOT
    assert (ROOT / "configs").resolve() == shipped  # the checkout's documented configs/ is the package's folder
    assert configs.resolve("model", "llava-v1.5-7b") == shipped / "model" / "llava-v1.5-7b.yaml"
    assert configs.resolve("deepspeed", "zero2.json") == shipped / "deepspeed" / "zero2.json"
    assert configs.resolve("train", "configs/train/finetune.yaml") == shipped / "train" / "finetune.yaml"
    (tmp_path / "finetune.yaml").write_text("stage: finetune\n")
    assert configs.resolve("train", "finetune.yaml") == Path("finetune.yaml")  # a file given by path wins
    with pytest.raises(FileNotFoundError, match="finetune_lora"):
        configs.resolve("train", "finetune-lora")
    cpu = ["--use_cpu", "true", "--tf32", "false", "--bf16", "false", "--report_to", "none"]
    cfg = parse_config(["--config", "pretrain", *cpu])  # its YAML says deepspeed: configs/deepspeed/zero2.json
    assert cfg.training.deepspeed == str(shipped / "deepspeed" / "zero2.json") and cfg.model.preset == "llava-stf-7b"
    cfg = parse_config(["--config", str(shipped / "train" / "pretrain.yaml"), "--deepspeed", "zero3", *cpu])
    assert cfg.training.deepspeed == str(shipped / "deepspeed" / "zero3.json")


@pytest.mark.slow
def test_the_wheel_ships_every_data_file_of_the_package(site):
    package = ROOT / "llava_stf"
    data = [p.relative_to(ROOT) for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert any(p.suffix == ".yaml" for p in data), f"no YAML in {package}: the configs moved?"
    missing = sorted(str(p) for p in data if not (site / p).is_file())
    assert not missing, f"the wheel lacks {missing}: declare them in pyproject's [tool.setuptools.package-data]"


@pytest.mark.slow
def test_presets_run_from_the_installed_wheel(site, env, tmp_path):
    imported = run(sys.executable, "-c", "import llava_stf; print(llava_stf.__file__)", cwd=tmp_path, env=env).strip()
    assert Path(imported).is_relative_to(site), f"imported {imported}, not the installed wheel in {site}"
    listing = run(sys.executable, "-m", "llava_stf.model.presets", cwd=tmp_path, env=env)
    missing = [name for name in list_presets() if name not in listing]
    assert "llava-stf-7b" in list_presets() and not missing, f"the installed wheel lists no {missing}:\n{listing}"
    shown = run(site / "bin" / "llava-stf", "presets", "llava-stf-7b", cwd=tmp_path, env=env)  # the console script
    assert "llava-stf-7b" in shown and "mbtf_stf" in shown
    code = "from llava_stf.configs import resolve; print(resolve('train', 'finetune'), resolve('deepspeed', 'zero2'))"
    paths = run(sys.executable, "-c", code, cwd=tmp_path, env=env).split()
    assert len(paths) == 2 and all(Path(p).is_relative_to(site) for p in paths), paths


@pytest.mark.slow
def test_demo_runs_from_the_installed_wheel(env, tmp_path):
    out = run(sys.executable, "-m", "llava_stf.demo", "--fast", "--no-progress", "--out", tmp_path / "demo",
              cwd=tmp_path, env=env)  # fmt: skip
    assert "accuracy:" in out and "visual tokens per image" in out
