"""How close a trained quadrotor team flies to its goals (README, "MIR3-MAPPO on quads-same-goal").

    python benchmark/quads_eval.py runs/<run>/mir3_mappo.pt [more checkpoints ...] [--random]

Loads each checkpoint with its script's ``load_policy``, plays one deterministic episode in each of
``--episodes`` envs seeded like the scripts' in-run evaluation (``seed + 100000`` with the
checkpoint's seed, so the episodes are the ones its eval/ numbers come from) and prints per policy:
the mean distance to the goal after the first step, over the last 10% of the steps and at the end
(median), the share of drones within 0.5 m / 1 m of their goal and on the floor at the end, and the
env's success rate. ``--random`` adds uniform random actions on the same episodes as a reference.
"""

import argparse
import importlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import envs  # noqa: E402


@torch.no_grad()
def play(env, act) -> dict:
    """One episode per env with ``act(obs, avail) -> actions``; distances from the env's ``info``."""
    obs, _, avail = env.reset()
    dists, floor, success = [], None, None
    for _ in range(env.episode_limit):
        obs, _, avail, _, terminated, truncated, info = env.step(act(obs, avail))
        dists.append(info["dist"])
        floor, success = info["on_floor"], info["success"]
        if bool((terminated | truncated).all()):
            break
    d = torch.stack(dists)  # [T, E, N]
    tail = max(1, len(dists) // 10)
    return {"dist step 1": d[0].mean().item(), "dist last 10%": d[-tail:].mean().item(),
            "median final": d[-1].median().item(), "< 0.5 m": (d[-1] < 0.5).float().mean().item(),
            "< 1 m": (d[-1] < 1.0).float().mean().item(), "on floor": floor.float().mean().item(),
            "success": success.float().mean().item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="checkpoints of a script with load_policy (quads-* env)")
    parser.add_argument("--episodes", type=int, default=32, help="evaluation episodes (parallel envs)")
    parser.add_argument("--random", action="store_true", help="also play uniform random actions")
    args = parser.parse_args()
    if not args.checkpoints:
        parser.error("give at least one checkpoint")
    rows = []
    for path in args.checkpoints:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            policy = importlib.import_module(ckpt["script"]).load_policy(ckpt)
        except Exception as e:  # any unreadable file or unknown script: one line, exit 2
            sys.exit(f"error: cannot load {path}: {type(e).__name__}: {e}")
        if not ckpt["env_id"].startswith("quads"):
            sys.exit(f"error: {path} was trained on {ckpt['env_id']}, not a quads-* env")
        env = envs.make(ckpt["env_id"], num_envs=args.episodes, seed=ckpt["args"]["seed"] + 100_000, **ckpt["env_kwargs"])
        hidden = [policy.init_hidden(args.episodes)]

        def act(obs, avail):
            actions, hidden[0] = policy.act(obs, avail, hidden[0])
            return actions

        rows.append((path, play(env, act)))
        if args.random:
            gen = torch.Generator().manual_seed(0)
            space = env.action_space
            if env.is_discrete:
                def act(obs, avail):
                    return torch.multinomial(avail.flatten(0, 1).float(), 1, generator=gen).view(avail.shape[:2])
            else:
                low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)

                def act(obs, avail):
                    return low + (high - low) * torch.rand(obs.shape[0], obs.shape[1], *low.shape, generator=gen)
            rows.append((f"random actions ({ckpt['env_id']})", play(env, act)))
    keys = list(rows[0][1])
    print(f"{'policy':60s} " + " ".join(f"{k:>13s}" for k in keys))
    for name, r in rows:
        print(f"{name[-60:]:60s} " + " ".join(f"{r[k]:13.2f}" for k in keys))
    print("dist = distance to the goal in m (mean over drones and episodes; median at the end); "
          "shares are of drones at the last step; success as the env defines it")


if __name__ == "__main__":
    main()
