"""Adapters that let other tools run ``llava_stf`` checkpoints; each needs its tool only when it is used.

``lmms_eval``: the ``llava_stf`` model for lmms-eval (``lmms-eval --model llava_stf --model_args pretrained=CKPT``).
lmms-eval finds it through the Python entry-point group ``lmms_eval.models``, whose entry names
``lmms_eval_models`` below. That function stays light (it imports only lmms-eval's manifest class), because lmms-eval
loads every plugin's entry point on start-up, whichever model is asked for.
"""

from __future__ import annotations

from typing import Any

LMMS_EVAL_MODEL_ID = "llava_stf"  # the name given to ``lmms-eval --model``
LMMS_EVAL_CLASS_PATH = "llava_stf.integrations.lmms_eval.LlavaStfLmms"
LMMS_EVAL_INSTALL_HINT = (
    "lmms-eval is not installed: pip install 'lmms-eval>=0.7.3,<0.8' (GPU machines; it depends on torchvision). On a "
    "CPU-only machine install it without dependencies, since torchvision would replace the CPU torch with a CUDA "
    "one: pip install --no-deps 'lmms-eval>=0.7.3,<0.8' loguru pytz (what its model API imports; its task runner "
    "needs more of its dependencies)"
)


def lmms_eval_models() -> Any:
    """The entry point lmms-eval loads: a ``ModelManifest`` naming ``llava_stf``'s simple-model class.

    Raises:
        ImportError: If lmms-eval is not installed (with the install command).
    """
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError as error:
        raise ImportError(LMMS_EVAL_INSTALL_HINT) from error
    return ModelManifest(model_id=LMMS_EVAL_MODEL_ID, simple_class_path=LMMS_EVAL_CLASS_PATH)


__all__ = ["LMMS_EVAL_CLASS_PATH", "LMMS_EVAL_INSTALL_HINT", "LMMS_EVAL_MODEL_ID", "lmms_eval_models"]
