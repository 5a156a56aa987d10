"""scripts/binding_toy.py: the oracle tokens encode the scene, and a short run prints per-family accuracy."""

import importlib.util
import random
from pathlib import Path

import pytest

from llava_stf.data.synthetic import COLORS, GRID, SHAPES, sample_scene

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "binding_toy.py"


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("binding_toy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cell_tokens_carry_each_object_at_its_cell(toy):
    scene = sample_scene(random.Random(3), "x")
    tokens = toy.oracle_tokens(scene, 0)
    assert tokens.shape == (GRID * GRID, toy.ATTRS)
    occupied = {obj.row * GRID + obj.col: obj for obj in scene.objects}
    for index in range(GRID * GRID):
        row = tokens[index]
        if index in occupied:
            obj = occupied[index]
            assert row[list(COLORS).index(obj.color)] == 1
            assert row[len(COLORS) + list(SHAPES).index(obj.shape)] == 1
        else:
            assert row[: len(COLORS) + len(SHAPES)].sum() == 0  # empty cell: no colour, no shape


def test_patch_tokens_mark_the_patch_under_an_object(toy):
    scene = sample_scene(random.Random(5), "x")
    tokens = toy.oracle_tokens(scene, 8)
    assert tokens.shape == (64, toy.ATTRS + 16)
    obj = scene.objects[0]
    centre = int((obj.row + 0.5) * 64 / GRID // 8) * 8 + int((obj.col + 0.5) * 64 / GRID // 8)
    assert tokens[centre, list(COLORS).index(obj.color)] == 1


def test_short_run_prints_accuracy_per_family(toy, capsys):
    toy.main(["--steps", "2", "--batch", "4", "--held-out", "20", "--width", "64", "--eval-every", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert len(lines) == 2 and "'all':" in lines[-1] and "'color':" in lines[-1]
