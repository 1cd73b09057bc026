"""text_similarity's metrics, each a score from 0 to 1, from the libraries made for them:
fuzzy_match (rapidfuzz's normalized Indel similarity), bleu (sacrebleu's sentence BLEU, smoothed),
gleu (NLTK's sentence GLEU), meteor (NLTK's METEOR with exact and stem matches: WordNet synonyms
need a corpus download this server does not make), rouge_1…rouge_5 and rouge_l (rouge-score's
F-measure, stemmed). cosine needs an embedding model, which this server does not have: it is
refused when the grader is checked, not when a sample is scored."""

from __future__ import annotations

import functools
import re

COSINE_REFUSAL = ("evaluation_metric cosine needs an embedding model, and this server has none; use "
                  "fuzzy_match, bleu, gleu, meteor or rouge_1…rouge_5/rouge_l, or a score_model grader")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


class _NoSynonyms:
    """WordNet's place in NLTK's METEOR with no synonyms: exact and stem matching only."""

    @staticmethod
    def synsets(*_args, **_kwargs) -> list:
        return []


@functools.lru_cache(maxsize=8)
def _rouge(metric: str):
    from rouge_score import rouge_scorer

    name = "rougeL" if metric == "rouge_l" else "rouge" + metric.rsplit("_", 1)[1]
    return name, rouge_scorer.RougeScorer([name], use_stemmer=True)


def similarity(metric: str, output: str, reference: str) -> float:
    """`output`'s similarity to `reference` by `metric`, clipped to [0, 1] (float rounding in BLEU)."""
    return min(1.0, max(0.0, _score(metric, output, reference)))


def _score(metric: str, output: str, reference: str) -> float:
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return fuzz.ratio(output, reference) / 100.0
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.sentence_bleu(output, [reference]).score / 100.0
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        hyp, ref = _words(output), _words(reference)
        return float(sentence_gleu([ref], hyp)) if hyp and ref else float(hyp == ref)
    if metric == "meteor":
        from nltk.stem.porter import PorterStemmer
        from nltk.translate.meteor_score import meteor_score

        hyp, ref = _words(output), _words(reference)
        if not hyp or not ref:
            return float(hyp == ref)
        return float(meteor_score([ref], hyp, stemmer=PorterStemmer(), wordnet=_NoSynonyms()))
    if metric.startswith("rouge_"):
        name, scorer = _rouge(metric)
        return float(scorer.score(reference, output)[name].fmeasure)
    if metric == "cosine":
        raise ValueError(COSINE_REFUSAL)
    raise ValueError(f"unknown evaluation_metric {metric!r}")
