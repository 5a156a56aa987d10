"""The comparison's paired differences: the t quantile against textbook values, the interval, the Markdown rows."""

from __future__ import annotations

import pytest

from llava_stf.demo.compare import paired_lines
from llava_stf.demo.paired import paired_difference, t_cdf, t_quantile


@pytest.mark.parametrize(("df", "expected"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_t_quantile_matches_the_textbook_table(df, expected) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert t_cdf(expected, df) == pytest.approx(0.975, abs=1e-4)
    assert t_cdf(-expected, df) == pytest.approx(0.025, abs=1e-4)


def test_paired_difference_uses_only_shared_seeds_and_the_t_interval() -> None:
    d = paired_difference({0: 32.0, 1: 34.0, 2: 33.0, 7: 90.0}, {0: 30.0, 1: 31.0, 2: 32.0})
    # differences 2, 3, 1: mean 2, sample std 1, half-width t(0.975, 2) / sqrt(3) = 2.484
    assert d.seeds == 3 and d.mean == pytest.approx(2.0)
    assert (d.low, d.high) == (pytest.approx(-0.484, abs=1e-3), pytest.approx(4.484, abs=1e-3))
    one = paired_difference({0: 40.0}, {0: 30.0, 1: 31.0})
    assert (one.mean, one.low, one.high, one.seeds) == (10.0, None, None, 1)
    assert paired_difference({3: 1.0}, {0: 1.0}) is None
    with pytest.raises(ValueError, match="p must lie in"):
        t_quantile(0.2, 3)


def test_paired_lines_pair_each_projector_with_the_base_of_its_seed() -> None:
    rows = [{"projector": p, "seed": s, "accuracy": a} for p, s, a in [
        ("mlp2x_gelu", 0, 30.0), ("mlp2x_gelu", 1, 31.0), ("mlp2x_gelu", 2, 32.0),
        ("mbtf_stf", 0, 32.0), ("mbtf_stf", 1, 34.0), ("mbtf_stf", 2, 33.0),
        ("mlp2x_gelu+pool@16", 0, 25.0)]]  # fmt: skip
    lines = paired_lines(rows)
    assert "| mbtf_stf | +2.0 | -0.5 to +4.5 | 3 |" in lines
    assert "| mlp2x_gelu+pool@16 | -5.0 | — (one seed) | 1 |" in lines
    assert not any(line.startswith("| mlp2x_gelu |") for line in lines)
    assert paired_lines([r for r in rows if r["projector"] != "mlp2x_gelu"]) == []  # no base: no section
