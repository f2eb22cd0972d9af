"""The init stage wired into the pipeline: `run_pipeline.py init` and `student.init=svd` inside `run`."""

import json

from transformers import AutoModelForCausalLM

import run_pipeline
from pipeline import state


def test_init_command_fills_paths_from_teacher_and_student(tmp_path, make_model):
    teacher = make_model("qwen3_moe")
    student = make_model("qwen3_moe", name="small_student", num_experts=4, num_hidden_layers=1)
    root = tmp_path / "runs"
    args = ["init", f"run.root={root}", f"teacher.path={teacher}", f"student.path={student}"]
    assert run_pipeline.main(args) == 0
    out = root / "demo" / "init"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 4 and model.config.num_hidden_layers == 1
    assert state.read_state(root / "demo", "init")["status"] == "done"
    assert json.loads((out / "init_map.json").read_text())
    assert run_pipeline.main(args) == 0  # done with the same inputs: skipped


def test_run_refuses_lora_init_inside_run(tmp_path, make_model, text_jsonl):
    args = ["run", f"run.root={tmp_path}", f"data.source={text_jsonl}", "data.max_samples=20",
            f"student.path={make_model('qwen3_moe')}", "student.init=svd", "init.mode=lora", "train.alpha=0"]
    assert run_pipeline.main(args) == 2
