"""Data-to-text metrics as the official E2E NLG evaluation script computes them
(tuetschek/e2e-metrics, measure_scores.py): BLEU and NIST as NIST's mteval-v13a.pl defines them, and
METEOR 1.5, ROUGE-L and CIDEr(-D) from the MS-COCO caption evaluation code.

Every score is corpus level: hypotheses[i] is scored against all of references[i].

  BLEU      sacrebleu (tokenizer '13a', which reimplements mteval-v13a's tokenization; 'exp'
            smoothing = mteval's default; closest reference length, ties to the shorter).
            mteval lower-cases ASCII letters only (tr/[A-Z]/[a-z]/), so we do exactly that and
            call sacrebleu case-sensitive: its own lower-casing would also fold 'É' and the like.
  NIST      here (no maintained package computes mteval's NIST): information weights
            info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over every reference of the corpus
            (unigrams: log2(total reference words / count(w))), matched n-grams clipped by their
            largest count in one reference, n = 1..5, and the length penalty
            exp(-beta * log(min(1, L_sys / L_ref))^2) with beta set so that it is 0.5 at
            L_sys / L_ref = 2/3; L_ref = all reference words / the mean number of references.
  METEOR, ROUGE_L, CIDEr
            pycocoevalcap (the same code and jars the E2E script ships): Stanford PTB tokenization,
            lower-cased, punctuation tokens removed; METEOR 1.5 (-l en -norm); ROUGE-L with beta
            1.2; CIDEr as the COCO code computes it, i.e. CIDEr-D (clipped counts, Gaussian length
            penalty sigma 6, x10) with document frequencies from the references given. These need a
            Java runtime (`java` on PATH).

Scales are the official script's: BLEU, METEOR and ROUGE_L in [0, 1] (the LoRA paper prints them
x100), NIST and CIDEr as they come.

Known differences from the official script (none changes a score on the E2E, WebNLG or DART files):
  - the script passes texts through an SGML file to mteval; a '<' or '>' inside a text can upset
    that parser, here texts are taken as they are;
  - an empty reference is dropped here; the script pads missing references with empty ones, which
    mteval ignores in the same way.
  mteval's own quirk is kept: an n-gram whose first n-1 words are the single word "0" gets its NIST
  information from the total word count, as a unigram would (Perl reads the string "0" as false);
  WebNLG and DART references contain "0", and NIST differs in the second decimal without it.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from typing import Sequence

from lmforge.errors import ConfigError, DataError

NIST_ORDER = 5
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
    """The references without empty ones; every hypothesis must have at least one."""
    if len(hypotheses) != len(references):
        raise DataError(f"expected one hypothesis per input: {len(references)} inputs, got {len(hypotheses)} hypotheses")
    if not hypotheses:
        raise DataError("nothing to score: no hypotheses")
    groups = [[r for r in refs if r.strip()] for refs in references]
    for i, g in enumerate(groups):
        if not g:
            raise DataError(f"input {i + 1} has no (non-empty) reference")
    return groups


def _mteval_text(text: str) -> str:
    # mteval reads each segment with its whitespace runs made one space (so its '-\n' rule, which
    # sacrebleu's 13a applies, never fires), and lower-cases A-Z only
    return " ".join(text.split()).translate(_ASCII_LOWER)


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's normalisation and tokenization of one segment."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    return Tokenizer13a()(_mteval_text(text)).split()


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 as mteval-v13a computes it, in [0, 1]."""
    from sacrebleu.metrics import BLEU
    groups = _check(hypotheses, references)
    width = max(len(g) for g in groups)
    # sacrebleu reads reference *streams*; None marks a missing reference of an input with fewer
    streams = [[_mteval_text(g[k]) if k < len(g) else None for g in groups] for k in range(width)]
    scorer = BLEU(tokenize="13a", lowercase=False, smooth_method="exp", force=True)
    return scorer.corpus_score([_mteval_text(h) for h in hypotheses], streams).score / 100


def _ngrams(tokens: list[str], order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, order + 1) for i in range(len(tokens) - n + 1))


def nist_length_penalty(ratio: float) -> float:
    """1 at or above the reference length, 0.5 at two thirds of it, 0 at nothing."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], order: int = NIST_ORDER) -> float:
    """Corpus NIST as mteval-v13a computes it (n-grams up to `order`, 5 by default)."""
    groups = _check(hypotheses, references)
    ref_tokens = [[mteval_tokenize(r) for r in g] for g in groups]
    # information weights: how rare each n-gram is given its first n-1 words, over all references
    counts: Counter = Counter()
    total_words = 0
    for g in ref_tokens:
        for toks in g:
            total_words += len(toks)
            counts.update(_ngrams(toks, order))

    def info(gram: tuple) -> float:
        # mteval tests its context string for truth (`$mgram ? ... : $tot_wrds`), and Perl's "0" is
        # false: an n-gram after the lone word "0" is weighed like a unigram. Kept, to score the same.
        context = counts[gram[:-1]] if len(gram) > 1 and gram[:-1] != ("0",) else total_words
        return -math.log2(counts[gram] / context)

    matched_info = [0.0] * (order + 1)   # index n: information of the matched n-grams
    hyp_ngrams = [0] * (order + 1)       # index n: n-grams in the hypotheses
    ref_words = n_refs = 0
    for hyp, g in zip(hypotheses, ref_tokens):
        h = mteval_tokenize(hyp)
        for n in range(1, order + 1):
            hyp_ngrams[n] += max(len(h) - n + 1, 0)
        best: Counter = Counter()        # each n-gram's largest count in one reference
        for toks in g:
            best |= _ngrams(toks, order)
            ref_words += len(toks)
            n_refs += 1
        for gram, c in _ngrams(h, order).items():
            if gram in best:
                matched_info[len(gram)] += info(gram) * min(c, best[gram])
    score = sum(matched_info[n] / max(hyp_ngrams[n], 1) for n in range(1, order + 1))
    mean_ref_len = ref_words / (n_refs / len(hypotheses))
    return score * nist_length_penalty(hyp_ngrams[1] / mean_ref_len)


def coco_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                 meteor: bool = True) -> dict[str, float]:
    """METEOR, ROUGE_L and CIDEr from pycocoevalcap on PTB-tokenized text (Java)."""
    groups = _check(hypotheses, references)
    if shutil.which("java") is None:
        raise ConfigError("METEOR, ROUGE_L and CIDEr need a Java runtime for the COCO code's tokenizer "
                          "and METEOR 1.5: no `java` on PATH (Debian: apt-get install default-jre-headless)")
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise ConfigError("METEOR, ROUGE_L and CIDEr need pycocoevalcap: pip install 'lmforge[nlg]'") from None
    keys = [f"inst-{i}" for i in range(len(groups))]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in g] for k, g in zip(keys, groups)})
    res = tokenizer.tokenize({k: [{"caption": h}] for k, h in zip(keys, hypotheses)})
    out = {}
    if meteor:
        scorer = Meteor()
        try:
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def nlg_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Every metric of the E2E script: BLEU, NIST, METEOR, ROUGE_L, CIDEr."""
    try:
        import sacrebleu  # noqa: F401
    except ImportError:
        raise ConfigError("BLEU needs sacrebleu: pip install 'lmforge[nlg]'") from None
    scores = {"BLEU": bleu(hypotheses, references), "NIST": nist(hypotheses, references)}
    scores.update(coco_metrics(hypotheses, references))
    return {k: scores[k] for k in METRICS}
