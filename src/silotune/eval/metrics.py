"""Scores: verbalizer accuracy for classification, ROUGE (rouge-score package) for summaries."""

from __future__ import annotations

from rouge_score import rouge_scorer


def accuracy(predictions: list[int], labels: list[int]) -> float:
    return sum(int(p == y) for p, y in zip(predictions, labels)) / max(len(labels), 1)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L (with stemming)."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for k in totals:
            totals[k] += scores[k].fmeasure
    return {k: v / max(len(references), 1) for k, v in totals.items()}
