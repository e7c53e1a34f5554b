"""The label-efficiency benchmark's cell bookkeeping: parallel workers share the cells exactly once."""
from __future__ import annotations

import argparse

import pytest

from benchmarks.label_efficiency.run import SCALES, Cell, _parse_part, all_cells, share_of_cells


def test_workers_share_every_cell_exactly_once_and_the_longest_cells_are_spread() -> None:
    scale = SCALES["h200"]
    cells = all_cells([0, 1])
    assert len({c.name for c in cells}) == len(cells) == 24
    for parts in (1, 2, 5, 6):
        shares = [share_of_cells(cells, scale, k, parts) for k in range(parts)]
        names = [c.name for share in shares for c in share]
        assert sorted(names) == sorted(c.name for c in cells)  # every cell once, none twice
        loads = [sum(c.cost(scale) for c in share) for share in shares]
        # longest-first to the least loaded worker: no worker carries more than the average plus
        # the longest single cell
        assert max(loads) <= sum(loads) / parts + max(c.cost(scale) for c in cells)
    heaviest = sorted(cells, key=lambda c: -c.cost(scale))[:2]
    first, second = (share_of_cells(cells, scale, k, 2) for k in range(2))
    assert (heaviest[0] in first) != (heaviest[1] in first)  # the two heaviest go to different workers


def test_cells_trained_with_other_epochs_or_features_have_their_own_names() -> None:
    plain = all_cells([0])
    tagged = all_cells([0], {"segment": "_ep40"})
    assert [c.name for c in plain if c.task == "classify"] == [c.name for c in tagged if c.task == "classify"]
    seg = [c.name for c in tagged if c.task == "segment"]
    assert seg and all(name.endswith("_ep40") for name in seg)
    assert Cell("classify", "knee", "scratch", 0.1, 3).name == "knee_classify_scratch_10pct_seed3"


@pytest.mark.parametrize("text", ["3", "2/2", "-1/4", "a/b"])
def test_cells_option_must_be_k_of_n(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--cells"):
        _parse_part(text)
    assert _parse_part("1/4") == (1, 4)
