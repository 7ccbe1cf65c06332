"""The one list of evaluation metric names (per step of an episode; `dntsync.env.evaluate`
computes them, every report, table and figure reads them from here)."""

# team reward (eq. 16), sum data rate, DNT error (eq. 8), uploads, failed uploads, users
# served by two BSs at once
METRICS = ("team_reward", "sum_rate", "dnt_error", "uploads", "failed_uploads", "served_twice")
# the three of the paper's figures and of the DVC summary tables (metrics/summary/)
HEADLINE_METRICS = METRICS[:3]
