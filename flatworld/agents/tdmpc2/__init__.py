"""TD-MPC2: an implicit world model planned with MPPI, with a drop-in world-model optimizer."""

from flatworld.agents.tdmpc2.agent import TDMPC2Agent, discount_for, make
from flatworld.agents.tdmpc2.config import MODEL_SIZES, TDMPC2Config
from flatworld.agents.tdmpc2.planner import MPPIPlanner
from flatworld.agents.tdmpc2.world_model import WorldModel

__all__ = [
    "MODEL_SIZES",
    "MPPIPlanner",
    "TDMPC2Agent",
    "TDMPC2Config",
    "WorldModel",
    "discount_for",
    "make",
]
