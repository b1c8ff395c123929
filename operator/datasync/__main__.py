from datasync.cli import run

run()
