"""Preference tuning (--stage dpo): the loss at the start, the reference policy, learning, the
launcher under torchrun with kill -9 and resume, and preflight on bad preference records."""

import json
import math
import re

import pytest
import torch
from peft import PeftModel

import arguments
import families
from stages import dpo, prepare
import finetune
import loading
import numerics
import preflight
import resilience
from data.preference import PreferenceCollator
from data.preflight_report import REASONS
from data.slicing import model_pixels
from dataset import DataCollator
from launch import (
    FAST_ARGS, LORA_ARGS, REPO, finetune_args, killed_at_checkpoint, run, run_script, subprocess_env, torchrun_finetune,
    train_losses, trainer_state,
)
from loss import DPO_LOSS_TYPES, token_loss
from tiny_models.build import LLM_TYPE


def write_preferences(shapes, path, records=None):
    """Preference records from the shapes file: the prompt of each record, its answer as chosen,
    the answer's words reversed as rejected ("not ANSWER" for one word; a preference that holds for unseen shapes too).
    Image paths become absolute, so the file may live anywhere."""
    records = json.loads(shapes.read_text()) if records is None else records
    pairs = []
    for record in records:
        *prompt, answer = record["conversations"]
        image = record.get("image")
        if isinstance(image, str):
            image = str(shapes.parent / image)
        elif isinstance(image, dict):
            image = {tag: str(shapes.parent / path) for tag, path in image.items()}
        pairs.append({
            **record, **({"image": image} if image else {}), "conversations": prompt, "chosen": answer["content"],
            "rejected": " ".join(reversed(answer["content"].split())) if " " in answer["content"] else "not " + answer["content"],
        })
    path.write_text(json.dumps(pairs))
    return path


@pytest.fixture(scope="module")
def preferences(shapes):
    return write_preferences(shapes, shapes.parent / "preferences.json")


def parse_dpo(model_dir, data, output_dir, *extra, llm_type="qwen"):
    return arguments.parse_args([str(arg) for arg in finetune_args(
        model_dir, data, output_dir, *FAST_ARGS, "--stage", "dpo", *extra, llm_type=llm_type,
    )])


def preference_trainer(model_dir, data, output_dir, *extra, llm_type="qwen"):
    """The PreferenceTrainer finetune.train builds, without training; and a batch of every pair."""
    model_args, data_args, training_args, lora_args = parse_dpo(model_dir, data, output_dir, *extra, llm_type=llm_type)
    config = loading.load_config(model_dir)
    family = families.family_for(config, training_args.llm_type)
    tokenizer = family.load_processing(model_dir)
    dataset, _ = prepare.build_datasets(family, data_args, training_args, tokenizer, config, "preference")
    model = prepare.adapt_model(
        family, prepare.load_model(family, model_dir, training_args, lora_args, config), training_args, lora_args
    )
    trainer = dpo.PreferenceTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=PreferenceCollator(training_args.model_max_length),
        beta=training_args.dpo_beta, loss_type=training_args.dpo_loss_type,
        ref_model=dpo.load_reference(family, model_args, training_args, lora_args, config),
    )
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    return trainer, batch, dataset


def full_logits_logps(model, dataset):
    """Per pair, (chosen, rejected) log-probabilities from plain full logits, each row its own
    forward with its own images: the computation the trainer's lean path must reproduce."""
    collate = DataCollator(10**6)  # the SFT collator: one row, its own images
    logps = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for i in range(len(dataset)):
            for key, row in dataset[i].items():
                batch = collate([row])
                pixels = model_pixels(batch["pixel_values"], torch.float32)
                logits = model(data=dict(batch, pixel_values=pixels), use_cache=False).logits
                logps[key].append(-token_loss(logits, batch["labels"], num_items=1).item())
    return torch.tensor(logps["chosen"]), torch.tensor(logps["rejected"])


@pytest.mark.numerics
@pytest.mark.parametrize("family", sorted(LLM_TYPE))
def test_lora_step_0_is_ln2_and_reference_is_the_base_model(family, tiny_checkpoint, shapes, tmp_path):
    model_dir = tiny_checkpoint(family)
    records = json.loads(shapes.read_text())
    data = write_preferences(shapes, tmp_path / "pairs.json", records[:2] + records[-2:])  # two-image and text-only too
    trainer, batch, dataset = preference_trainer(model_dir, data, tmp_path, *LORA_ARGS, llm_type=LLM_TYPE[family])
    model = trainer.model
    model.train()

    # Policy == reference (LoRA's B starts at zero): every loss type at its value for a zero margin.
    # To fp32 rounding: the trainable copies of modules_to_save (resampler) take other matmul
    # kernels than the frozen originals (torch folds batched matmuls by requires_grad), so a
    # log-probability of ~40 nats may differ in its last bit (3.8e-6).
    beta = trainer.beta
    at_zero = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * beta)) ** 2}
    assert set(at_zero) == set(DPO_LOSS_TYPES)
    for loss_type in DPO_LOSS_TYPES:
        trainer.loss_type = loss_type
        loss = trainer.compute_loss(model, batch)
        assert loss.item() == pytest.approx(at_zero[loss_type], rel=1e-5, abs=1e-6), loss_type
    for name in dpo.METRICS[:3]:
        assert abs(trainer.stored_metrics["train"][name][-1]) < 1e-6, name
    trainer.loss_type = "sigmoid"

    # Move the policy away from the base: the reference must not move with it.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    ref_chosen, ref_rejected = trainer.reference_logps(model, batch)
    with torch.no_grad():
        policy_chosen, policy_rejected = trainer.sequence_logps(model, batch)
    base = loading.load_model(model_dir, loading.load_config(model_dir), dtype=torch.float32).train()
    with torch.no_grad():
        base_chosen, base_rejected = trainer.sequence_logps(base, batch)
    # The base model loaded afresh trains all its parameters: other kernels (see above).
    numerics.assert_close(ref_chosen, base_chosen)
    numerics.assert_close(ref_rejected, base_rejected)
    assert (policy_chosen - base_chosen).abs().max() > 1e-3
    # The lean path (vision once per pair, the head on answer tokens only, 2B rows padded) equals
    # plain full logits with each row on its own, to fp32 rounding of sums of ~40 nats.
    for network in (base, model):
        network.eval()
        with torch.no_grad():
            lean = trainer.sequence_logps(network, batch)
        for got, expected in zip(lean, full_logits_logps(network, dataset)):
            numerics.assert_close(got, expected)


def test_full_fine_tune_starts_at_ln2_against_a_frozen_copy(tiny_checkpoint, preferences, tmp_path):
    trainer, batch, _ = preference_trainer(tiny_checkpoint("minicpmv2_6"), preferences, tmp_path)
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    trainer.model.train()
    assert trainer.compute_loss(trainer.model, batch).item() == torch.tensor(math.log(2)).item()


def test_a_loss_turning_nan_stops_the_run_naming_the_pairs(tiny_checkpoint, preferences, tmp_path):
    trainer, batch, dataset = preference_trainer(tiny_checkpoint("minicpmv2_6"), preferences, tmp_path, *LORA_ARGS)
    model = trainer.model.train()
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "lora_B" in name).fill_(float("nan"))
    assert torch.isnan(trainer.compute_loss(model, batch))
    with pytest.raises(resilience.NonFiniteLoss) as stop:
        trainer.loss_guard.on_step_end(trainer.args, trainer.state, trainer.control)
    named = re.findall(r"#(\d+) \(id '([^']*)'\)", str(stop.value))
    records = json.loads(preferences.read_text())
    assert [int(index) for index, _ in named] == list(range(len(dataset)))
    assert all(records[int(index)]["id"] == record_id for index, record_id in named)


@pytest.mark.numerics  # sampled tokens and margins follow the kernels' rounding
def test_seeded_run_raises_the_margin_and_held_out_accuracy(tiny_checkpoint, shapes, tmp_path):
    records = json.loads(shapes.read_text())
    train = write_preferences(shapes, tmp_path / "train.json", records[:6])
    held_out = write_preferences(shapes, tmp_path / "held_out.json", records[6:8])
    trainer = finetune.train(*parse_dpo(
        tiny_checkpoint("minicpmv2_6"), train, tmp_path / "run", *LORA_ARGS, "--eval_data_path", held_out,
        "--max_steps", "12", "--per_device_train_batch_size", "2", "--learning_rate", "2e-3",
        "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "steps", "--eval_steps", "12",
    ))
    history = trainer.state.log_history
    steps = [h for h in history if "loss" in h]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(steps[0]["rewards/margins"]) < 1e-6
    first, last = sum(h["rewards/margins"] for h in steps[:3]) / 3, sum(h["rewards/margins"] for h in steps[-3:]) / 3
    assert last > first + 0.5, [h["rewards/margins"] for h in steps]
    [evaluation] = [h for h in history if "eval_loss" in h]
    assert evaluation["eval_rewards/accuracies"] > 0.5 and evaluation["eval_rewards/margins"] > 0
    assert evaluation["eval_loss"] < math.log(2)


def preference_problems(checkpoint, records, tmp_path):
    """The problems preflight reports (``--stage dpo --preflight_only true``, which must stop) for
    ``records``, written as the data file."""
    data, out = tmp_path / "bad.json", tmp_path / "out"
    data.write_text(json.dumps(records))
    with pytest.raises(preflight.PreflightFailed):
        finetune.main([str(a) for a in finetune_args(checkpoint, data, out, *FAST_ARGS, "--stage", "dpo",
                                                       "--preflight_only", "true")])
    return json.loads((out / preflight.REPORT_NAME).read_text())["problems"]


def test_bad_preference_records_are_reported_by_preflight(tiny_checkpoint, preferences, tmp_path):
    good = json.loads(preferences.read_text())[0]
    bad = [
        good,
        {**good, "id": "no-rejected", "rejected": None},
        {**good, "id": "empty-chosen", "chosen": "  "},
        {**good, "id": "same", "rejected": good["chosen"]},
        {**good, "id": "sft-record", "conversations": good["conversations"] + [{"role": "assistant", "content": "x"}]},
        {**good, "id": "too-long", "rejected": "word " * 600},
    ]
    problems = preference_problems(tiny_checkpoint("minicpmv2_6"), bad, tmp_path)
    found = {(p["index"], p["record_id"], p["reason"]) for p in problems}
    assert found == {
        (1, "no-rejected", "missing_answer"),
        (2, "empty-chosen", "missing_answer"),
        (3, "same", "identical_answers"),
        (4, "sft-record", "prompt_not_user_last"),
        (5, "too-long", "pair_too_long"),
    }
    assert {reason for *_, reason in found} <= set(REASONS)
    [too_long] = [p for p in problems if p["reason"] == "pair_too_long"]
    assert "with the rejected answer" in too_long["message"] and "max_length 512" in too_long["message"]


@pytest.mark.launch
def test_full_fine_tune_zero3_torchrun_two_processes(tiny_checkpoint, preferences, tmp_path):
    env, out = subprocess_env(), tmp_path / "full"
    run_args = finetune_args(
        tiny_checkpoint("minicpmv2_6"), preferences, out, "--stage", "dpo", "--deepspeed", REPO / "ds_config_zero3.json",
        "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
        "--save_strategy", "no",
    )
    _, output = run([*torchrun_finetune(env), *run_args], env=env)
    assert "Training with DeepSpeed ZeRO-3 on 2 process(es)" in output
    assert "DPO reference model: a ZeRO-3 inference engine, sharded like the policy" in output
    steps = [h for h in trainer_state(out)["log_history"] if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3] and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # The policy moves away from the (sharded, frozen) reference, towards the chosen answers.
    assert steps[-1]["rewards/margins"] > 0.1 and steps[-1]["loss"] < steps[0]["loss"]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


STEPS = 8


@pytest.mark.launch
def test_launcher_two_processes_zero2_saves_an_adapter_and_resumes_after_kill_9(tiny_checkpoint, preferences, tmp_path):
    model = tiny_checkpoint("minicpmv2_6")
    args = ["--max_steps", str(STEPS), "--save_steps", "3", "--learning_rate", "1e-3", "--tune_vision", "false",
            "--seed", "0"]
    env = dict(GPUS_PER_NODE=2, MODEL=model, DATA=preferences, EVAL_DATA="", LLM_TYPE="qwen")
    whole = tmp_path / "whole"
    _, output = run_script("finetune_dpo.sh", args, OUTPUT_DIR=whole, **env)
    assert "Training with DeepSpeed ZeRO-2 on 2 process(es)" in output
    uninterrupted = dict(train_losses(whole))
    assert sorted(uninterrupted) == list(range(1, STEPS + 1)) and uninterrupted[1] == pytest.approx(math.log(2), abs=1e-6)
    assert "rewards/accuracies" in trainer_state(whole)["log_history"][0]
    base = loading.load_model(model, loading.load_config(model), dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, whole)
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in adapter.named_parameters())

    out = tmp_path / "killed"
    killed_at_checkpoint("finetune_dpo.sh", args, out, 3, **env)
    _, output = run_script("finetune_dpo.sh", [*args, "--resume_from_checkpoint", out], OUTPUT_DIR=out, **env)
    resumed_from = int(re.search(r"Resuming from \S+checkpoint-(\d+) \(step", output).group(1))
    losses = dict(train_losses(out))
    after = range(resumed_from + 1, STEPS + 1)
    assert {step: losses[step] for step in after} == {step: uninterrupted[step] for step in after}
