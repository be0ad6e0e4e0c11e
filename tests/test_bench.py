"""Benchmark readers (tests/fixtures/: the official on-disk formats) and the official scoring rules; every
expected score is worked out by hand in the comments."""
from pathlib import Path

import pytest

from vltok.eval import datasets as D
from vltok.eval import scoring as S

FIX = Path(__file__).resolve().parent / "fixtures"


# ---------------------------------------------------------------------------------------------------------------
# VQA normalisation (official vqaEval.py) edge cases


@pytest.mark.parametrize("text,want", [
    ("1,000", "1000"),            # a digit,digit comma: every punctuation mark is deleted, none becomes a space
    ("hot-dog", "hot dog"),       # "-" touches no space: replaced by a space
    ("hot - dog", "hot  dog"),    # "-" touches a space: deleted (the double space goes in process_digit_article)
    ("yes!", "yes "),
    ("3.5", "3.5"),               # a period followed by a digit stays
    ("end.", "end"),
    ("don't", "don't"),           # the apostrophe is not in the official punctuation list
    ("." * 40, "." * 8),          # re.UNICODE (32) passed as sub()'s count: at most 32 periods go
])
def test_process_punctuation(text, want):
    assert S.process_punctuation(text) == want


@pytest.mark.parametrize("text,want", [
    ("The Two dogs", "2 dogs"), ("an apple", "apple"), ("none", "0"), ("ten", "10"), ("eleven", "eleven"),
    ("dont", "don't"), ("isnt it", "isn't it"), ("hot  dog", "hot dog"), ("Im", "im"),  # "Im" key is never hit
])
def test_process_digit_article(text, want):
    assert S.process_digit_article(text) == want


def test_contraction_table_has_the_official_entries():
    c = S.CONTRACTIONS
    assert len(c) == 120
    assert c["couldn'tve"] == c["couldnt've"] == "couldn't've"
    assert c["somebody'd"] == "somebodyd"   # the official table's one reversed entry
    assert c["yall'd've"] == c["y'alld've"] == c["y'all'dve"] == "y'all'd've"
    assert "dont" in c and "don't" not in c


def test_contraction_table_equals_lmms_eval():
    mod = pytest.importorskip("lmms_eval.tasks._task_utils.vqa_eval_metric")
    assert S.CONTRACTIONS == mod.EvalAIAnswerProcessor.CONTRACTIONS
    assert S.NUMBER_MAP == mod.EvalAIAnswerProcessor.NUMBER_MAP


def test_vqa_accuracy_leave_one_out_by_hand():
    # one "red" among 10: leaving it out -> 0 matches (0); leaving a "blue" out -> 1 match (1/3); mean 9/3/10
    assert S.vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    # 3 matches: leaving a match out leaves 2 (2/3), leaving another out leaves 3 (1): (3*2/3 + 7)/10 = 0.9
    assert S.vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert S.vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert S.vqa_accuracy("green", ["red"] * 10) == 0.0


def test_vqa_official_quirks_and_the_lmms_variant():
    # unanimous humans: their answer is NOT normalised, the prediction is ("two" -> "2"): official 0, lmms-eval 1
    assert S.vqa_accuracy("two", ["two"] * 10) == 0.0
    assert S.vqa_accuracy_lmms("two", ["two"] * 10) == 1.0
    assert S.vqa_accuracy("Two", ["2"] * 10) == 1.0
    # mixed humans get punctuation only: "the dog" keeps its article, the prediction "A dog" -> "dog".
    # leave out a "dog" (3x): 2 left (2/3); a "the dog" (3x): 3 (1); a "cat" (4x): 3 (1) -> (2 + 3 + 4) / 10
    gts = ["dog"] * 3 + ["the dog"] * 3 + ["cat"] * 4
    assert S.vqa_accuracy("A dog", gts) == pytest.approx(0.9)
    assert S.vqa_accuracy_lmms("A dog", gts) == 1.0   # lmms-eval strips the article on both sides: 6 "dog"
    assert S.vqa_accuracy(" yes.\n", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)  # (2/3 + 8 * 2/3) / 10
    assert S.vqa_accuracy("1,000", ["1000"] * 10) == 1.0
    assert S.vqa_accuracy("dont", ["don't"] * 10) == 1.0


def test_evalai_processor_and_textvqa_accuracy():
    assert S.evalai_process("McDonald's.") == "mcdonald 's"
    assert S.evalai_process("Coca-Cola") == "coca cola"
    assert S.evalai_process("Yes, sir?") == "yes sir"
    # TextVQA normalises the humans too: 4 "coca cola" + 6 "coca-cola" are ten "coca cola"
    assert S.textvqa_accuracy("Coca-Cola", ["coca cola"] * 4 + ["coca-cola"] * 6) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# the fixtures, read and scored


def test_detect_each_fixture_and_refuse_the_unknown(tmp_path):
    for fmt in ("vqav2", "gqa", "pope", "textvqa", "mme", "scienceqa", "videomme", "mvbench"):
        assert D.detect(FIX / fmt) == fmt
    with pytest.raises(D.DatasetError, match="--format"):
        D.detect(tmp_path)
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.load(tmp_path / "nope")
    (tmp_path / "coco_pope_random.json").write_text("")
    (tmp_path / "problems.json").write_text("{}")
    (tmp_path / "pid_splits.json").write_text("{}")
    with pytest.raises(D.DatasetError, match="several formats"):
        D.detect(tmp_path)


def test_vqav2_fixture_official_and_lmms():
    ds = D.load(FIX / "vqav2")
    assert isinstance(ds, D.Dataset)
    assert [it.id for it in ds.items] == ["1001", "1002", "1003", "1004", "1005"]
    it = ds.items[0]
    assert it.image.endswith("val2014/COCO_val2014_000000000001.jpg") and Path(it.image).exists()
    assert it.prompt == "How many dogs are there?\nAnswer the question using a single word or phrase."
    preds = ["Two", "yes.", "A dog", "hot-dog", "two"]
    # 1001: 1.0; 1002: 0.6; 1003: 0.9; 1004 ("hot dog" 2x, "hotdog" 8x): (2/3 + 16/3)/10 = 0.6; 1005: 0 (quirk)
    s = ds.score(preds)
    assert s["overall"] == pytest.approx((1 + 0.6 + 0.9 + 0.6 + 0) / 5)
    assert s["by_answer_type"]["number"]["acc"] == pytest.approx(0.5)
    assert s["by_answer_type"]["other"]["acc"] == pytest.approx(0.75)
    # lmms-eval: 1003 -> 1.0, 1005 -> 1.0
    assert ds.score(preds, scorer="lmms")["overall"] == pytest.approx((1 + 0.6 + 1 + 0.6 + 1) / 5)
    assert ds.submission(preds)[0] == {"question_id": 1001, "answer": "Two"}
    with pytest.raises(D.DatasetError, match="scorers"):
        ds.score(preds, scorer="nope")


def test_vqav2_without_annotations_gives_the_submission_only(tmp_path):
    import shutil

    shutil.copy(FIX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path)
    ds = D.load(tmp_path, "vqav2")
    assert ds.score(["x"] * 5)["overall"] is None and len(ds.submission(["x"] * 5)) == 5


def test_gqa_fixture():
    ds = D.load(FIX / "gqa")
    # "Yes." -> "yes" (LLaVA's clean-up) right; "Red car" != "red"; "left" right
    s = ds.score(["Yes.", "Red car", "left"])
    assert s["overall"] == pytest.approx(2 / 3)
    assert s["by_structural"]["verify"]["acc"] == 1.0 and s["by_structural"]["query"]["acc"] == 0.5


def test_pope_fixture_per_split_official_and_lmms():
    ds = D.load(FIX / "pope")
    assert [it.meta["split"] for it in ds.items] == ["random"] * 4 + ["popular"] * 4 + ["adversarial"] * 4
    assert [it.target for it in ds.items[:4]] == ["yes", "no", "yes", "no"]
    assert [it.target for it in ds.items[4:]] == ["no", "yes"] * 4
    preds = ["Yes, there is.", "No.", "There is not.", "Nope",       # yes no no yes(!): TP TN FN FP
             "no", "yes", "NO", "Yes.",                               # no yes yes(!) yes: TN TP FP TP
             "no", "no", "no", "no"]                                  # TN FN TN FN
    s = ds.score(preds)
    r, p, a = s["splits"]["random"], s["splits"]["popular"], s["splits"]["adversarial"]
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert p["accuracy"] == 0.75 and p["precision"] == pytest.approx(2 / 3) and p["recall"] == 1.0
    assert p["f1"] == pytest.approx(0.8) and p["yes_ratio"] == 0.75
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"], a["yes_ratio"]) == (0.5, 0.0, 0.0, 0.0, 0.0)
    assert s["overall"] == pytest.approx((0.5 + 0.75 + 0.5) / 3) and s["f1"] == pytest.approx(1.3 / 3)
    # lmms-eval: exact "yes"/"no" only; yes_ratio of the ground truth
    lr = ds.score(preds, scorer="lmms")["splits"]
    assert lr["random"]["accuracy"] == 0.0 and lr["random"]["yes_ratio"] == 0.5
    assert lr["popular"]["accuracy"] == 0.75 and lr["popular"]["precision"] == 1.0


def test_textvqa_fixture():
    ds = D.load(FIX / "textvqa")
    assert ds.items[0].prompt.startswith("What brand is this?")   # capitalised as lmms-eval does
    # 301: 1.0; 302 "STOP" vs 2 stop / 7 stop sign / 1 halt: (2 * 1/3 + 7 * 2/3 + 2/3) / 10 = 0.6; 303: 1.0
    s = ds.score(["Coca-Cola", "STOP", "McDonald's."])
    assert s["overall"] == pytest.approx((1 + 0.6 + 1) / 3)


def test_mme_fixture_acc_plus_and_sums():
    ds = D.load(FIX / "mme")
    assert [it.meta["subtask"] for it in ds.items] == ["existence"] * 4 + ["artwork"] * 2 + ["code_reasoning"] * 2
    assert ds.items[0].prompt == "Is there a dog in this image?\nAnswer the question using a single word or phrase."
    preds = ["Yes", "No", "yes, there is", "Yes",   # existence: 3/4 right, image 1 both right -> acc+ 1/2: 125
             "Yes.", "no",                          # artwork: "yes." -> prefix rule -> yes; 2/2, acc+ 1: 200
             "Maybe", "No"]                         # code: "maybe" -> other; 1/2, acc+ 0: 50
    s = ds.score(preds)
    assert s["subtasks"]["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0, "n": 4}
    assert s["subtasks"]["artwork"]["score"] == 200.0 and s["subtasks"]["code_reasoning"]["score"] == 50.0
    assert s["perception"] == 325.0 and s["cognition"] == 50.0 and s["overall"] == 0.75


def test_scienceqa_fixture_image_questions_of_the_split():
    ds = D.load(FIX / "scienceqa")
    assert [it.id for it in ds.items] == ["11", "12", "14"]      # 13 has no image, 21 is train
    assert ds.items[0].prompt == ("Context: Look at the picture.\nWhich is a mammal?\nA. shark\nB. whale\nC. trout\n"
                                  "Answer with the option's letter from the given choices directly.")
    assert ds.score(["B", "A. red", "The answer is B."])["overall"] == pytest.approx(2 / 3)
    assert ds.score(["b", "D", "The answer is A."])["overall"] == pytest.approx(1 / 3)  # lower / out of range: wrong
    assert [it.id for it in D.load(FIX / "scienceqa", split="train").items] == ["21"]
    with pytest.raises(D.DatasetError, match="no split"):
        D.load(FIX / "scienceqa", split="dev")


def test_video_mc_fixtures_and_frame_loading():
    from vltok.eval import runner

    ds = D.load(FIX / "videomme")
    assert [it.target for it in ds.items] == ["D", "A", "C"] and ds.items[0].video.endswith("data/vidA.mp4")
    s = ds.score(["The best answer is D.", "(A) brightness",
                  "I think the answer is probably not clear at all here really"])   # > 10 words, no letter
    assert s["overall"] == pytest.approx(2 / 3) and s["by_duration"]["long"]["acc"] == 0.0
    mv = D.load(FIX / "mvbench")
    assert [it.target for it in mv.items] == ["B", "D", "B"]
    assert mv.items[2].video.endswith("nturgbd/pose01")
    assert mv.score(["(B) Sat down.", "A", "B"])["overall"] == pytest.approx(2 / 3)
    frames = runner.load_video(mv.items[0].video, 4, mv.items[0].meta["bound"])  # 6 frames at 2 fps, clip 0-2 s
    assert len(frames) == 4 and frames[0].size == (32, 32)
    import numpy as np

    means = [float(np.asarray(f.convert("L")).mean()) for f in frames]
    assert means == sorted(means) and means[-1] < 20 + 35 * 5 - 10   # the last frame (t=2.5 s) is outside
    assert len(runner.load_video(mv.items[2].video, 2)) == 2
    with pytest.raises(runner.ItemError, match="not found"):
        runner.load_video(str(FIX / "nope.mp4"))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "coco_pope_random.json"
    p.write_text('{"question_id": 1, "image": "a.jpg", "text": "Q?", "label": "yes"}\n\n{"question_id": 2,\n')
    with pytest.raises(D.DatasetError, match=r"coco_pope_random.json:3: not valid JSON"):
        D.load(tmp_path, "pope")


def test_shapes_video_folder_is_detected_and_load_names_the_scorer(tmp_path):
    """A shapes-video folder is detected (so `vltok eval DIR` routes it) but is not a generic Dataset: load() says
    which command scores it instead of failing on a missing reader."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "questions.jsonl").write_text("")
    assert D.detect(tmp_path) == "shapes-video"
    with pytest.raises(D.DatasetError, match=r"shapes-video folder.*vltok eval"):
        D.load(tmp_path)
    with pytest.raises(D.DatasetError, match=r"vltok eval"):
        D.load(tmp_path, "shapes-video")


def test_runner_video_items_reach_the_processor_as_frames():
    """A Video-MME item: frames sampled from the mp4, the chat template's "video" entry, videos= to the processor,
    the answer decoded after the prompt (a recording stand-in processor / model; no video checkpoint offline)."""
    import torch

    from vltok.eval import runner

    seen = {}

    class Tok:
        padding_side = "right"
        pad_token_id = 0

        def batch_decode(self, ids, skip_special_tokens=True):
            return [" The best answer is D. \n" if int(r[0]) == 7 else "A" for r in ids]

    class Proc:
        chat_template = "x"
        tokenizer = Tok()

        def apply_chat_template(self, msgs, add_generation_prompt=True):
            seen.setdefault("content", []).append(msgs[0]["content"])
            return "PROMPT:" + msgs[0]["content"][-1]["text"]

        def __call__(self, text, return_tensors, padding, **vis):
            seen["vis"] = vis
            seen["pad_side"] = self.tokenizer.padding_side
            return {"input_ids": torch.ones(len(text), 3, dtype=torch.long),
                    "pixel_values_videos": torch.zeros(len(text), 4, 3, 2, 2)}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, pixel_values_videos, max_new_tokens, do_sample, pad_token_id):
            seen["max_new_tokens"] = max_new_tokens
            return torch.cat([input_ids, torch.full((input_ids.shape[0], 2), 7)], 1)

    ds = D.load(FIX / "videomme")
    res = runner.evaluate(Model(), Proc(), ds, progress=False, frames=4, batch_size=2)
    assert [p["pred"] for p in res["predictions"]] == ["The best answer is D."] * 3
    assert seen["content"][0][0] == {"type": "video"} and seen["content"][0][1]["text"] == ds.items[0].prompt
    frames = seen["vis"]["videos"]
    assert list(seen["vis"]) == ["videos"] and len(frames) == 1 and len(frames[0]) == 4   # last batch: 1 video
    assert seen["pad_side"] == "left" and seen["max_new_tokens"] == 16
    assert res["score"]["overall"] == pytest.approx(1 / 3)   # "D" is right for the first item only
