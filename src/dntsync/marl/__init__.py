"""Multi-agent deep Q-learning for the BSs: Q networks, episode replay, VDN and IQL (eqs. 19-24, 37).

- `networks`: each BS's recurrent Q network with the branching (per-bit, shared serve net),
  flat (2^(U+1)) or factorised head; masked maxima over valid actions only.
- `replay`: whole-episode replay memory as a `LightningDataModule` (Algorithm 2's collection).
- `learners`: one `QLearner` update; `VDN` (team reward, sum of agents) and `IQL` (local rewards).
- `training`: `fit_marl`, one seeded run with evaluation beside the baselines.
"""

from dntsync.marl.learners import IQL, LEARNERS, VDN, QLearner, QPolicy
from dntsync.marl.networks import AgentQNet, AgentQNets, BranchingHead, FactorisedHead, FlatHead

__all__ = ["IQL", "LEARNERS", "VDN", "AgentQNet", "AgentQNets", "BranchingHead", "FactorisedHead",
           "FlatHead", "QLearner", "QPolicy"]
