"""The re-measurement study (nbs/14c_remeasure) end to end on the quick setting, two cells, in a temporary zoo: killed
part way, then run again, it measures only the rows it had not measured; being a run over part of the zoo, it keeps
its row log for the rest and writes no results; a run over the whole zoo (here made of the two cells) writes them."""
import json
import math
import shutil

import pytest
import torch

from sit_workbench.studies import remeasure as study
from sit_workbench.studies.zoo import get_setting, results_path, save_results

CELLS = ["linear-score", "vp-noise"]
FIELDS = {"model", "steps", "train_seed", "converged_fid", "converged_fid_std", "converged_nfe", "fid_50", "fid_250",
          "nll_bpd", "nll_bpd_se", "heldout_loss", "heldout_loss_se", "heldout_loss_bins", "nn_ratio", "accuracy",
          "seconds", "fids"}


def test_quick_study_resumes_and_completes(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("SIT_WORKBENCH_ZOO", str(tmp_path / "zoo"))
    # another study's results of the same setting, to be joined with the re-measurement at the end
    save_results("design_space", "quick", [{"model": "linear-score", "digits_fid": 99.0}, {"model": "not a cell"}],
                 zoo_steps={"linear-score": 150})
    real, calls = study.measure_row, []
    def counted(*a, stop_at=None, **k):
        calls.append(a[:4])
        if stop_at is not None and len(calls) == stop_at: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(study, "measure_row", lambda *a, **k: counted(*a, stop_at=4, **k))
    with pytest.raises(KeyboardInterrupt):
        study.run_study("quick", models=CELLS)
    first = list(calls)
    monkeypatch.setattr(study, "measure_row", counted)
    calls.clear()
    part = study.run_study("quick", models=CELLS)
    plan = [(n, st, 0) for st in (75, 150) for n in CELLS] + [(n, 150, k) for n in CELLS for k in (1, 2)]
    assert [c[0] for c in first[:3]] + [c[0] for c in calls] == [p[0] for p in plan]   # 3 rows kept, the rest measured
    assert [(c[0], c[2], c[3]) for c in calls] == plan[3:]
    # two cells of the zoo: no results file, the row log stays for the other cells, the other studies untouched
    log = results_path(study.STUDY, "quick").with_suffix(".partial.jsonl")
    assert not results_path(study.STUDY, "quick").exists() and log.exists()
    assert part["partial"] and part == study.results_so_far("quick")
    assert {(r["model"], r["steps"], r["train_seed"]) for r in part["rows"] if r["role"] != "reference"} == set(plan)
    assert part["final_steps"] == {n: 150 for n in CELLS} and len(part["cells"]) == 2
    assert "reference_rows" not in json.loads(results_path("design_space", "quick").read_text())
    # each cell's final rung keeps its samples' features beside the results: the zoo's copies may go (another machine)
    kept = results_path(study.STUDY, "quick").parent / "remeasure-kept"
    assert sorted(p.name for p in kept.iterdir()) == [f"{n}-150.pt" for n in CELLS]
    shutil.rmtree(tmp_path / "zoo" / "quick" / "remeasure-features")
    # once the whole zoo is measured (here: a zoo of these two cells), the run measures nothing more and finishes
    calls.clear()
    monkeypatch.setattr(study, "ZOO", {n: study.ZOO[n] for n in CELLS})
    res = study.run_study("quick")
    assert calls == [] and not log.exists() and study.results_so_far("quick") is None
    assert json.loads(results_path(study.STUDY, "quick").read_text()) == res

    rows = [r for r in res["rows"] if r["role"] != "reference"]
    assert [r["model"].split(":")[0] for r in res["rows"] if r["role"] == "reference"] == ["floor", "memoriser"]
    assert {(r["model"], r["steps"], r["train_seed"]) for r in rows} == set(plan)
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["n"] == 200 and r["nll_images"] == 40 and len(r["heldout_loss_bins"]) == 10
        assert r["converged_nfe"] in (10, 20, 50) and r["fid_50"] is not None and r["fid_250"] is None
        # a Linear score cell's ladder walks the shifted grid, its 50-NFE column the uniform grid's, measured beside it;
        # an SBDM-VP noise cell's walks the uniform one (registry.default_grid)
        grid = {"linear-score": "shift:4", "vp-noise": "uniform"}[r["model"]]
        assert r["ladder_grid"] == grid and ("fids_uniform" in r) == (grid != "uniform")
        assert r["fid_50"] == (r["fids_uniform"] if grid != "uniform" else r["fids"])["50"]
        assert math.isfinite(r["nll_bpd"]) and r["nll_bpd_se"] > 0 and r["nn_ratio"] > 0
    assert (tmp_path / "zoo" / "quick" / "vp-noise-seed2" / "checkpoint-150").is_dir()
    cells = {c["model"]: c for c in res["cells"]}
    assert set(cells) == set(CELLS) and all(c["train_seeds"] == [0, 1, 2] for c in cells.values())
    assert all(c["converged_fid_seed_std"] >= 0 for c in cells.values())
    (p,) = res["paired"]
    assert (p["a"], p["b"]) == tuple(CELLS) and p["fid_diff_lo"] <= p["fid_diff"] <= p["fid_diff_hi"]
    by = {(r["model"], r["train_seed"]): r for r in rows if r["steps"] == 150}
    assert abs(p["fid_diff"] - (by["linear-score", 0]["converged_fid"] - by["vp-noise", 0]["converged_fid"])) < 1e-9
    assert study.cell_table(res)[0]["model"].startswith("floor") and len(study.seed_table(res)) == 2
    assert all(r["train_seeds"] == [r["train_seed"]] for r in rows)

    joined = json.loads(results_path("design_space", "quick").read_text())
    (floor, memo), (cell, other) = joined["reference_rows"], joined["rows"]
    assert floor["role"] == memo["role"] == "reference" and floor["digits_fid"] == res["rows"][0]["digits_fid"]
    assert cell["digits_fid"] == 99.0 and cell["train_seeds"] == [0, 1, 2] and cell["remeasured_steps"] == 150
    assert cell["converged_fid"] == by["linear-score", 0]["converged_fid"] and cell["nll_bpd"] == by["linear-score", 0]["nll_bpd"]
    assert cell["converged_fid_seed_std"] == cells["linear-score"]["converged_fid_seed_std"] and "nll_bpd" not in other
