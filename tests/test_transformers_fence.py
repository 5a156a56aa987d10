"""The fence: every ``transformers`` name the package imports is on an allow-list of API we chose to depend on.

transformers releases monthly and moves internals freely (5.24 renamed ``past_key_values`` to ``cache`` and changed
the LLaVA output classes). Code that reaches past the public API breaks on a release in many places at once; with
this list a new dependency is a deliberate edit here, and drift shows up as one failure naming the file and line.
Private names (a leading underscore anywhere in the path) are never allowed.

``python tests/test_transformers_fence.py`` prints every name the package imports, with its uses and reason.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import llava_stf

PACKAGE = Path(llava_stf.__file__).resolve().parent

# name -> why it is safe to depend on. "top level": exported by ``transformers`` itself; "documented": a module the
# transformers docs present for extension; "source": module-level helper, stable for years but not documented.
ALLOWED: dict[str, str] = {
    **{
        f"transformers.{name}": "top level"
        for name in (
            "AutoConfig AutoModel AutoModelForCausalLM AutoModelForImageTextToText AutoProcessor AutoTokenizer "
            "BatchFeature BitsAndBytesConfig CLIPConfig CLIPImageProcessorPil CLIPModel CLIPVisionConfig "
            "CLIPVisionModel GenerationConfig HfArgumentParser LlamaConfig LlamaForCausalLM LlamaModel LlavaConfig "
            "LlavaForConditionalGeneration LlavaImageProcessorPil LlavaModel LlavaPreTrainedModel LlavaProcessor "
            "LlavaNextForConditionalGeneration LlavaNextImageProcessorPil LlavaNextModel LlavaNextPreTrainedModel "
            "LogitsProcessor LogitsProcessorList PreTrainedModel PreTrainedTokenizerBase PreTrainedTokenizerFast "
            "StoppingCriteria StoppingCriteriaList "
            "PrinterCallback ProcessorMixin ProgressCallback Trainer TrainerCallback TrainingArguments set_seed"
        ).split()
    },
    "transformers.LlavaNextConfig": "top level (convert --to llava-hf: the config of an exported AnyRes model)",
    "transformers.LlavaNextProcessor": "top level (convert --to llava-hf: the processor of an exported AnyRes model)",
    "transformers.activations.ACT2FN": "documented (activation registry)",
    "transformers.initialization": "documented (v5 init functions that skip loaded tensors)",
    "transformers.integrations.is_deepspeed_zero3_enabled": "documented (DeepSpeed integration: ZeRO-3 is on)",
    "transformers.masking_utils.create_causal_mask": "documented (mask builder for custom decoders, layer_idx)",
    "transformers.conversion_mapping.get_checkpoint_conversion_mapping": "documented (v5 key renaming on load)",
    "transformers.conversion_mapping.register_checkpoint_conversion_mapping": "documented (v5 key renaming)",
    "transformers.generation.streamers.BaseStreamer": "documented (streamer base class)",
    "transformers.trainer_utils.PREFIX_CHECKPOINT_DIR": "documented (checkpoint folder prefix)",
    "transformers.utils.logging": "documented (logging verbosity)",
    "transformers.trainer.TRAINING_ARGS_NAME": "source (file name the Trainer writes and resume reads)",
    "transformers.modeling_utils.set_zero3_state": "source (keeps zero.Init off the builder's meta shell)",
    "transformers.models.llama.modeling_llama.apply_rotary_pos_emb": "source (FastV's query/key RoPE)",
    "transformers.models.llama.modeling_llama.repeat_kv": "source (FastV's grouped-query keys)",
    "transformers.image_processing_utils.select_best_resolution": "source (AnyRes pinpoint choice)",
    "transformers.models.llava_next.modeling_llava_next.unpad_image": "source (AnyRes unpadding, the model's own)",
}


def imported_names() -> dict[str, list[str]]:
    """``{"transformers.x.Name": ["llava_stf/file.py:line", ...]}`` for every import in the package."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
                for alias in node.names:
                    found[f"{node.module}.{alias.name}"].append(f"{where}:{node.lineno}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "transformers":
                        found[alias.name].append(f"{where}:{node.lineno}")
    return dict(found)


def test_every_transformers_import_is_on_the_allow_list():
    outside = {name: places for name, places in imported_names().items() if name not in ALLOWED}
    lines = [f"{name} (at {', '.join(places)})" for name, places in sorted(outside.items())]
    assert not outside, "transformers names outside the allow-list in tests/test_transformers_fence.py:\n" + "\n".join(
        lines
    )


def test_no_private_transformers_name_is_allowed_or_imported():
    names = set(ALLOWED) | set(imported_names())
    private = sorted(n for n in names if any(part.startswith("_") for part in n.split(".")))
    assert not private, f"private transformers names: {private}"


def test_the_allow_list_has_no_stale_entries():
    stale = sorted(set(ALLOWED) - set(imported_names()))
    assert not stale, f"allowed but no longer imported (remove them from the list): {stale}"


def test_allowed_names_exist_in_the_installed_transformers():
    import importlib

    missing = []
    for name in ALLOWED:
        module, _, attr = name.rpartition(".")
        try:
            getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            try:
                importlib.import_module(name)
            except ImportError:
                missing.append(name)
    assert not missing, f"not in this transformers release: {missing}"


if __name__ == "__main__":  # the listing, for release notes and the dependency-upgrade checklist
    for name, places in sorted(imported_names().items()):
        print(f"{name:68} {len(places):2} use(s)  {ALLOWED.get(name, 'NOT ALLOWED')}")
