from da_seg.cli import run

run()
