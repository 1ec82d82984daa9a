"""``python -m isample.bench``: the same command as ``isample bench``."""

import sys

from .command import main

sys.exit(main())
