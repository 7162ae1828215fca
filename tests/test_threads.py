"""erase_diffusion.threads: the CPU thread guard of the entry points (each case in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from erase_diffusion.threads import MAX_DEFAULT, default_threads

PROBE = """
import json, os
import erase_diffusion.threads as t
import torch
d = t.configure_threads()
print(json.dumps({"decision": d, "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                  "wait": os.environ.get("OMP_WAIT_POLICY"), "again": t.configure_threads() is d}))
"""
TORCH_FIRST = "import torch\n" + PROBE


def probe(code=PROBE, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ERASE_DIFFUSION_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env, "CUDA_VISIBLE_DEVICES": ""},
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_default_count():
    assert default_threads(cores=2, busy=0) == 2
    assert default_threads(cores=2, busy=1) == 1
    assert default_threads(cores=2, busy=5) == 1  # never 0
    assert default_threads(cores=64, busy=0) == MAX_DEFAULT


def test_guard_sets_threads_and_passive_wait():
    r = probe()
    assert r["decision"]["source"].startswith("guard")
    assert 1 <= r["threads"] <= MAX_DEFAULT and r["threads"] == r["decision"]["threads"] and r["interop"] == 1
    assert r["wait"] == "PASSIVE" and r["again"]


def test_explicit_settings_win():
    r = probe(OMP_NUM_THREADS="1")
    assert r["decision"]["source"] == "OMP_NUM_THREADS" and r["threads"] == 1
    r = probe(ERASE_DIFFUSION_THREADS="2", OMP_WAIT_POLICY="ACTIVE")
    assert r["decision"]["source"] == "ERASE_DIFFUSION_THREADS" and r["threads"] == 2 and r["wait"] == "ACTIVE"


def test_imported_after_torch_leaves_the_wait_policy_alone():
    assert probe(TORCH_FIRST)["wait"] is None


def test_small_models_train_on_one_thread_unless_the_user_set_threads(monkeypatch):
    import torch

    from erase_diffusion.threads import EXPLICIT_ENVS, SMALL_MODEL_PARAMS, one_thread_if_small

    for v in EXPLICIT_ENVS:
        monkeypatch.delenv(v, raising=False)
    torch.set_num_threads(2)
    with one_thread_if_small(1000, "cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2  # restored
    with one_thread_if_small(SMALL_MODEL_PARAMS, "cpu"):  # a real-sized model keeps the guard's count
        assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with one_thread_if_small(1000, "cpu"):  # the user's setting wins
        assert torch.get_num_threads() == 2
