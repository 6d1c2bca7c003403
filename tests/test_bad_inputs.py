"""Bad inputs, table-driven: every row of `ROWS` is `Row(id, call, outcome, fragment)`. `call(ctx)` does one thing a user
can do (build a config, call a library function, run `sit_workbench.cli.main([...])`, resume a run); `outcome` says
what must happen:

* "user_error": a `UserError` whose message holds `fragment`;
* "checkpoint_error": a `CheckpointError` (a `UserError` about a damaged file) whose message holds `fragment`;
* "exit_2": `cli.main` exits with status 2 and `fragment` in stderr (rows made by `cli_row`);
* "ok": returns; `fragment` (if any) is in `str(result)`;
* "warn": returns, with `fragment` in what it printed to stderr.

Append rows to `ROWS` (at module level) for more areas; `ctx` gives a fresh `tmp` folder, `ctx.checkpoint()` (a copy of
a checkpoint folder written by `write_checkpoint`, with REPA's projector files) and `ctx.run()` (a copy of a tiny
digits run with checkpoints at steps 2 and 4)."""
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Callable

import pytest
import torch

from sit_workbench import errors as E
from sit_workbench.checkpoint import (CHECKPOINT_FILES, COMPLETE, PROJECTOR_FILES, checkpoint_problem,
                                      latest_checkpoint, list_checkpoints, verify_checkpoint, write_checkpoint)
from sit_workbench.config import NUMBER_RANGES, SECTIONS, _split_optional, digits_config, save_config
from sit_workbench.train import Trainer, read_log, train

TINY = dict(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, logging_steps=1, save_total_limit=None,
            per_device_train_batch_size=16)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclasses.dataclass
class Row:
    id: str
    call: Callable
    outcome: str
    fragment: str | None = None


ROWS: list[Row] = []


def row(id, call, outcome, fragment=None): ROWS.append(Row(id, call, outcome, fragment))


def cli_row(id, argv, fragment):
    "A row running `sit-workbench ARGV` in process: exit status 2 and `fragment` in stderr. `argv(ctx)` or a list."
    def call(ctx):
        from sit_workbench.cli import main
        return main(argv(ctx) if callable(argv) else argv)
    row(id, call, "exit_2", fragment)


# --- 1. every numeric config key: NaN, inf, out of range, wrong type ---------------------------------------------
def _numeric_keys():
    for where, keys in NUMBER_RANGES.items():
        hints = typing.get_type_hints(SECTIONS[where])
        for key, bounds in keys.items():
            yield where, key, _split_optional(hints[key])[0], bounds


for where, key, base, bounds in _numeric_keys():
    path = f"{where}.{key}" if where else key
    make = lambda value, key=key: (lambda ctx: digits_config(**{key: value}))
    if base is float:
        for name, v in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
            row(f"config-{key}-{name}", make(v), "user_error", f"{path}: expected a finite number")
        row(f"config-{key}-text", make("fast"), "user_error", f"{path}: expected float")
    else:
        row(f"config-{key}-float", make(1.5), "user_error", f"{path}: expected int")
        row(f"config-{key}-bool", make(True), "user_error", f"{path}: expected int")
    if "lo" in bounds:
        lo = bounds["lo"]
        below = lo if bounds.get("lo_open") else lo - (1 if base is int else 0.5)
        row(f"config-{key}-below", make(below), "user_error", f"{path} must be")
    if "hi" in bounds:
        row(f"config-{key}-above", make(bounds["hi"] + (0 if bounds.get("hi_open") else 1)), "user_error", f"{path} must be")

for key, value in [("ema_decay", 0.0), ("weight_decay", 0.0), ("warmup_steps", 0), ("dataloader_num_workers", 0),
                   ("seed", 2**63 - 1), ("class_dropout_prob", 0.0), ("cfg_scale", 1.0), ("max_grad_norm", None),
                   ("save_total_limit", None), ("train_eps", 0.0), ("repa_lambda", 1e-9), ("learning_rate", "1e-4")]:
    kw = {key: value, **({"cfg_scale": 1.0} if key == "class_dropout_prob" else {})}
    row(f"config-{key}-ok-{value}", lambda ctx, kw=kw: digits_config(**kw), "ok")

row("config-every-error-is-a-user-error", lambda ctx: digits_config(depth="four"), "user_error", "model_config.depth")
row("config-unknown-key", lambda ctx: digits_config(dept=2), "user_error", "did you mean 'depth'")


def _numeric_keys_have_ranges(ctx):
    numeric = {(w, f.name) for w, cls in SECTIONS.items() for f in dataclasses.fields(cls)
               if _split_optional(typing.get_type_hints(cls)[f.name])[0] in (int, float)}
    missing = numeric - {(w, k) for w, keys in NUMBER_RANGES.items() for k in keys}
    assert not missing, missing
    return len(numeric)

row("config-every-numeric-key-has-a-range", _numeric_keys_have_ranges, "ok")

# the same through the command line: `train --set KEY=VALUE` exits with status 2 naming the key
for item, fragment in [("learning_rate=nan", "learning_rate: expected a finite number"),
                       ("learning_rate=.inf", "learning_rate: expected a finite number"),
                       ("learning_rate=-1e-3", "learning_rate must be positive"),
                       ("per_device_train_batch_size=0", "per_device_train_batch_size must be positive"),
                       ("ema_decay=1.5", "ema_decay must be in [0, 1)"),
                       ("model_config.class_dropout_prob=1.0", "class_dropout_prob must be in [0, 1)"),
                       ("model_config.mlp_ratio=nan", "model_config.mlp_ratio: expected a finite number"),
                       ("seed=-3", "seed must be in [0, "),
                       ("repa_projector_dim=0", "repa_projector_dim must be positive"),
                       ("max_steps=-7", "max_steps must be >= -1")]:
    cli_row(f"cli-train-set-{item}", lambda ctx, item=item: ["train", "--set", f"output_dir={ctx.tmp / 'run'}", item],
            fragment)


# --- 2. check_number and the argparse types --------------------------------------------------------------------
for args, kw, fragment in [(("lr", float("nan")), {}, "lr: expected a finite number"),
                           (("lr", -1.0), dict(lo=0, lo_open=True), "lr must be positive, got -1.0"),
                           (("p", 1.0), dict(lo=0, hi=1, hi_open=True), "p must be in [0, 1), got 1.0"),
                           (("n", 2.0), dict(integer=True), "n: expected an integer"),
                           (("n", True), dict(integer=True), "n: expected an integer, got True (bool)"),
                           (("x", "3"), {}, "x: expected a number, got '3' (str)"),
                           (("x", None), {}, "x: expected a number, got None"),
                           (("k", 0), dict(lo=1, optional=True), "k must be null or >= 1, got 0")]:
    row(f"check_number-{args[0]}-{args[1]!r}-{sorted(kw)}", lambda ctx, a=args, k=kw: E.check_number(*a, **k),
        "user_error", fragment)
row("check_number-ok-none", lambda ctx: E.check_number("k", None, lo=1, optional=True), "ok", "None")
row("check_number-ok-bound", lambda ctx: E.check_number("p", 0, lo=0, hi=1), "ok", "0")

import argparse  # noqa: E402


def _parse(type_, text):
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--v", type=type_)
    try: return p.parse_args(["--v", text]).v
    except SystemExit as e:
        raise E.UserError(f"exit {e.code}") from None


for name, text, fragment in [("finite_float", "nan", "argument --v: expected a finite number"),
                             ("finite_float", "inf", "expected a finite number"),
                             ("finite_float", "abc", "expected a number, got 'abc'"),
                             ("positive_float", "0", "must be positive, got 0.0"),
                             ("nonnegative_float", "-0.5", "must be >= 0"),
                             ("probability", "1.5", "must be in [0, 1], got 1.5"),
                             ("probability", "nan", "expected a finite number"),
                             ("positive_int", "0", "must be >= 1, got 0"),
                             ("positive_int", "2.5", "expected an integer, got '2.5'"),
                             ("nonnegative_int", "-1", "must be >= 0, got -1")]:
    row(f"argtype-{name}-{text}", lambda ctx, n=name, t=text: _parse(getattr(E, n), t), "warn", fragment)
for name, text, want in [("finite_float", "-2.5", "-2.5"), ("positive_int", "7", "7"), ("probability", "1", "1.0"),
                         ("nonnegative_int", "0", "0")]:
    row(f"argtype-{name}-ok-{text}", lambda ctx, n=name, t=text: _parse(getattr(E, n), t), "ok", want)


# --- 3. solvers.optimize_schedule ------------------------------------------------------------------------------
def _schedule(**kw):
    from sit_workbench.solvers import optimize_schedule
    from sit_workbench.transport import create_transport
    path = create_transport("Linear", "velocity").path_sampler
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    args = dict(denoise=lambda x, t: x * t, x=x, reference=torch.zeros(4, 2), path=path, t0=0.0, t1=1.0,
                num_steps=4, iters=2)
    return optimize_schedule(**{**args, **kw})[1]


for kw, fragment in [(dict(num_steps=0), "num_steps must be >= 3, got 0"),
                     (dict(num_steps=-2), "num_steps must be >= 3"),
                     (dict(num_steps=2), "num_steps must be >= 3, got 2"),
                     (dict(num_steps=4.0), "num_steps: expected an integer"),
                     (dict(reference=torch.zeros(3, 2)), "reference must be a tensor shaped like the noise x (4, 2)"),
                     (dict(reference=[[0.0]]), "got list"),
                     (dict(init=()), "init is an empty tuple"),
                     (dict(init=[]), "init is an empty tuple"),
                     (dict(method="euler"), "method 'euler' is not a multistep solver"),
                     (dict(lr=0.0), "lr must be positive"),
                     (dict(lr=float("nan")), "lr: expected a finite number"),
                     (dict(iters=-1), "iters must be >= 0"),
                     (dict(t0=0.5, t1=0.5), "t0 and t1 are both 0.5"),
                     (dict(t1=float("inf")), "t1: expected a finite number")]:
    row(f"optimize_schedule-{sorted(kw)[0]}-{str(list(kw.values())[0])[:20]}", lambda ctx, kw=kw: _schedule(**kw),
        "user_error", fragment)
row("optimize_schedule-ok", lambda ctx: _schedule(), "ok", "rms")
row("optimize_schedule-ok-two-inits", lambda ctx: _schedule(init=("uniform", "logsnr")), "ok", "'init'")


# --- 4. damaged checkpoint files, each kind ---------------------------------------------------------------------
def _flip(f: Path, at=None):
    "Flip one bit (in the middle of the file by default): same size, other checksum."
    raw = bytearray(f.read_bytes()); raw[len(raw) // 2 if at is None else at] ^= 0x01; f.write_bytes(bytes(raw))


def _truncate(f: Path): f.write_bytes(f.read_bytes()[:-7])


ALL_FILES = CHECKPOINT_FILES + PROJECTOR_FILES
for name in ALL_FILES:
    def flipped(ctx, name=name):
        ck = ctx.checkpoint(); _flip(ck / name)
        assert checkpoint_problem(ck) is None   # the size is unchanged: only the checksum tells
        return verify_checkpoint(ck)
    row(f"checkpoint-{name}-flipped", flipped, "checkpoint_error", f"{name} is damaged: its sha256")
    def truncated(ctx, name=name):
        ck = ctx.checkpoint(); _truncate(ck / name)
        return verify_checkpoint(ck)
    row(f"checkpoint-{name}-truncated", truncated, "checkpoint_error", f"{name} has ")
    def missing(ctx, name=name):
        ck = ctx.checkpoint(); (ck / name).unlink()
        return verify_checkpoint(ck)
    row(f"checkpoint-{name}-missing", missing, "checkpoint_error", f"{name} is missing")
    def listed(ctx, name=name):
        ck = ctx.checkpoint(); _flip(ck / name)
        return [p.name for p in list_checkpoints(ck.parent)], [p.name for p in list_checkpoints(ck.parent, verify=True)]
    row(f"list_checkpoints-verify-skips-{name}", listed, "ok", "(['checkpoint-7'], [])")


def _manifest_edit(edit):
    def call(ctx):
        ck = ctx.checkpoint(); m = ck / COMPLETE
        m.write_text(edit(m.read_text()))
        return verify_checkpoint(ck)
    return call

row("checkpoint-complete.json-garbage", _manifest_edit(lambda t: t[:10]), "checkpoint_error", "complete.json is damaged")
row("checkpoint-complete.json-no-files", _manifest_edit(lambda t: "{}"), "checkpoint_error", "complete.json is damaged")
row("checkpoint-complete.json-sizes-only-still-loads",
    _manifest_edit(lambda t: json.dumps({"files": {k: v["size"] for k, v in json.loads(t)["files"].items()}})),
    "ok", "checkpoint-7")
row("checkpoint-complete.json-wrong-size", _manifest_edit(lambda t: t.replace('"size": ', '"size": 1', 1)),
    "checkpoint_error", "were written")
row("checkpoint-no-manifest-still-loads", lambda ctx: verify_checkpoint(_unlinked(ctx.checkpoint(), COMPLETE)), "ok")
row("checkpoint-intact", lambda ctx: verify_checkpoint(ctx.checkpoint()), "ok", "checkpoint-7")
row("checkpoint-not-a-folder", lambda ctx: verify_checkpoint(ctx.tmp / "nothing"), "checkpoint_error", "no such folder")
row("latest_checkpoint-verify", lambda ctx: latest_checkpoint(_flipped(ctx.run(), "checkpoint-4/ema.pt"), verify=True),
    "ok", "checkpoint-2")


def _unlinked(ck, name):
    (ck / name).unlink(); return ck


def _flipped(run, rel):
    _flip(run / rel); return run


# --- 5. file modes ------------------------------------------------------------------------------------------------
def _modes(umask):
    def call(ctx):
        sd = {"w": torch.ones(3)}
        old = os.umask(umask)
        try: write_checkpoint(ctx.tmp / "ck", sd, sd, {}, {}, {"step": 1}, {}, projector=(sd, {}, {}))
        finally: os.umask(old)
        return sorted({oct(f.stat().st_mode & 0o777) for f in (ctx.tmp / "ck").iterdir()})
    return call

for umask, want in [(0o022, "['0o644']"), (0o077, "['0o600']"), (0o002, "['0o664']")]:
    row(f"file-modes-umask-{oct(umask)}", _modes(umask), "ok", want)


# --- 6. one writer per folder ---------------------------------------------------------------------------------------
def _dead_pid():
    p = subprocess.Popen(["true"]); p.wait()
    return p.pid


def _lock_record(folder, **rec):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0,
                                              "what": "training run", **rec}))
    return folder


def _while_locked(fn):
    def call(ctx):
        with E.FolderLock(ctx.tmp / "run", "training run"):
            return fn(ctx)
    return call

row("lock-second-folderlock", _while_locked(lambda ctx: E.FolderLock(ctx.tmp / "run", "x").acquire()), "user_error",
    f"pid {os.getpid()} on host {socket.gethostname()}")
row("lock-second-training", _while_locked(lambda ctx: train(digits_config(**TINY, max_steps=2, output_dir=str(ctx.tmp / "run")),
                                                            progress=False)),
    "user_error", "is in use by another writer: training run pid")
row("lock-second-trainer-before-any-file",
    _while_locked(lambda ctx: (Trainer(digits_config(**TINY, max_steps=2, output_dir=str(ctx.tmp / "run")),
                                       progress=False).train())), "user_error", "started ")
row("lock-dead-pid-taken-over", lambda ctx: E.FolderLock(_lock_record(ctx.tmp / "run", pid=_dead_pid())).acquire().release(),
    "warn", "which is no longer running")
row("lock-live-pid-without-flock-refused", lambda ctx: E.FolderLock(_lock_record(ctx.tmp / "run", pid=1)).acquire(),
    "user_error", "still running")
row("lock-other-host-fresh-refused", lambda ctx: E.FolderLock(_lock_record(ctx.tmp / "run", host="elsewhere")).acquire(),
    "user_error", "on host elsewhere")


def _stale_other_host(ctx):
    f = _lock_record(ctx.tmp / "run", host="elsewhere") / ".lock"
    os.utime(f, (0, time.time() - 3600))
    E.FolderLock(ctx.tmp / "run").acquire().release()

row("lock-other-host-stale-taken-over", _stale_other_host, "warn", "host elsewhere")
row("lock-garbage-record-taken-over",
    lambda ctx: (ctx.tmp.joinpath(".lock").write_text("{not json"), E.FolderLock(ctx.tmp).acquire().held)[1], "ok", "True")
row("lock-released-after-training",
    lambda ctx: (train(digits_config(**TINY, max_steps=1, save_steps=1, output_dir=str(ctx.tmp / "r")), progress=False),
                 (ctx.tmp / "r" / ".lock").exists())[1], "ok", "False")


def _training_with_dead_lock(ctx):
    _lock_record(ctx.tmp / "r", pid=_dead_pid())
    return train(digits_config(**TINY, max_steps=1, save_steps=1, output_dir=str(ctx.tmp / "r")), progress=False)

row("lock-training-takes-over-a-dead-lock", _training_with_dead_lock, "warn", "no longer running")


# --- 7. resuming with another config ----------------------------------------------------------------------------------
def _resume(**change):
    def call(ctx):
        run = ctx.run()
        return train(digits_config(**{**TINY, "max_steps": 6, "save_steps": 2, **change}, output_dir=str(run)),
                     progress=False)
    return call

for change, fragment in [(dict(depth=2), "model_config.depth 1 -> 2"),
                         (dict(hidden_size=64), "model_config.hidden_size 32 -> 64"),
                         (dict(num_heads=4), "model_config.num_heads 2 -> 4"),
                         (dict(patch_size=4), "model_config.patch_size 2 -> 4"),
                         (dict(mlp_ratio=2.0), "model_config.mlp_ratio 4.0 -> 2.0"),
                         (dict(learn_sigma=True), "model_config.learn_sigma False -> True"),
                         (dict(path_type="VP"), "model_config.path_type 'Linear' -> 'VP'"),
                         (dict(path_type="GVP"), "model_config.path_type 'Linear' -> 'GVP'"),
                         (dict(prediction="noise"), "model_config.prediction 'velocity' -> 'noise'"),
                         (dict(prediction="score", loss_weight="likelihood"), "model_config.loss_weight None -> 'likelihood'"),
                         (dict(train_eps=0.01), "model_config.train_eps None -> 0.01"),
                         (dict(class_dropout_prob=0.2), "model_config.class_dropout_prob 0.1 -> 0.2"),
                         (dict(max_steps=3), "is at step 4, past this run's max_steps (3)"),
                         (dict(max_steps=1), "nothing would be trained")]:
    row(f"resume-refused-{'-'.join(f'{k}={v}' for k, v in change.items())}", _resume(**change), "user_error", fragment)
row("resume-refused-lists-each-key", _resume(depth=2, path_type="VP"), "user_error",
    "model_config.depth 1 -> 2, model_config.path_type 'Linear' -> 'VP'")


def _resume_applied(**change):
    def call(ctx):
        run = ctx.run()
        tr = Trainer(digits_config(**{**TINY, "max_steps": 6, "save_steps": 2, **change}, output_dir=str(run)),
                     progress=False)
        res = tr.train()
        g = tr.opt.param_groups[0]
        events = [r for r in read_log(run / "log.jsonl", events=True) if r.get("event") == "config_changed"]
        saved = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())["config"]
        return {"step": res["step"], "base_lrs": tr.sched.base_lrs, "weight_decay": g["weight_decay"],
                "betas": g["betas"], "changed": events[0]["changed"], "at": events[0]["step"],
                "saved": {k: saved[k] for k in change}}
    return call

row("resume-applies-learning_rate", _resume_applied(learning_rate=5e-4), "ok",
    "'base_lrs': [0.0005], 'weight_decay': 0.0, 'betas': (0.9, 0.999), 'changed': {'learning_rate': [0.001, 0.0005], "
    "'max_steps': [4, 6]}, 'at': 4, 'saved': {'learning_rate': 0.0005}")
row("resume-applies-weight_decay", _resume_applied(weight_decay=0.1), "ok", "'weight_decay': 0.1")
row("resume-applies-betas", _resume_applied(adam_beta2=0.95), "ok", "'betas': (0.9, 0.95)")
row("resume-applies-ema_decay", _resume_applied(ema_decay=0.9), "ok", "'ema_decay': [0.995, 0.9]")
row("resume-applies-logging", _resume_applied(logging_steps=2), "ok", "'logging_steps': [1, 2]")
row("resume-repa-settings-while-off", _resume_applied(repa_lambda=0.25), "ok", "'repa_lambda': [0.5, 0.25]")
row("resume-same-config-no-record", lambda ctx: [r for r in read_log(_trained(ctx, max_steps=4), events=True)
                                                 if "event" in r], "ok", "[]")


def _trained(ctx, **kw):
    run = ctx.run()
    train(digits_config(**{**TINY, "save_steps": 2, **kw}, output_dir=str(run)), progress=False)
    return run / "log.jsonl"


# a damaged latest checkpoint: skipped with a warning naming the file, the fallback recorded in log.jsonl
for name in ("model.safetensors", "ema.pt", "optimizer.pt", "scheduler.pt", "trainer_state.json", "config.json"):
    def fallback(ctx, name=name):
        run = ctx.run(); _flip(run / "checkpoint-4" / name)
        res = train(digits_config(**TINY, max_steps=6, save_steps=2, output_dir=str(run)), progress=False)
        ev = [r for r in read_log(run / "log.jsonl", events=True) if r.get("event") == "resume_fallback"]
        assert res["step"] == 6 and ev and ev[0]["resumed_from"].endswith("checkpoint-2") and ev[0]["step"] == 2, ev
        assert name in next(iter(ev[0]["skipped"].values()))
    row(f"resume-skips-flipped-{name}", fallback, "warn", f"checkpoint-4/{name} is damaged: its sha256")


def _explicit_damaged(ctx):
    run = ctx.run(); _flip(run / "checkpoint-4" / "ema.pt")
    return train(digits_config(**TINY, max_steps=6, output_dir=str(run), resume_from_checkpoint=str(run / "checkpoint-4")),
                 progress=False)

row("resume-explicit-damaged-is-an-error", _explicit_damaged, "checkpoint_error", "ema.pt is damaged")


# --- 8. sampling: sample, sample-eval, export, import, and the generation entry points ---------------------------
def _ck(ctx): return ctx.run() / "checkpoint-4"


def _sample(*args):
    "`sit-workbench sample CHECKPOINT ARGS` on a copy of the tiny run's last checkpoint, writing under tmp."
    return lambda ctx: [str(a) for a in ("sample", _ck(ctx), *args, "--out", ctx.tmp / "s.png")]


for opt, value, frag in [("--cfg-scale", "nan", "argument --cfg-scale"), ("--cfg-scale", "inf", "argument --cfg-scale"),
                         ("--cfg-scale", "x", "argument --cfg-scale"), ("--cfg-channels", "0", "argument --cfg-channels"),
                         ("--cfg-channels", "some", "argument --cfg-channels"), ("--atol", "nan", "argument --atol"),
                         ("--rtol", "inf", "argument --rtol"), ("--diffusion-norm", "nan", "argument --diffusion-norm"),
                         ("--last-step-size", "-inf", "argument --last-step-size"), ("--eta", "nan", "argument --eta"),
                         ("--sample-eps", "nan", "argument --sample-eps"), ("--train-eps", "inf", "argument --train-eps"),
                         ("--sampling-method", "heun9", "argument --sampling-method"), ("--mode", "xde", "argument --mode"),
                         ("--path-type", "Cosine", "argument --path-type"), ("--prediction", "eps", "argument --prediction"),
                         ("--preset", "paper", "argument --preset"), ("--model", "SiT-Q/2", "argument --model"),
                         ("--num-sampling-steps", "2.5", "argument --num-sampling-steps"),
                         ("--per-class", "two", "argument --per-class"), ("--seed", "x", "argument --seed")]:
    cli_row(f"sample-option{opt}={value}", _sample(opt, value), frag)
for args, frag in [(("--num-sampling-steps", "1"), "integer >= 2"), (("--num-sampling-steps", "0"), "integer >= 2"),
                   (("--mode", "ode", "--sampling-method", "Euler"), "is an SDE method"),
                   (("--mode", "sde", "--sampling-method", "heun2"), "is an ODE method"),
                   (("--mode", "ode", "--diffusion-form", "sigma"), "unknown ODE sampler option"),
                   (("--cfg-interval", "0.6", "0.2"), "guidance interval"), (("--cfg-interval", "-1", "0.5"), "guidance interval"),
                   (("--cfg-interval", "0", "2"), "guidance interval"), (("--classes", "10"), "[0, 9]"),
                   (("--classes", "-1"), "[0, 9]"), (("--per-class", "0"), "--per-class"),
                   (("--mode", "sde", "--last-step-size", "2"), "does not fit"),
                   (("--schedule", "bogus"), "schedule"), (("--schedule", "optimized:missing", "--sampling-method", "abm3"), "missing"),
                   (("--mode", "sde", "--diffusion-form", "w_KL_eta"), "measure L_t first"),
                   (("--likelihood",), "no guidance"), (("--likelihood", "--mode", "sde", "--cfg-scale", "1"), "ODE"),
                   (("--vae", "/no/such/vae"), "no folder"), (("--path-type", "VP", "--sample-eps", "0.9", "--train-eps", "0.9"), "")]:
    cli_row(f"sample{'-'.join(args)}", _sample(*args), frag)
cli_row("sample-two-checkpoints", lambda ctx: ["sample", str(_ck(ctx)), "--ckpt", str(ctx.tmp / "other.pt")], "two checkpoints")
cli_row("sample-three-positionals", lambda ctx: ["sample", "ODE", str(_ck(ctx)), "extra"], "give one checkpoint")
cli_row("sample-missing-file", lambda ctx: ["sample", str(ctx.tmp / "missing.pt")], "No checkpoint found")
cli_row("sample-empty-folder", lambda ctx: ["sample", str(ctx.tmp)], "neither a checkpoint folder")


def _garbage(name, data=b"\x00garbage\xff" * 10):
    def argv(ctx):
        ck = _ck(ctx)
        (ck / name).write_bytes(data)
        return ["sample", str(ck), "--out", str(ctx.tmp / "s.png")]
    return argv


cli_row("sample-run-json-garbage", _garbage("run.json"), "not valid JSON")
cli_row("sample-config-json-garbage", _garbage("config.json"), "not valid JSON")
cli_row("sample-ema-garbage", _garbage("ema.pt"), "not a readable")
cli_row("sample-run-json-without-transport", _garbage("run.json", b'{"sampler": {}}'), "no run description")
cli_row("sample-run-json-bad-sampler", _garbage("run.json", json.dumps({"transport": {}, "sampler": {"sampling_method": "x"}}).encode()),
        "unknown sampling method")


def _pt_file(ctx, data):
    p = ctx.tmp / "file.pt"
    p.write_bytes(data)
    return p


cli_row("sample-random-bytes-pt", lambda ctx: ["sample", str(_pt_file(ctx, os.urandom(300)))], "not a readable")
cli_row("sample-truncated-pt", lambda ctx: ["sample", str(_pt_file(ctx, (_ck(ctx) / "ema.pt").read_bytes()[:200]))],
        "not a readable")
cli_row("sample-run-folder-without-checkpoints",
        lambda ctx: ["sample", str((lambda r: ([shutil.rmtree(p) for p in r.glob("checkpoint-*")], r)[1])(ctx.run()))],
        "neither a checkpoint folder")


def _eval(*args):
    return lambda ctx: [str(a) for a in ("sample-eval", _ck(ctx), "--out-dir", ctx.tmp / "ev", "--no-eval",
                                          "--device", "cpu", "--num-sampling-steps", "3", *args)]


for args, frag in [(("--num-samples", "0"), "--num-samples must be at least 1"), (("--shard-size", "0"), "--shard-size"),
                   (("--num-samples", "-3"), "--num-samples"), (("--classes", "12"), "do not exist"),
                   (("--labels", "skewed"), "argument --labels"), (("--cfg-scale", "nan"), "argument --cfg-scale"),
                   (("--sampling-method", "Heun", "--mode", "ode"), "is an SDE method"),
                   (("--cfg-interval", "0.9", "0.1"), "guidance interval")]:
    cli_row(f"sample-eval{'-'.join(args)}", _eval(*args), frag)
cli_row("sample-eval-no-checkpoint", lambda ctx: ["sample-eval", "--out-dir", str(ctx.tmp / "ev")], "give a checkpoint")


def _eval_twice(ctx):
    from sit_workbench.cli import main
    argv = _eval("--num-samples", "2")(ctx)
    main(argv)
    return main(argv + ["--seed", "1"])


cli_row("sample-eval-other-settings-in-out-dir", _eval_twice, "holds samples made with other settings")
cli_row("export-one-path", lambda ctx: ["export", str(_ck(ctx))], "give the checkpoint and the output")
cli_row("export-a-pt", lambda ctx: ["export", str(_pt_file(ctx, b"x")), str(ctx.tmp / "o.pt")], "not a readable")
cli_row("import-a-folder", lambda ctx: ["import", str(_ck(ctx)), str(ctx.tmp / "o")], "already a folder")
cli_row("import-random-bytes", lambda ctx: ["import", str(_pt_file(ctx, os.urandom(100))), str(ctx.tmp / "o")], "not a readable")
cli_row("velocity-loss-no-checkpoint", ["velocity-loss"], "give a checkpoint")
cli_row("velocity-loss-missing", lambda ctx: ["velocity-loss", str(ctx.tmp / "nothing")], "No checkpoint found")


def _spec(**kw):
    from sit_workbench.registry import SamplerSpec
    return lambda ctx: SamplerSpec.create(**kw)


for kw, frag in [(dict(sampling_method="rk45"), "unknown sampling method"), (dict(mode="pf"), "unknown sampling mode"),
                 (dict(mode="sde", sampling_method="dopri5"), "is an ODE method"), (dict(num_steps=1), "integer >= 2"),
                 (dict(num_steps=3.0), "integer >= 2"), (dict(num_steps=True), "integer >= 2"),
                 (dict(num_steps="26"), "integer >= 2"), (dict(mode="ode", atol=float("nan")), "finite"),
                 (dict(mode="ode", rtol=float("inf")), "finite"), (dict(mode="ode", eta=0.5), "unknown ODE sampler option"),
                 (dict(mode="sde", atol=1e-3), "unknown SDE sampler option")]:
    row(f"sampler-spec-{'-'.join(f'{k}={v}' for k, v in kw.items())}", _spec(**kw), "user_error", frag)
row("sampler-spec-numpy-steps", lambda ctx: __import__("sit_workbench.registry", fromlist=["SamplerSpec"]).SamplerSpec.create(
    "ode", "heun2", __import__("numpy").int64(11)).nfe, "ok", "20")


def _guidance(**kw):
    from sit_workbench.sample import Guidance
    return lambda ctx: Guidance(**kw)


for kw, frag in [(dict(scale=float("nan")), "finite"), (dict(scale=float("inf")), "finite"), (dict(scale="2"), "finite"),
                 (dict(scale=()), "finite"), (dict(interval=(0.6, 0.2)), "guidance interval"),
                 (dict(interval=(-0.1, 0.5)), "guidance interval"), (dict(channels=0), "guided channels"),
                 (dict(channels=True), "guided channels")]:
    row(f"guidance-{'-'.join(f'{k}={v}' for k, v in kw.items())}", _guidance(**kw), "user_error", frag)


def _tiny_model(dropout=0.1):
    from sit_workbench.model import SiT
    torch.manual_seed(0)
    return SiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3,
               class_dropout_prob=dropout, learn_sigma=False).eval()


def _generate(labels=(0, 1), model=None, **kw):
    def call(ctx):
        from sit_workbench.registry import SamplerSpec
        from sit_workbench.sample import generate
        from sit_workbench.transport import create_transport
        fn = SamplerSpec.create("ode", "euler", 3).build(create_transport())
        return generate(model() if model else _tiny_model(), fn, labels, **kw).images.shape
    return call


for id_, kw, frag in [("label-out-of-range", dict(labels=(0, 3)), "do not exist"), ("negative-label", dict(labels=(-1,)), "do not exist"),
                      ("no-labels", dict(labels=()), "non-empty"), ("2d-labels", dict(labels=[[0, 1]]), "non-empty"),
                      ("noise-shape", dict(noise=torch.zeros(2, 1, 5, 5)), "noise must be shaped"),
                      ("scales-count", dict(guidance=(1.0, 2.0, 3.0)), "3 guidance scales for 2 samples"),
                      ("no-null-class", dict(guidance=2.0, model=lambda: _tiny_model(0.0)), "no null class"),
                      ("nan-guidance", dict(guidance=float("nan")), "finite")]:
    row(f"generate-{id_}", _generate(**kw), "user_error", frag)
row("generate-spec-without-transport", lambda ctx: __import__("sit_workbench.sample", fromlist=["generate"]).generate(
    _tiny_model(), {"sampling_method": "euler"}, [0]), "user_error", "needs a transport")
row("generate-ok", _generate(), "ok", "torch.Size([2, 1, 4, 4])")
row("cycle-labels-empty", lambda ctx: __import__("sit_workbench.sample", fromlist=["cycle_labels"]).cycle_labels(4, []),
    "user_error", "no classes")
row("label-plan-unknown", lambda ctx: __import__("sit_workbench.evaluate", fromlist=["label_plan"]).label_plan(4, 10, "skewed"),
    "user_error", "'balanced', 'random'")


def _generate_samples(n, shard_size=5):
    def call(ctx):
        from sit_workbench.evaluate import generate_samples
        from sit_workbench.transport import create_transport
        return generate_samples(_tiny_model(), create_transport(), ctx.tmp / "g", n, shard_size=shard_size)
    return call


for id_, n, shard, frag in [("zero", 0, 5, "positive integers"), ("bool", True, 5, "positive integers"),
                            ("float", 2.5, 5, "positive integers"), ("shard-0", 4, 0, "positive integers")]:
    row(f"generate-samples-{id_}", _generate_samples(n, shard), "user_error", frag)


def _damaged_shard_merge(ctx):
    from sit_workbench.evaluate import merge_shards, shard_path
    _generate_samples(4, 2)(ctx)
    p = shard_path(ctx.tmp / "g", 2)
    p.write_bytes(p.read_bytes()[:-9])
    return merge_shards(ctx.tmp / "g", 4, 2)


row("merge-damaged-shard", _damaged_shard_merge, "checkpoint_error", "is damaged")


def _read_run(source, **kw):
    return lambda ctx: __import__("sit_workbench.run", fromlist=["read_run"]).read_run(source(ctx), **kw)


row("read-run-unknown-model", _read_run(lambda ctx: _ck(ctx), model_name="SiT-Q/2"), "user_error", "unknown model")
row("read-run-empty-folder", _read_run(lambda ctx: ctx.tmp), "checkpoint_error", "neither a checkpoint folder")
row("read-run-ok", lambda ctx: __import__("sit_workbench.run", fromlist=["read_run"]).read_run(_ck(ctx)).transport["path_type"],
    "ok", "Linear")
row("run-options-unknown", lambda ctx: __import__("sit_workbench.run", fromlist=["read_run"]).read_run(_ck(ctx)).with_options(
    steps=3), "user_error", "unknown run option")
row("run-options-nan-guidance", lambda ctx: __import__("sit_workbench.run", fromlist=["read_run"]).read_run(_ck(ctx)).with_options(
    guidance_scale=float("nan")), "user_error", "finite")
row("run-options-bad-sampler", lambda ctx: __import__("sit_workbench.run", fromlist=["read_run"]).read_run(_ck(ctx)).with_options(
    sampler={"num_steps": 0}), "user_error", "integer >= 2")


def _pipe(**call):
    def go(ctx):
        from sit_workbench.pipeline import SiTPipeline
        pipe = SiTPipeline.from_pretrained(_ck(ctx))
        pipe.set_progress_bar_config(disable=True)
        return pipe(**{"class_labels": [1], **call})
    return go


for id_, kw, frag in [("output-type", dict(output_type="jpg"), "output_type"), ("float-labels", dict(class_labels=[1.5]), "integer labels"),
                      ("label-range", dict(class_labels=[10]), "[0, 9]"), ("steps-0", dict(num_inference_steps=0), "positive integer"),
                      ("mode", dict(mode="pf"), "unknown sampling mode"), ("method", dict(sampling_method="heun9"), "unknown sampling method"),
                      ("name", dict(class_labels=["eleven"]), "unknown class name"), ("nan-guidance", dict(guidance_scale=float("nan")), "finite")]:
    row(f"pipeline-{id_}", _pipe(**kw), "user_error", frag)


def _explore(fn):
    return lambda ctx: fn(__import__("sit_workbench.explore", fromlist=["parse_classes"]), ctx)


for id_, fn, frag in [("classes-text", lambda X, ctx: X.parse_classes("three"), "cannot read"),
                      ("classes-range", lambda X, ctx: X.parse_classes("5-2"), "cannot read"),
                      ("classes-none", lambda X, ctx: X.parse_classes(" , "), "none given"),
                      ("classes-all-unknown", lambda X, ctx: X.parse_classes("all"), "number of classes"),
                      ("scales-small", lambda X, ctx: X.guidance_scales(0.5, 3), ">= 1"),
                      ("scales-none", lambda X, ctx: X.guidance_scales(3, 0), "at least one column"),
                      ("request-method", lambda X, ctx: X.Request(mode="ODE", method="Euler").sampler(), "is an SDE method"),
                      ("request-steps", lambda X, ctx: X.Request(num_steps=1).sampler(), "integer >= 2"),
                      ("trajectory-adaptive", lambda X, ctx: X.solve_trajectory(X.Request(checkpoint=str(_ck(ctx))), method="dopri5"),
                       "fixed-step")]:
    row(f"explore-{id_}", _explore(fn), "user_error", frag)


# --- running the table --------------------------------------------------------------------------------------------
class Ctx:
    "What a row gets: a fresh `tmp`, and fresh copies of the shared checkpoint and run (made once per module)."
    def __init__(self, tmp, shared):
        self.tmp, self._shared = tmp, shared

    def checkpoint(self) -> Path:
        dst = self.tmp / "ck" / "checkpoint-7"
        shutil.copytree(self._shared("checkpoint"), dst)
        return dst

    def run(self) -> Path:
        dst = self.tmp / "run"
        shutil.copytree(self._shared("run"), dst)
        return dst


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    made = {}
    def get(what):
        if what not in made:
            d = tmp_path_factory.mktemp(what)
            if what == "checkpoint":
                from sit_workbench.model import SiT
                net = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                          learn_sigma=False)
                sd, opt = net.state_dict(), torch.optim.AdamW(net.parameters())
                write_checkpoint(d / "ck", sd, sd, opt.state_dict(), {"last_epoch": 7}, {"step": 7}, dict(depth=1),
                                 projector=({"w": torch.ones(4)}, {}, {}))
                made[what] = d / "ck"
            else:
                train(digits_config(**TINY, max_steps=4, save_steps=2, output_dir=str(d / "run")), progress=False)
                made[what] = d / "run"
        return made[what]
    return get


@pytest.fixture
def ctx(tmp_path, shared, monkeypatch):
    monkeypatch.setenv("SIT_WORKBENCH_ZOO", str(tmp_path / "zoo"))
    return Ctx(tmp_path, shared)


@pytest.mark.parametrize("r", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(r, ctx, capsys):
    if r.outcome in ("user_error", "checkpoint_error"):
        with pytest.raises(E.UserError) as e:
            r.call(ctx)
        if r.outcome == "checkpoint_error": assert isinstance(e.value, E.CheckpointError), repr(e.value)
        assert r.fragment in str(e.value), str(e.value)
    elif r.outcome == "exit_2":
        with pytest.raises(SystemExit) as e:
            r.call(ctx)
        err = capsys.readouterr().err
        assert e.value.code == E.EXIT_USER_ERROR and r.fragment in err and "Traceback" not in err, err
    elif r.outcome in ("ok", "warn"):
        try:
            got = r.call(ctx)
        except E.UserError as e:
            if r.outcome != "warn": raise
            got, _ = None, print(e, file=sys.stderr)   # a `warn` row may also end in a UserError whose text it checks
        err = capsys.readouterr().err
        if r.outcome == "warn": assert r.fragment in err, err
        elif r.fragment is not None: assert r.fragment in str(got), got
    else:
        raise AssertionError(f"unknown outcome {r.outcome!r}")


def test_the_table_is_large_and_its_ids_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    assert len(ROWS) >= 100


# --- two trainings on one folder, for real ------------------------------------------------------------------------------
def test_a_second_training_is_refused_while_the_first_runs(tmp_path, sigterm_after):
    out = tmp_path / "run"
    save_config(digits_config(**TINY, max_steps=100000, save_steps=100000, output_dir=str(out)), tmp_path / "c.yaml")
    proc = subprocess.Popen([sys.executable, "-c", "from sit_workbench.cli import main; main()", "train", "--config",
                             str(tmp_path / "c.yaml"), "--no-progress"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "log.jsonl").is_file():
            time.sleep(0.05)
        with pytest.raises(E.UserError) as e:
            train(digits_config(**TINY, max_steps=2, output_dir=str(out)), progress=False)
        assert f"training run pid {proc.pid} on host {socket.gethostname()}" in str(e.value), e.value
    finally:
        stdout, stderr = sigterm_after(proc, out / "log.jsonl", 1)
    assert proc.returncode == E.EXIT_PREEMPTED, stdout + stderr
    assert not (out / ".lock").exists()
    step = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["step"]
    res = train(digits_config(**TINY, max_steps=step + 1, save_steps=100000, output_dir=str(out)), progress=False)
    assert res["step"] == step + 1   # the first released its lock: the folder is free again
