"""Two-stage LLaVA training: stage table, typed run config, ``Trainer`` subclass, stage hand-offs and the recipe.

``stages`` (what trains and what is saved per stage), ``arguments`` (YAML -> dataclasses -> CLI), ``trainer``
(``LlavaStfTrainer``: projector learning rate, LLaVA's sampler, bad-sample accounting), ``checkpoint`` (complete
checkpoints, projector file (with an AnyRes model's ``image_newline``), LoRA merge and adapter), ``output_dir``
(new / resumed / overwriting runs, the crash-safe final save), ``run`` (``python -m llava_stf.train.run``) and
``fixtures`` (tiny towers and generated data for tests and benchmarks).
"""

from .arguments import DataArguments, ModelArguments, RunConfig, StageArguments, parse_config
from .checkpoint import PROJECTOR_FILE, load_projector, merge_lora_state_dict, save_projector
from .stages import STAGES, Stage, apply_stage, get_stage, parameter_counts, wrap_lora
from .trainer import LlavaStfTrainer

__all__ = [
    "PROJECTOR_FILE",
    "STAGES",
    "DataArguments",
    "LlavaStfTrainer",
    "ModelArguments",
    "RunConfig",
    "Stage",
    "StageArguments",
    "apply_stage",
    "get_stage",
    "load_projector",
    "merge_lora_state_dict",
    "parameter_counts",
    "parse_config",
    "save_projector",
    "wrap_lora",
]
