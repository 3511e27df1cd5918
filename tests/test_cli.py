"""The `da-seg` command line, as a user types it (click's runner, tiny domains)."""
from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from da_seg.cli import main, run


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def fails(monkeypatch, capsys):
    """``fails(*args)`` runs ``da-seg ARGS`` through the installed entry point (``run``, which
    turns errors into one line) in this process; returns (exit code, stderr lines)."""
    monkeypatch.delenv("DA_SEG_DEBUG", raising=False)

    def _fails(*args):
        monkeypatch.setattr(sys, "argv", ["da-seg", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            run()
        return exited.value.code, capsys.readouterr().err.strip().splitlines()
    return _fails


def test_sweep_then_eval_then_compare(write_recipe, tiny_domains, tmp_path):
    recipe = write_recipe(iters=3, extra="eval_every = 3")
    runs = tmp_path / "runs"
    out = invoke("sweep", recipe, "--seeds", "2", "--runs", runs, "--no-progress", "--format", "markdown")
    rows = [line for line in out.splitlines() if line.startswith("| tiny_src->tiny_tgt | tiny |")]
    assert len(rows) == 1 and rows[0].split("|")[3].strip() == "2"  # one row, two seeds
    # Re-running the sweep skips finished runs instead of training again.
    again = invoke("sweep", recipe, "--seeds", "2", "--runs", runs, "--no-progress")
    assert again.count("skipped") == 2

    checkpoint = next(runs.rglob("best.pt"))
    out = invoke("eval", checkpoint, "--domain", tiny_domains["target"], "--per-class", "--flip")
    assert "tiny_tgt val: mIoU" in out and "red" in out

    table = invoke("compare", runs, "--format", "csv", "--per-class")
    header, row = table.strip().splitlines()[:2]
    assert "recipe" in header and "red" in header
    assert row.count(",") == header.count(",")


def test_list_commands():
    assert "deeplab_small" in invoke("list", "models")
    assert "source_ce" in invoke("list", "methods")
    assert "cityscapes" in invoke("list", "domains")


def test_bad_recipe_key_is_one_clear_line_and_exit_code_2(write_recipe, tmp_path):
    path = write_recipe()
    path.write_text(path.read_text().replace("[optim]", "[optim]\nmomentun = 0.9"))
    done = subprocess.run([sys.executable, "-m", "da_seg", "train", str(path), "--runs", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown key 'optim.momentun'; did you mean 'optim.momentum'?" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_device_is_one_line_before_anything_is_written(write_recipe, tmp_path, fails, monkeypatch):
    recipe, runs = write_recipe(), tmp_path / "runs"
    assert fails("train", recipe, "--runs", runs, "--device", "foo") == \
        (2, ["error: --device 'foo'; expected auto, cpu, cuda or cuda:N"])
    assert fails("sweep", recipe, "--runs", runs, "--device", "gpu0") == \
        (2, ["error: --device 'gpu0'; expected auto, cpu, cuda or cuda:N"])
    # A GPU asked for on a machine without one (whatever this machine has).
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, lines = fails("train", recipe, "--runs", runs, "--device", "cuda")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: --device 'cuda': CUDA is not available on this machine; use --device cpu")
    code, lines = fails("eval", recipe, "--domain", "x", "--device", "cuda:1")
    assert code == 2 and lines[0].startswith("error: --device 'cuda:1': CUDA is not available")
    assert not runs.exists()


@pytest.mark.parametrize("option, value", [("--input-size", "0x0"), ("--input-size", "512x-4"),
                                           ("--input-size", "20000x20000"), ("--crop", "big"),
                                           ("--stride", "0x16")])
def test_eval_sizes_must_be_positive_and_fit_in_memory(tmp_path, fails, option, value):
    # The size is refused while the command line is read: the "checkpoint" is not even opened.
    not_read = tmp_path / "last.pt"
    not_read.write_bytes(b"")
    assert fails("eval", not_read, "--domain", "x", option, value) == \
        (2, [f"error: {option} {value!r}; expected HxW (e.g. 512x1024) with both sides in 1..16384 pixels"])


@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_sweep_over_no_seeds_fails_instead_of_printing_an_empty_table(write_recipe, tmp_path, fails, seeds):
    runs = tmp_path / "runs"
    assert fails("sweep", write_recipe(), "--seeds", seeds, "--runs", runs) == \
        (2, [f"error: --seeds {seeds}; expected a positive number of seeds (seeds 0..N-1 are run)"])
    assert not runs.exists()


def _tiny_segmenter_weights():
    from da_seg.models import build_model

    return build_model("deeplab_small", 3, width=8, aspp_channels=16).state_dict()


def test_empty_or_truncated_checkpoint_is_one_line_for_eval_and_resume(write_recipe, tiny_domains, tmp_path, fails):
    import torch

    whole = tmp_path / "whole.pt"
    torch.save({"iteration": 3, "model": _tiny_segmenter_weights()}, whole)
    truncated, empty = tmp_path / "truncated.pt", tmp_path / "empty.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # a copy cut short
    empty.write_bytes(b"")
    for path in (truncated, empty):
        code, lines = fails("eval", path, "--domain", tiny_domains["target"])
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: cannot read checkpoint {path}: the file is empty or truncated (")
    # --resume of a run folder whose last.pt was cut short (a disk filled by something else, a bad copy).
    run_dir = tmp_path / "runs" / "stopped"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(truncated.read_bytes())
    code, lines = fails("train", write_recipe(), "--resume", run_dir, "--no-progress")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot read checkpoint {run_dir / 'last.pt'}: the file is empty or "
                               "truncated (")


def test_plain_state_dict_given_to_eval_is_named_as_not_a_da_seg_checkpoint(tiny_domains, tmp_path, fails):
    import torch

    weights = tmp_path / "weights.pth"
    torch.save(_tiny_segmenter_weights(), weights)
    code, lines = fails("eval", weights, "--domain", tiny_domains["target"])
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {weights} is not a da_seg checkpoint (it has no 'model_meta', which says "
                               "how to rebuild the model; train it with da-seg")


def test_runs_folder_that_cannot_be_made_is_one_line_and_leaves_nothing(write_recipe, tmp_path, fails,
                                                                       monkeypatch):
    recipe = write_recipe()
    # A runs root below a regular file can be made by nobody, root included (tests may run as
    # root, for whom a chmod-ed folder is writable).
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, lines = fails("train", recipe, "--runs", blocker / "runs", "--no-progress")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot write the run folder {blocker / 'runs' / 'tiny'}")
    assert lines[0].endswith(": a part of the path is a file, not a folder")
    # A read-only runs folder, as the file system reports it (monkeypatched: root could write anyway).
    runs = tmp_path / "runs"

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", refused)
        code, lines = fails("train", recipe, "--runs", runs, "--no-progress")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot write the run folder {runs}") and lines[0].endswith(": permission denied")
    assert not runs.exists()


def test_run_that_cannot_start_leaves_no_run_folder(write_recipe, tmp_path, fails):
    runs = tmp_path / "runs"
    code, lines = fails("train", write_recipe(), "--runs", runs, "--set", f'data.source="{tmp_path / "gone.toml"}"')
    assert code == 2 and "gone.toml" in lines[-1]
    assert not runs.exists()  # the run folder made before the data was read is gone again, with its parents


def test_full_disk_at_a_checkpoint_keeps_the_previous_one_and_resumes(write_recipe, tmp_path, fails, monkeypatch):
    import torch

    from da_seg.engine.checkpoint import load_checkpoint
    from da_seg.runs import run_status

    recipe, runs = write_recipe(iters=6), tmp_path / "runs"
    real_save = torch.save

    def disk_full_at_iteration_6(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == 6:
            f.write(b"PK\x03\x04 half a checkpoint")  # the write gets part of the way
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full_at_iteration_6)
        code, lines = fails("train", recipe, "--runs", runs, "--no-progress")
    (run_dir,) = (p.parent for p in runs.rglob("metrics.json"))
    assert code == 2 and lines == [
        f"error: cannot write {run_dir / 'last.pt'}: no space left on {run_dir} (the previous last.pt, if any, is "
        f"kept as it was); stopped at iteration 6: make room, then continue with --resume {run_dir}"]
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 3
    assert not list(run_dir.glob(".*.tmp")) and run_status(run_dir) == "resumable"
    invoke("train", recipe, "--resume", run_dir, "--no-progress")
    assert run_status(run_dir) == "finished" and load_checkpoint(run_dir / "last.pt")["iteration"] == 6


def test_run_folder_that_became_read_only_is_named_when_the_events_file_opens(tmp_path, monkeypatch):
    from da_seg.engine import logging as run_logging
    from da_seg.utils.files import StorageError

    def read_only(logdir, *args, **kwargs):  # what the writer meets in a folder mounted read-only
        raise OSError(errno.EROFS, "Read-only file system", logdir)

    monkeypatch.setattr(run_logging, "SummaryWriter", read_only)
    with pytest.raises(StorageError, match=rf"^cannot write the run folder {tmp_path}: read-only file system$"):
        run_logging.RunLogger(tmp_path)


def test_help_and_list_commands_start_without_torch_and_lazy_commands_keep_their_help():
    # In a fresh interpreter: this one imported torch long ago.
    probe = ("import sys; from da_seg.cli import run; sys.argv = ['da-seg'] + sys.argv[1:]\n"
             "try:\n    run()\nexcept SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    for args in (["--help"], ["list", "domains"], ["list", "recipes"]):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True).stdout
        assert out.rstrip().endswith("NO TORCH"), (args, out[-300:])
    from da_seg.cli import LAZY_COMMANDS

    listed = CliRunner().invoke(main, ["--help"]).output
    for name, (target, _) in LAZY_COMMANDS.items():
        module, attribute = target.split(":")
        command = getattr(__import__(module, fromlist=[attribute]), attribute)
        assert command.name == name and f"  {name}  " in listed
        # --help shows the short help the command itself would (the first sentence of its docstring)
        assert command.get_short_help_str(200) == LAZY_COMMANDS[name][1]
    assert "--rounds" in invoke("self-train", "--help")     # imported when asked for
