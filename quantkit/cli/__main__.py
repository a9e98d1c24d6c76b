"""``python -m quantkit.cli``: the ``quantkit`` command."""

import sys

from . import main

sys.exit(main())
