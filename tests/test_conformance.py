"""The conformance run (conformance.py): the published MiniCPM-V remote code through the user journey.

The journey itself needs copies of the published files, which CI cannot reach: it runs for every
copy of published_copies.KNOWN_COPIES found under $MINICPMV_PUBLISHED (the `fetch` tool's layout,
OWNER+NAME/repo), and is skipped, saying so, where the variable is unset. What needs no copy (the
builder on a git repository made here, the table, the error line) is tested always.
"""

import json
import os
import subprocess
import warnings

import pytest
import torch

import conformance
import loading
import published_copies


def git_copy(folder, files):
    """A git repository holding ``files`` at its root, committed; returns (git dir, commit)."""
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "copy"]):
        subprocess.run(["git", "-C", folder, *args], check=True, env=env)
    commit = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    return folder / ".git", commit.stdout.strip()


@pytest.fixture(scope="module")
def published_like(tiny_checkpoint, tmp_path_factory):
    """A git copy of the tiny 2.6's published-style files (no weights, no tokenizer.json), with a null
    the builder must keep; and the files as committed."""
    source = tiny_checkpoint("minicpmv2_6")
    files = {path.name: path.read_bytes() for path in source.iterdir()
             if path.suffix == ".py" or path.name in published_copies.SETTINGS_FILES}
    del files["generation_config.json"]  # the stand-in's pads with id 0, a byte, not a named token
    # Published tokenizer_config.json files list their added tokens (transformers 5 keeps them in tokenizer.json).
    tokenizer_config = json.loads(files["tokenizer_config.json"])
    added = json.loads((source / "tokenizer.json").read_text())["added_tokens"]
    tokenizer_config["added_tokens_decoder"] = {str(token["id"]): {"content": token["content"], "special": True} for token in added}
    files["tokenizer_config.json"] = json.dumps(tokenizer_config).encode()
    config = json.loads(files["config.json"])
    config["rope_scaling"] = None
    files["config.json"] = json.dumps(config).encode()
    git_dir, commit = git_copy(tmp_path_factory.mktemp("copy") / "owner+name", files)
    return git_dir, commit, files


def test_build_keeps_code_bytes_and_nulls_and_shrinks_sizes_only(published_like, tmp_path):
    git_dir, commit, files = published_like
    [copy] = published_copies.parse_spec(f"{git_dir}@{commit[:7]}")
    out = conformance.build([copy], tmp_path / "tiny")
    for name, data in files.items():
        if name.endswith(".py"):
            assert (out / name).read_bytes() == data, name
    published, built = json.loads(files["config.json"]), json.loads((out / "config.json").read_text())
    assert built.keys() == published.keys()
    assert built["rope_scaling"] is None
    changed = {key for key in published if built[key] != published[key]}
    allowed = set(conformance.LLM_SIZES) | {"num_key_value_heads", "vocab_size", "vision_config", *conformance.TOKEN_ID_FIELDS}
    assert changed <= allowed
    assert built["num_key_value_heads"] < built["num_attention_heads"]  # grouped-query attention stays grouped
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"] == json.loads(files["tokenizer_config.json"])["auto_map"]
    # It loads through this project's loader, and the token ids name the same tokens as published.
    tokenizer = loading.load_tokenizer(str(out))
    published_added = {int(i): e["content"] for i, e in json.loads(files["tokenizer_config.json"])["added_tokens_decoder"].items()}
    assert tokenizer.convert_ids_to_tokens(built["eos_token_id"]) == published_added[published["eos_token_id"]]
    model = loading.load_model(str(out), loading.load_config(str(out)), dtype=torch.float32)
    assert model.config.hidden_size == conformance.LLM_SIZES["hidden_size"]


def test_a_second_copy_supplies_only_the_files_the_first_lacks(published_like, tmp_path):
    git_dir, commit, files = published_like
    code_only = {name: b"# another revision\n" + data for name, data in files.items() if name.endswith(".py")}
    other_dir, other_commit = git_copy(tmp_path / "other+copy", code_only)
    copies = published_copies.parse_spec(f"{other_dir}@{other_commit},{git_dir}@{commit}")
    merged = published_copies.published_files(copies)
    assert {name: merged[name] for name in code_only} == code_only
    assert merged["config.json"] == files["config.json"]


@pytest.mark.parametrize("spec, message", [
    ("nothing-here", "expected MIRROR@COMMIT"),
    ("/no/such/mirror@abc1234", "is not a folder"),
])
def test_a_malformed_copy_is_refused_naming_it(spec, message):
    with pytest.raises(ValueError, match=message):
        published_copies.parse_spec(spec)


def test_the_first_error_line_is_the_exception_not_the_launcher():
    output = "\n".join([
        "[rank1]: Traceback (most recent call last):",
        "[rank1]: AttributeError: 'MiniCPMForCausalLM' object has no attribute 'embed_tokens'",
        "torchrun: worker 0 exited with status 1 (its output above says why)",
    ])
    assert conformance.first_error_line(output) == "AttributeError: 'MiniCPMForCausalLM' object has no attribute 'embed_tokens'"


def test_the_table_marks_failures_and_steps_not_run():
    results = {"build": (True, ""), "lora": (False, "KeyError: 'type'"), "merge": (None, "not run: lora did not pass")}
    text = conformance.table({"2.0": results}, {"2.0": "o/n@abc"})
    row = next(line for line in text.splitlines() if line.startswith("| 2.0 "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2:5] == ["✓", "·", "✗"]  # build, preflight (not run), lora
    assert "- 2.0, lora: `KeyError: 'type'`" in text


@pytest.mark.launch
def test_the_published_families_pass_the_whole_journey(tmp_path):
    root = os.environ.get(published_copies.PUBLISHED_ENV)
    if not root:
        pytest.skip(f"${published_copies.PUBLISHED_ENV} is not set: the published remote code was NOT checked "
                    "(tests/test_tiny_models.py holds the stand-ins to the recorded published interfaces)")
    found, missing = published_copies.find_known(root)
    if missing:
        warnings.warn(f"conformance: not found under {root}: {', '.join(missing)}")
    assert found, f"${published_copies.PUBLISHED_ENV}={root} holds none of {', '.join(published_copies.KNOWN_COPIES)}"
    rows = {label: conformance.check(label, published_copies.parse_spec(spec, root), tmp_path / f"copy{i}")
            for i, (label, spec) in enumerate(found.items())}
    text = conformance.table(rows, {label: found[label] for label in rows})
    print(f"conformance covered {', '.join(rows)}; not found: {', '.join(missing) or 'none'}\n{text}")
    assert all(ok for results in rows.values() for ok, _ in results.values()), text
