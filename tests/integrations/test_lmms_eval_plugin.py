"""The lmms-eval plugin: request mapping (always), and with lmms-eval importable, registration and generate_until.

The tests that need lmms-eval skip when it cannot be imported (CI does not install it: it depends on torchvision).
To run them on a CPU machine, install it beside the project without dependencies, e.g.
``pip install --no-deps --target /tmp/lmms_site lmms-eval loguru pytz`` and ``PYTHONPATH=/tmp/lmms_site pytest ...``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from llava_stf.data.conversation import VICUNA_SYSTEM
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.integrations import LMMS_EVAL_MODEL_ID, lmms_eval_models
from llava_stf.integrations import lmms_eval as plugin
from llava_stf.testing import make_image, save_tiny_checkpoint, tiny_config, tiny_model, tiny_processor, tiny_tokenizer

SETTINGS_FIELDS = {f.name for f in dataclasses.fields(GenerationSettings)}
ENTRY_POINT = "llava_stf = llava_stf.integrations:lmms_eval_models"  # the pyproject line, as lmms-eval reads it


# ------------------------------------------------------------------------------- pure mapping: no lmms-eval needed
def test_build_request_puts_the_image_tag_first_and_uses_the_saved_template() -> None:
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer, "mlp2x_gelu")
    generator = Generator(tiny_model(config), tiny_processor(config, tokenizer))
    image = make_image(0)
    request = plugin.build_request("What is it?\nAnswer with one word.", [[image]])  # nested lists are flattened
    assert request.image is image
    assert generator.prompt(request) == f"{VICUNA_SYSTEM} USER: <image>\nWhat is it?\nAnswer with one word. ASSISTANT:"
    tagged = plugin.build_request("Look: <image>\nWhat is it?", image)  # a tag already in the context stays put
    assert generator.prompt(tagged) == f"{VICUNA_SYSTEM} USER: Look: <image>\nWhat is it? ASSISTANT:"
    for no_image in (None, [], [None]):
        text_only = plugin.build_request("Which number comes after two?", no_image)
        assert text_only.image is None
        assert generator.prompt(text_only) == f"{VICUNA_SYSTEM} USER: Which number comes after two? ASSISTANT:"


def test_build_request_rejects_what_one_llava_prompt_cannot_hold() -> None:
    with pytest.raises(ValueError, match="this doc has 2 images"):
        plugin.build_request("Compare them.", [make_image(0), make_image(1)])
    with pytest.raises(TypeError, match="PIL images only; doc_to_visual gave a str"):
        plugin.build_request("What happens?", ["/videos/clip.mp4"])
    with pytest.raises(ValueError, match="holds 2 '<image>' tag\\(s\\) but the doc has 1 image"):
        plugin.build_request("<image> and <image>?", [make_image(0)])
    with pytest.raises(ValueError, match="holds 1 '<image>' tag\\(s\\) but the doc has 0 image"):
        plugin.build_request("<image>\nWhat is it?", [])
    with pytest.raises(TypeError, match="context must be a string"):
        plugin.build_request(["What?"], [])


def test_generation_settings_map_task_kwargs() -> None:
    settings, stops = plugin.generation_settings({"max_new_tokens": 16, "until": "\n\n", "temperature": 0})
    assert settings.max_new_tokens == 16 and stops == ("\n\n",)
    settings, stops = plugin.generation_settings({"until": ["ASSISTANT:", ""]}, default_max_new_tokens=7)
    assert settings.max_new_tokens == 7 and stops == ("ASSISTANT:",)  # empty stop strings mean nothing
    greedy_anyway = {"do_sample": False, "top_p": 1.0, "num_beams": 1, "use_cache": True, "image_aspect_ratio": "pad"}
    settings, _ = plugin.generation_settings({**greedy_anyway, "max_new_tokens": None})
    assert settings == GenerationSettings(max_new_tokens=plugin.DEFAULT_MAX_NEW_TOKENS)
    for bad, message in [({"until": 3}, "'until' must be"), ({"max_new_tokens": 0}, "positive integer")]:
        with pytest.raises(ValueError, match=message):
            plugin.generation_settings(bad)


def test_sampling_knobs_apply_only_when_the_task_samples() -> None:
    greedy, _ = plugin.generation_settings({"temperature": 0, "top_p": 0, "top_k": 5, "do_sample": True})
    assert greedy == GenerationSettings(max_new_tokens=plugin.DEFAULT_MAX_NEW_TOKENS)  # top_p 0 is common in tasks
    sampled, _ = plugin.generation_settings({"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 5})
    assert (sampled.temperature, sampled.top_p, sampled.max_new_tokens) == (0.2, 0.9, 5)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_beams": 4}, {"length_penalty": 2.0}, {"repetition_penalty": 1.2}, {"temperature": 0.7, "top_k": 40}],
)
def test_settings_generator_cannot_honour_are_errors_not_ignored(kwargs: dict) -> None:
    key, value = list(kwargs.items())[-1]
    assert key not in SETTINGS_FIELDS  # the Generator has no such setting, so it must not be silently dropped
    with pytest.raises(ValueError, match=rf"{key}={value!r} is not supported.*--gen_kwargs"):
        plugin.generation_settings(kwargs)


def test_cut_at_stop_takes_the_earliest_stop() -> None:
    assert plugin.cut_at_stop("yes\n\nThe image shows", ["\n\n"]) == "yes"
    assert plugin.cut_at_stop("a cat. USER: and", ["USER:", "."]) == "a cat"
    assert plugin.cut_at_stop("no stop here", ["###", ""]) == "no stop here"


def test_plan_batches_groups_settings_longest_first_and_covers_every_request() -> None:
    keys = ["a", "b", "a", "a", "b", "a"]
    lengths = [5, 9, 30, 5, 1, 12]
    batches = plugin.plan_batches(keys, lengths, batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(len(keys)))
    assert all(len(b) <= 2 and len({keys[i] for i in b}) == 1 for b in batches)
    order_a = [i for b in batches for i in b if keys[i] == "a"]
    assert order_a == [2, 5, 0, 3]  # longest first; equal lengths keep request order
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        plugin.plan_batches(keys, lengths, 0)


def test_without_lmms_eval_the_class_and_entry_point_say_how_to_install(monkeypatch, tmp_path) -> None:
    for name in [n for n in sys.modules if n == "lmms_eval" or n.startswith("lmms_eval.")] + ["lmms_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes every lmms_eval import fail, installed or not
    spec = importlib.util.spec_from_file_location("llava_stf.integrations._lmms_eval_absent", plugin.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the module itself still imports
    with pytest.raises(ImportError, match="pip install --no-deps 'lmms-eval"):
        module.LlavaStfLmms(pretrained=str(tmp_path))
    with pytest.raises(ImportError, match="lmms-eval is not installed"):
        lmms_eval_models()


# ------------------------------------------------------------------------------------ with lmms-eval importable
@pytest.fixture(scope="module")
def lmms_api():
    return pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed (optional; not in CI)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("lmms") / "llava-stf-tiny")


@pytest.fixture(scope="module")
def lm(lmms_api, checkpoint):
    """Built as lmms-eval's CLI builds it: ``--model_args`` string plus the CLI's batch_size/device settings."""
    extra = {"batch_size": "2", "max_batch_size": None, "device": None}
    return plugin.LlavaStfLmms.create_from_arg_string(f"pretrained={checkpoint},device=cpu", extra)


def _instances(contexts, gen_kwargs, doc_to_visual, task="toy"):
    from lmms_eval.api.instance import Instance

    return [
        Instance("generate_until", (c, dict(k), doc_to_visual, i, task, "test"), 0, {"task": task, "doc_id": i,
                 "repeats": 1})
        for i, (c, k) in enumerate(zip(contexts, gen_kwargs))
    ]  # fmt: skip


def test_entry_point_registers_llava_stf_with_lmms_eval(lmms_api, monkeypatch, tmp_path) -> None:
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    dist_info = tmp_path / "llava_stf_plugin_check-0.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: llava-stf-plugin-check\nVersion: 0.0\n")
    (dist_info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{ENTRY_POINT}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ModelRegistryV2()
    with pytest.raises(ValueError, match="not found"):
        registry.get_model_class(LMMS_EVAL_MODEL_ID)
    registry.load_entrypoint_manifests()
    cls = registry.get_model_class(LMMS_EVAL_MODEL_ID)  # also checks: subclass of lmms, is_simple matches
    assert cls is plugin.LlavaStfLmms and issubclass(cls, lmms_api.lmms)


def test_generate_until_answers_equal_generator_answers(lm, checkpoint) -> None:
    docs = [
        {"q": "What is shown in the image?", "image": make_image(0, (48, 40))},
        {"q": "Which number comes after two?", "image": None},
        {"q": "How many shapes are there? Answer the question using a single word or phrase.",
         "image": make_image(1, (20, 50))},
        {"q": "Is there a green star?", "image": make_image(2, (33, 33))},
        {"q": "Describe the image briefly.", "image": make_image(3, (64, 30))},
    ]  # fmt: skip
    lm.task_dict = {"toy": {"test": docs}}
    generator = Generator.from_pretrained(checkpoint, device="cpu")

    def single(doc, max_new_tokens):
        return generator.generate([Request.single(doc["q"], doc["image"])], GenerationSettings(max_new_tokens))[0]

    long_answers = [single(d, 8) for d in docs]
    cut_doc = max(range(len(docs)), key=lambda i: len(long_answers[i]))
    assert len(long_answers[cut_doc]) >= 3, long_answers
    stop = long_answers[cut_doc][1:3]  # a stop string taken from a real answer, so cutting must happen
    kwargs = [{"max_new_tokens": 8, "temperature": 0, "until": [stop]} if i % 2 == 0 else {"max_new_tokens": 3}
              for i in range(len(docs))]  # fmt: skip
    expected = [long_answers[i].split(stop)[0].strip() if i % 2 == 0 else single(d, 3) for i, d in enumerate(docs)]
    answers = lm.generate_until(_instances([d["q"] for d in docs], kwargs, lambda doc: [doc["image"]]))
    assert answers == expected
    assert expected[cut_doc] != long_answers[cut_doc] and any(expected)


def test_bad_requests_are_clear_errors(lm, checkpoint) -> None:
    lm.task_dict = {"toy": {"test": [{"images": [make_image(0)]}, {"images": [make_image(0), make_image(1)]}]}}
    with pytest.raises(ValueError, match="task 'toy', split 'test', doc 1: .*2 images"):
        lm.generate_until(_instances(["a?", "b?"], [{}, {}], lambda doc: doc["images"]))

    def corrupt(doc):
        raise OSError("cannot identify image file 'x.jpg'")

    with pytest.raises(RuntimeError, match="doc 0: doc_to_visual failed: OSError: cannot identify"):
        lm.generate_until(_instances(["a?"], [{}], corrupt))
    with pytest.raises(ValueError, match="task 'toy': gen_kwargs num_beams=5 is not supported"):
        lm.generate_until(_instances(["a?", "b?"], [{}, {"num_beams": 5}], lambda doc: doc["images"]))
    with pytest.raises(NotImplementedError, match="generation tasks only"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])
    with pytest.raises(FileNotFoundError, match="local llava_stf checkpoint folder"):
        plugin.LlavaStfLmms(pretrained=str(checkpoint / "missing"))
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; valid"):
        plugin.LlavaStfLmms(pretrained=str(checkpoint), dtype="fp8")
    with pytest.raises(ValueError, match="'auto' is not supported"):
        plugin.LlavaStfLmms(pretrained=str(checkpoint), batch_size="auto")
