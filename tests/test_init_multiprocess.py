"""`torchrun … init` on 2 CPU processes (gloo; issue 16 item 8): the ranks share the work through the
process group instead of each running a full copy, and the result is bit-identical to one process."""

from __future__ import annotations

import json

import pytest
import torch
from launch_helpers import torchrun
from safetensors.torch import load_file

import run_pipeline
from pipeline import state


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tmp_path, make_model):
    teacher = make_model("qwen3_moe")
    student = make_model("qwen3_moe", name="init_mp_student", seed=3, num_experts=4, num_hidden_layers=2)
    paths = [f"teacher.path={teacher}", f"student.path={student}"]
    assert run_pipeline.main(["init", f"run.root={tmp_path / 'one'}", *paths]) == 0

    done = torchrun("init", f"run.root={tmp_path / 'two'}", *paths)
    assert done.stdout.count("init: full student") == 1, "only rank 0 saves (not one full copy per rank)"

    one, two = tmp_path / "one" / "demo", tmp_path / "two" / "demo"
    w1, w2 = load_file(one / "init" / "model.safetensors"), load_file(two / "init" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        assert torch.equal(w1[name], w2[name]), name
    assert json.loads((one / "init" / "init_map.json").read_text()) == json.loads((two / "init" / "init_map.json").read_text())
    assert state.read_state(two, "init")["status"] == "done"
    assert not (two / "init" / "_shards").exists() or not any((two / "init" / "_shards").iterdir())
