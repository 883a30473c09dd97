"""Property tests for the assignor: one invariant checker, fed by hypothesis and by examples.

Every test goes through `check_assignment`, so a new scenario cannot forget an invariant.
"""

import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcg.coordinator.assignor import Move, assign, moves

# A tiny alphabet so ids collide in sort order often and tie-breaks get exercised.
member_ids = st.text(alphabet="abcde", min_size=1, max_size=3)
# Owners that are never live: members that crashed or left without releasing.
GHOSTS = ["gone-1", "gone-2"]


def check_assignment(
    partitions: Sequence[int],
    members: Sequence[str],
    current: Mapping[int, str | None],
    rng: random.Random,
) -> dict[int, str]:
    """Run `assign`, assert every invariant the coordinator relies on, return the target."""
    target = assign(partitions, members, current)

    # Deterministic: the leader may see members, partitions and rows in any order.
    shuffled_members = list(members)
    rng.shuffle(shuffled_members)
    shuffled_partitions = list(partitions)
    rng.shuffle(shuffled_partitions)
    rows = list(current.items())
    rng.shuffle(rows)
    assert assign(shuffled_partitions, shuffled_members, dict(rows)) == target

    if not members:
        assert target == {}
        assert moves(current, target) == []
        return target

    # Exactly one owner per partition (dict keys), for exactly the partitions asked about,
    # and that owner is live.
    assert sorted(target) == sorted(partitions)
    assert set(target.values()) <= set(members)

    # Balanced: counts are floor or ceil, and exactly P mod M members get the ceil.
    final = Counter(target.values())
    base, extra = divmod(len(partitions), len(members))
    assert all(final[m] in (base, base + 1) for m in members)
    assert sum(1 for m in members if final[m] == base + 1) == extra

    # Sticky: each live member keeps as many of its partitions as its final quota allows,
    # and when it must give some up it keeps its lowest-numbered ones.
    wanted = set(partitions)
    held = {m: sorted(p for p, o in current.items() if o == m and p in wanted) for m in members}
    taken_from_live = 0
    for m in members:
        kept = [p for p in held[m] if target[p] == m]
        assert len(kept) == min(len(held[m]), final[m])
        assert kept == held[m][: len(kept)]
        taken_from_live += len(held[m]) - len(kept)

    # Minimal: every balanced outcome gives P mod M members base+1 and the rest base, so a
    # member holding h > base must lose h - base, or h - base - 1 if it gets a spare slot; at
    # most `extra` of them can. Members at or below base lose nothing either way.
    over = [len(h) - base for h in held.values() if len(h) > base]
    assert taken_from_live == sum(over) - min(extra, len(over))

    # The spare slots go to the biggest holders, ties by member id.
    ranked = sorted(members, key=lambda m: (-len(held[m]), m))
    assert {m for m in members if final[m] == base + 1} == set(ranked[:extra])

    # `moves` lists exactly the changed partitions, in partition order, naming the old owner
    # as `current` had it (dead or None included).
    assert moves(current, target) == [
        Move(p, current.get(p), target[p]) for p in sorted(target) if current.get(p) != target[p]
    ]
    return target


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[str], dict[int, str | None]]:
    members = draw(st.lists(member_ids, unique=True, max_size=12))
    partitions = draw(st.lists(st.integers(0, 200), unique=True, max_size=80))
    # A few owners drawn from a small pool gives skewed loads (one member holding everything),
    # which uniform draws almost never produce.
    candidates = members + GHOSTS
    owners = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=4))
    owner = st.one_of(st.none(), st.sampled_from(owners))
    # Stray partitions (>200) that the caller no longer lists must be ignored.
    stray = st.integers(201, 220)
    keys = st.one_of(st.sampled_from(partitions), stray) if partitions else stray
    current = draw(st.dictionaries(keys, owner, max_size=100))
    return partitions, members, current


@settings(max_examples=400, deadline=None)
@given(scenario=scenarios(), rng=st.randoms(use_true_random=False))
def test_invariants_hold_for_any_input(
    scenario: tuple[list[int], list[str], dict[int, str | None]], rng: random.Random
) -> None:
    partitions, members, current = scenario
    check_assignment(partitions, members, current, rng)


# A membership event: ("join", new id) or ("leave" | "crash", index into the live members).
events = st.one_of(
    st.tuples(st.just("join"), member_ids),
    st.tuples(st.sampled_from(["leave", "crash"]), st.integers(0, 1_000)),
)


@settings(max_examples=150, deadline=None)
@given(
    partition_count=st.integers(0, 64),
    founders=st.lists(member_ids, unique=True, max_size=6),
    history=st.lists(events, max_size=25),
    rng=st.randoms(use_true_random=False),
)
def test_churn_moves_only_what_membership_changes_require(
    partition_count: int,
    founders: list[str],
    history: list[tuple[str, str | int]],
    rng: random.Random,
) -> None:
    partitions = list(range(partition_count))
    members = list(founders)
    current: dict[int, str | None] = dict(check_assignment(partitions, members, {}, rng))

    for kind, arg in history:
        if kind == "join":
            assert isinstance(arg, str)
            if arg in members:
                continue
            members.append(arg)
            target = check_assignment(partitions, members, current, rng)
            # The joiner fills its quota and nobody else is disturbed.
            changed = moves(current, target)
            assert all(m.to_member == arg for m in changed)
            assert len(changed) == Counter(target.values())[arg]
        else:
            assert isinstance(arg, int)
            if not members:
                continue
            gone = members.pop(arg % len(members))
            if kind == "leave":
                # A graceful leave releases its rows; a crash leaves them naming the dead member.
                current = {p: None if o == gone else o for p, o in current.items()}
            target = check_assignment(partitions, members, current, rng)
            if members:
                # Only the departed member's partitions move; survivors keep everything.
                orphans = {p for p in partitions if current.get(p) in (gone, None)}
                assert {m.partition for m in moves(current, target)} == orphans
            released = {p: None if o == gone else o for p, o in current.items()}
            assert assign(partitions, members, released) == target
        current = dict(target)


@settings(max_examples=50, deadline=None)
@given(
    member_count=st.integers(1, 300),
    partitions=st.lists(st.integers(0, 10_000), unique=True, max_size=300),
    rng=st.randoms(use_true_random=False),
)
def test_from_scratch_and_with_more_members_than_partitions(
    member_count: int, partitions: list[int], rng: random.Random
) -> None:
    members = [f"m{i}" for i in range(member_count)]
    target = check_assignment(partitions, members, {}, rng)
    # Re-running on its own output is a no-op: a stable group never rebalances.
    assert moves(target, check_assignment(partitions, members, target, rng)) == []


def test_no_members_assigns_nothing() -> None:
    rng = random.Random(0)
    assert check_assignment([0, 1, 2], [], {0: "a", 1: None}, rng) == {}
    assert check_assignment([], [], {}, rng) == {}


def test_no_partitions() -> None:
    assert check_assignment([], ["a", "b"], {7: "a"}, random.Random(0)) == {}


def test_duplicates_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate member 'a'"):
        assign([0, 1], ["a", "b", "a"], {})
    with pytest.raises(ValueError, match="duplicate partition 1"):
        assign([0, 1, 1], ["a"], {})


def test_single_partition_stays_with_live_owner_or_goes_to_lowest_id() -> None:
    rng = random.Random(0)
    assert check_assignment([0], ["b", "a", "c"], {0: "c"}, rng) == {0: "c"}
    assert check_assignment([0], ["b", "a", "c"], {0: "gone-1"}, rng) == {0: "a"}
    assert moves({0: "gone-1"}, {0: "a"}) == [Move(0, "gone-1", "a")]


def test_more_members_than_partitions_keeps_live_owners() -> None:
    current: dict[int, str | None] = {0: "e", 1: None, 2: "gone-1"}
    target = check_assignment([0, 1, 2], ["a", "b", "c", "d", "e"], current, random.Random(0))
    assert target == {0: "e", 1: "a", 2: "b"}


def test_spare_slot_goes_to_the_biggest_holder_which_keeps_its_lowest() -> None:
    current: dict[int, str | None] = dict.fromkeys(range(5), "b")
    target = check_assignment(range(5), ["a", "b"], current, random.Random(0))
    assert target == {0: "b", 1: "b", 2: "b", 3: "a", 4: "a"}
    assert moves(current, target) == [Move(3, "b", "a"), Move(4, "b", "a")]


def test_ties_go_by_member_id_and_fill_the_emptiest_first() -> None:
    rng = random.Random(0)
    assert check_assignment(range(3), ["b", "a"], {}, rng) == {0: "a", 1: "b", 2: "a"}
    # "a" already holds one, so the orphans go to "b" and "c" before "a" gets another.
    target = check_assignment(range(6), ["c", "b", "a"], {0: "a"}, rng)
    assert target == {0: "a", 1: "b", 2: "c", 3: "a", 4: "b", 5: "c"}


def test_256_partitions_over_100_members() -> None:
    rng = random.Random(256)
    members = [f"member-{i:03d}" for i in range(100)]
    target = check_assignment(range(256), members, {}, rng)
    assert sorted(Counter(Counter(target.values()).values()).items()) == [(2, 44), (3, 56)]
    # Lose a fifth of the group; the survivors keep everything they had.
    survivors = [m for m in members if not m.endswith(("0", "5"))]
    after = check_assignment(range(256), survivors, target, rng)
    assert all(after[p] == o for p, o in target.items() if o in survivors)


def test_a_thousand_members_and_ten_thousand_partitions_is_fast() -> None:
    rng = random.Random(1000)
    members = [f"member-{i:04d}" for i in range(1_000)]
    owners: list[str | None] = [*members[:700], *GHOSTS, None]
    current = {p: rng.choice(owners) for p in range(10_000)}
    started = time.perf_counter()
    assign(range(10_000), members, current)
    elapsed = time.perf_counter() - started
    check_assignment(range(10_000), members, current, rng)
    assert elapsed < 1.0, f"assign took {elapsed:.3f}s"
