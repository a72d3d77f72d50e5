"""``python -m lamina`` (also what ``torchrun -m lamina`` runs)."""

import os
import sys

# `python -m` puts the current folder first on sys.path; lamina is imported already, so drop it: a downloaded
# folder you run lamina from cannot shadow the libraries lamina imports later (transformers, safetensors, ...)
# or a factory module. The plain `lamina` command never had it. (Python's -P flag does the same.)
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from .cli import main  # noqa: E402

sys.exit(main())
