"""Evaluation metrics, one function each, with the formula in the docstring.

Everything here runs offline. Hugging Face ``evaluate.load("accuracy")`` (or "rouge", "bleu", ...) is not
used: it fetches the metric's script from the Hub on first use and fails without a network. Instead:
classification with scikit-learn, ROUGE-L with Google's ``rouge-score``, chrF and BLEU with ``sacrebleu``
(the same implementations lm-evaluation-harness calls for its own metrics).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence

from lmforge.config import UserError

INSTALL = "pip install 'lmforge[eval]'"


def need(module: str, what: str):
    """Import an optional dependency of the eval extra, or a one-line error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs {module.split('.')[0]}, which is not installed; {INSTALL}") from None


# ---------------------------------------------------------------------------------------------
# Language modelling


def lm_metrics(nll_sum: float, tokens: int, correct: int, n_bytes: int) -> dict[str, float]:
    """Token-weighted summary of a scored text set.

    loss = Σ NLL / N (nats per token, the sum over every scored token of every row: a mean of row means
    would over-weight short rows), perplexity = exp(loss), token_accuracy = #(argmax = next token) / N,
    bits_per_byte = Σ NLL / ln 2 / B with B the UTF-8 bytes of the scored text. Bits per byte does not depend
    on how the text was cut into tokens, so it compares models with different tokenizers."""
    if tokens <= 0:
        raise UserError("lm: no token was scored; give longer documents or lower lm.block_size")
    loss = nll_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": correct / tokens,
            "bits_per_byte": nll_sum / math.log(2) / max(n_bytes, 1), "tokens": tokens, "bytes": n_bytes}


# ---------------------------------------------------------------------------------------------
# Classification


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], label_names: list[str]) -> dict:
    """accuracy = #(pred = gold) / n; macro-F1 = mean over classes c of 2·P_c·R_c / (P_c + R_c) (a class
    neither predicted nor present scores 0, as in lmforge.train.tasks.classification_scores); the
    confusion matrix has a row per gold class and a column per predicted class, in label_names order."""
    sk = need("sklearn.metrics", "classification metrics")
    ids = list(range(len(label_names)))
    return {"accuracy": float(sk.accuracy_score(labels, predictions)),
            "macro_f1": float(sk.f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)),
            "examples": len(labels),
            "confusion_matrix": sk.confusion_matrix(labels, predictions, labels=ids).tolist(),
            "label_names": list(label_names)}


# ---------------------------------------------------------------------------------------------
# Generation (predictions against one reference each)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / max(len(references), 1)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over the pairs: with LCS the longest common subsequence of words (rouge-score's
    tokenizer: lower case, runs of [a-z0-9]), P = LCS/|prediction|, R = LCS/|reference|, F = 2PR/(P+R)."""
    scorer = need("rouge_score.rouge_scorer", "generation metric rouge_l").RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / max(len(scores), 1)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, β = 2), 0-100."""
    return float(need("sacrebleu", "generation metric chrf").corpus_chrf(list(predictions), [list(references)]).score)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 4-grams, 13a tokenizer, brevity penalty), 0-100."""
    return float(need("sacrebleu", "generation metric bleu").corpus_bleu(list(predictions), [list(references)]).score)


GENERATION_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match, "rouge_l": rouge_l, "chrf": chrf, "bleu": bleu}


def metric_problems(names: list[str], key: str = "metrics") -> list[str]:
    out = []
    for name in names:
        if name not in GENERATION_METRICS:
            close = difflib.get_close_matches(name, list(GENERATION_METRICS), n=1)
            out.append(f"{key}: {name!r} is not a generation metric"
                       + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f"; known: {', '.join(GENERATION_METRICS)}")
    return out


def generation_metrics(predictions: Sequence[str], references: Sequence[str], names: list[str]) -> dict[str, float]:
    out = {name: GENERATION_METRICS[name](predictions, references) for name in names}
    out["examples"] = len(references)
    return out
