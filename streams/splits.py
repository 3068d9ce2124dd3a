"""Leave-one-out splits for offline evaluation, and the views of them each party may see.

Protocol (the one SASRec, SLIM and most sequential-recommendation papers use):

* Each user's interactions are put in timestamp order; interactions with the same timestamp keep their order
  in the file (the sort is stable), because that is the only ordering evidence there is.
* A user's repeated interactions with one item keep only the first. Leave-one-out with "exclude the
  history from the ranking" is only coherent if the held-out item is not also in the history; MovieLens never
  repeats a (user, item) pair except where ML-100k lists a film twice and the loader merges the two ids.
  The count of dropped repeats is reported in :class:`SplitStats`.
* Users with fewer than 3 (distinct) interactions are dropped (one each is needed for train, validation and
  test) and counted in the stats.
* Last item = test target, the one before = validation target, the rest = training sequence.

Ids become contiguous integers: users ``0 .. n_users-1`` and items ``1 .. n_items`` with **item 0 reserved for
padding** (sequence models left-pad with it), both assigned in sorted order of the dataset's string ids, so
the mapping depends on the data and not on the order of the file.

Leakage: rankers are fitted on :meth:`LeaveOneOutSplit.training_data`, which holds the training sequences and
the validation targets (for early stopping) but never a test target. :meth:`LeaveOneOutSplit.phase` gives,
for the validation phase, the training sequence as history; for the test phase, training sequence + the
validation item. The test item is in neither, so nothing fitted or prompted with these views can see it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np

from streams.datasets import Interaction

PAD_ITEM = 0
MIN_INTERACTIONS = 3
Phase = Literal["valid", "test"]


@dataclass(frozen=True)
class SplitStats:
    """What the split kept and what it dropped, so a report can say so."""

    interactions_in: int
    users_in: int
    repeats_dropped: int  # later (user, item) repeats; only the first interaction of a pair is kept
    users_dropped: int  # users with fewer than MIN_INTERACTIONS distinct items
    interactions_dropped: int  # the interactions of those users
    users: int
    items: int  # items of the kept users (padding not counted)
    train_interactions: int
    min_interactions: int = MIN_INTERACTIONS
    # Item cold start (withhold_items): items taken out of training and validation, the interactions removed
    # with them, and the users whose test item is one of them (the "item unseen" slice).
    items_withheld: int = 0
    interactions_withheld: int = 0
    targets_withheld: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class TrainingData:
    """Everything a ranker may fit on: training sequences, plus validation targets for early stopping.

    Deliberately has no test targets: a ranker that only receives this object cannot overfit to the test set.
    The id maps are included so that text-based methods can look up titles for item indices.
    """

    n_items: int  # real items; score arrays have n_items + 1 columns (column 0 is padding)
    user_ids: tuple[str, ...]  # index -> dataset id
    item_ids: tuple[str, ...]  # index -> dataset id; item_ids[0] is the padding placeholder ""
    train: tuple[np.ndarray, ...]  # per user: item indices, oldest first
    valid_targets: np.ndarray  # per user: the validation item
    # Item indices not yet in the catalogue at training time (withhold_items): a trained model must not see
    # them at all, not even as the negatives of its softmax or as competitors in validation. None: every item.
    unknown_items: np.ndarray | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def item_counts(self) -> np.ndarray:
        """Training interactions per item index (length n_items + 1; padding has 0)."""
        flat = np.concatenate(self.train) if self.train else np.zeros(0, dtype=np.int64)
        return np.bincount(flat, minlength=self.n_items + 1).astype(np.int64)


@dataclass(frozen=True)
class EvalPhase:
    """One evaluation phase: what the model may see (``histories``) and what it must rank (``targets``)."""

    name: Phase
    histories: tuple[np.ndarray, ...]  # per user, oldest first: also the items excluded from full ranking
    targets: np.ndarray  # per user: the held-out item
    # Per user, items they interacted with that no model is shown (withheld items): never an input, but, like
    # the history, excluded from full ranking and from the sampled negatives. None: there are none.
    hidden: tuple[np.ndarray, ...] | None = None

    def excluded(self) -> tuple[np.ndarray, ...]:
        """Per user, every item that is not a competitor of the target: the history and the hidden items."""
        if self.hidden is None:
            return self.histories
        return tuple(np.concatenate([h, x]) for h, x in zip(self.histories, self.hidden))


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """A leave-one-out split over contiguous ids (see the module docstring for the protocol)."""

    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]  # item_ids[0] == "" is padding
    train: tuple[np.ndarray, ...]
    valid: np.ndarray  # [n_users] validation item per user
    test: np.ndarray  # [n_users] test item per user
    stats: SplitStats
    hidden: tuple[np.ndarray, ...] | None = None  # per user: interactions withheld from the models (withhold_items)
    withheld: np.ndarray | None = None  # the withheld item indices (withhold_items), unknown to training

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Real items (the padding index is not counted); score arrays are n_items + 1 wide."""
        return len(self.item_ids) - 1

    def training_data(self) -> TrainingData:
        return TrainingData(n_items=self.n_items, user_ids=self.user_ids, item_ids=self.item_ids,
                            train=self.train, valid_targets=self.valid.copy(),
                            unknown_items=None if self.withheld is None else self.withheld.copy())

    def phase(self, name: Phase) -> EvalPhase:
        """Histories and targets for ``"valid"`` (history = train) or ``"test"`` (history = train + valid)."""
        if name == "valid":
            return EvalPhase("valid", self.train, self.valid.copy(), self.hidden)
        if name == "test":
            hist = tuple(np.append(t, v).astype(np.int64) for t, v in zip(self.train, self.valid))
            return EvalPhase("test", hist, self.test.copy(), self.hidden)
        raise ValueError(f"unknown phase {name!r}; expected 'valid' or 'test'")

    def interacted(self, user: int) -> np.ndarray:
        """Every item the user ever interacted with (train, validation, test and hidden), sorted."""
        seen = np.append(self.train[user], (self.valid[user], self.test[user]))
        if self.hidden is not None:
            seen = np.append(seen, self.hidden[user])
        return np.unique(seen)


def leave_one_out(interactions: Iterable[Interaction], min_interactions: int = MIN_INTERACTIONS) -> LeaveOneOutSplit:
    """Split ``interactions`` (in file order) leave-one-out by timestamp. Deterministic."""
    if min_interactions < 3:
        raise ValueError("leave-one-out needs at least 3 interactions per user (train, validation, test)")
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    n_in = 0
    for pos, it in enumerate(interactions):
        n_in += 1
        by_user.setdefault(it.user_id, []).append((it.timestamp, pos, it.item_id))

    sequences: dict[str, list[str]] = {}
    repeats = dropped_users = dropped_interactions = 0
    for user, events in by_user.items():
        events.sort(key=lambda e: (e[0], e[1]))  # file position breaks timestamp ties
        seen: set[str] = set()
        seq: list[str] = []
        for _, _, item in events:
            if item in seen:
                repeats += 1
                continue
            seen.add(item)
            seq.append(item)
        if len(seq) < min_interactions:
            dropped_users += 1
            dropped_interactions += len(seq)
            continue
        sequences[user] = seq

    user_ids = tuple(sorted(sequences))
    item_ids = ("",) + tuple(sorted({i for seq in sequences.values() for i in seq}))
    index = {item: k for k, item in enumerate(item_ids) if k != PAD_ITEM}
    train, valid, test = [], np.empty(len(user_ids), np.int64), np.empty(len(user_ids), np.int64)
    for u, user in enumerate(user_ids):
        seq = np.fromiter((index[i] for i in sequences[user]), dtype=np.int64, count=len(sequences[user]))
        train.append(seq[:-2])
        valid[u], test[u] = seq[-2], seq[-1]
    stats = SplitStats(
        interactions_in=n_in, users_in=len(by_user), repeats_dropped=repeats, users_dropped=dropped_users,
        interactions_dropped=dropped_interactions, users=len(user_ids), items=len(item_ids) - 1,
        train_interactions=int(sum(len(t) for t in train)), min_interactions=min_interactions,
    )
    return LeaveOneOutSplit(user_ids, item_ids, tuple(train), valid, test, stats)


def withhold_items(split: LeaveOneOutSplit, fraction: float, seed: int,
                   min_interactions: int = MIN_INTERACTIONS) -> LeaveOneOutSplit:
    """Item cold start: a seeded ``fraction`` of the catalogue is taken out of training and validation.

    These are items that reach the catalogue (with their text) after the models were trained: every
    training and validation interaction with one is removed from the user's sequence (kept in ``hidden``, so
    it is neither an input nor a competitor of the target), and a user's validation item, if withheld, is
    replaced by the newest remaining item. Test targets stay as they are, so the users whose test item was
    withheld are judged on an item no model saw in training: the "item unseen" slice of the report, large
    enough to measure (leave-one-out alone has a handful of such users). The item index is unchanged, so every
    method ranks the same catalogue at test time; during training the withheld items do not exist
    (``TrainingData.unknown_items``: no softmax negative, no validation competitor). Users left with fewer
    than ``min_interactions`` items (train, validation, test) are dropped and counted.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the withheld fraction of items must be in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 0xC01D])  # own stream: the choice must not shift with other draws
    n_withheld = max(1, int(round(fraction * split.n_items)))
    withheld = np.zeros(split.n_items + 1, dtype=bool)
    withheld[1 + rng.choice(split.n_items, size=n_withheld, replace=False)] = True
    keep: list[int] = []
    train, valid, hidden = [], [], []
    removed = dropped_interactions = 0
    for u in range(split.n_users):
        seq = np.append(split.train[u], split.valid[u]).astype(np.int64)
        mask = withheld[seq]
        kept = seq[~mask]
        if len(kept) + 1 < min_interactions:
            dropped_interactions += len(seq) + 1
            continue
        keep.append(u)
        removed += int(mask.sum())
        train.append(kept[:-1])
        valid.append(kept[-1])
        hidden.append(seq[mask])
    users = np.asarray(keep, dtype=np.int64)
    test = split.test[users].copy()
    st = split.stats
    stats = replace(st, users_dropped=st.users_dropped + split.n_users - len(keep),
                    interactions_dropped=st.interactions_dropped + dropped_interactions, users=len(keep),
                    train_interactions=int(sum(len(t) for t in train)), items_withheld=n_withheld,
                    interactions_withheld=removed, targets_withheld=int(withheld[test].sum()))
    return LeaveOneOutSplit(tuple(split.user_ids[u] for u in keep), split.item_ids, tuple(train),
                            np.asarray(valid, dtype=np.int64), test, stats, tuple(hidden),
                            np.flatnonzero(withheld).astype(np.int64))


def sample_user_indices(n_users: int, n: int | None, seed: int, stream: int = 0x5A3) -> np.ndarray:
    """A seeded sample of ``n`` user indices (sorted), or all users when ``n`` is None or >= n_users.

    ``stream`` separates independent draws made with the same seed (the evaluation sample vs a data slice).
    """
    if n is None or n >= n_users:
        return np.arange(n_users, dtype=np.int64)
    if n < 1:
        raise ValueError(f"sample size must be at least 1, got {n}")
    rng = np.random.default_rng([seed, stream])  # own stream: the sample must not shift when other draws change
    return np.sort(rng.choice(n_users, size=n, replace=False)).astype(np.int64)


def restrict_users(interactions: Sequence[Interaction], n_users: int, seed: int,
                   min_interactions: int = MIN_INTERACTIONS) -> list[Interaction]:
    """The interactions (file order kept) of ``n_users`` users drawn (seeded) among those with at least
    ``min_interactions`` distinct items: a small, representative slice for quick runs and tests."""
    items_per_user: dict[str, set[str]] = {}
    for it in interactions:
        items_per_user.setdefault(it.user_id, set()).add(it.item_id)
    eligible = sorted(u for u, s in items_per_user.items() if len(s) >= min_interactions)
    chosen = {eligible[i] for i in sample_user_indices(len(eligible), n_users, seed, stream=0x511CE)}
    return [it for it in interactions if it.user_id in chosen]
