"""The checkpoint format: tensors in safetensors, the rest as JSON, nothing that can run code; exact round
trips; one-line refusals of old, crafted, corrupt and incomplete files; and a save killed half way (kill -9)
leaves the previous checkpoint loadable and its litter is cleaned by the next run."""

from __future__ import annotations

import json
import math
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import softtool
from helpers import error_line, run_cli, wait_for_line, write_translation_data
from softtool.errors import SofttoolError
from softtool.training.checkpoint import CHECKPOINT_DIR, checkpoint_path, load_checkpoint, save_checkpoint


class _CreatesAFile:
    """Unpickling this opens (creates) a file: what a crafted checkpoint could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _state() -> dict:
    prompt = torch.nn.Parameter(torch.randn(3, 4))
    optimizer = torch.optim.AdamW([prompt], lr=0.1)
    prompt.sum().backward()
    optimizer.step()
    return {
        "prompt": {"table": prompt.detach().clone()},
        "optimizer": optimizer.state_dict(),
        "scheduler": {"base_lrs": [0.1], "last_epoch": 1, "lr_lambdas": [None]},
        "scaler": None,
        "state": {"step": 1, "best_score": -math.inf, "best_table": None, "history": [{"loss": 1 / 3}]},
        "total_steps": 5,
    }


def test_a_checkpoint_is_safetensors_with_json_state_and_round_trips_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    random.gauss(0, 1)  # leaves a cached gaussian in both states
    np.random.standard_normal()
    state = _state()
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    path = save_checkpoint(tmp_path, state)
    assert path == tmp_path / "checkpoints" / "last.safetensors"
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header["__metadata__"]["format"] == "softtool-checkpoint"
    assert header["__metadata__"]["softtool_version"] == softtool.__version__  # a later refusal names it

    loaded = load_checkpoint(tmp_path)
    assert loaded["rng"]["python"] == python_state
    assert loaded["rng"]["numpy"][0] == numpy_state[0] and loaded["rng"]["numpy"][2:] == numpy_state[2:]
    assert np.array_equal(loaded["rng"]["numpy"][1], numpy_state[1])
    assert loaded["rng"]["numpy"][1].dtype == numpy_state[1].dtype
    assert torch.equal(loaded["rng"]["torch"], torch_state)
    assert loaded["state"] == {**state["state"], "best_score": -math.inf}
    assert torch.equal(loaded["prompt"]["table"], state["prompt"]["table"])
    saved, back = state["optimizer"], loaded["optimizer"]
    assert back["param_groups"] == saved["param_groups"]  # tuples (betas) stay tuples, int keys stay ints
    for name, value in saved["state"][0].items():
        assert torch.equal(back["state"][0][name], value) and back["state"][0][name].dtype == value.dtype
    random.setstate(loaded["rng"]["python"])  # both accept what was loaded
    np.random.set_state(loaded["rng"]["numpy"])


def test_a_crafted_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / CHECKPOINT_DIR
    folder.mkdir()
    (folder / "last.pt").write_bytes(pickle.dumps({"prompt": _CreatesAFile(marker)}))
    with pytest.raises(
        SofttoolError, match=r"older softtool \(written by softtool 0\.1\.0.*no longer loads.*--overwrite"
    ):
        load_checkpoint(tmp_path)
    (folder / "last.safetensors").write_bytes(pickle.dumps(_CreatesAFile(marker)))  # a pickle under the new name
    with pytest.raises(SofttoolError, match="corrupt or unreadable"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"format": "softtool-checkpoint", "version": "1", "state": json.dumps({"prompt": {}})}, "lacks"),
        ({"format": "softtool-checkpoint", "version": "1", "state": "{not json"}, "corrupt"),
        ({"format": "softtool-checkpoint", "version": "9", "state": "{}"}, "not a softtool checkpoint of version 1"),
        (
            {"format": "softtool-checkpoint", "version": "9", "softtool_version": "0.9.0", "state": "{}"},
            r"version '9', written by softtool 0\.9\.0\)",
        ),
        ({"format": "something-else"}, "not a softtool checkpoint"),
    ],
)
def test_an_incomplete_or_foreign_checkpoint_is_refused_in_one_line(tmp_path, metadata, expected):
    path = checkpoint_path(tmp_path)
    path.parent.mkdir()
    save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
    with pytest.raises(SofttoolError, match=expected) as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value) and "--overwrite" in str(info.value)


# -- through the command line -------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path):
    return write_translation_data(tmp_path / "data")


def _train_args(data, model_dir, output, steps=2, *extra):
    return [
        "train", "--task", "translation", "--data", data, "--model", model_dir, "--max-steps", steps,
        "--num-virtual-tokens", "2", "--batch-size", "2", "--device", "cpu", "--checkpoint-every", "1",
        "--eval-every", "0", "--output", output, "--quiet", *extra,
    ]  # fmt: skip


def test_resume_from_a_pickled_checkpoint_is_one_line_that_says_how_to_restart(tmp_path, data, tiny_model_dir, capsys):
    out = tmp_path / "run"
    assert run_cli(_train_args(data, tiny_model_dir, out), capsys).code == 0
    marker = tmp_path / "ran"
    (out / CHECKPOINT_DIR / "last.safetensors").unlink()
    (out / CHECKPOINT_DIR / "last.pt").write_bytes(pickle.dumps({"state": _CreatesAFile(marker)}))
    result = run_cli([*_train_args(data, tiny_model_dir, out, 3), "--resume"], capsys)
    line = error_line(result.code, result.err)
    assert "last.pt is a checkpoint of an older softtool" in line and "--overwrite" in line
    assert not marker.exists()
    # --overwrite then starts again: the old pickle goes (softtool wrote it), and it is still never loaded.
    assert run_cli([*_train_args(data, tiny_model_dir, out), "--overwrite"], capsys).code == 0
    assert not (out / CHECKPOINT_DIR / "last.pt").exists() and not marker.exists()
    assert load_checkpoint(out)["state"]["step"] == 2


# A train run whose third checkpoint save writes half the file, says so, and waits to be killed.
_KILLED_SAVE = """
import sys, time
from pathlib import Path
from softtool.cli import main

original, saves = Path.write_bytes, []
def write_bytes(self, data):
    if self.name.startswith(".last.safetensors."):
        saves.append(self)
        if len(saves) == 3:
            with open(self, "wb") as fh:
                fh.write(data[: len(data) // 2])
            print("writing", flush=True)
            time.sleep(600)
    return original(self, data)
Path.write_bytes = write_bytes
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_leaves_the_previous_checkpoint_and_resume_cleans_up(
    tmp_path, data, tiny_model_dir, capsys
):
    out = tmp_path / "run"
    script = tmp_path / "killed_save.py"
    script.write_text(_KILLED_SAVE)
    args = [
        "train", "--task", "translation", "--data", data, "--model", tiny_model_dir, "--max-steps", "5",
        "--num-virtual-tokens", "2", "--batch-size", "2", "--device", "cpu", "--checkpoint-every", "1",
        "--eval-every", "0", "--output", out, "--quiet",
    ]  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_line(child, "writing")  # the third save is half on disk
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    litter = list((out / CHECKPOINT_DIR).glob(".last.safetensors.*.tmp"))
    assert len(litter) == 1 and litter[0].stat().st_size > 0
    assert load_checkpoint(out)["state"]["step"] == 2  # the save of step 3 never replaced it

    # The same run continues from step 2, and the half-written file is gone.
    result = run_cli([*args, "--resume"], capsys)
    assert result.code == 0, result.err
    assert not litter[0].exists()
    assert load_checkpoint(out)["state"]["step"] == 5


def test_a_base_model_folder_with_only_pytorch_model_bin_is_refused(tmp_path, tiny_model_dir):
    """Base weights load from safetensors only: a valid pickled pytorch_model.bin is not loaded."""
    import shutil

    from safetensors.torch import load_file

    from softtool.models import load_model

    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    torch.save(weights, folder / "pytorch_model.bin")  # the same weights, as a pickle
    (folder / "model.safetensors").unlink()
    with pytest.raises(SofttoolError, match="cannot load model"):
        load_model(str(folder))
