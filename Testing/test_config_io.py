"""Typed configuration from JSON: overrides applied, bad fields named."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Tuple

import pytest

from SFRSegmentLib.base.config_io import load_overrides, to_dict, with_overrides
from SFRSegmentLib.base.errors import InputError


@dataclass(frozen=True)
class Inner:
    iterations: int = 6000
    lr: float = 1e-3
    patch: Tuple[int, int, int] = (112, 112, 80)
    method: Literal["mt", "acmt"] = "mt"
    checkpoint: Optional[Path] = None

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")


@dataclass(frozen=True)
class Outer:
    seed: int = 1337
    inner: Inner = field(default_factory=Inner)


def test_overrides_are_applied_and_typed():
    cfg = with_overrides(Outer(), {"seed": 3, "inner": {"patch": [32, 32, 16], "lr": 1, "checkpoint": "/x.pth"}})
    assert cfg.seed == 3 and cfg.inner.patch == (32, 32, 16) and cfg.inner.lr == 1.0
    assert isinstance(cfg.inner.lr, float) and cfg.inner.checkpoint == Path("/x.pth")
    assert cfg.inner.iterations == 6000  # untouched fields keep their defaults
    assert to_dict(cfg) == {"seed": 3, "inner": {"iterations": 6000, "lr": 1.0, "patch": [32, 32, 16],
                                                 "method": "mt", "checkpoint": "/x.pth"}}
    assert with_overrides(Outer(), to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, field_path, text",
    [
        ({"inner": {"iterations": "many"}}, "inner.iterations", "must be a whole number, got str 'many'"),
        ({"inner": {"itrations": 5}}, "inner.itrations", "unknown option 'inner.itrations'"),
        ({"inner": {"patch": [1, 2]}}, "inner.patch", "must have 3 values, got 2"),
        ({"inner": {"method": "bcp"}}, "inner.method", "must be one of ['mt', 'acmt'], got 'bcp'"),
        ({"seed": True}, "seed", "must be a whole number"),
        ({"inner": {"iterations": 0}}, "inner", "iterations must be at least 1, got 0"),
    ],
)
def test_bad_values_name_the_field(tmp_path, overrides, field_path, text):
    with pytest.raises(InputError) as info:
        with_overrides(Outer(), overrides, source=tmp_path / "run.json")
    assert info.value.field == field_path
    assert text in str(info.value) and "run.json" in str(info.value)


def test_load_overrides_reports_bad_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="c.json: not valid JSON"):
        load_overrides(path)
    path.write_text("[1, 2]")
    with pytest.raises(InputError, match="expected a JSON object, got list"):
        load_overrides(path)
