"""The progress event: the one contract between the engine's child process and whoever runs it.

The engine writes each :class:`ProgressEvent` as one JSON object per line (:meth:`ProgressEvent.to_json`); the Slicer
module reads them back with :func:`parse_progress_line`. Standard library only, so the module can import it inside
Slicer before the engine's dependencies (torch, tqdm) are installed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, Optional

LEVELS = ("info", "warning")
"""Event levels: ``warning`` marks a message the user should act on."""


@dataclass(frozen=True)
class ProgressEvent:
    """Where a stage is: ``step`` of ``total`` done, with the latest loss or metric and the estimated time left.

    ``level`` is ``info``, or ``warning`` for a message the user should act on (e.g. a run estimated to take many
    hours); reporters show warnings as such.
    """

    stage: str
    step: int
    total: int
    loss: Optional[float] = None
    metric: Optional[float] = None
    eta_s: Optional[float] = None
    message: str = ""
    level: str = "info"

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")

    @property
    def fraction(self) -> Optional[float]:
        """How much of the stage is done, in [0, 1]; None when the stage does not know its length."""
        if self.total <= 0:
            return None
        return min(max(self.step / self.total, 0.0), 1.0)

    def to_json(self) -> str:
        """One line of JSON with every field (None as null)."""
        return json.dumps(dataclasses.asdict(self))


def parse_progress_line(line: str) -> Optional[ProgressEvent]:
    """The progress event on one line of the engine's stdout, or None when the line is not one (it is log text).

    Lenient where a newer engine might differ: missing numbers read as 0 or None, an unknown level as ``info``.
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        fields = json.loads(text)
    except ValueError:
        return None
    if not isinstance(fields, dict) or not isinstance(fields.get("stage"), str):
        return None
    try:
        return ProgressEvent(
            stage=fields["stage"],
            step=int(fields.get("step") or 0),
            total=int(fields.get("total") or 0),
            loss=_optional_float(fields.get("loss")),
            metric=_optional_float(fields.get("metric")),
            eta_s=_optional_float(fields.get("eta_s")),
            message=str(fields.get("message") or ""),
            level=fields.get("level") if fields.get("level") in LEVELS else "info",
        )
    except (TypeError, ValueError):
        return None


def _optional_float(value: object) -> Optional[float]:
    if value is None or isinstance(value, bool):
        return None
    return float(value)  # type: ignore[arg-type]


def format_duration(seconds: float, translate: Callable[[str], str] = str) -> str:
    """A short duration: '41 h 05 min', '4 min 20 s', '12 s', '0.4 s'. ``translate`` maps each pattern to the
    user's language before it is filled (the Slicer module passes its ``_``)."""
    if seconds < 10:
        return translate("{seconds:.1f} s").format(seconds=seconds)
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return translate("{hours} h {minutes:02d} min").format(hours=hours, minutes=minutes)
    if minutes:
        return translate("{minutes} min {seconds:02d} s").format(minutes=minutes, seconds=secs)
    return translate("{seconds} s").format(seconds=secs)
