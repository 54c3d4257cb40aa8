"""Loaders: the real files in ../shared/benchmarks with their PROVENANCE row counts, and
small fixtures of each format (written here) so the parsing is tested without ../shared."""

from __future__ import annotations

import json

import pytest

from factory.bench import blurb, codexglue, finance, lexglue, maltese, stackoverflow
from factory.bench.data import find_task_folder, kfold, split_fractions
from factory.stage import UserError
from tests.conftest import SHARED as SHARED_ROOT

SHARED = SHARED_ROOT / "benchmarks"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} absent (shared data)")


@needs_shared
@pytest.mark.parametrize("folder,counts", [
    ("blurb/NCBI-disease-IOB", (5424, 923, 940)),
    ("blurb/BC5CDR-chem-IOB", (4560, 4581, 4797)),
    ("blurb/BC5CDR-disease-IOB", (4560, 4581, 4797)),
])
def test_blurb_ner_counts(folder, counts):
    d = blurb.load_iob(SHARED / folder)
    assert (len(d.train), len(d.devel), len(d.test)) == counts


@needs_shared
def test_blurb_sentence_sets_counts():
    gad = blurb.load_relation(SHARED / "blurb/GAD")
    assert (len(gad.train), len(gad.test)) == (4261, 534) and gad.labels == ["0", "1"]
    hoc = blurb.load_hoc(SHARED / "blurb/HoC")
    assert (len(hoc.train), len(hoc.test)) == (12119, 3547)
    # Documents: the PROVENANCE's 1,295 train / 371 test PMIDs.
    assert len({e.group for e in hoc.train}) == 1295 and len({e.group for e in hoc.test}) == 371
    ids = (SHARED / "blurb/HoC/split_test_pmid.tsv").read_text().strip().split(",")
    assert {e.group for e in hoc.test} == {i.removesuffix(".txt") for i in ids}
    bio = blurb.load_biosses(SHARED / "blurb/BIOSSES")
    assert (len(bio.train), len(bio.test)) == (64, 20)
    assert all(0.0 <= e.label <= 4.0 and e.pair for e in bio.train + bio.test)
    qa = blurb.load_yesno_qa(SHARED / "blurb/PubMedQA")
    assert (len(qa.train), len(qa.test)) == (450, 500) and qa.labels == ["yes", "no", "maybe"]
    truth = json.loads((SHARED / "blurb/PubMedQA/test_ground_truth.json").read_text())
    assert {e.group: qa.labels[e.label] for e in qa.test} == truth


@needs_shared
def test_other_suites_counts():
    ch = lexglue.load_casehold(SHARED / "legal/casehold_lexglue_test1000")
    assert len(ch.test) == 1000 and ch.folds == 5 and not ch.train
    assert all(len(e.endings) == 5 for e in ch.test)
    un = lexglue.load_unfair_tos(SHARED / "legal/unfair_tos_lexglue_test1000")
    assert len(un.test) == 1000 and len(un.labels) == 8
    ud = maltese.load_upos(SHARED / "maltese/UD_Maltese-MUDT")
    assert (len(ud.train), len(ud.devel), len(ud.test)) == (1123, 433, 518)
    assert (sum(map(len, ud.train.tokens)), sum(map(len, ud.devel.tokens)),
            sum(map(len, ud.test.tokens))) == (22880, 10209, 11073)
    st = maltese.load_sentiment(SHARED / "maltese/sentiment_mt")
    assert (len(st.train), len(st.devel), len(st.test)) == (595, 85, 171)
    fpb = finance.load_phrasebank(SHARED / "finance/financial_phrasebank")
    assert len(fpb.train) + len(fpb.devel) + len(fpb.test) == 4846
    assert (len(fpb.train), len(fpb.devel), len(fpb.test)) == (3102, 775, 969)
    co = codexglue.load_cosqa(SHARED / "code/cosqa_dev")
    assert len(co.test) == 604 and co.folds == 5


@needs_shared
def test_cloze_without_answers_names_the_missing_file():
    with pytest.raises(UserError, match="answers_python.txt"):
        codexglue.load_cloze(SHARED / "code/cloze_maxmin", "python")


def test_find_task_folder_prefix_case_insensitive(tmp_path):
    for name in ("BC2GM-IOB", "bc5cdr-chem-IOB", "BC5CDR-disease-IOB", "unfair_tos_x"):
        (tmp_path / name).mkdir()
    assert find_task_folder(tmp_path, ("BC2GM",)).name == "BC2GM-IOB"
    assert find_task_folder(tmp_path, ("BC5CDR-chem",)).name == "bc5cdr-chem-IOB"
    assert find_task_folder(tmp_path, ("UNFAIR-ToS",)).name == "unfair_tos_x"
    assert find_task_folder(tmp_path, ("JNLPBA",)) is None
    assert find_task_folder(tmp_path / "nowhere", ("BC2GM",)) is None


def test_relation_and_hoc_tsv_fixture(tmp_path):
    (tmp_path / "train.tsv").write_text(
        'index\tsentence\tlabel\n0\t@CHEMICAL$ "binds" @GENE$ .\tCPR:3\n1\tno link .\tfalse\n')
    (tmp_path / "test.tsv").write_text("index\tsentence\tlabel\n7\tx @GENE$\tCPR:9\n")
    d = blurb.load_relation(tmp_path)
    assert d.labels == ["CPR:3", "CPR:9", "false"]
    assert d.train[0].text == '@CHEMICAL$ "binds" @GENE$ .' and d.test[0].label == 1

    hoc = tmp_path / "hoc"
    hoc.mkdir()
    rows = "labels\tsentence\tindex\n" + "\n".join(
        ",".join(f"{k}_{int(k in on)}" for k in range(10)) + f"\ts{i}\t{doc}_s{i}"
        for i, (on, doc) in enumerate([({1}, "11"), ({3, 9}, "11"), (set(), "12")])) + "\n"
    for f in ("train.tsv", "test.tsv"):
        (hoc / f).write_text(rows)
    h = blurb.load_hoc(hoc)
    assert [e.label for e in h.train] == [(1,), (3, 9), ()]
    assert [e.group for e in h.train] == ["11", "11", "12"]
    (hoc / "test.tsv").write_text("labels\tsentence\tindex\n0_2\tx\t1_s0\n")
    with pytest.raises(UserError, match="hallmark_value"):
        blurb.load_hoc(hoc)


def test_biosses_original_only_is_cross_validated(tmp_path):
    header = "id\tsentence1\tsentence2\tannotator_A\tscore_mean\n"
    (tmp_path / "biosses_all.tsv").write_text(header + "".join(
        f"{i}\ta {i}\tb {i}\t2\t{i / 5}\n" for i in range(10)))
    d = blurb.load_biosses(tmp_path)
    assert d.folds == 5 and len(d.test) == 10 and d.test[3].label == pytest.approx(0.6)
    assert d.test[3].pair == "b 3"


def test_pubmedqa_blurb_json_layout(tmp_path):
    item = {"QUESTION": "q?", "CONTEXTS": ["c1", "c2"], "final_decision": "no"}
    (tmp_path / "train.json").write_text(json.dumps({"1": item, "2": {**item,
                                                                      "final_decision": "yes"}}))
    (tmp_path / "test.json").write_text(json.dumps({"3": item}))
    d = blurb.load_yesno_qa(tmp_path)
    assert [e.label for e in d.train] == [1, 0] and d.train[0].pair == "c1 c2"
    assert d.labels == ["yes", "no"]          # BioASQ-like: no `maybe` anywhere


def test_lexglue_full_layout_and_label_ids(tmp_path):
    row = {"context": "held <HOLDING>", "endings": ["a", "b", "c", "d", "e"], "label": 3}
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    d = lexglue.load_casehold(tmp_path)
    assert d.folds is None and d.train[0].label == 3 and d.train[0].endings[4] == "e"
    u = tmp_path / "unfair"
    u.mkdir()
    (u / "train.jsonl").write_text(json.dumps({"text": "t", "labels": [7, 0]}) + "\n")
    (u / "test.jsonl").write_text(json.dumps({"text": "t", "labels": ["Arbitration"]}) + "\n")
    d = lexglue.load_unfair_tos(u)
    assert d.train[0].label == (0, 7) and d.test[0].label == (7,)
    (u / "test.jsonl").write_text(json.dumps({"text": "t", "labels": ["Nope"]}) + "\n")
    with pytest.raises(UserError, match="unknown UNFAIR-ToS label"):
        lexglue.load_unfair_tos(u)


def test_conllu_skips_multiword_and_empty_nodes(tmp_path):
    text = ("# sent_id = 1\n"
            "1-2\tdal-\t_\t_\t_\t_\t_\t_\t_\t_\n"
            "1\td\t_\tADP\t_\t_\t0\troot\t_\t_\n"
            "2\tal-\t_\tDET\t_\t_\t1\tdet\t_\t_\n"
            "2.1\tx\t_\tX\t_\t_\t_\t_\t_\t_\n"
            "3\tkelb\t_\tNOUN\t_\t_\t1\tobj\t_\t_\n\n")
    (tmp_path / "x-ud-train.conllu").write_text(text)
    s = maltese.read_conllu(tmp_path / "x-ud-train.conllu")
    assert s.tokens == [["d", "al-", "kelb"]] and s.tags == [["ADP", "DET", "NOUN"]]
    (tmp_path / "bad.conllu").write_text("1\tx\tNOUN\n")
    with pytest.raises(UserError, match="10 tab-separated"):
        maltese.read_conllu(tmp_path / "bad.conllu")


def test_sentiment_and_phrasebank_csv(tmp_path):
    (tmp_path / "train.csv").write_text('1,"tajjeb, ħafna"\n0,ħażin\n')
    (tmp_path / "test.csv").write_text("label,text\n0,le\n")
    d = maltese.load_sentiment(tmp_path)
    assert [(e.label, e.text) for e in d.train] == [(1, "tajjeb, ħafna"), (0, "ħażin")]
    assert len(d.test) == 1 and d.devel is None
    fin = tmp_path / "fin"
    fin.mkdir()
    lines = [f"{['negative', 'neutral', 'positive'][i % 3]},sentence {i}" for i in range(50)]
    (fin / "Sentences_50Agree.csv").write_bytes("\n".join(lines).encode("latin-1"))
    d = finance.load_phrasebank(fin)
    assert (len(d.train), len(d.devel), len(d.test)) == (32, 8, 10)
    assert {e.text for e in d.train + d.devel + d.test} == {f"sentence {i}" for i in range(50)}


def test_splits_are_fixed_and_disjoint():
    folds = kfold(23, 5)
    assert sorted(i for f in folds for i in f.tolist()) == list(range(23))
    assert [len(f) for f in folds] == [5, 5, 5, 4, 4]
    assert all((a == b).all() for a, b in zip(folds, kfold(23, 5)))
    tr, dv, te = split_fractions(100, 0.2, 0.2)
    assert (len(tr), len(dv), len(te)) == (64, 16, 20)
    assert not (set(tr) & set(te)) and not (set(dv) & set(te))


def test_cloze_and_cosqa_fixtures(tmp_path):
    items = [{"idx": "maxmin-1", "nl_tokens": ["largest", "value"],
              "pl_tokens": ["return", "<mask>", "(", "a", ",", "b", ")"]}]
    (tmp_path / "clozeTest_python.json").write_text(json.dumps(items))
    with pytest.raises(UserError, match="answers_python.txt"):
        codexglue.load_cloze(tmp_path, "python")
    (tmp_path / "answers_python.txt").write_text("maxmin-1<CODESPLIT>max\n")
    d = codexglue.load_cloze(tmp_path, "python")
    [ex] = d.test
    assert (ex.left, ex.right, ex.answer) == ("largest value return", "( a , b )", "max")
    (tmp_path / "cosqa-dev.json").write_text(json.dumps(
        [{"idx": "q1", "doc": "sort a list", "code": "def f(x): return sorted(x)", "label": 1}]))
    c = codexglue.load_cosqa(tmp_path)
    assert c.folds == 5 and c.test[0].pair.startswith("def f") and c.test[0].label == 1


def test_stackoverflow_fixtures(tmp_path):
    (tmp_path / "train.csv").write_text(
        'Id,Title,Body,Tags,CreationDate,Y\n1,"How, why?",<p>body</p>,<py>,2016,HQ\n'
        "2,t,b,<c>,2016,LQ_CLOSE\n")
    (tmp_path / "valid.csv").write_text("Id,Title,Body,Tags,CreationDate,Y\n3,t,b,x,y,LQ_EDIT\n")
    d = stackoverflow.load_quality(tmp_path)
    assert [(e.text, e.pair, e.label) for e in d.train] == [("How, why?", "<p>body</p>", 0),
                                                            ("t", "b", 2)]
    assert d.test[0].label == 1
    closed = tmp_path / "closed"
    closed.mkdir()
    (closed / "train.csv").write_text("PostId,Title,BodyMarkdown,OpenStatus\n"
                                      "1,t,b,open\n2,t,b,off topic\n")
    c = stackoverflow.load_closed(closed)
    assert c.folds == 5 and [e.label for e in c.test] == [0, 3]
    (closed / "train.csv").write_text("PostId,Title,BodyMarkdown,OpenStatus\n1,t,b,meh\n")
    with pytest.raises(UserError, match="OpenStatus 'meh'"):
        stackoverflow.load_closed(closed)
