"""The committed results of the exploratory notebooks (nbs/15-18): made with the code's full setting, complete, and
the numbers the README quotes are the ones in the files."""
import dataclasses
import re
from pathlib import Path

import pytest

from sit_workbench.studies import convergence, design_space, diffusion_coefficient, nfe, path_length, remeasure
from sit_workbench.studies.zoo import SETTINGS, ZOO, final_steps, load_results, results_path

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {path_length: 15, nfe: 3 * 2 * (8 + 6 + 5), diffusion_coefficient: 6 * 4 + 2 * 4 * 2, design_space: 6}


def _setting_dict(s):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}


@pytest.mark.parametrize("mod", list(STUDIES), ids=lambda m: m.STUDY)
def test_committed_results_use_the_converged_zoo(mod, monkeypatch):
    """The four studies of nbs/15-18 ran with the full setting on the zoo the convergence study left: every model at
    the rung where it converged, or at the cap."""
    monkeypatch.chdir(ROOT)
    res = load_results(mod.STUDY, "full")
    assert res["setting"] == _setting_dict(SETTINGS["full"])
    assert res["zoo_steps"] == {name: final_steps(name, "full") for name in ZOO}
    assert len(res["rows"]) == STUDIES[mod]
    assert all(r.get("n") in (None, 1000) for r in res["rows"])


def test_convergence_results_match_the_full_setting(monkeypatch):
    monkeypatch.chdir(ROOT)
    res = load_results(convergence.STUDY, "full")
    assert res["setting"] == _setting_dict(SETTINGS["full"])
    cells = {r["model"] for r in res["rows"]}
    assert cells == set(ZOO)
    for name in ZOO:   # every cell either converged or reached the cap
        rows = sorted((r for r in res["rows"] if r["model"] == name), key=lambda r: r["steps"])
        assert [r["steps"] for r in rows] == list(SETTINGS["full"].ladder[:len(rows)])
        assert rows[-1]["converged"] or rows[-1]["steps"] == SETTINGS["full"].max_steps
        assert not any(r["converged"] for r in rows[:-1]) and all(r["n"] == 1000 for r in rows)


def _readme_section(title):
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_quotes_the_committed_numbers(monkeypatch):
    monkeypatch.chdir(ROOT)
    section = _readme_section("## Reproduce the paper's design-space study")
    quoted = re.findall(r"\b\d+\.\d{2,3} ± \d+\.\d{2,3}\b", section)
    assert quoted, "the README section quotes no measured numbers"
    produced = set()
    for row in path_length.table(load_results("path_length")):
        produced |= {row[p] for p in path_length.INTERPOLANTS}
    for row in nfe.crossover_table(load_results("nfe")) + nfe.solver_table(load_results("nfe")):
        produced |= {v for v in row.values() if isinstance(v, str) and "±" in v}
    w_t = load_results("w_t")
    for r in w_t["rows"]:   # seed 0's values at the fixed budget and the paper's, and the converged cells
        produced |= {f"{f:.2f} ± {e:.2f}" for f, e in (diffusion_coefficient.at_budget(r),
                                                       diffusion_coefficient.at_budget(r, diffusion_coefficient.PAPER_NFE))}
    produced |= {f"{c['fid']:.2f} ± {c['err']:.2f}" for c in diffusion_coefficient.converged_cells(w_t).values()}
    produced |= {v for row in diffusion_coefficient.fid_table(w_t) for v in row.values() if isinstance(v, str) and "±" in v}
    for row in design_space.walk_table(load_results("design_space")):
        produced.add(row["digits-FID (ours)"])
    produced |= {f"{r['digits_fid']:.2f} ± {r['digits_fid_std']:.2f}" for r in load_results("convergence")["rows"]}
    rem = load_results(remeasure.STUDY)
    produced |= {r["converged FID"] for r in remeasure.cell_table(rem) + remeasure.seed_table(rem)}
    # paired NLL differences between cells, quoted by size ("0.887 ± 0.016 bits/dim below")
    produced |= {f"{abs(p['nll_bpd_diff']):.3f} ± {p['nll_bpd_diff_se']:.3f}" for p in rem["paired"]}
    missing = [q for q in quoted if q not in produced]
    assert not missing, f"README numbers not in the committed results: {missing}"


def test_repa_results_are_complete(monkeypatch):
    "The committed REPA study (nbs/21_repa): every arm, training seed and rung of the full setting, 1,000 samples each."
    from sit_workbench.studies import repa
    monkeypatch.chdir(ROOT)
    path = results_path(repa.STUDY, "full")
    if not path.is_file(): pytest.skip(f"{path} is not there yet: `sit-workbench study repa --setting full` makes it")
    res = load_results(repa.STUDY, "full")
    assert res["ladder"] == list(repa.LADDERS["full"]) and res["seeds"] == list(repa.SEEDS["full"])
    got = {(r["objective"], r["seed"], r["steps"]) for r in res["rows"]}
    assert got == {(o, s, st) for o in repa.OBJECTIVES for s in res["seeds"] for st in res["ladder"]}
    assert all(r["n"] == SETTINGS["full"].num_samples for r in res["rows"])


def _paragraph(lead):
    "The README paragraph that starts with `lead` (up to the next blank line)."
    text = (ROOT / "README.md").read_text()
    start = text.index(lead)
    end = text.find("\n\n", start)
    return text[start:end if end > 0 else None]


def _quoted_values(doc) -> set:
    "Every 'x.xx ± y.yy' a results document can produce: FIDs with their errors, anywhere in it."
    out = set()
    def walk(o):
        if isinstance(o, dict):
            for a, b in (("digits_fid", "digits_fid_std"), ("best_fid", "best_fid_std"), ("flow_fid", "flow_fid_std")):
                if a in o and b in o: out.add(f"{o[a]:.2f} ± {o[b]:.2f}")
            for v in o.values(): walk(v)
        elif isinstance(o, list):
            for v in o: walk(v)
    walk(doc)
    return out


@pytest.mark.parametrize("study, lead", [("meanflow", "**MeanFlow on the digits**"),
                                         ("guidance", "**Guidance beyond CFG on the digits**")])
def test_readme_quotes_the_committed_numbers_of_the_new_studies(study, lead, monkeypatch):
    monkeypatch.chdir(ROOT)
    quoted = re.findall(r"\b\d+\.\d{2} ± \d+\.\d{2}\b", _paragraph(lead))
    assert quoted, f"the README paragraph {lead!r} quotes no measured numbers"
    missing = [q for q in quoted if q not in _quoted_values(load_results(study))]
    assert not missing, f"README numbers not in nbs/results/{study}.json: {missing}"


def test_claims_read_the_committed_results(monkeypatch):
    """nbs/14d_claims draws its lines from the committed results: each study that is there gives its claims with
    numbers (none left as "not measured yet"), each difference inside its interval."""
    from sit_workbench.studies import claims
    monkeypatch.chdir(ROOT)
    rows = claims.claims_table("full")
    there = {s for s in ("remeasure", "nfe", "path_length", "w_t") if results_path(s, "full").is_file()}
    measured = [r for r in rows if r["verdict"] != "not measured yet"]
    if "remeasure" in there: assert sum(r["source"].startswith("remeasure") for r in measured) == 2 * len(claims.DESIGN)
    if "nfe" in there: assert sum(r["source"].startswith("nfe") for r in measured) == len(claims.VELOCITY)
    if "path_length" in there: assert sum(r["source"].startswith("path_length") for r in measured) == 2
    if "w_t" in there:   # Table 6's six claims, and the SDE against the ODE converged for each velocity model
        assert sum(r["source"].startswith("w_t (") for r in measured) == 6
        assert sum(r["source"].startswith("w_t + remeasure") for r in measured) == len(claims.VELOCITY)
    for r in measured:
        assert r["lo"] <= r["diff"] <= r["hi"] and r["verdict"] in ("reproduced", "contradicted", "not resolvable at this scale")


def test_readme_gives_the_claims_table_as_the_committed_results_draw_it(monkeypatch):
    """The README's table of the paper's claims is nbs/14d_claims' `brief_table` of the committed results, line for
    line: a verdict or number in it changes when the measurements do, never by hand (paste the new table when this
    fails)."""
    from sit_workbench.studies import claims
    monkeypatch.chdir(ROOT)
    table = claims.brief_table(claims.claims_table("full"))
    assert table in (ROOT / "README.md").read_text(), "README's claims table differs from:\n" + table
