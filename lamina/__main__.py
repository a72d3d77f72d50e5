"""``python -m lamina`` (also what ``torchrun -m lamina`` runs)."""

import sys

from .cli import main

sys.exit(main())
