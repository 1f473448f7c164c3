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
import time
import warnings
from typing import Callable, Optional

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

import envs


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def load_checkpoint(path: str):
    """torch.load(weights_only=True) on the CPU, without torch's warnings about a file that is not a checkpoint
    (random bytes can look like a pickle of an unknown protocol): the caller reports its failure in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


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
        ckpt = load_checkpoint(path)
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


def resumed_args(path: str, ckpt: dict, args_class, model_flags: tuple, renamed: Optional[dict] = None):
    """The flags (an ``args_class``) of a resumed run: the checkpoint's, overridden by those on the command line,
    except the ones that define the model and the env (``model_flags``): those must agree with the checkpoint.
    ``renamed`` ({old: new}) reads a flag saved under its old name, as the new one."""
    for old, new in (renamed or {}).items():
        if old in ckpt["args"]:  # saved before the flag was renamed
            ckpt["args"][new] = ckpt["args"].pop(old)
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


# ---------------------------------------------------------------------------------------------
# The run plumbing of the training scripts, in the order they call it: before the training loop
# (parse_run, check_flags, make_envs, check_same_env, open_run_dir, restore) and after it (stopped).
# ---------------------------------------------------------------------------------------------
def parse_run(args_class, script: str, continuation_keys: tuple, model_flags: tuple,
              renamed: Optional[dict] = None) -> tuple:
    """Parse the command line into an ``args_class``; with --resume, read the checkpoint (``read_resume_checkpoint``)
    and take its flags (``resumed_args``, with ``renamed``). Returns (args, the --resume checkpoint or None, run_name,
    run_dir): a fresh run writes to runs/{env_id}__{exp_name}__{seed}__{time}, a resumed one into its checkpoint's
    directory (and overwrites the checkpoint). Also ``keep_freed_memory``."""
    args = tyro.cli(args_class)
    resumed = None
    if args.resume is not None:
        resumed = read_resume_checkpoint(args.resume, script, continuation_keys, model_flags)
        args = resumed_args(args.resume, resumed, args_class, model_flags, renamed)
    keep_freed_memory()
    if resumed is None:
        run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        return args, None, run_name, f"runs/{run_name}"
    run_dir = os.path.dirname(args.resume) or "."
    return args, resumed, os.path.basename(os.path.abspath(run_dir)), run_dir


# what a numeric flag must do (the words of the error message) -> its test; a rule may add a reason: "be >= 1 (why)"
FLAG_TESTS = {"be >= 1": lambda v: v >= 1, "be >= 0": lambda v: v >= 0, "be > 0": lambda v: v > 0,
              "lie in [0, 1]": lambda v: 0 <= v <= 1, "lie in (0, 1]": lambda v: 0 < v <= 1,
              "lie in [0, 1)": lambda v: 0 <= v < 1}


def check_flags(args, rules: dict) -> None:
    """Refuse at start-up, one line and exit 2, an --exp-name that cannot name files under runs/, and a numeric flag
    that breaks its rule: ``rules`` maps a flag to a key of FLAG_TESTS, maybe with a reason ("be >= 1 (why)"), or
    to None (only finite). Checked in the order of ``rules``; NaN and ±inf never pass; None values (a default that
    depends on the env) are skipped."""
    if not 1 <= len(args.exp_name) <= 100 or "/" in args.exp_name or ".." in args.exp_name:
        fail(f"--exp-name must be 1-100 characters without '/' or '..' (it names files under runs/), got {args.exp_name!r}")
    for name, rule in rules.items():
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if value is None:
            continue
        if not math.isfinite(value):  # NaN fails every comparison: nan > 0 is False, so λ = nan would be silently off
            fail(f"{flag} must be a finite number, got {value}")
        if rule is not None and not next(test for words, test in FLAG_TESTS.items() if rule.startswith(words))(value):
            fail(f"{flag} must {rule}, got {value}")


def make_envs(args, env_kwargs: dict, device, box_error: Optional[str] = None) -> tuple:
    """The training envs (--num-envs, --seed) and the evaluation envs (--eval-episodes, seeds of their own).
    One line and exit 2 for an unknown env or option, or with the message ``box_error`` for Box actions (checked
    before the evaluation envs are built)."""
    try:
        env = envs.make(args.env_id, num_envs=args.num_envs, seed=args.seed, device=device, **env_kwargs)
        if box_error is not None and not env.is_discrete:
            fail(box_error)
        eval_env = envs.make(args.env_id, num_envs=args.eval_episodes, seed=args.seed + 100_000, device=device,
                             **env_kwargs)
    except (ValueError, ImportError) as e:
        fail(str(e).splitlines()[0] if isinstance(e, ValueError) else str(e))
    return env, eval_env


def check_same_env(args, resumed: Optional[dict], env) -> None:
    """With --resume, one line and exit 2 if ``env`` no longer matches the checkpoint (the env's code changed since)."""
    if resumed is None:
        return
    for key, value in {"n_agents": env.n_agents, "obs_dim": env.obs_dim, "state_dim": env.state_dim,
                       "action_space": action_space_dict(env.action_space)}.items():
        if resumed[key] != value:
            fail(f"--resume {args.resume}: {args.env_id} now has {key} {value}, the checkpoint {resumed[key]}")


def open_run_dir(args, run_dir: str):
    """Remove ``{exp_name}.pt.tmp`` (left by a save that was killed: never a checkpoint), refuse (one line, exit 2)
    a run directory that cannot be written, and return its TensorBoard writer with the flags as text."""
    if os.path.exists(f"{run_dir}/{args.exp_name}.pt.tmp"):
        os.remove(f"{run_dir}/{args.exp_name}.pt.tmp")
    check_writable(run_dir)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer


def restore(args, resumed: dict, models: dict, targets: dict, optimizers: dict, counters: tuple,
            optional: Optional[dict] = None, extra: Optional[Callable[[dict], dict]] = None, **batch_envs) -> dict:
    """Load the --resume checkpoint into the nets (``models``, ``targets``: {name: module}), the optimisers and the
    envs' episode counters (``env=..., eval_env=...``). Every script keeps this run's learning rates (the flags,
    which the optimisers were built with) over the checkpoint's. ``optional`` ({model: its optimisers}): models a run
    may have that the checkpoint lacks (a run that turns λ or the attacks on), trained from scratch then.
    ``extra(continuation)`` loads a script's own state and returns what to add to the answer. Returns
    global_step, recent_returns and the ``counters``; one line and exit 2 if the checkpoint is unusable."""
    try:
        continuation = resumed["continuation"]
        fresh = {n for model, opts in (optional or {}).items() if model not in resumed["models"] for n in (model, *opts)}
        for name, net in models.items():
            if name not in fresh:
                net.load_state_dict(resumed["models"][name])
        for name, net in targets.items():
            net.load_state_dict(continuation["targets"][name])
        for name, opt in optimizers.items():
            if name not in fresh:
                lr = opt.param_groups[0]["lr"]
                opt.load_state_dict(continuation["optimizers"][name])
                opt.param_groups[0]["lr"] = lr
        loaded = extra(continuation) if extra is not None else {}
        restore_episode_counts(continuation["episode_counts"], **batch_envs)
        return {"global_step": resumed["global_step"], "recent_returns": list(continuation["recent_returns"]),
                **{k: continuation["counters"][k] for k in counters}, **loaded}
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        fail(f"--resume {args.resume}: unusable checkpoint ({type(e).__name__}: {first_line(e)})")


def stopped(e: KeyboardInterrupt, save: Optional[Callable[[], str]]) -> None:
    """After Ctrl-C, SIGTERM or SIGUSR1 (``e``, raised by ``stop_on_signals``' handler): ignore further stop signals,
    ``save()`` the checkpoint unless ``save`` is None (--no-save-model), and exit with the shell's code for death by
    that signal, 128 + its number (Ctrl-C: 130)."""
    ignore_stop_signals()
    signum = int(e.args[0]) if e.args else int(signal.SIGINT)
    if save is not None:
        print(f"interrupted by {signal.Signals(signum).name}: saving, please wait", flush=True)
        print(f"checkpoint saved to {save()}", flush=True)
    sys.exit(128 + signum)
