"""sample.py: a trained model's text, greedy or sampled, and one line for bad input."""

import pytest

import sample
from conftest import error_of, run_script


def test_a_sample_continues_the_prompt_as_a_user_runs_it(trained_run):
    _, run_dir = trained_run
    result = run_script("sample.py", "--ckpt", run_dir / "ckpt.pt", "--prompt", "Line 7:", "--max_new_tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Line 7:") and len(result.stdout) > len("Line 7:\n")


def test_greedy_is_top_k_one_and_a_seed_repeats_a_sample(trained_run, capsys):
    _, run_dir = trained_run
    common = ["--ckpt", str(run_dir / "ckpt.pt"), "--prompt", "the king", "--max_new_tokens", "30"]
    outputs = []
    for extra in (["--temperature", "0"], ["--temperature", "1.5", "--top_k", "1"],
                  ["--temperature", "1.5", "--seed", "3"], ["--temperature", "1.5", "--seed", "3"],
                  ["--temperature", "1.5", "--seed", "4"]):
        sample.main(common + extra)
        outputs.append(capsys.readouterr().out)
    greedy, top1, seeded, again, other = outputs
    assert greedy == top1                # sampling among one token is greedy decoding
    assert seeded == again != other      # the seed decides the sample


@pytest.mark.parametrize("args, words", [
    (["--prompt", ""], "--prompt is empty"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top_k", "0"], "--top_k must be at least 1"),
])
def test_bad_input_is_one_line(trained_run, args, words):
    _, run_dir = trained_run
    assert words in error_of(sample.main, ["--ckpt", str(run_dir / "ckpt.pt"), *args])


def test_a_missing_or_damaged_checkpoint_is_one_line(tmp_path):
    assert "does not exist" in error_of(sample.main, ["--ckpt", str(tmp_path / "none.pt")])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert "unreadable" in error_of(sample.main, ["--ckpt", str(tmp_path / "bad.pt")])
