"""Known start-up noise of optional libraries, dropped from lamina's CLI output.

transformers imports torchao when it is installed (the ``quantize`` extra), and
on a machine without CUDA that import logs lines no lamina user can act on:
torchao's CUDA kernel libraries (``_C*.so``) "failed to load", Triton is
"not detected", and torch's pytree warns torchao's own code that registering an
Enum is deprecated. They are printed on every model-loading command.

Only those messages are dropped, matched on the logger, the message text and
(for the CUDA ones) the absence of CUDA; any other warning or error from these
libraries still shows, and ``--verbose`` shows everything. Filters sit on the
named loggers, so they work whether or not torch/torchao are imported yet, and
nothing is imported here (``lamina --help`` stays quick).
"""

from __future__ import annotations

import logging
import re

# (logger name, pattern over the formatted message, only when CUDA is missing)
_KNOWN = (
    ("torchao", re.compile(r"^Failed to load \S*torchao[/\\]_C\w*\.(\S+\.)?so\b"), True),
    ("torchao.kernel.intmm", re.compile(r"Detected no triton"), True),
    ("torch.utils._pytree", re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
     False),
)


def _no_cuda() -> bool:
    import sys
    torch = sys.modules.get("torch")  # the message comes from an import of torch's: it is loaded by now
    return torch is None or not torch.cuda.is_available()


class _DropKnown(logging.Filter):
    def __init__(self, pattern: re.Pattern, cuda_only: bool):
        super().__init__()
        self.pattern, self.cuda_only = pattern, cuda_only

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge: let it through
            return True
        if not self.pattern.search(text):
            return True
        return self.cuda_only and not _no_cuda()  # keep it where CUDA exists: the kernels should load there


def quiet_known_noise() -> None:
    """Drop the known start-up lines (idempotent). Call before the command imports transformers."""
    for name, pattern, cuda_only in _KNOWN:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(pattern, cuda_only))
