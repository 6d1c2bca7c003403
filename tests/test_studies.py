"""The committed results of the exploratory notebooks (nbs/15-18): made with the code's full setting, complete, and
the numbers the README quotes are the ones in the files."""
import dataclasses
import re
from pathlib import Path

import pytest

from sit_workbench.studies import design_space, diffusion_coefficient, nfe, path_length
from sit_workbench.studies.zoo import SETTINGS, load_results

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {path_length: 9, nfe: 3 * 2 * (8 + 6 + 5), diffusion_coefficient: 24, design_space: 6}


@pytest.mark.parametrize("mod", list(STUDIES), ids=lambda m: m.STUDY)
def test_committed_results_match_the_full_setting(mod, monkeypatch):
    monkeypatch.chdir(ROOT)
    res = load_results(mod.STUDY, "full")
    assert res["setting"] == {k: list(v) if isinstance(v, tuple) else v
                              for k, v in dataclasses.asdict(SETTINGS["full"]).items()}
    assert len(res["rows"]) == STUDIES[mod]
    assert all(r.get("n") in (None, 1000) for r in res["rows"])


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
    for row in diffusion_coefficient.fid_table(load_results("w_t")):
        produced |= {v for v in row.values() if isinstance(v, str) and "±" in v}
    for row in design_space.walk_table(load_results("design_space")):
        produced.add(row["digits-FID (ours)"])
    missing = [q for q in quoted if q not in produced]
    assert not missing, f"README numbers not in the committed results: {missing}"
