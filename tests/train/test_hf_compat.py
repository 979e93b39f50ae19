"""An adapted model trains under Hugging Face's Trainer and TRL's SFTTrainer; only the adapter changes."""

import torch

import lorakit
from lorakit import LoraConfig

from ..conftest import load, tiny_tokenizer
from .helpers import letter_rows


def adapted(lm_dir):
    model = load(lm_dir)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, frozen, lora


def check_only_lora_changed(model, frozen, lora):
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in lora.items() if "lora_B" in n)


def test_hf_trainer(lm_dir, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = tiny_tokenizer()
    model, frozen, lora = adapted(lm_dir)
    rows = [r["prompt"] + r["completion"] for r in letter_rows(32)]
    ds = Dataset.from_dict({"text": rows}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    check_only_lora_changed(model, frozen, lora)
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_trl_sft_trainer(lm_dir, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = tiny_tokenizer()
    model, frozen, lora = adapted(lm_dir)
    ds = Dataset.from_list(letter_rows(32))  # prompt/completion: TRL masks the prompt itself
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                     report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True,
                     max_length=32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    result = trainer.train()
    assert result.global_step == 4
    check_only_lora_changed(model, frozen, lora)
