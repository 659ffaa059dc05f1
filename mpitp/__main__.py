"""``python -m mpitp`` is ``python -m mpitp.generate``."""

import sys

from .generate import main

sys.exit(main())
