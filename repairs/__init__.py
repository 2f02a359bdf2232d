"""Narrow repairs for MiniCPM-V remote code written for transformers 4.4x and older torch.

The published `openbmb/MiniCPM-V-2_6` code (and its siblings) breaks on current versions; each
repair first detects its defect and does nothing when it is absent, and logs at WARNING (through
`log.logger`) what it repaired. One module per concern:

    typing_names   1  a `typing` name a module never imports (it relied on a star import)
    construction   2  `__init__` never calls post_init();  3  non-persistent buffers left unfilled
    removed_names  4  transformers names since removed (their stand-ins: stand_ins)
    generation     5  prepare_inputs_for_generation for 4.36's generate;  10  no GenerationMixin
    rope           6  `rope_scaling` read as transformers 4.x held it
    embeddings     7  a list of tied weights;  8  a get_input_embeddings that fails
    zero3          9  'cuda' under ZeRO-3 on a machine without CUDA
    tokenizer      11 a tokenizer reading sentencepiece's ids
    imports        the repairs due before remote code is imported (1 and 4), and the model class import
    classes        the published classes with the repairs built in (`repaired_model_class`, ...)
    files          which remote-code files a checkpoint names; the saved copies' names

One repair path: the loader (`loading.load_model`) loads through `classes.repaired_model_class`, and
every folder this project saves carries the same classes, so that plain
`AutoModel.from_pretrained(folder, trust_remote_code=True)` applies the same repairs: its
config.json's `auto_map` points to a generated `repaired_classes.py` (see `loading.py`), beside a
flat copy of each module here named `files.REPAIRS_FILE_PREFIX + module` (so that it cannot clash
with a published file). Hence the rule for these modules: import only the standard library, torch,
transformers, and each other through relative imports (`from .log import logger`).

Adding a repair: a function that detects its defect and returns what it repaired (empty when
nothing), in the module of its concern or a new one here, and a call where the defect shows (a
model's construction in `classes.repaired_model_class`; an import in `imports.repair_imports`). A
new module is copied into saved folders without more ado.
"""
