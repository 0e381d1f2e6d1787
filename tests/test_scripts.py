"""
Training and perplexity as a user runs them: train.py, its checkpoints and resume, eval_ppl.py,
and bad input answered in one line.
"""

import json
import os
import random
import re
import signal

import numpy as np
import pytest
import torch

from lib import checkpoint
import analyze
import eval_passkey
import eval_ppl
from experiments import report
from lib import hardware
from lib import runs
from lib import settings as run_settings
from lib import tokenizer
import sample
import train
from fope_gpt import FOPE_DEPLOYED, POSITION_EMBEDDINGS
from conftest import dead_pid, error_of, is_png, logged_losses, plotted_lines, snapshot, tiny_run_args


def test_a_run_is_named_by_every_setting_that_changes_what_is_trained():
    settings = {**run_settings.DEFAULTS, "pe": "fope", "vocab_size": 257, "seed": 1, "max_steps": 50, "eval_batches": 3}
    # vocab_size and seed change the model; max_steps may grow on resume and eval_batches only measures
    assert run_settings.run_name(settings, "cpu") == "fope-seed1-vocab_size257"
    assert run_settings.run_name({**run_settings.DEFAULTS, "pe": "rope"}, "cpu") == "rope"


def help_entries(main, capsys):
    """{flag: its help, whitespace folded} of a script's --help, and the flags it requires."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    usage, options = text.split("\n\n", 1)[0], text.split("\noptions:\n", 1)[1]
    optional = set(re.findall(r"\[(--\w+)", usage))
    entries = {}
    for entry in re.split(r"\n(?=  -)", options.strip("\n")):  # an option's lines, up to the next option
        flag = entry.split()[0]
        entries[flag] = " ".join(entry.split())
    return entries, set(entries) - optional - {"-h,"}


@pytest.mark.parametrize("main", [train.main, eval_ppl.main, eval_passkey.main, analyze.main, report.main, sample.main],
                         ids=["train", "eval_ppl", "eval_passkey", "analyze", "report", "sample"])
def test_every_option_of_every_script_shows_its_default_and_its_choices(main, capsys):
    entries, required = help_entries(main, capsys)
    assert required == ({"--ckpt"} if main in (eval_ppl.main, eval_passkey.main, analyze.main, sample.main) else set())
    for flag, entry in entries.items():
        if flag in required or flag == "-h,":
            continue
        assert re.search(r"default: (?!None\b)\S", entry), entry  # a value or words, never a bare None
        choices = re.match(r"--\w+ \{([^}]*)\}", entry)
        assert choices is None or len(choices.group(1).split(",")) >= 2, entry
    if main is train.main:  # every setting is a flag, whatever declares it
        assert {run_settings.flag(key) for key in run_settings.DEFAULTS} <= set(entries)
        assert entries["--pe"].startswith("--pe {" + ",".join(POSITION_EMBEDDINGS) + "}")
        assert entries["--dtype"].startswith("--dtype {auto,bf16,fp32}")


def test_a_short_training_run_lowers_the_loss_and_leaves_a_checkpoint(trained_run):
    _, run_dir = trained_run
    losses = [loss for _, loss, _ in logged_losses(run_dir) if loss is not None]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # nats, from about ln(300) = 5.7
    state = checkpoint.load_checkpoint(str(run_dir / "ckpt.pt"))
    assert state["step"] == 30 and state["model_config"]["pe"] == "fope"
    model = checkpoint.model_from_checkpoint(state)
    assert model(torch.zeros(1, 100, dtype=torch.long))[0].shape == (1, 100, state["model_config"]["vocab_size"])


def test_a_stopped_and_resumed_run_repeats_the_uninterrupted_losses(trained_run, tmp_path, monkeypatch, capsys):
    uninterrupted = logged_losses(trained_run[1])
    save = train.save_checkpoint

    def save_then_stop(path, state):  # Ctrl-C while the first checkpoint is written: the stop waits for it
        signal.raise_signal(signal.SIGINT)
        save(path, state)

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_run_args(tmp_path, "--pe", "fope"))
    assert stop.value.code == 130 and capsys.readouterr().err == (
        "train.py: stopped at step 10 (SIGINT); the checkpoint is at step 10; continue with --resume\n")
    monkeypatch.setattr(train, "save_checkpoint", save)
    run_dir = tmp_path / "out" / "tiny"
    stopped_at = checkpoint.load_checkpoint(str(run_dir / "ckpt.pt"))
    assert stopped_at["step"] == 10
    # what a kill -9 a little later leaves: its lock, a log line cut short, a half-written checkpoint
    (run_dir / "train.lock").write_text(f"{dead_pid()}\n")
    with open(run_dir / "log.jsonl", "a") as log:
        log.write('{"step": 11, "loss": 4.1')
    (run_dir / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    train.main(tiny_run_args(tmp_path, "--pe", "fope", "--resume"))
    assert logged_losses(run_dir) == uninterrupted
    assert sorted(os.listdir(run_dir)) == ["ckpt.pt", "config.json", "log.jsonl"]  # the lock is released
    # the checkpoint adds the second process's training time to the first's, and names the machine
    assert stopped_at["trained"]["machines"] == [f"{hardware.machine_name('cpu')} ({os.cpu_count()} cores)"]
    trained = checkpoint.load_checkpoint(str(run_dir / "ckpt.pt"))["trained"]
    assert trained["machines"] == stopped_at["trained"]["machines"]
    assert trained["seconds"] > stopped_at["trained"]["seconds"] > 0


def test_eval_ppl_writes_numbers_and_a_figure(trained_run, tmp_path):
    data_dir, run_dir = trained_run
    out = tmp_path / "ppl.json"
    eval_ppl.main(["--ckpt", str(run_dir / "ckpt.pt"), "--lengths", "16,32,64,128", "--data_dir",
                   str(data_dir / "data"), "--out", str(out)])
    report = json.loads(out.read_text())
    ppl = report["checkpoints"][0]["ppl"]
    assert list(ppl) == ["16", "32", "64", "128"] and all(1 < p < 300 for p in ppl.values())
    assert is_png(tmp_path / "ppl.png")
    # the figure shows the JSON's perplexities at their lengths, and train_len dashed
    ax = eval_ppl.draw(report["checkpoints"], "perplexity", "ppl").axes[0]
    assert plotted_lines(ax) == {"fope": ([16, 32, 64, 128], list(ppl.values()))}
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [32]


def prose(seed, sentences=20):
    """Deterministic sentences of prose, unlike the tiny run's lines of play text."""
    rng = random.Random(seed)
    subjects = ["The committee", "Our merchants", "The treasury", "A traveller", "The harbour master"]
    verbs = ["reported", "doubted", "observed", "recommended", "considered"]
    objects = ["that the roads were poor", "a new canal", "the price of grain", "the frontier", "the coming winter"]
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} in {1800 + i}."
                    for i in range(sentences)) + "\n"


def test_eval_ppl_reads_another_text_with_the_checkpoints_tokenizer(trained_run, tmp_path):
    _, run_dir = trained_run
    folder = tmp_path / "letters"
    folder.mkdir()
    (folder / "a.txt").write_text(prose(0))
    (folder / "b.md").write_text(prose(1))
    out = tmp_path / "ppl.json"
    eval_ppl.main(["--ckpt", str(run_dir / "ckpt.pt"), "--text", str(folder), "--lengths", "16,32", "--dtype", "fp32",
                   "--out", str(out)])
    result = json.loads(out.read_text())["checkpoints"][0]
    state = checkpoint.load_checkpoint(str(run_dir / "ckpt.pt"))
    enc = tokenizer.encoding_from_state(state["tokenizer"])
    tokens = enc.encode_ordinary(prose(0)) + [enc.eot_token] + enc.encode_ordinary(prose(1))  # joined as in training
    assert result["text"] == str(folder.resolve()) and result["text_tokens"] == len(tokens)
    loss, count = eval_ppl.chunked_ppl(checkpoint.model_from_checkpoint(state), np.array(tokens), 32, 4, "cpu", "fp32")
    assert result["loss"]["32"] == pytest.approx(loss, rel=1e-5) and result["tokens"]["32"] == count


def test_perplexity_on_another_text_differs_from_the_validation_split(trained_run, tmp_path):
    data_dir, run_dir = trained_run
    text = tmp_path / "prose.txt"
    text.write_text(prose(0))
    args = ["--ckpt", str(run_dir / "ckpt.pt"), "--lengths", "16,32", "--data_dir", str(data_dir / "data"),
            "--dtype", "fp32"]
    eval_ppl.main([*args, "--out", str(tmp_path / "val.json")])
    eval_ppl.main([*args, "--text", str(text), "--max_tokens", "500", "--out", str(tmp_path / "prose.json")])
    val, other = (json.loads((tmp_path / name).read_text())["checkpoints"][0] for name in ("val.json", "prose.json"))
    validation = runs.validation_tokens(checkpoint.load_checkpoint(str(run_dir / "ckpt.pt")), str(data_dir / "data"))
    assert val["text"] == "validation" and val["text_tokens"] == len(validation)
    assert other["text"] == str(text.resolve()) and other["text_tokens"] == 500
    # a model of the king-and-fool lines finds the prose far less predictable than its held-out lines
    assert all(other["ppl"][length] > 2 * val["ppl"][length] for length in ("16", "32"))


def test_chunked_perplexity_averages_every_target_of_every_chunk(trained_run):
    data_dir, run_dir = trained_run
    model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(str(run_dir / "ckpt.pt")))
    tokens = torch.randint(0, model.config.vocab_size, (100,)).numpy()
    loss, count = eval_ppl.chunked_ppl(model, tokens, 32, 2, "cpu", "fp32")
    assert count == 3 * 31  # three chunks of 32 tokens, 31 targets each; the tail is dropped
    losses = [model(torch.from_numpy(tokens[i:i + 32]).long()[None, :-1],
                    torch.from_numpy(tokens[i + 1:i + 32]).long()[None])[1].item() for i in (0, 32, 64)]
    assert loss == pytest.approx(sum(losses) / 3, rel=1e-5)


# -----------------------------------------------------------------------------
# bad input: one clear line, a non-zero exit, and nothing lost


def test_an_unknown_pe_or_option_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_run_args(tmp_path, "--pe", "xpos"))
    assert exit_info.value.code == 2 and "argument --pe: invalid choice: 'xpos'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_run_args(tmp_path, "--pe", "rope", "--n_layers", "3"))
    assert exit_info.value.code == 2 and "unrecognized arguments: --n_layers" in capsys.readouterr().err


def test_a_missing_dataset_path_is_named(tmp_path):
    message = error_of(train.main, tiny_run_args(tmp_path, "--pe", "rope", "--dataset", str(tmp_path / "nope.txt")))
    assert "nope.txt" in message and "not found" in message


def test_an_existing_run_is_never_overwritten_without_resume(trained_run):
    data_dir, run_dir = trained_run
    before = snapshot(run_dir)
    message = error_of(train.main, tiny_run_args(data_dir, "--pe", "fope"))
    assert "pass --resume" in message
    assert snapshot(run_dir) == before


def test_resuming_with_a_different_config_is_refused(trained_run):
    data_dir, run_dir = trained_run
    before = snapshot(run_dir)
    message = error_of(train.main, tiny_run_args(data_dir, "--pe", "fope", "--n_embd", "64", "--resume"))
    assert "n_embd=32" in message and "--n_embd 64" in message
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_a_bad_checkpoint_is_named(trained_run, tmp_path, damage):
    good = (trained_run[1] / "ckpt.pt").read_bytes()
    path = tmp_path / "ckpt.pt"
    if damage == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 100)
    message = error_of(eval_ppl.main, ["--ckpt", str(path), "--out", str(tmp_path / "ppl.json")])
    assert str(path) in message and ("does not exist" if damage == "missing" else "unreadable") in message
    assert not (tmp_path / "ppl.json").exists()


def test_a_length_longer_than_the_validation_split_is_refused(trained_run, tmp_path):
    data_dir, run_dir = trained_run
    message = error_of(eval_ppl.main, ["--ckpt", str(run_dir / "ckpt.pt"), "--lengths", "32,1000000",
                                       "--data_dir", str(data_dir / "data"), "--out", str(tmp_path / "ppl.json")])
    assert "1000000" in message and "validation split" in message


@pytest.mark.parametrize("text, named", [("missing.txt", "text not found"), ("empty-folder", "no .txt or .md files"),
                                         ("empty.txt", "larger than the text")])
def test_a_bad_text_is_named_before_any_evaluation(trained_run, tmp_path, capsys, text, named):
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "ppl.json"
    message = error_of(eval_ppl.main, ["--ckpt", str(trained_run[1] / "ckpt.pt"), "--text", str(tmp_path / text),
                                       "--lengths", "16,32", "--out", str(out)])
    assert message.startswith("eval_ppl.py: error:") and text in message and named in message
    assert capsys.readouterr().out == "" and not out.exists()


def test_an_unknown_text_name_is_refused_naming_the_known_one(trained_run, tmp_path):
    message = error_of(eval_ppl.main, ["--ckpt", str(trained_run[1] / "ckpt.pt"), "--text", "austen",
                                       "--out", str(tmp_path / "ppl.json")])
    assert "text not found: austen" in message and "'sotu'" in message
    assert not (tmp_path / "ppl.json").exists()


@pytest.mark.parametrize("eval_interval", [1, 100])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, eval_interval):
    args = tiny_run_args(tmp_path, "--pe", "rope", "--lr", "1e4", "--warmup_steps", "1",
                         "--eval_interval", str(eval_interval), "--dtype", "fp32")
    message = error_of(train.main, args)
    ckpt = tmp_path / "out" / "tiny" / "ckpt.pt"
    if eval_interval == 1:
        assert "loss became" in message and "last good checkpoint" in message
        state = checkpoint.load_checkpoint(str(ckpt))
        assert all(torch.isfinite(p).all() for p in state["model"].values())
    else:  # diverged before the first checkpoint: no checkpoint is said to be kept
        assert "loss became" in message and "no checkpoint was written yet" in message and "kept" not in message
        assert not ckpt.exists()


@pytest.mark.parametrize("grow", ["fresh", "zeros"])
def test_fope_coefficients_grow_when_a_run_continues_at_a_longer_length(trained_run, grow):
    data_dir, run_dir = trained_run
    old = checkpoint.load_checkpoint(str(run_dir / "ckpt.pt"))["model"]["blocks.0.attn.pos.sin_coef"]
    args = tiny_run_args(data_dir, "--pe", "fope", "--train_len", "64", "--max_steps", "1", "--run_name", f"ext-{grow}",
                         "--init_from", str(run_dir / "ckpt.pt"), "--fope_grow", grow)
    train.main(args)
    new = checkpoint.load_checkpoint(str(data_dir / "out" / f"ext-{grow}" / "ckpt.pt"))["model"]["blocks.0.attn.pos.sin_coef"]
    assert old.shape == (2, 2, 2) and new.shape == (2, 3, 3)   # head_dim 16: K = M = 2 at L 32, 3 at L 64
    assert torch.equal(new[:, :2, :2], old)                    # the trained block is kept
    outside = torch.cat((new[:, 2, :].flatten(), new[:, :2, 2].flatten()))
    assert (outside == 0).all() == (grow == "zeros")
    if grow == "fresh":
        assert torch.all((new[:, 2, 2] - 1).abs() < 0.5)       # the new frequency gets its identity weight


def test_eval_ppl_applies_context_extension_to_a_checkpoint(trained_run, tmp_path):
    data_dir, run_dir = trained_run
    out = tmp_path / "ppl.json"
    eval_ppl.main(["--ckpt", str(run_dir / "ckpt.pt"), "--lengths", "32,128", "--data_dir", str(data_dir / "data"),
                   "--out", str(out), "--rope_scaling", "yarn", "--rope_scale", "4"])
    result = json.loads(out.read_text())["checkpoints"][0]
    assert result["model_config"]["rope_scaling"] == "yarn" and result["model_config"]["rope_scale"] == 4
    assert runs.label_runs([result]) == ["fope+yarn4"]


def test_the_deployed_fope_variant_sets_its_switches_and_a_flag_given_wins():
    deployed = run_settings.parse_args(["--pe", "fope", "--fope_variant", "deployed"])[1]
    assert {key: deployed[key] for key in FOPE_DEPLOYED} == FOPE_DEPLOYED
    assert run_settings.parse_args(["--pe", "fope"])[1]["fope_cap"] is True   # released: the authors' cap
    overridden = run_settings.parse_args(["--fope_variant", "deployed", "--fope_sigma", "0.3"])[1]
    assert overridden["fope_sigma"] == 0.3 and overridden["fope_shared"] is True
    assert run_settings.run_name(deployed, "cpu") == "fope-fope_variantdeployed"
