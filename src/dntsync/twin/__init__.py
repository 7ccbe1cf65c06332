"""The GRU digital network twin (paper Sec. III-A/B, eqs. 9-14).

- `model`: `GruTwin`, eqs. (9)-(13) with `torch.nn.GRU`, and `twin_loss`, eq. (14) (torch only).
- `checkpoint`: `save_twin` / `load_twin`, a plain dict read with `weights_only=True`.
- `predictor`: `GruPredictor`, the twin in the environment's predictor slot, and
  `build_predictor`, the predictor a config names.
- `data`, `module`, `training`, `evaluation`, `figure` (Lightning; import them directly):
  the windowed data set, the LightningModule with self-feeding, `fit_twin`, the test report
  against the Bayes floor, and Fig. 2.

Only the torch-only parts are imported here, so the environment loads a twin without
importing Lightning.
"""

from dntsync.twin.checkpoint import TwinCheckpointError, load_twin, save_twin
from dntsync.twin.model import GruTwin, Scaler, twin_loss
from dntsync.twin.predictor import GruPredictor, build_predictor

__all__ = ["GruPredictor", "GruTwin", "Scaler", "TwinCheckpointError", "build_predictor", "load_twin",
           "save_twin", "twin_loss"]
