"""MiniLM against transformers and sentence-transformers on real sentences; the embed CLI."""

import json
import subprocess
import sys

import pytest
import torch
import transformers as T

from lmforge.cli import main
from lmforge.data.tokenizer import load_tokenizer
from lmforge.infer.embed import Embedder
from lmforge.models import from_pretrained
from tests.conftest import read_sst2_dev


@pytest.fixture(scope="module")
def sst2(data_dir):
    return [s for s, _ in read_sst2_dev(data_dir)]


@torch.no_grad()
def test_minilm_hidden_states_match_transformers_on_sst2_dev(minilm_dir, sst2):
    assert len(sst2) == 872
    ours = from_pretrained("minilm").eval()
    ref = T.BertModel.from_pretrained(minilm_dir).eval()
    tok = load_tokenizer("minilm")
    worst = 0.0
    for i in range(0, len(sst2), 128):
        b = tok(sst2[i:i + 128])
        a = ours(b["input_ids"], b["attention_mask"], b["token_type_ids"]).hidden_states
        r = ref(**b).last_hidden_state
        keep = b["attention_mask"].bool()
        worst = max(worst, (a[keep] - r[keep]).abs().max().item())
    assert worst < 1e-4, worst


def test_embeddings_match_sentence_transformers(minilm_dir, sst2):
    st = pytest.importorskip("sentence_transformers")
    ref = torch.tensor(st.SentenceTransformer(str(minilm_dir), device="cpu").encode(sst2[:300], batch_size=64))
    got = Embedder("minilm").embed(sst2[:300])
    assert got.shape == (300, 384)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(300))


def test_cli_prints_one_json_array_per_text(capsys, tmp_path, sst2):
    assert main(["embed", "--model", "minilm", "a charming film", "a dull film"]) == 0
    lines = capsys.readouterr().out.splitlines()
    vecs = [json.loads(x) for x in lines]
    assert len(vecs) == 2 and all(len(v) == 384 for v in vecs)
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(sst2[:5]) + "\n")
    assert main(["embed", "--input", str(f), "--precision", "fp32"]) == 0
    from_file = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    want = Embedder("minilm").embed(sst2[:5])
    assert len(from_file) == 5
    torch.testing.assert_close(torch.tensor(from_file), want, atol=1e-6, rtol=0)


def test_cli_bf16_embeddings_stay_close_to_fp32(capsys, sst2):
    # bf16 compute (autocast, fp32 weights): what --precision auto runs on AMX / AVX512_BF16 CPUs
    texts = sst2[:64]
    assert main(["embed", "--precision", "bf16", "--decimals", "8", *texts]) == 0
    out = capsys.readouterr()
    assert "precision bf16" in out.err                # the resolved precision is said
    got = torch.tensor([json.loads(x) for x in out.out.splitlines()])
    want = Embedder("minilm").embed(texts)
    cos = (got * want).sum(1)
    assert not torch.equal(got, want)            # it really computed in bf16
    assert float(cos.min()) >= 0.999, float(cos.min())


def test_cli_quantize_int8_stays_close_to_fp32(capsys, sst2):
    assert main(["embed", "--quantize", "int8", *sst2[:8]]) == 0
    got = torch.tensor([json.loads(x) for x in capsys.readouterr().out.splitlines()])
    want = Embedder("minilm").embed(sst2[:8])
    cos = (got * want).sum(1)                      # both L2-normalised
    # int8 rounding moves sentence vectors by about 1% (STS-B Spearman by 0.1 point: benchmarks/int8.py)
    assert not torch.equal(got, want) and cos.min() > 0.97 and cos.mean() > 0.985, cos


def _bad_model(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "xlnet"}))
    return d


ERRORS = [
    ("empty input file", lambda p: ["--input", str(_touch(p / "empty.txt"))], "empty.txt: empty input"),
    ("missing input file", lambda p: ["--input", str(p / "nope.txt")], "nope.txt: no such file"),
    ("missing config", lambda p: ["--model", str(_mkdir(p / "m")), "x"], "config.json: not found"),
    ("unknown model_type", lambda p: ["--model", str(_bad_model(p)), "x"], "model_type 'xlnet' is not supported"),
    ("no texts", lambda p: [], "nothing to embed"),
]


def _touch(p):
    p.write_text("")
    return p


def _mkdir(p):
    p.mkdir()
    return p


@pytest.mark.parametrize("name,args,words", ERRORS, ids=[e[0] for e in ERRORS])
def test_cli_errors_are_one_line_and_exit_nonzero(tmp_path, capsys, name, args, words):
    assert main(["embed", *args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and err.startswith("lmforge embed: error:"), err


def test_console_script_exit_code(tmp_path):
    empty = _touch(tmp_path / "empty.txt")
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "embed", "--input", str(empty)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "empty input" in r.stderr and r.stdout == ""
