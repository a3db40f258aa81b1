"""Data-to-text tasks on the real files (E2E, WebNLG 2017, DART under $LMFORGE_DATA): parsing,
grouping of references per unique input (counts from the data sets' own documentation and
PROVENANCE files), the LoRA paper's source format, and one-line errors for malformed files."""

import csv
import gzip
import os
import re
from collections import defaultdict
from pathlib import Path

import pytest

from lmforge.data import nlg
from lmforge.errors import ConfigError, DataError

ROOT = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def data_root(monkeypatch):
    assert (ROOT / "e2e-nlg" / "devset.csv").is_file(), f"the shared data is missing under {ROOT}"
    monkeypatch.setenv("LMFORGE_DATA", str(ROOT))


# (task, split, unique inputs, references): E2E README/PROVENANCE (547 MRs / 4,672 refs, 630 /
# 4,693); WebNLG challenge 2017 dev: 872 entries / 2,268 lexicalisations, two entries with the same
# triples; DART v1.1.1 dev: 2,768 items / 6,980 annotations, 2,721 distinct triple sets
COUNTS = [("e2e", "dev", 547, 4672), ("e2e", "test", 630, 4693), ("webnlg", "dev", 871, 2268),
          ("dart", "dev", 2721, 6980)]


@pytest.mark.parametrize("task, split, inputs, refs", COUNTS)
def test_unique_inputs_and_all_their_references(task, split, inputs, refs):
    data = nlg.eval_set(task, split)
    assert (len(data), data.n_references) == (inputs, refs)
    assert len(set(data.sources)) == inputs          # unique, nothing merged or split
    assert all(data.references)
    assert data == nlg.eval_set(task, split)         # a stable order
    assert data.prompts[0] == data.sources[0] + " ||"


def test_e2e_groups_every_row_of_an_mr():
    path = ROOT / "e2e-nlg" / "devset.csv"
    by_mr = defaultdict(list)
    order = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["mr"] not in by_mr:
                order.append(row["mr"])
            by_mr[row["mr"]].append(row["ref"].strip())
    data = nlg.eval_set("e2e", "dev")
    assert [tuple(by_mr[mr]) for mr in order] == list(data.references)
    assert [nlg.e2e_source(nlg.parse_mr(mr)) for mr in order] == list(data.sources)


def test_e2e_mrs_with_all_eight_slots():
    mr = ("name[The Eagle], eatType[coffee shop], food[Japanese], priceRange[less than £20], "
          "customer rating[low], area[riverside], familyFriendly[yes], near[Burger King]")
    slots = nlg.parse_mr(mr)
    assert slots == [("name", "The Eagle"), ("eatType", "coffee shop"), ("food", "Japanese"),
                     ("priceRange", "less than £20"), ("customer rating", "low"), ("area", "riverside"),
                     ("familyFriendly", "yes"), ("near", "Burger King")]
    assert nlg.e2e_source(slots) == ("name : The Eagle | Type : coffee shop | food : Japanese | price : less "
                                     "than £ 20 | customer rating : low | area : riverside | family friendly : "
                                     "yes | near : Burger King")
    # the real files: every MR parses, 466 dev rows carry all eight slots
    rows = nlg.read_e2e_csv(ROOT / "e2e-nlg" / "devset.csv")
    eight = [r for r in rows if len(nlg.parse_mr(r[0])) == 8]
    assert len(eight) == 466
    assert all({k for k, _ in nlg.parse_mr(r[0])} == set(nlg.E2E_SLOTS) for r in eight)


def test_e2e_sources_from_official_mrs_equal_the_lora_files():
    """Prompts built from devset.csv are the LoRA paper's valid.txt sources, row for row, so a model
    trained on its train.txt sees the same format at evaluation."""
    rows = nlg.read_e2e_csv(ROOT / "e2e-nlg" / "devset.csv")
    lora = nlg.read_lora_txt(ROOT / "e2e-nlg" / "lora_format" / "valid.txt")
    assert len(rows) == len(lora) == 4672
    assert [src for _, src, _ in rows] == [e.source for e in lora]
    lora_refs = nlg.eval_set("e2e", "dev", references="lora")
    assert lora_refs.sources == nlg.eval_set("e2e", "dev").sources
    assert lora_refs.references[0][0] == ("There is a place in the city centre , Alimentum , that is not "
                                          "family - friendly .")


def test_training_examples():
    e2e = nlg.train_examples("e2e")
    assert len(e2e) == 42061
    assert e2e[0] == nlg.Example("name : The Vaults | Type : pub | price : more than £ 30 | customer rating : "
                                 "5 out of 5 | near : Café Adriatic",
                                 "The Vaults pub near Café Adriatic has a 5 star rating . Prices start at £ 30 .")
    assert e2e[0].prompt.endswith(" ||") and e2e[0].completion.startswith(" The Vaults")
    webnlg = nlg.train_examples("webnlg")              # the LoRA repo's json: 'good' lexicalisations
    assert len(webnlg) == 18025
    dart = nlg.train_examples("dart")
    assert len(dart) == 62659
    assert dart[0].source == ("First Clearing : location : On NYS 52 1 Mi. Youngsville | On NYS 52 1 Mi. "
                              "Youngsville : city_or_town : Callicoon, New York")


def test_webnlg_triples_from_the_xml():
    data = nlg.eval_set("webnlg", "dev")
    assert data.sources[0] == "Aarhus : leaderName : Jacob_Bundsgaard"
    assert data.references[0] == ("The leader of Aarhus is Jacob Bundsgaard.",)
    sizes = [s.count(" | ") + 1 for s in data.sources]
    assert min(sizes) == 1 and max(sizes) == 7 and sizes == sorted(sizes)   # 1triples .. 7triples
    two = data.sources.index("Abilene_Regional_Airport : cityServed : Abilene,_Texas | Abilene,_Texas : isPartOf : Texas")
    assert len(data.references[two]) == 3
    # the LoRA repository's dev json was made from the same XML: same entries in the same order
    lora = nlg.read_webnlg_lora_json(ROOT / "webnlg" / "lora_format_webnlg_challenge_2017" / "dev.json.gz")
    assert list(dict.fromkeys(s for s, _ in lora)) == list(data.sources)
    # the two entries with the same triples are one input with the references of both
    entries = [e for f in nlg._xml_files(ROOT / "webnlg" / "webnlg_challenge_2017" / "dev") for e in nlg.read_webnlg_xml(f)]
    assert len(entries) == 872
    twice = [s for s in data.sources if sum(e[0] == s for e in entries) == 2]
    assert len(twice) == 1
    assert data.references[data.sources.index(twice[0])] == tuple(r for s, refs in entries if s == twice[0] for r in refs)


def test_dart_properties_are_lower_cased_and_items_kept_apart():
    data = nlg.eval_set("dart", "dev")
    assert data.sources[0] == "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina"
    assert data.references[0] == ("A school from Mars Hill, North Carolina, joined in 1973.",)


def test_missing_splits_and_bad_names(monkeypatch):
    with pytest.raises(DataError, match="testdata_with_lex.xml: no such file"):
        nlg.eval_set("webnlg", "test")
    with pytest.raises(DataError, match="dart-v1.1.1-full-test.json: no such file"):
        nlg.eval_set("dart", "test")
    with pytest.raises(ConfigError, match="unknown data-to-text task 'e2f'"):
        nlg.eval_set("e2f", "dev")
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        nlg.eval_set("e2e", "valid")
    with pytest.raises(ConfigError, match="dev only"):
        nlg.eval_set("e2e", "test", references="lora")
    monkeypatch.delenv("LMFORGE_DATA")
    with pytest.raises(ConfigError, match="LMFORGE_DATA"):
        nlg.eval_set("e2e", "dev")


XML_OK = """<benchmark><entries>
<entry category="Airport" eid="Id1" size="1">
<modifiedtripleset><mtriple>Aarhus | leaderName | Jacob_Bundsgaard</mtriple></modifiedtripleset>
<lex comment="good" lid="Id1">The leader of Aarhus is Jacob Bundsgaard.</lex>
</entry>
"""

MALFORMED = [  # (file, content, expected one-line message)
    ("e2e.csv", 'mr,ref\n"name[A], eatType[pub]",A pub.\n"name[B], eatType pub",B.\n', "e2e.csv:3: field mr: expected slot[value]"),
    ("e2e.csv", 'mr,ref\n"name[A], colour[red]",A.\n', "e2e.csv:2: field mr: unknown slot 'colour'"),
    ("e2e.csv", 'mr,ref\n"name[A]",A.\n"name[B]",B,extra\n', "e2e.csv:3: expected 2 fields"),
    ("e2e.csv", 'mr,text\n"name[A]",A.\n', "e2e.csv:1: expected the header 'mr,ref'"),
    ("e2e.csv", 'mr,ref\n"name[A]",\n', "e2e.csv:2: field ref is empty"),
    ("valid.txt", "name : A||A .\nname : B | B .\n", "valid.txt:2: expected 'source||reference'"),
    ("valid.txt", "name : A||A .\nname B||B .\n", "valid.txt:2: expected 'slot : value'"),
    ("dev.xml", XML_OK + "<entry eid=\"Id2\">\n<modifiedtripleset><mtriple>Aarhus | leaderName</mtriple>"
     "</modifiedtripleset></entry></entries></benchmark>", "dev.xml:6: entry Id2: expected 'subject | property | object'"),
    ("dev.xml", XML_OK + "<entry eid=\"Id2\">\n</entries></benchmark>", "dev.xml:7: invalid XML"),
    ("dart.json", '[\n{"tripleset": [["a", "B", "c"]], "annotations": [{"text": "x"}]},\n{"tripleset": ', "dart.json:3: invalid JSON"),
    ("dart.json", '[{"tripleset": [["a", "B"]], "annotations": []}]', "dart.json: item 1: field tripleset"),
]


@pytest.mark.parametrize("name, content, message", MALFORMED, ids=[m[2][:40] for m in MALFORMED])
def test_malformed_files_are_one_line_errors_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    reader = {"e2e.csv": nlg.read_e2e_csv, "valid.txt": nlg.read_lora_txt, "dev.xml": nlg.read_webnlg_xml,
              "dart.json": nlg.read_dart_json}[name]
    with pytest.raises(DataError, match=re.escape(message)) as e:   # literal text
        reader(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_gzipped_and_non_utf8_files(tmp_path):
    gz = tmp_path / "train.txt.gz"
    gz.write_bytes(gzip.compress("name : A | Type : pub||A is a pub .\n".encode()))
    assert nlg.read_lora_txt(gz) == [nlg.Example("name : A | Type : pub", "A is a pub .")]
    bad = tmp_path / "valid.txt"
    bad.write_bytes(b"name : A||A .\nname : \xff||B .\n")
    with pytest.raises(DataError, match="valid.txt:2: not UTF-8"):
        nlg.read_lora_txt(bad)


def test_official_e2e_train_csv_when_the_lora_file_is_absent(tmp_path, monkeypatch):
    (tmp_path / "e2e-nlg").mkdir()
    (tmp_path / "e2e-nlg" / "trainset.csv").write_text(
        'mr,ref\n"name[A], priceRange[£20-25]",A costs £20-25.\n"name[B], eatType[pub]",B is a pub.\n', encoding="utf-8")
    monkeypatch.setenv("LMFORGE_DATA", str(tmp_path))
    assert nlg.train_examples("e2e") == [nlg.Example("name : A | price : £ 20 - 25", "A costs £20-25."),
                                         nlg.Example("name : B | Type : pub", "B is a pub.")]
    # dev examples keep the file's row order (one per reference)
    monkeypatch.setenv("LMFORGE_DATA", str(ROOT))
    dev = nlg.train_examples("e2e", split="dev")
    assert len(dev) == 4672 and dev[0].reference.startswith("There is a place in the city centre, Alimentum")
