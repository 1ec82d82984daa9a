"""``python -m isample ...`` is the ``isample`` command."""

import sys

from .cli import main

sys.exit(main())
