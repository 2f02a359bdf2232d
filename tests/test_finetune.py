"""finetune.py, CPMTrainer and the launchers, run as users run them: real processes, real engines."""

import json
import math
import os
import re
import shutil
import sys
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, TrainerControl, TrainerState

import arguments
import families
from families.native import NATIVE_LLM_TYPE
import finetune
import loading
import lora
import numerics
import resilience
from stages import prepare
from launch import (
    FAST_ARGS,
    LORA_ARGS,
    REPO,
    assert_falls,
    dataset_as_trained,
    eval_loss,
    eval_losses,
    finetune_args,
    load_state_dict,
    run,
    run_finetune,
    run_script,
    subprocess_env,
    torchrun_finetune,
    train_losses,
    trainer_state,
)
from tiny_models.build import LLM_TYPE, NATIVE_FAMILIES
from trainer import StopAtEvalLoss

# A log record: this project's (finetune.set_up_logging's format) or transformers' own ("[transformers] ...").
LOG_RECORD = re.compile(r"^(\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ |\[transformers\] )")


def lora_args(model, data, output_dir, llm_type=None, use_cpu=True):
    return finetune_args(
        model, data, output_dir, *LORA_ARGS, "--logging_steps", "1", "--learning_rate", "1e-3",
        llm_type=llm_type, use_cpu=use_cpu,
    )


def parse(*argv, output_dir="unused"):
    """finetune.py's arguments, parsed and checked, for a CPU run."""
    return arguments.parse_args(["--output_dir", str(output_dir), "--use_cpu", "true", *map(str, argv)])


def test_train_takes_parsed_arguments_and_trains_only_the_adapter(tiny_checkpoint, shapes, tmp_path):
    """finetune.train() called in this process with the parsed dataclasses, as a test or a script would."""
    model_dir = tiny_checkpoint("minicpmv2_6")
    trainer = finetune.train(*arguments.parse_args([str(arg) for arg in finetune_args(
        model_dir, shapes, tmp_path, *FAST_ARGS, *LORA_ARGS, "--tune_vision", "false", "--max_steps", "2",
        "--learning_rate", "1e-2", "--save_strategy", "no", "--logging_steps", "1",
    )]))
    assert trainer.state.global_step == 2 and (tmp_path / "adapter_model.safetensors").is_file()
    lora_b = {name: p for name, p in trainer.model.named_parameters() if "lora_B" in name}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # they start at zero
    before, after = load_state_dict(model_dir), trainer.model.get_base_model().state_dict()
    frozen = [key for key in before if key.startswith(("vpm.", "llm.")) and key in after]
    assert any(key.startswith("vpm.") for key in frozen) and any(key.startswith("llm.") for key in frozen)
    assert [key for key in frozen if not torch.equal(before[key], after[key])] == []


def test_model_only_checkpoints_count_as_complete(tiny_checkpoint, shapes, tmp_path):
    # --save_only_model writes no optimizer or RNG files, after which the completeness record
    # used to be written: every such checkpoint looked cut short and could not be resumed from.
    finetune.train(*arguments.parse_args([str(arg) for arg in finetune_args(
        tiny_checkpoint("minicpmv2_6"), shapes, tmp_path, *FAST_ARGS, *LORA_ARGS, "--tune_vision", "false",
        "--max_steps", "2", "--save_steps", "1", "--save_only_model", "true",
    )]))
    assert [step for step, _ in resilience.complete_checkpoints(tmp_path)] == [1, 2]
    assert not list(tmp_path.glob("checkpoint-*/optimizer.pt"))


@pytest.mark.launch
def test_lora_launcher_torchrun_two_processes_zero2(tiny_checkpoint, shapes, tmp_path):
    model, out = tiny_checkpoint("minicpmv2_6"), tmp_path / "lora"
    # Two eval records, one per process: the reported eval loss is then a single step's
    # token-weighted loss, which the reload below can recompute exactly.
    records = json.loads(shapes.read_text())
    eval_file = shapes.parent / "eval_two.json"
    eval_file.write_text(json.dumps([records[0], records[-2]]))
    steps = "30"
    _, output = run_script(
        "finetune_lora.sh",
        ["--max_steps", steps, "--learning_rate", "5e-3", "--eval_steps", steps, "--save_steps", steps,
         "--warmup_steps", "0"],
        GPUS_PER_NODE=2, MODEL=model, DATA=shapes, EVAL_DATA=eval_file, LLM_TYPE="qwen", OUTPUT_DIR=out,
    )
    assert "Training with DeepSpeed ZeRO-2 on 2 process(es)" in output
    # transformers' own logging follows --log_level (passive, the default: warning): the log starts with
    # this project's lines, not with the model config transformers logs at info.
    records = [line for line in output.splitlines() if LOG_RECORD.match(line)]
    assert " INFO __main__: Checkpoint " in records[0], records[:3]
    assert "Model config" not in output
    assert trainer_state(out)["global_step"] == 30
    assert_falls(train_losses(out))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["embed_tokens", "resampler", "vpm"]

    # The adapter reloads onto the base model and reproduces the eval loss the run reported.
    [(_, reported)] = eval_losses(out)
    base = AutoModel.from_pretrained(model, trust_remote_code=True, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out)
    dataset, collator = dataset_as_trained(model, eval_file)
    got, largest_logit = eval_loss(reloaded, dataset, collator)
    assert got == numerics.approx(reported, scale=largest_logit)  # computed by the run's processes
    untrained = AutoModel.from_pretrained(model, trust_remote_code=True, dtype=torch.float32)
    assert eval_loss(untrained, dataset, collator)[0] > reported * 1.2  # and the adapter is what made it better


@pytest.mark.launch
def test_full_finetune_zero3_two_processes_freezes_vision(tiny_checkpoint, shapes, tmp_path):
    model, out = tiny_checkpoint("minicpmv2_6"), tmp_path / "full"
    _, output = run_script(
        "finetune_ds.sh",
        ["--max_steps", "4", "--learning_rate", "1e-3", "--save_steps", "1000", "--tune_vision", "false",
         "--warmup_steps", "0"],
        GPUS_PER_NODE=2, MODEL=model, DATA=shapes, EVAL_DATA="", LLM_TYPE="qwen", OUTPUT_DIR=out,
    )
    assert "Training with DeepSpeed ZeRO-3 on 2 process(es)" in output
    before, after = load_state_dict(model), load_state_dict(out)
    assert before.keys() == after.keys()

    def changed(prefix):
        return [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]

    assert changed("vpm.") == []
    assert changed("llm.") and changed("resampler.")
    # The folder is self-contained: remote code, tokenizer and training args travel with it.
    for name in ("config.json", "modeling_minicpmv.py", "tokenizer_config.json", "training_args.bin"):
        assert (out / name).is_file(), name
    standalone = tmp_path / "moved"
    shutil.copytree(out, standalone)
    loaded = AutoModel.from_pretrained(standalone, trust_remote_code=True, dtype=torch.float32)
    for key, value in loaded.state_dict().items():
        if key in after:
            assert torch.equal(value, after[key]), key


@pytest.mark.launch
def test_lora_under_zero3_two_processes_trains_the_adapter(tiny_checkpoint, shapes, tmp_path):
    # The frozen output head is partitioned by ZeRO-3; the labelled-positions loss must still run
    # (its chunk recomputation in the backward pass once failed here with a CheckpointError).
    model, out = tiny_checkpoint("minicpmv2_6"), tmp_path / "lora_zero3"
    _, output = run_script(
        "finetune_lora.sh",
        ["--deepspeed", REPO / "ds_config_zero3.json", "--max_steps", "3", "--learning_rate", "5e-3",
         "--save_steps", "1000", "--warmup_steps", "0", "--tune_vision", "false"],
        GPUS_PER_NODE=2, MODEL=model, DATA=shapes, EVAL_DATA="", LLM_TYPE="qwen", OUTPUT_DIR=out,
    )
    assert "Training with DeepSpeed ZeRO-3 on 2 process(es)" in output
    assert trainer_state(out)["global_step"] == 3
    assert all(math.isfinite(loss) for _, loss in train_losses(out))
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.launch
def test_single_process_eval_and_resume_match_uninterrupted_run(tiny_checkpoint, shapes, tmp_path):
    # Trained packed (unpacked runs resume in test_resilience.py), evaluated unpacked.
    model = tiny_checkpoint("minicpmv2_6")
    common = ["--max_steps", "6", "--save_steps", "3", "--eval_strategy", "steps", "--eval_steps", "3",
              "--eval_data_path", shapes, "--packing", "true", "--model_max_length", "160",
              "--log_level", "info"]  # the Trainer's own "Num examples" line
    full = tmp_path / "uninterrupted"
    _, output = run_finetune(lora_args(model, shapes, full) + common)
    packing = re.search(r"Packing: (\d+) samples into (\d+) rows of at most 160 tokens", output)
    samples, rows = map(int, packing.groups())
    assert re.search(rf"Num examples = {rows}\b", output) and 3 <= rows < samples, output[-3000:]
    assert [step for step, _ in eval_losses(full)] == [3, 6]
    assert_falls(train_losses(full))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    run_finetune(lora_args(model, shapes, resumed) + common + ["--resume_from_checkpoint", resumed / "checkpoint-3"])
    assert trainer_state(resumed)["global_step"] == 6
    for series in (train_losses, eval_losses):
        got, want = series(resumed), series(full)
        assert [step for step, _ in got] == [step for step, _ in want]
        # Each run in its own processes: exact in practice, fp32 rounding of a loss at most.
        assert [loss for _, loss in got] == [numerics.approx(loss) for _, loss in want]


@pytest.mark.launch
def test_llama3_v_2_5_tokenizer_as_published_trains_through_both_launchers(tiny_checkpoint, shapes, tmp_path):
    # The published 2.5 tokenizer has no slice_start_id, slice_end_id, im_id_start or im_id_end;
    # neither has its stand-in, so the pipeline must find those tokens in the vocabulary.
    model = tiny_checkpoint("minicpmv2_5")
    tokenizer = loading.load_tokenizer(str(model))
    assert not any(hasattr(tokenizer, name) for name in ("slice_start_id", "slice_end_id", "im_id_start", "im_id_end"))
    for script, out in (("finetune_lora.sh", tmp_path / "lora"), ("finetune_ds.sh", tmp_path / "full")):
        run_script(
            script, ["--max_steps", "2", "--save_steps", "1000", "--warmup_steps", "0"],
            GPUS_PER_NODE=1, MODEL=model, DATA=shapes, EVAL_DATA="", LLM_TYPE="llama3", OUTPUT_DIR=out,
        )
        losses = [loss for _, loss in train_losses(out)]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), script
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert load_state_dict(tmp_path / "full").keys() == load_state_dict(model).keys()


@pytest.mark.launch
@pytest.mark.parametrize("family", sorted(LLM_TYPE))
def test_every_family_trains(tiny_checkpoint, shapes, tmp_path, family):
    out = tmp_path / family
    run_finetune(lora_args(tiny_checkpoint(family), shapes, out, LLM_TYPE[family]) + ["--max_steps", "3"])
    losses = train_losses(out)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor([loss for _, loss in losses])))
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.launch
def test_torchrun_on_cpu_without_use_cpu_is_refused(tiny_checkpoint, shapes, tmp_path):
    # Without --use_cpu, transformers runs each CPU rank alone: no DDP, and nothing says so.
    args = lora_args(tiny_checkpoint("minicpmv2_6"), shapes, tmp_path / "out", use_cpu=False)
    env = subprocess_env()
    code, output = run([*torchrun_finetune(env), *args, "--max_steps", "1"], env=env, expect_ok=False)
    assert code != 0
    assert "each rank would train alone" in output and "--use_cpu True" in output


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--use_lora", "true"], "cannot tune the LLM and apply LoRA at once"),
        (["--llm_type", "gpt"], "--llm_type 'gpt'"),
        (["--lora_layers_pattern", "layers"], "only applies together with --lora_layers_to_transform"),
        (["--use_lora", "true", "--tune_llm", "false", "--lora_layer_replication", "0:2,1:2"],
         "--lora_layer_replication: peft replicates decoder layers only"),
        (["--lora_bias", "some"], "--lora_bias must be"),
        # Settings that would be ignored.
        (["--lora_weight_path", "adapter"], "--lora_weight_path given without --use_lora true"),
        (["--q_lora", "true", "--lora_r", "8"], "--lora_r, --q_lora given without --use_lora true"),
        (["--max_num_frames", "0"], "--max_num_frames must be at least 1"),
        (["--stage", "ppo"], "--stage 'ppo' is not one of sft, dpo"),
        (["--dpo_beta", "0.5", "--dpo_ref_model", "sft"], "--dpo_beta, --dpo_ref_model given without --stage dpo"),
        (["--stage", "dpo", "--dpo_beta", "0"], "--dpo_beta must be positive"),
        (["--stage", "dpo", "--dpo_loss_type", "kto"], "--dpo_loss_type 'kto' is not one of sigmoid, ipo, hinge"),
        (["--stage", "dpo", "--packing", "true"], "--packing applies to --stage sft"),
        (["--stop_at_eval_loss", "0.01"], "--stop_at_eval_loss needs evaluations"),
        (["--stage", "dpo", "--use_lora", "true", "--tune_llm", "false", "--lora_weight_path", "sft_adapter"],
         "the reference would be the base model without that adapter"),
    ],
)
def test_contradictory_or_ignored_arguments_are_refused_at_parse_time(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(*argv)


def test_gradient_checkpointing_flag_means_the_same_on_every_supported_transformers(tmp_path):
    """The launchers' --gradient_checkpointing: no deprecation warning where transformers renamed it, and
    non-reentrant checkpointing where it reads the old names only (5.3)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = parse("--gradient_checkpointing", "true")[2]
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    # Where transformers has the new names, the old ones mirror them; on 5.3 these are what its Trainer reads.
    assert args.gradient_checkpointing is True
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_stop_at_eval_loss_stops_at_the_first_evaluation_below_it():
    callback, control, state = StopAtEvalLoss(0.01), TrainerControl(), TrainerState(global_step=25)
    callback.on_evaluate(None, state, control, metrics={"eval_loss": 0.02})
    assert not control.should_training_stop
    callback.on_evaluate(None, state, control, metrics={"eval_loss": 0.005})
    assert control.should_training_stop


@pytest.mark.parametrize(
    "family, argv, message",
    [
        ("minicpmv2_6", ["--llm_type", "minicpm"],
         "--llm_type minicpm contradicts the checkpoint: its config (model_type 'minicpmv', version 2.6) says qwen"),
        ("minicpmv2_0", ["--llm_type", "qwen"], "version None) says minicpm"),
        ("minicpmv2_5", ["--llm_type", "native"], "version '2.5') says llama3"),
        ("minicpmv4_6", ["--llm_type", "qwen"], "(model_type 'minicpmv4_6', version None) says native"),
        ("minicpmv2_6", [*LORA_ARGS, "--lora_modules_to_save", "resampler"], "--lora_modules_to_save leaves out vpm"),
        ("minicpmv4_7", [*LORA_ARGS, "--lora_modules_to_save", "merger"], "--lora_modules_to_save leaves out vision_tower"),
        ("minicpmv2_6", ["--max_num_frames", "8"], "--max_num_frames and --stack_frames apply to video"),
        ("minicpmv2_0", ["--packing", "true"], "--packing is not supported for MiniCPM-V 2.0: its MiniCPM language"),
        ("minicpmv4_7", ["--packing", "true"], "--packing is not supported for the native MiniCPM-V models"),
    ],
)
def test_settings_that_contradict_the_checkpoint_are_refused_before_weights_load(
    tiny_checkpoint, shapes, tmp_path, monkeypatch, family, argv, message
):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(prepare, "load_model", no_weights)
    with pytest.raises(finetune.UsageError, match=re.escape(message)):
        finetune.train(*parse("--model_name_or_path", tiny_checkpoint(family), "--data_path", shapes, *argv,
                              output_dir=tmp_path))


@pytest.mark.parametrize("family", [*LLM_TYPE, *NATIVE_FAMILIES])
def test_llm_type_defaults_to_the_checkpoints(tiny_checkpoint, family):
    expected = LLM_TYPE.get(family, NATIVE_LLM_TYPE)
    assert families.family_for(loading.load_config(tiny_checkpoint(family))).llm_type == expected


@pytest.mark.launch
def test_qlora_loads_the_llm_in_4bit_and_trains(tiny_checkpoint, shapes, tmp_path):
    out = tmp_path / "qlora"
    _, output = run_finetune(lora_args(tiny_checkpoint("minicpmv2_6"), shapes, out) + ["--q_lora", "true", "--max_steps", "3"])
    # 2 LLM layers x 7 projections; the vision tower, resampler and output head stay unquantized.
    assert "QLoRA: 14 linear layers in 4 bit (nf4), e.g. llm.model.layers.0.self_attn.q_proj" in output
    assert len(train_losses(out)) == 3 and (out / "adapter_model.safetensors").is_file()


def test_lora_arguments_reach_peft(tiny_checkpoint, tmp_path):
    """lora_layers_to_transform / _pattern, lora_modules_to_save and lora_weight_path do what they say."""
    model_dir = tiny_checkpoint("minicpmv2_6")
    config = loading.load_config(model_dir)

    def build(*argv):
        _, _, training_args, lora_settings = parse(*LORA_ARGS, "--tune_vision", "false", *argv, output_dir=tmp_path)
        base = loading.load_model(model_dir, config, dtype=torch.float32)
        return lora.apply_lora(base, families.family_for(config), training_args, lora_settings)

    model = build("--lora_layers_to_transform", "1", "--lora_layers_pattern", "layers",
                  "--lora_modules_to_save", "resampler")
    lora_modules = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert lora_modules and all(".layers.1." in name for name in lora_modules)
    assert model.peft_config["default"].modules_to_save == ["resampler"]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    assert trainable and all(".resampler.modules_to_save." in name for name in trainable)

    # An adapter with non-zero weights, saved, then used as the starting point of a new run.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(tmp_path / "start")
    again = build("--lora_layers_to_transform", "1", "--lora_layers_pattern", "layers",
                  "--lora_modules_to_save", "resampler", "--lora_weight_path", str(tmp_path / "start"))
    saved, loaded = dict(model.named_parameters()), dict(again.named_parameters())
    lora_b = [name for name in saved if "lora_B" in name]
    assert lora_b and all(torch.equal(saved[name], loaded[name]) for name in lora_b)
    assert loaded[lora_b[0]].requires_grad

    with pytest.raises(ValueError, match="do not fit this LoRA layout"):
        build("--lora_weight_path", str(tmp_path / "start"), "--lora_r", "8")


def test_evaluation_keeps_no_logits_without_metrics(tiny_checkpoint, shapes, tmp_path):
    """--prediction_loss_only false (the launchers' flag) must not gather the eval set's logits."""
    from trainer import CPMTrainer

    model_dir = tiny_checkpoint("minicpmv2_6")
    dataset, collator = dataset_as_trained(model_dir, shapes)
    _, _, training_args, _ = parse(
        "--report_to", "none", "--prediction_loss_only", "false", "--per_device_eval_batch_size", "2",
        output_dir=tmp_path,
    )
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    trainer = CPMTrainer(model=model, args=training_args, eval_dataset=dataset, data_collator=collator)
    result = trainer.predict(dataset)
    assert result.predictions is None
    assert torch.isfinite(torch.tensor(result.metrics["test_loss"]))


@pytest.mark.launch
def test_qlora_with_zero3_is_refused_before_loading(tiny_checkpoint, shapes, tmp_path):
    args = lora_args(tiny_checkpoint("minicpmv2_6"), shapes, tmp_path / "out") + [
        "--q_lora", "true", "--deepspeed", REPO / "ds_config_zero3.json", "--max_steps", "1"]
    code, output = run_finetune(args, expect_ok=False)
    assert code != 0
    assert "--q_lora does not work with FSDP or DeepSpeed ZeRO-3" in output
    assert "Loading weights" not in output


@pytest.mark.launch
def test_seeded_runs_are_reproducible(tiny_checkpoint, shapes, tmp_path):
    """Same seed, same losses: LoRA's initial weights are drawn under the seed too."""
    runs = []
    for name in ("first", "second"):
        run_finetune(lora_args(tiny_checkpoint("minicpmv2_6"), shapes, tmp_path / name) + ["--max_steps", "3"])
        runs.append(train_losses(tmp_path / name))
    assert runs[0] == runs[1]  # exact: one machine, the same thread count (subprocess_env), the same kernels


def test_finish_tears_down_the_process_group(tmp_path):
    # A gloo group left alive at exit aborted a finished run at random (exit -6) in its C++
    # destructors; finish() must leave no group behind.
    import torch.distributed as dist

    import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    distributed.finish()
    assert not dist.is_initialized()
    distributed.finish()  # nothing to tear down: a no-op


@pytest.mark.launch
@pytest.mark.parametrize(
    "script, gpu, precision, expected",
    [
        ("finetune_lora.sh", "bf16", "", "--bf16 true --bf16_full_eval true"),
        ("finetune_lora.sh", "fp16", "", "--fp16 true --fp16_full_eval true"),
        ("finetune_ds.sh", "bf16", "fp16", "--fp16 true --fp16_full_eval true"),
        ("finetune_ds.sh", "cpu", "", "--use_cpu true --ddp_backend gloo"),
    ],
)
def test_launchers_pick_bf16_where_the_gpu_has_it(script, gpu, precision, expected, tmp_path):
    """The launchers' precision choice, with a stand-in Python that answers the GPU probe."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho {gpu}\n")
    python.chmod(0o755)
    env = subprocess_env(PYTHON=python, TORCHRUN="echo torchrun", PRECISION=precision)
    env.pop("DEVICE_ARGS", None)
    if not precision:
        env.pop("PRECISION")
    _, output = run(["bash", REPO / script], env=env)
    assert f" {expected} " in output
    assert ("--bf16" in output) + ("--fp16" in output) + ("--use_cpu" in output) == 1, output


COMMAND_LINE_MISTAKES = {
    "lora rank 0": (LORA_ARGS + ["--lora_r", "0"], r"--lora_r is 0; the LoRA rank must be at least 1"),
    "dropout 2": (LORA_ARGS + ["--lora_dropout", "2"], r"--lora_dropout is 2.0; a dropout probability is in \[0, 1\)"),
    "batch size 0": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size is 0; it must be at least 1"),
    "no such resume folder": (["--resume_from_checkpoint", "nowhere/checkpoint-5"],
                              "--resume_from_checkpoint nowhere/checkpoint-5: no such folder"),
    "no such model folder": (["--model_name_or_path", "./models/MiniCPM-V-2_6"],
                             r"--model_name_or_path \./models/MiniCPM-V-2_6: no such folder"),
    "deepspeed json": (["--deepspeed", "{bad_json}"], r"--deepspeed \S+broken\.json: not a valid JSON DeepSpeed config"),
    "lora targets": (LORA_ARGS + ["--lora_target_modules", r"llm\..*\.qproj"],
                     r"--lora_target_modules 'llm\\\\\.\.\*\\\\\.qproj' matches no module of the model .*e\.g\. llm\.model"),
    "llm_type contradicting the checkpoint": (["--llm_type", "minicpm"],
                                              "--llm_type minicpm contradicts the checkpoint"),
    "frame flags for a remote-code model": (["--max_num_frames", "8"], "--max_num_frames and --stack_frames apply to video"),
}


@pytest.mark.parametrize("case", list(COMMAND_LINE_MISTAKES))
def test_command_line_mistake_prints_one_message_and_exits_2(case, tiny_checkpoint, shapes, tmp_path, capsys, monkeypatch):
    argv, message = COMMAND_LINE_MISTAKES[case]
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"train_batch_size": "auto",}')
    argv = [arg.format(bad_json=bad_json) for arg in argv]
    if case != "lora targets":  # every check that needs no weights runs before they load
        monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    base = finetune_args(tiny_checkpoint("minicpmv2_6"), shapes, tmp_path / "out", "--max_steps", "1", "--report_to", "none")
    with pytest.raises(SystemExit) as exit:
        finetune.main([str(arg) for arg in base] + argv)
    assert exit.value.code == finetune.EXIT_USAGE
    error = capsys.readouterr().err
    assert re.search(f"finetune.py: error: {message}", error), error[-2000:]


@pytest.mark.parametrize("flag", sorted(arguments.FOLDER_FLAGS))
def test_a_missing_relative_folder_is_named_before_weights_load(flag, tiny_checkpoint, shapes, tmp_path, capsys,
                                                                monkeypatch):
    # "output/merged" has one "/" like a hub id; its parent folder exists here, so it is a path.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output").mkdir()
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    needs = {"model_name_or_path": [], "dpo_ref_model": ["--stage", "dpo"], "lora_weight_path": LORA_ARGS}[flag]
    base = finetune_args(tiny_checkpoint("minicpmv2_6"), shapes, tmp_path / "out", "--max_steps", "1", "--report_to", "none")
    with pytest.raises(SystemExit) as exit:
        finetune.main([str(arg) for arg in base] + needs + [f"--{flag}", "output/merged"])
    assert exit.value.code == finetune.EXIT_USAGE
    assert f"finetune.py: error: --{flag} output/merged: no such folder" in capsys.readouterr().err


@pytest.mark.launch
def test_command_line_mistake_through_the_launcher_has_no_traceback(tiny_checkpoint, shapes, tmp_path):
    code, output = run_script("finetune_lora.sh", ["--lora_dropout", "1.5"], expect_ok=False, GPUS_PER_NODE=1,
                              MODEL=tiny_checkpoint("minicpmv2_6"), DATA=shapes, EVAL_DATA="", OUTPUT_DIR=tmp_path)
    assert code == finetune.EXIT_USAGE, output[-3000:]
    assert "finetune.py: error: --lora_dropout is 1.5" in output
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.launch
def test_adapted_deepspeed_config_is_private_and_removed_at_exit(tmp_path):
    script = (
        "import os, distributed; argv = distributed.adapt_deepspeed_argv(['--deepspeed', 'ds_config_zero2.json', "
        "'--lr_scheduler_type', 'cosine']); path = argv[1]; "
        "print('adapted:', path, oct(os.stat(os.path.dirname(path)).st_mode & 0o777), os.path.isfile(path))"
    )
    outputs = [re.search(r"adapted: (\S+) (\S+) (\S+)", run([sys.executable, "-c", script])[1]).groups()
               for _ in range(2)]
    (first, mode, existed), (second, _, _) = outputs
    assert existed == "True" and mode == "0o700"  # only its owner can read or write there
    assert os.path.dirname(first) != os.path.dirname(second)  # no shared name to collide on
    assert not os.path.exists(os.path.dirname(first)) and not os.path.exists(os.path.dirname(second))
