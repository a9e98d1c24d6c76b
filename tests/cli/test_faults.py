"""Fault injection: a quantize killed with SIGKILL or SIGTERM at several points (during calibration,
during the write, between the steps of an ``--overwrite``) never leaves ``--out`` half-written or
missing, and the next run leaves no stale folder behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.formats.native import checkpoint_problems, read_record

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh process: arm the signal at one point, then run the command line.
CHILD = r"""
import os, pathlib, signal, sys
point, sig, model, out = sys.argv[1:5]
def die():
    os.kill(os.getpid(), getattr(signal, sig))
if point == "calibration":  # inside the first decoder layer's calibration forward
    import quantkit.core.sequential as seq
    forward = seq._forward
    def patched(*a, **k):
        die()
        return forward(*a, **k)
    seq._forward = patched
elif point == "write":  # after the second layer's tensors were written
    from quantkit.formats import shard_writer
    add, calls = shard_writer.ShardWriter.add, []
    def patched(self, tensors):
        add(self, tensors)
        calls.append(1)
        if len(calls) == 2:
            die()
    shard_writer.ShardWriter.add = patched
elif point == "exchange":  # the new output swapped in, the old one not yet removed
    from quantkit.formats import output_dir
    exchange = output_dir._exchange
    def patched(a, b):
        done = exchange(a, b)
        die()
        return done
    output_dir._exchange = patched
elif point == "between-renames":  # no atomic exchange: after moving the old output aside
    from quantkit.formats import output_dir
    output_dir._exchange = lambda a, b: False
    rename = pathlib.Path.rename
    def patched(self, target):
        result = rename(self, target)
        if ".old-" in pathlib.Path(target).name:
            die()
        return result
    pathlib.Path.rename = patched
from quantkit.cli import main
sys.exit(main(["quantize", model, "--out", out, "--overwrite", "--samples", "2", "--seq-len", "32", "-q"]))
"""


def _quantize(model_dir, out, *extra):
    return main(["quantize", str(model_dir), "--out", str(out), "--samples", "2", "--seq-len", "32", "-q", *extra])


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("point", ["calibration", "write", "exchange", "between-renames"])
def test_killed_quantize_leaves_old_or_new_output_and_the_next_run_cleans_up(tmp_path, tiny_model_dir, point, sig):
    out = tmp_path / "out"
    assert _quantize(tiny_model_dir, out, "--scheme", "w8a16") == 0  # the old output
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, point, sig, str(tiny_model_dir), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    else:
        assert proc.returncode == 143, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("quantkit: terminated"), proc.stderr
        # Cleaned up at once: nothing hidden beside the output (SIGKILL cannot clean up; see below).
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    killed_outright_between_renames = sig == "SIGKILL" and point == "between-renames"
    if not killed_outright_between_renames:  # the one documented gap of the no-exchange fallback
        assert read_record(out).config.scheme in ("w8a16", "w8a8") and checkpoint_problems(out) == []
    # The next run restores or removes what the killed one left, then does its work.
    assert _quantize(tiny_model_dir, out, "--overwrite") == 0
    assert read_record(out).config.scheme == "w8a8" and checkpoint_problems(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_run_s_old_output_comes_back_before_the_next_run_checks_out(tmp_path, tiny_model_dir):
    """SIGKILL between the fallback's two renames: the next run puts the old output back first, so
    without --overwrite it refuses to replace it, as it would have before."""
    out = tmp_path / "out"
    assert _quantize(tiny_model_dir, out, "--scheme", "w8a16") == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(
        [sys.executable, "-c", CHILD, "between-renames", "SIGKILL", str(tiny_model_dir), str(out)],
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert not out.exists()
    assert _quantize(tiny_model_dir, out) == 2
    assert read_record(out).config.scheme == "w8a16" and checkpoint_problems(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
