"""Data-to-text metrics against the official E2E evaluation script.

Reference values: tuetschek/e2e-metrics at commit 1b9c4d8 (measure_scores.py), run on this machine
with perl mteval/mteval-v13a-sig.pl (BLEU, NIST: it prints 4 decimals) and its vendored
pycocoevalcap (METEOR 1.5, ROUGE_L, CIDEr, full precision read from COCOEvalCap.eval), jars from
pycocoevalcap 1.2. Inputs: FIXED below (written as a multi-reference text file and a system file),
and for the dev sets each input's first reference as the hypothesis against its other references.
"""

import shutil

import pytest

from lmforge.errors import ConfigError, DataError
from lmforge.train import nlg_metrics as M

FIXED = [
    ("The Vaults is a pub near Café Adriatic with a 5 out of 5 rating. Prices are more than £30.",
     ["The Vaults pub near Café Adriatic has a 5 star rating.  Prices start at £30.",
      "Close to Café Adriatic, The Vaults pub has a customer rating of 5 out of 5 and prices above £30.",
      "The Vaults is a pub with high prices, near Café Adriatic, rated 5 out of 5."]),
    ("Alimentum is a family-friendly restaurant in the city centre.",
     ["There is a place in the city centre, Alimentum, that is not family-friendly.",
      "Alimentum is not a family-friendly place, located in city centre."]),
    ("The Eagle coffee shop serves Japanese food for £20-25 by the riverside near Burger King.",
     ["The Eagle is a low rated coffee shop near Burger King and the riverside that is family friendly and is less than £20 for Japanese food.",
      "Located near Burger King, The Eagle coffee shop serves Japanese food for less than £20."]),
    ("ÉCOLE Aarhus Airport serves the city of Aarhus, Denmark (runway length 2,776.0).",
     ["Aarhus Airport serves the city of Aarhus, Denmark.",
      "The Aarhus airport serves the city of Aarhus in Denmark; its runway is 2776.0 long.",
      "Aarhus, Denmark is served by Aarhus Airport.",
      "ÉCOLE is not a word here: \"Aarhus\" Airport's runway length is 2,776.0 metres."]),
    ("Zizzi is cheap.",
     ["Zizzi is a cheap coffee shop with a low rating, located outside the city centre."]),
    ("Mars Hill College joined in 1973 and is located in Mars Hill, North Carolina.",
     ["A school from Mars Hill, North Carolina, joined in 1973.",
      "Mars Hill College, in Mars Hill, North Carolina, joined in 1973."]),
]
HYPS = [h for h, _ in FIXED]
REFS = [r for _, r in FIXED]

# measure_scores.py on FIXED
OFFICIAL_FIXED = {"BLEU": 0.4242, "NIST": 5.6088, "METEOR": 0.3926651789230958,
                  "ROUGE_L": 0.6205868661816335, "CIDEr": 2.576992018360485}
# perl mteval-v13a via measure_scores.run_mteval, first reference vs the others (inputs with >= 2 refs)
OFFICIAL_DEV = {"e2e": (547, 0.5995, 8.5789), "webnlg": (816, 0.4766, 9.0222), "dart": (1679, 0.5031, 8.9970)}


def test_every_metric_on_a_fixed_set_equals_the_official_script():
    got = M.nlg_scores(HYPS, REFS)
    assert list(got) == list(M.METRICS)
    assert got["BLEU"] == pytest.approx(OFFICIAL_FIXED["BLEU"], abs=5e-5)
    assert got["NIST"] == pytest.approx(OFFICIAL_FIXED["NIST"], abs=5e-5)
    for k in ("METEOR", "ROUGE_L", "CIDEr"):
        assert got[k] == pytest.approx(OFFICIAL_FIXED[k], abs=1e-9), k


@pytest.mark.parametrize("task", sorted(OFFICIAL_DEV))
def test_bleu_and_nist_on_the_real_dev_sets_equal_perl_mteval(task, monkeypatch):
    from lmforge.data.nlg import eval_set
    data = eval_set(task, "dev")
    pairs = [(refs[0], list(refs[1:])) for refs in data.references if len(refs) > 1]
    n, bleu, nist = OFFICIAL_DEV[task]
    assert len(pairs) == n
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    assert M.bleu(hyps, refs) == pytest.approx(bleu, abs=5e-5)
    assert M.nist(hyps, refs) == pytest.approx(nist, abs=5e-5)


def test_mteval_normalisation():
    # A-Z only are lower-cased (Perl's tr/[A-Z]/[a-z]/); whitespace runs are one space before the
    # tokenizer sees the text, so '-\n' does not join words; period and comma split unless by digits
    assert M.mteval_tokenize("ÉCOLE Is-\nGood, 2,776.0 £20-25.") == ["École", "is-", "good", ",", "2,776.0", "£20", "-", "25", "."]
    assert M.nist_length_penalty(2 / 3) == pytest.approx(0.5)
    assert M.nist_length_penalty(1.2) == 1.0 and M.nist_length_penalty(0) == 0.0


def test_nist_information_weights_by_hand():
    # references "a b" and "a c" (4 words): info(a) = log2(4/2) = 1, info(b) = log2(4/1) = 2,
    # info(a b) = log2(count(a) / count(a b)) = 1. Hypothesis "a b": (1 + 2) bits over 2 unigrams,
    # 1 bit over 1 bigram; its length equals the mean reference length (no penalty)
    assert M.nist(["a b"], [["a b", "a c"]]) == pytest.approx(3 / 2 + 1)
    # a bigram after the word "0" takes the unigram weight (mteval reads the context "0" as false):
    # refs "0 x", "0 y": info(0 x) = log2(4 words / 1) = 2, not log2(count(0) / 1) = 1
    assert M.nist(["0 x"], [["0 x", "0 y"]]) == pytest.approx(3 / 2 + 2)
    # a hypothesis half the reference length: the penalty exp(-beta log(1/2)^2)
    assert M.nist(["a"], [["a b", "a c"]]) == pytest.approx(1 * M.nist_length_penalty(0.5))


def test_bad_inputs_are_one_line_errors(monkeypatch):
    with pytest.raises(DataError, match="3 inputs, got 2 hypotheses"):
        M.bleu(HYPS[:2], REFS[:3])
    with pytest.raises(DataError, match="input 2 has no"):
        M.nist(["a", "b"], [["a"], ["  "]])
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="Java runtime"):
        M.coco_metrics(HYPS, REFS)


def test_an_empty_output_scores_as_in_the_official_script():
    # measure_scores.py on the system file "\nZizzi is cheap.\n" against one reference each
    got = M.nlg_scores(["", "Zizzi is cheap."], [["Zizzi is cheap."], ["A pub."]])
    official = {"BLEU": 0.0755, "NIST": 0.1207, "METEOR": 0.0, "ROUGE_L": 0.0, "CIDEr": 0.0}
    assert got == pytest.approx(official, abs=5e-5)
