"""``python -m zotune.bench.claims``: see :mod:`zotune.bench.claims.cli`."""

from .cli import main

raise SystemExit(main())
