"""The error model: a MetrankError is one line and exit status 2; anything else is a bug and keeps its traceback;
torch files that would need arbitrary unpickling are refused as a StateError, never executed."""

import os
import pickle

import pytest
import torch

from metrank import cli
from metrank.atomic import load_torch_file
from metrank.errors import InputError, MetrankError, MissingFileError, StateError


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def evil_file(path):
    with open(path, "wb") as f:  # protocol 2, as torch.save writes
        pickle.dump({"format": "metrank-train-state-v1", "x": RunsCode()}, f, protocol=2)
    return path


def test_unsafe_torch_file_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StateError, match="never unpickles") as err:
        load_torch_file(evil_file(tmp_path / "evil.pt"), "checkpoint")
    assert "weights_only=False" not in str(err.value)
    assert not (tmp_path / "pwned-by-pickle").exists()
    with pytest.raises(MissingFileError):
        load_torch_file(tmp_path / "absent.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(StateError, match="damaged"):
        load_torch_file(tmp_path / "cut.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_torch_file(tmp_path / "ok.pt")["w"], torch.ones(2))


@pytest.mark.slow
def test_resume_from_a_malicious_state_is_one_line(tmp_path, capsys, monkeypatch):
    config = os.path.join(os.path.dirname(__file__), "..", "train", "configs", "tiny_emoji_image_text.yaml")
    monkeypatch.chdir(tmp_path)
    evil = str(evil_file(tmp_path / "evil.pt"))
    assert cli.main(["train", config, f"output.dir={tmp_path / 'run'}", "--resume-from", evil]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metrank train: error:") and "never unpickles" in err and err.count("\n") == 1
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_only_metrank_errors_become_one_line(monkeypatch, capsys):
    from metrank.commands import data

    def failing(args):
        raise InputError("bad thing; do this instead")

    monkeypatch.setattr(data, "run_list", failing)
    assert cli.main(["data", "list"]) == 2
    assert capsys.readouterr().err == "metrank data: error: bad thing; do this instead\n"

    def buggy(args):
        raise ValueError("a bug in numpy or in metrank")

    monkeypatch.setattr(data, "run_list", buggy)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["data", "list"])
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(MetrankError, ValueError)
