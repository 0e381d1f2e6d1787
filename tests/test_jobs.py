"""
The scheduler of several processes at once (experiments/jobs.py), with tiny fake steps: shell
commands of a line of Python each.
"""

import json
import os
import sys

import pytest

from experiments import jobs


def stamp(path, seconds=0.0, rc=0):
    """A step that writes when it ran, its thread count and its memory cap into path, sleeps, and
    exits with rc."""
    code = ("import json, os, sys, time; start = time.time(); time.sleep(float(sys.argv[2])); "
            "json.dump({'start': start, 'end': time.time(), 'threads': os.environ['OMP_NUM_THREADS'], "
            "'fraction': os.environ.get('JOBS_MEMORY_FRACTION')}, open(sys.argv[1], 'w')); "
            "print('some output'); sys.exit(int(sys.argv[3]))")
    return [sys.executable, "-c", code, str(path), str(seconds), str(rc)]


def ran(tmp_path, name):
    with open(tmp_path / f"{name}.json") as f:
        return json.load(f)


def test_two_run_at_once_each_told_its_threads_and_a_step_waits_for_what_it_needs(tmp_path, capsys):
    steps = [jobs.Step(name, stamp(tmp_path / f"{name}.json", 0.6), needs=needs, log=str(tmp_path / f"{name}.log"))
             for name, needs in (("a", []), ("b", []), ("c", ["a"]), ("d", []))]
    jobs.run(steps, 2)
    assert [step.status for step in steps] == ["done"] * 4
    a, b, c, d = (ran(tmp_path, name) for name in "abcd")
    assert a["start"] < b["end"] and b["start"] < a["end"]  # side by side
    assert c["start"] >= a["end"] and c["start"] < d["end"] and d["start"] < c["end"]  # c after a, beside d
    assert {r["threads"] for r in (a, b, c, d)} == {str(max(1, (os.cpu_count() or 1) // 2))}
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[1/4] start a (") and "log " in out[0]
    assert any(line.startswith("[1/4] done a in 0:00:0") for line in out)
    assert (tmp_path / "a.log").read_text().endswith("some output\n")


def test_one_at_a_time_keeps_the_order(tmp_path):
    steps = [jobs.Step(name, stamp(tmp_path / f"{name}.json"), log=str(tmp_path / f"{name}.log")) for name in "abc"]
    jobs.run(steps, 1)
    starts = [ran(tmp_path, name)["start"] for name in "abc"]
    assert starts == sorted(starts) and ran(tmp_path, "a")["threads"] == str(os.cpu_count() or 1)


def test_a_failed_step_stops_only_what_needs_it_in_one_line(tmp_path, capsys):
    steps = [jobs.Step("broken", stamp(tmp_path / "broken.json", rc=3), log=str(tmp_path / "broken.log")),
             jobs.Step("its eval", stamp(tmp_path / "e.json"), needs=["broken"]),
             jobs.Step("eval of its eval", stamp(tmp_path / "ee.json"), needs=["its eval"]),
             jobs.Step("other", stamp(tmp_path / "o.json"), log=str(tmp_path / "o.log")),
             jobs.Step("after other", stamp(tmp_path / "ao.json"), needs=["other"], log=str(tmp_path / "ao.log"))]
    jobs.run(steps, 2)
    assert {s.name: s.status for s in steps} == {"broken": "failed", "its eval": "skipped", "eval of its eval": "skipped",
                                                 "other": "done", "after other": "done"}
    failed = [line for line in capsys.readouterr().out.splitlines() if "broken" in line and " start " not in line]
    assert failed[1:] == [] and failed[0].startswith("[1/5] FAILED broken (exit status 3); its log: ")
    assert failed[0].endswith(f"{tmp_path}/broken.log; not run: its eval, eval of its eval")
    assert not (tmp_path / "e.json").exists() and steps[1].why == "broken failed"


def test_a_step_alone_waits_for_the_others_to_end_and_nothing_starts_beside_it(tmp_path):
    steps = [jobs.Step("a", stamp(tmp_path / "a.json", 0.3)),
             jobs.Step("bench", stamp(tmp_path / "bench.json", 0.3), after=["a"], alone=True),
             jobs.Step("c", stamp(tmp_path / "c.json", 0.8)), jobs.Step("d", stamp(tmp_path / "d.json"))]
    jobs.run(steps, 2)
    a, bench, c, d = (ran(tmp_path, name) for name in ("a", "bench", "c", "d"))
    assert c["start"] < a["end"]  # before the alone step is ready, the others go on
    assert bench["start"] >= c["end"] and d["start"] >= bench["end"] and steps[1].beside == []


def test_at_the_deadline_what_runs_is_stopped_and_what_did_not_fit_is_named(tmp_path, capsys):
    steps = [jobs.Step("long", stamp(tmp_path / "long.json", 60), estimate_s=1),
             jobs.Step("too long", stamp(tmp_path / "x.json"), estimate_s=100)]
    import time
    start = time.time()
    jobs.run(steps, 2, deadline=start + 1.5)
    assert time.time() - start < 10 and [s.status for s in steps] == ["stopped", "not started"]
    assert "did not fit in the budget left" in steps[1].why
    assert "[1/2] stopped long (the budget ran out)" in capsys.readouterr().out


def test_on_a_gpu_a_step_starts_only_when_its_cap_is_free_and_runs_under_it(tmp_path, monkeypatch):
    card, free = 100.0, {"gib": 80.0}
    monkeypatch.setattr(jobs.Runner, "free_gib", lambda self, total=False: card if total else free["gib"])
    steps = [jobs.Step("train", ["python", "train.py"], memory_gib=4), jobs.Step("eval", ["python", "x.py"]),
             jobs.Step("wide", ["python", "-m", "experiments.bench"], memory_gib=70)]
    runner = jobs.Runner(steps, jobs=4, device="cuda")
    assert steps[1].memory_gib == pytest.approx(jobs.MEMORY_SHARE * card / 4)  # no cap given: an equal share
    assert runner.memory_allows(steps[0])
    free["gib"] = 3.0  # less than its cap is free: it waits
    assert not runner.memory_allows(steps[0])
    free["gib"] = 80.0
    launched = {}

    class Started:  # stands in for a process: records what it was started with
        def __init__(self, command, env, **kwargs):
            launched.update(command=command, env=env)
            self.pid = 0

    monkeypatch.setattr(jobs.subprocess, "Popen", Started)
    runner.launch(steps[0])
    assert float(launched["env"]["JOBS_MEMORY_FRACTION"]) == pytest.approx(0.04)
    assert launched["command"][1:3] == ["-c", "from experiments.jobs import wrapper; wrapper()"]
    assert launched["command"][3:] == ["train.py"] and launched["env"]["OMP_NUM_THREADS"] == str(
        jobs.threads_per_job(4))
    runner.launch(steps[1])  # 4 + 22.5 GiB held: 70 more would pass 90% of the card
    assert not runner.memory_allows(steps[2])


def test_the_wrapper_runs_a_script_or_a_module_and_writes_the_peak_memory(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import sys; print(sys.argv[1:])\n")
    peak = tmp_path / "peak.json"
    steps = [jobs.Step("script", [sys.executable, str(script), "x"], peak_file=str(peak), log=str(tmp_path / "s.log")),
             jobs.Step("module", [sys.executable, "-m", "json.tool", "--help"], peak_file=str(tmp_path / "p2.json"),
                       log=str(tmp_path / "m.log"))]
    jobs.run(steps, 2)
    assert [s.status for s in steps] == ["done", "done"]
    assert "['x']" in (tmp_path / "s.log").read_text() and "usage" in (tmp_path / "m.log").read_text()
    assert json.loads(peak.read_text())["peak_mb"] > 0


def test_the_simulation_follows_the_same_rules():
    steps = [jobs.Step("train a", []), jobs.Step("train b", []), jobs.Step("eval a", [], needs=["train a"]),
             jobs.Step("eval b", [], needs=["train b"])]
    seconds = {"train a": 10, "train b": 20, "eval a": 5, "eval b": 5}
    assert jobs.simulate(steps, 1, seconds) == 40
    assert jobs.simulate(steps, 2, seconds) == 25  # eval a runs beside train b
    assert jobs.simulate(steps[2:], 2, seconds) == 5  # trainings done before: nothing to wait for


def test_a_step_waiting_for_one_that_is_not_there_is_refused():
    with pytest.raises(ValueError, match="'train z'"):
        jobs.Runner([jobs.Step("eval z", [], needs=["train z"])], 1)
