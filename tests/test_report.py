"""The report's verdicts are no stronger than their data."""

from __future__ import annotations

from dntsync.stages.report import claims, claims_table


def fig6(vdn: list[list[float]], iql: list[list[float]]) -> dict:
    mean = lambda runs: sum(map(sum, runs)) / sum(map(len, runs))  # noqa: E731
    return {"summary": {"vdn": {"dnt_error": mean(vdn)}, "iql": {"dnt_error": mean(iql)}},
            "learners": {"vdn": {"dnt_error": vdn}, "iql": {"dnt_error": iql}}}


def fig6_row(trace: dict) -> str:
    [row] = [r for r in claims_table([("ours", claims(None, {}, None, None, trace))]) if "Fig. 6" in r]
    return row


def test_fig6_verdict_needs_a_difference_beyond_the_spread_over_seeds():
    same = [[1.0, 2.0, 1.5], [1.2, 1.8, 1.6]]
    assert "no difference" in fig6_row(fig6(same, same))
    # lower on average, but by less than the seeds' spread
    assert "no difference" in fig6_row(fig6([[1.0, 1.0], [3.0, 3.0]], [[2.1, 2.1], [2.1, 2.1]]))
    assert "direction reproduced" in fig6_row(fig6([[1.0, 1.1], [1.0, 0.9]], [[2.0, 2.1], [2.2, 1.9]]))
    assert "opposite direction" in fig6_row(fig6([[2.0, 2.1], [2.2, 1.9]], [[1.0, 1.1], [1.0, 0.9]]))


def test_claims_table_has_a_column_pair_per_learner_and_dashes_where_one_lacks_a_claim():
    same = [[1.0, 2.0, 1.5], [1.2, 1.8, 1.6]]
    rows = claims_table([("default", claims(None, {}, None, None, fig6(same, same))),
                         ("paper-literal", {})])
    assert rows[0].count("verdict") == 2 and rows[1].count("---") == 7
    [row] = [r for r in rows if "Fig. 6" in r]
    assert row.split("|")[5:7] == [" — ", " — "] and "no difference" in row.split("|")[4]
