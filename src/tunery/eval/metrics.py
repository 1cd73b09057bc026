"""Text metrics of generated outputs against references. Pure functions; each returns 0..1.

ROUGE comes from rouge-score (Google's reference implementation), chrF and BLEU from sacrebleu,
so numbers are comparable with published ones.
"""

from __future__ import annotations

import re
import string

_SPACE = re.compile(r"\s+")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Whitespace-insensitive form used by exact match: stripped, inner runs of space collapsed."""
    return _SPACE.sub(" ", text).strip()


def normalize_label(text: str) -> str:
    """Case- and punctuation-insensitive form used by label accuracy."""
    return normalize(text.lower().translate(_PUNCT))


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference (after `normalize`)."""
    _same_length(predictions, references)
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / len(references)


def is_label_like(references: list[str], *, max_words: int = 3) -> bool:
    """True when the references look like class labels: every one at most `max_words` words, and
    fewer distinct values than half the references (so answers repeat, as labels do)."""
    if not references:
        return False
    short = all(len(normalize(r).split()) <= max_words for r in references)
    return short and len({normalize_label(r) for r in references}) <= max(2, len(references) // 2)


def label_accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions naming the reference label (case and punctuation ignored)."""
    _same_length(predictions, references)
    if not references:
        return 0.0
    hits = sum(normalize_label(p) == normalize_label(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (with stemming, as in summarization papers)."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references, strict=True):
        scores = scorer.score(r, p)
        for k in totals:
            totals[k] += scores[k].fmeasure
    n = max(1, len(references))
    return {k: v / n for k, v in totals.items()}


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (character n-gram F-score), scaled to 0..1."""
    import sacrebleu

    _same_length(predictions, references)
    return sacrebleu.corpus_chrf(predictions, [references]).score / 100


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU, scaled to 0..1."""
    import sacrebleu

    _same_length(predictions, references)
    return sacrebleu.corpus_bleu(predictions, [references]).score / 100


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every generation metric that applies: exact match, label accuracy (label-like references
    only), ROUGE-1/2/L, chrF and BLEU."""
    out = {"exact_match": exact_match(predictions, references)}
    if is_label_like(references):
        out["accuracy"] = label_accuracy(predictions, references)
    out.update(rouge(predictions, references))
    out["chrf"] = chrf(predictions, references)
    out["bleu"] = bleu(predictions, references)
    return out


def _same_length(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
