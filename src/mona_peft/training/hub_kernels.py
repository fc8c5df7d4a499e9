"""Hub kernels off by default while this package loads models.

transformers 5.25 started to apply "hub kernels" by default whenever the ``kernels`` package is installed (and it is
a dependency of transformers 5.25): at load time, and again at every ``model.train()`` / ``model.eval()``, it swaps
some layers (e.g. the activation) for kernels fetched from the Hugging Face Hub. On a GPU with the Hub offline that
fails before training starts ("Version 1 of 'kernels-community/activation' is not available in the local cache and
Hugging Face Hub is in offline mode", seen on an NVIDIA H200 with transformers 5.25.0 and kernels 0.19.1), which
breaks the package's offline default run. The pipelines here therefore load with hub kernels off unless the user
chose otherwise through transformers' own switch, ``USE_HUB_KERNELS`` (``USE_HUB_KERNELS=1`` turns them back on).
Earlier transformers lines do not read the variable and never applied hub kernels by default.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

ENV_VAR = "USE_HUB_KERNELS"


@contextlib.contextmanager
def hub_kernels_off_by_default() -> Iterator[None]:
    """Within the block (or the decorated function), models load without hub kernels, unless ``USE_HUB_KERNELS`` is
    set, in which case it is left as the user set it. The variable is restored afterwards."""
    if ENV_VAR in os.environ:
        yield
        return
    os.environ[ENV_VAR] = "0"
    try:
        yield
    finally:
        os.environ.pop(ENV_VAR, None)
