"""SparseVLM chooses for the whole batch at once: the same survivors and merged tokens as the per-row loop it
replaced, stage after stage, on random batches (different image counts and prompt lengths, left padding, text-only
rows, answer tokens after the query, ties), with one host read per forward call (after layer 0) and none at the
scoring layers (counted on CPU here; on a GPU, with CUDA's sync debug mode)."""

from __future__ import annotations

import warnings
from dataclasses import fields

import pytest
import torch
from host_reads import HostReads

from llava_stf.model import LlavaStfConfig
from llava_stf.model.reducers import SparseVLM, SparseVLMParams
from llava_stf.model.reducers.language_model import DropView, gather_plan
from llava_stf.model.reducers.sparsevlm import rows, scale_count, stage_counts
from llava_stf.testing import IMAGE_TOKEN, tiny_model, tiny_text_config, tiny_vision_config

SETTINGS = [  # layers, keep per image of 64 tokens, recycle, cluster size
    dict(layers=[1, 2, 4], keep=[33, 22, 12]),  # the published 192 schedule, scaled
    dict(layers=[0, 2, 3], keep=[40, 20, 5], cluster_size=3),  # layer 0 rates and scores; more merged tokens
    dict(layers=[1, 3], keep=[60, 2], recycle=0.0),  # keep above some rows' counts; no recycling
    dict(layers=[2], keep=[10], recycle=1.0, cluster_size=1),  # every deleted token recycled, one per cluster
]


# ---------------------------------------- the per-row algorithm SparseVLM ran before batching: a second reference
def per_row_cluster(x, clusters):
    m, channels = x.shape
    x = x.float() - x.float().mean(dim=0)
    squares = (x * x).sum(dim=-1)
    dist = (squares[:, None] + squares[None] - 2 * (x @ x.T)).clamp(min=0).fill_diagonal_(0).sqrt() / channels**0.5
    density = (-(dist.topk(clusters, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
    order = torch.arange(m)
    ties = (density[None] == density[:, None]) & (order[None] < order[:, None])
    parent = torch.where((density[None] > density[:, None]) | ties, dist, dist.max()).amin(dim=-1)
    centres = (parent * density).argsort(descending=True, stable=True)[:clusters]
    assign = dist[:, centres].argmin(dim=-1)
    assign[centres] = torch.arange(clusters)
    return centres, assign


class PerRowSparseVLM(SparseVLM):
    def select(self, view):
        layers, keep = self.resolve(self.params, self.shapes)
        pos = torch.arange(view.image_mask.shape[1])
        text = view.attention_mask & ~view.image_mask & (pos[None] <= view.query_index[:, None])
        text_index, text_valid = gather_plan(text)
        if view.layer_index == 0:
            self._raters = self.raters(view.layer_input, view.image_mask, text, text_index, text_valid)
            self._counts = view.image_mask.sum(dim=1).tolist()
        if view.layer_index not in layers:
            return torch.ones_like(view.image_mask)
        scores = self.scores(view, text_index, self._raters)
        return self.prune(scores, view.image_mask, view.layer_output, keep[layers.index(view.layer_index)])

    def raters(self, embeds, image_mask, text, text_index, text_valid):
        pos = torch.arange(text.shape[1])
        after = text & (pos[None] > torch.where(image_mask, pos, -1).amax(dim=1, keepdim=True))
        after = torch.where(after.any(dim=1, keepdim=True), after, text)
        candidates = after.gather(1, text_index) & text_valid
        image_index, image_valid = gather_plan(image_mask)
        similarity = (rows(embeds, image_index) @ rows(embeds, text_index).transpose(1, 2)).float()
        probs = similarity.masked_fill(~candidates[:, None], float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        m = (probs * image_valid[..., None]).sum(dim=1) / image_valid.sum(dim=1, keepdim=True).clamp(min=1)
        mean = (m * candidates).sum(dim=1, keepdim=True) / candidates.sum(dim=1, keepdim=True).clamp(min=1)
        chosen = candidates & (m > mean)
        return torch.where(chosen.any(dim=1, keepdim=True), chosen, candidates)

    def prune(self, scores, image_mask, output, keep_count):
        keep, hidden = ~image_mask, None
        for row in range(image_mask.shape[0]):
            image = image_mask[row].nonzero().squeeze(1)
            count = scale_count(keep_count, self._counts[row], self.shapes.projector_tokens)
            kept, recycled, merged = stage_counts(len(image), count, self.params.recycle, self.params.cluster_size)
            order = image[scores[row, image].argsort(descending=True, stable=True)]
            keep[row, order[:kept]] = True
            if merged:
                tokens = order[kept : kept + recycled]
                centres, assign = per_row_cluster(output[row, tokens].detach(), merged)
                x = output[row, tokens].float()
                sums = x.new_zeros(merged, x.shape[1]).index_add(0, assign, x)
                sizes = torch.bincount(assign, minlength=merged).to(x.dtype)[:, None]
                hidden = output.clone() if hidden is None else hidden
                hidden[row, tokens[centres]] = (sums / (sizes + 1e-6)).to(output.dtype)
                keep[row, tokens[centres]] = True
        return keep if hidden is None else (keep, hidden)


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_config(session_tokenizer) -> LlavaStfConfig:
    return LlavaStfConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(len(session_tokenizer), num_hidden_layers=6),
        image_token_index=session_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_type="mlp2x_gelu",
    )


@pytest.fixture(scope="module")
def lm(model_config):
    return tiny_model(model_config).model.language_model


def random_masks(g: torch.Generator, b: int, t: int):
    """``(real, image, query)``: left padding; rows with no image (row 0), two images (row 1) or one; some rows
    have answer tokens after the query."""
    real, image = torch.zeros(b, t, dtype=torch.bool), torch.zeros(b, t, dtype=torch.bool)
    query = torch.full((b,), t - 1)
    randint = lambda low, high: int(torch.randint(low, high, (1,), generator=g))  # noqa: E731
    for row in range(b):
        pad = randint(0, 9)
        real[row, pad:] = True
        start = pad + randint(1, 6)
        for _ in range(0 if row == 0 else 2 if row == 1 else 1):
            n = randint(6, 30)
            image[row, start : start + n] = True
            start += n + randint(0, 5)
        query[row] -= randint(0, 5) if row > 1 else 0
    return real, image, query


def run_stages(reducer, lm, seed: int, b: int = 6, t: int = 96, device="cpu", on_select=None) -> list:
    """Every ``select`` of one forward call on random hidden states; dropped tokens become padding (as pad slots)."""
    g = torch.Generator().manual_seed(seed)
    real, image, query = random_masks(g, b, t)
    rope = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(t).expand(b, t))
    answers = []
    for i in range(lm.config.num_hidden_layers):
        hidden, output = torch.randn(2, b, t, lm.config.hidden_size, generator=g)
        if i + 1 not in reducer.drop_layers():
            continue
        view = DropView(i, lm.layers[i], hidden, output, rope, real, image, query, lm)
        view = DropView(**{f.name: to(getattr(view, f.name), device) for f in fields(view)})
        chosen = (on_select or (lambda select, view: select(view)))(reducer.select, view)
        keep, merged = pair(chosen)
        answers.append((keep.cpu(), None if merged is None else merged.cpu()))
        keep = keep.cpu() | ~image
        real, image = real & keep, image & keep
    return answers


def to(x, device):
    if isinstance(x, tuple):
        return tuple(to(e, device) for e in x)
    return x.to(device) if isinstance(x, torch.Tensor) else x


def assert_same(batched, per_row):
    assert len(batched) == len(per_row)
    for (keep, merged), (keep_ref, merged_ref) in zip(batched, per_row):
        assert torch.equal(keep, keep_ref)
        assert (merged is None) == (merged_ref is None)
        if merged is not None:
            torch.testing.assert_close(merged, merged_ref)


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("settings", SETTINGS)
def test_batched_stages_equal_the_per_row_loop(lm, model_config, seed, settings):
    params, shapes = SparseVLMParams(**settings), model_config.reducer_shapes()
    with torch.no_grad():
        batched = run_stages(SparseVLM(params, shapes), lm, seed)
        per_row = run_stages(PerRowSparseVLM(params, shapes), lm, seed)
    assert_same(batched, per_row)
    assert any(merged is not None for _, merged in batched) == (params.recycle > 0)


@pytest.mark.parametrize("settings", SETTINGS)
def test_ties_go_the_same_way_as_in_the_per_row_loop(model_config, settings):
    """Integer scores (rank ties) and repeated small-integer hidden states (density and distance ties)."""
    params, shapes = SparseVLMParams(**settings), model_config.reducer_shapes()
    g = torch.Generator().manual_seed(4)
    b, t = 6, 96
    _, image, _ = random_masks(g, b, t)
    scores = torch.randint(0, 4, (b, t), generator=g).float()
    output = torch.randint(-1, 2, (5, 4), generator=g).float()[torch.randint(0, 5, (b, t), generator=g)]
    batched, per_row = SparseVLM(params, shapes), PerRowSparseVLM(params, shapes)
    per_row._counts = image.sum(dim=1).tolist()
    counts = batched.stage_plan(per_row._counts, params.keep)[0]  # [B] (kept, recycled, merged)
    widths = max(recycled for _, recycled, _ in counts), max(merged for _, _, merged in counts)
    expected = per_row.prune(scores, image, output, params.keep[0])
    answer = batched.prune(scores, image, output, torch.tensor(counts), widths)
    assert_same([pair(answer)], [pair(expected)])


def pair(chosen) -> tuple:
    return chosen if isinstance(chosen, tuple) else (chosen, None)


def test_one_host_read_per_forward_call(lm, model_config):
    """The rows' counts after layer 0 (and every stage's counts back in one upload); nothing at the scoring layers
    (the per-row loop read at each, per row)."""
    params, shapes = SparseVLMParams(**SETTINGS[0]), model_config.reducer_shapes()
    counts = []

    def counted(select, view):
        with HostReads() as reads:
            chosen = select(view)
        counts.append((reads.calls, reads.uploads))
        return chosen

    with torch.no_grad():
        run_stages(SparseVLM(params, shapes), lm, 0, on_select=counted)
        batched, counts[:] = list(counts), []
        run_stages(PerRowSparseVLM(params, shapes), lm, 0, on_select=counted)
    assert batched == [(["tolist"], ["tensor"]), ([], []), ([], []), ([], [])]
    assert all(len(calls) > 6 for calls, _ in counts[1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stages_synchronise_once_and_equal_the_per_row_loop(lm, model_config):
    params, shapes = SparseVLMParams(**SETTINGS[1]), model_config.reducer_shapes()
    syncs = []

    def counted(select, view):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                chosen = select(view)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append([str(w.message) for w in caught if "called a synchronizing" in str(w.message)])
        return chosen

    lm.to("cuda")
    try:
        with torch.no_grad():
            run_stages(SparseVLM(params, shapes), lm, 1, device="cuda")  # warm-up
            batched = run_stages(SparseVLM(params, shapes), lm, 1, device="cuda", on_select=counted)
    finally:
        lm.to("cpu")
    assert [len(s) for s in syncs] == [1, 0, 0], syncs
    with torch.no_grad():
        assert_same(batched, run_stages(PerRowSparseVLM(params, shapes), lm, 1))
