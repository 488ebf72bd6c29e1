"""``python -m mkiso`` is ``mkiso-server``."""

import sys

from .server import main

sys.exit(main())
