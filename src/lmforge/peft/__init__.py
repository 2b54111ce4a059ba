"""What peft lacks, registered into peft: bottleneck adapters (``peft_type: BOTTLENECK``).

Importing this package registers them, after which peft's own API saves and loads them::

    import lmforge.peft  # noqa: F401  (registers BOTTLENECK)
    from peft import PeftModel
    model = PeftModel.from_pretrained(base_model, "outputs/tiny/finetune_adapter/final")
"""

from lmforge.peft.bottleneck import BottleneckConfig, BottleneckLayer, BottleneckModel, register

register()

__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckModel", "register"]
