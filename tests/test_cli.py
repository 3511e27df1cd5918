"""The `da-seg` command line, as a user types it (click's runner, tiny domains)."""
from __future__ import annotations

import subprocess
import sys

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
