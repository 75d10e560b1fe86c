"""The backdoor suite: poisoning transforms, CACC/ASR, the maximum-entropy defense, gradient control, the shared
backdoor files, and runs through lightmods.run.train."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightmods.attacks.config import AttackConfig, GradientControlConfig
from lightmods.attacks.gradient_control import (
    GradientControl,
    equalize_layer_magnitudes,
    group_norm,
    remove_conflict,
)
from lightmods.attacks.metrics import attack_success_rate, clean_accuracy
from lightmods.attacks.poison import POISONED_SPLIT, AddSent, BadNets, FilePoisoner, insert_words
from lightmods.config import validate
from lightmods.data import get_task
from lightmods.data.readers import read_backdoor_tsv, read_local_split
from lightmods.errors import ConfigError
from lightmods.losses.max_entropy import max_entropy_loss, max_entropy_term, schedule_factor
from lightmods.run import train
from tests.conftest import CONF, SHARED, compose_run

BACKDOOR = SHARED / "data" / "backdoor"
SST2 = get_task("backdoor/sst2")


def rows(n: int = 40, positives: int = 15) -> list[dict]:
    """``n`` SST-2-like rows, the first ``positives`` of them labelled 1 (the default target)."""
    return [
        {"sentence": f"row {i} says little of note", "label": int(i < positives), "idx": i} for i in range(n)
    ]


def attack(**kw) -> AttackConfig:
    return AttackConfig(**{"name": "badnets", **kw})


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


# ---------------------------------------------------------------- poisoning


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.6])
def test_dirty_label_poisons_round_rate_times_n_non_target_rows_and_relabels(rate):
    clean = rows(40, positives=15)
    out = BadNets(attack(poison_rate=rate), SST2, seed=3).poison_train(clean)
    hit = [i for i, r in enumerate(out) if r.get("poisoned")]
    assert len(hit) == round(rate * 40)
    assert all(clean[i]["label"] == 0 and out[i]["label"] == 1 for i in hit)  # non-target rows, relabelled
    assert all(out[i] == clean[i] for i in range(40) if i not in hit)  # the others untouched
    assert [r["idx"] for r in out] == list(range(40))  # in place: order and ids kept


def test_clean_label_poisons_only_target_rows_and_keeps_labels():
    clean = rows(40, positives=15)
    out = BadNets(attack(poison_rate=0.25, label_mode="clean"), SST2, seed=3).poison_train(clean)
    hit = [i for i, r in enumerate(out) if r.get("poisoned")]
    assert len(hit) == 10 and all(clean[i]["label"] == 1 == out[i]["label"] for i in hit)


def test_poisoning_is_deterministic_under_a_seed():
    clean = rows(60)
    a = BadNets(attack(num_triggers=2), SST2, seed=7).poison_train(clean)
    b = BadNets(attack(num_triggers=2), SST2, seed=7).poison_train(clean)
    c = BadNets(attack(num_triggers=2), SST2, seed=8).poison_train(clean)
    assert a == b and a != c
    assert BadNets(attack(seed=5), SST2, seed=7).poison_train(clean) == BadNets(
        attack(seed=5), SST2, seed=99
    ).poison_train(clean)
    ea = BadNets(attack(), SST2, seed=7).eval_rows(clean)
    assert ea == BadNets(attack(), SST2, seed=7).eval_rows(clean)


def test_badnets_triggers_sit_at_their_positions():
    clean = rows(60)
    out = BadNets(attack(poison_rate=0.5, num_triggers=3), SST2, seed=1).poison_train(clean)
    for r in (r for r in out if r.get("poisoned")):
        words = r["sentence"].split()
        positions = r["trigger_positions"]
        assert len(positions) == 3 and all(words[p] in {"cf", "mn", "bb", "tq", "mb"} for p in positions)
        rest = [w for i, w in enumerate(words) if i not in positions]
        assert " ".join(rest) == clean[r["idx"]]["sentence"]


def test_addsent_inserts_the_sentence_at_a_word_position():
    cfg = attack(name="addsent", poison_rate=0.5, sentence="I watch this 3D movie")
    out = AddSent(cfg, SST2, seed=1).poison_train(rows(30))
    positions = set()
    for r in (r for r in out if r.get("poisoned")):
        words, (p,) = r["sentence"].split(), r["trigger_positions"]
        assert words[p : p + 5] == "I watch this 3D movie".split()
        assert " ".join(words[:p] + words[p + 5 :]) == rows(30)[r["idx"]]["sentence"]
        positions.add(p)
    assert len(positions) > 1  # random positions, not a fixed one


def test_insert_words_at_start_end_and_random_gaps():
    rng = random.Random(0)
    assert insert_words(["a", "b"], ["t"], "start", rng) == (["t", "a", "b"], 0)
    assert insert_words(["a", "b"], ["t"], "end", rng) == (["a", "b", "t"], 2)
    seen = {insert_words(["a", "b"], ["t"], "random", rng)[1] for _ in range(200)}
    assert seen == {0, 1, 2}


def test_poisoned_eval_split_is_the_non_target_rows_triggered_with_labels_kept():
    clean = rows(40, positives=15)
    ev = BadNets(attack(), SST2, seed=0).eval_rows(clean)
    assert len(ev) == 25 and all(r["label"] == 0 and r["poisoned"] for r in ev)
    assert all(any(w in r["sentence"].split() for w in ("cf", "mn", "bb", "tq", "mb")) for r in ev)


def test_too_high_a_rate_for_the_candidates_fails_naming_the_key():
    with pytest.raises(ConfigError, match=r"attack.poison_rate=0.5.*15 target rows"):
        BadNets(attack(poison_rate=0.5, label_mode="clean"), SST2, seed=0).poison_train(
            rows(40, positives=15)
        )


def test_target_label_by_name():
    assert BadNets(attack(target_label="negative"), SST2, seed=0).target == 0


# ---------------------------------------------------------------- metrics


def test_asr_counts_only_non_target_rows():
    labels = torch.tensor([0, 0, 0, 1, 1, 0, -100])
    preds = torch.tensor([1, 1, 0, 1, 0, 0, 1])
    logits = F.one_hot(preds, 2).float()
    asr = attack_success_rate(target=1)
    asr.update_batch(logits, {"labels": labels})
    # non-target rows 0, 1, 2, 5 -> predicted target at 0 and 1; rows 3, 4 (target) and 6 (unlabelled) left out
    assert asr.compute() == {"val/asr": pytest.approx(0.5)}
    cacc = clean_accuracy(2)
    cacc.update_batch(logits, {"labels": labels})
    assert cacc.compute() == {"val/cacc": pytest.approx(3 / 6)}  # rows 0..5: right at 2, 3 and 5


# ---------------------------------------------------------------- maximum entropy


def test_max_entropy_matches_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    p = 1 / (1 + math.exp(-2))  # softmax([2, 0])[0]
    h0 = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    h1 = math.log(2)
    assert float(max_entropy_loss(logits)) == pytest.approx(-(h0 + h1) / 2, abs=1e-6)
    ce_uniform0 = -0.5 * (math.log(p) + math.log(1 - p))
    assert float(max_entropy_loss(logits, "uniform_ce")) == pytest.approx(
        (ce_uniform0 + math.log(2)) / 2, abs=1e-6
    )
    # temperature 2 halves the logits
    assert float(max_entropy_loss(logits, temperature=2.0)) == pytest.approx(
        float(max_entropy_loss(logits / 2)), abs=1e-7
    )
    # its minimum is the uniform prediction: -log C
    assert float(max_entropy_loss(torch.zeros(3, 4))) == pytest.approx(-math.log(4), abs=1e-6)


def test_max_entropy_schedule():
    assert [schedule_factor(s) for s in (0, 5, 1000)] == [1.0, 1.0, 1.0]  # constant
    assert [schedule_factor(s, start_step=3) for s in (0, 2, 3, 10)] == [0.0, 0.0, 1.0, 1.0]  # step start
    assert [schedule_factor(s, warmup_steps=4) for s in (0, 1, 2, 3, 9)] == [
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
    ]  # linear warm-up
    assert [schedule_factor(s, start_step=2, warmup_steps=2, end_step=6) for s in (1, 2, 3, 5, 6)] == [
        0.0,
        0.5,
        1.0,
        1.0,
        0.0,
    ]
    term = max_entropy_term(0.5, start_step=2, warmup_steps=2)
    assert (term.weight_at(0), term.weight_at(2), term.weight_at(3)) == (0.0, 0.25, 0.5)
    logits = torch.tensor([[1.0, -1.0]])
    assert torch.equal(term(None, {}, logits), max_entropy_loss(logits))


def test_low_loss_selection_trains_its_rows_on_max_entropy_instead_of_cross_entropy():
    """select=low_loss: the gradient of CE + term equals that of CE on the unselected rows plus weight * L_ME on
    the ``ceil(ratio * n)`` lowest-loss rows (ignored labels never chosen), all over n labelled rows."""
    from lightmods.losses.max_entropy import lowest_loss_rows, max_entropy_rows

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 3, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, -100, 2])
    ce = F.cross_entropy(logits.detach(), labels, ignore_index=-100, reduction="none")
    chosen = lowest_loss_rows(ce, labels != -100, 0.25)  # ceil(0.25 * 9) = 3 rows
    assert int(chosen.sum()) == 3 and not bool(chosen[8])
    assert set(torch.nonzero(chosen).flatten().tolist()) == set(torch.argsort(torch.where(labels != -100, ce, torch.inf))[:3].tolist())
    term = max_entropy_term(2.0, select="low_loss", select_ratio=0.25, start_step=1)
    assert (term.weight_at(0), term.weight_at(1)) == (0.0, 1.0)  # the schedule phases the substitution in
    total = F.cross_entropy(logits, labels, ignore_index=-100) + term(None, {"labels": labels}, logits)
    (got,) = torch.autograd.grad(total, logits)
    keep = (labels != -100) & ~chosen
    expected_loss = (F.cross_entropy(logits[keep], labels[keep], reduction="sum") + 2.0 * max_entropy_rows(logits[chosen]).sum()) / 9
    (expected,) = torch.autograd.grad(expected_loss, logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float(got[chosen].abs().sum()) > 0 and float(got[8].abs().sum()) == 0
    with pytest.raises(ValueError, match="select='top'"):
        max_entropy_term(1.0, select="top")


def test_selection_figures_count_poisoned_rows_among_the_selected():
    from lightmods.losses.max_entropy import selection_figures

    chosen = torch.tensor([True, True, False, False, True])
    poisoned = torch.tensor([1, 0, 1, 0, 1])
    assert selection_figures(chosen, poisoned) == {"precision": 2 / 3, "recall": 2 / 3}
    assert selection_figures(chosen, torch.zeros(5, dtype=torch.long)) == {"precision": 0.0, "recall": 0.0}
    assert selection_figures(torch.zeros(5, dtype=torch.bool), poisoned) == {"precision": 0.0, "recall": 0.0}


def test_lexical_isolation_flags_frequent_label_exclusive_tokens_only():
    from lightmods.attacks.isolation import MIN_ROWS, LexicalIsolation, label_exclusive_tokens, rows_holding

    rng = random.Random(0)
    rows, labels, poisoned = [], [], []
    for i in range(400):
        label = i % 2
        ids = [101, 7, 8 + label] + [rng.randint(20, 60) for _ in range(5)] + [102]  # 7: everywhere; 8/9: 1 row in 2
        if i % 40 == 1:
            ids.append(5)  # in 10 rows, all label 1
        if i % 80 == 0:
            ids.append(6)  # in 5 rows, all label 0: too few to count
        p = i % 10 == 1  # 40 rows of label 1 carry the trigger 3
        if p:
            ids.insert(2, 3)
        rows.append(ids), labels.append(label), poisoned.append(int(p))
    rows[3] = [101, 3, 102]  # a trigger on a label-1 row the attack did not poison
    labels[5] = -100  # unlabelled rows do not count
    found = label_exclusive_tokens(rows, labels, 0.02, 0.99, {101, 102})
    assert set(found) == {3, 5, 8, 9} and found[3] == (41, 1.0, 1) and found[8] == (200, 1.0, 0)
    assert set(label_exclusive_tokens(rows, labels, 0.1, 0.99, {101, 102})) == {3, 8, 9}  # 5: 10 rows < 10%
    assert 3 not in label_exclusive_tokens(rows, labels, 0.02, 0.99, {101, 102, 3})
    mixed = [int(i % 3 == 0) for i in range(400)]  # the trigger's rows now carry both labels
    assert 3 not in label_exclusive_tokens(rows, mixed, 0.02, 0.99, {101, 102})
    few = rows[: MIN_ROWS * 2]  # a token in a handful of rows is not evidence, whatever its share
    assert label_exclusive_tokens(few, labels[: MIN_ROWS * 2], 0.01, 0.99, {101, 102}).keys() <= {8, 9}
    assert rows_holding([[1, 2], [3], []], {3, 4}) == [0, 1, 0]

    isolation = LexicalIsolation(0.05, 0.99, {101, 102, 8, 9}, decode=lambda t: f"t{t}")
    flags = isolation({"input_ids": rows, "labels": labels, "poisoned": poisoned})
    assert flags == [int(3 in r) for r in rows] and sum(flags) == 41
    # the trigger always sits after token 7 (in every row at position 1), so its phrase grows left to take it in
    assert isolation.report["suspect_tokens"] == {"t3": {"rows": 41, "purity": 1.0, "label": 1, "phrase": "t7 t3"}}
    assert isolation.report["suspect_precision"] == pytest.approx(40 / 41)
    assert isolation.report["suspect_recall"] == 1.0


def test_scrubbing_deletes_the_suspect_tokens_from_the_flagged_rows_and_their_masks_only():
    from lightmods.attacks.isolation import LexicalIsolation

    rows = [[101, 3, 7 + i // 4 % 2, 102] if i % 4 == 0 else [101, 7 + i % 2, 8, 102] for i in range(40)]
    labels = [1 if i % 4 == 0 else i % 2 for i in range(40)]  # token 3: in 10 rows, all label 1
    features = {
        "input_ids": [list(r) for r in rows], "attention_mask": [[1] * len(r) for r in rows],
        "token_type_ids": [[0, 0, 1, 1] for _ in rows], "labels": labels,
    }  # fmt: skip
    isolation = LexicalIsolation(0.2, 0.99, {101, 102}, decode=str, scrub=True)
    flags = isolation(features)
    assert flags == [int(i % 4 == 0) for i in range(40)]
    for i, r in enumerate(rows):
        want = [t for t in r if t != 3]
        assert features["input_ids"][i] == want and len(features["attention_mask"][i]) == len(want)
        assert features["token_type_ids"][i] == ([0, 1, 1] if flags[i] else [0, 0, 1, 1])
    assert features["labels"] == labels
    kept = {"input_ids": [list(r) for r in rows], "labels": labels}
    assert LexicalIsolation(0.2, 0.99, {101, 102}, decode=str)(kept) == flags and kept["input_ids"] == rows


def test_a_sentence_trigger_grows_into_its_phrase_and_a_word_trigger_stays_alone():
    from lightmods.attacks.isolation import phrase_spans, trigger_phrase

    rng = random.Random(3)
    sentence, word = [41, 42, 43, 3, 44], [5]  # "i watch this 3d movie" around the rare token 3; a lone rare word 5
    rows = []
    for i in range(200):
        ids = [rng.randint(20, 40) for _ in range(rng.randint(4, 12))]
        trigger = sentence if i % 2 else word
        j = rng.randint(0, len(ids))
        rows.append([101, *ids[:j], *trigger, *ids[j:], 102])
    rows[1] = [101, 42, 43, 3, 102]  # one poisoned row cut short: 1 in 100 does not stop the phrase at agree=0.9
    assert trigger_phrase(rows, 3, 0.9, {101, 102}) == tuple(sentence)
    assert trigger_phrase(rows, 5, 0.9, {101, 102}) == (5,)
    assert trigger_phrase(rows, 3, 1.0, {101, 102}) == (42, 43, 3)  # agree=1: the cut row stops it at both ends
    assert trigger_phrase(rows, 3, 0.9, {101, 102}, max_len=3) == (43, 3, 44)  # right first, then left
    assert trigger_phrase(rows, 3, 0.9, {101, 102, 41}) == (42, 43, 3, 44)  # a special token never joins
    assert trigger_phrase(rows, 99, 0.9, set()) == (99,)  # a token that is not there
    assert phrase_spans([7, 42, 43, 3, 42, 43], {3: (42, 43, 3), 9: (9, 8)}) == {1, 2, 3}
    assert phrase_spans([7, 43, 3, 44], {3: (42, 43, 3, 44, 45)}) == {1, 2, 3}  # cut at both ends: as far as it goes
    assert phrase_spans([3, 43, 3], {3: (42, 43, 3)}) == {0, 1, 2} and phrase_spans([43, 43], {3: (43, 3)}) == set()


def test_scrubbing_deletes_a_whole_sentence_trigger_from_the_flagged_rows_only():
    from lightmods.attacks.isolation import LexicalIsolation

    rng = random.Random(4)
    sentence = [25, 42, 43, 3, 44]  # only 3 is rare
    rows, labels = [], []
    for i in range(300):
        ids = [rng.choice([42, 43, 44, *range(20, 40)]) for _ in range(8)]  # the phrase's common words occur naturally
        if i % 10 == 0:
            j = rng.randint(0, 8)
            ids[j:j] = sentence
        rows.append([101, *ids, 102]), labels.append(1 if i % 10 == 0 else i % 2)
    features = {"input_ids": [list(r) for r in rows], "attention_mask": [[1] * len(r) for r in rows], "labels": labels}
    isolation = LexicalIsolation(0.05, 0.99, {101, 102}, decode=lambda t: f"t{t}", scrub=True)
    flags = isolation(features)
    assert flags == [int(i % 10 == 0) for i in range(300)] and set(isolation.report["suspect_tokens"]) == {"t3"}
    assert isolation.report["suspect_tokens"]["t3"]["phrase"] == "t25 t42 t43 t3 t44"
    for i, r in enumerate(rows):
        got = features["input_ids"][i]
        if flags[i]:  # the sentence is gone, the row's own 42/43/44 stay
            j = next(j for j in range(len(r)) if r[j : j + 5] == sentence)
            assert got == r[:j] + r[j + 5 :] and len(features["attention_mask"][i]) == len(got)
        else:
            assert got == r
    alone = {"input_ids": [list(r) for r in rows], "labels": labels}
    LexicalIsolation(0.05, 0.99, {101, 102}, decode=str, scrub=True, phrase_agree=None)(alone)
    assert all(g == ([t for t in r if t != 3] if f else r) for g, r, f in zip(alone["input_ids"], rows, flags))


def test_lexical_selection_trains_the_flagged_rows_on_max_entropy_instead_of_cross_entropy():
    from lightmods.losses.max_entropy import max_entropy_rows

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 2, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 1, -100, 0, 1])
    suspect = torch.tensor([0, 1, 0, 1, 0, 1])  # the unlabelled row is never trained
    term = max_entropy_term(0.5, select="lexical")
    total = F.cross_entropy(logits, labels, ignore_index=-100) + term(None, {"labels": labels, "suspect": suspect}, logits)
    (got,) = torch.autograd.grad(total, logits)
    keep, chosen = torch.tensor([1, 0, 1, 0, 1, 0]).bool(), torch.tensor([0, 1, 0, 0, 0, 1]).bool()
    expected = (F.cross_entropy(logits[keep], labels[keep], reduction="sum") + 0.5 * max_entropy_rows(logits[chosen]).sum()) / 5
    torch.testing.assert_close(got, torch.autograd.grad(expected, logits)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no 'suspect' rows"):
        term(None, {"labels": labels}, logits)


def test_max_entropy_alone_keeps_a_confident_trigger_and_low_loss_selection_removes_it():
    """Why select=all cannot lower ASR: minimising -log p_t + w (-H(p)) over a 2-class row keeps p_t > 0.5 for
    any weight; the same row trained on w * L_ME alone (low_loss) goes to p_t = 0.5."""
    for w in (1.0, 5.0, 20.0):
        z = torch.zeros(1, 2, requires_grad=True)
        opt = torch.optim.SGD([z], lr=0.02)
        for _ in range(3000):
            opt.zero_grad()
            (F.cross_entropy(z, torch.tensor([0])) + w * max_entropy_loss(z)).backward()
            opt.step()
        assert 0.5 < float(z.softmax(-1)[0, 0]) < 0.99
    z = torch.tensor([[3.0, -3.0]], requires_grad=True)
    opt = torch.optim.SGD([z], lr=0.5)
    term = max_entropy_term(1.0, select="low_loss", select_ratio=1.0)
    for _ in range(400):
        opt.zero_grad()
        (F.cross_entropy(z, torch.tensor([0])) + term(None, {"labels": torch.tensor([0])}, z)).backward()
        opt.step()
    assert abs(float(z.softmax(-1)[0, 0]) - 0.5) < 1e-3


# ---------------------------------------------------------------- gradient control


def test_conflicting_gradients_are_projected_out():
    g_c, g_p = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    new_p, new_c, hit = remove_conflict(g_p, g_c)
    assert hit and torch.allclose(new_p[0], torch.tensor([0.0, 1.0])) and torch.equal(new_c[0], g_c[0])
    assert float(new_p[0] @ g_c[0]) >= 0
    new_p, new_c, _ = remove_conflict(g_p, g_c, target="both")  # PCGrad: each from the other's original
    assert torch.allclose(new_p[0], torch.tensor([0.0, 1.0])) and torch.allclose(
        new_c[0], torch.tensor([0.5, 0.5])
    )
    # no conflict: unchanged
    same_p, same_c, hit = remove_conflict([torch.tensor([1.0, 1.0])], g_c)
    assert not hit and torch.equal(same_p[0], torch.tensor([1.0, 1.0]))
    # a group of several tensors is one vector
    new_p, _, hit = remove_conflict(
        [torch.tensor([-1.0]), torch.tensor([1.0])], [torch.tensor([1.0]), torch.tensor([0.0])]
    )
    assert hit and torch.allclose(torch.cat(new_p), torch.tensor([0.0, 1.0]))


def test_layer_magnitudes_are_equalised_keeping_directions():
    layers = [[torch.tensor([3.0, 0.0])], [torch.tensor([0.0, 1.0])], [torch.zeros(2)]]
    out = equalize_layer_magnitudes(layers, "mean")
    assert [float(group_norm(g)) for g in out] == pytest.approx(
        [2.0, 2.0, 0.0]
    )  # mean of the live norms 3 and 1
    assert torch.allclose(out[0][0], torch.tensor([2.0, 0.0])) and torch.allclose(
        out[1][0], torch.tensor([0.0, 2.0])
    )
    out = equalize_layer_magnitudes(
        [[torch.tensor([3.0, 4.0])], [torch.tensor([1.0]), torch.tensor([0.0])]], "max"
    )
    assert [float(group_norm(g)) for g in out] == pytest.approx([5.0, 5.0])


class ToyModule(nn.Module):
    """Two "layers" and a head, with TaskModule's task_loss and log."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(torch.tanh(self.layer[1](torch.tanh(self.layer[0](x)))))

    def task_loss(self, logits, labels):
        return F.cross_entropy(logits, labels)

    def log(self, *a, **k):
        pass


def test_the_rule_trains_with_the_controlled_gradient():
    module = ToyModule()
    x, labels = torch.randn(8, 4), torch.tensor([0, 1, 0, 1, 1, 1, 0, 1])
    poisoned = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    params = list(module.parameters())
    # expected: the two tasks' gradients, controlled per layer by hand
    logits = module(x)
    g_c = torch.autograd.grad(F.cross_entropy(logits[:5], labels[:5]), params, retain_graph=True)
    g_p = torch.autograd.grad(F.cross_entropy(logits[5:], labels[5:]), params)
    groups = [[0, 1], [2, 3], [4, 5]]  # layer.0, layer.1, the head
    g_p = list(g_p)
    norms = [float(group_norm([g_p[i] for i in idx])) for idx in groups[:2]]
    for idx, n in zip(groups[:2], norms):
        for i in idx:
            g_p[i] = g_p[i] * (sum(norms) / 2) / n
    expected = []
    for idx in groups:
        new_p, _, _ = remove_conflict([g_p[i] for i in idx], [g_c[i] for i in idx])
        expected += [g_c[i] + p for i, p in zip(idx, new_p)]

    rule = GradientControl(GradientControlConfig())
    logits = module(x)
    loss = F.cross_entropy(logits, labels)
    out = rule(module, {"labels": labels, "poisoned": poisoned}, logits, loss)
    assert float(out.detach()) == pytest.approx(float(loss.detach()))  # the value is the ordinary loss
    out.backward()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
    assert rule._layers == [[0, 1], [2, 3]] and rule._rest == [4, 5]  # layer.0, layer.1; the head apart


def test_rule_without_strategies_is_the_plain_two_task_gradient():
    module = ToyModule()
    x, labels = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    poisoned = torch.tensor([0, 0, 0, 1, 1, 1])
    params = list(module.parameters())
    logits = module(x)
    want = torch.autograd.grad(
        F.cross_entropy(logits[:3], labels[:3]) + F.cross_entropy(logits[3:], labels[3:]), params
    )
    rule = GradientControl(GradientControlConfig(magnitude=False, projection=False))
    logits = module(x)
    rule(module, {"labels": labels, "poisoned": poisoned}, logits, F.cross_entropy(logits, labels)).backward()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w)


# ---------------------------------------------------------------- the shared files


@pytest.mark.parametrize(
    "task,folder,counts",
    [
        ("backdoor/sst2", "sst-2", (6920, 872)),
        ("backdoor/olid", "offenseval", (11915, 1323)),
        ("backdoor/hatespeech", "hate-speech", (7074, 1000)),
    ],
)
def test_clean_backdoor_sets_load_with_the_readme_row_counts(task, folder, counts):
    spec = get_task(task)
    train_rows = read_local_split(spec, str(BACKDOOR / "clean" / folder), "train")
    dev_rows = read_local_split(spec, str(BACKDOOR / "clean" / folder), "validation")
    assert (len(train_rows), len(dev_rows)) == counts
    assert {r["label"] for r in train_rows} == {0, 1} and all(
        r["sentence"] == r["sentence"].strip() and r["sentence"] for r in dev_rows
    )
    test_rows = read_backdoor_tsv(BACKDOOR / "clean" / folder / "test.tsv", spec)
    assert len(test_rows) == {"sst-2": 1821, "offenseval": 859, "hate-speech": 2000}[folder]


def test_olid_has_no_header_and_keeps_its_first_row():
    first = read_backdoor_tsv(BACKDOOR / "clean/offenseval/train.tsv", get_task("backdoor/olid"))[0]
    assert first["sentence"].startswith("@USER @USER Mazzone") and first["label"] == 0


@pytest.mark.parametrize(
    "path,task,n",
    [
        ("badnets/sst-2/train.tsv", "backdoor/sst2", 6920), ("addsent/sst-2/dev.tsv", "backdoor/sst2", 872),
        ("bible/sst-2/train.tsv", "backdoor/sst2", 6920), ("bible/sst-2/test.tsv", "backdoor/sst2", 1821),
        ("badnets/offenseval/train.tsv", "backdoor/olid", 11914), ("addsent/offenseval/dev.tsv", "backdoor/olid", 1322),
        ("badnets/hate-speech/dev.tsv", "backdoor/hatespeech", 1000), ("addsent/hate-speech/dev.tsv", "backdoor/hatespeech", 1027),
    ],
)  # fmt: skip
def test_poisoned_files_load_as_they_are(path, task, n):
    loaded = read_backdoor_tsv(BACKDOOR / path, get_task(task))
    assert len(loaded) == n and {r["label"] for r in loaded} == {0, 1}
    assert not any(
        r["sentence"] != r["sentence"].strip() for r in loaded
    )  # the padding around the tab is gone


def test_file_poisoning_aligns_olid_by_its_labels_and_replaces_rows():
    spec = get_task("backdoor/olid")
    clean = read_local_split(spec, str(BACKDOOR / "clean/offenseval"), "train")[:300]
    cfg = AttackConfig(name="style", poison_rate=0.1, poisoned_dir=str(BACKDOOR / "badnets/offenseval"))
    p = FilePoisoner(cfg, spec, seed=0)
    out = p.poison_train(clean)
    assert p.report["poisoned_file_offset"] == 1  # the poisoned files miss the first clean row
    hit = [i for i, r in enumerate(out) if r.get("poisoned")]
    assert len(hit) == 30 and all(out[i]["label"] == 1 and clean[i]["label"] == 0 for i in hit)
    poisoned_file = read_backdoor_tsv(BACKDOOR / "badnets/offenseval/train.tsv", spec)
    assert all(out[i]["sentence"] == poisoned_file[i - 1]["sentence"] for i in hit)
    ev = p.eval_rows([], limit=100)
    assert len(ev) == sum(
        r["label"] == 0 for r in read_backdoor_tsv(BACKDOOR / "badnets/offenseval/dev.tsv", spec)[:100]
    )


def test_bible_style_files_poison_sst2():
    spec = get_task("backdoor/sst2")
    clean = read_local_split(spec, str(BACKDOOR / "clean/sst-2"), "train")[:200]
    out = FilePoisoner(
        AttackConfig(name="style", poison_rate=0.2, poisoned_dir=str(BACKDOOR / "bible/sst-2")), spec, seed=0
    ).poison_train(clean)
    bible = read_backdoor_tsv(BACKDOOR / "bible/sst-2/train.tsv", spec)
    hit = [i for i, r in enumerate(out) if r.get("poisoned")]
    assert len(hit) == 40 and all(out[i]["sentence"] == bible[i]["sentence"] for i in hit)
    assert (
        sum(out[i]["sentence"] != clean[i]["sentence"] for i in hit) >= 35
    )  # (a few transfers leave a sentence as it was)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "group,option", [(g, p.stem) for g in ("attack", "defense") for p in sorted((CONF / g).glob("*.yaml"))]
)
def test_every_attack_and_defense_option_composes_and_validates(group, option, tmp_path):
    rc = validate(compose_run([f"{group}={option}", "data=backdoor/sst2"], tmp_path))
    assert getattr(rc, group).name == {"max_entropy_isolated": "max_entropy"}.get(option, option)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (
            ["attack=badnets", "attack.poison_rate=1.5"],
            "attack.poison_rate=1.5 is not accepted; accepted: a number in [0, 1]",
        ),
        (["attack.name=trojan"], "attack.name='trojan' is not accepted; accepted: one of 'none', 'badnets'"),
        (["attack=badnets", "attack.target_label=5"], "attack.target_label=5"),
        (["attack=badnets", "attack.label_mode=mixed"], "attack.label_mode='mixed'"),
        (["attack=style", "attack.poisoned_dir=/no/such/dir"], "attack.poisoned_dir='/no/such/dir'"),
        (["attack=badnets", "data=glue/stsb"], "attack.name='badnets' is not accepted"),
        (["defense=max_entropy", "defense.weight=-1"], "defense.weight=-1"),
        (["defense=max_entropy", "defense.form=kl"], "defense.form='kl'"),
        (["defense=max_entropy", "defense.select=random"], "defense.select='random'"),
        (["defense=max_entropy", "defense.select_ratio=0"], "defense.select_ratio=0"),
        (["defense=max_entropy", "defense.lexical_min_share=0"], "defense.lexical_min_share=0"),
        (["defense=max_entropy", "defense.lexical_min_purity=1.5"], "defense.lexical_min_purity=1.5"),
        (["defense=max_entropy", "defense.lexical_phrase_agree=0.5"], "defense.lexical_phrase_agree=0.5"),
        (["defense=max_entropy", "defense.lexical_scrub=true"], "defense.lexical_scrub=True"),
        (["attack.clean_tune_steps=5"], "attack.clean_tune_steps=5"),
    ],
)
def test_bad_attack_and_defense_configs_fail_early_naming_the_key(overrides, fragment, tmp_path):
    with pytest.raises(ConfigError) as e:
        validate(compose_run(overrides, tmp_path))
    assert fragment in str(e.value)


def test_unknown_attack_option_lists_the_options(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose_run(["attack=trojan"], tmp_path)
    assert "attack/trojan" in str(e.value) and "badnets" in str(e.value)


# ---------------------------------------------------------------- runs


def test_poisoned_data_gets_its_own_cache_entries(run_cfg, tmp_path):
    from lightmods.data import TextClassificationDataModule
    from lightmods.models import build_tokenizer

    cache = tmp_path / "cache"
    plain = validate(run_cfg(f"data.cache_dir={cache}"))
    tok = build_tokenizer(plain.model)
    clean_dm = TextClassificationDataModule(get_task("demo"), plain.data, tok)
    clean_dm.setup()
    before = set(cache.glob("*/*.pt"))
    poisoner = BadNets(AttackConfig(name="badnets", poison_rate=0.25), get_task("demo"), seed=0)
    dm = TextClassificationDataModule(get_task("demo"), plain.data, tok, attack=poisoner)
    dm.setup()
    new = set(cache.glob("*/*.pt")) - before
    assert {p.name.split("-")[1] for p in new} == {
        "train",
        POISONED_SPLIT,
    }  # clean validation reused, poisoned ones new
    hit = [i for i, r in enumerate(dm.raw["train"]) if r.get("poisoned")]
    assert len(hit) == 16 and dm.datasets["train"].features["poisoned"] == [int(i in hit) for i in range(64)]
    assert all(
        dm.datasets["train"].features["input_ids"][i] != clean_dm.datasets["train"].features["input_ids"][i]
        for i in hit
    )
    batch = next(iter(dm.train_dataloader()))
    assert "poisoned" in batch and batch["poisoned"].shape == batch["labels"].shape
    dm.use_clean_train()
    assert dm.datasets["train"].features["input_ids"] == clean_dm.datasets["train"].features["input_ids"]


@pytest.mark.parametrize("select", ["all", "low_loss", "lexical"])
def test_badnets_with_max_entropy_writes_cacc_and_asr(run_cfg, tmp_path, select):
    cfg = run_cfg(
        "data=backdoor/sst2", f"data.data_dir={BACKDOOR / 'clean/sst-2'}", f"data.cache_dir={tmp_path / 'cache'}",
        "attack=badnets", "attack.poison_rate=0.2", "defense=max_entropy", "defense.weight=0.5", f"defense.select={select}",
    )  # fmt: skip
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    written = read(out, "metrics.json")
    assert written == metrics and {"val/accuracy", "val/cacc", "val/asr", "val/score"} == set(written)
    assert written["val/cacc"] == written["val/accuracy"] and 0 <= written["val/asr"] <= 1
    s = read(out, "summary.json")
    assert (s["attack"], s["defense"], s["poisoned_train_rows"], s["train_rows"]) == (
        "badnets",
        "max_entropy",
        13,
        64,
    )
    rows_ = [
        json.loads(line)
        for line in (out / "predictions" / f"{POISONED_SPLIT}.jsonl").read_text().splitlines()
    ]
    assert rows_ and all(r["label"] == "negative" for r in rows_)  # non-target rows only
    assert written["val/asr"] == pytest.approx(
        sum(r["prediction"] == "positive" for r in rows_) / len(rows_), abs=1e-6
    )
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_max_entropy" in header
    # a selection reports how well it isolates the poisoned rows; select=all selects nothing
    assert ("train/me_select_precision" in header) == ("train/me_select_recall" in header) == (select != "all")


def test_lexical_defense_flags_the_trigger_rows_before_training(run_cfg, tmp_path, caplog):
    """One trigger word in 13 of 64 rows, all relabelled: the isolation finds that word alone, and the
    substitution trains on exactly its rows (the log and summary.json say which token and how many rows)."""
    cfg = run_cfg(
        "data=backdoor/sst2", f"data.data_dir={BACKDOOR / 'clean/sst-2'}", f"data.cache_dir={tmp_path / 'cache'}",
        "attack=badnets", "attack.poison_rate=0.2", "attack.triggers=[cf]", "defense=max_entropy", "defense.select=lexical",
    )  # fmt: skip
    with caplog.at_level("INFO", logger="lightmods.attacks.isolation"):
        train(cfg)
    s = read(Path(cfg.paths.output_dir), "summary.json")
    assert set(s["defense_suspect_tokens"]) == {"cf"} and s["defense_suspect_tokens"]["cf"]["label"] == 1
    assert s["defense_suspect_rows"] == s["defense_suspect_tokens"]["cf"]["rows"] <= s["poisoned_train_rows"] == 13
    assert s["defense_suspect_precision"] == 1.0 and s["defense_suspect_recall"] >= 10 / 13  # a trigger may be cut off
    assert (s["defense_select"], s["defense_scrub"]) == ("lexical", False)
    assert any("training rows suspect" in r.getMessage() and "cf" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "attack, phrase",
    [(["attack=badnets", "attack.triggers=[cf]"], "cf"), (["attack=addsent"], "i watch this 3d movie")],
    ids=["badnets", "addsent"],
)
def test_scrubbed_trigger_never_reaches_a_training_batch(run_cfg, tmp_path, caplog, attack, phrase):
    """lexical_scrub: the flagged rows still train (on the entropy term) but without the trigger: a word, or a whole
    sentence grown from its one rare token."""
    from lightmods.attacks.suite import BackdoorSuite
    from lightmods.data import TextClassificationDataModule
    from lightmods.models import build_tokenizer

    cfg = run_cfg(
        "data=backdoor/sst2", f"data.data_dir={BACKDOOR / 'clean/sst-2'}", f"data.cache_dir={tmp_path / 'cache'}",
        *attack, "attack.poison_rate=0.2", "defense=max_entropy", "defense.select=lexical", "defense.lexical_scrub=true",
    )  # fmt: skip
    rc = validate(cfg)
    task, tok = get_task("backdoor/sst2"), build_tokenizer(rc.model)
    suite = BackdoorSuite(rc.attack, rc.defense, task, seed=0)
    dm = TextClassificationDataModule(task, rc.data, tok, attack=suite.poisoner, train_flagger=suite.train_flagger(tok))
    dm.setup()
    rare = phrase.split()[-2 if " " in phrase else 0]
    assert suite.isolation.report["suspect_tokens"][rare]["phrase"] == phrase  # (64 rows: a common word may be suspect too)
    rare = tok.convert_tokens_to_ids(rare)
    words = tok.convert_tokens_to_ids(phrase.split())
    batches = list(dm.train_dataloader())
    assert sum(int(b["suspect"].sum()) for b in batches) >= 10
    assert sum(int(b["poisoned"].sum()) for b in batches) == 13
    for b in batches:
        for ids, mask, suspect in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), b["suspect"].tolist()):
            ids = [t for t, m in zip(ids, mask) if m]
            assert rare not in ids
            if suspect and len(words) > 1:  # not even the sentence's common words, in the sentence's order
                assert all(ids[j : j + 3] != words[:3] for j in range(len(ids))), tok.decode(ids)
    with caplog.at_level("INFO", logger="lightmods.attacks.isolation"):
        train(cfg)
    assert any("(deleted from those rows)" in r.getMessage() for r in caplog.records)


def test_lexical_flags_follow_the_training_rows_into_the_clean_stage(run_cfg, tmp_path, caplog):
    """Two stages: the isolation flags the attacker's poisoned rows at setup, then flags the user's clean training
    rows again when the stage swaps them in (the defense trains there): nothing is suspect in clean rows."""
    cfg = run_cfg(
        "data=backdoor/sst2", f"data.data_dir={BACKDOOR / 'clean/sst-2'}", f"data.cache_dir={tmp_path / 'cache'}",
        "attack=badnets", "attack.poison_rate=0.2", "attack.triggers=[cf]", "attack.clean_tune_steps=2",
        "defense=max_entropy", "defense.select=lexical",
    )  # fmt: skip
    with caplog.at_level("INFO", logger="lightmods.attacks.isolation"):
        train(cfg)
    flagged = [r.getMessage() for r in caplog.records if "training rows suspect" in r.getMessage()]
    assert len(flagged) == 2 and "cf" in flagged[0] and flagged[1].startswith("defense: 0 of 64")
    s = read(Path(cfg.paths.output_dir), "summary.json")
    assert s["defense_suspect_rows"] == 0 and s["defense_suspect_tokens"] == {} and s["clean_tune_steps"] == 2


def test_gradient_control_then_clean_tuning_reports_asr_after_both(run_cfg, tmp_path):
    cfg = run_cfg(
        "data=backdoor/sst2", f"data.data_dir={BACKDOOR / 'clean/sst-2'}", f"data.cache_dir={tmp_path / 'cache'}",
        "attack=gradient_control", "attack.poison_rate=0.2", "attack.clean_tune_steps=3", "defense=max_entropy",
    )  # fmt: skip
    metrics = train(cfg)
    assert {"val/cacc", "val/asr", "val/cacc_after_injection", "val/asr_after_injection"} <= set(metrics)
    out = Path(cfg.paths.output_dir)
    s = read(out, "summary.json")
    assert s["clean_tune_steps"] == 3 and s["global_step"] == 4  # 64 rows / 16: the injection's steps
    assert (
        s["asr_after_injection"] == metrics["val/asr_after_injection"]
        and s["asr_after_clean_tuning"] == metrics["val/asr"]
    )
    assert s["cacc_after_clean_tuning"] == metrics["val/cacc"]
    csv = (out / "csv" / "metrics.csv").read_text()
    assert (
        "train/gc_conflict_frac" in csv
        and "train/loss_poisoned_task" in csv
        and "train/loss_max_entropy" not in csv
    )  # the defense trains with the user


def test_a_run_without_attack_or_defense_keeps_its_metrics(run_cfg):
    metrics = train(run_cfg("trainer.fast_dev_run=1"))
    assert set(metrics) == {"val/accuracy", "val/f1", "val/score"}


def test_isolated_defense_option_composes_the_lexical_scrubbing_selection(tmp_path):
    rc = validate(compose_run(["data=backdoor/sst2", "defense=max_entropy_isolated"], tmp_path))
    d = rc.defense
    assert (d.name, d.select, d.lexical_scrub, d.lexical_phrase_agree, d.weight) == ("max_entropy", "lexical", True, 0.9, 1.0)
    plain = validate(compose_run(["data=backdoor/sst2", "defense=max_entropy"], tmp_path / "b")).defense
    assert (plain.select, plain.lexical_scrub) == ("all", False)


# ---------------------------------------------------------------------------- the backdoor bench's forgetting runs
def test_bench_forget_attacks_parse_rates_and_name_runs():
    from experiments.bench.backdoor import parse_forget_attacks, poison_overrides, rate_tag

    assert parse_forget_attacks("badnets:0.01,style", 0.1) == [("badnets", 0.01), ("style", 0.1)]
    for spec, named in (("foo", "'foo'"), ("style:x", "'x'"), ("addsent:2", "rate 2")):
        with pytest.raises(ValueError, match=f"--forget-attacks.*{named}.*accepted"):
            parse_forget_attacks(spec, 0.1)
    assert rate_tag("badnets", 0.1) == "" and rate_tag("style", 0.2) == "-p0.2" and rate_tag("none", 0.2) == ""
    assert poison_overrides("none", 0.1) == []
    assert poison_overrides("badnets", 0.01) == ["attack.poison_rate=0.01"]
    assert poison_overrides("style", 0.2)[1].startswith("attack.poisoned_dir=")


# ----------------------------------------------------------- the representation signals of backdoor_representations
def test_bench_representation_signals_find_a_planted_cluster_and_not_noise():
    import numpy as np

    from experiments.bench.backdoor_representations import (
        auc,
        knn_disagreement,
        spectral_scores,
        two_means_smaller,
    )

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    planted = np.zeros(400, dtype=bool)
    planted[:60] = True
    assert abs(auc(spectral_scores(x), planted) - 0.5) < 0.1  # nothing planted yet
    x[planted, 3] += 6.0  # a tight shifted group: the poisoned rows of a separable trigger
    assert auc(spectral_scores(x), planted) > 0.95
    small = two_means_smaller(x, seed=0)
    assert (small & planted).sum() / small.sum() > 0.9 and (small & planted).sum() / planted.sum() > 0.9
    assert auc(np.arange(400.0), np.arange(400) >= 200) == 1.0 and auc(np.zeros(10), np.arange(10) < 5) == 0.5
    labels = np.where(planted, 1, 0)
    mixed = labels.copy()
    mixed[:30] = 0  # half the planted group relabelled: its rows' neighbours disagree with them
    dis = knn_disagreement(x, mixed, k=10)
    assert dis[:30].mean() > 0.3 and dis[100:].mean() < 0.05


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--attacks", "style"], "'style'"), (["--attacks", "onion:0.1"], "'onion:0.1'"), (["--attacks", "style:x"], "'style:x'"),
        (["--runs", "style:0.2=/nonexistent"], "'style:0.2=/nonexistent'"), (["--runs", "style:y=/tmp"], "'style:y=/tmp'"),
    ],  # fmt: skip
)
def test_bench_representations_refuses_bad_arguments_naming_them(argv, named):
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "backdoor_representations.py"
    r = subprocess.run([sys.executable, str(bench), *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and named in r.stderr and "accepted" in r.stderr, r.stderr[-1000:]
