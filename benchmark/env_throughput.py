"""Agent-steps per second of every env id at several batch sizes, random actions.

    python benchmark/env_throughput.py                       # the table of the envs issue
    python benchmark/env_throughput.py --ids rendezvous --num-envs 1024 --seconds 5

One agent-step is one agent acting once; an env step of rendezvous with 10 agents is 10
agent-steps. Actions are drawn before timing starts, so only the env is measured. The authors'
rendezvous env steps about 1,100 times a second with 10 agents (11,000 agent-steps/s) on a
2-core CPU like ours; the last column is our speed-up over that figure.

smax:<map> rows exclude JAX's compilation (15-30 s per map and batch size, done in the warm-up).
For one core, as the figures in the README: OMP_NUM_THREADS=1 taskset -c 0 python benchmark/env_throughput.py
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402

AUTHORS_AGENT_STEPS = 11_000
DEFAULT_IDS = {
    "rendezvous": dict(n_agents=10),
    "rendezvous-discrete": dict(n_agents=10),
    "quads-same-goal": dict(n_agents=8),
    "quads-swarm-vs-swarm": dict(n_agents=8),
    "quads-same-goal-discrete": dict(n_agents=8),
    "quads-swarm-vs-swarm-discrete": dict(n_agents=8),
    "lbf:Foraging-8x8-2p-2f-coop-v3": dict(),
    # JaxMARL's SMAX (pip install -r requirements-smax.txt; skipped without it)
    "smax:3m": dict(),
    "smax:4m_vs_3m": dict(),
    "smax:10m_vs_8m": dict(),
}
# LBF steps E gymnasium envs in a Python loop: 1024 copies say nothing new
MAX_ENVS = {"lbf:Foraging-8x8-2p-2f-coop-v3": 64}


def measure(env_id, num_envs, seconds, device, **kwargs):
    env = envs.make(env_id, num_envs=num_envs, seed=0, device=device, **kwargs)
    env.reset()
    gen = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(16):
        if env.is_discrete:
            pool.append(torch.randint(0, env.n_actions, (num_envs, env.n_agents), generator=gen).to(device))
        else:
            pool.append((torch.rand(num_envs, env.n_agents, env.n_actions, generator=gen) * 2 - 1).to(device))
    for a in pool[:3]:  # warm-up
        env.step(a)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.step(pool[steps % len(pool)])
        steps += 1
    if device != "cpu":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    env.close()
    return steps * num_envs * env.n_agents / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", nargs="+", default=list(DEFAULT_IDS))
    parser.add_argument("--num-envs", nargs="+", type=int, default=[1, 64, 1024])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    header = f"{'env id':34s} {'agents':>6s}" + "".join(f" {f'E={e}':>12s}" for e in args.num_envs)
    print(header + f" {'x authors':>10s}")
    print("-" * len(header) + "-" * 11)
    for env_id in args.ids:
        kwargs = DEFAULT_IDS.get(env_id, {})
        try:
            n = envs.make(env_id, num_envs=1, **kwargs).n_agents
        except ImportError as e:
            print(f"{env_id:34s} skipped: {str(e).splitlines()[0]}")
            continue
        row = []
        for e in args.num_envs:
            row.append(measure(env_id, e, args.seconds, args.device, **kwargs) if e <= MAX_ENVS.get(env_id, e) else None)
        cells = "".join(f" {r:12,.0f}" if r is not None else f" {'-':>12s}" for r in row)
        best = max(r for r in row if r is not None)
        print(f"{env_id:34s} {n:6d}{cells} {best / AUTHORS_AGENT_STEPS:9.0f}x")
    print("agent-steps per second, random actions; 'x authors' = best column / 11,000")


if __name__ == "__main__":
    main()
