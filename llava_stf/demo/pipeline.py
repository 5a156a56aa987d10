"""The demo pipeline: generated data -> vision tower -> tiny LLM -> stage 1 -> stage 2 -> evaluation -> one chat answer.

Every step goes through the package's real entry points (``data.synthetic.generate``, ``train.run.run``, the
evaluation engine with the ``synthetic`` benchmark, ``serve.chat.ChatSession``) and leaves its artifacts in one
folder (default ``playground/demo``)::

    synthetic/         the generated world (+ demo_data.json: the generator settings)
    vision/            the pre-trained tiny CLIP (+ demo_vision.json, see ``vision``)
    (the LLM)          the generated world: the pre-built cell-word Llama shipped with the package
                       (``scene_llm.PREBUILT``; rebuilt into scene-llm/ only when missing or altered)
    llm-seed<n>/       with ``--data`` (or ``llm="captions"``): a tiny Llama pre-trained on the world's text + its
                       BPE tokenizer (+ demo_llm.json)
    <run>/stage1/      projector checkpoint of stage 1 (+ demo_stage.json)
    <run>/stage2/      full checkpoint of stage 2 (+ demo_stage.json)
    results/<run>/     results.json of the evaluation; answers in synthetic/eval/model_answers/<run>.jsonl
    results/<run>-blank/   the same checkpoint on the blank-image control (every question asked about a blank
                       canvas: what the model answers without looking); answers in model_answers/questions_blank/

With ``--data DIR`` (``run_pipeline(..., data=DIR)``) the world is the user's folder, read only (``world``), and
``synthetic/`` is replaced by ``data/``: copies of the question and answer files, the blank-image control and
``demo_data.json`` (the digests the steps key on); evaluation uses the ``vqa`` benchmark, whose answers land in
``data/eval/answers/<split>/``. The default ``--out`` is then ``playground/demo/worlds/<DIR's name>``.

Reuse: each step writes a marker file after it succeeds, holding its settings and the digest of the markers it
depends on. A later run reuses a step when its marker equals what it would write now (for a training stage: the
resolved run configuration of ``llava_stf.train.run`` compared with ``config_differences``, ignoring logging keys,
and the same upstream digests); otherwise the step and everything after it run again. Answers already generated are
reused by the evaluation engine only when their provenance (stage 2's content digest, the question file's digest,
the generation settings) matches; otherwise they are answered again.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import LlamaForCausalLM

from ..data.synthetic import BLANK_SPLIT, generate, write_blank_split
from ..testing import _CORPUS, tiny_text_config, tiny_tokenizer
from .llm import pretrain_text, world_documents
from .scene_llm import BUILD_FILE, PREBUILT, SceneLLMSettings, build_scene_llm, read_build
from .vision import MARKER as VISION_MARKER
from .vision import VisionSettings, pretrain_vision_tower
from .world import World, digest, generated_world, load_world, patch_size

if TYPE_CHECKING:
    from ..eval.__main__ import LazyGenerator

logger = logging.getLogger("llava_stf.demo")
VOLATILE = {"logging_dir", "disable_tqdm", "overwrite_output_dir"}  # run-config keys that do not change the result


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's result (the cache keys)."""

    num_train: int = 1000  # generated training scenes (captions + instruction records)
    num_eval: int = 100  # held-out scenes (about 9 questions each)
    image_size: int = 96  # with 16-px patches: a 6 x 6 patch grid, 3 x 3 after the 4x projectors = the scene's cells
    data_seed: int = 0  # the world; kept fixed across training seeds
    detail: bool = False  # one tiny dot per scene and its "detail" questions (``data.synthetic``; the comparison's)
    vision: VisionSettings = field(default_factory=lambda: VisionSettings(image_size=96, patch_size=16))
    # The LLM. "cells": the pre-built tiny Vicuna that reads scenes written in cell words (``scene_llm``; one for
    # every training seed, as LLaVA starts every run from the same Vicuna). "captions": a tiny Llama pre-trained here,
    # per seed, on the world's captions and instructions (the recipe of a world of one's own, ``--data``); the
    # llm_* fields below are its settings.
    llm: str = "cells"
    llm_hidden: int = 128  # tiny Llama width (from scratch)
    llm_layers: int = 2
    llm_pretrain_steps: int = 200  # text pre-training of the tiny Llama (see ``llm``), before stage 1
    llm_pretrain_lr: float = 3e-3
    llm_head_std: float = 0.05  # init std of the LLM's output layer (transformers' Llama: 0.02, see ``prepare_llm``)
    # The "captions" LLM's seed (init and text order); None: the training seed, one LLM per seed. A number: one LLM
    # for every training seed, as LLaVA starts every run from the same Vicuna (the seeds then vary the two stages only).
    llm_seed: int | None = None
    vocab_size: int = 1024  # BPE trained on the generated text
    projector_type: str = "mbtf_stf"
    # The tiny model needs many more steps than LLaVA's 1 epoch: 15 epochs (940 steps, ~1.5 min) teach the projector
    # to write the cell words better than 5 (68.7 against 62.8 % on the first build, seed 0, one thread each).
    stage1_epochs: float = 15.0
    stage2_epochs: float = 10.0  # "captions" LLM: 3 epochs: constant answer per family (23.6%); 10: 29.6%; 20: 30.2%
    batch_size: int = 16
    stage1_lr: float = 1e-3
    stage2_lr: float = 2e-4  # a pre-trained LLM: 1e-3 unlearns its lookups (66% -> 42% overall on the cells LLM)
    max_length: int = 512  # tokens per sample, image tokens included (nothing is truncated at the defaults)
    eval_batch_size: int = 32
    seed: int = 0  # training seed (projector init, data order)
    # Both stages read every image 10-15 times through a frozen tower: keep the processed images and the tower's
    # outputs in memory (``--image_cache_mb``, ``--vision_feature_cache_mb``; the same losses, ~1/4 less time).
    cache_mb: float = 1024


# A world of one's own has no scene descriptions: its LLM is pre-trained on its own text and starts from scratch,
# where stage 2's higher learning rate is what works (``run_pipeline(data=...)`` applies this).
USER_WORLD = {"llm": "captions", "stage2_lr": 1e-3}

FAST = DemoSettings(
    num_train=48,
    num_eval=6,
    image_size=64,
    vision=VisionSettings(hidden_size=32, steps=4, batch_size=16),
    llm="captions",
    llm_hidden=32,
    llm_pretrain_steps=4,
    vocab_size=400,
    stage1_epochs=1.0,
    stage2_epochs=1.0,
    batch_size=8,
    eval_batch_size=16,
)

# The previous default (``--captions``): a 64-px world (8 x 8 patches, 16 tokens after the 4x projectors) and a tiny
# Llama pre-trained here, per seed, on the world's captions and instructions (the recipe of ``--data``). It reads
# colour and count but learns no lookups in the budget (~32 %, ``docs/demo-compare/miniature-limits.md``). The
# projector comparison (``compare``) measures this recipe, on the ``DETAIL`` world below: the cell-word LLM reads
# 9-token scenes only (the 4x projectors'), and when it read 36-token ones too the 36-token projectors did not learn
# to write them (``mlp2x_gelu`` 27 % against ``mbtf_stf``'s 64 %): a comparison under it would rank the language, not
# the projectors.
CAPTIONS = DemoSettings(image_size=64, vision=VisionSettings(), llm="captions", stage1_epochs=5.0, stage2_lr=1e-3)
# The caption recipe past the 5-minute budget (about 6 min alone on 2 cores): 4x the batch and ~3x the samples of
# stage 2. Batch 16 learns to bind a question's words to image positions far more slowly than 64
# (``scripts/binding_toy.py``), and ~500 steps at 64 are needed: ~350 steps left the model where that recipe is.
LONG = replace(CAPTIONS, num_train=3000, batch_size=64, stage1_epochs=1.0, stage2_epochs=10.0)
# The projector comparison's world (``compare``): the caption recipe on a world where fine detail matters (a tiny dot
# per scene, smaller than a tower patch: what a 4x compression may blur) and 200 held-out scenes (~2,000 questions:
# fewer leave each run's accuracy with a sampling error of ~1.5 points, most of the 2-point spread allowed). Stages
# of 3 and 7 epochs instead of 5 and 10 fit 21 runs in the 45 minutes asked of the comparison: ~30 % less per run
# (seed 0, two runs side by side, one thread each: mlp2x_gelu 27.0 against 27.8 %, avgpool 26.5 against 25.8 %).
# One LLM (seed 0) for every training seed, as LLaVA starts every run from the same Vicuna: with one per seed the
# LLM's own seed moved the projectors together (avgpool 26.5 / 23.7 / 22.6 % for seeds 0 / 1 / 2, std 2.0; with
# seed 0's LLM, seeds 1 and 2 gave 24.8 and 24.8 %).
DETAIL = replace(CAPTIONS, detail=True, num_eval=200, stage1_epochs=3.0, stage2_epochs=7.0, llm_seed=0)
PRESETS = {"default": DemoSettings(), "captions": CAPTIONS, "fast": FAST, "long": LONG, "detail": DETAIL}


def add_preset_flags(parser: argparse.ArgumentParser, default: str = "default") -> None:
    """``--cells`` / ``--fast`` / ``--captions`` / ``--long`` / ``--detail`` set ``args.preset``, a key of
    ``PRESETS`` (none: ``default``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cells", dest="preset", action="store_const", const="default", default=default,
                       help="the demo's default recipe: 96-px world, the pre-built cell-word LLM")  # fmt: skip
    group.add_argument("--fast", dest="preset", action="store_const", const="fast", default=default,
                       help="seconds-scale settings for tests (numbers are noise)")  # fmt: skip
    group.add_argument("--captions", dest="preset", action="store_const", const="captions", help="the previous "
                       "recipe: 64-px world, a tiny LLM pre-trained here on the world's captions")  # fmt: skip
    group.add_argument("--long", dest="preset", action="store_const", const="long", help="the --captions recipe at "
                       "batch 64 on 3,000 scenes, ~3x the stage-2 samples, about 6 min on 2 cores")  # fmt: skip
    group.add_argument("--detail", dest="preset", action="store_const", const="detail", help="the --captions"
                       " recipe with stages of 3 and 7 epochs and seed 0's LLM for every seed, on a world with a "
                       "tiny dot per scene, 200 held-out scenes (compare's)")  # fmt: skip


def preset_suffix(preset: str) -> str:
    """The run-folder suffix of a preset: ``-fast``, ``-long``, nothing for the default."""
    return "" if preset == "default" else f"-{preset}"


def _cached(marker: Path, wanted: dict[str, Any]) -> bool:
    """True when ``marker`` holds ``wanted`` (extra keys in the marker, e.g. a recorded loss, do not count)."""
    if not marker.is_file():
        return False
    saved, wanted = json.loads(marker.read_text()), json.loads(json.dumps(wanted))
    return {k: saved.get(k) for k in wanted} == wanted


def prepare_data(out: Path, s: DemoSettings) -> Path:
    """Generate the world into ``out/synthetic`` unless the same settings were generated there."""
    # "detail" None (a world without the dot) is not written: the default world's marker, and so its cache keys, are
    # as before, and a marker without the key matches only a world without the dot
    folder, wanted = out / "synthetic", {"num_train": s.num_train, "num_eval": s.num_eval,
                                         "image_size": s.image_size, "seed": s.data_seed,
                                         "detail": True if s.detail else None}  # fmt: skip
    marker = folder / "demo_data.json"
    if _cached(marker, wanted):
        logger.info("reusing the generated world in %s", folder)
        return folder
    marker.unlink(missing_ok=True)
    counts = generate(folder, s.num_train, s.num_eval, s.image_size, s.data_seed, s.detail)
    logger.info("generated %s", counts)
    marker.write_text(json.dumps({k: v for k, v in wanted.items() if v is not None}, indent=1))
    return folder


def prepare_llm(out: Path, world: World, s: DemoSettings, progress: bool = False) -> Path:
    """The demo's Vicuna (``s.llm``): the pre-built cell-word LLM (``prepare_scene_llm``) or one pre-trained here on
    the world's captions and instructions (``prepare_caption_llm``)."""
    if s.llm == "cells":
        if world.staged is not None:
            raise ValueError("the cell-word LLM reads the generated world's scenes; a world of one's own uses "
                             "llm='captions' (pipeline.USER_WORLD)")  # fmt: skip
        return prepare_scene_llm(out, progress)
    if s.llm != "captions":
        raise ValueError(f"unknown DemoSettings.llm {s.llm!r}; valid: 'cells', 'captions'")
    return prepare_caption_llm(out, world, s, progress)


def llm_marker(llm: Path) -> Path:
    """The file whose digest keys the stages on ``llm`` (a cell-word build's ``build.json``, else ``demo_llm.json``)."""
    build = llm / BUILD_FILE
    return build if build.is_file() else llm / "demo_llm.json"


def prepare_scene_llm(out: Path, progress: bool = False) -> Path:
    """The cell-word LLM of ``SceneLLMSettings()``: the build shipped with the package when its files match their
    digests and its settings are these, else one built before in ``out/scene-llm``, else built there now (about
    75 min on two cores: ``scene_llm``)."""
    wanted = json.loads(json.dumps(asdict(SceneLLMSettings())))
    for folder in (PREBUILT, out / "scene-llm"):
        build = read_build(folder)
        if build is not None and build["settings"] == wanted:
            return folder
    logger.warning("the pre-built LLM (%s) is missing, altered or for other settings: building it in %s (about "
                   "75 min on two cores)", PREBUILT, out / "scene-llm")  # fmt: skip
    return build_scene_llm(out / "scene-llm", SceneLLMSettings(), progress)


def warn_unread_grid(llm: Path, tokens: int, projector: str) -> None:
    """Log a warning when the cell-word LLM in ``llm`` never read scenes of ``tokens`` image tokens (its build's
    ``sides``): the projector then has to write a grid the LLM has no words for, and the result measures that."""
    sides = json.loads((llm / BUILD_FILE).read_text())["settings"]["sides"]
    if tokens not in [k * k for k in sides]:
        logger.warning("%s gives %d image tokens, but the pre-built cell-word LLM was trained on scenes of %s tokens "
                       "only: expect a poor result; --captions pre-trains an LLM for any projector", projector,
                       tokens, " or ".join(str(k * k) for k in sides))  # fmt: skip


def prepare_caption_llm(out: Path, world: World, s: DemoSettings, progress: bool = False) -> Path:
    """A tiny Llama (random init from ``s.llm_seed``, else the training seed) + a BPE tokenizer trained on the world's
    text, pre-trained on that text (``llm.pretrain_text``) and saved as an ordinary checkpoint in
    ``out/llm-seed<seed>``."""
    seed = s.seed if s.llm_seed is None else s.llm_seed
    folder = out / f"llm-seed{seed}"
    marker = folder / "demo_llm.json"
    wanted = {"hidden": s.llm_hidden, "layers": s.llm_layers, "vocab": s.vocab_size, "seed": seed,
              "pretrain_steps": s.llm_pretrain_steps, "pretrain_lr": s.llm_pretrain_lr, "corpus": "captioned-v1",
              "max_tokens": s.max_length, "head_std": s.llm_head_std, "data": world.keys["text"]}  # fmt: skip
    if _cached(marker, wanted):
        return folder
    texts = [t["value"].replace("<image>", "") for path in (world.pretrain, world.finetune)
             for r in json.loads(path.read_text()) for t in r["conversations"]]  # fmt: skip
    tokenizer = tiny_tokenizer(s.vocab_size, corpus=_CORPUS + texts, with_image_token=False, with_pad_token=False)
    import torch

    torch.manual_seed(seed)
    config = tiny_text_config(
        len(tokenizer),
        hidden_size=s.llm_hidden,
        intermediate_size=2 * s.llm_hidden,
        num_hidden_layers=s.llm_layers,
        pad_token_id=None,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config)
    torch.nn.init.normal_(model.lm_head.weight, std=s.llm_head_std)  # 0.02 stalls stage 2's lookups (see the field)
    documents = world_documents(world.pretrain, world.finetune)
    loss = pretrain_text(model, tokenizer, documents, s.llm_pretrain_steps, s.llm_pretrain_lr, seed=seed,
                         progress=progress, max_tokens=s.max_length)  # fmt: skip
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps({**wanted, "pretrain_loss": loss}, indent=1))
    return folder


def stage_argv(stage: str, out_dir: Path, towers: tuple[Path, Path], world: World, s: DemoSettings,
               projector: Path | None, progress: bool) -> list[str]:  # fmt: skip
    """Command-line flags of ``llava_stf.train.run`` for one demo stage (CPU-sized, no checkpoints mid-run)."""
    first = stage == "pretrain"
    values: dict[str, Any] = {
        "stage": stage,
        "vision_tower": towers[0],
        "llm": towers[1],
        "projector_type": s.projector_type,
        "data_path": world.pretrain if first else world.finetune,
        "image_folder": world.root,
        "output_dir": out_dir,
        "pretrained_projector": None if first else projector,
        "model_max_length": s.max_length,
        "num_train_epochs": s.stage1_epochs if first else s.stage2_epochs,
        "per_device_train_batch_size": s.batch_size,
        "learning_rate": s.stage1_lr if first else s.stage2_lr,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "seed": s.seed,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10_000,  # the loss goes to the summary, not to the terminal
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "image_cache_mb": s.cache_mb,
        "vision_feature_cache_mb": s.cache_mb,
        "disable_tqdm": not progress,
        "overwrite_output_dir": True,  # only reached when the cached stage is not valid
    }
    return [item for key, value in values.items() if value is not None for item in (f"--{key}", str(value))]


def train_stage(argv: list[str], upstream: list[str]) -> tuple[Path, dict[str, Any], bool]:
    """Run one stage unless its marker matches; returns (output folder, marker contents, reused)."""
    from ..train.arguments import parse_config
    from ..train.run import config_differences, run

    config = parse_config(argv)
    out = Path(config.training.output_dir)
    marker = out / "demo_stage.json"
    current = {g: {k: v for k, v in vals.items() if k not in VOLATILE} for g, vals in config.to_dict().items()}
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("upstream") == upstream and not config_differences(saved["config"], current):
            return out, saved, True
        marker.unlink()
    start = time.perf_counter()
    trainer = run(config, quiet=True)  # the demo prints its own line per stage
    losses = [e["train_loss"] for e in trainer.state.log_history if "train_loss" in e]
    record = {"config": current, "upstream": upstream, "train_loss": losses[-1] if losses else None,
              "seconds": round(time.perf_counter() - start, 1), "data": dict(trainer.data_counts)}  # fmt: skip
    marker.write_text(json.dumps(record, indent=1, default=str))
    return out, json.loads(marker.read_text()), False


@dataclass
class RunReport:
    """What one pipeline run produced."""

    name: str
    checkpoint: Path
    metrics: dict[str, Any]
    image_tokens: int
    flops: int  # full prefill FLOPs of one image + a typical question (vision + projector + LLM + head)
    llm_visual_flops: int  # the paper's convention: LLM FLOPs over the visual tokens only
    train_loss: dict[str, float | None]
    reused: dict[str, bool]
    blank_metrics: dict[str, Any]  # the same checkpoint on the blank-image control (``write_blank_split``)
    world: World  # the data it learned and was evaluated on


def evaluate(model: LazyGenerator, out: Path, name: str, s: DemoSettings, progress: bool, world: World,
             blank: bool = False, extra: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The world's held-out questions (``blank``: its blank-image control) through the evaluation engine
    (``World.eval_argv``); ``model`` loads the checkpoint on first use, once for all splits. Answers saved under
    ``name`` by another checkpoint (or with other questions or settings) are answered again, not resumed.
    ``extra``: more engine flags (``--reducer NAME --tokens N``: they join the answers' provenance)."""
    from ..eval.__main__ import evaluate as run_eval
    from ..eval.__main__ import parse_args

    argv = ["--model-path", str(model.model_path), "--model-id", name, "--data-root", str(out), "--results-dir",
            str(out / "results"), "--batch-size", str(s.eval_batch_size), *world.eval_argv(blank)]  # fmt: skip
    args = parse_args(argv + [*(extra or [])] + ["--no-progress"] * (not progress))
    [(_, result)] = run_eval(args, model, replace_stale=True)
    return dict(result.metrics)


def format_loss(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.3f}"


def prepare_shared(out: Path, s: DemoSettings, progress: bool = False) -> None:
    """The steps runs of the same world share (the generated world, the vision tower, the LLM of ``s.seed``, or of
    ``s.llm_seed`` for every seed), done now so that runs started side by side (``compare --jobs``) find them built
    instead of building them together."""
    world = generated_world(prepare_data(out.resolve(), s), s.image_size)
    pretrain_vision_tower(world, out.resolve() / "vision", s.vision, progress=progress)
    prepare_llm(out.resolve(), world, s, progress=progress)


def run_pipeline(out: Path, s: DemoSettings, name: str = "demo", progress: bool = True,
                 data: Path | None = None, files: dict[str, Path | None] | None = None) -> RunReport:  # fmt: skip
    """Data, vision tower, LLM, both stages and the evaluation of one model; reuses every valid step.

    ``data``: a LLaVA-format folder of one's own instead of the generated world (``files``: its file names, see
    ``world.FILES``); its image size sets the tower's (``s.image_size`` and ``s.vision`` are replaced).
    """
    from ..eval.__main__ import LazyGenerator
    from ..flops import count_flops
    from ..generation import default_device
    from ..loading import load_config

    out = out.resolve()  # the stage markers hold paths: the same folder named two ways must still be reused
    steps = ["data", "vision tower", "llm", "stage 1", "stage 2", "evaluation"]
    clock = time.perf_counter()

    def say(i: int, text: str) -> None:
        print(f"[{i}/{len(steps)}] {steps[i - 1]}: {text} ({time.perf_counter() - clock:.0f} s)", flush=True)

    if data is None:
        world = generated_world(prepare_data(out, s), s.image_size)
        say(1, f"{world.root}")
    else:
        world = load_world(data.resolve(), out / "data", files or {})
        size = world.image_size
        s = replace(s, image_size=size, vision=replace(s.vision, image_size=size, patch_size=patch_size(size)),
                    **USER_WORLD)  # fmt: skip
        say(1, f"{world.root} ({size} px images; questions and blank control staged in {world.staged})")
    vision = pretrain_vision_tower(world, out / "vision", s.vision, progress=progress)
    say(2, f"{vision}")
    llm = prepare_llm(out, world, s, progress=progress)
    say(3, f"{llm}")
    ups = [world.keys["train"], digest(vision / VISION_MARKER), digest(llm_marker(llm))]
    argv1 = stage_argv("pretrain", out / name / "stage1", (vision, llm), world, s, None, progress)
    stage1, rec1, reused1 = train_stage(argv1, ups)
    say(4, f"{'reused' if reused1 else 'trained'} {stage1} (loss {format_loss(rec1['train_loss'])})")
    if s.llm == "cells":
        warn_unread_grid(llm, load_config(stage1).num_image_tokens, s.projector_type)
    argv2 = stage_argv("finetune", out / name / "stage2", (vision, llm), world, s, stage1, progress)
    stage2, rec2, reused2 = train_stage(argv2, [*ups, digest(stage1 / "demo_stage.json")])
    say(5, f"{'reused' if reused2 else 'trained'} {stage2} (loss {format_loss(rec2['train_loss'])})")
    model = LazyGenerator(stage2, default_device(), None)
    metrics = evaluate(model, out, name, s=s, progress=progress, world=world)
    if world.staged is None and not (world.root / "eval" / f"{BLANK_SPLIT}.jsonl").is_file():
        write_blank_split(world.root, s.image_size)  # a world generated before the control existed
    blank = evaluate(model, out, f"{name}-blank", s=s, progress=progress, world=world, blank=True)
    say(6, f"accuracy {metrics['accuracy']:.1f}% on {metrics['questions']} questions "
           f"({blank['accuracy']:.1f}% with a blank image)")  # fmt: skip
    config = load_config(stage2)
    report = count_flops(config, text_tokens=32)
    return RunReport(
        name=name,
        checkpoint=stage2,
        metrics=metrics,
        image_tokens=config.num_image_tokens,
        flops=report.full,
        llm_visual_flops=report.paper,
        train_loss={"stage1": rec1["train_loss"], "stage2": rec2["train_loss"]},
        reused={"stage1": reused1, "stage2": reused2},
        blank_metrics=blank,
        world=world,
    )


def evaluate_reduced(report: RunReport, out: Path, s: DemoSettings, reducer: str, tokens: int,
                     progress: bool = False) -> RunReport:  # fmt: skip
    """``report``'s trained checkpoint with the training-free ``reducer`` at a budget of ``tokens`` image tokens
    (``--reducer NAME --tokens N`` of the evaluation engine: the registry's own rule for N tokens), evaluated on the
    same questions and blank-image control; a report named ``<run>+<reducer>@<tokens>`` with the reduced model's
    prefill FLOPs. Nothing is trained: the reducer works on the checkpoint as it is."""
    from ..eval.__main__ import LazyGenerator
    from ..flops import count_flops
    from ..generation import default_device
    from ..loading import load_config
    from ..reducer_choice import ReducerChoice

    choice = ReducerChoice(reducer, None, tokens)
    resolved = choice.resolve(load_config(report.checkpoint))  # an unknown reducer or a bad budget: a UserError
    name, flags = f"{report.name}+{resolved.label}", ["--reducer", reducer, "--tokens", str(tokens)]
    model = LazyGenerator(report.checkpoint, default_device(), None, choice)
    metrics = evaluate(model, out, name, s, progress, report.world, extra=flags)
    blank = evaluate(model, out, f"{name}-blank", s, progress, report.world, blank=True, extra=flags)
    flops = count_flops(resolved.config, text_tokens=32)
    return replace(report, name=name, metrics=metrics, blank_metrics=blank, image_tokens=tokens, flops=flops.full,
                   llm_visual_flops=flops.paper)  # fmt: skip


__all__ = [
    "CAPTIONS",
    "DETAIL",
    "FAST",
    "LONG",
    "PRESETS",
    "USER_WORLD",
    "prepare_shared",
    "DemoSettings",
    "RunReport",
    "add_preset_flags",
    "evaluate_reduced",
    "prepare_data",
    "llm_marker",
    "prepare_caption_llm",
    "prepare_llm",
    "prepare_scene_llm",
    "preset_suffix",
    "run_pipeline",
    "stage_argv",
    "warn_unread_grid",
]
