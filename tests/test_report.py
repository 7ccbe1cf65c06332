"""The report's verdicts are no stronger than their data."""

from __future__ import annotations

from dntsync.stages.report import bars_table, claims, claims_table


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


def baselines(heuristic: float, oracle: float) -> dict:
    return {"nearest-always": {"team_reward": {"mean": heuristic}}, "random": {"team_reward": {"mean": 99.0}},
            "oracle": {"team_reward": {"mean": oracle}}}


def test_the_bars_give_vdn_against_the_heuristic_a_direction_only_beyond_the_spread_over_seeds():
    """Fig. 3 asks VDN >= the best heuristic and >= 0.95 x the oracle, a sweep point VDN >=
    the heuristic alone; the difference is a tie within VDN's spread over seeds."""
    marl = {"vdn": {"eval_team_reward": 18.035, "eval_team_reward_std_over_seeds": 0.002,
                    "baselines": baselines(18.037, 18.5)}}
    point = lambda value, mean, std, oracle: {  # noqa: E731
        "value": value, "algos": {"vdn": {"team_reward": {"mean": mean, "std": std}}},
        "baselines": baselines(10.0, oracle)}
    sweep = {"sweep": "fig4", "key": "scenario.eps", "points": [
        point(0.1, 10.5, 0.1, 12.0), point(0.5, 9.8, 0.5, 10.2), point(0.8, 9.5, 0.1, 10.0)]}
    rows = bars_table(marl, sweep, None)
    assert rows[0].count("|") == rows[1].count("|") == 9
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows[2:]]
    fig3, above, tie, below = cells
    assert fig3[3] == "-0.0020 (tie: within the spread over seeds)" and fig3[4] == "0.99989"
    assert fig3[-1] == "**not met**"  # below the heuristic, if within the spread
    assert above[3] == "+0.5000 (above)" and above[-1] == "met"  # 0.875 x the oracle: not a sweep bar
    assert tie[3] == "-0.2000 (tie: within the spread over seeds)" and tie[-1] == "**not met**"
    assert below[3] == "-0.5000 (below)" and below[-1] == "**not met**"
