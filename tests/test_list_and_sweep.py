"""`da-seg list methods` (whole docstrings, every option with its default) and the sweep's
"run k of n" lines with an ETA from the runs that trained."""
from __future__ import annotations

import dataclasses
import inspect
import re

from click.testing import CliRunner

from da_seg.cli import main
from da_seg.methods import METHODS, method_options
from da_seg.methods.adversarial import AdvEnt
from da_seg.utils.progress import RunsClock, format_duration


def test_list_methods_shows_whole_docstrings_and_every_option_with_its_default():
    output = CliRunner().invoke(main, ["list", "methods"]).output
    # A block per method: its name at the start of a line, then indented lines.
    blocks = {block.split()[0]: block for block in re.split(r"^(?=\S)", output, flags=re.M) if block.strip()}
    assert list(blocks) == list(METHODS)
    for name, cls in METHODS.items():
        block = blocks[name]
        for line in inspect.getdoc(cls).splitlines():
            assert f"    {line}".rstrip() in block.splitlines(), (name, line)
        for field in dataclasses.fields(cls.Options):
            assert re.search(rf"^      {field.name} = ", block, flags=re.M), (name, field.name)
    advent = blocks["advent"]
    assert re.search(r'loss = "bce" +# str; "bce" \| "lsgan"', advent)
    assert re.search(r"d_betas = \[0\.9, 0\.99\] +# tuple\[float, float\]$", advent, flags=re.M)
    assert re.search(r"multi_level = false +# bool; a second discriminator", advent)
    assert "(stage translate only)" in blocks["cyclegan"].splitlines()[0]


def test_method_options_read_defaults_types_and_comments():
    by_name = {o.name: o for o in method_options(AdvEnt)}
    assert by_name["weight"].default == 1e-3 and by_name["weight"].type == "float"
    assert by_name["weight"].comment.startswith("lambda_adv on the main output")
    assert by_name["d_betas"].default == (0.9, 0.99) and by_name["d_betas"].comment == ""


def test_runs_clock_counts_only_runs_that_trained():
    clock = RunsClock(5)
    assert clock.remaining_s() == float("inf") and format_duration(clock.remaining_s()) == "?"
    clock.finished(0.2, did_work=False)           # a finished run, skipped
    assert clock.remaining_s() == float("inf")
    clock.finished(10.0)
    clock.finished(20.0)
    assert clock.remaining_s() == 15.0 * 2        # mean of the two that trained x the two left
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05"


def test_sweep_prints_run_k_of_n_with_an_eta(write_recipe, tmp_path, capsys):
    from da_seg.stages import sweep

    first = write_recipe(iters=2, extra="eval_every = 2", name="a.toml")
    second = write_recipe(iters=2, extra="eval_every = 2", name="b.toml")
    second.write_text(second.read_text().replace('name = "tiny"', 'name = "other"'))
    runs = tmp_path / "runs"
    sweep([first, second], seeds=2, runs_root=runs, device="cpu", progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\[sweep\] run \d", line)]
    assert [line.split(" (")[0] for line in lines] == [
        "[sweep] run 1 of 4: tiny seed 0", "[sweep] run 2 of 4: tiny seed 1",
        "[sweep] run 3 of 4: other seed 0", "[sweep] run 4 of 4: other seed 1"]
    assert lines[0].endswith("ETA ?)")
    assert all(re.search(r"\(elapsed \d+:\d\d, ETA \d+:\d\d\)$", line) for line in lines[1:]), lines
    # Again: all four are finished and skipped, so no run is measured and no ETA can be told.
    sweep([first, second], seeds=2, runs_root=runs, device="cpu", progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[sweep] run ")]
    assert len(lines) == 4 and all(line.endswith("ETA ?)") for line in lines)
