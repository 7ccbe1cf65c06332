"""The multi-agent environment over the physical network (eqs. 7, 16, 17, 37)."""

from dntsync.env.actions import action_mask, decode, encode, is_valid, random_valid, valid_actions
from dntsync.env.core import DntEnv, SlotState, StepResult
from dntsync.env.policies import MyopicOracle, NearestBS, RandomValid, baseline_policies
from dntsync.env.predictors import Drift, HoldLast, Predictor, physics_predictor
from dntsync.env.step import Outcome, resolve

__all__ = [
    "DntEnv", "Drift", "HoldLast", "MyopicOracle", "NearestBS", "Outcome", "Predictor",
    "RandomValid", "SlotState", "StepResult", "action_mask", "baseline_policies", "decode",
    "encode", "is_valid", "physics_predictor", "random_valid", "resolve", "valid_actions",
]
