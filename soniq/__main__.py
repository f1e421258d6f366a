"""``python -m soniq`` is the ``soniq`` command."""

import sys

from soniq.cli import main

sys.exit(main())
