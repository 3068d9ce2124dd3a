"""The item cold-start protocol (streams/splits.withhold_items, ``slimstream evaluate --cold-items``): withheld
items reach no model in training (not as input, not as a softmax negative, not as a validation competitor),
their earlier interactions are neither input nor competitors at test time, and the report's "item unseen"
slice is exactly the users whose test item was withheld."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.harness import Method, run_evaluation
from models.baselines import PopularityRanker
from models.sasrec import SASRecConfig, SASRecRanker, _SASRecNet
from streams.datasets import load_interactions
from streams.settings import Settings
from streams.splits import LeaveOneOutSplit, TrainingData, leave_one_out, restrict_users, withhold_items


@pytest.fixture(scope="module")
def split() -> LeaveOneOutSplit:
    return leave_one_out(restrict_users(load_interactions("ml-100k"), 300, 0))


def test_withheld_items_leave_training_and_validation_only(split: LeaveOneOutSplit) -> None:
    cold = withhold_items(split, 0.1, seed=0)
    withheld = set(cold.withheld.tolist())
    assert len(withheld) == round(0.1 * split.n_items) == cold.stats.items_withheld
    assert cold.item_ids == split.item_ids  # the same catalogue is ranked
    by_id = {uid: u for u, uid in enumerate(split.user_ids)}
    removed = 0
    for c, uid in enumerate(cold.user_ids):
        u = by_id[uid]
        assert not withheld & set(cold.train[c].tolist()) and int(cold.valid[c]) not in withheld
        assert cold.test[c] == split.test[u]  # targets are kept, withheld or not
        before = np.append(split.train[u], split.valid[u]).tolist()
        # The sequence is the old one with the withheld items taken out, order kept; they are now hidden.
        assert cold.train[c].tolist() + [int(cold.valid[c])] == [i for i in before if i not in withheld]
        assert sorted(cold.hidden[c].tolist()) == sorted(i for i in before if i in withheld)
        assert set(cold.interacted(c).tolist()) == set(before) | {int(split.test[u])}
        removed += len(cold.hidden[c])
    assert removed == cold.stats.interactions_withheld > 0
    assert cold.stats.targets_withheld == sum(int(t) in withheld for t in cold.test) > 0
    assert cold.stats.users == cold.n_users <= split.n_users
    assert set(cold.training_data().unknown_items.tolist()) == withheld
    # The test phase shows the models no withheld item, but excludes the hidden ones from the ranking.
    phase = cold.phase("test")
    assert all(not withheld & set(h.tolist()) for h in phase.histories)
    assert all(set(x.tolist()) == set(h.tolist()) | set(z.tolist())
               for x, h, z in zip(phase.excluded(), phase.histories, cold.hidden))
    again = withhold_items(split, 0.1, seed=0)
    assert np.array_equal(again.withheld, cold.withheld)
    assert not np.array_equal(withhold_items(split, 0.1, seed=1).withheld, cold.withheld)
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="fraction"):
            withhold_items(split, bad, seed=0)


def test_sasrec_never_trains_on_an_unknown_item(split: LeaveOneOutSplit) -> None:
    """Masked out of the softmax and the validation ranking, an unknown item's embedding gets no gradient:
    it ends training exactly as initialised, while without the mask the softmax pushes every item."""
    data = withhold_items(split, 0.1, seed=0).training_data()
    cfg = SASRecConfig(max_len=50, dim=32, batch_size=64, lr=3e-3, epochs=2, threads=1, bf16=False, seed=3)
    torch.manual_seed(cfg.seed)
    init = _SASRecNet(data.n_items, cfg).item_emb.weight.detach().clone()
    unknown = torch.from_numpy(data.unknown_items)
    masked = SASRecRanker(cfg)
    masked.fit(data)
    assert torch.equal(masked.net.item_emb.weight.detach()[unknown], init[unknown])
    plain = SASRecRanker(cfg)
    plain.fit(replace(data, unknown_items=None))
    assert not torch.equal(plain.net.item_emb.weight.detach()[unknown], init[unknown])


class _Spy:
    name = "spy"

    def __init__(self) -> None:
        self.pop = PopularityRanker()
        self.data: TrainingData | None = None
        self.shown: list[np.ndarray] = []

    def fit(self, data: TrainingData) -> None:
        self.data = data
        self.pop.fit(data)

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        self.shown.extend(np.asarray(h) for h in histories)
        return self.pop.score(users, histories)


def test_the_report_slices_the_withheld_targets(tmp_path: Path) -> None:
    spy = _Spy()
    out = run_evaluation("ml-100k", [Method("spy", lambda ctx: spy), "popularity"], sample_users=None, seed=0,
                         limit_users=300, cold_items=0.1, out_dir=tmp_path, plots=False, run_name="cold",
                         settings=Settings.from_env())
    cold = withhold_items(leave_one_out(restrict_users(load_interactions("ml-100k"), 300, 0)), 0.1, seed=0)
    withheld = set(cold.withheld.tolist())
    assert out["args"]["cold_items"] == 0.1 and "cold items" in out["protocol"]
    assert out["split"]["targets_withheld"] == cold.stats.targets_withheld
    assert spy.data is not None and set(spy.data.unknown_items.tolist()) == withheld
    assert all(not withheld & set(s.tolist()) for s in spy.data.train)
    assert all(not withheld & set(h.tolist()) for h in spy.shown)
    unseen = out["results"]["all"]["popularity"]["slices"]["item unseen"]
    # Every withheld target has no training interaction; a few targets may be unseen without being withheld.
    assert unseen["users"] >= cold.stats.targets_withheld
    assert unseen["NDCG@10"]["mean"] < 0.01  # popularity cannot rank what nobody was seen to choose
    md = (tmp_path / "cold" / "results.md").read_text()
    assert f"{cold.stats.items_withheld} items withheld" in md


def test_the_id_and_text_model_scores_an_unknown_item_by_its_text_alone(split: LeaveOneOutSplit) -> None:
    from models.slim_rec import SLIMRecConfig, SLIMRecRanker

    data = withhold_items(split, 0.1, seed=0).training_data()
    text = np.random.default_rng(0).normal(size=(data.n_items + 1, 24)).astype(np.float32)
    text[0] = 0
    cfg = SLIMRecConfig(items="id+text", max_len=50, dim=32, batch_size=64, lr=3e-3, epochs=1, threads=1, bf16=False)
    ranker = SLIMRecRanker(cfg, item_text=text)
    ranker.fit(data)
    table = ranker.net.item_emb.weight.detach()
    assert not table[torch.from_numpy(data.unknown_items)].any()  # no ID part: only the text adapter's vector
    known = np.setdiff1d(np.arange(1, data.n_items + 1), data.unknown_items)
    assert table[torch.from_numpy(known)].abs().sum(dim=1).min() > 0
    scores = ranker.score(np.arange(3), [data.train[u] for u in range(3)])
    assert np.isfinite(scores[:, data.unknown_items]).all() and scores[:, data.unknown_items].std() > 0
