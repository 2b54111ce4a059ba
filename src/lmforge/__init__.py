"""lmforge: a language model's whole life with the Hugging Face stack, driven by YAML recipes."""

import logging as _logging
import os as _os
import warnings as _warnings

__version__ = "0.1.0"


def quiet_third_party(verbose: bool = False) -> None:
    """Silence the lines every run printed that a user must learn to ignore: optional-kernel load failures
    of torchao and bitsandbytes on CPUs without them, torch's pytree deprecation notes, DeepSpeed's
    accelerator guess, transformers' over-long-sequence note during packing (blocks are cut after
    tokenizing) and deprecation FutureWarnings. ``lmforge -v ...`` (or LMFORGE_VERBOSE=1) keeps them."""
    if verbose:
        return
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes", "bitsandbytes.cextension", "DeepSpeed",
                 "datasets.builder"):
        _logging.getLogger(name).setLevel(_logging.ERROR)
    _warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    _warnings.filterwarnings("ignore", message=r".*Token indices sequence length is longer.*")
    _os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


quiet_third_party(_os.environ.get("LMFORGE_VERBOSE", "").lower() in ("1", "true", "yes"))
