"""The greedy search's back-off, on a scripted scorer: when the composed student scores below the
prediction, each change's real cost is measured inside it, the costs are raised and the search runs
again with them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ndonnx import search as search_mod
from ndonnx.search import Option, search


class ScriptedScorer:
    """Three neighbourhoods of 100 parameters, each with a `half` candidate of 50. Alone every half
    costs `single[nid]`; composed, neighbourhood 0's half costs `composed_cost` (an interaction the
    partial model cannot see), the others what they cost alone."""

    def __init__(self, single: dict[int, float], composed_cost: dict[int, float]):
        self.teacher = SimpleNamespace(params=300)
        self.part = SimpleNamespace(neighbourhoods=[SimpleNamespace(id=i, params=100) for i in range(3)])
        self.teacher_score = 1.0
        self.single_cost, self.composed_cost = single, composed_cost
        self.calls: list[dict[int, str]] = []  # every composed evaluation, in order

    def single(self, opt: Option) -> tuple[float, float]:
        cost = 0.0 if opt.candidate == "teacher" else self.single_cost[opt.neighbourhood]
        return 1.0 - cost, cost  # (score, divergence): here the divergence is the score lost

    def composed(self, choice: dict[int, Option]) -> tuple[float, float]:
        self.calls.append({nid: o.candidate for nid, o in choice.items()})
        cost = sum(self.composed_cost[nid] for nid, o in choice.items() if o.candidate != "teacher")
        return 1.0 - cost, cost


def _options() -> dict[int, list[Option]]:
    return {nid: [Option(nid, "teacher", 100, 0.0), Option(nid, "half", 50, 0.1)] for nid in range(3)}


@pytest.fixture
def unfiltered(monkeypatch):
    """The Pareto points as the search records them, before `_pareto` drops the dominated ones."""
    seen: list[list[dict]] = []
    real = search_mod._pareto
    monkeypatch.setattr(search_mod, "_pareto", lambda pts: seen.append([dict(p) for p in pts]) or real(pts))
    return seen


def test_back_off_raises_costs_and_searches_again(unfiltered):
    # alone, neighbourhood 0's half looks cheapest (0.01 < 0.05); composed it costs 0.3
    scorer = ScriptedScorer(single={0: 0.01, 1: 0.05, 2: 0.06}, composed_cost={0: 0.3, 1: 0.05, 2: 0.06})
    result = search(scorer, _options(), target=250)  # one neighbourhood must go to its half
    first = {0: "half", 1: "teacher", 2: "teacher"}
    assert scorer.calls == [
        first,  # round 1: composed 0.7, predicted 0.99 -> back off
        {0: "teacher", 1: "teacher", 2: "teacher"},  # the change measured: restored, 0.3 comes back
        {0: "teacher", 1: "half", 2: "teacher"},  # round 2 with the raised cost: predicted 0.95 = composed
    ]
    (points,) = unfiltered
    assert [p["choices"] for p in points] == [{str(k): v for k, v in c.items()} for c in (first, scorer.calls[2])]
    assert points[0]["score"] == pytest.approx(0.7) and points[0]["predicted_loss"] == pytest.approx(0.01)
    assert points[1]["score"] == pytest.approx(0.95) and points[1]["predicted_loss"] == pytest.approx(0.05)
    assert {nid: o.candidate for nid, o in result.choice.items()} == scorer.calls[2]
    assert result.score == pytest.approx(0.95) and result.params == 250
    assert result.pareto == [points[1]]  # same size, lower score: round 1's point is dominated


def test_raised_cost_stays_when_it_helps_the_next_round_too(unfiltered):
    """Costs only go up: round 3 still knows round 1's finding (it does not go back to neighbourhood 0),
    and the search stops after `rounds` rounds, keeping the best composed score."""
    scorer = ScriptedScorer(single={0: 0.01, 1: 0.02, 2: 0.03}, composed_cost={0: 0.4, 1: 0.3, 2: 0.2})
    result = search(scorer, _options(), target=250, rounds=3)
    rounds = [c for c in scorer.calls if list(c.values()).count("half") == 1]
    # round 1 takes 0, backs off (0 costs 0.4); round 2 takes 1, backs off (0.3); round 3 takes 2
    assert [next(k for k, v in c.items() if v == "half") for c in rounds] == [0, 1, 2]
    assert len(scorer.calls) == 5  # 3 rounds, the first two short of their prediction and so re-measured; the
    # third is the last (`rounds`): nothing is re-measured after it
    assert [p["score"] for p in unfiltered[0]] == pytest.approx([0.6, 0.7, 0.8])
    assert result.choice[2].candidate == "half" and result.score == pytest.approx(0.8)


def test_no_back_off_when_the_prediction_holds(unfiltered):
    scorer = ScriptedScorer(single={0: 0.01, 1: 0.05, 2: 0.06}, composed_cost={0: 0.01, 1: 0.05, 2: 0.06})
    result = search(scorer, _options(), target=250)
    assert scorer.calls == [{0: "half", 1: "teacher", 2: "teacher"}]  # one round, nothing re-measured
    assert len(unfiltered[0]) == 1 and result.score == pytest.approx(0.99) == result.predicted


def test_one_round_keeps_the_first_choice(unfiltered):
    scorer = ScriptedScorer(single={0: 0.01, 1: 0.05, 2: 0.06}, composed_cost={0: 0.3, 1: 0.05, 2: 0.06})
    result = search(scorer, _options(), target=250, rounds=1)
    assert result.choice[0].candidate == "half" and result.score == pytest.approx(0.7)
    assert result.predicted == pytest.approx(0.99)
