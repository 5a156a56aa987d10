"""DART chooses for the whole batch at once: the same survivors as the per-row loop it replaced, on random batches
(different image counts and prompt lengths, left padding, text-only rows, answer tokens after the query, ties), with
one host read per call (counted on CPU here; on a GPU, with CUDA's sync debug mode)."""

from __future__ import annotations

import warnings
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from host_reads import HostReads

from llava_stf.model.reducers import DART, DARTParams
from llava_stf.model.reducers.dart import rotated_keys
from llava_stf.model.reducers.fastv import kept_image_tokens
from llava_stf.model.reducers.language_model import DropView
from llava_stf.testing import tiny_config, tiny_model

SETTINGS = [  # (r, image pivots, text pivots): uneven claims, kept below the pivots, no text pivots, many pivots
    (0.5, 4, 4),
    (0.95, 4, 4),
    (0.75, 2, 0),
    (0.3, 8, 3),
]


# ------------------------------------------- the per-row algorithm DART ran before batching: a second reference
def top_positions(scores, allowed, count):
    order = scores.masked_fill(~allowed, float("-inf")).argsort(descending=True, stable=True)
    return order[:count]


def keep_row(params: DARTParams, norms, unit, image, text):
    """``[T]`` bool image tokens one row keeps (norms ``[T]``, unit ``[T, D]``, image / text ``[T]``)."""
    where = image.nonzero().flatten()
    n = len(where)
    kept = kept_image_tokens(n, params.r)
    if kept >= n:
        return image.clone()
    free = torch.ones(n, dtype=torch.bool)
    image_pivots = top_positions(norms[where], free, min(params.image_pivots, kept))
    text_pivots = top_positions(norms, text, min(params.text_pivots, int(text.sum())))
    pivots = torch.cat([where[image_pivots], text_pivots]).sort().values
    free[image_pivots] = False
    claims = kept - len(image_pivots)
    similarity = unit[pivots] @ unit[where].T
    for j in range(len(pivots)):
        quota = claims // len(pivots) + int(j < claims % len(pivots))
        free[top_positions(-similarity[j], free, quota)] = False
    keep = torch.zeros_like(image)
    keep[where[~free]] = True
    return keep


def per_row_select(params: DARTParams, view: DropView) -> torch.Tensor:
    norms = rotated_keys(view.layer_input, view.layer, view.position_embeddings).float().abs().sum(dim=(1, 3))
    unit = F.normalize(view.model.norm(view.layer_output).float(), dim=-1)
    ar = torch.arange(view.image_mask.shape[1])
    keep = ~view.image_mask
    for row, image in enumerate(view.image_mask):
        if image.any():
            first = int(image.nonzero()[0])
            text = view.attention_mask[row] & ~image & (ar > first) & (ar <= view.query_index[row])
            keep[row] |= keep_row(params, norms[row], unit[row], image, text)
    return keep


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lm(session_tokenizer):
    """A tiny stock Llama (its layer 1 and final norm are what DART reads)."""
    with torch.no_grad():
        lm = tiny_model(tiny_config(session_tokenizer, projector_type="mlp2x_gelu")).model.language_model
        for name, weight in lm.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)
    return lm


def reducer(r, image_pivots, text_pivots) -> DART:
    params = DARTParams(k=2, r=r, image_pivots=image_pivots, text_pivots=text_pivots)
    return DART(params, tiny_config(projector_type="mlp2x_gelu").reducer_shapes())


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


def random_view(lm, seed: int, b: int = 6, t: int = 96) -> DropView:
    g = torch.Generator().manual_seed(seed)
    real, image, query = random_masks(g, b, t)
    hidden, output = torch.randn(2, b, t, lm.config.hidden_size, generator=g)
    rope = lm.rotary_emb(hidden, torch.arange(t).expand(b, t))
    return DropView(1, lm.layers[1], hidden, output, rope, real, image, query, lm)


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("settings", SETTINGS)
def test_batched_select_equals_the_per_row_loop(lm, seed, settings):
    view = random_view(lm, seed)
    with torch.no_grad():
        keep = reducer(*settings).select(view)
        expected = per_row_select(reducer(*settings).params, view)
    assert torch.equal(keep, expected)
    image = view.image_mask.sum(dim=1)
    assert image[0] == 0 and len(set(image.tolist())) > 2  # a text-only row, and rows with different image counts
    assert torch.equal((keep & view.image_mask).sum(dim=1), ((1 - settings[0]) * image + 0.5).long())


@pytest.mark.parametrize("settings", SETTINGS)
def test_ties_go_to_the_lower_position_as_in_the_per_row_loop(settings):
    """Integer key norms and signed one-hot hidden states: norms and similarities tie everywhere (exactly)."""
    g = torch.Generator().manual_seed(3)
    b, t = 6, 96
    real, image, query = random_masks(g, b, t)
    norms = torch.randint(0, 3, (b, t), generator=g).float()
    unit = F.one_hot(torch.randint(0, 3, (b, t), generator=g), 3).float()
    unit = unit * (torch.randint(0, 2, (b, t, 1), generator=g) * 2 - 1)
    ar = torch.arange(t)
    first = torch.where(image, ar, t).amin(dim=1, keepdim=True)
    text = real & ~image & (ar > first) & (ar <= query[:, None])
    dart = reducer(*settings)
    expected = torch.stack([keep_row(dart.params, *row) if row[2].any() else row[2] for row in
                            zip(norms, unit, image, text)])  # fmt: skip
    assert torch.equal(dart.keep_image(norms, unit, image, text), expected)


def test_one_host_read_per_call(lm):
    """The rows' image and text counts, read once; the rule's counts go back in one upload. The per-row loop read
    several times per row."""
    view = random_view(lm, 0)
    with torch.no_grad(), HostReads() as batched:
        reducer(0.5, 4, 4).select(view)
    with torch.no_grad(), HostReads() as per_row:
        per_row_select(DARTParams(r=0.5), view)
    assert (batched.calls, batched.uploads) == (["tolist"], ["tensor"])
    assert len(per_row.calls) > 3 * view.image_mask.shape[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_select_synchronises_once_and_equals_the_per_row_loop(lm):
    view, dart = random_view(lm, 1), reducer(0.5, 4, 4)
    try:
        keep, syncs = cuda_syncs(dart, on(view, "cuda"))
    finally:
        lm.to("cpu")
    assert len(syncs) == 1, syncs
    assert torch.equal(keep.cpu(), per_row_select(dart.params, view))


def on(view: DropView, device) -> DropView:
    """``view`` with its tensors on ``device`` (its modules are moved in place by the caller)."""
    view.model.to(device)
    moved = {f.name: getattr(view, f.name) for f in fields(view)}
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
    return DropView(**moved | {"position_embeddings": tuple(e.to(device) for e in view.position_embeddings)})


def cuda_syncs(dart, view) -> tuple[torch.Tensor, list[str]]:
    """``select``'s answer and the host synchronisations CUDA reports while it runs (after a warm-up call)."""
    with torch.no_grad():
        dart.select(view)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                keep = dart.select(view)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return keep, [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
