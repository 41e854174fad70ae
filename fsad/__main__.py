"""``python -m fsad`` runs the ``fsad`` command."""

import sys

from fsad.cli import main

sys.exit(main())
