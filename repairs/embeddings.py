"""Defects 7 and 8: the token embeddings as transformers 4.x reached them (a list of tied weights; a
`get_input_embeddings` that fails). Both mend the instance, not its class."""

from .log import warn_once


def repair_tied_weights_keys(model):
    """Defect 7. transformers 4.x's `_tied_weights_keys` was a list of output weights tied to the input
    embeddings (MiniCPM-V 2.0's `MiniCPMForCausalLM`: ["lm_head.weight"]); transformers 5 reads a
    {target: source} dict, and `save_pretrained` fails on a list (AttributeError: 'list' object has no
    attribute 'keys'). Detected per module of `model`; repaired on that module (not its class) with the
    dict 4.x meant: each listed weight -> the module's input-embedding weight. Returns the modules'
    class names repaired."""
    repaired = []
    for module in model.modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if not isinstance(keys, (list, tuple)):
            continue
        embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
        names = {sub: name for name, sub in module.named_modules()}
        if embeddings not in names:
            raise TypeError(f"{type(module).__name__}._tied_weights_keys is a list {keys}, and its input embeddings "
                            "are not among its modules: cannot tell what they are tied to")
        module._tied_weights_keys = {key: f"{names[embeddings]}.weight" for key in keys}
        warn_once(
            "Remote code %s._tied_weights_keys is a list (transformers 4.x's layout): read as %s, the mapping "
            "transformers 5 expects.", type(module), module._tied_weights_keys,
        )
        repaired.append(type(module).__name__)
    return repaired


# ---- defect 8: input embeddings out of reach ---------------------------------------------------


def repair_input_embeddings(model):
    """Defect 8. The published MiniCPM-V 2.0 `get_input_embeddings` returns `self.llm.embed_tokens`,
    which its LLM (`MiniCPMForCausalLM`, embeddings under `.model`) does not have: AttributeError
    wherever transformers or peft reach the token embeddings (gradient checkpointing's
    `enable_input_require_grads`, LoRA). Detected by calling it; repaired on `model` (not its class)
    by the LLM's own get/set_input_embeddings. A model without such a method is left alone (the LoRA
    setup gives it one). Returns True when repaired."""
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "llm"):
        return False
    try:
        model.get_input_embeddings()
    except AttributeError as e:
        model.get_input_embeddings = model.llm.get_input_embeddings
        model.set_input_embeddings = model.llm.set_input_embeddings
        warn_once("Remote code %s.get_input_embeddings fails (%s): using its LLM's get/set_input_embeddings.",
                  type(model), e)
        return True
    return False
