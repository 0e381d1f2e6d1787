"""
The report reads every record through one validating loader (grid_results.py): a record that is
not what it expects stops it in one line naming the file and the key, before it writes anything;
and it rewrites the README's headline block only from the repository's own results/.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from experiments import report
from conftest import HERE, error_of, snapshot


def change_json(relative, change):
    def damage(results):
        path = Path(os.path.normpath(results / relative))  # '../gpu/...': the GPU's runs beside the grid
        data = json.loads(path.read_text())
        path.write_text(json.dumps(change(data)))
        return path
    return damage


def append(relative, text):
    def damage(results):
        with open(results / relative, "a") as f:
            f.write(text)
        return results / relative
    return damage


def write(relative, text):
    def damage(results):
        (results / relative).write_text(text)
        return results / relative
    return damage


def first(key, value):
    """Set checkpoints[0][key] (a path of keys) to value."""
    def change(data):
        record = data["checkpoints"][0]
        for part in key[:-1]:
            record = record[part]
        record[key[-1]] = value
        return data
    return change


CASES = {
    "a-list": (change_json("ppl/rope-s0.json", lambda data: [data]), "holds list"),
    "no-ppl": (change_json("ppl/rope-s0.json", lambda data: {**data, "checkpoints": [
        {k: v for k, v in data["checkpoints"][0].items() if k != "ppl"}]}), "['checkpoints'][0]['ppl'] is missing"),
    "ppl-text": (change_json("ppl/fope-s1.json", first(("ppl", "768"), "4.2")),
                 "['checkpoints'][0]['ppl']['768'] is '4.2', not a finite number"),
    "nan": (change_json("sotu/alibi-s2.json", first(("ppl_ratio", "384"), float("nan"))),
            "['checkpoints'][0]['ppl_ratio']['384'] is 'nan', not a finite number"),
    "null-record": (change_json("passkey/rope-s2.json", lambda data: {**data, "checkpoints": [None]}),
                    "['checkpoints'][0] is 'None', not a record"),
    "accuracy-above-1": (change_json("passkey/fope-s0.json", first(("accuracy", "384"), 3)),
                         "['checkpoints'][0]['accuracy']['384'] is '3', not a number from 0 to 1"),
    "junk-step-line": (append("steps.jsonl", "not json\n"), "is not JSON"),
    "truncated-environment": (write("environment.json", '{"python": "3.11'), "is not JSON"),
    "foreign-analysis": (write("analysis/analysis.json", '{"figures": 5}'), "['checkpoints'] is missing"),
    "analysis-without-lengths": (change_json("analysis/analysis.json", first(("retrieval_attention", "lengths"), {})),
                                 "lacks the reference length"),
    "gpu-accuracy-above-1": (change_json("../gpu/passkey/cope-s0.json", first(("accuracy", "768"), 1.5)),
                             "['checkpoints'][0]['accuracy']['768'] is '1.5', not a number from 0 to 1"),
    "gpu-summary-without-runs": (change_json("../gpu_check_more.json", lambda data: {**data, "runs": None}),
                                 "['runs'] is 'None', not a record"),
}


@pytest.fixture(scope="module")
def committed_results(tmp_path_factory):
    """A copy of what the report reads from the committed results/: the default grid's JSON and
    readings (its figures and results.md left out), the GPU's evaluations and their summaries."""
    copy = tmp_path_factory.mktemp("results")
    shutil.copytree(HERE / "results" / "default", copy / "default",
                    ignore=shutil.ignore_patterns("*.png", "results.md"))
    shutil.copytree(HERE / "results" / "gpu", copy / "gpu")
    for summary in (HERE / "results").glob("gpu_check*.json"):
        shutil.copy(summary, copy)
    return copy


@pytest.mark.parametrize("case", CASES)
def test_a_record_the_report_cannot_read_stops_it_before_it_writes(committed_results, tmp_path, case):
    results = tmp_path / "default"
    shutil.copytree(committed_results, tmp_path, dirs_exist_ok=True)
    damage, named = CASES[case]
    path = damage(results)
    readme, before = (HERE / "README.md").read_bytes(), snapshot(tmp_path)
    message = error_of(report.main, ["--results_dir", str(tmp_path)])
    assert message.startswith(f"report.py: error: {path}") and named in message
    if case == "junk-step-line":
        assert f"{path} line {len((results / 'steps.jsonl').read_text().splitlines())}" in message
    assert snapshot(tmp_path) == before and (HERE / "README.md").read_bytes() == readme


def test_a_report_on_results_outside_the_repository_leaves_the_readme_alone(committed_results, tmp_path, capsys,
                                                                           monkeypatch):
    results = tmp_path / "default"
    shutil.copytree(committed_results, tmp_path, dirs_exist_ok=True)
    readme = (HERE / "README.md").read_bytes()
    report.main(["--results_dir", str(tmp_path)])
    assert (HERE / "README.md").read_bytes() == readme
    assert (results / "results.md").read_text() == (HERE / "results" / "default" / "results.md").read_text()
    assert f"left {HERE / 'README.md'} as it is" in capsys.readouterr().out
    # the README block is rewritten from the repository's own results/, or into the README named
    asked = []
    monkeypatch.setattr(report, "write_report", lambda grid, results_grid, readme: asked.append(readme))
    for argv in ([], ["--results_dir", str(HERE / "results")], ["--results_dir", str(tmp_path)],
                 ["--results_dir", str(tmp_path), "--readme", str(tmp_path / "README.md")]):
        report.main(argv)
    assert asked == [report.README, report.README, None, str(tmp_path / "README.md")]
