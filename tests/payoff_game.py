"""A two-agent game with a known worst case for each adversary objective, and a runner for the repo's scripts on it.

    python tests/payoff_game.py mir3_mappo.py --env-id payoff ...   # any script, with the env id "payoff" registered
"""

import runpy
import sys

import gymnasium as gym
import torch

import envs
from envs.core import BatchedEnv


class PayoffGame(BatchedEnv):
    """2 agents, one constant observation, 10 steps, per-agent rewards. Agent 0's action 1 costs agent 0 2.0 and gives
    agent 1 0.5 (team reward, their mean: -0.75); its action 0 costs agent 1 0.5 (team: -0.25). Agent 1's action does
    nothing. An adversary on agent 0 that minimises the team reward takes action 1 (team return -7.5); one that
    minimises agent 1's takes action 0 (team return -2.5)."""

    def __init__(self, num_envs: int = 1, seed: int = 0, device="cpu"):
        self.n_agents, self.obs_dim, self.state_dim, self.episode_limit = 2, 1, 1, 10
        self.action_space = gym.spaces.Discrete(2)
        super().__init__(num_envs, seed, device)

    def _reset_envs(self, mask):
        pass

    def _observe(self):
        E, dev = self.num_envs, self.device
        return (torch.ones(E, 2, 1, device=dev), torch.ones(E, 1, device=dev),
                torch.ones(E, 2, 2, dtype=torch.bool, device=dev))

    def _step(self, actions):
        hurts_itself = actions[:, :1] == 1
        r = torch.where(hurts_itself, torch.tensor([-2.0, 0.5]), torch.tensor([0.0, -0.5])).to(self.device)
        never = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return r.mean(-1), never, never, {"agent_rewards": r}


if __name__ == "__main__":
    envs.register("payoff", PayoffGame)
    sys.argv = sys.argv[1:]  # the script sees its own path as argv[0], as `python script.py` gives it
    runpy.run_path(sys.argv[0], run_name="__main__")
