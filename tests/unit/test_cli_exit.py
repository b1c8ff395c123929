"""The ``datasync`` command freezes the heap before Python's shutdown collects it (see ``cli.run``)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from datasync import cli


def test_run_freezes_the_heap_once_the_command_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["datasync", "--help"])
    assert gc.get_freeze_count() == 0
    try:
        with pytest.raises(SystemExit) as exited:
            cli.run()
        assert exited.value.code == 0
        assert gc.get_freeze_count() > 0  # the shutdown's collection skips these
    finally:
        gc.unfreeze()


def test_module_and_console_script_both_go_through_run() -> None:
    # `python -m datasync` and the `datasync` script (pyproject) are the two ways in
    main = subprocess.run([sys.executable, "-m", "datasync", "--help"], capture_output=True, text=True, check=True)
    assert "keep DuckDB copies" in main.stdout
    from importlib import metadata

    (script,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "datasync"]
    assert script.value == "datasync.cli:run"
