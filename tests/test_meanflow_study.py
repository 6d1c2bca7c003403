"""The MeanFlow study (nbs/22_meanflow) end to end on the quick setting, in a temporary zoo: killed part way, then run
again, it measures only the rows it had not measured, and writes a complete results file."""
import json

import pytest

from sit_workbench.studies import meanflow as study
from sit_workbench.studies.zoo import results_path


def test_quick_study_resumes_and_completes(tmp_path, monkeypatch):
    monkeypatch.setenv("SIT_WORKBENCH_ZOO", str(tmp_path / "zoo"))
    real, calls = study.measure, []
    def counted(*a, stop_at=None, **k):
        calls.append(a[1])
        if len(calls) == 5 and stop_at: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(study, "measure", lambda *a, **k: counted(*a, stop_at=True, **k))
    with pytest.raises(KeyboardInterrupt):
        study.run_study("quick")
    monkeypatch.setattr(study, "measure", counted)
    calls.clear()
    res = study.run_study("quick")
    total = 2 + sum(len(study.flow_samplers(n)) for n in study.NFES) + sum(len(study.ladder(i, "quick")) for i in study.INITS) * 3
    assert len(calls) == total - 4            # the four rows measured before the kill were not measured again
    assert json.loads(results_path(study.STUDY, "quick").read_text()) == res
    assert not results_path(study.STUDY, "quick").with_suffix(".partial.jsonl").exists()
    got = {(r["init"], r["steps"], r["nfe"]) for r in res["rows"] if r["model"] == "meanflow"}
    assert got == {(i, st, n) for i in study.INITS for st in study.ladder(i, "quick") for n in study.NFES}
    assert all(r["n"] == 200 for r in res["rows"] if r["role"] != "reference")
    assert [r["model"].split(":")[0] for r in res["rows"] if r["role"] == "reference"] == ["floor", "memoriser"]
    few = {(r["solver"], r["nfe"]) for r in res["rows"] if r["role"] == "few-step"}
    assert {("euler", 1), ("abm3", 4), ("rk4", 4), ("midpoint", 2)} <= few
    assert res["ladders"] == {"finetune": [9, 18, 37], "scratch": [75, 150]} and res["flow_steps"] == 150
    assert study.run_config("finetune", "quick", 9).init_from == str(tmp_path / "zoo" / "quick" / study.FLOW / "checkpoint-150")
    # each fine-tune rung is a run of its own whose cosine rate has decayed to (almost) nothing at its last step
    from sit_workbench.train import read_log
    for st in res["ladders"]["finetune"]:
        run = study.run_dir("finetune", "quick", st)
        assert run == tmp_path / "zoo" / "quick" / "meanflow-finetune-cosine" / str(st) and (run / f"checkpoint-{st}").is_dir()
        lrs = [r["lr"] for r in read_log(run / "log.jsonl") if "lr" in r]
        assert max(lrs) > 0.5 * study.RECIPE["finetune"]["learning_rate"] and lrs[-1] < 0.05 * max(lrs), lrs
    assert res["step_cost"]["ratio_to_flow"]["flow"] == 1.0
    assert set(res["step_cost"]["ratio_to_flow"]) == {"flow", "meanflow, data tangent", "meanflow, model tangent"}
    assert study.verdict(res).startswith("The flow model's converged digits-FID is")
