"""GRPO (--stage grpo): the answered rows' log-probabilities with each prompt's vision features
reused, a seeded run on 2 torchrun processes whose learnable reward (a user's metrics file) rises (remote-code 2.6,
native 4.6), the refusals
(a family that cannot generate, grpo flags without --stage grpo, unscorable references), and the
launcher on 2 processes killed with -9 and resumed."""

import json
import re
import shutil

import pytest
import torch

import families
import finetune
import loading
import preflight
from evaluation import metrics
from families.minicpmv2_6 import MiniCPMV2_6
from launch import (
    FAST_ARGS, LORA_ARGS, REPO, finetune_args, killed_at_checkpoint, run, run_script, subprocess_env, torchrun_finetune,
    trainer_state,
)
from loss import IGNORE_INDEX, labelled_token_logps
from stages import prepare
from usage import UsageError
import arguments

GROUP = 4


# The learnable reward, a file of the user's own metrics as --grpo_rewards_file reads it; registered
# for each test's runs in this process, and removed after it.
LETTERS_METRIC = REPO / "tests" / "fixtures" / "letters_metric.py"


@pytest.fixture(autouse=True)
def letters_metric():
    added = metrics.load_user_metrics(LETTERS_METRIC)
    yield
    for name in added:
        del metrics.METRICS[name]


def colour_records(shapes):
    """The shapes' single-image records, their answer the colour word alone ("red")."""
    records = []
    for record in json.loads(shapes.read_text()):
        if isinstance(record.get("image"), str):
            question, answer = record["conversations"]
            records.append({**record, "image": str(shapes.parent / record["image"]),
                            "conversations": [question, {"role": "assistant", "content": answer["content"].split()[1]}]})
    return records


@pytest.fixture(scope="module")
def colours(shapes):
    path = shapes.parent / "colours.json"
    path.write_text(json.dumps(colour_records(shapes)))
    return path


def grpo_args(model_dir, data, output_dir, *extra, tuning=LORA_ARGS):
    return [str(arg) for arg in finetune_args(
        model_dir, data, output_dir, *FAST_ARGS, "--stage", "grpo", *tuning, "--grpo_rewards", "letters_in_reference",
        "--grpo_num_generations", str(GROUP), "--grpo_max_new_tokens", "3", *extra,
    )]


def policy_and_prompts(model_dir, colours, tmp_path):
    """``(config, family, processing, dataset, model)``: the checkpoint's family and processing, the
    colour records as GRPO reads them (SFT-form samples) and its model in fp32, in eval mode."""
    _, data_args, training_args, _ = arguments.parse_args(grpo_args(model_dir, colours, tmp_path))
    config = loading.load_config(model_dir)
    fam = families.family_for(config)
    processing = fam.load_processing(model_dir)
    dataset, _ = prepare.build_datasets(fam, data_args, training_args, processing, config, "sft")
    return config, fam, processing, dataset, fam.load_model(model_dir, config, dtype=torch.float32).eval()


@pytest.mark.numerics  # grouped and single rows: other kernel shapes, compared within a tolerance
# 4.7 lays out every row's positions by its images' grids (M-RoPE): the later rows of a group carry them.
@pytest.mark.parametrize("family", ["minicpmv2_6", "minicpmv4_6", "minicpmv4_7"])
def test_grouped_forward_reuses_vision_and_matches_each_row_alone(family, tiny_checkpoint, colours, tmp_path):
    model_dir = tiny_checkpoint(family)
    config, fam, processing, dataset, model = policy_and_prompts(model_dir, colours, tmp_path)
    samples = [dataset[0], dataset[1]]
    torch.manual_seed(0)
    answers = fam.sample(model, processing, samples, GROUP, 1.0, 3)
    assert [len(group) for group in answers] == [GROUP, GROUP]
    assert all(1 <= len(answer) <= 3 for group in answers for answer in group)

    vision = fam.vision(model)[0]
    calls = []
    vision.register_forward_hook(lambda *_: calls.append(1))

    def logps(batch, group):
        labels = fam.loss_labels(batch["labels"])
        with torch.no_grad():
            logits = fam.forward(model, batch, group=group).logits
        return labelled_token_logps(torch.nn.Identity(), logits, labels, logits.size(-1), temperature=0.7), labels

    grouped, labels = logps(fam.answered_batch(processing, samples, answers, 512), GROUP)
    assert len(calls) == 1  # the two prompts' images in one vision call, not eight
    row = 0
    for sample, group in zip(samples, answers):
        for answer in group:
            alone, alone_labels = logps(fam.answered_batch(processing, [sample], [[answer]], 512), 1)
            mask = alone_labels[0] != IGNORE_INDEX
            assert labels[row].ne(IGNORE_INDEX).sum() == mask.sum() == len(answer)
            torch.testing.assert_close(grouped[row][labels[row] != IGNORE_INDEX], alone[0][mask], rtol=1e-4, atol=1e-4)
            row += 1


def test_native_sampling_never_answers_with_a_media_placeholder(tiny_checkpoint, colours, tmp_path):
    """The native forward finds a row's images by their placeholder tokens: one sampled into an
    answer (a random tiny model does it at seed 0) would take image features the prompt lacks."""
    model_dir = tiny_checkpoint("minicpmv4_6")
    config, fam, processing, dataset, model = policy_and_prompts(model_dir, colours, tmp_path)
    placeholders = [config.image_token_id, config.video_token_id]

    def favour_placeholders(module, args, logits):
        logits = logits.clone()
        logits[..., placeholders] += 100.0
        return logits

    model.lm_head.register_forward_hook(favour_placeholders)
    samples = [dataset[0], dataset[1]]
    torch.manual_seed(0)
    answers = fam.sample(model, processing, samples, GROUP, 1.0, 3)
    tokens = {token for group in answers for answer in group for token in answer}
    assert tokens and not tokens & set(placeholders), answers
    batch = fam.answered_batch(processing, samples, answers, 512)
    with torch.no_grad():
        logits = fam.forward(model, batch, group=GROUP).logits
    assert logits.shape[0] == 2 * GROUP


# Measured over 12 steps (2 processes of 2 prompts x 4 answers of 3 tokens, full fine-tune of the LLM,
# learning rate 2e-3): the mean reward of the last 3 steps over that of the first 3 rose from 0.242
# to 0.500 (2.6) and from 0.248 to 0.585 (4.6); the test asserts about half the smaller rise.
REWARD_RISE = 0.13


@pytest.mark.numerics  # sampled tokens and margins follow the kernels' rounding
@pytest.mark.launch
@pytest.mark.parametrize("family", ["minicpmv2_6", "minicpmv4_6"])
def test_torchrun_run_raises_a_learnable_reward(family, tiny_checkpoint, colours, tmp_path):
    # One fixed answer for every prompt: every group's advantages push the same way.
    records = json.loads(colours.read_text())
    for record in records:
        record["conversations"][1]["content"] = "red"
    data = tmp_path / "red.json"
    data.write_text(json.dumps(records))
    env, out = subprocess_env(), tmp_path / "run"
    args = grpo_args(
        tiny_checkpoint(family), data, out, "--grpo_rewards_file", LETTERS_METRIC, "--max_steps", "12",
        "--per_device_train_batch_size", "2", "--learning_rate", "2e-3", "--lr_scheduler_type", "constant",
        "--tune_vision", "false", "--logging_steps", "1", "--save_strategy", "no", tuning=["--tune_llm", "true"],
    )
    _, output = run([*torchrun_finetune(env), *args], env=env)
    assert "on 2 process(es)" in output
    rewards = [h["reward"] for h in trainer_state(out)["log_history"] if "loss" in h]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + REWARD_RISE, rewards


@pytest.mark.numerics  # sampled tokens and margins follow the kernels' rounding
@pytest.mark.parametrize("tuning", [LORA_ARGS, ["--tune_llm", "true"]], ids=["lora", "full"])
def test_kl_to_the_reference_starts_at_zero_and_grows(tuning, tiny_checkpoint, colours, tmp_path):
    """The reference (LoRA: adapters off; full fine-tune: a frozen copy) is the starting policy: no
    divergence at step 1; the policy then moves away from it."""
    argv = grpo_args(tiny_checkpoint("minicpmv2_6"), colours, tmp_path / "run", "--grpo_beta", "0.1",
                     "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "2e-2",
                     "--tune_vision", "false", "--logging_steps", "1", "--save_strategy", "no", tuning=tuning)
    trainer = finetune.train(*arguments.parse_args(argv))
    kl = [h["kl"] for h in trainer.state.log_history if "loss" in h]
    assert kl[0] == pytest.approx(0, abs=1e-6) and kl[-1] > 1e-4, kl


class Mute(MiniCPMV2_6):
    """A made-up MiniCPM-V 9.8 that cannot generate."""

    name = "mute9_8"
    versions = (9.8,)
    reasons = {**MiniCPMV2_6.reasons, "generate": "the mute 9.8 family cannot generate"}


def test_a_family_that_cannot_generate_is_refused_with_its_reason(monkeypatch, tiny_checkpoint, colours, tmp_path,
                                                                 capsys):
    monkeypatch.setattr(families, "FAMILIES", list(families.FAMILIES))
    families.register(Mute)
    folder = tmp_path / "mute"
    shutil.copytree(tiny_checkpoint("minicpmv2_6"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "version": 9.8}))
    with pytest.raises(SystemExit):
        finetune.main(grpo_args(folder, colours, tmp_path / "out", "--max_steps", "1"))
    assert "finetune.py: error: --stage grpo: the mute 9.8 family cannot generate" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--grpo_num_generations", "--grpo_beta", "--grpo_rewards"])
def test_grpo_flags_are_refused_without_stage_grpo(flag, tiny_checkpoint, colours, tmp_path):
    value = {"--grpo_rewards": "f1"}.get(flag, "3")
    with pytest.raises(UsageError, match=re.escape(f"{flag} given without --stage grpo, where they do nothing")):
        arguments.parse_args([str(a) for a in finetune_args(tiny_checkpoint("minicpmv2_6"), colours, tmp_path,
                                                             "--stage", "sft", flag, value)])


@pytest.mark.parametrize(("flags", "message"), [
    (["--grpo_num_generations", "1"], "--grpo_num_generations must be at least 2"),
    (["--grpo_rewards", "em,nope"], "--grpo_rewards: no metric named 'nope'"),
    (["--grpo_rewards", "em:x"], "--grpo_rewards: 'em:x': the weight after ':' is not a number"),
    (["--grpo_loss_type", "ppo"], "--grpo_loss_type 'ppo' is not one of grpo, dapo"),
])
def test_bad_grpo_flags_are_named(flags, message, tiny_checkpoint, colours, tmp_path):
    with pytest.raises(UsageError, match=re.escape(message)):
        arguments.parse_args(grpo_args(tiny_checkpoint("minicpmv2_6"), colours, tmp_path, *flags))


def test_unscorable_references_are_preflight_problems_before_weights_load(tiny_checkpoint, colours, tmp_path,
                                                                         monkeypatch):
    records = json.loads(colours.read_text())
    records[1]["conversations"][1]["content"] = "no number here"
    for record in records[2:]:
        record["conversations"][1]["content"] = "3"
    data = tmp_path / "numbers.json"
    data.write_text(json.dumps(records))
    eval_data = tmp_path / "eval.json"
    eval_data.write_text(json.dumps(records[:2]))
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    argv = grpo_args(tiny_checkpoint("minicpmv2_6"), data, tmp_path / "out", "--grpo_rewards", "numeric",
                     "--eval_data_path", eval_data, "--eval_strategy", "steps", "--eval_steps", "1")
    with pytest.raises(preflight.PreflightFailed):
        finetune.train(*arguments.parse_args(argv))
    report = json.loads((tmp_path / "out" / preflight.REPORT_NAME).read_text())
    found = [(p["split"], p["index"], p["record_id"], p["reason"]) for p in report["problems"]]
    assert found == [(split, i, records[i]["id"], "unscorable_reference") for split in ("train", "eval") for i in (0, 1)]
    assert ("metric 'numeric' cannot score it" in report["problems"][1]["message"]
            and "no number here" in report["problems"][1]["message"])


def test_skip_bad_samples_trains_on_the_scorable_references(tiny_checkpoint, colours, tmp_path):
    records = json.loads(colours.read_text())
    for record in records[1:]:
        record["conversations"][1]["content"] = "3"
    data = tmp_path / "numbers.json"
    data.write_text(json.dumps(records))
    trainer = finetune.train(*arguments.parse_args(grpo_args(
        tiny_checkpoint("minicpmv2_6"), data, tmp_path / "out", "--grpo_rewards", "numeric", "--skip_bad_samples", "true",
        "--max_steps", "1", "--save_strategy", "no",
    )))
    assert sorted(trainer.references["train"]) == list(range(1, len(records)))
    assert len(trainer.train_dataset) == len(records) - 1


@pytest.fixture(scope="module")
def dots(shapes):
    """Records whose reference is ".", for runs in other processes, which take only the registered
    metrics: exact match with "." (an answer of punctuation or an article alone matches) is what
    about one token in eight of the random tiny model's earns."""
    path = shapes.parent / "dots.json"
    path.write_text(json.dumps([{**record, "conversations": [record["conversations"][0], {"role": "assistant", "content": "."}]}
                                for record in colour_records(shapes)]))
    return path


@pytest.mark.launch
def test_full_fine_tune_zero3_torchrun_two_processes_with_a_kl_term(tiny_checkpoint, dots, tmp_path):
    # Every rank generates until all are done (synced_gpus), as ZeRO-3's gathered layers need.
    env, out = subprocess_env(), tmp_path / "full"
    run_args = grpo_args(
        tiny_checkpoint("minicpmv2_6"), dots, out, "--deepspeed", REPO / "ds_config_zero3.json", "--grpo_beta", "0.1",
        "--grpo_rewards", "em", "--grpo_max_new_tokens", "1", "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "2e-3",
        "--lr_scheduler_type", "constant", "--save_strategy", "no",
        tuning=["--tune_llm", "true"],
    )
    _, output = run([*torchrun_finetune(env), *run_args], env=env)
    assert "Training with DeepSpeed ZeRO-3 on 2 process(es)" in output
    assert "GRPO reference model: a ZeRO-3 inference engine, sharded like the policy" in output
    steps = [h for h in trainer_state(out)["log_history"] if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3] and steps[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert steps[-1]["kl"] > 0 and (out / "config.json").is_file()


RESUME_STEPS = 6


@pytest.mark.launch
def test_launcher_two_processes_resumes_after_kill_9_with_the_same_samples(tiny_checkpoint, dots, tmp_path):
    # Groups with unequal rewards, nonzero advantages and gradients (see dots): the resumed steps
    # must sample the same answers to log the same.
    data = dots
    args = ["--max_steps", str(RESUME_STEPS), "--save_steps", "3", "--learning_rate", "1e-3", "--tune_vision", "false",
            "--seed", "0", "--grpo_rewards", "em", "--grpo_max_new_tokens", "1"]
    env = dict(GPUS_PER_NODE=2, MODEL=tiny_checkpoint("minicpmv2_6"), DATA=data, LLM_TYPE="qwen")
    whole = tmp_path / "whole"
    _, output = run_script("finetune_grpo.sh", args, OUTPUT_DIR=whole, **env)
    assert "Training with DeepSpeed ZeRO-2 on 2 process(es)" in output

    def logged(folder):
        return {h["step"]: (h["loss"], h["reward"], h["grad_norm"]) for h in trainer_state(folder)["log_history"]
                if "loss" in h}

    uninterrupted = logged(whole)
    assert sorted(uninterrupted) == list(range(1, RESUME_STEPS + 1))
    assert any(grad_norm > 0 for _, _, grad_norm in list(uninterrupted.values())[3:]), uninterrupted

    out = tmp_path / "killed"
    killed_at_checkpoint("finetune_grpo.sh", args, out, 3, **env)
    _, output = run_script("finetune_grpo.sh", [*args, "--resume_from_checkpoint", out], OUTPUT_DIR=out, **env)
    resumed_from = int(re.search(r"Resuming from \S+checkpoint-(\d+) \(step", output).group(1))
    resumed = logged(out)
    after = range(resumed_from + 1, RESUME_STEPS + 1)
    assert {step: resumed[step] for step in after} == {step: uninterrupted[step] for step in after}


@pytest.mark.parametrize("family", ["minicpmv2_6", "minicpmv4_6"])
def test_scored_evaluation_runs_beside_grpo_evaluation(family, tiny_checkpoint, colours, tmp_path):
    """--eval_generate under --stage grpo: each evaluation logs the GRPO eval metrics (its sampled
    answers' reward) and the greedy answers' scores, and writes those answers."""
    out = tmp_path / "run"
    trainer = finetune.train(*arguments.parse_args(grpo_args(
        tiny_checkpoint(family), colours, out, "--eval_data_path", colours, "--eval_strategy", "steps",
        "--eval_steps", "1", "--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--eval_generate", "3", "--eval_metrics", "em,letters_in_reference", "--eval_max_new_tokens", "3",
        "--save_strategy", "no",
    )))
    evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evaluations) == 2
    for entry in evaluations:
        assert {"eval_reward", "eval_em", "eval_letters_in_reference"} <= set(entry), entry
        assert 0 <= entry["eval_letters_in_reference"] <= 1
    for step in (1, 2):
        rows = [json.loads(line) for line in (out / "eval_answers" / f"step-{step}.jsonl").read_text().splitlines()]
        assert len(rows) == 3
