"""``python -m ditepose``: the same as the ``ditepose`` command."""

from ditepose.cli import main

raise SystemExit(main())
