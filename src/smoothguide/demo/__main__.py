"""``python -m smoothguide.demo``: run the demo (see :mod:`smoothguide.demo.run`)."""

import sys

from .run import main

sys.exit(main())
