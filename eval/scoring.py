"""Official scoring rules of the standard VQA / video benchmarks, as pure functions over strings.

* VQAv2: :func:`vqa_accuracy` is the official ``vqaEval.py`` (GT-Vision-Lab/VQA, master): the prediction gets
  :func:`process_punctuation` then :func:`process_digit_article`; the ten human answers get only
  :func:`process_punctuation`, and only when they are not all identical; accuracy = mean over the 10 leave-one-out
  subsets of min(#matching / 3, 1). :func:`vqa_accuracy_lmms` is lmms-eval 0.7.3's ``vqav2_process_results`` (both
  sides always get punctuation + digit/article processing; its comma rule is ``(?<=\\d)(,)+(?=\\d)``).
* TextVQA: :func:`textvqa_accuracy`, the M4C / LLaVA evaluator (``TextVQAAccuracyEvaluator``): the EvalAI answer
  processor (:func:`evalai_process`) on the prediction AND every human answer, then the same leave-one-out rule
  (lmms-eval's ``textvqa_process_results`` computes the same).
* POPE: :func:`pope_label` is the rule of POPE's / LLaVA's ``eval_pope.py`` (first sentence, "no"/"not"/"No" as a word
  -> no, anything else -> yes); :func:`pope_metrics` gives accuracy / precision / recall / F1 / yes-ratio (of the
  predictions) with "yes" as the positive class. :func:`pope_metrics_lmms` is lmms-eval's (exact "yes"/"no" after
  lower/strip, anything else counts for neither side; its "yes_ratio" is the share of yes in the ground truth).
* MME: :func:`mme_label` (official ``calculation.py``: lower-cased, exact yes/no, else "yes"/"no" in the first 4
  characters, else "other"); :func:`mme_scores`: per subtask acc and acc+ (both answers of an image right), score =
  100 * (acc + acc+), perception (10 subtasks, max 2000) and cognition (4, max 800) sums.
* GQA: :func:`gqa_correct`, exact match after LLaVA's ``convert_gqa_for_eval.py`` clean-up (strip, trailing "."
  removed, lower-case) against the official answer (GQA's ``eval.py`` compares strings exactly).
* ScienceQA: :func:`scienceqa_choice`, LLaVA's ``eval_science_qa.py`` parsing ("A", "A. ...", "The answer is A.";
  anything else is wrong).
* Video MC (Video-MME, MVBench, shapes-video): :func:`video_mc_choice`, the Video-MME ``eval_your_results.py``
  letter extraction (answer prefixes removed, first capital option letter).
"""
from __future__ import annotations

import re
from collections import defaultdict

# ---------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (official vqaEval.py)

# contraction -> canonical form; written as "canonical: spelling spelling ..." (the official table, keys with
# capitals included although lower-casing happens first, and its one reversed entry somebody'd -> somebodyd)
_CONTRACTION_TABLE = """
ain't: aint | aren't: arent | can't: cant | could've: couldve | couldn't: couldnt
couldn't've: couldn'tve couldnt've | didn't: didnt | doesn't: doesnt | don't: dont | hadn't: hadnt
hadn't've: hadnt've hadn'tve | hasn't: hasnt | haven't: havent | he'd: hed | he'd've: hed've he'dve | he's: hes
how'd: howd | how'll: howll | how's: hows | I'd've: Id've I'dve | I'm: Im | I've: Ive | isn't: isnt | it'd: itd
it'd've: itd've it'dve | it'll: itll | let's: let's | ma'am: maam | mightn't: mightnt
mightn't've: mightnt've mightn'tve | might've: mightve | mustn't: mustnt | must've: mustve | needn't: neednt
not've: notve | o'clock: oclock | oughtn't: oughtnt | 'ow's'at: ow's'at 'ows'at 'ow'sat | shan't: shant
she'd've: shed've she'dve | she's: she's | should've: shouldve | shouldn't: shouldnt
shouldn't've: shouldnt've shouldn'tve | somebodyd: somebody'd | somebody'd've: somebodyd've somebody'dve
somebody'll: somebodyll | somebody's: somebodys | someone'd: someoned | someone'd've: someoned've someone'dve
someone'll: someonell | someone's: someones | something'd: somethingd
something'd've: somethingd've something'dve | something'll: somethingll | that's: thats | there'd: thered
there'd've: thered've there'dve | there're: therere | there's: theres | they'd: theyd
they'd've: theyd've they'dve | they'll: theyll | they're: theyre | they've: theyve | 'twas: twas | wasn't: wasnt
we'd've: wed've we'dve | we've: weve | weren't: werent | what'll: whatll | what're: whatre | what's: whats
what've: whatve | when's: whens | where'd: whered | where's: wheres | where've: whereve | who'd: whod
who'd've: whod've who'dve | who'll: wholl | who's: whos | who've: whove | why'll: whyll | why're: whyre
why's: whys | won't: wont | would've: wouldve | wouldn't: wouldnt | wouldn't've: wouldnt've wouldn'tve
y'all: yall | y'all'll: yall'll y'allll | y'all'd've: yall'd've y'alld've y'all'dve | you'd: youd
you'd've: youd've you'dve | you'll: youll | you're: youre | you've: youve
"""
CONTRACTIONS: dict[str, str] = {}
for _entry in _CONTRACTION_TABLE.replace("\n", " | ").split("|"):
    if _entry.strip():
        _canon, _spellings = _entry.split(": ", 1)
        for _s in _spellings.split():
            CONTRACTIONS[_s] = _canon.strip()

NUMBER_MAP = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_MAP["none"] = "0"
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# the official pattern: "(?!<=" is a look-AHEAD for the text "<=" followed by a digit (a typo for a look-behind),
# so in effect any "." not followed by a digit goes
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_COMMA_STRIP_LMMS = re.compile(r"(?<=\d)(,)+(?=\d)")
# the official code passes re.UNICODE (32) as sub()'s *count* argument: at most 32 periods go
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str, comma_strip: re.Pattern = _COMMA_STRIP) -> str:
    """Each punctuation mark is deleted when it touches a space somewhere in ``text`` (or the text holds a
    digit,digit comma), otherwise replaced by a space; then periods not followed by a digit go."""
    out = text
    digit_comma = comma_strip.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-case, number words zero..ten (and "none") to digits, articles dropped, contractions restored."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return str(text).replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out(pred: str, gts: list[str]) -> float:
    """Mean over the len(gts) subsets that leave one human answer out of min(#matches in the subset / 3, 1)."""
    if not gts:
        raise ValueError("no ground-truth answers")
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def vqa_accuracy(pred: str, answers: list[str]) -> float:
    """Official VQAv2 accuracy of one prediction against the (10) human answers."""
    res = process_digit_article(process_punctuation(_clean(pred)))
    gts = [str(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(g) for g in gts]
    return _leave_one_out(res, gts)


def vqa_accuracy_lmms(pred: str, answers: list[str]) -> float:
    """lmms-eval 0.7.3's VQAv2 accuracy (``vqav2_process_results``): both sides always normalised."""

    def norm(t):
        return process_digit_article(process_punctuation(_clean(t), _COMMA_STRIP_LMMS))

    return _leave_one_out(norm(pred), [norm(a) for a in answers])


def evalai_process(text: str) -> str:
    """The EvalAI / M4C answer processor (TextVQA): lower, drop "," and "?", split "'s", then as above."""
    t = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = _clean(t)
    return process_digit_article(process_punctuation(t, _COMMA_STRIP_LMMS))


def textvqa_accuracy(pred: str, answers: list[str]) -> float:
    """TextVQA accuracy (M4C / LLaVA ``m4c_evaluator``): EvalAI processing on both sides, leave-one-out."""
    return _leave_one_out(evalai_process(pred), [evalai_process(a) for a in answers])


# ---------------------------------------------------------------------------------------------------------------
# yes / no benchmarks


def pope_label(pred: str) -> str:
    """POPE's / LLaVA's rule: keep the first sentence, drop commas; "No", "not" or "no" as a word -> "no", else
    "yes"."""
    text = str(pred)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _binary_metrics(labels: list[str], preds: list[str]) -> dict:
    tp = sum(1 for g, p in zip(labels, preds) if g == "yes" and p == "yes")
    fp = sum(1 for g, p in zip(labels, preds) if g == "no" and p == "yes")
    tn = sum(1 for g, p in zip(labels, preds) if g == "no" and p == "no")
    fn = sum(1 for g, p in zip(labels, preds) if g == "yes" and p == "no")
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def pope_metrics(labels: list[str], preds: list[str]) -> dict:
    """Official POPE metrics of raw predictions against "yes"/"no" labels (one split)."""
    p = [pope_label(x) for x in preds]
    m = _binary_metrics([g.strip().lower() for g in labels], p)
    m["accuracy"] = (m["tp"] + m["tn"]) / m["n"] if m["n"] else 0.0
    m["yes_ratio"] = sum(x == "yes" for x in p) / m["n"] if m["n"] else 0.0
    return m


def pope_metrics_lmms(labels: list[str], preds: list[str]) -> dict:
    """lmms-eval 0.7.3's POPE metrics (``pope_process_results`` + its aggregations)."""
    p = [str(x).lower().strip() for x in preds]
    g = [x.lower().strip() for x in labels]
    m = _binary_metrics(g, p)
    m["accuracy"] = sum(a == b for a, b in zip(g, p)) / m["n"] if m["n"] else 0.0
    m["yes_ratio"] = sum(x == "yes" for x in g) / m["n"] if m["n"] else 0.0
    return m


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_label(pred: str) -> str:
    p = str(pred).strip().lower()
    if p in ("yes", "no"):
        return p
    head = p[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(rows: list[dict]) -> dict:
    """``rows``: {"subtask", "image", "answer" ("Yes"/"No"), "pred"}. Per subtask acc, acc+ (share of images with
    every question right), score = 100 * (acc + acc+); perception / cognition sums over the subtasks present."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["subtask"]].append(r)
    out: dict = {"subtasks": {}}
    for task in sorted(by_task, key=lambda t: (MME_PERCEPTION + MME_COGNITION + (t,)).index(t)):
        rs = by_task[task]
        ok = [mme_label(r["pred"]) == r["answer"].strip().lower() for r in rs]
        per_image: dict[str, list[bool]] = defaultdict(list)
        for r, o in zip(rs, ok):
            per_image[r["image"]].append(o)
        acc = sum(ok) / len(ok)
        acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
        out["subtasks"][task] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus), "n": len(rs)}
    out["perception"] = sum(v["score"] for k, v in out["subtasks"].items() if k in MME_PERCEPTION)
    out["cognition"] = sum(v["score"] for k, v in out["subtasks"].items() if k in MME_COGNITION)
    return out


# ---------------------------------------------------------------------------------------------------------------
# exact match and multiple choice


def gqa_clean(pred: str) -> str:
    return str(pred).strip().rstrip(".").lower()


def gqa_correct(pred: str, answer: str) -> bool:
    return gqa_clean(pred) == answer


def scienceqa_choice(pred: str, n_choices: int) -> int:
    """LLaVA's ScienceQA parsing: the option index, or -1 (wrong) when no option letter is recognised."""
    options = "ABCDE"[:n_choices]
    text = str(pred).strip()
    letter = None
    if text in options:
        letter = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        if len(found) == 1:
            letter = found[0]
    return options.index(letter) if letter and letter in options else -1


_VIDEO_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
                   "The correct option is", "Best answer:", "Best option:", "Answer:", "Option:",
                   "The correct answer", "The correct option")


def video_mc_choice(pred: str, letters: str = "ABCD") -> str:
    """Video-MME's letter extraction: answer prefixes removed; long answers without a letter give ""; else the
    first option letter."""
    s = str(pred).strip()
    for prefix in _VIDEO_PREFIXES:
        s = s.replace(prefix, "")
    pattern = f"[{letters}]"
    if len(s.split()) > 10 and not re.search(pattern, s):
        return ""
    m = re.search(pattern, s)
    return m[0] if m else ""
