"""Trainer and TRL's SFTTrainer with adapter_checkpoints(): checkpoints and save_model() hold the PEFT-format
adapter only, and resuming or load_best_model_at_end read it back exactly."""

import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig
from lorakit.train.hf_trainer import adapter_checkpoints

from ..conftest import load, tiny_tokenizer
from .helpers import letter_rows

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def adapted(lm_dir):
    torch.manual_seed(0)
    model = load(lm_dir)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    return model


def lm_dataset(tok, n):
    from datasets import Dataset

    rows = [r["prompt"] + r["completion"] for r in letter_rows(n)]
    return Dataset.from_dict({"text": rows}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])


def hf_trainer(model, out, **kw):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = tiny_tokenizer()
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                             use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, **kw)
    return adapter_checkpoints(Trainer(model=model, args=args, train_dataset=lm_dataset(tok, 32),
                                       eval_dataset=lm_dataset(tok, 8), processing_class=tok,
                                       data_collator=DataCollatorForLanguageModeling(tok, mlm=False)))


def lora_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_trainer_checkpoints_and_save_model_hold_the_adapter_only(lm_dir, tmp_path, tokens):
    from peft import PeftModel

    model = adapted(lm_dir)
    trainer = hf_trainer(model, tmp_path / "run")
    trainer.train()
    for step in (2, 4):
        files = sorted(p.name for p in (tmp_path / "run" / f"checkpoint-{step}").iterdir())
        assert [f for f in files if f.startswith(("adapter_", "model"))] == ADAPTER_FILES
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert len(saved) == 2 * 14 and all(k.startswith("base_model.model.") for k in saved)  # 7 projections x 2 layers
    peft = PeftModel.from_pretrained(load(lm_dir), tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(tokens).logits, model.eval()(tokens).logits, atol=1e-5, rtol=0)
    plain = lorakit.merge_and_unload(model)  # a plain model saves in full again
    plain.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_resume_and_best_model_read_the_adapter_back(lm_dir, tmp_path):
    straight = adapted(lm_dir)
    hf_trainer(straight, tmp_path / "a").train()
    resumed = adapted(lm_dir)
    hf_trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    a, b = lora_tensors(straight), lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # "best" = highest eval loss, i.e. the first checkpoint: load_best_model_at_end must really load it
    model = adapted(lm_dir)
    trainer = hf_trainer(model, tmp_path / "c", load_best_model_at_end=True, metric_for_best_model="loss",
                         greater_is_better=True)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    want = load_file(tmp_path / "c" / "checkpoint-2" / "adapter_model.safetensors")
    final = load_file(tmp_path / "c" / "checkpoint-4" / "adapter_model.safetensors")
    got = lorakit.io.adapter_state_dict(model, "default")
    assert all(torch.equal(got[k], want[k]) for k in want) and not all(torch.equal(got[k], final[k]) for k in want)


def test_trl_sft_trainer_saves_the_adapter_only(lm_dir, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = adapted(lm_dir)
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2,
                     report_to=[], save_strategy="steps", save_steps=2, use_cpu=True, disable_tqdm=True, max_length=32)
    trainer = adapter_checkpoints(SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(letter_rows(16)),
                                             processing_class=tiny_tokenizer()))
    trainer.train()
    trainer.save_model()
    for d in (tmp_path / "run", tmp_path / "run" / "checkpoint-2"):
        assert [f for f in sorted(p.name for p in d.iterdir()) if f.startswith(("adapter_", "model"))] == ADAPTER_FILES
    again = lorakit.load_adapter(load(lm_dir), tmp_path / "run")
    assert all(torch.equal(p, lora_tensors(model)[n]) for n, p in lora_tensors(again).items())
