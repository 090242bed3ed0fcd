"""``python -m SFRSegmentLib …``: the engine's command line (see :mod:`SFRSegmentLib.cli`)."""

from .cli import main

raise SystemExit(main())
