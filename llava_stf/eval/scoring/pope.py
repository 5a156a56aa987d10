"""POPE scoring (haotian-liu/LLaVA ``llava/eval/eval_pope.py``): map each answer to yes/no with the first-sentence word
rule, then compute accuracy, precision, recall, F1 and yes-ratio per split (positive = yes) and the headline mean F1
over the splits.

Upstream pairs answers with label-file lines by position; here predictions and labels are joined on question id, and the
two id sets must be equal.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

POPE_SPLITS = ("adversarial", "popular", "random")
_NO_WORDS = ("No", "no", "not")


def pope_yes_no(text: str) -> str:
    """Maps a POPE answer to ``"yes"`` or ``"no"`` with the upstream rule.

    Keep the text before the first ``.``, delete every ``,``, split on single spaces; the answer is ``"no"`` if a word
    is exactly ``No``, ``no`` or ``not``, otherwise ``"yes"`` (so empty, unrelated or upper-case ``NO`` answers count
    as yes).

    Args:
        text: The model's answer.

    Returns:
        ``"yes"`` or ``"no"``.
    """
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(word in _NO_WORDS for word in words) else "yes"


def _ratio(num: int, den: int) -> float:
    # Upstream divides by zero here (no predicted or no actual positives); define the ratio as 0 instead.
    return num / den if den else 0.0


def pope_metrics(predictions: Mapping[Hashable, str], labels: Mapping[Hashable, str]) -> dict[str, float]:
    """Metrics of one POPE split, pairing answers and labels by question id.

    Args:
        predictions: ``{question_id: raw answer text}``.
        labels: ``{question_id: "yes" | "no"}`` from the split's label file.

    Returns:
        Counts ``tp``, ``fp``, ``tn``, ``fn`` and, in percent, ``accuracy``, ``precision``, ``recall``, ``f1`` and
        ``yes_ratio`` (the share of answers mapped to yes). Precision, recall and F1 are 0 when undefined.

    Raises:
        ValueError: If there are no labels, a label is not ``yes``/``no``, or the id sets differ.
    """
    if not labels:
        raise ValueError("pope_metrics got no labels")
    if predictions.keys() != labels.keys():
        missing, extra = labels.keys() - predictions.keys(), predictions.keys() - labels.keys()
        raise ValueError(
            f"POPE: predictions: {len(predictions)}, labels: {len(labels)}; "
            f"{len(missing)} labelled ids unanswered, {len(extra)} answered ids unlabelled"
        )
    bad = {label for label in labels.values() if label not in ("yes", "no")}
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {sorted(bad)}")
    tp = fp = tn = fn = 0
    for qid, label in labels.items():
        pred_yes, label_yes = pope_yes_no(predictions[qid]) == "yes", label == "yes"
        tp += pred_yes and label_yes
        fp += pred_yes and not label_yes
        tn += not pred_yes and not label_yes
        fn += not pred_yes and label_yes
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": 100.0 * (tp + tn) / len(labels),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": 100.0 * (tp + fp) / len(labels),
    }


def score_pope(
    predictions: Mapping[str, Mapping[Hashable, str]], labels: Mapping[str, Mapping[Hashable, str]]
) -> dict[str, object]:
    """POPE metrics per split and the headline mean F1.

    Args:
        predictions: ``{split: {question_id: raw answer text}}``.
        labels: ``{split: {question_id: "yes" | "no"}}``; its splits are the ones scored (normally ``POPE_SPLITS``).

    Returns:
        ``{"splits": {split: pope_metrics(...)}, "mean_f1": mean of the split F1 scores in percent}``.

    Raises:
        ValueError: If there are no splits or the split names differ between the two arguments.
    """
    if not labels or predictions.keys() != labels.keys():
        raise ValueError(f"POPE splits differ: predictions {sorted(predictions)}, labels {sorted(labels)}")
    splits = {split: pope_metrics(predictions[split], labels[split]) for split in labels}
    return {"splits": splits, "mean_f1": sum(m["f1"] for m in splits.values()) / len(splits)}
