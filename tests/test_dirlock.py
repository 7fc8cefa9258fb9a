"""One writer per run / evaluation directory (`duetlm.dirlock`): a second `duetlm eval` or `duetlm
train` on a directory another process writes is refused at once, naming the holder; a holder killed
with SIGKILL leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from duetlm.dirlock import DirLock
from duetlm.errors import DuetError


def hold(path) -> subprocess.Popen:
    """Another process holding `path`'s lock until killed."""
    code = (
        "import sys, time; from duetlm.dirlock import DirLock; "
        f"DirLock({str(path)!r}, 'duetlm eval').acquire(); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = hold(tmp_path)
    try:
        with pytest.raises(
            DuetError, match=rf"in use by pid {proc.pid} .*one duetlm eval writes a directory at a time"
        ):
            DirLock(tmp_path, "duetlm eval").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel dropped the dead holder's lock, and the same process may nest
    with DirLock(tmp_path, "duetlm eval"), DirLock(tmp_path, "duetlm eval"):
        pass
    assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


def test_eval_and_train_refuse_a_directory_in_use(tmp_path, tiny_dir, tiny_llama_dir):
    from conftest import arithmetic_problems, tiny_train_config
    from duetlm.evaluate import EvalConfig, run_eval
    from duetlm.train import run_training

    out = tmp_path / "eval"
    proc = hold(out)
    try:
        cfg = EvalConfig(
            large=str(tiny_dir), benchmarks=["math500"], methods=["original"], output=str(out), limit=1
        )
        with pytest.raises(DuetError, match="in use by pid"):
            run_eval(cfg, progress=False, problems={"math500": arithmetic_problems(1)})
        assert not (out / "results.jsonl").exists()
        train_cfg = tiny_train_config(tmp_path, tiny_dir, tiny_llama_dir)
        held_run = hold(train_cfg.run.dir)
        try:
            with pytest.raises(
                DuetError, match="one duetlm train writes a directory at a time|in use by pid"
            ):
                run_training(train_cfg)
        finally:
            held_run.send_signal(signal.SIGKILL)
            held_run.wait()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
