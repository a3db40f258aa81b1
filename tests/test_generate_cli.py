"""`lmforge generate`: the streamed text of one prompt and the JSON lines of a prompt file equal what
the library decodes; stop strings, stop tokens, the chat template and seeded sampling; bad input
gets one line and exit 2."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models import from_pretrained, generate

TEXTS = ["the cat sat on the mat and the dog sat on the log", "a bird in the hand is worth two in the bush",
         "to be or not to be, that is the question"] * 20


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    from benchmarks.soak import build_decoder
    return build_decoder(tmp_path_factory.mktemp("gpt"), TEXTS)


def library(model_dir, prompt, **kw):
    tok = load_tokenizer(model_dir)
    model = from_pretrained(model_dir).eval()
    ids = torch.tensor([tok([prompt], padding="none")["input_ids"][0]])
    out = generate(model, ids, eos_token_id=[tok.eos_token_id], **kw)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    return tok.decode(out)


def run(capsys, *argv):
    code = main(["generate", *map(str, argv), "--precision", "fp32"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_streamed_prompt_equals_the_library(capsys, gpt):
    code, out, _ = run(capsys, "--model", gpt, "--prompt", "the cat", "--max-new-tokens", 20, "--no-repeat-ngram", 2)
    assert code == 0
    want = library(gpt, "the cat", max_new_tokens=20, no_repeat_ngram_size=2)
    assert want and out == want + "\n"


@pytest.mark.parametrize("beams", [1, 3])
def test_no_repeat_ngram_scope_reaches_the_decoder(capsys, gpt, tmp_path, beams):
    """--no-repeat-ngram-scope output: "sat on the" of the prompt may come again (all blocks it)."""
    prompt, kw = "the cat sat on the", dict(max_new_tokens=12, no_repeat_ngram_size=3, num_beams=beams)
    want = library(gpt, prompt, no_repeat_ngram_scope="output", **kw)
    assert want != library(gpt, prompt, **kw), "the scopes decode alike: the case tests nothing"
    f = tmp_path / "p.txt"
    f.write_text(prompt + "\n")
    source = ["--prompt", prompt] if beams == 1 else ["--input", f]   # streamed, or in a batch
    code, out, _ = run(capsys, "--model", gpt, *source, "--max-new-tokens", 12, "--beams", beams,
                       "--no-repeat-ngram", 3, "--no-repeat-ngram-scope", "output")
    assert code == 0
    assert (out == want + "\n") if beams == 1 else json.loads(out)["text"] == want


def test_prompt_file_with_beams_gives_json_lines(capsys, gpt, tmp_path):
    prompts = ["the cat", "a bird in", "to be"]
    f = tmp_path / "p.txt"
    f.write_text("\n".join(prompts) + "\n\n")
    code, out, _ = run(capsys, "--model", gpt, "--input", f, "--beams", 3, "--length-penalty", 0.8,
                       "--max-new-tokens", 12, "--batch-size", 2)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for r in rows:    # batched and left-padded, each equals its prompt decoded alone
        assert r["text"] == library(gpt, r["prompt"], max_new_tokens=12, num_beams=3, length_penalty=0.8)


def test_stop_string_cuts_the_output(capsys, gpt, tmp_path):
    free = library(gpt, "the cat", max_new_tokens=20)
    stop = " ".join(free.strip().split()[1:3])   # two words (tokens) the free-running output contains
    f = tmp_path / "p.txt"
    f.write_text("the cat\n")
    code, out, _ = run(capsys, "--model", gpt, "--input", f, "--max-new-tokens", 20, "--stop", stop)
    row = json.loads(out)
    assert code == 0 and row["finish_reason"] == "stop" and row["text"] == free[:free.index(stop)]
    code, out, _ = run(capsys, "--model", gpt, "--prompt", "the cat", "--max-new-tokens", 20, "--stop", stop)
    assert out == free[:free.index(stop)] + "\n"     # streaming holds back what could start the stop string


def test_sampling_is_seeded(capsys, gpt):
    outs = [run(capsys, "--model", gpt, "--prompt", "a bird", "--temperature", 1.5, "--seed", s,
                "--max-new-tokens", 15)[1] for s in (1, 1, 2)]
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_chat_template_wraps_the_prompt(gpt, tmp_path):
    import shutil
    from argparse import Namespace

    from lmforge.cli.generate import Session

    d = tmp_path / "chat"
    shutil.copytree(gpt, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
    cfg["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    args = Namespace(model=str(d), adapter=None, beams=1, temperature=None, top_k=None, top_p=None, seed=0,
                     no_chat_template=False, max_new_tokens=5, no_repeat_ngram=0, stop=(), precision="fp32",
                     device="cpu")
    tok = load_tokenizer(d)
    assert Session(args).encode("hi") == tok(["<user>hi<assistant>"], padding="none", add_special_tokens=False)["input_ids"][0]
    args.no_chat_template = True
    assert Session(args).encode("hi") == tok(["hi"], padding="none")["input_ids"][0]


@pytest.mark.parametrize("argv, problem", [
    (["--prompt", "x", "--input", "f"], "one of --prompt"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--prompt", "x", "--beams", "2", "--top-p", "0.9"], "--beams does not sample"),
    (["--prompt", "x", "--max-new-tokens", "5000"], "positions"),
])
def test_bad_requests_are_one_line(capsys, gpt, argv, problem):
    code, _, err = run(capsys, "--model", gpt, *argv)
    assert code == 2 and problem in err and len(err.strip().splitlines()) <= 2 and "Traceback" not in err


def test_an_encoder_is_refused(capsys):
    code, _, err = run(capsys, "--model", "minilm", "--prompt", "x")
    assert code == 2 and "not a decoder" in err
