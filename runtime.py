"""What every script needs to run safely: one-line errors, signals, checkpoints that resume, memory checks;
none of it is part of an algorithm.

Shared by mir3_maddpg.py, mir3_qmix.py, mir3_mappo.py, ibal_qmix.py and attack_worstcase.py.
"""

import ctypes
import json
import math
import os
import signal
import sys
from typing import Optional

import numpy as np
import torch
import tyro


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def keep_freed_memory() -> None:
    """Stop glibc from handing the memory of freed tensors back to the OS after every update.

    Each update allocates and frees the same few-MiB tensors. By default glibc serves them with mmap
    or trims them off the heap when they are freed, so the next update page-faults them in again,
    which took a third of the training time of mir3_maddpg on CPU. A no-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: blocks below 64 MiB come from the heap
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: give heap back to the OS only above 256 MiB free
    except (OSError, AttributeError):
        pass


def check_fits(nbytes: int, what: str, store: str, hint: str, device) -> None:
    """Refuse (one line, exit 2) a ``store`` of ``nbytes`` bytes that cannot fit where it lives: the GPU's memory
    on CUDA, else the machine's RAM. One clear line instead of an allocation failure deep inside torch, or swapping."""
    try:
        limit, where = (torch.cuda.get_device_properties(device).total_memory, "the GPU's memory") \
            if device.type == "cuda" else (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the machine's RAM")
    except (ValueError, OSError, AttributeError):  # the system does not say: no check
        return

    def size(b):
        return f"{b / 2**40:.3g} TiB" if b >= 2**40 else f"{b / 2**30:.3g} GiB"

    if nbytes > limit:
        fail(f"{what} would need about {size(nbytes)} for {store} (limit {size(limit)}, {where}); {hint}")


def check_writable(directory: str, what: str = "the run directory") -> None:
    """Create ``directory`` and write and remove a probe file in it, so that a long run cannot end
    in an unwritable report or checkpoint."""
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as e:
        fail(f"{what} {directory!r} is not writable ({e.strerror or first_line(e)})")


def env_kwargs_of(args, defaults: Optional[dict] = None, example: str = '{"world_size": 100}') -> dict:
    """The env constructor options: ``defaults``, the JSON object of --env-kwargs, --n-agents / --episode-limit.
    ``example`` is the JSON object the error message shows."""
    flags = {k: getattr(args, k) for k in ("n_agents", "episode_limit") if getattr(args, k) is not None}
    extra = {}
    if args.env_kwargs is not None:
        try:
            extra = json.loads(args.env_kwargs)
        except ValueError as e:
            fail(f"--env-kwargs must be a JSON object such as '{example}': {e}")
        if not isinstance(extra, dict):
            fail(f"--env-kwargs must be a JSON object such as '{example}', got {args.env_kwargs!r}")
        for key, flag in {**{k: "--" + k.replace("_", "-") for k in flags}, "num_envs": "--num-envs",
                          "seed": "--seed", "device": "--cuda"}.items():
            if key in extra:
                fail(f"--env-kwargs sets {key!r}, which {flag} also sets: give it once")
    return {**(defaults or {}), **extra, **flags}


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals() -> None:
    """From now on Ctrl-C, SIGTERM and SIGUSR1 do nothing: nothing may interrupt the checkpoint save."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_on_signals() -> None:
    """SIGTERM and SIGUSR1 (what cluster schedulers send before preemption) stop training as Ctrl-C does:
    KeyboardInterrupt, whose handler saves the checkpoint. The first one disarms all three."""

    def stop(signum, frame):
        ignore_stop_signals()
        raise KeyboardInterrupt(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)


def action_space_dict(space) -> dict:
    if space.__class__.__name__ == "Discrete":
        return {"type": "discrete", "n": int(space.n)}
    return {"type": "box", "shape": list(space.shape), "low": space.low.tolist(), "high": space.high.tolist()}


def read_resume_checkpoint(path: str, script: str, continuation_keys: tuple, model_flags: tuple) -> dict:
    """The checkpoint of --resume, or one line and exit 2 if it cannot continue a run of ``script``: it must hold
    a "continuation" with ``continuation_keys`` and "args" with ``model_flags``."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing file, pickle, zip or weights-only errors
        fail(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {first_line(e)})")
    found = ckpt.get("script") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != script:
        fail(f"--resume {path} is not a {script} checkpoint (script: {found!r}): resume it with its own script")
    continuation = ckpt.get("continuation")
    if not isinstance(continuation, dict) or any(k not in continuation for k in continuation_keys) \
            or not isinstance(ckpt.get("args"), dict) or any(k not in ckpt["args"] for k in model_flags):
        fail(f"--resume {path} holds no continuation state (saved before --resume existed?): it still loads for "
             f"evaluation and attacks, but cannot be resumed")
    return ckpt


def resumed_args(path: str, ckpt: dict, args_class, model_flags: tuple):
    """The flags (an ``args_class``) of a resumed run: the checkpoint's, overridden by those on the command line,
    except the ones that define the model and the env (``model_flags``): those must agree with the checkpoint."""
    saved = {k: v for k, v in ckpt["args"].items() if k in args_class.__dataclass_fields__}
    args = tyro.cli(args_class, default=args_class(**{**saved, "resume": path}))  # parse again, with saved defaults
    for name in model_flags:
        if getattr(args, name) != saved[name]:
            fail(f"--resume {path}: --{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's "
                 f"{saved[name]} (flags that define the model or the env come from the checkpoint)")
    if ckpt["global_step"] >= args.total_timesteps:
        fail(f"--resume {path} is already at global_step={ckpt['global_step']} >= --total-timesteps "
             f"{args.total_timesteps}: raise --total-timesteps to continue it")
    return args


def stop_if_not_finite(global_step: int, losses: dict, watched: Optional[dict] = None) -> None:
    """Stop the run (exit 1) with one line if a logged loss, or a module's parameter or a tensor in ``watched``
    ({"actor weights": actor, ...}), is NaN or inf. The scripts check their latest losses after training steps,
    and the weights too at log time and before every save, so a diverged run never overwrites a good checkpoint."""

    def finite(x):
        return all(bool(torch.isfinite(p).all()) for p in (x.parameters() if isinstance(x, torch.nn.Module) else [x]))

    bad = [f"{k} = {v}" for k, v in losses.items() if not math.isfinite(v)]
    bad += [label for label, x in (watched or {}).items() if not finite(x)]
    if bad:
        print(f"error: training diverged at global_step={global_step}: {', '.join(bad)} not finite; stopped "
              f"without saving (an earlier checkpoint stays as it was)", file=sys.stderr, flush=True)
        sys.exit(1)


def save_checkpoint(path: str, ckpt: dict) -> str:
    """Write ``ckpt`` to ``path`` atomically (a crash never leaves a half-written checkpoint); on an OS error
    (a full disk) say why in one line, remove the temporary file and exit 1."""
    try:
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        print(f"error: cannot save the checkpoint {path} ({e.strerror or e})", file=sys.stderr, flush=True)
        sys.exit(1)
    return path


def rng_state(device) -> dict:
    """The global RNG states: torch CPU, numpy, and CUDA when the run uses it (tensors and numbers only,
    so that the checkpoint still loads with weights_only=True)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)}}


def set_rng_state(state: dict, device) -> None:
    """Restore ``rng_state``; the CUDA generator only where both runs use CUDA."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(("MT19937", saved["key"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                         saved["gauss"]))
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def episodes_started(env) -> torch.Tensor:
    """[E] how many episodes each env has played a step of. Our own envs draw an episode's randomness from its
    number, so a resumed run sets ``episode_count`` to this before ``reset()``: it plays new episodes, and
    where every episode had just ended the very ones the uninterrupted run would have played."""
    return (env.episode_count - (env.t == 0).long()).cpu()


def restore_episode_counts(counts: dict, **batch_envs) -> None:
    """Set each env's ``episode_count`` to what ``episodes_started`` saved under its name (``env=..., eval_env=...``);
    envs beyond the saved ones start at episode 1."""
    for name, batch_env in batch_envs.items():
        started = counts[name]
        n = min(batch_env.num_envs, len(started))
        batch_env.episode_count[:n] = started[:n].to(batch_env.device)
