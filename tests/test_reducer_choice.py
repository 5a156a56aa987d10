"""``llava_stf.reducer_choice``: a reducer chosen at load time, resolved against a checkpoint, and the shared-weight
variants ``bench.compare`` runs; and the provenance record that keeps answers of different reducers apart."""

from __future__ import annotations

import pytest
import torch

from llava_stf.errors import UserError
from llava_stf.generation import GenerationSettings, Generator, Request, load_checkpoint
from llava_stf.model import LlavaStfConfig, LlavaStfForConditionalGeneration, LlavaStfProcessor
from llava_stf.model.reducers import ReducerConfigError, budget_kwargs
from llava_stf.provenance import Provenance
from llava_stf.reducer_choice import ReducerChoice, reducer_variant
from llava_stf.testing import make_image, tiny_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny per-patch (mlp2x_gelu) checkpoint: 64 image tokens, 4 LLM layers (so FastV's K=2 drops tokens)."""
    path = tmp_path_factory.mktemp("choice") / "plain"
    tokenizer = tiny_tokenizer()
    config = LlavaStfConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(len(tokenizer),
                            num_hidden_layers=4), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                            projector_type="mlp2x_gelu")  # fmt: skip
    torch.manual_seed(0)
    LlavaStfForConditionalGeneration(config).eval().save_pretrained(path)
    tiny_processor(config, tokenizer).save_pretrained(path)
    return path


def test_budget_resolves_through_the_registry_and_labels_the_run(checkpoint):
    config = LlavaStfConfig.from_pretrained(checkpoint)
    resolved = ReducerChoice("fastv", None, 16).resolve(config)
    assert resolved.kwargs == budget_kwargs("fastv", 16, config.reducer_shapes()) == {"k": 2, "r": 0.75}
    assert resolved.changed and resolved.label == "fastv@16" and resolved.record() == {"type": "fastv", "kwargs": {
        "k": 2, "r": 0.75}}  # fmt: skip
    assert resolved.describe() == "fastv @ 16 tokens: k=2 r=0.75; 64 image tokens per image"
    explicit = ReducerChoice.from_flags("fastv", '{"k": 3, "r": 0.5}').resolve(config)
    assert explicit.label.startswith("fastv-") and len(explicit.label) == len("fastv-") + 8
    assert ReducerChoice("prumerge").resolve(config).label == "prumerge"
    none = ReducerChoice(None).resolve(config)
    assert not none.changed and none.label == "none" and none.describe() == "no reducer: 64 image tokens"
    assert not ReducerChoice("fastv", None, 16).resolve(resolved.config).changed  # what it has already
    assert ReducerChoice(None).resolve(resolved.config).changed
    with pytest.raises(ReducerConfigError, match="no token budget"):
        ReducerChoice("prumerge_plus", None, 32).resolve(config)
    with pytest.raises(UserError, match="give --tokens or --reducer-kwargs"):
        ReducerChoice.from_flags("fastv", {"k": 1}, 8)


@pytest.mark.parametrize(("name", "tokens"), [("fastv", 16), ("prumerge_plus", None), (None, None)])
def test_shared_weight_variant_answers_as_a_fresh_load(checkpoint, name, tokens):
    """``reducer_variant`` of a loaded model = ``load_checkpoint(..., reducer=)``, and it copies no weight."""
    model, processor = load_checkpoint(checkpoint, "cpu")
    choice = ReducerChoice(name, None, tokens)
    config = choice.resolve(model.config).config
    variant, variant_processor = reducer_variant(model, processor, config)
    fresh = Generator(*load_checkpoint(checkpoint, "cpu", reducer=choice))
    assert fresh.processor.num_image_tokens == variant_processor.num_image_tokens == config.num_image_tokens
    assert variant.config.reducer_type == name and isinstance(variant_processor, LlavaStfProcessor)
    shared = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in shared for p in variant.parameters())
    requests = [Request.single("What is shown?", make_image(1)), Request.single("Describe it briefly.", make_image(2))]
    shared_gen = Generator(variant, variant_processor)
    with torch.no_grad():
        a, b = (g.model(**g.encode(requests[:1])).logits for g in (shared_gen, fresh))
    torch.testing.assert_close(a, b)
    settings = GenerationSettings(max_new_tokens=4)
    assert shared_gen.generate(requests, settings) == fresh.generate(requests, settings)
    assert model.config.reducer_type is None  # the loaded model is untouched


def test_provenance_compares_the_reducer_and_reads_old_records():
    base = Provenance("sha256:aa", "sha256:bb", {"max_new_tokens": 4})
    old = Provenance.from_json(base.to_json())  # a record written before reducers were recorded
    assert old.reducer is None and "reducer" not in base.to_json() and not old.differences(base)
    fastv = Provenance("sha256:aa", "sha256:bb", {"max_new_tokens": 4}, reducer={"type": "fastv", "kwargs": {"r": 0.5}})
    assert Provenance.from_json(fastv.to_json()) == fastv
    assert fastv.differences(base) == ['reducer: recorded fastv {"r": 0.5}, now the checkpoint\'s own']
    removed = Provenance("sha256:aa", "sha256:bb", {"max_new_tokens": 4}, reducer={"type": None, "kwargs": {}})
    assert removed.differences(fastv) == ['reducer: recorded none, now fastv {"r": 0.5}']
