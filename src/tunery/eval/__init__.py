"""Evaluation: base vs tuned, measured (loss, perplexity, exact match, ROUGE, chrF, BLEU)."""
