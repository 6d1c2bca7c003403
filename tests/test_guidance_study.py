"""The guidance study (nbs/23_guidance) end to end on the quick setting, in a temporary zoo: it trains the models it
needs, measures every point and writes one entry per method (resuming is `RowLog`'s, tested with the MeanFlow study)."""
import json

from sit_workbench.studies import guidance as study
from sit_workbench.studies.zoo import results_path


def test_quick_study_trains_measures_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("SIT_WORKBENCH_ZOO", str(tmp_path / "zoo"))
    res = study.run_study("quick")
    assert json.loads(results_path(study.STUDY, "quick").read_text()) == res
    assert [m["method"] for m in res["methods"]] == list(study.METHODS)
    for m in res["methods"]:
        assert [p["weight"] for p in m["curve"]] == [1.0, 2.0]
        assert m["best_fid"] == min(p["digits_fid"] for p in m["curve"])
        assert all(0 <= p["recall"] <= 1 and 0 <= p["accuracy"] <= 1 for p in m["curve"])
    assert res["guides"] == [{"guide": "main@75", "seed": 0}, {"guide": "small@75", "seed": 0}]
    assert res["sampler_check"]["reference"] == study.CHECK_SAMPLER and res["sampler_check"]["rmse"] >= 0
    pts = [r for r in res["rows"] if r.get("role") != "reference"]
    assert {r["method"] for r in pts} == set(study.METHODS) and all(r["n"] == 200 for r in pts)
    # at weight 1 CFG, its interval and autoguidance are the main model alone: CFG's point stands for all three
    cfg1 = next(r for r in pts if r["method"] == "cfg" and r["weight"] == 1.0 and r["seed"] == 0)
    auto1 = next(r for r in pts if r["method"] == "autoguidance" and r["weight"] == 1.0 and r["seed"] == 0)
    assert auto1["same_as"] == "cfg at weight 1" and auto1["digits_fid"] == cfg1["digits_fid"]
    internal1 = next(r for r in pts if r["method"] == "internal" and r["weight"] == 1.0 and r["seed"] == 0)
    assert "same_as" not in internal1 and internal1["digits_fid"] != cfg1["digits_fid"]   # another model
    assert (tmp_path / "zoo" / "quick" / "guidance-internal" / "checkpoint-150").is_dir()
