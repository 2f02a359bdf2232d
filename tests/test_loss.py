"""The loss on labelled positions only equals the loss from full logits, with the same gradients."""

import logging

import pytest
import torch
from transformers import AutoModel
from transformers.modeling_outputs import CausalLMOutputWithPast

import arguments
import loading
import lora
import loss
import numerics
import families
from data.slicing import model_pixels
from families.remote_code import RemoteCodeFamily
from launch import dataset_as_trained
from tiny_models.build import LLM_TYPE
from trainer import CPMTrainer


def batch_of(model_dir, data, llm_type, indices=(6, 7, 3)):
    dataset, collator = dataset_as_trained(model_dir, data, "--llm_type", llm_type)
    return collator([dataset[i] for i in indices])


def make_trainer(model, tmp_path, *argv):
    _, _, args, _ = arguments.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none",
                                          *argv])
    return CPMTrainer(model=model, args=args)


def model_batch(batch):
    """The collated batch as the model takes it (the family's forward normalises its uint8 pixels)."""
    return dict(batch, pixel_values=model_pixels(batch["pixel_values"], torch.float32))


def full_loss(model, batch):
    return loss.token_loss(model(data=model_batch(batch), use_cache=False).logits, batch["labels"])


def enable_checkpointing(model):
    """Non-reentrant checkpointing, as the Trainer turns it on, by this transformers' name for it: 5.2x
    renamed gradient checkpointing "activation checkpointing" (the old method warns as deprecated)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def loss_and_grads(compute, model, batch):
    model.zero_grad()
    value = compute(model, batch)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(trainer, model, batch):
    old, old_grads = loss_and_grads(full_loss, model, batch)
    new, new_grads = loss_and_grads(lambda m, b: trainer.compute_loss(m, b), model, batch)
    assert new.item() == numerics.approx(old.item())  # the head in chunks: other matrix-product shapes
    numerics.assert_close_grads(new_grads, old_grads)


@pytest.fixture
def small_chunks(monkeypatch):
    # A few labelled positions per chunk, so that a batch runs through several chunks.
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 1024)


@pytest.mark.numerics
@pytest.mark.parametrize("family", sorted(LLM_TYPE))
def test_same_loss_and_gradients_for_every_family(tiny_checkpoint, shapes, tmp_path, family, small_chunks):
    model_dir = tiny_checkpoint(family)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    trainer = make_trainer(model, tmp_path)
    assert trainer.full_logits_reason is None
    batch = batch_of(model_dir, shapes, LLM_TYPE[family])
    assert batch["labels"].ne(-100).sum() > 2 * loss.CHUNK_ELEMENTS // model.llm.config.vocab_size
    model.train()
    assert_same_loss_and_grads(trainer, model, batch)
    # The head is back in place and the model still returns full logits outside the loss.
    assert model.llm.get_output_embeddings() is model.llm.lm_head and isinstance(model.llm.lm_head, torch.nn.Linear)
    assert model(data=model_batch(batch), use_cache=False).logits.shape[-1] == model.llm.config.vocab_size


@pytest.mark.numerics
def test_lora_with_gradient_checkpointing(tiny_checkpoint, shapes, tmp_path, small_chunks):
    model_dir = tiny_checkpoint("minicpmv2_6")
    _, _, training_args, lora_args = arguments.parse_args(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--use_lora", "true", "--tune_llm", "false",
         "--gradient_checkpointing", "true", "--lora_dropout", "0", "--report_to", "none",
         # The head itself carries LoRA: the stand-in must call the wrapped module, not its weight.
         "--lora_target_modules", r"llm\..*(layers\.\d+\.self_attn\.(q_proj|v_proj)|lm_head)"]
    )
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    enable_checkpointing(model)
    model = lora.apply_lora(model, families.family_for(model.config), training_args, lora_args)
    for name, param in model.named_parameters():  # LoRA B starts at zero: give the adapters an effect
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    trainer = CPMTrainer(model=model, args=training_args)
    model.train()
    batch = batch_of(model_dir, shapes, "qwen")
    old, old_grads = loss_and_grads(full_loss, model, batch)
    assert any("lm_head.lora_A" in name for name in old_grads)
    assert_same_loss_and_grads(trainer, model, batch)


@pytest.mark.numerics
def test_qlora(tiny_checkpoint, shapes, tmp_path, small_chunks):
    model_dir = tiny_checkpoint("minicpmv2_6")
    batch = batch_of(model_dir, shapes, "qwen")
    _, _, training_args, lora_args = arguments.parse_args(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--use_lora", "true", "--tune_llm", "false",
         "--q_lora", "true", "--lora_dropout", "0", "--report_to", "none"]
    )
    config = loading.load_config(model_dir)
    model = loading.load_model(model_dir, config, dtype=torch.float32,
                               quantization_config=lora.quantization_config(lora_args, torch.float32, RemoteCodeFamily.unquantized_modules))
    model = lora.apply_lora(model, families.family_for(model.config), training_args, lora_args)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    trainer = CPMTrainer(model=model, args=training_args)
    model.train()
    assert_same_loss_and_grads(trainer, model, batch)


@pytest.mark.numerics
def test_bf16_within_rounding(tiny_checkpoint, shapes, tmp_path):
    model_dir = tiny_checkpoint("minicpmv2_6")
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.bfloat16)
    trainer = make_trainer(model, tmp_path)
    batch = batch_of(model_dir, shapes, "qwen")
    with torch.no_grad():
        old, new = full_loss(model, batch), trainer.compute_loss(model, batch)
    assert new.dtype == torch.float32
    # Each logit is rounded to bf16 in both paths; only the order of the head's sums differs.
    assert new.item() == pytest.approx(old.item(), rel=numerics.eps(torch.bfloat16) / 2)


class ScaledHeadLLM(torch.nn.Module):
    """What the MiniCPM LLM of MiniCPM-V 2.0 does at its end: divide the last hidden states by
    hidden_size / dim_model_base before lm_head, then upcast the logits."""

    def __init__(self, llm, divisor):
        super().__init__()
        self.inner, self.divisor, self.config = llm, divisor, llm.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.lm_head

    def set_output_embeddings(self, head):
        self.inner.lm_head = head

    def forward(self, **kwargs):
        hidden = self.inner.model(**kwargs).last_hidden_state
        logits = self.inner.lm_head(hidden / self.divisor).float()
        return CausalLMOutputWithPast(logits=logits)


@pytest.mark.numerics
def test_llm_that_scales_before_its_head(tiny_checkpoint, shapes, tmp_path):
    model_dir = tiny_checkpoint("minicpmv2_0")
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    model.llm = ScaledHeadLLM(model.llm, divisor=9.0)
    trainer = make_trainer(model, tmp_path)
    batch = batch_of(model_dir, shapes, "minicpm")
    model.train()
    assert_same_loss_and_grads(trainer, model, batch)


def test_full_logits_where_the_llm_reads_its_head_weight(tiny_checkpoint, shapes, tmp_path, caplog):
    model_dir = tiny_checkpoint("minicpmv2_0")
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    model.llm.config.pretraining_tp = 2
    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer = make_trainer(model, tmp_path)
    assert "pretraining_tp > 1 reads its head's weight directly" in caplog.text
    batch = batch_of(model_dir, shapes, "minicpm")
    with torch.no_grad():
        assert trainer.compute_loss(model, batch).item() == full_loss(model, batch).item()


@pytest.mark.numerics
def test_evaluation_loss_is_the_same(tiny_checkpoint, shapes, tmp_path):
    model_dir = tiny_checkpoint("minicpmv2_5")
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    batch = batch_of(model_dir, shapes, "llama3")  # before the trainer: parsing arguments resets accelerate's state
    trainer = make_trainer(model, tmp_path, "--prediction_loss_only", "false")
    model.eval()
    got, logits, _ = trainer.prediction_step(model, batch, prediction_loss_only=False)
    assert logits is None  # no compute_metrics: no logits made
    with torch.no_grad():
        assert got.item() == numerics.approx(full_loss(model, batch).item())
    # With metrics to compute, the logits come back, and the same loss with them.
    trainer.compute_metrics = lambda prediction: {}
    got, logits, _ = trainer.prediction_step(model, batch, prediction_loss_only=False)
    assert logits.shape[-1] == model.llm.config.vocab_size
    assert got.item() == numerics.approx(full_loss(model, batch).item())


@pytest.mark.numerics
def test_peak_memory_does_not_grow_with_the_vocabulary_times_length():
    """The head sees labelled positions only: no [positions, vocab] tensor is ever made."""
    hidden, vocab, length = 16, 4096, 512
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(1, length, hidden, requires_grad=True)
    labels = torch.full((1, length), -100)
    labels[0, :8] = torch.randint(vocab, (8,))
    shapes_seen = []
    head.register_forward_hook(lambda module, args, out: shapes_seen.append(tuple(out.shape)))
    total = loss.labelled_loss_sum(head, states, labels, vocab, chunk_elements=3 * vocab)
    total.backward()
    assert max(rows for rows, _ in shapes_seen) == 3  # chunks of 3 positions, recomputed in backward
    expected = loss.token_loss(head(states), labels, num_items=1)
    assert total.item() == numerics.approx(expected.item())  # chunks of 3 rows: other matrix-product shapes
