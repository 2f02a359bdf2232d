"""Run the published MiniCPM-V remote code, at tiny size, through the whole user journey.

    python -m conformance MIRROR@COMMIT[:SUBDIR][,MIRROR@COMMIT[:SUBDIR]] ... [--work DIR]
    python -m conformance            # every known copy found under $MINICPMV_PUBLISHED

Our tests train tiny stand-ins (tiny_models/); this runs the files users download. For each copy it
builds a tiny checkpoint from the published files: the Python files byte for byte, read from the
mirror at run time (never stored in this project); config.json (and preprocessor_config.json,
generation_config.json) shrunk in size only, every other field and every null as published; a small
byte-level BPE tokenizer of our own (tiny_models.build.train_bpe) holding the published special
tokens, under the published tokenizer_config.json (its class, auto_map and chat template); random
weights of the published model class. Then it runs what the README promises a user: preflight, LoRA
through finetune_lora.sh (2 processes, ZeRO-2), infer.py --adapter, merge.py, infer.py on the merged
folder, a plain-transformers load of that folder answering through its own chat(), a full fine-tune
through finetune_ds.sh (ZeRO-3), infer.py on it, and one DPO step. It prints a copy x step table and
exits 1 if any step failed.

MIRROR@COMMIT[:SUBDIR]: see published_copies.py (where the copies come from, and KNOWN_COPIES).

Sizes that are not plain numbers: MiniCPM-V 2.0 names its vision tower by a timm model name
(``vit_so400m_patch14_siglip_384.webli``, 400M parameters); the tiny checkpoint names timm's own
test ViT (TINY_TIMM_ENCODER) instead.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import demo_data
import families
import loading
from published_copies import KNOWN_COPIES, PUBLISHED_ENV, find_known, parse_spec, published_files
from repairs.classes import repaired_model_class
from repairs.imports import import_model_class
from tiny_models.build import OUTPUT_HEAD_STD, TOKENIZER_SPECS, train_bpe

REPO = Path(__file__).resolve().parent

# Tiny sizes, by config field (the LLM's at the top level, the vision tower's under vision_config).
# hidden_size 128: the published resamplers use hidden_size // 128 attention heads.
LLM_SIZES = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_window_layers": 2, "query_num": 16}
VISION_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_TIMM_ENCODER = "test_vit"  # timm's 0.3M-parameter ViT, registered for timm's own tests
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

STEPS = ("build", "preflight", "lora", "infer_adapter", "merge", "infer_merged", "plain_chat", "full", "infer_full",
         "dpo")
# A step that needs another's output is not run when that one failed.
NEEDS = {"preflight": "build", "lora": "build", "infer_adapter": "lora", "merge": "lora", "infer_merged": "merge",
         "plain_chat": "merge", "full": "build", "infer_full": "full", "dpo": "build"}
# The folder each step writes (under the copy's work folder), checked to hold every file it names.
WRITES = {"lora": "lora", "merge": "merged", "full": "full", "dpo": "dpo"}
STEP_TIMEOUT_S = 900
# Each launch is as short as the step allows: a tiny run proves the path, not the learning.
FAST_ARGS = ["--report_to", "none", "--max_slice_nums", "2", "--model_max_length", "512",
             "--dataloader_num_workers", "0", "--max_steps", "2", "--save_steps", "1000", "--warmup_steps", "0",
             "--learning_rate", "1e-3", "--seed", "0"]


# --------------------------------------------------------------------------------------------
# The tiny checkpoint.

def shrink_config(config, vocab_size, token_ids):
    """The published config.json at tiny size: only sizes and token ids change, nulls stay."""
    published, config = config, json.loads(json.dumps(config))
    for key, value in LLM_SIZES.items():
        if key in config:
            config[key] = value
    if "num_key_value_heads" in config:
        # Grouped-query attention stays grouped (2.5, 2.6); plain multi-head stays plain (2.0).
        grouped = published["num_key_value_heads"] < published["num_attention_heads"]
        config["num_key_value_heads"] = 2 if grouped else LLM_SIZES["num_attention_heads"]
    config["vocab_size"] = vocab_size
    for key in TOKEN_ID_FIELDS:
        if config.get(key) is not None:
            config[key] = token_ids(config[key])
    if isinstance(config.get("vision_config"), dict):
        config["vision_config"].update({k: v for k, v in VISION_SIZES.items() if k in config["vision_config"]})
    if "vision_encoder" in config:
        config["vision_encoder"] = TINY_TIMM_ENCODER
    return config


def build_tokenizer(tokenizer_config, special_tokens_map, llm_type):
    """Our small BPE under the published tokenizer settings: (tokenizer.json text, tokenizer_config, id map).

    The vocabulary holds the published added tokens (tokenizer_config's added_tokens_decoder and the
    special-tokens map), and the chat-layout tokens of the family's template; the id map turns a
    published token id into ours by the token's text."""
    published_added = {int(i): entry["content"] for i, entry in tokenizer_config.get("added_tokens_decoder", {}).items()}
    named = []
    for source in (tokenizer_config, special_tokens_map):
        named.extend(source.get(key) for key in ("bos_token", "eos_token", "unk_token", "pad_token"))
        named.extend(source.get("additional_special_tokens") or [])
    named = [token["content"] if isinstance(token, dict) else token for token in named]
    # Single characters (2.5's pad token "!") are bytes of the BPE already.
    special = [t for t in dict.fromkeys([*published_added.values(), *named, *TOKENIZER_SPECS[llm_type]["extra_tokens"]])
               if isinstance(t, str) and len(t) > 1]
    bos = tokenizer_config.get("bos_token")
    bos = bos["content"] if isinstance(bos, dict) else bos
    add_bos = tokenizer_config.get("add_bos_token", llm_type != "qwen") and bos is not None
    tokenizer = train_bpe(special, bos if add_bos else None)
    added = {}
    for token in special:
        added[str(tokenizer.token_to_id(token))] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
    tokenizer_config = {**tokenizer_config, "added_tokens_decoder": added}

    def token_ids(value):
        if isinstance(value, list):
            return [token_ids(v) for v in value]
        if value not in published_added:
            raise ValueError(f"token id {value} is not among the published added tokens: cannot map it")
        return tokenizer.token_to_id(published_added[value])

    return tokenizer.to_str(), tokenizer_config, token_ids, tokenizer.get_vocab_size()


def build(copies, out_dir, seed=0):
    """Write the tiny checkpoint of ``copies`` into ``out_dir``; return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = published_files(copies)
    config = json.loads(files["config.json"])
    tokenizer_config = json.loads(files["tokenizer_config.json"])
    special_tokens_map = json.loads(files.get("special_tokens_map.json", b"{}"))
    tokenizer_json, tokenizer_config, token_ids, vocab_size = build_tokenizer(
        tokenizer_config, special_tokens_map, families.family_for_dict(config).llm_type)
    for name, data in files.items():
        if name.endswith(".py") or name == "special_tokens_map.json":
            (out_dir / name).write_bytes(data)  # byte for byte
    tiny = shrink_config(config, vocab_size, token_ids)
    (out_dir / "config.json").write_text(json.dumps(tiny, indent=2) + "\n")
    (out_dir / "tokenizer.json").write_text(tokenizer_json)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    if "generation_config.json" in files:
        generation = json.loads(files["generation_config.json"])
        generation.update({k: token_ids(generation[k]) for k in TOKEN_ID_FIELDS if generation.get(k) is not None})
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if "preprocessor_config.json" in files:
        processor = json.loads(files["preprocessor_config.json"])
        if "image_feature_size" in processor:
            processor["image_feature_size"] = tiny["query_num"]
        (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    write_random_weights(out_dir, seed)
    return out_dir


def write_random_weights(out_dir, seed):
    """Random weights of the published model class, built through this project's loading path (the
    repairs published code needs on this transformers), the output head at a trained head's scale as
    tiny_models.build gives it."""
    config = loading.load_config(str(out_dir))
    # The class loading.load_model loads through: the published one with the repairs it needs.
    published = import_model_class(str(out_dir), config)
    model_class = repaired_model_class(published, None, published.__module__)
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, OUTPUT_HEAD_STD)
    with tempfile.TemporaryDirectory() as scratch:
        # save_pretrained rewrites config.json: keep only the weights it writes.
        model.save_pretrained(scratch)
        for weights in Path(scratch).glob("*.safetensors*"):
            shutil.move(str(weights), out_dir / weights.name)


# --------------------------------------------------------------------------------------------
# The journey.

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_error_line(output):
    """The line that says what went wrong: the last exception or error line, else the last line."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line.strip()) for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^([\w.]+(Error|Exception|Exit|Failed)\b|.*\berror: )", line):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def write_data(folder):
    """demo_data's shapes (one and two images, text only), a 2-question file, and preference pairs."""
    data = demo_data.generate(folder, count=4)
    records = json.loads(data.read_text())
    questions = folder / "questions.json"
    questions.write_text(json.dumps([records[0], records[3]]))
    pairs = []
    for record in records:
        *prompt, answer = record["conversations"]
        pairs.append({**record, "conversations": prompt, "chosen": answer["content"],
                      "rejected": "not " + answer["content"]})
    preferences = folder / "preferences.json"
    preferences.write_text(json.dumps(pairs))
    return data, questions, preferences


PLAIN_CHAT = r'''
import inspect, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer
folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
image = Image.new("RGB", (112, 112), (200, 40, 40))
msgs = [{"role": "user", "content": "What is this?"}]
torch.manual_seed(0)
kwargs = dict(image=image, msgs=msgs, tokenizer=tokenizer, sampling=True, max_new_tokens=4)  # as the model cards call it
params = inspect.signature(model.chat).parameters
# As each model card calls it: 2.0's chat also takes the running context and the processor.
if "context" in params:
    kwargs["context"] = None
if "processor" in params and params["processor"].default is inspect.Parameter.empty:
    kwargs["processor"] = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
answer = model.chat(**kwargs)
print("answer:", repr(answer))
'''


def journey_commands(checkpoint, work, data, questions, preferences):
    """{step: (argv, extra env)} of the journey after the build."""
    python = sys.executable
    launcher_env = {"GPUS_PER_NODE": "2", "MODEL": str(checkpoint), "DATA": str(data), "EVAL_DATA": ""}
    lora, merged, full = work / "lora", work / "merged", work / "full"
    infer = [python, REPO / "infer.py", "--questions", questions, "--max_new_tokens", "4", "--max_slice_nums", "2"]
    return {
        "preflight": ([python, REPO / "finetune.py", "--model_name_or_path", checkpoint, "--data_path", data,
                       "--output_dir", work / "preflight", "--use_cpu", "true", "--preflight_only", "true",
                       *FAST_ARGS], {}),
        "lora": (["bash", REPO / "finetune_lora.sh", *FAST_ARGS], {**launcher_env, "OUTPUT_DIR": str(lora)}),
        "infer_adapter": ([*infer, "--model", checkpoint, "--adapter", lora], {}),
        "merge": ([python, REPO / "merge.py", "--model", checkpoint, "--adapter", lora, "--out", merged], {}),
        "infer_merged": ([*infer, "--model", merged], {}),
        # Isolated (-I): no module of this project is importable, as for a user of plain transformers.
        "plain_chat": ([python, "-I", "-c", PLAIN_CHAT, merged], {}),
        "full": (["bash", REPO / "finetune_ds.sh", *FAST_ARGS], {**launcher_env, "OUTPUT_DIR": str(full)}),
        "infer_full": ([*infer, "--model", full], {}),
        "dpo": (["bash", REPO / "finetune_dpo.sh", *FAST_ARGS, "--max_steps", "1"],
                {**launcher_env, "DATA": str(preferences), "OUTPUT_DIR": str(work / "dpo")}),
    }


def run_step(argv, env_extra, log):
    env = dict(os.environ, PYTHON=sys.executable, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **env_extra)
    try:
        result = subprocess.run([str(a) for a in argv], env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        log.write_text(f"{e}\n")
        return False, f"timed out after {STEP_TIMEOUT_S} s"
    output = result.stdout + result.stderr
    log.write_text(output)
    return result.returncode == 0, "" if result.returncode == 0 else first_error_line(output)


def check(label, copies, work, steps=STEPS):
    """{step: (ok or None when not run, message)} for one copy; logs under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        # A name of its own: transformers 5.3 names its module cache after the folder, so copies built
        # in one process under one name would share (stale) modules.
        checkpoint = build(copies, work / f"tiny-{work.name}")
        results["build"] = (True, "")
    except Exception as e:  # noqa: BLE001 (any failure of the published code is a result of this step)
        (work / "build.log").write_text(repr(e))
        results["build"] = (False, f"{type(e).__name__}: {e}".splitlines()[0][:300])
        checkpoint = None
    data, questions, preferences = write_data(work / "data")
    commands = journey_commands(checkpoint, work, data, questions, preferences)
    for step in STEPS[1:]:
        if step not in steps:
            continue
        need = NEEDS[step]
        if not results.get(need, (False,))[0]:
            results[step] = (None, f"not run: {need} did not pass")
            continue
        argv, env_extra = commands[step]
        results[step] = run_step(argv, env_extra, work / f"{step}.log")
        written = WRITES.get(step)
        if results[step][0] and written and loading.named_files_missing(work / written):
            # A folder we write must hold every file its settings name (issue 22: 2.6 adapters did not).
            missing = ", ".join(f"{settings} -> {name}" for settings, name in loading.named_files_missing(work / written))
            results[step] = (False, f"{written}/ names files it lacks: {missing}")
        print(f"{label}: {step} {'ok' if results[step][0] else 'FAILED: ' + results[step][1]}", flush=True)
    return results


def table(rows, commits):
    """Markdown: one row per copy, one column per step; a failure's first error line below the table."""
    lines = ["| copy | commit | " + " | ".join(STEPS) + " |", "|---" * (len(STEPS) + 2) + "|"]
    notes = []
    for label, results in rows.items():
        cells = []
        for step in STEPS:
            ok, message = results.get(step, (None, "not run"))
            cells.append("✓" if ok else "·" if ok is None else "✗")
            if ok is False:
                notes.append(f"- {label}, {step}: `{message}`")
        lines.append(f"| {label} | {commits[label]} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("copies", nargs="*", help="MIRROR@COMMIT[:SUBDIR][,MIRROR@COMMIT[:SUBDIR]] (default: the known copies)")
    parser.add_argument("--work", type=Path, help="folder for checkpoints, runs and logs (default: a temporary one)")
    parser.add_argument("--steps", nargs="+", choices=STEPS[1:], default=list(STEPS[1:]), help="journey steps to run")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    root = os.environ.get(PUBLISHED_ENV)
    if args.copies:
        known = {spec: label for label, spec in KNOWN_COPIES.items()}
        specs = {known.get(spec, spec): spec for spec in args.copies}
    else:
        if not root:
            parser.error(f"name the copies, or set ${PUBLISHED_ENV} to the folder of mirrors")
        specs, missing = find_known(root)
        if missing:
            print(f"not found under {root}: {', '.join(missing)}", flush=True)
    try:
        parsed = {label: parse_spec(spec, root) for label, spec in specs.items()}
        commits = {label: ", ".join(f"{c.label()} ({c.full_commit()[:12]})" for c in copies)
                   for label, copies in parsed.items()}
    except (ValueError, subprocess.CalledProcessError) as e:
        parser.error(str(e))
    work = args.work or Path(tempfile.mkdtemp(prefix="conformance-"))
    rows = {}
    for index, (label, copies) in enumerate(parsed.items()):
        rows[label] = check(label, copies, work / f"copy{index}", steps=("build", *args.steps))
    text = f"transformers {transformers.__version__}, torch {torch.__version__}\n\n" + table(rows, commits)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0 if all(ok for results in rows.values() for ok, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
