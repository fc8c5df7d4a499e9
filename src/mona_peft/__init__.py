"""mona_peft: Mona, the multi-cognitive visual adapter (Yin et al., CVPR 2025), as a PEFT method.

Importing the package registers the ``"mona"`` method with PEFT, so ``get_peft_model(model, MonaConfig(...))`` and
``PeftModel.from_pretrained(base, path)`` work.
"""

from .registration import register_with_peft

# PeftType.MONA must exist before the config module is imported (its __post_init__ refers to it).
from .registration import extend_str_enum as _extend_str_enum  # isort: skip
from peft.utils import PeftType as _PeftType  # isort: skip

_extend_str_enum(_PeftType, "MONA", "MONA")

from .adapter import MonaAdapter  # noqa: E402
from .checkpoint import MonaCheckpointError  # noqa: E402
from .config import MonaConfig  # noqa: E402
from .layer import MonaLayer  # noqa: E402
from .model import MonaModel, set_compute  # noqa: E402

register_with_peft()
from .dispatch import MonaDispatchError, install_offload_loading  # noqa: E402

install_offload_loading()  # PeftModel.from_pretrained / load_adapter keep an offloaded base's dispatch (Mona only)
from .hub import load_from_hub, push_adapter_to_hub  # noqa: E402,F401 - also fixes PeftModel.push_to_hub's card

__version__ = "0.1.0"
__all__ = [
    "MonaAdapter",
    "MonaCheckpointError",
    "MonaConfig",
    "MonaDispatchError",
    "MonaLayer",
    "MonaModel",
    "load_from_hub",
    "push_adapter_to_hub",
    "register_with_peft",
    "set_compute",
    "__version__",
]
