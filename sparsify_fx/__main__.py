"""``python -m sparsify_fx``: the command line."""

import sys

from sparsify_fx.cli.main import main

__all__: list[str] = []

sys.exit(main())
