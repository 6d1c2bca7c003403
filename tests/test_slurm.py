"""Training launched through submitit against a real SLURM cluster (not a mock): a finished job, two gloo tasks
against one process, a job requeued twice mid-run that resumes bit for bit, an array job, bad requests refused before
anything is queued, the `submit` command; and the same function in local processes.

`make slurm-up` (tests/slurm/start.sh: root on Debian) starts a one-node cluster on this machine. Without a reachable
cluster the SLURM tests are skipped, unless CI is set: then they fail."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sit_workbench.config import digits_config, save_config
from sit_workbench.launch import (collect_results, job_result, job_status, results_table, slurm_available,
                                  submit_sweep, submit_training, tail_log)
from sit_workbench.checkpoint import latest_checkpoint, list_checkpoints, load_sit
from sit_workbench.train import read_log

TINY = dict(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, logging_steps=1, save_steps=1000,
            save_total_limit=None, per_device_train_batch_size=16)
ON_SLURM = dict(cluster="slurm", cpus_per_task=1, timeout_min=60)   # >= 60: a signal is a preemption, not a time-out
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def slurm():
    deadline = time.time() + 10
    while time.time() < deadline:
        if slurm_available(timeout=5):
            return
        time.sleep(1)
    reason = "no SLURM cluster reachable: run `make slurm-up` (root, Debian) to start one"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the SLURM tests must run")
    pytest.skip(reason)


def sh(*cmd):
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    return (r.stdout + r.stderr).strip()


def diagnostics(job) -> str:
    "What to look at when a job misbehaves: its state, the end of every task's logs, sacct and squeue."
    out = [f"job {job.job_id}: {sh('scontrol', 'show', 'job', str(job.job_id).split('_')[0])}",
           sh("sacct", "-j", str(job.job_id), "-o", "JobID%20,State,ExitCode,Start,Elapsed,NodeList"),
           sh("squeue", "-a")]
    for t in range(job.num_tasks):
        for stream in ("stdout", "stderr"):
            out.append(f"--- task {t} {stream}:\n{tail_log(job, 30, stream, task=t)}")
    return "\n".join(out)


def wait(job, timeout=240):
    "All tasks' results, or a failure with diagnostics (the job is cancelled) when it takes longer than `timeout`."
    deadline = time.time() + timeout
    while not job.done():
        if time.time() > deadline:
            info = diagnostics(job)
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} did not finish within {timeout} s\n{info}")
        time.sleep(0.5)
    try:
        return job.results()
    except Exception as e:
        pytest.fail(f"job {job.job_id} failed: {e}\n{diagnostics(job)}")


def final_state(job_id, timeout=20):
    "The job's state in SLURM's accounting once it has ended."
    deadline = time.time() + timeout
    while True:
        state = sh("sacct", "-n", "-X", "-j", str(job_id), "-o", "State%20").split("\n")[-1].strip()
        if state not in ("", "PENDING", "RUNNING", "REQUEUED", "COMPLETING") or time.time() > deadline:
            return state
        time.sleep(0.5)


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors")), torch.load(Path(folder) / "ema.pt", weights_only=True)


def test_digits_job_finishes_and_its_checkpoint_and_log_come_back(slurm, tmp_path):
    cfg = digits_config(**TINY, max_steps=30, output_dir=str(tmp_path / "run"))
    job = submit_training(cfg, **ON_SLURM)
    assert job.job_id.isdigit() and job_status(job)["stdout"].startswith(str(tmp_path / "run" / "submitit"))
    (res,) = wait(job)
    assert (res["status"], res["step"], res["rank"], res["world_size"], res["restarts"]) == ("finished", 30, 0, 1, 0)
    assert Path(res["checkpoint"]) == tmp_path / "run" / "checkpoint-30"
    assert load_sit(res["checkpoint"]).config["num_classes"] == 10
    assert [r["step"] for r in read_log(tmp_path / "run" / "log.jsonl")] == list(range(1, 31))
    assert (tmp_path / "run" / "loss.png").is_file()
    assert f"task 0/1 of job {job.job_id}" in tail_log(job), diagnostics(job)
    assert final_state(job.job_id) == "COMPLETED"
    assert job_result(job) == res


def test_two_gloo_tasks_match_one_process_on_the_same_global_batch(slurm, tmp_path):
    steps = 8
    two = digits_config(**{**TINY, "per_device_train_batch_size": 16}, max_steps=steps, output_dir=str(tmp_path / "two"))
    one = digits_config(**{**TINY, "per_device_train_batch_size": 32}, max_steps=steps, output_dir=str(tmp_path / "one"))
    j2 = submit_training(two, tasks_per_node=2, **ON_SLURM)
    j1 = submit_training(one, **ON_SLURM)
    r2, (r1,) = wait(j2), wait(j1)
    assert [(r["rank"], r["world_size"], r["status"]) for r in r2] == [(0, 2, "finished"), (1, 2, "finished")]
    assert "task 1/2" in tail_log(j2, task=1), diagnostics(j2)
    l1, l2 = read_log(tmp_path / "one" / "log.jsonl"), read_log(tmp_path / "two" / "log.jsonl")
    assert [r["step"] for r in l2] == list(range(1, steps + 1))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in l2]), torch.tensor([r["loss"] for r in l1]),
                               rtol=1e-5, atol=1e-6)
    (ma, _), (mb, _) = weights(r1["checkpoint"]), weights(r2[0]["checkpoint"])
    for n in ma:
        torch.testing.assert_close(mb[n], ma[n], rtol=1e-4, atol=1e-5)


def _wait_for(cond, what, job, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            info = diagnostics(job)
            job.cancel(check=False)
            pytest.fail(f"waited {timeout} s for {what}\n{info}")
        time.sleep(0.05)


def _last_step(log):
    try:
        rows = read_log(log)
    except (FileNotFoundError, ValueError):   # not there yet, or a line being written
        return 0
    return rows[-1]["step"] if rows else 0


def test_requeued_job_resumes_from_its_checkpoint_bit_exact(slurm, tmp_path):
    steps, kw = 1500, {**TINY, "save_steps": 10_000}   # checkpoints only when stopped, and at the end
    ref = submit_training(digits_config(**kw, max_steps=steps, output_dir=str(tmp_path / "ref")), **ON_SLURM)
    job = submit_training(digits_config(**kw, max_steps=steps, output_dir=str(tmp_path / "int")), **ON_SLURM)
    out, log = tmp_path / "int", tmp_path / "int" / "log.jsonl"

    # 1. SIGUSR1, as SLURM sends before a time limit or a preemption: the trainer checkpoints, submitit requeues
    _wait_for(lambda: _last_step(log) >= 20, "20 logged steps", job)
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True)
    _wait_for(lambda: "restart 1" in tail_log(job, 200), "the job to come back after SIGUSR1", job)
    first = latest_checkpoint(out)
    k1 = int(first.name.split("-")[1])
    assert 20 <= k1 < steps, diagnostics(job)

    # 2. `scontrol requeue` (SIGTERM, then the job goes back to the queue): the trainer checkpoints again
    _wait_for(lambda: _last_step(log) >= k1 + 20, f"20 steps after resuming at {k1}", job)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    _wait_for(lambda: "restart 2" in tail_log(job, 200), "the job to come back after scontrol requeue", job)

    (res,) = wait(job)
    (rres,) = wait(ref)
    assert (res["status"], res["step"], res["restarts"]) == ("finished", steps, 2), diagnostics(job)
    stopped = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
    assert len(stopped) == 3 and stopped[0] == k1 and k1 + 20 <= stopped[1] < steps and stopped[2] == steps, stopped
    stdout = tail_log(job, 1000)
    assert "SIGUSR1 received" in stdout and "SIGTERM received" in stdout and "resumed from" in stdout, diagnostics(job)
    (ma, ea), (mb, eb) = weights(rres["checkpoint"]), weights(res["checkpoint"])
    assert all(torch.equal(ma[n], mb[n]) for n in ma), "model weights differ from the uninterrupted run"
    assert all(torch.equal(ea[n], eb[n]) for n in ea), "EMA weights differ from the uninterrupted run"
    got, want = read_log(log), read_log(tmp_path / "ref" / "log.jsonl")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert final_state(job.job_id) == "COMPLETED"


def test_array_job_of_three_settings(slurm, tmp_path):
    cfgs = [digits_config(**TINY, max_steps=10, path_type=p, output_dir=str(tmp_path / p)) for p in ("Linear", "GVP", "VP")]
    jobs = submit_sweep(cfgs, **ON_SLURM)
    assert len(jobs) == 3 and len({j.job_id.split("_")[0] for j in jobs}) == 1   # one array job
    for j in jobs:
        wait(j)
    rows = collect_results(jobs)
    assert [r["model_config.path_type"] for r in rows] == ["Linear", "GVP", "VP"]
    assert all(r["status"] == "finished" and r["step"] == 10 and r["final_loss"] > 0 for r in rows), rows
    assert [Path(r["checkpoint"]).parent.name for r in rows] == ["Linear", "GVP", "VP"]
    table = results_table(rows)
    assert table.count("\n") == 4 and "model_config.path_type" in table


def _queued(name):
    return sh("sacct", "-n", "-X", "--name", name, "-o", "JobID")


def test_bad_requests_fail_before_anything_is_queued(slurm, tmp_path):
    cfg = digits_config(**TINY, max_steps=5, output_dir=str(tmp_path / "run"))
    name = f"sit-bad-{os.getpid()}"
    with pytest.raises(ValueError, match=r"unknown partition 'nope'; the cluster has: debug \(default\)"):
        submit_training(cfg, partition="nope", name=name, **ON_SLURM)
    with pytest.raises(ValueError, match=r"gpus_per_node=1 .* at most 0 GPU"):
        submit_training(cfg, gpus_per_node=1, name=name, **ON_SLURM)
    with pytest.raises(ValueError, match=r"nodes=2 but partition 'debug' has 1 node"):
        submit_training(cfg, nodes=2, name=name, **ON_SLURM)
    with pytest.raises(ValueError, match=r"task\(s\) x 1 CPU\(s\) per node"):
        submit_training(cfg, tasks_per_node=os.cpu_count() * 8, name=name, **ON_SLURM)
    bad = digits_config(**TINY, max_steps=5, output_dir=str(tmp_path / "run"))
    bad.max_steps = 0
    with pytest.raises(ValueError, match="max_steps must be positive"):
        submit_training(bad, name=name, **ON_SLURM)
    assert _queued(name) == "" and not (tmp_path / "run").exists()
    # the command line says the same in one line, exit status 2
    save_config(cfg, tmp_path / "c.yaml")
    r = subprocess.run([str(BIN / "sit-workbench"), "submit", "--config", str(tmp_path / "c.yaml"), "--partition", "nope",
                        "--cluster", "slurm", "--name", name], capture_output=True, text=True)
    assert r.returncode == 2 and "sit-workbench submit: error: unknown partition 'nope'" in r.stderr, r.stderr
    assert _queued(name) == ""


def test_submit_command_waits_for_the_job(slurm, tmp_path):
    save_config(digits_config(**TINY, max_steps=5, output_dir=str(tmp_path / "run")), tmp_path / "c.yaml")
    r = subprocess.run([str(BIN / "sit-workbench"), "submit", "--config", str(tmp_path / "c.yaml"), "--set",
                        "max_steps=6", "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--cluster",
                        "slurm", "--wait"], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted job " in r.stdout and "finished at step 6 of 6" in r.stdout, r.stdout
    assert (tmp_path / "run" / "checkpoint-6" / "model.safetensors").is_file()


def test_local_processes_run_the_same_job(tmp_path):
    cfg = digits_config(**TINY, max_steps=6, output_dir=str(tmp_path / "run"))
    job = submit_training(cfg, cluster="local", tasks_per_node=2, cpus_per_task=1, timeout_min=10)
    results = wait(job, timeout=180)
    assert [(r["rank"], r["world_size"], r["status"], r["step"]) for r in results] == [(0, 2, "finished", 6),
                                                                                    (1, 2, "finished", 6)]
    assert [r["step"] for r in read_log(tmp_path / "run" / "log.jsonl")] == list(range(1, 7))
