"""Load saved folders as a user of plain transformers would: no import of this project.

    python -I tests/plain_load.py JOBS.json RESULTS.pt

Run isolated (`-I`: neither the repository nor this folder is on sys.path). JOBS.json holds a
list of jobs `{"name", "folder", "batch", "resave", "chat"}`: load `folder` with
`AutoModel.from_pretrained(folder, trust_remote_code=True)`, compute the logits of the batch
saved at `batch`; with `resave`, save the loaded model there with `save_pretrained` and load
that folder again; with `chat`, answer through the model's own `chat()` with the folder's
tokenizer. RESULTS.pt maps each name to its logits, answer, or the error that stopped it.
"""

import json
import sys
import traceback

import torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer

PROJECT_MODULES = (
    "loading", "repairs", "finetune", "arguments", "distributed", "lora", "usage", "dataset", "trainer", "merge", "infer",
    "families", "stages", "data", "evaluation", "preflight", "loss", "resilience", "run_folder",
)


def load(folder):
    return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def logits(model, batch):
    with torch.no_grad():
        return model(data=batch).logits


def run(job):
    batch = torch.load(job["batch"])
    model = load(job["folder"])
    result = {"logits": logits(model, batch)}
    if job.get("resave"):
        model.save_pretrained(job["resave"])
        result["resaved_logits"] = logits(load(job["resave"]), batch)
    if job.get("chat"):
        tokenizer = AutoTokenizer.from_pretrained(job["folder"], trust_remote_code=True)
        image = Image.new("RGB", (200, 150), (200, 40, 40))
        result["answer"] = model.chat(image=image, msgs=[{"role": "user", "content": "What is this?"}],
                                      tokenizer=tokenizer, sampling=False, max_new_tokens=4)
    return result


def main(jobs_path, results_path):
    results = {}
    for job in json.loads(open(jobs_path).read()):
        try:
            results[job["name"]] = run(job)
        except Exception as error:  # noqa: BLE001 (a failure to load is a result here, reported per job)
            results[job["name"]] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    results["project_modules_imported"] = sorted(set(PROJECT_MODULES) & set(sys.modules))
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
